//! What a cache of this loader must hold: the distinct final captions
//! ([`Loader::caption_variants`]).
//!
//! Plans only; the encoding and the writing are the cache builder's (Python, `fastdiff cache`).

use std::collections::BTreeSet;

use super::loader::Loader;
use crate::error::{Error, Result};

impl Loader {
    /// Every caption a sample of this loader can get, each once, sorted: every image's
    /// `text_variants` caption variants (its caption as read when no subset has caption operations
    /// beyond dropout), plus `""` when some subset's `caption_dropout_rate` is above 0.
    ///
    /// Errors: [`Error::InvalidArgument`] when a subset shuffles tags, drops tags or picks a
    /// caption line (`caption_per_line`) and `text_variants` is not set: its captions change every
    /// epoch, so no cache can hold them all.
    pub fn caption_variants(&self) -> Result<Vec<String>> {
        let inner = &*self.inner;
        let k = match inner.opts.text_variants {
            Some(k) => k,
            None => {
                if let Some(s) = inner.subsets.iter().find(|s| s.caption.has_variants()) {
                    return Err(Error::InvalidArgument(format!(
                        "subset {} shuffles, drops or picks caption tags or lines, which change every \
                         epoch: set text_variants (e.g. 4) to cache that many seeded variants per \
                         caption",
                        s.root.display()
                    )));
                }
                1
            }
        };
        let mut out = BTreeSet::new();
        for image in 0..inner.images.len() {
            for t in 0..k {
                out.insert(inner.caption_variant(image, t));
            }
        }
        if inner
            .subsets
            .iter()
            .any(|s| s.caption.caption_dropout_rate > 0.0)
        {
            out.insert(String::new());
        }
        Ok(out.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use crate::dataset::Subset;

    #[test]
    fn caption_variants_are_every_caption_a_sample_can_get() {
        let (dir, _) = colour_dataset(4);
        for i in 0..4 {
            let text = if i < 2 {
                "same, a, b"
            } else {
                "other, c, d, e"
            };
            std::fs::write(dir.path().join(format!("c{i:02}.txt")), text).unwrap();
        }
        let plain = Loader::new(dir.path(), opts()).unwrap();
        assert_eq!(
            plain.caption_variants().unwrap(),
            ["other, c, d, e", "same, a, b"]
        );
        let shuffled = Subset {
            caption: CaptionOptions {
                shuffle_caption: true,
                caption_dropout_rate: 0.5,
                ..CaptionOptions::default()
            },
            ..Subset::new(dir.path())
        };
        let err = Loader::from_subsets(vec![shuffled.clone()], opts())
            .unwrap()
            .caption_variants()
            .unwrap_err();
        assert!(err.to_string().contains("set text_variants"), "{err}");
        let o = LoaderOptions {
            text_variants: Some(3),
            ..opts()
        };
        let loader = Loader::from_subsets(vec![shuffled], o).unwrap();
        let variants = loader.caption_variants().unwrap();
        assert!(variants.contains(&String::new()));
        assert!(
            variants.len() > 3 && variants.len() <= 1 + 4 * 3,
            "{variants:?}"
        );
        // Every caption of many epochs is one of them.
        for epoch in 0..6 {
            for b in collect(loader.iter_epoch(epoch, 0)) {
                for s in b.samples {
                    assert!(variants.contains(&s.caption), "{}", s.caption);
                }
            }
        }
    }
}
