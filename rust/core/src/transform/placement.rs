//! Where the bucket-sized window lies in the resized image: the cover size (kohya-ss
//! `trim_and_resize_if_required`), the crop offset (centre or seeded random) and the flip.
//!
//! Geometry on sizes only: it must not touch pixels, and the random draws it takes are the caller's
//! (keyed by [`crate::rng`]), so it is a pure function of its arguments.

use super::CropMode;

/// Where the bucket-sized crop lies. All values in pixels of the RESIZED image, (w, h) order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Placement {
    /// Size (w, h) the upright image is resized to; covers the bucket: `w >= bw`, `h >= bh`.
    pub resized: (u32, u32),
    /// Left edge of the window, `0..=resized.0 - bw`; in un-flipped coordinates.
    pub crop_left: u32,
    /// Top edge of the window, `0..=resized.1 - bh`.
    pub crop_top: u32,
    /// Whether the window is mirrored left-right after cropping.
    pub flip: bool,
    /// The window (bucket) size (w, h) this placement was made for.
    pub bucket: (u32, u32),
}

impl Placement {
    /// Place a `bucket` (w, h) window on the image of `upright` (w, h) pixels.
    ///
    /// `resized` is the cover size (kohya-ss `trim_and_resize_if_required`):
    /// `s = max(bw / W, bh / H)`, `rw = max(bw, round(W * s))`, `rh = max(bh, round(H * s))`,
    /// rounding half up. Center: `left = (rw - bw) / 2`, `top = (rh - bh) / 2` (integer division).
    /// Random: `left = floor(rand_x * (rw - bw + 1))`, `top = floor(rand_y * (rh - bh + 1))`, with
    /// `rand_x`, `rand_y` uniform in [0, 1) (values outside are clamped into range). A zero
    /// `upright` side is treated as 1 pixel.
    pub fn new(
        upright: (u32, u32),
        bucket: (u32, u32),
        crop: CropMode,
        rand_x: f64,
        rand_y: f64,
        flip: bool,
    ) -> Placement {
        let (w, h) = (f64::from(upright.0.max(1)), f64::from(upright.1.max(1)));
        let (bw, bh) = bucket;
        let s = (f64::from(bw) / w).max(f64::from(bh) / h);
        let rw = bw.max((w * s).round() as u32);
        let rh = bh.max((h * s).round() as u32);
        let offset = |room: u32, r: f64| match crop {
            CropMode::Center => room / 2,
            CropMode::Random => ((r * f64::from(room + 1)).floor().max(0.0) as u32).min(room),
        };
        Placement {
            resized: (rw, rh),
            crop_left: offset(rw - bw, rand_x),
            crop_top: offset(rh - bh, rand_y),
            flip,
            bucket,
        }
    }

    /// SDXL's `crop_top_left` conditioning, `(top, left)` in resized pixels, flip-aware as in
    /// kohya-ss sd-scripts: when flipped, `left = rw - bw - crop_left` (the window's left edge in
    /// the mirrored resized image; saturating at 0 for a hand-made placement whose window does not
    /// fit).
    pub fn crop_top_left(&self) -> (u32, u32) {
        let left = if self.flip {
            self.resized
                .0
                .saturating_sub(self.bucket.0)
                .saturating_sub(self.crop_left)
        } else {
            self.crop_left
        };
        (self.crop_top, left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_center() {
        // Wide: the height decides, s = 512 / 500.
        let p = Placement::new((1000, 500), (512, 512), CropMode::Center, 0.9, 0.9, false);
        assert_eq!(p.resized, (1024, 512));
        assert_eq!((p.crop_left, p.crop_top), (256, 0));
        assert_eq!(p.crop_top_left(), (0, 256));
        // Tall, odd room: (rh - bh) / 2 rounds down.
        let p = Placement::new((300, 701), (256, 512), CropMode::Center, 0.0, 0.0, false);
        // s = max(256/300, 512/701) = 0.8533; rh = round(701 * 0.8533) = round(598.19) = 598.
        assert_eq!(p.resized, (256, 598));
        assert_eq!((p.crop_left, p.crop_top), (0, 43));
        // Exact aspect: no room at all.
        let p = Placement::new((2048, 1024), (1024, 512), CropMode::Center, 0.5, 0.5, true);
        assert_eq!((p.resized, p.crop_left, p.crop_top), ((1024, 512), 0, 0));
        assert_eq!(p.crop_top_left(), (0, 0));
        // Rounding half up, and never below the bucket: 333 * 0.768768.. = 256.0 - eps.
        let p = Placement::new((333, 500), (256, 384), CropMode::Center, 0.0, 0.0, false);
        assert_eq!(p.resized, (256, 384));
        // Upscaling a small image.
        let p = Placement::new((100, 50), (256, 256), CropMode::Center, 0.0, 0.0, false);
        assert_eq!((p.resized, p.crop_left), ((512, 256), 128));
        // kohya: int(W * s + 0.5) -- 1001 x 1000 into 512 x 512: s = 0.512, 512.512 -> 513.
        let p = Placement::new((1001, 1000), (512, 512), CropMode::Center, 0.0, 0.0, false);
        assert_eq!((p.resized, p.crop_left), ((513, 512), 0));
    }

    #[test]
    fn placement_random_bounds_and_flip() {
        let room = 1024 - 512;
        let lo = Placement::new((1000, 500), (512, 512), CropMode::Random, 0.0, 0.0, false);
        assert_eq!((lo.crop_left, lo.crop_top), (0, 0));
        let hi = Placement::new(
            (1000, 500),
            (512, 512),
            CropMode::Random,
            0.999_999_9,
            0.999_999_9,
            false,
        );
        assert_eq!((hi.crop_left, hi.crop_top), (room, 0));
        let mid = Placement::new((1000, 500), (512, 512), CropMode::Random, 0.5, 0.5, false);
        assert_eq!(mid.crop_left, (0.5 * f64::from(room + 1)).floor() as u32);
        // Out-of-range randoms are clamped rather than producing a window outside the image.
        let over = Placement::new((1000, 500), (512, 512), CropMode::Random, 1.0, -3.0, false);
        assert_eq!((over.crop_left, over.crop_top), (room, 0));
        // Every value of rand_x maps to one of the room + 1 offsets, uniformly.
        let mut counts = vec![0u32; 5];
        for i in 0..5000 {
            let r = (f64::from(i) + 0.5) / 5000.0;
            let p = Placement::new((12, 8), (8, 8), CropMode::Random, r, 0.0, false);
            counts[p.crop_left as usize] += 1;
        }
        assert_eq!(counts, [1000; 5]);
        // SDXL crop_top_left with flip: left = rw - bw - crop_left.
        let flipped = Placement::new((1000, 500), (512, 512), CropMode::Random, 0.1, 0.0, true);
        assert_eq!(flipped.crop_left, 51);
        assert_eq!(flipped.crop_top_left(), (0, 1024 - 512 - 51));
        let tall = Placement::new((500, 1000), (512, 512), CropMode::Random, 0.0, 0.25, true);
        assert_eq!(tall.crop_top_left(), (128, 0));
    }
}
