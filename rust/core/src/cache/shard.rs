//! The shard file format, and [`ShardWriter`], which writes one shard atomically.
//!
//! A shard is a genuine safetensors file (header serialized by the `safetensors` crate) named
//! `latents-<16 hex>.safetensors` or `text-<16 hex>.safetensors`. Its tensors are named
//! `<key hex>/<tensor>`; its `__metadata__` holds `"format": "fastdiff-cache-1"`, `"kind"` and, per
//! entry, `"<key hex>": "<json>"`: the caller's provenance object plus `"checksum"`, the first 16
//! bytes (32 hex) of blake3 over the entry's tensor bytes in tensor-name order.
//!
//! Writing: entries accumulate in memory (the caller bounds a shard by [`ShardWriter::bytes`]);
//! [`ShardWriter::finish`] writes `.<name>.partial` in the cache folder, fsyncs it, renames it to
//! `<name>` and fsyncs the folder. A killed process leaves at most a `.partial`, which readers
//! ignore and `gc` removes; a dropped writer leaves nothing. Tensors are laid out by descending
//! element size (as the `safetensors` crate does), so every tensor is aligned to its element size.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use serde_json::Value;

use super::key::{content_hash, key_hex, Key};
use super::manifest::FORMAT;
use crate::error::{Error, Result};
use crate::transform::OutputDtype;

/// The largest header `safetensors` readers accept (the crate's `MAX_HEADER_SIZE`).
const MAX_HEADER_BYTES: usize = 100_000_000;

/// Which half of the cache a shard belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// VAE latents, keyed by [`super::latent_key`]; `"latents"`.
    Latents,
    /// Text-encoder outputs, keyed by [`super::text_key`]; `"text"`.
    Text,
}

impl Kind {
    /// `"latents"` or `"text"`: the shard name prefix and its `kind` metadata.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Latents => "latents",
            Kind::Text => "text",
        }
    }
}

impl FromStr for Kind {
    type Err = Error;

    /// `"latents"` or `"text"`; anything else is [`Error::InvalidArgument`] naming `kind`.
    fn from_str(s: &str) -> Result<Kind> {
        match s {
            "latents" => Ok(Kind::Latents),
            "text" => Ok(Kind::Text),
            _ => Err(Error::InvalidArgument(format!(
                "kind must be \"latents\" or \"text\", got {s:?}"
            ))),
        }
    }
}

/// The kind of a shard file named `name`, or `None` when `name` is not a shard's
/// (`latents-<16 lowercase hex>.safetensors` or `text-<16 lowercase hex>.safetensors`).
pub fn shard_kind(name: &str) -> Option<Kind> {
    let (kind, rest) = name.split_once('-')?;
    let kind = kind.parse().ok()?;
    let suffix = rest.strip_suffix(".safetensors")?;
    let hex = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
    (suffix.len() == 16 && suffix.bytes().all(hex)).then_some(kind)
}

/// Whether `name` is a shard's partial file (`.<shard name>.partial`).
pub fn is_partial(name: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|n| n.strip_suffix(".partial"))
        .is_some_and(|n| shard_kind(n).is_some())
}

/// The safetensors dtype of a stored element type.
pub(super) fn st_dtype(d: OutputDtype) -> Dtype {
    match d {
        OutputDtype::U8 => Dtype::U8,
        OutputDtype::F32 => Dtype::F32,
        OutputDtype::F16 => Dtype::F16,
        OutputDtype::BF16 => Dtype::BF16,
    }
}

/// The stored element type of a safetensors dtype, if the cache can hold it.
pub(super) fn from_st_dtype(d: Dtype) -> Option<OutputDtype> {
    match d {
        Dtype::U8 => Some(OutputDtype::U8),
        Dtype::F32 => Some(OutputDtype::F32),
        Dtype::F16 => Some(OutputDtype::F16),
        Dtype::BF16 => Some(OutputDtype::BF16),
        _ => None,
    }
}

/// One tensor given to [`ShardWriter::add`]: `(name, dtype, shape, little-endian bytes)`.
pub type TensorArg<'a> = (&'a str, OutputDtype, &'a [usize], &'a [u8]);

/// A tensor waiting in the writer's buffer.
struct Pending {
    name: String,
    dtype: OutputDtype,
    shape: Vec<usize>,
    bytes: Range<usize>,
}

