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
    """(N, C, H, W) -> (y (N, C, Ho, Wo), argmax int32 (N, C, Ho, Wo)); vectorised over the k*k offsets.

    Branch-free: fmax keeps y (it also skips NaN, as a strict `>` does), and the winner's offset i*W + j from
    the window's corner is updated arithmetically where v > y."""
    N, C, H, W = x.shape
    k, s, p = ksize, stride, pad
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    if p:
        xp_ = np.full((N, C, H + 2 * p, W + 2 * p), -np.inf, dtype=x.dtype)
        xp_[:, :, p : p + H, p : p + W] = x
    else:
        xp_ = x
    y = np.full((N, C, Ho, Wo), -np.inf, dtype=x.dtype)
    t = np.full((N, C, Ho, Wo), -1, dtype=np.int32)
    take = np.empty(y.shape, dtype=bool)
    d = np.empty(y.shape, dtype=np.int32)
    for i in range(k):
        for j in range(k):
            v = xp_[:, :, i : i + s * (Ho - 1) + 1 : s, j : j + s * (Wo - 1) + 1 : s]
            np.greater(v, y, out=take)
            np.fmax(y, v, out=y)
            np.subtract(i * W + j, t, out=d)
            d *= take
            t += d
    oy = np.arange(Ho)[:, None] * s - p
    ox = np.arange(Wo)[None, :] * s - p
    if (t < 0).any():  # a window of -inf (or NaN) only: its first real element
        t = np.where(t < 0, np.maximum(-oy, 0) * W + np.maximum(-ox, 0), t)
    t += (oy * W + ox).astype(np.int32)
    return y, t


def maxpool_backward_cpu(dy, argmax, x_shape, ksize, stride, pad):
    """dx (x_shape) from dy and argmax: for each of the k*k window offsets, every output adds its dy to the
    input it sees there if that input was its winner (an ordered, deterministic sum)."""
    N, C, H, W = x_shape
    k, s, p = ksize, stride, pad
    Ho, Wo = dy.shape[2:]
    dxp = np.zeros((N, C, H + 2 * p, W + 2 * p), dtype=dy.dtype)
    hit = np.empty(dy.shape, dtype=bool)
    g = np.empty(dy.shape, dtype=dy.dtype)
    for sl, flat in _offsets(H, W, Ho, Wo, k, s, p):
        np.equal(argmax, flat, out=hit)
        np.multiply(hit, dy, out=g)
        dxp[(slice(None), slice(None)) + sl] += g
    return np.ascontiguousarray(dxp[:, :, p : p + H, p : p + W]) if p else dxp


def max_pool2d_forward(x, ksize=3, stride=2, pad=0):
    """Max pooling on NCHW; returns (y, cache) with cache = (argmax, x.shape, ksize, stride, pad)."""
    _check.ndim(OP_F, "x", x, 4, "(N, C, H, W)")
    _check.floating(OP_F, "x", x, kernel=True)
    k = _check.positive_int(OP_F, "ksize", ksize)
    s = _check.positive_int(OP_F, "stride", stride)
    p = _check.positive_int(OP_F, "pad", pad, 0)
    if p >= k:
        _check.fail(OP_F, f"pad must be smaller than ksize={k}, got {p}")
    H, W = x.shape[2:]
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
