//! Data-quality measurements of each image, from its bytes and its decoded pixels (for `fastdiff scan
//! --quality`): a content hash (exact duplicates), a difference hash (near duplicates), the share of
//! transparent area and the share of coloured pixels (grayscale images in a colour set).
//!
//! Each image is decoded small: JPEGs with libjpeg-turbo's DCT scaling to the smallest size that still
//! covers [`THUMB`] pixels a side, other formats at full size; the measures are taken on that decode.
//! Deciding what counts as a duplicate or a flag is the caller's; this module only measures.
//!
//! It must not scan, bucket or batch anything.

use std::path::Path;

use rayon::prelude::*;

use crate::cache::{content_hash, Key};
use crate::decode::{DecodeOptions, Decoder, ImageFormat, RgbImage};
use crate::error::{Error, Result};
use crate::scan::ImageEntry;

/// Side, in pixels, that a reduced JPEG decode still covers.
pub const THUMB: u32 = 64;

/// A pixel is coloured when its channels differ by more than this many levels (0..=255): JPEG
/// chroma noise of a gray photo stays below it.
pub const CHROMA_LEVELS: u8 = 12;

/// The measures of one image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quality {
    /// blake3 of the file's bytes, truncated to 16 bytes (as the cache's content hash): equal for
    /// byte-identical files.
    pub content_hash: Key,
    /// 64-bit difference hash (dHash; N. Krawetz, "Kind of Like That", 2013, as the `imagehash`
    /// package computes it): the upright image as 8-bit luma (ITU-R 601, as Pillow's `convert("L")`),
    /// box-averaged to 9×8, then bit `8 * row + col` set when pixel `col + 1` of the row is brighter
    /// than pixel `col`. Near-identical images (resized, recompressed, slightly recoloured) differ in
    /// few bits.
    pub dhash: u64,
    /// Share of the image's area that is transparent, in `[0, 1]`: the mean of `1 - alpha` over the
    /// pixels (0 for formats without alpha).
    pub transparent: f32,
    /// Share of the opaque pixels (alpha above one half) whose channels differ by more than
    /// [`CHROMA_LEVELS`], in `[0, 1]`: 0 for a grayscale image (stored as gray or as RGB) and for
    /// one without an opaque pixel.
    pub coloured: f32,
    /// Standard deviation of the 9×8 luma cells the dHash compares, in levels (0..=255): near 0 for
    /// a flat image, whose dHash bits are noise.
    pub detail: f32,
}

/// [`Quality`] of each of `images` (in order), or the error of an image that cannot be read or
/// decoded, on `num_threads` threads (0 = the available parallelism).
///
/// Errors (per image): as [`crate::decode::Decoder::decode`], and [`Error::Io`] for an unreadable
/// file.
pub fn measure(
    images: &[ImageEntry],
    opts: &DecodeOptions,
    num_threads: usize,
) -> Result<Vec<Result<Quality>>> {
    let threads = match num_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("fastdiff-quality-{i}"))
        .build()
        .map_err(|e| Error::Resource(format!("cannot start quality threads: {e}")))?;
    Ok(pool.install(|| {
        images
            .par_iter()
            .map_init(Decoder::new, |decoder, image| {
                let decoder = decoder
                    .as_mut()
                    .map_err(|e| Error::Resource(e.to_string()))?;
                let bytes = std::fs::read(&image.path).map_err(|e| Error::io(&image.path, e))?;
                let alpha = image.header.format != ImageFormat::Jpeg;
                measure_one(
                    decoder,
                    &bytes,
                    &image.path,
                    image.header.orientation,
                    alpha,
                    opts,
                )
            })
            .collect()
    }))
}

