//! One batch: what an epoch yields ([`Batch`], [`SampleMeta`]) and the shared state of a batch
//! being loaded (`BatchState`), whose slots worker threads write in place.
//!
//! The only place a batch's memory is split into per-sample slots; the `unsafe` here is sound only
//! under `BatchState::slot_mut`'s contract, which the epoch and the workers keep (one job per slot,
//! the buffer taken only after every slot has finished).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::buffer::{BufferPool, PixelBuffer};
use super::views::ViewSlots;
use crate::bucket::Bucket;
use crate::cache::Key;
use crate::error::Result;
use crate::transform::{OutSlot, OutputDtype, Placement};

/// Everything about one sample of a batch except its pixels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleMeta {
    /// Index into the loader's image list (subsets in order, each sorted by path).
    pub index: usize,
    /// Index of the image's subset.
    pub subset: usize,
    /// Whether the subset holds regularisation (class) images.
    pub is_reg: bool,
    /// The image file.
    pub path: PathBuf,
    /// Caption text after the subset's caption operations (variant choice, dropout, tag shuffle and
    /// dropout); "" if the image has no caption.
    pub caption: String,
    /// Upright image size as (height, width) in pixels (SDXL `original_size`).
    pub original_size: (u32, u32),
    /// Top-left corner of the crop in the resized image as (top, left) in pixels, flip-aware
    /// (SDXL `crop_top_left`, see [`Placement::crop_top_left`]).
    pub crop_top_left: (u32, u32),
    /// The bucket as (height, width) in pixels (SDXL `target_size`).
    pub target_size: (u32, u32),
    /// Where the crop lies in the resized image, with the flip (what `crop_top_left` and the
    /// latent key are computed from).
    pub placement: Placement,
    /// With a cache whose manifest has latents: the key of this sample's latent entry (image
    /// content, placement, filter, background, VAE salt; see [`crate::cache::latent_key`]).
    pub latent_key: Option<Key>,
    /// With a cache whose manifest has text: the key of this sample's caption entry.
    pub text_key: Option<Key>,
}

impl SampleMeta {
    /// The provenance of this sample's latent entry, as the cache builder stores it and miss
    /// messages read it: a JSON object `{"path", "bucket": [w, h], "crop": [left, top],
    /// "resized": [w, h], "flip"}` (crop un-flipped, in resized pixels).
    pub fn latent_provenance(&self) -> String {
        let p = &self.placement;
        serde_json::json!({
            "path": self.path.to_string_lossy(),
            "bucket": [p.bucket.0, p.bucket.1],
            "crop": [p.crop_left, p.crop_top],
            "resized": [p.resized.0, p.resized.1],
            "flip": p.flip,
        })
        .to_string()
    }
}

/// One batch of samples of one bucket.
#[derive(Debug, PartialEq)]
pub struct Batch {
    /// The bucket all samples were resized and cropped to.
    pub bucket: Bucket,
    /// Pixels `[samples.len(), 3, bucket.height, bucket.width]`, in recycled pool memory or in
    /// memory from the epoch's [`BufferSource`].
    pub pixels: PixelBuffer,
    /// Per-sample metadata, in the order of the samples in `pixels`.
    pub samples: Vec<SampleMeta>,
    /// With a cache (and not for [`Loader::iter_build`](super::Loader::iter_build)): each cached
    /// tensor of the batch as (name, values, full shape `[samples.len(), ...]`) in the manifest's
    /// dtype, latents' tensors first (`latents` `[B, C, H / 8, W / 8]`, ...), then text's
    /// (`pooled_prompt_embeds` `[B, D]`, `prompt_embeds` `[B, L, D]`, in name order). Empty
    /// without a cache. With `pixels = false`, `pixels` is empty.
    pub tensors: Vec<(String, PixelBuffer, Vec<usize>)>,
}

/// One cached tensor of a batch being loaded: `[B, ...shape]` values, one slot per sample.
pub(super) struct TensorState {
    pub(super) name: String,
    /// Shape of one sample's tensor.
    pub(super) shape: Vec<usize>,
    /// Whether it comes from a latent entry (else a text entry).
    pub(super) latent: bool,
    /// Bytes of one sample's tensor.
    pub(super) per_sample_bytes: usize,
    /// Start of `buffer`'s memory; workers write their slots through it.
    pub(super) base: *mut u8,
    /// Owner of the buffer; taken by the consumer once the batch is complete.
    pub(super) buffer: Mutex<Option<PixelBuffer>>,
}

impl TensorState {
    /// A tensor of `n` samples of `shape` in `dtype`, its buffer from `pool`.
    /// Errors: as [`PixelBuffer::from_pool`].
    pub(super) fn from_pool(
        pool: &Arc<BufferPool>,
        name: String,
        latent: bool,
        dtype: OutputDtype,
        shape: Vec<usize>,
        n: usize,
    ) -> Result<TensorState> {
        let values = shape.iter().product::<usize>();
        let buffer = PixelBuffer::from_pool(pool, dtype, n * values)?;
        Ok(TensorState {
            name,
            shape,
            latent,
            per_sample_bytes: values * dtype.bytes_per_value(),
            base: buffer.as_ptr().cast_mut(),
            buffer: Mutex::new(Some(buffer)),
        })
    }
}

