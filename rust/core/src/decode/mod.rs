//! Image headers and decoding: JPEG (libjpeg-turbo through `turbojpeg`), PNG, WebP, BMP, TIFF and
//! GIF (the `image` crate's pure-Rust decoders) and JPEG XL (jxl-oxide, pure Rust), always to
//! upright 8-bit RGB. AVIF, HEIF/HEIC and JPEG 2000 are recognised by their magic bytes and refused
//! as [`Error::Unsupported`].
//!
//! * [`probe`] / [`probe_bytes`] read only the header: format (by magic bytes, never by extension),
//!   stored size in pixels and EXIF orientation. No pixel data is decoded.
//! * [`Decoder::decode`] decodes to [`RgbImage`] (RGB8, row-major, interleaved), with JPEG DCT-domain
//!   downscaling (libjpeg-turbo scaling factors 1/8, 1/4, 1/2), alpha composited onto a background,
//!   and the EXIF orientation applied exactly like Pillow's `ImageOps.exif_transpose`.
//!
//! Conversions follow Pillow's `Image.open(f).convert("RGB")` where Pillow defines one: grayscale is
//! replicated into R = G = B; CMYK JPEGs are read with Adobe (inverted) polarity, as Pillow always
//! assumes, and converted with Pillow's `cmyk2rgb`. Where Pillow would be lossy or surprising we
//! document our own rule instead: alpha is composited onto [`DecodeOptions::background`] (Pillow
//! drops it), and 16-bit samples are rounded to 8 bits (Pillow truncates or clips).
//!
//! The files, in the order a decode passes through them: this one (the types, the size guard and
//! the dispatch on the sniffed format); `header` (magic bytes and the header walks of each format,
//! reading as little of the file as it can); `exif` (the orientation tag and what it means);
//! `jpeg` (libjpeg-turbo, DCT scaling), `png_webp` or `bmp_tiff_gif` (the `image` crate, which
//! also walks BMP, TIFF and GIF headers), `jxl` (jxl-oxide, and the JPEG XL header and `Exif` box
//! walk); `pixels` (conversion to
//! RGB8, alpha compositing, CMYK, and the orientation pass).
//!
//! Nothing here knows about buckets, batches or threads, and nothing trusts a file: every size is
//! checked against [`DecodeOptions::max_pixels`] before a pixel buffer is allocated, and bad input
//! is an [`Error`], never a panic.

mod bmp_tiff_gif;
mod exif;
mod header;
mod jpeg;
mod jxl;
mod pixels;
mod png_webp;
#[cfg(test)]
mod testkit;

use std::fs::File;
use std::path::Path;

use turbojpeg::Decompressor;

use crate::error::{Error, Result};
use bmp_tiff_gif::decode_bmp_tiff_gif;
use exif::transposes;
use header::{parse_header, unknown_format, FileSource, RangeSource, SliceSource};
use jpeg::{decompressor_error, new_decompressor};
use jxl::{decode_jxl, CONTAINER_SIGNATURE};
use pixels::{apply_orientation, undo_orientation};
use png_webp::decode_png_webp;

/// The image formats fastdiff reads, identified by their magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ImageFormat {
    /// JPEG / JFIF (`FF D8 FF`).
    Jpeg,
    /// PNG, including APNG (`89 50 4E 47 0D 0A 1A 0A`).
    Png,
    /// WebP, lossy, lossless or extended/animated (`RIFF....WEBP`).
    WebP,
    /// BMP / DIB (`BM`).
    Bmp,
    /// TIFF, little- or big-endian (`II*\0`, `MM\0*`); the first page is read.
    Tiff,
    /// GIF, 87a or 89a (`GIF87a`, `GIF89a`); the first frame is read.
    Gif,
    /// JPEG XL, a bare codestream (`FF 0A`) or in its ISO BMFF container (`....JXL \r\n\x87\n`);
    /// the first frame is read.
    JpegXl,
}

