//! Fuzz smoke test of the per-sample path: header probe → decode → place → resize/crop/flip/layout,
//! on mutated image files. Asserts that no input panics, hangs or allocates without bound; every
//! failure must be an ordinary `Err`.
//!
//! Seeds are small files of every kind the odd-image tests cover (baseline / progressive / 4:2:0 /
//! grayscale / CMYK / EXIF-rotated JPEG; RGB, RGBA, gray+alpha, 16-bit, palette + tRNS PNG; lossless
//! WebP; 24- and 32-bit BMP; RGB and 16-bit gray TIFF; GIF), plus every file in `$FASTDIFF_FUZZ_SEEDS` when set (e.g. a folder of real photos). Each
//! case picks a seed and applies up to 8 byte-level mutations (bit flips, overwrites with boundary
//! values such as `0xFFFFFFFF` — typical of size fields —, truncation, insertion, deletion, splices
//! from another seed), then runs it with random orientation, DCT-scale target, bucket, crop, flip,
//! filter and dtype.
//!
//! * Panics: caught by proptest, which shrinks the input and fails the test.
//! * Hangs: a watchdog thread aborts the process (printing the input's seed and mutations) when one
//!   case runs longer than `FASTDIFF_FUZZ_CASE_TIMEOUT` seconds (default 20).
//! * Allocation: a counting global allocator; a case whose peak of live heap exceeds 512 MiB (the
//!   decode limit below is 4 Mpx, i.e. at most ~100 MB for the largest legal image) fails.
//!   libjpeg-turbo's own C allocations are not counted (its scan limit bounds them).
//!
//! `FASTDIFF_FUZZ_VERBOSE=1` prints every case before running it (the last line names the input
//! when the process aborts rather than panics).
//!
//! Length: the default `cargo test` run does `FASTDIFF_FUZZ_CASES` cases (default 200 000) or stops
//! after `FASTDIFF_FUZZ_SECONDS` (default 40), whichever comes first; both are deterministic from
//! `FASTDIFF_FUZZ_SEED` (default 0). For a long run, `make fuzz` (an hour, a new seed each time), or
//! e.g. overnight in release mode:
//!
//! ```sh
//! FASTDIFF_FUZZ_CASES=2000000 FASTDIFF_FUZZ_SECONDS=28800 FASTDIFF_FUZZ_SEED=$RANDOM \
//!   FASTDIFF_FUZZ_SEEDS=~/.cache/fastdiff/corpus/wallpapers \
//!   cargo test --release -p fastdiff-core --test fuzz -- --nocapture
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fastdiff_core::decode::{probe_bytes, DecodeOptions, Decoder};
use fastdiff_core::transform::{CropMode, FilterType, OutSlot, Placement, Transformer};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use turbojpeg::{Compressor, PixelFormat, Subsamp};

// ---- counting allocator --------------------------------------------------------------------------

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

