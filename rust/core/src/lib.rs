//! fastdiff-core: the data path of fastdiff, in plain Rust (no Python).
//!
//! Folder of images → [`scan`] (headers only) → aspect-ratio [`bucket`]s → [`sampler`] (seeded batch
//! plan per epoch) → [`pipeline`] (worker threads: [`decode`] + [`transform`] straight into one
//! contiguous batch buffer). A dataset is a list of [`dataset::Subset`]s (folders with their own repeats
//! and caption handling). The Python bindings live in `rust/py`; nothing here knows about Python.

pub mod bucket;
pub mod buffer;
pub mod caption;
pub mod dataset;
pub mod decode;
pub mod error;
pub mod pipeline;
pub mod rng;
pub mod sampler;
pub mod scan;
pub mod stats;
pub mod transform;

pub use error::{Error, Result, Skip};
