//! PyO3 bindings of fastdiff-core, exposed as the private module `fastdiff._fastdiff`.
//!
//! Only argument extraction, the one error map and GIL release live here; every decision about images
//! is made in `rust/core`. The public Python API (`fastdiff.DataLoader`) wraps these classes and turns the
//! numpy arrays into torch tensors without copying.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use fastdiff_core::caption::CaptionOptions;
use fastdiff_core::dataset::Subset;
use fastdiff_core::pipeline::{
    Batch, BufferSource, EpochIter, LoadStats, Loader, LoaderOptions, PixelBuffer, Report,
    StatsHandle,
};
use fastdiff_core::transform::OutputDtype;
use fastdiff_core::Error;
use numpy::ndarray::ArrayView4;
use numpy::PyArray4;
use pyo3::create_exception;
use pyo3::exceptions::{
    PyException, PyFileNotFoundError, PyOSError, PyPermissionError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

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
    "An image file could not be read as an image (corrupt, truncated, unsupported, too large, or changed since the scan). The message names the file and the cause."
);

/// How long a wait for a batch runs before Python gets a chance to handle signals (Ctrl-C).
const SIGNAL_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// The one map from core errors to Python exceptions.
fn to_pyerr(err: Error) -> PyErr {
    let msg = err.to_string();
    match &err {
        Error::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
            std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
            _ => PyOSError::new_err(msg),
        },
        Error::Skipped(skip) if skip.code == "io" => PyOSError::new_err(msg),
        Error::InvalidArgument(_) | Error::NoImages { .. } => PyValueError::new_err(msg),
        Error::Decode { .. }
        | Error::TooLarge { .. }
        | Error::TooSmall { .. }
        | Error::Changed { .. }
        | Error::Panic { .. }
        | Error::Skipped(_) => DecodeError::new_err(msg),
    }
}

fn parse<T: std::str::FromStr>(name: &str, value: &str) -> PyResult<T>
where
    T::Err: std::fmt::Display,
{
    value
        .parse()
        .map_err(|e| PyValueError::new_err(format!("invalid {name}={value:?}: {e}")))
}

/// One folder of a dataset and its per-subset options (see `fastdiff.Subset`).
#[pyclass(module = "fastdiff._fastdiff", frozen)]
struct NativeSubset {
    inner: Subset,
}

#[pymethods]
impl NativeSubset {
    #[new]
    #[pyo3(signature = (
        root, *, num_repeats = 1, is_reg = false, caption_extensions = None, captions = None,
        caption_per_line = false, caption_dropout_rate = 0.0, keep_tokens = 0, shuffle_caption = false,
        caption_tag_dropout_rate = 0.0, caption_separator = ",".to_owned(), flip_prob = None, crop = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        root: PathBuf,
        num_repeats: usize,
        is_reg: bool,
        caption_extensions: Option<Vec<String>>,
        captions: Option<HashMap<PathBuf, String>>,
        caption_per_line: bool,
        caption_dropout_rate: f64,
        keep_tokens: usize,
        shuffle_caption: bool,
        caption_tag_dropout_rate: f64,
        caption_separator: String,
        flip_prob: Option<f64>,
        crop: Option<&str>,
    ) -> PyResult<Self> {
        let inner = Subset {
            root,
            num_repeats,
            is_reg,
            caption_extensions,
            captions: captions.map(|c| c.into_iter().collect::<BTreeMap<_, _>>()),
            caption: CaptionOptions {
                caption_per_line,
                caption_dropout_rate,
                keep_tokens,
                shuffle_caption,
                caption_tag_dropout_rate,
                separator: caption_separator,
            },
            flip_prob,
            crop: crop.map(|c| parse("crop", c)).transpose()?,
        };
        inner.validate().map_err(to_pyerr)?;
        Ok(NativeSubset { inner })
    }
}

/// A scanned, bucketed image folder plus the options to load it (see `fastdiff.DataLoader`).
#[pyclass(module = "fastdiff._fastdiff", frozen)]
struct NativeLoader {
    inner: Loader,
}

