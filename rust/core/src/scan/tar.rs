//! WebDataset tar shards as a dataset source: list each shard's members from their tar headers,
//! read each image member's header bytes (never the whole member, never the whole shard), pair
//! captions, and read or write the shard's sidecar index.
//!
//! Layout: a shard is a plain (uncompressed) tar whose regular members are
//! `KEY.<image extension>` (any of [`super::IMAGE_EXTENSIONS`], any case, or any member whose first
//! bytes are an image's, as the folder scan finds files) and optional captions: `KEY<ext>` for each
//! of the caption extensions in order (`.txt`, `.caption` by default), then `KEY.json`, whose
//! `"caption"` string field (else its `"text"` field) is the caption. `KEY` is the member name
//! without its last extension, so captions pair exactly as files in a folder do. An image is named
//! `<shard path>/<member name>` (`data/shard-000000.tar/sub/dir/img.jpg`) in batches and reports.
//!
//! The sidecar index (`<shard>.index.json`, [`super::index_path`]) records the shard's size and
//! modification time, the caption extensions it was built with, and per image member its offset,
//! length, header and caption; with a current index the scan reads no member bytes at all (the
//! members the index lists as bad are probed again, so their skip messages are fresh). A stale index
//! (another size or mtime, other caption extensions, unreadable) is ignored with a warning and the
//! shard is listed from its tar headers.
//!
//! It must not decode pixels or extract members to disk.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use rayon::prelude::*;
use serde_json::Value;

use super::tar_index::read_index;
use super::{has_image_extension, ImageEntry, PassedOver, Scan, ScanOptions};
use crate::caption::decode_caption;
use crate::decode::{self, Header};
use crate::error::{Error, Result, Skip};

/// Largest caption member read, in bytes; a larger one is a `decode` skip of its image.
const MAX_CAPTION_BYTES: u64 = 16 << 20;

/// Where an image's bytes lie: `len` bytes at `offset` of the tar file `shard`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The shard file, as given.
    pub shard: Arc<Path>,
    /// Offset of the member's data in the shard, in bytes.
    pub offset: u64,
    /// The member's size in bytes.
    pub len: u64,
}

impl Member {
    /// The member's bytes, read with one positioned read of exactly its range.
    ///
    /// Errors: those of opening or reading the shard; `UnexpectedEof` when the shard ends inside
    /// the member (truncated since the scan).
    pub fn read(&self) -> std::io::Result<Vec<u8>> {
        let file = File::open(&self.shard)?;
        let len = usize::try_from(self.len).map_err(std::io::Error::other)?;
        let mut bytes = vec![0; len];
        file.read_exact_at(&mut bytes, self.offset)?;
        Ok(bytes)
    }
}

/// One image member as the listing and the index record it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Record {
    pub(super) name: String,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) header: Header,
    /// Caption text and whether it needed the fallback decoding; `None` without a caption member.
    pub(super) caption: Option<(String, bool)>,
}

/// A member of a shard that is an image candidate but cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BadMember {
    pub(super) name: String,
    pub(super) offset: u64,
    pub(super) len: u64,
}

/// Everything the scan learns from one shard (what its index stores).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Listing {
    pub(super) size: u64,
    pub(super) mtime_ns: u64,
    pub(super) caption_extensions: Vec<String>,
    pub(super) records: Vec<Record>,
    /// Image candidates that failed their probe; probed again when read from an index.
    pub(super) bad: Vec<BadMember>,
    /// Why the tar itself could not be read to its end (truncated or corrupt), if so.
    pub(super) tar_error: Option<String>,
    pub(super) passed_over: PassedOver,
}

/// A regular member from the tar headers.
struct RawMember {
    name: String,
    offset: u64,
    len: u64,
}

pub(super) fn size_and_mtime(meta: &std::fs::Metadata) -> std::io::Result<(u64, u64)> {
    let mtime = meta
        .modified()?
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Ok((
        meta.len(),
        u64::try_from(mtime.as_nanos()).unwrap_or(u64::MAX),
    ))
}

