//! Dataset scan: find the image files under a folder, read their headers and captions.
//!
//! Only headers are read (format, size, EXIF orientation), never pixels, so a scan of a large folder
//! is I/O bound and fast. A file is an image candidate by its extension or, failing that, by its
//! first bytes (an image saved without or under a wrong extension is found too); every other file
//! is counted in [`PassedOver`], so nothing in the folder disappears unseen; the headers are enough to assign buckets and plan epochs. Files that cannot
//! be used are recorded as [`Skip`]s with the reason instead of aborting the scan, so one bad file in a
//! million does not stop training.
//!
//! It must not decode pixels or assign buckets (that is [`crate::bucket`], through the loader).

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::caption::decode_caption;
use crate::decode::{self, DecodeOptions, Header};
use crate::error::{Error, Result, Skip};
pub use tar::{scan_shards, Member};
pub use tar_index::{index_path, write_index, IndexSummary, INDEX_SUFFIX};
pub(crate) use walk::image_files;
use walk::{has_caption_extension, has_image_extension, starts_like_image, walk, Walk};

mod tar;
mod tar_index;
#[cfg(test)]
mod testkit;
mod walk;

/// Image file extensions accepted by the scan (compared case-insensitively, without the dot). The
/// formats named by `avif`, `heic` and `heif` are listed so that such files are reported as
/// `unsupported` skips instead of disappearing from the dataset unseen. Files with any other
/// extension are candidates too when their first bytes are an image's (see
/// [`decode::is_image_magic`]).
pub const IMAGE_EXTENSIONS: [&str; 14] = [
    "jpg", "jpeg", "jfif", "png", "webp", "bmp", "dib", "tif", "tiff", "gif", "avif", "heic",
    "heif", "jxl",
];

/// Options of [`scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanOptions {
    /// Caption file extensions to try, in order, each with its leading dot (`".txt"`); the first
    /// existing `<image stem><ext>` next to the image is its caption. Compared case-sensitively.
    /// Default `[".txt", ".caption"]`.
    pub caption_extensions: Vec<String>,
    /// Largest accepted image, in pixels (`width * height`); larger images are skipped with
    /// [`Error::TooLarge`]. Default 178,956,970 (Pillow's `MAX_IMAGE_PIXELS`).
    pub max_pixels: u64,
    /// Threads reading headers; 0 = `std::thread::available_parallelism()`. Default 0.
    pub num_threads: usize,
    /// Captions by image path (as the walk finds it: `root.join(relative)`), used instead of caption
    /// files when given (an HF imagefolder `metadata.jsonl`); an image not in the map has none.
    /// Default `None`.
    pub captions: Option<BTreeMap<PathBuf, String>>,
    /// The caption of an image without one (kohya's `class_tokens`); it still counts as missing
    /// ([`ImageEntry::caption_found`] is false). Default `None` (the empty caption).
    pub class_tokens: Option<String>,
    /// Tar shards whose local copy is made after the scan (a remote shard fetched once the loader
    /// knows which rank reads it): their index is used without the check of the shard's size and
    /// modification time, which the fetch makes instead. Default empty.
    pub pending_shards: HashSet<PathBuf>,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            caption_extensions: vec![".txt".into(), ".caption".into()],
            max_pixels: DecodeOptions::default().max_pixels,
            num_threads: 0,
            captions: None,
            class_tokens: None,
            pending_shards: HashSet::new(),
        }
    }
}

/// One usable image found by the scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageEntry {
    /// Path as found under the scan root (`root.join(relative)`; symlinks are not resolved).
    pub path: PathBuf,
    /// The file's header (stored size and EXIF orientation; see [`Header::upright_size`]).
    pub header: Header,
    /// Caption text (see [`crate::caption::read_caption`]); [`ScanOptions::class_tokens`] (or empty)
    /// when no caption file exists.
    pub caption: String,
    /// Whether a caption file was found (an existing but empty file counts as found).
    pub caption_found: bool,
    /// Whether the caption needed the fallback decoding (see
    /// [`crate::caption::Caption::fallback_encoding`]); false without a caption file.
    pub caption_fallback_encoding: bool,
    /// For a tar shard's member ([`scan_shards`]): where its bytes lie (`path` is then
    /// `<shard>/<member name>`, which names no file); `None` for a file.
    pub member: Option<Member>,
}

impl ImageEntry {
    /// The image's bytes: the whole file, or exactly the member's range of its shard.
    ///
    /// Errors: those of reading (`UnexpectedEof` for a shard truncated since the scan).
    pub fn read(&self) -> std::io::Result<Vec<u8>> {
        match &self.member {
            None => std::fs::read(&self.path),
            Some(m) => m.read(),
        }
    }
}

