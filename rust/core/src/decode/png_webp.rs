//! PNG (APNG: its default image) and WebP (animated: its first frame) decoding through the `image`
//! crate, to RGB8 as stored.
//!
//! Our own header walk gives the size before the `image` crate allocates anything; the crate's
//! limits are set so that only corrupt headers, never real images under `max_pixels`, reach them.
//! Pixel conversion is `pixels`' job; this file must not apply the orientation.

use std::io::Cursor;
use std::path::Path;

use image::codecs::png::PngDecoder;
use image::codecs::webp::WebPDecoder;
use image::{ColorType, ImageDecoder, Limits};

use super::header::{le32, parse_header, SliceSource};
use super::pixels::{to_rgb8, Alpha};
use super::{check_pixels, DecodeOptions, ImageFormat, RgbImage};
use crate::error::{Error, Result};

/// Limits handed to the `image` crate: enough for the largest allowed image at 16-bit RGBA plus
/// metadata, so that only corrupt headers (not real images under `max_pixels`) hit them.
pub(super) fn image_limits(max_pixels: u64) -> Limits {
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    limits
}

/// Decode a PNG or WebP with the `image` crate to RGB8 as stored (orientation not applied yet).
pub(super) fn decode_png_webp(
    bytes: &[u8],
    path: &Path,
    format: ImageFormat,
    opts: &DecodeOptions,
) -> Result<RgbImage> {
    // Our own header parse gives the size before the `image` crate allocates anything.
    let header = parse_header(&mut SliceSource(bytes), path, false)?;
    check_pixels(path, header.width, header.height, opts.max_pixels)?;
    if format == ImageFormat::WebP {
        // image-webp stops reading once it has the pixels; libwebp (Pillow) rejects a file shorter
        // than its RIFF header says, and so do we.
        let riff_len = 8 + u64::from(le32(&bytes[4..8]));
        if riff_len > bytes.len() as u64 {
            return Err(Error::decode(
                path,
                format!(
                    "truncated WebP: RIFF header says {riff_len} bytes, the file has {}",
                    bytes.len()
                ),
            ));
        }
    }
    let name = match format {
        ImageFormat::Png => "PNG",
        _ => "WebP",
    };
    let bad = |e: image::ImageError| Error::decode(path, format!("corrupt {name}: {e}"));
    let limits = image_limits(opts.max_pixels);
    let (dims, color, raw) = match format {
        ImageFormat::Png => {
            // The limits from construction on: the png crate sizes its inflate buffers by them.
            let decoder =
                PngDecoder::with_limits(Cursor::new(bytes), limits.clone()).map_err(bad)?;
            read_all(decoder, limits).map_err(bad)?
        }
        _ => read_all(WebPDecoder::new(Cursor::new(bytes)).map_err(bad)?, limits).map_err(bad)?,
    };
    into_rgb(
        path,
        name,
        (header.width, header.height),
        (dims, color, raw),
        opts.alpha(),
    )
}

/// The last step of every `image`-crate decode: the pixels must have the size the header promised
/// (else the file is corrupt), then become RGB8; a colour type we cannot convert is the build's limit
/// ([`Error::Unsupported`]), not the file's fault.
pub(super) fn into_rgb(
    path: &Path,
    name: &str,
    header: (u32, u32),
    (dims, color, raw): ((u32, u32), ColorType, Vec<u8>),
    alpha: Alpha,
) -> Result<RgbImage> {
    if dims != header {
        return Err(Error::decode(
            path,
            format!(
                "corrupt {name}: header says {}x{} but the image data is {}x{}",
                header.0, header.1, dims.0, dims.1
            ),
        ));
    }
    let data = to_rgb8(raw, color, alpha)
        .ok_or_else(|| Error::unsupported(path, format!("{name} colour type {color:?}")))?;
    Ok(RgbImage {
        width: dims.0,
        height: dims.1,
        data,
    })
}

