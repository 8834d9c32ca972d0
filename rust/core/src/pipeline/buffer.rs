//! Memory for batch pixels: recycled allocations, or memory the caller provides (pinned host memory).
//!
//! Every batch's pixels live in one [`PixelBuffer`]. By default the memory comes from the loader's
//! [`BufferPool`]: when the consumer drops a batch (in Python: when the last tensor or array viewing
//! it is garbage), its allocation goes back to the pool and the next batch reuses it. This avoids a
//! fresh allocation per batch, which costs a zero-fill or page faults on every page (measured at up to
//! 9 % of the CPU time, benches/RESULTS.md). Recycled memory is not cleared: every value a batch
//! exposes has been written by the transform.
//!
//! A [`BufferSource`] instead supplies caller-owned memory per batch: the Python bindings use it to
//! have batches written straight into page-locked (pinned) torch tensors, so the host-to-device copy
//! can be asynchronous without an extra copy into pinned memory.
//!
//! It hands out memory and takes it back; it must not read or write pixel values itself.

use std::any::Any;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::transform::OutputDtype;

/// Alignment of pool allocations and the least alignment accepted from a [`BufferSource`], in bytes
/// (a cache line; enough for every output dtype and for SIMD stores).
pub const ALIGN: usize = 64;

/// Supplies the memory for batches, one call per batch, in plan order.
///
/// # Safety
///
/// The pipeline writes through the returned pointer from worker threads and later reads it, trusting
/// it without any check but its alignment. An implementation must return, for each call, a pointer
/// to at least `bytes` writable bytes that stay valid while the returned owner lives and that
/// nothing else reads or writes until the owner is handed back with the batch
/// ([`PixelBuffer::into_owner`]) — in particular, not memory already given out for another batch.
pub unsafe trait BufferSource: Send {
    /// Writable memory of at least `bytes` bytes, aligned to [`ALIGN`] bytes (checked), and its
    /// owner; see the trait's safety contract.
    fn buffer(&mut self, bytes: usize) -> Result<(NonNull<u8>, Box<dyn Any + Send>)>;
}

/// One aligned block; allocations are `Vec`s of these, so they are [`ALIGN`]-aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block([u8; ALIGN]);

/// Recycled batch allocations of one size (the largest batch a loader can make, so any batch fits).
#[derive(Debug)]
pub struct BufferPool {
    bytes: usize,
    /// Most allocations kept for reuse; more are freed when returned.
    keep: usize,
    free: Mutex<Vec<Vec<Block>>>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Block")
    }
}

impl BufferPool {
    /// A pool of `bytes`-byte allocations that keeps at most `keep` free ones.
    pub fn new(bytes: usize, keep: usize) -> Arc<BufferPool> {
        Arc::new(BufferPool {
            bytes,
            keep,
            free: Mutex::new(Vec::new()),
        })
    }

    /// Size of each allocation in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Allocations waiting for reuse.
    pub fn free_count(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// A recycled allocation, or a new uninitialised one; of at least `bytes` bytes (a batch larger
    /// than the pool's size gets its own allocation, which is recycled like the others). Errors
    /// ([`Error::Resource`]) when the allocator refuses the memory, instead of aborting.
    fn take(&self, bytes: usize) -> Result<Vec<Block>> {
        if bytes <= self.bytes {
            if let Some(block) = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop() {
                return Ok(block);
            }
        }
        let want = bytes.max(self.bytes);
        // Capacity only: the memory stays uninitialised until the transform writes it (no zero-fill).
        let mut block = Vec::new();
        block.try_reserve_exact(want.div_ceil(ALIGN)).map_err(|e| {
            Error::Resource(format!(
                "cannot allocate {want} bytes for a batch ({e}): lower batch_size or resolution"
            ))
        })?;
        Ok(block)
    }

    fn give_back(&self, block: Vec<Block>) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.keep {
            free.push(block);
        }
    }
}

enum Owner {
    Pool {
        pool: Arc<BufferPool>,
        /// Empty length, full capacity: the bytes are reached through `ptr` only.
        block: Vec<Block>,
    },
    External(Box<dyn Any + Send>),
}

/// The pixels of a batch: `len` values of `dtype`, laid out `[B, 3, H, W]` row-major (samples
/// contiguous, each planar RGB). Values: `U8` raw 0..=255; `F32`, `F16`, `BF16` are
/// `v / 127.5 - 1` in `[-1, 1]`, the half types as IEEE binary16 / bfloat16 bit patterns.
///
/// The memory is recycled through the loader's pool when the buffer is dropped, or belongs to the
/// owner a [`BufferSource`] returned.
pub struct PixelBuffer {
    ptr: NonNull<u8>,
    /// Bytes that may be written (at least `len * dtype.bytes_per_value()`).
    capacity: usize,
    dtype: OutputDtype,
    len: usize,
    owner: Option<Owner>,
}

