//! One worker thread: take a job, load its sample (read, check the header against the scan, decode,
//! transform) straight into the batch's slot, and with `on_error = skip` find a stand-in for a
//! sample that fails.
//!
//! The hot path. Every load runs under a panic guard so that one bad file cannot take the thread
//! down or leave a slot without an outcome; nothing here may block on the consumer.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use super::batch::{BatchState, SampleMeta, SampleOutcome};
use super::loader::Inner;
use super::options::OnError;
use super::serve::{copy_entries, SampleKeys};
use super::stats::{Stage, StatsHandle, Stopwatch};
use super::views::{write_views, ViewTools};
use crate::decode::{self, DecodeOptions, Decoder};
use crate::error::{Error, Result};
use crate::rng::{self, Stream};
use crate::scan::ImageEntry;
use crate::transform::{Placement, Transformer};

/// One sample to load: sample `sample` (image `image`) into slot `slot` of `batch`.
pub(super) struct Job {
    pub(super) batch: Arc<BatchState>,
    pub(super) slot: usize,
    pub(super) sample: usize,
    pub(super) image: usize,
    pub(super) draw: Draw,
}

/// Where a job's crop and flip come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Draw {
    /// The epoch's seeded draws for the sample (a failed sample gets a stand-in).
    Epoch,
    /// Crop variant `variant` of the image, flipped or not ([`Loader::iter_build`]: no stand-ins;
    /// the caption is the image's as read).
    ///
    /// [`Loader::iter_build`]: super::Loader::iter_build
    Fixed { variant: u32, flip: bool },
}

pub(super) struct WorkerCtx {
    pub(super) inner: Arc<Inner>,
    pub(super) epoch: u64,
    pub(super) jobs: Receiver<Job>,
    pub(super) done: Sender<()>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) stats: StatsHandle,
}

/// Per-thread decoder and resizer, created on the first job.
struct Tools {
    decoder: Decoder,
    transformer: Transformer,
    views: ViewTools,
}

/// The thread's tools, created on first use.
fn tools_of<'a>(tools: &'a mut Option<Tools>, inner: &Inner) -> Result<&'a mut Tools> {
    Ok(match tools {
        Some(t) => t,
        None => tools.insert(Tools {
            decoder: Decoder::new()?,
            transformer: Transformer::new(inner.opts.filter),
            views: ViewTools::new(),
        }),
    })
}

/// The decode options of the loader's images.
fn decode_options(inner: &Inner) -> DecodeOptions {
    DecodeOptions {
        background: inner.opts.background,
        max_pixels: inner.opts.max_pixels,
        alpha_plane: false,
    }
}

pub(super) fn worker_loop(ctx: WorkerCtx) {
    let mut tools: Option<Tools> = None;
    let mut waiting = std::time::Instant::now();
    while let Ok(job) = ctx.jobs.recv() {
        let started = std::time::Instant::now();
        ctx.stats.add_idle(started - waiting);
        if ctx.stop.load(Ordering::Relaxed) {
            break;
        }
        // Each load is guarded already; this guard covers the stand-in search around them, so that
        // whatever panics the slot still gets an outcome and the consumer never waits forever.
        let path = &ctx.inner.images[job.image].path;
        let outcome = guarded(path, || {
            load_with_stand_ins(&ctx, &job, &mut tools, started)
        });
        if matches!(outcome, Err(Error::Panic { .. })) {
            tools = None;
        }
        waiting = std::time::Instant::now();
        if job.batch.finish(job.slot, outcome) {
            // The consumer may be gone (epoch ended); nothing waits for this then.
            let _ = ctx.done.send(());
        }
    }
}

/// Seeded draws from a failed sample's bucket before the sweep of the whole dataset.
const BUCKET_DRAWS: u64 = 7;