fn is_hidden(name: &str) -> bool {
    name.split('/').any(|c| c.starts_with('.'))
}

/// The member name without its last extension: what captions pair by (`a/b.c.jpg` -> `a/b.c`).
fn stem(name: &str) -> &str {
    let base = name.rfind('/').map_or(0, |i| i + 1);
    match name[base..].rfind('.') {
        Some(dot) if dot > 0 => &name[..base + dot],
        _ => name,
    }
}

/// The regular members of the tar `file`, in archive order, from their headers (seeking over the
/// data); also the reason the archive could not be read to its end, if so, and the count of
/// members that are neither regular files nor folders.
fn tar_members(file: &File, size: u64) -> (Vec<RawMember>, Option<String>, usize) {
    let mut members = Vec::new();
    let mut other = 0;
    let mut archive = tar::Archive::new(file);
    let entries = match archive.entries_with_seek() {
        Ok(entries) => entries,
        Err(e) => return (members, Some(format!("not a readable tar file: {e}")), 0),
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                let after = members.last().map_or(String::new(), |m: &RawMember| {
                    format!(" after member {}", m.name)
                });
                return (
                    members,
                    Some(format!("truncated or corrupt tar{after}: {e}")),
                    other,
                );
            }
        };
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {}
            tar::EntryType::Directory | tar::EntryType::XGlobalHeader => continue,
            _ => {
                other += 1;
                continue;
            }
        }
        let name = String::from_utf8_lossy(&entry.path_bytes())
            .trim_start_matches("./")
            .to_owned();
        let (offset, len) = (entry.raw_file_position(), entry.size());
        if offset.saturating_add(len) > size {
            let reason = format!(
                "truncated tar: member {name} needs bytes up to {}, the shard has {size}",
                offset.saturating_add(len)
            );
            // The member itself is named in the shard's skip, not listed: its bytes are not all there.
            return (members, Some(reason), other);
        }
        members.push(RawMember { name, offset, len });
    }
    (members, None, other)
}

/// The caption of the image whose stem is `key`: the first of `exts` present as a member, then
/// `KEY.json`; `Ok(None)` without one.
fn read_caption(
    file: &File,
    shard: &Path,
    key: &str,
    by_name: &HashMap<&str, &RawMember>,
    exts: &[String],
) -> Result<Option<(String, bool)>> {
    let read = |m: &RawMember| -> Result<Vec<u8>> {
        let path = shard.join(&m.name);
        if m.len > MAX_CAPTION_BYTES {
            return Err(Error::decode(
                &path,
                format!(
                    "caption member of {} bytes, over {MAX_CAPTION_BYTES}",
                    m.len
                ),
            ));
        }
        let mut bytes = vec![0; m.len as usize];
        file.read_exact_at(&mut bytes, m.offset)
            .map_err(|e| Error::io(&path, e))?;
        Ok(bytes)
    };
    for ext in exts {
        if let Some(m) = by_name.get(format!("{key}{ext}").as_str()) {
            let c = decode_caption(&read(m)?);
            return Ok(Some((c.text, c.fallback_encoding)));
        }
    }
    let Some(m) = by_name.get(format!("{key}.json").as_str()) else {
        return Ok(None);
    };
    let bytes = read(m)?;
    let path = shard.join(&m.name);
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::decode(&path, format!("caption JSON does not parse: {e}")))?;
    let Value::Object(fields) = value else {
        return Err(Error::decode(&path, "caption JSON is not an object"));
    };
    match (fields.get("caption"), fields.get("text")) {
        (Some(Value::String(s)), _) | (None, Some(Value::String(s))) => {
            let c = decode_caption(s.as_bytes());
            Ok(Some((c.text, c.fallback_encoding)))
        }
        (None, None) => Ok(None),
        _ => Err(Error::decode(
            &path,
            "caption JSON's \"caption\" (or \"text\") field is not a string",
        )),
    }
}

