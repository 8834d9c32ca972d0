//! The loading pipeline: a scanned, bucketed dataset ([`Loader`]) and the worker threads that turn one
//! epoch's plan into ready batches ([`EpochIter`]).
//!
//! Data flow of an epoch: the consumer (the thread calling [`EpochIter::next`]) starts up to
//! `prefetch` batches: for each it allocates the batch's one pixel buffer `[B, 3, H, W]` and queues
//! one job per sample. Worker threads (each with its own [`Decoder`] and [`Transformer`]) take jobs
//! in order — read the file, check its header against the scan, decode, transform — and write the
//! sample straight into its slot of the batch buffer. The worker that finishes a batch's last sample
//! signals the consumer, which yields batches strictly in plan order and then starts the next one,
//! so at most `prefetch` batches are in flight (back-pressure on memory). Every random choice is keyed
//! by (seed, epoch, image index) via [`crate::rng`], so the output does not depend on thread count,
//! prefetch depth or scheduling.
//!
//! The stages of one sample (read, header check, decode, transform) are separate steps of one
//! private function, `load_sample`, timed independently into the epoch's [`LoadStats`]
//! ([`EpochIter::stats`]), with the workers' idle time and the consumer's wait for batches.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use crate::bucket::{assign, Bucket, BucketConfig};
use crate::buffer::BufferPool;
pub use crate::buffer::{BufferSource, PixelBuffer};
use crate::dataset::Subset;
use crate::decode::{self, DecodeOptions, Decoder};
use crate::error::{Error, Result, Skip};
use crate::rng::{self, Stream};
use crate::sampler::{self, BatchPlan, Remainder, Sampling};
use crate::scan::{self, ImageEntry, ScanOptions};
pub use crate::stats::{LoadStats, StatsHandle};
use crate::stats::{Stage, Stopwatch};
use crate::transform::{CropMode, FilterType, OutSlot, OutputDtype, Placement, Transformer};

/// What to do when a sample cannot be loaded while iterating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Record the file in the report (once per file) and load a stand-in in its place (see
    /// [`Loader::iter_epoch`]). Default.
    #[default]
    Skip,
    /// Yield the error from the iterator, then end the epoch.
    Raise,
}

impl FromStr for OnError {
    type Err = Error;

    /// `"skip"` or `"raise"`. Errors: [`Error::InvalidArgument`] naming `on_error`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "skip" => Ok(OnError::Skip),
            "raise" => Ok(OnError::Raise),
            _ => Err(Error::InvalidArgument(format!(
                "on_error must be \"skip\" or \"raise\", got {s:?}"
            ))),
        }
    }
}

/// All options of a [`Loader`]. Sizes are in pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderOptions {
    /// Target side: buckets have about `resolution²` pixels (never more). Default 512.
    pub resolution: u32,
    /// Samples per batch (the last batch of a bucket may be shorter unless `drop_last`). Default 1.
    pub batch_size: usize,
    /// Bucket sides are multiples of this. Default 64.
    pub bucket_step: u32,
    /// Smallest bucket side; `None` = `resolution / 2`.
    pub min_bucket_side: Option<u32>,
    /// Largest bucket side; `None` = `2 * resolution`.
    pub max_bucket_side: Option<u32>,
    /// Never enlarge an image (kohya-ss `bucket_no_upscale`): an image smaller than its bucket gets
    /// the largest step-aligned bucket it covers instead, see [`BucketConfig::no_upscale_bucket`];
    /// one narrower or shorter than `bucket_step` is skipped with code `too_small`. Default false.
    pub no_upscale: bool,
    /// Where the bucket-sized window is cut from the resized image. Default [`CropMode::Center`].
    pub crop: CropMode,
    /// Probability in `[0, 1]` of a horizontal flip per sample. Default 0.
    pub flip_prob: f64,
    /// Shuffle images within buckets and the batch order, per epoch. Default true.
    pub shuffle: bool,
    /// Seed of every random choice (shuffles, crops, flips). Default 0.
    pub seed: u64,
    /// Drop each bucket's last, short batch. Default false.
    pub drop_last: bool,
    /// Worker threads for scanning and loading; 0 = `std::thread::available_parallelism()`. Default 0.
    pub num_threads: usize,
    /// Batches being loaded ahead of the consumer (>= 1; memory is `prefetch` batch buffers). Default 2.
    pub prefetch: usize,
    /// Element type of the pixel buffer. Default [`OutputDtype::F32`].
    pub dtype: OutputDtype,
    /// Resampling filter of the resize. Default [`FilterType::Lanczos3`].
    pub filter: FilterType,
    /// Caption extensions tried in order, each with its leading dot. Default `[".txt", ".caption"]`.
    pub caption_extensions: Vec<String>,
    /// RGB colour transparent pixels are composited onto. Default white `[255, 255, 255]`.
    pub background: [u8; 3],
    /// Failed samples while iterating: skip (and report) or raise. Default [`OnError::Skip`].
    pub on_error: OnError,
    /// Largest accepted image in pixels; larger ones are skipped by the scan. Default 178,956,970.
    pub max_pixels: u64,
    /// This process's data-parallel rank, `< world_size`. Default 0.
    pub rank: usize,
    /// Number of data-parallel ranks sharing each epoch (see [`sampler::plan_epoch`]). Default 1.
    pub world_size: usize,
    /// How a bucket's last global batch is split across ranks. Default [`Remainder::Pad`].
    pub remainder: Remainder,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        let scan = ScanOptions::default();
        let decode = DecodeOptions::default();
        LoaderOptions {
            resolution: 512,
            batch_size: 1,
            bucket_step: 64,
            min_bucket_side: None,
            max_bucket_side: None,
            no_upscale: false,
            crop: CropMode::Center,
            flip_prob: 0.0,
            shuffle: true,
            seed: 0,
            drop_last: false,
            num_threads: 0,
            prefetch: 2,
            dtype: OutputDtype::F32,
            filter: FilterType::default(),
            caption_extensions: scan.caption_extensions,
            background: decode.background,
            on_error: OnError::Skip,
            max_pixels: decode.max_pixels,
            rank: 0,
            world_size: 1,
            remainder: Remainder::Pad,
        }
    }
}

