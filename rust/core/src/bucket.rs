//! Aspect-ratio buckets: the fixed set of training sizes images are resized and cropped to.
//!
//! Images of similar shape go to the same bucket so a batch has one size without cropping away most of
//! a wide or tall picture. The candidate list follows NovelAI's aspect-ratio bucketing as implemented in
//! kohya-ss sd-scripts (`library/model_util.py`, `make_bucket_resolutions`): every bucket has about the
//! pixel area of `resolution²` (never more), sides are multiples of `step`, and sides stay within
//! `[min_side, max_side]`.
//!
//! Geometry only: it knows image sizes, never files or pixels, and must not depend on the order
//! images are seen in (the assignment of an image is a function of its size alone).

use crate::error::{Error, Result};

/// One training size in pixels. Ordered by (width, height); the candidate list itself is sorted by aspect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bucket {
    /// Width in pixels (a multiple of the configured step).
    pub width: u32,
    /// Height in pixels (a multiple of the configured step).
    pub height: u32,
}

impl Bucket {
    /// Pixel count `width * height`.
    pub fn area(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

/// Parameters of the bucket list (all in pixels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketConfig {
    /// Side of the square target area: every bucket has at most `resolution²` pixels.
    pub resolution: u32,
    /// Granularity of bucket sides (64 in kohya: latent size 8 times the VAE factor 8).
    pub step: u32,
    /// Smallest allowed bucket side.
    pub min_side: u32,
    /// Largest allowed bucket side.
    pub max_side: u32,
}

impl BucketConfig {
    /// Validated configuration. `min_side` defaults to `resolution / 2` and `max_side` to
    /// `2 * resolution` (kohya's defaults 256 and 1024 at resolution 512).
    ///
    /// Errors: [`Error::InvalidArgument`] naming the argument when `step` is 0, `resolution` is
    /// smaller than `step`, `min_side` is 0 or larger than the square bucket side
    /// (`resolution` rounded down to a multiple of `step`), or `max_side` is below `resolution`.
    /// These guarantee the list contains the square bucket, so it is never empty.
    pub fn new(
        resolution: u32,
        step: u32,
        min_side: Option<u32>,
        max_side: Option<u32>,
    ) -> Result<Self> {
        if step == 0 {
            return Err(Error::InvalidArgument(
                "bucket_step must be at least 1 pixel, got 0".into(),
            ));
        }
        if resolution < step {
            return Err(Error::InvalidArgument(format!(
                "resolution must be at least bucket_step ({step}), got {resolution}"
            )));
        }
        let square = resolution / step * step;
        let min_side = min_side.unwrap_or(resolution / 2);
        let max_side = max_side.unwrap_or(resolution.saturating_mul(2));
        if min_side == 0 || min_side > square {
            return Err(Error::InvalidArgument(format!(
                "min_bucket_side must be in [1, {square}] (resolution {resolution} rounded down to a \
                 multiple of bucket_step {step}), got {min_side}"
            )));
        }
        if max_side < resolution {
            return Err(Error::InvalidArgument(format!(
                "max_bucket_side must be at least resolution ({resolution}), got {max_side}"
            )));
        }
        Ok(BucketConfig {
            resolution,
            step,
            min_side,
            max_side,
        })
    }

