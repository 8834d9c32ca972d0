//! Header walks: the format from the magic bytes, then the stored size and (when asked) the EXIF
//! block of a JPEG, PNG or WebP file (BMP, TIFF and GIF headers are walked in `bmp_tiff_gif`, JPEG
//! XL's in `jxl`), over
//! a random-access [`Source`] (a slice, or a file read in small windows so that skipping a large
//! segment costs no reading).
//!
//! Reads only what it needs and never decodes pixels; it must not trust any length it reads (every
//! read is bounds-checked, a short read is a "truncated" [`Error::Decode`]).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::bmp_tiff_gif::{bmp_header, gif_header, tiff_header};
use super::exif::exif_orientation;
use super::jxl::jxl_header;
use super::{Header, ImageFormat};
use crate::error::{Error, Result};

/// The error for bytes that are not an image format we decode: [`Error::Unsupported`] naming the
/// format for images we recognise but do not read (AVIF, HEIF/HEIC, JPEG 2000), else
/// [`Error::Decode`] saying what the bytes start with.
pub(super) fn unknown_format(path: &Path, head: &[u8]) -> Error {
    if head.is_empty() {
        return Error::decode(path, "empty file");
    }
    match unsupported_format(head) {
        Some(name) => Error::unsupported(path, name),
        None => Error::decode(
            path,
            format!(
                "not a JPEG, PNG, WebP, BMP, TIFF, GIF or JPEG XL file (starts with '{}')",
                head[..head.len().min(16)].escape_ascii()
            ),
        ),
    }
}

/// The image format announced by magic bytes we recognise but cannot decode, if any.
pub(super) fn unsupported_format(head: &[u8]) -> Option<&'static str> {
    const JP2_BOX: &[u8] = b"\0\0\0\x0cjP  \r\n\x87\n";
    if head.starts_with(JP2_BOX) || head.starts_with(&[0xFF, 0x4F, 0xFF, 0x51]) {
        return Some("JPEG 2000");
    }
    // ISO-BMFF: a `ftyp` box with the major brand, a minor version, then compatible brands.
    if head.get(4..8) != Some(b"ftyp") {
        return None;
    }
    let box_size = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let box_end = head
        .len()
        .min(usize::try_from(box_size).unwrap_or(usize::MAX));
    let major = head.get(8..12)?;
    let compatible = head.get(16..box_end).unwrap_or(&[]);
    let has = |brands: &[&[u8; 4]]| {
        brands.iter().any(|b| major == &b[..])
            || compatible
                .chunks_exact(4)
                .any(|c| brands.iter().any(|b| c == &b[..]))
    };
    if has(&[b"avif", b"avis"]) {
        Some("AVIF")
    } else if has(&[
        b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1",
    ]) {
        Some("HEIF/HEIC")
    } else {
        None
    }
}

/// Random-access reads for header parsing.
pub(super) trait Source {
    /// Up to `len` bytes starting at `offset`; fewer only at the end of the data.
    fn bytes_at(&mut self, offset: u64, len: usize) -> io::Result<&[u8]>;
}

pub(super) struct SliceSource<'a>(pub(super) &'a [u8]);

impl Source for SliceSource<'_> {
    fn bytes_at(&mut self, offset: u64, len: usize) -> io::Result<&[u8]> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.0.len());
        let end = start.saturating_add(len).min(self.0.len());
        Ok(&self.0[start..end])
    }
}

/// A file read through one window of at least [`FileSource::WINDOW`] bytes, refilled (with a seek)
/// whenever a request falls outside it, so skipping a large segment costs no reading.
pub(super) struct FileSource {
    file: File,
    start: u64,
    window: Vec<u8>,
}

impl FileSource {
    const WINDOW: usize = 16 * 1024;

    pub(super) fn new(file: File) -> Self {
        FileSource {
            file,
            start: 0,
            window: Vec::with_capacity(Self::WINDOW),
        }
    }
}

impl Source for FileSource {
    fn bytes_at(&mut self, offset: u64, len: usize) -> io::Result<&[u8]> {
        let in_window = offset >= self.start
            && offset.saturating_add(len as u64) <= self.start + self.window.len() as u64;
        if !in_window {
            self.window.clear();
            self.start = offset;
            self.file.seek(SeekFrom::Start(offset))?;
            let want = len.max(Self::WINDOW) as u64;
            (&mut self.file).take(want).read_to_end(&mut self.window)?;
        }
        let lo = ((offset - self.start) as usize).min(self.window.len());
        let hi = lo.saturating_add(len).min(self.window.len());
        Ok(&self.window[lo..hi])
    }
}

