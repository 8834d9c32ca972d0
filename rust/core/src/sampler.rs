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

/// A stretch of an epoch already consumed with one geometry: its first `batches` global batches
/// of `batch_size * world_size` samples (what an elastic resume replays, see [`plan_rest`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Samples per batch and rank in that stretch (>= 1).
    pub batch_size: usize,
    /// Ranks in that stretch (>= 1).
    pub world_size: usize,
    /// Global batches of that stretch's plan consumed.
    pub batches: usize,
}

/// A global batch: samples `start..end` of its bucket's (shuffled, not yet consumed) sample list.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    bucket: usize,
    start: usize,
    end: usize,
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
    let members = shuffled_members(bucket_of, num_buckets, s, epoch);
    rank_slices(&members, s, epoch, 0)
}

/// This rank's batches of what remains of epoch `epoch` after the stretches `done` (elastic resume:
/// a checkpoint taken with another `batch_size` or `world_size`); `done = []` is [`plan_epoch`].
///
/// The epoch's sample order is steps 1–2 of [`plan_epoch`]. Then, for each segment `i` in turn, the
/// samples not consumed yet are planned with that segment's geometry (steps 3–4, the batch order
/// keyed `(seed, epoch, ShuffleBatches, i)`; so segment 0 is the original plan) and the samples of
/// its first `batches` global batches are removed from their buckets, which keep their order.
/// What remains is planned with this `s` (keyed `i = done.len()`) and cut into rank slices (step 5).
///
/// So every sample that no consumed global batch held appears once in the result, but for the
/// remainder policy of `s` at each bucket's last global batch (`pad` repeats up to `world_size - 1`
/// samples, `drop` and `drop_last` leave some out). Samples an earlier geometry dropped or padded
/// in a batch that was not consumed are not lost: they are still in the remaining set.
///
/// Errors: [`Error::InvalidArgument`] when a segment has a zero `batch_size` or `world_size`, or
/// consumed more global batches than its plan of the remaining samples holds.
///
/// Panics as [`plan_epoch`].
pub fn plan_rest(
    bucket_of: &[usize],
    num_buckets: usize,
    s: &Sampling,
    epoch: u64,
    done: &[Segment],
) -> Result<Vec<BatchPlan>> {
    let mut members = shuffled_members(bucket_of, num_buckets, s, epoch);
    for (i, seg) in done.iter().enumerate() {
        if seg.batch_size == 0 || seg.world_size == 0 {
            return Err(Error::InvalidArgument(format!(
                "resume segment {i} has batch_size {} and world_size {}: both must be at least 1",
                seg.batch_size, seg.world_size
            )));
        }
        let geometry = Sampling {
            batch_size: seg.batch_size,
            world_size: seg.world_size,
            rank: 0,
            ..*s
        };
        let chunks = global_batches(&members, &geometry, epoch, i as u64);
        if seg.batches > chunks.len() {
            return Err(Error::InvalidArgument(format!(
                "resume segment {i} consumed {} global batches of {} x {}, but its plan of the \
                 epoch's remaining samples holds {}",
                seg.batches,
                seg.batch_size,
                seg.world_size,
                chunks.len()
            )));
        }
        let mut consumed: Vec<Vec<bool>> = members.iter().map(|m| vec![false; m.len()]).collect();
        for c in &chunks[..seg.batches] {
            consumed[c.bucket][c.start..c.end].fill(true);
        }
        for (samples, gone) in members.iter_mut().zip(&consumed) {
            let mut flags = gone.iter();
            samples.retain(|_| !flags.next().copied().unwrap_or(false));
        }
    }
    Ok(rank_slices(&members, s, epoch, done.len() as u64))
}

/// Steps 1–2 of [`plan_epoch`]: each bucket's samples, ascending, shuffled when `shuffle`.
fn shuffled_members(
    bucket_of: &[usize],
    num_buckets: usize,
    s: &Sampling,
    epoch: u64,
) -> Vec<Vec<usize>> {
    assert!(s.batch_size > 0, "batch_size must be at least 1");
    assert!(s.rank < s.world_size, "rank must be below world_size");
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); num_buckets];
    for (sample, &bucket) in bucket_of.iter().enumerate() {
        members[bucket].push(sample);
    }
    if s.shuffle {
        for (bucket, samples) in members.iter_mut().enumerate() {
            SplitMix64::new(s.seed, epoch, Stream::ShuffleWithinBucket, bucket as u64)
                .shuffle(samples);
        }
    }
    members
}

