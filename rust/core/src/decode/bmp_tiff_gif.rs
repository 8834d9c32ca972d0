//! BMP, TIFF (first page) and GIF (first frame) through the `image` crate's pure-Rust decoders, to
//! RGB8 as stored; and the header walks that give their size (and TIFF's orientation) without
//! decoding pixels.
//!
//! As for PNG, our own header walk gives the size before the `image` crate allocates anything, and
//! the crate's limits are set so that only corrupt headers reach them. Pixel conversion is
//! `pixels`' job (16-bit rounding, alpha compositing); this file must not apply the orientation.

use std::io::Cursor;
use std::path::Path;

use image::codecs::bmp::BmpDecoder;
use image::codecs::gif::GifDecoder;
use image::codecs::tiff::TiffDecoder;
use image::ImageError;

use super::header::{need, parse_header, SliceSource, Source};
use super::png_webp::{image_limits, into_rgb, read_all};
use super::{check_pixels, DecodeOptions, ImageFormat, RgbImage};
use crate::error::{Error, Result};

/// BMP size from the DIB header: 16-bit fields in the OS/2 `BITMAPCOREHEADER` (12 bytes), signed
/// 32-bit ones in every later version, where a negative height means rows stored top-down.
pub(super) fn bmp_header(src: &mut impl Source, path: &Path) -> Result<(u32, u32, u8)> {
    let head = need(src, 0, 26, path, "BMP ends inside its headers")?;
    let dib_size = u32::from_le_bytes([head[14], head[15], head[16], head[17]]);
    let (width, height) = if dib_size == 12 {
        let w = u16::from_le_bytes([head[18], head[19]]);
        let h = u16::from_le_bytes([head[20], head[21]]);
        (i64::from(w), i64::from(h))
    } else {
        let w = i32::from_le_bytes([head[18], head[19], head[20], head[21]]);
        let h = i32::from_le_bytes([head[22], head[23], head[24], head[25]]);
        (i64::from(w), i64::from(h).abs())
    };
    match (u32::try_from(width), u32::try_from(height)) {
        (Ok(w), Ok(h)) if dib_size >= 12 => Ok((w, h, 1)),
        _ => Err(Error::decode(
            path,
            format!("corrupt BMP: DIB header of {dib_size} bytes, size {width}x{height}"),
        )),
    }
}

/// GIF logical screen size (the canvas every frame is drawn on, and the size Pillow reports).
pub(super) fn gif_header(src: &mut impl Source, path: &Path) -> Result<(u32, u32, u8)> {
    let head = need(src, 0, 10, path, "GIF ends inside its screen descriptor")?;
    let width = u16::from_le_bytes([head[6], head[7]]);
    let height = u16::from_le_bytes([head[8], head[9]]);
    Ok((u32::from(width), u32::from(height), 1))
}

/// TIFF size (tags 256/257) and orientation (tag 274, read like EXIF's) from the first IFD, which
/// may lie anywhere in the file: only the 8-byte header and that IFD's entries are read.
pub(super) fn tiff_header(
    src: &mut impl Source,
    path: &Path,
    with_orientation: bool,
) -> Result<(u32, u32, u8)> {
    let head = need(src, 0, 8, path, "TIFF ends inside its header")?;
    let little = head[0] == b'I';
    let u16_at = |b: &[u8]| {
        let b = [b[0], b[1]];
        if little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        }
    };
    let u32_at = |b: &[u8]| {
        let b = [b[0], b[1], b[2], b[3]];
        if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let ifd = u64::from(u32_at(&head[4..]));
    let count = usize::from(u16_at(need(src, ifd, 2, path, "TIFF's first IFD")?));
    let entries = need(src, ifd + 2, 12 * count, path, "TIFF's first IFD")?;
    let (mut width, mut height, mut orientation) = (None, None, 1);
    for e in entries.chunks_exact(12) {
        // A SHORT (3) or LONG (4) count-1 value sits in the entry's first bytes of the value field.
        let value = match (u16_at(&e[2..]), u32_at(&e[4..])) {
            (3, 1) => Some(u32::from(u16_at(&e[8..]))),
            (4, 1) => Some(u32_at(&e[8..])),
            _ => None,
        };
        match u16_at(e) {
            256 => width = value,
            257 => height = value,
            // Values outside 1..=8 mean "as stored", as for EXIF.
            274 if with_orientation => {
                orientation = value
                    .and_then(|v| u8::try_from(v).ok())
                    .filter(|v| (1..=8).contains(v))
                    .unwrap_or(1)
            }
            _ => {}
        }
    }
    match (width, height) {
        (Some(w), Some(h)) => Ok((w, h, orientation)),
        _ => Err(Error::decode(
            path,
            "corrupt TIFF: first IFD has no single-valued width and height tags",
        )),
    }
}