fn grew(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Seeds made by [`seeds`] itself (before any from `FASTDIFF_FUZZ_SEEDS`).
const BUILT_IN_SEEDS: usize = 24;

/// Cases whose input still decoded (reported, so a run that only exercises error paths shows).
static DECODED: AtomicUsize = AtomicUsize::new(0);

/// Most live heap one case may add on top of what was live before it.
const CASE_HEAP_LIMIT: usize = 512 << 20;
/// Decode limit of the fuzz run: large enough for every seed, small enough to keep cases fast.
const MAX_PIXELS: u64 = 1 << 22;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---- seeds ---------------------------------------------------------------------------------------

fn gradient(w: u32, h: u32, channels: usize) -> Vec<u8> {
    (0..w * h)
        .flat_map(|i| {
            let (x, y) = (i % w, i / w);
            let px = [
                (x * 255 / w.max(2)) as u8,
                (y * 255 / h.max(2)) as u8,
                ((x + 2 * y) * 7 % 256) as u8,
                (255 - (x * 13 % 256)) as u8,
            ];
            px.into_iter().take(channels).collect::<Vec<_>>()
        })
        .collect()
}

fn jpeg(w: u32, h: u32, format: PixelFormat, setup: impl Fn(&mut Compressor)) -> Vec<u8> {
    let pixels = gradient(w, h, format.size());
    let mut c = Compressor::new().unwrap();
    c.set_quality(85).unwrap();
    setup(&mut c);
    let image = turbojpeg::Image {
        pixels: pixels.as_slice(),
        width: w as usize,
        pitch: w as usize * format.size(),
        height: h as usize,
        format,
    };
    c.compress_to_vec(image).unwrap()
}

/// `jpeg` with an APP1 EXIF segment (big-endian TIFF, IFD0 holding only Orientation) after SOI.
fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    let mut tiff = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01".to_vec();
    tiff.extend_from_slice(&[0x01, 0x12, 0, 3, 0, 0, 0, 1]);
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((tiff.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&tiff);
    out.extend_from_slice(&jpeg[2..]);
    out
}

fn encode(
    w: u32,
    h: u32,
    data: &[u8],
    color: image::ExtendedColorType,
    format: image::ImageFormat,
) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    match format {
        image::ImageFormat::Png => image::ImageEncoder::write_image(
            image::codecs::png::PngEncoder::new(&mut out),
            data,
            w,
            h,
            color,
        ),
        image::ImageFormat::Bmp => image::ImageEncoder::write_image(
            image::codecs::bmp::BmpEncoder::new(&mut out),
            data,
            w,
            h,
            color,
        ),
        image::ImageFormat::Tiff => image::ImageEncoder::write_image(
            image::codecs::tiff::TiffEncoder::new(&mut out),
            data,
            w,
            h,
            color,
        ),
        image::ImageFormat::Gif => image::ImageEncoder::write_image(
            image::codecs::gif::GifEncoder::new(&mut out),
            data,
            w,
            h,
            color,
        ),
        _ => image::ImageEncoder::write_image(
            image::codecs::webp::WebPEncoder::new_lossless(&mut out),
            data,
            w,
            h,
            color,
        ),
    }
    .unwrap();
    out.into_inner()
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut c = (data.len() as u32).to_be_bytes().to_vec();
    c.extend_from_slice(kind);
    c.extend_from_slice(data);
    c.extend_from_slice(&crc32fast::hash(&c[4..]).to_be_bytes());
    c
}

/// A 16x16 4-bit palette PNG with a tRNS chunk (the `image` crate cannot write palettes); the
/// image data is a stored (uncompressed) zlib stream.
fn palette_png() -> Vec<u8> {
    let (w, h) = (16u32, 16u32);
    let mut raw = Vec::new();
    for y in 0..h {
        raw.push(0);
        for x in (0..w).step_by(2) {
            raw.push((((x + y) % 16) << 4 | ((x + 1 + y) % 16)) as u8);
        }
    }
    let mut z = vec![0x78, 0x01, 1];
    z.extend_from_slice(&(raw.len() as u16).to_le_bytes());
    z.extend_from_slice(&(!(raw.len() as u16)).to_le_bytes());
    z.extend_from_slice(&raw);
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in &raw {
        a = (a + u32::from(byte)) % 65521;
        b = (b + a) % 65521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[4, 3, 0, 0, 0]);
    let plte: Vec<u8> = (0..16u8)
        .flat_map(|i| [i * 16, 255 - i * 16, i * 8])
        .collect();
    let trns: Vec<u8> = (0..16u8).map(|i| i * 17).collect();
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [
        (b"IHDR", ihdr),
        (b"PLTE", plte),
        (b"tRNS", trns),
        (b"IDAT", z),
        (b"IEND", Vec::new()),
    ] {
        out.extend(png_chunk(kind, &data));
    }
    out
}

