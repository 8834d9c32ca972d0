//! Tests of the folder scan (`super`).

use super::*;
use crate::decode::ImageFormat;
use crate::error::SkipCode;
use std::os::unix::fs::symlink;

/// Write a `w`x`h` RGB image whose pixel (x, y) is `color(x, y)`, encoded as `format`
/// (whatever the file name says). JPEG at quality 95.
pub(crate) fn write_image_with(
    path: &Path,
    w: u32,
    h: u32,
    format: image::ImageFormat,
    color: impl Fn(u32, u32) -> [u8; 3],
) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb(color(x, y)));
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    match format {
        image::ImageFormat::Jpeg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut file, 95)
                .encode_image(&img)
                .unwrap();
        }
        other => img.write_to(&mut file, other).unwrap(),
    }
}

/// A gradient image (distinct pixels, so crops and flips are visible).
pub(crate) fn write_image(path: &Path, w: u32, h: u32, format: image::ImageFormat) {
    write_image_with(path, w, h, format, |x, y| {
        [
            (x * 7 % 256) as u8,
            (y * 5 % 256) as u8,
            ((x + y) % 256) as u8,
        ]
    });
}

fn names(root: &Path, paths: impl IntoIterator<Item = PathBuf>) -> Vec<String> {
    paths
        .into_iter()
        .map(|p| p.strip_prefix(root).unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn scan_finds_images_skips_bad_ones_and_pairs_captions() {
    use image::ImageFormat as F;
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    let put = |name: &str, bytes: &[u8]| {
        let p = r.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    };
    write_image(&r.join("a.jpg"), 40, 30, F::Jpeg);
    put("a.txt", b"a caption\r\n");
    write_image(&r.join("B.PNG"), 30, 40, F::Png);
    put("B.caption", b"bee");
    write_image(&r.join("c.JPEG"), 64, 64, F::Jpeg);
    put("c.txt", b"first");
    put("c.caption", b"second");
    write_image(&r.join("d.Jfif"), 50, 20, F::Jpeg);
    write_image(&r.join("e.webp"), 20, 20, F::WebP);
    put("e.txt", b"it\x92s");
    write_image(&r.join("nested/sub/f.png"), 10, 10, F::Png);
    put("nested/sub/f.txt", b"");
    symlink(r.join("nested"), r.join("linkdir")).unwrap();
    // JPEG bytes behind a .png name: the format comes from the magic bytes.
    write_image(&r.join("renamed.png"), 12, 8, F::Jpeg);
    // Ignored: hidden files and folders, AppleDouble stubs, Finder metadata, other files.
    write_image(&r.join(".hidden.png"), 10, 10, F::Png);
    write_image(&r.join(".hiddendir/g.png"), 10, 10, F::Png);
    put("._a.jpg", b"\x00\x05\x16\x07AppleDouble");
    put("nested/._f.png", b"\x00\x05\x16\x07AppleDouble");
    put(".DS_Store", b"\x00\x00\x00\x01Bud1");
    put("notes.txt", b"not an image");
    put("readme.md", b"# readme");
    symlink(r.join("nowhere.txt"), r.join("dangling.txt")).unwrap();
    // Skipped, with reasons.
    symlink(r.join("nowhere.jpg"), r.join("broken.jpg")).unwrap();
    put("corrupt.png", b"this is not a png");
    write_image(&r.join("big.png"), 100, 100, F::Png);
    write_image(&r.join("h.jpg"), 10, 10, F::Jpeg);
    std::fs::create_dir(r.join("h.txt")).unwrap();

    let opts = ScanOptions {
        max_pixels: 5000,
        num_threads: 3,
        ..ScanOptions::default()
    };
    let s = scan(r, &opts).unwrap();
    assert_eq!(s.root, r);
    assert_eq!(
        names(r, s.images.iter().map(|e| e.path.clone())),
        [
            "B.PNG",
            "a.jpg",
            "c.JPEG",
            "d.Jfif",
            "e.webp",
            "linkdir/sub/f.png",
            "nested/sub/f.png",
            "renamed.png"
        ]
    );
    let skipped: Vec<(String, SkipCode)> = s
        .skipped
        .iter()
        .map(|k| {
            let name = k
                .path
                .strip_prefix(r)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (name, k.code)
        })
        .collect();
    assert_eq!(
        skipped,
        [
            ("big.png".to_owned(), SkipCode::TooLarge),
            ("broken.jpg".to_owned(), SkipCode::Io),
            ("corrupt.png".to_owned(), SkipCode::Decode),
            ("h.jpg".to_owned(), SkipCode::Io),
        ]
    );
    // The unreadable caption is named in the image's skip message.
    assert!(
        s.skipped[3].message.contains("h.txt"),
        "{}",
        s.skipped[3].message
    );
    assert!(s.skipped[1].message.contains("broken.jpg"));
    assert_eq!(s.found, 12);
    assert_eq!(s.found, s.images.len() + s.skipped.len());
    // Caption-named files (the link's copy of f.txt and the dangling .txt link included), the
    // readme, and the hidden entries (linkdir's ._f.png too).
    let passed_over = PassedOver {
        caption_files: 9,
        other_files: 1,
        hidden: 6,
    };
    assert_eq!(s.passed_over, passed_over);

    let by_name = |n: &str| s.images.iter().find(|e| e.path == r.join(n)).unwrap();
    let a = by_name("a.jpg");
    assert_eq!(
        (a.header.format, a.header.width, a.header.height),
        (ImageFormat::Jpeg, 40, 30)
    );
    assert_eq!((a.caption.as_str(), a.caption_found), ("a caption", true));
    assert_eq!(by_name("B.PNG").header.format, ImageFormat::Png);
    assert_eq!(by_name("B.PNG").caption, "bee");
    assert_eq!(by_name("c.JPEG").caption, "first");
    assert!(!by_name("d.Jfif").caption_found);
    assert_eq!(by_name("d.Jfif").header.format, ImageFormat::Jpeg);
    let e = by_name("e.webp");
    assert_eq!(e.header.format, ImageFormat::WebP);
    assert_eq!(e.caption, "it\u{2019}s");
    assert!(e.caption_fallback_encoding);
    let f = by_name("nested/sub/f.png");
    assert_eq!((f.caption.as_str(), f.caption_found), ("", true));
    assert_eq!(by_name("renamed.png").header.format, ImageFormat::Jpeg);
    assert_eq!(s.captions_missing, 2);
    assert_eq!(s.captions_fallback_encoding, 1);
}

#[test]
fn images_are_found_by_magic_bytes_whatever_their_name() {
    use image::ImageFormat as F;
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    write_image(&r.join("photo"), 8, 6, F::Png);
    write_image(&r.join("scan.dat"), 8, 6, F::Jpeg);
    write_image(&r.join("sub/x.jpg.part"), 8, 6, F::Bmp);
    std::fs::write(r.join("photo.txt"), "BMW on a road").unwrap();
    std::fs::write(r.join("notes.md"), "BM is not a bitmap here").unwrap();
    std::fs::write(r.join("empty"), "").unwrap();
    let s = scan(r, &ScanOptions::default()).unwrap();
    assert_eq!(
        names(r, s.images.iter().map(|e| e.path.clone())),
        ["photo", "scan.dat", "sub/x.jpg.part"]
    );
    let formats: Vec<ImageFormat> = s.images.iter().map(|e| e.header.format).collect();
    assert_eq!(
        formats,
        [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Bmp]
    );
    // The caption-named file is never sniffed and pairs with the extensionless image.
    assert_eq!(s.images[0].caption, "BMW on a road");
    assert_eq!((s.found, s.skipped.len()), (3, 0));
    let passed_over = PassedOver {
        caption_files: 1,
        other_files: 2,
        hidden: 0,
    };
    assert_eq!(s.passed_over, passed_over);
}

#[test]
fn scan_is_the_same_for_any_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..20 {
        let fmt = if i % 2 == 0 {
            image::ImageFormat::Png
        } else {
            image::ImageFormat::Jpeg
        };
        write_image(
            &dir.path().join(format!("d{}/{i}.img.png", i % 3)),
            8 + i,
            9,
            fmt,
        );
    }
    let one = scan(
        dir.path(),
        &ScanOptions {
            num_threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let many = scan(
        dir.path(),
        &ScanOptions {
            num_threads: 4,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(one, many);
    assert_eq!(one.images.len(), 20);
    let paths: Vec<&PathBuf> = one.images.iter().map(|e| &e.path).collect();
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted);
    // A multi-dot name keeps its full stem for the caption: "3.img.png" -> "3.img.txt".
    assert_eq!(
        caption_path(Path::new("/x/3.img.png"), ".txt"),
        Path::new("/x/3.img.txt")
    );
}

#[test]
fn max_pixels_is_inclusive() {
    let dir = tempfile::tempdir().unwrap();
    write_image(&dir.path().join("a.png"), 10, 10, image::ImageFormat::Png);
    let at = |max_pixels| {
        let s = scan(
            dir.path(),
            &ScanOptions {
                max_pixels,
                ..Default::default()
            },
        )
        .unwrap();
        (s.images.len(), s.skipped.len())
    };
    assert_eq!(at(100), (1, 0));
    assert_eq!(at(99), (0, 1));
}

#[test]
fn symlink_loop_is_reported_not_followed_forever() {
    let dir = tempfile::tempdir().unwrap();
    write_image(&dir.path().join("sub/a.png"), 4, 4, image::ImageFormat::Png);
    symlink(dir.path(), dir.path().join("sub/loop")).unwrap();
    let s = scan(dir.path(), &ScanOptions::default()).unwrap();
    assert_eq!(s.images.len(), 1);
    assert_eq!(s.skipped.len(), 1);
    assert_eq!(s.skipped[0].path, dir.path().join("sub/loop"));
    assert_eq!(s.skipped[0].code, SkipCode::Io);
}

#[test]
fn hidden_root_is_scanned() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join(".dataset");
    write_image(&root.join("a.png"), 4, 4, image::ImageFormat::Png);
    assert_eq!(
        scan(&root, &ScanOptions::default()).unwrap().images.len(),
        1
    );
}

#[test]
fn no_images_and_bad_options_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let opts = ScanOptions::default();
    let missing = dir.path().join("missing");
    let err = scan(&missing, &opts).unwrap_err();
    assert_eq!(err.code(), SkipCode::NoImages);
    assert_eq!(err.path(), Some(missing.as_path()));

    std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
    write_image(
        &dir.path().join(".hidden.png"),
        4,
        4,
        image::ImageFormat::Png,
    );
    let err = scan(dir.path(), &opts).unwrap_err();
    assert_eq!(err.code(), SkipCode::NoImages);
    assert!(err.to_string().contains(".jpg"), "{err}");

    let err = scan(&dir.path().join("notes.txt"), &opts).unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");

    for bad in ["txt", ".", ""] {
        let o = ScanOptions {
            caption_extensions: vec![".txt".into(), bad.into()],
            ..ScanOptions::default()
        };
        let err = scan(dir.path(), &o).unwrap_err();
        assert!(err.to_string().contains("caption_extensions"), "{err}");
    }
}

#[test]
fn a_captions_map_replaces_caption_files() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.png"), dir.path().join("sub/b.png"));
    write_image_with(&a, 8, 8, image::ImageFormat::Png, |_, _| [1, 2, 3]);
    write_image_with(&b, 8, 8, image::ImageFormat::Png, |_, _| [1, 2, 3]);
    std::fs::write(dir.path().join("a.txt"), "from the file").unwrap();
    std::fs::write(dir.path().join("sub/b.txt"), "from the file").unwrap();
    let o = ScanOptions {
        captions: Some([(b.clone(), "from the map".to_owned())].into()),
        ..ScanOptions::default()
    };
    let s = scan(dir.path(), &o).unwrap();
    let got: Vec<(&Path, &str, bool)> = s
        .images
        .iter()
        .map(|e| (e.path.as_path(), e.caption.as_str(), e.caption_found))
        .collect();
    assert_eq!(
        got,
        [
            (a.as_path(), "", false),
            (b.as_path(), "from the map", true)
        ]
    );
    assert_eq!(s.captions_missing, 1);
}
