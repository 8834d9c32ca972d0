//! The manifest `fastdiff-cache.json` of a cache folder: the salts, dtypes and tensor names of the
//! latent and text halves, and the images the builder could not encode.
//!
//! Written by the Python builder (`fastdiff cache`), read here. Only the fields the loader needs are
//! kept; the others (`vae`, `encoders`, `model`, `kind`) are the builder's records and are not
//! checked. Every error names the manifest file and the field.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::key::{parse_key, Key};
use crate::error::{Error, Result};
use crate::transform::OutputDtype;

/// The manifest's file name inside a cache folder.
pub const MANIFEST_NAME: &str = "fastdiff-cache.json";
/// The format tag of manifests and shards this build reads and writes.
pub const FORMAT: &str = "fastdiff-cache-1";

/// What a cache folder holds, as its manifest says.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// The latent half; `None` when built with `--no-latents`.
    pub latents: Option<LatentSpec>,
    /// The text half; `None` when built with `--no-text`.
    pub text: Option<TextSpec>,
    /// Images (by content hash) the builder could not encode, with the reason, so that a cached run
    /// skips them as the uncached run would.
    pub failed: HashMap<Key, String>,
}

/// The latent half: per sample tensors `[channels, H / downscale, W / downscale]` (H, W the bucket).
#[derive(Debug, Clone, PartialEq)]
pub struct LatentSpec {
    /// Digest of everything about the VAE that changes its output (part of every latent key).
    pub salt: Key,
    /// Stored element type of every latent tensor.
    pub dtype: OutputDtype,
    /// Latent channels (4 for SD/SDXL, 16 for SD3/FLUX).
    pub channels: usize,
    /// Pixel-to-latent downscale factor (8).
    pub downscale: u32,
    /// Tensor names of each entry, e.g. `["latents", "latents_std"]`.
    pub tensors: Vec<String>,
}

/// The text half: per caption tensors of the given shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct TextSpec {
    /// Digest of the encoders, tokenizers, max length and dtype (part of every text key).
    pub salt: Key,
    /// Stored element type of every text tensor.
    pub dtype: OutputDtype,
    /// `(name, shape)` of each entry's tensors, in name order, e.g.
    /// `[("pooled_prompt_embeds", [1280]), ("prompt_embeds", [77, 2048])]`.
    pub tensors: Vec<(String, Vec<usize>)>,
}

impl Manifest {
    /// Read `dir/fastdiff-cache.json`.
    ///
    /// Errors: [`Error::Io`] when it cannot be read (`NotFound` for a folder that holds no cache);
    /// [`Error::Corrupt`] naming the file when it is not JSON, has another `format` than
    /// `"fastdiff-cache-1"`, or a field is missing or mistyped (the reason names the field).
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_NAME);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Manifest::parse(&path, &text)
    }

    /// Parse the manifest text `text` of the file `path` (named in errors); see [`Manifest::read`].
    pub fn parse(path: &Path, text: &str) -> Result<Manifest> {
        let f = Fields {
            path: path.to_path_buf(),
        };
        let root: Value =
            serde_json::from_str(text).map_err(|e| f.corrupt(format!("not JSON: {e}")))?;
        let root = f.object(&root, "the manifest")?;
        match root.get("format") {
            Some(Value::String(s)) if s == FORMAT => {}
            Some(Value::String(s)) => {
                return Err(f.corrupt(format!(
                    "format is {s:?}; this fastdiff reads {FORMAT:?} (rebuild the cache)"
                )))
            }
            _ => return Err(f.corrupt(format!("\"format\" must be the string {FORMAT:?}"))),
        }
        let latents = match root.get("latents") {
            None | Some(Value::Null) => None,
            Some(v) => Some(f.latents(v)?),
        };
        let text = match root.get("text") {
            None | Some(Value::Null) => None,
            Some(v) => Some(f.text(v)?),
        };
        let mut failed = HashMap::new();
        if let Some(v) = root.get("failed") {
            for (hash, reason) in f.object(v, "failed")? {
                let key = parse_key(hash).map_err(|e| f.corrupt(format!("failed: {e}")))?;
                let reason = reason
                    .as_str()
                    .ok_or_else(|| f.corrupt(format!("failed[{hash:?}] must be a string")))?;
                failed.insert(key, reason.to_string());
            }
        }
        Ok(Manifest {
            latents,
            text,
            failed,
        })
    }
}

