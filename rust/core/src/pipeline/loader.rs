//! A [`Loader`]: the subsets scanned, every image assigned to its bucket, the sample index (images
//! times repeats) and the batch memory pool, built once and shared by every epoch.
//!
//! Built at construction and read-only afterwards, except the record of images that failed while
//! iterating. It must not decode pixels (the scan reads headers only) or start threads of its own
//! beyond the scan's.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::buffer::BufferPool;
use super::cached::{check_cacheable, Cache};
use super::options::{held_out, LoaderOptions, OnError};
use super::shards::{decide, IoCounts, Ownership};
use super::views::{self, Pairs};
use crate::bucket::{assign, merge_small_buckets, Bucket, MergeRule, Move};
use crate::cache::Key;
use crate::dataset::Subset;
use crate::decode::DecodeOptions;
use crate::error::{Error, Result, Skip};
use crate::scan::{self, ImageEntry, PassedOver, Scan, ScanOptions};
use crate::{quality, sampler};

/// A scanned and bucketed dataset; cheap to share (`Send + Sync`), iterate epochs with
/// [`Loader::iter_epoch`] (several iterators may run at once; they share the report).
pub struct Loader {
    pub(super) inner: Arc<Inner>,
}

impl std::fmt::Debug for Loader {
    /// A summary: the image list can have millions of entries.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("root", &self.inner.root)
            .field("images", &self.inner.images.len())
            .field("buckets", &self.inner.buckets.len())
            .field("num_batches", &self.inner.num_batches)
            .field("opts", &self.inner.opts)
            .finish_non_exhaustive()
    }
}

pub(super) struct Inner {
    pub(super) opts: LoaderOptions,
    pub(super) root: PathBuf,
    pub(super) buckets: Vec<Bucket>,
    pub(super) images: Vec<ImageEntry>,
    /// Bucket index per image (after `min_bucket_fill`'s merges).
    pub(super) bucket_of: Vec<usize>,
    /// The images `min_bucket_fill` moved out of their own bucket, in image order.
    pub(super) merges: Vec<Move>,
    /// The subsets, in order (captions maps dropped after the scan).
    pub(super) subsets: Vec<Subset>,
    /// Each subset's scan as it came (before `validation_split` and bucketing), kept for
    /// [`Loader::rebucket`] and shared by the loaders it builds.
    pub(super) scans: Arc<Vec<Scan>>,
    /// Subset index per image.
    pub(super) subset_of: Vec<usize>,
    /// Image index per sample: each image once per repeat of its subset, image-major, so without
    /// repeats sample `i` is image `i`. Plans and per-sample randomness are keyed by sample index.
    pub(super) sample_image: Vec<usize>,
    /// Bucket index per sample.
    pub(super) sample_bucket: Vec<usize>,
    /// Sample indices per bucket (in shard-level mode, of this rank's shards only): where a
    /// failed sample's stand-in is drawn from.
    pub(super) bucket_samples: Vec<Vec<usize>>,
    /// Shard-level rank assignment, when the loader runs in that mode (see `shards`).
    pub(super) ownership: Option<Ownership>,
    /// What the workers read from each tar shard.
    pub(super) io: IoCounts,
    pub(super) num_batches: usize,
    pub(super) found: usize,
    /// Images found but taken out by `validation_split` (those of the other split).
    pub(super) held_out: usize,
    /// The files of every subset's folder that are not image candidates.
    pub(super) passed_over: PassedOver,
    pub(super) scan_skipped: Vec<Skip>,
    /// The scans' warnings (stale shard indexes ignored).
    pub(super) warnings: Vec<String>,
    pub(super) failed: Mutex<Failed>,
    /// Recycled batch buffers, sized for the largest batch (`batch_size` samples of the largest
    /// bucket) in the output dtype.
    pub(super) pool: Arc<BufferPool>,
    /// With `cache`: the opened cache and every image's content hash.
    pub(super) cache: Option<Cache>,
    /// Recycled buffers of cached tensors, sized for the largest batch's largest tensor.
    pub(super) tensor_pool: Arc<BufferPool>,
    /// Zero-byte buffers: the `pixels` of batches without decoded pixels.
    pub(super) empty_pool: Arc<BufferPool>,
    /// With conditioning views: each image's paired files (empty without views).
    pub(super) pairs: Vec<Pairs>,
    /// Recycled buffers of the view tensors, sized for the largest batch's largest view tensor.
    pub(super) view_pool: Arc<BufferPool>,
}

