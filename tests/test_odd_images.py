"""Issue 4: every odd or broken input gives the right pixels or a clear per-file skip, never a crash.

One test (or parametrised group) per numbered case of the issue, each generating its files in
``tmp_path`` (Pillow, or raw bytes where Pillow cannot write the case) and asserting the outcome through
the public API only: ``fastdiff.DataLoader``, ``loader.report`` and ``fastdiff scan --json``.

Tolerances, in 0-255 levels: PNG and WebP-lossless paths are exact (0); a JPEG decoded at its stored
size is within 3 of Pillow per pixel (libjpeg-turbo in both, possibly different versions/IDCT); a
resampled image is compared with the Pillow reference (``tests/reference.py``) by mean absolute
difference (bounds stated per test). Most images are made exactly one bucket in size (resolution 64,
bucket_step 16 → the 64x64 bucket), so the loader copies them without resampling and the decoder
alone is compared.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import fastdiff
import numpy as np
import pytest
import torch
from fastdiff import cli
from PIL import Image
from reference import mean_abs_diff, reference_sample, upright_rgb

# Small buckets keep every test fast: sides 32..128 in steps of 16, area <= 64².
SMALL = {"resolution": 64, "bucket_step": 16}


def load(folder: Path, **kwargs: Any) -> tuple[fastdiff.DataLoader, dict[str, dict[str, Any]]]:
    """One epoch of ``folder`` as uint8 samples keyed by file name (center crop, no flip, no shuffle)."""
    opts: dict[str, Any] = {**SMALL, "dtype": torch.uint8, "shuffle": False, "num_threads": 2}
    opts.update(kwargs)
    loader = fastdiff.DataLoader(folder, **opts)
    samples: dict[str, dict[str, Any]] = {}
    for batch in loader:
        for i, path in enumerate(batch["paths"]):
            samples[Path(path).name] = {
                "path": path,
                "pixels": batch["pixel_values"][i].numpy(),  # [3, H, W] uint8
                "original_size": batch["original_sizes"][i],
                "crop_top_left": batch["crop_top_lefts"][i],
                "target_size": batch["target_sizes"][i],
                "caption": batch["captions"][i],
            }
    return loader, samples


def chw(im: Image.Image) -> np.ndarray:
    """A Pillow image as uint8 [3, H, W] RGB."""
    return np.asarray(im.convert("RGB")).transpose(2, 0, 1)


def assert_counts_add_up(report: dict[str, Any]) -> None:
    assert report["loaded"] + len(report["skipped"]) == report["found"], report
    for s in report["skipped"]:
        assert set(s) == {"path", "code", "message"}
        assert Path(s["path"]).name in s["message"], s


def skips(loader: fastdiff.DataLoader) -> dict[str, dict[str, str]]:
    report = loader.report
    assert_counts_add_up(report)
    return {Path(s["path"]).name: s for s in report["skipped"]}


def nearest_bucket(buckets: list[tuple[int, int]], width: int, height: int) -> tuple[int, int]:
    """The documented bucket rule: nearest in log aspect ratio, ties to the larger area."""
    target = math.log(width / height)
    return min(buckets, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - target), -hw[0] * hw[1]))


def gradient(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Smooth, asymmetric RGB content (JPEG-friendly): uint8 [h, w, 3]."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * x / max(w - 1, 1)
    g = 255 * y / max(h - 1, 1)
    b = 127 + 120 * np.sin((x + 2 * y + seed) / 9)
    return np.stack([r, g, b], axis=-1).round().clip(0, 255).astype(np.uint8)


def png_bytes(
    w: int, h: int, depth: int, color: int, rows: bytes, extra: list[tuple[bytes, bytes]] = ()
) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB or lie about its size).

    ``rows`` are the raw scanlines without filter bytes; ``extra`` chunks go before IDAT.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0)
    stride = len(rows) // h if h else 0
    raw = b"".join(b"\0" + rows[i * stride : (i + 1) * stride] for i in range(h))
    body = b"".join(chunk(k, d) for k, d in extra)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + body
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------------------------------------------
# 1. EXIF orientation 2-8.

# The Pillow transpose that makes the stored image from the upright one, per EXIF orientation: the
# inverse of what ``ImageOps.exif_transpose`` applies.
T = Image.Transpose
STORE = {
    2: T.FLIP_LEFT_RIGHT,
    3: T.ROTATE_180,
    4: T.FLIP_TOP_BOTTOM,
    5: T.TRANSPOSE,
    6: T.ROTATE_90,
    7: T.TRANSVERSE,
    8: T.ROTATE_270,
}
QUADRANT_COLOURS = [(230, 30, 30), (30, 200, 30), (30, 30, 230), (240, 240, 40)]  # TL, TR, BL, BR


def quadrants(w: int, h: int) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2], a[: h // 2, w // 2 :] = QUADRANT_COLOURS[0], QUADRANT_COLOURS[1]
    a[h // 2 :, : w // 2], a[h // 2 :, w // 2 :] = QUADRANT_COLOURS[2], QUADRANT_COLOURS[3]
    return Image.fromarray(a)


def save_oriented(upright: Image.Image, orientation: int, path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    upright.transpose(STORE[orientation]).save(path, quality=95, exif=exif.tobytes())


def test_case01_exif_orientations_come_out_upright(tmp_path: Path) -> None:
    small = tmp_path / "small"
    phone = tmp_path / "phone"
    small.mkdir()
    phone.mkdir()
    upright = Image.fromarray(gradient(96, 64))  # landscape 3:2 when upright
    for o in STORE:
        save_oriented(upright, o, small / f"o{o}.jpg")
        save_oriented(quadrants(4032, 3024), o, phone / f"o{o}.jpg")

    loader, got = load(small)
    assert sorted(got) == [f"o{o}.jpg" for o in STORE]
    for o in STORE:
        s = got[f"o{o}.jpg"]
        assert s["original_size"] == (64, 96), o  # (h, w) upright, not as stored
        assert s["target_size"] == nearest_bucket(loader.buckets, 96, 64), o
        assert s["target_size"][1] > s["target_size"][0], o  # a landscape bucket
        ref = reference_sample(s["path"], s["target_size"], s["crop_top_left"])  # Pillow exif_transpose
        # Measured 0.11-0.12 levels (same JPEG decode, Lanczos in both); stored-as-is is 70-130 off.
        assert mean_abs_diff(s["pixels"], ref) <= 0.5, o
        stored = chw(Image.open(s["path"]).convert("RGB").resize(s["pixels"].shape[:0:-1]))
        assert mean_abs_diff(s["pixels"], stored) > 10 * max(mean_abs_diff(s["pixels"], ref), 0.5), o

    loader, got = load(phone)
    for o in STORE:
        s = got[f"o{o}.jpg"]
        assert s["original_size"] == (3024, 4032), o
        h, w = s["target_size"]
        assert (h, w) == nearest_bucket(loader.buckets, 4032, 3024) and w > h, o
        # Centre of each upright quadrant has its colour (DCT-downscaled JPEG; measured within 1 level).
        px = s["pixels"].astype(int)
        for colour, (y, x) in zip(
            QUADRANT_COLOURS,
            [(h // 4, w // 4), (h // 4, 3 * w // 4), (3 * h // 4, w // 4), (3 * h // 4, 3 * w // 4)],
            strict=True,
        ):
            assert np.abs(px[:, y, x] - colour).max() <= 4, (o, colour, px[:, y, x])


# ---------------------------------------------------------------------------------------------------
# 2. Alpha: hidden RGB under transparent pixels must not matter.


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_case02_transparent_pixels_hide_anything(tmp_path: Path, mode: str) -> None:
    rng = np.random.default_rng(2)
    visible = gradient(64, 64)
    alpha = np.zeros((64, 64), np.uint8)
    alpha[16:48, 16:48] = 255  # opaque square
    alpha[16:48, 48:56] = 128  # half-transparent strip
    variants = {
        "black": np.zeros((64, 64, 3), np.uint8),
        "random": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "white": np.full((64, 64, 3), 255, np.uint8),
    }
    for name, hidden in variants.items():
        rgb = np.where(alpha[..., None] > 0, visible, hidden)
        im = Image.fromarray(np.dstack([rgb, alpha]))  # RGBA
        if mode == "LA":
            gray = np.asarray(im.convert("L"))
            im = Image.fromarray(np.dstack([gray, alpha]))  # LA
        im.save(tmp_path / f"{name}.png")

    for background in [(255, 255, 255), (0, 128, 255)]:
        _, got = load(tmp_path, background=background)
        outs = [got[f"{n}.png"]["pixels"] for n in variants]
        for other in outs[1:]:
            np.testing.assert_array_equal(outs[0], other)  # depends only on the visible pixels
        # Fully transparent = exactly the background; the rest = Pillow's alpha_composite (±1).
        assert (outs[0][:, 0, 0] == background).all() and (outs[0][:, 60, 60] == background).all()
        ref = chw(upright_rgb(tmp_path / "random.png", background))
        assert np.abs(outs[0].astype(int) - ref).max() <= 1, background


# ---------------------------------------------------------------------------------------------------
# 3. Palette PNG with and without tRNS.


def test_case03_palette_png_with_and_without_transparency(tmp_path: Path) -> None:
    rgb = Image.fromarray(gradient(64, 64)).quantize(colors=16, method=Image.Quantize.MEDIANCUT)
    rgb.save(tmp_path / "plain.png")
    a = np.asarray(rgb).copy()
    a[:20, :20] = 3  # index 3 becomes fully transparent
    pal = Image.frombytes("P", (64, 64), a.tobytes())
    pal.putpalette(rgb.getpalette())
    pal.save(tmp_path / "trns.png", transparency=3)
    # Per-entry alpha (tRNS with several values): index 5 half-transparent.
    pal.save(tmp_path / "trns_alpha.png", transparency=bytes([255] * 3 + [0, 255, 128] + [255] * 10))
    with Image.open(tmp_path / "trns_alpha.png") as im:
        assert im.mode == "P" and "transparency" in im.info

    _, got = load(tmp_path, background=(10, 20, 30))
    for name in ["plain.png", "trns.png", "trns_alpha.png"]:
        ref = chw(upright_rgb(tmp_path / name, (10, 20, 30)))
        assert np.abs(got[name]["pixels"].astype(int) - ref).max() <= 1, name
    assert (got["trns.png"]["pixels"][:, :20, :20] == np.array([10, 20, 30])[:, None, None]).all()
    assert not (got["plain.png"]["pixels"][:, :20, :20] == np.array([10, 20, 30])[:, None, None]).all()


# ---------------------------------------------------------------------------------------------------
# 4. CMYK JPEG.


def strip_adobe_app14(jpeg: bytes) -> bytes:
    """The same JPEG without its APP14 "Adobe" segment (a 'plain' CMYK JPEG, as some tools write)."""
    out, i = bytearray(jpeg[:2]), 2
    while i + 4 <= len(jpeg) and jpeg[i] == 0xFF and jpeg[i + 1] not in (0xDA,):
        length = struct.unpack(">H", jpeg[i + 2 : i + 4])[0]
        segment = jpeg[i : i + 2 + length]
        if not (jpeg[i + 1] == 0xEE and segment[4:9] == b"Adobe"):
            out += segment
        i += 2 + length
    return bytes(out + jpeg[i:])


def test_case04_cmyk_jpeg_matches_pillow(tmp_path: Path) -> None:
    cmyk = Image.fromarray(gradient(64, 64)).convert("CMYK")
    k = np.asarray(cmyk).copy()
    k[:, :, 3] = np.linspace(0, 200, 64, dtype=np.uint8)[None, :]  # real black ink too
    # Pillow writes CMYK Adobe-inverted, with an APP14 "Adobe" segment, as Photoshop does.
    Image.frombytes("CMYK", (64, 64), k.tobytes()).save(tmp_path / "adobe.jpg", quality=95)
    data = (tmp_path / "adobe.jpg").read_bytes()
    assert b"Adobe" in data
    plain = strip_adobe_app14(data)
    assert b"Adobe" not in plain
    (tmp_path / "plain.jpg").write_bytes(plain)

    _, got = load(tmp_path)
    for name in ["adobe.jpg", "plain.jpg"]:
        with Image.open(tmp_path / name) as im:
            assert im.mode == "CMYK"
            ref = chw(im.convert("RGB"))
        # Measured identical (0); 3 levels allowed for other libjpeg-turbo builds (same formula).
        assert np.abs(got[name]["pixels"].astype(int) - ref).max() <= 3, name
        assert ref.std() > 20  # the comparison is over real content


# ---------------------------------------------------------------------------------------------------
# 5. 16-bit PNG.


def test_case05_sixteen_bit_png_ramp_keeps_256_levels(tmp_path: Path) -> None:
    n = 64 * 64
    ramp = np.round(np.arange(n) * 65535 / (n - 1)).astype(">u2").reshape(64, 64)
    (tmp_path / "gray16.png").write_bytes(png_bytes(64, 64, 16, 0, ramp.tobytes()))
    rgb16 = np.stack([ramp, ramp[::-1], ramp.T], axis=-1).astype(">u2")
    (tmp_path / "rgb16.png").write_bytes(png_bytes(64, 64, 16, 2, rgb16.tobytes()))
    with Image.open(tmp_path / "gray16.png") as im:
        assert im.mode in ("I;16", "I;16B", "I")  # Pillow reads it as 16-bit too

    _, got = load(tmp_path)
    # Documented rule: round to nearest, (v * 255 + 32767) // 65535.
    want = ((ramp.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    g = got["gray16.png"]["pixels"]
    assert (g == want[None]).all()
    assert len(np.unique(g)) == 256 and g.min() == 0 and g.max() == 255
    c = got["rgb16.png"]["pixels"]
    want_rgb = ((rgb16.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8).transpose(2, 0, 1)
    assert (c == want_rgb).all()
    assert all(len(np.unique(c[i])) == 256 for i in range(3))


# ---------------------------------------------------------------------------------------------------
# 6. Grayscale and 1-bit.


def test_case06_grayscale_and_bilevel_expand_to_rgb(tmp_path: Path) -> None:
    gray = Image.fromarray(gradient(64, 64)[:, :, 0] // 2 + gradient(64, 64)[:, :, 2] // 2)
    gray.save(tmp_path / "gray.jpg", quality=95)
    gray.save(tmp_path / "gray.png")
    bits = Image.fromarray((np.indices((64, 64)).sum(0) // 8 % 2 * 255).astype(np.uint8)).convert("1")
    bits.save(tmp_path / "bits.png")
    with Image.open(tmp_path / "bits.png") as im:
        assert im.mode == "1"

    _, got = load(tmp_path)
    for name, tol in [("gray.jpg", 3), ("gray.png", 0), ("bits.png", 0)]:
        px = got[name]["pixels"]
        assert (px[0] == px[1]).all() and (px[1] == px[2]).all(), name  # R = G = B
        with Image.open(tmp_path / name) as im:
            ref = chw(im.convert("RGB"))
        assert np.abs(px.astype(int) - ref).max() <= tol, name
    assert set(np.unique(got["bits.png"]["pixels"])) == {0, 255}


# ---------------------------------------------------------------------------------------------------
# 7. JPEG coding variants.

# A 16x16 arithmetic-coded JPEG (SOF9, 4:2:0, quality 90) of a gradient, written by libjpeg-turbo with
# TJPARAM_ARITHMETIC: `FASTDIFF_PRINT_ARITHMETIC_JPEG=1 cargo test -p fastdiff-core arithmetic --
# --nocapture` prints it (rust/core/src/decode/jpeg.rs). Pillow cannot write arithmetic coding; it reads it.
ARITHMETIC_JPEG_HEX = (
    "ffd8ffe000104a46494600010100000100010000ffdb0043000302020302020303030304030304050805050404050a07"
    "0706080c0a0c0c0b0a0b0b0d0e12100d0e110e0b0b1016101113141515150c0f171816141812141514ffdb0043010304"
    "0405040509050509140d0b0d141414141414141414141414141414141414141414141414141414141414141414141414"
    "1414141414141414141414141414ffc90011080010001003012200021101031101ffcc000a0010100501101105ffda00"
    "0c03010002110311003f00ff00dc1bd2ea732a54ed98763738490e3a7f4bae9aaa4a957128d985ab887717a44c05e818"
    "a5c4e0ffd9"
)


def test_case07_jpeg_coding_variants_match_pillow(tmp_path: Path) -> None:
    im = Image.fromarray(gradient(64, 64, seed=7))
    im.save(tmp_path / "progressive.jpg", quality=92, progressive=True)
    for sub, name in [(0, "444"), (1, "422"), (2, "420")]:
        im.save(tmp_path / f"sub{name}.jpg", quality=92, subsampling=sub)
    im.save(tmp_path / "restart.jpg", quality=92, restart_marker_blocks=1)
    im.save(tmp_path / "restart_rows.jpg", quality=92, restart_marker_rows=1)
    assert b"\xff\xdd" in (tmp_path / "restart.jpg").read_bytes()  # DRI segment present
    assert b"\xff\xc2" in (tmp_path / "progressive.jpg").read_bytes()  # SOF2
    (tmp_path / "arithmetic.jpg").write_bytes(bytes.fromhex(ARITHMETIC_JPEG_HEX))
    assert b"\xff\xc9" in (tmp_path / "arithmetic.jpg").read_bytes()  # SOF9: arithmetic coding

    _, got = load(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert sorted(got) == names
    for name in names:
        with Image.open(tmp_path / name) as ref_im:
            ref = chw(ref_im)
        px = got[name]["pixels"]
        if ref.shape[1:] != px.shape[1:]:  # the 16x16 arithmetic file is upscaled to the bucket
            ref = reference_sample(tmp_path / name, got[name]["target_size"], got[name]["crop_top_left"])
            assert mean_abs_diff(px, ref) <= 0.5, name  # measured 0.05
        else:
            assert np.abs(px.astype(int) - ref).max() <= 3, name  # measured identical (0)


# ---------------------------------------------------------------------------------------------------
# 8. Broken files.

BROKEN = ["truncated.jpg", "truncated.png", "empty.jpg", "noise.jpg", "page.png"]


def write_broken(folder: Path) -> None:
    rng = np.random.default_rng(8)
    im = Image.fromarray(gradient(64, 64))
    im.save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "whole.jpg").unlink()
    im.save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "whole.png").unlink()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "noise.jpg").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (folder / "page.png").write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>\n")


def test_case08_broken_files_are_skipped_with_path_and_reason(tmp_path: Path) -> None:
    write_broken(tmp_path)
    for i in range(3):
        Image.fromarray(gradient(64, 64, seed=i)).save(tmp_path / f"good{i}.png")

    loader, got = load(tmp_path, batch_size=2)
    assert sorted(got) == ["good0.png", "good1.png", "good2.png"]  # the run went on
    skipped = skips(loader)
    assert sorted(skipped) == sorted(BROKEN)
    assert all(s["code"] == "decode" for s in skipped.values()), skipped
    assert "empty file" in skipped["empty.jpg"]["message"]
    assert "truncated" in skipped["truncated.jpg"]["message"].lower() or "premature" in (
        skipped["truncated.jpg"]["message"].lower()
    )
    report = loader.report
    assert (report["found"], report["loaded"]) == (8, 3)

    # on_error="raise": DecodeError naming the file, at construction (bad header) or when its batch
    # comes up (header fine, pixels not).
    for name in BROKEN:
        strict = tmp_path / f"strict_{name.replace('.', '_')}"
        strict.mkdir()
        Image.fromarray(gradient(64, 64)).save(strict / "good.png")
        (strict / name).write_bytes((tmp_path / name).read_bytes())
        with pytest.raises(fastdiff.DecodeError, match=name.replace(".", r"\.")):
            for _ in fastdiff.DataLoader(strict, on_error="raise", **SMALL):
                pass


# ---------------------------------------------------------------------------------------------------
# 9. Content, not extension.


def test_case09_format_is_sniffed_from_content(tmp_path: Path) -> None:
    a, b = gradient(64, 64, seed=1), gradient(64, 64, seed=2)
    Image.fromarray(a).save(tmp_path / "is_png.jpg", format="PNG")
    Image.fromarray(b).save(tmp_path / "is_jpeg.png", format="JPEG", quality=95)
    loader, got = load(tmp_path)
    assert loader.report["formats"] == {"png": 1, "jpeg": 1}
    assert (got["is_png.jpg"]["pixels"] == a.transpose(2, 0, 1)).all()
    with Image.open(tmp_path / "is_jpeg.png") as im:
        assert im.format == "JPEG"
        ref = chw(im)
    assert np.abs(got["is_jpeg.png"]["pixels"].astype(int) - ref).max() <= 3


# ---------------------------------------------------------------------------------------------------
# 10. Decompression bombs and the pixel limit.


def test_case10_bomb_is_refused_before_decoding_with_its_size(tmp_path: Path) -> None:
    # Declares 30000x30000 RGB (2.7 GB decoded) in a 100-byte file.
    (tmp_path / "bomb.png").write_bytes(png_bytes(30000, 30000, 8, 2, b"\0" * 3 * 30000 * 2)[:200])
    Image.fromarray(gradient(64, 64)).save(tmp_path / "ok.png")
    Image.fromarray(gradient(100, 100)).save(tmp_path / "hundred.png")

    assert inspect.signature(fastdiff.DataLoader).parameters["max_pixels"].default == 178_956_970  # Pillow's
    loader, got = load(tmp_path)
    assert sorted(got) == ["hundred.png", "ok.png"]
    bomb = skips(loader)["bomb.png"]
    assert bomb["code"] == "too_large"
    assert "30000x30000" in bomb["message"] and "900000000" in bomb["message"], bomb
    assert "178956970" in bomb["message"]

    # The limit is an option: 100x100 = 10000 pixels is refused at 9999, accepted at 10000.
    loader, got = load(tmp_path, max_pixels=9_999)
    assert sorted(got) == ["ok.png"]
    assert skips(loader)["hundred.png"]["code"] == "too_large"
    assert "100x100 = 10000 pixels" in skips(loader)["hundred.png"]["message"]
    _, got = load(tmp_path, max_pixels=10_000)
    assert sorted(got) == ["hundred.png", "ok.png"]
    with pytest.raises(fastdiff.DecodeError, match=r"bomb\.png.*30000x30000"):
        fastdiff.DataLoader(tmp_path, on_error="raise", **SMALL)
    with pytest.raises(ValueError, match="max_pixels"):
        fastdiff.DataLoader(tmp_path, max_pixels=0, **SMALL)


# ---------------------------------------------------------------------------------------------------
# 11. Animations.


def test_case11_animations_give_their_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (64, 64), c) for c in [(200, 40, 40), (40, 200, 40), (40, 40, 200)]]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    (tmp_path / "gif_named.png").write_bytes((tmp_path / "anim.gif").read_bytes())
    for name in ["anim.png", "anim.webp"]:
        with Image.open(tmp_path / name) as im:
            assert getattr(im, "n_frames", 1) == 3, name

    loader, got = load(tmp_path)
    # Issue 14 changed GIF's expectation on purpose: GIF is read now (it was skipped as "decode"),
    # by its magic bytes whatever the name, and gives its first frame like APNG and WebP.
    assert sorted(got) == ["anim.gif", "anim.png", "anim.webp", "gif_named.png"]
    for name in got:
        assert (got[name]["pixels"] == np.array([200, 40, 40])[:, None, None]).all(), name
    assert skips(loader) == {}
    assert loader.report["found"] == 4


# ---------------------------------------------------------------------------------------------------
# 12. Tiny images and extreme aspect ratios.

TINY = {"one.png": (1, 1), "narrow.png": (40, 300), "tall.png": (70, 700), "wide.png": (700, 70)}


def solid(
    folder: Path, sizes: dict[str, tuple[int, int]], colour: tuple[int, int, int] = (90, 160, 220)
) -> None:
    for name, size in sizes.items():
        Image.new("RGB", size, colour).save(folder / name)


def test_case12_tiny_and_extreme_images_never_get_an_empty_bucket_or_crop(tmp_path: Path) -> None:
    solid(tmp_path, TINY)
    loader, got = load(tmp_path, resolution=256, bucket_step=64)
    assert sorted(got) == sorted(TINY)
    for name, (w, h) in TINY.items():
        s = got[name]
        bh, bw = s["target_size"]
        assert bh >= 64 and bw >= 64 and bh % 64 == 0 and bw % 64 == 0, name
        assert (bh, bw) == nearest_bucket(loader.buckets, w, h), name
        top, left = s["crop_top_left"]
        assert top >= 0 and left >= 0, name
        assert s["original_size"] == (h, w)
        assert s["pixels"].shape == (3, bh, bw)
        # Enlarged (the default): every output pixel is the solid colour.
        assert np.abs(s["pixels"].astype(int) - np.array([90, 160, 220])[:, None, None]).max() <= 1, name

    # Under no_upscale an image narrower or shorter than one step cannot fit any bucket without
    # being enlarged: it is skipped with code too_small (the documented policy), never bucketed at 0.
    loader, got = load(tmp_path, resolution=256, bucket_step=64, no_upscale=True)
    assert sorted(got) == ["tall.png", "wide.png"]
    skipped = skips(loader)
    assert {k: v["code"] for k, v in skipped.items()} == {"one.png": "too_small", "narrow.png": "too_small"}
    assert "40x300" in skipped["narrow.png"]["message"] and "64" in skipped["narrow.png"]["message"]
    # (h, w): 70x700 rounded down to whole steps, the long side capped at max_bucket_side 512.
    assert got["tall.png"]["target_size"] == (512, 64)
    assert got["wide.png"]["target_size"] == (64, 512)
    with pytest.raises(fastdiff.ImageTooSmallError, match=r"narrow\.png.*no_upscale"):
        fastdiff.DataLoader(tmp_path, resolution=256, bucket_step=64, no_upscale=True, on_error="raise")


# ---------------------------------------------------------------------------------------------------
# 13. no_upscale.


def test_case13_no_upscale_never_enlarges(tmp_path: Path) -> None:
    Image.fromarray(gradient(3072, 3000)).save(tmp_path / "big.jpg", quality=85)
    Image.fromarray(gradient(600, 400, seed=3)).save(tmp_path / "small.png")
    Image.fromarray(gradient(1000, 1000, seed=4)).save(tmp_path / "almost.png")
    config = tmp_path / "dataset.toml"
    config.write_text(
        f"[general]\nresolution = 1024\nbucket_no_upscale = true\n\n[[datasets]]\n  [[datasets.subsets]]\n"
        f'  image_dir = "{tmp_path.as_posix()}"\n'
    )

    usual = fastdiff.DataLoader(tmp_path, resolution=1024)
    usual_buckets = dict(usual.report["images_per_bucket"])
    loader, got = load(tmp_path, resolution=1024, bucket_step=64, no_upscale=True)
    # Large enough for its usual bucket: the same ~1024x1024 bucket, not a smaller one.
    assert got["big.jpg"]["target_size"] == (1024, 1024)
    # Smaller than any listed bucket: the largest step-aligned size it covers, (h, w).
    assert got["small.png"]["target_size"] == (384, 576)
    assert got["almost.png"]["target_size"] == (960, 960)
    for name, s in got.items():
        bh, bw = s["target_size"]
        oh, ow = s["original_size"]
        assert bh <= oh and bw <= ow, name  # never enlarged
        assert bh * bw <= 1024 * 1024 and bh % 64 == 0 and bw % 64 == 0, name
    # Exact pixels: not enlarged means a pure downscale/crop, as Pillow does it.
    ref = reference_sample(tmp_path / "small.png", (384, 576), got["small.png"]["crop_top_left"])
    assert mean_abs_diff(got["small.png"]["pixels"], ref) <= 0.3  # measured 0.05
    assert (384, 576) in loader.buckets and (384, 576) not in usual.buckets
    assert sum(usual_buckets.values()) == 3 and (1024, 1024) in usual_buckets
    # The TOML key (kohya's name) and the state options carry it.
    from_toml = fastdiff.DataLoader.from_config(config)
    assert from_toml.report["images_per_bucket"] == loader.report["images_per_bucket"]
    assert from_toml.state_dict()["options"]["no_upscale"] is True


# ---------------------------------------------------------------------------------------------------
# 14. File names and file system oddities.


def test_case14_names_links_hidden_and_unreadable_files(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "sub dir").mkdir(parents=True)
    names = ["UPPER.JPG", "Mixed.Jpeg", "photo.JFIF", "with space.png", "sub dir/ünïcødé 写真.webp"]
    names.append(os.fsdecode(b"caf\xe9 latin-1.png"))  # not UTF-8: Python's surrogateescape name
    for i, name in enumerate(names):
        im = Image.fromarray(gradient(64, 64, seed=i))
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".jfif": "JPEG", ".png": "PNG", ".webp": "WEBP"}
        im.save(root / name, format=fmt[Path(name).suffix.lower()], quality=95)
    (root / "link.png").symlink_to(root / "with space.png")
    (root / "dangling.jpg").symlink_to(root / "missing.jpg")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + b"\0" * 100)
    (root / "._UPPER.JPG").write_bytes(b"\0\5\26\7" + b"\0" * 60)  # AppleDouble stub
    (root / ".hidden").mkdir()
    Image.new("RGB", (64, 64)).save(root / ".hidden" / "secret.png")

    loader, got = load(root)
    loaded = {Path(s["path"]).relative_to(root).as_posix() for s in got.values()}
    assert loaded == {*names, "link.png"}  # any case, spaces, non-ASCII, symlinked files
    assert all(os.path.exists(s["path"]) for s in got.values())
    assert (got["link.png"]["pixels"] == got["with space.png"]["pixels"]).all()
    skipped = skips(loader)
    assert list(skipped) == ["dangling.jpg"] and skipped["dangling.jpg"]["code"] == "io"
    assert loader.report["found"] == len(names) + 2  # hidden files and ._ stubs are not candidates


def test_case14_unreadable_file_is_skipped_with_permission_error(tmp_path: Path) -> None:
    import tempfile

    # Root reads anything: check as an unprivileged user in a forked child when running as root.
    folder = Path(tempfile.mkdtemp(prefix="fastdiff-perm-"))
    try:
        os.chmod(folder, 0o755)
        Image.fromarray(gradient(64, 64)).save(folder / "ok.png")
        Image.fromarray(gradient(64, 64)).save(folder / "locked.png")
        os.chmod(folder / "ok.png", 0o644)
        os.chmod(folder / "locked.png", 0o000)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            try:
                os.close(r)
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                ld = fastdiff.DataLoader(folder, **SMALL)
                paths = [p for b in ld for p in b["paths"]]
                out = json.dumps({"paths": paths, "report": ld.report}).encode()
            except BaseException as e:  # reported to the parent, which fails the test
                out = json.dumps({"error": repr(e)}).encode()
            os.write(w, out)
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            result = json.loads(f.read())
        os.waitpid(pid, 0)
    finally:
        os.chmod(folder / "locked.png", 0o644)
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
    assert "error" not in result, result
    assert [Path(p).name for p in result["paths"]] == ["ok.png"]
    report = result["report"]
    assert_counts_add_up(report)
    (s,) = report["skipped"]
    assert Path(s["path"]).name == "locked.png" and s["code"] == "io"
    assert "Permission denied" in s["message"]


# ---------------------------------------------------------------------------------------------------
# 15. Captions.

CAPTIONS = {
    "bom8": ("\ufeffa photo of a dog".encode(), "a photo of a dog"),
    "utf16le": ("\ufeffa café, naïve".encode("utf-16-le"), "a café, naïve"),
    "utf16be": ("\ufeffa café, naïve".encode("utf-16-be"), "a café, naïve"),
    "crlf": (b"first line\r\nsecond line\r\n", "first line\nsecond line"),
    "trailing": (b"  tags, more tags \t \n\n", "tags, more tags"),
    "cp1252": (b"the dog\x92s ball", "the dog\u2019s ball"),
    "empty": (b"", ""),
    "multiline": (b"line one\nline two\nline three", "line one\nline two\nline three"),
}


def test_case15_caption_encodings_follow_one_policy(tmp_path: Path) -> None:
    for i, (stem, (data, _)) in enumerate(CAPTIONS.items()):
        Image.fromarray(gradient(64, 64, seed=i)).save(tmp_path / f"{stem}.png")
        (tmp_path / f"{stem}.txt").write_bytes(data)
    Image.fromarray(gradient(64, 64)).save(tmp_path / "none.png")

    loader, got = load(tmp_path, batch_size=3)
    for stem, (_, want) in CAPTIONS.items():
        assert got[f"{stem}.png"]["caption"] == want, stem
    assert got["none.png"]["caption"] == ""
    report = loader.report
    assert report["captions_missing"] == 1  # an empty file is a caption, a missing one is not
    assert report["captions_fallback_encoding"] == 1  # cp1252, counted so it can be fixed
    assert report["skipped"] == [] and report["loaded"] == len(CAPTIONS) + 1


# ---------------------------------------------------------------------------------------------------
# 16. Files changing between scan and decode.


def test_case16_file_changed_or_gone_after_the_scan(tmp_path: Path) -> None:
    for i in range(4):
        Image.fromarray(gradient(64, 64, seed=i)).save(tmp_path / f"img{i}.png")
    loader = fastdiff.DataLoader(tmp_path, dtype=torch.uint8, shuffle=False, **SMALL)
    (tmp_path / "img1.png").unlink()
    Image.fromarray(gradient(80, 48)).save(tmp_path / "img2.png")  # other size: not what was bucketed
    (tmp_path / "img3.png").write_bytes(b"")  # emptied in place
    # Each failed sample is replaced by a stand-in from its bucket: the only intact image, img0.
    paths = [Path(p).name for b in loader for p in b["paths"]]
    assert paths == ["img0.png"] * 4
    skipped = skips(loader)
    assert {k: v["code"] for k, v in skipped.items()} == {
        "img1.png": "io",
        "img2.png": "changed",
        "img3.png": "decode",
    }
    assert "48" in skipped["img2.png"]["message"] and "since the scan" in skipped["img2.png"]["message"]
    assert loader.report["found"] == 4 and loader.report["loaded"] == 1
    # A second epoch does not report them twice.
    assert [Path(p).name for b in loader for p in b["paths"]] == ["img0.png"] * 4
    assert len(loader.report["skipped"]) == 3


# ---------------------------------------------------------------------------------------------------
# `fastdiff scan DIR --json` on the real corpus plus the odd cases.


def test_scan_json_counts_add_up_on_wallpapers_and_odd_cases(
    wallpapers: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "mixed"
    odd = root / "odd"
    odd.mkdir(parents=True)
    (root / "wallpapers").symlink_to(wallpapers, target_is_directory=True)
    write_broken(odd)
    solid(odd, TINY)
    (odd / "bomb.png").write_bytes(png_bytes(30000, 30000, 8, 2, b"\0" * 600)[:200])
    Image.fromarray(gradient(64, 64)).save(odd / "is_png.jpg", format="PNG")

    assert cli.main(["scan", str(root), "--json", "--resolution", "256", "--no-upscale"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert_counts_add_up(report)
    n_wallpapers = sum(
        1
        for p in wallpapers.rglob("*")
        if p.suffix.lower() in {".jpg", ".jpeg", ".jfif", ".png", ".webp"} and not p.name.startswith(".")
    )
    assert report["found"] == n_wallpapers + len(BROKEN) + len(TINY) + 2
    codes = {Path(s["path"]).name: s["code"] for s in report["skipped"]}
    # The scan reads headers only: truncated files whose header is intact are found and loadable
    # until their pixels are decoded (then skipped while iterating, see case 8).
    assert codes == {
        "empty.jpg": "decode",
        "noise.jpg": "decode",
        "page.png": "decode",
        "bomb.png": "too_large",
        "one.png": "too_small",
        "narrow.png": "too_small",
    }
    assert sum(n for _, n in report["images_per_bucket"]) == report["loaded"]
    assert report["batches_per_epoch"] >= 1