fn seeds() -> Vec<Vec<u8>> {
    use image::ExtendedColorType as C;
    use image::ImageFormat::{Bmp, Gif, Png, Tiff, WebP};
    let mut s = vec![
        jpeg(48, 32, PixelFormat::RGB, |c| {
            c.set_subsamp(Subsamp::None).unwrap()
        }),
        jpeg(48, 32, PixelFormat::RGB, |c| {
            c.set_subsamp(Subsamp::Sub2x2).unwrap()
        }),
        jpeg(40, 24, PixelFormat::RGB, |c| {
            c.set_subsamp(Subsamp::Sub2x1).unwrap()
        }),
        jpeg(48, 32, PixelFormat::RGB, |c| {
            c.set_progressive(true).unwrap()
        }),
        jpeg(32, 32, PixelFormat::GRAY, |c| {
            c.set_subsamp(Subsamp::Gray).unwrap()
        }),
        jpeg(32, 16, PixelFormat::CMYK, |c| {
            c.set_subsamp(Subsamp::None).unwrap()
        }),
        with_exif_orientation(&jpeg(48, 32, PixelFormat::RGB, |_| {}), 6),
        with_exif_orientation(&jpeg(24, 40, PixelFormat::RGB, |_| {}), 3),
        // Large enough for every DCT scale (1/8 .. 1) to be chosen by some `cover`.
        with_exif_orientation(&jpeg(320, 200, PixelFormat::RGB, |_| {}), 8),
        encode(24, 16, &gradient(24, 16, 3), C::Rgb8, Png),
        encode(160, 96, &gradient(160, 96, 3), C::Rgb8, Png),
        encode(24, 16, &gradient(24, 16, 4), C::Rgba8, Png),
        encode(16, 16, &gradient(16, 16, 2), C::La8, Png),
        encode(16, 16, &gradient(16, 16, 1), C::L8, Png),
        encode(16, 8, &gradient(16, 16, 3), C::Rgb16, Png),
        encode(16, 16, &gradient(16, 16, 2), C::L16, Png),
        palette_png(),
        encode(24, 16, &gradient(24, 16, 4), C::Rgba8, WebP),
        encode(24, 16, &gradient(24, 16, 3), C::Rgb8, WebP),
        encode(24, 16, &gradient(24, 16, 3), C::Rgb8, Bmp),
        encode(24, 16, &gradient(24, 16, 4), C::Rgba8, Bmp),
        encode(24, 16, &gradient(24, 16, 3), C::Rgb8, Tiff),
        encode(16, 16, &gradient(16, 16, 2), C::L16, Tiff),
        encode(24, 16, &gradient(24, 16, 4), C::Rgba8, Gif),
    ];
    if let Some(dir) = std::env::var_os("FASTDIFF_FUZZ_SEEDS") {
        let mut extra: Vec<_> = walk(Path::new(&dir));
        extra.sort();
        for path in extra {
            match std::fs::read(&path) {
                Ok(bytes) if bytes.len() <= 4 << 20 => s.push(bytes),
                _ => {}
            }
        }
    }
    s
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

// ---- mutations -----------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit {
        at: usize,
        bit: u8,
    },
    SetByte {
        at: usize,
        value: u8,
    },
    /// Overwrite 4 bytes big-endian with a boundary value (size and length fields).
    Boundary {
        at: usize,
        value: u32,
    },
    Truncate {
        at: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Delete {
        at: usize,
        len: usize,
    },
    /// Copy `len` bytes from another seed at `from` over `at`.
    Splice {
        seed: usize,
        from: usize,
        at: usize,
        len: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let boundary = prop::sample::select(vec![
        0u32,
        1,
        2,
        0x7F,
        0x80,
        0xFF,
        0x100,
        0x7FFF,
        0x8000,
        0xFFFF,
        0x1_0000,
        30000,
        0x7FFF_FFFF,
        0x8000_0000,
        0xFFFF_FFFF,
    ]);
    prop_oneof![
        3 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::SetByte { at, value }),
        2 => (any::<usize>(), boundary).prop_map(|(at, value)| Mutation::Boundary { at, value }),
        1 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<usize>(), 1usize..64).prop_map(|(at, len)| Mutation::Delete { at, len }),
        1 => (any::<usize>(), any::<usize>(), any::<usize>(), 1usize..256)
            .prop_map(|(seed, from, at, len)| Mutation::Splice { seed, from, at, len }),
    ]
}

