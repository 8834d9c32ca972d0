//! The batch plan of an epoch: which images form which batch, in which order.
//!
//! Every batch holds images of one bucket (so one tensor shape). The plan is a pure function of
//! (bucket assignment, [`Sampling`], epoch) — no state carries over between epochs — so an epoch can
//! be replayed or resumed mid-way exactly, and the thread count never changes it.
//!
//! Data-parallel training (several ranks) plans one *global* sequence of batches of
//! `batch_size * world_size` samples, identical on every rank, and each rank takes its own slice of
//! every global batch. So all ranks run the same number of steps, use the same bucket at each step,
//! and see disjoint samples; with `world_size == 1` the plan is exactly the single-process one.
//!
//! Works on indices only: it must not look at files, pixels or captions.

use crate::error::{Error, Result};
use crate::rng::{SplitMix64, Stream};
use std::str::FromStr;

/// How a bucket's last global batch is cut when its sample count `n` is not a multiple of
/// `world_size` (only matters with `world_size > 1` and without `drop_last`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Remainder {
    /// Repeat the batch's own samples from its start until every rank gets `ceil(n / world_size)`
    /// (the repeated samples are seen twice in that epoch). Default.
    #[default]
    Pad,
    /// Leave out the last `n % world_size` samples so every rank gets `floor(n / world_size)`; a
    /// batch with fewer samples than ranks is left out entirely.
    Drop,
}

impl FromStr for Remainder {
    type Err = Error;

    /// `"pad"` or `"drop"`. Errors: [`Error::InvalidArgument`] naming `remainder`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pad" => Ok(Remainder::Pad),
            "drop" => Ok(Remainder::Drop),
            _ => Err(Error::InvalidArgument(format!(
                "remainder must be \"pad\" or \"drop\", got {s:?}"
            ))),
        }
    }
}

/// Everything besides the bucket assignment and the epoch that decides a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampling {
    /// Samples per batch and rank (>= 1).
    pub batch_size: usize,
    /// Drop every global batch shorter than `batch_size * world_size`.
    pub drop_last: bool,
    /// Shuffle samples within buckets and the batch order, per epoch.
    pub shuffle: bool,
    /// Seed of both shuffles.
    pub seed: u64,
    /// This process's rank, `< world_size`.
    pub rank: usize,
    /// Number of data-parallel ranks (>= 1).
    pub world_size: usize,
    /// How short global batches are split across ranks.
    pub remainder: Remainder,
}

impl Sampling {
    /// Single-process sampling (rank 0 of 1).
    pub fn single(batch_size: usize, drop_last: bool, shuffle: bool, seed: u64) -> Self {
        Sampling {
            batch_size,
            drop_last,
            shuffle,
            seed,
            rank: 0,
            world_size: 1,
            remainder: Remainder::Pad,
        }
    }

    /// Samples each rank takes from a global batch of `n` samples (0 = the batch is left out).
    fn per_rank(&self, n: usize) -> usize {
        let global = self.batch_size * self.world_size;
        if n == global {
            self.batch_size
        } else if self.drop_last {
            0
        } else {
            match self.remainder {
                Remainder::Pad => n.div_ceil(self.world_size),
                Remainder::Drop => n / self.world_size,
            }
        }
    }
}

/// One batch of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPlan {
    /// Index of the bucket (into the loader's bucket list) all samples of this batch belong to.
    pub bucket: usize,
    /// Sample indices (into the loader's sample list), in sample order; 1..=batch_size entries.
    pub indices: Vec<usize>,
}

