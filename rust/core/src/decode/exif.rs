//! EXIF orientation: the tag (0x0112) read from a TIFF-structured EXIF block, and which of its
//! eight values swap width and height.
//!
//! Finding the EXIF block inside a file is `header`'s job and applying the orientation is `pixels`';
//! this file only interprets bytes already in memory and must never fail: anything malformed means
//! orientation 1, as for Pillow's `exif_transpose`.

/// Whether EXIF `orientation` swaps width and height (5 transpose, 6 rotate 90° clockwise,
/// 7 transverse, 8 rotate 90° counter-clockwise).
pub(super) fn transposes(orientation: u8) -> bool {
    (5..=8).contains(&orientation)
}

/// The orientation tag (0x0112) of IFD0 in a TIFF-structured EXIF block (an optional `Exif\0\0`
/// prefix, as some WebP/PNG writers add and Pillow accepts, is skipped). Returns 1 when the block,
/// the tag or its value (not a single integer in 1..=8) is missing or malformed, which is when
/// Pillow's `exif_transpose` leaves the image alone.
pub(super) fn exif_orientation(exif: &[u8]) -> u8 {
    let tiff = exif.strip_prefix(b"Exif\0\0").unwrap_or(exif);
    let little = match tiff.get(..2) {
        Some(b"II") => true,
        Some(b"MM") => false,
        _ => return 1,
    };
    let u16_at = |off: usize| -> Option<u16> {
        let b = tiff.get(off..off.checked_add(2)?)?;
        Some(if little {
            u16::from_le_bytes([b[0], b[1]])
        } else {
            u16::from_be_bytes([b[0], b[1]])
        })
    };
    let u32_at = |off: usize| -> Option<u32> {
        let b = tiff.get(off..off.checked_add(4)?)?;
        let b = [b[0], b[1], b[2], b[3]];
        Some(if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    let find = || -> Option<u8> {
        if u16_at(2)? != 42 {
            return None;
        }
        let ifd = u32_at(4)? as usize;
        let count = usize::from(u16_at(ifd)?);
        for i in 0..count {
            let entry = ifd.checked_add(2 + 12 * i)?;
            if u16_at(entry)? != 0x0112 {
                continue;
            }
            if u32_at(entry + 4)? != 1 {
                return None;
            }
            let value = match u16_at(entry + 2)? {
                1 | 6 => u32::from(*tiff.get(entry + 8)?), // BYTE, SBYTE
                3 | 8 => u32::from(u16_at(entry + 8)?),    // SHORT, SSHORT
                4 | 9 => u32_at(entry + 8)?,               // LONG, SLONG
                _ => return None,
            };
            return u8::try_from(value).ok().filter(|v| (1..=8).contains(v));
        }
        None
    };
    find().unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::*;

    #[test]
    fn exif_orientation_parsing() {
        for big in [false, true] {
            for o in 1..=8 {
                assert_eq!(exif_orientation(&tiff(o, big, 3)), o as u8);
                assert_eq!(exif_orientation(&tiff(o, big, 4)), o as u8);
            }
            for bad in [0, 9, 300] {
                assert_eq!(exif_orientation(&tiff(bad, big, 3)), 1);
            }
        }
        let mut prefixed = b"Exif\0\0".to_vec();
        prefixed.extend(tiff(6, false, 3));
        assert_eq!(exif_orientation(&prefixed), 6);
        // Garbage, truncation and an IFD offset pointing outside the block.
        let whole = tiff(6, true, 3);
        for len in 0..whole.len() {
            assert!(exif_orientation(&whole[..len]) == 1 || len >= 32);
        }
        let mut far = whole.clone();
        far[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(exif_orientation(&far), 1);
        assert_eq!(exif_orientation(b"XX*\0\0\0\0\x08"), 1);
    }
}
