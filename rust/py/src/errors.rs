//! The exceptions of `fastdiff._fastdiff` and the one map from core errors to them.
//!
//! Every core [`Error`] that reaches Python goes through [`to_pyerr`]; nothing else in the bindings
//! decides which exception a core failure becomes. The family of the error picks the class, so that
//! nobody is blamed for what they did not do: the file's fault is a `DecodeError` (or an `OSError`
//! for reading), the caller's a `ValueError`, the machine's a `MemoryError`, fastdiff's own an
//! `InternalError`; a cache entry not built is a `CacheMissError`, a damaged cache file a
//! `CorruptCacheError`. The message is the core's, naming the file and the cause.

use fastdiff_core::{Error, SkipCode};
use pyo3::create_exception;
use pyo3::exceptions::{
    PyException, PyFileNotFoundError, PyLookupError, PyMemoryError, PyOSError, PyPermissionError,
    PyValueError,
};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

create_exception!(
    _fastdiff,
    FastdiffError,
    PyException,
    "Base class of every error fastdiff raises itself."
);
create_exception!(
    _fastdiff,
    DecodeError,
    FastdiffError,
    "An image file could not be read as an image (corrupt, truncated, unsupported, over max_pixels, or changed since the scan). The message names the file and the cause."
);
create_exception!(
    _fastdiff,
    ImageTooSmallError,
    FastdiffError,
    "With no_upscale, an image is narrower or shorter than one bucket step, so no bucket fits it without enlarging it (raised with on_error=\"raise\"; otherwise the file is skipped with code \"too_small\"). The file itself is fine. The message names it and its size."
);
create_exception!(
    _fastdiff,
    InternalError,
    FastdiffError,
    "fastdiff itself failed, not the file or the arguments: a panic caught while loading a file (a bug: please report the message), a broken internal invariant, or an epoch iterator used in a forked child of the process that started it (iterate the loader again in the child instead)."
);

create_exception!(
    _fastdiff,
    CorruptCacheError,
    FastdiffError,
    "A cache file is damaged: a truncated or unparsable shard or manifest, or an entry whose checksum does not match (its bytes changed on disk). The message names the file and, for an entry, its key. Rerunning `fastdiff cache` re-encodes what a corrupt shard held; `fastdiff cache --gc` deletes it."
);

/// `CacheMissError(FastdiffError, LookupError)`: two bases, which `create_exception!` cannot give,
/// so the class is made once by calling `type`.
static CACHE_MISS_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// The `CacheMissError` class (created on first use).
pub(crate) fn cache_miss_error(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    let ty = CACHE_MISS_ERROR.get_or_try_init(py, || {
        let bases = PyTuple::new(
            py,
            [py.get_type::<FastdiffError>(), py.get_type::<PyLookupError>()],
        )?;
        let dict = PyDict::new(py);
        dict.set_item("__module__", "fastdiff._fastdiff")?;
        dict.set_item(
            "__doc__",
            "The cache holds no entry a sample needs: it was not built for this sample, or the file (its \
             content hash) or an option that changes the pixels or the caption changed since it was \
             built. The message names the file and what changed. Rebuild with `fastdiff cache`.",
        )?;
        let builtins = py.import("builtins")?;
        let ty = builtins
            .getattr("type")?
            .call1(("CacheMissError", bases, dict))?
            .cast_into::<PyType>()?;
        Ok::<_, PyErr>(ty.unbind())
    })?;
    Ok(ty.bind(py))
}

/// The one map from core errors to Python exceptions, by the error's [`SkipCode`] (a file the scan
/// skipped and `on_error = "raise"` raised is classed by the reason it was skipped).
///
/// `io` → `FileNotFoundError` / `PermissionError` / `OSError`; `decode`, `too_large`, `changed` →
/// `DecodeError`; `too_small` → `ImageTooSmallError`; `panic`, `internal` → `InternalError`;
/// `resource` (memory the allocator refused, a libjpeg-turbo handle) → `MemoryError`;
/// `invalid_argument`, `no_images` → `ValueError`; `missing_mask`, `missing_control` (with
/// `require_pairs`) → `FileNotFoundError`; `cache_miss` → `CacheMissError`; `corrupt` →
/// `CorruptCacheError`.
pub(crate) fn to_pyerr(err: Error) -> PyErr {
    let msg = err.to_string();
    if let Error::Io { source, .. } = &err {
        return match source.kind() {
            std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
            std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
            _ => PyOSError::new_err(msg),
        };
    }
    match err.code() {
        // A skip's I/O error keeps only its message, not its kind.
        SkipCode::Io => PyOSError::new_err(msg),
        SkipCode::Decode | SkipCode::Unsupported | SkipCode::TooLarge | SkipCode::Changed => {
            DecodeError::new_err(msg)
        }
        SkipCode::TooSmall => ImageTooSmallError::new_err(msg),
        SkipCode::CacheMiss => Python::attach(|py| match cache_miss_error(py) {
            Ok(ty) => PyErr::from_type(ty.clone(), msg),
            Err(e) => e,
        }),
        SkipCode::Corrupt => CorruptCacheError::new_err(msg),
        SkipCode::Panic | SkipCode::Internal => InternalError::new_err(msg),
        SkipCode::Resource => PyMemoryError::new_err(msg),
        SkipCode::InvalidArgument | SkipCode::NoImages => PyValueError::new_err(msg),
        SkipCode::MissingMask | SkipCode::MissingControl => PyFileNotFoundError::new_err(msg),
        // A reason the core gained after this map was written: still fastdiff's own error.
        _ => FastdiffError::new_err(msg),
    }
}
