//! Test fixtures of the pipeline: small generated datasets, option presets and the checks the tests
//! of every pipeline file share. Test-only; nothing here is part of the library.

pub(super) use std::collections::HashSet;
pub(super) use std::path::{Path, PathBuf};
pub(super) use std::time::{Duration, Instant};

pub(super) use image::ImageFormat as F;

pub(super) use super::{Batch, EpochIter, Loader, LoaderOptions, SampleMeta};
pub(super) use crate::bucket::{assign, Bucket};
pub(super) use crate::caption::CaptionOptions;
pub(super) use crate::error::SkipCode;
pub(super) use crate::sampler::{self, Remainder, Sampling};
pub(super) use crate::scan::tests::{write_image, write_image_with};
pub(super) use crate::transform::{CropMode, OutputDtype};

/// Small buckets keep the tests fast: resolution 64, step 16 → sides 32..=128.
pub(super) fn opts() -> LoaderOptions {
    LoaderOptions {
        resolution: 64,
        bucket_step: 16,
        batch_size: 3,
        num_threads: 2,
        ..LoaderOptions::default()
    }
}

/// 17 gradient images of assorted shapes and formats, some with captions.
pub(super) fn dataset() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [
        (64, 64),
        (120, 80),
        (80, 120),
        (200, 50),
        (50, 200),
        (90, 90),
        (100, 60),
        (33, 47),
        (128, 128),
        (75, 75),
        (160, 90),
        (90, 160),
        (70, 70),
        (61, 59),
        (256, 64),
        (64, 256),
        (140, 100),
    ];
    for (i, &(w, h)) in sizes.iter().enumerate() {
        let (fmt, ext) = if i % 3 == 0 {
            (F::Jpeg, "jpg")
        } else {
            (F::Png, "png")
        };
        let path = dir.path().join(format!("img{i:02}.{ext}"));
        write_image(&path, w, h, fmt);
        if i % 2 == 0 {
            std::fs::write(path.with_extension("txt"), format!("caption {i}")).unwrap();
        }
    }
    dir
}

pub(super) fn collect(it: EpochIter) -> Vec<Batch> {
    it.map(|b| b.unwrap()).collect()
}

pub(super) fn values_per_sample(b: &Bucket) -> usize {
    3 * b.width as usize * b.height as usize
}

/// Solid-colour PNGs, one colour per image, plus what each file's colour is.
pub(super) fn colour_dataset(n: u32) -> (tempfile::TempDir, Vec<(PathBuf, [u8; 3])>) {
    let dir = tempfile::tempdir().unwrap();
    let files = (0..n)
        .map(|i| {
            let c = [
                (i * 40 % 256) as u8,
                (255 - i * 13) as u8,
                (i * 97 % 256) as u8,
            ];
            let p = dir.path().join(format!("c{i:02}.png"));
            write_image_with(&p, 48 + i, 40, F::Png, |_, _| c);
            (p, c)
        })
        .collect();
    (dir, files)
}

/// The three planes of sample `s` of a U8 batch are the constants `c`.
pub(super) fn assert_solid_u8(batch: &Batch, s: usize, c: [u8; 3]) {
    let v = batch.pixels.as_u8().expect("a u8 batch");
    let per = values_per_sample(&batch.bucket);
    let plane = per / 3;
    for (ch, &expected) in c.iter().enumerate() {
        let start = s * per + ch * plane;
        assert!(
            v[start..start + plane].iter().all(|&x| x == expected),
            "sample {s} channel {ch} of {:?}",
            batch.samples[s].path
        );
    }
}

/// A PNG whose header is intact but whose pixel data is cut off: passes the scan, fails to decode.
/// A `w` x `h` PNG cut in half: its header scans, its pixel data does not decode.
pub(super) fn write_truncated_png(path: &Path, w: u32, h: u32) {
    write_image(path, w, h, F::Png);
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
}

pub(super) fn collect_plan_position(loader: &Loader, path: &Path) -> usize {
    let inner = &loader.inner;
    let o = &inner.opts;
    let index = inner.images.iter().position(|e| e.path == path).unwrap();
    sampler::plan_epoch(&inner.bucket_of, inner.buckets.len(), &o.sampling(), 0)
        .iter()
        .position(|p| p.indices.contains(&index))
        .unwrap()
}

/// A PNG of `w` x `h` that is only its signature and IHDR chunk: the header scan accepts it (it
/// cannot be decoded), so bucketing and planning can be tested on any shapes at no cost.
pub(super) fn write_header_png(path: &Path, w: u32, h: u32) {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0d".to_vec();
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32fast::hash(&ihdr).to_be_bytes());
    std::fs::write(path, png).unwrap();
}

/// The shape of the coverage complaint in issue 15: 84 images over 42 aspect buckets, two per
/// bucket. Resolution 512 with `bucket_step` 16 has 65 buckets; images `2j` and `2j + 1` are
/// header-only PNGs of twice the size of bucket `11 + j` (its aspect exactly), `j` in `0..42`.
/// Returns the folder and the options (batch 4) that bucket it so.
pub(super) fn issue_shaped_dataset() -> (tempfile::TempDir, LoaderOptions) {
    let o = LoaderOptions {
        resolution: 512,
        bucket_step: 16,
        batch_size: 4,
        ..opts()
    };
    let list = o.bucket_config().unwrap().buckets();
    assert_eq!(list.len(), 65);
    let dir = tempfile::tempdir().unwrap();
    for j in 0..42 {
        let b = list[11 + j];
        for k in 0..2 {
            let path = dir.path().join(format!("i{:03}.png", 2 * j + k));
            write_header_png(&path, 2 * b.width, 2 * b.height);
        }
    }
    (dir, o)
}
