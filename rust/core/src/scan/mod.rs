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

use std::collections::BTreeMap;
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
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            caption_extensions: vec![".txt".into(), ".caption".into()],
            max_pixels: DecodeOptions::default().max_pixels,
            num_threads: 0,
            captions: None,
            class_tokens: None,
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
    let threads = match opts.num_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .clamp(1, candidates.len().max(others.len()).max(1));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("fastdiff-scan-{i}"))
        .build()
        .map_err(|e| {
            Error::io(
                root,
                std::io::Error::other(format!("cannot start scan threads: {e}")),
            )
        })?;
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
pub(crate) mod tests {
    use super::*;
    use crate::decode::ImageFormat;
    use crate::error::SkipCode;
    use std::os::unix::fs::symlink;

    /// Write a `w`x`h` RGB image whose pixel (x, y) is `color(x, y)`, encoded as `format`
    /// (whatever the file name says). JPEG at quality 95.
    pub(crate) fn write_image_with(
        path: &Path,
        w: u32,
        h: u32,
        format: image::ImageFormat,
        color: impl Fn(u32, u32) -> [u8; 3],
    ) {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb(color(x, y)));
        let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
        match format {
            image::ImageFormat::Jpeg => {
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut file, 95)
                    .encode_image(&img)
                    .unwrap();
            }
            other => img.write_to(&mut file, other).unwrap(),
        }
    }

    /// A gradient image (distinct pixels, so crops and flips are visible).
    pub(crate) fn write_image(path: &Path, w: u32, h: u32, format: image::ImageFormat) {
        write_image_with(path, w, h, format, |x, y| {
            [
                (x * 7 % 256) as u8,
                (y * 5 % 256) as u8,
                ((x + y) % 256) as u8,
            ]
        });
    }

    fn names(root: &Path, paths: impl IntoIterator<Item = PathBuf>) -> Vec<String> {
        paths
            .into_iter()
            .map(|p| p.strip_prefix(root).unwrap().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn scan_finds_images_skips_bad_ones_and_pairs_captions() {
        use image::ImageFormat as F;
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        let put = |name: &str, bytes: &[u8]| {
            let p = r.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        };
        write_image(&r.join("a.jpg"), 40, 30, F::Jpeg);
        put("a.txt", b"a caption\r\n");
        write_image(&r.join("B.PNG"), 30, 40, F::Png);
        put("B.caption", b"bee");
        write_image(&r.join("c.JPEG"), 64, 64, F::Jpeg);
        put("c.txt", b"first");
        put("c.caption", b"second");
        write_image(&r.join("d.Jfif"), 50, 20, F::Jpeg);
        write_image(&r.join("e.webp"), 20, 20, F::WebP);
        put("e.txt", b"it\x92s");
        write_image(&r.join("nested/sub/f.png"), 10, 10, F::Png);
        put("nested/sub/f.txt", b"");
        symlink(r.join("nested"), r.join("linkdir")).unwrap();
        // JPEG bytes behind a .png name: the format comes from the magic bytes.
        write_image(&r.join("renamed.png"), 12, 8, F::Jpeg);
        // Ignored: hidden files and folders, AppleDouble stubs, Finder metadata, other files.
        write_image(&r.join(".hidden.png"), 10, 10, F::Png);
        write_image(&r.join(".hiddendir/g.png"), 10, 10, F::Png);
        put("._a.jpg", b"\x00\x05\x16\x07AppleDouble");
        put("nested/._f.png", b"\x00\x05\x16\x07AppleDouble");
        put(".DS_Store", b"\x00\x00\x00\x01Bud1");
        put("notes.txt", b"not an image");
        put("readme.md", b"# readme");
        symlink(r.join("nowhere.txt"), r.join("dangling.txt")).unwrap();
        // Skipped, with reasons.
        symlink(r.join("nowhere.jpg"), r.join("broken.jpg")).unwrap();
        put("corrupt.png", b"this is not a png");
        write_image(&r.join("big.png"), 100, 100, F::Png);
        write_image(&r.join("h.jpg"), 10, 10, F::Jpeg);
        std::fs::create_dir(r.join("h.txt")).unwrap();

        let opts = ScanOptions {
            max_pixels: 5000,
            num_threads: 3,
            ..ScanOptions::default()
        };
        let s = scan(r, &opts).unwrap();
        assert_eq!(s.root, r);
        assert_eq!(
            names(r, s.images.iter().map(|e| e.path.clone())),
            [
                "B.PNG",
                "a.jpg",
                "c.JPEG",
                "d.Jfif",
                "e.webp",
                "linkdir/sub/f.png",
                "nested/sub/f.png",
                "renamed.png"
            ]
        );
        let skipped: Vec<(String, SkipCode)> = s
            .skipped
            .iter()
            .map(|k| {
                let name = k
                    .path
                    .strip_prefix(r)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                (name, k.code)
            })
            .collect();
        assert_eq!(
            skipped,
            [
                ("big.png".to_owned(), SkipCode::TooLarge),
                ("broken.jpg".to_owned(), SkipCode::Io),
                ("corrupt.png".to_owned(), SkipCode::Decode),
                ("h.jpg".to_owned(), SkipCode::Io),
            ]
        );
        // The unreadable caption is named in the image's skip message.
        assert!(
            s.skipped[3].message.contains("h.txt"),
            "{}",
            s.skipped[3].message
        );
        assert!(s.skipped[1].message.contains("broken.jpg"));
        assert_eq!(s.found, 12);
        assert_eq!(s.found, s.images.len() + s.skipped.len());
        // Caption-named files (the link's copy of f.txt and the dangling .txt link included), the
        // readme, and the hidden entries (linkdir's ._f.png too).
        let passed_over = PassedOver {
            caption_files: 9,
            other_files: 1,
            hidden: 6,
        };
        assert_eq!(s.passed_over, passed_over);

        let by_name = |n: &str| s.images.iter().find(|e| e.path == r.join(n)).unwrap();
        let a = by_name("a.jpg");
        assert_eq!(
            (a.header.format, a.header.width, a.header.height),
            (ImageFormat::Jpeg, 40, 30)
        );
        assert_eq!((a.caption.as_str(), a.caption_found), ("a caption", true));
        assert_eq!(by_name("B.PNG").header.format, ImageFormat::Png);
        assert_eq!(by_name("B.PNG").caption, "bee");
        assert_eq!(by_name("c.JPEG").caption, "first");
        assert!(!by_name("d.Jfif").caption_found);
        assert_eq!(by_name("d.Jfif").header.format, ImageFormat::Jpeg);
        let e = by_name("e.webp");
        assert_eq!(e.header.format, ImageFormat::WebP);
        assert_eq!(e.caption, "it\u{2019}s");
        assert!(e.caption_fallback_encoding);
        let f = by_name("nested/sub/f.png");
        assert_eq!((f.caption.as_str(), f.caption_found), ("", true));
        assert_eq!(by_name("renamed.png").header.format, ImageFormat::Jpeg);
        assert_eq!(s.captions_missing, 2);
        assert_eq!(s.captions_fallback_encoding, 1);
    }

    #[test]
    fn images_are_found_by_magic_bytes_whatever_their_name() {
        use image::ImageFormat as F;
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        write_image(&r.join("photo"), 8, 6, F::Png);
        write_image(&r.join("scan.dat"), 8, 6, F::Jpeg);
        write_image(&r.join("sub/x.jpg.part"), 8, 6, F::Bmp);
        std::fs::write(r.join("photo.txt"), "BMW on a road").unwrap();
        std::fs::write(r.join("notes.md"), "BM is not a bitmap here").unwrap();
        std::fs::write(r.join("empty"), "").unwrap();
        let s = scan(r, &ScanOptions::default()).unwrap();
        assert_eq!(
            names(r, s.images.iter().map(|e| e.path.clone())),
            ["photo", "scan.dat", "sub/x.jpg.part"]
        );
        let formats: Vec<ImageFormat> = s.images.iter().map(|e| e.header.format).collect();
        assert_eq!(
            formats,
            [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Bmp]
        );
        // The caption-named file is never sniffed and pairs with the extensionless image.
        assert_eq!(s.images[0].caption, "BMW on a road");
        assert_eq!((s.found, s.skipped.len()), (3, 0));
        let passed_over = PassedOver {
            caption_files: 1,
            other_files: 2,
            hidden: 0,
        };
        assert_eq!(s.passed_over, passed_over);
    }

    #[test]
    fn scan_is_the_same_for_any_thread_count() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..20 {
            let fmt = if i % 2 == 0 {
                image::ImageFormat::Png
            } else {
                image::ImageFormat::Jpeg
            };
            write_image(
                &dir.path().join(format!("d{}/{i}.img.png", i % 3)),
                8 + i,
                9,
                fmt,
            );
        }
        let one = scan(
            dir.path(),
            &ScanOptions {
                num_threads: 1,
                ..Default::default()
            },
        )
        .unwrap();
        let many = scan(
            dir.path(),
            &ScanOptions {
                num_threads: 4,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(one, many);
        assert_eq!(one.images.len(), 20);
        let paths: Vec<&PathBuf> = one.images.iter().map(|e| &e.path).collect();
        let mut sorted = paths.clone();
        sorted.sort();
        assert_eq!(paths, sorted);
        // A multi-dot name keeps its full stem for the caption: "3.img.png" -> "3.img.txt".
        assert_eq!(
            caption_path(Path::new("/x/3.img.png"), ".txt"),
            Path::new("/x/3.img.txt")
        );
    }

    #[test]
    fn max_pixels_is_inclusive() {
        let dir = tempfile::tempdir().unwrap();
        write_image(&dir.path().join("a.png"), 10, 10, image::ImageFormat::Png);
        let at = |max_pixels| {
            let s = scan(
                dir.path(),
                &ScanOptions {
                    max_pixels,
                    ..Default::default()
                },
            )
            .unwrap();
            (s.images.len(), s.skipped.len())
        };
        assert_eq!(at(100), (1, 0));
        assert_eq!(at(99), (0, 1));
    }

    #[test]
    fn symlink_loop_is_reported_not_followed_forever() {
        let dir = tempfile::tempdir().unwrap();
        write_image(&dir.path().join("sub/a.png"), 4, 4, image::ImageFormat::Png);
        symlink(dir.path(), dir.path().join("sub/loop")).unwrap();
        let s = scan(dir.path(), &ScanOptions::default()).unwrap();
        assert_eq!(s.images.len(), 1);
        assert_eq!(s.skipped.len(), 1);
        assert_eq!(s.skipped[0].path, dir.path().join("sub/loop"));
        assert_eq!(s.skipped[0].code, SkipCode::Io);
    }

    #[test]
    fn hidden_root_is_scanned() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join(".dataset");
        write_image(&root.join("a.png"), 4, 4, image::ImageFormat::Png);
        assert_eq!(
            scan(&root, &ScanOptions::default()).unwrap().images.len(),
            1
        );
    }

    #[test]
    fn no_images_and_bad_options_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ScanOptions::default();
        let missing = dir.path().join("missing");
        let err = scan(&missing, &opts).unwrap_err();
        assert_eq!(err.code(), SkipCode::NoImages);
        assert_eq!(err.path(), Some(missing.as_path()));

        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        write_image(
            &dir.path().join(".hidden.png"),
            4,
            4,
            image::ImageFormat::Png,
        );
        let err = scan(dir.path(), &opts).unwrap_err();
        assert_eq!(err.code(), SkipCode::NoImages);
        assert!(err.to_string().contains(".jpg"), "{err}");

        let err = scan(&dir.path().join("notes.txt"), &opts).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");

        for bad in ["txt", ".", ""] {
            let o = ScanOptions {
                caption_extensions: vec![".txt".into(), bad.into()],
                ..ScanOptions::default()
            };
            let err = scan(dir.path(), &o).unwrap_err();
            assert!(err.to_string().contains("caption_extensions"), "{err}");
        }
    }

    #[test]
    fn a_captions_map_replaces_caption_files() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.png"), dir.path().join("sub/b.png"));
        write_image_with(&a, 8, 8, image::ImageFormat::Png, |_, _| [1, 2, 3]);
        write_image_with(&b, 8, 8, image::ImageFormat::Png, |_, _| [1, 2, 3]);
        std::fs::write(dir.path().join("a.txt"), "from the file").unwrap();
        std::fs::write(dir.path().join("sub/b.txt"), "from the file").unwrap();
        let o = ScanOptions {
            captions: Some([(b.clone(), "from the map".to_owned())].into()),
            ..ScanOptions::default()
        };
        let s = scan(dir.path(), &o).unwrap();
        let got: Vec<(&Path, &str, bool)> = s
            .images
            .iter()
            .map(|e| (e.path.as_path(), e.caption.as_str(), e.caption_found))
            .collect();
        assert_eq!(
            got,
            [
                (a.as_path(), "", false),
                (b.as_path(), "from the map", true)
            ]
        );
        assert_eq!(s.captions_missing, 1);
    }
}
