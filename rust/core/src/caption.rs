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
    /// Every caption of every `n`-th epoch is `""` (kohya's 1-based epochs: `(epoch + 1) % n == 0`
    /// with this crate's 0-based `epoch`); 0 = never.
    pub caption_dropout_every_n_epochs: u64,
    /// Tags (the caption split at `separator`, trimmed) at the start that never move or drop out.
    pub keep_tokens: usize,
    /// Shuffle the tags after the first `keep_tokens`.
    pub shuffle_caption: bool,
    /// Probability in `[0, 1]` that each tag after the first `keep_tokens` is left out.
    pub caption_tag_dropout_rate: f64,
    /// What separates tags (non-empty). Default `","`; tags are re-joined with it plus a space.
    pub separator: String,
    /// Put before the caption with a space (`""` = nothing).
    pub prefix: String,
    /// Put after the caption with a space (`""` = nothing).
    pub suffix: String,
    /// Marks the fixed parts of a caption for the tag operations (`""` = none): `fixed ||| free |||
    /// fixed suffix`; replaces `keep_tokens` in a caption that contains it.
    pub keep_tokens_separator: String,
    /// Joins several tags into one for the tag operations, then becomes `separator` (`""` = none).
    pub secondary_separator: String,
    /// A random line of a multi-line caption, and `{a|b|c}` replaced by one of its options
    /// (`{{` and `}}` are literal braces).
    pub enable_wildcard: bool,
}

