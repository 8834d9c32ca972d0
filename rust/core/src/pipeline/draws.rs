//! The random draws of one sample: where its crop lies, whether it is flipped, and its caption,
//! each a pure function of (seed, epoch, sample, image) through [`crate::rng`].
//!
//! Without variants every draw is keyed by (epoch, sample): a new crop and caption each epoch.
//! With `crop_variants = K` (and random crop) an image has `K` crops, crop `v` at offsets
//! `u(seed, v, VariantCropX/Y, image)`, and a sample uses crop
//! `v = floor(K * u(seed, epoch, CropVariant, sample))`; with `text_variants = K` the caption
//! operations (variant line, tag shuffle, tag dropout) of variant `t` are keyed `(t, image)` and a
//! sample uses `t = floor(K * u(seed, epoch, TextVariant, sample))`. Flip and whole-caption
//! dropout stay per-(epoch, sample) draws either way. So a cache holding every image's `K` crops
//! (both flip states) and `K` captions (plus `""`) covers every epoch, and a run uses the same
//! draws with or without it.
//!
//! Draws only: it reads options and the sample index, never a file.

use super::loader::Inner;
use crate::bucket::Bucket;
use crate::rng::{self, Stream};
use crate::transform::{CropMode, Placement};

/// `floor(k * u)` for a uniform `u` in [0, 1), clamped into `0..k`.
fn pick(k: u32, u: f64) -> u32 {
    ((f64::from(k) * u) as u32).min(k - 1)
}

impl Inner {
    /// The crop mode of `image` (its subset's, else the loader's).
    pub(super) fn crop_mode(&self, image: usize) -> CropMode {
        self.subsets[self.subset_of[image]]
            .crop
            .unwrap_or(self.opts.crop)
    }

    /// The flip probability of `image` (its subset's, else the loader's).
    pub(super) fn flip_prob(&self, image: usize) -> f64 {
        self.subsets[self.subset_of[image]]
            .flip_prob
            .unwrap_or(self.opts.flip_prob)
    }

    /// The crop variants `image` has: `Some(k)` with `crop_variants = k` and a random crop, else
    /// `None` (a centre crop is one crop whatever `k`).
    pub(super) fn crop_variants_of(&self, image: usize) -> Option<u32> {
        self.opts
            .crop_variants
            .filter(|_| self.crop_mode(image) == CropMode::Random)
    }

    /// Where sample `sample` (of image `image`) of `epoch` lies in `bucket`, with its flip.
    pub(super) fn placement(
        &self,
        epoch: u64,
        sample: usize,
        image: usize,
        bucket: Bucket,
    ) -> Placement {
        let seed = self.opts.seed;
        let index = sample as u64;
        let flip = rng::uniform(seed, epoch, Stream::Flip, index) < self.flip_prob(image);
        match self.crop_variants_of(image) {
            Some(k) => {
                let v = pick(k, rng::uniform(seed, epoch, Stream::CropVariant, index));
                self.variant_placement(image, bucket, v, flip)
            }
            None => Placement::new(
                self.images[image].header.upright_size(),
                (bucket.width, bucket.height),
                self.crop_mode(image),
                rng::uniform(seed, epoch, Stream::CropX, index),
                rng::uniform(seed, epoch, Stream::CropY, index),
                flip,
            ),
        }
    }

    /// Crop variant `variant` of `image` in `bucket`, flipped or not (crop variants only exist
    /// with a random crop; for a centre crop this is the centre crop).
    pub(super) fn variant_placement(
        &self,
        image: usize,
        bucket: Bucket,
        variant: u32,
        flip: bool,
    ) -> Placement {
        let (seed, v, i) = (self.opts.seed, u64::from(variant), image as u64);
        Placement::new(
            self.images[image].header.upright_size(),
            (bucket.width, bucket.height),
            self.crop_mode(image),
            rng::uniform(seed, v, Stream::VariantCropX, i),
            rng::uniform(seed, v, Stream::VariantCropY, i),
            flip,
        )
    }

    /// The caption sample `sample` (of image `image`) gets in `epoch`, after its subset's caption
    /// operations.
    pub(super) fn caption(&self, epoch: u64, sample: usize, image: usize) -> String {
        let ops = &self.subsets[self.subset_of[image]].caption;
        let text = &self.images[image].caption;
        let (seed, index) = (self.opts.seed, sample as u64);
        let key = match self.opts.text_variants {
            Some(k) => (
                u64::from(pick(
                    k,
                    rng::uniform(seed, epoch, Stream::TextVariant, index),
                )),
                image as u64,
            ),
            None => (epoch, index),
        };
        ops.apply_keyed(text, seed, key, (epoch, index))
    }

