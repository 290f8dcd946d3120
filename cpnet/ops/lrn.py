"""Local response normalization across channels (Krizhevsky et al. 2012, §3.3).

    scale[n, c] = k + alpha_eff * sum_{c' = c - (size-1)//2}^{c + size//2} x[n, c']^2     (c' outside [0, C) skipped)
    y = x * scale^(-beta)

The paper's text writes alpha times the plain sum (alpha_convention="sum": alpha_eff = alpha, with k=2, size=5,
alpha=1e-4, beta=0.75). cuda-convnet's code, Caffe and PyTorch divide by the window size
(alpha_convention="mean": alpha_eff = alpha / size). Channels beyond the edges count as zeros; the divisor
stays `size` there too.

Backward, with t = dy * y / scale:

    dx[c] = dy[c] * scale[c]^(-beta) - 2 * alpha_eff * beta * x[c] * sum_{c' = c - size//2}^{c + (size-1)//2} t[c']

(the window is mirrored: x[c] enters scale[c'] exactly when c' - (size-1)//2 <= c <= c' + size//2).

On the host both directions run a chunk of images at a time (cpnet.ops._host), the window sums as shifted
in-place adds, and scale^(-0.75) as two square roots. The host's forward keeps scale^(-beta) beside scale for
the backward (one more array of x's size), which then skips recomputing it, and alpha_eff and k enter before
the window sum: 23 passes over each chunk for both directions instead of 28 (docs/PERFORMANCE.md).

bf16 (cpnet.precision): x, y, dy, dx bf16, the scale (and the host's scale^(-beta)) float32; on a GPU the bf16
kernels compute in float32; on the host the float32 path runs on the widened arrays and y and dx are rounded once.
"""

from __future__ import annotations

import numpy as np

from cpnet import precision
from cpnet.backend import get_array_module

from . import _check, _host

OP_F = "lrn_forward"
OP_B = "lrn_backward"
CONVENTIONS = ("sum", "mean")


def _window_sum(a, lo, size, out, plus=None):
    """out[:, c] = sum of a[:, c'] for c' in [c - lo, c - lo + size) within [0, C), plus the scalar `plus` when
    given: `a` plus its channel shifts, added in place (no padded copy); returns out."""
    if plus is None:
        np.copyto(out, a)
    else:
        np.add(a, plus, out=out)
    for t in range(1, lo + 1):
        np.add(out[:, t:], a[:, :-t], out=out[:, t:])
    for t in range(1, size - lo):
        np.add(out[:, :-t], a[:, t:], out=out[:, :-t])
    return out


def _neg_pow(s, beta, out, tmp):
    """out = s^(-beta); for the paper's beta = 0.75 as 1 / sqrt(s * sqrt(s)) (two square roots, within a few
    ulp of power, several times faster than NumPy's float32 power on the host)."""
    if beta == 0.75:
        np.sqrt(s, out=tmp)
        tmp *= s
        np.sqrt(tmp, out=tmp)
        return np.divide(1, tmp, out=out)
    return np.power(s, -beta, out=out)


