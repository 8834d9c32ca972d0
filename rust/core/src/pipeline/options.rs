//! Every option of a [`Loader`](super::Loader), with its default and its one validation.
//!
//! Plain data: nothing here touches a file or a thread. A range check belongs in
//! [`LoaderOptions::validate`] (or the type it delegates to), never at the place an option is used.

use std::path::PathBuf;
use std::str::FromStr;

use crate::bucket::BucketConfig;
use crate::decode::DecodeOptions;
use crate::error::{Error, Result};
use crate::sampler::{Remainder, Sampling};
use crate::scan::{self, ScanOptions};
use crate::transform::{CropMode, FilterType, OutputDtype};

use super::views::ViewOptions;

/// What to do when a sample cannot be loaded while iterating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
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

/// How several ranks split a dataset of tar shards (see [`crate::sampler::plan_owned`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ShardSplit {
    /// Whole shards per rank when every shard has a current index and at least `world_size`
    /// shards hold images, else sample-level with a warning saying why. Default.
    #[default]
    Auto,
    /// Always sample-level: every rank takes its slice of every global batch (and reads every shard).
    Sample,
}

impl FromStr for ShardSplit {
    type Err = Error;

    /// `"auto"` or `"sample"`. Errors: [`Error::InvalidArgument`] naming `shard_split`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(ShardSplit::Auto),
            "sample" => Ok(ShardSplit::Sample),
            _ => Err(Error::InvalidArgument(format!(
                "shard_split must be \"auto\" or \"sample\", got {s:?}"
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
    /// `Some(k)`: buckets holding fewer than `k` samples (repeats counted, over all ranks) are
    /// merged into the nearest bucket in log-aspect whose extra crop stays within
    /// `max_extra_crop`, see [`crate::bucket::merge_small_buckets`]. `None` (default): no merging.
    pub min_bucket_fill: Option<usize>,
    /// Largest extra crop, as a share of the image area in `[0, 1]`, an image may get from
    /// `min_bucket_fill` moving it (see [`crate::bucket::crop_fraction`]). Default 0.10.
    pub max_extra_crop: f64,
    /// Where the bucket-sized window is cut from the resized image. Default [`CropMode::Center`].
    pub crop: CropMode,
    /// Probability in `[0, 1]` of a horizontal flip per sample. Default 0.
    pub flip_prob: f64,
    /// With random crop, `Some(k)`: each image has `k` seeded crops and every sample uses one of
    /// them, drawn per (epoch, sample), so that a cache can hold them all; `None` (default): a new
    /// crop per (epoch, sample). See [`crate::pipeline`]'s draws.
    pub crop_variants: Option<u32>,
    /// `Some(k)`: the subsets' caption operations (variant line, tag shuffle, tag dropout) have `k`
    /// seeded results per image and every sample uses one of them, drawn per (epoch, sample);
    /// whole-caption dropout stays a per-(epoch, sample) draw. `None` (default): new operations per
    /// (epoch, sample).
    pub text_variants: Option<u32>,
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
    /// How a bucket's last global batch is split across ranks (in shard-level mode: how the
    /// ranks' step counts are equalised). Default [`Remainder::Pad`].
    pub remainder: Remainder,
    /// How several ranks split tar shards. Default [`ShardSplit::Auto`].
    pub shard_split: ShardSplit,
    /// A cache folder (see [`crate::cache`]): samples get their latent and text keys, and with
    /// `pixels = false` their tensors come from it instead of decoding. Default `None`.
    pub cache: Option<PathBuf>,
    /// Decode pixels (`false` needs a `cache`: batches then hold the cached tensors only).
    /// Default true.
    pub pixels: bool,
    /// Share in `[0, 1)` of the images held out for validation: an image is held out when the
    /// uniform draw keyed by (`seed`, its path relative to its subset's folder) is below it (see
    /// [`held_out`]), so the same images are held out on every run, rank and resume, and adding
    /// images never moves others in or out. Held-out images are taken out right after the scan and
    /// counted in [`Report::held_out`](super::Report::held_out). Default 0 (none).
    pub validation_split: f64,
    /// Keep only the held-out images instead of only the others (the validation loader; needs
    /// `validation_split > 0`). Default false.
    pub validation: bool,
    /// Conditioning views (masks, control images) added to every batch. Default none.
    pub views: ViewOptions,
}

/// Whether the image at `relative` (its path relative to its subset's folder, `/`-separated)
/// is held out by `validation_split` with `seed`: a uniform double of (seed, FNV-1a 64 of the
/// path's UTF-8 bytes) below the split.
pub fn held_out(seed: u64, validation_split: f64, relative: &str) -> bool {
    // FNV-1a, 64-bit (Fowler, Noll & Vo): a stable hash of the path, the same on every platform.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in relative.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    crate::rng::uniform(seed, 0, crate::rng::Stream::ValidationSplit, hash) < validation_split
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
            min_bucket_fill: None,
            max_extra_crop: 0.10,
            crop: CropMode::Center,
            flip_prob: 0.0,
            crop_variants: None,
            text_variants: None,
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
            shard_split: ShardSplit::Auto,
            cache: None,
            pixels: true,
            validation_split: 0.0,
            validation: false,
            views: ViewOptions::default(),
        }
    }
}

impl LoaderOptions {
    /// Check every option.
    ///
    /// Errors: [`Error::InvalidArgument`] naming the argument: `batch_size` 0, `prefetch` 0,
    /// `flip_prob` or `max_extra_crop` outside `[0, 1]` (or NaN), `min_bucket_fill` `Some(0)`,
    /// `max_pixels` 0, `crop_variants` or `text_variants` `Some(0)`, `pixels` false without a
    /// `cache`, `validation_split` outside `[0, 1)`, `validation` without a split, a caption
    /// extension without its leading dot,
    /// and the bucket options as in [`BucketConfig::new`].
    pub fn validate(&self) -> Result<()> {
        self.bucket_config()?;
        self.views.validate(self.bucket_step)?;
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
        if self.min_bucket_fill == Some(0) {
            return Err(Error::InvalidArgument(
                "min_bucket_fill must be at least 1 (or None), got 0".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.max_extra_crop) {
            return Err(Error::InvalidArgument(format!(
                "max_extra_crop must be in [0, 1], got {}",
                self.max_extra_crop
            )));
        }
        for (name, k) in [
            ("crop_variants", self.crop_variants),
            ("text_variants", self.text_variants),
        ] {
            if k == Some(0) {
                return Err(Error::InvalidArgument(format!(
                    "{name} must be at least 1 (or None), got 0"
                )));
            }
        }
        if !self.pixels && self.cache.is_none() {
            return Err(Error::InvalidArgument(
                "pixels=False needs a cache: without one there is nothing to load but pixels"
                    .into(),
            ));
        }
        if !(0.0..1.0).contains(&self.validation_split) {
            return Err(Error::InvalidArgument(format!(
                "validation_split must be in [0, 1), got {}",
                self.validation_split
            )));
        }
        if self.validation && self.validation_split == 0.0 {
            return Err(Error::InvalidArgument(
                "validation=True needs validation_split > 0: with none, no image is held out"
                    .into(),
            ));
        }
        if self.max_pixels == 0 {
            return Err(Error::InvalidArgument(
                "max_pixels must be at least 1, got 0".into(),
            ));
        }
        scan::validate_caption_extensions(&self.caption_extensions)
    }

    pub(super) fn bucket_config(&self) -> Result<BucketConfig> {
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

    pub(super) fn threads(&self) -> usize {
        match self.num_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_error_parses() {
        assert_eq!("skip".parse::<OnError>().unwrap(), OnError::Skip);
        assert_eq!("raise".parse::<OnError>().unwrap(), OnError::Raise);
        let err = "Raise".parse::<OnError>().unwrap_err();
        assert!(err.to_string().contains("on_error"), "{err}");
    }
}
