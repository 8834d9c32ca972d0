//! Caption files: the text that goes with an image (`photo.jpg` → `photo.txt`), decoded robustly.
//!
//! Captions come from many tools and editors, so the reader accepts what they produce: UTF-8 with or
//! without a byte-order mark, UTF-16 (little or big endian, recognised by its BOM), Windows line ends,
//! and — for files that are not valid UTF-8 — the Windows-1252 code page most legacy Windows tools
//! write (where byte 0x92 is the typographic apostrophe `’`). Falling back is flagged so the report can
//! count captions whose encoding was guessed.

use std::path::Path;

use encoding_rs::{Encoding, UTF_16BE, UTF_16LE, WINDOWS_1252};

use crate::error::{Error, Result};

/// A decoded caption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caption {
    /// The caption text: line ends normalised to `"\n"`, surrounding whitespace trimmed, inner lines kept.
    /// Empty for an empty (or whitespace-only) file.
    pub text: String,
    /// True when the bytes were not valid in the encoding they declared or were assumed to have: either
    /// invalid UTF-8 decoded as Windows-1252 instead, or malformed UTF-16 whose bad code units became
    /// U+FFFD. The text is still usable; the report counts these files so a user can fix them.
    pub fallback_encoding: bool,
}

const UTF8_BOM: &[u8] = &[0xEF, 0xBB, 0xBF];
const UTF16LE_BOM: &[u8] = &[0xFF, 0xFE];
const UTF16BE_BOM: &[u8] = &[0xFE, 0xFF];

/// Read and decode the caption file at `path`.
///
/// Decoding: a UTF-8 BOM is stripped; a UTF-16 LE/BE BOM selects UTF-16 (the BOM is dropped); anything
/// else is UTF-8, and if that is invalid the whole file is decoded as Windows-1252 (WHATWG mapping, via
/// `encoding_rs`; it maps every byte, so it cannot fail) with [`Caption::fallback_encoding`] set. Then
/// `"\r\n"` and lone `"\r"` become `"\n"` and leading/trailing Unicode whitespace is trimmed.
///
/// Errors: [`Error::Io`] naming `path` when the file cannot be read (including when it does not exist).
pub fn read_caption(path: &Path) -> Result<Caption> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(decode_caption(&bytes))
}

/// Decode caption bytes as described on [`read_caption`].
pub fn decode_caption(bytes: &[u8]) -> Caption {
    let (text, fallback_encoding) = if let Some(rest) = bytes.strip_prefix(UTF16LE_BOM) {
        decode_strict(UTF_16LE, rest)
    } else if let Some(rest) = bytes.strip_prefix(UTF16BE_BOM) {
        decode_strict(UTF_16BE, rest)
    } else {
        let body = bytes.strip_prefix(UTF8_BOM).unwrap_or(bytes);
        match std::str::from_utf8(body) {
            Ok(s) => (s.to_owned(), false),
            // Windows-1252 defines all 256 byte values, so this never loses bytes.
            Err(_) => (
                WINDOWS_1252
                    .decode_without_bom_handling(body)
                    .0
                    .into_owned(),
                true,
            ),
        }
    };
    Caption {
        text: normalise(&text),
        fallback_encoding,
    }
}

/// Decode without BOM sniffing (the caller already consumed it); report whether replacements happened.
fn decode_strict(encoding: &'static Encoding, bytes: &[u8]) -> (String, bool) {
    let (text, had_errors) = encoding.decode_without_bom_handling(bytes);
    (text.into_owned(), had_errors)
}

fn normalise(text: &str) -> String {
    text.replace("\r\n", "\n")
        .replace('\r', "\n")
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utf16(s: &str, big_endian: bool) -> Vec<u8> {
        let mut out = if big_endian {
            UTF16BE_BOM.to_vec()
        } else {
            UTF16LE_BOM.to_vec()
        };
        for unit in s.encode_utf16() {
            let b = if big_endian {
                unit.to_be_bytes()
            } else {
                unit.to_le_bytes()
            };
            out.extend_from_slice(&b);
        }
        out
    }

    #[test]
    fn plain_utf8_is_trimmed() {
        let c = decode_caption("  a cat, sitting\n\n".as_bytes());
        assert_eq!(c.text, "a cat, sitting");
        assert!(!c.fallback_encoding);
    }

    #[test]
    fn utf8_bom_is_stripped() {
        let c = decode_caption(b"\xEF\xBB\xBFcaf\xC3\xA9");
        assert_eq!(c.text, "café");
        assert!(!c.fallback_encoding);
    }

    #[test]
    fn utf16_le_and_be_by_bom() {
        for be in [false, true] {
            let c = decode_caption(&utf16("naïve 🐱\r\nline two", be));
            assert_eq!(c.text, "naïve 🐱\nline two", "big endian: {be}");
            assert!(!c.fallback_encoding);
        }
    }

    #[test]
    fn malformed_utf16_is_flagged() {
        // A lone high surrogate (0xD800) cannot be decoded.
        let mut bytes = UTF16LE_BOM.to_vec();
        bytes.extend_from_slice(&[b'a', 0, 0x00, 0xD8, b'b', 0]);
        let c = decode_caption(&bytes);
        assert_eq!(c.text, "a\u{FFFD}b");
        assert!(c.fallback_encoding);
    }

    #[test]
    fn crlf_and_cr_become_lf_and_lines_are_kept() {
        let c = decode_caption(b"first\r\nsecond\rthird\n\nfifth\r\n");
        assert_eq!(c.text, "first\nsecond\nthird\n\nfifth");
    }

    #[test]
    fn invalid_utf8_falls_back_to_windows_1252() {
        // "it’s" as written by a Windows-1252 editor: 0x92 is the right single quotation mark.
        let c = decode_caption(b"it\x92s \x93quoted\x94 \x80");
        assert_eq!(c.text, "it\u{2019}s \u{201C}quoted\u{201D} \u{20AC}");
        assert!(c.fallback_encoding);
    }

    #[test]
    fn empty_and_whitespace_only_files_give_empty_text() {
        for bytes in [&b""[..], b" \r\n\t ", b"\xEF\xBB\xBF", b"\xFF\xFE"] {
            let c = decode_caption(bytes);
            assert_eq!(c.text, "", "{bytes:?}");
            assert!(!c.fallback_encoding);
        }
    }

    #[test]
    fn read_caption_reads_files_and_names_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, b"\xEF\xBB\xBFhello\r\nworld\r\n").unwrap();
        let c = read_caption(&p).unwrap();
        assert_eq!(c.text, "hello\nworld");

        let missing = dir.path().join("missing.txt");
        let err = read_caption(&missing).unwrap_err();
        assert_eq!(err.code(), "io");
        assert_eq!(err.path(), Some(missing.as_path()));
        assert!(err.to_string().contains("missing.txt"), "{err}");
    }
}
