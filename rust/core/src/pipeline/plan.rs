//! What a loader loads: an epoch's batches ([`Loader::iter_epoch`], the sampler's plan), and
//! what a cache of it must hold ([`Loader::iter_build`], every distinct crop once;
//! [`Loader::caption_variants`], every distinct caption once).
//!
//! Plans only: the loading is `epoch` and `worker`, the encoding and writing of a cache the
//! builder's (Python, `fastdiff cache`).

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use super::buffer::BufferSource;
use super::epoch::{EpochIter, Planned};
use super::loader::Loader;
use super::worker::Draw;
use crate::cache::Key;
use crate::error::{Error, Result};
use crate::sampler;
use crate::transform::CropMode;

impl Loader {
    /// Start loading epoch `epoch` from batch `start_batch` of its plan (0 = the beginning; to resume
    /// after `k` consumed batches pass `k`). Worker threads start at once and the first `prefetch`
    /// batches are queued before this returns.
    ///
    /// The plan is [`sampler::plan_epoch`] over the samples (images times repeats) with this
    /// loader's options (including its rank of `world_size`). If `start_batch` is past the
    /// end of the plan, the iterator yields one [`Error::InvalidArgument`] and ends. With a cache,
    /// batches carry its tensors ([`Batch::tensors`](super::Batch::tensors)), and with `pixels =
    /// false` no pixels.
    pub fn iter_epoch(&self, epoch: u64, start_batch: usize) -> EpochIter {
        self.iter_epoch_into(epoch, start_batch, None)
    }

    /// As [`Loader::iter_epoch`], with each batch written into memory from `source` (one call per
    /// batch, in plan order, on the thread that creates or advances the iterator) instead of the
    /// loader's recycled buffers. A source error is yielded in place of the batch and ends the epoch.
    pub fn iter_epoch_into(
        &self,
        epoch: u64,
        start_batch: usize,
        source: Option<Box<dyn BufferSource>>,
    ) -> EpochIter {
        self.iter_rest_into(epoch, &[], start_batch, source)
    }

    /// Batches in this rank's plan of what remains of epoch `epoch` after the stretches `done`
    /// ([`Loader::iter_rest_into`]); with `done = []`, [`Loader::num_batches`].
    ///
    /// Errors: as [`sampler::plan_rest`].
    pub fn rest_batches(&self, epoch: u64, done: &[sampler::Segment]) -> Result<usize> {
        Ok(self.inner.plan(epoch, done)?.len())
    }

    /// As [`Loader::iter_epoch_into`], over what remains of epoch `epoch` after the stretches
    /// `done` consumed with other geometries (elastic resume; [`sampler::plan_rest`]); `start_batch`
    /// counts batches of that rest. A `done` that does not fit the epoch (a segment consumed more
    /// batches than its plan holds) is yielded as one [`Error::InvalidArgument`].
    pub fn iter_rest_into(
        &self,
        epoch: u64,
        done: &[sampler::Segment],
        start_batch: usize,
        source: Option<Box<dyn BufferSource>>,
    ) -> EpochIter {
        let inner = Arc::clone(&self.inner);
        let o = &inner.opts;
        let mode = (o.pixels, o.cache.is_some());
        let plan = match inner.plan(epoch, done) {
            Ok(plan) => plan,
            Err(err) => return EpochIter::failed(inner, epoch, err, mode),
        };
        let plan = (plan.into_iter())
            .map(|p| Planned {
                bucket: p.bucket,
                slots: (p.indices.iter())
                    .map(|&s| (s, inner.sample_image[s], Draw::Epoch))
                    .collect(),
            })
            .collect();
        EpochIter::start(inner, plan, epoch, start_batch, source, mode)
    }