/// Images that failed while iterating, each recorded once whatever the epoch.
#[derive(Default)]
pub(super) struct Failed {
    pub(super) images: HashSet<usize>,
    pub(super) skips: Vec<Skip>,
}

impl Inner {
    pub(super) fn failed(&self) -> MutexGuard<'_, Failed> {
        // The lock is never held across anything that can panic; recover the data if it was.
        self.failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add a failed image to the report (once per loader, whatever the epoch), as soon as a worker
    /// meets it: other workers then pass it over as a stand-in.
    pub(super) fn record_failure(&self, index: usize, err: &Error) {
        let mut failed = self.failed();
        if failed.images.insert(index) {
            failed.skips.push(Skip::new(&self.images[index].path, err));
        }
    }
}

impl Loader {
    /// A loader of the one folder `root` (a default [`Subset`]); see [`Loader::from_subsets`].
    ///
    /// Errors: as [`Loader::from_subsets`].
    pub fn new(root: &Path, opts: LoaderOptions) -> Result<Loader> {
        Loader::from_subsets(vec![Subset::new(root)], opts)
    }

    /// Validate `opts` and the subsets, scan each subset's folder (see [`scan::scan`]) and assign
    /// every image to the bucket nearest its upright aspect ratio (see [`assign`]); with
    /// [`LoaderOptions::no_upscale`], to [`BucketConfig::no_upscale_bucket`](crate::bucket::BucketConfig::no_upscale_bucket) instead (those buckets
    /// join the list, and images too small for any bucket are skipped with code `too_small`).
    /// Images are listed subset by subset, each subset sorted by path. With
    /// [`LoaderOptions::min_bucket_fill`], small buckets are then merged
    /// ([`merge_small_buckets`]): a moved image's samples get the target bucket's size and
    /// placement (crop, `crop_top_left`, `target_size`) like any image of that bucket.
    ///
    /// Errors: [`Error::InvalidArgument`] from [`LoaderOptions::validate`] or [`Subset::validate`],
    /// or for an empty subset list; [`Error::NoImages`] if a subset's folder is not a directory,
    /// holds no image files, or every image file in it was skipped by the scan (the message then
    /// gives the count and the first reason); with [`OnError::Raise`], [`Error::Skipped`] for the
    /// first file the scan skipped; [`Error::Io`] if the scan threads cannot be started.
    ///
    /// With [`LoaderOptions::cache`], the cache folder is opened ([`crate::cache::Store::open`]:
    /// its errors) and every image's bytes are hashed; a file that cannot be read is recorded in
    /// the report (with [`OnError::Raise`], its [`Error::Io`] is returned). Errors
    /// [`Error::InvalidArgument`] when the cache cannot hold this loader's samples: a random crop
    /// without `crop_variants`, caption operations beyond dropout without `text_variants`, or a
    /// `bucket_step` that is not a multiple of the latent downscale.
    pub fn from_subsets(mut subsets: Vec<Subset>, opts: LoaderOptions) -> Result<Loader> {
        opts.validate()?;
        if subsets.is_empty() {
            return Err(Error::InvalidArgument(
                "subsets must hold at least one subset".into(),
            ));
        }
        for subset in &subsets {
            subset.validate()?;
        }
        let scans = scan_subsets(&mut subsets, &opts)?;
        Loader::from_scans(subsets, Arc::new(scans), opts)
    }

