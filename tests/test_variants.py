"""``crop_variants`` and ``text_variants``: K seeded crops / caption variants per image, one drawn per epoch.

Real decodes of small generated images; the draws' formulas are the core's (``rust/core/src/pipeline/
draws.rs`` tests them against hand computations), these check what ``fastdiff.DataLoader`` yields.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import fastdiff
import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five 120x64 noise images (resized to 60x32: 13 crop offsets in the 48x32 bucket) with tag captions."""
    root = tmp_path_factory.mktemp("variants")
    rng = np.random.default_rng(3)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (64, 120, 3), dtype=np.uint8)).save(root / f"im{i}.png")
        (root / f"im{i}.txt").write_text(f"id{i}, red, green, blue, cyan, pink")
    return root


def epochs(loader: fastdiff.DataLoader, n: int) -> list[list[Any]]:
    """Per epoch, the samples as (path, crop_top_left, caption, pixels)."""
    out = []
    for epoch in range(n):
        loader.set_epoch(epoch)
        out.append(
            [
                (path, crop, caption, batch["pixel_values"][i].clone())
                for batch in loader
                for i, (path, crop, caption) in enumerate(
                    zip(batch["paths"], batch["crop_top_lefts"], batch["captions"], strict=True)
                )
            ]
        )
    return out


def make(folder: Path, **kwargs: Any) -> fastdiff.DataLoader:
    subset = fastdiff.Subset(folder, shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.2)
    options: dict[str, Any] = {"resolution": 40, "bucket_step": 16, "batch_size": 2, "dtype": torch.uint8}
    return fastdiff.DataLoader(subsets=[subset], crop="random", **options, **kwargs)


def test_k_variants_bound_the_crops_and_captions_each_image_shows(folder: Path) -> None:
    crops: dict[str, set[tuple[int, int]]] = defaultdict(set)
    captions: dict[str, set[str]] = defaultdict(set)
    pixels: dict[tuple[str, tuple[int, int]], torch.Tensor] = {}
    dropped = 0
    runs = epochs(make(folder, crop_variants=2, text_variants=3, num_threads=2), 12)
    for path, crop, caption, values in (s for run in runs for s in run):
        crops[path].add(crop)
        if caption:
            captions[path].add(caption)
            assert caption.startswith(f"{Path(path).stem.replace('im', 'id')}, ")  # keep_tokens=1
        else:
            dropped += 1
        # The same crop of an image is the same pixels in every epoch that uses it.
        assert torch.equal(pixels.setdefault((path, crop), values), values)
    assert all(len(c) <= 2 for c in crops.values()) and any(len(c) == 2 for c in crops.values())
    assert all(len(c) <= 3 for c in captions.values()) and any(len(c) == 3 for c in captions.values())
    assert 0 < dropped < 60  # dropout stays a per-epoch draw at rate 0.2 of 60 samples

    # Without variants every epoch draws anew: many crops and tag orders per image.
    free = [s for run in epochs(make(folder, num_threads=2), 12) for s in run]
    assert max(len({c for p, c, _, _ in free if p == path}) for path in crops) > 2
    assert max(len({t for p, _, t, _ in free if p == path}) for path in crops) > 3

    # The draws do not depend on the thread count.
    one = epochs(make(folder, crop_variants=2, text_variants=3, num_threads=1), 3)
    for a, b in zip(one, runs[:3], strict=True):
        assert [s[:3] for s in a] == [s[:3] for s in b]
        assert all(torch.equal(x[3], y[3]) for x, y in zip(a, b, strict=True))


def test_variants_are_recorded_in_the_state_and_must_match(folder: Path) -> None:
    plain, two = make(folder, num_threads=1), make(folder, crop_variants=2, num_threads=1)
    assert "crop_variants" not in plain.state_dict()["options"]
    assert two.state_dict()["options"]["crop_variants"] == 2
    with pytest.raises(ValueError, match="crop_variants"):
        plain.load_state_dict(two.state_dict())
