"""Helpers for the NumPy (host) paths of the ops.

The host paths of the memory-bound ops (LRN, max pooling, the convolutions' column matrices) walk the batch in
chunks of images whose temporaries fit in a core's L2 cache: five passes over a 1 MB chunk cost little more than
one pass over memory, where five passes over a whole 16 MB activation (alexnet-small's conv1 output of one tower
at batch 128) each stream it from memory again. Measured per op in docs/PERFORMANCE.md (CPU section).
"""

from __future__ import annotations

import numpy as np

# Bytes of one temporary per chunk: the LRN and pool sweeps of alexnet-small ran fastest at 0.5-1 MB on a
# 2-core AMD EPYC with 2 MB of L2 per core (larger chunks spill to L3 / memory, smaller ones pay Python per call).
CHUNK_BYTES = 1 << 19


def chunks(n: int, bytes_per_image: int, budget: int | None = None):
    """(start, stop) ranges over n images, as many images per range as keep one temporary under `budget` bytes
    (default CHUNK_BYTES; at least one image)."""
    step = chunk_rows(n, bytes_per_image, budget)
    for start in range(0, n, step):
        yield start, min(n, start + step)


def chunk_rows(n: int, bytes_per_image: int, budget: int | None = None) -> int:
    """The number of images in each range that `chunks` yields (the size of its temporaries' first axis)."""
    budget = CHUNK_BYTES if budget is None else budget
    return max(1, min(n, budget // max(1, int(bytes_per_image))))


def buffer(workspace, name, shape, dtype):
    """A host array of this shape and dtype kept in `workspace` (a dict the caller owns) from one call to the
    next, or a fresh one when workspace is None. Arrays above glibc's 32 MB mmap limit come fresh from the OS
    on every allocation, and touching their pages the first time cost as much as filling them twice
    (alexnet-small's conv2 columns: 92 MB per tower, 30-80 ms fresh against 11-19 ms reused)."""
    if workspace is None:
        return np.empty(shape, dtype=dtype)
    a = workspace.get(name)
    if a is None or a.shape != tuple(shape) or a.dtype != dtype:
        a = workspace[name] = np.empty(shape, dtype=dtype)
    return a
