//! Conversions at the boundary: option strings to core types, and core results (batches, reports,
//! stats) to Python objects.
//!
//! Builds values only; it must not decide anything about loading, and it holds no state.

use fastdiff_core::bucket::Bucket;
use fastdiff_core::cache::{key_hex, Key};
use fastdiff_core::pipeline::{Batch, LoadStats, PixelBuffer, Report};
use fastdiff_core::transform::OutputDtype;
use numpy::ndarray::{ArrayViewD, IxDyn};
use numpy::PyArrayDyn;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::errors::FastdiffError;

pub(crate) fn parse<T: std::str::FromStr>(name: &str, value: &str) -> PyResult<T>
where
    T::Err: std::fmt::Display,
{
    value
        .parse()
        .map_err(|e| PyValueError::new_err(format!("invalid {name}={value:?}: {e}")))
}

/// Batch memory from the loader's pool, kept alive by the numpy arrays viewing it; dropping the
/// last view gives the memory back to the pool for the next batch.
#[pyclass(module = "fastdiff._fastdiff", frozen)]
pub(crate) struct BatchMemory {
    _pixels: PixelBuffer,
}

/// A batch buffer for Python: a C-contiguous numpy array of `shape` viewing pool memory (uint8,
/// float32, or uint16 bit patterns for the half types); the pixels and every cached tensor go
/// through here.
fn array_object<'py>(
    py: Python<'py>,
    buffer: PixelBuffer,
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    fn view<'py, T: numpy::Element>(
        py: Python<'py>,
        buffer: PixelBuffer,
        shape: &[usize],
    ) -> PyResult<Bound<'py, PyAny>> {
        if shape.iter().product::<usize>() != buffer.len() {
            return Err(FastdiffError::new_err(format!(
                "batch buffer holds {} values, not {shape:?}",
                buffer.len()
            )));
        }
        // SAFETY: the buffer holds `len` initialised, aligned values of T (checked above and by the
        // dtype match in the caller); the view is only used to create the numpy array, whose base
        // object owns the buffer, so the memory outlives the array.
        let arr = unsafe { ArrayViewD::from_shape_ptr(IxDyn(shape), buffer.as_ptr().cast::<T>()) };
        let owner = Bound::new(py, BatchMemory { _pixels: buffer })?;
        // SAFETY: `owner` keeps the memory alive and unchanged for as long as the array exists.
        Ok(unsafe { PyArrayDyn::borrow_from_array(&arr, owner.into_any()) }.into_any())
    }
    match buffer.dtype() {
        OutputDtype::U8 => view::<u8>(py, buffer, shape),
        OutputDtype::F32 => view::<f32>(py, buffer, shape),
        OutputDtype::F16 | OutputDtype::BF16 => view::<u16>(py, buffer, shape),
    }
}

/// A batch as the tuple `NativeEpochIter.__next__` documents: 8 items, plus the 4 cache items
/// (tensors, latent keys, text keys, provenance) when `cache_items` or when the batch has tensors
/// (the conditioning views).
pub(crate) fn batch_tuple(
    py: Python<'_>,
    batch: Batch,
    cache_items: bool,
) -> PyResult<Bound<'_, PyTuple>> {
    let n = batch.samples.len();
    let shape = [
        n,
        3,
        batch.bucket.height as usize,
        batch.bucket.width as usize,
    ];
    let pixels = if batch.pixels.is_empty() {
        py.None().into_bound(py)
    } else {
        match batch.pixels.into_owner() {
            Ok(owner) => match owner.downcast::<Py<PyAny>>() {
                Ok(tensor) => tensor.into_bound(py),
                Err(_) => return Err(FastdiffError::new_err("batch memory of an unknown owner")),
            },
            Err(pool_memory) => array_object(py, pool_memory, &shape)?,
        }
    };
    let captions = PyList::new(py, batch.samples.iter().map(|s| s.caption.as_str()))?;
    let original_sizes = PyList::new(py, batch.samples.iter().map(|s| s.original_size))?;
    let crop_top_lefts = PyList::new(py, batch.samples.iter().map(|s| s.crop_top_left))?;
    let target_sizes = PyList::new(py, batch.samples.iter().map(|s| s.target_size))?;
    let paths = PyList::new(py, batch.samples.iter().map(|s| s.path.as_os_str()))?;
    let is_reg = PyList::new(py, batch.samples.iter().map(|s| s.is_reg))?;
    let subsets = PyList::new(py, batch.samples.iter().map(|s| s.subset))?;
    let tensors = PyList::empty(py);
    for (name, buffer, shape) in batch.tensors {
        let dtype = buffer.dtype().name();
        tensors.append((name, dtype, array_object(py, buffer, &shape)?))?;
    }
    let hex = |k: &Option<Key>| k.as_ref().map(key_hex);
    let latent_keys = PyList::new(py, batch.samples.iter().map(|s| hex(&s.latent_key)))?;
    let text_keys = PyList::new(py, batch.samples.iter().map(|s| hex(&s.text_key)))?;
    let provenance = PyList::new(py, batch.samples.iter().map(|s| s.latent_provenance()))?;
    let mut items = vec![
        pixels,
        captions.into_any(),
        original_sizes.into_any(),
        crop_top_lefts.into_any(),
        target_sizes.into_any(),
        paths.into_any(),
        is_reg.into_any(),
        subsets.into_any(),
    ];
    if cache_items || !tensors.is_empty() {
        items.extend([
            tensors.into_any(),
            latent_keys.into_any(),
            text_keys.into_any(),
            provenance.into_any(),
        ]);
    }
    PyTuple::new(py, items)
}

