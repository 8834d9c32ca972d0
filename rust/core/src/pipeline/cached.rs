//! A loader's cache folder: the [`Store`] opened at construction, every image's content hash, the
//! keys of a sample, the tensors a batch gets, and what a miss says.
//!
//! Opened once per [`Loader`](super::Loader) and read-only afterwards (the index of entries by
//! path, for miss messages, is built on the first miss). It must not decode pixels.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use rayon::prelude::*;
use serde_json::Value;

use super::loader::Inner;
use super::shards::IoCounts;
use crate::bucket::Bucket;
use crate::cache::{self, Key, Kind, Store};
use crate::error::{Error, Result};
use crate::scan::ImageEntry;
use crate::transform::{CropMode, OutputDtype, Placement};

/// The cache of a loader.
pub(super) struct Cache {
    pub(super) store: Store,
    /// Per image: its content hash, or why its file could not be read to hash it.
    pub(super) content: Vec<std::result::Result<Key, String>>,
    /// Latent entries' provenance by image path, built on the first miss.
    by_path: OnceLock<HashMap<String, Vec<Value>>>,
}

/// One cached tensor of a batch: name, whether it is a latent tensor, dtype, per-sample shape.
pub(super) type TensorSpec = (String, bool, OutputDtype, Vec<usize>);

impl Cache {
    /// Open the cache folder `dir` and hash every image's bytes (blake3, on a pool of `threads`
    /// threads dropped before returning); also returns the images whose file could not be read,
    /// with the error.
    ///
    /// Errors: those of [`Store::open`]; [`Error::Io`] if the threads cannot be started.
    pub(super) fn open(
        dir: &Path,
        images: &[ImageEntry],
        threads: usize,
        io: &IoCounts,
    ) -> Result<(Cache, Vec<(usize, Error)>)> {
        let store = Store::open(dir)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("fastdiff-hash-{i}"))
            .build()
            .map_err(|e| Error::io(dir, std::io::Error::other(e.to_string())))?;
        let hashed: Vec<Result<Key>> = pool.install(|| {
            images
                .par_iter()
                .map(|e| {
                    e.read()
                        .inspect(|bytes| io.count(e, bytes.len()))
                        .map(|bytes| cache::content_hash(&bytes))
                        .map_err(|err| Error::io(&e.path, err))
                })
                .collect()
        });
        let mut failed = Vec::new();
        let content = (hashed.into_iter().enumerate())
            .map(|(i, r)| {
                r.map_err(|e| {
                    let message = e.to_string();
                    failed.push((i, e));
                    message
                })
            })
            .collect();
        let cache = Cache {
            store,
            content,
            by_path: OnceLock::new(),
        };
        Ok((cache, failed))
    }

    /// The key of `image`'s latent entry at `p`; `None` without a latent half or when the file
    /// could not be read.
    pub(super) fn latent_key(&self, inner: &Inner, image: usize, p: &Placement) -> Option<Key> {
        let spec = self.store.manifest().latents.as_ref()?;
        let content = self.content[image].as_ref().ok()?;
        let o = &inner.opts;
        Some(cache::latent_key(
            content,
            p,
            o.filter.name(),
            o.background,
            &spec.salt,
        ))
    }

    /// The key of `caption`'s text entry; `None` without a text half.
    pub(super) fn text_key(&self, caption: &str) -> Option<Key> {
        let spec = self.store.manifest().text.as_ref()?;
        Some(cache::text_key(caption, &spec.salt))
    }

    /// The cached tensors of a batch in `bucket`: the latent half's (each `[channels, h / d, w /
    /// d]`), then the text half's, as the manifest names them.
    pub(super) fn tensors(&self, bucket: Bucket) -> Vec<TensorSpec> {
        let m = self.store.manifest();
        let mut out = Vec::new();
        if let Some(l) = &m.latents {
            let d = l.downscale as usize;
            let shape = vec![
                l.channels,
                bucket.height as usize / d,
                bucket.width as usize / d,
            ];
            out.extend((l.tensors.iter()).map(|name| (name.clone(), true, l.dtype, shape.clone())));
        }
        if let Some(t) = &m.text {
            out.extend(
                (t.tensors.iter())
                    .map(|(name, shape)| (name.clone(), false, t.dtype, shape.clone())),
            );
        }
        out
    }

    /// Why `image`'s latent entry `key` for placement `p` is not served: the builder's recorded
    /// failure (as the error the uncached run meets), else [`Error::CacheMiss`] saying what
    /// changed since the cache was built, from the provenance of the entries cached for its path.
    pub(super) fn latent_miss(&self, entry: &ImageEntry, image: usize, p: &Placement) -> Error {
        let path = entry.path.clone();
        let content = match &self.content[image] {
            Ok(c) => c,
            Err(why) => {
                return Error::CacheMiss {
                    path,
                    reason: format!("the file could not be read to hash it: {why}"),
                }
            }
        };
        if let Some(why) = self.store.manifest().failed.get(content) {
            return Error::Decode {
                path,
                reason: format!("{why} (recorded by the cache builder)"),
            };
        }
        let now = describe(p);
        let by_path = self.by_path.get_or_init(|| self.index_by_path());
        let cached = by_path
            .get(&*entry.path.to_string_lossy())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let reason = if cached.is_empty() {
            format!("not in the cache ({now}); run fastdiff cache to encode it")
        } else if cached.iter().any(|v| same_placement(v, p)) {
            format!(
                "content changed since the cache was built (or the VAE, filter or background \
                 did): an entry exists for this file at {now}, under another key; rerun fastdiff \
                 cache"
            )
        } else {
            let was: Vec<String> = cached.iter().take(3).map(describe_json).collect();
            format!(
                "cached at {}, now {now}: the bucket, crop or flip options changed; rerun \
                 fastdiff cache",
                was.join("; ")
            )
        };
        Error::CacheMiss { path, reason }
    }

    fn index_by_path(&self) -> HashMap<String, Vec<Value>> {
        let mut out: HashMap<String, Vec<Value>> = HashMap::new();
        for key in self.store.keys(Kind::Latents) {
            let Some(meta) = self.store.provenance(key) else {
                continue;
            };
            if let Ok(v) = serde_json::from_str::<Value>(meta) {
                if let Some(path) = v.get("path").and_then(Value::as_str) {
                    out.entry(path.to_owned()).or_default().push(v);
                }
            }
        }
        out
    }
}

