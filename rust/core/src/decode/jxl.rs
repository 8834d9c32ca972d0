//! JPEG XL through jxl-oxide (pure Rust), to RGB8 upright by the codestream's own orientation; and
//! the header walk that gives the stored size and the orientation without decoding pixels.
//!
//! A JPEG XL file carries its orientation in the codestream header, and may also carry an `Exif`
//! box (ISO BMFF container). The codestream's orientation is the one the format defines (ISO/IEC
//! 18181-2 says to ignore Exif's); writers that leave it at 1 and put the orientation only in the
//! `Exif` box (Pillow with pillow-jxl-plugin does) are read as Pillow reads them, by honouring the
//! `Exif` box when the codestream says 1. jxl-oxide always applies the codestream orientation, so
//! `decode` in `mod.rs` only turns the pixels further when the caller's orientation differs.
//!
//! jxl-oxide runs single-threaded here (`JxlThreadPool::none`): each worker thread decodes its own
//! image, and rayon's global pool, jxl-oxide's default, does not survive a `fork()`. This file must
//! not apply the caller's orientation, composite alpha or narrow samples itself (that is `pixels`').

use std::io::Cursor;
use std::path::Path;

use image::ColorType;
use jxl_oxide::{InitializeResult, JxlImage, JxlThreadPool, PixelFormat};

use super::exif::exif_orientation;
use super::header::{SliceSource, Source};
use super::pixels::to_rgb8;
use super::{check_pixels, DecodeOptions, RgbImage};
use crate::error::{Error, Result};

/// The 12-byte signature box that starts a JPEG XL container (a bare codestream starts `FF 0A`).
pub(super) const CONTAINER_SIGNATURE: &[u8] = b"\0\0\0\x0cJXL \r\n\x87\n";

/// Bytes fed to jxl-oxide per read while looking for the end of the image header.
const WINDOW: usize = 16 * 1024;

/// The most bytes of an `Exif` box read for its orientation (IFD0 comes first in the block).
const EXIF_WINDOW: usize = 64 * 1024;

fn corrupt(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::decode(path, format!("corrupt JPEG XL: {e}"))
}

/// Stored size (before orientation) and orientation: the codestream's, or when that is 1 (and
/// `with_orientation`) the `Exif` box's. Reads the codestream up to the end of its image header
/// (with the embedded ICC profile and any preview frame), and in a container the box headers plus
/// the start of an `Exif` box.
pub(super) fn jxl_header(
    src: &mut impl Source,
    path: &Path,
    with_orientation: bool,
) -> Result<(u32, u32, u8)> {
    let mut uninit = JxlImage::builder()
        .pool(JxlThreadPool::none())
        .build_uninit();
    let mut offset = 0u64;
    let image = loop {
        let chunk = src
            .bytes_at(offset, WINDOW)
            .map_err(|e| Error::io(path, e))?;
        let at_end = chunk.len() < WINDOW;
        let consumed = uninit.feed_bytes(chunk).map_err(|e| corrupt(path, e))?;
        offset += consumed as u64;
        match uninit.try_init().map_err(|e| corrupt(path, e))? {
            InitializeResult::Initialized(image) => break image,
            InitializeResult::NeedMoreData(more) if !at_end && consumed > 0 => uninit = more,
            InitializeResult::NeedMoreData(_) => {
                return Err(Error::decode(
                    path,
                    "truncated file: JPEG XL ends inside its image header",
                ))
            }
        }
    };
    let header = image.image_header();
    let own = u8::try_from(header.metadata.orientation).unwrap_or(1);
    let orientation = if own == 1 && with_orientation {
        exif_box_orientation(src, path)?
    } else {
        own
    };
    Ok((header.size.width, header.size.height, orientation))
}

