"""Reading single cache entries back as torch tensors (the bulk of a run's entries is served by the
loader's Rust workers; this is for the few that Python needs, such as the embeddings of ``""``)."""

from __future__ import annotations

from pathlib import Path

import torch

from fastdiff import _fastdiff
from fastdiff.cache.manifest import read_manifest


def read_entry(store: _fastdiff.CacheStore, key: str, dtype: str) -> dict[str, torch.Tensor]:
    """Entry ``key``'s tensors (checksum verified), in the cache's ``dtype`` (``"bf16"`` entries
    arrive as uint16 bit patterns and are viewed as ``torch.bfloat16``).

    Returns:
        Tensor name -> CPU tensor of the entry's own shape (no batch dimension): ``latents`` and
        ``latents_std`` ``[C, H / f, W / f]``, ``prompt_embeds`` ``[L, D]``, ``pooled_prompt_embeds``
        ``[P]``; ``torch.bfloat16``, ``torch.float16`` or ``torch.float32`` as ``dtype`` says.

    Raises:
        fastdiff.CacheMissError: The store does not serve ``key``.
        fastdiff.CorruptCacheError: The entry's bytes do not match its checksum.
    """
    tensors = {name: torch.from_numpy(a) for name, a in store.read(key).items()}
    if dtype == "bf16":
        tensors = {name: t.view(torch.bfloat16) for name, t in tensors.items()}
    return tensors


def empty_entry(cache: Path) -> dict[str, torch.Tensor]:
    """The cached text entry of the empty caption ``""`` (what training conditions a dropped caption
    on): every tensor of the cache's text half (``prompt_embeds`` ``[L, D]``, ...; see
    :func:`read_entry`), in the cache's dtype.

    Raises:
        ValueError: The cache has no text half.
        fastdiff.CacheMissError: It lacks the entry of ``""`` (``fastdiff cache`` always writes it:
            rerun it).
        FileNotFoundError, fastdiff.CorruptCacheError: As ``CacheStore``.
    """
    manifest = read_manifest(cache)
    if manifest is None or "text" not in manifest:
        raise ValueError(f"cache {cache} has no text embeddings")
    text = manifest["text"]
    return read_entry(_fastdiff.CacheStore(cache), _fastdiff.text_key("", text["salt"]), text["dtype"])


def empty_prompt(cache: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stable Diffusion's view of :func:`empty_entry`: ``prompt_embeds`` ``[L, D]`` and SDXL's
    ``pooled_prompt_embeds`` ``[P]`` (else ``None``).

    Raises:
        As :func:`empty_entry`.
    """
    entry = empty_entry(cache)
    return entry["prompt_embeds"], entry.get("pooled_prompt_embeds")
