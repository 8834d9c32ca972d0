//! The [`Report`] of a [`Loader`](super::Loader): what the scan found (formats, sizes, captions,
//! buckets, subsets) and every file skipped, by the scan or while iterating, with its reason.
//!
//! A snapshot computed on request from the loader's state; it must not change that state.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::loader::Loader;
use crate::bucket::Bucket;
use crate::error::Skip;
use crate::scan::PassedOver;

/// Summary of the dataset: what the scan found and what failed since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The dataset folder as given (the first subset's).
    pub root: PathBuf,
    /// Candidate image files found by the scan (all subsets).
    pub found: usize,
    /// Images usable so far: `found - skipped.len()`.
    pub loaded: usize,
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
    /// Per subset, in order.
    pub subsets: Vec<SubsetReport>,
    /// The scan's warnings: problems that lost no image (a shard's stale index, ignored).
    pub warnings: Vec<String>,
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
}

impl Loader {
    /// A snapshot of the report, including samples that failed in any epoch so far.
    /// A snapshot of the report, including samples that failed in any epoch so far.
    pub fn report(&self) -> Report {
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
            .map(|(s, counts)| SubsetReport {
                root: s.root.clone(),
                is_reg: s.is_reg,
                num_repeats: s.num_repeats,
                images: counts.iter().sum(),
                images_per_bucket: non_empty(counts),
            })
            .collect();
        Report {
            samples: samples_per_bucket.iter().sum(),
            small_buckets: non_empty(samples_per_bucket)
                .into_iter()
                .filter(|(_, n)| *n < global)
                .collect(),
            subsets,
            root: inner.root.clone(),
            found: inner.found,
            passed_over: inner.passed_over,
            loaded: inner.found - skipped.len(),
            skipped,
            formats,
            min_size: min.unwrap_or((0, 0)),
            max_size: max.unwrap_or((0, 0)),
            captions_missing,
            captions_fallback_encoding,
            images_per_bucket: non_empty(per_bucket),
            warnings: inner.warnings.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::*;

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
}