/// Load `job`'s sample into its slot. With [`OnError::Skip`], a sample that fails is replaced by the
/// first of its [`stand_in_candidates`] that loads: batches keep their planned size, so
/// `num_batches` stays exact and every rank keeps the same number of samples per step, unless no
/// image of the dataset loads. Each failure is recorded in the report when it happens. With
/// [`OnError::Raise`] the first failure is the outcome.
fn load_with_stand_ins(
    ctx: &WorkerCtx,
    job: &Job,
    tools: &mut Option<Tools>,
    mut started: std::time::Instant,
) -> SampleOutcome {
    let inner = &ctx.inner;
    let mut candidates = stand_in_candidates(inner, ctx.epoch, job.sample);
    let mut attempt_job = Job {
        batch: Arc::clone(&job.batch),
        slot: job.slot,
        sample: job.sample,
        image: job.image,
        draw: job.draw,
    };
    loop {
        let entry = &inner.images[attempt_job.image];
        let mut watch = Stopwatch::start();
        let result = guarded(&entry.path, || {
            load_sample(inner, ctx.epoch, &attempt_job, entry, tools, &mut watch)
        });
        let now = std::time::Instant::now();
        ctx.stats.add_sample(&watch, now - started, result.is_ok());
        started = now;
        if matches!(result, Err(Error::Panic { .. })) {
            // The decoder or resizer may have been left half-way through an operation.
            *tools = None;
        }
        let err = match result {
            Ok(meta) => return Ok(meta),
            Err(err) => err,
        };
        if inner.opts.on_error == OnError::Raise {
            return Err(err);
        }
        inner.record_failure(attempt_job.image, &err);
        if ctx.stop.load(Ordering::Relaxed) || job.draw != Draw::Epoch {
            // The epoch is being dropped: nobody will see this slot, so end the search here. A
            // build batch has no stand-ins: its sample is left out.
            return Err(err);
        }
        // Images known to fail (this one included) are passed over: they would fail again, so the
        // stand-in chosen is the same whatever other threads have found so far.
        let next =
            candidates.find(|&sample| !inner.failed().images.contains(&inner.sample_image[sample]));
        let Some(sample) = next else {
            return Err(err);
        };
        attempt_job.sample = sample;
        attempt_job.image = inner.sample_image[sample];
    }
}

/// The stand-ins tried, in order, when `sample` fails to load: up to [`BUCKET_DRAWS`] seeded draws
/// from its own bucket (when the bucket has other samples), so a stand-in usually has the same
/// aspect ratio; then every sample of the dataset once, from a seeded offset, so that a sample
/// alone in its bucket, or a bucket whose images all fail, still gets one (resized and cropped to
/// this bucket like any sample). A pure function of (seed, epoch, sample): the same for every
/// thread count and prefetch depth.
fn stand_in_candidates(
    inner: &Inner,
    epoch: u64,
    sample: usize,
) -> impl Iterator<Item = usize> + '_ {
    let key = move |k: u64| {
        rng::uniform(
            inner.opts.seed,
            epoch,
            Stream::Substitute,
            sample as u64 * (BUCKET_DRAWS + 1) + k,
        )
    };
    let pick = |u: f64, n: usize| ((u * n as f64) as usize).min(n - 1);
    let pool = &inner.bucket_samples[inner.sample_bucket[sample]];
    let draws = if pool.len() > 1 { BUCKET_DRAWS } else { 0 };
    let n = inner.sample_image.len();
    let start = pick(key(0), n);
    (1..=draws)
        .map(move |k| pool[pick(key(k), pool.len())])
        .chain(
            (0..n)
                .map(move |i| (start + i) % n)
                .filter(|&s| inner.owns(s)),
        )
}

/// Run `f`, turning a panic inside it into [`Error::Panic`] naming `path` (with the panic message),
/// so one bad file cannot take a worker thread down.
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = if let Some(s) = payload.downcast_ref::<&str>() {
            (*s).to_owned()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "panic with a non-string payload".to_owned()
        };
        Err(Error::Panic {
            path: path.to_path_buf(),
            message,
        })
    })
}

