//! A dataset as fine-tuning tools describe it: several subsets (folders), each with its own repeats,
//! caption conventions and augmentation, some of them regularisation (class) images for DreamBooth
//! prior preservation. The loader takes a list of these; a single folder is one default subset.
//!
//! This module only describes and validates subsets; scanning is [`crate::scan`], planning
//! [`crate::sampler`], and the per-sample caption operations [`crate::caption::CaptionOptions`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::caption::CaptionOptions;
use crate::error::{Error, Result};
use crate::scan::validate_caption_extensions;
use crate::transform::CropMode;

/// One folder of images and how its samples are made.
#[derive(Debug, Clone, PartialEq)]
pub struct Subset {
    /// Folder of images (searched recursively); with `shards`, the name the dataset goes by (the
    /// shards' folder, say), which image paths are made relative to in
    /// [`crate::pipeline::Loader::dataset_digest`].
    pub root: PathBuf,
    /// WebDataset tar shards read instead of the folder (see [`crate::scan::scan_shards`]); empty:
    /// the folder `root`.
    pub shards: Vec<PathBuf>,
    /// Shards named by the dataset that could not be made local (a remote shard that could not be
    /// fetched, a parquet file that could not be converted), as given, with the reason: each is a
    /// skip of code `io` named by the shard in the report (and counted in `found`), or with
    /// [`crate::OnError::Raise`] the loader's error.
    pub unreadable_shards: Vec<(PathBuf, String)>,
    /// Shards of `shards` whose local copy is made after the scan (see
    /// [`crate::scan::ScanOptions::pending_shards`]): remote shards a rank fetches once it knows
    /// which are its own. Their index must exist; the loader's workers open them when reading.
    pub pending_shards: Vec<PathBuf>,
    /// Times each image appears per epoch (>= 1); every repeat is its own sample with its own crop,
    /// flip and caption draw. Default 1.
    pub num_repeats: usize,
    /// Regularisation (class) images for DreamBooth prior preservation; samples carry the flag.
    pub is_reg: bool,
    /// Caption file extensions for this subset; `None` = the loader's.
    pub caption_extensions: Option<Vec<String>>,
    /// Captions by image path (`root.join(relative)`), replacing caption files: what an HF
    /// imagefolder `metadata.jsonl` gives. Images not in the map have no caption.
    pub captions: Option<BTreeMap<PathBuf, String>>,
    /// The caption of an image that has none (no caption file, or not in `captions`): kohya-ss
    /// sd-scripts' DreamBooth `class_tokens`. `None`: such images have the empty caption.
    pub class_tokens: Option<String>,
    /// Caption variants, dropout and tag operations.
    pub caption: CaptionOptions,
    /// Flip probability for this subset; `None` = the loader's `flip_prob`.
    pub flip_prob: Option<f64>,
    /// Crop mode for this subset; `None` = the loader's `crop`.
    pub crop: Option<CropMode>,
}