impl LoaderOptions {
    /// Check every option.
    ///
    /// Errors: [`Error::InvalidArgument`] naming the argument: `batch_size` 0, `prefetch` 0,
    /// `flip_prob` outside `[0, 1]` (or NaN), `max_pixels` 0, a caption extension without its leading
    /// dot, and the bucket options as in [`BucketConfig::new`].
    pub fn validate(&self) -> Result<()> {
        self.bucket_config()?;
        if self.batch_size == 0 {
            return Err(Error::InvalidArgument(
                "batch_size must be at least 1, got 0".into(),
            ));
        }
        if self.prefetch == 0 {
            return Err(Error::InvalidArgument(
                "prefetch must be at least 1 batch, got 0".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.flip_prob) {
            return Err(Error::InvalidArgument(format!(
                "flip_prob must be in [0, 1], got {}",
                self.flip_prob
            )));
        }
        if self.world_size == 0 || self.rank >= self.world_size {
            return Err(Error::InvalidArgument(format!(
                "rank must be in [0, world_size) and world_size at least 1, got rank {} of {}",
                self.rank, self.world_size
            )));
        }
        if self.max_pixels == 0 {
            return Err(Error::InvalidArgument(
                "max_pixels must be at least 1, got 0".into(),
            ));
        }
        scan::validate_caption_extensions(&self.caption_extensions)
    }

    fn bucket_config(&self) -> Result<BucketConfig> {
        BucketConfig::new(
            self.resolution,
            self.bucket_step,
            self.min_bucket_side,
            self.max_bucket_side,
        )
    }

    /// The sampler's view of these options.
    pub fn sampling(&self) -> Sampling {
        Sampling {
            batch_size: self.batch_size,
            drop_last: self.drop_last,
            shuffle: self.shuffle,
            seed: self.seed,
            rank: self.rank,
            world_size: self.world_size,
            remainder: self.remainder,
        }
    }

    fn threads(&self) -> usize {
        match self.num_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// Everything about one sample of a batch except its pixels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleMeta {
    /// Index into the loader's image list (subsets in order, each sorted by path).
    pub index: usize,
    /// Index of the image's subset.
    pub subset: usize,
    /// Whether the subset holds regularisation (class) images.
    pub is_reg: bool,
    /// The image file.
    pub path: PathBuf,
    /// Caption text after the subset's caption operations (variant choice, dropout, tag shuffle and
    /// dropout); "" if the image has no caption.
    pub caption: String,
    /// Upright image size as (height, width) in pixels (SDXL `original_size`).
    pub original_size: (u32, u32),
    /// Top-left corner of the crop in the resized image as (top, left) in pixels, flip-aware
    /// (SDXL `crop_top_left`, see [`Placement::crop_top_left`]).
    pub crop_top_left: (u32, u32),
    /// The bucket as (height, width) in pixels (SDXL `target_size`).
    pub target_size: (u32, u32),
}

/// One batch of samples of one bucket.
#[derive(Debug, PartialEq)]
pub struct Batch {
    /// The bucket all samples were resized and cropped to.
    pub bucket: Bucket,
    /// Pixels `[samples.len(), 3, bucket.height, bucket.width]`, in recycled pool memory or in
    /// memory from the epoch's [`BufferSource`].
    pub pixels: PixelBuffer,
    /// Per-sample metadata, in the order of the samples in `pixels`.
    pub samples: Vec<SampleMeta>,
}

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
    /// Loaded images per format name (`"jpeg"`, `"png"`, `"webp"`, from the header); sums to `loaded`.
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

/// A scanned and bucketed dataset; cheap to share (`Send + Sync`), iterate epochs with
/// [`Loader::iter_epoch`] (several iterators may run at once; they share the report).
pub struct Loader {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Loader {
    /// A summary: the image list can have millions of entries.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("root", &self.inner.root)
            .field("images", &self.inner.images.len())
            .field("buckets", &self.inner.buckets.len())
            .field("num_batches", &self.inner.num_batches)
            .field("opts", &self.inner.opts)
            .finish_non_exhaustive()
    }
}

struct Inner {
    opts: LoaderOptions,
    root: PathBuf,
    buckets: Vec<Bucket>,
    images: Vec<ImageEntry>,
    /// Bucket index per image.
    bucket_of: Vec<usize>,
    /// The subsets, in order (captions maps dropped after the scan).
    subsets: Vec<Subset>,
    /// Subset index per image.
    subset_of: Vec<usize>,
    /// Image index per sample: each image once per repeat of its subset, image-major, so without
    /// repeats sample `i` is image `i`. Plans and per-sample randomness are keyed by sample index.
    sample_image: Vec<usize>,
    /// Bucket index per sample.
    sample_bucket: Vec<usize>,
    /// Sample indices per bucket: where a failed sample's stand-in is drawn from.
    bucket_samples: Vec<Vec<usize>>,
    num_batches: usize,
    found: usize,
    scan_skipped: Vec<Skip>,
    failed: Mutex<Failed>,
    /// Recycled batch buffers, sized for the largest batch (`batch_size` samples of the largest
    /// bucket) in the output dtype.
    pool: Arc<BufferPool>,
}

/// Images that failed while iterating, each recorded once whatever the epoch.
#[derive(Default)]
struct Failed {
    images: HashSet<usize>,
    skips: Vec<Skip>,
}

impl Inner {
    fn failed(&self) -> MutexGuard<'_, Failed> {
        // The lock is never held across anything that can panic; recover the data if it was.
        self.failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add a failed image to the report (once per loader, whatever the epoch), as soon as a worker
    /// meets it: other workers then pass it over as a stand-in.
    fn record_failure(&self, index: usize, err: &Error) {
        let mut failed = self.failed();
        if failed.images.insert(index) {
            failed.skips.push(Skip::new(&self.images[index].path, err));
        }
    }
}

impl Loader {
    /// A loader of the one folder `root` (a default [`Subset`]); see [`Loader::from_subsets`].
    ///
    /// Errors: as [`Loader::from_subsets`].
    pub fn new(root: &Path, opts: LoaderOptions) -> Result<Loader> {
        Loader::from_subsets(vec![Subset::new(root)], opts)
    }

    /// Validate `opts` and the subsets, scan each subset's folder (see [`scan::scan`]) and assign
    /// every image to the bucket nearest its upright aspect ratio (see [`assign`]); with
    /// [`LoaderOptions::no_upscale`], to [`BucketConfig::no_upscale_bucket`] instead (those buckets
    /// join the list, and images too small for any bucket are skipped with code `too_small`).
    /// Images are listed subset by subset, each subset sorted by path.
    ///
    /// Errors: [`Error::InvalidArgument`] from [`LoaderOptions::validate`] or [`Subset::validate`],
    /// or for an empty subset list; [`Error::NoImages`] if a subset's folder is not a directory,
    /// holds no image files, or every image file in it was skipped by the scan (the message then
    /// gives the count and the first reason); with [`OnError::Raise`], [`Error::Skipped`] for the
    /// first file the scan skipped; [`Error::Io`] if the scan threads cannot be started.
    pub fn from_subsets(mut subsets: Vec<Subset>, opts: LoaderOptions) -> Result<Loader> {
        opts.validate()?;
        if subsets.is_empty() {
            return Err(Error::InvalidArgument(
                "subsets must hold at least one subset".into(),
            ));
        }
        for subset in &subsets {
            subset.validate()?;
        }
        let bucket_config = opts.bucket_config()?;
        let mut buckets = bucket_config.buckets();
        // Bucket of each image, by value (with no_upscale, not necessarily in `buckets` yet).
        let mut image_bucket = Vec::new();
        let mut images = Vec::new();
        let mut subset_of = Vec::new();
        let mut found = 0;
        let mut scan_skipped = Vec::new();
        for (k, subset) in subsets.iter_mut().enumerate() {
            let mut scanned = scan::scan(
                &subset.root,
                &ScanOptions {
                    caption_extensions: subset
                        .caption_extensions
                        .clone()
                        .unwrap_or_else(|| opts.caption_extensions.clone()),
                    max_pixels: opts.max_pixels,
                    num_threads: opts.num_threads,
                    captions: subset.captions.take(),
                },
            )?;
            let mut kept = Vec::with_capacity(scanned.images.len());
            for entry in std::mem::take(&mut scanned.images) {
                let (w, h) = entry.header.upright_size();
                let bucket = if opts.no_upscale {
                    bucket_config.no_upscale_bucket(&buckets, w, h)
                } else {
                    Some(buckets[assign(&buckets, w, h)])
                };
                match bucket {
                    Some(b) => {
                        image_bucket.push(b);
                        kept.push(entry);
                    }
                    None => scanned.skipped.push(Skip::new(
                        &entry.path,
                        &Error::TooSmall {
                            path: entry.path.clone(),
                            width: w,
                            height: h,
                            step: opts.bucket_step,
                        },
                    )),
                }
            }
            scanned.images = kept;
            scanned.skipped.sort_by(|a, b| a.path.cmp(&b.path));
            if let (OnError::Raise, Some(first)) = (opts.on_error, scanned.skipped.first()) {
                return Err(Error::Skipped(first.clone()));
            }
            if scanned.images.is_empty() {
                return Err(Error::NoImages {
                    path: subset.root.clone(),
                    reason: format!(
                        "all {} image files were skipped; first: {}",
                        scanned.found, scanned.skipped[0].message
                    ),
                });
            }
            found += scanned.found;
            scan_skipped.extend(scanned.skipped);
            subset_of.extend(std::iter::repeat_n(k, scanned.images.len()));
            images.extend(scanned.images);
        }
        scan_skipped.sort_by(|a, b| a.path.cmp(&b.path));
        if opts.no_upscale {
            buckets.extend_from_slice(&image_bucket);
            crate::bucket::sort_by_aspect(&mut buckets);
        }
        let index: std::collections::HashMap<Bucket, usize> =
            buckets.iter().enumerate().map(|(i, b)| (*b, i)).collect();
        let bucket_of: Vec<usize> = image_bucket.iter().map(|b| index[b]).collect();
        let sample_image: Vec<usize> = (0..images.len())
            .flat_map(|i| std::iter::repeat_n(i, subsets[subset_of[i]].num_repeats))
            .collect();
        let sample_bucket: Vec<usize> = sample_image.iter().map(|&i| bucket_of[i]).collect();
        let num_batches = sampler::num_batches(&sample_bucket, buckets.len(), &opts.sampling());
        let mut bucket_samples = vec![Vec::new(); buckets.len()];
        for (sample, &b) in sample_bucket.iter().enumerate() {
            bucket_samples[b].push(sample);
        }
        // Pool allocations fit the largest batch this dataset can make: no more samples than
        // `batch_size` or than its fullest bucket holds, of its largest bucket that has samples.
        let fullest = bucket_samples.iter().map(Vec::len).max().unwrap_or(0);
        let largest = (buckets.iter().zip(&bucket_samples))
            .filter(|(_, samples)| !samples.is_empty())
            .map(|(b, _)| b.width as usize * b.height as usize)
            .max()
            .unwrap_or(0);
        let batch_bytes = [opts.batch_size.min(fullest), 3, largest]
            .into_iter()
            .try_fold(opts.dtype.bytes_per_value(), usize::checked_mul)
            .filter(|&b| isize::try_from(b).is_ok())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "a batch of {} images of up to {largest} pixels is too large to allocate: lower \
                     batch_size or resolution",
                    opts.batch_size.min(fullest)
                ))
            })?;
        // The consumer holds a batch or two while `prefetch` more are loading.
        let pool = BufferPool::new(batch_bytes, opts.prefetch + 2);
        Ok(Loader {
            inner: Arc::new(Inner {
                opts,
                root: subsets[0].root.clone(),
                buckets,
                images,
                bucket_of,
                subsets,
                subset_of,
                sample_image,
                sample_bucket,
                bucket_samples,
                num_batches,
                found,
                scan_skipped,
                failed: Mutex::new(Failed::default()),
                pool,
            }),
        })
    }

    /// The subsets (their `captions` maps are not kept after the scan).
    pub fn subsets(&self) -> &[Subset] {
        &self.inner.subsets
    }

    /// A 64-bit fingerprint of the dataset as scanned: per image its subset, path relative to the
    /// subset folder, format, stored size and orientation, plus each subset's options (not its
    /// folder). Equal on any machine the same files are found on, whatever the absolute paths; used
    /// to check that a saved loader state belongs to this dataset.
    pub fn dataset_digest(&self) -> u64 {
        let inner = &*self.inner;
        let mut h = Fnv::default();
        for s in &inner.subsets {
            h.write(
                format!(
                    "{:?}",
                    Subset {
                        root: PathBuf::new(),
                        ..s.clone()
                    }
                )
                .as_bytes(),
            );
        }
        for (e, &k) in inner.images.iter().zip(&inner.subset_of) {
            let rel = e
                .path
                .strip_prefix(&inner.subsets[k].root)
                .unwrap_or(&e.path);
            h.write(format!("{k}\0{}\0", rel.display()).as_bytes());
            let hd = &e.header;
            h.write(
                format!(
                    "{} {} {} {}\0",
                    hd.format.name(),
                    hd.width,
                    hd.height,
                    hd.orientation
                )
                .as_bytes(),
            );
        }
        h.0
    }

    /// The options this loader was built with.
    pub fn options(&self) -> &LoaderOptions {
        &self.inner.opts
    }

    /// The candidate buckets (also the empty ones), plus with `no_upscale` the images' own smaller
    /// buckets, sorted by aspect ratio; batches refer to these.
    pub fn buckets(&self) -> &[Bucket] {
        &self.inner.buckets
    }

    /// Exact number of batches of every epoch (see [`sampler::num_batches`]). Batches whose samples
    /// all fail with [`OnError::Skip`] are not yielded, so an epoch can yield fewer.
    pub fn num_batches(&self) -> usize {
        self.inner.num_batches
    }

    /// The images the scan accepted, sorted by path ([`SampleMeta::index`] indexes this).
    pub fn images(&self) -> &[ImageEntry] {
        &self.inner.images
    }

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
            loaded: inner.found - skipped.len(),
            skipped,
            formats,
            min_size: min.unwrap_or((0, 0)),
            max_size: max.unwrap_or((0, 0)),
            captions_missing,
            captions_fallback_encoding,
            images_per_bucket: non_empty(per_bucket),
        }
    }

    /// Start loading epoch `epoch` from batch `start_batch` of its plan (0 = the beginning; to resume
    /// after `k` consumed batches pass `k`). Worker threads start at once and the first `prefetch`
    /// batches are queued before this returns.
    ///
    /// The plan is [`sampler::plan_epoch`] over the samples (images times repeats) with this
    /// loader's options (including its rank of `world_size`). If `start_batch` is past the
    /// end of the plan, the iterator yields one [`Error::InvalidArgument`] and ends.
    pub fn iter_epoch(&self, epoch: u64, start_batch: usize) -> EpochIter {
        self.iter_epoch_into(epoch, start_batch, None)
    }

    /// As [`Loader::iter_epoch`], with each batch written into memory from `source` (one call per
    /// batch, in plan order, on the thread that creates or advances the iterator) instead of the
    /// loader's recycled buffers. A source error is yielded in place of the batch and ends the epoch.
    pub fn iter_epoch_into(
        &self,
        epoch: u64,
        start_batch: usize,
        source: Option<Box<dyn BufferSource>>,
    ) -> EpochIter {
        let inner = Arc::clone(&self.inner);
        let o = &inner.opts;
        let plan = sampler::plan_epoch(
            &inner.sample_bucket,
            inner.buckets.len(),
            &o.sampling(),
            epoch,
        );
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<()>();
        let mut it = EpochIter {
            start_error: None,
            next_start: start_batch,
            next_yield: start_batch,
            in_flight: VecDeque::new(),
            jobs: Some(jobs_tx),
            done: done_rx,
            stop: Arc::new(AtomicBool::new(false)),
            workers: Vec::new(),
            plan,
            inner,
            source,
            stats: StatsHandle::start(),
            pid: std::process::id(),
        };
        if start_batch > it.plan.len() {
            it.start_error = Some(Error::InvalidArgument(format!(
                "start_batch must be at most {} (batches in epoch {epoch}), got {start_batch}",
                it.plan.len()
            )));
            return it;
        }
        if start_batch == it.plan.len() {
            // Nothing to load (resumed at the end, or drop_last left no batch): no threads needed.
            return it;
        }
        // More threads than samples that can be in flight would only idle.
        let threads = it
            .inner
            .opts
            .threads()
            .min(
                it.inner
                    .opts
                    .prefetch
                    .saturating_mul(it.inner.opts.batch_size),
            )
            .max(1);
        for i in 0..threads {
            let ctx = WorkerCtx {
                inner: Arc::clone(&it.inner),
                epoch,
                jobs: jobs_rx.clone(),
                done: done_tx.clone(),
                stop: Arc::clone(&it.stop),
                stats: it.stats.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("fastdiff-load-{i}"))
                .spawn(move || worker_loop(ctx));
            match spawned {
                Ok(handle) => {
                    it.workers.push(handle);
                    it.stats.add_thread();
                }
                // Fewer threads only make it slower; with none at all, report why.
                Err(e) if it.workers.is_empty() => {
                    it.start_error = Some(Error::io(
                        &it.inner.root,
                        std::io::Error::other(format!("cannot start loader threads: {e}")),
                    ));
                    return it;
                }
                Err(_) => break,
            }
        }
        while it.in_flight.len() < it.inner.opts.prefetch && it.start_next() {}
        it
    }
}