// SAFETY: the buffer exclusively owns (pool) or is exclusively lent (source contract) the memory
// behind `ptr`; the owner is Send. Shared access only reads.
unsafe impl Send for PixelBuffer {}
// SAFETY: `&PixelBuffer` only allows reads.
unsafe impl Sync for PixelBuffer {}

impl std::fmt::Debug for PixelBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PixelBuffer")
            .field("dtype", &self.dtype)
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .field("pooled", &matches!(self.owner, Some(Owner::Pool { .. })))
            .finish()
    }
}

impl PixelBuffer {
    /// A buffer for `len` values of `dtype` from `pool`; errors if the memory cannot be allocated.
    pub(crate) fn from_pool(
        pool: &Arc<BufferPool>,
        dtype: OutputDtype,
        len: usize,
    ) -> Result<Self> {
        let mut block = pool.take(len * dtype.bytes_per_value())?;
        let capacity = block.capacity() * ALIGN;
        let ptr = NonNull::new(block.as_mut_ptr().cast::<u8>()).expect("Vec pointers are non-null");
        Ok(PixelBuffer {
            ptr,
            capacity,
            dtype,
            len,
            owner: Some(Owner::Pool {
                pool: Arc::clone(pool),
                block,
            }),
        })
    }

    /// A buffer for `len` values of `dtype` in memory from `source`; errors if the source fails or
    /// returns memory aligned to less than [`ALIGN`] bytes.
    pub(crate) fn from_source(
        source: &mut dyn BufferSource,
        dtype: OutputDtype,
        len: usize,
    ) -> Result<Self> {
        let capacity = len * dtype.bytes_per_value();
        let (ptr, owner) = source.buffer(capacity)?;
        if !(ptr.as_ptr() as usize).is_multiple_of(ALIGN) {
            return Err(Error::InvalidArgument(format!(
                "batch buffers must be aligned to {ALIGN} bytes, got address {:p}",
                ptr.as_ptr()
            )));
        }
        Ok(PixelBuffer {
            ptr,
            capacity,
            dtype,
            len,
            owner: Some(Owner::External(owner)),
        })
    }

    /// Element type of the values.
    pub fn dtype(&self) -> OutputDtype {
        self.dtype
    }

    /// Number of values (not bytes).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Address of the first value (aligned to [`ALIGN`]); `len() * dtype().bytes_per_value()` bytes
    /// are initialised.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// The values as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: the first `len * bytes_per_value` bytes were written by the pipeline before the
        // buffer was handed out, and lie inside the allocation (`capacity`).
        unsafe {
            std::slice::from_raw_parts(self.ptr.as_ptr(), self.len * self.dtype.bytes_per_value())
        }
    }

    /// The values if the dtype is `U8`.
    pub fn as_u8(&self) -> Option<&[u8]> {
        (self.dtype == OutputDtype::U8).then(|| self.as_bytes())
    }

    /// The values if the dtype is `F32`.
    pub fn as_f32(&self) -> Option<&[f32]> {
        // SAFETY: aligned to ALIGN (>= 4), `len` initialised f32 values.
        (self.dtype == OutputDtype::F32)
            .then(|| unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast(), self.len) })
    }

    /// The bit patterns if the dtype is `F16` or `BF16`.
    pub fn as_u16(&self) -> Option<&[u16]> {
        // SAFETY: aligned to ALIGN (>= 2), `len` initialised u16 values.
        matches!(self.dtype, OutputDtype::F16 | OutputDtype::BF16)
            .then(|| unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast(), self.len) })
    }

    /// Value `i` as f32 in its stored scale (0..=255 for `U8`, [-1, 1] otherwise); panics if out of
    /// range.
    pub fn get_f32(&self, i: usize) -> f32 {
        match self.dtype {
            OutputDtype::U8 => f32::from(self.as_bytes()[i]),
            OutputDtype::F32 => self.as_f32().expect("dtype checked")[i],
            OutputDtype::F16 => {
                half::f16::from_bits(self.as_u16().expect("dtype checked")[i]).to_f32()
            }
            OutputDtype::BF16 => {
                half::bf16::from_bits(self.as_u16().expect("dtype checked")[i]).to_f32()
            }
        }
    }

    /// The [`BufferSource`] owner of source-provided memory (whoever holds it must keep it alive
    /// for as long as the pixels are used), or `Err(self)` unchanged for pool memory.
    pub fn into_owner(mut self) -> std::result::Result<Box<dyn Any + Send>, PixelBuffer> {
        match self.owner.take() {
            Some(Owner::External(owner)) => Ok(owner),
            other => {
                self.owner = other;
                Err(self)
            }
        }
    }

    /// Writable bytes `[start, start + len)` (tests fill buffers with it; the pipeline writes
    /// through typed slot slices).
    ///
    /// # Safety
    /// The range must lie within the capacity and no other reference to it may exist while the
    /// returned slice lives.
    #[cfg(test)]
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn bytes_mut(&self, start: usize, len: usize) -> &mut [u8] {
        debug_assert!(start + len <= self.capacity);
        // SAFETY: per this function's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(start), len) }
    }

    /// Keep the samples (of `per_sample` values each) whose `keep` flag is set, moved down in order,
    /// and shorten `len` to them (no reallocation).
    pub(crate) fn retain_samples(&mut self, keep: &[bool], per_sample: usize) {
        let per = per_sample * self.dtype.bytes_per_value();
        let mut kept = 0;
        for (slot, _) in keep.iter().enumerate().filter(|(_, &k)| k) {
            if slot != kept {
                // SAFETY: both ranges lie within the first `keep.len() * per` bytes, which are inside
                // the capacity; `copy` allows overlap.
                unsafe {
                    std::ptr::copy(
                        self.ptr.as_ptr().add(slot * per),
                        self.ptr.as_ptr().add(kept * per),
                        per,
                    );
                }
            }
            kept += 1;
        }
        self.len = kept * per_sample;
    }
}

