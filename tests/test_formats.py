"""Issue 14, "every image format a user has": BMP, TIFF and GIF are read; AVIF, HEIF/HEIC and JPEG XL
are found and skipped as ``unsupported``, never silently ignored.

Each readable format is written with Pillow (or, where Pillow cannot write the case, by hand) from a crop
of a real wallpaper, loaded through ``fastdiff.DataLoader`` and compared with Pillow's reading of the
same file (``convert("RGB")``, transparency composited onto the background, ``exif_transpose``) through
``tests/reference.py``: the crop is not one bucket in size, so both sides resample (Lanczos) and the
comparison is a mean absolute difference in 0-255 levels, bounded at 2-3x the measured value.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import fastdiff
import numpy as np
import pytest
import torch
from PIL import Image
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


def tiff_rgb16(path: Path, pixels: np.ndarray) -> None:
    """An uncompressed little-endian 16-bit RGB TIFF of ``pixels`` (uint16 [H, W, 3]); Pillow cannot
    write one."""
    h, w, _ = pixels.shape
    data = pixels.astype("<u2").tobytes()
    # Tags (sorted): width, height, bits per sample (3 values, at an offset), compression none,
    # photometric RGB, strip offset, samples per pixel, rows per strip, strip byte count.
    bits_at = 8 + len(data)
    ifd_at = bits_at + 6
    tags = [
        (256, 4, 1, w),
        (257, 4, 1, h),
        (258, 3, 3, bits_at),
        (259, 3, 1, 1),
        (262, 3, 1, 2),
        (273, 4, 1, 8),
        (277, 3, 1, 3),
        (278, 4, 1, h),
        (279, 4, 1, len(data)),
    ]
    out = b"II*\0" + struct.pack("<I", ifd_at) + data + struct.pack("<3H", 16, 16, 16)
    out += struct.pack("<H", len(tags))
    for tag, typ, count, value in tags:
        packed = struct.pack("<Hxx", value) if typ == 3 and count == 1 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, typ, count) + packed
    path.write_bytes(out + struct.pack("<I", 0))


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
        # Pillow's own RGB -> CMYK has K = 0; a real K channel (half the inverted luma) exercises it.
        cmyk = np.asarray(crop.convert("CMYK")).copy()
        cmyk[:, :, 3] = (255 - np.asarray(crop.convert("L"), dtype=np.uint16)) // 2
        Image.fromarray(cmyk, "CMYK").save(path, "TIFF")
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
# sides resizing with Lanczos: BMP 24/32-bit 0.013, TIFF RGB 0.013, TIFF LZW RGBA 0.010, TIFF 16-bit gray
# 0.16 (we round 16 -> 8 bits, Pillow truncates), TIFF CMYK 0.56 (the image crate's (255 - c)(255 - k)/255
# truncated, against Pillow's cmyk2rgb), GIF with transparency 0.013, animated GIF 0.021. Bounds are
# 2-3x those.
CASES = {
    "bmp24": 0.04,
    "bmp32": 0.04,
    "tiff_rgb8": 0.04,
    "tiff_lzw_rgba": 0.03,
    "tiff_gray16": 0.4,
    "tiff_cmyk": 1.5,
    "gif_transparent": 0.04,
    "gif_animated": 0.06,
}


def load_one(folder: Path, **kwargs: Any) -> dict[str, Any]:
    loader = fastdiff.DataLoader(folder, resolution=256, dtype=torch.uint8, shuffle=False, **kwargs)
    batches = list(loader)
    assert loader.report["skipped"] == [], loader.report
    assert len(batches) == 1 and len(batches[0]["paths"]) == 1
    return batches[0]


@pytest.mark.parametrize("kind", list(CASES))
def test_format_matches_pillow(crop: Image.Image, tmp_path: Path, kind: str) -> None:
    fmt = kind[:4].rstrip("23_").upper()
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
    tiff_rgb16(tmp_path / "rgb16.tif", pixels)
    loader = fastdiff.DataLoader(tmp_path, resolution=64, bucket_step=16, dtype=torch.uint8, shuffle=False)
    batch = next(iter(loader))
    assert loader.report["skipped"] == []
    got = batch["pixel_values"][0].numpy()
    want = ((pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8).transpose(2, 0, 1)
    assert (got == want).all()


def minimal(fmt: str) -> bytes:
    """The first bytes of an AVIF, HEIC or JPEG XL file: enough to be recognised, no image data."""
    if fmt == "avif":
        return struct.pack(">I", 28) + b"ftypavif" + b"\0\0\0\0" + b"avifmif1miaf" + b"\0" * 16
    if fmt == "heic":
        return struct.pack(">I", 24) + b"ftypheic" + b"\0\0\0\0" + b"mif1heic" + b"\0" * 16
    return b"\xff\x0a\xfa\x7f\x01\x90\x08" + b"\0" * 16  # JPEG XL codestream


def test_every_image_format_is_loaded_or_reported(crop: Image.Image, tmp_path: Path) -> None:
    small = crop.resize((64, 48))
    small.save(tmp_path / "x.jpg", quality=95)
    small.save(tmp_path / "x.png")
    small.save(tmp_path / "x.bmp")
    small.save(tmp_path / "x.tiff")
    small.save(tmp_path / "x.gif")
    for fmt in ["avif", "heic", "jxl"]:
        (tmp_path / f"x.{fmt}").write_bytes(minimal(fmt))
    loader = fastdiff.DataLoader(tmp_path, resolution=64, bucket_step=16, shuffle=False)
    loaded = sorted(Path(p).name for batch in loader for p in batch["paths"])
    report = loader.report
    assert (report["found"], report["loaded"]) == (8, 5), report
    assert loaded == ["x.bmp", "x.gif", "x.jpg", "x.png", "x.tiff"]
    skipped = {Path(s["path"]).name: s for s in report["skipped"]}
    for name, fmt in [("x.avif", "AVIF"), ("x.heic", "HEIF/HEIC"), ("x.jxl", "JPEG XL")]:
        assert skipped[name]["code"] == "unsupported", skipped
        assert skipped[name]["message"] == (
            f"Error while decoding {tmp_path / name}: {fmt} is not supported by this build"
        )
    assert set(skipped) == {"x.avif", "x.heic", "x.jxl"}
    # With on_error="raise" the first one is a DecodeError.
    with pytest.raises(fastdiff.DecodeError, match=r"x\.avif: AVIF is not supported by this build"):
        fastdiff.DataLoader(tmp_path, resolution=64, bucket_step=16, on_error="raise")


def test_unsupported_is_sniffed_from_content(tmp_path: Path) -> None:
    # An AVIF named .png is refused as AVIF, not as a broken PNG; a PNG named .heic is read.
    (tmp_path / "photo.png").write_bytes(minimal("avif"))
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "real.heic", "PNG")
    loader = fastdiff.DataLoader(tmp_path, resolution=64, bucket_step=16, dtype=torch.uint8, shuffle=False)
    batch = next(iter(loader))
    assert [Path(p).name for p in batch["paths"]] == ["real.heic"]
    assert (batch["pixel_values"][0].numpy() == np.array([10, 200, 30])[:, None, None]).all()
    (skip,) = loader.report["skipped"]
    assert skip["code"] == "unsupported" and "photo.png: AVIF is not supported" in skip["message"]