/// The batches of one epoch, in plan order; see the module docs for how they are produced.
///
/// Yields `Ok(batch)` per batch (batches whose samples all failed with [`OnError::Skip`] are left
/// out) or, with [`OnError::Raise`], `Err` for the first failed sample in plan order and then ends.
/// Ending (normally, by error, or by drop) stops and joins the worker threads; a worker finishes at
/// most its current sample first, so dropping mid-epoch returns within one sample's load time.
pub struct EpochIter {
    inner: Arc<Inner>,
    plan: Vec<BatchPlan>,
    /// Plan position of the next batch to start.
    next_start: usize,
    /// Plan position of the next batch to yield.
    next_yield: usize,
    /// Started batches not yet yielded, in plan order.
    in_flight: VecDeque<Arc<BatchState>>,
    /// `None` once the epoch ended: dropping the sender lets idle workers exit.
    jobs: Option<Sender<Job>>,
    /// One message per completed batch; disconnected when every worker has exited.
    done: Receiver<()>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    /// A reason the epoch could not start (or a batch buffer could not be had), yielded next.
    start_error: Option<Error>,
    /// Where batch memory comes from; `None`: the loader's pool.
    source: Option<Box<dyn BufferSource>>,
    stats: StatsHandle,
    /// The process that started the workers: after a `fork` the child has none of them.
    pid: u32,
}