impl ImageFormat {
    /// Lower-case name used in reports: `"jpeg"`, `"png"`, `"webp"`, `"bmp"`, `"tiff"`, `"gif"` or
    /// `"jxl"`.
    pub fn name(&self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Png => "png",
            ImageFormat::WebP => "webp",
            ImageFormat::Bmp => "bmp",
            ImageFormat::Tiff => "tiff",
            ImageFormat::Gif => "gif",
            ImageFormat::JpegXl => "jxl",
        }
    }

    /// The format of a report name ([`ImageFormat::name`]), if it is one.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            ImageFormat::Jpeg,
            ImageFormat::Png,
            ImageFormat::WebP,
            ImageFormat::Bmp,
            ImageFormat::Tiff,
            ImageFormat::Gif,
            ImageFormat::JpegXl,
        ]
        .into_iter()
        .find(|f| f.name() == name)
    }

    /// The format announced by the first bytes of a file, if it is one we read.
    fn sniff(head: &[u8]) -> Option<Self> {
        if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(ImageFormat::Jpeg)
        } else if head.starts_with(&[0x89, b'P', b'N', b'G']) {
            Some(ImageFormat::Png)
        } else if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP" {
            Some(ImageFormat::WebP)
        } else if head.starts_with(b"BM") {
            Some(ImageFormat::Bmp)
        } else if head.starts_with(b"II*\0") || head.starts_with(b"MM\0*") {
            Some(ImageFormat::Tiff)
        } else if head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a") {
            Some(ImageFormat::Gif)
        } else if head.starts_with(&[0xFF, 0x0A]) || head.starts_with(CONTAINER_SIGNATURE) {
            Some(ImageFormat::JpegXl)
        } else {
            None
        }
    }
}

/// Whether `head`, a file's first bytes (32 when it has them), announces an image: a format we read
/// (for BMP, whose `BM` may just as well start a text, the DIB header size must also be one of
/// BMP's: 12, 16, 40, 52, 56, 64, 108 or 124) or one we recognise and skip as unsupported (AVIF,
/// HEIF/HEIC, JPEG 2000). The scan uses it to find images whatever their extension.
pub fn is_image_magic(head: &[u8]) -> bool {
    match ImageFormat::sniff(head) {
        Some(ImageFormat::Bmp) => head.get(14..18).is_some_and(|b| {
            let dib = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            matches!(dib, 12 | 16 | 40 | 52 | 56 | 64 | 108 | 124)
        }),
        Some(_) => true,
        None => header::unsupported_format(head).is_some(),
    }
}

/// What [`probe`] learns from a file without decoding pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// Format, from the magic bytes.
    pub format: ImageFormat,
    /// Stored width in pixels (before the EXIF orientation is applied); always > 0.
    pub width: u32,
    /// Stored height in pixels (before the EXIF orientation is applied); always > 0.
    pub height: u32,
    /// EXIF orientation tag (0x0112) from IFD0, 1..=8; 1 when absent or invalid (as Pillow's
    /// `exif_transpose` does nothing for such values).
    pub orientation: u8,
}

impl Header {
    /// (width, height) in pixels once the orientation is applied: swapped for orientations 5..=8
    /// (those that transpose), unchanged otherwise.
    pub fn upright_size(&self) -> (u32, u32) {
        if transposes(self.orientation) {
            (self.height, self.width)
        } else {
            (self.width, self.height)
        }
    }
}

/// A decoded image: 8-bit RGB, upright (orientation applied), row-major, interleaved `RGBRGB...`,
/// no row padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 3` bytes, 0..=255 per channel.
    pub data: Vec<u8>,
}

/// Knobs of [`Decoder::decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// RGB colour that transparent pixels are composited onto (`out = (c*a + bg*(255-a) + 127) / 255`
    /// with 8-bit alpha `a`). Default white `[255, 255, 255]`.
    pub background: [u8; 3],
    /// Decompression-bomb guard: images whose stored `width * height` exceeds this many pixels fail
    /// with [`Error::TooLarge`] before any pixel buffer is allocated. Default 178_956_970, Pillow's
    /// `Image.MAX_IMAGE_PIXELS` (the size at which Pillow raises `DecompressionBombError`).
    pub max_pixels: u64,
    /// Decode the alpha channel instead of the colour: each pixel's 8-bit alpha (rounded from 16
    /// bits like the colour samples) replicated to R, G and B, 255 for an image without alpha (every
    /// JPEG). Orientation and DCT scaling apply as for colour. Default false.
    pub alpha_plane: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            background: [255, 255, 255],
            max_pixels: 178_956_970,
            alpha_plane: false,
        }
    }
}