#[pymethods]
impl NativeLoader {
    #[new]
    #[pyo3(signature = (
        subsets, *, resolution, batch_size, bucket_step, min_bucket_side, max_bucket_side, crop, flip_prob,
        shuffle, seed, drop_last, num_threads, prefetch, dtype, filter, caption_extensions, background,
        on_error, max_pixels, rank = 0, world_size = 1, remainder = "pad", no_upscale = false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        subsets: Vec<PyRef<'_, NativeSubset>>,
        resolution: u32,
        batch_size: usize,
        bucket_step: u32,
        min_bucket_side: Option<u32>,
        max_bucket_side: Option<u32>,
        crop: &str,
        flip_prob: f64,
        shuffle: bool,
        seed: u64,
        drop_last: bool,
        num_threads: usize,
        prefetch: usize,
        dtype: &str,
        filter: &str,
        caption_extensions: Vec<String>,
        background: [u8; 3],
        on_error: &str,
        max_pixels: u64,
        rank: usize,
        world_size: usize,
        remainder: &str,
        no_upscale: bool,
    ) -> PyResult<Self> {
        let opts = LoaderOptions {
            resolution,
            batch_size,
            bucket_step,
            min_bucket_side,
            max_bucket_side,
            no_upscale,
            crop: parse("crop", crop)?,
            flip_prob,
            shuffle,
            seed,
            drop_last,
            num_threads,
            prefetch,
            dtype: parse("dtype", dtype)?,
            filter: parse("filter", filter)?,
            caption_extensions,
            background,
            on_error: parse("on_error", on_error)?,
            max_pixels,
            rank,
            world_size,
            remainder: parse("remainder", remainder)?,
        };
        let subsets: Vec<Subset> = subsets.iter().map(|s| s.inner.clone()).collect();
        let inner = py
            .detach(|| Loader::from_subsets(subsets, opts))
            .map_err(to_pyerr)?;
        Ok(NativeLoader { inner })
    }

    /// Batches per epoch (exact).
    #[getter]
    fn num_batches(&self) -> usize {
        self.inner.num_batches()
    }

    /// Fingerprint of the scanned dataset (relative paths, headers, subset options), 16 hex digits.
    #[getter]
    fn dataset_digest(&self) -> String {
        format!("{:016x}", self.inner.dataset_digest())
    }

    /// Candidate buckets as (height, width) tuples in pixels.
    #[getter]
    fn buckets(&self) -> Vec<(u32, u32)> {
        self.inner
            .buckets()
            .iter()
            .map(|b| (b.height, b.width))
            .collect()
    }

    /// Caption of each image the scan accepted, in path order, as read from its file or metadata
    /// (before the subsets' caption operations); "" for an image without one.
    #[getter]
    fn captions(&self) -> Vec<String> {
        self.inner
            .images()
            .iter()
            .map(|e| e.caption.clone())
            .collect()
    }

    /// Scan and load report as a dict (see `fastdiff.DataLoader.report`).
    fn report<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        report_dict(py, &self.inner.report())
    }

    /// Start the worker threads for one epoch, from batch `start_batch` on.
    ///
    /// `buffer_factory`, if given, is called as `buffer_factory(nbytes)` once per batch (on the
    /// thread iterating, in plan order) and must return a contiguous 1-D `torch.uint8` CPU tensor of
    /// at least `nbytes` bytes aligned to 64 bytes (torch's allocators align far more), new for each
    /// call (its memory used by nothing else until the batch is dropped); the batch is written into
    /// it and `__next__` returns that tensor in place of the numpy array. The loader uses it to fill
    /// pinned tensors.
    #[pyo3(signature = (epoch, start_batch = 0, buffer_factory = None))]
    fn iter_epoch(
        &self,
        py: Python<'_>,
        epoch: u64,
        start_batch: usize,
        buffer_factory: Option<Py<PyAny>>,
    ) -> NativeEpochIter {
        let factory_error = Arc::new(Mutex::new(None));
        let source = buffer_factory.map(|factory| {
            Box::new(PyBufferSource {
                factory,
                error: Arc::clone(&factory_error),
            }) as Box<dyn BufferSource>
        });
        let it = py.detach(|| self.inner.iter_epoch_into(epoch, start_batch, source));
        NativeEpochIter {
            stats: it.stats_handle(),
            inner: Mutex::new(Some(it)),
            factory_error,
        }
    }
}

