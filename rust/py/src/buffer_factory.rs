//! The Python `buffer_factory` as a core [`BufferSource`]: each batch's memory from a torch tensor,
//! checked before any worker writes through its pointer.
//!
//! The only torch-specific code of the bindings. It must accept nothing that is not host memory
//! owned by a 1-D contiguous uint8 CPU `torch.Tensor` large enough for the batch; a failed call's
//! Python exception is kept to be raised as itself.

use std::sync::{Arc, Mutex};

use fastdiff_core::pipeline::BufferSource;
use fastdiff_core::Error;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Calls a Python `buffer_factory(nbytes)` for each batch's memory (see `NativeLoader.iter_epoch`).
pub(crate) struct PyBufferSource {
    factory: Py<PyAny>,
    /// Where a failed call's exception is left for `NativeEpochIter.__next__` to raise.
    error: Arc<Mutex<Option<PyErr>>>,
}

impl PyBufferSource {
    /// Call `factory` for each batch; a failed call's exception is left in `error`.
    pub(crate) fn new(factory: Py<PyAny>, error: Arc<Mutex<Option<PyErr>>>) -> Self {
        PyBufferSource { factory, error }
    }
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
            // Stands in for the Python exception, which the epoch iterator raises instead.
            let error = Error::Resource(format!("buffer_factory failed: {e}"));
            *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            error
        })
    }
}
