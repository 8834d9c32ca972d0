//! The one error type of the core, and the per-file skip record built from it.
//!
//! Every message names the file and the cause ("Error while decoding PATH: cause"), so that a skip in
//! a report or an exception in Python is actionable without a debugger. `rust/py` maps these variants
//! to Python exceptions in one place.
//!
//! An error says whose fault it is (see [`Error`]): a variant must not blame the file or the caller
//! for a failure of fastdiff or of the machine. Skip codes are [`SkipCode`]s, compared as values,
//! never as strings.

use std::path::{Path, PathBuf};

/// Result alias used across the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Machine-readable reason of an error, as reports give it (see [`SkipCode::as_str`]).
///
/// Every [`Error`] has one because any failure of a sample can become a skip of its file; the
/// codes a report can hold are `io`, `decode`, `unsupported`, `too_large`, `too_small`, `changed`,
/// `cache_miss`, `corrupt`, `panic`, `resource` and `internal`. `invalid_argument` and `no_images` only label errors that are raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SkipCode {
    /// `io`: the file could not be opened or read.
    Io,
    /// `decode`: the bytes are not a decodable image of a supported format.
    Decode,
    /// `unsupported`: an image of a format (or a variant of one) this build cannot decode, such as
    /// AVIF, HEIF/HEIC or JPEG XL.
    Unsupported,
    /// `too_large`: more pixels than the configured limit.
    TooLarge,
    /// `too_small`: with `no_upscale`, smaller than one bucket step on a side.
    TooSmall,
    /// `changed`: the file changed since the scan.
    Changed,
    /// `cache_miss`: the cache holds no entry the sample needs (not built for it, or the file or
    /// the options changed since it was built).
    CacheMiss,
    /// `corrupt`: a cache file (shard or manifest) is damaged: truncated, unparsable, or an entry
    /// whose checksum does not match.
    Corrupt,
    /// `panic`: a panic (a bug in fastdiff or a library) while loading the file.
    Panic,
    /// `resource`: memory or a library handle could not be had.
    Resource,
    /// `internal`: a broken invariant of fastdiff.
    Internal,
    /// `invalid_argument`: a caller-supplied option is out of range.
    InvalidArgument,
    /// `no_images`: the dataset root holds no usable image.
    NoImages,
    /// `missing_mask`: with `mask_dir`, the image has no mask file of its relative stem.
    MissingMask,
    /// `missing_control`: with `control_dir`, the image has no control file of its relative stem
    /// in one of the control folders.
    MissingControl,
}

impl SkipCode {
    /// The code as reports and Python give it: `"io"`, `"decode"`, `"unsupported"`, `"too_large"`,
    /// `"too_small"`, `"changed"`, `"cache_miss"`, `"corrupt"`, `"panic"`, `"resource"`, `"internal"`, `"invalid_argument"`, `"no_images"`, `"missing_mask"`, `"missing_control"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            SkipCode::Io => "io",
            SkipCode::Decode => "decode",
            SkipCode::Unsupported => "unsupported",
            SkipCode::TooLarge => "too_large",
            SkipCode::TooSmall => "too_small",
            SkipCode::Changed => "changed",
            SkipCode::CacheMiss => "cache_miss",
            SkipCode::Corrupt => "corrupt",
            SkipCode::Panic => "panic",
            SkipCode::Resource => "resource",
            SkipCode::Internal => "internal",
            SkipCode::InvalidArgument => "invalid_argument",
            SkipCode::NoImages => "no_images",
            SkipCode::MissingMask => "missing_mask",
            SkipCode::MissingControl => "missing_control",
        }
    }

    /// The code named `name` ([`SkipCode::as_str`]), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        use SkipCode::*;
        [
            Io,
            Decode,
            Unsupported,
            TooLarge,
            TooSmall,
            Changed,
            CacheMiss,
            Corrupt,
            Panic,
            Resource,
            Internal,
            InvalidArgument,
            NoImages,
            MissingMask,
            MissingControl,
        ]
        .into_iter()
        .find(|c| c.as_str() == name)
    }
}