impl DecodeOptions {
    /// What [`pixels::to_rgb8`] does with alpha under these options.
    fn alpha(&self) -> pixels::Alpha {
        if self.alpha_plane {
            pixels::Alpha::Plane
        } else {
            pixels::Alpha::Over(self.background)
        }
    }
}

/// Read the header of the image file at `path`: format (magic bytes), stored size in pixels and EXIF
/// orientation. Reads only the start of the file in 16 KiB windows, seeking over segments it does
/// not need: up to the SOF marker for JPEG (EXIF is the first `APP1 "Exif"` segment, as in Pillow),
/// up to the first `IDAT` for PNG (EXIF from an `eXIf` chunk placed before it), and for WebP the
/// first chunk plus, when the `VP8X` EXIF flag is set, the chunk headers up to `EXIF`; for BMP the
/// file and DIB headers, for GIF the screen descriptor, for TIFF the 8-byte header and the
/// entries of the first IFD (size, and the orientation tag 274), and for JPEG XL the codestream up
/// to the end of its image header plus, in a container whose codestream says orientation 1, the box
/// headers up to an `Exif` box (the codestream's orientation wins, as the format defines; the `Exif`
/// one is used when the codestream's is 1, as Pillow does).
///
/// Errors: [`Error::Io`] if the file cannot be opened or read; [`Error::Unsupported`] for an AVIF,
/// HEIF/HEIC or JPEG 2000 file (the message names the format); [`Error::Decode`] if it is
/// empty, not an image we know (the message says what it starts with), or its header is truncated
/// or corrupt. The size limit is not checked here (see [`DecodeOptions::max_pixels`]).
pub fn probe(path: &Path) -> Result<Header> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    parse_header(&mut FileSource::new(file), path, true)
}

/// [`probe`] for a file already in memory; `path` is only used in error messages.
pub fn probe_bytes(bytes: &[u8], path: &Path) -> Result<Header> {
    parse_header(&mut SliceSource(bytes), path, true)
}

/// [`probe`] for the `len` bytes at `offset` of `file` (a tar shard's member), read with
/// positioned reads in 16 KiB windows that never pass the range's end (a header running past it is
/// a "truncated" [`Error::Decode`]); `path` is only used in error messages.
pub fn probe_range(file: &File, offset: u64, len: u64, path: &Path) -> Result<Header> {
    parse_header(&mut RangeSource::new(file, offset, len), path, true)
}

/// Per-thread image decoder. Owns a libjpeg-turbo decompressor handle, so it is `Send` but not
/// `Sync`: create one per worker thread and reuse it for every image.
#[derive(Debug)]
pub struct Decoder {
    /// `None` after a libjpeg-turbo error, recreated on the next JPEG: a handle whose header read
    /// failed keeps its half-parsed marker state, and the next file then fails with errors such
    /// as "Bogus DQT index".
    jpeg: Option<Decompressor>,
}

impl Decoder {
    /// A decoder with a fresh libjpeg-turbo handle (scan limit 500).
    ///
    /// Errors: [`Error::Resource`] if libjpeg-turbo cannot allocate its handle.
    pub fn new() -> Result<Self> {
        let jpeg = new_decompressor().map_err(decompressor_error)?;
        Ok(Decoder { jpeg: Some(jpeg) })
    }

