//! End-to-end tests of the loader through its public API only, the way the Python binding uses it.

use std::path::Path;

use fastdiff_core::pipeline::{Batch, Loader, LoaderOptions};
use fastdiff_core::transform::OutputDtype;

/// A `w`x`h` gradient image encoded as `format` (JPEG at quality 90).
fn write_image(path: &Path, w: u32, h: u32, format: image::ImageFormat) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x ^ y) % 256) as u8])
    });
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    match format {
        image::ImageFormat::Jpeg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut file, 90)
                .encode_image(&img)
                .unwrap()
        }
        other => img.write_to(&mut file, other).unwrap(),
    }
}

/// 14 camera-sized JPEGs (large enough for DCT downscaling at resolution 256) and PNGs, plus one file
/// that is not an image.
fn dataset() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..14u32 {
        let (w, h) = match i % 3 {
            0 => (1200, 800),
            1 => (800, 1200),
            _ => (900, 900),
        };
        let (format, ext) = if i % 2 == 0 {
            (image::ImageFormat::Jpeg, "jpg")
        } else {
            (image::ImageFormat::Png, "png")
        };
        write_image(&dir.path().join(format!("{i:02}.{ext}")), w + i, h, format);
        std::fs::write(dir.path().join(format!("{i:02}.txt")), format!("photo {i}")).unwrap();
    }
    std::fs::write(dir.path().join("zz.jpg"), b"not a jpeg").unwrap();
    dir
}

fn options() -> LoaderOptions {
    LoaderOptions {
        resolution: 256,
        batch_size: 2,
        num_threads: 2,
        seed: 5,
        flip_prob: 0.5,
        ..LoaderOptions::default()
    }
}

#[test]
fn epoch_on_another_thread_with_drop_last_and_half_floats() {
    let dir = dataset();
    let opts = LoaderOptions {
        drop_last: true,
        dtype: OutputDtype::F16,
        ..options()
    };
    let loader = Loader::new(dir.path(), opts).unwrap();
    let report = loader.report();
    assert_eq!(
        (report.found, report.loaded, report.skipped.len()),
        (15, 14, 1)
    );
    let expected: usize = report.images_per_bucket.iter().map(|(_, n)| n / 2).sum();
    assert_eq!(loader.num_batches(), expected);

    let it = loader.iter_epoch(0, 0);
    assert_eq!(it.remaining(), expected);
    // The iterator is Send: consume it elsewhere, as the binding does with the GIL released.
    let batches: Vec<Batch> = std::thread::spawn(move || it.map(Result::unwrap).collect())
        .join()
        .unwrap();
    assert_eq!(batches.len(), expected);
    let mut paths = Vec::new();
    for b in &batches {
        assert_eq!(b.samples.len(), 2);
        assert_eq!(b.pixels.dtype(), OutputDtype::F16);
        let v = b.pixels.as_u16().unwrap();
        assert_eq!(v.len(), 2 * 3 * (b.bucket.width * b.bucket.height) as usize);
        assert!(v
            .iter()
            .all(|&x| (-1.0..=1.0).contains(&half::f16::from_bits(x).to_f32())));
        for s in &b.samples {
            assert_eq!(s.target_size, (b.bucket.height, b.bucket.width));
            assert!(s.caption.starts_with("photo "));
            paths.push(s.path.clone());
        }
    }
    let n = paths.len();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), n, "no image twice");
}

#[test]
fn two_live_iterators_do_not_interfere() {
    let dir = dataset();
    let loader = Loader::new(dir.path(), options()).unwrap();
    let alone0: Vec<Batch> = loader.iter_epoch(0, 0).map(Result::unwrap).collect();
    let alone1: Vec<Batch> = loader.iter_epoch(1, 0).map(Result::unwrap).collect();
    assert_ne!(alone0, alone1);
    let (mut a, mut b) = (loader.iter_epoch(0, 0), loader.iter_epoch(1, 0));
    let (mut got0, mut got1) = (Vec::new(), Vec::new());
    loop {
        let (x, y) = (a.next(), b.next());
        if x.is_none() && y.is_none() {
            break;
        }
        got0.extend(x.map(Result::unwrap));
        got1.extend(y.map(Result::unwrap));
    }
    assert_eq!(got0, alone0);
    assert_eq!(got1, alone1);
    assert_eq!(loader.report().skipped.len(), 1);
}