    /// A loader of the same scanned images with other options (another `resolution`,
    /// `bucket_step`, `min_bucket_side`/`max_bucket_side`, `batch_size`, ...): the buckets, samples,
    /// plan and pools are built anew from this loader's scan as [`Loader::from_subsets`] builds them,
    /// without reading any file (with [`LoaderOptions::cache`], but for the cache folder). Equal to a
    /// fresh loader of the same files with `opts`. The report's failures met while iterating are not
    /// carried over.
    ///
    /// Errors: [`Error::InvalidArgument`] from [`LoaderOptions::validate`], or when `opts` changes
    /// an option the scan depends on (`caption_extensions`, `max_pixels`); otherwise as
    /// [`Loader::from_subsets`] after its scan (`too_small` skips, [`Error::NoImages`], the cache).
    pub fn rebucket(&self, opts: LoaderOptions) -> Result<Loader> {
        opts.validate()?;
        let was = &self.inner.opts;
        if opts.caption_extensions != was.caption_extensions || opts.max_pixels != was.max_pixels {
            return Err(Error::InvalidArgument(format!(
                "rebucket keeps the scan: caption_extensions and max_pixels must stay {:?} and {}, \
                 got {:?} and {}",
                was.caption_extensions, was.max_pixels, opts.caption_extensions, opts.max_pixels
            )));
        }
        Loader::from_scans(self.inner.subsets.clone(), self.inner.scans.clone(), opts)
    }

