//! Conditioning views of a sample: a loss mask and control images that take exactly the target's
//! crop window, flip and resize, so that they cannot drift from the pixels they condition.
//!
//! Two stages live here: pairing (at construction: each image's mask file and control files, by
//! the image's path relative to its subset folder, without extension; what is unpaired becomes a
//! skip or a warning with a code) and the per-sample write (a worker decodes the view and runs it
//! through the target's [`Placement`] into the batch's view tensors). Nothing here decides a
//! placement: the target's is the only one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::decode::{self, DecodeOptions, Decoder};
use crate::error::{Error, Result, Skip};
use crate::scan::{self, ImageEntry};
use crate::transform::{FilterType, OutSlot, OutputDtype, Placement, Transformer};

/// The conditioning views a loader adds to each batch. Default: none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewOptions {
    /// The image's own alpha channel (before compositing) is its mask: 255 (opaque) = 1 = trained.
    /// An image without alpha gets an all-ones mask. Default false.
    pub mask_from_alpha: bool,
    /// A folder of mask files, one per image at the image's relative path with any image
    /// extension (`a/b.jpg` -> `mask_dir/a/b.png`); read as grayscale (Pillow's `convert("L")`
    /// luminance for colour files), 255 = 1 = trained. Default `None`.
    pub mask_dir: Option<PathBuf>,
    /// Folders of control images, paired like masks, read as RGB like the images. Default none.
    pub control_dirs: Vec<PathBuf>,
    /// A missing pair is an error at construction instead of a per-file skip. Default false.
    pub require_pairs: bool,
    /// The VAE's downscale: `masks_latent` is the pixel mask area-averaged over
    /// `vae_scale_factor`² blocks. Default 8 (SD, SDXL, SD3, FLUX.1).
    pub vae_scale_factor: u32,
}

impl Default for ViewOptions {
    fn default() -> Self {
        ViewOptions {
            mask_from_alpha: false,
            mask_dir: None,
            control_dirs: Vec::new(),
            require_pairs: false,
            vae_scale_factor: 8,
        }
    }
}

impl ViewOptions {
    /// Whether batches get a mask.
    pub fn has_mask(&self) -> bool {
        self.mask_from_alpha || self.mask_dir.is_some()
    }

    /// Whether there is any view at all.
    pub fn is_empty(&self) -> bool {
        !self.has_mask() && self.control_dirs.is_empty()
    }

    /// Errors: [`Error::InvalidArgument`] naming the argument: `mask_from_alpha` with a
    /// `mask_dir`, `vae_scale_factor` 0 or (with a mask) not dividing `bucket_step`. (That the
    /// folders are folders is checked when pairing.)
    pub fn validate(&self, bucket_step: u32) -> Result<()> {
        if self.mask_from_alpha && self.mask_dir.is_some() {
            return Err(Error::InvalidArgument(
                "mask_from_alpha and mask_dir both give the mask: choose one".into(),
            ));
        }
        let f = self.vae_scale_factor;
        if f == 0 || (self.has_mask() && !bucket_step.is_multiple_of(f)) {
            return Err(Error::InvalidArgument(format!(
                "vae_scale_factor must be at least 1 and divide bucket_step {bucket_step}, got {f}"
            )));
        }
        Ok(())
    }

    /// Errors: [`Error::InvalidArgument`] naming `mask_dir` or `control_dir` when it is not a
    /// folder.
    fn check_folders(&self) -> Result<()> {
        let dirs = self.mask_dir.iter().map(|d| ("mask_dir", d));
        for (name, dir) in dirs.chain(self.control_dirs.iter().map(|d| ("control_dir", d))) {
            if !dir.is_dir() {
                return Err(Error::InvalidArgument(format!(
                    "{name} {} is not a folder",
                    dir.display()
                )));
            }
        }
        Ok(())
    }

