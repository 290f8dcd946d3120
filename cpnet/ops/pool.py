"""Overlapping max pooling (Krizhevsky et al. 2012, §3.4): windows of ksize=3 at stride=2 overlap.

    y[n, c, oy, ox] = max_{0 <= i, j < k} x[n, c, oy*s - p + i, ox*s - p + j]

over the positions inside the input only: padding never wins. Output size floor((H + 2p - k) / s) + 1. Ties go
to the FIRST maximum in row-major window order (i, then j; a strict `>`), and a window holding NaN gives NaN
(its first NaN wins), on CPU and GPU alike. The cache holds the winners: on a GPU ``argmax`` (int32), the flat
index h*W + w of the winner inside its (n, c) input plane; on the host the offset i*k + j inside its window
(uint8), which the backward compares k*k times (`argmax_flat` converts).

Backward is a gather: dx[n, c, h, w] = sum of dy[n, c, oy, ox] over the outputs whose window covers (h, w) and
whose argmax is h*W + w. No atomics, so the result is deterministic.

bf16 (cpnet.precision): on a GPU the bf16 kernels (comparisons and sums in float32); on the host the float32 path
on the widened values, y exact and dx rounded once.
"""

from __future__ import annotations

import numpy as np

from cpnet import precision
from cpnet.backend import get_array_module
from cpnet.shapes import window_out

from . import _check, _host

OP_F = "max_pool2d_forward"
OP_B = "max_pool2d_backward"


def _offset_dtype(k):
    return np.uint8 if k * k <= 255 else np.int32


def _windows(Ho, Wo, k, s):
    """The k*k window offsets (i, j) in row-major order, each as the slices of the (padded) plane it reads."""
    return [(slice(None), slice(None), slice(i, i + s * (Ho - 1) + 1, s), slice(j, j + s * (Wo - 1) + 1, s))
            for i in range(k) for j in range(k)]


def maxpool_forward_host(x, ksize, stride, pad):
    """(N, C, H, W) -> (y (N, C, Ho, Wo), off (N, C, Ho, Wo)): off = i*k + j, the winner's offset inside its window
    (uint8 while k*k fits), a chunk of images at a time (cpnet.ops._host).

    y is the maximum over the k*k offsets (NumPy's maximum keeps NaN); the winner is then the FIRST offset whose
    value equals y (a running `found` flag: off = the number of offsets before the first hit), or, in a window
    holding NaN, the first NaN. Padding (-inf) never wins: where a window's real values are all -inf, the first
    real element does, as on the GPU."""
    N, C, H, W = x.shape
    k, s, p = ksize, stride, pad
    Ho, Wo = window_out(H, k, s, p), window_out(W, k, s, p)
    y = np.empty((N, C, Ho, Wo), dtype=x.dtype)
    off = np.empty((N, C, Ho, Wo), dtype=_offset_dtype(k))
    per_image = C * (H + 2 * p) * (W + 2 * p) * x.itemsize
    rows = _host.chunk_rows(N, per_image)
    hit = np.empty((rows, C, Ho, Wo), dtype=bool)
    found = np.empty_like(hit)
    win = _windows(Ho, Wo, k, s)
    if p:
        padded = np.full((rows, C, H + 2 * p, W + 2 * p), -np.inf, dtype=x.dtype)
    for n0, n1 in _host.chunks(N, per_image):
        m = n1 - n0
        if p:
            xc = padded[:m]
            xc[:, :, p:p + H, p:p + W] = x[n0:n1]
        else:
            xc = x[n0:n1]
        yc, oc, h, f = y[n0:n1], off[n0:n1], hit[:m], found[:m]
        np.copyto(yc, xc[win[0]])
        for w in win[1:]:
            np.maximum(xc[w], yc, out=yc)
        oc.fill(k * k)
        f.fill(False)
        for w in win:
            np.equal(xc[w], yc, out=h)
            f |= h
            oc -= f
        if np.isnan(yc).any():  # a window with NaN: y is NaN, no value equals it, and the first NaN wins
            nan_y = np.isnan(yc)
            first = np.full(oc.shape, k * k, dtype=oc.dtype)
            f.fill(False)
            for w in win:
                np.isnan(xc[w], out=h)
                f |= h
                first -= f
            np.copyto(oc, first, where=nan_y)
    if p and np.isneginf(y).any():  # all real values -inf: padding tied them; the first real element wins
        i0 = np.maximum(p - np.arange(Ho) * s, 0)[:, None]
        j0 = np.maximum(p - np.arange(Wo) * s, 0)[None, :]
        np.copyto(off, np.broadcast_to((i0 * k + j0).astype(off.dtype), off.shape), where=np.isneginf(y))
    return y, off


