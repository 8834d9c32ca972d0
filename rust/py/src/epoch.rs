//! `NativeEpochIter`: one epoch's batches for Python, waited for with the GIL released and in
//! short slices so that Ctrl-C stays prompt.
//!
//! Owns the core's epoch iterator; dropping or closing it joins the worker threads. It must never
//! hold the GIL while waiting for a batch or for the iterator's lock.

use std::sync::{Arc, Mutex};

use fastdiff_core::pipeline::{EpochIter, StatsHandle};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::convert::{batch_tuple, stats_dict};
use crate::errors::to_pyerr;

/// How long a wait for a batch runs before Python gets a chance to handle signals (Ctrl-C).
const SIGNAL_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Iterator over one epoch's batches; dropping it stops and joins its worker threads.
#[pyclass(module = "fastdiff._fastdiff")]
pub(crate) struct NativeEpochIter {
    inner: Mutex<Option<EpochIter>>,
    /// Readable after the iterator is closed.
    stats: StatsHandle,
    /// The exception of a failed `buffer_factory` call, raised as itself (a `KeyboardInterrupt`
    /// stays one) rather than as the core's error.
    factory_error: Arc<Mutex<Option<PyErr>>>,
    /// Whether batches carry the cache items (with a cache, or for the cache build).
    cache_items: bool,
}

impl NativeEpochIter {
    /// Wrap a started epoch; `factory_error` is where its buffer source leaves a failed call's
    /// exception; `cache_items`: batches carry the cache items (see `__next__`).
    pub(crate) fn new(
        it: EpochIter,
        factory_error: Arc<Mutex<Option<PyErr>>>,
        cache_items: bool,
    ) -> Self {
        NativeEpochIter {
            stats: it.stats_handle(),
            inner: Mutex::new(Some(it)),
            factory_error,
            cache_items,
        }
    }
}

#[pymethods]
impl NativeEpochIter {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// Next batch as (pixels, captions, original_sizes, crop_top_lefts, target_sizes, paths, is_reg,
    /// subsets), `subsets` being each sample's subset index; with a cache, for the cache build or
    /// with conditioning views followed by (tensors, latent_keys, text_keys, latent_provenance): the
    /// cached tensors then the view tensors (`masks`, `masks_latent`, `control_pixel_values`) as
    /// (name, dtype name, array), each sample's keys (32 hex digits or None) and the JSON of its
    /// latent entry's provenance. `pixels` is None without pixels.
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
            Some(Ok(batch)) => batch_tuple(py, batch, self.cache_items).map(Some),
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