impl std::fmt::Debug for EpochIter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochIter")
            .field("batches", &self.plan.len())
            .field("remaining", &self.remaining())
            .field("in_flight", &self.in_flight.len())
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

impl EpochIter {
    /// Batches of the plan not yet yielded (counting from `start_batch`; 0 once the iterator ended).
    /// An upper bound when whole batches are skipped.
    pub fn remaining(&self) -> usize {
        if self.jobs.is_none() || self.start_error.is_some() {
            0
        } else {
            self.plan.len() - self.next_yield
        }
    }

    /// Where this epoch's time went so far (final once the iterator has ended); see [`LoadStats`].
    pub fn stats(&self) -> LoadStats {
        self.stats.snapshot()
    }

    /// A handle to this epoch's counters that stays readable after the iterator is dropped.
    pub fn stats_handle(&self) -> StatsHandle {
        self.stats.clone()
    }

    /// Wait up to `timeout` for the next batch to be ready; `true` when [`Iterator::next`] will not
    /// block (the batch is complete, or the epoch is over or failed). Time spent here counts as
    /// queue wait.
    ///
    /// Lets a caller that must stay responsive (Python checking for Ctrl-C between waits) wait in
    /// slices instead of blocking in `next` for a whole slow batch.
    pub fn wait_ready(&self, timeout: std::time::Duration) -> bool {
        let Some(front) = self.in_flight.front() else {
            return true;
        };
        if self.forked() {
            return true; // `next` says why
        }
        let start = std::time::Instant::now();
        let deadline = start + timeout;
        let mut ready = true;
        while front.pending.load(Ordering::Acquire) != 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.done.recv_timeout(left) {
                Ok(()) => {}
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    ready = false;
                    break;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
        }
        self.stats.add_queue_wait(start.elapsed());
        ready
    }

    /// Start the next batch of the plan if there is one; returns whether it did.
    fn start_next(&mut self) -> bool {
        let (Some(plan), Some(jobs)) = (self.plan.get(self.next_start), &self.jobs) else {
            return false;
        };
        let bucket = self.inner.buckets[plan.bucket];
        let per_sample = 3 * bucket.width as usize * bucket.height as usize;
        let n = plan.indices.len();
        let dtype = self.inner.opts.dtype;
        let pixels = match &mut self.source {
            None => PixelBuffer::from_pool(&self.inner.pool, dtype, n * per_sample),
            Some(source) => PixelBuffer::from_source(source.as_mut(), dtype, n * per_sample),
        };
        let pixels = match pixels {
            Ok(p) => p,
            Err(err) => {
                self.start_error = Some(err);
                return false;
            }
        };
        let state = Arc::new(BatchState {
            bucket,
            per_sample,
            dtype,
            base: pixels.as_ptr().cast_mut(),
            pixels: Mutex::new(Some(pixels)),
            outcomes: Mutex::new((0..n).map(|_| None).collect()),
            pending: AtomicUsize::new(n),
        });
        for (slot, &sample) in plan.indices.iter().enumerate() {
            // Workers only exit after the sender is dropped (or on stop), so this cannot fail
            // while `jobs` is Some; a failure would only mean the batch never completes.
            let _ = jobs.send(Job {
                batch: Arc::clone(&state),
                slot,
                sample,
                image: self.inner.sample_image[sample],
            });
        }
        self.in_flight.push_back(state);
        self.next_start += 1;
        true
    }

    /// End the epoch: stop the workers, let idle ones see the closed channel, and join them all.
    fn finish(&mut self) {
        self.stats.end();
        self.stop.store(true, Ordering::Relaxed);
        self.jobs = None;
        self.in_flight.clear();
        if self.forked() {
            // The handles name threads of the parent process: joining (or detaching) them here
            // would wait forever or act on thread ids that mean nothing in this process.
            self.workers.drain(..).for_each(std::mem::forget);
            return;
        }
        for handle in self.workers.drain(..) {
            // A worker panic outside the per-sample guard has already been reported by the
            // panic hook; there is nothing more to do with it here.
            let _ = handle.join();
        }
    }

    /// Whether this is a forked child of the process that started the epoch.
    fn forked(&self) -> bool {
        std::process::id() != self.pid
    }