/// One shard being written: entries in memory until [`ShardWriter::finish`] writes the file.
///
/// Dropping it (or an error in `finish`) discards everything, including any `.partial` file.
pub struct ShardWriter {
    dir: PathBuf,
    kind: Kind,
    name: String,
    data: Vec<u8>,
    tensors: Vec<Pending>,
    metadata: HashMap<String, String>,
    keys: HashSet<Key>,
    /// The `.partial` file while `finish` writes it; removed on drop unless renamed.
    partial: Option<PathBuf>,
}

impl ShardWriter {
    /// Start a shard of `kind` in the cache folder `dir`, under a fresh random name.
    ///
    /// Errors: [`Error::Io`] when `dir` is not an existing folder.
    pub fn new(dir: &Path, kind: Kind) -> Result<ShardWriter> {
        let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
        if !meta.is_dir() {
            let e = std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a folder");
            return Err(Error::io(dir, e));
        }
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("kind".to_string(), kind.name().to_string()),
        ]);
        Ok(ShardWriter {
            dir: dir.to_path_buf(),
            kind,
            name: format!("{}-{}.safetensors", kind.name(), random_suffix()),
            data: Vec::new(),
            tensors: Vec::new(),
            metadata,
            keys: HashSet::new(),
            partial: None,
        })
    }

    /// The file name the shard gets when finished, e.g. `latents-0123456789abcdef.safetensors`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The shard's kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Add entry `key`: `meta_json` is its provenance, a JSON object (e.g. `{"path": ..., "bucket":
    /// [w, h], "crop": [left, top], "resized": [w, h], "flip": false}` for latents, `{"caption":
    /// ...}` for text) to which the checksum is added; `tensors` are `(name, dtype, shape, bytes)`
    /// with `bytes` the little-endian elements, `product(shape) * dtype size` long.
    ///
    /// Errors: [`Error::InvalidArgument`] naming the key when it is already in this shard, there is
    /// no tensor, a tensor name is empty, repeated or holds `/`, a length does not match its shape,
    /// or `meta_json` is not a JSON object or already has a `"checksum"`.
    pub fn add(&mut self, key: &Key, meta_json: &str, tensors: &[TensorArg<'_>]) -> Result<()> {
        let hex = key_hex(key);
        let bad = |why: String| Error::InvalidArgument(format!("cache entry {hex}: {why}"));
        if self.keys.contains(key) {
            return Err(bad("already added to this shard".into()));
        }
        if tensors.is_empty() {
            return Err(bad("an entry needs at least one tensor".into()));
        }
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by_key(|&i| tensors[i].0);
        for (j, &i) in order.iter().enumerate() {
            let (name, dtype, shape, bytes) = tensors[i];
            if name.is_empty() || name.contains('/') {
                return Err(bad(format!(
                    "tensor name {name:?} must be non-empty without '/'"
                )));
            }
            if j > 0 && tensors[order[j - 1]].0 == name {
                return Err(bad(format!("tensor {name:?} given twice")));
            }
            let want = shape
                .iter()
                .try_fold(dtype.bytes_per_value(), |n, &d| n.checked_mul(d));
            if want != Some(bytes.len()) {
                return Err(bad(format!(
                    "tensor {name:?} of shape {shape:?} {} has {} bytes, expected {}",
                    dtype.name(),
                    bytes.len(),
                    want.map_or("too many".to_string(), |n| n.to_string())
                )));
            }
        }
        let mut meta = match serde_json::from_str::<Value>(meta_json) {
            Ok(Value::Object(m)) => m,
            _ => {
                return Err(bad(format!(
                    "meta must be a JSON object, got {meta_json:?}"
                )))
            }
        };
        if meta.contains_key("checksum") {
            return Err(bad(
                "meta must not have a \"checksum\" (the writer adds it)".into(),
            ));
        }
        // Hash the copy, not the caller's memory: what is checksummed is what gets written, even
        // if the caller's buffer changes meanwhile.
        let entry_start = self.data.len();
        for &i in &order {
            let (name, dtype, shape, bytes) = tensors[i];
            let start = self.data.len();
            self.data.extend_from_slice(bytes);
            self.tensors.push(Pending {
                name: format!("{hex}/{name}"),
                dtype,
                shape: shape.to_vec(),
                bytes: start..self.data.len(),
            });
        }
        let checksum = content_hash(&self.data[entry_start..]);
        meta.insert("checksum".into(), Value::String(key_hex(&checksum)));
        self.metadata.insert(hex, Value::Object(meta).to_string());
        self.keys.insert(*key);
        Ok(())
    }

    /// Bytes of tensor data added so far (the shard file is this plus its header).
    pub fn bytes(&self) -> u64 {
        self.data.len() as u64
    }

    /// Entries added so far.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no entry was added.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Write the shard: `.<name>.partial`, fsync, rename to `<name>`, fsync the folder. Returns the
    /// shard's path. The GIL-free part of a Python `finish`.
    ///
    /// Errors: [`Error::InvalidArgument`] when no entry was added or the header would exceed the
    /// safetensors limit of 100 MB (finish shards earlier); [`Error::Io`] naming the file for a
    /// failed write (the partial file is removed).
    pub fn finish(mut self) -> Result<PathBuf> {
        if self.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "shard {} has no entries to write",
                self.name
            )));
        }
        let header = self.header()?;
        let partial = self.dir.join(format!(".{}.partial", self.name));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&partial)
            .map_err(|e| Error::io(&partial, e))?;
        self.partial = Some(partial.clone());
        let io = |e| Error::io(&partial, e);
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&header).map_err(io)?;
        for t in self.layout() {
            w.write_all(&self.data[t.bytes.clone()]).map_err(io)?;
        }
        let file = w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        drop(file);
        let path = self.dir.join(&self.name);
        std::fs::rename(&partial, &path).map_err(io)?;
        self.partial = None;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(&self.dir, e))?;
        Ok(path)
    }

    /// The tensors in file order: by descending element size, then as added (stable).
    fn layout(&self) -> Vec<&Pending> {
        let mut order: Vec<&Pending> = self.tensors.iter().collect();
        order.sort_by_key(|t| std::cmp::Reverse(t.dtype.bytes_per_value()));
        order
    }

    /// The safetensors header JSON, space-padded to a multiple of 8 bytes.
    fn header(&self) -> Result<Vec<u8>> {
        let mut offset = 0;
        let infos = self
            .layout()
            .into_iter()
            .map(|t| {
                let n = t.bytes.len();
                offset += n;
                let info = TensorInfo {
                    dtype: st_dtype(t.dtype),
                    shape: t.shape.clone(),
                    data_offsets: (offset - n, offset),
                };
                (t.name.clone(), info)
            })
            .collect();
        let internal = |e: String| Error::Internal(format!("shard {}: {e}", self.name));
        let metadata = Metadata::new(Some(self.metadata.clone()), infos)
            .map_err(|e| internal(e.to_string()))?;
        let mut header = serde_json::to_vec(&metadata).map_err(|e| internal(e.to_string()))?;
        header.resize(header.len().next_multiple_of(8), b' ');
        if header.len() > MAX_HEADER_BYTES {
            return Err(Error::InvalidArgument(format!(
                "shard {}: {} entries make a {} byte header, over the safetensors limit of \
                 {MAX_HEADER_BYTES}; finish shards after fewer entries",
                self.name,
                self.len(),
                header.len()
            )));
        }
        Ok(header)
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if let Some(partial) = self.partial.take() {
            // Best effort: a leftover partial is ignored by readers and removed by gc.
            let _ = std::fs::remove_file(partial);
        }
    }
}

