"""Measuring the loader: ``fastdiff bench`` (``throughput``: fastdiff against the torchvision + PIL
baseline) and ``fastdiff tune`` (``sweep``: which threads and prefetch to use here), on ``common``'s
timing, machine description and corpus listing. These modules measure; they never change the loader.
"""