/// Steps 3–4 of [`plan_epoch`] over `members` with the geometry of `s`, the batch order keyed
/// `(seed, epoch, ShuffleBatches, order_key)`.
fn global_batches(members: &[Vec<usize>], s: &Sampling, epoch: u64, order_key: u64) -> Vec<Chunk> {
    let global = s.batch_size * s.world_size;
    let mut chunks = Vec::new();
    for (bucket, samples) in members.iter().enumerate() {
        for start in (0..samples.len()).step_by(global) {
            let end = (start + global).min(samples.len());
            if s.per_rank(end - start) > 0 {
                chunks.push(Chunk { bucket, start, end });
            }
        }
    }
    if s.shuffle {
        SplitMix64::new(s.seed, epoch, Stream::ShuffleBatches, order_key).shuffle(&mut chunks);
    }
    chunks
}

/// Step 5 of [`plan_epoch`]: this rank's slice of each global batch of `members` (order as
/// [`global_batches`] with `order_key`).
fn rank_slices(members: &[Vec<usize>], s: &Sampling, epoch: u64, order_key: u64) -> Vec<BatchPlan> {
    let chunks = global_batches(members, s, epoch, order_key);
    (chunks.iter())
        .map(|c| {
            let chunk = &members[c.bucket][c.start..c.end];
            let k = s.per_rank(chunk.len());
            // Pad repeats the chunk from its start; Drop (k * world_size <= len) just truncates.
            let mine = (s.rank * k..(s.rank + 1) * k).map(|i| chunk[i % chunk.len()]);
            BatchPlan {
                bucket: c.bucket,
                indices: mine.collect(),
            }
        })
        .collect()
}