/// Parse a dtype as manifests and the shard writer's callers spell it: `"bf16"`, `"f16"` or `"f32"`.
///
/// Errors: [`Error::InvalidArgument`] naming `dtype` for anything else.
pub fn parse_dtype(s: &str) -> Result<OutputDtype> {
    match s {
        "bf16" => Ok(OutputDtype::BF16),
        "f16" => Ok(OutputDtype::F16),
        "f32" => Ok(OutputDtype::F32),
        _ => Err(Error::InvalidArgument(format!(
            "dtype must be one of \"bf16\", \"f16\", \"f32\", got {s:?}"
        ))),
    }
}

/// Field readers that name the manifest and the field in their errors.
struct Fields {
    path: PathBuf,
}

impl Fields {
    fn corrupt(&self, reason: String) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            reason,
        }
    }

    fn object<'v>(&self, v: &'v Value, what: &str) -> Result<&'v Map<String, Value>> {
        v.as_object()
            .ok_or_else(|| self.corrupt(format!("{what} must be a JSON object")))
    }

    fn get<'v>(&self, obj: &'v Map<String, Value>, half: &str, name: &str) -> Result<&'v Value> {
        obj.get(name)
            .ok_or_else(|| self.corrupt(format!("{half}.{name} is missing")))
    }

    fn salt(&self, obj: &Map<String, Value>, half: &str) -> Result<Key> {
        let v = self.get(obj, half, "salt")?;
        v.as_str()
            .ok_or_else(|| self.corrupt(format!("{half}.salt must be a string")))
            .and_then(|s| parse_key(s).map_err(|e| self.corrupt(format!("{half}.salt: {e}"))))
    }

    fn dtype(&self, obj: &Map<String, Value>, half: &str) -> Result<OutputDtype> {
        let v = self.get(obj, half, "dtype")?;
        v.as_str()
            .ok_or_else(|| self.corrupt(format!("{half}.dtype must be a string")))
            .and_then(|s| parse_dtype(s).map_err(|e| self.corrupt(format!("{half}.{e}"))))
    }

    fn uint(&self, v: &Value, what: &str) -> Result<u64> {
        v.as_u64()
            .filter(|&n| n > 0)
            .ok_or_else(|| self.corrupt(format!("{what} must be a positive integer")))
    }

    fn latents(&self, v: &Value) -> Result<LatentSpec> {
        let obj = self.object(v, "latents")?;
        let channels = self.uint(self.get(obj, "latents", "channels")?, "latents.channels")?;
        let downscale = self.uint(self.get(obj, "latents", "downscale")?, "latents.downscale")?;
        let tensors = self
            .get(obj, "latents", "tensors")?
            .as_array()
            .filter(|a| !a.is_empty())
            .and_then(|a| {
                a.iter()
                    .map(|t| t.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| {
                self.corrupt("latents.tensors must be a non-empty list of strings".into())
            })?;
        Ok(LatentSpec {
            salt: self.salt(obj, "latents")?,
            dtype: self.dtype(obj, "latents")?,
            channels: usize::try_from(channels)
                .map_err(|_| self.corrupt("latents.channels is too large".into()))?,
            downscale: u32::try_from(downscale)
                .map_err(|_| self.corrupt("latents.downscale is too large".into()))?,
            tensors,
        })
    }

    fn text(&self, v: &Value) -> Result<TextSpec> {
        let obj = self.object(v, "text")?;
        let shapes = self.object(self.get(obj, "text", "tensors")?, "text.tensors")?;
        if shapes.is_empty() {
            return Err(self.corrupt("text.tensors must name at least one tensor".into()));
        }
        let mut tensors = Vec::with_capacity(shapes.len());
        for (name, shape) in shapes {
            let what = format!("text.tensors[{name:?}]");
            let dims = shape
                .as_array()
                .ok_or_else(|| self.corrupt(format!("{what} must be a list of sizes")))?
                .iter()
                .map(|d| self.uint(d, &what).map(|d| d as usize))
                .collect::<Result<Vec<_>>>()?;
            tensors.push((name.clone(), dims));
        }
        tensors.sort();
        Ok(TextSpec {
            salt: self.salt(obj, "text")?,
            dtype: self.dtype(obj, "text")?,
            tensors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key::key_hex;

    const SALT: &str = "00112233445566778899aabbccddeeff";

    fn full() -> String {
        format!(
            r#"{{"format": "fastdiff-cache-1",
               "latents": {{"salt": "{SALT}", "dtype": "bf16", "channels": 4, "downscale": 8,
                           "tensors": ["latents", "latents_std"],
                           "vae": {{"digest": "x", "scaling_factor": 0.13025, "shift_factor": null}}}},
               "text": {{"salt": "{SALT}", "dtype": "f32",
                        "tensors": {{"prompt_embeds": [77, 2048], "pooled_prompt_embeds": [1280]}},
                        "encoders": {{"digest": "y", "max_length": 77}}}},
               "failed": {{"ffeeddccbbaa99887766554433221100": "Error while decoding a.png: truncated"}},
               "model": "/models/sdxl", "kind": "sdxl"}}"#
        )
    }

    #[test]
    fn reads_both_halves_and_failures() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MANIFEST_NAME), full()).unwrap();
        let m = Manifest::read(dir.path()).unwrap();
        let l = m.latents.unwrap();
        assert_eq!(key_hex(&l.salt), SALT);
        assert_eq!(l.dtype, OutputDtype::BF16);
        assert_eq!((l.channels, l.downscale), (4, 8));
        assert_eq!(l.tensors, ["latents", "latents_std"]);
        let t = m.text.unwrap();
        assert_eq!(t.dtype, OutputDtype::F32);
        assert_eq!(
            t.tensors,
            [
                ("pooled_prompt_embeds".to_string(), vec![1280]),
                ("prompt_embeds".to_string(), vec![77, 2048])
            ]
        );
        let failed: Vec<_> = m
            .failed
            .iter()
            .map(|(k, v)| (key_hex(k), v.as_str()))
            .collect();
        assert_eq!(
            failed,
            [(
                "ffeeddccbbaa99887766554433221100".to_string(),
                "Error while decoding a.png: truncated"
            )]
        );
    }

    #[test]
    fn halves_may_be_absent() {
        let m = Manifest::parse(Path::new("m.json"), r#"{"format": "fastdiff-cache-1"}"#).unwrap();
        assert_eq!(m.latents, None);
        assert_eq!(m.text, None);
        assert!(m.failed.is_empty());
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let err = Manifest::read(dir.path()).unwrap_err();
        assert!(
            matches!(&err, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
        );
        assert!(err.to_string().contains(MANIFEST_NAME));

        let path = Path::new("/c/fastdiff-cache.json");
        let cases = [
            ("{", "not JSON"),
            ("[]", "the manifest must be a JSON object"),
            (
                r#"{"format": "fastdiff-cache-2"}"#,
                "format is \"fastdiff-cache-2\"",
            ),
            ("{}", "\"format\" must be the string"),
            (
                r#"{"format": "fastdiff-cache-1", "latents": {"dtype": "bf16"}}"#,
                "latents.channels is missing",
            ),
            (
                &full().replace("\"bf16\"", "\"float64\""),
                "latents.dtype must be one of",
            ),
            (
                &full().replace("\"channels\": 4", "\"channels\": 0"),
                "latents.channels must be a positive integer",
            ),
            (
                &full().replace(&format!("\"salt\": \"{SALT}\""), "\"salt\": \"abc\""),
                "latents.salt: a cache key must be 32 hex",
            ),
            (
                &full().replace("[1280]", "[1280, \"x\"]"),
                "text.tensors[\"pooled_prompt_embeds\"] must be a positive integer",
            ),
            (
                &full().replace("\"latents\", \"latents_std\"", ""),
                "latents.tensors must be a non-empty list",
            ),
            (
                &full().replace("\"ffeedd", "\"zzeedd"),
                "failed: a cache key",
            ),
        ];
        for (text, want) in cases {
            let err = Manifest::parse(path, text).unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "{want}");
            let msg = err.to_string();
            assert!(msg.contains("/c/fastdiff-cache.json"), "{msg}");
            assert!(msg.contains(want), "{msg} should contain {want}");
        }
    }

    #[test]
    fn dtype_names() {
        assert_eq!(parse_dtype("bf16").unwrap(), OutputDtype::BF16);
        assert_eq!(parse_dtype("f16").unwrap(), OutputDtype::F16);
        assert_eq!(parse_dtype("f32").unwrap(), OutputDtype::F32);
        assert!(matches!(
            parse_dtype("bfloat16"),
            Err(Error::InvalidArgument(_))
        ));
    }
}