/// A byte range of a file (a tar shard's member) read with positioned reads (`pread`) through one
/// window of up to [`FileSource::WINDOW`] bytes, never past the range's end: several threads can
/// read members of one shard through the same `File` at once.
pub(super) struct RangeSource<'f> {
    file: &'f File,
    base: u64,
    len: u64,
    start: u64,
    window: Vec<u8>,
}

impl<'f> RangeSource<'f> {
    pub(super) fn new(file: &'f File, base: u64, len: u64) -> Self {
        RangeSource {
            file,
            base,
            len,
            start: 0,
            window: Vec::new(),
        }
    }
}

impl Source for RangeSource<'_> {
    fn bytes_at(&mut self, offset: u64, len: usize) -> io::Result<&[u8]> {
        let in_window = offset >= self.start
            && offset.saturating_add(len as u64) <= self.start + self.window.len() as u64;
        if !in_window {
            self.start = offset.min(self.len);
            let want = (len.max(FileSource::WINDOW) as u64).min(self.len - self.start) as usize;
            self.window.resize(want, 0);
            let mut filled = 0;
            while filled < want {
                match self.file.read_at(
                    &mut self.window[filled..],
                    self.base + self.start + filled as u64,
                ) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            self.window.truncate(filled);
        }
        let lo = ((offset - self.start) as usize).min(self.window.len());
        let hi = lo.saturating_add(len).min(self.window.len());
        Ok(&self.window[lo..hi])
    }
}

/// Exactly `len` bytes at `offset`, or a "truncated" decode error naming `what`.
pub(super) fn need<'s>(
    src: &'s mut impl Source,
    offset: u64,
    len: usize,
    path: &Path,
    what: &str,
) -> Result<&'s [u8]> {
    let bytes = src.bytes_at(offset, len).map_err(|e| Error::io(path, e))?;
    if bytes.len() < len {
        return Err(Error::decode(path, format!("truncated file: {what}")));
    }
    Ok(bytes)
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub(super) fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le24(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], 0])
}

/// Sniff the format and parse its header; `with_orientation = false` skips the EXIF search (the
/// orientation is then reported as 1).
pub(super) fn parse_header(
    src: &mut impl Source,
    path: &Path,
    with_orientation: bool,
) -> Result<Header> {
    let head = src.bytes_at(0, 32).map_err(|e| Error::io(path, e))?;
    let format = ImageFormat::sniff(head).ok_or_else(|| unknown_format(path, head))?;
    let (width, height, orientation) = match format {
        ImageFormat::Jpeg => jpeg_header(src, path, with_orientation)?,
        ImageFormat::Png => png_header(src, path, with_orientation)?,
        ImageFormat::WebP => webp_header(src, path, with_orientation)?,
        ImageFormat::Bmp => bmp_header(src, path)?,
        ImageFormat::Tiff => tiff_header(src, path, with_orientation)?,
        ImageFormat::Gif => gif_header(src, path)?,
        ImageFormat::JpegXl => jxl_header(src, path, with_orientation)?,
    };
    if width == 0 || height == 0 {
        return Err(Error::decode(
            path,
            format!(
                "corrupt {} header: size {width}x{height}",
                format.name().to_uppercase()
            ),
        ));
    }
    Ok(Header {
        format,
        width,
        height,
        orientation,
    })
}