    /// Turn a completed batch into what the iterator yields: `Ok(None)` if all its samples failed
    /// and were skipped.
    fn assemble(&self, state: &BatchState) -> Result<Option<Batch>> {
        let outcomes =
            std::mem::take(&mut *state.outcomes.lock().unwrap_or_else(|p| p.into_inner()));
        let mut pixels = state
            .pixels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .expect("a completed batch is assembled once");
        let mut samples = Vec::with_capacity(outcomes.len());
        let mut keep = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            match outcome.expect("every slot of a completed batch has an outcome") {
                Ok(meta) => {
                    samples.push(meta);
                    keep.push(true);
                }
                // With `Skip` the worker has recorded the failure in the report.
                Err(err) if self.inner.opts.on_error == OnError::Raise => return Err(err),
                Err(_) => keep.push(false),
            }
        }
        if samples.is_empty() {
            return Ok(None);
        }
        if samples.len() < keep.len() {
            pixels.retain_samples(&keep, state.per_sample);
        }
        Ok(Some(Batch {
            bucket: state.bucket,
            pixels,
            samples,
        }))
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if let Some(err) = self.start_error.take() {
            self.finish();
            return Some(Err(err));
        }
        if self.forked() && self.jobs.is_some() {
            self.finish();
            return Some(Err(Error::InvalidArgument(
                "this epoch was started in another process: after a fork its worker threads do not \
                 exist here; start a new epoch (iterate the loader again) in this process"
                    .into(),
            )));
        }
        loop {
            let Some(front) = self.in_flight.front().cloned() else {
                // Nothing in flight and nothing left to start: the epoch is over.
                self.finish();
                return None;
            };
            let waiting = std::time::Instant::now();
            while front.pending.load(Ordering::Acquire) != 0 {
                if self.done.recv().is_err() {
                    self.finish();
                    return Some(Err(Error::Panic {
                        path: self.inner.root.clone(),
                        message: "every loader thread exited before the epoch was complete".into(),
                    }));
                }
            }
            self.stats.add_queue_wait(waiting.elapsed());
            self.in_flight.pop_front();
            self.next_yield += 1;
            // Keep `prefetch` batches in flight: this one is consumed, so start the next.
            self.start_next();
            match self.assemble(&front) {
                Ok(Some(batch)) => {
                    self.stats.add_batch();
                    return Some(Ok(batch));
                }
                Ok(None) => continue,
                Err(err) => {
                    self.finish();
                    return Some(Err(err));
                }
            }
        }
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Shared state of one batch being loaded.
struct BatchState {
    bucket: Bucket,
    /// Values per sample: `3 * height * width`.
    per_sample: usize,
    dtype: OutputDtype,
    /// Start of `pixels`' memory; workers write their slots through it.
    base: *mut u8,
    /// Owner of the buffer; taken by the consumer once `pending` is 0.
    pixels: Mutex<Option<PixelBuffer>>,
    /// Per slot: the sample's metadata, or its image index and error.
    outcomes: Mutex<Vec<Option<SampleOutcome>>>,
    /// Slots not finished yet.
    pending: AtomicUsize,
}

/// What became of one slot: the sample loaded into it (possibly a stand-in), or the error of the
/// last failed attempt.
type SampleOutcome = Result<SampleMeta>;

// SAFETY: `base` points into the memory owned or borrowed by `pixels`, which lives as long as the
// `BatchState` (moving the buffer into the Mutex does not move that memory). It is only used through
// `slot_mut`, whose contract gives each slot to one thread at a time and keeps the buffer otherwise
// untouched until `pending` reaches 0; every other field is Sync on its own.
unsafe impl Send for BatchState {}
// SAFETY: as for Send.
unsafe impl Sync for BatchState {}

impl BatchState {
    /// The output slot of sample `slot`: values `[slot * per_sample, (slot + 1) * per_sample)`.
    ///
    /// # Safety
    /// `slot` must be < the batch's sample count; at most one `OutSlot` per slot may exist at a time;
    /// and the buffer must not be taken from `pixels` while it exists. The pipeline guarantees this by
    /// sending one job per slot and taking the buffer only after every job has called `finish`.
    unsafe fn slot_mut(&self, slot: usize) -> OutSlot<'_> {
        let start = slot * self.per_sample;
        let n = self.per_sample;
        // SAFETY: the range lies inside the buffer (slot < sample count) and is disjoint from every
        // other slot's, per this function's contract; `base` is aligned to `buffer::ALIGN`, and
        // slot offsets are multiples of the value size.
        unsafe {
            match self.dtype {
                OutputDtype::U8 => {
                    OutSlot::U8(std::slice::from_raw_parts_mut(self.base.add(start), n))
                }
                OutputDtype::F32 => OutSlot::F32(std::slice::from_raw_parts_mut(
                    self.base.cast::<f32>().add(start),
                    n,
                )),
                OutputDtype::F16 => OutSlot::F16(std::slice::from_raw_parts_mut(
                    self.base.cast::<u16>().add(start),
                    n,
                )),
                OutputDtype::BF16 => OutSlot::BF16(std::slice::from_raw_parts_mut(
                    self.base.cast::<u16>().add(start),
                    n,
                )),
            }
        }
    }

    /// Record the outcome of `slot`; returns true for the batch's last slot.
    fn finish(&self, slot: usize, outcome: SampleOutcome) -> bool {
        self.outcomes.lock().unwrap_or_else(|p| p.into_inner())[slot] = Some(outcome);
        // AcqRel: the consumer's Acquire load of 0 then sees every slot's pixels and outcome.
        self.pending.fetch_sub(1, Ordering::AcqRel) == 1
    }
}

/// One sample to load: sample `sample` (image `image`) into slot `slot` of `batch`.
struct Job {
    batch: Arc<BatchState>,
    slot: usize,
    sample: usize,
    image: usize,
}

struct WorkerCtx {
    inner: Arc<Inner>,
    epoch: u64,
    jobs: Receiver<Job>,
    done: Sender<()>,
    stop: Arc<AtomicBool>,
    stats: StatsHandle,
}

/// Per-thread decoder and resizer, created on the first job.
struct Tools {
    decoder: Decoder,
    transformer: Transformer,
}