pub(crate) fn report_dict<'py>(py: Python<'py>, r: &Report) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("root", r.root.as_os_str())?;
    d.set_item("found", r.found)?;
    d.set_item("loaded", r.loaded)?;
    d.set_item("held_out", r.held_out)?;
    let skipped = PyList::empty(py);
    for s in &r.skipped {
        let item = PyDict::new(py);
        item.set_item("path", s.path.as_os_str())?;
        item.set_item("code", s.code.as_str())?;
        item.set_item("message", &s.message)?;
        skipped.append(item)?;
    }
    d.set_item("skipped", skipped)?;
    let formats = PyDict::new(py);
    for (k, v) in &r.formats {
        formats.set_item(k, v)?;
    }
    d.set_item("formats", formats)?;
    d.set_item("min_size", (r.min_size.1, r.min_size.0))?;
    d.set_item("max_size", (r.max_size.1, r.max_size.0))?;
    d.set_item("captions_missing", r.captions_missing)?;
    d.set_item("captions_fallback_encoding", r.captions_fallback_encoding)?;
    let passed_over = PyDict::new(py);
    passed_over.set_item("caption_files", r.passed_over.caption_files)?;
    passed_over.set_item("other_files", r.passed_over.other_files)?;
    passed_over.set_item("hidden", r.passed_over.hidden)?;
    d.set_item("passed_over", passed_over)?;
    let per_bucket = PyList::empty(py);
    for (b, n) in &r.images_per_bucket {
        per_bucket.append(((b.height, b.width), n))?;
    }
    d.set_item("images_per_bucket", per_bucket)?;
    d.set_item("samples", r.samples)?;
    let hw = |v: &[(Bucket, usize)]| -> Vec<((u32, u32), usize)> {
        v.iter().map(|(b, n)| ((b.height, b.width), *n)).collect()
    };
    d.set_item("small_buckets", hw(&r.small_buckets))?;
    let subsets = PyList::empty(py);
    for s in &r.subsets {
        let item = PyDict::new(py);
        item.set_item("root", s.root.as_os_str())?;
        item.set_item("is_reg", s.is_reg)?;
        item.set_item("num_repeats", s.num_repeats)?;
        item.set_item("images", s.images)?;
        item.set_item("images_per_bucket", hw(&s.images_per_bucket))?;
        item.set_item("images_trained", s.images_trained)?;
        subsets.append(item)?;
    }
    d.set_item("subsets", subsets)?;
    d.set_item("images_trained", r.images_trained)?;
    let m = &r.bucket_merges;
    let merges = PyDict::new(py);
    merges.set_item("images_moved", m.images_moved)?;
    merges.set_item("samples_moved", m.samples_moved)?;
    merges.set_item("mean_aspect_error", m.mean_aspect_error)?;
    merges.set_item("max_aspect_error", m.max_aspect_error)?;
    merges.set_item("mean_extra_crop", m.mean_extra_crop)?;
    merges.set_item("max_extra_crop", m.max_extra_crop)?;
    let moves = PyList::empty(py);
    for (from, to, n) in &m.moves {
        moves.append(((from.height, from.width), (to.height, to.width), n))?;
    }
    merges.set_item("moves", moves)?;
    d.set_item("bucket_merges", merges)?;
    d.set_item("warnings", &r.warnings)?;
    let own: Option<Vec<_>> =
        (r.own_shards.as_ref()).map(|v| v.iter().map(|p| p.as_os_str()).collect());
    d.set_item("own_shards", own)?;
    let io = PyList::empty(py);
    for s in &r.io {
        let item = PyDict::new(py);
        item.set_item("shard", s.shard.as_os_str())?;
        item.set_item("opens", s.opens)?;
        item.set_item("bytes", s.bytes)?;
        io.append(item)?;
    }
    d.set_item("io", io)?;
    Ok(d)
}

pub(crate) fn stats_dict<'py>(py: Python<'py>, s: &LoadStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("samples", s.samples)?;
    d.set_item("failed", s.failed)?;
    d.set_item("batches", s.batches)?;
    d.set_item("threads", s.threads)?;
    for (k, v) in [
        ("read_s", s.read_s),
        ("probe_s", s.probe_s),
        ("decode_s", s.decode_s),
        ("resize_s", s.resize_s),
        ("write_s", s.write_s),
        ("other_s", s.other_s),
        ("busy_s", s.busy_s),
        ("idle_s", s.idle_s),
        ("queue_wait_s", s.queue_wait_s),
        ("wall_s", s.wall_s),
    ] {
        d.set_item(k, v)?;
    }
    Ok(d)
}