/// Shared state of one batch being loaded.
pub(super) struct BatchState {
    pub(super) bucket: Bucket,
    /// Values per sample: `3 * height * width`.
    pub(super) per_sample: usize,
    pub(super) dtype: OutputDtype,
    /// Start of `pixels`' memory; workers write their slots through it.
    pub(super) base: *mut u8,
    /// Owner of the buffer; taken by the consumer once `pending` is 0.
    pub(super) pixels: Mutex<Option<PixelBuffer>>,
    /// Per slot: the sample's metadata, or its image index and error.
    pub(super) outcomes: Mutex<Vec<Option<SampleOutcome>>>,
    /// Slots not finished yet.
    pub(super) pending: AtomicUsize,
    /// The cached tensors served into this batch (empty without a cache, and for build batches).
    pub(super) tensors: Vec<TensorState>,
    /// Whether the samples' pixels are decoded (false: `pixels` is an empty buffer).
    pub(super) decode: bool,
    /// The conditioning view tensors, in [`ViewOptions::tensors`] order (empty without views).
    pub(super) views: Vec<TensorState>,
    /// Whether the views start with `masks` and `masks_latent`.
    pub(super) has_mask: bool,
    /// Control folders: the last view tensor holds this many control images per sample.
    pub(super) controls: usize,
}

/// The `n` values of `dtype` from value `start` of the buffer at `base`.
///
/// # Safety
/// The range must lie inside one live buffer that no other reference reaches while the slot
/// lives; `base` aligned for `dtype` (buffers are aligned to `buffer::ALIGN`).
unsafe fn out_slot<'a>(base: *mut u8, start: usize, n: usize, dtype: OutputDtype) -> OutSlot<'a> {
    // SAFETY: per this function's contract.
    unsafe {
        match dtype {
            OutputDtype::U8 => OutSlot::U8(std::slice::from_raw_parts_mut(base.add(start), n)),
            OutputDtype::F32 => OutSlot::F32(std::slice::from_raw_parts_mut(
                base.cast::<f32>().add(start),
                n,
            )),
            OutputDtype::F16 => OutSlot::F16(std::slice::from_raw_parts_mut(
                base.cast::<u16>().add(start),
                n,
            )),
            OutputDtype::BF16 => OutSlot::BF16(std::slice::from_raw_parts_mut(
                base.cast::<u16>().add(start),
                n,
            )),
        }
    }
}

/// What became of one slot: the sample loaded into it (possibly a stand-in), or the error of the
/// last failed attempt.
pub(super) type SampleOutcome = Result<SampleMeta>;

// SAFETY: `base` points into the memory owned or borrowed by `pixels`, which lives as long as the
// `BatchState` (moving the buffer into the Mutex does not move that memory). It is only used through
// `slot_mut`, whose contract gives each slot to one thread at a time and keeps the buffer otherwise
// untouched until `pending` reaches 0; every other field is Sync on its own.
unsafe impl Send for BatchState {}

// SAFETY: as for Send.
unsafe impl Sync for BatchState {}

impl BatchState {
    /// The output slot of sample `slot`: values `[slot * per_sample, (slot + 1) * per_sample)`.
    ///
    /// # Safety
    /// `slot` must be < the batch's sample count; at most one `OutSlot` per slot may exist at a time;
    /// and the buffer must not be taken from `pixels` while it exists. The pipeline guarantees this by
    /// sending one job per slot and taking the buffer only after every job has called `finish`.
    pub(super) unsafe fn slot_mut(&self, slot: usize) -> OutSlot<'_> {
        // SAFETY: the range lies inside the buffer (slot < sample count) and is disjoint from every
        // other slot's, per this function's contract.
        unsafe {
            out_slot(
                self.base,
                slot * self.per_sample,
                self.per_sample,
                self.dtype,
            )
        }
    }

    /// Sample `slot`'s places in the view tensors.
    ///
    /// # Safety
    /// As for [`BatchState::slot_mut`].
    pub(super) unsafe fn view_slots(&self, slot: usize) -> ViewSlots<'_> {
        let bytes = |t: &TensorState| {
            // SAFETY: per this function's contract the range lies inside the buffer (which holds
            // `per_sample_bytes` per sample) and no other reference to it exists.
            unsafe {
                std::slice::from_raw_parts_mut(
                    t.base.add(slot * t.per_sample_bytes),
                    t.per_sample_bytes,
                )
            }
        };
        let mask = self
            .has_mask
            .then(|| (bytes(&self.views[0]), bytes(&self.views[1])));
        let mut controls = Vec::with_capacity(self.controls);
        if let Some(t) = self.views.last().filter(|_| self.controls > 0) {
            let values = t.shape.iter().product::<usize>();
            let each = values / self.controls;
            for k in 0..self.controls {
                // SAFETY: as above; the K control images of a sample are disjoint thirds of its
                // slot, each aligned like the slot (`each` values of the dtype).
                controls
                    .push(unsafe { out_slot(t.base, slot * values + k * each, each, self.dtype) });
            }
        }
        ViewSlots { mask, controls }
    }

    /// The bytes of sample `slot` in cached tensor `t`.
    ///
    /// # Safety
    /// As for [`BatchState::slot_mut`]: `slot` < the batch's sample count, one job per slot, the
    /// buffer not taken while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn tensor_slot_mut(&self, t: usize, slot: usize) -> &mut [u8] {
        let t = &self.tensors[t];
        // SAFETY: per this function's contract the range lies inside the buffer (which holds
        // `per_sample_bytes` per sample) and no other reference to it exists.
        unsafe {
            std::slice::from_raw_parts_mut(
                t.base.add(slot * t.per_sample_bytes),
                t.per_sample_bytes,
            )
        }
    }

    /// Record the outcome of `slot`; returns true for the batch's last slot.
    pub(super) fn finish(&self, slot: usize, outcome: SampleOutcome) -> bool {
        self.outcomes.lock().unwrap_or_else(|p| p.into_inner())[slot] = Some(outcome);
        // AcqRel: the consumer's Acquire load of 0 then sees every slot's pixels and outcome.
        self.pending.fetch_sub(1, Ordering::AcqRel) == 1
    }
}
