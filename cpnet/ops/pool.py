"""Overlapping max pooling (Krizhevsky et al. 2012, §3.4): windows of ksize=3 at stride=2 overlap.

    y[n, c, oy, ox] = max_{0 <= i, j < k} x[n, c, oy*s - p + i, ox*s - p + j]

over the positions inside the input only: padding never wins. Output size floor((H + 2p - k) / s) + 1. Ties go
to the FIRST maximum in row-major window order (i, then j; a strict `>`), on CPU and GPU alike. The cache holds
``argmax`` (int32), the flat index h*W + w of the winner inside its (n, c) input plane.

Backward is a gather: dx[n, c, h, w] = sum of dy[n, c, oy, ox] over the outputs whose window covers (h, w) and
whose argmax is h*W + w. No atomics, so the result is deterministic.
"""

from __future__ import annotations

import numpy as np

from cpnet.backend import get_array_module

from . import _check

OP_F = "max_pool2d_forward"
OP_B = "max_pool2d_backward"


def _offsets(H, W, Ho, Wo, k, s, p):
    """For each window offset (i, j): the strided slices into the padded plane and the flat input index (-1 on
    padding) of the element each output sees there."""
    oy = np.arange(Ho) * s - p
    ox = np.arange(Wo) * s - p
    for i in range(k):
        r = oy + i
        for j in range(k):
            c = ox + j
            valid = ((r >= 0) & (r < H))[:, None] & ((c >= 0) & (c < W))[None, :]
            flat = np.where(valid, r[:, None] * W + c[None, :], -1).astype(np.int32)
            sl = (slice(i, i + s * (Ho - 1) + 1, s), slice(j, j + s * (Wo - 1) + 1, s))
            yield sl, flat


def maxpool_forward_cpu(x, ksize, stride, pad):
    """(N, C, H, W) -> (y (N, C, Ho, Wo), argmax int32 (N, C, Ho, Wo)); vectorised over the k*k offsets."""
    N, C, H, W = x.shape
    k, s, p = ksize, stride, pad
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    xp_ = np.full((N, C, H + 2 * p, W + 2 * p), -np.inf, dtype=x.dtype)
    xp_[:, :, p : p + H, p : p + W] = x
    y = np.full((N, C, Ho, Wo), -np.inf, dtype=x.dtype)
    arg = np.full((N, C, Ho, Wo), -1, dtype=np.int32)
    for sl, flat in _offsets(H, W, Ho, Wo, k, s, p):
        v = xp_[(slice(None), slice(None)) + sl]
        take = (v > y) | ((arg < 0) & (flat >= 0))
        np.copyto(y, v, where=take)
        np.copyto(arg, np.broadcast_to(flat, arg.shape), where=take)
    return y, arg


def maxpool_backward_cpu(dy, argmax, x_shape, ksize, stride, pad):
    """dx (x_shape) from dy and argmax, summing over the k*k window offsets that can reach each input."""
    N, C, H, W = x_shape
    k, s, p = ksize, stride, pad
    Ho, Wo = dy.shape[2:]
    dxp = np.zeros((N, C, H + 2 * p, W + 2 * p), dtype=dy.dtype)
    for sl, flat in _offsets(H, W, Ho, Wo, k, s, p):
        dxp[(slice(None), slice(None)) + sl] += np.where(argmax == flat, dy, 0)
    return np.ascontiguousarray(dxp[:, :, p : p + H, p : p + W])


def max_pool2d_forward(x, ksize=3, stride=2, pad=0):
    """Max pooling on NCHW; returns (y, cache) with cache = (argmax, x.shape, ksize, stride, pad)."""
    _check.ndim(OP_F, "x", x, 4, "(N, C, H, W)")
    _check.floating(OP_F, "x", x, kernel=True)
    k = _check.positive_int(OP_F, "ksize", ksize)
    s = _check.positive_int(OP_F, "stride", stride)
    p = _check.positive_int(OP_F, "pad", pad, 0)
    if p >= k:
        _check.fail(OP_F, f"pad must be smaller than ksize={k}, got {p}")
    N, C, H, W = x.shape
    _check.out_size(OP_F, H, k, s, p, "height")
    _check.out_size(OP_F, W, k, s, p, "width")
    if get_array_module(x) is np:
        y, arg = maxpool_forward_cpu(x, k, s, p)
    else:
        from cpnet import kernels

        y, arg = kernels.maxpool_forward_gpu(x, k, s, p)
    return y, (arg, tuple(x.shape), x.dtype, k, s, p)


def max_pool2d_backward(dy, cache):
    """dx for max_pool2d_forward: each input gathers the dy of the windows it won."""
    arg, x_shape, dtype, k, s, p = cache
    _check.same_shape(OP_B, "dy", dy, arg.shape, f"the forward output's shape {tuple(arg.shape)}")
    if dy.dtype != dtype:
        _check.fail(OP_B, f"dy must have the forward input's dtype {dtype}, got {dy.dtype}")
    if get_array_module(dy) is np:
        return maxpool_backward_cpu(dy, arg, x_shape, k, s, p)
    from cpnet import kernels

    return kernels.maxpool_backward_gpu(dy, arg, x_shape, k, s, p)
