"""Conditioning views: masks and control images take exactly the target's crop, flip and resize.

Real decodes of PNGs written here; expectations are recomputed from the returned pixels (the mask is a
function of the colour, the control image a shifted copy of the target) or computed with Pillow.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fastdiff
import numpy as np
import pytest
import torch
from PIL import Image

SIZES = [(97, 71), (64, 120), (150, 90), (80, 80), (53, 131)]


def _noise(rng: np.random.Generator, w: int, h: int, channels: int) -> np.ndarray:
    # Smooth-ish noise: a small random field upscaled, so that resizes are not all aliasing.
    small = rng.integers(0, 256, (max(2, h // 6), max(2, w // 6), channels), dtype=np.uint8)
    img = Image.fromarray(small.squeeze(-1) if channels == 1 else small).resize((w, h), Image.BILINEAR)
    arr = np.asarray(img)
    return arr.reshape(h, w, channels)


def _alpha_set(root: Path, seed: int = 0) -> None:
    """RGBA PNGs whose red is 255 and alpha a random field: over black, the returned red IS alpha."""
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(SIZES):
        rgba = np.empty((h, w, 4), np.uint8)
        rgba[..., 0] = 255
        rgba[..., 1:3] = _noise(rng, w, h, 2)
        rgba[..., 3] = _noise(rng, w, h, 1)[..., 0]
        Image.fromarray(rgba, "RGBA").save(root / f"img_{i:02d}.png")


def _loader(root: Path, **kw: object) -> fastdiff.DataLoader:
    base: dict[str, object] = dict(
        resolution=64, bucket_step=8, batch_size=2, num_threads=2, crop="random", flip_prob=0.5
    )
    return fastdiff.DataLoader(root, **{**base, **kw})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alpha_mask_equals_mask_recomputed_from_returned_pixels(tmp_path: Path, seed: int) -> None:
    _alpha_set(tmp_path)
    loader = _loader(
        tmp_path, mask_from_alpha=True, background=(0, 0, 0), filter="box", dtype=torch.uint8, seed=seed
    )
    buckets = set()
    for batch in loader:
        pixels, masks = batch["pixel_values"].numpy(), batch["masks"].numpy()
        b, _, h, w = pixels.shape
        assert masks.shape == (b, 1, h, w) and masks.dtype == np.float32
        assert masks.min() >= 0.0 and masks.max() <= 1.0
        # The mask is a function of the colour: red over black = 255 * a / 255 = a, resized with the same
        # (box) filter over the same window and flipped with it: equal to the last bit.
        np.testing.assert_array_equal(masks[:, 0], pixels[:, 0].astype(np.float32) / 255.0)
        buckets.add((h, w))
    assert len(buckets) >= 3


def _pillow_mask(
    path: Path, target: tuple[int, int], crop_top_left: tuple[int, int], flipped: bool
) -> np.ndarray:
    """Pillow's mask of ``path`` for one sample: alpha resized to cover (BOX), cropped, maybe flipped."""
    alpha = Image.open(path).getchannel("A")
    (th, tw), (top, left) = target, crop_top_left
    w, h = alpha.size
    s = max(tw / w, th / h)
    rw, rh = max(tw, int(w * s + 0.5)), max(th, int(h * s + 0.5))
    resized = np.asarray(alpha.resize((rw, rh), Image.BOX), np.float32) / 255.0
    if flipped:
        resized = resized[:, ::-1]
    return resized[top : top + th, left : left + tw]


def _on_one_row_and_column(bad: np.ndarray) -> bool:
    """Whether the True pixels of ``bad`` all lie on one row or one column."""
    rows, cols = np.nonzero(bad)
    if len(rows) == 0:
        return True
    r = np.bincount(rows).argmax()
    rest = cols[rows != r]
    return len(np.unique(rest)) <= 1