fn apply(mut data: Vec<u8>, mutations: &[Mutation], seeds: &[Vec<u8>]) -> Vec<u8> {
    for m in mutations {
        let n = data.len().max(1);
        match m {
            Mutation::FlipBit { at, bit } => {
                if let Some(b) = data.get_mut(at % n) {
                    *b ^= 1 << bit;
                }
            }
            Mutation::SetByte { at, value } => {
                if let Some(b) = data.get_mut(at % n) {
                    *b = *value;
                }
            }
            Mutation::Boundary { at, value } => {
                let at = at % n;
                for (i, b) in value.to_be_bytes().into_iter().enumerate() {
                    if let Some(d) = data.get_mut(at + i) {
                        *d = b;
                    }
                }
            }
            Mutation::Truncate { at } => data.truncate(at % n),
            Mutation::Insert { at, bytes } => {
                let at = at % (data.len() + 1);
                data.splice(at..at, bytes.iter().copied());
            }
            Mutation::Delete { at, len } => {
                let at = at % n;
                let end = (at + len).min(data.len());
                if at < end {
                    data.drain(at..end);
                }
            }
            Mutation::Splice {
                seed,
                from,
                at,
                len,
            } => {
                let src = &seeds[seed % seeds.len()];
                if src.is_empty() || data.is_empty() {
                    continue;
                }
                let from = from % src.len();
                let at = at % data.len();
                let len = (*len).min(src.len() - from).min(data.len() - at);
                data[at..at + len].copy_from_slice(&src[from..from + len]);
            }
        }
    }
    data
}

// ---- one case ------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Case {
    seed: usize,
    mutations: Vec<Mutation>,
    orientation: u8,
    cover: (u32, u32),
    bucket: (u32, u32),
    crop: (bool, f64, f64),
    flip: bool,
    filter: usize,
    dtype: usize,
}

fn case(n_seeds: usize) -> impl Strategy<Value = Case> {
    (
        0..n_seeds,
        prop::collection::vec(mutation(), 0..8),
        0u8..10,
        (0u32..200, 0u32..200),
        (1u32..=16, 1u32..=16),
        (any::<bool>(), 0.0f64..1.0, 0.0f64..1.0),
        any::<bool>(),
        0usize..5,
        0usize..4,
    )
        .prop_map(
            |(seed, mutations, orientation, cover, bucket, crop, flip, filter, dtype)| Case {
                seed,
                mutations,
                orientation,
                cover,
                bucket: (bucket.0 * 8, bucket.1 * 8),
                crop,
                flip,
                filter,
                dtype,
            },
        )
}

struct Tools {
    decoder: Decoder,
    transformers: Vec<Transformer>,
}

/// Probe, decode and transform one input. Errors are fine; the result is only sanity-checked.
fn run_case(tools: &mut Tools, bytes: &[u8], c: &Case) -> Result<(), TestCaseError> {
    let path = Path::new("fuzz/input");
    // The probe's header is what the scan would have stored; decode the way the loader does.
    let orientation = match probe_bytes(bytes, path) {
        Ok(h) => {
            prop_assert!(
                h.width > 0 && h.height > 0,
                "probe gave an empty size {h:?}"
            );
            h.orientation
        }
        Err(_) => c.orientation,
    };
    let opts = DecodeOptions {
        background: [255, 128, 0],
        max_pixels: MAX_PIXELS,
        ..Default::default()
    };
    let Ok(img) = tools
        .decoder
        .decode(bytes, path, orientation, c.cover, &opts)
    else {
        return Ok(());
    };
    DECODED.fetch_add(1, Ordering::Relaxed);
    prop_assert!(img.width > 0 && img.height > 0);
    prop_assert!(u64::from(img.width) * u64::from(img.height) <= MAX_PIXELS);
    prop_assert_eq!(img.data.len(), img.width as usize * img.height as usize * 3);
    let crop = if c.crop.0 {
        CropMode::Random
    } else {
        CropMode::Center
    };
    // Placement from the decoded size (a DCT-downscaled decode stands for a larger upright image).
    let p = Placement::new(
        (img.width, img.height),
        c.bucket,
        crop,
        c.crop.1,
        c.crop.2,
        c.flip,
    );
    prop_assert!(p.resized.0 >= c.bucket.0 && p.resized.1 >= c.bucket.1);
    prop_assert!(p.crop_left + c.bucket.0 <= p.resized.0 && p.crop_top + c.bucket.1 <= p.resized.1);
    let n = 3 * c.bucket.0 as usize * c.bucket.1 as usize;
    let t = &mut tools.transformers[c.filter];
    let result = match c.dtype {
        0 => t.apply(&img, &p, c.bucket, OutSlot::U8(&mut vec![0u8; n])),
        1 => {
            let mut out = vec![f32::NAN; n];
            let r = t.apply(&img, &p, c.bucket, OutSlot::F32(&mut out));
            if r.is_ok() {
                prop_assert!(
                    out.iter().all(|v| (-1.0..=1.0).contains(v)),
                    "f32 out of [-1, 1]"
                );
            }
            r
        }
        2 => t.apply(&img, &p, c.bucket, OutSlot::F16(&mut vec![0u16; n])),
        _ => t.apply(&img, &p, c.bucket, OutSlot::BF16(&mut vec![0u16; n])),
    };
    prop_assert!(
        result.is_ok(),
        "transform of a decoded image failed: {result:?}"
    );
    Ok(())
}

