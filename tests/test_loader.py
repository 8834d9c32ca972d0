"""fastdiff.DataLoader on real images: coverage, shapes, captions, pixels against Pillow, bad input."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import fastdiff
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from reference import mean_abs_diff, reference_sample, upright_rgb

IMAGE_EXTS = {".jpg", ".jpeg", ".jfif", ".png", ".webp"}


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def only_batch(loader: fastdiff.DataLoader) -> dict:
    batches = list(loader)
    assert len(batches) == 1, [b["paths"] for b in batches]
    return batches[0]


def single(tmp_path: Path, src: Path) -> Path:
    """A folder holding just a copy of ``src``."""
    d = tmp_path / src.stem
    d.mkdir()
    shutil.copy(src, d / src.name)
    return d


def test_wallpaper_epoch_covers_every_image_once_with_valid_batches(wallpapers: Path) -> None:
    files = image_files(wallpapers)
    loader = fastdiff.DataLoader(wallpapers, resolution=512, batch_size=4, seed=3)
    seen: list[str] = []
    n_batches = 0
    for batch in loader:
        n_batches += 1
        pv = batch["pixel_values"]
        b, c, h, w = pv.shape
        assert pv.dtype == torch.float32 and pv.is_contiguous()
        assert c == 3 and 1 <= b <= 4
        assert h % 64 == 0 and w % 64 == 0 and h * w <= 512 * 512
        assert float(pv.min()) >= -1.0 and float(pv.max()) <= 1.0
        assert float(pv.std()) > 0.01  # real pixels, not a constant buffer
        assert len(batch["captions"]) == len(batch["paths"]) == b
        assert batch["target_sizes"] == [(h, w)] * b
        for path, caption, (oh, ow) in zip(
            batch["paths"], batch["captions"], batch["original_sizes"], strict=True
        ):
            assert caption == Path(path).with_suffix(".txt").read_text(encoding="utf-8").strip()
            with Image.open(path) as im:
                assert (ow, oh) == ImageOps.exif_transpose(im).size
        seen += batch["paths"]
    report = loader.report
    assert report["found"] == len(files)
    assert report["skipped"] == []
    assert report["loaded"] == len(files)
    assert sorted(seen) == sorted(str(p) for p in files)  # every image exactly once
    assert n_batches == len(loader)
    assert sum(n for _, n in report["images_per_bucket"]) == len(files)


def visible_content(path: Path, kind: str) -> bool:
    """Whether the upright image has real detail (and, for RGBA, real transparency) to compare."""
    with Image.open(path) as im:
        if kind == "png_rgba" and im.convert("RGBA").getextrema()[3][0] == 255:
            return False
    return float(np.asarray(upright_rgb(path)).std()) > 20


def pick(wallpapers: Path, want: str) -> Path:
    """The smallest wallpaper of a kind: jpeg, png_rgb, png_rgba, gray, webp."""
    for p in sorted(image_files(wallpapers), key=lambda p: p.stat().st_size):
        with Image.open(p) as im:
            fmt, mode = im.format, im.mode
            kind = {
                "JPEG": "gray" if mode == "L" else "jpeg",
                "PNG": "gray"
                if mode in ("L", "I;16")
                else ("png_rgba" if mode in ("RGBA", "LA", "P") else "png_rgb"),
                "WEBP": "webp",
            }.get(fmt)
        if kind == want and min(im.size) >= 256 and visible_content(p, want):
            return p
    pytest.fail(f"the corpus has no {want} image")


# Measured mean |fastdiff - Pillow| (0-255 levels), resolution 256 / 512: RGB JPEG 0.48 / 0.50 (decoded at a
# DCT scale, then Lanczos, vs full decode + Lanczos), gray JPEG 2.07 / 0.94 (fine stripes), PNG 0.17 / 0.24,
# RGBA PNG 0.12 / 0.14, WebP 0.09 / 0.05. Bounds are about 2-3x those.
@pytest.mark.parametrize(
    ("kind", "bound"), [("jpeg", 1.5), ("png_rgb", 0.6), ("png_rgba", 0.5), ("gray", 4.0), ("webp", 0.3)]
)
def test_pixels_match_pillow(wallpapers: Path, tmp_path: Path, kind: str, bound: float) -> None:
    src = pick(wallpapers, kind)
    loader = fastdiff.DataLoader(single(tmp_path, src), resolution=256, dtype=torch.uint8, shuffle=False)
    batch = only_batch(loader)
    got = batch["pixel_values"][0].numpy()
    ref = reference_sample(batch["paths"][0], batch["target_sizes"][0], batch["crop_top_lefts"][0])
    assert mean_abs_diff(got, ref) <= bound, src.name
    # Sanity of the comparison itself: the same reference shifted by a flip is far off.
    assert mean_abs_diff(got, ref[:, :, ::-1]) > bound


def test_exif_rotated_phone_photos_come_out_upright(large_photos: Path, tmp_path: Path) -> None:
    rotated = []
    for p in image_files(large_photos):
        with Image.open(p) as im:
            if im.getexif().get(0x0112, 1) != 1:
                rotated.append(p)
    assert rotated, "the large corpus should hold EXIF-rotated photos"
    folder = tmp_path / "rotated"
    folder.mkdir()
    for p in rotated:
        shutil.copy(p, folder / p.name)
    loader = fastdiff.DataLoader(folder, resolution=512, batch_size=1, dtype=torch.uint8, shuffle=False)
    for batch in loader:
        path = batch["paths"][0]
        got = batch["pixel_values"][0].numpy()
        up = upright_rgb(path)
        assert batch["original_sizes"][0] == (up.height, up.width)
        h, w = batch["target_sizes"][0]
        assert (h > w) == (up.height > up.width)  # bucket chosen from the upright size
        # fastdiff decodes a 12 MP JPEG at a DCT scale (1/4 here) before its Lanczos resize: against
        # Pillow doing the same (Image.draft), measured 0.02-0.24 levels on the rotated photos.
        ref = reference_sample(path, (h, w), batch["crop_top_lefts"][0], dct_scaled=True)
        assert mean_abs_diff(got, ref) <= 0.6, path
        # Against a full-size decode: 0.07-0.87, the most on a painting's canvas weave, whose moiré
        # the scaled IDCT renders differently (1.01 on another crop of it).
        full = reference_sample(path, (h, w), batch["crop_top_lefts"][0])
        assert mean_abs_diff(got, full) <= 1.5, path
        # Sideways or upside-down output would be far from the upright reference.
        with Image.open(path) as raw:
            stored = np.asarray(raw.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)).transpose(
                2, 0, 1
            )
        assert mean_abs_diff(got, stored) > 3 * mean_abs_diff(got, full)


def test_random_crop_and_flip_match_pillow(wallpapers: Path, tmp_path: Path) -> None:
    src = pick(wallpapers, "png_rgb")
    loader = fastdiff.DataLoader(
        single(tmp_path, src), resolution=256, dtype=torch.uint8, crop="random", flip_prob=1.0, seed=7
    )
    batch = only_batch(loader)
    got = batch["pixel_values"][0].numpy()
    ref = reference_sample(
        batch["paths"][0], batch["target_sizes"][0], batch["crop_top_lefts"][0], flipped=True
    )
    assert mean_abs_diff(got, ref) <= 0.6


def test_dtypes_agree(wallpapers: Path, tmp_path: Path) -> None:
    folder = single(tmp_path, pick(wallpapers, "jpeg"))
    out = {
        dt: only_batch(fastdiff.DataLoader(folder, resolution=256, dtype=dt))["pixel_values"]
        for dt in (torch.uint8, torch.float32, torch.float16, torch.bfloat16)
    }
    assert out[torch.float16].dtype == torch.float16 and out[torch.bfloat16].dtype == torch.bfloat16
    expected = out[torch.uint8].float() / 127.5 - 1.0
    torch.testing.assert_close(out[torch.float32], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[torch.float16].float(), expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(out[torch.bfloat16].float(), expected, atol=8e-3, rtol=0)


def test_same_seed_same_batches_any_thread_count(wallpapers: Path, tmp_path: Path) -> None:
    folder = tmp_path / "few"
    folder.mkdir()
    for p in sorted(image_files(wallpapers), key=lambda p: p.stat().st_size)[:12]:
        shutil.copy(p, folder / p.name)

    def run(threads: int) -> list[tuple[list[str], torch.Tensor]]:
        dl = fastdiff.DataLoader(
            folder,
            resolution=128,
            batch_size=3,
            crop="random",
            flip_prob=0.5,
            seed=5,
            num_threads=threads,
            bucket_step=32,
        )
        return [(b["paths"], b["pixel_values"]) for b in dl]

    one, two = run(1), run(2)
    assert [p for p, _ in one] == [p for p, _ in two]
    for (_, a), (_, b) in zip(one, two, strict=True):
        assert torch.equal(a, b)
    dl = fastdiff.DataLoader(folder, resolution=128, batch_size=3, seed=5, bucket_step=32)
    first, second = [b["paths"] for b in dl], [b["paths"] for b in dl]
    assert sorted(p for b in first for p in b) == sorted(p for b in second for p in b)
    assert first != second  # successive iterations are successive epochs, reshuffled


def test_files_failing_at_decode_keep_len_exact_and_ranks_in_step(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"g{i}.jpg")
    for i in range(3):  # valid headers, broken data: found by the scan, fail while decoding
        data = (tmp_path / f"g{i}.jpg").read_bytes()
        (tmp_path / f"bad{i}.jpg").write_bytes(data[: len(data) // 3])
    # Alone in its 4:1 bucket: the stand-in comes from another bucket.
    Image.fromarray(rng.integers(0, 255, (32, 128, 3), dtype=np.uint8)).save(tmp_path / "pano.jpg")
    data = (tmp_path / "pano.jpg").read_bytes()
    (tmp_path / "bad_pano.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "pano.jpg").unlink()
    for world_size, batch_size in [(1, 2), (2, 1), (2, 3)]:
        lengths, steps, skipped = set(), set(), set()
        for rank in range(world_size):
            dl = fastdiff.DataLoader(
                tmp_path,
                resolution=64,
                bucket_step=16,
                batch_size=batch_size,
                rank=rank,
                world_size=world_size,
                seed=3,
            )
            batches = list(dl)
            lengths.add(len(dl))
            steps.add(len(batches))
            assert all(not Path(p).name.startswith("bad") for b in batches for p in b["paths"])
            skipped |= {Path(s["path"]).name for s in dl.report["skipped"]}
        assert len(lengths) == 1 and steps == lengths, (world_size, batch_size, lengths, steps)
        assert skipped == {"bad0.jpg", "bad1.jpg", "bad2.jpg", "bad_pano.jpg"}


def test_bad_files_are_skipped_and_reported(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(tmp_path / f"good{i}.png")
    good = tmp_path / "good0.png"
    jpeg = tmp_path / "whole.jpg"
    Image.open(good).save(jpeg, quality=90)
    data = jpeg.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    jpeg.unlink()
    (tmp_path / "noise.jpg").write_bytes(rng.integers(0, 255, 4096, dtype=np.uint8).tobytes())
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "page.png").write_text("<!DOCTYPE html><html><body>404</body></html>")

    loader = fastdiff.DataLoader(tmp_path, resolution=64, batch_size=2, bucket_step=16)
    seen = [p for b in loader for p in b["paths"]]
    report = loader.report
    # truncated.jpg passes the header scan and fails at decode: a good image of its bucket stands in.
    assert len(seen) == 4
    assert sorted({Path(p).name for p in seen}) == ["good0.png", "good1.png", "good2.png"]
    assert report["found"] == 7 and report["loaded"] == 3
    skipped = {Path(s["path"]).name: s for s in report["skipped"]}
    assert set(skipped) == {"truncated.jpg", "noise.jpg", "empty.png", "page.png"}
    for name, s in skipped.items():
        assert name in s["message"] and s["code"]

    # on_error="raise": a file that fails while decoding raises when its batch comes up ...
    strict = tmp_path / "strict"
    strict.mkdir()
    shutil.copy(good, strict / "good0.png")
    shutil.copy(tmp_path / "truncated.jpg", strict / "truncated.jpg")
    with pytest.raises(fastdiff.DecodeError, match=r"truncated\.jpg"):
        for _ in fastdiff.DataLoader(strict, resolution=64, on_error="raise", bucket_step=16):
            pass
    # ... and one whose header is unreadable raises at construction.
    shutil.copy(tmp_path / "noise.jpg", strict / "noise.jpg")
    with pytest.raises(fastdiff.DecodeError, match=r"noise\.jpg"):
        fastdiff.DataLoader(strict, resolution=64, on_error="raise", bucket_step=16)


def test_empty_or_missing_folder_is_a_clear_value_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        fastdiff.DataLoader(tmp_path)
    with pytest.raises(ValueError, match="missing"):
        fastdiff.DataLoader(tmp_path / "missing")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"crop": "middle"}, "crop"),
        ({"flip_prob": 1.5}, "flip_prob"),
        ({"prefetch": 0}, "prefetch"),
        ({"dtype": torch.int32}, "dtype"),
        ({"on_error": "ignore"}, "on_error"),
    ],
)
def test_bad_arguments_name_the_argument(tmp_path: Path, kwargs: dict, name: str) -> None:
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=name):
        fastdiff.DataLoader(tmp_path, **kwargs)


def test_negative_sizes_are_value_errors_naming_the_argument(tmp_path: Path) -> None:
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    for name in ("batch_size", "resolution", "seed", "prefetch"):
        with pytest.raises(ValueError, match=f"{name} must not be negative, got -1"):
            fastdiff.DataLoader(tmp_path, **{name: -1})
    # Out of range for the native types: ValueErrors naming the argument, not OverflowErrors.
    bad = [
        ({"root": tmp_path, "batch_size": True}, "batch_size must be an int, got True"),
        ({"root": tmp_path, "resolution": 64.0}, "resolution must be an int"),
        ({"root": tmp_path, "seed": 2**64}, "seed must be < 2"),
        ({"root": tmp_path, "background": (300, 0, 0)}, "background must be three ints in 0..255"),
        ({"subsets": [fastdiff.Subset(tmp_path, keep_tokens=-1)]}, "keep_tokens must be an int >= 0"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            fastdiff.DataLoader(**kwargs)
    loader = fastdiff.DataLoader(tmp_path, resolution=np.int64(64), background=np.array([1, 2, 3]).tolist())
    assert len(loader) == 1


def test_resolution_off_the_bucket_step_warns_with_the_square_bucket(tmp_path: Path) -> None:
    Image.new("RGB", (200, 200)).save(tmp_path / "a.png")
    with pytest.warns(UserWarning, match="resolution 100 is not a multiple of bucket_step 64: .* 64x64"):
        loader = fastdiff.DataLoader(tmp_path, resolution=100, min_bucket_side=64)
    assert sorted(loader.buckets) == [(64, 64), (64, 128), (128, 64)]  # sides of 64, area <= 100^2
    assert next(iter(loader))["pixel_values"].shape == (1, 3, 64, 64)


def test_a_batch_too_large_to_allocate_is_a_memory_error_not_an_abort(tmp_path: Path) -> None:
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "a.png")
    # Batch memory is sized by what the data can fill: one image, batches of one.
    loader = fastdiff.DataLoader(tmp_path, resolution=64, batch_size=10**9, dtype=torch.uint8)
    pixels = next(iter(loader))["pixel_values"]
    assert pixels.shape == (1, 3, 64, 64) and pixels[0, :, 0, 0].tolist() == [10, 20, 30]
    # A 10^7-pixel-square bucket: 1.2 PB of float32, beyond any address space.
    loader = fastdiff.DataLoader(tmp_path, resolution=10**7)
    with pytest.raises(MemoryError, match=r"cannot allocate .* lower batch_size or resolution"):
        next(iter(loader))


def test_cli_reports_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fastdiff import cli

    assert cli.main(["scan", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdiff scan: error: no images found in ") and "missing" in err
    assert "Traceback" not in err and err.count("\n") == 1