    /// The loader of `subsets` from their scans (one per subset, in order), with `opts` (validated).
    fn from_scans(
        subsets: Vec<Subset>,
        scans: Arc<Vec<Scan>>,
        opts: LoaderOptions,
    ) -> Result<Loader> {
        let bucket_config = opts.bucket_config()?;
        let mut buckets = bucket_config.buckets();
        // Bucket of each image, by value (with no_upscale, not necessarily in `buckets` yet).
        let mut image_bucket = Vec::new();
        let mut images = Vec::new();
        let mut subset_of = Vec::new();
        let mut found = 0;
        let mut held_out_total = 0;
        let mut passed_over = PassedOver::default();
        let mut scan_skipped = Vec::new();
        let mut warnings = Vec::new();
        // Images found but not used (held out, skipped by the scan), with their subset folders: their
        // conditioning files are not orphans.
        let mut passed: Vec<PathBuf> = Vec::new();
        let mut passed_roots: Vec<PathBuf> = Vec::new();
        let mut unindexed = Vec::new();
        for (k, (subset, scanned)) in subsets.iter().zip(scans.iter()).enumerate() {
            let mut scanned = scanned.clone();
            warnings.append(&mut scanned.warnings);
            for (shard, reason) in &subset.unreadable_shards {
                let e = Error::io(
                    shard,
                    std::io::Error::other(format!("shard left out: {reason}")),
                );
                scanned.skipped.push(Skip::new(shard, &e));
                scanned.found += 1;
            }
            unindexed.append(&mut scanned.unindexed_shards);
            let mut kept = Vec::with_capacity(scanned.images.len());
            let mut held_here = 0;
            for entry in std::mem::take(&mut scanned.images) {
                if opts.validation_split > 0.0 {
                    let relative = entry.path.strip_prefix(&subset.root).unwrap_or(&entry.path);
                    let relative = relative.to_string_lossy().replace('\\', "/");
                    if held_out(opts.seed, opts.validation_split, &relative) != opts.validation {
                        held_here += 1;
                        passed.push(entry.path.clone());
                        continue;
                    }
                }
                let (w, h) = entry.header.upright_size();
                let bucket = if opts.no_upscale {
                    bucket_config.no_upscale_bucket(&buckets, w, h)
                } else {
                    Some(buckets[assign(&buckets, w, h)])
                };
                match bucket {
                    Some(b) => {
                        image_bucket.push(b);
                        kept.push(entry);
                    }
                    None => scanned.skipped.push(Skip::new(
                        &entry.path,
                        &Error::TooSmall {
                            path: entry.path.clone(),
                            width: w,
                            height: h,
                            step: opts.bucket_step,
                        },
                    )),
                }
            }
            scanned.images = kept;
            scanned.skipped.sort_by(|a, b| a.path.cmp(&b.path));
            if let (OnError::Raise, Some(first)) = (opts.on_error, scanned.skipped.first()) {
                return Err(Error::Skipped(first.clone()));
            }
            if scanned.images.is_empty() && scanned.skipped.is_empty() && held_here > 0 {
                let which = if opts.validation {
                    "validation"
                } else {
                    "training"
                };
                return Err(Error::NoImages {
                    path: subset.root.clone(),
                    reason: format!(
                        "validation_split {} leaves none of its {held_here} images for {which}",
                        opts.validation_split
                    ),
                });
            }
            if scanned.images.is_empty() {
                return Err(Error::NoImages {
                    path: subset.root.clone(),
                    reason: format!(
                        "all {} image files were skipped; first: {}",
                        scanned.found, scanned.skipped[0].message
                    ),
                });
            }
            found += scanned.found;
            held_out_total += held_here;
            passed_over += scanned.passed_over;
            passed.extend(scanned.skipped.iter().map(|s| s.path.clone()));
            passed_roots.resize(passed.len(), subset.root.clone());
            scan_skipped.extend(scanned.skipped);
            subset_of.extend(std::iter::repeat_n(k, scanned.images.len()));
            images.extend(scanned.images);
        }
        let mut pairs = Vec::new();
        if !opts.views.is_empty() {
            let roots: Vec<&Path> = (subset_of.iter())
                .map(|&k| subsets[k].root.as_path())
                .collect();
            let require = opts.views.require_pairs || opts.on_error == OnError::Raise;
            let unused: Vec<(&Path, &Path)> = (passed.iter().zip(&passed_roots))
                .map(|(p, r)| (p.as_path(), r.as_path()))
                .collect();
            let (paired, kept) = views::pair(
                &opts.views,
                (&images, &roots),
                &unused,
                (&mut scan_skipped, &mut warnings),
                require,
            )?;
            if kept.is_empty() {
                return Err(Error::NoImages {
                    path: subsets[0].root.clone(),
                    reason: format!(
                        "no image has all its conditioning files; first: {}",
                        scan_skipped.last().map_or("", |s| s.message.as_str())
                    ),
                });
            }
            if kept.len() < images.len() {
                let mut keep = vec![false; images.len()];
                kept.iter().for_each(|&i| keep[i] = true);
                let mut flags = keep.iter();
                images.retain(|_| *flags.next().expect("one flag per image"));
                let mut flags = keep.iter();
                image_bucket.retain(|_| *flags.next().expect("one flag per image"));
                let mut flags = keep.iter();
                subset_of.retain(|_| *flags.next().expect("one flag per image"));
            }
            pairs = paired;
        }
        scan_skipped.sort_by(|a, b| a.path.cmp(&b.path));
        if opts.no_upscale {
            buckets.extend_from_slice(&image_bucket);
            crate::bucket::sort_by_aspect(&mut buckets);
        }
        let index: std::collections::HashMap<Bucket, usize> =
            buckets.iter().enumerate().map(|(i, b)| (*b, i)).collect();
        let mut bucket_of: Vec<usize> = image_bucket.iter().map(|b| index[b]).collect();
        let merges = match opts.min_bucket_fill {
            Some(min_fill) => {
                let sizes: Vec<(u32, u32)> =
                    images.iter().map(|e| e.header.upright_size()).collect();
                let samples: Vec<usize> = (subset_of.iter())
                    .map(|&k| subsets[k].num_repeats)
                    .collect();
                let rule = MergeRule {
                    min_fill,
                    max_extra_crop: opts.max_extra_crop,
                    no_upscale: opts.no_upscale,
                };
                merge_small_buckets(&buckets, &sizes, &samples, &mut bucket_of, &rule)
            }
            None => Vec::new(),
        };
        let sample_image: Vec<usize> = (0..images.len())
            .flat_map(|i| std::iter::repeat_n(i, subsets[subset_of[i]].num_repeats))
            .collect();
        let sample_bucket: Vec<usize> = sample_image.iter().map(|&i| bucket_of[i]).collect();
        let ownership = decide(
            &opts,
            &subsets,
            &unindexed,
            &images,
            &sample_image,
            &mut warnings,
        );
        let num_batches = match &ownership {
            None => sampler::num_batches(&sample_bucket, buckets.len(), &opts.sampling()),
            Some(o) => sampler::num_batches_owned(
                &sample_bucket,
                buckets.len(),
                &opts.sampling(),
                &o.owner_of_sample,
            ),
        };
        let mut bucket_samples = vec![Vec::new(); buckets.len()];
        for (sample, &b) in sample_bucket.iter().enumerate() {
            if (ownership.as_ref()).is_none_or(|o| o.owner_of_sample[sample] == opts.rank) {
                bucket_samples[b].push(sample);
            }
        }
        // Pool allocations fit the largest batch this dataset can make: no more samples than
        // `batch_size` or than its fullest bucket holds, of its largest bucket that has samples.
        let fullest = bucket_samples.iter().map(Vec::len).max().unwrap_or(0);
        let largest = (buckets.iter().zip(&bucket_samples))
            .filter(|(_, samples)| !samples.is_empty())
            .map(|(b, _)| b.width as usize * b.height as usize)
            .max()
            .unwrap_or(0);
        let batch_bytes = [opts.batch_size.min(fullest), 3, largest]
            .into_iter()
            .try_fold(opts.dtype.bytes_per_value(), usize::checked_mul)
            .filter(|&b| isize::try_from(b).is_ok())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "a batch of {} images of up to {largest} pixels is too large to allocate: lower \
                     batch_size or resolution",
                    opts.batch_size.min(fullest)
                ))
            })?;
        // The consumer holds a batch or two while `prefetch` more are loading.
        let keep = opts_keep(&opts);
        let pool = BufferPool::new(batch_bytes, keep);
        let view_tensors = opts.views.tensors((0, 0), opts.dtype).len();
        let largest_view = (buckets.iter().zip(&bucket_samples))
            .filter(|(_, samples)| !samples.is_empty())
            .flat_map(|(b, _)| opts.views.tensors((b.width, b.height), opts.dtype))
            .map(|(_, dtype, shape)| shape.iter().product::<usize>() * dtype.bytes_per_value())
            .max()
            .unwrap_or(0);
        let view_pool = BufferPool::new(
            opts.batch_size.min(fullest) * largest_view,
            keep * view_tensors,
        );
        let mut inner = Inner {
            opts,
            root: subsets[0].root.clone(),
            buckets,
            images,
            bucket_of,
            merges,
            subsets,
            scans,
            subset_of,
            sample_image,
            sample_bucket,
            bucket_samples,
            ownership,
            io: IoCounts::default(),
            num_batches,
            found,
            held_out: held_out_total,
            passed_over,
            scan_skipped,
            warnings,
            failed: Mutex::new(Failed::default()),
            pool,
            cache: None,
            tensor_pool: BufferPool::new(0, 0),
            empty_pool: BufferPool::new(0, keep),
            pairs,
            view_pool,
        };
        if let Some(dir) = inner.opts.cache.clone() {
            let (cache, unreadable) =
                Cache::open(&dir, &inner.images, inner.opts.threads(), &inner.io)?;
            check_cacheable(&inner, &cache.store)?;
            for (image, err) in unreadable {
                if inner.opts.on_error == OnError::Raise {
                    return Err(err);
                }
                inner.record_failure(image, &err);
            }
            let largest = (inner.buckets.iter().zip(&inner.bucket_samples))
                .filter(|(_, samples)| !samples.is_empty())
                .flat_map(|(b, _)| cache.tensors(*b))
                .map(|(_, _, dtype, shape)| {
                    shape.iter().product::<usize>() * dtype.bytes_per_value()
                })
                .max()
                .unwrap_or(0);
            let n = inner.opts.batch_size.min(fullest);
            let keep = opts_keep(&inner.opts) * cache.tensors(inner.buckets[0]).len();
            inner.tensor_pool = BufferPool::new(n * largest, keep);
            inner.cache = Some(cache);
        }
        Ok(Loader {
            inner: Arc::new(inner),
        })
    }

    /// The subsets (their `captions` maps are not kept after the scan).
    pub fn subsets(&self) -> &[Subset] {
        &self.inner.subsets
    }

    /// A 64-bit fingerprint of the dataset as scanned: per image its subset, path relative to the
    /// subset folder, format, stored size and orientation, plus each subset's options (not its
    /// folder), plus `min_bucket_fill` and `max_extra_crop` when merging is on (they change every
    /// moved image's bucket; off, the digest is what it was before the option existed). Equal on
    /// any machine the same files are found on, whatever the absolute paths; used to check that a
    /// saved loader state belongs to this dataset.
    pub fn dataset_digest(&self) -> u64 {
        let inner = &*self.inner;
        let mut h = Fnv::default();
        for s in &inner.subsets {
            h.write(s.digest_text().as_bytes());
        }
        if let Some(k) = inner.opts.min_bucket_fill {
            h.write(format!("min_bucket_fill {k} {}\0", inner.opts.max_extra_crop).as_bytes());
        }
        for (e, &k) in inner.images.iter().zip(&inner.subset_of) {
            let rel = e
                .path
                .strip_prefix(&inner.subsets[k].root)
                .unwrap_or(&e.path);
            h.write(format!("{k}\0{}\0", rel.display()).as_bytes());
            let hd = &e.header;
            h.write(
                format!(
                    "{} {} {} {}\0",
                    hd.format.name(),
                    hd.width,
                    hd.height,
                    hd.orientation
                )
                .as_bytes(),
            );
        }
        h.0
    }

    /// The options this loader was built with.
    pub fn options(&self) -> &LoaderOptions {
        &self.inner.opts
    }

    /// The candidate buckets (also the empty ones), plus with `no_upscale` the images' own smaller
    /// buckets, sorted by aspect ratio; batches refer to these.
    pub fn buckets(&self) -> &[Bucket] {
        &self.inner.buckets
    }

    /// Exact number of batches of every epoch (see [`sampler::num_batches`]). Batches whose samples
    /// all fail with [`OnError::Skip`] are not yielded, so an epoch can yield fewer.
    pub fn num_batches(&self) -> usize {
        self.inner.num_batches
    }

    /// With a cache: image `index`'s content hash (blake3 of its bytes when the loader was built;
    /// see [`crate::cache::content_hash`]), or `None` when its file could not be read (it is in the
    /// report). `None` without a cache.
    pub fn content_hash(&self, index: usize) -> Option<Key> {
        let cache = self.inner.cache.as_ref()?;
        cache.content.get(index)?.as_ref().ok().copied()
    }

    /// The images the scan accepted, sorted by path ([`SampleMeta::index`] indexes this).
    pub fn images(&self) -> &[ImageEntry] {
        &self.inner.images
    }

    /// Image `index`'s bucket (an index into [`Loader::buckets`]) and subset (into
    /// [`Loader::subsets`]). Panics when `index` is out of range.
    pub fn image_bucket_and_subset(&self, index: usize) -> (usize, usize) {
        (self.inner.bucket_of[index], self.inner.subset_of[index])
    }

    /// [`quality::measure`] of every image (in [`Loader::images`] order), decoded with this loader's
    /// background and pixel limit on its `num_threads`.
    ///
    /// Errors: [`Error::Resource`] when the threads cannot start; per image, as
    /// [`quality::measure`].
    pub fn quality(&self) -> Result<Vec<Result<quality::Quality>>> {
        let o = &self.inner.opts;
        let decode = DecodeOptions {
            background: o.background,
            max_pixels: o.max_pixels,
            alpha_plane: false,
        };
        quality::measure(&self.inner.images, &decode, o.num_threads)
    }
}

