//! Cache keys: 128-bit blake3 digests of everything that changes an entry, and their hex spelling.
//!
//! One definition of each key (the Python builder calls these through the bindings, never a copy):
//! - `content_hash(bytes) = blake3(bytes)[..16]`: a file's identity is its bytes, not its name or mtime.
//! - `latent_key = blake3(tag "fastdiff-latent-1" | content hash | bucket w, h | resized w, h |
//!   crop left, top | flip | filter name | background r, g, b | latent salt)[..16]`.
//! - `text_key = blake3(tag "fastdiff-text-1" | caption | text salt)[..16]`.
//!
//! Encoding of the hashed fields: integers fixed-width little-endian (`u32` sizes and offsets, one
//! byte `0`/`1` for flip, one byte per background channel), strings (the tags, filter name,
//! caption) prefixed by their UTF-8 length as a `u64` LE, keys as their 16 raw bytes. The prefix
//! makes the encoding injective, so two different field lists never hash the same preimage.
//!
//! Keys persist in cache folders across versions: the encoding must never change without a new tag.

use crate::error::{Error, Result};
use crate::transform::Placement;

/// A cache key or content hash: the first 16 bytes of a blake3 digest (hex: 32 lowercase chars).
pub type Key = [u8; 16];

/// Domain tag of latent keys (bump the number to change the encoding).
const LATENT_TAG: &str = "fastdiff-latent-1";
/// Domain tag of text keys.
const TEXT_TAG: &str = "fastdiff-text-1";

