//! [`Store`]: a cache folder opened for reading: the manifest, every shard's header as the index,
//! and the shards kept open for the workers' reads.
//!
//! Opening reads each shard's safetensors header (through a memory map that is dropped once the
//! header is parsed), never its data. A shard whose file is shorter or
//! longer than its header says (truncated), whose header does not parse, or whose metadata does not
//! describe its tensors is listed in [`Store::corrupt_shards`] and none of its entries is served.
//! When two shards hold a key, the first in file-name order serves it. [`Store::read_entry`]
//! verifies the entry's checksum on every read, so a flipped byte is an [`Error::Corrupt`], never
//! data.
//!
//! Shards are immutable once renamed into place (writers only create new files, `gc` only unlinks),
//! which is what makes mapping them for the header parse sound. Entries are read with positioned
//! reads (`pread`) straight into the batch buffers, not through a mapping: the kernel copies from the
//! page cache into memory the pool already holds (one copy, as through a mapping), and a shard
//! truncated by another program while open is an error naming it, where a mapping would kill the
//! process with `SIGBUS` on the first read past the new end.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{SafeTensorError, SafeTensors};
use serde_json::Value;

use super::key::{key_hex, parse_key, truncate, Key};
use super::manifest::{Manifest, FORMAT};
use super::shard::{from_st_dtype, is_partial, shard_kind, Kind};
use crate::error::{Error, Result};
use crate::transform::OutputDtype;

thread_local! {
    /// Where a worker reads an entry's tensors that no destination asked for, to hash them.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// One tensor of an entry, located in its shard's file.
#[derive(Debug)]
pub(super) struct TensorLoc {
    pub(super) name: Arc<str>,
    pub(super) dtype: OutputDtype,
    pub(super) shape: Box<[usize]>,
    /// Byte range in the whole file (header included).
    pub(super) start: usize,
    pub(super) end: usize,
}

/// One entry of a shard: its tensors in name order, checksum and metadata JSON.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) tensors: Box<[TensorLoc]>,
    pub(super) checksum: Key,
    pub(super) meta: Box<str>,
}

/// A shard whose header parsed and describes its entries.
pub(super) struct Shard {
    pub(super) path: PathBuf,
    pub(super) kind: Kind,
    pub(super) file: File,
    pub(super) len: u64,
    pub(super) entries: Vec<(Key, Entry)>,
}

/// What a cache folder holds, shard by shard, in file-name order.
pub(super) struct Scan {
    pub(super) shards: Vec<Shard>,
    pub(super) corrupt: Vec<(PathBuf, String, u64)>,
    pub(super) partials: Vec<(PathBuf, u64)>,
}

/// Read every shard header of `dir` (files named as shards; others are left alone).
///
/// Errors: [`Error::Io`] when the folder cannot be listed or a shard cannot be opened or mapped.
pub(super) fn scan(dir: &Path) -> Result<Scan> {
    let io = |e| Error::io(dir, e);
    let mut names = Vec::new();
    for item in std::fs::read_dir(dir).map_err(io)? {
        let item = item.map_err(io)?;
        if let Ok(name) = item.file_name().into_string() {
            names.push(name);
        }
    }
    names.sort();
    let mut out = Scan {
        shards: Vec::new(),
        corrupt: Vec::new(),
        partials: Vec::new(),
    };
    for name in names {
        let path = dir.join(&name);
        if is_partial(&name) {
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            out.partials.push((path, len));
            continue;
        }
        let Some(kind) = shard_kind(&name) else {
            continue;
        };
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len < 8 {
            let why = format!("the file is {len} bytes, too short for a safetensors header");
            out.corrupt.push((path, why, len));
            continue;
        }
        // SAFETY: shards are never written after they are renamed into place (module docs).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let parsed = parse_header(&map, kind, len);
        drop(map);
        match parsed {
            Ok(entries) => out.shards.push(Shard {
                path,
                kind,
                file,
                len,
                entries,
            }),
            Err(why) => out.corrupt.push((path, why, len)),
        }
    }
    Ok(out)
}

