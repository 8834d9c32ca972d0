//! PyO3 bindings of fastdiff-core, exposed as the private module `fastdiff._fastdiff`.
//!
//! Only argument extraction, the one error map and GIL release live here; every decision about images
//! is made in `rust/core`. The public Python API (`fastdiff.DataLoader`) wraps these classes and turns the
//! numpy arrays into torch tensors without copying.
//!
//! Files: `errors` (the exceptions and the one map from core errors to them), `loader`
//! (`NativeSubset`, `NativeLoader`), `epoch` (`NativeEpochIter`), `buffer_factory` (torch tensors as
//! batch memory), `convert` (option strings in; batches, reports and stats out). This file only
//! registers the module.

mod buffer_factory;
mod convert;
mod epoch;
mod errors;
mod loader;

use pyo3::prelude::*;

use convert::BatchMemory;
use epoch::NativeEpochIter;
use errors::{DecodeError, FastdiffError, ImageTooSmallError, InternalError};
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
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
