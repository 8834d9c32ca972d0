//! Tar shards for Python: a folder's image files with their captions (what `fastdiff shard` packs)
//! and a shard's sidecar index (`fastdiff index`).

use std::ffi::OsString;
use std::path::PathBuf;

use fastdiff_core::scan::{self, ScanOptions};
use pyo3::prelude::*;

use crate::errors::to_pyerr;

/// The image candidates of the folder `root` as the loader's scan finds them (see
/// `fastdiff_core::scan::scan`), sorted by path: `(images, skipped)`, `images` as `(path, caption
/// or None)`, `skipped` as the paths the scan could not use (kept so that a copy of the folder
/// reports them too).
#[pyfunction]
#[pyo3(signature = (root, caption_extensions, num_threads = 0))]
#[allow(clippy::type_complexity)]
pub(crate) fn scan_files(
    py: Python<'_>,
    root: PathBuf,
    caption_extensions: Vec<String>,
    num_threads: usize,
) -> PyResult<(Vec<(OsString, Option<String>)>, Vec<OsString>)> {
    let opts = ScanOptions {
        caption_extensions,
        num_threads,
        ..ScanOptions::default()
    };
    let s = py.detach(|| scan::scan(&root, &opts)).map_err(to_pyerr)?;
    let images = (s.images.into_iter())
        .map(|e| {
            (
                e.path.into_os_string(),
                e.caption_found.then_some(e.caption),
            )
        })
        .collect();
    let skipped = (s.skipped.into_iter()).map(|k| k.path.into_os_string());
    Ok((images, skipped.collect()))
}

/// Write the sidecar index of the tar shard `shard` (see `fastdiff_core::scan::write_index`):
/// `(index path, image members, bad members, tar error or None)`.
#[pyfunction]
#[pyo3(signature = (shard, caption_extensions, num_threads = 0))]
pub(crate) fn write_shard_index(
    py: Python<'_>,
    shard: PathBuf,
    caption_extensions: Vec<String>,
    num_threads: usize,
) -> PyResult<(OsString, usize, usize, Option<String>)> {
    let s = py
        .detach(|| scan::write_index(&shard, &caption_extensions, num_threads))
        .map_err(to_pyerr)?;
    Ok((
        s.path.into_os_string(),
        s.images,
        s.bad_members,
        s.tar_error,
    ))
}