fn worker_loop(ctx: WorkerCtx) {
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
        if ctx.stop.load(Ordering::Relaxed) {
            // The epoch is being dropped: nobody will see this slot, so end the search here.
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
        .chain((0..n).map(move |i| (start + i) % n))
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

/// Load one sample into its slot: read, check the header against the scan, decode (DCT-downscaled
/// where the format allows, to no less than the resized size), resize + crop + flip + layout.
/// `watch` gets each stage's time.
fn load_sample(
    inner: &Inner,
    epoch: u64,
    job: &Job,
    entry: &ImageEntry,
    tools: &mut Option<Tools>,
    watch: &mut Stopwatch,
) -> Result<SampleMeta> {
    let o = &inner.opts;
    let path = &entry.path;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
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

    let bucket = job.batch.bucket;
    // Keyed by sample, not image: each repeat of an image gets its own crop, flip and caption.
    let index = job.sample as u64;
    let subset_index = inner.subset_of[job.image];
    let subset = &inner.subsets[subset_index];
    let flip =
        rng::uniform(o.seed, epoch, Stream::Flip, index) < subset.flip_prob.unwrap_or(o.flip_prob);
    let upright = was.upright_size();
    let placement = Placement::new(
        upright,
        (bucket.width, bucket.height),
        subset.crop.unwrap_or(o.crop),
        rng::uniform(o.seed, epoch, Stream::CropX, index),
        rng::uniform(o.seed, epoch, Stream::CropY, index),
        flip,
    );

    let tools = match tools {
        Some(t) => t,
        None => tools.insert(Tools {
            decoder: Decoder::new()?,
            transformer: Transformer::new(o.filter),
        }),
    };
    let decode_opts = DecodeOptions {
        background: o.background,
        max_pixels: o.max_pixels,
    };
    watch.skip();
    let img = tools.decoder.decode(
        &bytes,
        path,
        was.orientation,
        placement.resized,
        &decode_opts,
    )?;
    watch.lap(Stage::Decode);
    // SAFETY: this job is the only one for (batch, slot), and the consumer takes the buffer only
    // after `finish` has been called for every slot, which happens after this borrow ends.
    let out = unsafe { job.batch.slot_mut(job.slot) };
    tools
        .transformer
        .apply(&img, &placement, (bucket.width, bucket.height), out)?;
    watch.lap(Stage::Write);
    let resize = tools.transformer.take_resize_time();
    watch.move_time(Stage::Write, Stage::Resize, resize);

    Ok(SampleMeta {
        index: job.image,
        subset: subset_index,
        is_reg: subset.is_reg,
        path: path.clone(),
        caption: subset.caption.apply(&entry.caption, o.seed, epoch, index),
        original_size: (upright.1, upright.0),
        crop_top_left: placement.crop_top_left(),
        target_size: (bucket.height, bucket.width),
    })
}

/// FNV-1a, 64 bit: a hash that is the same on every machine and Rust version (std's is not).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caption::CaptionOptions;
    use crate::scan::tests::{write_image, write_image_with};
    use image::ImageFormat as F;
    use std::time::{Duration, Instant};

    /// Small buckets keep the tests fast: resolution 64, step 16 → sides 32..=128.
    fn opts() -> LoaderOptions {
        LoaderOptions {
            resolution: 64,
            bucket_step: 16,
            batch_size: 3,
            num_threads: 2,
            ..LoaderOptions::default()
        }
    }

    /// 17 gradient images of assorted shapes and formats, some with captions.
    fn dataset() -> tempfile::TempDir {
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

    fn collect(it: EpochIter) -> Vec<Batch> {
        it.map(|b| b.unwrap()).collect()
    }

    fn values_per_sample(b: &Bucket) -> usize {
        3 * b.width as usize * b.height as usize
    }

    #[test]
    fn one_epoch_covers_every_image_once_with_bucket_shapes() {
        let dir = dataset();
        let loader = Loader::new(dir.path(), opts()).unwrap();
        let n = loader.images().len();
        assert_eq!(n, 17);
        let debug = format!("{loader:?}");
        assert!(
            debug.contains("images: 17") && debug.len() < 1000,
            "{debug}"
        );
        let batches = collect(loader.iter_epoch(0, 0));
        assert_eq!(batches.len(), loader.num_batches());
        let mut seen = vec![0; n];
        for b in &batches {
            assert!((1..=3).contains(&b.samples.len()));
            assert!(loader.buckets().contains(&b.bucket));
            assert_eq!(
                b.pixels.len(),
                b.samples.len() * values_per_sample(&b.bucket)
            );
            assert_eq!(b.pixels.dtype(), OutputDtype::F32);
            for s in &b.samples {
                seen[s.index] += 1;
                let e = &loader.images()[s.index];
                assert_eq!(s.path, e.path);
                assert_eq!(s.caption, e.caption);
                let (w, h) = e.header.upright_size();
                assert_eq!(s.original_size, (h, w));
                assert_eq!(s.target_size, (b.bucket.height, b.bucket.width));
                assert_eq!(b.bucket, loader.buckets()[assign(loader.buckets(), w, h)]);
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "{seen:?}");
        let captioned = batches
            .iter()
            .flat_map(|b| &b.samples)
            .find(|s| s.path.ends_with("img04.png"))
            .unwrap();
        assert_eq!(captioned.caption, "caption 4");
    }

    #[test]
    fn output_is_independent_of_threads_and_prefetch() {
        let dir = dataset();
        let run = |num_threads, prefetch| {
            let o = LoaderOptions {
                num_threads,
                prefetch,
                crop: CropMode::Random,
                flip_prob: 0.5,
                seed: 11,
                ..opts()
            };
            collect(Loader::new(dir.path(), o).unwrap().iter_epoch(3, 0))
        };
        let reference = run(1, 1);
        assert_eq!(reference, run(2, 1));
        assert_eq!(reference, run(4, 1));
        assert_eq!(reference, run(2, 4));
        assert_eq!(reference, run(4, 4));
        // The random crop and flip were really exercised.
        let samples: Vec<&SampleMeta> = reference.iter().flat_map(|b| &b.samples).collect();
        assert!(samples.iter().any(|s| s.crop_top_left != (0, 0)));
    }

    #[test]
    fn dropped_batches_are_recycled() {
        let dir = dataset();
        let loader = Loader::new(dir.path(), opts()).unwrap();
        let mut addresses = HashSet::new();
        let mut batches = 0;
        for b in loader.iter_epoch(0, 0) {
            // Each batch is dropped before the next is taken, as a training loop does.
            addresses.insert(b.unwrap().pixels.as_ptr() as usize);
            batches += 1;
        }
        assert!(batches > 4, "{batches}");
        // prefetch (2) in flight + the one being consumed + one recycling: at most 4 allocations.
        assert!(
            addresses.len() <= 4,
            "{} allocations for {batches} batches",
            addresses.len()
        );
        assert!(loader.inner.pool.free_count() > 0);
    }

    /// Hands out 64-byte-aligned heap memory and counts the calls.
    struct CountingSource(Arc<AtomicUsize>);

    struct Aligned(*mut u8, std::alloc::Layout);

    // SAFETY: the allocation is exclusively owned.
    unsafe impl Send for Aligned {}

    impl Drop for Aligned {
        fn drop(&mut self) {
            // SAFETY: allocated in `CountingSource::buffer` with this layout.
            unsafe { std::alloc::dealloc(self.0, self.1) }
        }
    }

    // SAFETY: each call returns a fresh allocation of at least `bytes` bytes, owned by the `Aligned`.
    unsafe impl BufferSource for CountingSource {
        fn buffer(
            &mut self,
            bytes: usize,
        ) -> Result<(std::ptr::NonNull<u8>, Box<dyn std::any::Any + Send>)> {
            if self.0.fetch_add(1, Ordering::Relaxed) == 3 {
                return Err(Error::InvalidArgument("out of pinned memory".into()));
            }
            let layout = std::alloc::Layout::from_size_align(bytes.max(1), 64).unwrap();
            // SAFETY: non-zero size.
            let p = unsafe { std::alloc::alloc(layout) };
            let ptr = std::ptr::NonNull::new(p).unwrap();
            Ok((ptr, Box::new(Aligned(p, layout))))
        }
    }

    #[test]
    fn a_buffer_source_gets_the_same_pixels_and_its_errors_end_the_epoch() {
        let dir = dataset();
        let o = LoaderOptions {
            prefetch: 1,
            ..opts()
        };
        let loader = Loader::new(dir.path(), o).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let source = Box::new(CountingSource(Arc::clone(&calls)));
        let mut it = loader.iter_epoch_into(0, 0, Some(source));
        let reference = collect(loader.iter_epoch(0, 0));
        for want in &reference[..3] {
            let got = it.next().unwrap().unwrap();
            assert_eq!(&got, want);
            let owner = got
                .pixels
                .into_owner()
                .expect("source memory comes back with its owner");
            assert!(owner.downcast::<Aligned>().is_ok());
        }
        // The fourth call failed: its error comes next and ends the epoch.
        let err = it.next().unwrap().unwrap_err();
        assert!(err.to_string().contains("out of pinned memory"), "{err}");
        assert!(it.next().is_none());
        assert_eq!(calls.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn batches_come_in_plan_order_and_epochs_differ() {
        let dir = dataset();
        let loader = Loader::new(
            dir.path(),
            LoaderOptions {
                num_threads: 4,
                ..opts()
            },
        )
        .unwrap();
        let indices = |batches: &[Batch]| -> Vec<Vec<usize>> {
            batches
                .iter()
                .map(|b| b.samples.iter().map(|s| s.index).collect())
                .collect()
        };
        let inner = &loader.inner;
        for epoch in [0, 1] {
            let plan = sampler::plan_epoch(
                &inner.bucket_of,
                inner.buckets.len(),
                &Sampling::single(3, false, true, 0),
                epoch,
            );
            let got = collect(loader.iter_epoch(epoch, 0));
            assert_eq!(
                indices(&got),
                plan.iter().map(|p| p.indices.clone()).collect::<Vec<_>>()
            );
        }
        let e0 = indices(&collect(loader.iter_epoch(0, 0)));
        let e1 = indices(&collect(loader.iter_epoch(1, 0)));
        assert_ne!(e0, e1);

        // Without shuffling: buckets in list order, sorted paths inside each bucket.
        let plain = Loader::new(
            dir.path(),
            LoaderOptions {
                shuffle: false,
                ..opts()
            },
        )
        .unwrap();
        let flat: Vec<(usize, PathBuf)> = collect(plain.iter_epoch(5, 0))
            .iter()
            .flat_map(|b| {
                let k = plain.buckets().iter().position(|x| *x == b.bucket).unwrap();
                b.samples.iter().map(move |s| (k, s.path.clone()))
            })
            .collect();
        let mut sorted = flat.clone();
        sorted.sort();
        assert_eq!(flat, sorted);
    }

    #[test]
    fn resume_from_start_batch_gives_the_tail() {
        let dir = dataset();
        let loader = Loader::new(dir.path(), opts()).unwrap();
        let all = collect(loader.iter_epoch(2, 0));
        let k = 3;
        let mut it = loader.iter_epoch(2, k);
        assert_eq!(it.remaining(), all.len() - k);
        let first = it.next().unwrap().unwrap();
        assert_eq!(it.remaining(), all.len() - k - 1);
        let mut tail = vec![first];
        tail.extend(it.map(|b| b.unwrap()));
        assert_eq!(tail, all[k..]);

        assert!(collect(loader.iter_epoch(2, all.len())).is_empty());
        let mut past = loader.iter_epoch(2, all.len() + 1);
        assert_eq!(past.remaining(), 0);
        let err = past.next().unwrap().unwrap_err();
        assert!(err.to_string().contains("start_batch"), "{err}");
        assert!(past.next().is_none());
    }

    /// Solid-colour PNGs, one colour per image, plus what each file's colour is.
    fn colour_dataset(n: u32) -> (tempfile::TempDir, Vec<(PathBuf, [u8; 3])>) {
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
    fn assert_solid_u8(batch: &Batch, s: usize, c: [u8; 3]) {
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

    /// A PNG whose header is intact but whose pixel data is cut off: passes the scan, fails to decode.
    /// A `w` x `h` PNG cut in half: its header scans, its pixel data does not decode.
    fn write_truncated_png(path: &Path, w: u32, h: u32) {
        write_image(path, w, h, F::Png);
        let bytes = std::fs::read(path).unwrap();
        std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
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
            assert_eq!(r.skipped[0].code, "decode");
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
    fn raise_yields_the_error_then_ends() {
        let (dir, _) = colour_dataset(5);
        let bad = dir.path().join("c00b.png");
        write_truncated_png(&bad, 40, 40);
        let o = LoaderOptions {
            batch_size: 2,
            shuffle: false,
            on_error: OnError::Raise,
            ..opts()
        };
        let loader = Loader::new(dir.path(), o).unwrap();
        let mut it = loader.iter_epoch(0, 0);
        let mut ok = 0;
        let err = loop {
            match it.next().expect("the error comes before the end") {
                Ok(_) => ok += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(err.code(), "decode");
        assert_eq!(err.path(), Some(bad.as_path()));
        assert!(it.next().is_none());
        assert_eq!(it.remaining(), 0);
        // c00b sorts second; every earlier batch came out first.
        let bad_batch = collect_plan_position(&loader, &bad);
        assert_eq!(ok, bad_batch);
        // Raise does not record skips.
        assert!(loader.report().skipped.is_empty());
    }

    fn collect_plan_position(loader: &Loader, path: &Path) -> usize {
        let inner = &loader.inner;
        let o = &inner.opts;
        let index = inner.images.iter().position(|e| e.path == path).unwrap();
        sampler::plan_epoch(&inner.bucket_of, inner.buckets.len(), &o.sampling(), 0)
            .iter()
            .position(|p| p.indices.contains(&index))
            .unwrap()
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
        let codes: Vec<(&Path, &str)> = r
            .skipped
            .iter()
            .map(|s| (s.path.as_path(), s.code))
            .collect();
        assert_eq!(
            codes,
            [(changed.as_path(), "changed"), (gone.as_path(), "io")]
        );
        assert!(
            r.skipped[0].message.contains("49x40"),
            "{}",
            r.skipped[0].message
        );
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
    fn dropping_mid_epoch_is_prompt_and_joins_the_threads() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..40 {
            write_image(&dir.path().join(format!("{i:02}.jpg")), 600, 400, F::Jpeg);
        }
        let o = LoaderOptions {
            resolution: 256,
            batch_size: 4,
            prefetch: 4,
            num_threads: 4,
            ..LoaderOptions::default()
        };
        let loader = Loader::new(dir.path(), o).unwrap();
        let mut it = loader.iter_epoch(0, 0);
        assert!(it.next().unwrap().is_ok());
        assert!(
            Arc::strong_count(&loader.inner) > 2,
            "workers hold the loader"
        );
        let t = Instant::now();
        drop(it);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        // Every worker's context is gone: the threads have exited and been joined.
        assert_eq!(Arc::strong_count(&loader.inner), 1);

        // Dropping before the first batch is consumed is just as prompt.
        let it = loader.iter_epoch(1, 0);
        let t = Instant::now();
        drop(it);
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(Arc::strong_count(&loader.inner), 1);
    }

    #[test]
    fn report_summarises_the_dataset() {
        let dir = dataset();
        std::fs::write(dir.path().join("broken.png"), b"nope").unwrap();
        let loader = Loader::new(dir.path(), opts()).unwrap();
        let r = loader.report();
        assert_eq!(r.root, dir.path());
        assert_eq!((r.found, r.loaded, r.skipped.len()), (18, 17, 1));
        assert_eq!(r.skipped[0].code, "decode");
        let expected: BTreeMap<String, usize> =
            [("jpeg".to_owned(), 6), ("png".to_owned(), 11)].into();
        assert_eq!(r.formats, expected);
        assert_eq!(r.min_size, (33, 47));
        // 128x128, 256x64 and 64x256 all have 16384 pixels: the first by path wins.
        assert_eq!(r.max_size, (128, 128));
        assert_eq!(r.captions_missing, 8);
        assert_eq!(r.captions_fallback_encoding, 0);
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
    fn loader_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), b"nope").unwrap();
        std::fs::write(dir.path().join("b.jpg"), b"\xFF\xD8\xFF").unwrap();
        let err = Loader::new(dir.path(), opts()).unwrap_err();
        assert_eq!(err.code(), "no_images");
        assert!(
            err.to_string().contains("all 2 image files were skipped"),
            "{err}"
        );
        assert!(err.to_string().contains("a.png"), "{err}");

        let bad = |o: LoaderOptions, name: &str| {
            let err = Loader::new(dir.path(), o).unwrap_err();
            assert_eq!(err.code(), "invalid_argument");
            assert!(err.to_string().contains(name), "{err}");
        };
        bad(
            LoaderOptions {
                batch_size: 0,
                ..opts()
            },
            "batch_size",
        );
        bad(
            LoaderOptions {
                prefetch: 0,
                ..opts()
            },
            "prefetch",
        );
        bad(
            LoaderOptions {
                flip_prob: 1.5,
                ..opts()
            },
            "flip_prob",
        );
        bad(
            LoaderOptions {
                flip_prob: f64::NAN,
                ..opts()
            },
            "flip_prob",
        );
        bad(
            LoaderOptions {
                max_pixels: 0,
                ..opts()
            },
            "max_pixels",
        );
        bad(
            LoaderOptions {
                bucket_step: 0,
                ..opts()
            },
            "bucket_step",
        );
        bad(
            LoaderOptions {
                resolution: 0,
                ..opts()
            },
            "resolution",
        );
        bad(
            LoaderOptions {
                min_bucket_side: Some(1000),
                ..opts()
            },
            "min_bucket_side",
        );
        bad(
            LoaderOptions {
                caption_extensions: vec!["txt".into()],
                ..opts()
            },
            "caption_extensions",
        );
        assert_eq!(LoaderOptions::default().validate().ok(), Some(()));
    }

    #[test]
    fn panics_become_errors_naming_the_file() {
        let path = Path::new("/data/x.png");
        let err = guarded(path, || -> Result<()> { panic!("boom {}", 7) }).unwrap_err();
        assert_eq!(err.code(), "panic");
        assert_eq!(err.path(), Some(path));
        assert!(err.to_string().contains("boom 7"), "{err}");
        let err = guarded(path, || -> Result<()> { panic!("static") }).unwrap_err();
        assert!(err.to_string().contains("static"), "{err}");
        let err = guarded(path, || -> Result<()> { std::panic::panic_any(42) }).unwrap_err();
        assert!(err.to_string().contains("non-string"), "{err}");
        assert_eq!(guarded(path, || Ok(5)).unwrap(), 5);
    }

    #[test]
    fn on_error_parses() {
        assert_eq!("skip".parse::<OnError>().unwrap(), OnError::Skip);
        assert_eq!("raise".parse::<OnError>().unwrap(), OnError::Raise);
        let err = "Raise".parse::<OnError>().unwrap_err();
        assert!(err.to_string().contains("on_error"), "{err}");
    }

    #[test]
    fn subsets_repeat_carry_their_flag_and_options_and_are_reported() {
        let (train, _) = colour_dataset(3);
        let (reg, _) = colour_dataset(2);
        for i in 0..3 {
            std::fs::write(train.path().join(format!("c{i:02}.txt")), "sks, a, b, c").unwrap();
        }
        let subsets = vec![
            Subset {
                num_repeats: 4,
                flip_prob: Some(1.0),
                caption: CaptionOptions {
                    keep_tokens: 1,
                    shuffle_caption: true,
                    ..CaptionOptions::default()
                },
                ..Subset::new(train.path())
            },
            Subset {
                is_reg: true,
                ..Subset::new(reg.path())
            },
        ];
        let o = LoaderOptions {
            batch_size: 2,
            ..opts()
        };
        let loader = Loader::from_subsets(subsets, o.clone()).unwrap();
        assert_eq!(loader.images().len(), 5);
        let r = loader.report();
        assert_eq!((r.loaded, r.samples), (5, 3 * 4 + 2));
        let per: Vec<(usize, usize, bool)> = r
            .subsets
            .iter()
            .map(|s| (s.images, s.num_repeats, s.is_reg))
            .collect();
        assert_eq!(per, [(3, 4, false), (2, 1, true)]);
        let mut uses = vec![0; 5];
        let mut orders = HashSet::new();
        for b in collect(loader.iter_epoch(0, 0)) {
            for s in &b.samples {
                uses[s.index] += 1;
                assert_eq!(s.is_reg, s.subset == 1);
                assert_eq!(s.is_reg, s.path.starts_with(reg.path()));
                if s.subset == 0 {
                    assert!(s.caption.starts_with("sks, "), "{}", s.caption);
                    orders.insert(s.caption.clone());
                } else {
                    assert_eq!(s.caption, "");
                }
            }
        }
        assert_eq!(uses, [4, 4, 4, 1, 1]);
        assert!(
            orders.len() > 1,
            "repeats get their own tag order: {orders:?}"
        );

        // The digest ignores where the folders are but not what they hold or the subset options.
        let digest = loader.dataset_digest();
        let again = Loader::from_subsets(loader.subsets().to_vec(), o.clone()).unwrap();
        assert_eq!(again.dataset_digest(), digest);
        let one = Loader::new(train.path(), o.clone()).unwrap();
        assert_ne!(one.dataset_digest(), digest);
        let moved = tempfile::tempdir().unwrap();
        for e in one.images() {
            std::fs::copy(&e.path, moved.path().join(e.path.file_name().unwrap())).unwrap();
        }
        assert_eq!(
            Loader::new(moved.path(), o).unwrap().dataset_digest(),
            one.dataset_digest()
        );
    }

    #[test]
    fn ranks_share_steps_and_buckets_and_split_the_samples() {
        let dir = dataset();
        let run = |rank| {
            let o = LoaderOptions {
                rank,
                world_size: 2,
                remainder: Remainder::Drop,
                ..opts()
            };
            let loader = Loader::new(dir.path(), o).unwrap();
            (loader.num_batches(), collect(loader.iter_epoch(2, 0)))
        };
        let (n0, b0) = run(0);
        let (n1, b1) = run(1);
        assert_eq!((n0, b0.len()), (n1, b1.len()));
        let mut seen = HashSet::new();
        for (x, y) in b0.iter().zip(&b1) {
            assert_eq!(x.bucket, y.bucket);
            assert_eq!(x.samples.len(), y.samples.len());
            for s in x.samples.iter().chain(&y.samples) {
                assert!(seen.insert(s.index), "sample {} twice", s.index);
            }
        }
        let bad = Loader::new(
            dir.path(),
            LoaderOptions {
                rank: 2,
                world_size: 2,
                ..opts()
            },
        )
        .unwrap_err();
        assert!(bad.to_string().contains("rank"), "{bad}");
    }

    #[test]
    fn no_upscale_never_enlarges_and_skips_images_smaller_than_a_step() {
        let dir = tempfile::tempdir().unwrap();
        // Resolution 64, step 16: the usual buckets have sides 32..=128.
        for (name, w, h) in [
            ("big.png", 300, 290),
            ("small.png", 40, 50),
            ("thin.png", 8, 100),
            ("wide.png", 200, 20),
        ] {
            write_image(&dir.path().join(name), w, h, F::Png);
        }
        let loader = Loader::new(
            dir.path(),
            LoaderOptions {
                no_upscale: true,
                ..opts()
            },
        )
        .unwrap();
        let report = loader.report();
        assert_eq!((report.found, report.loaded), (4, 3));
        assert_eq!(report.skipped.len(), 1);
        let skip = &report.skipped[0];
        assert_eq!(skip.code, "too_small");
        assert!(skip.message.contains("thin.png") && skip.message.contains("8x100"));
        let mut got: Vec<(String, (u32, u32))> = collect(loader.iter_epoch(0, 0))
            .into_iter()
            .flat_map(|b| b.samples)
            .map(|s| {
                let name = s.path.file_name().unwrap().to_string_lossy().into_owned();
                (name, s.target_size)
            })
            .collect();
        got.sort();
        // (h, w): big covers its usual square bucket; small and wide round down to whole steps
        // (wide is under min_side 32 high and capped at max_side 128, so not in the usual list).
        assert_eq!(
            got,
            [
                ("big.png".into(), (64, 64)),
                ("small.png".into(), (48, 32)),
                ("wide.png".into(), (16, 128)),
            ]
        );
        assert!(loader.buckets().contains(&Bucket {
            width: 128,
            height: 16
        }));
        let strict = Loader::new(
            dir.path(),
            LoaderOptions {
                no_upscale: true,
                on_error: OnError::Raise,
                ..opts()
            },
        )
        .unwrap_err();
        assert_eq!(strict.code(), "too_small");
    }

    #[test]
    fn loader_is_send_sync_and_iterator_is_send() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<Loader>();
        send::<EpochIter>();
    }
}
