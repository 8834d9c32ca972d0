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
//! Shard-level rank assignment ([`plan_owned`]) instead gives each rank whole shards
//! ([`assign_shards`]) and plans each rank over its own samples, equalising the step counts.
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

/// Shard-level rank assignment: the rank that owns each shard, for the whole run (not per epoch,
/// so a machine reads and caches only its own shards).
///
/// `samples_per_shard[k]` is shard `k`'s sample count, shards in the order that breaks ties (the
/// loader passes them sorted by path). Greedy balance (the LPT rule of multiprocessor scheduling):
/// shards by sample count, largest first (ties by lower `k`), each to the rank with the fewest
/// samples so far (ties by lower rank). A pure function of its arguments, so every rank computes
/// the same ownership without communicating.
///
/// Panics if `world_size` is 0.
pub fn assign_shards(samples_per_shard: &[usize], world_size: usize) -> Vec<usize> {
    assert!(world_size > 0, "world_size must be at least 1");
    let mut order: Vec<usize> = (0..samples_per_shard.len()).collect();
    order.sort_by_key(|&k| (std::cmp::Reverse(samples_per_shard[k]), k));
    let mut load = vec![0usize; world_size];
    let mut owner = vec![0usize; samples_per_shard.len()];
    for k in order {
        let rank = (0..world_size).min_by_key(|&r| (load[r], r)).unwrap_or(0);
        owner[k] = rank;
        load[rank] += samples_per_shard[k];
    }
    owner
}

/// The plan of rank `rank` over its own samples only (those with `owner_of[i] == rank`): steps
/// 1–4 of [`plan_epoch`] with one rank (so the same within-bucket and batch-order shuffles, keyed
/// the same way, as a single-process plan over that pool), before equalising.
fn owned_plan(
    bucket_of: &[usize],
    num_buckets: usize,
    s: &Sampling,
    epoch: u64,
    owner_of: &[usize],
    rank: usize,
) -> Vec<BatchPlan> {
    let single = Sampling {
        rank: 0,
        world_size: 1,
        ..*s
    };
    let mine: Vec<usize> = (0..bucket_of.len())
        .map(|i| {
            if owner_of[i] == rank {
                bucket_of[i]
            } else {
                num_buckets
            }
        })
        .collect();
    // Samples of other ranks go to an extra bucket `num_buckets`, never planned.
    let mut members = shuffled_members(&mine, num_buckets + 1, &single, epoch);
    members.truncate(num_buckets);
    rank_slices(&members, &single, epoch, 0)
}

/// Batches rank `rank`'s own plan holds before equalising (indices only, no shuffle needed).
fn owned_len(
    bucket_of: &[usize],
    num_buckets: usize,
    s: &Sampling,
    owner_of: &[usize],
    rank: usize,
) -> usize {
    let single = Sampling {
        rank: 0,
        world_size: 1,
        ..*s
    };
    let mut counts = vec![0usize; num_buckets];
    for (&b, &o) in bucket_of.iter().zip(owner_of) {
        counts[b] += usize::from(o == rank);
    }
    counts.iter().map(|&n| batches_of_bucket(n, &single)).sum()
}

/// The step count every rank runs in shard-level mode: the longest own plan with
/// [`Remainder::Pad`], the shortest with [`Remainder::Drop`] (see [`plan_owned`]).
///
/// Panics as [`plan_owned`].
pub fn num_batches_owned(
    bucket_of: &[usize],
    num_buckets: usize,
    s: &Sampling,
    owner_of: &[usize],
) -> usize {
    let lens = (0..s.world_size).map(|r| owned_len(bucket_of, num_buckets, s, owner_of, r));
    match s.remainder {
        Remainder::Pad => lens.max().unwrap_or(0),
        Remainder::Drop => lens.min().unwrap_or(0),
    }
}

/// This rank's batches of epoch `epoch` in shard-level mode: `owner_of[i]` is the rank that owns
/// sample `i`'s shard ([`assign_shards`]), and rank `s.rank` draws its batches only from the
/// samples it owns.
///
/// Its own plan is [`plan_epoch`] with one rank over its samples (steps 1–4; `batch_size` per
/// batch, `drop_last` as there). Data-parallel training needs the same step count on every rank,
/// so the plans are equalised to [`num_batches_owned`]: with [`Remainder::Pad`] a shorter plan is
/// followed by its own batches again from its start (those samples are seen twice that epoch);
/// with [`Remainder::Drop`] a longer plan loses its last batches. Every rank computes every rank's
/// length from the indices alone, so no communication is needed.
///
/// Panics if `batch_size` or `world_size` is 0, `rank >= world_size`, `owner_of` is not as long
/// as `bucket_of`, an owner is `>= world_size`, or a bucket index is `>= num_buckets`.
pub fn plan_owned(
    bucket_of: &[usize],
    num_buckets: usize,
    s: &Sampling,
    epoch: u64,
    owner_of: &[usize],
) -> Vec<BatchPlan> {
    assert_eq!(owner_of.len(), bucket_of.len(), "one owner per sample");
    assert!(
        owner_of.iter().all(|&o| o < s.world_size),
        "owners must be ranks"
    );
    let own = owned_plan(bucket_of, num_buckets, s, epoch, owner_of, s.rank);
    let steps = num_batches_owned(bucket_of, num_buckets, s, owner_of);
    if own.is_empty() {
        return Vec::new();
    }
    own.iter().cycle().take(steps).cloned().collect()
}

/// [`trained_samples`] in shard-level mode: whether sample `i` is in some batch of some rank's
/// [`plan_owned`].
///
/// Panics as [`plan_owned`] (but for `rank`, which it does not use).
pub fn trained_samples_owned(
    bucket_of: &[usize],
    num_buckets: usize,
    s: &Sampling,
    epoch: u64,
    owner_of: &[usize],
) -> Vec<bool> {
    let mut out = vec![false; bucket_of.len()];
    for rank in 0..s.world_size {
        let r = Sampling { rank, ..*s };
        for batch in plan_owned(bucket_of, num_buckets, &r, epoch, owner_of) {
            for i in batch.indices {
                out[i] = true;
            }
        }
    }
    out
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
#[path = "sampler_tests.rs"]
mod tests;