/// The orientation in a container's first `Exif` box (1 if there is none, it is Brotli-compressed
/// (`brob`), or the file is a bare codestream). A box list cut short ends the search: the decode
/// reports truncation.
fn exif_box_orientation(src: &mut impl Source, path: &Path) -> Result<u8> {
    let head = src.bytes_at(0, 12).map_err(|e| Error::io(path, e))?;
    if head != CONTAINER_SIGNATURE {
        return Ok(1);
    }
    let mut pos: u64 = 12;
    loop {
        let b = src.bytes_at(pos, 16).map_err(|e| Error::io(path, e))?;
        if b.len() < 8 {
            return Ok(1);
        }
        let size32 = u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        let kind = [b[4], b[5], b[6], b[7]];
        // Size 1: a 64-bit size follows the type; size 0: the box runs to the end of the file.
        let (header_len, size) = match size32 {
            1 if b.len() == 16 => {
                let mut big = [0u8; 8];
                big.copy_from_slice(&b[8..16]);
                (16, u64::from_be_bytes(big))
            }
            0 | 1 => (8, u64::MAX),
            n => (8, n),
        };
        if size < header_len {
            return Ok(1);
        }
        if &kind == b"Exif" {
            // The payload is a 4-byte offset to the TIFF header, then the EXIF block; some writers
            // (pillow-jxl-plugin) leave the offset out and start with the TIFF header, which
            // Pillow's reader accepts too.
            let payload = usize::try_from(size - header_len).unwrap_or(usize::MAX);
            let block = src
                .bytes_at(pos + header_len, payload.min(EXIF_WINDOW))
                .map_err(|e| Error::io(path, e))?;
            if block.starts_with(b"II*\0") || block.starts_with(b"MM\0*") {
                return Ok(exif_orientation(block));
            }
            let Some(skip) = block.get(..4) else {
                return Ok(1);
            };
            let skip = u32::from_be_bytes([skip[0], skip[1], skip[2], skip[3]]) as usize;
            return Ok(block
                .get(4usize.saturating_add(skip)..)
                .map_or(1, exif_orientation));
        }
        pos = pos.saturating_add(size);
    }
}

