//! Caption files: the text that goes with an image (`photo.jpg` → `photo.txt`), decoded robustly.
//!
//! Captions come from many tools and editors, so the reader accepts what they produce: UTF-8 with or
//! without a byte-order mark, UTF-16 (little or big endian, recognised by its BOM), Windows line ends,
//! and — for files that are not valid UTF-8 — the Windows-1252 code page most legacy Windows tools
//! write (where byte 0x92 is the typographic apostrophe `’`). Falling back is flagged so the report can
//! count captions whose encoding was guessed.
//!
//! Reads and transforms text only; it must not fail a sample over a caption it can decode some way,
//! and its random operations are keyed by [`crate::rng`] like every other choice.

use std::path::Path;

use encoding_rs::{Encoding, UTF_16BE, UTF_16LE, WINDOWS_1252};

use crate::error::{Error, Result};
use crate::rng::{self, SplitMix64, Stream};

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

/// Per-subset caption handling while loading (kohya-ss sd-scripts semantics). The default changes
/// nothing: the caption is used as read.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionOptions {
    /// Each non-empty line of the caption is one variant; one is picked per (epoch, sample).
    pub caption_per_line: bool,
    /// Probability in `[0, 1]` that a sample's whole caption becomes `""` (classifier-free guidance).
    pub caption_dropout_rate: f64,
    /// Tags (the caption split at `separator`, trimmed) at the start that never move or drop out.
    pub keep_tokens: usize,
    /// Shuffle the tags after the first `keep_tokens`.
    pub shuffle_caption: bool,
    /// Probability in `[0, 1]` that each tag after the first `keep_tokens` is left out.
    pub caption_tag_dropout_rate: f64,
    /// What separates tags (non-empty). Default `","`; tags are re-joined with it plus a space.
    pub separator: String,
}

impl Default for CaptionOptions {
    fn default() -> Self {
        CaptionOptions {
            caption_per_line: false,
            caption_dropout_rate: 0.0,
            keep_tokens: 0,
            shuffle_caption: false,
            caption_tag_dropout_rate: 0.0,
            separator: ",".into(),
        }
    }
}

