"""Issue 11, the cache's storage seen from Python: shards written by the native ``ShardWriter`` are
genuine safetensors files (read back bitwise by the ``safetensors`` library), entries are checksummed
with the same blake3 as ``content_hash``, and damaged shards are errors, never data.

The keys' own known-answer and sensitivity tests are the Rust unit tests of
``rust/core/src/cache/key.rs``; here only what crosses the boundary is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import fastdiff
import numpy as np
import pytest
import torch
from fastdiff import _fastdiff as native
from safetensors import safe_open

SALT = "00112233445566778899aabbccddeeff"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (bitwise comparison, NaNs included)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _buffer(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's bytes as a numpy view (bf16 has no numpy dtype; its bytes do)."""
    return t.contiguous().view(torch.uint8).numpy()


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    (tmp_path / "fastdiff-cache.json").write_text(json.dumps({"format": "fastdiff-cache-1"}))
    return tmp_path


def _entries() -> dict[str, dict[str, torch.Tensor]]:
    """Two latent entries: bf16 ``latents`` [4, 8, 6] and f32 ``latents_std``, from seeded draws."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name in ("a.png", "b.png"):
        key = native.latent_key(
            native.content_hash(name.encode()),
            (48, 64),
            (48, 70),
            (0, 3),
            False,
            "lanczos3",
            (255, 255, 255),
            SALT,
        )
        out[key] = {
            "latents": torch.randn(4, 8, 6, generator=g).to(torch.bfloat16),
            "latents_std": torch.rand(4, 8, 6, generator=g, dtype=torch.float32),
        }
    return out


def _write(cache_dir: Path, entries: dict[str, dict[str, torch.Tensor]]) -> Path:
    writer = native.ShardWriter(cache_dir, "latents")
    for key, tensors in entries.items():
        meta = json.dumps({"path": f"img/{key[:4]}.png", "bucket": [48, 64], "flip": False})
        dtypes = {torch.bfloat16: "bf16", torch.float32: "f32"}
        writer.add(key, meta, [(n, dtypes[t.dtype], tuple(t.shape), _buffer(t)) for n, t in tensors.items()])
    assert len(writer) == 2
    assert writer.nbytes == 2 * (4 * 8 * 6 * (2 + 4))
    return Path(writer.finish())


def test_shards_are_safetensors_files_read_back_bitwise(cache_dir: Path) -> None:
    entries = _entries()
    path = _write(cache_dir, entries)
    assert path.parent == cache_dir
    assert path.name.startswith("latents-") and path.suffix == ".safetensors"
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(["fastdiff-cache.json", path.name])
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(f"{k}/{n}" for k, ts in entries.items() for n in ts)
        meta = f.metadata()
        assert meta["format"] == "fastdiff-cache-1"
        assert meta["kind"] == "latents"
        for key, tensors in entries.items():
            for name, want in tensors.items():
                got = f.get_tensor(f"{key}/{name}")
                assert got.dtype == want.dtype and got.shape == want.shape
                assert torch.equal(_bits(got), _bits(want))
            entry = json.loads(meta[key])
            assert entry["path"] == f"img/{key[:4]}.png"
            # The checksum is content_hash of the entry's tensor bytes in name order, as read back.
            raw = b"".join(_buffer(f.get_tensor(f"{key}/{n}")).tobytes() for n in sorted(tensors))
            assert entry["checksum"] == native.content_hash(raw)


def test_store_serves_entries_and_refuses_damaged_ones(cache_dir: Path) -> None:
    entries = _entries()
    path = _write(cache_dir, entries)
    (k1, e1), (k2, _) = entries.items()
    store = native.CacheStore(cache_dir)
    missing = "f" * 32
    assert store.contains([k1, k2, missing]) == [True, True, False]
    assert store.keys("latents") == sorted(entries)
    assert store.keys("text") == []
    assert store.corrupt_shards() == []
    got = store.read(k1)
    assert torch.equal(
        torch.from_numpy(got["latents"]).view(torch.bfloat16).view(torch.int16), _bits(e1["latents"])
    )
    assert torch.equal(torch.from_numpy(got["latents_std"]), e1["latents_std"])
    assert json.loads(store.provenance(k1) or "")["bucket"] == [48, 64]
    with pytest.raises(fastdiff.CacheMissError, match=missing) as miss:
        store.read(missing)
    assert isinstance(miss.value, LookupError) and isinstance(miss.value, fastdiff.FastdiffError)

    # One flipped bit in the data: the header still parses, the entry's checksum catches it.
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + 1] ^= 0x10
    path.write_bytes(bytes(data))
    store = native.CacheStore(cache_dir)
    with pytest.raises(fastdiff.CorruptCacheError, match="checksum mismatch"):
        for key in entries:
            store.read(key)

    # Truncated: the shard is reported and none of it served; gc deletes it.
    path.write_bytes(bytes(data[:-1]))
    store = native.CacheStore(cache_dir)
    assert [p for p, _ in store.corrupt_shards()] == [str(path)]
    assert "truncated" in store.corrupt_shards()[0][1]
    assert store.contains([k1, k2]) == [False, False]
    with pytest.raises(fastdiff.CacheMissError):
        store.read(k1)
    report = native.cache_gc(cache_dir, [k1, k2], [])
    assert report == {"partials": 0, "corrupt": 1, "orphans": 0, "kept": 0, "bytes_freed": len(data) - 1}
    assert not path.exists()


def test_unfinished_writers_leave_nothing(cache_dir: Path) -> None:
    (key, tensors), _ = _entries().items()
    t = tensors["latents_std"]
    writer = native.ShardWriter(cache_dir, "text")
    writer.add(key, "{}", [("prompt_embeds", "f32", tuple(t.shape), t.numpy())])
    writer.abort()
    with pytest.raises(ValueError, match="already finished or aborted"):
        writer.finish()
    dropped = native.ShardWriter(cache_dir, "text")
    dropped.add(key, "{}", [("prompt_embeds", "f32", tuple(t.shape), memoryview(t.numpy()))])
    del dropped
    assert [p.name for p in cache_dir.iterdir()] == ["fastdiff-cache.json"]


def test_bad_tensors_are_value_errors(cache_dir: Path) -> None:
    writer = native.ShardWriter(cache_dir, "latents")
    a = np.zeros((4, 6), dtype=np.float32)
    with pytest.raises(ValueError, match="not a C-contiguous buffer"):
        writer.add(SALT, "{}", [("latents", "f32", (6, 4), a.T)])
    with pytest.raises(ValueError, match="has 96 bytes, expected 48"):
        writer.add(SALT, "{}", [("latents", "bf16", (4, 6), a)])
    with pytest.raises(ValueError, match="dtype must be one of"):
        writer.add(SALT, "{}", [("latents", "float32", (4, 6), a)])
    with pytest.raises(ValueError, match="32 hex characters"):
        writer.add("abc", "{}", [("latents", "f32", (4, 6), a)])
    with pytest.raises(ValueError, match='kind must be "latents" or "text"'):
        native.ShardWriter(cache_dir, "pixels")
    with pytest.raises(FileNotFoundError):
        native.ShardWriter(cache_dir / "missing", "latents")
    with pytest.raises(ValueError, match="no entries"):
        writer.finish()


def test_keys_cross_the_boundary(tmp_path: Path) -> None:
    # The BLAKE3 specification's digest of b"abc", first 16 bytes.
    assert native.content_hash(b"abc") == "6437b3ac38465133ffb63b75273a8db5"
    image = tmp_path / "x.bin"
    image.write_bytes(bytes(range(256)) * 64)
    digest = native.content_hash(image.read_bytes())
    with image.open("rb") as f:
        assert native.content_hash(f.read(4096) + f.read()) == digest
    edited = bytearray(image.read_bytes())
    edited[5000] ^= 1
    assert native.content_hash(bytes(edited)) != digest

    args = (digest, (512, 512), (640, 512), (64, 0), False, "lanczos3", (255, 255, 255), SALT)
    key = native.latent_key(*args)
    assert len(key) == 32 and int(key, 16) >= 0
    assert native.latent_key(*args[:5], "Lanczos3", *args[6:]) == key, "filter names are canonical"
    changed = [
        native.latent_key(*args[:i], value, *args[i + 1 :])
        for i, value in enumerate(
            ["0" * 32, (512, 576), (641, 512), (63, 0), True, "bilinear", (255, 255, 254), "1" * 32]
        )
    ]
    assert len(set(changed)) == len(changed) and key not in changed
    with pytest.raises(ValueError, match="filter"):
        native.latent_key(*args[:5], "bicubic", *args[6:])
    assert native.text_key("a cat", SALT) != native.text_key("a cat ", SALT)
    assert native.text_key("", SALT) != native.text_key("", "1" * 32)