/// Decode a JPEG XL file's first frame to RGB8, turned by the codestream's orientation (which jxl-oxide
/// always applies); returns that orientation with the image.
pub(super) fn decode_jxl(
    bytes: &[u8],
    path: &Path,
    opts: &DecodeOptions,
) -> Result<(RgbImage, u8)> {
    let (width, height, _) = jxl_header(&mut SliceSource(bytes), path, false)?;
    check_pixels(path, width, height, opts.max_pixels)?;
    let image = JxlImage::builder()
        .pool(JxlThreadPool::none())
        .read(Cursor::new(bytes))
        .map_err(|e| corrupt(path, e))?;
    // jxl-oxide renders what it has of a cut file; like libjxl (Pillow) we refuse it.
    if !image.is_loading_done() || image.num_loaded_keyframes() == 0 {
        return Err(Error::decode(
            path,
            "truncated file: JPEG XL ends before its last frame",
        ));
    }
    let own = u8::try_from(image.image_header().metadata.orientation).unwrap_or(1);
    let format = image.pixel_format();
    let (color8, color16) = match format {
        PixelFormat::Gray => (ColorType::L8, ColorType::L16),
        PixelFormat::Graya => (ColorType::La8, ColorType::La16),
        PixelFormat::Rgb => (ColorType::Rgb8, ColorType::Rgb16),
        PixelFormat::Rgba => (ColorType::Rgba8, ColorType::Rgba16),
        PixelFormat::Cmyk | PixelFormat::Cmyka => {
            return Err(Error::unsupported(path, "CMYK JPEG XL"))
        }
    };
    let render = image.render_frame(0).map_err(|e| corrupt(path, e))?;
    let mut stream = render.stream();
    let (w, h) = (stream.width(), stream.height());
    let samples = w as usize * h as usize * stream.channels() as usize;
    // Deeper samples are rendered at 16 bits and rounded to 8 like PNG's and TIFF's.
    let deep = image.image_header().metadata.bit_depth.bits_per_sample() > 8;
    let (color, raw) = if deep {
        let mut buf = vec![0u16; samples];
        stream.write_to_buffer(&mut buf);
        (color16, buf.iter().flat_map(|v| v.to_ne_bytes()).collect())
    } else {
        let mut buf = vec![0u8; samples];
        stream.write_to_buffer(&mut buf);
        (color8, buf)
    };
    let data = to_rgb8(raw, color, opts.alpha())
        .ok_or_else(|| Error::unsupported(path, format!("JPEG XL colour type {color:?}")))?;
    let img = RgbImage {
        width: w,
        height: h,
        data,
    };
    Ok((img, own))
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::{probe_bytes, Header, ImageFormat};
    use super::*;

    /// Files written by Pillow 13 with pillow-jxl-plugin 1.3 (libjxl), `lossless=True`:
    /// [`quadrants`]`(6, 4)` as a bare codestream, the same in a container with an `Exif` box saying
    /// orientation 6 (the codestream says 1), 16-bit gray (`I;16`) 6x1
    /// `[0x807F, 0x0080, 0xFF7F, 0, 65535, 12345]`, and RGBA 3x1
    /// `[[10, 20, 30, 255], [10, 20, 30, 0], [200, 100, 50, 128]]`.
    fn fixture(name: &str) -> Vec<u8> {
        let parts: &[&str] = match name {
            "rgb" => &[
        "ff0a184010090800010094004b188b15c209b2b98bd5e202410094beb755eed995d3ff7f68fdcd474bb53010",
        "0891869800",
            ],
            "rgb_exif6" => &[
        "0000000c4a584c200d0a870a00000014667479706a786c20000000006a786c20000000126a786c7000000000",
        "ff0a1840100900000022457869664d4d002a0000000800010112000300000001000600000000000000000037",
        "6a786c70800000010800010094004b188b15c209b2b98bd5e202410094beb755eed995d3ff7f68fdcd474bb5",
        "30100891869800",
            ],
            "gray16" => &[
        "0000000c4a584c200d0a870a00000014667479706a786c20000000006a786c20000000096a786c6c0a000000",
        "2e6a786c63ff0a00000ae007285a040800010058004b188b1542928c500e7f80faff63aed0ef3fc2148b9f",
            ],
            _ => &[
        "ff0a00000480950800100070004b188b15c2096cdb3f865d40060068ca07f971034141d9a5f672f601",
            ],
        };
        hex(&parts.concat())
    }

    #[test]
    fn bare_codestream_decodes_exactly() {
        let file = fixture("rgb");
        let want = Header {
            format: ImageFormat::JpegXl,
            width: 6,
            height: 4,
            orientation: 1,
        };
        assert_eq!(probe_bytes(&file, &p()).unwrap(), want);
        assert_eq!(decode(&file).unwrap().data, quadrants(6, 4));
        assert_eq!(ImageFormat::JpegXl.name(), "jxl");
    }

    #[test]
    fn exif_box_orientation_is_probed_and_applied() {
        let file = fixture("rgb_exif6");
        let h = probe_bytes(&file, &p()).unwrap();
        assert_eq!(
            (h.format, h.width, h.height, h.orientation),
            (ImageFormat::JpegXl, 6, 4, 6)
        );
        let img = decode_with(&file, h.orientation, (0, 0), &DecodeOptions::default()).unwrap();
        assert_eq!((img.width, img.height), (4, 6));
        check_quadrants(&img, 6, "jxl");
        // The caller's orientation decides: 1 keeps the pixels as stored.
        assert_eq!(decode(&file).unwrap().data, quadrants(6, 4));
        // The box as the format defines it, with the 4-byte offset to the TIFF header first.
        let at = file.windows(4).position(|w| w == b"Exif").unwrap() - 4;
        let len = u32::from_be_bytes([file[at], file[at + 1], file[at + 2], file[at + 3]]);
        let mut spec = file[..at].to_vec();
        spec.extend_from_slice(&(len + 4).to_be_bytes());
        spec.extend_from_slice(b"Exif\0\0\0\0");
        spec.extend_from_slice(&file[at + 8..]);
        assert_eq!(probe_bytes(&spec, &p()).unwrap().orientation, 6);
        assert_eq!(decode(&spec).unwrap(), decode(&file).unwrap());
    }

    #[test]
    fn sixteen_bit_gray_rounds_and_alpha_composites() {
        let img = decode(&fixture("gray16")).unwrap();
        let firsts: Vec<u8> = img.data.iter().step_by(3).copied().collect();
        let want: Vec<u8> = [0x807Fu32, 0x0080, 0xFF7F, 0, 65535, 12345]
            .iter()
            .map(|v| ((v * 255 + 32767) / 65535) as u8)
            .collect();
        assert_eq!(firsts, want);
        assert!(img
            .data
            .chunks_exact(3)
            .all(|px| px[0] == px[1] && px[1] == px[2]));
        let opts = DecodeOptions {
            background: [1, 2, 3],
            ..Default::default()
        };
        let img = decode_with(&fixture("rgba"), 1, (0, 0), &opts).unwrap();
        // (200 * 128 + 1 * 127 + 127) / 255 = 101, (100 * 128 + 2 * 127 + 127) / 255 = 51,
        // (50 * 128 + 3 * 127 + 127) / 255 = 27.
        assert_eq!(img.data, [10, 20, 30, 1, 2, 3, 101, 51, 27]);
    }

    #[test]
    fn too_large_and_truncated_jxl_fail_cleanly() {
        let file = fixture("rgb_exif6");
        let opts = DecodeOptions {
            max_pixels: 23,
            ..Default::default()
        };
        assert!(matches!(
            decode_with(&file, 1, (0, 0), &opts),
            Err(Error::TooLarge { .. })
        ));
        for name in ["rgb", "rgb_exif6", "gray16", "rgba"] {
            let file = fixture(name);
            let full = decode(&file).unwrap();
            for len in 0..file.len() {
                match decode(&file[..len]) {
                    Err(Error::Decode { .. }) => {}
                    Ok(img) => assert_eq!(img, full, "{name} cut at {len}/{}", file.len()),
                    Err(e) => panic!("{name} cut at {len}/{}: {e}", file.len()),
                }
                let _ = probe_bytes(&file[..len], &p());
            }
        }
    }
}
