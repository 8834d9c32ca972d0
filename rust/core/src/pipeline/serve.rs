//! The cache stage of a worker: copy a sample's cached entries (its latent entry by placement, its
//! text entry by caption) from the shards into its slots of the batch's tensor buffers.
//!
//! Runs in place of (with `pixels = false`) or before the decode; the checksum of every entry is
//! verified as it is copied ([`Store::read_entry`](crate::cache::Store::read_entry)), so a damaged
//! entry is an error, never garbage in a batch.

use super::loader::Inner;
use super::worker::Job;
use crate::cache::{key_hex, Key};
use crate::error::{Error, Result};
use crate::scan::ImageEntry;
use crate::transform::Placement;

/// The keys of one sample and what they were computed from.
pub(super) struct SampleKeys<'a> {
    pub(super) placement: &'a Placement,
    pub(super) caption: &'a str,
    pub(super) latent: Option<Key>,
    pub(super) text: Option<Key>,
}

/// Copy `job`'s entries into its slots of the batch's cached tensors.
///
/// Errors: for a latent entry not served, what [`Cache::latent_miss`](super::cached::Cache) says
/// (the builder's recorded failure as a decode error, else [`Error::CacheMiss`] naming the file
/// and what changed); [`Error::CacheMiss`] naming the file and the caption for a text entry not
/// served; [`Error::Corrupt`] naming the shard and key for a damaged entry.
pub(super) fn copy_entries(
    inner: &Inner,
    job: &Job,
    entry: &ImageEntry,
    keys: &SampleKeys<'_>,
) -> Result<()> {
    let cache = inner
        .cache
        .as_ref()
        .expect("tensors are only served with a cache");
    for latent in [true, false] {
        let mine: Vec<usize> = (0..job.batch.tensors.len())
            .filter(|&t| job.batch.tensors[t].latent == latent)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let key = if latent { keys.latent } else { keys.text };
        let Some(key) = key.filter(|k| cache.store.contains(k)) else {
            return Err(if latent {
                cache.latent_miss(entry, job.image, keys.placement)
            } else {
                Error::CacheMiss {
                    path: entry.path.clone(),
                    reason: format!(
                        "its caption {:?} is not in the cache (text key {}); run fastdiff cache",
                        keys.caption,
                        key.as_ref().map_or_else(String::new, key_hex)
                    ),
                }
            });
        };
        let mut outs: Vec<(&str, &mut [u8])> = mine
            .iter()
            .map(|&t| {
                // SAFETY: this job is the only one for (batch, slot) and the consumer takes the
                // buffers only after every slot has finished, after this borrow ends.
                let out = unsafe { job.batch.tensor_slot_mut(t, job.slot) };
                (job.batch.tensors[t].name.as_str(), out)
            })
            .collect();
        cache.store.read_entry(&key, &mut outs)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use crate::cache::{Kind, ShardWriter};

    /// Fake latents of one f32 pixel sample `[3, h, w]`: its 8x8 average pool `[3, h/8, w/8]`.
    fn pool8(px: &[f32], h: usize, w: usize) -> Vec<f32> {
        let (lh, lw) = (h / 8, w / 8);
        let mut out = vec![0f32; 3 * lh * lw];
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    out[(c * lh + y / 8) * lw + x / 8] += px[(c * h + y) * w + x] / 64.0;
                }
            }
        }
        out
    }

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A cache of `loader`'s build batches: latents = [`pool8`] of the pixels, text = [len, 1].
    fn build_cache(dir: &Path, loader: &Loader) {
        let mut w = ShardWriter::new(dir, Kind::Latents).unwrap();
        for b in loader.iter_build(0, false, false).unwrap() {
            let b = b.unwrap();
            let (h, wd) = (b.bucket.height as usize, b.bucket.width as usize);
            let per = 3 * h * wd;
            for (s, meta) in b.samples.iter().enumerate() {
                let px = &b.pixels.as_f32().unwrap()[s * per..(s + 1) * per];
                let lat = bytes(&pool8(px, h, wd));
                let shape = [3, h / 8, wd / 8];
                let t = [("latents", OutputDtype::F32, &shape[..], &lat[..])];
                let meta_json = meta.latent_provenance();
                w.add(&meta.latent_key.unwrap(), &meta_json, &t).unwrap();
            }
        }
        w.finish().unwrap();
        let mut w = ShardWriter::new(dir, Kind::Text).unwrap();
        for (caption, key) in loader.caption_variants().unwrap() {
            let v = bytes(&[caption.len() as f32, 1.0]);
            let t = [(
                "pooled_prompt_embeds",
                OutputDtype::F32,
                &[2usize][..],
                &v[..],
            )];
            let meta = format!("{{\"caption\": {caption:?}}}");
            w.add(&key.unwrap(), &meta, &t).unwrap();
        }
        w.finish().unwrap();
    }

    const MANIFEST: &str = r#"{"format": "fastdiff-cache-1",
        "latents": {"salt": "000102030405060708090a0b0c0d0e0f", "dtype": "f32", "channels": 3,
                    "downscale": 8, "tensors": ["latents"]},
        "text": {"salt": "0f0e0d0c0b0a09080706050403020100", "dtype": "f32",
                 "tensors": {"pooled_prompt_embeds": [2]}},
        "failed": {}}"#;

    #[test]
    fn cached_batches_equal_pixel_batches_with_the_same_function() {
        let data = dataset();
        let cache = tempfile::tempdir().unwrap();
        std::fs::write(cache.path().join("fastdiff-cache.json"), MANIFEST).unwrap();
        let base = LoaderOptions {
            crop: CropMode::Random,
            crop_variants: Some(2),
            flip_prob: 0.5,
            seed: 3,
            ..opts()
        };
        let cached_opts = |pixels, rank| LoaderOptions {
            cache: Some(cache.path().to_path_buf()),
            pixels,
            rank,
            world_size: 2,
            ..base.clone()
        };
        let builder = Loader::new(data.path(), cached_opts(true, 0)).unwrap();
        let random = Loader::new(
            data.path(),
            LoaderOptions {
                crop_variants: None,
                ..cached_opts(true, 0)
            },
        );
        assert!(random
            .unwrap_err()
            .to_string()
            .contains("set crop_variants"));
        build_cache(cache.path(), &builder);
        for rank in [0, 1] {
            let pixels = Loader::new(
                data.path(),
                LoaderOptions {
                    rank,
                    world_size: 2,
                    ..base.clone()
                },
            )
            .unwrap();
            let served = Loader::new(data.path(), cached_opts(false, rank)).unwrap();
            for epoch in 0..3 {
                let want = collect(pixels.iter_epoch(epoch, 0));
                let got = collect(served.iter_epoch(epoch, 0));
                assert_eq!(want.len(), got.len());
                for (w, g) in want.iter().zip(&got) {
                    assert!(g.pixels.is_empty());
                    assert_eq!(w.bucket, g.bucket);
                    let (h, wd) = (w.bucket.height as usize, w.bucket.width as usize);
                    let per = 3 * h * wd;
                    let (name, lat, shape) = &g.tensors[0];
                    assert_eq!(
                        (name.as_str(), shape.as_slice()),
                        ("latents", &[w.samples.len(), 3, h / 8, wd / 8][..])
                    );
                    let mut expect = Vec::new();
                    for (s, (ws, gs)) in w.samples.iter().zip(&g.samples).enumerate() {
                        let px = &w.pixels.as_f32().unwrap()[s * per..(s + 1) * per];
                        expect.extend(pool8(px, h, wd));
                        assert_eq!(
                            (&ws.path, &ws.caption, ws.crop_top_left, ws.original_size),
                            (&gs.path, &gs.caption, gs.crop_top_left, gs.original_size)
                        );
                    }
                    assert_eq!(lat.as_f32().unwrap(), &expect[..]);
                    let text = g.tensors[1].1.as_f32().unwrap();
                    for (s, gs) in g.samples.iter().enumerate() {
                        assert_eq!(text[2 * s..2 * s + 2], [gs.caption.len() as f32, 1.0]);
                    }
                }
                // Resumed mid-epoch, the tail is the same.
                let tail = collect(served.iter_epoch(epoch, 2));
                assert_eq!(tail, got[2..]);
            }
        }

        // A file edited in place misses, naming the file and what changed.
        let edited = data.path().join("img01.png");
        write_image_with(&edited, 120, 80, F::Png, |x, y| [x as u8, y as u8, 7]);
        let o = LoaderOptions {
            on_error: crate::pipeline::OnError::Raise,
            world_size: 1,
            ..cached_opts(false, 0)
        };
        let err = Loader::new(data.path(), o)
            .unwrap()
            .iter_epoch(0, 0)
            .find_map(|b| b.err())
            .expect("the edited file misses");
        assert_eq!(err.code(), SkipCode::CacheMiss);
        let msg = err.to_string();
        assert!(
            msg.contains("img01.png") && msg.contains("content changed"),
            "{msg}"
        );

        // An image the builder could not decode has no entry and is recorded as failed: it fails
        // as its decode does uncached, skipped with a stand-in.
        write_truncated_png(&data.path().join("img05.png"), 90, 90);
        let o = LoaderOptions {
            world_size: 1,
            ..cached_opts(false, 0)
        };
        let probe = Loader::new(data.path(), o.clone()).unwrap();
        let bad = probe
            .images()
            .iter()
            .position(|e| e.path.ends_with("img05.png"))
            .unwrap();
        let hash = crate::cache::key_hex(&probe.content_hash(bad).unwrap());
        let manifest = MANIFEST.replace(
            "\"failed\": {}",
            &format!("\"failed\": {{\"{hash}\": \"truncated PNG\"}}"),
        );
        std::fs::write(cache.path().join("fastdiff-cache.json"), manifest).unwrap();
        let loader = Loader::new(data.path(), o).unwrap();
        let samples: Vec<SampleMeta> = collect(loader.iter_epoch(0, 0))
            .into_iter()
            .flat_map(|b| b.samples)
            .collect();
        // img01 (edited) and img05 (failed) are replaced by stand-ins: every batch stays full.
        assert_eq!(samples.len(), 17);
        assert!(samples.iter().all(|s| !s.path.ends_with("img05.png")));
        let r = loader.report();
        let skip = r
            .skipped
            .iter()
            .find(|s| s.path.ends_with("img05.png"))
            .unwrap();
        assert_eq!(skip.code, SkipCode::Decode);
        assert!(
            skip.message
                .contains("truncated PNG (recorded by the cache builder)"),
            "{}",
            skip.message
        );
    }

    #[test]
    fn a_missing_only_build_plan_leaves_out_what_the_cache_serves() {
        let data = dataset();
        let cache = tempfile::tempdir().unwrap();
        std::fs::write(cache.path().join("fastdiff-cache.json"), MANIFEST).unwrap();
        let o = LoaderOptions {
            crop: CropMode::Random,
            crop_variants: Some(2),
            flip_prob: 0.5,
            cache: Some(cache.path().to_path_buf()),
            pixels: true,
            ..opts()
        };
        let samples = |it: EpochIter| -> Vec<SampleMeta> {
            collect(it).into_iter().flat_map(|b| b.samples).collect()
        };
        let empty = Loader::new(data.path(), o.clone()).unwrap();
        let full = samples(empty.iter_build(0, false, false).unwrap());
        let keys = empty.build_latent_keys().unwrap();
        assert_eq!(
            keys.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            full.iter().map(|s| s.latent_key).collect::<Vec<_>>()
        );
        assert!(keys.iter().all(|(k, cached)| k.is_some() && !cached));
        // Nothing cached yet: the missing plan is the full plan.
        assert_eq!(samples(empty.iter_build(0, true, false).unwrap()), full);
        build_cache(cache.path(), &empty);

        // Complete: the missing plan is empty and reads no file.
        let complete = Loader::new(data.path(), o.clone()).unwrap();
        assert!(complete.build_latent_keys().unwrap().iter().all(|k| k.1));
        let mut it = complete.iter_build(0, true, false).unwrap();
        assert_eq!(it.remaining(), 0);
        assert!(it.next().is_none());
        assert_eq!((it.stats().samples, it.stats().read_s), (0, 0.0));

        // One image edited: exactly its samples, in the full plan's order.
        let edited = data.path().join("img01.png");
        write_image_with(&edited, 120, 80, F::Png, |x, y| [x as u8, y as u8, 7]);
        let loader = Loader::new(data.path(), o).unwrap();
        let missing = samples(loader.iter_build(0, true, false).unwrap());
        let want: Vec<_> = samples(loader.iter_build(0, false, false).unwrap())
            .into_iter()
            .filter(|s| s.path == edited)
            .collect();
        assert!(!want.is_empty());
        assert_eq!(missing, want);
    }

    #[test]
    fn rank_shares_of_the_build_plan_take_turns_and_cover_it_once() {
        let data = dataset();
        let o = LoaderOptions {
            flip_prob: 0.5,
            batch_size: 2,
            pixels: true,
            ..opts()
        };
        let batches = |it: EpochIter| -> Vec<Vec<PathBuf>> {
            (collect(it).into_iter())
                .map(|b| b.samples.into_iter().map(|s| s.path).collect())
                .collect()
        };
        let full = batches(
            Loader::new(data.path(), o.clone())
                .unwrap()
                .iter_build(0, false, false)
                .unwrap(),
        );
        assert!(full.len() >= 5, "{}", full.len());
        let world_size = 3;
        for rank in 0..world_size {
            let loader = Loader::new(
                data.path(),
                LoaderOptions {
                    rank,
                    world_size,
                    ..o.clone()
                },
            )
            .unwrap();
            // Without rank_share every rank gets the whole plan.
            assert_eq!(batches(loader.iter_build(0, false, false).unwrap()), full);
            let want: Vec<_> = full
                .iter()
                .skip(rank)
                .step_by(world_size)
                .cloned()
                .collect();
            assert_eq!(batches(loader.iter_build(0, false, true).unwrap()), want);
            // start_batch counts the share's batches.
            assert_eq!(
                batches(loader.iter_build(1, false, true).unwrap()),
                want[1..]
            );
        }
    }
}
