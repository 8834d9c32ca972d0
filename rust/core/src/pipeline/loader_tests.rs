//! Tests of `loader.rs` (kept apart to keep that file short).

use super::super::testkit::*;
use super::*;

#[test]
fn loader_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.png"), b"nope").unwrap();
    std::fs::write(dir.path().join("b.jpg"), b"\xFF\xD8\xFF").unwrap();
    let err = Loader::new(dir.path(), opts()).unwrap_err();
    assert_eq!(err.code(), SkipCode::NoImages);
    assert!(
        err.to_string().contains("all 2 image files were skipped"),
        "{err}"
    );
    assert!(err.to_string().contains("a.png"), "{err}");

    let bad = |o: LoaderOptions, name: &str| {
        let err = Loader::new(dir.path(), o).unwrap_err();
        assert_eq!(err.code(), SkipCode::InvalidArgument);
        assert!(err.to_string().contains(name), "{err}");
    };
    bad(
        LoaderOptions {
            batch_size: 0,
            ..opts()
        },
        "batch_size",
    );
    bad(
        LoaderOptions {
            prefetch: 0,
            ..opts()
        },
        "prefetch",
    );
    bad(
        LoaderOptions {
            flip_prob: 1.5,
            ..opts()
        },
        "flip_prob",
    );
    bad(
        LoaderOptions {
            flip_prob: f64::NAN,
            ..opts()
        },
        "flip_prob",
    );
    bad(
        LoaderOptions {
            max_pixels: 0,
            ..opts()
        },
        "max_pixels",
    );
    bad(
        LoaderOptions {
            bucket_step: 0,
            ..opts()
        },
        "bucket_step",
    );
    bad(
        LoaderOptions {
            resolution: 0,
            ..opts()
        },
        "resolution",
    );
    bad(
        LoaderOptions {
            min_bucket_side: Some(1000),
            ..opts()
        },
        "min_bucket_side",
    );
    bad(
        LoaderOptions {
            caption_extensions: vec!["txt".into()],
            ..opts()
        },
        "caption_extensions",
    );
    assert_eq!(LoaderOptions::default().validate().ok(), Some(()));
}

#[test]
fn subsets_repeat_carry_their_flag_and_options_and_are_reported() {
    let (train, _) = colour_dataset(3);
    let (reg, _) = colour_dataset(2);
    for i in 0..3 {
        std::fs::write(train.path().join(format!("c{i:02}.txt")), "sks, a, b, c").unwrap();
    }
    let subsets = vec![
        Subset {
            num_repeats: 4,
            flip_prob: Some(1.0),
            caption: CaptionOptions {
                keep_tokens: 1,
                shuffle_caption: true,
                ..CaptionOptions::default()
            },
            ..Subset::new(train.path())
        },
        Subset {
            is_reg: true,
            ..Subset::new(reg.path())
        },
    ];
    let o = LoaderOptions {
        batch_size: 2,
        ..opts()
    };
    let loader = Loader::from_subsets(subsets, o.clone()).unwrap();
    assert_eq!(loader.images().len(), 5);
    let r = loader.report();
    assert_eq!((r.loaded, r.samples), (5, 3 * 4 + 2));
    let per: Vec<(usize, usize, bool)> = r
        .subsets
        .iter()
        .map(|s| (s.images, s.num_repeats, s.is_reg))
        .collect();
    assert_eq!(per, [(3, 4, false), (2, 1, true)]);
    let mut uses = vec![0; 5];
    let mut orders = HashSet::new();
    for b in collect(loader.iter_epoch(0, 0)) {
        for s in &b.samples {
            uses[s.index] += 1;
            assert_eq!(s.is_reg, s.subset == 1);
            assert_eq!(s.is_reg, s.path.starts_with(reg.path()));
            if s.subset == 0 {
                assert!(s.caption.starts_with("sks, "), "{}", s.caption);
                orders.insert(s.caption.clone());
            } else {
                assert_eq!(s.caption, "");
            }
        }
    }
    assert_eq!(uses, [4, 4, 4, 1, 1]);
    assert!(
        orders.len() > 1,
        "repeats get their own tag order: {orders:?}"
    );

    // The digest ignores where the folders are but not what they hold or the subset options.
    let digest = loader.dataset_digest();
    let again = Loader::from_subsets(loader.subsets().to_vec(), o.clone()).unwrap();
    assert_eq!(again.dataset_digest(), digest);
    let one = Loader::new(train.path(), o.clone()).unwrap();
    assert_ne!(one.dataset_digest(), digest);
    let moved = tempfile::tempdir().unwrap();
    for e in one.images() {
        std::fs::copy(&e.path, moved.path().join(e.path.file_name().unwrap())).unwrap();
    }
    assert_eq!(
        Loader::new(moved.path(), o).unwrap().dataset_digest(),
        one.dataset_digest()
    );
}