/// This rank's batches of epoch `epoch`.
///
/// `bucket_of[i]` is the bucket of sample `i` (each `< num_buckets`). Algorithm, with
/// `g = batch_size * world_size`:
/// 1. group sample indices by bucket, ascending within each bucket;
/// 2. if `shuffle`, shuffle each bucket's samples (Fisher–Yates, [`SplitMix64`] keyed
///    `(seed, epoch, ShuffleWithinBucket, bucket)`);
/// 3. cut each bucket into consecutive global batches of `g`; the last one may be short: it is
///    dropped when `drop_last`, otherwise cut to a multiple of `world_size` by [`Remainder`];
/// 4. if `shuffle`, shuffle the global batch order (keyed `(seed, epoch, ShuffleBatches, 0)`);
///    otherwise batches stay grouped by bucket in bucket-list order;
/// 5. rank `r` takes samples `[r * k, (r + 1) * k)` of each global batch of `k * world_size`.
///
/// With one rank and without `drop_last` every sample appears exactly once. The length is
/// [`num_batches`], the same on every rank.
///
/// Panics if `batch_size` or `world_size` is 0, `rank >= world_size`, or a bucket index is
/// `>= num_buckets` (the loader validates all of these).
pub fn plan_epoch(
    bucket_of: &[usize],
    num_buckets: usize,
    s: &Sampling,
    epoch: u64,
) -> Vec<BatchPlan> {
    assert!(s.batch_size > 0, "batch_size must be at least 1");
    assert!(s.rank < s.world_size, "rank must be below world_size");
    let global = s.batch_size * s.world_size;
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); num_buckets];
    for (sample, &bucket) in bucket_of.iter().enumerate() {
        members[bucket].push(sample);
    }
    let mut plan = Vec::with_capacity(num_batches(bucket_of, num_buckets, s));
    for (bucket, mut samples) in members.into_iter().enumerate() {
        if s.shuffle {
            SplitMix64::new(s.seed, epoch, Stream::ShuffleWithinBucket, bucket as u64)
                .shuffle(&mut samples);
        }
        for chunk in samples.chunks(global) {
            let k = s.per_rank(chunk.len());
            if k == 0 {
                continue;
            }
            // Pad repeats the chunk from its start; Drop (k * world_size <= len) just truncates.
            let mine = (s.rank * k..(s.rank + 1) * k).map(|i| chunk[i % chunk.len()]);
            plan.push(BatchPlan {
                bucket,
                indices: mine.collect(),
            });
        }
    }
    if s.shuffle {
        // Every rank has the same number of batches per bucket in the same order, so the same
        // permutation keeps them in step.
        SplitMix64::new(s.seed, epoch, Stream::ShuffleBatches, 0).shuffle(&mut plan);
    }
    plan
}

/// Number of batches [`plan_epoch`] returns (the same for every seed, epoch and rank): the sum over
/// buckets of the global batches kept by the rules of [`plan_epoch`]; with one rank that is
/// `ceil(n / batch_size)`, or `floor(n / batch_size)` with `drop_last`, where `n` is the bucket's
/// sample count.
///
/// Panics if `batch_size` or `world_size` is 0 or a bucket index is `>= num_buckets`.
pub fn num_batches(bucket_of: &[usize], num_buckets: usize, s: &Sampling) -> usize {
    bucket_counts(bucket_of, num_buckets)
        .iter()
        .map(|&n| batches_of_bucket(n, s))
        .sum()
}

/// Samples per bucket.
pub fn bucket_counts(bucket_of: &[usize], num_buckets: usize) -> Vec<usize> {
    let mut counts = vec![0usize; num_buckets];
    for &bucket in bucket_of {
        counts[bucket] += 1;
    }
    counts
}

