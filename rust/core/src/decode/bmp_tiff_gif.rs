//! BMP and GIF (first frame) through the `image` crate's pure-Rust decoders, TIFF (first page)
//! through the `tiff` crate beneath it, to RGB8 as stored; and the header walks that give their size
//! (and TIFF's orientation) without decoding pixels.
//!
//! TIFF is read with the `tiff` crate directly because the `image` crate converts CMYK its own way
//! (`(255 - c) * (255 - k) / 255`, truncated) and refuses planar CMYK: here every 8/16-bit gray,
//! gray + alpha, RGB, RGBA and CMYK TIFF, chunky or planar (`PlanarConfiguration` 2), is read and
//! CMYK converted exactly as Pillow's `convert("RGB")` does (its `cmyk2rgb`).
//!
//! As for PNG, our own header walk gives the size before the `image` crate allocates anything, and
//! the crate's limits are set so that only corrupt headers reach them. Pixel conversion is
//! `pixels`' job (16-bit rounding, alpha compositing); this file must not apply the orientation.

use std::io::Cursor;
use std::path::Path;

use image::codecs::bmp::BmpDecoder;
use image::codecs::gif::GifDecoder;
use image::{ColorType, ImageError};
use tiff::decoder::{Decoder as TiffReader, DecodingResult, Limits as TiffLimits};
use tiff::tags::Tag;
use tiff::TiffError;

use super::header::{need, parse_header, SliceSource, Source};
use super::pixels::{cmyk_to_rgb, round16};
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

/// Decode a BMP or GIF with the `image` crate, a TIFF with the `tiff` crate, to RGB8 as stored
/// (orientation not applied).
pub(super) fn decode_bmp_tiff_gif(
    bytes: &[u8],
    path: &Path,
    format: ImageFormat,
    opts: &DecodeOptions,
) -> Result<RgbImage> {
    let header = parse_header(&mut SliceSource(bytes), path, false)?;
    check_pixels(path, header.width, header.height, opts.max_pixels)?;
    if format == ImageFormat::Tiff {
        return decode_tiff(bytes, path, (header.width, header.height), opts);
    }
    let name = match format {
        ImageFormat::Bmp => "BMP",
        _ => "GIF",
    };
    // A feature the decoder lacks is the build's limit, not the file's fault.
    let bad = |e: ImageError| match e {
        ImageError::Unsupported(e) => Error::unsupported(path, format!("this {name} file ({e})")),
        e => Error::decode(path, format!("corrupt {name}: {e}")),
    };
    let limits = image_limits(opts.max_pixels);
    let cursor = Cursor::new(bytes);
    let (dims, color, raw) = match format {
        ImageFormat::Bmp => read_all(BmpDecoder::new(cursor).map_err(bad)?, limits).map_err(bad)?,
        _ => read_all(GifDecoder::new(cursor).map_err(bad)?, limits).map_err(bad)?,
    };
    into_rgb(
        path,
        name,
        (header.width, header.height),
        (dims, color, raw),
        opts.alpha(),
    )
}