/// The entries a shard's header describes, or why the shard cannot be served.
fn parse_header(
    bytes: &[u8],
    kind: Kind,
    len: u64,
) -> std::result::Result<Vec<(Key, Entry)>, String> {
    let (n, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| match e {
        SafeTensorError::MetadataIncompleteBuffer | SafeTensorError::InvalidHeaderLength => {
            format!("the file is {len} bytes, not the length its header describes (truncated)")
        }
        e => format!("the safetensors header does not parse: {e}"),
    })?;
    let data_start = 8 + n;
    let meta = metadata
        .metadata()
        .as_ref()
        .ok_or("the header has no __metadata__")?;
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(format!(
            "__metadata__ format is {:?}, not {FORMAT:?}",
            meta.get("format")
        ));
    }
    if meta.get("kind").map(String::as_str) != Some(kind.name()) {
        return Err(format!(
            "__metadata__ kind is {:?}, but the file name says {:?}",
            meta.get("kind"),
            kind.name()
        ));
    }
    let mut names: HashMap<String, Arc<str>> = HashMap::new();
    let mut tensors: HashMap<Key, Vec<TensorLoc>> = HashMap::new();
    for (full, info) in metadata.tensors() {
        let (hex, name) = full
            .split_once('/')
            .ok_or_else(|| format!("tensor {full:?} is not named <key>/<tensor>"))?;
        let key = parse_key(hex).map_err(|e| format!("tensor {full:?}: {e}"))?;
        let dtype = from_st_dtype(info.dtype).ok_or_else(|| {
            format!(
                "tensor {full:?} has dtype {:?}, which the cache does not hold",
                info.dtype
            )
        })?;
        let name = names
            .entry(name.to_string())
            .or_insert_with(|| Arc::from(name))
            .clone();
        tensors.entry(key).or_default().push(TensorLoc {
            name,
            dtype,
            shape: info.shape.clone().into_boxed_slice(),
            start: data_start + info.data_offsets.0,
            end: data_start + info.data_offsets.1,
        });
    }
    let described = meta.len() - 2;
    if described != tensors.len() {
        return Err(format!(
            "__metadata__ describes {described} entries, the tensors belong to {}",
            tensors.len()
        ));
    }
    let mut entries = Vec::with_capacity(tensors.len());
    for (key, mut locs) in tensors {
        let hex = key_hex(&key);
        let json = meta
            .get(&hex)
            .ok_or_else(|| format!("entry {hex} has tensors but no __metadata__"))?;
        let checksum = match serde_json::from_str::<Value>(json) {
            Ok(Value::Object(m)) => m
                .get("checksum")
                .and_then(Value::as_str)
                .and_then(|s| parse_key(s).ok()),
            _ => None,
        }
        .ok_or_else(|| format!("entry {hex}: __metadata__ is not a JSON object with a checksum"))?;
        locs.sort_by(|a, b| a.name.cmp(&b.name));
        entries.push((
            key,
            Entry {
                tensors: locs.into_boxed_slice(),
                checksum,
                meta: json.as_str().into(),
            },
        ));
    }
    Ok(entries)
}

/// A cache folder opened for reading. `Send + Sync`: share one by `Arc` among worker threads.
pub struct Store {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<(PathBuf, Kind, File)>,
    /// Key -> (index into `shards`, entry); the first shard in name order wins.
    index: HashMap<Key, (usize, Entry)>,
    corrupt: Vec<(PathBuf, String)>,
}