def test_alpha_mask_matches_pillow_after_crop_flip_and_resize(tmp_path: Path) -> None:
    _alpha_set(tmp_path, seed=5)
    loader = _loader(tmp_path, mask_from_alpha=True, seed=3, flip_prob=0.5)
    seen_flip = seen_plain = False
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            for k, path in enumerate(batch["paths"]):
                got = batch["masks"][k, 0].numpy()
                target, ctl = batch["target_sizes"][k], batch["crop_top_lefts"][k]
                # crop_top_left is flip-aware (left edge in the mirrored image): try both readings and
                # require that exactly the pixels' own flip state explains the mask.
                diffs = {f: np.abs(_pillow_mask(Path(path), target, ctl, f) - got) for f in (False, True)}
                best = min(diffs, key=lambda f: float(diffs[f].mean()))
                # One level apart at most (rounding between the two passes), except on at most one row
                # and one column: where a box edge falls exactly on a pixel boundary, Pillow and
                # fast_image_resize break the tie differently (e.g. 71 -> 56 rows, row 28).
                assert _on_one_row_and_column(diffs[best] > 1.5 / 255), (path, diffs[best].max())
                assert diffs[not best].mean() > 0.05, path  # the other flip state does not fit
                seen_flip |= best
                seen_plain |= not best
    assert seen_flip and seen_plain