/// Files under the scan root that are not image candidates, by kind; with the candidates
/// ([`Scan::found`]) they account for every entry below the root.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassedOver {
    /// Files ending in one of the caption extensions (whether or not an image of their stem
    /// exists); never sniffed for image bytes, so a caption starting with "BM" stays a caption.
    pub caption_files: usize,
    /// Other files: no image extension and no image magic bytes (or unreadable first bytes).
    pub other_files: usize,
    /// Hidden entries directly met (a name starting with `.`: files, and folders, which are not
    /// entered, each counted once).
    pub hidden: usize,
}

impl std::ops::AddAssign for PassedOver {
    fn add_assign(&mut self, other: Self) {
        self.caption_files += other.caption_files;
        self.other_files += other.other_files;
        self.hidden += other.hidden;
    }
}

/// Result of [`scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// The folder that was scanned, as given.
    pub root: PathBuf,
    /// Candidate image files found: always `images.len() + skipped.len()`.
    pub found: usize,
    /// Usable images, sorted by path (so indices are stable across runs and machines).
    pub images: Vec<ImageEntry>,
    /// Candidates that cannot be used, with the reason, sorted by path.
    pub skipped: Vec<Skip>,
    /// Images in `images` without a caption file.
    pub captions_missing: usize,
    /// Images in `images` whose caption was not valid in its encoding and was decoded by fallback
    /// (see [`crate::caption::Caption::fallback_encoding`]).
    pub captions_fallback_encoding: usize,
    /// The files that are not image candidates, counted by kind.
    pub passed_over: PassedOver,
    /// Problems that lost nothing but are worth saying (a shard's stale index, ignored).
    pub warnings: Vec<String>,
    /// The tar shards listed without a current sidecar index (none, or a stale one), in the order
    /// given; empty for a folder.
    pub unindexed_shards: Vec<PathBuf>,
}

impl Scan {
    /// The scan of `root` from its images (in index order) and skips (sorted here by path), with
    /// the counts derived from them: `found`, `captions_missing`, `captions_fallback_encoding`.
    pub(crate) fn new(
        root: &Path,
        images: Vec<ImageEntry>,
        mut skipped: Vec<Skip>,
        passed_over: PassedOver,
        warnings: Vec<String>,
    ) -> Scan {
        skipped.sort_by(|a, b| a.path.cmp(&b.path));
        Scan {
            root: root.to_path_buf(),
            found: images.len() + skipped.len(),
            captions_missing: images.iter().filter(|e| !e.caption_found).count(),
            captions_fallback_encoding: (images.iter())
                .filter(|e| e.caption_fallback_encoding)
                .count(),
            images,
            skipped,
            passed_over,
            warnings,
            unindexed_shards: Vec::new(),
        }
    }
}

/// Scan `root` for images.
///
/// Walks recursively, following symlinks (a link cycle or unreadable folder is recorded as a skip, as
/// is a broken link whose name looks like an image). Accepts files ending in any of
/// [`IMAGE_EXTENSIONS`] (`.jpg .jpeg .jfif .png .webp .bmp .dib .tif .tiff .gif .avif .heic .heif
/// .jxl`) in any letter case, and any other file whose first 32 bytes are an image's
/// ([`decode::is_image_magic`]) except caption files; leaves out every hidden entry below `root`
/// (name starting with `.`, which includes macOS `._*` AppleDouble stubs and `.DS_Store`, and prunes
/// hidden folders). What is left out is counted in [`Scan::passed_over`]. Reads first bytes, headers
/// and captions in parallel on a rayon pool built for this call with `num_threads` threads and
/// dropped before returning — never rayon's global pool, whose threads do not survive a `fork()`
/// (PyTorch DataLoader workers fork).
///
/// Per file, these become [`Skip`]s rather than errors: unreadable or undecodable header (code `io`
/// or `decode`), an AVIF, HEIF/HEIC, JPEG XL or JPEG 2000 file (`unsupported`), zero width or height (`decode`), more than `max_pixels` pixels (`too_large`), and a
/// caption file that exists but cannot be read (`io`; the message names the caption file).
///
/// Errors: [`Error::NoImages`] if `root` is not a readable directory or holds no candidate image
/// file; [`Error::InvalidArgument`] if a caption extension does not start with `.` or is just `.`;
/// [`Error::Io`] (naming `root`) if the header-reading threads cannot be started.
pub fn scan(root: &Path, opts: &ScanOptions) -> Result<Scan> {
    validate_caption_extensions(&opts.caption_extensions)?;
    match std::fs::metadata(root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(no_images(root, "not a directory")),
        Err(e) => return Err(no_images(root, &e.to_string())),
    }
    let Walk {
        mut candidates,
        others,
        mut skipped,
        hidden,
    } = walk(root);
    let pool = scan_pool(root, opts, candidates.len().max(others.len()))?;
    let mut passed_over = PassedOver {
        hidden,
        ..PassedOver::default()
    };
    let (captions, others): (Vec<PathBuf>, Vec<PathBuf>) = others
        .into_iter()
        .partition(|p| has_caption_extension(p, &opts.caption_extensions));
    passed_over.caption_files = captions.len();
    let sniffed: Vec<bool> =
        pool.install(|| others.par_iter().map(|p| starts_like_image(p)).collect());
    for (path, image) in others.into_iter().zip(sniffed) {
        if image {
            candidates.push(path);
        } else {
            passed_over.other_files += 1;
        }
    }
    if candidates.is_empty() && skipped.is_empty() {
        return Err(no_images(
            root,
            &format!(
                "no files ending in {} (any case) or starting with an image's magic bytes",
                IMAGE_EXTENSIONS.map(|e| format!(".{e}")).join(" ")
            ),
        ));
    }
    candidates.sort();
    let probed: Vec<std::result::Result<ImageEntry, Skip>> =
        pool.install(|| candidates.par_iter().map(|p| probe_one(p, opts)).collect());
    drop(pool);

    let mut images = Vec::with_capacity(probed.len());
    for result in probed {
        match result {
            Ok(entry) => images.push(entry),
            Err(skip) => skipped.push(skip),
        }
    }
    Ok(Scan::new(root, images, skipped, passed_over, Vec::new()))
}

