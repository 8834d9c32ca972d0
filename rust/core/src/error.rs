//! The one error type of the core, and the per-file skip record built from it.
//!
//! Every message names the file and the cause ("Error while decoding PATH: cause"), so that a skip in
//! a report or an exception in Python is actionable without a debugger. `rust/py` maps these variants
//! to Python exceptions in one place.

use std::path::{Path, PathBuf};

/// Result alias used across the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened or read (missing, no permission, vanished since the scan).
    #[error("Error while reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a decodable image of a supported format (truncated, corrupt, unknown).
    #[error("Error while decoding {}: {reason}", path.display())]
    Decode { path: PathBuf, reason: String },
    /// The header declares more pixels than the configured limit (decompression-bomb guard).
    #[error(
        "Error while decoding {}: image is {width}x{height} = {} pixels, over the limit of {limit} pixels",
        path.display(),
        (*width as u64) * (*height as u64)
    )]
    TooLarge {
        path: PathBuf,
        width: u32,
        height: u32,
        limit: u64,
    },
    /// With `no_upscale`, the image is narrower or shorter than one bucket step, so no bucket fits
    /// without enlarging it.
    #[error(
        "Error while bucketing {}: image is {width}x{height}, smaller than one bucket step of {step} \
         pixels on a side; no_upscale forbids enlarging it",
        path.display()
    )]
    TooSmall {
        path: PathBuf,
        width: u32,
        height: u32,
        step: u32,
    },
    /// The file's size or format no longer matches what the scan recorded.
    #[error("Error while decoding {}: file changed since the scan: {reason}", path.display())]
    Changed { path: PathBuf, reason: String },
    /// A panic inside a decoder or transform, caught at the sample boundary.
    #[error("Error while decoding {}: internal panic: {message}", path.display())]
    Panic { path: PathBuf, message: String },
    /// A caller-supplied option is out of range; the message names the argument.
    #[error("{0}")]
    InvalidArgument(String),
    /// A file the scan had to skip, raised instead of skipped (`on_error = raise`); the message is the
    /// skip's own.
    #[error("{}", .0.message)]
    Skipped(Skip),
    /// The dataset root holds no image files (or does not exist as a folder).
    #[error("no images found in {}: {reason}", path.display())]
    NoImages { path: PathBuf, reason: String },
}

impl Error {
    /// Short machine-readable reason code used in reports: `io`, `decode`, `too_large`, `too_small`,
    /// `changed`, `panic`, `invalid_argument`, `no_images`.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::Decode { .. } => "decode",
            Error::TooLarge { .. } => "too_large",
            Error::TooSmall { .. } => "too_small",
            Error::Changed { .. } => "changed",
            Error::Panic { .. } => "panic",
            Error::Skipped(skip) => skip.code,
            Error::InvalidArgument(_) => "invalid_argument",
            Error::NoImages { .. } => "no_images",
        }
    }

    /// The file the error is about, when there is one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Error::Io { path, .. }
            | Error::Decode { path, .. }
            | Error::TooLarge { path, .. }
            | Error::TooSmall { path, .. }
            | Error::Changed { path, .. }
            | Error::Panic { path, .. }
            | Error::NoImages { path, .. } => Some(path),
            Error::Skipped(skip) => Some(&skip.path),
            Error::InvalidArgument(_) => None,
        }
    }

    /// Shorthand for [`Error::Decode`].
    pub fn decode(path: &Path, reason: impl Into<String>) -> Self {
        Error::Decode {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// One image file that was found but not loaded, with the reason (recorded in the report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    /// The file, as found under the dataset root.
    pub path: PathBuf,
    /// Reason code, see [`Error::code`].
    pub code: &'static str,
    /// Full human-readable message, naming the file and the cause.
    pub message: String,
}

impl Skip {
    /// Record `err` as the reason `path` was skipped.
    pub fn new(path: &Path, err: &Error) -> Self {
        Skip {
            path: path.to_path_buf(),
            code: err.code(),
            message: err.to_string(),
        }
    }
}