/// Which samples epoch `epoch` trains: `out[i]` is whether sample `i` is in some batch of some
/// rank's [`plan_epoch`] (the union over ranks `0..world_size`). The padding of
/// [`Remainder::Pad`] repeats samples already counted; with `drop_last` or [`Remainder::Drop`] the
/// samples left out of a bucket's last global batch are not trained. Without `shuffle` or
/// without any dropping it is the same for every epoch.
///
/// Panics as [`plan_epoch`] (but for `rank`, which it does not use).
pub fn trained_samples(
    bucket_of: &[usize],
    num_buckets: usize,
    s: &Sampling,
    epoch: u64,
) -> Vec<bool> {
    let s = Sampling { rank: 0, ..*s };
    let members = shuffled_members(bucket_of, num_buckets, &s, epoch);
    let mut out = vec![false; bucket_of.len()];
    for c in global_batches(&members, &s, epoch, 0) {
        let chunk = &members[c.bucket][c.start..c.end];
        let taken = (s.per_rank(chunk.len()) * s.world_size).min(chunk.len());
        for &sample in &chunk[..taken] {
            out[sample] = true;
        }
    }
    out
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

    /// Samples of every rank's first `k` batches of `plans` (one plan per rank), with multiplicity.
    fn taken(plans: &[Vec<BatchPlan>], k: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (plans.iter())
            .flat_map(|p| p[..k].iter().flat_map(|b| b.indices.clone()))
            .collect();
        v.sort();
        v
    }

    fn ranks(
        a: &[usize],
        world_size: usize,
        bs: usize,
        epoch: u64,
        done: &[Segment],
    ) -> Vec<Vec<BatchPlan>> {
        (0..world_size)
            .map(|rank| {
                let s = Sampling {
                    rank,
                    world_size,
                    remainder: Remainder::Drop,
                    ..Sampling::single(bs, false, true, 5)
                };
                plan_rest(a, 4, &s, epoch, done).unwrap()
            })
            .collect()
    }

    #[test]
    fn rest_without_segments_is_the_plan() {
        let a = assignment();
        for world_size in [1, 3] {
            for rank in 0..world_size {
                let s = sharded(world_size, rank, Remainder::Pad, false);
                assert_eq!(
                    plan_rest(&a, 4, &s, 2, &[]).unwrap(),
                    plan_epoch(&a, 4, &s, 2)
                );
            }
        }
    }

    #[test]
    fn elastic_rest_consumes_every_remaining_sample_once() {
        // 48 samples in buckets of 24 and 24; (world_size, batch_size) before and after: 4 -> 2
        // ranks, 4 -> 3, batch 2 -> 3 on 4 ranks, 2 x 3 -> 4 x 1.
        let a: Vec<usize> = (0..48).map(|i| i % 2).collect();
        for (before, after) in [
            ((4, 2), (2, 2)),
            ((4, 2), (3, 2)),
            ((4, 2), (4, 3)),
            ((2, 3), (4, 1)),
        ] {
            let old = ranks(&a, before.0, before.1, 1, &[]);
            for k in 0..=old[0].len() {
                let seg = Segment {
                    batch_size: before.1,
                    world_size: before.0,
                    batches: k,
                };
                let rest = ranks(&a, after.0, after.1, 1, &[seg]);
                let n = rest[0].len();
                assert!(rest.iter().all(|p| p.len() == n));
                let consumed = taken(&old, k);
                let mut left = taken(&rest, n);
                let total = left.len();
                left.dedup();
                // drop leaves out each bucket's last n % world_size samples; nothing repeats.
                assert_eq!(total, left.len(), "{before:?} -> {after:?} after {k}");
                let mut all: Vec<usize> = consumed.iter().chain(&left).copied().collect();
                all.sort();
                let lost = 48 - all.len();
                all.dedup();
                assert_eq!(all.len(), 48 - lost, "a sample came twice");
                let g = after.0 * after.1;
                let remaining = |b: usize| 24 - consumed.iter().filter(|&&i| a[i] == b).count();
                let dropped: usize = (0..2).map(|b| remaining(b) % g % after.0).sum();
                assert_eq!(lost, dropped, "{before:?} -> {after:?} after {k}");
            }
        }
    }

    #[test]
    fn elastic_segments_chain_and_reject_overruns() {
        let a = assignment();
        let s0 = Segment {
            batch_size: 4,
            world_size: 3,
            batches: 2,
        };
        let after0 = ranks(&a, 2, 3, 0, &[s0]);
        // A second stretch on 2 ranks, then the rest on one: nothing consumed twice, the
        // remainder policy (drop) only leaves out each bucket's odd last samples.
        let s1 = Segment {
            batch_size: 3,
            world_size: 2,
            batches: 3,
        };
        let after1 = ranks(&a, 1, 5, 0, &[s0, s1]);
        let mut all = taken(&ranks(&a, 3, 4, 0, &[]), 2);
        all.extend(taken(&after0, 3));
        all.extend(taken(&after1, after1[0].len()));
        let n = all.len();
        all.dedup();
        assert_eq!(all.len(), n, "a sample was consumed twice");
        // One rank without drop_last keeps every remaining sample: the whole epoch is covered.
        assert_eq!(n, a.len());
        let too_far = Segment {
            batch_size: 4,
            world_size: 3,
            batches: 7,
        };
        let s = Sampling::single(4, false, true, 5);
        let err = plan_rest(&a, 4, &s, 0, &[too_far]).unwrap_err();
        assert!(
            err.to_string().contains("consumed 7 global batches"),
            "{err}"
        );
        let zero = Segment {
            batch_size: 0,
            world_size: 3,
            batches: 0,
        };
        assert!(plan_rest(&a, 4, &s, 0, &[zero]).is_err());
    }
    #[test]
    fn trained_samples_is_the_union_of_the_ranks_plans() {
        // Buckets of 5, 2 and 7 samples.
        let a: Vec<usize> = [vec![0; 5], vec![1; 2], vec![2; 7]].concat();
        for (world_size, drop_last, remainder, want) in [
            // batch 2 x 1 rank: everything without drop_last; 4 + 2 + 6 with it.
            (1, false, Remainder::Pad, 14),
            (1, true, Remainder::Pad, 12),
            // 2 x 2 ranks: pad trains all (and repeats some); drop leaves out 1 + 0 + 1 of the
            // short global batches (1 -> 0, 2 -> 2, 3 -> 2); drop_last leaves out all three.
            (2, false, Remainder::Pad, 14),
            (2, false, Remainder::Drop, 12),
            (2, true, Remainder::Pad, 8),
        ] {
            for epoch in 0..3 {
                let mut union = vec![false; a.len()];
                for rank in 0..world_size {
                    let s = Sampling {
                        rank,
                        world_size,
                        remainder,
                        ..Sampling::single(2, drop_last, true, 9)
                    };
                    for b in plan_epoch(&a, 3, &s, epoch) {
                        for i in b.indices {
                            union[i] = true;
                        }
                    }
                }
                let s = Sampling {
                    world_size,
                    remainder,
                    ..Sampling::single(2, drop_last, true, 9)
                };
                let got = trained_samples(&a, 3, &s, epoch);
                assert_eq!(got, union, "{world_size} {drop_last} {remainder:?}");
                assert_eq!(got.iter().filter(|&&t| t).count(), want);
            }
        }
    }
}