impl Store {
    /// Open the cache folder `dir`: its manifest and every shard's header; shards are kept open,
    /// their data not read. Leftover `.partial` files and other files are ignored.
    ///
    /// Errors: those of [`Manifest::read`]; [`Error::Io`] naming the folder or a shard that cannot be
    /// listed, opened or mapped for the header parse. A corrupt shard is not an error: see [`Store::corrupt_shards`].
    pub fn open(dir: &Path) -> Result<Store> {
        let manifest = Manifest::read(dir)?;
        let scan = scan(dir)?;
        let mut index = HashMap::new();
        let mut shards = Vec::with_capacity(scan.shards.len());
        for (i, shard) in scan.shards.into_iter().enumerate() {
            for (key, entry) in shard.entries {
                index.entry(key).or_insert((i, entry));
            }
            shards.push((shard.path, shard.kind, shard.file));
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            manifest,
            shards,
            index,
            corrupt: scan
                .corrupt
                .into_iter()
                .map(|(p, why, _)| (p, why))
                .collect(),
        })
    }

    /// The cache folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The folder's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Whether entry `key` is served (in a shard that is not corrupt).
    pub fn contains(&self, key: &Key) -> bool {
        self.index.contains_key(key)
    }

    /// The `(name, dtype, shape)` of entry `key`'s tensors in name order, or `None` when not served.
    pub fn tensors(&self, key: &Key) -> Option<Vec<(&str, OutputDtype, &[usize])>> {
        let (_, entry) = self.index.get(key)?;
        Some(
            entry
                .tensors
                .iter()
                .map(|t| (&*t.name, t.dtype, &*t.shape))
                .collect(),
        )
    }

    /// Copy entry `key`'s tensors into `outs`: each `(name, out)` gets tensor `name`'s bytes
    /// (little-endian elements; `out` must be exactly that long). The checksum over all of the
    /// entry's tensors is verified in the same pass, hashing what was copied.
    ///
    /// Errors: [`Error::CacheMiss`] naming the cache folder when `key` is not served;
    /// [`Error::Corrupt`] naming the shard and the key when the entry has no tensor `name`, its
    /// size differs from `out`'s, the file is now shorter than the entry, or the checksum does not
    /// match (then `outs` hold garbage); [`Error::Io`] naming the shard when the read fails.
    pub fn read_entry(&self, key: &Key, outs: &mut [(&str, &mut [u8])]) -> Result<()> {
        let Some((shard, entry)) = self.index.get(key) else {
            return Err(Error::CacheMiss {
                path: self.dir.clone(),
                reason: format!("no entry {}", key_hex(key)),
            });
        };
        let (path, _, file) = &self.shards[*shard];
        let corrupt = |reason: String| Error::Corrupt {
            path: path.clone(),
            reason: format!("entry {}: {reason}", key_hex(key)),
        };
        for (name, out) in outs.iter() {
            let t = entry
                .tensors
                .iter()
                .find(|t| &*t.name == *name)
                .ok_or_else(|| corrupt(format!("no tensor {name:?}")))?;
            if t.end - t.start != out.len() {
                return Err(corrupt(format!(
                    "tensor {name:?} is {:?} {} ({} bytes), the destination holds {} bytes",
                    t.shape,
                    t.dtype.name(),
                    t.end - t.start,
                    out.len()
                )));
            }
        }
        let read = |t: &TensorLoc, out: &mut [u8]| {
            file.read_exact_at(out, t.start as u64)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => corrupt(format!(
                        "tensor {:?} ends past the end of the file (truncated after it was opened)",
                        t.name
                    )),
                    _ => Error::io(path, e),
                })
        };
        let mut hasher = blake3::Hasher::new();
        for t in entry.tensors.iter() {
            match outs.iter_mut().find(|(name, _)| *name == &*t.name) {
                Some((_, out)) => {
                    read(t, out)?;
                    hasher.update(out);
                }
                None => SCRATCH.with_borrow_mut(|scratch| {
                    scratch.resize(t.end - t.start, 0);
                    read(t, scratch)?;
                    hasher.update(scratch);
                    Ok::<_, Error>(())
                })?,
            }
        }
        let got = truncate(hasher.finalize());
        if got != entry.checksum {
            return Err(corrupt(format!(
                "checksum mismatch: the header says {}, the bytes hash to {}",
                key_hex(&entry.checksum),
                key_hex(&got)
            )));
        }
        Ok(())
    }

    /// The metadata JSON of entry `key` (provenance and checksum), for messages.
    pub fn provenance(&self, key: &Key) -> Option<&str> {
        self.index.get(key).map(|(_, e)| &*e.meta)
    }

    /// The shards not served, with why: `(path, reason)`.
    pub fn corrupt_shards(&self) -> &[(PathBuf, String)] {
        &self.corrupt
    }

    /// The served keys of `kind`, in no particular order.
    pub fn keys(&self, kind: Kind) -> impl Iterator<Item = &Key> {
        self.index
            .iter()
            .filter(move |(_, (shard, _))| self.shards[*shard].1 == kind)
            .map(|(k, _)| k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::manifest::MANIFEST_NAME;
    use crate::cache::shard::ShardWriter;

    fn assert_send_sync<T: Send + Sync>() {}

    fn cache_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(MANIFEST_NAME),
            r#"{"format": "fastdiff-cache-1"}"#,
        )
        .unwrap();
        dir
    }

    /// A shard of `kind` holding one entry per key: `latents` ([2] bf16 = key's first 4 bytes)
    /// and `latents_std` ([1] f32 = `tag` repeated).
    fn write(dir: &Path, kind: Kind, keys: &[Key], tag: u8) -> PathBuf {
        let mut w = ShardWriter::new(dir, kind).unwrap();
        for k in keys {
            w.add(
                k,
                &format!(r#"{{"path": "img-{}.png"}}"#, k[0]),
                &[
                    ("latents_std", OutputDtype::F32, &[1], &[tag; 4]),
                    ("latents", OutputDtype::BF16, &[2], &k[..4]),
                ],
            )
            .unwrap();
        }
        w.finish().unwrap()
    }

    fn read(store: &Store, key: &Key) -> Result<([u8; 4], [u8; 4])> {
        let (mut lat, mut std_) = ([0u8; 4], [0u8; 4]);
        store.read_entry(
            key,
            &mut [("latents", &mut lat), ("latents_std", &mut std_)],
        )?;
        Ok((lat, std_))
    }

    #[test]
    fn round_trip() {
        assert_send_sync::<Store>();
        let dir = cache_dir();
        let keys = [[1u8; 16], [2; 16], [3; 16]];
        write(dir.path(), Kind::Latents, &keys, 9);
        write(dir.path(), Kind::Text, &[[4; 16]], 8);
        let store = Store::open(dir.path()).unwrap();
        assert!(store.corrupt_shards().is_empty());
        for k in &keys {
            assert!(store.contains(k));
            assert_eq!(read(&store, k).unwrap(), ([k[0]; 4], [9; 4]));
        }
        assert_eq!(read(&store, &[4; 16]).unwrap(), ([4; 4], [8; 4]));
        let mut latents: Vec<Key> = store.keys(Kind::Latents).copied().collect();
        latents.sort();
        assert_eq!(latents, keys);
        assert_eq!(store.keys(Kind::Text).collect::<Vec<_>>(), [&[4; 16]]);
        let prov: Value = serde_json::from_str(store.provenance(&[2; 16]).unwrap()).unwrap();
        assert_eq!(prov["path"], "img-2.png");
        assert_eq!(
            store.tensors(&[1; 16]).unwrap(),
            [
                ("latents", OutputDtype::BF16, &[2][..]),
                ("latents_std", OutputDtype::F32, &[1][..])
            ]
        );
        // Only some tensors may be asked for; the checksum still covers the whole entry.
        let mut lat = [0u8; 4];
        store
            .read_entry(&[3; 16], &mut [("latents", &mut lat)])
            .unwrap();
        assert_eq!(lat, [3; 4]);

        let miss = read(&store, &[5; 16]).unwrap_err();
        assert!(matches!(miss, Error::CacheMiss { .. }));
        assert!(miss.to_string().contains(&key_hex(&[5; 16])));
        let mut short = [0u8; 2];
        let err = store
            .read_entry(&[1; 16], &mut [("latents", &mut short)])
            .unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }));
        assert!(
            err.to_string().contains("the destination holds 2 bytes"),
            "{err}"
        );
        let err = store
            .read_entry(&[1; 16], &mut [("prompt_embeds", &mut short)])
            .unwrap_err();
        assert!(
            err.to_string().contains("no tensor \"prompt_embeds\""),
            "{err}"
        );
    }

    #[test]
    fn truncated_shard_is_reported_and_not_served() {
        let dir = cache_dir();
        let good = write(dir.path(), Kind::Latents, &[[1; 16]], 1);
        let bad = write(dir.path(), Kind::Latents, &[[2; 16], [3; 16]], 1);
        let len = std::fs::metadata(&bad).unwrap().len();
        File::options()
            .write(true)
            .open(&bad)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.corrupt_shards().len(), 1);
        let (path, why) = &store.corrupt_shards()[0];
        assert_eq!(path, &bad);
        assert!(why.contains("truncated"), "{why}");
        assert!(store.contains(&[1; 16]), "{good:?} is served");
        for k in [[2u8; 16], [3; 16]] {
            assert!(!store.contains(&k));
            assert!(matches!(read(&store, &k), Err(Error::CacheMiss { .. })));
        }
        // A garbled header and a stub file are corrupt too; partial and foreign files are ignored.
        let garbled = dir.path().join("text-00000000000000aa.safetensors");
        let mut bytes = 16u64.to_le_bytes().to_vec();
        bytes.extend(b"{not json at all");
        std::fs::write(&garbled, bytes).unwrap();
        std::fs::write(dir.path().join("text-00000000000000bb.safetensors"), b"abc").unwrap();
        std::fs::write(
            dir.path()
                .join(".text-00000000000000cc.safetensors.partial"),
            b"x",
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        let store = Store::open(dir.path()).unwrap();
        let reasons: Vec<&str> = store
            .corrupt_shards()
            .iter()
            .map(|(_, w)| w.as_str())
            .collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(reasons[1].contains("does not parse"), "{reasons:?}");
        assert!(reasons[2].contains("too short"), "{reasons:?}");
    }

    #[test]
    fn a_shard_truncated_after_opening_is_an_error_not_a_crash() {
        let dir = cache_dir();
        let path = write(dir.path(), Kind::Latents, &[[1; 16], [2; 16]], 5);
        let store = Store::open(dir.path()).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 2)
            .unwrap();
        // The bf16 latents are last in the file: entry [2; 16]'s now ends past the end.
        let err = read(&store, &[2; 16]).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains(path.to_str().unwrap()) && msg.contains("truncated after it was opened"),
            "{msg}"
        );
        assert_eq!(read(&store, &[1; 16]).unwrap(), ([1; 4], [5; 4]));
    }

    #[test]
    fn flipped_byte_is_a_checksum_error() {
        let dir = cache_dir();
        let path = write(dir.path(), Kind::Latents, &[[1; 16], [2; 16]], 5);
        let mut bytes = std::fs::read(&path).unwrap();
        // File order: the f32 tensors first, as added, so bytes 4..8 of the data are entry
        // [2; 16]'s latents_std.
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        bytes[8 + n + 4] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.corrupt_shards().is_empty(), "the header is intact");
        assert_eq!(read(&store, &[1; 16]).unwrap(), ([1; 4], [5; 4]));
        let err = read(&store, &[2; 16]).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }));
        let msg = err.to_string();
        assert!(msg.contains(path.to_str().unwrap()), "{msg}");
        assert!(
            msg.contains(&key_hex(&[2; 16])) && msg.contains("checksum mismatch"),
            "{msg}"
        );
        // Even when only the intact tensor is asked for.
        let mut lat = [0u8; 4];
        let err = store
            .read_entry(&[2; 16], &mut [("latents", &mut lat)])
            .unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"));
    }

    #[test]
    fn first_shard_in_name_order_wins() {
        let dir = cache_dir();
        let a = write(dir.path(), Kind::Latents, &[[1; 16]], 1);
        let b = write(dir.path(), Kind::Latents, &[[1; 16]], 2);
        let first = if a < b { 1 } else { 2 };
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(read(&store, &[1; 16]).unwrap().1, [first; 4]);
        assert_eq!(store.keys(Kind::Latents).count(), 1);
    }

    #[test]
    fn header_kind_must_match_the_name() {
        let dir = cache_dir();
        let path = write(dir.path(), Kind::Latents, &[[1; 16]], 1);
        let renamed = dir.path().join(
            path.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .replace("latents", "text"),
        );
        std::fs::rename(&path, &renamed).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(!store.contains(&[1; 16]));
        assert!(store.corrupt_shards()[0]
            .1
            .contains("file name says \"text\""));
    }

    #[test]
    fn a_folder_without_a_manifest_is_not_a_cache() {
        let dir = tempfile::tempdir().unwrap();
        let err = Store::open(dir.path()).err().unwrap();
        assert!(matches!(err, Error::Io { .. }));
        assert!(err.to_string().contains(MANIFEST_NAME));
    }
}
