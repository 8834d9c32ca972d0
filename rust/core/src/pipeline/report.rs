//! The [`Report`] of a [`Loader`](super::Loader): what the scan found (formats, sizes, captions,
//! buckets, subsets) and every file skipped, by the scan or while iterating, with its reason.
//!
//! A snapshot computed on request from the loader's state; it must not change that state.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::loader::Loader;
use super::shards::ShardIo;
use crate::bucket::Bucket;
use crate::error::Skip;
use crate::scan::PassedOver;

/// Summary of the dataset: what the scan found and what failed since.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The dataset folder as given (the first subset's).
    pub root: PathBuf,
    /// Candidate image files found by the scan (all subsets).
    pub found: usize,
    /// Images usable so far: `found - held_out - skipped.len()`.
    pub loaded: usize,
    /// Images found but held out by `validation_split` (the validation images in a training
    /// loader, the others in a validation loader): `loaded + held_out + skipped.len() == found`.
    pub held_out: usize,
    /// Files not loaded, with reasons, sorted by path: the scan's skips plus samples that failed while
    /// iterating with [`OnError::Skip`] (each file once).
    pub skipped: Vec<Skip>,
    /// Files in the subsets' folders that are not image candidates, by kind (caption files, other
    /// files, hidden entries).
    pub passed_over: PassedOver,
    /// Loaded images per format name (`"jpeg"`, `"png"`, `"webp"`, ..., from the header); sums to
    /// `loaded`.
    pub formats: BTreeMap<String, usize>,
    /// Smallest loaded image by upright area, as (width, height); (0, 0) when none is loaded.
    pub min_size: (u32, u32),
    /// Largest loaded image by upright area, as (width, height); (0, 0) when none is loaded.
    pub max_size: (u32, u32),
    /// Loaded images without a caption file.
    pub captions_missing: usize,
    /// Loaded images whose caption file needed the fallback decoding.
    pub captions_fallback_encoding: usize,
    /// Loaded images per bucket, for buckets with at least one image, in bucket-list order.
    pub images_per_bucket: Vec<(Bucket, usize)>,
    /// Samples per epoch over all ranks before batching: loaded images times their subset's repeats.
    pub samples: usize,
    /// Buckets with samples but fewer than one global batch (`batch_size * world_size`), with their
    /// sample count (repeats counted): with `drop_last` they yield nothing, otherwise one short batch
    /// split across ranks by [`Remainder`].
    pub small_buckets: Vec<(Bucket, usize)>,
    /// Of the `loaded` images, those epoch 0 trains: in at least one batch of some rank's plan
    /// ([`Loader::images_trained`]; padding repeats count once, `drop_last`/`remainder = drop`
    /// leave samples out). The same every epoch unless a subset repeats its images and some
    /// bucket's last global batch drops samples (which repeats are dropped then varies by epoch).
    pub images_trained: usize,
    /// What `min_bucket_fill` merged (all zero and empty without it).
    pub bucket_merges: BucketMerges,
    /// Per subset, in order.
    pub subsets: Vec<SubsetReport>,
    /// The scan's warnings: problems that lost no image (a shard's stale index, ignored), and why
    /// several ranks fell back to a sample-level split of tar shards.
    pub warnings: Vec<String>,
    /// In shard-level rank assignment, this rank's shards (sorted by path); `None` otherwise.
    pub own_shards: Option<Vec<PathBuf>>,
    /// What the workers read from each tar shard so far (sorted by path; shards never read are
    /// absent).
    pub io: Vec<ShardIo>,
}

/// What [`LoaderOptions::min_bucket_fill`](super::LoaderOptions::min_bucket_fill) did: the images
/// moved out of their own bucket (see [`crate::bucket::merge_small_buckets`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BucketMerges {
    /// Images moved.
    pub images_moved: usize,
    /// Their samples (repeats counted).
    pub samples_moved: usize,
    /// Mean over the moved images of [`crate::bucket::aspect_error`] at their new bucket
    /// (`|ln(w / h) - ln(bw / bh)|`); 0 when none moved.
    pub mean_aspect_error: f64,
    /// The largest of those; 0 when none moved.
    pub max_aspect_error: f64,
    /// Mean extra crop of the moved images (share of the image area, see [`crate::bucket::Move`]).
    pub mean_extra_crop: f64,
    /// The largest extra crop; at most `max_extra_crop`.
    pub max_extra_crop: f64,
    /// `(own bucket, new bucket, images)` per pair that moved images, by own bucket then new
    /// bucket in bucket-list order.
    pub moves: Vec<(Bucket, Bucket, usize)>,
}