    /// The pixel batches a cache of this loader must encode, from batch `start_batch` on: every
    /// distinct (image, crop variant, flip state) once, whatever the rank (variants that
    /// land on the same crop count once). In bucket-list order;
    /// per bucket its images in index order, each with its `crop_variants` crops (one for a centre
    /// crop) in variant order, each unflipped (when its flip probability is below 1) then flipped
    /// (when above 0); cut into batches of `batch_size`. A fixed order: resuming at `start_batch`
    /// continues it. Samples carry their `latent_key` (with a cache) and their image's caption as
    /// read; no cached tensors. A sample that fails is left out of its batch (no stand-in) and
    /// recorded in the report (with [`OnError::Raise`](super::OnError::Raise), yielded as the
    /// error).
    ///
    /// With `missing_only`, the plan holds only the samples the cache lacks (see
    /// [`Loader::build_latent_keys`]), so on a complete cache it is empty and no image is read or
    /// decoded; its order is the full plan's with the others left out, and it is fixed for the
    /// cache as opened by this loader (`start_batch` resumes it against that same state; after
    /// entries were added, a new loader's `missing_only` plan is the resume).
    ///
    /// With `rank_share`, only this loader's rank's share of that plan: its batches `rank`,
    /// `rank + world_size`, `rank + 2 * world_size`, … (a build split across ranks, each encoding
    /// its share; together they cover the plan once), and `start_batch` counts batches of the share.
    ///
    /// Errors: [`Error::InvalidArgument`] when an image has a random crop and `crop_variants` is
    /// not set (its crops change every epoch: no cache can hold them).
    pub fn iter_build(
        &self,
        start_batch: usize,
        missing_only: bool,
        rank_share: bool,
    ) -> Result<EpochIter> {
        let inner = Arc::clone(&self.inner);
        let per_bucket = self.build_slots()?;
        let (rank, world_size) = if rank_share {
            (inner.opts.rank, inner.opts.world_size)
        } else {
            (0, 1)
        };
        let plan = (per_bucket.into_iter().enumerate())
            .flat_map(|(bucket, slots)| {
                let slots: Vec<_> = (slots.into_iter())
                    .filter(|s| !missing_only || !s.cached)
                    .map(|s| s.slot)
                    .collect();
                (slots.chunks(inner.opts.batch_size).map(|c| Planned {
                    bucket,
                    slots: c.to_vec(),
                }))
                .collect::<Vec<_>>()
            })
            .skip(rank)
            .step_by(world_size)
            .collect();
        Ok(EpochIter::start(
            inner,
            plan,
            0,
            start_batch,
            None,
            (true, false),
        ))
    }

    /// The latent key of every sample of the full build plan ([`Loader::iter_build`] without
    /// `missing_only`), in its order, with whether the cache has it: `(key, cached)`, computed from
    /// the image headers and content hashes (nothing is decoded). A sample is cached when the
    /// store serves its key (an entry in a corrupt shard is not served) or when its image's content
    /// hash is in the manifest's `failed` (the builder could not decode those bytes: served as that
    /// failure). The key is `None` without a cache, without a latent half, or for an image whose
    /// file could not be read (never cached).
    ///
    /// Errors: as [`Loader::iter_build`].
    pub fn build_latent_keys(&self) -> Result<Vec<(Option<Key>, bool)>> {
        Ok((self.build_slots()?.into_iter().flatten())
            .map(|s| (s.key, s.cached))
            .collect())
    }