fn measure_one(
    decoder: &mut Decoder,
    bytes: &[u8],
    path: &Path,
    orientation: u8,
    alpha: bool,
    opts: &DecodeOptions,
) -> Result<Quality> {
    let cover = (THUMB, THUMB);
    let on_white = DecodeOptions {
        background: [255; 3],
        ..*opts
    };
    let white = decoder.decode(bytes, path, orientation, cover, &on_white)?;
    // Alpha from two composites: on white a pixel is c·a + 255·(1 - a), on black c·a, so their
    // difference is 255·(1 - a). Only formats that can hold alpha (not JPEG) are decoded twice.
    let black = if alpha {
        let on_black = DecodeOptions {
            background: [0; 3],
            ..*opts
        };
        Some(decoder.decode(bytes, path, orientation, cover, &on_black)?)
    } else {
        None
    };
    let pixels = white.data.len() / 3;
    let mut clear = 0u64; // sum of 255·(1 - a) over the pixels' channels
    let (mut opaque, mut coloured) = (0usize, 0usize);
    for (i, p) in white.data.chunks_exact(3).enumerate() {
        let see_through = black.as_ref().map_or([0; 3], |b| {
            let q = &b.data[3 * i..3 * i + 3];
            [0, 1, 2].map(|c| p[c].saturating_sub(q[c]))
        });
        clear += see_through.iter().map(|&d| u64::from(d)).sum::<u64>();
        if see_through.iter().all(|&d| d < 128) {
            opaque += 1;
            if p.iter().max().unwrap() - p.iter().min().unwrap() > CHROMA_LEVELS {
                coloured += 1;
            }
        }
    }
    let (dhash, detail) = dhash(&white);
    Ok(Quality {
        content_hash: content_hash(bytes),
        dhash,
        transparent: (clear as f64 / (255.0 * 3.0 * pixels as f64)) as f32,
        coloured: if opaque == 0 {
            0.0
        } else {
            coloured as f32 / opaque as f32
        },
        detail,
    })
}

