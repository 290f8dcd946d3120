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
"""

from __future__ import annotations

from cpnet.backend import get_array_module

from . import _check

OP_F = "dropout_forward"


def dropout_forward(x, p, rng_or_mask, train):
    """Returns (y, cache). `rng_or_mask`: a keep-mask (bool or 0/1, x's shape) or a generator with
    ``.random(shape, dtype=...)`` (numpy's or cupy's default_rng). p == 0 or train=False: the identity."""
    xp = get_array_module(x)
    _check.floating(OP_F, "x", x)
    p = float(p)
    if not 0.0 <= p < 1.0:
        _check.fail(OP_F, f"p must be in [0, 1), got {p}")
    if not train or p == 0.0:
        return x, None
    if hasattr(rng_or_mask, "random"):
        keep = rng_or_mask.random(x.shape, dtype=x.dtype) >= p
    else:
        keep = xp.asarray(rng_or_mask)
        _check.same_shape(OP_F, "mask", keep, x.shape, f"x's shape {tuple(x.shape)}")
    m = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))
    return x * m, m


def dropout_backward(dy, cache):
    """dx for dropout_forward (dy itself when the forward was the identity)."""
    if cache is None:
        return dy
    _check.same_shape("dropout_backward", "dy", dy, cache.shape, f"the forward input's shape {tuple(cache.shape)}")
    return dy * cache
