//! The exceptions of `fastdiff._fastdiff` and the one map from core errors to them.
//!
//! Every core [`Error`] that reaches Python goes through [`to_pyerr`]; nothing else in the bindings
//! decides which exception a core failure becomes. The family of the error picks the class, so that
//! nobody is blamed for what they did not do: the file's fault is a `DecodeError` (or an `OSError`
//! for reading), the caller's a `ValueError`, the machine's a `MemoryError`, fastdiff's own an
//! `InternalError`. The message is the core's, naming the file and the cause.

use fastdiff_core::{Error, SkipCode};
use pyo3::create_exception;
use pyo3::exceptions::{
    PyException, PyFileNotFoundError, PyMemoryError, PyOSError, PyPermissionError, PyValueError,
};
use pyo3::prelude::*;

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

/// The one map from core errors to Python exceptions, by the error's [`SkipCode`] (a file the scan
/// skipped and `on_error = "raise"` raised is classed by the reason it was skipped).
///
/// `io` → `FileNotFoundError` / `PermissionError` / `OSError`; `decode`, `too_large`, `changed` →
/// `DecodeError`; `too_small` → `ImageTooSmallError`; `panic`, `internal` → `InternalError`;
/// `resource` (memory the allocator refused, a libjpeg-turbo handle) → `MemoryError`;
/// `invalid_argument`, `no_images` → `ValueError`.
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
        SkipCode::Panic | SkipCode::Internal => InternalError::new_err(msg),
        SkipCode::Resource => PyMemoryError::new_err(msg),
        SkipCode::InvalidArgument | SkipCode::NoImages => PyValueError::new_err(msg),
        // A reason the core gained after this map was written: still fastdiff's own error.
        _ => FastdiffError::new_err(msg),
    }
}
