//! The cache for Python: `ShardWriter` (the builder writes shards), `CacheStore` (coverage, reads
//! for tests), the key functions and `cache_gc`.
//!
//! Extracts arguments and releases the GIL around hashing, copying and file work; every decision
//! is the core's (`fastdiff_core::cache`). Tensor bytes come in through the buffer protocol by way
//! of `numpy.frombuffer` (a view, no copy: the abi3 build has no direct buffer API), so any
//! C-contiguous buffer works: a numpy array, a `memoryview`, `bytes`, or a CPU torch tensor as
//! `tensor.contiguous().view(torch.uint8).numpy()`.

use std::collections::HashSet;
use std::path::PathBuf;

use fastdiff_core::cache::{
    self, parse_dtype, parse_key, Key, Kind, ShardWriter as CoreShardWriter, Store,
};
use fastdiff_core::transform::{FilterType, OutputDtype, Placement};
use numpy::{IntoPyArray, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::convert::parse;
use crate::errors::to_pyerr;

fn key(s: &str) -> PyResult<Key> {
    parse_key(s).map_err(to_pyerr)
}

/// One shard being written into a cache folder (see `fastdiff_core::cache::ShardWriter`).
#[pyclass(module = "fastdiff._fastdiff")]
pub(crate) struct ShardWriter {
    /// `None` once finished or aborted.
    inner: Option<CoreShardWriter>,
}

impl ShardWriter {
    fn writer(&mut self) -> PyResult<&mut CoreShardWriter> {
        self.inner
            .as_mut()
            .ok_or_else(|| PyValueError::new_err("this ShardWriter is already finished or aborted"))
    }
}

#[pymethods]
impl ShardWriter {
    /// Start a shard of `kind` (`"latents"` or `"text"`) in the existing folder `cache_dir`.
    #[new]
    fn new(cache_dir: PathBuf, kind: &str) -> PyResult<Self> {
        let kind: Kind = parse("kind", kind)?;
        let inner = CoreShardWriter::new(&cache_dir, kind).map_err(to_pyerr)?;
        Ok(ShardWriter { inner: Some(inner) })
    }

    /// Add entry `key` (32 hex): `meta` a JSON object of provenance, `tensors` a list of
    /// `(name, dtype "bf16"|"f16"|"f32", shape, buffer)` with `buffer` C-contiguous little-endian
    /// elements. Copied and checksummed with the GIL released.
    fn add(
        &mut self,
        py: Python<'_>,
        key: &str,
        meta: &str,
        tensors: Vec<(String, String, Vec<usize>, Bound<'_, PyAny>)>,
    ) -> PyResult<()> {
        let k = self::key(key)?;
        let frombuffer = py.import("numpy")?.getattr("frombuffer")?;
        let mut views = Vec::with_capacity(tensors.len());
        let mut dtypes = Vec::with_capacity(tensors.len());
        for (name, dtype, _, buffer) in &tensors {
            dtypes.push(parse_dtype(dtype).map_err(to_pyerr)?);
            let view = frombuffer.call1((buffer, "uint8")).map_err(|e| {
                PyValueError::new_err(format!(
                    "tensor {name:?} of entry {key}: not a C-contiguous buffer: {e}"
                ))
            })?;
            views.push(view.extract::<PyReadonlyArray1<'_, u8>>()?);
        }
        let slices = views
            .iter()
            .map(|v| {
                v.as_slice()
                    .map_err(|e| PyValueError::new_err(e.to_string()))
            })
            .collect::<PyResult<Vec<&[u8]>>>()?;
        let args: Vec<cache::TensorArg<'_>> = tensors
            .iter()
            .zip(dtypes)
            .zip(slices)
            .map(|(((name, _, shape, _), dtype), bytes)| (name.as_str(), dtype, &shape[..], bytes))
            .collect();
        let writer = self.writer()?;
        py.detach(|| writer.add(&k, meta, &args)).map_err(to_pyerr)
    }

    /// Bytes of tensor data added so far (held in memory until `finish`).
    #[getter]
    fn nbytes(&mut self) -> PyResult<u64> {
        Ok(self.writer()?.bytes())
    }

    /// Entries added so far.
    fn __len__(&mut self) -> PyResult<usize> {
        Ok(self.writer()?.len())
    }

    /// Write `.<name>.partial`, fsync, rename into place (GIL released); returns the shard's path.
    fn finish(&mut self, py: Python<'_>) -> PyResult<String> {
        self.writer()?;
        let writer = self.inner.take().expect("checked above");
        let path = py.detach(|| writer.finish()).map_err(to_pyerr)?;
        Ok(path.to_string_lossy().into_owned())
    }

    /// Discard the entries; no file is written.
    fn abort(&mut self) {
        self.inner = None;
    }
}

/// A cache folder opened for reading (see `fastdiff_core::cache::Store`).
#[pyclass(module = "fastdiff._fastdiff", frozen)]
pub(crate) struct CacheStore {
    inner: Store,
}

#[pymethods]
impl CacheStore {
    /// Open `cache_dir`: its manifest and every shard header (GIL released).
    #[new]
    fn new(py: Python<'_>, cache_dir: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| Store::open(&cache_dir)).map_err(to_pyerr)?;
        Ok(CacheStore { inner })
    }

    /// Whether each key (32 hex) is served.
    fn contains(&self, keys: Vec<String>) -> PyResult<Vec<bool>> {
        keys.iter()
            .map(|k| Ok(self.inner.contains(&key(k)?)))
            .collect()
    }

    /// The served keys of `kind` (`"latents"` or `"text"`), sorted.
    fn keys(&self, kind: &str) -> PyResult<Vec<String>> {
        let kind: Kind = parse("kind", kind)?;
        let mut keys: Vec<String> = self.inner.keys(kind).map(cache::key_hex).collect();
        keys.sort_unstable();
        Ok(keys)
    }

    /// `(path, reason)` of each shard not served.
    fn corrupt_shards(&self) -> Vec<(String, String)> {
        self.inner
            .corrupt_shards()
            .iter()
            .map(|(p, why)| (p.to_string_lossy().into_owned(), why.clone()))
            .collect()
    }

    /// The salt (hex) of the manifest's `kind` half (`"latents"` or `"text"`), or None when the
    /// manifest lacks that half.
    fn salt(&self, kind: &str) -> PyResult<Option<String>> {
        let m = self.inner.manifest();
        let salt = match parse("kind", kind)? {
            Kind::Latents => m.latents.as_ref().map(|l| l.salt),
            Kind::Text => m.text.as_ref().map(|t| t.salt),
        };
        Ok(salt.as_ref().map(cache::key_hex))
    }

    /// The manifest's `failed`: `(content hash hex, reason)` of each image the builder could not
    /// decode, sorted by hash.
    fn failed(&self) -> Vec<(String, String)> {
        let mut failed: Vec<(String, String)> = (self.inner.manifest().failed.iter())
            .map(|(k, why)| (cache::key_hex(k), why.clone()))
            .collect();
        failed.sort_unstable();
        failed
    }

    /// The entry's metadata JSON, or None when not served.
    fn provenance(&self, key: &str) -> PyResult<Option<String>> {
        Ok(self.inner.provenance(&self::key(key)?).map(str::to_string))
    }

    /// Entry `key`'s tensors, checksum verified: name -> numpy array of its shape (float32,
    /// float16, or uint16 bit patterns of bf16).
    fn read<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Bound<'py, PyDict>> {
        let k = self::key(key)?;
        let Some(tensors) = self.inner.tensors(&k) else {
            // The store's own miss error, naming the folder and the key.
            return Err(to_pyerr(self.inner.read_entry(&k, &mut []).unwrap_err()));
        };
        let mut bufs: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, d, shape)| vec![0u8; shape.iter().product::<usize>() * d.bytes_per_value()])
            .collect();
        let mut outs: Vec<(&str, &mut [u8])> = tensors
            .iter()
            .zip(bufs.iter_mut())
            .map(|((name, _, _), buf)| (*name, &mut buf[..]))
            .collect();
        py.detach(|| self.inner.read_entry(&k, &mut outs))
            .map_err(to_pyerr)?;
        let out = PyDict::new(py);
        for ((name, dtype, shape), buf) in tensors.iter().zip(bufs) {
            let numpy_dtype = match dtype {
                OutputDtype::U8 => "uint8",
                OutputDtype::F32 => "float32",
                OutputDtype::F16 => "float16",
                OutputDtype::BF16 => "uint16",
            };
            let array = buf
                .into_pyarray(py)
                .call_method1("view", (numpy_dtype,))?
                .call_method1("reshape", (PyTuple::new(py, shape.iter())?,))?;
            out.set_item(*name, array)?;
        }
        Ok(out)
    }
}