    /// Caption variant `variant` of `image` (`text_variants` semantics), before the whole-caption
    /// dropout.
    pub(super) fn caption_variant(&self, image: usize, variant: u32) -> String {
        let ops = &self.subsets[self.subset_of[image]].caption;
        let key = (u64::from(variant), image as u64);
        ops.variant(&self.images[image].caption, self.opts.seed, key)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::testkit::*;
    use super::*;
    use crate::dataset::Subset;

    /// Distinct (top, left) crops per image over `epochs`, from the draws alone (no decoding).
    fn crops_per_image(loader: &Loader, epochs: u64) -> Vec<HashSet<(u32, u32)>> {
        let inner = &loader.inner;
        let mut out = vec![HashSet::new(); inner.images.len()];
        for epoch in 0..epochs {
            for (sample, &image) in inner.sample_image.iter().enumerate() {
                let bucket = inner.buckets[inner.sample_bucket[sample]];
                let p = inner.placement(epoch, sample, image, bucket);
                out[image].insert((p.crop_top, p.crop_left));
            }
        }
        out
    }

    #[test]
    fn crop_variants_bound_the_crops_per_image_and_none_keeps_the_epoch_draws() {
        let dir = dataset();
        let random = LoaderOptions {
            crop: CropMode::Random,
            seed: 5,
            ..opts()
        };
        let free = Loader::new(dir.path(), random.clone()).unwrap();
        let two = Loader::new(
            dir.path(),
            LoaderOptions {
                crop_variants: Some(2),
                ..random.clone()
            },
        )
        .unwrap();
        let (free_crops, two_crops) = (crops_per_image(&free, 30), crops_per_image(&two, 30));
        assert!(two_crops.iter().all(|c| c.len() <= 2), "{two_crops:?}");
        // Images with room to move get both of their crops, and without variants many more.
        assert!(two_crops.iter().any(|c| c.len() == 2));
        assert!(free_crops.iter().any(|c| c.len() > 5), "{free_crops:?}");
        // Without variants the offsets are today's per-(epoch, sample) draws.
        let inner = &free.inner;
        for (sample, &image) in inner.sample_image.iter().enumerate() {
            let b = inner.buckets[inner.sample_bucket[sample]];
            let want = Placement::new(
                inner.images[image].header.upright_size(),
                (b.width, b.height),
                CropMode::Random,
                rng::uniform(5, 3, Stream::CropX, sample as u64),
                rng::uniform(5, 3, Stream::CropY, sample as u64),
                false,
            );
            assert_eq!(inner.placement(3, sample, image, b), want);
        }
        // A centre crop is one crop: variants change nothing.
        let centre = |crop_variants| {
            let o = LoaderOptions {
                crop_variants,
                ..opts()
            };
            crops_per_image(&Loader::new(dir.path(), o).unwrap(), 3)
        };
        assert_eq!(centre(Some(4)), centre(None));
        assert!(centre(None).iter().all(|c| c.len() == 1));
    }

    #[test]
    fn variants_are_independent_of_threads_and_a_variant_is_the_same_pixels_every_epoch() {
        let dir = dataset();
        for i in 0..17 {
            let txt = dir.path().join(format!("img{i:02}.txt"));
            std::fs::write(txt, format!("t{i}, a, b, c, d, e")).unwrap();
        }
        let subset = Subset {
            caption: CaptionOptions {
                shuffle_caption: true,
                caption_dropout_rate: 0.3,
                ..CaptionOptions::default()
            },
            ..Subset::new(dir.path())
        };
        let run = |num_threads, epoch| {
            let o = LoaderOptions {
                // No flips: a flipped crop's (top, left) can equal another crop's.
                crop: CropMode::Random,
                crop_variants: Some(2),
                text_variants: Some(3),
                dtype: OutputDtype::U8,
                num_threads,
                ..opts()
            };
            let loader = Loader::from_subsets(vec![subset.clone()], o).unwrap();
            collect(loader.iter_epoch(epoch, 0))
        };
        let mut pixels: HashMap<(PathBuf, (u32, u32)), Vec<u8>> = HashMap::new();
        let mut captions: HashMap<PathBuf, HashSet<String>> = HashMap::new();
        let mut dropped = 0;
        for epoch in 0..4 {
            let batches = run(1, epoch);
            assert_eq!(batches, run(3, epoch), "epoch {epoch}");
            for b in &batches {
                let per = values_per_sample(&b.bucket);
                for (s, meta) in b.samples.iter().enumerate() {
                    let bytes = b.pixels.as_u8().unwrap()[s * per..(s + 1) * per].to_vec();
                    let key = (meta.path.clone(), meta.crop_top_left);
                    // A crop (top, left as flipped) seen before has the same pixels.
                    assert_eq!(pixels.entry(key).or_insert_with(|| bytes.clone()), &bytes);
                    if meta.caption.is_empty() {
                        dropped += 1;
                    } else {
                        captions
                            .entry(meta.path.clone())
                            .or_default()
                            .insert(meta.caption.clone());
                    }
                }
            }
        }
        assert!(dropped > 0);
        assert!(captions.values().all(|c| c.len() <= 3), "{captions:?}");
        assert!(captions.values().any(|c| c.len() > 1));
        // Each caption seen is one of its image's three variants.
        let loader = Loader::from_subsets(vec![subset.clone()], opts()).unwrap();
        for (path, seen) in &captions {
            let image = loader
                .images()
                .iter()
                .position(|e| &e.path == path)
                .unwrap();
            let inner = Inner::caption_variant;
            let variants: HashSet<String> =
                (0..3).map(|t| inner(&loader.inner, image, t)).collect();
            assert!(seen.is_subset(&variants), "{seen:?} vs {variants:?}");
        }
    }

    #[test]
    fn zero_variants_are_refused() {
        for (o, name) in [
            (
                LoaderOptions {
                    crop_variants: Some(0),
                    ..opts()
                },
                "crop_variants",
            ),
            (
                LoaderOptions {
                    text_variants: Some(0),
                    ..opts()
                },
                "text_variants",
            ),
        ] {
            let err = o.validate().unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
    }
}