/// 16 hex digits unlikely to repeat across processes and calls: blake3 of the process id, the
/// time, a per-process counter and a fresh heap address.
fn random_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = blake3::Hasher::new();
    h.update(&std::process::id().to_le_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.update(&now.to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let probe = Box::new(0u8);
    h.update(&(std::ptr::addr_of!(*probe) as usize).to_le_bytes());
    let key = content_hash(h.finalize().as_bytes());
    key_hex(&key)[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            shard_kind("latents-0123456789abcdef.safetensors"),
            Some(Kind::Latents)
        );
        assert_eq!(
            shard_kind("text-0123456789abcdef.safetensors"),
            Some(Kind::Text)
        );
        for bad in [
            "latents-0123456789abcde.safetensors",
            "latents-0123456789ABCDEF.safetensors",
            "other-0123456789abcdef.safetensors",
            "latents-0123456789abcdef.safetensors.partial",
            "fastdiff-cache.json",
        ] {
            assert_eq!(shard_kind(bad), None, "{bad}");
        }
        assert!(is_partial(".text-0123456789abcdef.safetensors.partial"));
        assert!(!is_partial("text-0123456789abcdef.safetensors.partial"));
        assert!(!is_partial(".lock"));
        assert_eq!("text".parse::<Kind>().unwrap(), Kind::Text);
        assert!("Text".parse::<Kind>().is_err());
    }

    #[test]
    fn fresh_names_differ() {
        let dir = tempfile::tempdir().unwrap();
        let a = ShardWriter::new(dir.path(), Kind::Latents).unwrap();
        let b = ShardWriter::new(dir.path(), Kind::Latents).unwrap();
        assert_ne!(a.name(), b.name());
        assert_eq!(shard_kind(a.name()), Some(Kind::Latents));
    }

    #[test]
    fn add_rejects_bad_entries() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::new(dir.path(), Kind::Text).unwrap();
        let k = [7u8; 16];
        let four = [0u8; 4];
        let f32x1: TensorArg<'_> = ("a", OutputDtype::F32, &[1], &four);
        let cases: Vec<(Vec<TensorArg<'_>>, &str, &str)> = vec![
            (vec![], "{}", "at least one tensor"),
            (
                vec![("", OutputDtype::F32, &[1], &four)],
                "{}",
                "must be non-empty",
            ),
            (
                vec![("a/b", OutputDtype::F32, &[1], &four)],
                "{}",
                "without '/'",
            ),
            (vec![f32x1, f32x1], "{}", "given twice"),
            (
                vec![("a", OutputDtype::BF16, &[1], &four)],
                "{}",
                "has 4 bytes, expected 2",
            ),
            (vec![f32x1], "[1]", "meta must be a JSON object"),
            (
                vec![f32x1],
                r#"{"checksum": "x"}"#,
                "must not have a \"checksum\"",
            ),
        ];
        for (tensors, meta, want) in cases {
            let err = w.add(&k, meta, &tensors).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)));
            assert!(err.to_string().contains(want), "{err} lacks {want}");
            assert!(err.to_string().contains(&key_hex(&k)));
        }
        w.add(&k, "{}", &[f32x1]).unwrap();
        let err = w.add(&k, "{}", &[f32x1]).unwrap_err();
        assert!(err.to_string().contains("already added"));
        assert_eq!((w.len(), w.bytes()), (1, 4));
    }

    #[test]
    fn dropped_writer_leaves_nothing_and_empty_finish_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::new(dir.path(), Kind::Latents).unwrap();
        w.add(
            &[1; 16],
            "{}",
            &[("latents", OutputDtype::F32, &[1], &[0; 4])],
        )
        .unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let w = ShardWriter::new(dir.path(), Kind::Latents).unwrap();
        assert!(matches!(w.finish(), Err(Error::InvalidArgument(_))));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let err = ShardWriter::new(&dir.path().join("missing"), Kind::Text)
            .err()
            .unwrap();
        assert!(matches!(err, Error::Io { .. }));
    }

    #[test]
    fn finished_shard_is_a_safetensors_file_with_aligned_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::new(dir.path(), Kind::Latents).unwrap();
        let k = [0xab; 16];
        let bf16 = [1u8, 2, 3, 4, 5, 6];
        let f32s: Vec<u8> = (0..8).collect();
        w.add(
            &k,
            r#"{"path": "a.png", "flip": true}"#,
            &[
                ("latents", OutputDtype::BF16, &[3], &bf16),
                ("latents_std", OutputDtype::F32, &[2, 1], &f32s),
            ],
        )
        .unwrap();
        let path = w.finish().unwrap();
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [path.file_name().unwrap().to_str().unwrap()]);
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let hex = key_hex(&k);
        let lat = st.tensor(&format!("{hex}/latents")).unwrap();
        assert_eq!(
            (lat.dtype(), lat.shape(), lat.data()),
            (Dtype::BF16, &[3][..], &bf16[..])
        );
        let std_ = st.tensor(&format!("{hex}/latents_std")).unwrap();
        assert_eq!(std_.data(), &f32s[..]);
        // The f32 tensor comes first, so both start at a multiple of their element size.
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        assert_eq!(&bytes[8 + n..8 + n + 8], &f32s[..]);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().unwrap();
        assert_eq!(meta["format"], "fastdiff-cache-1");
        assert_eq!(meta["kind"], "latents");
        let entry: Value = serde_json::from_str(&meta[&hex]).unwrap();
        let mut both = bf16.to_vec();
        both.extend(&f32s);
        assert_eq!(entry["checksum"], key_hex(&content_hash(&both)));
        assert_eq!(entry["path"], "a.png");
        assert_eq!(entry["flip"], true);
    }
}