/// `content_hash(data) -> str`: blake3 of `data`, first 16 bytes as 32 hex.
#[pyfunction]
pub(crate) fn content_hash(py: Python<'_>, data: &[u8]) -> String {
    cache::key_hex(&py.detach(|| cache::content_hash(data)))
}

/// The latent key of one sample (see `fastdiff_core::cache::latent_key`).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub(crate) fn latent_key(
    content_hash: &str,
    bucket: (u32, u32),
    resized: (u32, u32),
    crop: (u32, u32),
    flip: bool,
    filter: &str,
    background: (u8, u8, u8),
    salt: &str,
) -> PyResult<String> {
    let filter: FilterType = parse("filter", filter)?;
    let p = Placement {
        resized,
        crop_left: crop.0,
        crop_top: crop.1,
        flip,
        bucket,
    };
    let (r, g, b) = background;
    Ok(cache::key_hex(&cache::latent_key(
        &key(content_hash)?,
        &p,
        filter.name(),
        [r, g, b],
        &key(salt)?,
    )))
}

/// The text key of one final caption (see `fastdiff_core::cache::text_key`).
#[pyfunction]
pub(crate) fn text_key(caption: &str, salt: &str) -> PyResult<String> {
    Ok(cache::key_hex(&cache::text_key(caption, &key(salt)?)))
}

/// Delete partials, corrupt shards and shards serving no live key; the report as a dict.
#[pyfunction]
pub(crate) fn cache_gc<'py>(
    py: Python<'py>,
    cache_dir: PathBuf,
    live_latent_keys: Vec<String>,
    live_text_keys: Vec<String>,
) -> PyResult<Bound<'py, PyDict>> {
    let live = live_latent_keys
        .iter()
        .chain(&live_text_keys)
        .map(|k| key(k))
        .collect::<PyResult<HashSet<Key>>>()?;
    let r = py
        .detach(|| cache::gc(&cache_dir, &live))
        .map_err(to_pyerr)?;
    let out = PyDict::new(py);
    out.set_item("partials", r.partials)?;
    out.set_item("corrupt", r.corrupt)?;
    out.set_item("orphans", r.orphans)?;
    out.set_item("kept", r.kept)?;
    out.set_item("bytes_freed", r.bytes_freed)?;
    Ok(out)
}