/// Iterator over one epoch's batches; dropping it stops and joins its worker threads.
#[pyclass(module = "fastdiff._fastdiff")]
struct NativeEpochIter {
    inner: Mutex<Option<EpochIter>>,
    /// Readable after the iterator is closed.
    stats: StatsHandle,
    /// The exception of a failed `buffer_factory` call, raised as itself (a `KeyboardInterrupt`
    /// stays one) rather than as the core's error.
    factory_error: Arc<Mutex<Option<PyErr>>>,
}

#[pymethods]
impl NativeEpochIter {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// Next batch as (pixels, captions, original_sizes, crop_top_lefts, target_sizes, paths, is_reg,
    /// subsets), `subsets` being each sample's subset index.
    ///
    /// `pixels` is a C-contiguous numpy array [B, 3, H, W]: uint8 for dtype "uint8", float32 for
    /// "float32", and uint16 bit patterns for "float16"/"bfloat16" (viewed as such by the caller).
    ///
    /// Waits with the GIL released, in slices of 100 ms so that Ctrl-C raises `KeyboardInterrupt`
    /// promptly (the iterator is then closed and its threads joined).
    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyTuple>>> {
        loop {
            let ready = py.detach(|| {
                let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
                guard
                    .as_ref()
                    .is_none_or(|it| it.wait_ready(SIGNAL_CHECK_INTERVAL))
            });
            if ready {
                break;
            }
            if let Err(interrupt) = py.check_signals() {
                self.close(py);
                return Err(interrupt);
            }
        }
        let next = py.detach(|| {
            let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let item = guard.as_mut().and_then(Iterator::next);
            if item.is_none() {
                // Finished: join the threads now rather than at garbage collection.
                *guard = None;
            }
            item
        });
        match next {
            None => Ok(None),
            Some(Err(e)) => {
                self.close(py);
                let factory_error = self
                    .factory_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                Err(factory_error.unwrap_or_else(|| to_pyerr(e)))
            }
            Some(Ok(batch)) => batch_tuple(py, batch).map(Some),
        }
    }

    /// Batches left in this epoch.
    fn __len__(&self, py: Python<'_>) -> usize {
        // The GIL is released before locking: the thread advancing the iterator may hold the lock
        // while it calls the buffer factory, which needs the GIL.
        py.detach(|| {
            let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            guard.as_ref().map_or(0, EpochIter::remaining)
        })
    }

    /// Where this epoch's time went so far (final once the iterator is exhausted or closed).
    ///
    /// Returns:
    ///     A dict of counts (`samples` loaded, `failed`, `batches` yielded, worker `threads`) and
    ///     times in seconds: per stage summed over worker threads (`read_s`, `probe_s`, `decode_s`,
    ///     `resize_s`, `write_s`, `other_s`; they add up to `busy_s`), `idle_s` (workers waiting for
    ///     work), `queue_wait_s` (the consumer waiting for a batch) and `wall_s` (the epoch so far).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats_dict(py, &self.stats.snapshot())
    }

    /// Stop the worker threads and wait for them (also done when the iterator is dropped).
    fn close(&self, py: Python<'_>) {
        py.detach(|| {
            let taken = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
            drop(taken);
        });
    }
}

/// Batch memory from the loader's pool, kept alive by the numpy arrays viewing it; dropping the
/// last view gives the memory back to the pool for the next batch.
#[pyclass(module = "fastdiff._fastdiff", frozen)]
struct BatchMemory {
    _pixels: PixelBuffer,
}