/// List `shard` from its tar headers: image candidates probed (header bytes only) on `pool`,
/// captions paired and read, everything else counted.
pub(super) fn list_shard(
    shard: &Path,
    exts: &[String],
    pool: &rayon::ThreadPool,
) -> std::result::Result<Listing, Error> {
    let file = File::open(shard).map_err(|e| Error::io(shard, e))?;
    let (size, mtime_ns) = file
        .metadata()
        .and_then(|m| size_and_mtime(&m))
        .map_err(|e| Error::io(shard, e))?;
    let (members, tar_error, other) = tar_members(&file, size);
    let mut passed_over = PassedOver {
        other_files: other,
        ..PassedOver::default()
    };
    let by_name: HashMap<&str, &RawMember> = members.iter().map(|m| (m.name.as_str(), m)).collect();
    let mut candidates = Vec::new();
    for m in &members {
        if is_hidden(&m.name) {
            passed_over.hidden += 1;
        } else if exts
            .iter()
            .chain([&".json".to_owned()])
            .any(|e| m.name.ends_with(e.as_str()))
        {
            passed_over.caption_files += 1;
        } else if has_image_extension(Path::new(&m.name)) || starts_like_image(&file, m) {
            candidates.push(m);
        } else {
            passed_over.other_files += 1;
        }
    }
    let probed: Vec<std::result::Result<Record, BadMember>> = pool.install(|| {
        candidates
            .par_iter()
            .map(|m| {
                let path = shard.join(&m.name);
                let bad = || BadMember {
                    name: m.name.clone(),
                    offset: m.offset,
                    len: m.len,
                };
                let header =
                    decode::probe_range(&file, m.offset, m.len, &path).map_err(|_| bad())?;
                let caption =
                    read_caption(&file, shard, stem(&m.name), &by_name, exts).map_err(|_| bad())?;
                Ok(Record {
                    name: m.name.clone(),
                    offset: m.offset,
                    len: m.len,
                    header,
                    caption,
                })
            })
            .collect()
    });
    let (mut records, mut bad) = (Vec::new(), Vec::new());
    for p in probed {
        match p {
            Ok(r) => records.push(r),
            Err(b) => bad.push(b),
        }
    }
    Ok(Listing {
        size,
        mtime_ns,
        caption_extensions: exts.to_vec(),
        records,
        bad,
        tar_error,
        passed_over,
    })
}

fn starts_like_image(file: &File, m: &RawMember) -> bool {
    let mut head = [0u8; 32];
    let n = (m.len.min(32)) as usize;
    file.read_exact_at(&mut head[..n], m.offset).is_ok() && decode::is_image_magic(&head[..n])
}

/// Why a bad member cannot be used: its probe or caption error, probed again.
fn bad_member_error(file: &File, shard: &Path, m: &BadMember, listing: &Listing) -> Error {
    let path = shard.join(&m.name);
    if let Err(e) = decode::probe_range(file, m.offset, m.len, &path) {
        return e;
    }
    // The header is fine, so its caption member was the problem; the index does not record caption
    // members, so list the tar headers again (rare: only for such members).
    let members = tar_members(file, listing.size).0;
    let by_name: HashMap<&str, &RawMember> = members.iter().map(|m| (m.name.as_str(), m)).collect();
    match read_caption(
        file,
        shard,
        stem(&m.name),
        &by_name,
        &listing.caption_extensions,
    ) {
        Err(e) => e,
        Ok(_) => Error::Changed {
            path,
            reason: "the member was unusable when its shard was listed and is usable now; \
                     rebuild the shard's index"
                .into(),
        },
    }
}

/// Images, skips and file counts of one shard.
struct ShardScan {
    images: Vec<ImageEntry>,
    skipped: Vec<Skip>,
    passed_over: PassedOver,
    warning: Option<String>,
    /// Whether the listing came from a current index.
    indexed: bool,
}