    /// The full build plan's samples per bucket (see [`Loader::iter_build`]), with their keys.
    fn build_slots(&self) -> Result<Vec<Vec<BuildSlot>>> {
        let inner = &*self.inner;
        let n = inner.images.len();
        if (0..n)
            .any(|i| inner.crop_mode(i) == CropMode::Random && inner.opts.crop_variants.is_none())
        {
            return Err(Error::InvalidArgument(
                "a random crop changes every epoch, so it cannot be cached: set crop_variants \
                 (e.g. 4) to cache that many seeded crops per image, or use crop=\"center\""
                    .into(),
            ));
        }
        let mut first_sample = vec![usize::MAX; n];
        for (s, &i) in inner.sample_image.iter().enumerate().rev() {
            first_sample[i] = s;
        }
        let cache = inner.cache.as_ref();
        let mut per_bucket: Vec<Vec<BuildSlot>> = vec![Vec::new(); inner.buckets.len()];
        for (image, &first) in first_sample.iter().enumerate() {
            let p = inner.flip_prob(image);
            let flips = [false, true]
                .into_iter()
                .filter(|&f| if f { p > 0.0 } else { p < 1.0 });
            let flips: Vec<bool> = flips.collect();
            let bucket = inner.bucket_of[image];
            let failed = cache.is_some_and(|c| {
                (c.content[image].as_ref()).is_ok_and(|h| c.store.manifest().failed.contains_key(h))
            });
            // Two variants may land on the same offsets (little room): one entry serves both.
            let mut seen = HashSet::new();
            for variant in 0..inner.crop_variants_of(image).unwrap_or(1) {
                for &flip in &flips {
                    let p = inner.variant_placement(image, inner.buckets[bucket], variant, flip);
                    if seen.insert(p) {
                        let key = cache.and_then(|c| c.latent_key(inner, image, &p));
                        let served =
                            cache.is_some_and(|c| key.is_some_and(|k| c.store.contains(&k)));
                        per_bucket[bucket].push(BuildSlot {
                            slot: (first, image, Draw::Fixed { variant, flip }),
                            key,
                            cached: key.is_some() && (served || failed),
                        });
                    }
                }
            }
        }
        Ok(per_bucket)
    }

    /// Every caption a sample of this loader can get, each once, sorted, with its text key (with
    /// a cache whose manifest has text): every image's `text_variants` caption variants (its
    /// caption as read when no subset has caption operations beyond dropout), plus `""` when some
    /// subset's `caption_dropout_rate` is above 0.
    ///
    /// Errors: [`Error::InvalidArgument`] when a subset shuffles tags, drops tags or picks a
    /// caption line (`caption_per_line`) and `text_variants` is not set: its captions change every
    /// epoch, so no cache can hold them all.
    pub fn caption_variants(&self) -> Result<Vec<(String, Option<Key>)>> {
        let inner = &*self.inner;
        let k = match inner.opts.text_variants {
            Some(k) => k,
            None => {
                if let Some(s) = inner.subsets.iter().find(|s| s.caption.has_variants()) {
                    return Err(Error::InvalidArgument(format!(
                        "subset {} shuffles, drops or picks caption tags or lines, which change every \
                         epoch: set text_variants (e.g. 4) to cache that many seeded variants per \
                         caption",
                        s.root.display()
                    )));
                }
                1
            }
        };
        let mut out = BTreeSet::new();
        for image in 0..inner.images.len() {
            for t in 0..k {
                out.insert(inner.caption_variant(image, t));
            }
        }
        if inner
            .subsets
            .iter()
            .any(|s| s.caption.caption_dropout_rate > 0.0)
        {
            out.insert(String::new());
        }
        let key = |c: &str| inner.cache.as_ref().and_then(|cache| cache.text_key(c));
        Ok(out
            .into_iter()
            .map(|c| {
                let k = key(&c);
                (c, k)
            })
            .collect())
    }
}

/// One sample of the build plan: its slot (sample index, image, draw), latent key, and whether
/// the cache has it.
#[derive(Clone)]
struct BuildSlot {
    slot: (usize, usize, Draw),
    key: Option<Key>,
    cached: bool,
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::*;
    use crate::dataset::Subset;

