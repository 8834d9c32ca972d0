//! `NativeSubset` and `NativeLoader`: the dataset's folders with their options, and the scanned,
//! bucketed loader built from them (wrapped by `fastdiff.Subset` and `fastdiff.DataLoader`).
//!
//! Extracts and forwards arguments; every check and decision is the core's. The scan runs with the
//! GIL released.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use fastdiff_core::cache::key_hex;
use fastdiff_core::caption::CaptionOptions;
use fastdiff_core::dataset::Subset;
use fastdiff_core::pipeline::{BufferSource, Loader, LoaderOptions, ViewOptions};
use fastdiff_core::sampler::Segment;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::buffer_factory::PyBufferSource;
use crate::convert::{parse, report_dict};
use crate::epoch::NativeEpochIter;
use crate::errors::to_pyerr;

/// One image's row of `NativeLoader.quality`.
type QualityRow = (
    String,
    usize,
    (u32, u32),
    (u32, u32),
    bool,
    Option<(String, u64, f32, f32, f32)>,
    Option<(String, String)>,
);

/// One folder of a dataset and its per-subset options (see `fastdiff.Subset`).
#[pyclass(module = "fastdiff._fastdiff", frozen)]
pub(crate) struct NativeSubset {
    inner: Subset,
}

#[pymethods]
impl NativeSubset {
    #[new]
    #[pyo3(signature = (
        root, *, shards = Vec::new(), unreadable_shards = Vec::new(), pending_shards = Vec::new(), num_repeats = 1, is_reg = false, caption_extensions = None, captions = None,
        caption_per_line = false, caption_dropout_rate = 0.0, keep_tokens = 0, shuffle_caption = false,
        caption_tag_dropout_rate = 0.0, caption_separator = ",", flip_prob = None, crop = None,
        class_tokens = None, caption_dropout_every_n_epochs = 0, caption_prefix = None,
        caption_suffix = None, keep_tokens_separator = None, secondary_separator = None,
        enable_wildcard = false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        root: PathBuf,
        shards: Vec<PathBuf>,
        unreadable_shards: Vec<(PathBuf, String)>,
        pending_shards: Vec<PathBuf>,
        num_repeats: usize,
        is_reg: bool,
        caption_extensions: Option<Vec<String>>,
        captions: Option<HashMap<PathBuf, String>>,
        caption_per_line: bool,
        caption_dropout_rate: f64,
        keep_tokens: usize,
        shuffle_caption: bool,
        caption_tag_dropout_rate: f64,
        caption_separator: &str,
        flip_prob: Option<f64>,
        crop: Option<&str>,
        class_tokens: Option<String>,
        caption_dropout_every_n_epochs: u64,
        caption_prefix: Option<String>,
        caption_suffix: Option<String>,
        keep_tokens_separator: Option<String>,
        secondary_separator: Option<String>,
        enable_wildcard: bool,
    ) -> PyResult<Self> {
        let inner = Subset {
            root,
            shards,
            unreadable_shards,
            pending_shards,
            num_repeats,
            is_reg,
            caption_extensions,
            captions: captions.map(|c| c.into_iter().collect::<BTreeMap<_, _>>()),
            class_tokens,
            caption: CaptionOptions {
                caption_per_line,
                caption_dropout_rate,
                caption_dropout_every_n_epochs,
                keep_tokens,
                shuffle_caption,
                caption_tag_dropout_rate,
                separator: caption_separator.to_owned(),
                prefix: caption_prefix.unwrap_or_default(),
                suffix: caption_suffix.unwrap_or_default(),
                keep_tokens_separator: keep_tokens_separator.unwrap_or_default(),
                secondary_separator: secondary_separator.unwrap_or_default(),
                enable_wildcard,
            },
            flip_prob,
            crop: crop.map(|c| parse("crop", c)).transpose()?,
        };
        inner.validate().map_err(to_pyerr)?;
        Ok(NativeSubset { inner })
    }
}

/// A scanned, bucketed image folder plus the options to load it (see `fastdiff.DataLoader`).
#[pyclass(module = "fastdiff._fastdiff", frozen)]
pub(crate) struct NativeLoader {
    inner: Loader,
}