impl Subset {
    /// A subset of the folder `root` with every option at its default (one repeat, not regularisation,
    /// the loader's caption extensions, flip and crop, captions used as read).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Subset {
            root: root.into(),
            shards: Vec::new(),
            unreadable_shards: Vec::new(),
            pending_shards: Vec::new(),
            num_repeats: 1,
            is_reg: false,
            caption_extensions: None,
            captions: None,
            class_tokens: None,
            caption: CaptionOptions::default(),
            flip_prob: None,
            crop: None,
        }
    }

    /// Errors: [`Error::InvalidArgument`] naming the subset folder and the argument: `num_repeats` 0,
    /// `flip_prob` outside `[0, 1]`, bad caption extensions or caption options.
    pub fn validate(&self) -> Result<()> {
        let named = |e: Error| match e {
            Error::InvalidArgument(m) => {
                Error::InvalidArgument(format!("subset {}: {m}", self.root.display()))
            }
            other => other,
        };
        if self.num_repeats == 0 {
            return Err(named(Error::InvalidArgument(
                "num_repeats must be at least 1, got 0".into(),
            )));
        }
        if let Some(p) = self.flip_prob.filter(|p| !(0.0..=1.0).contains(p)) {
            return Err(named(Error::InvalidArgument(format!(
                "flip_prob must be in [0, 1], got {p}"
            ))));
        }
        if let Some(exts) = &self.caption_extensions {
            validate_caption_extensions(exts).map_err(named)?;
        }
        self.caption.validate().map_err(named)
    }

    /// Its options as [`crate::pipeline::Loader::dataset_digest`] hashes them (not its folder): the
    /// `Debug` text subsets had before the kohya-ss caption options and `class_tokens` existed, those
    /// appended only when set, so that digests (and saved loader states) without them stay valid.
    pub fn digest_text(&self) -> String {
        let c = &self.caption;
        let mut text = format!(
            "Subset {{ root: \"\", num_repeats: {:?}, is_reg: {:?}, caption_extensions: {:?}, captions: {:?}, \
             caption: CaptionOptions {{ caption_per_line: {:?}, caption_dropout_rate: {:?}, keep_tokens: {:?}, \
             shuffle_caption: {:?}, caption_tag_dropout_rate: {:?}, separator: {:?} }}, flip_prob: {:?}, \
             crop: {:?} }}",
            self.num_repeats,
            self.is_reg,
            self.caption_extensions,
            self.captions,
            c.caption_per_line,
            c.caption_dropout_rate,
            c.keep_tokens,
            c.shuffle_caption,
            c.caption_tag_dropout_rate,
            c.separator,
            self.flip_prob,
            self.crop,
        );
        let kohya = (
            &self.class_tokens,
            c.caption_dropout_every_n_epochs,
            &c.prefix,
            &c.suffix,
            &c.keep_tokens_separator,
            &c.secondary_separator,
            c.enable_wildcard,
        );
        let default = CaptionOptions::default();
        let unset = (
            &None,
            default.caption_dropout_every_n_epochs,
            &default.prefix,
            &default.suffix,
            &default.keep_tokens_separator,
            &default.secondary_separator,
            default.enable_wildcard,
        );
        if kohya != unset {
            text.push_str(&format!(" {kohya:?}"));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_subset_and_the_argument() {
        assert!(Subset::new("/d").validate().is_ok());
        let cases = [
            (
                Subset {
                    num_repeats: 0,
                    ..Subset::new("/d/a")
                },
                "num_repeats",
            ),
            (
                Subset {
                    flip_prob: Some(-0.1),
                    ..Subset::new("/d/a")
                },
                "flip_prob",
            ),
            (
                Subset {
                    caption_extensions: Some(vec!["txt".into()]),
                    ..Subset::new("/d/a")
                },
                "caption_extensions",
            ),
            (
                Subset {
                    caption: CaptionOptions {
                        caption_dropout_rate: 2.0,
                        ..CaptionOptions::default()
                    },
                    ..Subset::new("/d/a")
                },
                "caption_dropout_rate",
            ),
        ];
        for (s, name) in cases {
            let msg = s.validate().unwrap_err().to_string();
            assert!(msg.contains(name) && msg.contains("/d/a"), "{msg}");
        }
    }

    #[test]
    fn digests_of_subsets_without_the_kohya_options_are_unchanged() {
        // The derived `Debug` of a default subset before the kohya-ss options existed.
        let before = "Subset { root: \"\", num_repeats: 1, is_reg: false, caption_extensions: None, \
                      captions: None, caption: CaptionOptions { caption_per_line: false, \
                      caption_dropout_rate: 0.0, keep_tokens: 0, shuffle_caption: false, \
                      caption_tag_dropout_rate: 0.0, separator: \",\" }, flip_prob: None, crop: None }";
        assert_eq!(Subset::new("/any/where").digest_text(), before);
        let mut kohya = Subset::new("/d");
        kohya.caption.enable_wildcard = true;
        assert_eq!(
            kohya.digest_text(),
            format!("{before} (None, 0, \"\", \"\", \"\", \"\", true)")
        );
    }
}