    #[test]
    fn batches_come_in_plan_order_and_epochs_differ() {
        let dir = dataset();
        let loader = Loader::new(
            dir.path(),
            LoaderOptions {
                num_threads: 4,
                ..opts()
            },
        )
        .unwrap();
        let indices = |batches: &[Batch]| -> Vec<Vec<usize>> {
            batches
                .iter()
                .map(|b| b.samples.iter().map(|s| s.index).collect())
                .collect()
        };
        let inner = &loader.inner;
        for epoch in [0, 1] {
            let plan = sampler::plan_epoch(
                &inner.bucket_of,
                inner.buckets.len(),
                &Sampling::single(3, false, true, 0),
                epoch,
            );
            let got = collect(loader.iter_epoch(epoch, 0));
            assert_eq!(
                indices(&got),
                plan.iter().map(|p| p.indices.clone()).collect::<Vec<_>>()
            );
        }
        let e0 = indices(&collect(loader.iter_epoch(0, 0)));
        let e1 = indices(&collect(loader.iter_epoch(1, 0)));
        assert_ne!(e0, e1);

        // Without shuffling: buckets in list order, sorted paths inside each bucket.
        let plain = Loader::new(
            dir.path(),
            LoaderOptions {
                shuffle: false,
                ..opts()
            },
        )
        .unwrap();
        let flat: Vec<(usize, PathBuf)> = collect(plain.iter_epoch(5, 0))
            .iter()
            .flat_map(|b| {
                let k = plain.buckets().iter().position(|x| *x == b.bucket).unwrap();
                b.samples.iter().map(move |s| (k, s.path.clone()))
            })
            .collect();
        let mut sorted = flat.clone();
        sorted.sort();
        assert_eq!(flat, sorted);
    }

    #[test]
    fn resume_from_start_batch_gives_the_tail() {
        let dir = dataset();
        let loader = Loader::new(dir.path(), opts()).unwrap();
        let all = collect(loader.iter_epoch(2, 0));
        let k = 3;
        let mut it = loader.iter_epoch(2, k);
        assert_eq!(it.remaining(), all.len() - k);
        let first = it.next().unwrap().unwrap();
        assert_eq!(it.remaining(), all.len() - k - 1);
        let mut tail = vec![first];
        tail.extend(it.map(|b| b.unwrap()));
        assert_eq!(tail, all[k..]);

        assert!(collect(loader.iter_epoch(2, all.len())).is_empty());
        let mut past = loader.iter_epoch(2, all.len() + 1);
        assert_eq!(past.remaining(), 0);
        let err = past.next().unwrap().unwrap_err();
        assert!(err.to_string().contains("start_batch"), "{err}");
        assert!(past.next().is_none());
    }

    #[test]
    fn caption_variants_are_every_caption_a_sample_can_get() {
        let (dir, _) = colour_dataset(4);
        for i in 0..4 {
            let text = if i < 2 {
                "same, a, b"
            } else {
                "other, c, d, e"
            };
            std::fs::write(dir.path().join(format!("c{i:02}.txt")), text).unwrap();
        }
        let plain = Loader::new(dir.path(), opts()).unwrap();
        let captions = |l: &Loader| -> Vec<String> {
            l.caption_variants()
                .unwrap()
                .into_iter()
                .map(|(c, key)| {
                    assert_eq!(key, None, "no cache, no keys");
                    c
                })
                .collect()
        };
        assert_eq!(captions(&plain), ["other, c, d, e", "same, a, b"]);
        let shuffled = Subset {
            caption: CaptionOptions {
                shuffle_caption: true,
                caption_dropout_rate: 0.5,
                ..CaptionOptions::default()
            },
            ..Subset::new(dir.path())
        };
        let err = Loader::from_subsets(vec![shuffled.clone()], opts())
            .unwrap()
            .caption_variants()
            .unwrap_err();
        assert!(err.to_string().contains("set text_variants"), "{err}");
        let o = LoaderOptions {
            text_variants: Some(3),
            ..opts()
        };
        let loader = Loader::from_subsets(vec![shuffled], o).unwrap();
        let variants = captions(&loader);
        assert!(variants.contains(&String::new()));
        assert!(
            variants.len() > 3 && variants.len() <= 1 + 4 * 3,
            "{variants:?}"
        );
        // Every caption of many epochs is one of them.
        for epoch in 0..6 {
            for b in collect(loader.iter_epoch(epoch, 0)) {
                for s in b.samples {
                    assert!(variants.contains(&s.caption), "{}", s.caption);
                }
            }
        }
    }
}