/// Walk JPEG marker segments up to the first SOFn; EXIF orientation from the first `APP1 "Exif"`.
/// Like libjpeg and Pillow, bytes between segments that are not a marker are skipped.
fn jpeg_header(
    src: &mut impl Source,
    path: &Path,
    with_orientation: bool,
) -> Result<(u32, u32, u8)> {
    let mut orientation = None;
    let mut pos: u64 = 2;
    loop {
        let b = need(src, pos, 2, path, "JPEG ends before its SOF marker")?;
        let marker = b[1];
        if b[0] != 0xFF || marker == 0xFF {
            // Junk byte, or a fill byte before the marker.
            pos += 1;
            continue;
        }
        match marker {
            // Standalone markers (TEM, RSTn, a repeated SOI) and stuffed zeros carry no length.
            0x00 | 0x01 | 0xD0..=0xD8 => {
                pos += 2;
                continue;
            }
            0xD9 | 0xDA => {
                return Err(Error::decode(
                    path,
                    "corrupt JPEG: image data starts before any SOF marker",
                ))
            }
            _ => {}
        }
        let len = u64::from(be16(
            &need(src, pos + 2, 2, path, "JPEG marker segment")?[..2],
        ));
        if len < 2 {
            return Err(Error::decode(
                path,
                format!("corrupt JPEG: marker 0xFF{marker:02X} has segment length {len}"),
            ));
        }
        // SOF0..SOF15, except DHT (C4), JPG (C8) and DAC (CC) which share the range.
        if (0xC0..=0xCF).contains(&marker) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            let sof = need(src, pos + 4, 5, path, "JPEG SOF segment")?;
            let (height, width) = (u32::from(be16(&sof[1..])), u32::from(be16(&sof[3..])));
            return Ok((width, height, orientation.unwrap_or(1)));
        }
        if with_orientation && marker == 0xE1 && orientation.is_none() {
            let seg = src
                .bytes_at(pos + 4, len as usize - 2)
                .map_err(|e| Error::io(path, e))?;
            if let Some(tiff) = seg.strip_prefix(b"Exif\0\0") {
                orientation = Some(exif_orientation(tiff));
            }
        }
        pos += 2 + len;
    }
}

/// Walk PNG chunks: size from IHDR, EXIF orientation from an `eXIf` chunk before the first IDAT.
fn png_header(
    src: &mut impl Source,
    path: &Path,
    with_orientation: bool,
) -> Result<(u32, u32, u8)> {
    let head = need(
        src,
        0,
        33,
        path,
        "PNG ends inside its signature or IHDR chunk",
    )?;
    if &head[..8] != b"\x89PNG\r\n\x1a\n" || &head[12..16] != b"IHDR" || be32(&head[8..]) != 13 {
        return Err(Error::decode(
            path,
            "corrupt PNG: bad signature or IHDR chunk",
        ));
    }
    let (width, height) = (be32(&head[16..]), be32(&head[20..]));
    if width > i32::MAX as u32 || height > i32::MAX as u32 {
        return Err(Error::decode(
            path,
            format!("corrupt PNG: size {width}x{height}"),
        ));
    }
    let orientation = if with_orientation {
        png_orientation(src, path)?
    } else {
        1
    };
    Ok((width, height, orientation))
}

/// EXIF orientation from the first `eXIf` chunk before IDAT (1 if none); a truncated chunk list is
/// left for the decoder to report.
fn png_orientation(src: &mut impl Source, path: &Path) -> Result<u8> {
    let mut pos: u64 = 33;
    loop {
        let chunk = src.bytes_at(pos, 8).map_err(|e| Error::io(path, e))?;
        if chunk.len() < 8 || &chunk[4..] == b"IDAT" || &chunk[4..] == b"IEND" {
            return Ok(1);
        }
        let len = be32(chunk);
        if &chunk[4..] == b"eXIf" {
            let data = src
                .bytes_at(pos + 8, len as usize)
                .map_err(|e| Error::io(path, e))?;
            return Ok(exif_orientation(data));
        }
        pos += 12 + u64::from(len);
    }
}

