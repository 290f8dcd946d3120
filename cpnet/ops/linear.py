"""Fully connected layer: y = x @ W.T + b, with W of shape (out, in) (AlexNet's fc6, fc7, fc8).

x of shape (N, d1, d2, ...) is flattened to (N, d1*d2*...) first, and dx comes back in x's shape.
Backward: dx = dy @ W, dW = dy.T @ x, db = sum of dy over the batch.

bf16 (cpnet.precision): x, y, dy, dx bf16, W and b float32; W is rounded to bf16 once per forward (kept in the
cache), the products accumulate in float32, y gets its bias in float32 and is rounded once, dW and db are float32.
"""

from __future__ import annotations

from cpnet import precision
from cpnet.backend import get_array_module

from . import _check

OP_F = "linear_forward"
OP_B = "linear_backward"


def linear_forward(x, W, b):
    """Returns (y (N, out), cache); b is (out,) or None."""
    _check.floating(OP_F, "x", x)
    if x.ndim < 2:
        _check.fail(OP_F, f"x must have shape (N, in) or (N, ...), got {tuple(x.shape)}")
    x2 = x.reshape(x.shape[0], -1)
    d = x2.shape[1]
    _check.ndim(OP_F, "W", W, 2, f"(out, in={d})")
    if W.shape[1] != d:
        _check.fail(OP_F, f"W must have shape (out, in={d}), got {tuple(W.shape)}")
    _check.param_dtype(OP_F, "W", W, x)
    if b is not None:
        _check.same_shape(OP_F, "b", b, (W.shape[0],), f"shape (out,)=({W.shape[0]},)")
        _check.param_dtype(OP_F, "b", b, x)
    if precision.is_bf16(x):
        W = precision.to_bf16(W)
        y = precision.matmul(x2, W.T)
        if b is not None:
            y += b
        return precision.to_bf16(y), (x2, W, tuple(x.shape), b is not None)
    y = x2 @ W.T
    if b is not None:
        y += b
    return y, (x2, W, tuple(x.shape), b is not None)


def linear_backward(dy, cache):
    """(dx, dW, db); db is None when the forward had no bias."""
    x2, W, x_shape, has_b = cache
    _check.same_shape(OP_B, "dy", dy, (x2.shape[0], W.shape[0]), f"shape (N, out)=({x2.shape[0]}, {W.shape[0]})")
    _check.same_dtype(OP_B, "dy", dy, x2, "the forward input")
    if precision.is_bf16(dy):
        dx = precision.matmul(dy, W, out_dtype=precision.BF16).reshape(x_shape)
        dW = precision.matmul(dy.T, x2)
        db = precision.matmul(precision.ones_bf16(get_array_module(dy), dy.shape[0]).T, dy).reshape(-1) \
            if has_b else None
        return dx, dW, db
    dx = (dy @ W).reshape(x_shape)
    dW = dy.T @ x2
    db = dy.sum(axis=0) if has_b else None
    return dx, dW, db