def _buffers(x, count):
    """`count` temporaries of one chunk of x's images (see _host.chunks)."""
    rows = _host.chunk_rows(x.shape[0], x.nbytes // max(1, len(x)))
    return [np.empty((rows,) + x.shape[1:], dtype=x.dtype) for _ in range(count)]


def lrn_forward_cpu(x, size, k, alpha_eff, beta, power=None):
    """(y, scale) for x of shape (N, C, ...), a chunk of images at a time (the temporaries stay in cache);
    scale = k + sum of alpha_eff * x^2 over the window. `power`: an array of x's shape that receives
    scale^(-beta), or None."""
    y, scale = np.empty_like(x), np.empty_like(x)
    sq, r, tmp = _buffers(x, 3)
    a, kk = x.dtype.type(alpha_eff), x.dtype.type(k)
    for n0, n1 in _host.chunks(x.shape[0], x.nbytes // max(1, len(x))):
        m = n1 - n0
        xc, s = x[n0:n1], scale[n0:n1]
        np.multiply(xc, xc, out=sq[:m])
        sq[:m] *= a
        _window_sum(sq[:m], (size - 1) // 2, size, s, plus=kk)
        np.multiply(xc, _neg_pow(s, beta, r[:m] if power is None else power[n0:n1], tmp[:m]), out=y[n0:n1])
    return y, scale


def lrn_backward_cpu(x, y, scale, dy, size, alpha_eff, beta, power=None):
    """dx from the forward's x, y, scale and the upstream dy, a chunk of images at a time; `power`: the
    forward's scale^(-beta) (lrn_forward_cpu's), or None to compute it here."""
    dx = np.empty_like(x)
    t, S, r, tmp = _buffers(x, 4)
    c = x.dtype.type(2 * alpha_eff * beta)
    for n0, n1 in _host.chunks(x.shape[0], x.nbytes // max(1, len(x))):
        m, sl = n1 - n0, slice(n0, n1)
        np.multiply(dy[sl], y[sl], out=t[:m])
        np.divide(t[:m], scale[sl], out=t[:m])
        _window_sum(t[:m], size // 2, size, S[:m])
        np.multiply(x[sl], S[:m], out=S[:m])
        S[:m] *= c
        p = _neg_pow(scale[sl], beta, r[:m], tmp[:m]) if power is None else power[sl]
        np.multiply(dy[sl], p, out=dx[sl])
        dx[sl] -= S[:m]
    return dx


def lrn_args(op, x, size, k, alpha, beta, alpha_convention):
    """The checked (size, k, alpha_eff, beta) for normalising the NCHW array x (a ValueError naming `op` otherwise)."""
    _check.ndim(op, "x", x, 4, "(N, C, H, W)")
    _check.floating(op, "x", x, kernel=True)
    size = _check.positive_int(op, "size", size)
    if alpha_convention not in CONVENTIONS:
        _check.fail(op, f"alpha_convention must be 'sum' or 'mean', got {alpha_convention!r}")
    k, alpha, beta = float(k), float(alpha), float(beta)
    return size, k, alpha if alpha_convention == "sum" else alpha / size, beta


def lrn_forward(x, size=5, k=2.0, alpha=1e-4, beta=0.75, alpha_convention="sum"):
    """Cross-channel LRN on NCHW; returns (y, cache) with cache = (x, y, scale, size, alpha_eff, beta, power):
    power is scale^(-beta) on the host, None on a GPU (its backward kernel computes it)."""
    size, k, alpha_eff, beta = lrn_args(OP_F, x, size, k, alpha, beta, alpha_convention)
    power = None
    if get_array_module(x) is np and precision.is_bf16(x):
        power = np.empty(x.shape, dtype=np.float32)
        y, scale = lrn_forward_cpu(precision.from_bf16(x), size, k, alpha_eff, beta, power=power)
        y = precision.to_bf16(y)
    elif get_array_module(x) is np:
        power = np.empty_like(x)
        y, scale = lrn_forward_cpu(x, size, k, alpha_eff, beta, power=power)
    else:
        from cpnet import kernels

        y, scale = kernels.lrn_forward_gpu(x, size, k, alpha_eff, beta, check=False)
    return y, (x, y, scale, size, alpha_eff, beta, power)


def lrn_backward(dy, cache):
    """dx for lrn_forward."""
    x, y, scale, size, alpha_eff, beta, power = cache
    _check.same_shape(OP_B, "dy", dy, x.shape, f"the forward input's shape {tuple(x.shape)}")
    _check.same_dtype(OP_B, "dy", dy, x, "the forward input")
    if get_array_module(dy) is np and precision.is_bf16(dy):
        f = precision.from_bf16
        return precision.to_bf16(lrn_backward_cpu(f(x), f(y), scale, f(dy), size, alpha_eff, beta, power=power))
    if get_array_module(dy) is np:
        return lrn_backward_cpu(x, y, scale, dy, size, alpha_eff, beta, power=power)
    from cpnet import kernels

    return kernels.lrn_backward_gpu(x, y, scale, dy, size, alpha_eff, beta, check=False)
