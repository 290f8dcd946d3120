"""Elementwise non-linearities.

ReLU, f(x) = max(0, x) (Krizhevsky et al. 2012, §3.1): the non-saturating unit that trains several times faster
than tanh. Its derivative is 1 for x > 0 and 0 otherwise (0 at x = 0 itself). The forward computes x > 0 ? x : 0
(NaN gives 0) and caches y: y > 0 exactly where x > 0. On a GPU each direction is one kernel (cpnet.kernels).
tanh, the saturating unit §3.1 compares against: dy/dx = 1 - y^2.
"""

from __future__ import annotations

import numpy as np

from cpnet.backend import get_array_module

from . import _check


def relu_forward(x):
    """Returns (y = max(x, 0), cache = y)."""
    xp = get_array_module(x)
    _check.floating("relu_forward", "x", x)
    if xp is not np and x.dtype in _check.KERNEL_DTYPES:
        from cpnet import kernels

        y = kernels.relu_forward_gpu(x)
    else:
        y = xp.where(x > 0, x, xp.zeros((), dtype=x.dtype))
    return y, y


def relu_backward(dy, cache):
    """dx = dy where the forward's output y > 0, else 0."""
    y = cache
    xp = get_array_module(dy)
    _check.same_shape("relu_backward", "dy", dy, y.shape, f"the forward input's shape {tuple(y.shape)}")
    if xp is not np and dy.dtype in _check.KERNEL_DTYPES and dy.dtype == y.dtype:
        from cpnet import kernels

        return kernels.relu_backward_gpu(y, dy)
    return xp.where(y > 0, dy, xp.zeros((), dtype=dy.dtype))


def tanh_forward(x):
    """Returns (tanh(x), cache = y)."""
    xp = get_array_module(x)
    _check.floating("tanh_forward", "x", x)
    y = xp.tanh(x)
    return y, y


def tanh_backward(dy, cache):
    y = cache
    _check.same_shape("tanh_backward", "dy", dy, y.shape, f"the forward input's shape {tuple(y.shape)}")
    return dy * (1 - y * y)
