//! From a decoded upright image to one sample of the batch: resize to cover the bucket, crop,
//! optional horizontal flip, then planar CHW output as `uint8` or normalised floats.
//!
//! The geometry follows kohya-ss/sd-scripts bucketing: the image is scaled so that it covers the
//! bucket (`scale = max(bw / W, bh / H)`, sizes rounded half up), then a bucket-sized window is cut
//! out of the resized image ([`Placement`]). [`Transformer::apply`] never materialises the resized
//! image: it resizes only the window, straight from the decoded pixels (which may already be
//! DCT-downscaled by the JPEG decoder), with `fast_image_resize` convolution filters (same filter
//! definitions and support scaling as Pillow's `Image.resize`).
//!
//! The hot path of every sample. It must not allocate per sample in the steady state (scratch
//! buffers are reused) and writes only the slot it is given.
//!
//! The files: this one (the option types: crop mode, filter, output dtype), `placement` (where the
//! bucket-sized window lies in the resized image, with the seeded crop and flip), `resize` (the
//! [`Transformer`]: resize the window and write the planar sample into its [`OutSlot`]).

mod placement;
mod resize;

use std::str::FromStr;

use fast_image_resize::{self as fir, ResizeAlg};

use crate::error::{Error, Result};

pub use placement::Placement;
pub use resize::{OutSlot, Transformer};

/// How the bucket-sized window is placed inside the resized image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum CropMode {
    /// Centred (SDXL / kohya default); parses from `"center"`.
    #[default]
    Center,
    /// Uniformly random offset per sample and epoch; parses from `"random"`.
    Random,
}

impl CropMode {
    /// The name [`FromStr`] accepts: `"center"` or `"random"`.
    pub fn name(&self) -> &'static str {
        match self {
            CropMode::Center => "center",
            CropMode::Random => "random",
        }
    }
}

impl FromStr for CropMode {
    type Err = Error;

    /// `"center"` or `"random"` (ASCII case-insensitive); anything else is
    /// [`Error::InvalidArgument`] naming `crop`.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "center" => Ok(CropMode::Center),
            "random" => Ok(CropMode::Random),
            _ => Err(invalid_choice("crop", s, &["center", "random"])),
        }
    }
}

/// Resampling filter of the resize step. All but `Nearest` are convolutions whose support widens
/// with the downscale factor (antialiased, like Pillow's `Image.resize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum FilterType {
    /// Lanczos, a = 3 (Pillow `LANCZOS`); `"lanczos3"`. The default.
    #[default]
    Lanczos3,
    /// Catmull-Rom bicubic (Pillow `BICUBIC`); `"catmullrom"`.
    CatmullRom,
    /// Triangle filter (Pillow `BILINEAR`); `"bilinear"`.
    Bilinear,
    /// Box filter, area average when downscaling (Pillow `BOX`); `"box"`.
    Box,
    /// Nearest neighbour, sampling at pixel centres (Pillow `NEAREST`); `"nearest"`.
    Nearest,
}

impl FilterType {
    /// The name [`FromStr`] accepts, e.g. `"lanczos3"`.
    pub fn name(&self) -> &'static str {
        match self {
            FilterType::Lanczos3 => "lanczos3",
            FilterType::CatmullRom => "catmullrom",
            FilterType::Bilinear => "bilinear",
            FilterType::Box => "box",
            FilterType::Nearest => "nearest",
        }
    }

    fn algorithm(self) -> ResizeAlg {
        let conv = |f| ResizeAlg::Convolution(f);
        match self {
            FilterType::Lanczos3 => conv(fir::FilterType::Lanczos3),
            FilterType::CatmullRom => conv(fir::FilterType::CatmullRom),
            FilterType::Bilinear => conv(fir::FilterType::Bilinear),
            FilterType::Box => conv(fir::FilterType::Box),
            FilterType::Nearest => ResizeAlg::Nearest,
        }
    }
}

impl FromStr for FilterType {
    type Err = Error;