/// A TIFF's first page with the `tiff` crate: 1-bit gray expanded to 0/255; 8/16-bit gray, gray +
/// alpha, RGB and RGBA handed to `pixels` (16-bit rounded, alpha composited); CMYK (16-bit rounded
/// to 8 first) through Pillow's `cmyk2rgb`; planar pages interleaved first. Other colour types
/// (palette, YCbCr, Lab, CMYK + alpha, float or signed samples) and compressions the crate lacks are
/// [`Error::Unsupported`]; `dims` is the size our header walk read.
fn decode_tiff(
    bytes: &[u8],
    path: &Path,
    dims: (u32, u32),
    opts: &DecodeOptions,
) -> Result<RgbImage> {
    let bad = |e: TiffError| match e {
        TiffError::UnsupportedError(e) => Error::unsupported(path, format!("this TIFF file ({e})")),
        e => Error::decode(path, format!("corrupt TIFF: {e}")),
    };
    let unsupported = |what: String| Error::unsupported(path, format!("TIFF {what}"));
    let mut limits = TiffLimits::default();
    // Every plane of the largest allowed image at 16 bits and 5 samples, so that only corrupt
    // headers reach the limit.
    let max_bytes = opts.max_pixels.saturating_mul(10).saturating_add(64 << 20);
    limits.decoding_buffer_size = usize::try_from(max_bytes).unwrap_or(usize::MAX);
    let mut reader = TiffReader::new(Cursor::new(bytes))
        .map_err(bad)?
        .with_limits(limits);
    let formats = reader
        .find_tag_unsigned_vec::<u16>(Tag::SampleFormat)
        .map_err(bad)?;
    if let Some(f) = formats.unwrap_or_default().into_iter().find(|&f| f != 1) {
        return Err(unsupported(format!(
            "sample format {f} (only unsigned integers are read)"
        )));
    }
    let tiff_color = reader.colortype().map_err(bad)?;
    let mut result = DecodingResult::U8(Vec::new());
    let layout = reader.read_image_to_buffer(&mut result).map_err(bad)?;
    let (raw, sample_bytes) = match result {
        DecodingResult::U8(v) => (v, 1),
        DecodingResult::U16(v) => (v.iter().flat_map(|s| s.to_ne_bytes()).collect(), 2),
        _ => return Err(unsupported(format!("colour type {tiff_color:?}"))),
    };
    if raw.len() < layout.complete_len {
        return Err(Error::decode(
            path,
            "corrupt TIFF: planes larger than the image",
        ));
    }
    let raw = if layout.planes > 1 {
        let stride = layout.plane_stride.map_or(0, |s| s.get());
        interleave_planes(&raw, layout.planes, stride, sample_bytes)
    } else {
        raw
    };
    use tiff::ColorType as T;
    let (color, raw) = match tiff_color {
        T::Gray(1) => (ColorType::L8, expand_bits(&raw, dims.0)),
        T::Gray(8) => (ColorType::L8, raw),
        T::Gray(16) => (ColorType::L16, raw),
        T::GrayA(8) => (ColorType::La8, raw),
        T::GrayA(16) => (ColorType::La16, raw),
        T::RGB(8) => (ColorType::Rgb8, raw),
        T::RGB(16) => (ColorType::Rgb16, raw),
        T::RGBA(8) => (ColorType::Rgba8, raw),
        T::RGBA(16) => (ColorType::Rgba16, raw),
        T::CMYK(8) => (ColorType::Rgb8, cmyk_to_rgb(&raw)),
        T::CMYK(16) => {
            let cmyk: Vec<u8> = raw
                .chunks_exact(2)
                .map(|s| round16(u16::from_ne_bytes([s[0], s[1]])))
                .collect();
            (ColorType::Rgb8, cmyk_to_rgb(&cmyk))
        }
        other => return Err(unsupported(format!("colour type {other:?}"))),
    };
    let size = reader.dimensions().map_err(bad)?;
    into_rgb(path, "TIFF", dims, (size, color, raw), opts.alpha())
}

/// Planes `[plane 0][plane 1]...` of `stride` bytes each to interleaved samples of `sample_bytes`.
fn interleave_planes(raw: &[u8], planes: usize, stride: usize, sample_bytes: usize) -> Vec<u8> {
    let per_plane = stride / sample_bytes;
    let mut out = vec![0u8; per_plane * planes * sample_bytes];
    for (p, plane) in raw.chunks_exact(stride).take(planes).enumerate() {
        for (i, sample) in plane.chunks_exact(sample_bytes).enumerate() {
            let at = (i * planes + p) * sample_bytes;
            out[at..at + sample_bytes].copy_from_slice(sample);
        }
    }
    out
}

