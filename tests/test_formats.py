"""Issue 14, "every image format a user has": BMP, TIFF (8/16-bit gray, RGB, CMYK, chunky or planar),
GIF and JPEG XL are read; AVIF and HEIF/HEIC are found and skipped as ``unsupported``, never silently
ignored; an image is found by its bytes whatever its name, and every other file is counted.

Each readable format is written with Pillow (JPEG XL with pillow-jxl-plugin; or, where Pillow cannot
write the case, by hand) from a crop of a real wallpaper, loaded through ``fastdiff.DataLoader`` and
compared with Pillow's reading of the same file (``convert("RGB")``, transparency composited onto the
background, ``exif_transpose``) through ``tests/reference.py``: the crop is not one bucket in size, so
both sides resample (Lanczos) and the comparison is a mean absolute difference in 0-255 levels, bounded
at 2-3x the measured value. Where the decode alone is compared (one bucket in size) it is exact.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import fastdiff
import numpy as np
import pillow_heif
import pillow_jxl  # noqa: F401  (registers Pillow's JXL plugin)
import pytest
import torch
from fastdiff import cli
from PIL import Image, ImageOps
from reference import mean_abs_diff, reference_sample

#: Upright size of the crop every readable format is written from (not one 256-bucket in size).
CROP = (300, 220)


@pytest.fixture(scope="module")
def crop(wallpapers: Path) -> Image.Image:
    """An RGB crop, CROP in size, of the centre of the first PNG wallpaper (lossless content)."""
    src = sorted(wallpapers.glob("*.png"))[0]
    with Image.open(src) as im:
        rgb = im.convert("RGB")
    w, h = CROP
    left, top = (rgb.width - w) // 2, (rgb.height - h) // 2
    return rgb.crop((left, top, left + w, top + h))


def alpha_ramp(crop: Image.Image) -> Image.Image:
    """``crop`` with alpha rising left to right from 0 (fully transparent) to 255."""
    a = np.broadcast_to(np.linspace(0, 255, crop.width).astype(np.uint8), (crop.height, crop.width))
    rgba = crop.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.ascontiguousarray(a)))
    return rgba


def raw_tiff(path: Path, pixels: np.ndarray, photometric: int = 2, planar: bool = False) -> None:
    """An uncompressed little-endian TIFF of ``pixels`` (uint8 or uint16 [H, W, S]), one strip per
    plane; ``photometric`` 2 is RGB, 5 CMYK; ``planar`` stores each sample in its own plane
    (``PlanarConfiguration`` 2). Pillow writes neither 16-bit RGB/CMYK nor planar TIFFs."""
    h, w, samples = pixels.shape
    bits = pixels.dtype.itemsize * 8
    planes = [pixels[:, :, c] for c in range(samples)] if planar else [pixels]
    strips = [np.ascontiguousarray(p).astype(f"<u{bits // 8}").tobytes() for p in planes]
    data = b"".join(strips)
    # Values over 4 bytes (bits per sample, several strip offsets and counts) follow the strips.
    extra = b""

    def value(typ: int, values: list[int]) -> bytes:
        nonlocal extra
        packed = struct.pack(f"<{len(values)}{'H' if typ == 3 else 'I'}", *values)
        if len(packed) <= 4:
            return packed.ljust(4, b"\0")
        at = 8 + len(data) + len(extra)
        extra += packed
        return struct.pack("<I", at)

    offsets = [8 + sum(len(s) for s in strips[:i]) for i in range(len(strips))]
    tags = [
        (256, 4, [w]),
        (257, 4, [h]),
        (258, 3, [bits] * samples),
        (259, 3, [1]),
        (262, 3, [photometric]),
        (273, 4, offsets),
        (277, 3, [samples]),
        (278, 4, [h]),
        (279, 4, [len(s) for s in strips]),
        (284, 3, [2 if planar else 1]),
    ]
    entries = b"".join(struct.pack("<HHI", t, typ, len(v)) + value(typ, v) for t, typ, v in tags)
    ifd_at = 8 + len(data) + len(extra)
    out = b"II*\0" + struct.pack("<I", ifd_at) + data + extra + struct.pack("<H", len(tags)) + entries
    path.write_bytes(out + struct.pack("<I", 0))


def with_k(crop: Image.Image) -> np.ndarray:
    """uint8 [H, W, 4] CMYK of ``crop`` with a real K channel (half the inverted luma): Pillow's own
    RGB -> CMYK has K = 0."""
    cmyk = np.asarray(crop.convert("CMYK")).copy()
    cmyk[:, :, 3] = (255 - np.asarray(crop.convert("L"), dtype=np.uint16)) // 2
    return cmyk


def write(kind: str, crop: Image.Image, path: Path) -> None:
    """``crop`` saved at ``path`` as the case ``kind`` of :data:`CASES`."""
    if kind == "bmp24":
        crop.save(path, "BMP")
    elif kind == "bmp32":
        alpha_ramp(crop).save(path, "BMP")
    elif kind == "tiff_rgb8":
        crop.save(path, "TIFF")
    elif kind == "tiff_lzw_rgba":
        alpha_ramp(crop).save(path, "TIFF", compression="tiff_lzw")
    elif kind == "tiff_gray16":
        # A full 16-bit ramp of the luma, so that the low byte carries information.
        luma = (
            np.asarray(crop.convert("L"), dtype=np.uint16) * 257
            + np.arange(crop.width, dtype=np.uint16) % 257
        )
        Image.fromarray(luma.astype(np.uint16)).save(path, "TIFF")
    elif kind == "tiff_cmyk":
        Image.fromarray(with_k(crop), "CMYK").save(path, "TIFF")
    elif kind == "tiff_planar_rgb":
        raw_tiff(path, np.asarray(crop), planar=True)
    elif kind == "tiff_planar_cmyk":
        raw_tiff(path, with_k(crop), photometric=5, planar=True)
    elif kind == "jxl_lossy":
        crop.save(path, "JXL", quality=90)
    elif kind == "jxl_lossless_rgba":
        alpha_ramp(crop).save(path, "JXL", lossless=True)
    elif kind == "jxl_la":
        alpha_ramp(crop).convert("LA").save(path, "JXL", lossless=True)
    elif kind == "jxl_gray16":
        luma = (
            np.asarray(crop.convert("L"), dtype=np.uint16) * 257
            + np.arange(crop.width, dtype=np.uint16) % 257
        )
        Image.fromarray(luma.astype(np.uint16)).save(path, "JXL", lossless=True)
    elif kind == "gif_transparent":
        pal = crop.quantize(255)
        mask = np.asarray(alpha_ramp(crop))[:, :, 3] < 128
        arr = np.asarray(pal).copy()
        arr[mask] = 255
        gif = Image.fromarray(arr, "P")
        gif.putpalette(pal.getpalette() or [])
        gif.save(path, "GIF", transparency=255)
    elif kind == "gif_animated":
        first = crop.quantize(256)
        later = crop.transpose(Image.Transpose.FLIP_TOP_BOTTOM).quantize(256)
        first.save(path, "GIF", save_all=True, append_images=[later], duration=100, loop=0)
    else:
        raise AssertionError(kind)


# Measured mean |fastdiff - Pillow| (0-255 levels) at resolution 256 on a 300x220 wallpaper crop, both
# sides resizing with Lanczos (the residue of two resizers, ~0.013 for identical decodes): BMP 24/32-bit
# 0.013, TIFF RGB 0.013, TIFF LZW RGBA 0.010, TIFF 16-bit gray 0.16 (we round 16 -> 8 bits, Pillow
# truncates), TIFF CMYK chunky and planar 0.017 (the decode is Pillow's cmyk2rgb exactly, see
# test_tiff_cmyk_is_pillows_exactly), planar RGB 0.013, GIF with transparency 0.013, animated GIF 0.021,
# JPEG XL lossy 0.26 (jxl-oxide against libjxl on the same codestream: lossy JPEG XL decoders agree within
# the spec's tolerance, not bit for bit), lossless RGBA 0.010, LA 0.011, 16-bit gray 0.16 (rounded
# against truncated). Bounds are 2-3x those.
CASES = {
    "bmp24": 0.04,
    "bmp32": 0.04,
    "tiff_rgb8": 0.04,
    "tiff_lzw_rgba": 0.03,
    "tiff_gray16": 0.4,
    "tiff_cmyk": 0.04,
    "tiff_planar_rgb": 0.04,
    "tiff_planar_cmyk": 0.04,
    "gif_transparent": 0.04,
    "gif_animated": 0.06,
    "jxl_lossy": 0.6,
    "jxl_lossless_rgba": 0.04,
    "jxl_la": 0.04,
    "jxl_gray16": 0.4,
}


def load_one(folder: Path, **kwargs: Any) -> dict[str, Any]:
    loader = fastdiff.DataLoader(folder, resolution=256, dtype=torch.uint8, shuffle=False, **kwargs)
    batches = list(loader)
    assert loader.report["skipped"] == [], loader.report
    assert len(batches) == 1 and len(batches[0]["paths"]) == 1
    return batches[0]


@pytest.mark.parametrize("kind", list(CASES))
def test_format_matches_pillow(crop: Image.Image, tmp_path: Path, kind: str) -> None:
    fmt = kind.split("_")[0].rstrip("0123456789").upper()
    path = tmp_path / f"img.{fmt.lower()}"
    write(kind, crop, path)
    with Image.open(path) as im:
        assert im.format == fmt, (kind, im.format)
    batch = load_one(tmp_path)
    got = batch["pixel_values"][0].numpy()
    ref = reference_sample(path, batch["target_sizes"][0], batch["crop_top_lefts"][0])
    assert batch["original_sizes"][0] == (CROP[1], CROP[0])
    diff = mean_abs_diff(got, ref)
    assert diff <= CASES[kind], (kind, diff)
    # Sanity of the comparison itself: the same reference flipped is far off.
    assert mean_abs_diff(got, ref[:, :, ::-1]) > CASES[kind]


@pytest.mark.parametrize(
    ("orientation", "stored"),
    [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)],
)
def test_tiff_orientation_tag_is_applied(
    crop: Image.Image, tmp_path: Path, orientation: int, stored: Image.Transpose
) -> None:
    # Compared exactly at one bucket's size (320x192 at resolution 256), not through reference_sample:
    # Pillow's TIFF plugin already reports a rotated TIFF's upright size, which reference_sample would
    # swap a second time. Stored turned the other way, with the tag that says how to turn it back.
    upright = crop.resize((320, 192))
    upright.transpose(stored).save(tmp_path / "img.tif", "TIFF", tiffinfo={274: orientation})
    with Image.open(tmp_path / "img.tif") as im:
        assert im.getexif().get(274) == orientation
        assert (np.asarray(im.convert("RGB")) == np.asarray(upright)).all()  # Pillow agrees
    batch = load_one(tmp_path)
    assert batch["original_sizes"][0] == (192, 320)
    assert (batch["pixel_values"][0].numpy() == np.asarray(upright).transpose(2, 0, 1)).all()


def test_tiff_16_bit_rgb_rounds_like_png(tmp_path: Path) -> None:
    # One bucket in size (64x64 at resolution 64), so the decoder alone is compared, exactly.
    rng = np.random.default_rng(14)
    pixels = rng.integers(0, 65536, size=(64, 64, 3), dtype=np.uint16)
    pixels[0, :3] = [[0x807F, 0x8080, 0xFF7F], [0, 65535, 128], [127, 32767, 32768]]
    raw_tiff(tmp_path / "rgb16.tif", pixels)
    loader = fastdiff.DataLoader(tmp_path, resolution=64, bucket_step=16, dtype=torch.uint8, shuffle=False)
    batch = next(iter(loader))
    assert loader.report["skipped"] == []
    got = batch["pixel_values"][0].numpy()
    want = ((pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8).transpose(2, 0, 1)
    assert (got == want).all()


def test_jxl_exif_orientation_is_applied(crop: Image.Image, tmp_path: Path) -> None:
    # pillow-jxl-plugin keeps the orientation in the Exif box (the codestream says 1), and Pillow's
    # exif_transpose honours it; so do we. Compared exactly at one bucket's size (lossless).
    upright = crop.resize((320, 192))
    exif = Image.Exif()
    exif[274] = 6
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    stored.save(tmp_path / "img.jxl", "JXL", lossless=True, exif=exif.tobytes())
    with Image.open(tmp_path / "img.jxl") as im:
        assert im.size == (192, 320) and im.getexif().get(274) == 6
        assert (np.asarray(ImageOps.exif_transpose(im).convert("RGB")) == np.asarray(upright)).all()
    batch = load_one(tmp_path)
    assert batch["original_sizes"][0] == (192, 320)
    assert (batch["pixel_values"][0].numpy() == np.asarray(upright).transpose(2, 0, 1)).all()


@pytest.mark.parametrize("planar", [False, True])
def test_tiff_cmyk_is_pillows_exactly(crop: Image.Image, tmp_path: Path, planar: bool) -> None:
    # One bucket in size (320x192 at resolution 256): the decode alone, against Pillow's convert("RGB").
    raw_tiff(tmp_path / "cmyk.tif", with_k(crop.resize((320, 192))), photometric=5, planar=planar)
    with Image.open(tmp_path / "cmyk.tif") as im:
        assert im.mode == "CMYK"
        want = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    got = load_one(tmp_path)["pixel_values"][0].numpy()
    assert (got == want).all()


def test_tiff_cmyk_16_bit_within_a_level_of_pillow(crop: Image.Image, tmp_path: Path) -> None:
    # Pillow narrows 16-bit CMYK samples by truncating; we round each to 8 bits first, so a converted
    # channel differs by at most 1 level per sample involved (its ink and K), 2 in all.
    ink = with_k(crop.resize((320, 192))).astype(np.uint32) * 257
    low = np.random.default_rng(14).integers(0, 256, ink.shape)
    cmyk16 = np.minimum(ink + low, 65535).astype(np.uint16)
    raw_tiff(tmp_path / "cmyk16.tif", cmyk16, photometric=5)
    with Image.open(tmp_path / "cmyk16.tif") as im:
        want = np.asarray(im.convert("RGB")).transpose(2, 0, 1).astype(int)
    got = load_one(tmp_path)["pixel_values"][0].numpy().astype(int)
    assert np.abs(got - want).max() <= 2
    assert 0 < np.abs(got - want).mean() <= 0.5  # rounding is not truncating


def test_every_image_format_is_loaded_or_reported(crop: Image.Image, tmp_path: Path) -> None:
    small = crop.resize((64, 48))
    small.save(tmp_path / "x.jpg", quality=95)
    small.save(tmp_path / "x.png")
    small.save(tmp_path / "x.bmp")
    small.save(tmp_path / "x.tiff")
    small.save(tmp_path / "x.gif")
    small.save(tmp_path / "x.jxl", "JXL", lossless=True)
    small.save(tmp_path / "x.avif", "AVIF")  # Pillow 13 writes AVIF natively
    pillow_heif.from_pillow(small).save(tmp_path / "x.heic")
    loader = fastdiff.DataLoader(tmp_path, resolution=64, bucket_step=16, shuffle=False)
    loaded = sorted(Path(p).name for batch in loader for p in batch["paths"])
    report = loader.report
    assert (report["found"], report["loaded"]) == (8, 6), report
    assert loaded == ["x.bmp", "x.gif", "x.jpg", "x.jxl", "x.png", "x.tiff"]
    assert report["formats"] == {"bmp": 1, "gif": 1, "jpeg": 1, "jxl": 1, "png": 1, "tiff": 1}
    skipped = {Path(s["path"]).name: s for s in report["skipped"]}
    for name, fmt in [("x.avif", "AVIF"), ("x.heic", "HEIF/HEIC")]:
        assert skipped[name]["code"] == "unsupported", skipped
        assert skipped[name]["message"] == (
            f"Error while decoding {tmp_path / name}: {fmt} is not supported by this build"
        )
    assert set(skipped) == {"x.avif", "x.heic"}
    assert report["passed_over"] == {"caption_files": 0, "other_files": 0, "hidden": 0}
    # With on_error="raise" the first one is a DecodeError.
    with pytest.raises(fastdiff.DecodeError, match=r"x\.avif: AVIF is not supported by this build"):
        fastdiff.DataLoader(tmp_path, resolution=64, bucket_step=16, on_error="raise")


def test_unsupported_is_sniffed_from_content(crop: Image.Image, tmp_path: Path) -> None:
    # An AVIF named .png is refused as AVIF, not as a broken PNG; a PNG named .heic is read.
    crop.resize((64, 64)).save(tmp_path / "photo.png", "AVIF")
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "real.heic", "PNG")
    loader = fastdiff.DataLoader(tmp_path, resolution=64, bucket_step=16, dtype=torch.uint8, shuffle=False)
    batch = next(iter(loader))
    assert [Path(p).name for p in batch["paths"]] == ["real.heic"]
    assert (batch["pixel_values"][0].numpy() == np.array([10, 200, 30])[:, None, None]).all()
    (skip,) = loader.report["skipped"]
    assert skip["code"] == "unsupported" and "photo.png: AVIF is not supported" in skip["message"]


def test_images_are_found_by_their_bytes_and_other_files_counted(
    crop: Image.Image, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = crop.resize((64, 48))
    small.save(tmp_path / "photo", "PNG")  # no extension
    small.save(tmp_path / "scan.dat", "JPEG", quality=95)  # a wrong one
    small.save(tmp_path / "x.jpg.part", "JXL", lossless=True)
    small.save(tmp_path / "download.bin", "AVIF")  # found, and skipped as unsupported
    (tmp_path / "photo.txt").write_text("BM is how this caption starts")  # a caption, never sniffed
    (tmp_path / "notes.md").write_text("BMP notes: not a bitmap")  # starts like a BMP, but is text
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\x01Bud1")
    (tmp_path / ".git").mkdir()
    small.save(tmp_path / ".git" / "hidden.png")
    loader = fastdiff.DataLoader(tmp_path, resolution=64, bucket_step=16, dtype=torch.uint8, shuffle=False)
    loaded = sorted(Path(p).name for batch in loader for p in batch["paths"])
    report = loader.report
    assert loaded == ["photo", "scan.dat", "x.jpg.part"]
    assert report["formats"] == {"jpeg": 1, "jxl": 1, "png": 1}
    (skip,) = report["skipped"]
    assert Path(skip["path"]).name == "download.bin" and skip["code"] == "unsupported"
    assert (report["found"], report["loaded"]) == (4, 3)
    assert report["found"] == report["loaded"] + len(report["skipped"])
    assert report["passed_over"] == {"caption_files": 1, "other_files": 3, "hidden": 2}
    # The extensionless PNG is paired with its caption file like any image, and decodes like Pillow's.
    batch = next(b for b in loader if Path(b["paths"][0]).name == "photo")
    assert batch["captions"] == ["BM is how this caption starts"]
    ref = reference_sample(tmp_path / "photo", batch["target_sizes"][0], batch["crop_top_lefts"][0])
    # 0.073 measured: a 64x48 image resized to an 80x48 bucket, where the two resizers differ more.
    assert mean_abs_diff(batch["pixel_values"][0].numpy(), ref) <= 0.2
    assert cli.main(["scan", str(tmp_path), "--resolution", "64", "--bucket-step", "16"]) == 0
    out = capsys.readouterr().out
    assert "images found: 4  loaded: 3  skipped: 1" in out
    assert "other files passed over: 3  caption files: 1  hidden: 2" in out
