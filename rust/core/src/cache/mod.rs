//! The latent and text-embedding cache: content-addressed entries in safetensors shards.
//!
//! A cache folder holds `fastdiff-cache.json` (the manifest, written by the Python builder), shard
//! files `latents-<16 hex>.safetensors` and `text-<16 hex>.safetensors` (the shard headers are the
//! index) and `.lock` (held by writers). Follow a cache entry through these files:
//!
//! 1. `key.rs`: the keys. [`content_hash`] of an image's bytes, then [`latent_key`] from it and the
//!    sample's placement, filter, background and the manifest's latent salt; [`text_key`] from the
//!    final caption and the text salt. 128-bit blake3, 32 hex in files and Python.
//! 2. `shard.rs`: the shard format and [`ShardWriter`], which writes one shard atomically
//!    (`.<name>.partial`, fsync, rename).
//! 3. `manifest.rs`: [`Manifest::read`], the salts, dtypes and tensor names of each half.
//! 4. `store.rs`: [`Store::open`] reads the manifest and every shard header and maps the shards;
//!    [`Store::read_entry`] copies an entry into the caller's buffers, verifying its checksum.
//!    Corrupt shards are reported, never served.
//! 5. `gc.rs`: [`gc`] deletes partials, corrupt shards and shards serving no live key.
//!
//! Nothing here decides which samples need which entries: that is the pipeline's.

mod gc;
mod key;
mod manifest;
mod shard;
mod store;

pub use gc::{gc, GcReport};
pub use key::{content_hash, key_hex, latent_key, parse_key, text_key, Key};
pub use manifest::{parse_dtype, LatentSpec, Manifest, TextSpec, FORMAT, MANIFEST_NAME};
pub use shard::{is_partial, shard_kind, Kind, ShardWriter, TensorArg};
pub use store::Store;
