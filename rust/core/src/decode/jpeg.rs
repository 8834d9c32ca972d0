//! JPEG decoding with libjpeg-turbo: the per-thread handle, the DCT-domain scale that still covers
//! the requested size, and CMYK/YCCK read as Adobe-inverted CMYK.
//!
//! Decodes to RGB8 as stored; the orientation is applied by the caller ([`Decoder::decode`]). It
//! must not allocate the pixel buffer before the size guard has passed, and a handle that failed on
//! a file is never reused (its half-parsed marker state would fail the next file).

use std::path::Path;

use turbojpeg::{Colorspace, Decompressor, PixelFormat, ScalingFactor};

use super::exif::transposes;
use super::pixels::adobe_cmyk_to_rgb;
use super::{check_pixels, DecodeOptions, Decoder, RgbImage};
use crate::error::{Error, Result};

/// libjpeg-turbo's guard against the progressive-JPEG scan-count DoS: real encoders emit at most a
/// few dozen scans.
const JPEG_SCAN_LIMIT: u32 = 500;

impl Decoder {
    /// The JPEG arm of [`Decoder::decode`], keeping the handle unless libjpeg-turbo failed on it.
    pub(super) fn decode_jpeg(
        &mut self,
        bytes: &[u8],
        path: &Path,
        orientation: u8,
        cover: (u32, u32),
        opts: &DecodeOptions,
    ) -> Result<RgbImage> {
        let mut jpeg = match self.jpeg.take() {
            Some(jpeg) => jpeg,
            // Not the file's fault: the handle is made before its bytes are looked at.
            None => new_decompressor().map_err(decompressor_error)?,
        };
        let result = decode_jpeg_with(&mut jpeg, bytes, path, orientation, cover, opts);
        // Keep the handle unless libjpeg-turbo failed on it (see `Decoder::jpeg`).
        if !matches!(result, Err(Error::Decode { .. })) {
            self.jpeg = Some(jpeg);
        }
        result
    }
}

/// A libjpeg-turbo handle with our scan limit.
pub(super) fn new_decompressor() -> turbojpeg::Result<Decompressor> {
    let mut jpeg = Decompressor::new()?;
    jpeg.set_scan_limit(JPEG_SCAN_LIMIT)?;
    Ok(jpeg)
}

/// A handle that could not be created: libjpeg-turbo's `tj3Init` fails only when memory runs out.
pub(super) fn decompressor_error(e: turbojpeg::Error) -> Error {
    Error::Resource(format!("cannot create a JPEG decompressor: {e}"))
}

/// Decode a JPEG with `jpeg` at the scale chosen for `cover`, to RGB8 as stored (orientation not
/// applied yet).
fn decode_jpeg_with(
    jpeg: &mut Decompressor,
    bytes: &[u8],
    path: &Path,
    orientation: u8,
    cover: (u32, u32),
    opts: &DecodeOptions,
) -> Result<RgbImage> {
    let bad = |e: turbojpeg::Error| Error::decode(path, format!("corrupt JPEG: {e}"));
    let header = jpeg.read_header(bytes).map_err(bad)?;
    let (width, height) = (header.width as u32, header.height as u32);
    if width == 0 || height == 0 {
        return Err(Error::decode(path, "corrupt JPEG: zero width or height"));
    }
    check_pixels(path, width, height, opts.max_pixels)?;
    let scale = if header.is_lossless {
        // libjpeg-turbo cannot scale lossless JPEGs in the DCT domain (there is no DCT).
        ScalingFactor::ONE
    } else {
        jpeg_scale((width, height), orientation, cover)
    };
    jpeg.set_scaling_factor(scale).map_err(bad)?;
    let (w, h) = (scale.scale(header.width), scale.scale(header.height));
    let cmyk = matches!(header.colorspace, Colorspace::CMYK | Colorspace::YCCK);
    let format = if cmyk {
        PixelFormat::CMYK
    } else {
        PixelFormat::RGB
    };
    let mut pixels = vec![0u8; w * h * format.size()];
    let image = turbojpeg::Image {
        pixels: pixels.as_mut_slice(),
        width: w,
        pitch: w * format.size(),
        height: h,
        format,
    };
    jpeg.decompress(bytes, image).map_err(bad)?;
    let data = if cmyk {
        adobe_cmyk_to_rgb(&pixels)
    } else {
        pixels
    };
    Ok(RgbImage {
        width: w as u32,
        height: h as u32,
        data,
    })
}

