//! Test fixtures of the scan's tar shards: a small captioned folder and tars written from it with the
//! `tar` crate's builder. Test-only; nothing here is part of the library.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::tests::write_image;
use super::ImageEntry;
use image::ImageFormat as F;

/// A tar of `files` (name, bytes), in order, written with the `tar` crate's builder.
pub(super) fn write_tar(path: &Path, files: &[(&str, Vec<u8>)]) {
    let mut b = tar::Builder::new(File::create(path).unwrap());
    for (name, bytes) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, bytes.as_slice()).unwrap();
    }
    b.finish().unwrap();
}

/// A folder of images with captions, and the same files as (relative name, bytes).
pub(super) fn folder() -> (tempfile::TempDir, Vec<(String, Vec<u8>)>) {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    write_image(&r.join("a.jpg"), 40, 30, F::Jpeg);
    std::fs::write(r.join("a.txt"), "a caption\n").unwrap();
    write_image(&r.join("sub/dir/b.png"), 30, 44, F::Png);
    std::fs::write(r.join("sub/dir/b.txt"), "bee").unwrap();
    write_image(&r.join("sub/c.webp"), 20, 20, F::WebP);
    write_image(&r.join("sub.d.jpg"), 16, 8, F::Jpeg);
    let mut files = Vec::new();
    // In no particular order, but each caption next to its image: tests split this list in two.
    for name in [
        "sub/c.webp",
        "a.txt",
        "a.jpg",
        "sub.d.jpg",
        "sub/dir/b.txt",
        "sub/dir/b.png",
    ] {
        files.push((name.to_owned(), std::fs::read(r.join(name)).unwrap()));
    }
    (dir, files)
}

/// `files` as [`write_tar`] takes them.
pub(super) fn as_tar_files(files: &[(String, Vec<u8>)]) -> Vec<(&str, Vec<u8>)> {
    files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect()
}

/// An entry's path relative to `base` (its folder, or its shard).
pub(super) fn relative(e: &ImageEntry, base: &Path) -> PathBuf {
    e.path.strip_prefix(base).unwrap().to_path_buf()
}