/// Equal when dtype and values are (bit patterns for the float types; where the memory lives does
/// not matter).
impl PartialEq for PixelBuffer {
    fn eq(&self, other: &Self) -> bool {
        self.dtype == other.dtype && self.as_bytes() == other.as_bytes()
    }
}

impl Drop for PixelBuffer {
    fn drop(&mut self) {
        if let Some(Owner::Pool { pool, block }) = self.owner.take() {
            pool.give_back(block);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(pool: &Arc<BufferPool>, values: &[u8]) -> PixelBuffer {
        let buf = PixelBuffer::from_pool(pool, OutputDtype::U8, values.len()).unwrap();
        // SAFETY: within capacity, no other reference.
        unsafe { buf.bytes_mut(0, values.len()) }.copy_from_slice(values);
        buf
    }

    #[test]
    fn pool_memory_is_aligned_and_recycled() {
        let pool = BufferPool::new(1000, 2);
        let a = filled(&pool, &[1, 2, 3]);
        assert_eq!(a.as_ptr() as usize % ALIGN, 0);
        let addr = a.as_ptr();
        assert_eq!(a.as_u8(), Some(&[1u8, 2, 3][..]));
        assert_eq!(a.as_f32(), None);
        drop(a);
        assert_eq!(pool.free_count(), 1);
        let b = filled(&pool, &[4, 5]);
        assert_eq!(b.as_ptr(), addr, "the dropped allocation is reused");
        assert_eq!(pool.free_count(), 0);
        let b = b
            .into_owner()
            .expect_err("pool memory has no external owner");
        assert_eq!(pool.free_count(), 0);
        drop(b);
        assert_eq!(pool.free_count(), 1);
    }

    #[test]
    fn an_allocation_the_allocator_refuses_is_an_error() {
        let pool = BufferPool::new(64, 1);
        let err = PixelBuffer::from_pool(&pool, OutputDtype::F32, usize::MAX / 8).unwrap_err();
        assert!(
            err.to_string().contains("lower batch_size or resolution"),
            "{err}"
        );
    }

    #[test]
    fn pool_keeps_at_most_keep_free() {
        let pool = BufferPool::new(64, 2);
        let bufs: Vec<_> = (0..5).map(|_| filled(&pool, &[0])).collect();
        drop(bufs);
        assert_eq!(pool.free_count(), 2);
    }

    #[test]
    fn retain_samples_moves_kept_slots_down() {
        let pool = BufferPool::new(64, 1);
        let mut p = filled(&pool, &(0..12).collect::<Vec<u8>>());
        p.retain_samples(&[false, true, false, true, true, false], 2);
        assert_eq!(p.as_u8(), Some(&[2u8, 3, 6, 7, 8, 9][..]));
        p.retain_samples(&[false, false, false], 2);
        assert!(p.is_empty());
    }

    struct Misaligned(Vec<Block>);

    // SAFETY: test source; only its misalignment is exercised, the pipeline rejects it unwritten.
    unsafe impl BufferSource for Misaligned {
        fn buffer(&mut self, _bytes: usize) -> Result<(NonNull<u8>, Box<dyn Any + Send>)> {
            // SAFETY: 1 byte into a live allocation of at least one block.
            let p = unsafe { self.0.as_mut_ptr().cast::<u8>().add(1) };
            Ok((NonNull::new(p).unwrap(), Box::new(())))
        }
    }

    #[test]
    fn misaligned_source_memory_is_refused() {
        let mut source = Misaligned(Vec::with_capacity(4));
        let err = PixelBuffer::from_source(&mut source, OutputDtype::F32, 4).unwrap_err();
        assert!(err.to_string().contains("aligned to 64 bytes"), "{err}");
    }
}
