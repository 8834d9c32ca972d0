//! `gc`: delete what a cache folder no longer needs. Nothing is rewritten: a file is kept whole or
//! deleted whole.
//!
//! Deleted: leftover `.partial` files (a killed writer's), corrupt shards (see [`super::Store`]),
//! and shards that serve no live key (every key they hold is dead, or served by an earlier shard in
//! name order). The manifest, `.lock` and foreign files are left alone. The caller must hold the
//! folder's `.lock` so that no writer's `.partial` is deleted under it.

use std::collections::HashSet;
use std::path::Path;

use super::key::Key;
use super::store::scan;
use crate::error::{Error, Result};

/// What [`gc`] deleted and kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GcReport {
    /// `.partial` files deleted.
    pub partials: usize,
    /// Corrupt (truncated, unparsable) shards deleted.
    pub corrupt: usize,
    /// Shards deleted because they served no live key.
    pub orphans: usize,
    /// Shards kept.
    pub kept: usize,
    /// Bytes of all deleted files.
    pub bytes_freed: u64,
}

/// Delete partials, corrupt shards and shards that serve no key in `live` from the cache folder
/// `dir` (latent and text keys together).
///
/// Errors: [`Error::Io`] naming the folder or the file that could not be listed or deleted (files
/// deleted before it stay deleted).
pub fn gc(dir: &Path, live: &HashSet<Key>) -> Result<GcReport> {
    let scan = scan(dir)?;
    let mut report = GcReport::default();
    let remove = |path: &Path, len: u64, report: &mut GcReport| {
        std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
        report.bytes_freed += len;
        Ok::<(), Error>(())
    };
    for (path, len) in &scan.partials {
        remove(path, *len, &mut report)?;
        report.partials += 1;
    }
    for (path, _, len) in &scan.corrupt {
        remove(path, *len, &mut report)?;
        report.corrupt += 1;
    }
    let mut seen: HashSet<Key> = HashSet::new();
    for shard in &scan.shards {
        let serves_live = shard
            .entries
            .iter()
            .any(|(k, _)| live.contains(k) && !seen.contains(k));
        seen.extend(shard.entries.iter().map(|(k, _)| *k));
        if serves_live {
            report.kept += 1;
        } else {
            remove(&shard.path, shard.len, &mut report)?;
            report.orphans += 1;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::manifest::MANIFEST_NAME;
    use crate::cache::shard::{Kind, ShardWriter};
    use crate::cache::store::Store;
    use crate::transform::OutputDtype;
    use std::path::PathBuf;

    fn write(dir: &Path, kind: Kind, keys: &[Key]) -> PathBuf {
        let mut w = ShardWriter::new(dir, kind).unwrap();
        for k in keys {
            w.add(k, "{}", &[("latents", OutputDtype::F32, &[4], &[k[0]; 16])])
                .unwrap();
        }
        w.finish().unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn removes_partials_corrupt_and_orphans_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join(MANIFEST_NAME), r#"{"format": "fastdiff-cache-1"}"#).unwrap();
        std::fs::write(d.join(".lock"), b"").unwrap();
        std::fs::write(
            d.join(".latents-00000000000000aa.safetensors.partial"),
            [0u8; 100],
        )
        .unwrap();
        std::fs::write(d.join("text-00000000000000bb.safetensors"), [0u8; 5]).unwrap();
        let live_shard = write(d, Kind::Latents, &[[1; 16], [2; 16]]);
        let dead_shard = write(d, Kind::Latents, &[[3; 16]]);
        let text_shard = write(d, Kind::Text, &[[4; 16]]);
        let dead_len = std::fs::metadata(&dead_shard).unwrap().len();
        let live: HashSet<Key> = [[2u8; 16], [4; 16], [9; 16]].into();
        let report = gc(d, &live).unwrap();
        assert_eq!(
            report,
            GcReport {
                partials: 1,
                corrupt: 1,
                orphans: 1,
                kept: 2,
                bytes_freed: 100 + 5 + dead_len,
            }
        );
        let mut want = vec![
            ".lock".to_string(),
            MANIFEST_NAME.to_string(),
            live_shard
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_string(),
            text_shard
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_string(),
        ];
        want.sort();
        assert_eq!(names(d), want);
        let store = Store::open(d).unwrap();
        assert!(store.contains(&[1; 16]) && store.contains(&[2; 16]) && store.contains(&[4; 16]));
        // Nothing left to do.
        assert_eq!(
            gc(d, &live).unwrap(),
            GcReport {
                kept: 2,
                ..GcReport::default()
            }
        );
    }

    #[test]
    fn a_shard_whose_live_keys_are_all_served_earlier_is_an_orphan() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let a = write(d, Kind::Latents, &[[1; 16]]);
        let b = write(d, Kind::Latents, &[[1; 16]]);
        let (first, second) = if a < b { (a, b) } else { (b, a) };
        let report = gc(d, &[[1u8; 16]].into()).unwrap();
        assert_eq!((report.orphans, report.kept), (1, 1));
        assert!(first.exists() && !second.exists());
        // With no live key at all, everything goes.
        assert_eq!(gc(d, &HashSet::new()).unwrap().orphans, 1);
        assert!(names(d).is_empty());
    }
}