/// 1-bit rows (each padded to a whole byte, most significant bit first) to one byte per pixel,
/// 0 or 255.
fn expand_bits(raw: &[u8], width: u32) -> Vec<u8> {
    let w = width as usize;
    raw.chunks_exact(w.div_ceil(8))
        .flat_map(|row| {
            (0..w).map(move |x| {
                if row[x / 8] & (0x80 >> (x % 8)) != 0 {
                    255
                } else {
                    0
                }
            })
        })
        .collect()
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

    /// An uncompressed little-endian TIFF, one strip per plane: `samples` samples of `bits` bits
    /// per pixel, `photometric` 1 (gray), 2 (RGB) or 5 (CMYK), `planar` 1 (chunky) or 2 (one plane
    /// per sample); `data` holds the strips in order.
    fn uncompressed_tiff(
        (w, h): (u32, u32),
        (bits, samples): (u16, u16),
        photometric: u16,
        planar: u16,
        data: &[u8],
    ) -> Vec<u8> {
        let planes = if planar == 2 { u32::from(samples) } else { 1 };
        let strip = data.len() as u32 / planes;
        let shorts = |v: &[u16]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let longs = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let offsets: Vec<u32> = (0..planes).map(|p| 8 + p * strip).collect();
        // (tag, type, count, value bytes): values over 4 bytes go after the strips.
        let tags: [(u16, u16, u32, Vec<u8>); 10] = [
            (256, 4, 1, longs(&[w])),
            (257, 4, 1, longs(&[h])),
            (
                258,
                3,
                u32::from(samples),
                shorts(&vec![bits; usize::from(samples)]),
            ),
            (259, 3, 1, shorts(&[1])),
            (262, 3, 1, shorts(&[photometric])),
            (273, 4, planes, longs(&offsets)),
            (277, 3, 1, shorts(&[samples])),
            (278, 4, 1, longs(&[h])),
            (279, 4, planes, longs(&vec![strip; planes as usize])),
            (284, 3, 1, shorts(&[planar])),
        ];
        let mut extra = Vec::new();
        let extra_at = 8 + data.len() as u32;
        let mut entries = Vec::new();
        for (tag, typ, count, value) in tags {
            entries.extend_from_slice(&tag.to_le_bytes());
            entries.extend_from_slice(&typ.to_le_bytes());
            entries.extend_from_slice(&count.to_le_bytes());
            if value.len() <= 4 {
                entries.extend_from_slice(&value);
                entries.resize(entries.len() + 4 - value.len(), 0);
            } else {
                entries.extend_from_slice(&(extra_at + extra.len() as u32).to_le_bytes());
                extra.extend_from_slice(&value);
            }
        }
        let mut out = b"II*\0".to_vec();
        out.extend_from_slice(&(extra_at + extra.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(&extra);
        out.extend_from_slice(&10u16.to_le_bytes());
        out.extend_from_slice(&entries);
        out.extend_from_slice(&0u32.to_le_bytes());
        out
    }

    #[test]
    fn tiff_cmyk_converts_like_pillow() {
        // Pillow's cmyk2rgb: r = (255 - k) - round(c * (255 - k) / 255). For c = 100, k = 50:
        // 205 - round(80.39) = 125 (the image crate's (255 - c) * (255 - k) / 255 truncates to 124).
        let cmyk = [
            100, 0, 255, 50, 0, 0, 0, 0, 255, 255, 255, 255, 37, 128, 201, 0,
        ];
        let want = [125, 205, 0, 255, 255, 255, 0, 0, 0, 218, 127, 54];
        let chunky = uncompressed_tiff((4, 1), (8, 4), 5, 1, &cmyk);
        assert_eq!(decode(&chunky).unwrap().data, want);
        // Planar: all C, then all M, Y, K.
        let planar: Vec<u8> = (0..4)
            .flat_map(|c| cmyk.iter().skip(c).step_by(4).copied())
            .collect();
        let file = uncompressed_tiff((4, 1), (8, 4), 5, 2, &planar);
        assert_eq!(decode(&file).unwrap().data, want);
        // 16-bit CMYK: each sample rounded to 8 bits first (0x6400 -> 100, 0x327F -> 50).
        let cmyk16: Vec<u8> = [0x6400u16, 0, 0xFFFF, 0x327F]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let file = uncompressed_tiff((1, 1), (16, 4), 5, 1, &cmyk16);
        assert_eq!(decode(&file).unwrap().data, want[..3]);
    }

    #[test]
    fn tiff_planar_rgb_gray_alpha_and_1_bit() {
        let q = quadrants(6, 4);
        let planes: Vec<u8> = (0..3)
            .flat_map(|c| q.iter().skip(c).step_by(3).copied())
            .collect();
        let file = uncompressed_tiff((6, 4), (8, 3), 2, 2, &planes);
        assert_eq!(decode(&file).unwrap().data, q);
        // 16-bit planar RGB rounds each sample.
        let rgb16: Vec<u8> = [0xFFFFu16, 0x0080, 0x807F, 0, 0x8080, 0xFF7F]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let file = uncompressed_tiff((2, 1), (16, 3), 2, 2, &rgb16);
        assert_eq!(decode(&file).unwrap().data, [255, 128, 128, 0, 0, 255]);
        // 1-bit rows padded to whole bytes: 0b1010_0000 for a 3-pixel row.
        let file = uncompressed_tiff((3, 2), (1, 1), 1, 1, &[0b1010_0000, 0b0100_0000]);
        let gray: Vec<u8> = decode(&file)
            .unwrap()
            .data
            .iter()
            .step_by(3)
            .copied()
            .collect();
        assert_eq!(gray, [255, 0, 255, 0, 255, 0]);
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
    fn avif_heif_jpeg2000_are_unsupported_by_name() {
        let ftyp = |major: &[u8; 4], compatible: &[u8]| {
            let mut b = ((16 + compatible.len()) as u32).to_be_bytes().to_vec();
            b.extend_from_slice(b"ftyp");
            b.extend_from_slice(major);
            b.extend_from_slice(&[0; 4]);
            b.extend_from_slice(compatible);
            b.extend_from_slice(&[0; 16]);
            b
        };
        let cases: [(Vec<u8>, &str); 6] = [
            (ftyp(b"avif", b"mif1miaf"), "AVIF"),
            (ftyp(b"mif1", b"avifmiaf"), "AVIF"),
            (ftyp(b"heic", b"mif1heic"), "HEIF/HEIC"),
            (ftyp(b"mif1", b"heic"), "HEIF/HEIC"),
            (ftyp(b"msf1", b"hevc"), "HEIF/HEIC"),
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
            mp4.contains("not a JPEG, PNG, WebP, BMP, TIFF, GIF or JPEG XL file"),
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
