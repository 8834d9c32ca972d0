//! The epoch statistics ([`EpochIter::stats`]) through the public API: present, non-negative, adding
//! up to the workers' time, and counting the samples that were loaded.

use std::path::Path;

use fastdiff_core::pipeline::{LoadStats, Loader, LoaderOptions};

fn write_jpeg(path: &Path, w: u32, h: u32) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x ^ y) % 256) as u8])
    });
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    image::codecs::jpeg::JpegEncoder::new_with_quality(file, 90)
        .encode_image(&img)
        .unwrap();
}

fn stages(s: &LoadStats) -> [f64; 6] {
    [
        s.read_s, s.probe_s, s.decode_s, s.resize_s, s.write_s, s.other_s,
    ]
}

#[test]
fn stats_add_up_to_the_workers_time_and_count_the_samples() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..9u32 {
        write_jpeg(&dir.path().join(format!("{i}.jpg")), 700 + 10 * i, 500);
    }
    std::fs::write(dir.path().join("bad.jpg"), b"\xFF\xD8\xFF\xE0 truncated").unwrap();
    let opts = LoaderOptions {
        resolution: 256,
        batch_size: 2,
        num_threads: 2,
        prefetch: 2,
        ..LoaderOptions::default()
    };
    let loader = Loader::new(dir.path(), opts).unwrap();
    let mut it = loader.iter_epoch(0, 0);
    let handle = it.stats_handle();
    let mut images = 0;
    let mut batches = 0;
    for batch in it.by_ref() {
        images += batch.unwrap().samples.len();
        batches += 1;
    }
    let s = it.stats();
    drop(it);
    // Final once the epoch has ended: the handle outlives the iterator and reads the same.
    assert_eq!(handle.snapshot(), s);

    assert_eq!(images, 9);
    assert_eq!((s.samples, s.batches, s.threads), (images, batches, 2));
    for (i, x) in stages(&s).into_iter().enumerate() {
        assert!(x.is_finite() && x >= 0.0, "stage {i}: {s:?}");
    }
    assert!(
        s.decode_s > 0.0 && s.resize_s > 0.0 && s.write_s > 0.0,
        "{s:?}"
    );
    let total: f64 = stages(&s).iter().sum();
    assert!(
        (total - s.busy_s).abs() <= 1e-6 * s.busy_s.max(1.0),
        "{s:?}"
    );
    // The named stages are most of the workers' time on samples. The rest (thread start-up, the
    // decoder's set-up, preemption between stages) is a few ms, but on a loaded 2-core machine a
    // debug build can be descheduled for tens of ms: hence the absolute slack.
    assert!(s.other_s <= 0.2 * s.busy_s + 0.05, "{s:?}");
    // Each worker is busy or idle for (about) the whole epoch, never more.
    let worker_time = s.busy_s + s.idle_s;
    assert!(worker_time <= 2.0 * s.wall_s * 1.05 + 0.01, "{s:?}");
    assert!(worker_time >= 2.0 * s.wall_s * 0.5, "{s:?}");
    assert!(s.queue_wait_s >= 0.0 && s.queue_wait_s <= s.wall_s, "{s:?}");
}

#[test]
fn an_epoch_with_nothing_to_load_has_empty_stats() {
    let dir = tempfile::tempdir().unwrap();
    write_jpeg(&dir.path().join("a.jpg"), 300, 200);
    let loader = Loader::new(dir.path(), LoaderOptions::default()).unwrap();
    let mut it = loader.iter_epoch(0, 1);
    assert!(it.next().is_none());
    let s = it.stats();
    assert_eq!((s.samples, s.batches, s.threads), (0, 0, 0));
    assert_eq!(s.busy_s, 0.0);
}
