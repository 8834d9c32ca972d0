//! The sidecar index of a tar shard, `<shard>.index.json`: what [`super::tar`]'s listing of the
//! shard found (per image member its offset, length, header and caption; the unusable members by name
//! and range; the shard's size and mtime and the caption extensions used), written by
//! [`write_index`] and read back by the scan, which ignores a stale one with a warning.
//!
//! It must not read member bytes: listing is [`super::tar`]'s.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::tar::{list_shard, size_and_mtime, BadMember, Listing, Record};
use super::PassedOver;
use crate::decode::{Header, ImageFormat};
use crate::error::{Error, Result};

/// What a shard's sidecar index file name adds to the shard's (`shard-000000.tar.index.json`).
pub const INDEX_SUFFIX: &str = ".index.json";

/// The index format's version, written as `"fastdiff_shard_index"`.
const INDEX_VERSION: u64 = 1;

/// The sidecar index of `shard`: `<shard>.index.json` beside it.
pub fn index_path(shard: &Path) -> PathBuf {
    let mut name = shard.as_os_str().to_owned();
    name.push(INDEX_SUFFIX);
    PathBuf::from(name)
}

fn listing_to_json(shard: &Path, l: &Listing) -> Value {
    let records: Vec<Value> = (l.records.iter())
        .map(|r| {
            json!({
                "name": r.name,
                "offset": r.offset,
                "length": r.len,
                "format": r.header.format.name(),
                "width": r.header.width,
                "height": r.header.height,
                "orientation": r.header.orientation,
                "caption": r.caption.as_ref().map(|c| c.0.as_str()),
                "caption_fallback_encoding": r.caption.as_ref().is_some_and(|c| c.1),
            })
        })
        .collect();
    let bad: Vec<Value> = (l.bad.iter())
        .map(|b| json!({"name": b.name, "offset": b.offset, "length": b.len}))
        .collect();
    json!({
        "fastdiff_shard_index": INDEX_VERSION,
        "shard": shard.file_name().map(|n| n.to_string_lossy().into_owned()),
        "size": l.size,
        "mtime_ns": l.mtime_ns,
        "caption_extensions": l.caption_extensions,
        "members": records,
        "bad_members": bad,
        "tar_error": l.tar_error,
        "passed_over": {
            "caption_files": l.passed_over.caption_files,
            "other_files": l.passed_over.other_files,
            "hidden": l.passed_over.hidden,
        },
    })
}