impl Default for CaptionOptions {
    fn default() -> Self {
        CaptionOptions {
            caption_per_line: false,
            caption_dropout_rate: 0.0,
            caption_dropout_every_n_epochs: 0,
            keep_tokens: 0,
            shuffle_caption: false,
            caption_tag_dropout_rate: 0.0,
            separator: ",".into(),
            prefix: String::new(),
            suffix: String::new(),
            keep_tokens_separator: String::new(),
            secondary_separator: String::new(),
            enable_wildcard: false,
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
    /// ops.1)` for the line choice, the wildcards and the tags and by `(seed, dropout.0, stream,
    /// dropout.1)` for the whole-caption dropout (the loader passes `(epoch, sample)` for both, or
    /// with `text_variants` `(variant, image)` for `ops`; `dropout.0` is the epoch).
    ///
    /// The order is kohya-ss sd-scripts' `BaseDataset.process_caption` (library/train_util.py):
    /// 1. `prefix + " "` before and `" " + suffix` after the caption (so with several lines, the
    ///    prefix goes to the first and the suffix to the last);
    /// 2. the whole caption becomes `""` with probability `caption_dropout_rate`
    ///    ([`Stream::CaptionDropout`]) and in every `caption_dropout_every_n_epochs`-th epoch;
    ///    otherwise [`CaptionOptions::variant`] does steps 3–6:
    /// 3. with `caption_per_line` or `enable_wildcard`, one non-empty line, uniformly
    ///    ([`Stream::CaptionChoice`]);
    /// 4. with `enable_wildcard`, each `{a|b|c}` becomes one of its `|`-separated options, uniformly
    ///    ([`Stream::Wildcard`]), after `{{` / `}}` were set aside as literal `{` / `}`;
    /// 5. if `shuffle_caption` or `caption_tag_dropout_rate > 0`: the tags (the caption split at
    ///    `separator`, trimmed, empty ones removed) are the fixed ones — the part before the first
    ///    `keep_tokens_separator` and after the second one when the caption contains it, else the
    ///    first `keep_tokens` — and the free ones, which are shuffled (`shuffle_caption`), then each
    ///    dropped with probability `caption_tag_dropout_rate` (one [`SplitMix64`] keyed
    ///    [`Stream::Tags`]); joined with `separator + " "`: leading fixed, free, trailing fixed;
    /// 6. every `secondary_separator` becomes `separator`.
    ///
    /// As in kohya, `keep_tokens_separator` only acts within step 5 (without shuffle or tag dropout
    /// it stays in the caption). Differences from kohya: empty tags are removed (kohya keeps them
    /// when no `keep_tokens_separator` is present), tags are joined with `separator + " "` (kohya:
    /// always `", "`), step 3 never picks an empty line, and a caption of several lines without
    /// `caption_per_line` or `enable_wildcard` stays whole (kohya keeps its first line).
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
        let every = self.caption_dropout_every_n_epochs;
        if (every > 0 && (dropout.0 + 1).is_multiple_of(every))
            || (self.caption_dropout_rate > 0.0
                && rng::uniform(seed, dropout.0, Stream::CaptionDropout, dropout.1)
                    < self.caption_dropout_rate)
        {
            return String::new();
        }
        self.variant(text, seed, ops)
    }

    /// Whether any operation but the whole-caption dropout can change a caption differently from
    /// one draw to the next (a line choice, a wildcard, a tag shuffle or tag dropout): the
    /// operations `text_variants` precomputes.
    pub fn has_variants(&self) -> bool {
        self.caption_per_line
            || self.enable_wildcard
            || self.shuffle_caption
            || self.caption_tag_dropout_rate > 0.0
    }

    /// The caption after steps 1 and 3–6 of [`CaptionOptions::apply_keyed`] (everything but the
    /// whole-caption dropout), their draws keyed by `(seed, ops.0, stream, ops.1)`; equal to
    /// `apply_keyed` whenever the caption is not dropped.
    pub fn variant(&self, text: &str, seed: u64, ops: (u64, u64)) -> String {
        let mut caption = text.to_owned();
        if !self.prefix.is_empty() {
            caption = format!("{} {caption}", self.prefix);
        }
        if !self.suffix.is_empty() {
            caption = format!("{caption} {}", self.suffix);
        }
        if self.caption_per_line || self.enable_wildcard {
            let lines: Vec<&str> = caption
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            if !lines.is_empty() {
                let u = rng::uniform(seed, ops.0, Stream::CaptionChoice, ops.1);
                caption =
                    lines[((u * lines.len() as f64) as usize).min(lines.len() - 1)].to_owned();
            }
        }
        if self.enable_wildcard {
            let mut g = SplitMix64::new(seed, ops.0, Stream::Wildcard, ops.1);
            caption = replace_wildcards(&caption, &mut g);
        }
        if self.shuffle_caption || self.caption_tag_dropout_rate > 0.0 {
            caption = self.tag_ops(
                &caption,
                &mut SplitMix64::new(seed, ops.0, Stream::Tags, ops.1),
            );
        }
        if !self.secondary_separator.is_empty() {
            caption = caption.replace(self.secondary_separator.as_str(), &self.separator);
        }
        caption
    }

    /// Step 5 of [`CaptionOptions::apply_keyed`].
    fn tag_ops(&self, caption: &str, g: &mut SplitMix64) -> String {
        let split = |part: &str| -> Vec<String> {
            part.split(self.separator.as_str())
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let kts = self.keep_tokens_separator.as_str();
        let (fixed, mut rest, suffix) = match caption.split_once(kts).filter(|_| !kts.is_empty()) {
            Some((fixed, flex)) => match flex.split_once(kts) {
                Some((flex, tail)) => (split(fixed), split(flex), split(tail)),
                None => (split(fixed), split(flex), Vec::new()),
            },
            None => {
                let mut tags = split(caption);
                let rest = tags.split_off(self.keep_tokens.min(tags.len()));
                (tags, rest, Vec::new())
            }
        };
        if self.shuffle_caption {
            g.shuffle(&mut rest);
        }
        if self.caption_tag_dropout_rate > 0.0 {
            let rate = self.caption_tag_dropout_rate;
            rest.retain(|_| (g.next_u64() >> 11) as f64 / (1u64 << 53) as f64 >= rate);
        }
        [fixed, rest, suffix]
            .concat()
            .join(&format!("{} ", self.separator))
    }
}

/// `caption` with each `{a|b|c}` replaced by one of its `|`-separated options (each drawn with
/// `g.below`, left to right) and `{{` / `}}` read as literal `{` / `}`: kohya-ss sd-scripts'
/// wildcard step (`re.sub(r"\{([^}]+)\}", ...)` on the caption with the doubled braces set aside).
fn replace_wildcards(caption: &str, g: &mut SplitMix64) -> String {
    // Each character, and whether it is a brace written doubled (a literal, never a group's edge).
    let mut chars: Vec<(char, bool)> = Vec::with_capacity(caption.len());
    let mut it = caption.chars().peekable();
    while let Some(c) = it.next() {
        let doubled = (c == '{' || c == '}') && it.next_if_eq(&c).is_some();
        chars.push((c, doubled));
    }
    let is = |k: usize, brace: char| chars[k] == (brace, false);
    let mut out = String::with_capacity(caption.len());
    let mut i = 0;
    while i < chars.len() {
        // A group is `{`, at least one character that is not `}`, then `}`.
        let end = is(i, '{')
            .then(|| (i + 1..chars.len()).find(|&k| is(k, '}')))
            .flatten()
            .filter(|&end| end > i + 1);
        match end {
            Some(end) => {
                let body: String = chars[i + 1..end].iter().map(|&(c, _)| c).collect();
                let options: Vec<&str> = body.split('|').collect();
                out.push_str(options[g.below(options.len())]);
                i = end + 1;
            }
            None => {
                out.push(chars[i].0);
                i += 1;
            }
        }
    }
    out
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

    fn kohya(shuffle: bool, tag_dropout: f64) -> CaptionOptions {
        // The "secondary_separator, wildcard notation, keep_tokens_separator" example of kohya-ss
        // sd-scripts docs/config_README-en.md.
        CaptionOptions {
            shuffle_caption: shuffle,
            caption_tag_dropout_rate: tag_dropout,
            keep_tokens_separator: "|||".into(),
            secondary_separator: ";;;".into(),
            enable_wildcard: true,
            prefix: "1girl, hatsune miku, vocaloid |||".into(),
            suffix: ", anime screencap ||| masterpiece, rating: general".into(),
            ..CaptionOptions::default()
        }
    }

    #[test]
    fn kohya_example_keeps_the_fixed_parts_and_joins_secondary_tags() {
        let text = "upper body, {simple|white} background, sky;;;cloud;;;day, outdoors";
        // Every free tag dropped: the prefix's and the suffix's fixed parts remain.
        assert_eq!(
            kohya(false, 1.0).apply(text, 1, 0, 0),
            "1girl, hatsune miku, vocaloid, masterpiece, rating: general"
        );
        let mut backgrounds = std::collections::HashSet::new();
        for sample in 0..40 {
            let out = kohya(true, 0.0).apply(text, 5, 0, sample);
            let tags = split(&out);
            assert_eq!(&tags[..3], ["1girl", "hatsune miku", "vocaloid"], "{out}");
            assert_eq!(&tags[tags.len() - 2..], ["masterpiece", "rating: general"]);
            let mut free: Vec<&str> = tags[3..tags.len() - 2].to_vec();
            let background = *free.iter().find(|t| t.ends_with(" background")).unwrap();
            backgrounds.insert(background.to_owned());
            free.sort();
            let mut want = [
                "anime screencap",
                background,
                "outdoors",
                "sky,cloud,day",
                "upper body",
            ];
            want.sort();
            assert_eq!(free, want, "{out}");
        }
        assert_eq!(
            backgrounds,
            ["simple background", "white background"]
                .map(String::from)
                .into()
        );
    }

    #[test]
    fn each_kohya_step_alone() {
        let plain = CaptionOptions::default;
        let with = |f: fn(&mut CaptionOptions)| {
            let mut o = plain();
            f(&mut o);
            o
        };
        let prefixed = with(|o| {
            o.prefix = "masterpiece,".into();
            o.suffix = ", from side".into();
        });
        // Prefix before the first line, suffix after the last (kohya adds them to the whole text).
        assert_eq!(
            prefixed.apply("a\nb", 0, 0, 0),
            "masterpiece, a\nb , from side"
        );
        let secondary = with(|o| o.secondary_separator = ";;;".into());
        assert_eq!(secondary.apply("a, sky;;;cloud", 0, 0, 0), "a, sky,cloud");
        // keep_tokens_separator acts only with shuffle or tag dropout, as in kohya.
        let kts = with(|o| o.keep_tokens_separator = "|||".into());
        assert_eq!(kts.apply("a ||| b, c", 0, 0, 0), "a ||| b, c");
        let kts_drop = with(|o| {
            o.keep_tokens_separator = "|||".into();
            o.keep_tokens = 2;
            o.caption_tag_dropout_rate = 1.0;
        });
        // The separator replaces keep_tokens; without it keep_tokens counts.
        assert_eq!(kts_drop.apply("a ||| b, c ||| d", 0, 0, 0), "a, d");
        assert_eq!(kts_drop.apply("a, b, c, d", 0, 0, 0), "a, b");
        let wild = with(|o| o.enable_wildcard = true);
        assert_eq!(
            wild.apply("a {x} b {} {{retro style}}", 0, 0, 0),
            "a x b {} {retro style}"
        );
        assert!(["a", ""].contains(&wild.apply("{a|}", 0, 0, 0).as_str()));
        assert!(wild.has_variants());
        // A random line, then its wildcards: every (line, option) pair shows up.
        let seen: std::collections::HashSet<String> = (0..64)
            .map(|s| wild.apply("{p|q} one\n\n{p|q} two", 3, 0, s))
            .collect();
        assert_eq!(seen.len(), 4, "{seen:?}");
        let every = with(|o| o.caption_dropout_every_n_epochs = 2);
        // kohya's epochs count from 1: its 2nd and 4th are epochs 1 and 3 here.
        let by_epoch: Vec<String> = (0..4).map(|e| every.apply("a", 0, e, 7)).collect();
        assert_eq!(by_epoch, ["a", "", "a", ""]);
    }
}