#[test]
fn ranks_share_steps_and_buckets_and_split_the_samples() {
    let dir = dataset();
    let run = |rank| {
        let o = LoaderOptions {
            rank,
            world_size: 2,
            remainder: Remainder::Drop,
            ..opts()
        };
        let loader = Loader::new(dir.path(), o).unwrap();
        (loader.num_batches(), collect(loader.iter_epoch(2, 0)))
    };
    let (n0, b0) = run(0);
    let (n1, b1) = run(1);
    assert_eq!((n0, b0.len()), (n1, b1.len()));
    let mut seen = HashSet::new();
    for (x, y) in b0.iter().zip(&b1) {
        assert_eq!(x.bucket, y.bucket);
        assert_eq!(x.samples.len(), y.samples.len());
        for s in x.samples.iter().chain(&y.samples) {
            assert!(seen.insert(s.index), "sample {} twice", s.index);
        }
    }
    let bad = Loader::new(
        dir.path(),
        LoaderOptions {
            rank: 2,
            world_size: 2,
            ..opts()
        },
    )
    .unwrap_err();
    assert!(bad.to_string().contains("rank"), "{bad}");
}

#[test]
fn no_upscale_never_enlarges_and_skips_images_smaller_than_a_step() {
    let dir = tempfile::tempdir().unwrap();
    // Resolution 64, step 16: the usual buckets have sides 32..=128.
    for (name, w, h) in [
        ("big.png", 300, 290),
        ("small.png", 40, 50),
        ("thin.png", 8, 100),
        ("wide.png", 200, 20),
    ] {
        write_image(&dir.path().join(name), w, h, F::Png);
    }
    let loader = Loader::new(
        dir.path(),
        LoaderOptions {
            no_upscale: true,
            ..opts()
        },
    )
    .unwrap();
    let report = loader.report();
    assert_eq!((report.found, report.loaded), (4, 3));
    assert_eq!(report.skipped.len(), 1);
    let skip = &report.skipped[0];
    assert_eq!(skip.code, SkipCode::TooSmall);
    assert!(skip.message.contains("thin.png") && skip.message.contains("8x100"));
    let mut got: Vec<(String, (u32, u32))> = collect(loader.iter_epoch(0, 0))
        .into_iter()
        .flat_map(|b| b.samples)
        .map(|s| {
            let name = s.path.file_name().unwrap().to_string_lossy().into_owned();
            (name, s.target_size)
        })
        .collect();
    got.sort();
    // (h, w): big covers its usual square bucket; small and wide round down to whole steps
    // (wide is under min_side 32 high and capped at max_side 128, so not in the usual list).
    assert_eq!(
        got,
        [
            ("big.png".into(), (64, 64)),
            ("small.png".into(), (48, 32)),
            ("wide.png".into(), (16, 128)),
        ]
    );
    assert!(loader.buckets().contains(&Bucket {
        width: 128,
        height: 16
    }));
    let strict = Loader::new(
        dir.path(),
        LoaderOptions {
            no_upscale: true,
            on_error: OnError::Raise,
            ..opts()
        },
    )
    .unwrap_err();
    assert_eq!(strict.code(), SkipCode::TooSmall);
}