/// Scan each subset's folder or shards (headers only), taking its `captions` map.
fn scan_subsets(subsets: &mut [Subset], opts: &LoaderOptions) -> Result<Vec<Scan>> {
    let mut scans = Vec::with_capacity(subsets.len());
    for subset in subsets.iter_mut() {
        let scan_opts = ScanOptions {
            caption_extensions: subset
                .caption_extensions
                .clone()
                .unwrap_or_else(|| opts.caption_extensions.clone()),
            max_pixels: opts.max_pixels,
            num_threads: opts.num_threads,
            captions: subset.captions.take(),
            class_tokens: subset.class_tokens.clone(),
            pending_shards: subset.pending_shards.iter().cloned().collect(),
        };
        scans.push(if subset.shards.is_empty() {
            scan::scan(&subset.root, &scan_opts)?
        } else {
            scan::scan_shards(&subset.root, &subset.shards, &scan_opts)?
        });
    }
    Ok(scans)
}

/// Batch buffers a pool keeps: the consumer holds a batch or two while `prefetch` more load.
fn opts_keep(opts: &LoaderOptions) -> usize {
    opts.prefetch + 2
}

/// FNV-1a, 64 bit: a hash that is the same on every machine and Rust version (std's is not).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
#[path = "loader_tests.rs"]
mod tests;
