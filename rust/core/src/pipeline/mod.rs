//! The loading pipeline: a scanned, bucketed dataset ([`Loader`]) and the worker threads that turn one
//! epoch's plan into ready batches ([`EpochIter`]).
//!
//! Data flow of an epoch: the consumer (the thread calling [`EpochIter::next`]) starts up to
//! `prefetch` batches: for each it allocates the batch's one pixel buffer `[B, 3, H, W]` and queues
//! one job per sample. Worker threads (each with its own [`Decoder`](crate::decode::Decoder) and
//! [`Transformer`](crate::transform::Transformer)) take jobs in order — read the file, check its
//! header against the scan, decode, transform — and write the sample straight into its slot of the
//! batch buffer. The worker that finishes a batch's last sample signals the consumer, which yields
//! batches strictly in plan order and then starts the next one, so at most `prefetch` batches are
//! in flight (back-pressure on memory). Every random choice is keyed by (seed, epoch, image index)
//! via [`crate::rng`], so the output does not depend on thread count, prefetch depth or scheduling.
//!
//! The stages of one sample (read, header check, decode, transform) are separate steps of one
//! private function, `worker::load_sample`, timed independently into the epoch's [`LoadStats`]
//! ([`EpochIter::stats`]), with the workers' idle time and the consumer's wait for batches.
//!
//! The files, in the order a batch passes through them: `options` (every knob, validated once),
//! `loader` (scan, bucket assignment and the sample index of a [`Loader`]), `report` (what the scan
//! found and what failed since), `epoch` (the consumer side: plan, prefetch, yield in order),
//! `batch` (one batch in flight: the slots workers write, the [`Batch`] yielded), `draws` (each
//! sample's seeded crop, flip and caption, with crop and caption variants), `worker` (one
//! thread's loop: load a sample, stand-ins for failures), `views` (masks and control images:
//! pairing, and their write at the target's placement), [`buffer`] (batch memory) and [`stats`]
//! (where the time went).
//!
//! This module decides nothing about pixels (that is [`crate::decode`] and [`crate::transform`]) and
//! nothing about randomness beyond keying it (that is [`crate::sampler`] and [`crate::rng`]).

mod batch;
pub mod buffer;
mod cached;
mod draws;
mod epoch;
mod loader;
mod options;
mod plan;
mod report;
mod serve;
mod shards;
pub mod stats;
#[cfg(test)]
mod testkit;
mod views;
mod worker;

pub use batch::{Batch, SampleMeta};
pub use buffer::{BufferSource, PixelBuffer};
pub use epoch::EpochIter;
pub use loader::Loader;
pub use options::{held_out, LoaderOptions, OnError, ShardSplit};
pub use report::{BucketMerges, Report, SubsetReport};
pub use shards::ShardIo;
pub use stats::{LoadStats, StatsHandle};
pub use views::{ViewOptions, ViewTensor};