/// Load one sample into its slot: its placement and caption from the draws, its keys, its cached
/// tensors (when the batch has any, see `serve`), then, when the batch decodes pixels: read, check
/// the header against the scan, decode (DCT-downscaled where the format allows, to no less than
/// the resized size), resize + crop + flip + layout. `watch` gets each stage's time (the cache
/// copy counts as reading).
fn load_sample(
    inner: &Inner,
    epoch: u64,
    job: &Job,
    entry: &ImageEntry,
    tools: &mut Option<Tools>,
    watch: &mut Stopwatch,
) -> Result<SampleMeta> {
    let bucket = job.batch.bucket;
    // Keyed by sample, not image: each repeat of an image gets its own crop, flip and caption.
    let (placement, caption) = match job.draw {
        Draw::Epoch => (
            inner.placement(epoch, job.sample, job.image, bucket),
            inner.caption(epoch, job.sample, job.image),
        ),
        Draw::Fixed { variant, flip } => (
            inner.variant_placement(job.image, bucket, variant, flip),
            entry.caption.clone(),
        ),
    };
    let cache = inner.cache.as_ref();
    let keys = SampleKeys {
        placement: &placement,
        caption: &caption,
        latent: cache.and_then(|c| c.latent_key(inner, job.image, &placement)),
        text: cache.and_then(|c| c.text_key(&caption)),
    };
    if !job.batch.tensors.is_empty() {
        copy_entries(inner, job, entry, &keys)?;
        watch.lap(Stage::Read);
    }
    if job.batch.decode {
        decode_into_slot(inner, job, entry, &placement, tools, watch)?;
    }
    if !job.batch.views.is_empty() {
        let t = tools_of(tools, inner)?;
        // SAFETY: as for the pixel slot in `decode_into_slot`: this job alone writes (batch, slot).
        let slots = unsafe { job.batch.view_slots(job.slot) };
        write_views(
            &inner.opts.views,
            &inner.pairs[job.image],
            entry,
            &placement,
            &decode_options(inner),
            &mut t.decoder,
            &mut t.transformer,
            &mut t.views,
            slots,
        )?;
        watch.lap(Stage::Write);
    }
    let upright = entry.header.upright_size();
    let subset = inner.subset_of[job.image];
    Ok(SampleMeta {
        index: job.image,
        subset,
        is_reg: inner.subsets[subset].is_reg,
        path: entry.path.clone(),
        latent_key: keys.latent,
        text_key: keys.text,
        caption,
        original_size: (upright.1, upright.0),
        crop_top_left: placement.crop_top_left(),
        target_size: (bucket.height, bucket.width),
        placement,
    })
}

