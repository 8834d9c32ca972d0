//! PyO3 bindings of fastdiff-core, exposed as the private module `fastdiff._fastdiff`.
//!
//! Only argument extraction, the one error map and GIL release live here; every decision about images
//! is made in `rust/core`. The public Python API (`fastdiff.DataLoader`) wraps these classes and turns the
//! numpy arrays into torch tensors without copying.
//!
//! Files: `errors` (the exceptions and the one map from core errors to them), `loader`
//! (`NativeSubset`, `NativeLoader`), `epoch` (`NativeEpochIter`), `buffer_factory` (torch tensors as
//! batch memory), `convert` (option strings in; batches, reports and stats out), `cache` (the
//! latent/text cache: `ShardWriter`, `CacheStore`, key functions, `cache_gc`), `shards` (tar shards: a folder's files to pack, shard indexes). This file only
//! registers the module.

mod buffer_factory;
mod cache;
mod convert;
mod epoch;
mod errors;
mod loader;
mod shards;

use pyo3::prelude::*;

use convert::BatchMemory;
use epoch::NativeEpochIter;
use errors::{
    cache_miss_error, CorruptCacheError, DecodeError, FastdiffError, ImageTooSmallError,
    InternalError,
};
use loader::{NativeLoader, NativeSubset};

/// The native module `fastdiff._fastdiff`.
#[pymodule]
fn _fastdiff(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<NativeSubset>()?;
    m.add_class::<NativeLoader>()?;
    m.add_class::<NativeEpochIter>()?;
    m.add_class::<BatchMemory>()?;
    m.add("FastdiffError", py.get_type::<FastdiffError>())?;
    m.add("DecodeError", py.get_type::<DecodeError>())?;
    m.add("ImageTooSmallError", py.get_type::<ImageTooSmallError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    m.add("CacheMissError", cache_miss_error(py)?)?;
    m.add("CorruptCacheError", py.get_type::<CorruptCacheError>())?;
    m.add_class::<cache::ShardWriter>()?;
    m.add_class::<cache::CacheStore>()?;
    m.add_function(wrap_pyfunction!(cache::content_hash, m)?)?;
    m.add_function(wrap_pyfunction!(cache::latent_key, m)?)?;
    m.add_function(wrap_pyfunction!(cache::text_key, m)?)?;
    m.add_function(wrap_pyfunction!(cache::cache_gc, m)?)?;
    m.add_function(wrap_pyfunction!(shards::scan_files, m)?)?;
    m.add_function(wrap_pyfunction!(shards::write_shard_index, m)?)?;
    m.add(
        "IMAGE_EXTENSIONS",
        fastdiff_core::scan::IMAGE_EXTENSIONS.map(|e| format!(".{e}")),
    )?;
    m.add("SHARD_INDEX_SUFFIX", fastdiff_core::scan::INDEX_SUFFIX)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