impl CaptionOptions {
    /// Errors: [`Error::InvalidArgument`] naming `caption_dropout_rate` or
    /// `caption_tag_dropout_rate` outside `[0, 1]` (or NaN), or an empty `caption_separator`.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("caption_dropout_rate", self.caption_dropout_rate),
            ("caption_tag_dropout_rate", self.caption_tag_dropout_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::InvalidArgument(format!(
                    "{name} must be in [0, 1], got {v}"
                )));
            }
        }
        if self.separator.is_empty() {
            return Err(Error::InvalidArgument(
                "caption_separator must not be empty".into(),
            ));
        }
        Ok(())
    }

    /// Whether [`CaptionOptions::apply`] can change a caption at all.
    fn is_identity(&self) -> bool {
        *self == CaptionOptions::default()
    }

    /// The caption sample `sample` gets in `epoch`: a pure function of its arguments;
    /// [`CaptionOptions::apply_keyed`] with both keys `(epoch, sample)`.
    pub fn apply(&self, text: &str, seed: u64, epoch: u64, sample: u64) -> String {
        self.apply_keyed(text, seed, (epoch, sample), (epoch, sample))
    }

    /// The caption after every operation, its random draws keyed by `(seed, ops.0, stream,
    /// ops.1)` for the variant choice and the tags and by `(seed, dropout.0, stream, dropout.1)`
    /// for the whole-caption dropout (the loader passes `(epoch, sample)` for both, or with
    /// `text_variants` `(variant, image)` for `ops`).
    ///
    /// In order: pick a variant (one line, uniformly, [`Stream::CaptionChoice`]) if
    /// `caption_per_line`; drop the whole caption with probability `caption_dropout_rate`
    /// ([`Stream::CaptionDropout`]); then, if `shuffle_caption` or `caption_tag_dropout_rate > 0`,
    /// split into tags at `separator`, keep the first `keep_tokens` in place, shuffle the others
    /// and drop each of them with probability `caption_tag_dropout_rate` (one [`SplitMix64`] keyed
    /// [`Stream::Tags`]), and join with `separator` + `" "`. Empty tags are removed.
    pub fn apply_keyed(
        &self,
        text: &str,
        seed: u64,
        ops: (u64, u64),
        dropout: (u64, u64),
    ) -> String {
        if self.is_identity() {
            return text.to_owned();
        }
        if self.caption_dropout_rate > 0.0
            && rng::uniform(seed, dropout.0, Stream::CaptionDropout, dropout.1)
                < self.caption_dropout_rate
        {
            return String::new();
        }
        self.variant(text, seed, ops)
    }

    /// Whether any operation but the whole-caption dropout can change a caption (a variant choice,
    /// a tag shuffle or tag dropout): the operations `text_variants` precomputes.
    pub fn has_variants(&self) -> bool {
        self.caption_per_line || self.shuffle_caption || self.caption_tag_dropout_rate > 0.0
    }

    /// The caption after the variant choice and the tag operations, without the whole-caption
    /// dropout, their draws keyed by `(seed, ops.0, stream, ops.1)` (see
    /// [`CaptionOptions::apply_keyed`], which equals this whenever the caption is not dropped).
    pub fn variant(&self, text: &str, seed: u64, ops: (u64, u64)) -> String {
        let mut caption = text;
        if self.caption_per_line {
            let lines: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            if !lines.is_empty() {
                let u = rng::uniform(seed, ops.0, Stream::CaptionChoice, ops.1);
                caption = lines[((u * lines.len() as f64) as usize).min(lines.len() - 1)];
            }
        }
        if !self.shuffle_caption && self.caption_tag_dropout_rate == 0.0 {
            return caption.to_owned();
        }
        let tags: Vec<&str> = caption
            .split(self.separator.as_str())
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        let keep = self.keep_tokens.min(tags.len());
        let (fixed, rest) = tags.split_at(keep);
        let mut rest = rest.to_vec();
        let mut g = SplitMix64::new(seed, ops.0, Stream::Tags, ops.1);
        if self.shuffle_caption {
            g.shuffle(&mut rest);
        }
        if self.caption_tag_dropout_rate > 0.0 {
            let rate = self.caption_tag_dropout_rate;
            rest.retain(|_| (g.next_u64() >> 11) as f64 / (1u64 << 53) as f64 >= rate);
        }
        let joiner = format!("{} ", self.separator);
        fixed
            .iter()
            .chain(rest.iter())
            .copied()
            .collect::<Vec<_>>()
            .join(&joiner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::SkipCode;

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
        assert_eq!(err.code(), SkipCode::Io);
        assert_eq!(err.path(), Some(missing.as_path()));
        assert!(err.to_string().contains("missing.txt"), "{err}");
    }

    fn opts(keep_tokens: usize, shuffle: bool, tag_dropout: f64) -> CaptionOptions {
        CaptionOptions {
            keep_tokens,
            shuffle_caption: shuffle,
            caption_tag_dropout_rate: tag_dropout,
            ..CaptionOptions::default()
        }
    }

    const TAGS: &str = "sks dog, solo, grass , sky,tree, , blue collar";

    fn split(s: &str) -> Vec<&str> {
        s.split(", ").collect()
    }

    #[test]
    fn default_options_leave_the_caption_alone() {
        let o = CaptionOptions::default();
        assert_eq!(o.apply(TAGS, 1, 2, 3), TAGS);
        assert_eq!(o.apply("line one\nline two", 1, 2, 3), "line one\nline two");
    }

    #[test]
    fn shuffle_keeps_the_first_tokens_and_permutes_the_rest() {
        let o = opts(2, true, 0.0);
        let mut orders = std::collections::HashSet::new();
        for sample in 0..40 {
            let out = o.apply(TAGS, 7, 0, sample);
            let tags = split(&out);
            assert_eq!(&tags[..2], ["sks dog", "solo"], "{out}");
            let mut rest: Vec<String> = tags[2..].iter().map(|t| t.to_string()).collect();
            orders.insert(rest.clone());
            rest.sort();
            assert_eq!(rest, ["blue collar", "grass", "sky", "tree"]);
            // Reproducible per (seed, epoch, sample).
            assert_eq!(out, o.apply(TAGS, 7, 0, sample));
        }
        // 4 free tags have 24 orders; 40 draws see most of them.
        assert!(orders.len() >= 15, "{}", orders.len());
        assert_ne!(o.apply(TAGS, 7, 0, 1), o.apply(TAGS, 7, 1, 1));
        // keep_tokens beyond the tag count keeps everything in place.
        assert_eq!(
            opts(9, true, 0.0).apply(TAGS, 7, 0, 0),
            "sks dog, solo, grass, sky, tree, blue collar"
        );
    }

    #[test]
    fn tag_dropout_drops_free_tags_at_the_rate() {
        let o = opts(1, false, 0.5);
        let mut dropped = 0;
        for sample in 0..400 {
            let out = o.apply(TAGS, 3, 0, sample);
            let tags = split(&out);
            assert_eq!(tags[0], "sks dog");
            // Order is kept without shuffle_caption.
            let all = ["solo", "grass", "sky", "tree", "blue collar"];
            let pos: Vec<usize> = tags[1..]
                .iter()
                .map(|t| all.iter().position(|a| a == t).unwrap())
                .collect();
            assert!(pos.windows(2).all(|w| w[0] < w[1]), "{out}");
            dropped += 5 - (tags.len() - 1);
        }
        // 2000 coin flips at 0.5: within ±10%.
        assert!((900..1100).contains(&dropped), "{dropped}");
        assert_eq!(opts(0, false, 1.0).apply(TAGS, 3, 0, 0), "");
    }

    #[test]
    fn caption_dropout_and_variants_are_seeded() {
        let o = CaptionOptions {
            caption_dropout_rate: 0.25,
            caption_per_line: true,
            ..CaptionOptions::default()
        };
        let text = "a photo of sks dog\n\n  a dog on grass  \nsks dog, portrait";
        let mut counts = std::collections::HashMap::new();
        for sample in 0..1200 {
            let out = o.apply(text, 9, 4, sample);
            assert_eq!(out, o.apply(text, 9, 4, sample));
            *counts.entry(out).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 4, "{counts:?}");
        // 300 expected empty, 300 per variant.
        for (k, n) in &counts {
            assert!((240..360).contains(n), "{k:?}: {n}");
        }
        assert!(counts.contains_key("a dog on grass"));
        let bad = CaptionOptions {
            caption_tag_dropout_rate: 1.5,
            ..CaptionOptions::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("caption_tag_dropout_rate"));
    }
}