/// WebP size from its first chunk (`VP8 `, `VP8L` or `VP8X` canvas); EXIF orientation from the
/// `EXIF` chunk when the `VP8X` EXIF flag is set.
fn webp_header(
    src: &mut impl Source,
    path: &Path,
    with_orientation: bool,
) -> Result<(u32, u32, u8)> {
    let head = need(src, 0, 30, path, "WebP ends inside its first chunk header")?;
    let riff_end = 8 + u64::from(le32(&head[4..]));
    let fourcc: [u8; 4] = [head[12], head[13], head[14], head[15]];
    let corrupt = |what: &str| Error::decode(path, format!("corrupt WebP: {what}"));
    match &fourcc {
        b"VP8 " => {
            // Frame tag (3 bytes, bit 0 = 0 for key frames), start code 9D 01 2A, 14-bit sizes.
            if head[20] & 1 != 0 || head[23..26] != [0x9D, 0x01, 0x2A] {
                return Err(corrupt("VP8 key frame header not found"));
            }
            let width = u32::from(u16::from_le_bytes([head[26], head[27]]) & 0x3FFF);
            let height = u32::from(u16::from_le_bytes([head[28], head[29]]) & 0x3FFF);
            Ok((width, height, 1))
        }
        b"VP8L" => {
            // Signature 0x2F, then 14 bits width - 1 and 14 bits height - 1.
            if head[20] != 0x2F {
                return Err(corrupt("bad VP8L signature"));
            }
            let bits = le32(&head[21..]);
            Ok(((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, 1))
        }
        b"VP8X" => {
            // Flags (EXIF = 0x08), 3 reserved bytes, 24-bit canvas width - 1 and height - 1.
            let (flags, width, height) = (head[20], le24(&head[24..]) + 1, le24(&head[27..]) + 1);
            let mut orientation = 1;
            let first_len = u64::from(le32(&head[16..]));
            let mut pos: u64 = 20 + first_len + (first_len & 1);
            while with_orientation && flags & 0x08 != 0 && pos + 8 <= riff_end {
                let chunk = src.bytes_at(pos, 8).map_err(|e| Error::io(path, e))?;
                if chunk.len() < 8 {
                    break;
                }
                let len = le32(&chunk[4..]);
                if &chunk[..4] == b"EXIF" {
                    let data = src
                        .bytes_at(pos + 8, len as usize)
                        .map_err(|e| Error::io(path, e))?;
                    orientation = exif_orientation(data);
                    break;
                }
                // Chunk payloads are padded to an even length.
                pos += 8 + u64::from(len) + u64::from(len & 1);
            }
            Ok((width, height, orientation))
        }
        _ => Err(corrupt(&format!(
            "unknown first chunk '{}'",
            fourcc.escape_ascii()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::{probe, probe_bytes};
    use super::*;

    #[test]
    fn jpeg_probe_walks_segments_like_pillow() {
        let base = jpeg(&quadrants(32, 16), 32, 16);
        let xmp = (0xE1, b"http://ns.adobe.com/xap/1.0/\0<x/>".to_vec());
        let icc = (0xE2, vec![7u8; 60_000]);
        // XMP APP1 first is not EXIF; the first Exif APP1 wins; big segments are skipped.
        let file = jpeg_insert(&base, &[xmp, icc.clone(), exif_app1(8), exif_app1(3), icc]);
        let h = probe_bytes(&file, &p()).unwrap();
        assert_eq!((h.width, h.height, h.orientation), (32, 16, 8));
        // Fill bytes before a marker and junk between segments are tolerated.
        let mut padded = base[..2].to_vec();
        padded.extend_from_slice(&[0xFF, 0xFF, 0xFF]);
        padded.extend_from_slice(&base[3..]);
        assert_eq!(probe_bytes(&padded, &p()).unwrap().width, 32);
        // No SOF before SOS.
        let sof = base.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        let mut no_sof = base.clone();
        no_sof[sof + 1] = 0xEF; // turn SOF0 into APP15
        let msg = probe_bytes(&no_sof, &p()).unwrap_err().to_string();
        assert!(msg.contains("before any SOF marker"), "{msg}");
    }

    #[test]
    fn probe_reads_files_in_windows() {
        let dir = tempfile::tempdir().unwrap();
        let base = jpeg(&quadrants(32, 16), 32, 16);
        // EXIF beyond the first 16 KiB window, then SOF after a 60 KB segment.
        let segments = [
            (0xE2, vec![1u8; 40_000]),
            exif_app1(6),
            (0xED, vec![2u8; 60_000]),
        ];
        let file = jpeg_insert(&base, &segments);
        let path = dir.path().join("photo.bin");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&file)
            .unwrap();
        let h = probe(&path).unwrap();
        assert_eq!(
            h,
            Header {
                format: ImageFormat::Jpeg,
                width: 32,
                height: 16,
                orientation: 6
            }
        );
        assert_eq!(h, probe_bytes(&file, &path).unwrap());
        assert_eq!(h.upright_size(), (16, 32));

        let png_path = dir.path().join("a.png");
        std::fs::write(
            &png_path,
            png(&quadrants(4, 2), 4, 2, ExtendedColorType::Rgb8),
        )
        .unwrap();
        assert_eq!(probe(&png_path).unwrap().format, ImageFormat::Png);
        std::fs::write(dir.path().join("empty.jpg"), b"").unwrap();
        assert!(matches!(
            probe(&dir.path().join("empty.jpg")),
            Err(Error::Decode { .. })
        ));
        assert!(matches!(
            probe(&dir.path().join("missing.jpg")),
            Err(Error::Io { .. })
        ));
    }
}