fn describe(p: &Placement) -> String {
    format!(
        "bucket {}x{} crop ({}, {}) resized {}x{} flip {}",
        p.bucket.0, p.bucket.1, p.crop_left, p.crop_top, p.resized.0, p.resized.1, p.flip
    )
}

fn pair(v: &Value, name: &str) -> Option<(u64, u64)> {
    let a = v.get(name)?.as_array()?;
    Some((a.first()?.as_u64()?, a.get(1)?.as_u64()?))
}

fn describe_json(v: &Value) -> String {
    let show = |name| pair(v, name).map_or("?".into(), |(a, b)| format!("{a}x{b}"));
    let crop = pair(v, "crop").map_or("?".into(), |(a, b)| format!("({a}, {b})"));
    let flip = v.get("flip").and_then(Value::as_bool).unwrap_or(false);
    format!(
        "bucket {} crop {crop} resized {} flip {flip}",
        show("bucket"),
        show("resized")
    )
}

fn same_placement(v: &Value, p: &Placement) -> bool {
    let w = |x: (u32, u32)| Some((u64::from(x.0), u64::from(x.1)));
    pair(v, "bucket") == w(p.bucket)
        && pair(v, "resized") == w(p.resized)
        && pair(v, "crop") == w((p.crop_left, p.crop_top))
        && v.get("flip").and_then(Value::as_bool) == Some(p.flip)
}

/// Check that a cache can hold every sample of `inner`'s options: with a latent half, no random
/// crop without `crop_variants` and bucket sides that are multiples of the downscale; with a
/// text half, no caption operations but dropout without `text_variants`.
///
/// Errors: [`Error::InvalidArgument`] saying which option to set.
pub(super) fn check_cacheable(inner: &Inner, store: &Store) -> Result<()> {
    let m = store.manifest();
    if let Some(l) = &m.latents {
        let random = (0..inner.images.len()).any(|i| inner.crop_mode(i) == CropMode::Random);
        if random && inner.opts.crop_variants.is_none() {
            return Err(Error::InvalidArgument(
                "a random crop cannot be cached without crop_variants: set crop_variants (e.g. 4) \
                 to cache that many seeded crops per image (the crops are frozen into the cache), \
                 or use crop=\"center\""
                    .into(),
            ));
        }
        if !inner.opts.bucket_step.is_multiple_of(l.downscale) {
            return Err(Error::InvalidArgument(format!(
                "bucket_step {} is not a multiple of the cache's latent downscale {}",
                inner.opts.bucket_step, l.downscale
            )));
        }
    }
    if m.text.is_some() && inner.opts.text_variants.is_none() {
        if let Some(s) = inner.subsets.iter().find(|s| s.caption.has_variants()) {
            return Err(Error::InvalidArgument(format!(
                "subset {}: caption shuffle, tag dropout or caption_per_line cannot be cached \
                 without text_variants: set text_variants (e.g. 4) to cache that many seeded \
                 variants per caption",
                s.root.display()
            )));
        }
    }
    Ok(())
}