/// The libjpeg-turbo scaling factor for a JPEG of `stored` (w, h) pixels that still covers `cover`
/// (w, h) upright pixels once `orientation` is applied: the smallest of 1/8, 1/4, 1/2, else 1.
fn jpeg_scale(stored: (u32, u32), orientation: u8, cover: (u32, u32)) -> ScalingFactor {
    if cover == (0, 0) {
        return ScalingFactor::ONE;
    }
    let (cw, ch) = if transposes(orientation) {
        (cover.1 as usize, cover.0 as usize)
    } else {
        (cover.0 as usize, cover.1 as usize)
    };
    let (w, h) = (stored.0 as usize, stored.1 as usize);
    [
        ScalingFactor::ONE_EIGHTH,
        ScalingFactor::ONE_QUARTER,
        ScalingFactor::ONE_HALF,
    ]
    .into_iter()
    .find(|f| f.scale(w) >= cw && f.scale(h) >= ch)
    .unwrap_or(ScalingFactor::ONE)
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::{probe_bytes, Header, ImageFormat};
    use super::*;

    #[test]
    fn corrupt_jpeg_payload_is_a_decode_error() {
        let mut file = jpeg(&quadrants(64, 64), 64, 64);
        let sos = file.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        let end = file.len() - 2;
        for b in &mut file[sos + 20..end] {
            *b = 0xFF;
        }
        let msg = decode_err(&file);
        assert!(msg.contains("corrupt JPEG"), "{msg}");
        assert!(decode_err(&[0xFF, 0xD8, 0xFF, 0xE0, 0x00]).contains("corrupt JPEG"));
    }

    #[test]
    fn solid_jpeg_is_exact_within_3_at_every_dct_scale() {
        let (w, h) = (203, 121);
        let colour = [180, 60, 120];
        let file = jpeg_with(&rgb(w, h, |_, _| colour), w, h, PixelFormat::RGB, |c| {
            c.set_subsamp(Subsamp::Sub2x2).unwrap()
        });
        // cover -> expected scaled size ceil(dim * scale).
        let cases = [
            ((25, 15), (26, 16)),
            ((26, 16), (26, 16)),
            ((27, 15), (51, 31)),
            ((60, 40), (102, 61)),
            ((150, 61), (203, 121)),
            ((0, 0), (203, 121)),
            ((500, 500), (203, 121)),
        ];
        for (cover, size) in cases {
            let img = decode_with(&file, 1, cover, &DecodeOptions::default()).unwrap();
            assert_eq!((img.width, img.height), size, "cover {cover:?}");
            assert_eq!(img.data.len(), (size.0 * size.1 * 3) as usize);
            for px in img.data.chunks_exact(3) {
                assert_close([px[0], px[1], px[2]], colour, 3, "solid colour");
            }
        }
    }

    #[test]
    fn dct_scale_choice() {
        let f = |stored, o, cover| {
            let s = jpeg_scale(stored, o, cover);
            (s.num(), s.denom())
        };
        assert_eq!(f((4000, 3000), 1, (500, 375)), (1, 8));
        assert_eq!(f((4000, 3000), 1, (600, 400)), (1, 4));
        assert_eq!(f((4000, 3000), 1, (1001, 10)), (1, 2));
        assert_eq!(f((4000, 3000), 1, (2001, 10)), (1, 1));
        assert_eq!(f((4000, 3000), 1, (5000, 5000)), (1, 1));
        assert_eq!(f((4000, 3000), 1, (0, 0)), (1, 1));
        // Cover is upright: a stored 4000x3000 with orientation 6 is 3000x4000 upright.
        assert_eq!(f((4000, 3000), 6, (375, 500)), (1, 8));
        assert_eq!(f((4000, 3000), 6, (500, 375)), (1, 4));
        assert_eq!(f((4000, 3000), 3, (500, 375)), (1, 8));
        // ceil: 4001 / 8 = 500.125 -> 501.
        assert_eq!(f((4001, 3001), 1, (501, 376)), (1, 8));
    }

    #[test]
    fn grayscale_jpeg_expands_to_equal_channels() {
        let (w, h) = (40, 24);
        let gray: Vec<u8> = (0..w * h).map(|i| (i % w * 6) as u8).collect();
        let file = jpeg_with(&gray, w, h, PixelFormat::GRAY, |c| {
            c.set_subsamp(Subsamp::Gray).unwrap()
        });
        assert_eq!(probe_bytes(&file, &p()).unwrap().width, w);
        let img = decode(&file).unwrap();
        assert_eq!((img.width, img.height), (w, h));
        for (i, px) in img.data.chunks_exact(3).enumerate() {
            assert!(px[0] == px[1] && px[1] == px[2], "pixel {i}: {px:?}");
            assert!(
                px[0].abs_diff(gray[i]) <= 4,
                "pixel {i}: {} vs {}",
                px[0],
                gray[i]
            );
        }
    }

    /// An 8x8 CMYK JPEG written by Pillow 13 (`Image.new("CMYK", (8, 8), (100, 50, 200, 30))
    /// .save(f, quality=100)`): Adobe APP14, inverted storage. Pillow reads it back as
    /// `convert("RGB") == (137, 181, 49)`.
    const PILLOW_CMYK_JPEG: &str = concat!(
        "ffd8ffee000e41646f626500640000000000ffdb00430001010101010101010101010101010101010101010101010101",
        "010101010101010101010101010101010101010101010101010101010101010101010101010101ffc000140800080008",
        "044311004d11005911004b1100ffc4001f0000010501010101010100000000000000000102030405060708090a0bffc4",
        "00b5100002010303020403050504040000017d01020300041105122131410613516107227114328191a1082342b1c115",
        "52d1f02433627282090a161718191a25262728292a3435363738393a434445464748494a535455565758595a63646566",
        "6768696a737475767778797a838485868788898a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2",
        "c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9faffda000e0443004d005900",
        "4b00003f00fb62bfa68afe6debfb08afffd9",
    );

    #[test]
    fn cmyk_jpeg_matches_pillow() {
        let img = decode(&hex(PILLOW_CMYK_JPEG)).unwrap();
        assert_eq!((img.width, img.height), (8, 8));
        for px in img.data.chunks_exact(3) {
            assert_close([px[0], px[1], px[2]], [137, 181, 49], 1, "Pillow CMYK");
        }
        // YCCK written by libjpeg-turbo from Adobe-inverted CMYK samples, at 1/2 scale.
        let inks = [
            [100u8, 50, 200, 30],
            [0, 0, 0, 0],
            [0, 0, 0, 255],
            [255, 0, 0, 0],
        ];
        let want = [[137u8, 181, 49], [255, 255, 255], [0, 0, 0], [0, 255, 255]];
        for (ink, want) in inks.iter().zip(want) {
            let stored: Vec<u8> = (0..16 * 16).flat_map(|_| ink.map(|v| 255 - v)).collect();
            let file = jpeg_with(&stored, 16, 16, PixelFormat::CMYK, |_| {});
            let img = decode_with(&file, 1, (8, 8), &DecodeOptions::default()).unwrap();
            assert_eq!((img.width, img.height), (8, 8));
            assert_close(pixel(&img, 4, 4), want, 3, "YCCK");
        }
        // The conversion itself, against Pillow's cmyk2rgb on (ink) values.
        let pillow = [
            ([128u8, 128, 128, 128], [63u8, 63, 63]),
            ([10, 20, 30, 255], [0, 0, 0]),
        ];
        for (ink, want) in pillow {
            assert_eq!(adobe_cmyk_to_rgb(&ink.map(|v| 255 - v)), want.to_vec());
        }
    }

    #[test]
    fn progressive_jpeg_decodes() {
        let q = quadrants(64, 48);
        let file = jpeg_with(&q, 64, 48, PixelFormat::RGB, |c| {
            c.set_progressive(true).unwrap()
        });
        let img = decode(&file).unwrap();
        assert_close(pixel(&img, 8, 8), RED, 6, "progressive TL");
        assert_close(pixel(&img, 56, 40), WHITE, 6, "progressive BR");
    }

    /// An arithmetic-coded baseline JPEG (4:2:0, quality 90) of `pixels` (RGB), written through
    /// libjpeg-turbo's raw API: the safe `Compressor` has no switch for arithmetic coding.
    fn arithmetic_coded_jpeg(pixels: &[u8], w: u32, h: u32) -> Vec<u8> {
        use turbojpeg::raw;
        // SAFETY: plain TurboJPEG 3 calls on a handle we own; the source buffer outlives the call
        // and holds `w * h * 3` bytes; the output buffer is copied, then freed with tj3Free.
        unsafe {
            let handle = raw::tj3Init(raw::TJINIT_TJINIT_COMPRESS as _);
            assert!(!handle.is_null());
            for (param, value) in [
                (raw::TJPARAM_TJPARAM_QUALITY, 90),
                (raw::TJPARAM_TJPARAM_SUBSAMP, raw::TJSAMP_TJSAMP_420 as _),
                (raw::TJPARAM_TJPARAM_ARITHMETIC, 1),
            ] {
                assert_eq!(raw::tj3Set(handle, param as _, value), 0);
            }
            let mut buf: *mut u8 = std::ptr::null_mut();
            let mut size = 0;
            let rc = raw::tj3Compress8(
                handle,
                pixels.as_ptr(),
                w as _,
                (w * 3) as _,
                h as _,
                raw::TJPF_TJPF_RGB as _,
                &mut buf,
                &mut size,
            );
            assert_eq!(rc, 0);
            let out = std::slice::from_raw_parts(buf, size as usize).to_vec();
            raw::tj3Free(buf.cast());
            raw::tj3Destroy(handle);
            out
        }
    }

    #[test]
    fn arithmetic_coded_jpeg_decodes() {
        let q = quadrants(64, 48);
        let file = arithmetic_coded_jpeg(&q, 64, 48);
        // SOF9: sequential DCT, arithmetic coding.
        assert!(file.windows(2).any(|w| w == [0xFF, 0xC9]));
        let h = probe_bytes(&file, &p()).unwrap();
        assert_eq!((h.width, h.height), (64, 48));
        let img = decode(&file).unwrap();
        assert_close(pixel(&img, 8, 8), RED, 6, "arithmetic TL");
        assert_close(pixel(&img, 56, 40), WHITE, 6, "arithmetic BR");
        // At a DCT scale too.
        let half = decode_with(&file, 1, (32, 24), &DecodeOptions::default()).unwrap();
        assert_eq!((half.width, half.height), (32, 24));
        if std::env::var_os("FASTDIFF_PRINT_ARITHMETIC_JPEG").is_some() {
            let g: Vec<u8> = (0..16u32 * 16)
                .flat_map(|i| {
                    let (x, y) = (i % 16, i / 16);
                    [(x * 16) as u8, (y * 16) as u8, ((x + y) * 8) as u8]
                })
                .collect();
            let hex: String = arithmetic_coded_jpeg(&g, 16, 16)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            eprintln!("ARITHMETIC_JPEG_HEX={hex}");
        }
    }

    #[test]
    fn jpeg_too_large_before_allocation() {
        let mut file = jpeg(&quadrants(16, 16), 16, 16);
        let sof = file.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        file[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]); // 60000 x 60000
        let h = probe_bytes(&file, &p()).unwrap();
        assert_eq!((h.width, h.height), (60000, 60000));
        match decode(&file) {
            Err(Error::TooLarge {
                width: 60000,
                height: 60000,
                limit: 178_956_970,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        let opts = DecodeOptions {
            max_pixels: 255,
            ..Default::default()
        };
        assert!(matches!(
            decode_with(&jpeg(&quadrants(16, 16), 16, 16), 1, (0, 0), &opts),
            Err(Error::TooLarge { .. })
        ));
        let opts = DecodeOptions {
            max_pixels: 256,
            ..Default::default()
        };
        assert!(decode_with(&jpeg(&quadrants(16, 16), 16, 16), 1, (0, 0), &opts).is_ok());
    }

    #[test]
    fn jpeg_exif_orientations_1_to_8() {
        let (w, h) = (64, 32);
        let base = jpeg(&quadrants(w, h), w, h);
        for o in 1..=8u8 {
            let file = jpeg_insert(&base, &[exif_app1(u32::from(o))]);
            let header = probe_bytes(&file, &p()).unwrap();
            assert_eq!(
                header,
                Header {
                    format: ImageFormat::Jpeg,
                    width: w,
                    height: h,
                    orientation: o
                }
            );
            let upright = header.upright_size();
            assert_eq!(upright, if o >= 5 { (h, w) } else { (w, h) });
            let img =
                decode_with(&file, header.orientation, (0, 0), &DecodeOptions::default()).unwrap();
            assert_eq!((img.width, img.height), upright);
            check_quadrants(&img, o, "full");
            // At 1/2 scale the orientation is applied to the scaled pixels.
            let half = decode_with(
                &file,
                o,
                (upright.0 / 2, upright.1 / 2),
                &DecodeOptions::default(),
            )
            .unwrap();
            assert_eq!((half.width, half.height), (upright.0 / 2, upright.1 / 2));
            check_quadrants(&half, o, "1/2 scale");
        }
    }
}