#[pymethods]
impl NativeLoader {
    #[new]
    #[pyo3(signature = (
        subsets, *, resolution, batch_size, bucket_step, min_bucket_side, max_bucket_side, crop, flip_prob,
        shuffle, seed, drop_last, num_threads, prefetch, dtype, filter, caption_extensions, background,
        on_error, max_pixels, rank = 0, world_size = 1, remainder = "pad", no_upscale = false,
        crop_variants = None, text_variants = None, cache = None, pixels = true,
        min_bucket_fill = None, max_extra_crop = 0.1,
        validation_split = 0.0, validation = false, shard_split = "auto", mask_from_alpha = false,
        mask_dir = None, control_dir = None, require_pairs = false, vae_scale_factor = 8
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        subsets: Vec<PyRef<'_, NativeSubset>>,
        resolution: u32,
        batch_size: usize,
        bucket_step: u32,
        min_bucket_side: Option<u32>,
        max_bucket_side: Option<u32>,
        crop: &str,
        flip_prob: f64,
        shuffle: bool,
        seed: u64,
        drop_last: bool,
        num_threads: usize,
        prefetch: usize,
        dtype: &str,
        filter: &str,
        caption_extensions: Vec<String>,
        background: [u8; 3],
        on_error: &str,
        max_pixels: u64,
        rank: usize,
        world_size: usize,
        remainder: &str,
        no_upscale: bool,
        crop_variants: Option<u32>,
        text_variants: Option<u32>,
        cache: Option<PathBuf>,
        pixels: bool,
        min_bucket_fill: Option<usize>,
        max_extra_crop: f64,
        validation_split: f64,
        validation: bool,
        shard_split: &str,
        mask_from_alpha: bool,
        mask_dir: Option<PathBuf>,
        control_dir: Option<Vec<PathBuf>>,
        require_pairs: bool,
        vae_scale_factor: u32,
    ) -> PyResult<Self> {
        let opts = LoaderOptions {
            min_bucket_fill,
            max_extra_crop,
            resolution,
            batch_size,
            bucket_step,
            min_bucket_side,
            max_bucket_side,
            no_upscale,
            crop: parse("crop", crop)?,
            flip_prob,
            crop_variants,
            text_variants,
            shuffle,
            seed,
            drop_last,
            num_threads,
            prefetch,
            dtype: parse("dtype", dtype)?,
            filter: parse("filter", filter)?,
            caption_extensions,
            background,
            on_error: parse("on_error", on_error)?,
            max_pixels,
            rank,
            world_size,
            remainder: parse("remainder", remainder)?,
            shard_split: parse("shard_split", shard_split)?,
            cache,
            pixels,
            validation_split,
            validation,
            views: ViewOptions {
                mask_from_alpha,
                mask_dir,
                control_dirs: control_dir.unwrap_or_default(),
                require_pairs,
                vae_scale_factor,
            },
        };
        let subsets: Vec<Subset> = subsets.iter().map(|s| s.inner.clone()).collect();
        let inner = py
            .detach(|| Loader::from_subsets(subsets, opts))
            .map_err(to_pyerr)?;
        Ok(NativeLoader { inner })
    }

    /// Batches per epoch (exact).
    #[getter]
    fn num_batches(&self) -> usize {
        self.inner.num_batches()
    }

    /// Fingerprint of the scanned dataset (relative paths, headers, subset options), 16 hex digits.
    #[getter]
    fn dataset_digest(&self) -> String {
        format!("{:016x}", self.inner.dataset_digest())
    }

    /// Candidate buckets as (height, width) tuples in pixels.
    #[getter]
    fn buckets(&self) -> Vec<(u32, u32)> {
        self.inner
            .buckets()
            .iter()
            .map(|b| (b.height, b.width))
            .collect()
    }

    /// Caption of each image the scan accepted, in path order, as read from its file or metadata
    /// (before the subsets' caption operations); "" for an image without one.
    #[getter]
    fn captions(&self) -> Vec<String> {
        self.inner
            .images()
            .iter()
            .map(|e| e.caption.clone())
            .collect()
    }

    /// With a cache: each accepted image's content hash (32 hex digits, blake3 of its bytes), in
    /// path order; None for a file that could not be read (it is in the report). Without a cache,
    /// all None.
    #[getter]
    fn content_hashes(&self) -> Vec<Option<String>> {
        (0..self.inner.images().len())
            .map(|i| self.inner.content_hash(i).as_ref().map(key_hex))
            .collect()
    }

    /// Per image (path order): its path, subset index, bucket `(height, width)`, upright size
    /// `(width, height)`, whether a caption was found, and either its measures `(content hash hex,
    /// dhash, transparent share, coloured share, detail)` or else the `(code, message)` of why it cannot be
    /// decoded (see the core's `quality::measure`). Decodes every image, with the GIL released.
    fn quality(&self, py: Python<'_>) -> PyResult<Vec<QualityRow>> {
        let measured = py.detach(|| self.inner.quality()).map_err(to_pyerr)?;
        let buckets = self.inner.buckets();
        Ok((self.inner.images().iter().zip(measured).enumerate())
            .map(|(i, (image, q))| {
                let (bucket, subset) = self.inner.image_bucket_and_subset(i);
                let b = &buckets[bucket];
                let (measures, error) = match q {
                    Ok(q) => (
                        Some((
                            key_hex(&q.content_hash),
                            q.dhash,
                            q.transparent,
                            q.coloured,
                            q.detail,
                        )),
                        None,
                    ),
                    Err(e) => (None, Some((e.code().as_str().to_string(), e.to_string()))),
                };
                (
                    image.path.to_string_lossy().into_owned(),
                    subset,
                    (b.height, b.width),
                    image.header.upright_size(),
                    image.caption_found,
                    measures,
                    error,
                )
            })
            .collect())
    }

    /// Every caption a sample can get, each once, sorted, with its text key (hex; None without a
    /// cache whose manifest has text).
    fn caption_variants(&self, py: Python<'_>) -> PyResult<Vec<(String, Option<String>)>> {
        let variants = py
            .detach(|| self.inner.caption_variants())
            .map_err(to_pyerr)?;
        Ok(variants
            .into_iter()
            .map(|(c, k)| (c, k.as_ref().map(key_hex)))
            .collect())
    }

    /// The cache build's pixel batches from batch `start_batch` on: every distinct (image, crop
    /// variant, flip state) once, or with `missing_only` only those the cache lacks, or with
    /// `rank_share` this rank's batches of that plan only (see the core's `Loader::iter_build`).
    #[pyo3(signature = (start_batch = 0, missing_only = false, rank_share = false))]
    fn iter_build(
        &self,
        py: Python<'_>,
        start_batch: usize,
        missing_only: bool,
        rank_share: bool,
    ) -> PyResult<NativeEpochIter> {
        let it = py
            .detach(|| self.inner.iter_build(start_batch, missing_only, rank_share))
            .map_err(to_pyerr)?;
        Ok(NativeEpochIter::new(it, Arc::new(Mutex::new(None)), true))
    }

    /// Each sample of the full build plan, in order: (latent key hex or None, whether the cache
    /// has it) (see the core's `Loader::build_latent_keys`).
    fn build_latent_keys(&self, py: Python<'_>) -> PyResult<Vec<(Option<String>, bool)>> {
        let keys = py
            .detach(|| self.inner.build_latent_keys())
            .map_err(to_pyerr)?;
        Ok(keys
            .into_iter()
            .map(|(k, cached)| (k.as_ref().map(key_hex), cached))
            .collect())
    }

    /// A loader of the same scanned images with other bucket options, every other option kept,
    /// built without reading any image file (see the core's `Loader::rebucket`). Raises
    /// `ValueError` for an option out of range, or as the constructor after its scan.
    #[pyo3(signature = (*, resolution, bucket_step, min_bucket_side, max_bucket_side))]
    fn rebucket(
        &self,
        py: Python<'_>,
        resolution: u32,
        bucket_step: u32,
        min_bucket_side: Option<u32>,
        max_bucket_side: Option<u32>,
    ) -> PyResult<Self> {
        let opts = LoaderOptions {
            resolution,
            bucket_step,
            min_bucket_side,
            max_bucket_side,
            ..self.inner.options().clone()
        };
        let inner = py.detach(|| self.inner.rebucket(opts)).map_err(to_pyerr)?;
        Ok(NativeLoader { inner })
    }

    /// Scan and load report as a dict (see `fastdiff.DataLoader.report`).
    fn report<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        report_dict(py, &self.inner.report())
    }

    /// Start the worker threads for one epoch, from batch `start_batch` on.
    ///
    /// `buffer_factory`, if given, is called as `buffer_factory(nbytes)` once per batch (on the
    /// thread iterating, in plan order) and must return a contiguous 1-D `torch.uint8` CPU tensor of
    /// at least `nbytes` bytes aligned to 64 bytes (torch's allocators align far more), new for each
    /// call (its memory used by nothing else until the batch is dropped); the batch is written into
    /// it and `__next__` returns that tensor in place of the numpy array. The loader uses it to fill
    /// pinned tensors.
    ///
    /// `done`: stretches of the epoch already consumed with other geometries, as `(batch_size,
    /// world_size, global batches)` (elastic resume; `start_batch` then counts batches of the rest).
    /// Batches of this rank's plan of what remains of epoch `epoch` after the stretches `done`
    /// (as in `iter_epoch`). Raises `ValueError` when `done` does not fit the epoch.
    fn rest_batches(&self, epoch: u64, done: Vec<(usize, usize, usize)>) -> PyResult<usize> {
        (self.inner.rest_batches(epoch, &segments(done))).map_err(to_pyerr)
    }

    #[pyo3(signature = (epoch, start_batch = 0, buffer_factory = None, done = Vec::new()))]
    fn iter_epoch(
        &self,
        py: Python<'_>,
        epoch: u64,
        start_batch: usize,
        buffer_factory: Option<Py<PyAny>>,
        done: Vec<(usize, usize, usize)>,
    ) -> NativeEpochIter {
        let done = segments(done);
        let factory_error = Arc::new(Mutex::new(None));
        let source = buffer_factory.map(|factory| {
            Box::new(PyBufferSource::new(factory, Arc::clone(&factory_error)))
                as Box<dyn BufferSource>
        });
        let it = py.detach(|| self.inner.iter_rest_into(epoch, &done, start_batch, source));
        let cache_items = self.inner.options().cache.is_some();
        NativeEpochIter::new(it, factory_error, cache_items)
    }
}

/// `(batch_size, world_size, batches)` triples as the sampler's segments.
fn segments(done: Vec<(usize, usize, usize)>) -> Vec<Segment> {
    (done.into_iter())
        .map(|(batch_size, world_size, batches)| Segment {
            batch_size,
            world_size,
            batches,
        })
        .collect()
}