    /// The view tensors of a batch of `bucket` (w, h), per sample, in the order [`write_views`]
    /// fills them: `masks` float32 `[1, h, w]` and `masks_latent` float32 `[1, h / f, w / f]`
    /// with a mask; `control_pixel_values` in the pixel dtype, `[3, h, w]` for one control folder,
    /// `[K, 3, h, w]` for K.
    pub fn tensors(&self, bucket: (u32, u32), dtype: OutputDtype) -> Vec<ViewTensor> {
        let (w, h) = (bucket.0 as usize, bucket.1 as usize);
        let f = self.vae_scale_factor.max(1) as usize;
        let mut out = Vec::new();
        if self.has_mask() {
            out.push(("masks".to_owned(), OutputDtype::F32, vec![1, h, w]));
            out.push((
                "masks_latent".to_owned(),
                OutputDtype::F32,
                vec![1, h / f, w / f],
            ));
        }
        match self.control_dirs.len() {
            0 => {}
            1 => out.push(("control_pixel_values".to_owned(), dtype, vec![3, h, w])),
            k => out.push(("control_pixel_values".to_owned(), dtype, vec![k, 3, h, w])),
        }
        out
    }
}

/// A view tensor's name, dtype and per-sample shape.
pub type ViewTensor = (String, OutputDtype, Vec<usize>);

/// One image's conditioning files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Pairs {
    pub(super) mask: Option<PathBuf>,
    pub(super) controls: Vec<PathBuf>,
}

/// The files of one conditioning folder by relative stem (`a/b` for `a/b.png`).
struct Folder {
    dir: PathBuf,
    /// Stem -> (file, whether an image paired with it).
    files: BTreeMap<String, (PathBuf, bool)>,
}

impl Folder {
    fn index(dir: &Path) -> Folder {
        let mut files = BTreeMap::new();
        for path in scan::image_files(dir) {
            // Sorted walk: of two files with one stem (`a.png`, `a.jpg`) the first by name wins.
            files
                .entry(relative_stem(dir, &path))
                .or_insert((path, false));
        }
        Folder {
            dir: dir.to_path_buf(),
            files,
        }
    }

    fn take(&mut self, stem: &str) -> Option<PathBuf> {
        let (path, used) = self.files.get_mut(stem)?;
        *used = true;
        Some(path.clone())
    }
}

/// `path` relative to `root`, without its extension, `/`-separated.
fn relative_stem(root: &Path, path: &Path) -> String {
    let relative = path.strip_prefix(root).unwrap_or(path).with_extension("");
    relative.to_string_lossy().replace('\\', "/")
}

/// Whether `a` and `b` differ by exactly one insertion, deletion or substitution.
fn one_edit_apart(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let (short, long) = if a.len() <= b.len() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    if long.len() - short.len() > 1 || a == b {
        return false;
    }
    let head = short
        .iter()
        .zip(long.iter())
        .take_while(|(x, y)| x == y)
        .count();
    let skip = usize::from(short.len() == long.len());
    short[head + skip.min(short.len() - head)..] == long[head + 1..]
}

/// The first of `names` one edit away from `stem`, as a " (nearest: NAME)" hint.
fn nearest<'a>(stem: &str, mut names: impl Iterator<Item = &'a str>) -> String {
    names
        .find(|n| one_edit_apart(stem, n))
        .map(|n| format!(" (nearest: {n:?}, one character apart)"))
        .unwrap_or_default()
}