/// What the report says about one subset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsetReport {
    /// The subset's folder.
    pub root: PathBuf,
    /// Whether it holds regularisation images.
    pub is_reg: bool,
    /// Repeats per epoch of each image.
    pub num_repeats: usize,
    /// Loaded images of this subset (repeats not counted).
    pub images: usize,
    /// Loaded images per bucket, for buckets with at least one, in bucket-list order.
    pub images_per_bucket: Vec<(Bucket, usize)>,
    /// Of `images`, those epoch 0 trains (as [`Report::images_trained`]).
    pub images_trained: usize,
}

impl Loader {
    /// Images epoch `epoch` trains, in total and per subset: the loaded images (not failed so
    /// far) with a sample in some batch of some rank's plan ([`crate::sampler::trained_samples`]).
    pub fn images_trained(&self, epoch: u64) -> (usize, Vec<usize>) {
        let inner = &*self.inner;
        let trained = inner.trained(epoch);
        let failed = inner.failed();
        let mut image_trained = vec![false; inner.images.len()];
        for (sample, &image) in inner.sample_image.iter().enumerate() {
            image_trained[image] |= trained[sample] && !failed.images.contains(&image);
        }
        let mut per_subset = vec![0; inner.subsets.len()];
        for (image, &t) in image_trained.iter().enumerate() {
            per_subset[inner.subset_of[image]] += usize::from(t);
        }
        (per_subset.iter().sum(), per_subset)
    }

    /// What `min_bucket_fill` merged (computed at construction).
    fn bucket_merges(&self) -> BucketMerges {
        let inner = &*self.inner;
        let moved = &inner.merges;
        if moved.is_empty() {
            return BucketMerges::default();
        }
        let n = moved.len() as f64;
        let mut pairs = BTreeMap::new();
        for m in moved {
            *pairs.entry((m.from, m.to)).or_insert(0) += 1;
        }
        BucketMerges {
            images_moved: moved.len(),
            samples_moved: (moved.iter())
                .map(|m| inner.subsets[inner.subset_of[m.image]].num_repeats)
                .sum(),
            mean_aspect_error: moved.iter().map(|m| m.aspect_error).sum::<f64>() / n,
            max_aspect_error: moved.iter().map(|m| m.aspect_error).fold(0.0, f64::max),
            mean_extra_crop: moved.iter().map(|m| m.extra_crop).sum::<f64>() / n,
            max_extra_crop: moved.iter().map(|m| m.extra_crop).fold(0.0, f64::max),
            moves: (pairs.into_iter())
                .map(|((from, to), k)| (inner.buckets[from], inner.buckets[to], k))
                .collect(),
        }
    }

