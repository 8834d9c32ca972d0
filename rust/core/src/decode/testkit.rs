//! Test fixtures of the decoders: hand-built JPEG, PNG, WebP and TIFF/EXIF bytes, and the checks
//! the tests of every decode file share. Test-only; nothing here is part of the library.

pub(super) use image::codecs::png::PngEncoder;
pub(super) use image::codecs::webp::WebPEncoder;
pub(super) use image::{ExtendedColorType, ImageEncoder};
pub(super) use std::io::Write;
pub(super) use std::path::PathBuf;
pub(super) use turbojpeg::{Compressor, PixelFormat, Subsamp};

pub(super) use super::{DecodeOptions, Decoder, RgbImage};
pub(super) use crate::error::{Error, Result};

pub(super) const RED: [u8; 3] = [220, 30, 40];

pub(super) const GREEN: [u8; 3] = [30, 200, 60];

pub(super) const BLUE: [u8; 3] = [40, 50, 210];

pub(super) const WHITE: [u8; 3] = [250, 250, 250];

pub(super) fn p() -> PathBuf {
    PathBuf::from("test/img")
}

pub(super) fn decode(bytes: &[u8]) -> Result<RgbImage> {
    decode_with(bytes, 1, (0, 0), &DecodeOptions::default())
}

pub(super) fn decode_with(
    bytes: &[u8],
    orientation: u8,
    cover: (u32, u32),
    opts: &DecodeOptions,
) -> Result<RgbImage> {
    Decoder::new()?.decode(bytes, &p(), orientation, cover, opts)
}

pub(super) fn decode_err(bytes: &[u8]) -> String {
    match decode(bytes) {
        Err(e @ Error::Decode { .. }) => e.to_string(),
        other => panic!("expected Error::Decode, got {other:?}"),
    }
}

pub(super) fn pixel(img: &RgbImage, x: u32, y: u32) -> [u8; 3] {
    let i = (y as usize * img.width as usize + x as usize) * 3;
    [img.data[i], img.data[i + 1], img.data[i + 2]]
}

pub(super) fn assert_close(got: [u8; 3], want: [u8; 3], tol: u8, what: &str) {
    let ok = got.iter().zip(&want).all(|(&g, &w)| g.abs_diff(w) <= tol);
    assert!(ok, "{what}: got {got:?}, want {want:?} ±{tol}");
}

/// RGB8 image whose pixel (x, y) is `f(x, y)`.
pub(super) fn rgb(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
    (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .flat_map(|(x, y)| f(x, y))
        .collect()
}

/// Quadrants: top-left RED, top-right GREEN, bottom-left BLUE, bottom-right WHITE.
pub(super) fn quadrants(w: u32, h: u32) -> Vec<u8> {
    rgb(w, h, |x, y| match (x < w / 2, y < h / 2) {
        (true, true) => RED,
        (false, true) => GREEN,
        (true, false) => BLUE,
        (false, false) => WHITE,
    })
}

pub(super) fn jpeg_with(
    pixels: &[u8],
    w: u32,
    h: u32,
    format: PixelFormat,
    setup: impl Fn(&mut Compressor),
) -> Vec<u8> {
    let mut c = Compressor::new().unwrap();
    c.set_quality(95).unwrap();
    c.set_subsamp(Subsamp::None).unwrap();
    setup(&mut c);
    let image = turbojpeg::Image {
        pixels,
        width: w as usize,
        pitch: w as usize * format.size(),
        height: h as usize,
        format,
    };
    c.compress_to_vec(image).unwrap()
}

pub(super) fn jpeg(pixels: &[u8], w: u32, h: u32) -> Vec<u8> {
    jpeg_with(pixels, w, h, PixelFormat::RGB, |_| {})
}

/// A TIFF block whose IFD0 holds one orientation entry of TIFF `typ` (3 SHORT, 4 LONG), after a
/// dummy entry so the parser must walk the IFD.
pub(super) fn tiff(orientation: u32, big_endian: bool, typ: u16) -> Vec<u8> {
    let u16b = |v: u16| {
        if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    let u32b = |v: u32| {
        if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    let mut t = Vec::new();
    t.extend_from_slice(if big_endian { b"MM" } else { b"II" });
    t.extend_from_slice(&u16b(42));
    t.extend_from_slice(&u32b(8));
    t.extend_from_slice(&u16b(2));
    // 0x010F Make, ASCII, 4 bytes inline.
    t.extend_from_slice(&u16b(0x010F));
    t.extend_from_slice(&u16b(2));
    t.extend_from_slice(&u32b(4));
    t.extend_from_slice(b"abc\0");
    t.extend_from_slice(&u16b(0x0112));
    t.extend_from_slice(&u16b(typ));
    t.extend_from_slice(&u32b(1));
    if typ == 3 {
        t.extend_from_slice(&u16b(orientation as u16));
        t.extend_from_slice(&[0, 0]);
    } else {
        t.extend_from_slice(&u32b(orientation));
    }
    t.extend_from_slice(&u32b(0));
    t
}

/// Insert marker segments (marker, payload) right after the SOI of `jpeg`.
pub(super) fn jpeg_insert(jpeg: &[u8], segments: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = jpeg[..2].to_vec();
    for (marker, payload) in segments {
        out.extend_from_slice(&[0xFF, *marker]);
        out.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(payload);
    }
    out.extend_from_slice(&jpeg[2..]);
    out
}

pub(super) fn exif_app1(orientation: u32) -> (u8, Vec<u8>) {
    let mut payload = b"Exif\0\0".to_vec();
    payload.extend(tiff(orientation, true, 3));
    (0xE1, payload)
}

pub(super) fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut c = (data.len() as u32).to_be_bytes().to_vec();
    c.extend_from_slice(kind);
    c.extend_from_slice(data);
    c.extend_from_slice(&crc32fast::hash(&c[4..]).to_be_bytes());
    c
}

/// zlib stream of `data` in stored (uncompressed) deflate blocks.
pub(super) fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = data.chunks(65535).collect();
    for (i, block) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + u32::from(byte)) % 65521;
        b = (b + a) % 65521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    z
}

