"""Latent and text-embedding caches: what ``fastdiff cache`` builds and ``fastdiff train --cache`` reads.

A cache folder holds safetensors shards of entries keyed by content (the keys and the shard store are
the native extension's, :mod:`fastdiff._fastdiff`) and the manifest ``fastdiff-cache.json`` that says
which encoders made them. One module per stage: :mod:`~fastdiff.cache.digest` (the salts: digests of
the encoders' configs and weights), :mod:`~fastdiff.cache.manifest` (reading and atomically writing
the manifest), :mod:`~fastdiff.cache.encoders` (loading only the VAE or the text encoders of a
pipeline, and encoding pixels to latents and captions to embeddings), :mod:`~fastdiff.cache.shards`
(writing entries into rotating shards), :mod:`~fastdiff.cache.entries` (reading one back),
:mod:`~fastdiff.cache.build` (walking a loader's build plan, encoding what is missing) and
:mod:`~fastdiff.cache.command` (the ``fastdiff cache`` command, and the build ``train --cache-build``
runs).
"""