/// `key` as 32 lowercase hex characters, the spelling of shard tensor names, metadata and Python.
pub fn key_hex(key: &Key) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(32);
    for b in key {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

/// Parse 32 hex characters (either case) into a [`Key`].
///
/// Errors: [`Error::InvalidArgument`] naming the string when it is not exactly 32 hex digits.
pub fn parse_key(s: &str) -> Result<Key> {
    let digit = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let bad = || {
        Error::InvalidArgument(format!(
            "a cache key must be 32 hex characters (16 bytes), got {s:?}"
        ))
    };
    if bytes.len() != 32 {
        return Err(bad());
    }
    let mut key = [0u8; 16];
    for (out, pair) in key.iter_mut().zip(bytes.chunks_exact(2)) {
        *out = (digit(pair[0]).ok_or_else(bad)? << 4) | digit(pair[1]).ok_or_else(bad)?;
    }
    Ok(key)
}

/// The first 16 bytes of blake3 of `bytes`: a file's content hash, or an entry's checksum.
pub fn content_hash(bytes: &[u8]) -> Key {
    truncate(blake3::hash(bytes))
}

/// The key of one latent entry: the image's content hash and everything that changes the pixels
/// the VAE sees (the placement: bucket, resized size, crop offsets, flip; the resize filter's name,
/// e.g. `"lanczos3"`; the background RGB alpha is composited onto), and the latent salt (the
/// digest of the VAE and dtype, from the manifest). Encoding in the module docs.
pub fn latent_key(
    content: &Key,
    p: &Placement,
    filter: &str,
    background: [u8; 3],
    salt: &Key,
) -> Key {
    let mut h = blake3::Hasher::new();
    put_str(&mut h, LATENT_TAG);
    h.update(content);
    for v in [
        p.bucket.0,
        p.bucket.1,
        p.resized.0,
        p.resized.1,
        p.crop_left,
        p.crop_top,
    ] {
        h.update(&v.to_le_bytes());
    }
    h.update(&[u8::from(p.flip)]);
    put_str(&mut h, filter);
    h.update(&background);
    h.update(salt);
    truncate(h.finalize())
}

/// The key of one text entry: the final caption (after caption ops; `""` for a dropped caption)
/// and the text salt (the digest of the encoders, tokenizers, max length and dtype).
pub fn text_key(caption: &str, salt: &Key) -> Key {
    let mut h = blake3::Hasher::new();
    put_str(&mut h, TEXT_TAG);
    put_str(&mut h, caption);
    h.update(salt);
    truncate(h.finalize())
}

/// A string as its UTF-8 length (`u64` LE) and bytes.
fn put_str(h: &mut blake3::Hasher, s: &str) {
    h.update(&(s.len() as u64).to_le_bytes());
    h.update(s.as_bytes());
}

/// The first 16 bytes of a blake3 digest.
pub(super) fn truncate(hash: blake3::Hash) -> Key {
    let mut key = [0u8; 16];
    key.copy_from_slice(&hash.as_bytes()[..16]);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement() -> Placement {
        Placement {
            resized: (640, 512),
            crop_left: 64,
            crop_top: 0,
            flip: false,
            bucket: (512, 512),
        }
    }

    #[test]
    fn content_hash_is_blake3_truncated_to_16_bytes() {
        // The BLAKE3 specification's digests of "" and "abc" (first 16 of 32 bytes).
        assert_eq!(
            key_hex(&content_hash(b"")),
            "af1349b9f5f9a1a6a0404dea36dcc949"
        );
        assert_eq!(
            key_hex(&content_hash(b"abc")),
            "6437b3ac38465133ffb63b75273a8db5"
        );
    }

    #[test]
    fn hex_round_trips_and_rejects_bad_strings() {
        let k = content_hash(b"abc");
        assert_eq!(parse_key(&key_hex(&k)).unwrap(), k);
        assert_eq!(
            parse_key("6437B3AC38465133FFB63B75273A8DB5").unwrap(),
            k,
            "upper case is accepted"
        );
        for bad in [
            "",
            "6437b3ac",
            "6437b3ac38465133ffb63b75273a8db5ff",
            "g437b3ac38465133ffb63b75273a8db5",
        ] {
            let err = parse_key(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad}");
            assert!(err.to_string().contains("32 hex characters"));
        }
        // Multi-byte UTF-8 of 32 bytes is not hex either (and must not panic on a char boundary).
        assert!(parse_key("éééééééééééééééé").is_err());
    }

    #[test]
    fn latent_key_hashes_the_documented_preimage() {
        let content = content_hash(b"image bytes");
        let salt = content_hash(b"vae");
        let mut pre = Vec::new();
        pre.extend(17u64.to_le_bytes());
        pre.extend(b"fastdiff-latent-1");
        pre.extend(content);
        for v in [512u32, 512, 640, 512, 64, 0] {
            pre.extend(v.to_le_bytes());
        }
        pre.push(0);
        pre.extend(8u64.to_le_bytes());
        pre.extend(b"lanczos3");
        pre.extend([255, 255, 255]);
        pre.extend(salt);
        assert_eq!(
            latent_key(&content, &placement(), "lanczos3", [255; 3], &salt),
            content_hash(&pre)
        );
    }

    #[test]
    fn text_key_hashes_the_documented_preimage() {
        let salt = content_hash(b"clip");
        let mut pre = Vec::new();
        pre.extend(15u64.to_le_bytes());
        pre.extend(b"fastdiff-text-1");
        pre.extend(10u64.to_le_bytes()); // "a photo é" is 10 UTF-8 bytes
        pre.extend("a photo é".as_bytes());
        pre.extend(salt);
        assert_eq!(text_key("a photo é", &salt), content_hash(&pre));
    }

    #[test]
    fn keys_are_pinned() {
        // Keys live on disk across versions: these values must never change (a new encoding needs
        // a new tag, which changes every key on purpose). Computed once from the preimages above.
        let content = content_hash(b"image bytes");
        let vae = content_hash(b"vae");
        let clip = content_hash(b"clip");
        assert_eq!(
            key_hex(&latent_key(
                &content,
                &placement(),
                "lanczos3",
                [255; 3],
                &vae
            )),
            "a9f0d469e78ec53b3ad27e450e10e183"
        );
        assert_eq!(
            key_hex(&text_key("a photo é", &clip)),
            "c78e7b68316290dcb677bf24fea09ccc"
        );
        assert_eq!(
            key_hex(&text_key("", &clip)),
            "7f43ae76bb5130046a031cabc900aa13"
        );
    }

    #[test]
    fn every_latent_field_changes_the_key() {
        let content = content_hash(b"image bytes");
        let salt = content_hash(b"vae");
        let base = latent_key(&content, &placement(), "lanczos3", [255; 3], &salt);
        let mut variants = Vec::new();
        let with = |f: &dyn Fn(&mut Placement)| {
            let mut p = placement();
            f(&mut p);
            latent_key(&content, &p, "lanczos3", [255; 3], &salt)
        };
        variants.push(with(&|p| p.bucket.0 = 576));
        variants.push(with(&|p| p.bucket.1 = 448));
        variants.push(with(&|p| p.resized.0 = 641));
        variants.push(with(&|p| p.resized.1 = 513));
        variants.push(with(&|p| p.crop_left = 63));
        variants.push(with(&|p| p.crop_top = 1));
        variants.push(with(&|p| p.flip = true));
        variants.push(latent_key(
            &content_hash(b"image bytez"),
            &placement(),
            "lanczos3",
            [255; 3],
            &salt,
        ));
        variants.push(latent_key(
            &content,
            &placement(),
            "bilinear",
            [255; 3],
            &salt,
        ));
        variants.push(latent_key(
            &content,
            &placement(),
            "lanczos3",
            [255, 255, 254],
            &salt,
        ));
        variants.push(latent_key(
            &content,
            &placement(),
            "lanczos3",
            [255; 3],
            &content_hash(b"vae2"),
        ));
        // Swapped fields (w <-> h) are different placements too.
        variants.push(with(&|p| {
            p.crop_left = 0;
            p.crop_top = 64
        }));
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(*v, base, "variant {i}");
            for w in &variants[..i] {
                assert_ne!(v, w, "variant {i} collides");
            }
        }
    }

    #[test]
    fn every_text_field_changes_the_key() {
        let salt = content_hash(b"clip");
        let base = text_key("a cat", &salt);
        assert_eq!(base, text_key("a cat", &salt));
        assert_ne!(base, text_key("a cat ", &salt));
        assert_ne!(base, text_key("", &salt));
        assert_ne!(base, text_key("a cat", &content_hash(b"clip2")));
        // Length prefixes keep latent and text domains and field boundaries apart.
        assert_ne!(text_key("", &salt), content_hash(&salt));
    }
}