pub(super) fn ihdr(w: u32, h: u32, depth: u8, color: u8) -> Vec<u8> {
    let mut d = w.to_be_bytes().to_vec();
    d.extend_from_slice(&h.to_be_bytes());
    d.extend_from_slice(&[depth, color, 0, 0, 0]);
    png_chunk(b"IHDR", &d)
}

/// A hand-made PNG: IHDR, `extra` chunks, one IDAT of `rows` (each unfiltered scanline gets
/// filter byte 0), IEND.
pub(super) fn png_raw(
    w: u32,
    h: u32,
    depth: u8,
    color: u8,
    rows: &[Vec<u8>],
    extra: &[Vec<u8>],
) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(ihdr(w, h, depth, color));
    for c in extra {
        out.extend_from_slice(c);
    }
    let raw: Vec<u8> = rows
        .iter()
        .flat_map(|r| std::iter::once(0).chain(r.iter().copied()))
        .collect();
    out.extend(png_chunk(b"IDAT", &zlib_stored(&raw)));
    out.extend(png_chunk(b"IEND", &[]));
    out
}

pub(super) fn png(buf: &[u8], w: u32, h: u32, color: ExtendedColorType) -> Vec<u8> {
    let mut out = Vec::new();
    PngEncoder::new(&mut out)
        .write_image(buf, w, h, color)
        .unwrap();
    out
}

pub(super) fn webp(buf: &[u8], w: u32, h: u32, color: ExtendedColorType) -> Vec<u8> {
    let mut out = Vec::new();
    WebPEncoder::new_lossless(&mut out)
        .encode(buf, w, h, color)
        .unwrap();
    out
}

pub(super) fn riff_chunk(fourcc: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut c = fourcc.to_vec();
    c.extend_from_slice(&(data.len() as u32).to_le_bytes());
    c.extend_from_slice(data);
    if data.len() % 2 == 1 {
        c.push(0);
    }
    c
}

pub(super) fn riff_webp(chunks: &[Vec<u8>]) -> Vec<u8> {
    let body: Vec<u8> = chunks.concat();
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(body.len() as u32 + 4).to_le_bytes());
    out.extend_from_slice(b"WEBP");
    out.extend(body);
    out
}

pub(super) fn vp8x(flags: u8, w: u32, h: u32) -> Vec<u8> {
    let mut d = vec![flags, 0, 0, 0];
    d.extend_from_slice(&(w - 1).to_le_bytes()[..3]);
    d.extend_from_slice(&(h - 1).to_le_bytes()[..3]);
    riff_chunk(b"VP8X", &d)
}

/// The bytes of the VP8L chunk (header included) of a simple lossless WebP file.
pub(super) fn vp8l_chunk(simple_webp: &[u8]) -> Vec<u8> {
    assert_eq!(&simple_webp[12..16], b"VP8L");
    simple_webp[12..].to_vec()
}

pub(super) fn solid_webp_rgba(w: u32, h: u32, c: [u8; 4]) -> Vec<u8> {
    let buf: Vec<u8> = (0..w * h).flat_map(|_| c).collect();
    webp(&buf, w, h, ExtendedColorType::Rgba8)
}

pub(super) fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Pillow 13 `ImageOps.exif_transpose` of the 3x2 image [[1, 2, 3], [4, 5, 6]] per orientation.
pub(super) const PILLOW_TRANSPOSE: [(u8, (u32, u32), [u8; 6]); 8] = [
    (1, (3, 2), [1, 2, 3, 4, 5, 6]),
    (2, (3, 2), [3, 2, 1, 6, 5, 4]),
    (3, (3, 2), [6, 5, 4, 3, 2, 1]),
    (4, (3, 2), [4, 5, 6, 1, 2, 3]),
    (5, (2, 3), [1, 4, 2, 5, 3, 6]),
    (6, (2, 3), [4, 1, 5, 2, 6, 3]),
    (7, (2, 3), [6, 3, 5, 2, 4, 1]),
    (8, (2, 3), [3, 6, 2, 5, 1, 4]),
];

/// Expected upright quadrant colours [TL, TR, BL, BR] of the [`quadrants`] image per orientation,
/// derived from [`PILLOW_TRANSPOSE`] (a = TL, b = TR, c = BL, d = BR).
pub(super) fn upright_quadrants(o: u8) -> [[u8; 3]; 4] {
    let (a, b, c, d) = (RED, GREEN, BLUE, WHITE);
    match o {
        1 => [a, b, c, d],
        2 => [b, a, d, c],
        3 => [d, c, b, a],
        4 => [c, d, a, b],
        5 => [a, c, b, d],
        6 => [c, a, d, b],
        7 => [d, b, c, a],
        _ => [b, d, a, c],
    }
}

pub(super) fn check_quadrants(img: &RgbImage, o: u8, what: &str) {
    let (w, h) = (img.width, img.height);
    let spots = [
        (w / 4, h / 4),
        (3 * w / 4, h / 4),
        (w / 4, 3 * h / 4),
        (3 * w / 4, 3 * h / 4),
    ];
    for ((x, y), want) in spots.into_iter().zip(upright_quadrants(o)) {
        assert_close(
            pixel(img, x, y),
            want,
            8,
            &format!("{what} orientation {o} at ({x}, {y})"),
        );
    }
}
