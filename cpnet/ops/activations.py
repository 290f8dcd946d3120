"""Elementwise non-linearities.

ReLU, f(x) = max(0, x) (Krizhevsky et al. 2012, §3.1): the non-saturating unit that trains several times faster
than tanh. Its derivative is 1 for x > 0 and 0 otherwise (0 at x = 0 itself).
tanh, the saturating unit §3.1 compares against: dy/dx = 1 - y^2.
"""

from __future__ import annotations

from cpnet.backend import get_array_module

from . import _check


def relu_forward(x):
    """Returns (max(x, 0), cache = the boolean mask x > 0)."""
    xp = get_array_module(x)
    _check.floating("relu_forward", "x", x)
    m = x > 0
    return xp.where(m, x, xp.zeros((), dtype=x.dtype)), m


def relu_backward(dy, cache):
    xp = get_array_module(dy)
    _check.same_shape("relu_backward", "dy", dy, cache.shape, f"the forward input's shape {tuple(cache.shape)}")
    return xp.where(cache, dy, xp.zeros((), dtype=dy.dtype))


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