/// Calls a Python `buffer_factory(nbytes)` for each batch's memory (see `NativeLoader.iter_epoch`).
struct PyBufferSource {
    factory: Py<PyAny>,
    /// Where a failed call's exception is left for `NativeEpochIter.__next__` to raise.
    error: Arc<Mutex<Option<PyErr>>>,
}

// SAFETY: every tensor is checked to be a CPU `torch.Tensor` (host memory, e.g. pinned) of uint8,
// one-dimensional and contiguous, with at least `bytes` bytes from its data pointer to the end of
// its storage; the tensor is the owner, so the memory lives as long as the batch. That nothing else
// uses the memory meanwhile is the factory's documented contract (`fastdiff.DataLoader` allocates a
// new tensor per batch).
unsafe impl BufferSource for PyBufferSource {
    fn buffer(
        &mut self,
        bytes: usize,
    ) -> Result<(std::ptr::NonNull<u8>, Box<dyn std::any::Any + Send>), Error> {
        Python::attach(|py| {
            let torch = py.import("torch")?;
            let tensor = self.factory.bind(py).call1((bytes,))?;
            let fail = |what: String| {
                Err(PyValueError::new_err(format!(
                    "buffer_factory({bytes}) must return a 1-D contiguous uint8 CPU torch.Tensor of at \
                     least {bytes} bytes; got {what}"
                )))
            };
            if !tensor.is_instance(&torch.getattr("Tensor")?)? {
                return fail(format!("a {}", tensor.get_type().name()?));
            }
            let device: String = tensor.getattr("device")?.getattr("type")?.extract()?;
            let uint8 = tensor.getattr("dtype")?.eq(torch.getattr("uint8")?)?;
            let dim: usize = tensor.call_method0("dim")?.extract()?;
            let contiguous: bool = tensor.call_method0("is_contiguous")?.extract()?;
            if device != "cpu" || !uint8 || dim != 1 || !contiguous {
                return fail(format!(
                    "device {device}, dtype {}, {dim} dimensions, contiguous {contiguous}",
                    tensor.getattr("dtype")?
                ));
            }
            let nbytes: usize = tensor.getattr("nbytes")?.extract()?;
            let storage: usize = tensor
                .call_method0("untyped_storage")?
                .call_method0("nbytes")?
                .extract()?;
            let offset: usize = tensor.call_method0("storage_offset")?.extract()?;
            if nbytes < bytes || storage.saturating_sub(offset) < bytes {
                return fail(format!("{nbytes} bytes"));
            }
            let address: usize = tensor.call_method0("data_ptr")?.extract()?;
            let ptr = std::ptr::NonNull::new(address as *mut u8)
                .ok_or_else(|| PyValueError::new_err("buffer_factory returned a null data_ptr"))?;
            Ok((
                ptr,
                Box::new(tensor.unbind()) as Box<dyn std::any::Any + Send>,
            ))
        })
        .map_err(|e: PyErr| {
            let error = Error::InvalidArgument(format!("buffer_factory failed: {e}"));
            *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            error
        })
    }
}

/// The batch pixels for Python: a numpy array `[B, 3, H, W]` viewing pool memory (uint8, float32,
/// or uint16 bit patterns for the half types), or the `buffer_factory` tensor the batch was written
/// into (1-D uint8, at least the batch's bytes; the caller views it).
fn pixels_object<'py>(
    py: Python<'py>,
    pixels: PixelBuffer,
    shape: (usize, usize, usize, usize),
) -> PyResult<Bound<'py, PyAny>> {
    fn view<'py, T: numpy::Element>(
        py: Python<'py>,
        pixels: PixelBuffer,
        shape: (usize, usize, usize, usize),
    ) -> PyResult<Bound<'py, PyAny>> {
        if shape.0 * shape.1 * shape.2 * shape.3 != pixels.len() {
            return Err(FastdiffError::new_err(format!(
                "batch buffer holds {} values, not {shape:?}",
                pixels.len()
            )));
        }
        // SAFETY: the buffer holds `len` initialised, aligned values of T (checked above and by the
        // dtype match in the caller); the view is only used to create the numpy array, whose base
        // object owns the buffer, so the memory outlives the array.
        let arr = unsafe { ArrayView4::from_shape_ptr(shape, pixels.as_ptr().cast::<T>()) };
        let owner = Bound::new(py, BatchMemory { _pixels: pixels })?;
        // SAFETY: `owner` keeps the memory alive and unchanged for as long as the array exists.
        Ok(unsafe { PyArray4::borrow_from_array(&arr, owner.into_any()) }.into_any())
    }
    match pixels.dtype() {
        OutputDtype::U8 => view::<u8>(py, pixels, shape),
        OutputDtype::F32 => view::<f32>(py, pixels, shape),
        OutputDtype::F16 | OutputDtype::BF16 => view::<u16>(py, pixels, shape),
    }
}

