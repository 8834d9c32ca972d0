//! The scan's folder walk: which files are image candidates (by extension, or by their first bytes
//! whatever their name), which are passed over, and which walk errors are reported.
//!
//! Reads directory entries and at most the first 32 bytes of a file; headers are [`super`]'s job.

use std::io::Read;
use std::path::{Path, PathBuf};

use walkdir::WalkDir;

use super::IMAGE_EXTENSIONS;
use crate::decode;
use crate::error::{Error, Skip};

fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().starts_with(b".")
}

pub(super) fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Whether the file name ends in one of `exts` (each with its dot, compared case-sensitively as
/// caption lookups are).
pub(super) fn has_caption_extension(path: &Path, exts: &[String]) -> bool {
    let name = path.file_name().unwrap_or_default().as_encoded_bytes();
    exts.iter().any(|e| name.ends_with(e.as_bytes()))
}

/// Whether the file's first 32 bytes announce an image ([`decode::is_image_magic`]); an unreadable
/// file is not one (it is counted as passed over).
pub(super) fn starts_like_image(path: &Path) -> bool {
    let mut head = Vec::with_capacity(32);
    std::fs::File::open(path)
        .and_then(|f| f.take(32).read_to_end(&mut head))
        .is_ok_and(|_| decode::is_image_magic(&head))
}

/// What the walk met below the root.
pub(super) struct Walk {
    /// Files with an image extension, sorted by path.
    pub(super) candidates: Vec<PathBuf>,
    /// Every other regular, non-hidden file.
    pub(super) others: Vec<PathBuf>,
    /// The walk errors worth reporting.
    pub(super) skipped: Vec<Skip>,
    /// Hidden entries left out.
    pub(super) hidden: usize,
}

/// The files below `root` with an image extension (any letter case), hidden entries left out,
/// sorted by path; walk errors are passed over. What a conditioning folder is paired from.
pub(crate) fn image_files(root: &Path) -> Vec<PathBuf> {
    walk(root).candidates
}

pub(super) fn walk(root: &Path) -> Walk {
    let mut candidates = Vec::new();
    let mut others = Vec::new();
    let mut skipped = Vec::new();
    let mut hidden = 0;
    let walker = WalkDir::new(root)
        .follow_links(true)
        .into_iter()
        // Depth 0 is the root itself, which may legitimately live in a hidden folder.
        .filter_entry(|e| {
            let keep = e.depth() == 0 || !is_hidden(e.file_name());
            hidden += usize::from(!keep);
            keep
        });
    for item in walker {
        match item {
            Ok(entry) => {
                if entry.file_type().is_file() {
                    if has_image_extension(entry.path()) {
                        candidates.push(entry.into_path());
                    } else {
                        others.push(entry.into_path());
                    }
                }
            }
            Err(err) => {
                // Errors bypass filter_entry, so hidden names are filtered here too. An entry with
                // a non-image extension (a dangling `notes.txt` link) is passed over like any other
                // file (its first bytes cannot be read); everything else (image-named links, unreadable folders, link cycles) is reported
                // so that no part of the dataset disappears silently.
                let Some(path) = err.path().map(Path::to_path_buf) else {
                    continue;
                };
                let hidden = path.file_name().is_some_and(is_hidden);
                let other_file = path.extension().is_some() && !has_image_extension(&path);
                if other_file {
                    others.push(path);
                } else if !hidden {
                    skipped.push(Skip::new(&path, &Error::io(&path, err.into())));
                }
            }
        }
    }
    candidates.sort();
    Walk {
        candidates,
        others,
        skipped,
        hidden,
    }
}
