//! Shard-level rank assignment in the loader: whether several ranks split a dataset of tar shards
//! by whole shards (decided once, at construction), each rank's plan over its own shards' samples,
//! and the count of what the workers actually read from each shard.
//!
//! The plans themselves are [`sampler::plan_owned`]'s; this file only decides the mode and keeps
//! the ownership. It must not read shard bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::loader::Inner;
use super::options::{LoaderOptions, ShardSplit};
use crate::dataset::Subset;
use crate::error::{Error, Result};
use crate::sampler::{self, BatchPlan, Segment};
use crate::scan::ImageEntry;

/// Shard-level mode of a loader: who owns what, fixed for the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Ownership {
    /// The rank owning each sample's shard.
    pub(super) owner_of_sample: Vec<usize>,
    /// This rank's shards, sorted by path.
    pub(super) own_shards: Vec<PathBuf>,
}

/// Decide the mode: `Some` (shard-level) when `opts.world_size > 1`, [`ShardSplit::Auto`], every
/// subset is tar shards, none of them was listed without a current index (`unindexed`) and at
/// least `world_size` shards hold a sample; ownership is then [`sampler::assign_shards`] over the
/// shards holding samples, sorted by path, weighed by their sample counts (repeats counted). When
/// the dataset has shards but one of the other conditions fails, a warning saying why is pushed.
pub(super) fn decide(
    opts: &LoaderOptions,
    subsets: &[Subset],
    unindexed: &[PathBuf],
    images: &[ImageEntry],
    sample_image: &[usize],
    warnings: &mut Vec<String>,
) -> Option<Ownership> {
    let any_shards = subsets.iter().any(|s| !s.shards.is_empty());
    if opts.world_size < 2 || opts.shard_split == ShardSplit::Sample || !any_shards {
        return None;
    }
    let fallback = "every rank reads every shard and takes its slice of every global batch \
                    (sample-level split)";
    if subsets.iter().any(|s| s.shards.is_empty()) {
        warnings.push(format!(
            "shard_split=\"auto\": a subset is a folder, not tar shards: {fallback}"
        ));
        return None;
    }
    if let Some(first) = unindexed.first() {
        warnings.push(format!(
            "shard_split=\"auto\": {} shards have no current index (first: {}): {fallback}; \
             `fastdiff index SHARDS` writes the indexes that let each rank open only its own shards",
            unindexed.len(),
            first.display()
        ));
        return None;
    }
    let mut per_shard: BTreeMap<&Path, usize> = BTreeMap::new();
    for &image in sample_image {
        if let Some(m) = &images[image].member {
            *per_shard.entry(&m.shard).or_insert(0) += 1;
        }
    }
    if per_shard.len() < opts.world_size {
        warnings.push(format!(
            "shard_split=\"auto\": {} shards hold images for {} ranks (at least one shard per rank \
             is needed): {fallback}",
            per_shard.len(),
            opts.world_size
        ));
        return None;
    }
    let counts: Vec<usize> = per_shard.values().copied().collect();
    let owner = sampler::assign_shards(&counts, opts.world_size);
    let owner_by_shard: BTreeMap<&Path, usize> = per_shard.keys().copied().zip(owner).collect();
    let owner_of_sample = (sample_image.iter())
        .map(|&image| {
            let shard = images[image].member.as_ref().map(|m| &*m.shard);
            shard.map_or(0, |s| owner_by_shard[s])
        })
        .collect();
    let own_shards = (owner_by_shard.iter())
        .filter(|(_, &r)| r == opts.rank)
        .map(|(s, _)| s.to_path_buf())
        .collect();
    Some(Ownership {
        owner_of_sample,
        own_shards,
    })
}

/// What the workers read from one tar shard, as [`super::Report::io`] gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardIo {
    /// The shard file, as given.
    pub shard: PathBuf,
    /// Times it was opened to read a member (one open and one positioned read per member read).
    pub opens: u64,
    /// Bytes read from it: the sum of the member byte ranges read.
    pub bytes: u64,
}

/// Per-shard opens and bytes read by this loader (every epoch, the cache's hashing included).
#[derive(Debug, Default)]
pub(super) struct IoCounts(Mutex<BTreeMap<PathBuf, (u64, u64)>>);

impl IoCounts {
    /// Count one read of `entry` that returned `bytes` bytes (nothing for a folder's file).
    pub(super) fn count(&self, entry: &ImageEntry, bytes: usize) {
        if let Some(m) = &entry.member {
            let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let c = map.entry(m.shard.to_path_buf()).or_insert((0, 0));
            c.0 += 1;
            c.1 += bytes as u64;
        }
    }

    /// The counts so far, by shard path.
    pub(super) fn snapshot(&self) -> Vec<ShardIo> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        (map.iter())
            .map(|(shard, &(opens, bytes))| ShardIo {
                shard: shard.clone(),
                opens,
                bytes,
            })
            .collect()
    }
}

impl Inner {
    /// This rank's plan of what remains of epoch `epoch` after the stretches `done`:
    /// [`sampler::plan_owned`] in shard-level mode, else [`sampler::plan_rest`].
    ///
    /// Errors: as [`sampler::plan_rest`]; in shard-level mode [`Error::InvalidArgument`] for any
    /// `done` (a resume with another `batch_size` or `world_size`).
    pub(super) fn plan(&self, epoch: u64, done: &[Segment]) -> Result<Vec<BatchPlan>> {
        let s = self.opts.sampling();
        let nb = self.buckets.len();
        match &self.ownership {
            None => sampler::plan_rest(&self.sample_bucket, nb, &s, epoch, done),
            Some(_) if !done.is_empty() => Err(Error::InvalidArgument(
                "resuming with another batch_size or world_size is not supported with shard-level \
                 rank assignment (each rank's plan covers its own shards); resume with the saved \
                 geometry, or build both runs' loaders with shard_split=\"sample\""
                    .into(),
            )),
            Some(o) => Ok(sampler::plan_owned(
                &self.sample_bucket,
                nb,
                &s,
                epoch,
                &o.owner_of_sample,
            )),
        }
    }

    /// Whether this rank may load `sample` (its own shard's in shard-level mode; any otherwise).
    pub(super) fn owns(&self, sample: usize) -> bool {
        (self.ownership.as_ref()).is_none_or(|o| o.owner_of_sample[sample] == self.opts.rank)
    }

    /// Which samples epoch `epoch` trains on some rank ([`sampler::trained_samples`] or
    /// [`sampler::trained_samples_owned`]).
    pub(super) fn trained(&self, epoch: u64) -> Vec<bool> {
        let s = self.opts.sampling();
        let nb = self.buckets.len();
        match &self.ownership {
            None => sampler::trained_samples(&self.sample_bucket, nb, &s, epoch),
            Some(o) => sampler::trained_samples_owned(
                &self.sample_bucket,
                nb,
                &s,
                epoch,
                &o.owner_of_sample,
            ),
        }
    }
}
