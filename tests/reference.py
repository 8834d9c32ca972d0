"""Pillow reference of fastdiff's per-sample transform, for pixel-correctness tests.

Given a file and what fastdiff reported for it (bucket, crop_top_left, flip), redo the same steps with
Pillow: ``ImageOps.exif_transpose`` → alpha over the background → resize to cover the bucket (Lanczos)
→ crop → optional flip. Sizes follow fastdiff's documented rule: ``s = max(bw / W, bh / H)``,
``resized = (max(bw, round(W * s)), max(bh, round(H * s)))``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

#: EXIF orientations that swap width and height.
TRANSPOSING = (5, 6, 7, 8)


def upright_rgb(
    path: str | Path,
    background: tuple[int, int, int] = (255, 255, 255),
    draft_cover: tuple[int, int] | None = None,
) -> Image.Image:
    """The file as Pillow sees it upright, RGB, transparency composited onto ``background``.

    ``draft_cover``: upright ``(w, h)`` the image will be resized to; a JPEG is then decoded at the
    smallest DCT scale (1/8, 1/4, 1/2) that still covers it (Pillow's ``Image.draft``, libjpeg's own
    scaled IDCT), as a DCT-scaling loader decodes it.
    """
    with Image.open(path) as im:
        if draft_cover is not None:
            w, h = draft_cover
            im.draft("RGB", (h, w) if im.getexif().get(0x0112, 1) in TRANSPOSING else (w, h))
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I"):
            im = im.point(lambda v: v / 256).convert("L")
        if im.mode == "P" or im.mode in ("LA", "RGBA", "PA") or "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode == "RGBA":
            bg = Image.new("RGBA", im.size, (*background, 255))
            im = Image.alpha_composite(bg, im)
        return im.convert("RGB")


def resized_size(width: int, height: int, bucket_h: int, bucket_w: int) -> tuple[int, int]:
    """(w, h) of the cover resize of an upright ``width x height`` image for a bucket."""
    s = max(bucket_w / width, bucket_h / height)
    return max(bucket_w, round(width * s)), max(bucket_h, round(height * s))


def reference_sample(
    path: str | Path,
    target_size: tuple[int, int],
    crop_top_left: tuple[int, int],
    flipped: bool = False,
    background: tuple[int, int, int] = (255, 255, 255),
    dct_scaled: bool = False,
) -> np.ndarray:
    """uint8 array [3, H, W] that fastdiff should produce for ``path`` (Pillow Lanczos resize).

    ``dct_scaled``: decode a JPEG at the DCT scale a DCT-scaling loader uses (see :func:`upright_rgb`)
    instead of at full size.
    """
    bh, bw = target_size
    with Image.open(path) as raw:
        w, h = raw.size
        if raw.getexif().get(0x0112, 1) in TRANSPOSING:
            w, h = h, w
    rw, rh = resized_size(w, h, bh, bw)
    im = upright_rgb(path, background, draft_cover=(rw, rh) if dct_scaled else None)
    im = im.resize((rw, rh), Image.Resampling.LANCZOS)
    top, left = crop_top_left
    if flipped:
        left = rw - bw - left  # crop_top_left is measured from the right edge after a flip
    im = im.crop((left, top, left + bw, top + bh))
    if flipped:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(im).transpose(2, 0, 1)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 arrays, in 0–255 levels."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())