fn scan_one(shard: &Path, opts: &ScanOptions, pool: &rayon::ThreadPool) -> ShardScan {
    let exts = &opts.caption_extensions;
    let pending = opts.pending_shards.contains(shard);
    let (listing, warning, indexed) = match read_index(shard, exts, pending) {
        Ok(Some(l)) => (Ok(l), None, true),
        Ok(None) => (list_shard(shard, exts, pool), None, false),
        Err(w) => (list_shard(shard, exts, pool), Some(w), false),
    };
    let listing = match listing {
        Ok(l) => l,
        Err(e) => {
            return ShardScan {
                images: Vec::new(),
                skipped: vec![Skip::new(shard, &e)],
                passed_over: PassedOver::default(),
                warning,
                indexed,
            }
        }
    };
    let mut skipped = Vec::new();
    if let Some(reason) = &listing.tar_error {
        skipped.push(Skip::new(shard, &Error::decode(shard, reason.clone())));
    }
    if !listing.bad.is_empty() {
        match File::open(shard) {
            Ok(file) => skipped.extend((listing.bad.iter()).map(|b| {
                Skip::new(
                    &shard.join(&b.name),
                    &bad_member_error(&file, shard, b, &listing),
                )
            })),
            Err(e) => skipped.extend(
                (listing.bad.iter())
                    .map(|b| Skip::new(&shard.join(&b.name), &Error::io(shard, e.kind().into()))),
            ),
        }
    }
    let shard_arc: Arc<Path> = Arc::from(shard);
    let mut images = Vec::with_capacity(listing.records.len());
    for r in listing.records {
        let path = shard.join(&r.name);
        let (w, h) = (r.header.width, r.header.height);
        if w == 0 || h == 0 {
            let e = Error::decode(&path, format!("image has no pixels ({w}x{h})"));
            skipped.push(Skip::new(&path, &e));
            continue;
        }
        if u64::from(w) * u64::from(h) > opts.max_pixels {
            let e = Error::TooLarge {
                path: path.clone(),
                width: w,
                height: h,
                limit: opts.max_pixels,
            };
            skipped.push(Skip::new(&path, &e));
            continue;
        }
        let (caption, caption_found, caption_fallback_encoding) = match r.caption {
            Some((text, fallback)) => (text, true, fallback),
            None => (opts.class_tokens.clone().unwrap_or_default(), false, false),
        };
        images.push(ImageEntry {
            path,
            header: r.header,
            caption,
            caption_found,
            caption_fallback_encoding,
            member: Some(Member {
                shard: Arc::clone(&shard_arc),
                offset: r.offset,
                len: r.len,
            }),
        });
    }
    ShardScan {
        images,
        skipped,
        passed_over: listing.passed_over,
        warning,
        indexed,
    }
}