#[test]
fn validation_split_holds_out_a_fixed_set_the_other_loader_yields() {
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..40).map(|i| format!("img{i:02}.png")).collect();
    for name in &names {
        write_image(&dir.path().join(name), 64, 64, F::Png);
    }
    let split = |validation: bool| LoaderOptions {
        validation_split: 0.25,
        validation,
        ..opts()
    };
    let names_of = |loader: &Loader| -> Vec<String> {
        let mut got: Vec<String> = loader
            .images()
            .iter()
            .map(|e| e.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        got.sort();
        got
    };
    let train = Loader::new(dir.path(), split(false)).unwrap();
    let val = Loader::new(dir.path(), split(true)).unwrap();
    let (t, v) = (names_of(&train), names_of(&val));
    // Disjoint, together every image, each held out by its own (seed, path) draw.
    let mut all = [t.clone(), v.clone()].concat();
    all.sort();
    assert_eq!(all, names);
    let want: Vec<String> = names
        .iter()
        .filter(|n| held_out(0, 0.25, n))
        .cloned()
        .collect();
    assert_eq!(v, want);
    assert!(!v.is_empty() && v.len() < 20, "{} held out of 40", v.len());
    let (rt, rv) = (train.report(), val.report());
    assert_eq!((rt.found, rt.loaded, rt.held_out), (40, t.len(), v.len()));
    assert_eq!((rv.found, rv.loaded, rv.held_out), (40, v.len(), t.len()));
    // An added image moves no other one; another seed holds out another set.
    write_image(&dir.path().join("zz.png"), 64, 64, F::Png);
    let more = Loader::new(dir.path(), split(true)).unwrap();
    let grown = names_of(&more);
    assert!(v.iter().all(|n| grown.contains(n)) && grown.len() <= v.len() + 1);
    let reseeded = Loader::new(
        dir.path(),
        LoaderOptions {
            seed: 7,
            ..split(true)
        },
    )
    .unwrap();
    assert_ne!(names_of(&reseeded), v);
    for (bad, message) in [
        (
            LoaderOptions {
                validation_split: 1.0,
                ..opts()
            },
            "validation_split",
        ),
        (
            LoaderOptions {
                validation: true,
                ..opts()
            },
            "validation=True",
        ),
    ] {
        let err = Loader::new(dir.path(), bad).unwrap_err();
        assert!(err.to_string().contains(message), "{err}");
    }
}

#[test]
fn rebucket_equals_a_fresh_scan_and_reads_no_file() {
    let dir = dataset();
    let at = |resolution| LoaderOptions {
        resolution,
        min_bucket_fill: Some(2),
        max_extra_crop: 0.3,
        ..opts()
    };
    let base = Loader::new(dir.path(), at(64)).unwrap();
    // Iterated while the files exist: the same batches, pixels included.
    let fresh = Loader::new(dir.path(), at(96)).unwrap();
    let rebucketed = base.rebucket(at(96)).unwrap();
    assert_ne!(fresh.buckets(), base.buckets());
    assert_eq!(
        collect(rebucketed.iter_epoch(1, 0)),
        collect(fresh.iter_epoch(1, 0))
    );
    let fresh: Vec<Loader> = [32, 96, 128]
        .into_iter()
        .map(|r| Loader::new(dir.path(), at(r)).unwrap())
        .collect();
    let root = dir.path().to_path_buf();
    drop(dir);
    assert!(!root.exists());
    for want in &fresh {
        let got = base.rebucket(want.options().clone()).unwrap();
        assert_eq!(got.buckets(), want.buckets());
        assert_eq!(got.images(), want.images());
        assert_eq!(got.inner.bucket_of, want.inner.bucket_of);
        assert_eq!(got.inner.sample_bucket, want.inner.sample_bucket);
        assert_eq!(got.num_batches(), want.num_batches());
        assert_eq!(got.report(), want.report());
        assert_eq!(got.dataset_digest(), want.dataset_digest());
        let s = want.options().sampling();
        for epoch in 0..3 {
            let plan = |l: &Loader| {
                sampler::plan_epoch(&l.inner.sample_bucket, l.buckets().len(), &s, epoch)
            };
            assert_eq!(plan(&got), plan(want));
        }
    }
    // A rebucketed loader rebuckets from the same scan (back to where it started).
    let back = fresh[0].rebucket(at(64)).unwrap();
    assert_eq!(back.inner.sample_bucket, base.inner.sample_bucket);
    let err = base
        .rebucket(LoaderOptions {
            max_pixels: 1000,
            ..at(64)
        })
        .unwrap_err();
    assert_eq!(err.code(), SkipCode::InvalidArgument);
    assert!(err.to_string().contains("max_pixels"), "{err}");
}

#[test]
fn loader_is_send_sync_and_iterator_is_send() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Loader>();
    send::<EpochIter>();
}
