//! Counter-based randomness: every random choice is a pure function of (seed, epoch, stream, index),
//! so results do not depend on thread count, prefetch depth or the order work is done in.
//!
//! The mixer is SplitMix64's finaliser (Steele, Lea & Flood, "Fast splittable pseudorandom number
//! generators", OOPSLA 2014), applied to a combination of the key words.
//!
//! Stateless by design: nothing here may hold a generator that advances, or draws would depend on
//! the order threads ask for them.

/// Independent random streams; each use of randomness takes its own so they never correlate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Stream {
    /// Shuffle of the images inside each bucket (sampler).
    ShuffleWithinBucket = 1,
    /// Shuffle of the batch order (sampler).
    ShuffleBatches = 2,
    /// Horizontal crop offset of one sample.
    CropX = 3,
    /// Vertical crop offset of one sample.
    CropY = 4,
    /// Horizontal flip decision of one sample.
    Flip = 5,
    /// Which of a sample's caption variants is used (caption.rs).
    CaptionChoice = 6,
    /// Whole-caption dropout of one sample (caption.rs).
    CaptionDropout = 7,
    /// Tag shuffle and tag dropout of one sample's caption (caption.rs).
    Tags = 8,
    /// Which sample of the same bucket stands in for one that failed to load (pipeline/worker.rs).
    Substitute = 9,
    /// Which of an image's `crop_variants` crops a sample uses, per (epoch, sample).
    CropVariant = 10,
    /// Horizontal crop offset of one crop variant of an image (keyed by variant and image).
    VariantCropX = 11,
    /// Vertical crop offset of one crop variant of an image (keyed by variant and image).
    VariantCropY = 12,
    /// Which of an image's `text_variants` caption variants a sample uses, per (epoch, sample).
    TextVariant = 13,
    /// The option each `{a|b|c}` wildcard of one sample's caption takes (caption.rs).
    Wildcard = 14,
    /// Whether an image is held out for validation (keyed by a hash of its relative path).
    ValidationSplit = 15,
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A 64-bit random value for the key (seed, epoch, stream, index).
pub fn key(seed: u64, epoch: u64, stream: Stream, index: u64) -> u64 {
    mix(mix(mix(mix(seed) ^ epoch) ^ stream as u64) ^ index)
}

/// A uniform double in [0, 1) for the key (seed, epoch, stream, index).
pub fn uniform(seed: u64, epoch: u64, stream: Stream, index: u64) -> f64 {
    (key(seed, epoch, stream, index) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A small sequential generator seeded from a key, for shuffles (Fisher–Yates needs many draws).
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// Generator for the key (seed, epoch, stream, index).
    pub fn new(seed: u64, epoch: u64, stream: Stream, index: u64) -> Self {
        SplitMix64 {
            state: key(seed, epoch, stream, index),
        }
    }

    /// Next 64-bit value.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.state.wrapping_sub(0x9E37_79B9_7F4A_7C15))
    }

    /// Uniform integer in [0, n) by Lemire's multiply-shift (n > 0; bias below 2^-32 for our sizes).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Fisher–Yates shuffle in place.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_in_unit_interval_and_keyed() {
        let a = uniform(1, 2, Stream::Flip, 3);
        assert!((0.0..1.0).contains(&a));
        assert_eq!(a, uniform(1, 2, Stream::Flip, 3));
        assert_ne!(a, uniform(1, 2, Stream::Flip, 4));
        assert_ne!(a, uniform(1, 3, Stream::Flip, 3));
        assert_ne!(a, uniform(1, 2, Stream::CropX, 3));
    }

    #[test]
    fn shuffle_is_a_permutation_and_roughly_uniform() {
        let mut counts = [[0u32; 4]; 4];
        for s in 0..4000u64 {
            let mut v = [0usize, 1, 2, 3];
            SplitMix64::new(s, 0, Stream::ShuffleBatches, 0).shuffle(&mut v);
            let mut sorted = v;
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2, 3]);
            for (pos, &x) in v.iter().enumerate() {
                counts[pos][x] += 1;
            }
        }
        // Each of the 16 cells expects 1000; a fair shuffle stays well within ±15%.
        for row in counts {
            for c in row {
                assert!((850..1150).contains(&c), "{counts:?}");
            }
        }
    }
}