    /// The candidate buckets, sorted by aspect ratio `width / height` ascending (tallest first; equal
    /// aspects by area, then width).
    ///
    /// Algorithm (kohya-ss sd-scripts `model_util.make_bucket_resolutions`, after NovelAI): for every
    /// width `w` that is a multiple of `step` in `[min_side, max_side]`, take
    /// `h = floor(min(max_side, resolution² / w) / step) * step`; keep `(w, h)` and `(h, w)` if
    /// `h >= min_side`. The square `s × s` with `s = floor(resolution / step) * step` is always
    /// included, as in kohya. Duplicates are removed. Every bucket therefore has sides that are
    /// multiples of `step` within `[min_side, max_side]` and area `<= resolution²`.
    ///
    /// Differences from kohya: kohya does not drop heights below `min_side` (with a large
    /// `max_side` it produces e.g. 2048x128); when `resolution` is not a multiple of `step` kohya first
    /// rounds the area down to whole steps, whereas this uses `resolution²` exactly (identical lists
    /// whenever `resolution % step == 0`, the usual case).
    pub fn buckets(&self) -> Vec<Bucket> {
        let step = u64::from(self.step);
        let area = u64::from(self.resolution) * u64::from(self.resolution);
        let max = u64::from(self.max_side);
        let min = u64::from(self.min_side);
        let square = self.resolution / self.step * self.step;
        let mut out = vec![Bucket {
            width: square,
            height: square,
        }];
        let first = min.div_ceil(step) * step;
        // Widths above resolution² / min_side would give heights below min_side: stop there.
        let last = max.min(area / min);
        for w in (first..=last).step_by(step as usize) {
            let h = (area / w).min(max) / step * step;
            if h < min {
                continue;
            }
            // Both sides are <= max_side <= u32::MAX here.
            let (w, h) = (w as u32, h as u32);
            out.push(Bucket {
                width: w,
                height: h,
            });
            out.push(Bucket {
                width: h,
                height: w,
            });
        }
        sort_by_aspect(&mut out);
        out
    }

    /// The bucket of an upright `width x height` image (pixels, both > 0) under kohya-ss sd-scripts'
    /// `bucket_no_upscale`: never larger than the image on either side, so it is only ever shrunk.
    ///
    /// * If the image covers its usual bucket (`candidates[assign(candidates, width, height)]`,
    ///   `width >= bw` and `height >= bh`), that bucket: large images bucket exactly as without
    ///   `no_upscale` (a 3072x3000 photo at resolution 1024 gets 1024x1024).
    /// * Otherwise the largest step-aligned size it covers, as kohya's `BucketManager.select_bucket`
    ///   does: the image scaled by `s = min(1, resolution / sqrt(width * height))` (never up; down
    ///   only to fit the area `resolution²`), each side rounded down to a multiple of `step`, then
    ///   capped at `max_side` rounded down to a multiple of `step` (the excess is cropped away).
    ///   Such a bucket may be smaller than `min_side` and is usually not among
    ///   [`BucketConfig::buckets`]. Unlike kohya, `max_side` is honoured and large images that fit
    ///   a listed bucket keep it (fewer, fuller buckets).
    ///
    /// Returns `None` when a side would round down to 0, i.e. the image (after the scale) is
    /// narrower or shorter than one `step`: it cannot be trained without enlarging it (the loader
    /// skips it with code `too_small`).
    pub fn no_upscale_bucket(
        &self,
        candidates: &[Bucket],
        width: u32,
        height: u32,
    ) -> Option<Bucket> {
        let usual = candidates[assign(candidates, width, height)];
        if width >= usual.width && height >= usual.height {
            return Some(usual);
        }
        let (w, h) = (f64::from(width), f64::from(height));
        let s = 1f64.min(f64::from(self.resolution) / (w * h).sqrt());
        let down = |x: f64, limit: u32| -> u32 {
            // `as` saturates; clamp to the image (float error must never round up past it).
            let x = (x.floor() as u32).min(limit).min(self.max_side);
            x / self.step * self.step
        };
        let (mut bw, mut bh) = (down(w * s, width), down(h * s, height));
        // Float rounding at the area boundary: shrink the longer side until the area fits.
        let area = u64::from(self.resolution) * u64::from(self.resolution);
        while bw > 0 && bh > 0 && u64::from(bw) * u64::from(bh) > area {
            if bw >= bh {
                bw -= self.step;
            } else {
                bh -= self.step;
            }
        }
        (bw > 0 && bh > 0).then_some(Bucket {
            width: bw,
            height: bh,
        })
    }
}

/// Sort buckets by aspect ratio `width / height` ascending (tallest first; equal aspects by area,
/// then width) and remove duplicates: the order of [`BucketConfig::buckets`].
pub fn sort_by_aspect(list: &mut Vec<Bucket>) {
    list.sort_by(|a, b| {
        // Compare w_a/h_a with w_b/h_b exactly by cross-multiplication (no float rounding).
        (u64::from(a.width) * u64::from(b.height))
            .cmp(&(u64::from(b.width) * u64::from(a.height)))
            .then(a.area().cmp(&b.area()))
            .then(a.width.cmp(&b.width))
    });
    list.dedup();
}

/// Index into `buckets` of the bucket whose aspect ratio is nearest to the image's, measured in log
/// space: minimises `|ln(width / height) - ln(bw / bh)|` (so 2:1 and 1:2 are equally far from 1:1).
/// Ties go to the larger bucket area, then to the earlier index. `width`/`height` are the upright image
/// size in pixels.
///
/// Panics if `buckets` is empty or `width`/`height` is 0 (a scanned image always has both > 0).
pub fn assign(buckets: &[Bucket], width: u32, height: u32) -> usize {
    assert!(!buckets.is_empty(), "assign() needs at least one bucket");
    assert!(
        width > 0 && height > 0,
        "image size {width}x{height} is empty"
    );
    let target = (f64::from(width) / f64::from(height)).ln();
    let distance = |b: &Bucket| ((f64::from(b.width) / f64::from(b.height)).ln() - target).abs();
    let mut best = 0;
    let mut best_distance = distance(&buckets[0]);
    for (i, b) in buckets.iter().enumerate().skip(1) {
        let d = distance(b);
        if d < best_distance || (d == best_distance && b.area() > buckets[best].area()) {
            best = i;
            best_distance = d;
        }
    }
    best
}

/// Share of an image's area a bucket crops away: the image (upright `width x height`, both > 0)
/// resized to cover the bucket (see [`crate::transform::Placement`]) keeps the fraction
/// `min(a, b) / max(a, b)` of its area, where `a = width / height` and `b = bw / bh`; this is
/// `1 - exp(-|ln a - ln b|)`, in `[0, 1)`, computed from the aspect ratios (before the resize
/// rounds to whole pixels).
pub fn crop_fraction(width: u32, height: u32, bucket: Bucket) -> f64 {
    1.0 - (-aspect_error(width, height, bucket)).exp()
}

/// Distance in log-aspect between an image (upright `width x height`) and a bucket:
/// `|ln(width / height) - ln(bw / bh)|`, the measure [`assign`] minimises.
pub fn aspect_error(width: u32, height: u32, bucket: Bucket) -> f64 {
    let ln = |w: u32, h: u32| (f64::from(w) / f64::from(h)).ln();
    (ln(width, height) - ln(bucket.width, bucket.height)).abs()
}

/// One image moved by [`merge_small_buckets`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Move {
    /// The image (index into the `sizes` given).
    pub image: usize,
    /// Its own bucket before merging (index into the bucket list).
    pub from: usize,
    /// Its bucket after merging.
    pub to: usize,
    /// [`aspect_error`] of the image at `to`.
    pub aspect_error: f64,
    /// Extra crop: [`crop_fraction`] at `to` minus [`crop_fraction`] at `from` (may be negative
    /// when `to` fits the image better than its own bucket did, e.g. under `no_upscale`).
    pub extra_crop: f64,
}

