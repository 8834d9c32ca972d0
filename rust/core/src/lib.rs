//! fastdiff-core: the data path of fastdiff, in plain Rust (no Python).
//!
//! A batch can be followed from a folder of images to the batch buffer by opening these files in
//! order, each doing one stage:
//!
//! 1. [`dataset`] (`dataset.rs`): a dataset is a list of [`Subset`]s, folders with their own repeats,
//!    caption handling, flip and crop.
//! 2. [`scan`] (`scan.rs`): each folder walked, headers only (format, size, EXIF orientation, via
//!    [`decode::probe`]), captions read ([`caption`]); unreadable files become [`Skip`]s.
//! 3. [`bucket`] (`bucket.rs`): the aspect-ratio buckets, and each image's nearest one.
//! 4. [`sampler`] (`sampler.rs`): the seeded plan of one epoch, a list of batches of sample indices
//!    per bucket, split across data-parallel ranks; [`rng`] keys every random choice.
//! 5. [`pipeline`] (`pipeline/loader.rs`, then `pipeline/epoch.rs`): the [`Loader`] built from the
//!    scan; an [`EpochIter`] per epoch that starts worker threads and yields [`Batch`]es in plan order.
//! 6. `pipeline/worker.rs`: one worker's loop: read a file, check it against the scan, decode,
//!    transform into its slot of the batch (`pipeline/batch.rs`), with stand-ins for failures.
//! 7. [`decode`] (`decode/mod.rs`, then `header`, `exif`, `jpeg`, `png_webp` or `bmp_tiff_gif`,
//!    `pixels`): bytes to an upright RGB8 image.
//! 8. [`transform`] (`transform/mod.rs`, then `placement`, `resize`): where the bucket-sized window
//!    lies in the resized image, then resize it, flip, and write the planar CHW sample in the output
//!    dtype.
//! 9. [`pipeline::buffer`] (`pipeline/buffer.rs`): the batch memory the samples are written into,
//!    recycled or from a caller's [`BufferSource`]; [`pipeline::stats`] times each stage.
//!
//! Data-quality measures of each image (hashes, transparency, colour) for `fastdiff scan --quality`
//! are [`quality`] (`quality.rs`).
//!
//! The latent and text-embedding cache is [`cache`] (`cache/mod.rs`): keys, shards, the manifest,
//! the [`cache::Store`] the workers read entries from, and its garbage collection.
//!
//! Errors are one type, [`Error`] (`error.rs`), with a [`SkipCode`] per reason. The Python bindings
//! live in `rust/py`; nothing here knows about Python.

pub mod bucket;
pub mod cache;
pub mod caption;
pub mod dataset;
pub mod decode;
pub mod error;
pub mod pipeline;
pub mod quality;
pub mod rng;
pub mod sampler;
pub mod scan;
pub mod transform;

pub use dataset::Subset;
pub use decode::{Decoder, Header, ImageFormat, RgbImage};
pub use error::{Error, Result, Skip, SkipCode};
pub use pipeline::{
    Batch, BufferSource, EpochIter, LoadStats, Loader, LoaderOptions, OnError, PixelBuffer, Report,
    SampleMeta,
};
pub use transform::{CropMode, FilterType, OutputDtype};