/// Batches [`plan_epoch`] makes from a bucket of `n` samples.
pub fn batches_of_bucket(n: usize, s: &Sampling) -> usize {
    assert!(s.batch_size > 0, "batch_size must be at least 1");
    assert!(s.world_size > 0, "world_size must be at least 1");
    let global = s.batch_size * s.world_size;
    let last = n % global;
    n / global + usize::from(last > 0 && s.per_rank(last) > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(
        a: &[usize],
        buckets: usize,
        bs: usize,
        drop_last: bool,
        shuffle: bool,
        seed: u64,
        epoch: u64,
    ) -> Vec<BatchPlan> {
        plan_epoch(
            a,
            buckets,
            &Sampling::single(bs, drop_last, shuffle, seed),
            epoch,
        )
    }

    fn count(a: &[usize], buckets: usize, bs: usize, drop_last: bool) -> usize {
        num_batches(a, buckets, &Sampling::single(bs, drop_last, true, 0))
    }

    fn sharded(world_size: usize, rank: usize, remainder: Remainder, drop_last: bool) -> Sampling {
        Sampling {
            rank,
            world_size,
            remainder,
            ..Sampling::single(4, drop_last, true, 11)
        }
    }

    /// 50 images over 4 buckets with uneven sizes (bucket 3 empty, bucket 1 has 7).
    fn assignment() -> Vec<usize> {
        (0..50)
            .map(|i| match i % 10 {
                0..=5 => 0,
                6 => 1,
                _ => 2,
            })
            .chain([1, 1])
            .collect()
    }

    fn counts(bucket_of: &[usize]) -> [usize; 4] {
        let mut c = [0; 4];
        for &b in bucket_of {
            c[b] += 1;
        }
        c
    }

    #[test]
    fn length_is_sum_of_ceil_or_floor() {
        let a = assignment();
        let c = counts(&a);
        assert_eq!(c, [30, 7, 15, 0]);
        for bs in 1..=12 {
            let ceil: usize = c.iter().map(|n| n.div_ceil(bs)).sum();
            let floor: usize = c.iter().map(|n| n / bs).sum();
            assert_eq!(count(&a, 4, bs, false), ceil);
            assert_eq!(count(&a, 4, bs, true), floor);
            for shuffle in [false, true] {
                assert_eq!(plan(&a, 4, bs, false, shuffle, 3, 1).len(), ceil);
                assert_eq!(plan(&a, 4, bs, true, shuffle, 3, 1).len(), floor);
            }
        }
    }

    #[test]
    fn every_image_exactly_once_and_batches_are_single_bucket() {
        let a = assignment();
        for shuffle in [false, true] {
            for bs in [1, 4, 8, 64] {
                let plan = plan(&a, 4, bs, false, shuffle, 7, 2);
                let mut seen = vec![0u32; a.len()];
                for batch in &plan {
                    assert!((1..=bs).contains(&batch.indices.len()));
                    for &i in &batch.indices {
                        assert_eq!(a[i], batch.bucket);
                        seen[i] += 1;
                    }
                }
                assert!(seen.iter().all(|&n| n == 1), "shuffle {shuffle} bs {bs}");
            }
        }
    }

    #[test]
    fn drop_last_keeps_only_full_batches() {
        let a = assignment();
        let plan = plan(&a, 4, 8, true, true, 0, 0);
        assert!(plan.iter().all(|b| b.indices.len() == 8));
        // 30 → 3 full batches, 7 → 0, 15 → 1.
        let per_bucket = |k| plan.iter().filter(|b| b.bucket == k).count();
        assert_eq!([per_bucket(0), per_bucket(1), per_bucket(2)], [3, 0, 1]);
        // Each image at most once.
        let mut all: Vec<usize> = plan.iter().flat_map(|b| b.indices.clone()).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 32);
    }

    #[test]
    fn reproducible_per_seed_and_epoch_and_different_otherwise() {
        let a = assignment();
        let p = |seed, epoch| plan(&a, 4, 4, false, true, seed, epoch);
        assert_eq!(p(1, 5), p(1, 5));
        assert_ne!(p(1, 5), p(1, 6));
        assert_ne!(p(1, 5), p(2, 5));
        // Not only the batch order: the grouping of images into batches changes too.
        let groups = |plan: Vec<BatchPlan>| {
            let mut g: Vec<Vec<usize>> = plan
                .into_iter()
                .map(|b| {
                    let mut v = b.indices;
                    v.sort();
                    v
                })
                .collect();
            g.sort();
            g
        };
        assert_ne!(groups(p(1, 5)), groups(p(1, 6)));
    }

    #[test]
    fn no_shuffle_is_sorted_within_buckets_and_buckets_in_order() {
        let a = assignment();
        let plan = plan(&a, 4, 4, false, false, 9, 9);
        let buckets: Vec<usize> = plan.iter().map(|b| b.bucket).collect();
        let mut sorted = buckets.clone();
        sorted.sort();
        assert_eq!(buckets, sorted);
        for k in 0..3 {
            let flat: Vec<usize> = plan
                .iter()
                .filter(|b| b.bucket == k)
                .flat_map(|b| b.indices.clone())
                .collect();
            let expected: Vec<usize> = (0..a.len()).filter(|&i| a[i] == k).collect();
            assert_eq!(flat, expected);
        }
        // Seed and epoch do not matter without shuffling.
        assert_eq!(plan, self::plan(&a, 4, 4, false, false, 0, 0));
    }

    #[test]
    fn empty_input_gives_empty_plan() {
        assert!(plan(&[], 3, 2, false, true, 0, 0).is_empty());
        assert_eq!(count(&[], 3, 2, false), 0);
    }

    #[test]
    fn ranks_step_together_on_disjoint_samples_that_cover_the_epoch() {
        // Bucket sizes 30, 7, 15 with batch 4 on 3 ranks: global batches of 12.
        let a = assignment();
        for epoch in 0..3 {
            let plans: Vec<Vec<BatchPlan>> = (0..3)
                .map(|r| plan_epoch(&a, 4, &sharded(3, r, Remainder::Drop, false), epoch))
                .collect();
            let n = num_batches(&a, 4, &sharded(3, 0, Remainder::Drop, false));
            // 30 -> 12, 12, 6 (2 each); 7 -> 6 (2 each, 1 dropped); 15 -> 12, 3 (1 each).
            assert_eq!(n, 3 + 1 + 2);
            let mut seen = vec![0u32; a.len()];
            for p in &plans {
                assert_eq!(p.len(), n);
                for b in p {
                    for &i in &b.indices {
                        assert_eq!(a[i], b.bucket);
                        seen[i] += 1;
                    }
                }
            }
            for step in 0..n {
                let b: Vec<usize> = plans.iter().map(|p| p[step].bucket).collect();
                assert!(b.iter().all(|&x| x == b[0]), "step {step}: buckets {b:?}");
                let k: Vec<usize> = plans.iter().map(|p| p[step].indices.len()).collect();
                assert!(k.iter().all(|&x| x == k[0]), "step {step}: sizes {k:?}");
            }
            assert!(seen.iter().all(|&c| c <= 1));
            // Only the odd sample of bucket 1 (7 = 2 * 3 + 1) is left out.
            assert_eq!(seen.iter().filter(|&&c| c == 0).count(), 1);
        }
    }

    #[test]
    fn pad_repeats_samples_so_every_sample_is_seen() {
        let a = assignment();
        let plans: Vec<Vec<BatchPlan>> = (0..3)
            .map(|r| plan_epoch(&a, 4, &sharded(3, r, Remainder::Pad, false), 4))
            .collect();
        // 30 -> 12, 12, 6; 7 -> 7 padded to 9; 15 -> 12, 3.
        assert_eq!(plans[0].len(), 6);
        let mut seen = vec![0u32; a.len()];
        for p in &plans {
            for b in p {
                b.indices.iter().for_each(|&i| seen[i] += 1);
            }
        }
        assert!(seen.iter().all(|&c| c >= 1));
        assert_eq!(seen.iter().map(|&c| c as usize).sum::<usize>(), a.len() + 2);
        // drop_last keeps only full global batches: 30 -> 2, 7 -> 0, 15 -> 1.
        let full = plan_epoch(&a, 4, &sharded(3, 1, Remainder::Pad, true), 4);
        assert_eq!(full.len(), 3);
        assert!(full.iter().all(|b| b.indices.len() == 4));
    }

    #[test]
    fn one_rank_is_the_single_process_plan_whatever_the_remainder() {
        let a = assignment();
        for remainder in [Remainder::Pad, Remainder::Drop] {
            let s = Sampling {
                remainder,
                ..Sampling::single(4, false, true, 3)
            };
            assert_eq!(plan_epoch(&a, 4, &s, 2), plan(&a, 4, 4, false, true, 3, 2));
        }
        assert_eq!("pad".parse::<Remainder>().unwrap(), Remainder::Pad);
        assert_eq!("drop".parse::<Remainder>().unwrap(), Remainder::Drop);
        let err = "keep".parse::<Remainder>().unwrap_err();
        assert!(err.to_string().contains("remainder"), "{err}");
    }
}
