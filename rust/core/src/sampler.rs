//! The batch plan of an epoch: which images form which batch, in which order.
//!
//! Every batch holds images of one bucket (so one tensor shape). The plan is a pure function of
//! (bucket assignment, batch size, flags, seed, epoch) — no state carries over between epochs — so an
//! epoch can be replayed or resumed mid-way exactly, and the thread count never changes it.

use crate::rng::{SplitMix64, Stream};

/// One batch of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPlan {
    /// Index of the bucket (into the loader's bucket list) all images of this batch belong to.
    pub bucket: usize,
    /// Image indices (into the scan's sorted image list), in sample order; 1..=batch_size entries.
    pub indices: Vec<usize>,
}

/// The batches of epoch `epoch`.
///
/// `bucket_of[i]` is the bucket of image `i` (each `< num_buckets`). Algorithm:
/// 1. group image indices by bucket, ascending within each bucket (= sorted path order);
/// 2. if `shuffle`, shuffle each bucket's images (Fisher–Yates, [`SplitMix64`] keyed
///    `(seed, epoch, ShuffleWithinBucket, bucket)`);
/// 3. cut each bucket into consecutive batches of `batch_size`; the last one may be short, and is
///    dropped when `drop_last`;
/// 4. if `shuffle`, shuffle the batch order (keyed `(seed, epoch, ShuffleBatches, 0)`); otherwise
///    batches stay grouped by bucket in bucket-list order.
///
/// Without `drop_last` every image appears exactly once. The length is [`num_batches`].
///
/// Panics if `batch_size` is 0 or a bucket index is `>= num_buckets` (the loader validates both).
pub fn plan_epoch(
    bucket_of: &[usize],
    num_buckets: usize,
    batch_size: usize,
    drop_last: bool,
    shuffle: bool,
    seed: u64,
    epoch: u64,
) -> Vec<BatchPlan> {
    assert!(batch_size > 0, "batch_size must be at least 1");
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); num_buckets];
    for (image, &bucket) in bucket_of.iter().enumerate() {
        members[bucket].push(image);
    }
    let mut plan = Vec::with_capacity(num_batches(bucket_of, num_buckets, batch_size, drop_last));
    for (bucket, mut images) in members.into_iter().enumerate() {
        if shuffle {
            SplitMix64::new(seed, epoch, Stream::ShuffleWithinBucket, bucket as u64)
                .shuffle(&mut images);
        }
        for chunk in images.chunks(batch_size) {
            if drop_last && chunk.len() < batch_size {
                continue;
            }
            plan.push(BatchPlan {
                bucket,
                indices: chunk.to_vec(),
            });
        }
    }
    if shuffle {
        SplitMix64::new(seed, epoch, Stream::ShuffleBatches, 0).shuffle(&mut plan);
    }
    plan
}

/// Number of batches [`plan_epoch`] returns for these inputs (the same for every seed and epoch):
/// the sum over buckets of `ceil(n / batch_size)`, or `floor(n / batch_size)` with `drop_last`,
/// where `n` is the bucket's image count.
///
/// Panics if `batch_size` is 0 or a bucket index is `>= num_buckets`.
pub fn num_batches(
    bucket_of: &[usize],
    num_buckets: usize,
    batch_size: usize,
    drop_last: bool,
) -> usize {
    assert!(batch_size > 0, "batch_size must be at least 1");
    let mut counts = vec![0usize; num_buckets];
    for &bucket in bucket_of {
        counts[bucket] += 1;
    }
    counts
        .iter()
        .map(|&n| {
            if drop_last {
                n / batch_size
            } else {
                n.div_ceil(batch_size)
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert_eq!(num_batches(&a, 4, bs, false), ceil);
            assert_eq!(num_batches(&a, 4, bs, true), floor);
            for shuffle in [false, true] {
                assert_eq!(plan_epoch(&a, 4, bs, false, shuffle, 3, 1).len(), ceil);
                assert_eq!(plan_epoch(&a, 4, bs, true, shuffle, 3, 1).len(), floor);
            }
        }
    }

    #[test]
    fn every_image_exactly_once_and_batches_are_single_bucket() {
        let a = assignment();
        for shuffle in [false, true] {
            for bs in [1, 4, 8, 64] {
                let plan = plan_epoch(&a, 4, bs, false, shuffle, 7, 2);
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
        let plan = plan_epoch(&a, 4, 8, true, true, 0, 0);
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
        let p = |seed, epoch| plan_epoch(&a, 4, 4, false, true, seed, epoch);
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
        let plan = plan_epoch(&a, 4, 4, false, false, 9, 9);
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
        assert_eq!(plan, plan_epoch(&a, 4, 4, false, false, 0, 0));
    }

    #[test]
    fn empty_input_gives_empty_plan() {
        assert!(plan_epoch(&[], 3, 2, false, true, 0, 0).is_empty());
        assert_eq!(num_batches(&[], 3, 2, false), 0);
    }
}