def maxpool_backward_host(dy, off, x_shape, ksize, stride, pad):
    """dx (x_shape) from dy and the window offsets of maxpool_forward_host: for each of the k*k offsets, every
    output adds its dy to the input it sees there if that input won (an ordered, deterministic sum), a chunk of
    images at a time.

    When the windows overlap or touch (stride <= ksize), the offsets (i, j) with i, j < stride tile the plane's
    first stride*Ho rows and stride*Wo columns without overlapping: those are written (dy times the winner mask,
    straight into dx) rather than added, and only the strips beyond them are zeroed; the other offsets add.
    (3/2 pooling: 4 of the 9 offsets, and no zeroing of the whole dx.) A written input that did not win gets
    dy * 0: -0.0 where that dy is negative (equal to the 0.0 that a sum from zero gives)."""
    N, C, H, W = x_shape
    k, s, p = ksize, stride, pad
    Ho, Wo = dy.shape[2:]
    tiles = s <= k
    dx = (np.empty if tiles else np.zeros)(x_shape, dtype=dy.dtype)
    per_image = C * Ho * Wo * dy.itemsize
    rows = _host.chunk_rows(N, per_image)
    hit = np.empty((rows, C, Ho, Wo), dtype=bool)
    g = np.empty((rows, C, Ho, Wo), dtype=dy.dtype)
    if p:
        padded = np.empty((rows, C, H + 2 * p, W + 2 * p), dtype=dy.dtype)
    win = _windows(Ho, Wo, k, s)
    for n0, n1 in _host.chunks(N, per_image):
        m = n1 - n0
        dxc = padded[:m] if p else dx[n0:n1]
        if tiles:  # zero what the written offsets do not reach: rows from s*Ho, columns from s*Wo
            dxc[:, :, s * Ho:] = 0
            dxc[:, :, :s * Ho, s * Wo:] = 0
        elif p:
            dxc.fill(0)
        for t, w in enumerate(win):
            np.equal(off[n0:n1], t, out=hit[:m])
            if tiles and t // k < s and t % k < s:
                np.multiply(hit[:m], dy[n0:n1], out=dxc[w])
            else:
                np.multiply(hit[:m], dy[n0:n1], out=g[:m])
                dxc[w] += g[:m]
        if p:
            dx[n0:n1] = dxc[:, :, p:p + H, p:p + W]
    return dx


def window_to_flat(off, x_shape, ksize, stride, pad):
    """The host's window offsets as the GPU's argmax: the flat index h*W + w of the winner in its (n, c) plane."""
    H, W = x_shape[2:]
    Ho, Wo = off.shape[2:]
    oy = (np.arange(Ho) * stride - pad)[:, None]
    ox = (np.arange(Wo) * stride - pad)[None, :]
    o = off.astype(np.int32)
    return ((oy + o // ksize) * W + ox + o % ksize).astype(np.int32)


def flat_to_window(argmax, x_shape, ksize, stride, pad):
    """The inverse of window_to_flat."""
    H, W = x_shape[2:]
    Ho, Wo = argmax.shape[2:]
    a = np.asarray(argmax, dtype=np.int64)
    i = a // W - (np.arange(Ho) * stride - pad)[:, None]
    j = a % W - (np.arange(Wo) * stride - pad)[None, :]
    return (i * ksize + j).astype(_offset_dtype(ksize))


def maxpool_forward_cpu(x, ksize, stride, pad):
    """(y, argmax int32 flat h*W + w per plane), the GPU kernel's outputs, from the host path."""
    y, off = maxpool_forward_host(x, ksize, stride, pad)
    return y, window_to_flat(off, x.shape, ksize, stride, pad)


def maxpool_backward_cpu(dy, argmax, x_shape, ksize, stride, pad):
    """dx from dy and the GPU kernel's flat argmax, through the host path."""
    return maxpool_backward_host(dy, flat_to_window(argmax, x_shape, ksize, stride, pad), x_shape, ksize, stride, pad)


def argmax_flat(cache):
    """The forward's winners as flat indices h*W + w per (n, c) plane, on either backend (for tests and tools)."""
    arg, x_shape, _, k, s, p = cache
    if get_array_module(arg) is np:
        return window_to_flat(arg, x_shape, k, s, p)
    return arg


def pool_args(op, x, ksize, stride, pad):
    """The checked (ksize, stride, pad) for pooling the NCHW array x (one ValueError naming `op` otherwise)."""
    _check.ndim(op, "x", x, 4, "(N, C, H, W)")
    _check.floating(op, "x", x, kernel=True)
    k = _check.positive_int(op, "ksize", ksize)
    s = _check.positive_int(op, "stride", stride)
    p = _check.positive_int(op, "pad", pad, 0)
    if p >= k:
        _check.fail(op, f"pad must be smaller than ksize={k}, got {p}")
    H, W = x.shape[2:]
    _check.out_size(op, H, k, s, p, "height")
    _check.out_size(op, W, k, s, p, "width")
    return k, s, p


def max_pool2d_forward(x, ksize=3, stride=2, pad=0):
    """Max pooling on NCHW; returns (y, cache) with cache = (argmax, x.shape, ksize, stride, pad)."""
    k, s, p = pool_args(OP_F, x, ksize, stride, pad)
    if get_array_module(x) is np and precision.is_bf16(x):
        y, arg = maxpool_forward_host(precision.from_bf16(x), k, s, p)
        y = precision.to_bf16(y)
    elif get_array_module(x) is np:
        y, arg = maxpool_forward_host(x, k, s, p)
    else:
        from cpnet import kernels

        y, arg = kernels.maxpool_forward_gpu(x, k, s, p, check=False)
    return y, (arg, tuple(x.shape), x.dtype, k, s, p)


def max_pool2d_backward(dy, cache):
    """dx for max_pool2d_forward: each input gathers the dy of the windows it won."""
    arg, x_shape, dtype, k, s, p = cache
    _check.same_shape(OP_B, "dy", dy, arg.shape, f"the forward output's shape {tuple(arg.shape)}")
    if dy.dtype != dtype:
        _check.fail(OP_B, f"dy must have the forward input's dtype {dtype}, got {dy.dtype}")
    if get_array_module(dy) is np and precision.is_bf16(dy):
        return precision.to_bf16(maxpool_backward_host(precision.from_bf16(dy), arg, x_shape, k, s, p))
    if get_array_module(dy) is np:
        return maxpool_backward_host(dy, arg, x_shape, k, s, p)
    from cpnet import kernels

    return kernels.maxpool_backward_gpu(dy, arg, x_shape, k, s, p, check=False)