impl std::fmt::Display for SkipCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can go wrong in the core.
///
/// Three families, kept apart so that nobody is blamed for what they did not do: the file's fault
/// (`Io`, `Decode`, `Unsupported`, `TooLarge`, `Changed`, and `TooSmall`, a file the options cannot use;
/// for the cache, `CacheMiss`, an entry not built, and `Corrupt`, a damaged cache file), the
/// caller's (`InvalidArgument`, `NoImages`), and fastdiff's or the machine's (`Panic`, `Internal`,
/// `Resource`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// The bytes are an image, but of a format or variant this build does not decode; `what` names
    /// it ("AVIF", "TIFF colour type Rgb32F").
    #[error("Error while decoding {}: {what} is not supported by this build", path.display())]
    Unsupported { path: PathBuf, what: String },
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
    /// without enlarging it. The file is fine; the options cannot use it.
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
    /// The cache holds no entry a sample needs. `path` is the image file (or the cache folder for a
    /// lookup by key); `reason` says what is missing or what changed since the cache was built
    /// ("not in the cache", "content changed since the cache was built", "cached at bucket ...").
    #[error("Error while reading the cache for {}: {reason}", path.display())]
    CacheMiss { path: PathBuf, reason: String },
    /// A cache file is damaged: `path` is the shard or manifest, `reason` what is wrong with it (a
    /// truncated shard, an unparsable header, an entry's checksum mismatch naming the key).
    #[error("Error while reading the cache file {}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// A panic inside a decoder or transform, caught at the sample boundary: a bug in fastdiff or a
    /// library it uses, met while loading `path` (the file may be fine).
    #[error("internal error (a panic) while loading {}: {message}", path.display())]
    Panic { path: PathBuf, message: String },
    /// The machine could not provide what loading needs: memory the allocator refused (a batch
    /// buffer, or a buffer source out of memory), or a libjpeg-turbo handle (whose creation fails
    /// only for lack of memory). Neither the file's fault nor the arguments'.
    #[error("{0}")]
    Resource(String),
    /// Fastdiff itself went wrong: a broken invariant (a resize of buffers the pipeline sized
    /// itself failing, every worker thread gone), or an epoch iterator used in a forked child of
    /// the process whose threads it drives. The message says what and, where there is one, what to do.
    #[error("{0}")]
    Internal(String),
    /// A caller-supplied option is out of range; the message names the argument.
    #[error("{0}")]
    InvalidArgument(String),
    /// A file the scan had to skip, raised instead of skipped (`on_error = raise`); the message is the
    /// skip's own.
    #[error("{}", .0.message)]
    Skipped(Skip),
    /// An image lacks a conditioning file it needs: its mask (`mask` true) or a control image;
    /// `reason` names the folder, the stem looked for and a near miss if there is one.
    #[error("Error while pairing {}: {reason}", path.display())]
    MissingPair {
        path: PathBuf,
        mask: bool,
        reason: String,
    },
    /// The dataset root holds no image files (or does not exist as a folder).
    #[error("no images found in {}: {reason}", path.display())]
    NoImages { path: PathBuf, reason: String },
}

impl Error {
    /// The reason code used in reports (for [`Error::Skipped`], the skip's own).
    pub fn code(&self) -> SkipCode {
        match self {
            Error::Io { .. } => SkipCode::Io,
            Error::Decode { .. } => SkipCode::Decode,
            Error::Unsupported { .. } => SkipCode::Unsupported,
            Error::TooLarge { .. } => SkipCode::TooLarge,
            Error::TooSmall { .. } => SkipCode::TooSmall,
            Error::Changed { .. } => SkipCode::Changed,
            Error::CacheMiss { .. } => SkipCode::CacheMiss,
            Error::Corrupt { .. } => SkipCode::Corrupt,
            Error::Panic { .. } => SkipCode::Panic,
            Error::Resource(_) => SkipCode::Resource,
            Error::Internal(_) => SkipCode::Internal,
            Error::Skipped(skip) => skip.code,
            Error::InvalidArgument(_) => SkipCode::InvalidArgument,
            Error::NoImages { .. } => SkipCode::NoImages,
            Error::MissingPair { mask: true, .. } => SkipCode::MissingMask,
            Error::MissingPair { mask: false, .. } => SkipCode::MissingControl,
        }
    }

    /// The file the error is about, when there is one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Error::Io { path, .. }
            | Error::Decode { path, .. }
            | Error::Unsupported { path, .. }
            | Error::TooLarge { path, .. }
            | Error::TooSmall { path, .. }
            | Error::Changed { path, .. }
            | Error::CacheMiss { path, .. }
            | Error::Corrupt { path, .. }
            | Error::Panic { path, .. }
            | Error::NoImages { path, .. }
            | Error::MissingPair { path, .. } => Some(path),
            Error::Skipped(skip) => Some(&skip.path),
            Error::Resource(_) | Error::Internal(_) | Error::InvalidArgument(_) => None,
        }
    }

    /// Shorthand for [`Error::Decode`].
    pub fn decode(path: &Path, reason: impl Into<String>) -> Self {
        Error::Decode {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(path: &Path, what: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.to_path_buf(),
            what: what.into(),
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
    pub code: SkipCode,
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