#[test]
fn decode_and_transform_survive_mutated_files() {
    let seeds = Arc::new(seeds());
    let cases = env_u64("FASTDIFF_FUZZ_CASES", 200_000) as u32;
    let budget = Duration::from_secs(env_u64("FASTDIFF_FUZZ_SECONDS", 40));
    let case_timeout = Duration::from_secs(env_u64("FASTDIFF_FUZZ_CASE_TIMEOUT", 20));
    let seed = env_u64("FASTDIFF_FUZZ_SEED", 0);
    let verbose = std::env::var_os("FASTDIFF_FUZZ_VERBOSE").is_some();

    // Watchdog: the input being run and when it started (ms since `t0`; u64::MAX = idle).
    let t0 = Instant::now();
    let started = Arc::new(AtomicU64::new(u64::MAX));
    let current: Arc<Mutex<String>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (started, current, done) = (started.clone(), current.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let s = started.load(Ordering::Relaxed);
                if s != u64::MAX
                    && t0.elapsed().as_millis() as u64 - s > case_timeout.as_millis() as u64
                {
                    let input = current.lock().map(|c| c.clone()).unwrap_or_default();
                    eprintln!("fuzz case hung for over {case_timeout:?}: {input}");
                    std::process::abort();
                }
            }
        })
    };

    let mut rng_seed = [0u8; 32];
    rng_seed[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &rng_seed));
    let tools = std::cell::RefCell::new(Tools {
        decoder: Decoder::new().unwrap(),
        transformers: [
            FilterType::Lanczos3,
            FilterType::CatmullRom,
            FilterType::Bilinear,
            FilterType::Box,
            FilterType::Nearest,
        ]
        .map(Transformer::new)
        .into(),
    });
    let ran = AtomicUsize::new(0);
    let result = runner.run(&case(seeds.len()), |c| {
        if t0.elapsed() > budget {
            return Ok(()); // time budget spent: the remaining cases are no-ops
        }
        ran.fetch_add(1, Ordering::Relaxed);
        let bytes = apply(seeds[c.seed].clone(), &c.mutations, &seeds);
        if let Ok(mut cur) = current.lock() {
            *cur = format!("{c:?}");
            if verbose {
                // The last line before an abort (a non-unwinding panic, e.g. a failed unsafe
                // precondition inside a dependency) names the input.
                eprintln!("case: {cur}");
            }
        }
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        started.store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        let r = run_case(&mut tools.borrow_mut(), &bytes, &c);
        started.store(u64::MAX, Ordering::Relaxed);
        let grown = PEAK.load(Ordering::Relaxed).saturating_sub(base);
        prop_assert!(
            grown <= CASE_HEAP_LIMIT,
            "case grew the heap by {grown} bytes"
        );
        r
    });
    done.store(true, Ordering::Relaxed);
    watchdog.join().unwrap();
    eprintln!(
        "fuzz: {} of {cases} cases ({} decoded and transformed) in {:.1}s over {} seeds \
         (FASTDIFF_FUZZ_SEED={seed})",
        ran.load(Ordering::Relaxed),
        DECODED.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
        seeds.len()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn every_seed_decodes_before_mutation() {
    let mut decoder = Decoder::new().unwrap();
    for (i, s) in seeds().iter().enumerate().take(BUILT_IN_SEEDS) {
        let h = probe_bytes(s, Path::new("seed")).unwrap_or_else(|e| panic!("seed {i}: {e}"));
        let img = decoder
            .decode(
                s,
                Path::new("seed"),
                h.orientation,
                (0, 0),
                &DecodeOptions::default(),
            )
            .unwrap_or_else(|e| panic!("seed {i}: {e}"));
        assert_eq!((img.width, img.height), h.upright_size(), "seed {i}");
    }
}