    /// Decode `bytes` (format sniffed by magic bytes, not by `path`) to upright RGB8.
    ///
    /// * `path`: only used in error messages.
    /// * `orientation`: EXIF orientation to apply (pass the scan's [`Header::orientation`]); 2..=8
    ///   are applied exactly like Pillow's `ImageOps.exif_transpose` (2 flip left-right,
    ///   3 rotate 180°, 4 flip top-bottom, 5 transpose, 6 rotate 90° clockwise, 7 transverse,
    ///   8 rotate 90° counter-clockwise) in one pass over the decoded (possibly downscaled) pixels;
    ///   any other value leaves the image as stored.
    /// * `cover`: (width, height) in UPRIGHT pixels that the output must still cover. For JPEG the
    ///   smallest libjpeg-turbo scaling factor among 1/8, 1/4, 1/2 (else 1) whose scaled upright
    ///   size is >= `cover` in both dimensions is used; the scaled size is `ceil(dim * num / denom)`
    ///   (libjpeg-turbo's `TJSCALED`). `(0, 0)` means full size. The other formats always decode
    ///   at full size.
    ///
    /// Pixel conversions: grayscale is replicated to RGB; alpha (RGBA, LA, palette + tRNS, WebP
    /// alpha) is composited onto `opts.background`, so fully transparent pixels come out exactly as
    /// the background; 16-bit PNG and TIFF samples become 8-bit by rounding,
    /// `(v * 255 + 32767) / 65535`; CMYK/YCCK JPEGs are read as Adobe-inverted CMYK and converted
    /// like Pillow's `convert("RGB")`; CMYK TIFFs are converted by the `image` crate
    /// (`(255 - c) * (255 - k) / 255`, truncated; about half a level from Pillow's on average). Animated WebP and APNG give their first frame (APNG: the
    /// default image), animated GIF its first frame drawn on the logical screen, with the GIF's
    /// transparent colour composited like alpha; multi-page TIFF its first page. JPEG XL (jxl-oxide,
    /// one thread) gives its first frame, gray or RGB, with or without alpha, 8 or 16 bits (deeper
    /// samples are rendered at 16 bits and rounded like PNG's), upright by the codestream's
    /// orientation, then turned to `orientation` if that differs (an `Exif` box's, see [`probe`]).
    ///
    /// Errors: [`Error::TooLarge`] if the stored `width * height` exceeds `opts.max_pixels`, before
    /// any pixel buffer is allocated; [`Error::Unsupported`] for AVIF, HEIF/HEIC, JPEG 2000,
    /// CMYK JPEG XL, and the variants the `image` crate cannot read (such as float or
    /// JPEG-compressed TIFFs);
    /// [`Error::Decode`] for empty, unknown, corrupt or truncated
    /// data, with a message saying what was wrong (libjpeg-turbo warnings such as "Premature end of
    /// JPEG file" count as failures). Never panics on bad input.
    pub fn decode(
        &mut self,
        bytes: &[u8],
        path: &Path,
        orientation: u8,
        cover: (u32, u32),
        opts: &DecodeOptions,
    ) -> Result<RgbImage> {
        let format = ImageFormat::sniff(bytes).ok_or_else(|| unknown_format(path, bytes))?;
        let img = match format {
            ImageFormat::Jpeg => {
                let mut img = self.decode_jpeg(bytes, path, orientation, cover, opts)?;
                if opts.alpha_plane {
                    img.data.fill(255);
                }
                img
            }
            ImageFormat::Png | ImageFormat::WebP => decode_png_webp(bytes, path, format, opts)?,
            ImageFormat::Bmp | ImageFormat::Tiff | ImageFormat::Gif => {
                decode_bmp_tiff_gif(bytes, path, format, opts)?
            }
            ImageFormat::JpegXl => {
                let (upright, own) = decode_jxl(bytes, path, opts)?;
                if own == orientation {
                    return Ok(upright);
                }
                undo_orientation(upright, own)
            }
        };
        Ok(apply_orientation(img, orientation))
    }
}

