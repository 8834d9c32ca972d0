"""Multi-resolution training (issue 15): :meth:`fastdiff.DatasetGroup.at_resolutions` trains every image once
per resolution per epoch from one scan; counts exact on a header-only set (worked by hand in the comments),
every image's uses counted on real images, and a resumed epoch continues exactly."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import fastdiff
import pytest
import torch
from conftest import copy_with_captions, smallest_images, write_header_png


def test_counts_and_len_are_exact_on_a_header_only_set(tmp_path: Path) -> None:
    # 10 square images and 5 of aspect 2:1, batches of 4: at any resolution the squares fill one bucket
    # (3 batches: 4 + 4 + 2) and the wide ones another (2 batches: 4 + 1): 5 batches per resolution.
    for i in range(10):
        write_header_png(tmp_path / f"s{i}.png", 2048, 2048)
    for i in range(5):
        write_header_png(tmp_path / f"w{i}.png", 4096, 2048)
    loader = fastdiff.DataLoader(tmp_path, batch_size=4, bucket_step=64)
    group = fastdiff.DatasetGroup.at_resolutions(loader, [256, 512, 768], seed=3)
    assert [len(one) for one in group.loaders] == [5, 5, 5]
    assert len(group) == 15
    assert [r["images_trained"] for r in group.report] == [15, 15, 15]
    # Each resolution's own buckets: the square one is resolution x resolution (all multiples of 64).
    assert all((r, r) in one.buckets for one, r in zip(group.loaders, [256, 512, 768], strict=True))
    assert group.loaders[0].buckets != group.loaders[1].buckets
    assert [sorted(n for _, n in one.report["images_per_bucket"]) for one in group.loaders] == [[5, 10]] * 3
    order = group.order(0)
    assert Counter(order) == {0: 5, 1: 5, 2: 5}
    assert order == group.order(0) != group.order(1)  # seeded per epoch
    with pytest.raises(ValueError, match="distinct"):
        fastdiff.DatasetGroup.at_resolutions(loader, [256, 256])
    with pytest.raises(ValueError, match="distinct"):
        fastdiff.DatasetGroup.at_resolutions(loader, [])


Step = tuple[tuple[int, int], list[str], torch.Tensor]


def batches(group: fastdiff.DatasetGroup, epoch: int) -> list[Step]:
    group.set_epoch(epoch)
    return [(tuple(b["pixel_values"].shape[2:]), b["paths"], b["pixel_values"].clone()) for b in group]


def test_every_image_once_per_resolution_per_epoch_and_resume_is_exact(
    wallpapers: Path, tmp_path: Path
) -> None:
    data = copy_with_captions(smallest_images(wallpapers, 6), tmp_path / "d")
    options = {"batch_size": 2, "bucket_step": 16, "crop": "random", "flip_prob": 0.5, "num_threads": 1}
    loader = fastdiff.DataLoader(data, **options)
    resolutions = [32, 48, 64]
    group = fastdiff.DatasetGroup.at_resolutions(loader, resolutions, seed=1)
    full = batches(group, 2)
    assert len(full) == len(group)
    order = group.order(2)
    uses: Counter[tuple[int, str]] = Counter()
    for k, (shape, paths, _) in zip(order, full, strict=True):
        assert shape in group.loaders[k].buckets
        assert shape[0] * shape[1] <= resolutions[k] ** 2
        uses.update((k, p) for p in paths)
    names = sorted(str(p) for p in data.iterdir() if p.suffix != ".txt")
    assert uses == Counter((k, p) for k in range(3) for p in names)  # each image once per resolution
    # Resumed mid-epoch from the state: exactly the rest.
    group.set_epoch(2)
    it = iter(group)
    for _ in range(5):
        next(it)
    state = group.state_dict()
    again = fastdiff.DatasetGroup.at_resolutions(loader, resolutions, seed=1)
    again.load_state_dict(state)
    rest = [(tuple(b["pixel_values"].shape[2:]), b["paths"], b["pixel_values"].clone()) for b in again]
    assert len(rest) == len(full) - 5
    for (s1, p1, x1), (s2, p2, x2) in zip(rest, full[5:], strict=True):
        assert (s1, p1) == (s2, p2) and torch.equal(x1, x2)
    # A state of other resolutions is refused.
    other = fastdiff.DatasetGroup.at_resolutions(loader, [32, 48, 96], seed=1)
    with pytest.raises(ValueError, match="resolution"):
        other.load_state_dict(state)