def test_masks_latent_is_the_block_mean_of_the_pixel_mask(tmp_path: Path) -> None:
    _alpha_set(tmp_path)
    for factor in (8, 4):
        loader = _loader(tmp_path, mask_from_alpha=True, vae_scale_factor=factor)
        for batch in loader:
            m = batch["masks"].numpy().astype(np.float64)
            b, _, h, w = m.shape
            want = m.reshape(b, 1, h // factor, factor, w // factor, factor).mean(axis=(3, 5))
            assert batch["masks_latent"].shape == (b, 1, h // factor, w // factor)
            np.testing.assert_allclose(batch["masks_latent"].numpy(), want, atol=1e-6)


def test_mask_dir_masks_follow_the_target_colour(tmp_path: Path) -> None:
    """A mask file equal to the image's green channel: returned masks equal the returned green."""
    images, masks = tmp_path / "img", tmp_path / "masks"
    (images / "sub").mkdir(parents=True)
    (masks / "sub").mkdir(parents=True)
    rng = np.random.default_rng(7)
    for i, (w, h) in enumerate(SIZES):
        rgb = _noise(rng, w, h, 3)
        rel = f"sub/a{i}" if i % 2 else f"a{i}"
        Image.fromarray(rgb).save(images / f"{rel}.png")
        # Another format for the mask than for the image: pairing is by stem.
        Image.fromarray(rgb[..., 1], "L").save(masks / f"{rel}.bmp")
    loader = _loader(images, mask_dir=masks, filter="box", seed=4)
    assert loader.report["loaded"] == len(SIZES)
    for batch in loader:
        green = (batch["pixel_values"][:, 1].numpy().astype(np.float64) + 1.0) * 127.5
        np.testing.assert_allclose(batch["masks"][:, 0].numpy() * 255.0, green, atol=1e-3)


def _shifted_set(root: Path, controls: Path, d: int) -> None:
    """72x64 targets (bucket 64x64 at scale 1: no resampling, 8 px of horizontal crop room) and
    controls = the target shifted left by ``d`` columns (wrapping)."""
    rng = np.random.default_rng(11)
    for i in range(6):
        rgb = rng.integers(0, 256, (64, 72, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / f"t{i}.png")
        Image.fromarray(np.roll(rgb, -d, axis=1)).save(controls / f"t{i}.png")


def test_control_image_shifted_by_a_known_offset_stays_aligned_under_flips(tmp_path: Path) -> None:
    images, controls = tmp_path / "img", tmp_path / "ctl"
    images.mkdir()
    controls.mkdir()
    d = 3
    _shifted_set(images, controls, d)
    flipped = plain = 0
    for seed in range(4):
        loader = _loader(images, control_dir=controls, dtype=torch.uint8, seed=seed)
        for batch in loader:
            assert batch["target_sizes"][0] == (64, 64)
            px, ctl = batch["pixel_values"].numpy(), batch["control_pixel_values"].numpy()
            assert ctl.shape == px.shape and ctl.dtype == px.dtype
            for k in range(px.shape[0]):
                # Unflipped: control[x] = target[x + d]; flipped with the target: control[x] = target[x - d].
                as_plain = np.array_equal(ctl[k, :, :, : 64 - d], px[k, :, :, d:])
                as_flipped = np.array_equal(ctl[k, :, :, d:], px[k, :, :, : 64 - d])
                assert as_plain != as_flipped, batch["paths"][k]
                flipped += as_flipped
                plain += as_plain
    assert flipped and plain


def test_several_control_dirs_stack_as_k(tmp_path: Path) -> None:
    images, c1, c2 = tmp_path / "img", tmp_path / "c1", tmp_path / "c2"
    for p in (images, c1, c2):
        p.mkdir()
    _shifted_set(images, c1, 1)
    _shifted_set(images, c2, 2)
    loader = _loader(images, control_dir=[c1, c2], flip_prob=0.0, crop="center")
    for batch in loader:
        px, ctl = batch["pixel_values"], batch["control_pixel_values"]
        assert ctl.shape == (px.shape[0], 2, *px.shape[1:]) and ctl.dtype == px.dtype
        for k, d in enumerate((1, 2)):
            np.testing.assert_array_equal(ctl[:, k, :, :, : 64 - d].numpy(), px[:, :, :, d:].numpy())


def _one_char_set(tmp_path: Path) -> tuple[Path, Path]:
    images, controls = tmp_path / "img", tmp_path / "ctl"
    images.mkdir()
    controls.mkdir()
    for name in ("cat_01", "cat_02", "dog"):
        Image.new("RGB", (64, 64), (10, 20, 30)).save(images / f"{name}.png")
    for name in ("cat_01", "cat_2", "dog"):  # cat_2: one character from cat_02 (ai-toolkit #737)
        Image.new("RGB", (64, 64), (40, 50, 60)).save(controls / f"{name}.png")
    return images, controls


def test_one_character_name_mismatch_is_reported_with_the_near_miss(tmp_path: Path) -> None:
    images, controls = _one_char_set(tmp_path)
    with pytest.warns(UserWarning, match="orphan_control"):
        loader = _loader(images, control_dir=controls)
    report = loader.report
    assert report["loaded"] + len(report["skipped"]) == report["found"] == 3
    (skip,) = report["skipped"]
    assert skip["code"] == "missing_control" and skip["path"].endswith("cat_02.png")
    assert '"cat_2"' in skip["message"] and str(controls) in skip["message"]
    (orphan,) = [w for w in report["warnings"] if w.startswith("orphan_control")]
    assert "cat_2.png" in orphan and '"cat_02"' in orphan
    assert sorted(Path(p).name for b in loader for p in b["paths"]) == ["cat_01.png", "dog.png"]

    with pytest.raises(FileNotFoundError, match=r"cat_02\.png.*nearest: \"cat_2\""):
        _loader(images, control_dir=controls, require_pairs=True)


def test_scan_lists_unpaired_files_with_their_codes(tmp_path: Path) -> None:
    images, controls = _one_char_set(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "fastdiff", "scan", str(images), "--control-dir", str(controls)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "[missing_control]" in out and "cat_02.png" in out
    assert "orphan_control:" in out and "cat_2.png" in out


def test_bad_view_options_are_value_errors(tmp_path: Path) -> None:
    _alpha_set(tmp_path)
    with pytest.raises(ValueError, match="mask_from_alpha and mask_dir"):
        _loader(tmp_path, mask_from_alpha=True, mask_dir=tmp_path)
    with pytest.raises(ValueError, match="vae_scale_factor"):
        _loader(tmp_path, mask_from_alpha=True, vae_scale_factor=16)
    with pytest.raises(ValueError, match="control_dir"):
        _loader(tmp_path, control_dir=tmp_path / "nope")


def test_masked_loss_of_a_tiny_sd_step_is_the_hand_computation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import tiny_run
    from fastdiff.training import sd
    from tiny_sd import build_sd15

    images = tmp_path / "img"
    images.mkdir()
    _alpha_set(images)
    task = sd.PipelineTask.from_config(
        tiny_run(build_sd15(tmp_path / "sd15"), images, tmp_path / "out"), torch.device("cpu")
    )
    seen: dict[str, torch.Tensor] = {}
    real = sd.diffusion_loss_from

    def spy(scheduler, noised, prediction, snr_gamma, sample_weights=None, mask=None):  # type: ignore[no-untyped-def]
        seen.update(prediction=prediction.detach(), target=noised.target.detach())
        seen["mask"] = mask
        return real(scheduler, noised, prediction, snr_gamma, sample_weights, mask)

    monkeypatch.setattr(sd, "diffusion_loss_from", spy)
    # The tiny VAE downscales by 2: vae_scale_factor=2 makes masks_latent the prediction's size.
    loader = fastdiff.DataLoader(
        images, resolution=32, bucket_step=8, batch_size=2, mask_from_alpha=True, vae_scale_factor=2
    )
    batch = next(iter(loader))
    loss = task.loss(batch, generator=torch.Generator().manual_seed(0), amp_dtype=None)
    mask = batch["masks_latent"].double()
    assert seen["mask"] is not None and torch.equal(seen["mask"], batch["masks_latent"])
    assert 0.05 < float(mask.mean()) < 0.95  # a real mask, neither all ones nor all zeros
    err = (seen["prediction"].double() - seen["target"].double()) ** 2
    # Hand computation: per sample mean(mask * err) / mean(mask), then the batch mean.
    per_sample = [float((err[b] * mask[b]).mean() / mask[b].mean()) for b in range(err.shape[0])]
    assert float(loss) == pytest.approx(sum(per_sample) / len(per_sample), rel=1e-5)
    assert float(loss) != pytest.approx(float(err.mean()), rel=1e-3)  # the mask changed the loss
    loss.backward()  # and it trains: gradients reach the UNet
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.unet.parameters())

    # `fastdiff train` on a dataset TOML with `mask_from_alpha = true`: every step's loss is masked.
    from fastdiff.training.run import train

    toml = tmp_path / "data.toml"
    toml.write_text(
        "[general]\nmask_from_alpha = true\nvae_scale_factor = 2\n[[datasets]]\n"
        '[[datasets.subsets]]\nimage_dir = "img"\n'
    )
    seen.clear()
    masks_seen: list[bool] = []
    monkeypatch.setattr(
        sd,
        "diffusion_loss_from",
        lambda *a, **k: masks_seen.append(a[5] is not None) or real(*a, **k),
    )
    result = train(tiny_run(tmp_path / "sd15", toml, tmp_path / "run", max_steps=2))
    assert masks_seen == [True, True] and all(np.isfinite(result.losses))


def test_loss_mask_picks_the_prediction_size_else_area_resizes_masks() -> None:
    from fastdiff.training.objective import loss_mask

    masks = torch.rand(2, 1, 16, 24)
    latent = masks.reshape(2, 1, 2, 8, 3, 8).mean(dim=(3, 5))
    batch = {"masks": masks, "masks_latent": latent}
    cpu = torch.device("cpu")
    assert torch.equal(loss_mask(batch, (2, 3), cpu), latent)
    assert torch.equal(loss_mask(batch, (16, 24), cpu), masks)
    # Any other size: masks area-averaged (4x4 blocks here), as kohya-ss apply_masked_loss does.
    want = masks.reshape(2, 1, 4, 4, 6, 4).mean(dim=(3, 5))
    torch.testing.assert_close(loss_mask(batch, (4, 6), cpu), want)
    assert loss_mask({}, (4, 6), cpu) is None


def test_masks_of_held_out_and_skipped_images_are_not_orphans(tmp_path: Path) -> None:
    images, masks = tmp_path / "img", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(12):
        Image.new("RGB", (64, 64), (i, 0, 0)).save(images / f"p{i:02d}.png")
        Image.new("L", (64, 64), 255).save(masks / f"p{i:02d}.png")
    (images / "p00.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # skipped by the scan (decode)
    (masks / "stray.png").write_bytes((masks / "p01.png").read_bytes())
    train = _loader(images, mask_dir=masks, validation_split=0.4, seed=1)
    val = _loader(images, mask_dir=masks, validation_split=0.4, seed=1, validation=True)
    for loader in (train, val):
        report = loader.report
        assert report["loaded"] > 0
        # Only the mask of no image at all is an orphan: not those of the other split or of p00.
        assert [w for w in report["warnings"] if "orphan" in w] == [
            f"orphan_mask: {masks / 'stray.png'} pairs with no image"
        ]
    assert train.report["loaded"] + val.report["loaded"] == 11


def test_flow_loss_is_masked_like_the_ddpm_loss() -> None:
    from fastdiff.training.flow import FlowNoised, flow_loss, loss_weights

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    mask = (torch.rand(2, 1, 6, 6, generator=g) > 0.5).float()
    sigmas = torch.tensor([0.3, 0.8])
    noised = FlowNoised(torch.zeros_like(pred), sigmas, target)
    got = flow_loss(pred, noised, "sigma_sqrt", None, mask)
    err = (pred - target) ** 2
    per_sample = (err * mask).mean(dim=(1, 2, 3)) / mask.mean(dim=(1, 2, 3))
    want = (per_sample * loss_weights("sigma_sqrt", sigmas)).mean()
    torch.testing.assert_close(got, want)


def test_masked_flow_loss_of_a_tiny_flux_step_is_the_hand_computation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import tiny_run
    from fastdiff.training import dit
    from fastdiff.training.dit_pipeline import dit_family
    from fastdiff.training.flow import loss_weights
    from tiny_dit import SEQUENCE_TOKENS, build_flux

    images = tmp_path / "img"
    images.mkdir()
    _alpha_set(images)
    model = build_flux(tmp_path / "flux")
    family = dit_family(model)
    assert family is not None
    cfg = tiny_run(model, images, tmp_path / "out", max_sequence_length=SEQUENCE_TOKENS)
    task = dit.DiTTask.from_config(cfg, torch.device("cpu"), family)
    seen: dict[str, object] = {}
    real = dit.flow_loss

    def spy(prediction, noised, weighting, sample_weights=None, mask=None):  # type: ignore[no-untyped-def]
        seen.update(prediction=prediction.detach(), noised=noised, weighting=weighting, mask=mask)
        return real(prediction, noised, weighting, sample_weights, mask)

    monkeypatch.setattr(dit, "flow_loss", spy)
    loader = fastdiff.DataLoader(
        images, resolution=32, bucket_step=8, batch_size=2, mask_from_alpha=True, vae_scale_factor=2
    )
    batch = next(iter(loader))
    loss = task.loss(batch, generator=torch.Generator().manual_seed(0), amp_dtype=None)
    # The unpacked latent prediction is at the latents' size: masks_latent is the mask used.
    assert torch.equal(seen["mask"], batch["masks_latent"])  # type: ignore[arg-type]
    mask = batch["masks_latent"].double()
    noised = seen["noised"]
    err = (seen["prediction"].double() - noised.target.double()) ** 2  # type: ignore[attr-defined, union-attr]
    per_sample = (err * mask).mean(dim=(1, 2, 3)) / mask.mean(dim=(1, 2, 3))
    weights = loss_weights(str(seen["weighting"]), noised.sigmas).double()  # type: ignore[attr-defined]
    assert float(loss) == pytest.approx(float((per_sample * weights).mean()), rel=1e-5)