pub(super) fn check_pixels(path: &Path, width: u32, height: u32, max_pixels: u64) -> Result<()> {
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
            width,
            height,
            limit: max_pixels,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::testkit::*;
    use super::*;
    use image::ExtendedColorType;

    #[test]
    fn empty_html_and_foreign_formats_are_decode_errors() {
        assert!(decode_err(b"").ends_with("empty file"));
        let html = decode_err(b"<html><body>404</body></html>");
        assert!(
            html.contains(
                "not a JPEG, PNG, WebP, BMP, TIFF, GIF or JPEG XL file (starts with '<html><body>404<')"
            ),
            "{html}"
        );
        assert!(html.contains("test/img"), "{html}");
        assert!(decode_err(b"\x00\x01\x02").contains(r"starts with '\x00\x01\x02'"));
        // GIF is read since issue 14: a screen descriptor without any image data is corrupt.
        assert!(decode_err(b"GIF89a\x01\x00\x01\x00").contains("corrupt GIF"));
        // AVIF and HEIF are recognised and refused by name (not a `decode` failure since issue 14).
        for (bytes, name) in [
            (&b"\0\0\0\x1cftypavif\0\0\0\0"[..], "AVIF"),
            (b"\0\0\0\x18ftypheic\0\0\0\0", "HEIF"),
        ] {
            let err = decode(bytes).unwrap_err();
            assert!(matches!(err, Error::Unsupported { .. }), "{err}");
            assert!(err.to_string().contains(name), "{err}");
        }
        for bytes in [&b""[..], b"<html>", b"BM\0\0\0\0"] {
            assert!(matches!(
                probe_bytes(bytes, &p()),
                Err(Error::Decode { .. })
            ));
        }
    }

    #[test]
    fn image_magic_finds_images_not_texts() {
        let png_bytes = png(&quadrants(4, 2), 4, 2, ExtendedColorType::Rgb8);
        assert!(is_image_magic(&png_bytes[..32]));
        assert!(is_image_magic(&jpeg(&quadrants(8, 8), 8, 8)[..32]));
        assert!(is_image_magic(b"\xff\x0a\xfa\x7f\x01\x90\x08"));
        assert!(is_image_magic(b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf"));
        // A BMP needs a DIB header size BMP defines; text starting with "BM" has none.
        let mut bmp = b"BM\0\0\0\0\0\0\0\0\0\0\0\0".to_vec();
        bmp.extend_from_slice(&40u32.to_le_bytes());
        assert!(is_image_magic(&bmp));
        for text in [
            &b"BMW on a road, sunny"[..],
            b"BM",
            b"",
            b"<html>",
            b"\0\0\0\x18ftypisom",
        ] {
            assert!(!is_image_magic(text), "{}", text.escape_ascii());
        }
    }

    #[test]
    fn magic_bytes_decide_not_the_extension() {
        let png_bytes = png(&quadrants(4, 2), 4, 2, ExtendedColorType::Rgb8);
        let h = probe_bytes(&png_bytes, Path::new("photo.jpg")).unwrap();
        assert_eq!((h.format, h.width, h.height), (ImageFormat::Png, 4, 2));
        assert_eq!(ImageFormat::Png.name(), "png");
        assert_eq!(ImageFormat::Jpeg.name(), "jpeg");
        assert_eq!(ImageFormat::WebP.name(), "webp");
    }

    #[test]
    fn truncated_files_fail_cleanly_at_every_length() {
        let q = quadrants(48, 32);
        let mut progressive = jpeg_with(&q, 48, 32, PixelFormat::RGB, |c| {
            c.set_progressive(true).unwrap()
        });
        progressive = jpeg_insert(&progressive, &[exif_app1(6)]);
        // (file, bytes at the end whose loss still leaves every pixel readable: PNG's IEND chunk,
        // which Pillow does not require either).
        let files = [
            (jpeg(&q, 48, 32), 0),
            (progressive, 0),
            (png(&q, 48, 32, ExtendedColorType::Rgb8), 12),
            (webp(&q, 48, 32, ExtendedColorType::Rgb8), 0),
        ];
        let mut decoder = Decoder::new().unwrap();
        let opts = DecodeOptions::default();
        for (file, optional_tail) in &files {
            let full = decoder.decode(file, &p(), 1, (0, 0), &opts).unwrap();
            for len in (0..file.len() - 1)
                .step_by(7)
                .chain([file.len() / 2, file.len() - 2])
            {
                let cut = &file[..len];
                match decoder.decode(cut, &p(), 1, (0, 0), &opts) {
                    Err(Error::Decode { .. }) => {}
                    Ok(img) if len >= file.len() - optional_tail => assert_eq!(img, full),
                    Err(e) => panic!("truncated at {len}/{}: {e}", file.len()),
                    Ok(_) => panic!("truncated at {len}/{} decoded", file.len()),
                }
                // The same decoder still decodes good files after the failure.
                assert_eq!(decoder.decode(file, &p(), 1, (0, 0), &opts).unwrap(), full);
                // Probing only the header may succeed on a cut file, but must not panic.
                let _ = probe_bytes(cut, &p());
            }
        }
    }

    #[test]
    fn decoder_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Decoder>();
        assert_send::<RgbImage>();
    }
}