/// The listing an index file holds; `Err` says why it cannot be used.
fn listing_from_json(v: &Value) -> std::result::Result<Listing, String> {
    let bad_field = |name: &str| format!("field {name:?} is missing or of the wrong type");
    let u = |v: &Value, name: &str| {
        v.get(name)
            .and_then(Value::as_u64)
            .ok_or_else(|| bad_field(name))
    };
    let s = |v: &Value, name: &str| {
        (v.get(name).and_then(Value::as_str).map(str::to_owned)).ok_or_else(|| bad_field(name))
    };
    let arr = |v: &Value, name: &str| {
        (v.get(name).and_then(Value::as_array).cloned()).ok_or_else(|| bad_field(name))
    };
    if v.get("fastdiff_shard_index").and_then(Value::as_u64) != Some(INDEX_VERSION) {
        return Err(format!(
            "not a version {INDEX_VERSION} fastdiff shard index"
        ));
    }
    let mut records = Vec::new();
    for r in arr(v, "members")? {
        let format = s(&r, "format")?;
        let header = Header {
            format: ImageFormat::from_name(&format)
                .ok_or_else(|| format!("unknown format {format:?}"))?,
            width: u32::try_from(u(&r, "width")?).map_err(|e| e.to_string())?,
            height: u32::try_from(u(&r, "height")?).map_err(|e| e.to_string())?,
            orientation: u8::try_from(u(&r, "orientation")?).map_err(|e| e.to_string())?,
        };
        let caption = match r.get("caption") {
            Some(Value::String(c)) => Some((
                c.clone(),
                r.get("caption_fallback_encoding")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            )),
            Some(Value::Null) | None => None,
            Some(_) => return Err(bad_field("caption")),
        };
        records.push(Record {
            name: s(&r, "name")?,
            offset: u(&r, "offset")?,
            len: u(&r, "length")?,
            header,
            caption,
        });
    }
    let mut bad = Vec::new();
    for b in arr(v, "bad_members")? {
        bad.push(BadMember {
            name: s(&b, "name")?,
            offset: u(&b, "offset")?,
            len: u(&b, "length")?,
        });
    }
    let p = v
        .get("passed_over")
        .ok_or_else(|| bad_field("passed_over"))?;
    let count = |name: &str| u(p, name).map(|n| n as usize);
    let caption_extensions = (arr(v, "caption_extensions")?.iter())
        .map(|e| {
            e.as_str()
                .map(str::to_owned)
                .ok_or_else(|| bad_field("caption_extensions"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Listing {
        size: u(v, "size")?,
        mtime_ns: u(v, "mtime_ns")?,
        caption_extensions,
        records,
        bad,
        tar_error: v
            .get("tar_error")
            .and_then(Value::as_str)
            .map(str::to_owned),
        passed_over: PassedOver {
            caption_files: count("caption_files")?,
            other_files: count("other_files")?,
            hidden: count("hidden")?,
        },
    })
}

/// The listing of `shard` from its index when that is current: `Ok(None)` without an index file,
/// `Err(warning)` when it exists but cannot be used (the warning names it and says why).
pub(super) fn read_index(
    shard: &Path,
    exts: &[String],
    pending: bool,
) -> std::result::Result<Option<Listing>, String> {
    let path = index_path(shard);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: cannot be read ({e})", path.display())),
    };
    let stale = |why: String| {
        format!(
            "{}: ignored, {why}; the shard's headers were read instead (rebuild it with \
             `fastdiff index {}`)",
            path.display(),
            shard.display()
        )
    };
    let value: Value =
        serde_json::from_slice(&text).map_err(|e| stale(format!("not JSON ({e})")))?;
    let listing = listing_from_json(&value).map_err(stale)?;
    // A stat, not an open: with current indexes the scan opens no shard (shard-level rank
    // assignment relies on that: each rank opens only its own shards). A pending shard (fetched
    // after the scan) is checked against the index by its fetch instead.
    let now = if pending {
        (listing.size, listing.mtime_ns)
    } else {
        std::fs::metadata(shard)
            .and_then(|m| size_and_mtime(&m))
            .map_err(|e| stale(format!("the shard cannot be read ({e})")))?
    };
    if now != (listing.size, listing.mtime_ns) {
        return Err(stale(format!(
            "stale: it was built for a shard of {} bytes modified at {} ns, the shard now has {} \
             bytes modified at {} ns",
            listing.size, listing.mtime_ns, now.0, now.1
        )));
    }
    if listing.caption_extensions != exts {
        return Err(stale(format!(
            "built with caption extensions {:?}, the loader uses {exts:?}",
            listing.caption_extensions
        )));
    }
    Ok(Some(listing))
}

/// What [`write_index`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexSummary {
    /// The index file.
    pub path: PathBuf,
    /// Image members recorded with their headers.
    pub images: usize,
    /// Image candidates that cannot be used (recorded by name and range, probed again at scan).
    pub bad_members: usize,
    /// Why the tar could not be read to its end, if so (the index keeps what came before).
    pub tar_error: Option<String>,
}

/// List `shard` from its tar headers (reading each image member's header bytes, see
/// [`scan_shards`]) and write its index, `<shard>.index.json` (JSON: `fastdiff_shard_index`,
/// `shard`, `size`, `mtime_ns`, `caption_extensions`, `members` with `name`, `offset`, `length`,
/// `format`, `width`, `height`, `orientation`, `caption` (null without one),
/// `caption_fallback_encoding`; `bad_members` with `name`, `offset`, `length`; `tar_error`;
/// `passed_over`), through a temporary file renamed into place. Uses `threads` threads (0: all
/// cores).
///
/// Errors: [`Error::InvalidArgument`] for bad caption extensions; [`Error::Io`] naming the shard
/// when it cannot be opened, or naming the index when it cannot be written.
pub fn write_index(
    shard: &Path,
    caption_extensions: &[String],
    threads: usize,
) -> Result<IndexSummary> {
    super::validate_caption_extensions(caption_extensions)?;
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::io(shard, std::io::Error::other(e.to_string())))?;
    let listing = list_shard(shard, caption_extensions, &pool)?;
    let path = index_path(shard);
    let text = serde_json::to_vec(&listing_to_json(shard, &listing))
        .map_err(|e| Error::io(&path, e.into()))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| Error::io(&path, e))?;
    Ok(IndexSummary {
        path,
        images: listing.records.len(),
        bad_members: listing.bad.len(),
        tar_error: listing.tar_error,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{as_tar_files, folder, write_tar};
    use super::super::{scan_shards, ScanOptions};
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    #[test]
    fn the_index_replaces_reading_and_a_stale_one_is_ignored() {
        let (_dir, files) = folder();
        let out = tempfile::tempdir().unwrap();
        let shard = out.path().join("s.tar");
        write_tar(&shard, &as_tar_files(&files));
        let o = ScanOptions::default();
        let mut fresh = scan_shards(out.path(), std::slice::from_ref(&shard), &o).unwrap();
        // Listed from its tar headers: recorded as unindexed (the rest must equal the indexed scan).
        assert_eq!(fresh.unindexed_shards, std::slice::from_ref(&shard));
        fresh.unindexed_shards.clear();
        let summary = write_index(&shard, &o.caption_extensions, 2).unwrap();
        assert_eq!(
            (summary.path.clone(), summary.images),
            (index_path(&shard), 4)
        );
        let indexed = scan_shards(out.path(), std::slice::from_ref(&shard), &o).unwrap();
        assert_eq!(indexed, fresh);

        // Overwrite every image member's bytes, keeping the shard's size and mtime: the scan with
        // the index reads none of them, so it still finds the same images.
        let mtime = std::fs::metadata(&shard).unwrap().modified().unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&shard)
            .unwrap();
        for e in &fresh.images {
            let m = e.member.as_ref().unwrap();
            f.write_all_at(&vec![b'x'; m.len as usize], m.offset)
                .unwrap();
        }
        f.set_modified(mtime).unwrap();
        drop(f);
        assert_eq!(
            scan_shards(out.path(), std::slice::from_ref(&shard), &o).unwrap(),
            indexed
        );

        // Another mtime: the index is stale, ignored with a warning, and the headers are read.
        let f = File::options().write(true).open(&shard).unwrap();
        f.set_modified(mtime + std::time::Duration::from_secs(5))
            .unwrap();
        drop(f);
        let s = scan_shards(out.path(), std::slice::from_ref(&shard), &o).unwrap();
        assert_eq!((s.images.len(), s.skipped.len()), (0, 4));
        assert_eq!(s.unindexed_shards, std::slice::from_ref(&shard));
        assert_eq!(s.warnings.len(), 1);
        assert!(s.warnings[0].contains("stale") && s.warnings[0].contains("s.tar.index.json"));
        // Other caption extensions: stale too.
        write_index(&shard, &o.caption_extensions, 1).unwrap();
        let other = ScanOptions {
            caption_extensions: vec![".caption".into()],
            ..ScanOptions::default()
        };
        assert!(
            scan_shards(out.path(), &[shard], &other).unwrap().warnings[0]
                .contains("caption extensions")
        );
    }

    #[test]
    fn a_pending_shard_is_scanned_from_its_index_alone() {
        let (_dir, files) = folder();
        let out = tempfile::tempdir().unwrap();
        let shard = out.path().join("s.tar");
        write_tar(&shard, &as_tar_files(&files));
        let o = ScanOptions::default();
        write_index(&shard, &o.caption_extensions, 1).unwrap();
        let indexed = scan_shards(out.path(), std::slice::from_ref(&shard), &o).unwrap();
        // The shard is gone (fetched later): marked pending, its index alone gives the same scan.
        std::fs::remove_file(&shard).unwrap();
        let pending = ScanOptions {
            pending_shards: [shard.clone()].into_iter().collect(),
            ..ScanOptions::default()
        };
        let s = scan_shards(out.path(), std::slice::from_ref(&shard), &pending).unwrap();
        assert_eq!(s, indexed);
        assert_eq!(s.images.len(), 4);
        // Not pending: the index cannot be checked against the shard, which is a skip.
        let s = scan_shards(out.path(), std::slice::from_ref(&shard), &o).unwrap();
        assert_eq!(
            (s.images.len(), s.skipped.len(), s.warnings.len()),
            (0, 1, 1)
        );
    }
}