/// Read, check the header against the scan, decode and transform `job`'s image at `placement`
/// into its pixel slot.
fn decode_into_slot(
    inner: &Inner,
    job: &Job,
    entry: &ImageEntry,
    placement: &Placement,
    tools: &mut Option<Tools>,
    watch: &mut Stopwatch,
) -> Result<()> {
    let path = &entry.path;
    let bytes = entry.read().map_err(|e| Error::io(path, e))?;
    inner.io.count(entry, bytes.len());
    watch.lap(Stage::Read);

    let now = decode::probe_bytes(&bytes, path)?;
    let was = &entry.header;
    if now != *was {
        return Err(Error::Changed {
            path: path.clone(),
            reason: format!(
                "scanned as {} {}x{} orientation {}, now {} {}x{} orientation {}",
                was.format.name(),
                was.width,
                was.height,
                was.orientation,
                now.format.name(),
                now.width,
                now.height,
                now.orientation
            ),
        });
    }
    watch.lap(Stage::Probe);

    let tools = tools_of(tools, inner)?;
    let decode_opts = decode_options(inner);
    watch.skip();
    let img = tools.decoder.decode(
        &bytes,
        path,
        was.orientation,
        placement.resized,
        &decode_opts,
    )?;
    watch.lap(Stage::Decode);
    let bucket = job.batch.bucket;
    // SAFETY: this job is the only one for (batch, slot), and the consumer takes the buffer only
    // after `finish` has been called for every slot, which happens after this borrow ends.
    let out = unsafe { job.batch.slot_mut(job.slot) };
    tools
        .transformer
        .apply(&img, placement, (bucket.width, bucket.height), out)?;
    watch.lap(Stage::Write);
    let resize = tools.transformer.take_resize_time();
    watch.move_time(Stage::Write, Stage::Resize, resize);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::*;

    #[test]
    fn each_sample_lands_in_its_own_slot_for_every_dtype() {
        let (dir, files) = colour_dataset(7);
        let colour = |p: &Path| files.iter().find(|(q, _)| q == p).unwrap().1;
        let o = LoaderOptions {
            batch_size: 4,
            num_threads: 3,
            dtype: OutputDtype::U8,
            ..opts()
        };
        let loader = Loader::new(dir.path(), o.clone()).unwrap();
        for b in collect(loader.iter_epoch(0, 0)) {
            for (s, meta) in b.samples.iter().enumerate() {
                assert_solid_u8(&b, s, colour(&meta.path));
            }
        }
        // Float outputs hold v / 127.5 - 1 (half types as bit patterns).
        for dtype in [OutputDtype::F32, OutputDtype::F16, OutputDtype::BF16] {
            let loader = Loader::new(dir.path(), LoaderOptions { dtype, ..o.clone() }).unwrap();
            for b in collect(loader.iter_epoch(0, 0)) {
                let per = values_per_sample(&b.bucket);
                for (s, meta) in b.samples.iter().enumerate() {
                    let c = colour(&meta.path);
                    for (ch, &value) in c.iter().enumerate() {
                        let want = f32::from(value) / 127.5 - 1.0;
                        let plane = s * per + ch * per / 3..s * per + (ch + 1) * per / 3;
                        for i in plane {
                            let got = b.pixels.get_f32(i);
                            // bf16 keeps 8 significant bits: error up to 2^-8 near ±1.
                            assert!((got - want).abs() < 0.005, "{dtype:?}: {got} vs {want}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn failed_samples_get_stand_ins_from_their_bucket_and_are_reported_once() {
        let (dir, files) = colour_dataset(6);
        let bad = dir.path().join("c02b.png");
        write_truncated_png(&bad, 40, 40);
        let run = |num_threads, epoch| {
            let o = LoaderOptions {
                batch_size: 8,
                shuffle: false,
                dtype: OutputDtype::U8,
                num_threads,
                ..opts()
            };
            let loader = Loader::new(dir.path(), o).unwrap();
            (collect(loader.iter_epoch(epoch, 0)), loader)
        };
        for epoch in 0..2 {
            let (batches, loader) = run(2, epoch);
            assert_eq!(
                loader.report().skipped.len(),
                1,
                "recorded once, epoch {epoch}"
            );
            // Same stand-ins whatever the thread count.
            assert_eq!(batches, run(1, epoch).0);
            let mut paths = Vec::new();
            for b in &batches {
                assert_eq!(
                    b.pixels.len(),
                    b.samples.len() * values_per_sample(&b.bucket)
                );
                for (s, meta) in b.samples.iter().enumerate() {
                    let c = files.iter().find(|(p, _)| *p == meta.path).unwrap().1;
                    assert_solid_u8(b, s, c);
                    paths.push(meta.path.clone());
                }
            }
            // The planned 7 samples: the bad one replaced by a good image of its bucket.
            assert_eq!(paths.len(), 7);
            paths.sort();
            paths.dedup();
            assert_eq!(paths, files.iter().map(|f| f.0.clone()).collect::<Vec<_>>());
            let r = loader.report();
            assert_eq!(r.skipped[0].path, bad);
            assert_eq!(r.skipped[0].code, SkipCode::Decode);
            assert_eq!((r.found, r.loaded), (7, 6));
            assert_eq!(r.formats.values().sum::<usize>(), 6);
            assert_eq!(r.images_per_bucket.iter().map(|x| x.1).sum::<usize>(), 6);
        }
    }

    #[test]
    fn stand_ins_keep_every_batch_full_and_num_batches_exact() {
        let (dir, _) = colour_dataset(2);
        write_truncated_png(&dir.path().join("z.png"), 40, 40);
        let o = LoaderOptions {
            batch_size: 1,
            shuffle: false,
            ..opts()
        };
        let loader = Loader::new(dir.path(), o).unwrap();
        assert_eq!(loader.num_batches(), 3);
        let batches = collect(loader.iter_epoch(0, 0));
        assert_eq!(batches.len(), 3);
        assert!(batches.iter().all(|b| b.samples.len() == 1));
        assert_eq!(loader.report().skipped.len(), 1);
    }

    #[test]
    fn a_sample_alone_in_its_bucket_gets_a_stand_in_from_another_bucket() {
        // The broken image is alone in its (4:1) bucket: the stand-in comes from the square bucket,
        // resized and cropped to 4:1.
        let (dir, files) = colour_dataset(2);
        write_truncated_png(&dir.path().join("z.png"), 128, 32);
        let o = LoaderOptions {
            batch_size: 1,
            shuffle: false,
            dtype: OutputDtype::U8,
            ..opts()
        };
        let loader = Loader::new(dir.path(), o).unwrap();
        assert_eq!(loader.num_batches(), 3);
        let batches = collect(loader.iter_epoch(0, 0));
        assert_eq!(batches.len(), 3);
        let wide = batches
            .iter()
            .find(|b| b.bucket.width > b.bucket.height)
            .expect("the 4:1 batch is yielded");
        let meta = &wide.samples[0];
        assert_eq!(meta.target_size, (wide.bucket.height, wide.bucket.width));
        let c = files.iter().find(|(p, _)| *p == meta.path).unwrap().1;
        assert_solid_u8(wide, 0, c);
        assert_eq!(loader.report().skipped.len(), 1);
        assert_eq!(batches, collect(loader.iter_epoch(0, 0)));
    }

    #[test]
    fn a_bucket_whose_images_all_fail_keeps_its_batches() {
        let (dir, _) = colour_dataset(3);
        for name in ["z0.png", "z1.png"] {
            write_truncated_png(&dir.path().join(name), 128, 32);
        }
        let o = LoaderOptions {
            batch_size: 2,
            shuffle: false,
            ..opts()
        };
        let loader = Loader::new(dir.path(), o).unwrap();
        assert_eq!(loader.num_batches(), 3);
        let batches = collect(loader.iter_epoch(0, 0));
        let sizes: Vec<usize> = batches.iter().map(|b| b.samples.len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 5);
        assert_eq!(batches.len(), 3);
        assert_eq!(loader.report().skipped.len(), 2);
    }

    #[test]
    fn a_dataset_whose_images_all_fail_yields_nothing() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.png", "b.png"] {
            write_truncated_png(&dir.path().join(name), 40, 40);
        }
        let loader = Loader::new(dir.path(), opts()).unwrap();
        assert!(collect(loader.iter_epoch(0, 0)).is_empty());
        let r = loader.report();
        assert_eq!((r.found, r.loaded, r.skipped.len()), (2, 0, 2));
    }

    #[test]
    fn flip_mirrors_pixels_and_crop_top_left() {
        let dir = tempfile::tempdir().unwrap();
        // 128x64, left half black, right half white: bucket 96x48 (2:1 is not a bucket at 64/16;
        // whatever bucket, a flip swaps which side the dark pixels are on).
        write_image_with(&dir.path().join("a.png"), 128, 64, F::Png, |x, _| {
            if x < 64 {
                [0; 3]
            } else {
                [255; 3]
            }
        });
        let run = |flip_prob| {
            let o = LoaderOptions {
                flip_prob,
                dtype: OutputDtype::U8,
                ..opts()
            };
            collect(Loader::new(dir.path(), o).unwrap().iter_epoch(0, 0)).remove(0)
        };
        let (plain, flipped) = (run(0.0), run(1.0));
        let a = plain.pixels.as_u8().unwrap();
        let b = flipped.pixels.as_u8().unwrap();
        let w = plain.bucket.width as usize;
        assert_eq!((a[0], a[w - 1]), (0, 255));
        assert_eq!((b[0], b[w - 1]), (255, 0));
        let p = Placement::new(
            (128, 64),
            (plain.bucket.width, plain.bucket.height),
            CropMode::Center,
            0.0,
            0.0,
            true,
        );
        assert_eq!(flipped.samples[0].crop_top_left, p.crop_top_left());
        assert_eq!(
            plain.samples[0].crop_top_left.1 + flipped.samples[0].crop_top_left.1,
            p.resized.0 - plain.bucket.width
        );
    }

    #[test]
    fn panics_become_errors_naming_the_file() {
        let path = Path::new("/data/x.png");
        let err = guarded(path, || -> Result<()> { panic!("boom {}", 7) }).unwrap_err();
        assert_eq!(err.code(), SkipCode::Panic);
        assert_eq!(err.path(), Some(path));
        assert!(err.to_string().contains("boom 7"), "{err}");
        let err = guarded(path, || -> Result<()> { panic!("static") }).unwrap_err();
        assert!(err.to_string().contains("static"), "{err}");
        let err = guarded(path, || -> Result<()> { std::panic::panic_any(42) }).unwrap_err();
        assert!(err.to_string().contains("non-string"), "{err}");
        assert_eq!(guarded(path, || Ok(5)).unwrap(), 5);
    }
}