/// Check caption extensions: each must be a dot followed by at least one character.
///
/// Errors: [`Error::InvalidArgument`] naming `caption_extensions` and the bad value.
pub fn validate_caption_extensions(exts: &[String]) -> Result<()> {
    match exts.iter().find(|e| !e.starts_with('.') || e.len() < 2) {
        Some(bad) => Err(Error::InvalidArgument(format!(
            "caption_extensions entries must start with '.' followed by a name (like \".txt\"), \
             got {bad:?}"
        ))),
        None => Ok(()),
    }
}

/// The scan's threads: `opts.num_threads` (0 = the available parallelism), at most `work` (>= 1).
/// Errors: [`Error::Io`] naming `root` when the threads cannot be started.
fn scan_pool(root: &Path, opts: &ScanOptions, work: usize) -> Result<rayon::ThreadPool> {
    let threads = match opts.num_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.clamp(1, work.max(1)))
        .thread_name(|i| format!("fastdiff-scan-{i}"))
        .build()
        .map_err(|e| {
            Error::io(
                root,
                std::io::Error::other(format!("cannot start scan threads: {e}")),
            )
        })
}

fn no_images(root: &Path, reason: &str) -> Error {
    Error::NoImages {
        path: root.to_path_buf(),
        reason: reason.to_owned(),
    }
}

/// `<dir>/<stem><ext>` for the image `<dir>/<stem>.<image ext>`.
fn caption_path(image: &Path, ext: &str) -> PathBuf {
    let mut name = OsString::from(image.file_stem().unwrap_or_default());
    name.push(ext);
    image.with_file_name(name)
}

/// Header and caption of one candidate.
fn probe_one(path: &Path, opts: &ScanOptions) -> std::result::Result<ImageEntry, Skip> {
    let skip = |e: Error| Skip::new(path, &e);
    let header = decode::probe(path).map_err(skip)?;
    if header.width == 0 || header.height == 0 {
        return Err(skip(Error::decode(
            path,
            format!("image has no pixels ({}x{})", header.width, header.height),
        )));
    }
    if u64::from(header.width) * u64::from(header.height) > opts.max_pixels {
        return Err(skip(Error::TooLarge {
            path: path.to_path_buf(),
            width: header.width,
            height: header.height,
            limit: opts.max_pixels,
        }));
    }
    let mut entry = ImageEntry {
        path: path.to_path_buf(),
        header,
        caption: opts.class_tokens.clone().unwrap_or_default(),
        caption_found: false,
        caption_fallback_encoding: false,
        member: None,
    };
    if let Some(captions) = &opts.captions {
        if let Some(text) = captions.get(path) {
            entry.caption = text.clone();
            entry.caption_found = true;
        }
        return Ok(entry);
    }
    for ext in &opts.caption_extensions {
        let cap = caption_path(path, ext);
        match std::fs::read(&cap) {
            Ok(bytes) => {
                let c = decode_caption(&bytes);
                entry.caption = c.text;
                entry.caption_found = true;
                entry.caption_fallback_encoding = c.fallback_encoding;
                return Ok(entry);
            }
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(skip(Error::io(&cap, e))),
        }
    }
    Ok(entry)
}

#[cfg(test)]
pub(crate) mod tests;