/// Scan the tar shards `shards` as one dataset named `root` (see the module docs for the layout).
///
/// Images are sorted by member name (compared as paths, exactly as a folder's files are compared by
/// their path relative to the folder), then by shard order: the same images under the same names
/// get the same indices, so the same buckets, crops, flips and pixels, whether they come from a
/// folder or from shards, however they are spread over shards. Uses each shard's current index
/// ([`super::write_index`]) when it has one, else reads the tar headers and each image member's header bytes
/// with positioned reads, on a pool of `opts.num_threads` threads dropped before returning.
///
/// Per member, these become [`Skip`]s named `<shard>/<member>`: an undecodable or unsupported
/// header, zero size, more than `max_pixels` pixels, an unreadable or malformed caption member
/// (JSON that does not parse, a non-string `"caption"`). A shard that cannot be opened, or whose
/// tar is truncated or corrupt, is a skip named by the shard (the members before the damage are
/// kept). Captions from [`ScanOptions::captions`] are not supported (the folder's metadata maps
/// key by file path) and are ignored.
///
/// Errors: [`Error::NoImages`] (naming `root`) when `shards` is empty or no shard holds an image
/// candidate; [`Error::InvalidArgument`] for bad caption extensions; [`Error::Io`] if the threads
/// cannot be started.
pub fn scan_shards(root: &Path, shards: &[PathBuf], opts: &ScanOptions) -> Result<Scan> {
    super::validate_caption_extensions(&opts.caption_extensions)?;
    let pool = super::scan_pool(root, opts, usize::MAX)?;
    let per_shard: Vec<ShardScan> = pool.install(|| {
        shards
            .par_iter()
            .map(|s| scan_one(s, opts, &pool))
            .collect()
    });
    drop(pool);
    let mut images: Vec<(usize, ImageEntry)> = Vec::new();
    let mut skipped = Vec::new();
    let mut passed_over = PassedOver::default();
    let mut warnings = Vec::new();
    let mut unindexed = Vec::new();
    for (k, s) in per_shard.into_iter().enumerate() {
        if !s.indexed {
            unindexed.push(shards[k].clone());
        }
        images.extend(s.images.into_iter().map(|e| (k, e)));
        skipped.extend(s.skipped);
        passed_over += s.passed_over;
        warnings.extend(s.warning);
    }
    if images.is_empty() && skipped.is_empty() {
        return Err(Error::NoImages {
            path: root.to_path_buf(),
            reason: if shards.is_empty() {
                "no shards given".into()
            } else {
                format!("no image members in {} shards", shards.len())
            },
        });
    }
    let member_name = |(k, e): &(usize, ImageEntry)| {
        (
            e.path
                .strip_prefix(&shards[*k])
                .unwrap_or(&e.path)
                .to_path_buf(),
            *k,
        )
    };
    images.sort_by_cached_key(member_name);
    let images: Vec<ImageEntry> = images.into_iter().map(|(_, e)| e).collect();
    let mut scan = Scan::new(root, images, skipped, passed_over, warnings);
    scan.unindexed_shards = unindexed;
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{as_tar_files, folder, relative, write_tar};
    use super::super::{scan, ScanOptions};
    use super::*;
    use crate::error::SkipCode;

    #[test]
    fn shards_scan_like_the_folder_whatever_the_split() {
        let (dir, files) = folder();
        let folder_scan = scan(dir.path(), &ScanOptions::default()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let one = out.path().join("one.tar");
        write_tar(&one, &as_tar_files(&files));
        let (s0, s1) = (out.path().join("s0.tar"), out.path().join("s1.tar"));
        write_tar(&s0, &as_tar_files(&files[..3]));
        write_tar(&s1, &as_tar_files(&files[3..]));
        for shards in [vec![one.clone()], vec![s1.clone(), s0.clone()]] {
            let s = scan_shards(out.path(), &shards, &ScanOptions::default()).unwrap();
            assert_eq!(s.found, 4);
            assert_eq!(s.passed_over.caption_files, 2);
            let want: Vec<(PathBuf, Header, &str, bool)> = (folder_scan.images.iter())
                .map(|e| {
                    (
                        relative(e, dir.path()),
                        e.header,
                        e.caption.as_str(),
                        e.caption_found,
                    )
                })
                .collect();
            let got: Vec<(PathBuf, Header, &str, bool)> = (s.images.iter())
                .map(|e| {
                    let shard = &e.member.as_ref().unwrap().shard;
                    (
                        relative(e, shard),
                        e.header,
                        e.caption.as_str(),
                        e.caption_found,
                    )
                })
                .collect();
            assert_eq!(got, want);
            // A member's bytes are exactly the file's.
            for (e, f) in s.images.iter().zip(&folder_scan.images) {
                assert_eq!(e.read().unwrap(), std::fs::read(&f.path).unwrap());
            }
        }
    }

    #[test]
    fn json_captions_bad_members_and_truncated_shards_are_reported() {
        let (_dir, files) = folder();
        let jpeg = files.iter().find(|f| f.0 == "a.jpg").unwrap().1.clone();
        let out = tempfile::tempdir().unwrap();
        let shard = out.path().join("x.tar");
        let mut bad_jpeg = jpeg.clone();
        bad_jpeg.truncate(20);
        write_tar(
            &shard,
            &[
                ("k1.jpg", jpeg.clone()),
                (
                    "k1.json",
                    br#"{"caption": "from json", "text": "not this"}"#.to_vec(),
                ),
                ("k2.jpg", jpeg.clone()),
                ("k2.json", br#"{"text": "the text field"}"#.to_vec()),
                ("k3.jpg", bad_jpeg),
                ("k4.jpg", jpeg.clone()),
                ("k4.json", b"{not json".to_vec()),
                ("k5.jpg", jpeg.clone()),
                ("k5.cls", b"3".to_vec()),
                (".hidden.jpg", jpeg.clone()),
            ],
        );
        let s = scan_shards(
            out.path(),
            std::slice::from_ref(&shard),
            &ScanOptions::default(),
        )
        .unwrap();
        let caps: Vec<(&str, &str)> = (s.images.iter())
            .map(|e| {
                (
                    e.path.file_name().unwrap().to_str().unwrap(),
                    e.caption.as_str(),
                )
            })
            .collect();
        assert_eq!(
            caps,
            [
                ("k1.jpg", "from json"),
                ("k2.jpg", "the text field"),
                ("k5.jpg", "")
            ]
        );
        let skips: Vec<(PathBuf, SkipCode)> =
            s.skipped.iter().map(|k| (k.path.clone(), k.code)).collect();
        assert_eq!(
            skips,
            [
                (shard.join("k3.jpg"), SkipCode::Decode),
                (shard.join("k4.jpg"), SkipCode::Decode)
            ]
        );
        assert!(
            s.skipped[1].message.contains("k4.json"),
            "{}",
            s.skipped[1].message
        );
        assert!(
            s.skipped[0].message.contains("x.tar/k3.jpg"),
            "{}",
            s.skipped[0].message
        );
        assert_eq!(
            (s.found, s.passed_over.other_files, s.passed_over.hidden),
            (5, 1, 1)
        );

        // Truncated inside the second image: the first is kept, the shard is a skip naming it.
        let cut = out.path().join("cut.tar");
        write_tar(&cut, &[("a.jpg", jpeg.clone()), ("b.jpg", jpeg.clone())]);
        // b.jpg's data starts after a's header, a's data padded to 512 bytes, and b's header.
        let b_offset = 512 + (jpeg.len() as u64).div_ceil(512) * 512 + 512;
        let f = std::fs::OpenOptions::new().write(true).open(&cut).unwrap();
        f.set_len(b_offset + jpeg.len() as u64 / 2).unwrap();
        let s = scan_shards(
            out.path(),
            std::slice::from_ref(&cut),
            &ScanOptions::default(),
        )
        .unwrap();
        assert_eq!(s.images.len(), 1);
        assert_eq!(s.skipped.len(), 1);
        assert_eq!(s.skipped[0].path, cut);
        assert!(
            s.skipped[0].message.contains("b.jpg"),
            "{}",
            s.skipped[0].message
        );
        assert_eq!(s.found, s.images.len() + s.skipped.len());
    }

    #[test]
    fn stems_pair_like_files_in_a_folder() {
        assert_eq!(stem("a/b.c.jpg"), "a/b.c");
        assert_eq!(stem("a.b/c"), "a.b/c");
        assert_eq!(stem("k.jpg"), "k");
        assert!(is_hidden("a/.b/c.jpg") && !is_hidden("a/b.c"));
        assert!(scan_shards(Path::new("/x"), &[], &ScanOptions::default()).is_err());
    }
}