/// Pair every image of `images` (`roots[i]` its subset folder) with its views.
///
/// Returns each kept image's pairs (in order) and the indices kept; an image missing a pair is a
/// skip with code `missing_mask` or `missing_control` (naming the folder, the stem looked for and,
/// when a conditioning file's stem is one edit away, that file), or with `require` the error
/// ([`Error::MissingPair`]). Conditioning files no image pairs with are warnings with code
/// `orphan_mask` / `orphan_control` (with the nearest image stem when one edit away); the files of
/// the `unused` images ((path, subset folder): held out by `validation_split`, skipped by the scan)
/// are neither. Errors: [`Error::InvalidArgument`] for a view folder that is not one.
pub(super) fn pair(
    opts: &ViewOptions,
    (images, roots): (&[ImageEntry], &[&Path]),
    unused: &[(&Path, &Path)],
    (skipped, warnings): (&mut Vec<Skip>, &mut Vec<String>),
    require: bool,
) -> Result<(Vec<Pairs>, Vec<usize>)> {
    opts.check_folders()?;
    let mut masks = opts.mask_dir.as_deref().map(Folder::index);
    let mut controls: Vec<Folder> = opts.control_dirs.iter().map(|d| Folder::index(d)).collect();
    for (path, root) in unused {
        let stem = relative_stem(root, path);
        for folder in masks.iter_mut().chain(controls.iter_mut()) {
            folder.take(&stem);
        }
    }
    let stems: Vec<String> = (images.iter().zip(roots))
        .map(|(e, root)| relative_stem(root, &e.path))
        .collect();
    let mut pairs = Vec::with_capacity(images.len());
    let mut kept = Vec::with_capacity(images.len());
    // (image, the folder it lacks a file in: None = the mask folder, Some(k) = control folder k).
    let mut unpaired: Vec<(usize, Option<usize>)> = Vec::new();
    for (i, stem) in stems.iter().enumerate() {
        let mut missing = None;
        let mask = masks.as_mut().and_then(|folder| folder.take(stem));
        if masks.is_some() && mask.is_none() {
            missing = Some(None);
        }
        let mut found_controls = Vec::with_capacity(controls.len());
        for (k, folder) in controls.iter_mut().enumerate() {
            match folder.take(stem) {
                Some(p) => found_controls.push(p),
                None => {
                    missing.get_or_insert(Some(k));
                }
            }
        }
        match missing {
            Some(lacks) => unpaired.push((i, lacks)),
            None => {
                pairs.push(Pairs {
                    mask,
                    controls: found_controls,
                });
                kept.push(i);
            }
        }
    }
    // Near misses are looked for only among the files and images left unpaired: a one-character
    // difference between two files that both found their pair is no mistake.
    let unused = |folder: &Folder| -> Vec<String> {
        (folder.files.iter())
            .filter(|(_, (_, used))| !used)
            .map(|(stem, _)| stem.clone())
            .collect()
    };
    for &(i, lacks) in &unpaired {
        let folder = match lacks {
            None => masks.as_ref().expect("only a mask folder lacks masks"),
            Some(k) => &controls[k],
        };
        let stem = &stems[i];
        let hint = nearest(stem, unused(folder).iter().map(String::as_str));
        let err = Error::MissingPair {
            path: images[i].path.clone(),
            mask: lacks.is_none(),
            reason: format!(
                "no file named {stem:?} (any image extension) in {}{hint}",
                folder.dir.display()
            ),
        };
        if require {
            return Err(err);
        }
        skipped.push(Skip::new(&images[i].path, &err));
    }
    let lone: Vec<&str> = unpaired.iter().map(|&(i, _)| stems[i].as_str()).collect();
    for (folder, code) in masks
        .iter()
        .map(|m| (m, "orphan_mask"))
        .chain(controls.iter().map(|c| (c, "orphan_control")))
    {
        for (stem, (path, used)) in &folder.files {
            if !used {
                let hint = nearest(stem, lone.iter().copied());
                warnings.push(format!(
                    "{code}: {} pairs with no image{hint}",
                    path.display()
                ));
            }
        }
    }
    Ok((pairs, kept))
}

/// A worker's tools for the views: the mask resizer (box filter: an area average when
/// downscaling) and its scratch.
pub(super) struct ViewTools {
    masks: Transformer,
    scratch: Vec<u8>,
}

impl ViewTools {
    pub(super) fn new() -> Self {
        ViewTools {
            masks: Transformer::new(FilterType::Box),
            scratch: Vec::new(),
        }
    }
}

/// Where one sample's views go: `masks`/`masks_latent` as f32 bytes, each control's slot.
pub(super) struct ViewSlots<'a> {
    pub(super) mask: Option<(&'a mut [u8], &'a mut [u8])>,
    pub(super) controls: Vec<OutSlot<'a>>,
}