/// Decode all pixels in the decoder's native layout under `limits`: ((w, h), colour type, bytes).
pub(super) fn read_all(
    mut decoder: impl ImageDecoder,
    limits: Limits,
) -> image::ImageResult<((u32, u32), ColorType, Vec<u8>)> {
    decoder.set_limits(limits)?;
    let dims = decoder.dimensions();
    let color = decoder.color_type();
    let len = usize::try_from(decoder.total_bytes()).unwrap_or(usize::MAX);
    let mut buf = vec![0u8; len];
    decoder.read_image(&mut buf)?;
    Ok((dims, color, buf))
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::{probe_bytes, Header, ImageFormat};
    use super::*;

    #[test]
    fn png_rgb_and_gray_decode_exactly() {
        let q = quadrants(6, 4);
        assert_eq!(
            decode(&png(&q, 6, 4, ExtendedColorType::Rgb8))
                .unwrap()
                .data,
            q
        );
        let gray: Vec<u8> = (0..24).map(|v| v * 10).collect();
        let img = decode(&png(&gray, 6, 4, ExtendedColorType::L8)).unwrap();
        assert_eq!(
            img.data,
            gray.iter().flat_map(|&v| [v, v, v]).collect::<Vec<_>>()
        );
        // 1-bit grayscale is expanded by the decoder too.
        let file = png_raw(8, 1, 1, 0, &[vec![0b1010_0000]], &[]);
        let img = decode(&file).unwrap();
        let firsts: Vec<u8> = img.data.chunks_exact(3).map(|px| px[0]).collect();
        assert_eq!(firsts, [255, 0, 255, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn png_too_large_before_allocation() {
        // Only a header declaring 30000 x 30000 (900 M pixels): no IDAT needed to be refused.
        let mut file = b"\x89PNG\r\n\x1a\n".to_vec();
        file.extend(ihdr(30000, 30000, 8, 2));
        file.extend(png_chunk(b"IEND", &[]));
        let h = probe_bytes(&file, &p()).unwrap();
        assert_eq!(
            (h.format, h.width, h.height),
            (ImageFormat::Png, 30000, 30000)
        );
        match decode(&file) {
            Err(e @ Error::TooLarge { .. }) => {
                assert!(
                    e.to_string().contains("30000x30000 = 900000000 pixels"),
                    "{e}"
                );
            }
            other => panic!("{other:?}"),
        }
        // Under the limit the same header is just a corrupt file.
        let opts = DecodeOptions {
            max_pixels: u64::MAX,
            ..Default::default()
        };
        assert!(matches!(
            decode_with(&file, 1, (0, 0), &opts),
            Err(Error::Decode { .. })
        ));
    }

    #[test]
    fn png_exif_chunk_orientation() {
        let exif = png_chunk(b"eXIf", &tiff(6, false, 3));
        let rows: Vec<Vec<u8>> = (0..2)
            .map(|y| (0..4 * 3).map(|i| (y * 100 + i) as u8).collect())
            .collect();
        let file = png_raw(
            4,
            2,
            8,
            2,
            &rows,
            &[png_chunk(b"gAMA", &[0, 0, 0xB1, 0x8F]), exif],
        );
        let h = probe_bytes(&file, &p()).unwrap();
        assert_eq!((h.width, h.height, h.orientation), (4, 2, 6));
        assert_eq!(h.upright_size(), (2, 4));
        let img = decode_with(&file, 6, (0, 0), &DecodeOptions::default()).unwrap();
        assert_eq!((img.width, img.height), (2, 4));
        // Rotated 90° clockwise: the upright top-left is the stored bottom-left.
        assert_eq!(pixel(&img, 0, 0), [100, 101, 102]);
        assert_eq!(pixel(&img, 1, 0), [0, 1, 2]);
        // eXIf after IDAT is not looked for (header-only probe).
        let mut late = png_raw(4, 2, 8, 2, &rows, &[]);
        let iend = late.len() - 12;
        late.splice(iend..iend, png_chunk(b"eXIf", &tiff(6, false, 3)));
        assert_eq!(probe_bytes(&late, &p()).unwrap().orientation, 1);
    }

    #[test]
    fn apng_gives_the_default_image() {
        let mut actl = 2u32.to_be_bytes().to_vec();
        actl.extend_from_slice(&0u32.to_be_bytes());
        let fctl = |seq: u32| {
            let mut d = seq.to_be_bytes().to_vec();
            for v in [2u32, 1, 0, 0] {
                d.extend_from_slice(&v.to_be_bytes());
            }
            d.extend_from_slice(&[0, 1, 0, 10, 0, 0]);
            png_chunk(b"fcTL", &d)
        };
        let red = [220, 30, 40, 220, 30, 40];
        let mut file = png_raw(
            2,
            1,
            8,
            2,
            &[red.to_vec()],
            &[png_chunk(b"acTL", &actl), fctl(0)],
        );
        let mut fdat = 2u32.to_be_bytes().to_vec();
        fdat.extend(zlib_stored(&[0, 40, 50, 210, 40, 50, 210]));
        let iend = file.len() - 12;
        file.splice(iend..iend, [fctl(1), png_chunk(b"fdAT", &fdat)].concat());
        assert_eq!(decode(&file).unwrap().data, red);
    }

    #[test]
    fn webp_lossless_decodes_exactly() {
        let q = quadrants(10, 6);
        let file = webp(&q, 10, 6, ExtendedColorType::Rgb8);
        let h = probe_bytes(&file, &p()).unwrap();
        assert_eq!(
            h,
            Header {
                format: ImageFormat::WebP,
                width: 10,
                height: 6,
                orientation: 1
            }
        );
        assert_eq!(decode(&file).unwrap().data, q);
    }

    #[test]
    fn webp_vp8x_exif_orientation() {
        let q = quadrants(10, 6);
        let vp8l = vp8l_chunk(&webp(&q, 10, 6, ExtendedColorType::Rgb8));
        let iccp = riff_chunk(b"ICCP", &[0u8; 33]); // odd length: padded
        let exif = riff_chunk(b"EXIF", &tiff(8, true, 3));
        let file = riff_webp(&[
            vp8x(0x20 | 0x08, 10, 6),
            iccp.clone(),
            vp8l.clone(),
            exif.clone(),
        ]);
        let h = probe_bytes(&file, &p()).unwrap();
        assert_eq!(
            h,
            Header {
                format: ImageFormat::WebP,
                width: 10,
                height: 6,
                orientation: 8
            }
        );
        let img = decode_with(&file, 8, (0, 0), &DecodeOptions::default()).unwrap();
        assert_eq!((img.width, img.height), (6, 10));
        check_quadrants(&img, 8, "webp");
        // Without the EXIF flag the chunk is not looked for.
        let unflagged = riff_webp(&[vp8x(0x20, 10, 6), iccp, vp8l, exif]);
        assert_eq!(probe_bytes(&unflagged, &p()).unwrap().orientation, 1);
    }

    #[test]
    fn webp_lossy_header_probe_and_too_large() {
        // Key frame tag, start code, 14-bit sizes with 2 scale bits set (ignored).
        let mut vp8 = vec![0x10, 0x02, 0x00, 0x9D, 0x01, 0x2A];
        vp8.extend_from_slice(&(640u16 | 0x4000).to_le_bytes());
        vp8.extend_from_slice(&(480u16 | 0x8000).to_le_bytes());
        let file = riff_webp(&[riff_chunk(b"VP8 ", &vp8)]);
        let h = probe_bytes(&file, &p()).unwrap();
        assert_eq!((h.width, h.height), (640, 480));
        assert!(matches!(decode(&file), Err(Error::Decode { .. })));
        let big = riff_webp(&[vp8x(0, 16384, 16384)]);
        assert_eq!(probe_bytes(&big, &p()).unwrap().width, 16384);
        assert!(matches!(decode(&big), Err(Error::TooLarge { .. })));
        let unknown = riff_webp(&[riff_chunk(b"ABCD", &[0; 20])]);
        assert!(probe_bytes(&unknown, &p())
            .unwrap_err()
            .to_string()
            .contains("unknown first chunk 'ABCD'"));
    }

    #[test]
    fn animated_webp_gives_the_first_frame() {
        let frame = |c: [u8; 4]| {
            let mut d = vec![0u8; 6]; // x / 2, y / 2
            d.extend_from_slice(&1u32.to_le_bytes()[..3]); // width - 1
            d.extend_from_slice(&0u32.to_le_bytes()[..3]); // height - 1
            d.extend_from_slice(&100u32.to_le_bytes()[..3]); // duration
                                                             // "Do not blend": image-webp's alpha blending onto the transparent canvas truncates
                                                             // (220 -> 219), so a blended first frame would only match within 1.
            d.push(0x02);
            d.extend(vp8l_chunk(&solid_webp_rgba(2, 1, c)));
            riff_chunk(b"ANMF", &d)
        };
        let anim = riff_chunk(b"ANIM", &[0, 0, 0, 0, 0, 0]);
        let file = riff_webp(&[
            vp8x(0x02 | 0x10, 2, 1),
            anim,
            frame([220, 30, 40, 255]),
            frame([40, 50, 210, 255]),
        ]);
        assert_eq!(probe_bytes(&file, &p()).unwrap().width, 2);
        assert_eq!(decode(&file).unwrap().data, [220, 30, 40, 220, 30, 40]);
    }
}