/// Decode a BMP, TIFF or GIF with the `image` crate to RGB8 as stored (orientation not applied).
pub(super) fn decode_bmp_tiff_gif(
    bytes: &[u8],
    path: &Path,
    format: ImageFormat,
    opts: &DecodeOptions,
) -> Result<RgbImage> {
    let header = parse_header(&mut SliceSource(bytes), path, false)?;
    check_pixels(path, header.width, header.height, opts.max_pixels)?;
    let name = match format {
        ImageFormat::Bmp => "BMP",
        ImageFormat::Tiff => "TIFF",
        _ => "GIF",
    };
    // A feature the decoder lacks (a TIFF compression, float samples) is the build's limit, not
    // the file's fault.
    let bad = |e: ImageError| match e {
        ImageError::Unsupported(e) => Error::unsupported(path, format!("this {name} file ({e})")),
        e => Error::decode(path, format!("corrupt {name}: {e}")),
    };
    let limits = image_limits(opts.max_pixels);
    let cursor = Cursor::new(bytes);
    let (dims, color, raw) = match format {
        ImageFormat::Bmp => read_all(BmpDecoder::new(cursor).map_err(bad)?, limits).map_err(bad)?,
        ImageFormat::Tiff => {
            read_all(TiffDecoder::new(cursor).map_err(bad)?, limits).map_err(bad)?
        }
        _ => read_all(GifDecoder::new(cursor).map_err(bad)?, limits).map_err(bad)?,
    };
    into_rgb(
        path,
        name,
        (header.width, header.height),
        (dims, color, raw),
        opts.background,
    )
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::{probe_bytes, Header};
    use super::*;
    use image::codecs::bmp::BmpEncoder;
    use image::codecs::gif::GifEncoder;
    use image::codecs::tiff::TiffEncoder;
    use image::{Delay, Frame, RgbaImage};

    fn encoded(
        buf: &[u8],
        w: u32,
        h: u32,
        color: ExtendedColorType,
        format: ImageFormat,
    ) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        match format {
            ImageFormat::Bmp => BmpEncoder::new(&mut out).write_image(buf, w, h, color),
            _ => TiffEncoder::new(&mut out).write_image(buf, w, h, color),
        }
        .unwrap();
        out.into_inner()
    }

    fn gif(frames: &[RgbaImage]) -> Vec<u8> {
        let mut out = Vec::new();
        GifEncoder::new(&mut out)
            .encode_frames(
                frames.iter().map(|f| {
                    Frame::from_parts(f.clone(), 0, 0, Delay::from_numer_denom_ms(100, 1))
                }),
            )
            .unwrap();
        out
    }

    /// An uncompressed 8-bit gray TIFF (one strip) with an orientation tag, little-endian.
    fn gray_tiff(w: u16, h: u16, orientation: u16, pixels: &[u8]) -> Vec<u8> {
        let tags: [(u16, u16, u32); 10] = [
            (256, 3, u32::from(w)),
            (257, 3, u32::from(h)),
            (258, 3, 8),
            (259, 3, 1),
            (262, 3, 1),
            (273, 4, 8), // the strip follows the 8-byte header
            (274, 3, u32::from(orientation)),
            (277, 3, 1),
            (278, 3, u32::from(h)),
            (279, 4, pixels.len() as u32),
        ];
        let mut out = b"II*\0".to_vec();
        out.extend_from_slice(&(8 + pixels.len() as u32).to_le_bytes());
        out.extend_from_slice(pixels);
        out.extend_from_slice(&(tags.len() as u16).to_le_bytes());
        for (tag, typ, value) in tags {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&typ.to_le_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
            match typ {
                3 => out.extend_from_slice(&[(value as u16).to_le_bytes(), [0, 0]].concat()),
                _ => out.extend_from_slice(&value.to_le_bytes()),
            }
        }
        out.extend_from_slice(&0u32.to_le_bytes());
        out
    }

    #[test]
    fn new_magics_are_sniffed() {
        let q = quadrants(6, 4);
        let cases = [
            (
                encoded(&q, 6, 4, ExtendedColorType::Rgb8, ImageFormat::Bmp),
                ImageFormat::Bmp,
            ),
            (
                encoded(&q, 6, 4, ExtendedColorType::Rgb8, ImageFormat::Tiff),
                ImageFormat::Tiff,
            ),
            (gray_tiff(6, 4, 1, &[9; 24]), ImageFormat::Tiff),
            (gif(&[RgbaImage::new(6, 4)]), ImageFormat::Gif),
        ];
        for (file, format) in cases {
            let h = probe_bytes(&file, &p()).unwrap();
            assert_eq!((h.format, h.width, h.height), (format, 6, 4), "{format:?}");
        }
        assert_eq!(
            ImageFormat::sniff(b"MM\0*\0\0\0\x08"),
            Some(ImageFormat::Tiff)
        );
        assert_eq!(ImageFormat::sniff(b"GIF87a"), Some(ImageFormat::Gif));
        assert_eq!(
            [ImageFormat::Bmp, ImageFormat::Tiff, ImageFormat::Gif].map(|f| f.name()),
            ["bmp", "tiff", "gif"]
        );
    }

    #[test]
    fn avif_heif_jxl_jpeg2000_are_unsupported_by_name() {
        let ftyp = |major: &[u8; 4], compatible: &[u8]| {
            let mut b = ((16 + compatible.len()) as u32).to_be_bytes().to_vec();
            b.extend_from_slice(b"ftyp");
            b.extend_from_slice(major);
            b.extend_from_slice(&[0; 4]);
            b.extend_from_slice(compatible);
            b.extend_from_slice(&[0; 16]);
            b
        };
        let cases: [(Vec<u8>, &str); 8] = [
            (ftyp(b"avif", b"mif1miaf"), "AVIF"),
            (ftyp(b"mif1", b"avifmiaf"), "AVIF"),
            (ftyp(b"heic", b"mif1heic"), "HEIF/HEIC"),
            (ftyp(b"mif1", b"heic"), "HEIF/HEIC"),
            (ftyp(b"msf1", b"hevc"), "HEIF/HEIC"),
            (b"\xff\x0a\xfa\x7f\x01\x90\x08".to_vec(), "JPEG XL"),
            (
                b"\0\0\0\x0cJXL \r\n\x87\n\0\0\0\x14ftypjxl ".to_vec(),
                "JPEG XL",
            ),
            (b"\0\0\0\x0cjP  \r\n\x87\n".to_vec(), "JPEG 2000"),
        ];
        for (bytes, name) in cases {
            for err in [
                decode(&bytes).unwrap_err(),
                probe_bytes(&bytes, &p()).unwrap_err(),
            ] {
                assert_eq!(err.code(), crate::SkipCode::Unsupported, "{name}: {err}");
                assert_eq!(
                    err.to_string(),
                    format!("Error while decoding test/img: {name} is not supported by this build")
                );
            }
        }
        // An ISO media file of no image brand (an MP4) is not an image at all.
        let mp4 = decode_err(&ftyp(b"isom", b"mp41"));
        assert!(
            mp4.contains("not a JPEG, PNG, WebP, BMP, TIFF or GIF file"),
            "{mp4}"
        );
    }

    #[test]
    fn bmp_decodes_exactly() {
        let q = quadrants(6, 4);
        let file = encoded(&q, 6, 4, ExtendedColorType::Rgb8, ImageFormat::Bmp);
        assert_eq!(decode(&file).unwrap().data, q);
        let gray: Vec<u8> = (0..24).map(|v| v * 10).collect();
        let file = encoded(&gray, 6, 4, ExtendedColorType::L8, ImageFormat::Bmp);
        let want: Vec<u8> = gray.iter().flat_map(|&v| [v, v, v]).collect();
        assert_eq!(decode(&file).unwrap().data, want);
        // A bottom-up header (positive height) and a top-down one (negative) give the same size.
        let mut top_down = encoded(&q, 6, 4, ExtendedColorType::Rgb8, ImageFormat::Bmp);
        top_down[22..26].copy_from_slice(&(-4i32).to_le_bytes());
        assert_eq!(probe_bytes(&top_down, &p()).unwrap().height, 4);
    }

    #[test]
    fn bmp_too_large_before_allocation() {
        let mut file = encoded(
            &quadrants(2, 2),
            2,
            2,
            ExtendedColorType::Rgb8,
            ImageFormat::Bmp,
        );
        file[18..22].copy_from_slice(&30000i32.to_le_bytes());
        file[22..26].copy_from_slice(&30000i32.to_le_bytes());
        match decode(&file) {
            Err(e @ Error::TooLarge { .. }) => assert!(e.to_string().contains("30000x30000")),
            other => panic!("{other:?}"),
        }
        file[18..22].copy_from_slice(&(-5i32).to_le_bytes());
        assert!(decode_err(&file).contains("corrupt BMP"));
    }

    #[test]
    fn tiff_8_and_16_bit_rgb_gray_alpha() {
        let q = quadrants(6, 4);
        let file = encoded(&q, 6, 4, ExtendedColorType::Rgb8, ImageFormat::Tiff);
        assert_eq!(decode(&file).unwrap().data, q);
        // 16-bit samples are rounded like PNG's: 0x807F -> 128, 0x8080 -> 128, 0xFF7F -> 255.
        let values: [u16; 3] = [0x807F, 0x0080, 0xFF7F];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let gray16 = encoded(&bytes, 3, 1, ExtendedColorType::L16, ImageFormat::Tiff);
        let firsts: Vec<u8> = decode(&gray16)
            .unwrap()
            .data
            .iter()
            .step_by(3)
            .copied()
            .collect();
        let want: Vec<u8> = values
            .iter()
            .map(|&v| ((u32::from(v) * 255 + 32767) / 65535) as u8)
            .collect();
        assert_eq!(firsts, want);
        let rgb16: Vec<u8> = [0xFFFFu16, 0, 0x8000]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let file = encoded(&rgb16, 1, 1, ExtendedColorType::Rgb16, ImageFormat::Tiff);
        assert_eq!(decode(&file).unwrap().data, [255, 0, 128]);
        // Alpha is composited onto the background.
        let rgba = [10, 20, 30, 255, 10, 20, 30, 0];
        let file = encoded(&rgba, 2, 1, ExtendedColorType::Rgba8, ImageFormat::Tiff);
        assert_eq!(decode(&file).unwrap().data, [10, 20, 30, 255, 255, 255]);
    }

    #[test]
    fn tiff_orientation_tag_is_probed_and_applied() {
        let pixels: Vec<u8> = (0..6).collect(); // 3x2, rows [0 1 2] [3 4 5]
        let file = gray_tiff(3, 2, 6, &pixels);
        let h = probe_bytes(&file, &p()).unwrap();
        let want = Header {
            format: ImageFormat::Tiff,
            width: 3,
            height: 2,
            orientation: 6,
        };
        assert_eq!(h, want);
        let img = decode_with(&file, h.orientation, (0, 0), &DecodeOptions::default()).unwrap();
        assert_eq!((img.width, img.height), (2, 3));
        // Rotated 90° clockwise: the upright first row is the stored first column, bottom to top.
        assert_eq!((pixel(&img, 0, 0), pixel(&img, 1, 0)), ([3; 3], [0; 3]));
        // Out-of-range values mean "as stored"; a missing size tag is a corrupt header.
        assert_eq!(
            probe_bytes(&gray_tiff(3, 2, 9, &pixels), &p())
                .unwrap()
                .orientation,
            1
        );
        let mut no_width = file.clone();
        let ifd = 8 + pixels.len() + 2;
        no_width[ifd..ifd + 2].copy_from_slice(&999u16.to_le_bytes());
        assert!(decode_err(&no_width).contains("no single-valued width"));
    }

    #[test]
    fn gif_first_frame_with_transparency_composited() {
        let mut first = RgbaImage::from_pixel(4, 2, image::Rgba([220, 30, 40, 255]));
        first.put_pixel(1, 0, image::Rgba([0, 0, 0, 0]));
        let second = RgbaImage::from_pixel(4, 2, image::Rgba([40, 50, 210, 255]));
        let file = gif(&[first, second]);
        let opts = DecodeOptions {
            background: [1, 2, 3],
            ..Default::default()
        };
        let img = decode_with(&file, 1, (0, 0), &opts).unwrap();
        assert_eq!((img.width, img.height), (4, 2));
        assert_eq!(pixel(&img, 1, 0), [1, 2, 3]);
        assert_eq!(pixel(&img, 0, 0), [220, 30, 40]);
        assert_eq!(pixel(&img, 3, 1), [220, 30, 40]);
    }

    #[test]
    fn truncated_new_formats_fail_cleanly() {
        let q = quadrants(12, 8);
        let files = [
            encoded(&q, 12, 8, ExtendedColorType::Rgb8, ImageFormat::Bmp),
            encoded(&q, 12, 8, ExtendedColorType::Rgb8, ImageFormat::Tiff),
            gif(&[RgbaImage::from_raw(
                12,
                8,
                q.chunks(3).flat_map(|c| [c[0], c[1], c[2], 255]).collect(),
            )
            .unwrap()]),
        ];
        for file in &files {
            let full = decode(file).unwrap();
            for len in 0..file.len() - 1 {
                match decode(&file[..len]) {
                    Err(Error::Decode { .. }) => {}
                    // A GIF's trailer byte, or a TIFF whose IFD lies after the pixels, may be cut
                    // with every pixel still read.
                    Ok(img) => assert_eq!(img, full, "cut at {len}/{}", file.len()),
                    Err(e) => panic!("cut at {len}/{}: {e}", file.len()),
                }
                let _ = probe_bytes(&file[..len], &p());
            }
        }
    }
}