    /// `"lanczos3"`, `"catmullrom"`, `"bilinear"`, `"box"` or `"nearest"` (ASCII
    /// case-insensitive); anything else is [`Error::InvalidArgument`] naming `filter`.
    fn from_str(s: &str) -> Result<Self> {
        const ALL: [FilterType; 5] = [
            FilterType::Lanczos3,
            FilterType::CatmullRom,
            FilterType::Bilinear,
            FilterType::Box,
            FilterType::Nearest,
        ];
        let lower = s.to_ascii_lowercase();
        ALL.into_iter()
            .find(|f| f.name() == lower)
            .ok_or_else(|| invalid_choice("filter", s, &ALL.map(|f| f.name())))
    }
}

/// Element type of the batch buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OutputDtype {
    /// Raw 0..=255 values; `"uint8"`.
    U8,
    /// `v / 127.5 - 1` in [-1, 1]; `"float32"`. The default.
    #[default]
    F32,
    /// As `F32`, rounded to IEEE half precision; `"float16"`.
    F16,
    /// As `F32`, rounded to bfloat16; `"bfloat16"`.
    BF16,
}

impl OutputDtype {
    /// Bytes per stored value: 1, 4, 2, 2.
    pub fn bytes_per_value(&self) -> usize {
        match self {
            OutputDtype::U8 => 1,
            OutputDtype::F32 => 4,
            OutputDtype::F16 | OutputDtype::BF16 => 2,
        }
    }

    /// The name [`FromStr`] accepts (numpy/torch spelling), e.g. `"float32"`.
    pub fn name(&self) -> &'static str {
        match self {
            OutputDtype::U8 => "uint8",
            OutputDtype::F32 => "float32",
            OutputDtype::F16 => "float16",
            OutputDtype::BF16 => "bfloat16",
        }
    }
}

impl FromStr for OutputDtype {
    type Err = Error;

    /// `"uint8"`, `"float32"`, `"float16"` or `"bfloat16"` (ASCII case-insensitive); anything else
    /// is [`Error::InvalidArgument`] naming `dtype`.
    fn from_str(s: &str) -> Result<Self> {
        const ALL: [OutputDtype; 4] = [
            OutputDtype::U8,
            OutputDtype::F32,
            OutputDtype::F16,
            OutputDtype::BF16,
        ];
        let lower = s.to_ascii_lowercase();
        ALL.into_iter()
            .find(|d| d.name() == lower)
            .ok_or_else(|| invalid_choice("dtype", s, &ALL.map(|d| d.name())))
    }
}

fn invalid_choice(argument: &str, got: &str, choices: &[&str]) -> Error {
    Error::InvalidArgument(format!(
        "{argument} must be one of {}, got {got:?}",
        choices
            .iter()
            .map(|c| format!("{c:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_round_trip() {
        assert_eq!("center".parse::<CropMode>().unwrap(), CropMode::Center);
        assert_eq!("Random".parse::<CropMode>().unwrap(), CropMode::Random);
        for f in [
            FilterType::Lanczos3,
            FilterType::CatmullRom,
            FilterType::Bilinear,
            FilterType::Box,
            FilterType::Nearest,
        ] {
            assert_eq!(f.name().parse::<FilterType>().unwrap(), f);
        }
        assert_eq!(
            "catmullrom".parse::<FilterType>().unwrap(),
            FilterType::CatmullRom
        );
        for (name, d, bytes) in [
            ("uint8", OutputDtype::U8, 1),
            ("float32", OutputDtype::F32, 4),
            ("float16", OutputDtype::F16, 2),
            ("bfloat16", OutputDtype::BF16, 2),
        ] {
            assert_eq!(name.parse::<OutputDtype>().unwrap(), d);
            assert_eq!(d.name(), name);
            assert_eq!(d.bytes_per_value(), bytes);
        }
        assert_eq!(FilterType::default(), FilterType::Lanczos3);
        assert_eq!(CropMode::default(), CropMode::Center);
        assert_eq!(OutputDtype::default(), OutputDtype::F32);
        let err = "bicubic".parse::<FilterType>().unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)));
        assert_eq!(
            err.to_string(),
            r#"filter must be one of "lanczos3", "catmullrom", "bilinear", "box", "nearest", got "bicubic""#
        );
        assert!("float64"
            .parse::<OutputDtype>()
            .unwrap_err()
            .to_string()
            .starts_with("dtype must be one of"));
        assert!("middle"
            .parse::<CropMode>()
            .unwrap_err()
            .to_string()
            .starts_with("crop must be one of"));
    }
}