fn batch_tuple(py: Python<'_>, batch: Batch) -> PyResult<Bound<'_, PyTuple>> {
    let n = batch.samples.len();
    let shape = (
        n,
        3,
        batch.bucket.height as usize,
        batch.bucket.width as usize,
    );
    let pixels = match batch.pixels.into_owner() {
        Ok(owner) => match owner.downcast::<Py<PyAny>>() {
            Ok(tensor) => tensor.into_bound(py),
            Err(_) => return Err(FastdiffError::new_err("batch memory of an unknown owner")),
        },
        Err(pool_memory) => pixels_object(py, pool_memory, shape)?,
    };
    let captions = PyList::new(py, batch.samples.iter().map(|s| s.caption.as_str()))?;
    let original_sizes = PyList::new(py, batch.samples.iter().map(|s| s.original_size))?;
    let crop_top_lefts = PyList::new(py, batch.samples.iter().map(|s| s.crop_top_left))?;
    let target_sizes = PyList::new(py, batch.samples.iter().map(|s| s.target_size))?;
    let paths = PyList::new(py, batch.samples.iter().map(|s| s.path.as_os_str()))?;
    let is_reg = PyList::new(py, batch.samples.iter().map(|s| s.is_reg))?;
    let subsets = PyList::new(py, batch.samples.iter().map(|s| s.subset))?;
    PyTuple::new(
        py,
        [
            pixels,
            captions.into_any(),
            original_sizes.into_any(),
            crop_top_lefts.into_any(),
            target_sizes.into_any(),
            paths.into_any(),
            is_reg.into_any(),
            subsets.into_any(),
        ],
    )
}

fn report_dict<'py>(py: Python<'py>, r: &Report) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("root", r.root.as_os_str())?;
    d.set_item("found", r.found)?;
    d.set_item("loaded", r.loaded)?;
    let skipped = PyList::empty(py);
    for s in &r.skipped {
        let item = PyDict::new(py);
        item.set_item("path", s.path.as_os_str())?;
        item.set_item("code", s.code)?;
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
    let per_bucket = PyList::empty(py);
    for (b, n) in &r.images_per_bucket {
        per_bucket.append(((b.height, b.width), n))?;
    }
    d.set_item("images_per_bucket", per_bucket)?;
    d.set_item("samples", r.samples)?;
    let hw = |v: &[(fastdiff_core::bucket::Bucket, usize)]| -> Vec<((u32, u32), usize)> {
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
        subsets.append(item)?;
    }
    d.set_item("subsets", subsets)?;
    Ok(d)
}

fn stats_dict<'py>(py: Python<'py>, s: &LoadStats) -> PyResult<Bound<'py, PyDict>> {
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

/// The native module `fastdiff._fastdiff`.
#[pymodule]
fn _fastdiff(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<NativeSubset>()?;
    m.add_class::<NativeLoader>()?;
    m.add_class::<NativeEpochIter>()?;
    m.add_class::<BatchMemory>()?;
    m.add("FastdiffError", py.get_type::<FastdiffError>())?;
    m.add("DecodeError", py.get_type::<DecodeError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