    /// A snapshot of the report, including samples that failed in any epoch so far.
    pub fn report(&self) -> Report {
        let (images_trained, trained_per_subset) = self.images_trained(0);
        let bucket_merges = self.bucket_merges();
        let inner = &*self.inner;
        let failed = inner.failed();
        let mut skipped = inner.scan_skipped.clone();
        skipped.extend(failed.skips.iter().cloned());
        skipped.sort_by(|a, b| a.path.cmp(&b.path));

        let mut formats = BTreeMap::new();
        let mut per_bucket = vec![0usize; inner.buckets.len()];
        let mut min: Option<(u32, u32)> = None;
        let mut max: Option<(u32, u32)> = None;
        let mut captions_missing = 0;
        let mut captions_fallback_encoding = 0;
        let mut per_subset = vec![vec![0usize; inner.buckets.len()]; inner.subsets.len()];
        let mut samples_per_bucket = vec![0usize; inner.buckets.len()];
        let area = |(w, h): (u32, u32)| u64::from(w) * u64::from(h);
        for (i, e) in inner.images.iter().enumerate() {
            if failed.images.contains(&i) {
                continue;
            }
            *formats
                .entry(e.header.format.name().to_owned())
                .or_insert(0) += 1;
            per_bucket[inner.bucket_of[i]] += 1;
            let k = inner.subset_of[i];
            per_subset[k][inner.bucket_of[i]] += 1;
            samples_per_bucket[inner.bucket_of[i]] += inner.subsets[k].num_repeats;
            let size = e.header.upright_size();
            if min.is_none_or(|m| area(size) < area(m)) {
                min = Some(size);
            }
            if max.is_none_or(|m| area(size) > area(m)) {
                max = Some(size);
            }
            captions_missing += usize::from(!e.caption_found);
            captions_fallback_encoding += usize::from(e.caption_fallback_encoding);
        }
        let non_empty = |counts: Vec<usize>| -> Vec<(Bucket, usize)> {
            inner
                .buckets
                .iter()
                .zip(counts)
                .filter(|(_, n)| *n > 0)
                .map(|(b, n)| (*b, n))
                .collect()
        };
        let global = inner.opts.batch_size * inner.opts.world_size;
        let subsets = inner
            .subsets
            .iter()
            .zip(per_subset)
            .zip(trained_per_subset)
            .map(|((s, counts), images_trained)| SubsetReport {
                images_trained,
                root: s.root.clone(),
                is_reg: s.is_reg,
                num_repeats: s.num_repeats,
                images: counts.iter().sum(),
                images_per_bucket: non_empty(counts),
            })
            .collect();
        Report {
            images_trained,
            bucket_merges,
            samples: samples_per_bucket.iter().sum(),
            small_buckets: non_empty(samples_per_bucket)
                .into_iter()
                .filter(|(_, n)| *n < global)
                .collect(),
            subsets,
            root: inner.root.clone(),
            found: inner.found,
            passed_over: inner.passed_over,
            loaded: inner.found - inner.held_out - skipped.len(),
            held_out: inner.held_out,
            skipped,
            formats,
            min_size: min.unwrap_or((0, 0)),
            max_size: max.unwrap_or((0, 0)),
            captions_missing,
            captions_fallback_encoding,
            images_per_bucket: non_empty(per_bucket),
            warnings: inner.warnings.clone(),
            own_shards: (inner.ownership.as_ref()).map(|o| o.own_shards.clone()),
            io: inner.io.snapshot(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::*;
    use crate::sampler;

    #[test]
    fn report_summarises_the_dataset() {
        let dir = dataset();
        std::fs::write(dir.path().join("broken.png"), b"nope").unwrap();
        let loader = Loader::new(dir.path(), opts()).unwrap();
        let r = loader.report();
        assert_eq!(r.root, dir.path());
        assert_eq!((r.found, r.loaded, r.skipped.len()), (18, 17, 1));
        assert_eq!(r.skipped[0].code, SkipCode::Decode);
        let expected: BTreeMap<String, usize> =
            [("jpeg".to_owned(), 6), ("png".to_owned(), 11)].into();
        assert_eq!(r.formats, expected);
        assert_eq!(r.min_size, (33, 47));
        // 128x128, 256x64 and 64x256 all have 16384 pixels: the first by path wins.
        assert_eq!(r.max_size, (128, 128));
        assert_eq!(r.captions_missing, 8);
        assert_eq!(r.captions_fallback_encoding, 0);
        // The testkit dataset's caption files; nothing else.
        let passed_over = PassedOver {
            caption_files: 9,
            ..PassedOver::default()
        };
        assert_eq!(r.passed_over, passed_over);
        assert_eq!(r.images_per_bucket.iter().map(|x| x.1).sum::<usize>(), 17);
        assert!(r.images_per_bucket.iter().all(|x| x.1 > 0));
        let order: Vec<usize> = r
            .images_per_bucket
            .iter()
            .map(|(b, _)| loader.buckets().iter().position(|x| x == b).unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn changed_and_vanished_files_are_reported() {
        let (dir, _) = colour_dataset(4);
        let loader = Loader::new(
            dir.path(),
            LoaderOptions {
                batch_size: 4,
                ..opts()
            },
        )
        .unwrap();
        let changed = dir.path().join("c01.png");
        write_image(&changed, 10, 10, F::Png);
        let gone = dir.path().join("c02.png");
        std::fs::remove_file(&gone).unwrap();
        let batches = collect(loader.iter_epoch(0, 0));
        // Both failed slots got stand-ins from the two intact images (all four share a bucket).
        let mut paths: Vec<&Path> = batches
            .iter()
            .flat_map(|b| b.samples.iter().map(|s| s.path.as_path()))
            .collect();
        assert_eq!(paths.len(), 4);
        paths.sort();
        paths.dedup();
        assert_eq!(
            paths,
            [dir.path().join("c00.png"), dir.path().join("c03.png")]
        );
        let r = loader.report();
        let codes: Vec<(&Path, SkipCode)> = r
            .skipped
            .iter()
            .map(|s| (s.path.as_path(), s.code))
            .collect();
        assert_eq!(
            codes,
            [
                (changed.as_path(), SkipCode::Changed),
                (gone.as_path(), SkipCode::Io)
            ]
        );
        assert!(
            r.skipped[0].message.contains("49x40"),
            "{}",
            r.skipped[0].message
        );
    }
    #[test]
    fn min_bucket_fill_trains_every_image_of_the_issue_shaped_set() {
        let (dir, o) = issue_shaped_dataset();
        let drop_last = LoaderOptions {
            drop_last: true,
            ..o.clone()
        };
        // Unmerged: 42 buckets of 2 samples, no batch of 4; drop_last trains none of the 84.
        let plain = Loader::new(dir.path(), drop_last.clone()).unwrap();
        let r = plain.report();
        assert_eq!((r.loaded, r.images_per_bucket.len()), (84, 42));
        assert_eq!((r.images_trained, plain.num_batches()), (0, 0));
        assert_eq!(r.small_buckets.len(), 42);
        assert_eq!(r.bucket_merges, BucketMerges::default());
        // Without drop_last all 84 are trained, in 42 half batches.
        let short = Loader::new(dir.path(), o.clone()).unwrap();
        assert_eq!(
            (short.report().images_trained, short.num_batches()),
            (84, 42)
        );

        let list = plain.buckets().to_vec();
        let ln = |b: Bucket| (f64::from(b.width) / f64::from(b.height)).ln();
        for base in [drop_last, o] {
            let fill = LoaderOptions {
                min_bucket_fill: Some(4),
                ..base
            };
            let loader = Loader::new(dir.path(), fill.clone()).unwrap();
            let r = loader.report();
            // Bucket 11 + 2m (all 2 images) fills bucket 12 + 2m: 21 full buckets, 21 batches.
            let pairs: Vec<(Bucket, Bucket, usize)> = (0..21)
                .map(|m| (list[11 + 2 * m], list[12 + 2 * m], 2))
                .collect();
            let m = &r.bucket_merges;
            assert_eq!(m.moves, pairs);
            assert_eq!((m.images_moved, m.samples_moved), (42, 42));
            let errors: Vec<f64> = (0..21)
                .map(|m| ln(list[12 + 2 * m]) - ln(list[11 + 2 * m]))
                .collect();
            let max = errors.iter().copied().fold(0.0, f64::max);
            assert!((m.max_aspect_error - max).abs() < 1e-12);
            let mean = errors.iter().sum::<f64>() / 21.0;
            assert!((m.mean_aspect_error - mean).abs() < 1e-12);
            assert!((m.max_extra_crop - (1.0 - (-max).exp())).abs() < 1e-12);
            assert!(m.max_extra_crop <= 0.10);
            assert!(r.small_buckets.is_empty());
            assert_eq!(r.images_per_bucket.len(), 21);
            assert_eq!((r.images_trained, r.subsets[0].images_trained), (84, 84));
            assert_eq!(loader.num_batches(), 21);
            // Every image exactly once per epoch, in full batches of its target bucket.
            let inner = &loader.inner;
            for epoch in 0..3 {
                let plan = sampler::plan_epoch(
                    &inner.sample_bucket,
                    inner.buckets.len(),
                    &fill.sampling(),
                    epoch,
                );
                let mut seen: Vec<usize> = plan.iter().flat_map(|b| b.indices.clone()).collect();
                assert!(plan.iter().all(|b| b.indices.len() == 4));
                seen.sort_unstable();
                assert_eq!(seen, (0..84).collect::<Vec<_>>());
            }
            // A moved image's sample is placed in its new bucket (its size, crop and SDXL
            // conditioning are that bucket's: the workers place by `sample_bucket`).
            let moved = inner
                .images
                .iter()
                .position(|e| e.path.ends_with("i000.png"))
                .unwrap();
            assert_eq!(inner.buckets[inner.sample_bucket[moved]], list[12]);
            assert_ne!(loader.dataset_digest(), plain.dataset_digest());
        }
        // No room for extra crop: nothing moves.
        let strict = LoaderOptions {
            min_bucket_fill: Some(4),
            max_extra_crop: 0.0,
            ..plain.options().clone()
        };
        let r = Loader::new(dir.path(), strict).unwrap().report();
        assert_eq!((r.bucket_merges.images_moved, r.images_trained), (0, 0));
    }
}