/// Decode `entry`'s views and write them at `placement` (the target's) into `slots`.
///
/// The mask (the image's alpha, or its mask file) is resized with the box filter (Pillow `BOX`:
/// the area average when downscaling), cropped and flipped with the target's window, and written
/// as `v / 255` (float32 in [0, 1], steps of 1/255); `masks_latent` is its mean over each
/// `vae_scale_factor`² block. Control images go through the loader's filter and dtype like the
/// pixels. A view file of another size than the target is mapped proportionally: the window
/// covers the same share of it (as if it were first resized to the target's size).
///
/// Errors: those of reading and decoding the view file (naming it), [`Error::Changed`]-free: a
/// view file is probed when it is read.
#[allow(clippy::too_many_arguments)]
pub(super) fn write_views(
    opts: &ViewOptions,
    pairs: &Pairs,
    entry: &ImageEntry,
    placement: &Placement,
    decode_opts: &DecodeOptions,
    decoder: &mut Decoder,
    transformer: &mut Transformer,
    tools: &mut ViewTools,
    slots: ViewSlots<'_>,
) -> Result<()> {
    let upright = entry.header.upright_size();
    let (bw, bh) = placement.bucket;
    if let Some((mask, latent)) = slots.mask {
        let img = if opts.mask_from_alpha {
            let bytes = entry.read().map_err(|e| Error::io(&entry.path, e))?;
            let alpha = DecodeOptions {
                alpha_plane: true,
                ..*decode_opts
            };
            let orientation = entry.header.orientation;
            decoder.decode(&bytes, &entry.path, orientation, placement.resized, &alpha)?
        } else {
            let path = pairs
                .mask
                .as_ref()
                .expect("a mask is paired whenever one is asked for");
            let black = DecodeOptions {
                background: [0, 0, 0],
                ..*decode_opts
            };
            read_view(path, upright, placement, &black, decoder)?
        };
        let n = 3 * bw as usize * bh as usize;
        tools.scratch.resize(n, 0);
        tools
            .masks
            .apply(&img, placement, (bw, bh), OutSlot::U8(&mut tools.scratch))?;
        let plane = n / 3;
        let (r, rest) = tools.scratch.split_at(plane);
        let (g, b) = rest.split_at(plane);
        for (i, out) in mask.chunks_exact_mut(4).enumerate() {
            // Pillow's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16 (exact for gray).
            let l = (19595 * u32::from(r[i])
                + 38470 * u32::from(g[i])
                + 7471 * u32::from(b[i])
                + 0x8000)
                >> 16;
            out.copy_from_slice(&(l as f32 / 255.0).to_ne_bytes());
        }
        area_average(
            mask,
            latent,
            (bw as usize, bh as usize),
            opts.vae_scale_factor as usize,
        );
    }
    for (path, out) in pairs.controls.iter().zip(slots.controls) {
        let img = read_view(path, upright, placement, decode_opts, decoder)?;
        transformer.apply(&img, placement, (bw, bh), out)?;
    }
    Ok(())
}

/// Read, probe and decode the view file `path` (upright by its own orientation), DCT-downscaled
/// to cover `placement.resized` when it has the target's `upright` size.
fn read_view(
    path: &Path,
    upright: (u32, u32),
    placement: &Placement,
    opts: &DecodeOptions,
    decoder: &mut Decoder,
) -> Result<decode::RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let header = decode::probe_bytes(&bytes, path)?;
    let cover = if header.upright_size() == upright {
        placement.resized
    } else {
        (0, 0)
    };
    decoder.decode(&bytes, path, header.orientation, cover, opts)
}

/// `latent` (f32 bytes, `[h / f, w / f]`) = the mean of `mask` (f32 bytes, `[h, w]`) over each
/// `f`×`f` block.
fn area_average(mask: &[u8], latent: &mut [u8], (w, h): (usize, usize), f: usize) {
    let value = |i: usize| f32::from_ne_bytes(mask[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    let (lw, lh) = (w / f, h / f);
    for y in 0..lh {
        for x in 0..lw {
            let mut sum = 0.0f64;
            for dy in 0..f {
                let row = (y * f + dy) * w + x * f;
                sum += (row..row + f).map(|i| f64::from(value(i))).sum::<f64>();
            }
            let mean = (sum / (f * f) as f64) as f32;
            latent[4 * (y * lw + x)..4 * (y * lw + x) + 4].copy_from_slice(&mean.to_ne_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_edit_apart_finds_single_insertions_deletions_and_substitutions() {
        assert!(one_edit_apart("cat_01", "cat_1"));
        assert!(one_edit_apart("cat_1", "cat_01"));
        assert!(one_edit_apart("cat_01", "cat_02"));
        assert!(one_edit_apart("a", ""));
        assert!(!one_edit_apart("cat_01", "cat_01"));
        assert!(!one_edit_apart("cat_01", "dog_01"));
        assert!(!one_edit_apart("ab", "ba"));
        assert!(!one_edit_apart("abc", "a"));
    }

    #[test]
    fn area_average_is_the_block_mean() {
        let mask: Vec<u8> = (0..16).flat_map(|v| (v as f32).to_ne_bytes()).collect();
        let mut latent = vec![0u8; 16];
        area_average(&mask, &mut latent, (4, 4), 2);
        let got: Vec<f32> = latent
            .chunks_exact(4)
            .map(|b| f32::from_ne_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(got, vec![2.5, 4.5, 10.5, 12.5]);
    }
}