/// The difference hash of `img` and the spread of its cells (see [`Quality::dhash`] and
/// [`Quality::detail`]).
pub fn dhash(img: &RgbImage) -> (u64, f32) {
    let (w, h) = (img.width as usize, img.height as usize);
    let luma: Vec<f64> = (img.data.chunks_exact(3))
        .map(|p| 0.299 * f64::from(p[0]) + 0.587 * f64::from(p[1]) + 0.114 * f64::from(p[2]))
        .collect();
    // Box bounds of cell i of n over a side of len pixels: at least one pixel each.
    let span = |i: usize, n: usize, len: usize| {
        let start = (i * len / n).min(len - 1);
        (start, ((i + 1) * len / n).max(start + 1))
    };
    let mut cells = [[0.0f64; 9]; 8];
    for (row, cells_row) in cells.iter_mut().enumerate() {
        let (y0, y1) = span(row, 8, h);
        for (col, cell) in cells_row.iter_mut().enumerate() {
            let (x0, x1) = span(col, 9, w);
            let sum: f64 = (y0..y1)
                .map(|y| luma[y * w + x0..y * w + x1].iter().sum::<f64>())
                .sum();
            *cell = sum / ((y1 - y0) * (x1 - x0)) as f64;
        }
    }
    let mut hash = 0u64;
    for (row, r) in cells.iter().enumerate() {
        for col in 0..8 {
            if r[col + 1] > r[col] {
                hash |= 1 << (8 * row + col);
            }
        }
    }
    let all = cells.iter().flatten();
    let mean = all.clone().sum::<f64>() / 72.0;
    let var = all.map(|v| (v - mean) * (v - mean)).sum::<f64>() / 72.0;
    (hash, var.sqrt() as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::tests::write_image_with;
    use crate::scan::{scan, ScanOptions};
    use image::ImageFormat as F;

    fn rgb(width: u32, height: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> RgbImage {
        let mut data = Vec::new();
        for y in 0..height {
            for x in 0..width {
                data.extend(f(x, y));
            }
        }
        RgbImage {
            width,
            height,
            data,
        }
    }

    #[test]
    fn dhash_sets_the_bits_where_luma_rises_to_the_right() {
        // Brighter to the right everywhere: every bit; darker: none.
        assert_eq!(dhash(&rgb(90, 80, |x, _| [x as u8; 3])).0, u64::MAX);
        assert_eq!(dhash(&rgb(90, 80, |x, _| [255 - x as u8; 3])).0, 0);
        // Rising in the top half only: the low 32 bits (rows 0..4).
        let half = rgb(90, 80, |x, y| {
            [if y < 40 { x as u8 } else { 255 - x as u8 }; 3]
        });
        assert_eq!(dhash(&half).0, 0x0000_0000_FFFF_FFFF);
        // A flat image has no detail; two halves 0 and 200 have a spread of 100.
        assert_eq!(dhash(&rgb(90, 80, |_, _| [7; 3])), (0, 0.0));
        assert_eq!(
            dhash(&rgb(90, 80, |_, y| [if y < 40 { 0 } else { 200 }; 3])).1,
            100.0
        );
        // A tiny image still hashes (cells repeat pixels).
        dhash(&rgb(3, 2, |x, y| [(x * 50 + y) as u8; 3]));
    }

    #[test]
    fn measures_of_real_decodes() {
        let dir = tempfile::tempdir().unwrap();
        // Half of the image transparent (alpha 0 on the left half), gray, as RGBA PNG.
        let rgba = dir.path().join("half.png");
        image::RgbaImage::from_fn(40, 20, |x, _| {
            image::Rgba([100, 100, 100, if x < 20 { 0 } else { 255 }])
        })
        .save(&rgba)
        .unwrap();
        write_image_with(&dir.path().join("colour.png"), 40, 20, F::Png, |x, _| {
            [x as u8 * 6, 0, 255 - x as u8 * 6]
        });
        write_image_with(&dir.path().join("gray.jpg"), 80, 64, F::Jpeg, |x, y| {
            [(x + y) as u8; 3]
        });
        let found = scan(dir.path(), &ScanOptions::default()).unwrap();
        let q: Vec<Quality> = measure(&found.images, &DecodeOptions::default(), 2)
            .unwrap()
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        let by_name = |name: &str| {
            let i = found
                .images
                .iter()
                .position(|e| e.path.ends_with(name))
                .unwrap();
            q[i]
        };
        assert_eq!(by_name("colour.png").coloured, 1.0);
        assert_eq!(by_name("colour.png").transparent, 0.0);
        assert_eq!(by_name("gray.jpg").coloured, 0.0);
        assert_eq!(by_name("gray.jpg").transparent, 0.0);
        assert_eq!(by_name("half.png").transparent, 0.5);
        assert_eq!(by_name("half.png").coloured, 0.0);
        // The colour of the opaque half only counts: a red half on transparency is all colour.
        let red = dir.path().join("red.png");
        image::RgbaImage::from_fn(40, 20, |x, _| {
            image::Rgba([200, 0, 0, if x < 10 { 255 } else { 0 }])
        })
        .save(&red)
        .unwrap();
        let again = scan(dir.path(), &ScanOptions::default()).unwrap();
        let i = again.images.iter().position(|e| e.path == red).unwrap();
        let q_red = measure(&again.images[i..=i], &DecodeOptions::default(), 1).unwrap();
        let q_red = q_red[0].as_ref().unwrap();
        assert_eq!((q_red.transparent, q_red.coloured), (0.75, 1.0));
        let bytes = std::fs::read(dir.path().join("gray.jpg")).unwrap();
        assert_eq!(by_name("gray.jpg").content_hash, content_hash(&bytes));
    }

    #[test]
    fn an_unreadable_image_is_its_own_error() {
        let dir = tempfile::tempdir().unwrap();
        write_image_with(&dir.path().join("a.png"), 20, 20, F::Png, |_, _| [1, 2, 3]);
        write_image_with(&dir.path().join("b.png"), 20, 20, F::Png, |_, _| [1, 2, 3]);
        let found = scan(dir.path(), &ScanOptions::default()).unwrap();
        std::fs::write(dir.path().join("b.png"), b"\x89PNG\r\n\x1a\n broken").unwrap();
        let q = measure(&found.images, &DecodeOptions::default(), 1).unwrap();
        assert!(q[0].is_ok());
        let err = q[1].as_ref().unwrap_err().to_string();
        assert!(err.contains("b.png"), "{err}");
    }
}
