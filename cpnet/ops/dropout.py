"""Dropout (Krizhevsky et al. 2012, §4.2), in its "inverted" form.

The paper zeroes each hidden unit with probability 0.5 during training and, at test time, uses all units but
multiplies their outputs by 0.5. Here, at training time, each unit is kept with probability 1 - p and the kept
units are scaled by 1 / (1 - p); at test time the layer is the identity. Both rules make the test-time output
equal the expected training-time output:

    paper:    E[train] = (1 - p) * x            test = (1 - p) * x
    inverted: E[train] = (1 - p) * x / (1 - p)  test = x

The two networks differ only by the constant factor 1 / (1 - p) on this layer's outputs during training, which
the next layer's weights absorb; the inverted form needs no rescaling at test time.

Backward: dx = dy * mask / (1 - p) (the same units, the same scale).

The mask is a pure function of (seed, step, global row, unit): a counter-based hash, no generator state. A
resumed run recomputes any step's masks from its number, the CPU and the GPU draw identical masks, and a replica
that holds rows [offset, offset + n) of a global batch draws exactly those rows' masks (`offset`).
"""

from __future__ import annotations

import numpy as np

from cpnet import kernels, precision
from cpnet.backend import get_array_module

from . import _check

OP_F = "dropout_forward"


def counter_keys(seed: int, step: int) -> tuple:
    """The two uint32 keys of counter_uniform's hash for (seed, step)."""
    return tuple(np.uint32(v) for v in np.random.SeedSequence([seed, step]).generate_state(2, np.uint32))


def counter_uniform(xp, shape, seed: int, step: int, dtype=np.float32, first: int = 0):
    """Uniform [0, 1) numbers that are a pure function of (seed, step, element counter): a 32-bit integer hash
    (two rounds of the 'lowbias32' mixer, keyed from a SeedSequence) over the counters first, first + 1, ...
    (mod 2^32) in C order.

    The same few integer operations run on NumPy and CuPy, so the CPU and the GPU draw identical numbers.
    kernels.dropout_forward_gpu computes the same hash inside its one kernel.
    """
    k0, k1 = counter_keys(seed, step)
    n = int(np.prod(shape))
    h = xp.arange(n, dtype=xp.uint32)
    h += np.uint32(int(first) & 0xFFFFFFFF)
    h *= np.uint32(0x9E3779B9)
    for key in (k0, k1):
        h ^= key
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x7FEB352D)
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x846CA68B)
        h ^= h >> np.uint32(16)
    u = (h >> np.uint32(8)).astype(dtype)
    u *= np.dtype(dtype).type(2.0 ** -24)
    return u.reshape(shape)


def _check_p(p) -> float:
    p = float(p)
    if not 0.0 <= p < 1.0:
        _check.fail(OP_F, f"p must be in [0, 1), got {p}")
    return p


def dropout_forward(x, p, seed: int, step: int, train: bool, offset: int = 0):
    """Returns (y, cache). Row r of x (its first axis) is row `offset + r` of the global batch: unit j of it is
    kept when counter_uniform's draw for counter (offset + r) * units + j is >= p. On a GPU the draw, the mask
    and the product are one kernel, bit-identical to the NumPy path. p == 0 or train=False: the identity."""
    _check.floating(OP_F, "x", x)
    p = _check_p(p)
    if not train or p == 0.0:
        return x, None
    xp = get_array_module(x)
    first = int(offset) * (int(np.prod(x.shape[1:])) if x.ndim else 1)
    if xp is not np and x.dtype in kernels.DTYPES:
        return kernels.dropout_forward_gpu(x, p, *counter_keys(seed, step), first=first, check=False)
    f = precision.F32 if precision.is_bf16(x) else x.dtype  # the draw in the kernels' compute type
    keep = counter_uniform(xp, x.shape, seed, step, f.type, first) >= f.type(p)
    return dropout_with_mask(x, p, keep)


def dropout_towers_forward(x, p, seeds, step: int, train: bool, offset: int = 0):
    """Both fused towers' dropout on one (N, 2U) activation: columns [0, U) are tower 0's units, dropped with
    seed seeds[0], columns [U, 2U) tower 1's with seeds[1]; each half gets exactly the mask and output that
    dropout_forward gives it on its own. On a GPU that is one kernel for both halves (where the halves would
    take two copies, two kernels and a concatenation); backward is dropout_backward with the returned cache."""
    _check.floating(OP_F, "x", x)
    p = _check_p(p)
    if x.ndim != 2 or x.shape[1] % 2:
        _check.fail(OP_F, f"the towers' x must have shape (N, 2*units), got {tuple(x.shape)}")
    if not train or p == 0.0:
        return x, None
    xp = get_array_module(x)
    units = x.shape[1] // 2
    if xp is not np and x.dtype in kernels.DTYPES and x.size <= kernels.ELEMENTWISE_CHUNK:
        return kernels.dropout_towers_forward_gpu(x, p, counter_keys(seeds[0], step), counter_keys(seeds[1], step),
                                                  first=int(offset) * units, check=False)
    halves = [dropout_forward(xp.ascontiguousarray(x[:, t * units:(t + 1) * units]), p, seeds[t], step, train, offset)
              for t in range(2)]
    return xp.concatenate([y for y, _ in halves], axis=1), xp.concatenate([m for _, m in halves], axis=1)


def dropout_with_mask(x, p, keep):
    """(y, cache) for a given keep-mask (bool or 0/1, x's shape): y = x * keep / (1 - p). Gradient checks fix
    the mask this way; dropout_forward draws it. bf16 x: the mask is the float32 scale rounded to bf16 and y the
    rounded product with it (as the kernel does)."""
    xp = get_array_module(x)
    _check.floating(OP_F, "x", x)
    p = _check_p(p)
    keep = xp.asarray(keep)
    _check.same_shape(OP_F, "mask", keep, x.shape, f"x's shape {tuple(x.shape)}")
    if precision.is_bf16(x):
        m = precision.to_bf16(keep.astype(np.float32) * np.float32(1.0 / (1.0 - p)))
        return _times_mask(x, m), m
    m = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))
    return x * m, m


def _times_mask(a, m):
    """a * m for bf16 a and mask m, in float32, rounded once."""
    with np.errstate(invalid="ignore"):  # inf * 0 is NaN, as in float32
        return precision.to_bf16(precision.from_bf16(a) * precision.from_bf16(m))


def dropout_backward(dy, cache):
    """dx for dropout_forward (dy itself when the forward was the identity)."""
    if cache is None:
        return dy
    _check.same_shape("dropout_backward", "dy", dy, cache.shape, f"the forward input's shape {tuple(cache.shape)}")
    if precision.is_bf16(dy):
        return _times_mask(dy, cache)
    return dy * cache
