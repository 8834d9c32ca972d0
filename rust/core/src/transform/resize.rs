//! The [`Transformer`]: resize the placement's window straight from the decoded pixels, then one pass
//! that writes planar CHW into the sample's [`OutSlot`] (flipped if asked, as uint8 or normalised
//! floats).
//!
//! The hot path of every sample: scratch buffers are reused across samples, and it writes only the
//! slot it is given. It must not re-check what the caller's placement already decided.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{PixelType, ResizeOptions, Resizer};

use super::{FilterType, Placement};
use crate::decode::RgbImage;
use crate::error::{Error, Result};

/// Destination of one sample: `3 * bh * bw` values, planar CHW (all R rows, then G, then B; each
/// plane row-major). Float variants hold `v / 127.5 - 1` for 8-bit `v`; `F16` and `BF16` hold the IEEE
/// half / bfloat16 bit patterns (round to nearest even, via the `half` crate).
#[derive(Debug)]
pub enum OutSlot<'a> {
    /// Raw 0..=255.
    U8(&'a mut [u8]),
    /// [-1, 1] as f32.
    F32(&'a mut [f32]),
    /// [-1, 1] as f16 bits.
    F16(&'a mut [u16]),
    /// [-1, 1] as bf16 bits.
    BF16(&'a mut [u16]),
}

impl OutSlot<'_> {
    fn len(&self) -> usize {
        match self {
            OutSlot::U8(s) => s.len(),
            OutSlot::F32(s) => s.len(),
            OutSlot::F16(s) | OutSlot::BF16(s) => s.len(),
        }
    }
}

/// Per-thread resizer with its scratch buffers (reused across samples, so steady-state work does
/// not allocate). `Send`, not meant to be shared.
#[derive(Debug, Clone)]
pub struct Transformer {
    filter: FilterType,
    resizer: Resizer,
    /// The resized window, RGB8 interleaved, `bw * bh * 3` bytes.
    scratch: Vec<u8>,
    /// Between the two passes of [`Transformer::resize_window`]: `bh` high, the source columns
    /// the horizontal filter reaches.
    columns: Vec<u8>,
    lut_f32: [f32; 256],
    lut_f16: [u16; 256],
    lut_bf16: [u16; 256],
    /// Time spent resampling since the last [`Transformer::take_resize_time`].
    resize_time: std::time::Duration,
}

impl Transformer {
    /// A transformer resizing with `filter` (CPU SIMD extensions detected at run time).
    pub fn new(filter: FilterType) -> Self {
        let lut_f32: [f32; 256] = std::array::from_fn(|v| v as f32 / 127.5 - 1.0);
        Transformer {
            filter,
            resizer: Resizer::new(),
            scratch: Vec::new(),
            columns: Vec::new(),
            lut_f32,
            lut_f16: lut_f32.map(|x| half::f16::from_f32(x).to_bits()),
            lut_bf16: lut_f32.map(|x| half::bf16::from_f32(x).to_bits()),
            resize_time: std::time::Duration::ZERO,
        }
    }

    /// The filter given to [`Transformer::new`].
    pub fn filter(&self) -> FilterType {
        self.filter
    }

    /// Time [`Transformer::apply`] spent resampling since the last call (the rest of `apply` is the
    /// crop, flip and normalised write); resets it to zero.
    pub fn take_resize_time(&mut self) -> std::time::Duration {
        std::mem::take(&mut self.resize_time)
    }

    /// Resize-to-cover + crop + optional horizontal flip + layout/normalise one sample into `out`.
    ///
    /// `img` is the decoded upright image, possibly smaller than `p.resized` (DCT-downscaled) or
    /// larger. The window `(crop_left, crop_top, bw, bh)` in resized coordinates is mapped to `img`
    /// coordinates by `sx = img.width / rw`, `sy = img.height / rh` and only that window is resized
    /// to `bucket` (w, h) (the filter may read source pixels just outside it, as resizing the whole
    /// image and then cropping would). When `img` already has the resized size, the window is
    /// copied without resampling. Then one pass writes planar CHW into `out`, mirrored left-right
    /// if `p.flip`.
    ///
    /// Errors: [`Error::InvalidArgument`] if `bucket` has a zero side or differs from `p.bucket`,
    /// `out` does not hold exactly
    /// `3 * bw * bh` values, the window does not fit in `p.resized`, or `img` is empty or its data
    /// length is not `width * height * 3`; [`Error::Internal`] if the resizer still fails.
    pub fn apply(
        &mut self,
        img: &RgbImage,
        p: &Placement,
        bucket: (u32, u32),
        out: OutSlot<'_>,
    ) -> Result<()> {
        let (bw, bh) = bucket;
        let (rw, rh) = p.resized;
        let values = 3 * bw as usize * bh as usize;
        if bw == 0 || bh == 0 {
            return Err(Error::InvalidArgument(format!(
                "transform: bucket {bw}x{bh} has a zero side"
            )));
        }
        if bucket != p.bucket {
            return Err(Error::InvalidArgument(format!(
                "transform: bucket {bw}x{bh} differs from the placement's {}x{}",
                p.bucket.0, p.bucket.1
            )));
        }
        if out.len() != values {
            return Err(Error::InvalidArgument(format!(
                "transform: output slot holds {} values, a {bw}x{bh} sample needs {values}",
                out.len()
            )));
        }
        if u64::from(p.crop_left) + u64::from(bw) > u64::from(rw)
            || u64::from(p.crop_top) + u64::from(bh) > u64::from(rh)
        {
            return Err(Error::InvalidArgument(format!(
                "transform: window {bw}x{bh} at ({}, {}) does not fit in the resized {rw}x{rh}",
                p.crop_left, p.crop_top
            )));
        }
        if img.width == 0
            || img.height == 0
            || img.data.len() != img.width as usize * img.height as usize * 3
        {
            return Err(Error::InvalidArgument(format!(
                "transform: image {}x{} has {} bytes of RGB data",
                img.width,
                img.height,
                img.data.len()
            )));
        }

        let (src, stride, x0, y0) = if (img.width, img.height) == (rw, rh) {
            (
                &img.data[..],
                rw as usize,
                p.crop_left as usize,
                p.crop_top as usize,
            )
        } else {
            let t = std::time::Instant::now();
            self.resize_window(img, p, bucket)?;
            self.resize_time += t.elapsed();
            (&self.scratch[..], bw as usize, 0, 0)
        };
        let win = Window {
            src,
            stride,
            x0,
            y0,
            w: bw as usize,
            h: bh as usize,
            flip: p.flip,
        };
        match out {
            OutSlot::U8(o) => win.write_chw(o, |v| v),
            OutSlot::F32(o) => win.write_chw(o, |v| self.lut_f32[usize::from(v)]),
            OutSlot::F16(o) => win.write_chw(o, |v| self.lut_f16[usize::from(v)]),
            OutSlot::BF16(o) => win.write_chw(o, |v| self.lut_bf16[usize::from(v)]),
        }
        Ok(())
    }

    /// Resize the window of `p` (mapped into `img` coordinates) to `bucket` into `self.scratch`.
    fn resize_window(&mut self, img: &RgbImage, p: &Placement, bucket: (u32, u32)) -> Result<()> {
        let (bw, bh) = bucket;
        let sx = f64::from(img.width) / f64::from(p.resized.0);
        let sy = f64::from(img.height) / f64::from(p.resized.1);
        let left = f64::from(p.crop_left) * sx;
        let top = f64::from(p.crop_top) * sy;
        // Clamp against rounding past the image edge (the window fits the resized image exactly).
        let right = (f64::from(p.crop_left + bw) * sx).min(f64::from(img.width));
        let bottom = (f64::from(p.crop_top + bh) * sy).min(f64::from(img.height));
        let alg = self.filter.algorithm();

        let len = 3 * bw as usize * bh as usize;
        if self.scratch.len() != len {
            self.scratch.resize(len, 0);
        }
        // The arguments were checked above: a resizer error here is a broken invariant, not the
        // caller's or the file's fault.
        let internal =
            |e: &dyn std::fmt::Display| Error::Internal(format!("transform: resize failed: {e}"));
        let src = ImageRef::new(img.width, img.height, &img.data, PixelType::U8x3)
            .map_err(|e| internal(&e))?;
        if self.filter == FilterType::Nearest {
            let options =
                ResizeOptions::new()
                    .resize_alg(alg)
                    .crop(left, top, right - left, bottom - top);
            let mut dst = Image::from_slice_u8(bw, bh, &mut self.scratch, PixelType::U8x3)
                .map_err(|e| internal(&e))?;
            return self
                .resizer
                .resize(&src, &mut dst, &options)
                .map_err(|e| internal(&e));
        }
        // Two single-pass calls, vertical then horizontal (the order fast_image_resize itself uses
        // for u8), never one call that needs both: fast_image_resize 6.1 then sizes its buffer
        // between the passes from the first and last output pixels' source ranges, but filters
        // whose weights are exactly 0 at whole-pixel distances (Lanczos, Catmull-Rom) get trimmed,
        // non-monotonic ranges, and its horizontal pass reads past that buffer (out of bounds;
        // found by tests/fuzz.rs: a 24x40 image into a 16x120 window, Catmull-Rom). Each single
        // pass reads only within its source; the columns kept cover every horizontal tap, so the
        // result is the same as one call's.
        let scale_x = (right - left) / f64::from(bw);
        // Widest support is Lanczos3's 3 source pixels, scaled when downsampling; 1 spare column.
        let margin = (3.0 * scale_x.max(1.0)).ceil() + 1.0;
        let x0 = (left - margin).floor().max(0.0) as u32;
        let x1 = ((right + margin).ceil() as u32).min(img.width).max(x0 + 1);
        let cols_len = 3 * (x1 - x0) as usize * bh as usize;
        if self.columns.len() != cols_len {
            self.columns.resize(cols_len, 0);
        }
        let vertical = ResizeOptions::new().resize_alg(alg).crop(
            f64::from(x0),
            top,
            f64::from(x1 - x0),
            bottom - top,
        );
        let mut columns = Image::from_slice_u8(x1 - x0, bh, &mut self.columns, PixelType::U8x3)
            .map_err(|e| internal(&e))?;
        self.resizer
            .resize(&src, &mut columns, &vertical)
            .map_err(|e| internal(&e))?;
        let columns =
            ImageRef::new(x1 - x0, bh, &self.columns, PixelType::U8x3).map_err(|e| internal(&e))?;
        let horizontal = ResizeOptions::new().resize_alg(alg).crop(
            left - f64::from(x0),
            0.0,
            right - left,
            f64::from(bh),
        );
        let mut dst = Image::from_slice_u8(bw, bh, &mut self.scratch, PixelType::U8x3)
            .map_err(|e| internal(&e))?;
        self.resizer
            .resize(&columns, &mut dst, &horizontal)
            .map_err(|e| internal(&e))
    }
}

/// A `w` x `h` window at (`x0`, `y0`) of an RGB8 interleaved image `stride` pixels wide.
struct Window<'a> {
    src: &'a [u8],
    stride: usize,
    x0: usize,
    y0: usize,
    w: usize,
    h: usize,
    flip: bool,
}

impl Window<'_> {
    /// Write the window as planar CHW into `out` (`3 * w * h` values), mapping each byte with `map`,
    /// mirrored left-right when `flip`.
    fn write_chw<T: Copy>(&self, out: &mut [T], map: impl Fn(u8) -> T) {
        let plane = self.w * self.h;
        let (r, gb) = out.split_at_mut(plane);
        let (g, b) = gb.split_at_mut(plane);
        let rows = r
            .chunks_exact_mut(self.w)
            .zip(g.chunks_exact_mut(self.w))
            .zip(b.chunks_exact_mut(self.w));
        for (y, ((r, g), b)) in rows.enumerate() {
            let start = ((self.y0 + y) * self.stride + self.x0) * 3;
            let row = self.src[start..start + self.w * 3].chunks_exact(3);
            let mut put = |(px, ((r, g), b)): (&[u8], ((&mut T, &mut T), &mut T))| {
                *r = map(px[0]);
                *g = map(px[1]);
                *b = map(px[2]);
            };
            let dst = r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut());
            if self.flip {
                row.rev().zip(dst).for_each(&mut put);
            } else {
                row.zip(dst).for_each(&mut put);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::CropMode;
    use super::*;

    fn image(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> RgbImage {
        let data = (0..h)
            .flat_map(|y| (0..w).map(move |x| (x, y)))
            .flat_map(|(x, y)| f(x, y))
            .collect();
        RgbImage {
            width: w,
            height: h,
            data,
        }
    }

    /// Run `apply` with u8 output and return the three planes.
    fn planes_u8(t: &mut Transformer, img: &RgbImage, p: &Placement) -> [Vec<u8>; 3] {
        let (bw, bh) = p.bucket;
        let plane = (bw * bh) as usize;
        let mut out = vec![0u8; 3 * plane];
        t.apply(img, p, p.bucket, OutSlot::U8(&mut out)).unwrap();
        [
            out[..plane].to_vec(),
            out[plane..2 * plane].to_vec(),
            out[2 * plane..].to_vec(),
        ]
    }

    fn placed(
        resized: (u32, u32),
        left: u32,
        top: u32,
        bucket: (u32, u32),
        flip: bool,
    ) -> Placement {
        Placement {
            resized,
            crop_left: left,
            crop_top: top,
            flip,
            bucket,
        }
    }

    #[test]
    fn small_images_into_extreme_windows_stay_in_bounds() {
        // Regression (tests/fuzz.rs): a 24x40 image placed in a 16x120 window upsamples a
        // fractional crop 3x; one fast_image_resize call doing both passes read past its buffer.
        // A solid image must come out solid, whatever the filter, crop and flip.
        for filter in [
            FilterType::Lanczos3,
            FilterType::CatmullRom,
            FilterType::Bilinear,
            FilterType::Box,
            FilterType::Nearest,
        ] {
            let mut t = Transformer::new(filter);
            for (w, h) in [(24, 40), (1, 1), (3, 50), (50, 3), (7, 7)] {
                let img = image(w, h, |_, _| [200, 100, 50]);
                for bucket in [(16, 120), (120, 16), (8, 8), (64, 32)] {
                    for (r, flip) in [(0.0, false), (0.5, true), (0.999, false)] {
                        let p = Placement::new((w, h), bucket, CropMode::Random, r, r, flip);
                        let [red, green, blue] = planes_u8(&mut t, &img, &p);
                        let what = format!("{filter:?} {w}x{h} -> {bucket:?} at {r}");
                        assert!(red.iter().all(|&v| v == 200), "{what}");
                        assert!(green.iter().all(|&v| v == 100), "{what}");
                        assert!(blue.iter().all(|&v| v == 50), "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn direct_copy_crops_flips_and_lays_out_chw() {
        // Image already at the resized size: no resampling, exact values.
        let img = image(5, 4, |x, y| {
            [(10 * x + y) as u8, 100 + x as u8, 200 + y as u8]
        });
        let mut t = Transformer::new(FilterType::Lanczos3);
        let p = placed((5, 4), 1, 2, (3, 2), false);
        let [r, g, b] = planes_u8(&mut t, &img, &p);
        assert_eq!(r, [12, 22, 32, 13, 23, 33]);
        assert_eq!(g, [101, 102, 103, 101, 102, 103]);
        assert_eq!(b, [202, 202, 202, 203, 203, 203]);
        let [r, g, _] = planes_u8(&mut t, &img, &placed((5, 4), 1, 2, (3, 2), true));
        assert_eq!(r, [32, 22, 12, 33, 23, 13]);
        assert_eq!(g, [103, 102, 101, 103, 102, 101]);
        // Full image equal to the bucket.
        let [r, ..] = planes_u8(&mut t, &img, &placed((5, 4), 0, 0, (5, 4), false));
        assert_eq!(
            r,
            (0..4)
                .flat_map(|y| (0..5).map(move |x| (10 * x + y) as u8))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn float_outputs_normalise_to_minus_one_one() {
        let values = [0u8, 1, 127, 128, 254, 255];
        let img = image(6, 1, |x, _| {
            [values[x as usize], 255 - values[x as usize], 0]
        });
        let mut t = Transformer::new(FilterType::Bilinear);
        let p = placed((6, 1), 0, 0, (6, 1), false);

        let mut f32s = vec![0f32; 18];
        t.apply(&img, &p, (6, 1), OutSlot::F32(&mut f32s)).unwrap();
        let want: Vec<f32> = values.iter().map(|&v| v as f32 / 127.5 - 1.0).collect();
        assert_eq!(&f32s[..6], &want[..]);
        assert_eq!(
            (f32s[0], f32s[5], f32s[6], f32s[17]),
            (-1.0, 1.0, 1.0, -1.0)
        );

        let mut f16s = vec![0u16; 18];
        t.apply(&img, &p, (6, 1), OutSlot::F16(&mut f16s)).unwrap();
        assert_eq!((f16s[0], f16s[5]), (0xBC00, 0x3C00)); // -1.0, 1.0
        for (bits, want) in f16s.iter().zip(&want) {
            assert_eq!(*bits, half::f16::from_f32(*want).to_bits());
        }

        let mut bf16s = vec![0u16; 18];
        t.apply(&img, &p, (6, 1), OutSlot::BF16(&mut bf16s))
            .unwrap();
        assert_eq!((bf16s[0], bf16s[5], bf16s[12]), (0xBF80, 0x3F80, 0xBF80));
        for (bits, want) in bf16s.iter().zip(&want) {
            assert_eq!(*bits, half::bf16::from_f32(*want).to_bits());
        }
        // The middle value 127 / 127.5 - 1 = -0.0039216 in every representation.
        assert!((half::bf16::from_bits(bf16s[2]).to_f32() + 0.003_921_6).abs() < 1e-4);
    }

    #[test]
    fn box_filter_downscale_averages_exactly() {
        // 4x4 gradient -> 2x2: each output is the mean of a 2x2 block.
        let img = image(4, 4, |x, y| [(10 * x + 40 * y) as u8, (40 * x) as u8, 7]);
        let p = Placement::new((4, 4), (2, 2), CropMode::Center, 0.0, 0.0, false);
        assert_eq!(p.resized, (2, 2));
        let mut t = Transformer::new(FilterType::Box);
        let [r, g, b] = planes_u8(&mut t, &img, &p);
        // Block (0,0): r = (0 + 10 + 40 + 50) / 4 = 25; (1,0): (20 + 30 + 60 + 70) / 4 = 45; +80 per
        // block row.
        assert_eq!(r, [25, 45, 105, 125]);
        assert_eq!(g, [20, 100, 20, 100]);
        assert_eq!(b, [7, 7, 7, 7]);
    }

    #[test]
    fn nearest_samples_pixel_centres() {
        // 8 -> 4 columns: centres at (x + 0.5) * 2 = 1, 3, 5, 7.
        let img = image(8, 2, |x, y| [(10 * x + y) as u8, 0, 0]);
        let p = Placement::new((8, 2), (4, 1), CropMode::Center, 0.0, 0.0, false);
        assert_eq!((p.resized, p.crop_left, p.crop_top), ((4, 1), 0, 0));
        let mut t = Transformer::new(FilterType::Nearest);
        let [r, ..] = planes_u8(&mut t, &img, &p);
        assert_eq!(r, [11, 31, 51, 71]);
    }

    #[test]
    fn window_maps_from_resized_to_decoded_coordinates() {
        // Upright 8x4 into a 2x2 bucket: resized 4x2, centre crop left = 1. The decoded image is
        // given at 2x the resized size (as a DCT-scaled JPEG would be): the window in decoded
        // pixels is x in [2, 6), and nearest sampling picks columns 3 and 5 -- the same as
        // resizing the whole image to 4x2 (columns 1, 3, 5, 7) then cropping at 1.
        let img = image(8, 4, |x, y| [(10 * x + y) as u8, 0, 0]);
        let p = Placement::new((8, 4), (2, 2), CropMode::Center, 0.0, 0.0, false);
        assert_eq!((p.resized, p.crop_left), ((4, 2), 1));
        let mut t = Transformer::new(FilterType::Nearest);
        let [r, ..] = planes_u8(&mut t, &img, &p);
        assert_eq!(r, [31, 51, 33, 53]);
        // Flipped: columns mirrored within the window.
        let [r, ..] = planes_u8(&mut t, &img, &Placement { flip: true, ..p });
        assert_eq!(r, [51, 31, 53, 33]);
        // A smaller decoded image (upscaled into the window) maps the same way: 4x2 image is the
        // resized size itself, so it is a plain copy of columns 1..3.
        let small = image(4, 2, |x, y| [(10 * x + y) as u8, 0, 0]);
        let [r, ..] = planes_u8(&mut t, &small, &p);
        assert_eq!(r, [10, 20, 11, 21]);
    }

    #[test]
    fn convolution_keeps_solid_colours_and_matches_full_resize_then_crop() {
        let solid = image(97, 61, |_, _| [10, 200, 30]);
        for filter in [
            FilterType::Lanczos3,
            FilterType::CatmullRom,
            FilterType::Bilinear,
            FilterType::Box,
        ] {
            let mut t = Transformer::new(filter);
            let p = Placement::new((97, 61), (32, 48), CropMode::Random, 0.7, 0.2, true);
            let [r, g, b] = planes_u8(&mut t, &solid, &p);
            assert!(
                r.iter().all(|&v| v == 10)
                    && g.iter().all(|&v| v == 200)
                    && b.iter().all(|&v| v == 30),
                "{filter:?}"
            );
        }
        // Windowed resize == resize everything to `resized`, then crop (interior of the window,
        // away from the filter's edge support).
        let img = image(300, 200, |x, y| {
            [
                (x * 255 / 299) as u8,
                (y * 255 / 199) as u8,
                ((x + y) % 256) as u8,
            ]
        });
        let p = Placement::new((300, 200), (64, 64), CropMode::Center, 0.0, 0.0, false);
        assert_eq!((p.resized, p.crop_left), ((96, 64), 16));
        let mut t = Transformer::new(FilterType::Lanczos3);
        let [r, g, _] = planes_u8(&mut t, &img, &p);
        let full = Placement {
            resized: (96, 64),
            crop_left: 0,
            crop_top: 0,
            flip: false,
            bucket: (96, 64),
        };
        let [fr, fg, _] = planes_u8(&mut t, &img, &full);
        for y in 4..60 {
            for x in 4..60 {
                let (i, j) = (y * 64 + x, y * 96 + x + 16);
                assert!(
                    r[i].abs_diff(fr[j]) <= 1 && g[i].abs_diff(fg[j]) <= 1,
                    "({x}, {y})"
                );
            }
        }
    }

    #[test]
    fn scratch_is_reused_across_bucket_sizes() {
        let img = image(40, 30, |x, y| [x as u8, y as u8, 0]);
        let mut t = Transformer::new(FilterType::Bilinear);
        for bucket in [(16, 8), (8, 16), (16, 8), (4, 4)] {
            let p = Placement::new((40, 30), bucket, CropMode::Center, 0.0, 0.0, false);
            let [r, ..] = planes_u8(&mut t, &img, &p);
            assert_eq!(r.len(), (bucket.0 * bucket.1) as usize);
        }
        assert_eq!(t.filter(), FilterType::Bilinear);
    }

    #[test]
    fn invalid_arguments_are_errors_not_panics() {
        let img = image(8, 8, |_, _| [1, 2, 3]);
        let mut t = Transformer::new(FilterType::Lanczos3);
        let p = Placement::new((8, 8), (4, 4), CropMode::Center, 0.0, 0.0, false);
        let mut short = vec![0u8; 47];
        assert!(matches!(
            t.apply(&img, &p, (4, 4), OutSlot::U8(&mut short)),
            Err(Error::InvalidArgument(_))
        ));
        let mut out = vec![0f32; 48];
        assert!(t.apply(&img, &p, (4, 4), OutSlot::F32(&mut out)).is_ok());
        assert!(matches!(
            t.apply(&img, &p, (2, 8), OutSlot::F32(&mut out)),
            Err(Error::InvalidArgument(_))
        ));
        let outside = Placement { crop_left: 5, ..p };
        let err = t
            .apply(&img, &outside, (4, 4), OutSlot::F32(&mut out))
            .unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        let broken = RgbImage {
            width: 8,
            height: 8,
            data: vec![0; 10],
        };
        assert!(matches!(
            t.apply(&broken, &p, (4, 4), OutSlot::F32(&mut out)),
            Err(Error::InvalidArgument(_))
        ));
        let zero = Placement::new((8, 8), (0, 4), CropMode::Center, 0.0, 0.0, false);
        assert!(matches!(
            t.apply(&img, &zero, (0, 4), OutSlot::F32(&mut [])),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn transformer_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Transformer>();
    }
}
