//! Tests of `sampler.rs` (kept apart to keep that file short).

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

#[test]
fn shards_go_largest_first_to_the_least_loaded_rank() {
    // Counts 5, 9, 9, 2, 4, 1 over 2 ranks: 9(k1)->0, 9(k2)->1, 5(k0)->0, 4(k4)->1, 2(k3)->1, 1(k5)->0.
    assert_eq!(
        assign_shards(&[5, 9, 9, 2, 4, 1], 2),
        vec![0, 0, 1, 1, 1, 0]
    );
    // Loads 15 and 15; one rank owns everything; more ranks than shards leave ranks empty.
    assert_eq!(assign_shards(&[5, 9, 9], 1), vec![0, 0, 0]);
    assert_eq!(assign_shards(&[3, 3], 3), vec![0, 1]);
}

/// 8 shards of uneven sizes over `bucket_of`'s samples (sample `i` in shard `i % 8`, but shard 7
/// holds every tenth sample too).
fn shard_owners(bucket_of: &[usize], world_size: usize) -> Vec<usize> {
    let shard_of: Vec<usize> = (0..bucket_of.len())
        .map(|i| if i % 10 == 0 { 7 } else { i % 8 })
        .collect();
    let mut per_shard = vec![0; 8];
    for &k in &shard_of {
        per_shard[k] += 1;
    }
    let owner = assign_shards(&per_shard, world_size);
    shard_of.iter().map(|&k| owner[k]).collect()
}

#[test]
fn owned_plans_stay_on_own_shards_step_together_and_cover_the_epoch() {
    let a = assignment();
    for remainder in [Remainder::Pad, Remainder::Drop] {
        for drop_last in [false, true] {
            let owner = shard_owners(&a, 3);
            let plans: Vec<Vec<BatchPlan>> = (0..3)
                .map(|r| plan_owned(&a, 4, &sharded(3, r, remainder, drop_last), 5, &owner))
                .collect();
            let steps = num_batches_owned(&a, 4, &sharded(3, 0, remainder, drop_last), &owner);
            assert!(
                plans.iter().all(|p| p.len() == steps),
                "{remainder:?} {drop_last}"
            );
            let mut seen = vec![0usize; a.len()];
            for (r, p) in plans.iter().enumerate() {
                for b in p {
                    assert!(b.indices.len() <= 4 && !b.indices.is_empty());
                    for &i in &b.indices {
                        assert_eq!(
                            owner[i], r,
                            "a rank's batch holds a sample of another rank's shard"
                        );
                        assert_eq!(a[i], b.bucket);
                        seen[i] += 1;
                    }
                }
            }
            // Each rank's first own-plan pass holds each of its samples once (or drops some).
            let trained =
                trained_samples_owned(&a, 4, &sharded(3, 0, remainder, drop_last), 5, &owner);
            for i in 0..a.len() {
                assert_eq!(trained[i], seen[i] > 0);
                if remainder == Remainder::Pad && !drop_last {
                    assert!(seen[i] >= 1, "pad trains every sample");
                }
            }
        }
    }
}

#[test]
fn one_owner_is_the_single_process_plan_and_pad_repeats_from_the_start() {
    let a = assignment();
    let single = Sampling::single(4, false, true, 11);
    assert_eq!(
        plan_owned(&a, 4, &single, 2, &vec![0; a.len()]),
        plan_epoch(&a, 4, &single, 2)
    );
    // Rank 1 owns only samples 0..10: its own plan is repeated from its start up to rank 0's length.
    let owner: Vec<usize> = (0..a.len()).map(|i| usize::from(i < 10)).collect();
    let s = |rank| Sampling {
        rank,
        world_size: 2,
        ..single
    };
    let short = plan_owned(&a, 4, &s(1), 2, &owner);
    let long = plan_owned(&a, 4, &s(0), 2, &owner);
    assert_eq!(short.len(), long.len());
    let own_len = count(&[0, 0, 0, 0, 0, 0, 1, 2, 2, 2], 4, 4, false);
    assert_eq!(own_len, 4);
    assert_eq!(short[own_len..2 * own_len], short[..own_len]);
    let drop = |rank| Sampling {
        remainder: Remainder::Drop,
        ..s(rank)
    };
    assert_eq!(plan_owned(&a, 4, &drop(0), 2, &owner), long[..own_len]);
    assert_eq!(num_batches_owned(&a, 4, &drop(1), &owner), own_len);
}