/// What [`merge_small_buckets`] needs besides the images.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MergeRule {
    /// A bucket with `0 < samples < min_fill` is merged away when it can be (>= 1).
    pub min_fill: usize,
    /// Largest extra crop (share of the image area, in `[0, 1]`) an image may get by moving.
    pub max_extra_crop: f64,
    /// Never move an image into a bucket larger than itself on either side (`no_upscale`).
    pub no_upscale: bool,
}

/// Merge buckets holding fewer than `rule.min_fill` samples into the nearest bucket in log-aspect
/// that every image of theirs may move to; updates `bucket_of` and returns the images moved, in
/// image order, each with its final bucket.
///
/// `buckets` is the bucket list (sorted by aspect, as [`BucketConfig::buckets`]), `sizes[i]` image
/// `i`'s upright size, `samples[i]` its sample count (its subset's repeats), `bucket_of[i]` its own
/// bucket. A bucket's count is the sum of `samples` of its images (over all ranks: compare
/// `min_fill` with a global batch, `batch_size * world_size`, to fill whole global batches).
///
/// Algorithm (greedy, deterministic): repeat: take the *source*, the bucket with the fewest samples
/// among those with `0 < count < min_fill` not yet given up (ties: the lower bucket index). Its
/// *candidates* are the other non-empty buckets such that every image now in the source moves with
/// an extra crop `crop_fraction(image, candidate) - crop_fraction(image, own bucket)` of at most
/// `max_extra_crop` (measured against the image's own bucket, however often it moved) and, with
/// `no_upscale`, is at least the candidate's size on both sides. The target is the candidate that
/// is itself still below `min_fill` if any (so two small buckets fill each other), else any; among
/// those the nearest in `|ln(bw / bh) - ln(sw / sh)|` to the source, ties to the lower bucket index.
/// All images of the source move there. A source without candidates is given up (it stays small).
/// Each step empties a bucket, so this ends after fewer steps than there are buckets.
///
/// Panics if a bucket index is out of range or `sizes`, `samples` and `bucket_of` differ in length.
pub fn merge_small_buckets(
    buckets: &[Bucket],
    sizes: &[(u32, u32)],
    samples: &[usize],
    bucket_of: &mut [usize],
    rule: &MergeRule,
) -> Vec<Move> {
    assert!(sizes.len() == samples.len() && sizes.len() == bucket_of.len());
    let own: Vec<usize> = bucket_of.to_vec();
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); buckets.len()];
    let mut count = vec![0usize; buckets.len()];
    for (image, &b) in bucket_of.iter().enumerate() {
        members[b].push(image);
        count[b] += samples[image];
    }
    let ln = |b: &Bucket| (f64::from(b.width) / f64::from(b.height)).ln();
    let mut given_up = vec![false; buckets.len()];
    let fits = |image: usize, to: usize| {
        let (w, h) = sizes[image];
        let b = buckets[to];
        let extra = crop_fraction(w, h, b) - crop_fraction(w, h, buckets[own[image]]);
        extra <= rule.max_extra_crop && (!rule.no_upscale || (w >= b.width && h >= b.height))
    };
    loop {
        let source = (0..buckets.len())
            .filter(|&b| count[b] > 0 && count[b] < rule.min_fill && !given_up[b])
            .min_by_key(|&b| (count[b], b));
        let Some(source) = source else { break };
        let candidates = (0..buckets.len())
            .filter(|&b| b != source && count[b] > 0)
            .filter(|&b| members[source].iter().all(|&i| fits(i, b)));
        let target = candidates.min_by(|&a, &b| {
            let key = |x: usize| {
                (
                    count[x] >= rule.min_fill,
                    (ln(&buckets[x]) - ln(&buckets[source])).abs(),
                )
            };
            let (ka, kb) = (key(a), key(b));
            ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1)).then(a.cmp(&b))
        });
        match target {
            Some(target) => {
                let moved = std::mem::take(&mut members[source]);
                for &i in &moved {
                    bucket_of[i] = target;
                }
                count[target] += count[source];
                count[source] = 0;
                members[target].extend(moved);
            }
            None => given_up[source] = true,
        }
    }
    (0..sizes.len())
        .filter(|&i| bucket_of[i] != own[i])
        .map(|i| {
            let (w, h) = sizes[i];
            let (from, to) = (own[i], bucket_of[i]);
            Move {
                image: i,
                from,
                to,
                aspect_error: aspect_error(w, h, buckets[to]),
                extra_crop: crop_fraction(w, h, buckets[to]) - crop_fraction(w, h, buckets[from]),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(width: u32, height: u32) -> Bucket {
        Bucket { width, height }
    }

    fn kohya_512() -> Vec<Bucket> {
        BucketConfig::new(512, 64, None, None).unwrap().buckets()
    }

    #[test]
    fn defaults_are_kohyas() {
        let c = BucketConfig::new(512, 64, None, None).unwrap();
        assert_eq!((c.min_side, c.max_side), (256, 1024));
    }

    #[test]
    fn kohya_512_list_is_exact() {
        // Worked by hand from kohya's loop (max_area = 8*8 = 64 steps²; h = min(16, 64 // (w/64)) steps):
        // w=256→1024, 320→768, 384→640, 448→576, 512→512, 576→448, 640→384, 704→320, 768→320,
        // 832..1024→256; plus the transposes; sorted by w/h.
        let expected = vec![
            b(256, 1024),
            b(256, 960),
            b(256, 896),
            b(256, 832),
            b(320, 768),
            b(320, 704),
            b(384, 640),
            b(448, 576),
            b(512, 512),
            b(576, 448),
            b(640, 384),
            b(704, 320),
            b(768, 320),
            b(832, 256),
            b(896, 256),
            b(960, 256),
            b(1024, 256),
        ];
        assert_eq!(kohya_512(), expected);
    }

    #[test]
    fn list_properties_hold_for_many_configs() {
        for (res, step, min, max) in [
            (512, 64, None, None),
            (768, 64, None, None),
            (1024, 64, Some(256), Some(2048)),
            (1024, 32, None, None),
            (600, 64, None, None),
            (256, 8, Some(64), Some(1024)),
        ] {
            let c = BucketConfig::new(res, step, min, max).unwrap();
            let list = c.buckets();
            assert!(!list.is_empty());
            let square = res / step * step;
            assert!(list.contains(&b(square, square)), "{res} {step}");
            for (i, x) in list.iter().enumerate() {
                assert_eq!(x.width % step, 0, "{x:?}");
                assert_eq!(x.height % step, 0, "{x:?}");
                assert!((c.min_side..=c.max_side).contains(&x.width), "{x:?}");
                assert!((c.min_side..=c.max_side).contains(&x.height), "{x:?}");
                assert!(x.area() <= u64::from(res) * u64::from(res), "{x:?}");
                // Symmetric and strictly sorted by aspect (no duplicates).
                assert!(list.contains(&b(x.height, x.width)), "{x:?}");
                if i > 0 {
                    let p = list[i - 1];
                    assert!(
                        u64::from(p.width) * u64::from(x.height)
                            <= u64::from(x.width) * u64::from(p.height)
                    );
                    assert_ne!(p, *x);
                }
            }
        }
    }

    #[test]
    fn heights_below_min_side_are_dropped() {
        // 512 with max 2048: kohya would emit 2048x128; min 256 removes it.
        let list = BucketConfig::new(512, 64, None, Some(2048))
            .unwrap()
            .buckets();
        assert!(list.iter().all(|x| x.width >= 256 && x.height >= 256));
        assert!(list.contains(&b(1024, 256)));
        assert!(!list.iter().any(|x| x.width > 1024));
    }

    #[test]
    fn invalid_configs_name_the_argument() {
        let msg = |r: Result<BucketConfig>| r.unwrap_err().to_string();
        assert!(msg(BucketConfig::new(512, 0, None, None)).contains("bucket_step"));
        assert!(msg(BucketConfig::new(32, 64, None, None)).contains("resolution"));
        assert!(msg(BucketConfig::new(512, 64, Some(0), None)).contains("min_bucket_side"));
        assert!(msg(BucketConfig::new(512, 64, Some(576), None)).contains("min_bucket_side"));
        assert!(msg(BucketConfig::new(512, 64, None, Some(500))).contains("max_bucket_side"));
    }

    #[test]
    fn assign_picks_nearest_log_aspect() {
        let list = kohya_512();
        let at = |w, h| list[assign(&list, w, h)];
        // 1920x1080: ln(16/9) = 0.575; 640x384 (ln 5/3 = 0.511) beats 704x320 (ln 2.2 = 0.788).
        let nearest = list
            .iter()
            .min_by(|x, y| {
                let d = |q: &Bucket| {
                    ((f64::from(q.width) / f64::from(q.height)).ln() - (1920f64 / 1080.0).ln())
                        .abs()
                };
                d(x).partial_cmp(&d(y)).unwrap()
            })
            .copied()
            .unwrap();
        assert_eq!(nearest, b(640, 384));
        assert_eq!(at(1920, 1080), b(640, 384));
        assert_eq!(at(1080, 1920), b(384, 640));
        assert_eq!(at(1000, 1000), b(512, 512));
        assert_eq!(at(3000, 100), b(1024, 256));
        assert_eq!(at(100, 3000), b(256, 1024));
        // 4:3 (ln 0.288): 576x448 (ln 0.251) is nearer than 640x384 (0.511).
        assert_eq!(at(800, 600), b(576, 448));
    }

    #[test]
    fn no_upscale_keeps_the_usual_bucket_when_the_image_covers_it() {
        let c = BucketConfig::new(1024, 64, None, None).unwrap();
        let list = c.buckets();
        assert_eq!(c.no_upscale_bucket(&list, 3072, 3000), Some(b(1024, 1024)));
        assert_eq!(
            c.no_upscale_bucket(&list, 4032, 3024),
            Some(list[assign(&list, 4032, 3024)])
        );
    }

    #[test]
    fn no_upscale_never_enlarges_and_never_gives_an_empty_bucket() {
        let c = BucketConfig::new(1024, 64, None, None).unwrap();
        let list = c.buckets();
        // Smaller than every listed bucket: the image rounded down to whole steps.
        assert_eq!(c.no_upscale_bucket(&list, 1000, 1000), Some(b(960, 960)));
        assert_eq!(c.no_upscale_bucket(&list, 600, 400), Some(b(576, 384)));
        assert_eq!(c.no_upscale_bucket(&list, 64, 64), Some(b(64, 64)));
        // 1:10 and 10:1 below the list's minimum side.
        assert_eq!(c.no_upscale_bucket(&list, 100, 1000), Some(b(64, 960)));
        assert_eq!(c.no_upscale_bucket(&list, 1000, 100), Some(b(960, 64)));
        // Narrower than one step: nothing fits without enlarging.
        assert_eq!(c.no_upscale_bucket(&list, 1, 1), None);
        assert_eq!(c.no_upscale_bucket(&list, 40, 300), None);
        assert_eq!(c.no_upscale_bucket(&list, 63, 5000), None);
        // Large but not covering (5000x300): scaled to the area (4180x250), rounded down, capped
        // at max_side.
        assert_eq!(c.no_upscale_bucket(&list, 5000, 300), Some(b(2048, 192)));
        for (w, h) in [
            (1, 1),
            (64, 64),
            (65, 1000),
            (1023, 1025),
            (3000, 3000),
            (20000, 64),
            (64, 20000),
            (1500, 700),
            (u32::MAX, u32::MAX),
            (u32::MAX, 64),
        ] {
            if let Some(x) = c.no_upscale_bucket(&list, w, h) {
                assert!(x.width > 0 && x.height > 0, "{w}x{h}: {x:?}");
                assert!(x.width <= w && x.height <= h, "{w}x{h}: {x:?}");
                assert_eq!((x.width % 64, x.height % 64), (0, 0), "{w}x{h}: {x:?}");
                assert!(x.area() <= 1024 * 1024, "{w}x{h}: {x:?}");
                assert!(x.width <= 2048 && x.height <= 2048, "{w}x{h}: {x:?}");
            }
        }
    }

    #[test]
    fn assign_ties_go_to_the_larger_area() {
        // Same aspect, different sizes: the larger wins whatever the order.
        let list = [b(256, 256), b(512, 512), b(384, 384)];
        assert_eq!(assign(&list, 10, 10), 1);
        // Symmetric in log space: 2:1 and 1:2 are equally far from 1:1; larger area wins.
        let list = [b(128, 64), b(128, 256)];
        assert_eq!(assign(&list, 50, 50), 1);
    }

    fn merged(
        sizes: &[(u32, u32)],
        samples: &[usize],
        min_fill: usize,
        max_extra_crop: f64,
    ) -> (Vec<usize>, Vec<Move>) {
        let list = kohya_512();
        let mut bucket_of: Vec<usize> = sizes.iter().map(|&(w, h)| assign(&list, w, h)).collect();
        let rule = MergeRule {
            min_fill,
            max_extra_crop,
            no_upscale: false,
        };
        let moves = merge_small_buckets(&list, sizes, samples, &mut bucket_of, &rule);
        (bucket_of, moves)
    }

    #[test]
    fn crop_fraction_is_the_area_share_the_cover_resize_cuts_away() {
        // 200x100 into a square: resized to 200x100 -> 100x100 kept of 200x100, half cut.
        assert!((crop_fraction(200, 100, b(512, 512)) - 0.5).abs() < 1e-12);
        assert!((aspect_error(200, 100, b(512, 512)) - 2f64.ln()).abs() < 1e-12);
        assert_eq!(crop_fraction(576, 448, b(576, 448)), 0.0);
        // 576x448 (ln 9/7 = 0.2513) into 512x512: 1 - 7/9 cut.
        assert!((crop_fraction(576, 448, b(512, 512)) - 2.0 / 9.0).abs() < 1e-12);
    }

    #[test]
    fn small_buckets_merge_only_within_the_crop_bound() {
        // Indices in kohya_512: 512x512 is 8, 576x448 is 9, 1024x256 is 16.
        let sizes = [(512, 512), (512, 512), (512, 512), (576, 448), (1024, 256)];
        let ones = [1; 5];
        // 2/9 = 22.2% extra crop for the 576x448 image: allowed at 0.25, not at 0.2.
        let (bucket_of, moves) = merged(&sizes, &ones, 4, 0.25);
        assert_eq!(bucket_of, [8, 8, 8, 8, 16]);
        assert_eq!(moves.len(), 1);
        let m = moves[0];
        assert_eq!((m.image, m.from, m.to), (3, 9, 8));
        assert!((m.aspect_error - (9f64 / 7.0).ln()).abs() < 1e-12);
        assert!((m.extra_crop - 2.0 / 9.0).abs() < 1e-12);
        // 1024x256 would lose 3/4 of itself in the square: it stays, alone.
        let (bucket_of, moves) = merged(&sizes, &ones, 4, 0.2);
        assert_eq!(bucket_of, [8, 8, 8, 9, 16]);
        assert!(moves.is_empty());
        // A bucket at min_fill is no source: nothing moves at min_fill 1.
        assert!(merged(&sizes, &ones, 1, 1.0).1.is_empty());
    }

    #[test]
    fn a_small_target_is_preferred_and_repeats_count() {
        // 448x576 (7) with one sample, 512x512 (8) full with 5, 576x448 (9) with 2 repeats of one
        // image. At 0.45, 7 may reach 9 (39.5% extra): both small, they fill each other (3 samples)
        // although 8 is nearer.
        let sizes = [(448, 576), (512, 512), (576, 448)];
        let (bucket_of, moves) = merged(&sizes, &[1, 5, 2], 3, 0.45);
        assert_eq!(bucket_of, [9, 8, 9]);
        assert_eq!(moves.len(), 1);
        // At 0.3 it cannot: into the nearest, 8; then 9 (2 < 3) into 8 as well.
        let (bucket_of, moves) = merged(&sizes, &[1, 5, 2], 3, 0.3);
        assert_eq!(bucket_of, [8, 8, 8]);
        assert_eq!(moves.iter().map(|m| m.image).collect::<Vec<_>>(), [0, 2]);
        // Repeats fill a bucket: 9 with 3 samples is not small at min_fill 3.
        let (bucket_of, _) = merged(&sizes, &[1, 5, 3], 3, 0.45);
        assert_eq!(bucket_of, [8, 8, 9]);
    }

    #[test]
    fn merging_never_enlarges_under_no_upscale_and_images_count_against_their_own_bucket() {
        let list = [b(448, 448), b(480, 480), b(512, 512)];
        // Same aspect, so no extra crop: only the size decides.
        let sizes = [(500, 500), (600, 600), (600, 600)];
        let mut bucket_of = vec![0, 2, 2];
        let rule = MergeRule {
            min_fill: 2,
            max_extra_crop: 0.0,
            no_upscale: true,
        };
        let moves = merge_small_buckets(&list, &sizes, &[1, 1, 1], &mut bucket_of, &rule);
        // 500x500 does not cover 512x512: it stays in 448x448.
        assert_eq!((bucket_of, moves.len()), (vec![0, 2, 2], 0));
        let mut bucket_of = vec![0, 2, 2];
        let rule = MergeRule {
            no_upscale: false,
            ..rule
        };
        merge_small_buckets(&list, &sizes, &[1, 1, 1], &mut bucket_of, &rule);
        assert_eq!(bucket_of, [2, 2, 2]);
    }
}
