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
"""

from __future__ import annotations

import numpy as np

from cpnet.backend import get_array_module

from . import _check

OP_F = "lrn_forward"
OP_B = "lrn_backward"
CONVENTIONS = ("sum", "mean")


def _window_sum(a, lo, size):
    """s[:, c] = sum of a[:, c'] for c' in [c - lo, c - lo + size) ∩ [0, C): a loop over the size offsets."""
    N, C = a.shape[:2]
    ap = np.zeros((N, C + size - 1) + a.shape[2:], dtype=a.dtype)
    ap[:, lo : lo + C] = a
    s = ap[:, 0:C].copy()
    for t in range(1, size):
        s += ap[:, t : t + C]
    return s


def lrn_forward_cpu(x, size, k, alpha_eff, beta):
    """(y, scale) for x of shape (N, C, ...)."""
    scale = _window_sum(x * x, (size - 1) // 2, size)
    scale *= alpha_eff
    scale += k
    y = x * np.power(scale, -beta, dtype=x.dtype)
    return y, scale


def lrn_backward_cpu(x, y, scale, dy, size, alpha_eff, beta):
    """dx from the forward's x, y, scale and the upstream dy."""
    S = _window_sum(dy * y / scale, size // 2, size)
    return dy * np.power(scale, -beta, dtype=x.dtype) - (2 * alpha_eff * beta) * x * S


def lrn_forward(x, size=5, k=2.0, alpha=1e-4, beta=0.75, alpha_convention="sum"):
    """Cross-channel LRN on NCHW; returns (y, cache) with cache = (x, y, scale, size, alpha_eff, beta)."""
    _check.ndim(OP_F, "x", x, 4, "(N, C, H, W)")
    _check.floating(OP_F, "x", x, kernel=True)
    size = _check.positive_int(OP_F, "size", size)
    if alpha_convention not in CONVENTIONS:
        _check.fail(OP_F, f"alpha_convention must be 'sum' or 'mean', got {alpha_convention!r}")
    k, alpha, beta = float(k), float(alpha), float(beta)
    alpha_eff = alpha if alpha_convention == "sum" else alpha / size
    if get_array_module(x) is np:
        y, scale = lrn_forward_cpu(x, size, k, alpha_eff, beta)
    else:
        from cpnet import kernels

        y, scale = kernels.lrn_forward_gpu(x, size, k, alpha_eff, beta)
    return y, (x, y, scale, size, alpha_eff, beta)


def lrn_backward(dy, cache):
    """dx for lrn_forward."""
    x, y, scale, size, alpha_eff, beta = cache
    _check.same_shape(OP_B, "dy", dy, x.shape, f"the forward input's shape {tuple(x.shape)}")
    _check.same_dtype(OP_B, "dy", dy, x, "the forward input")
    if get_array_module(dy) is np:
        return lrn_backward_cpu(x, y, scale, dy, size, alpha_eff, beta)
    from cpnet import kernels

    return kernels.lrn_backward_gpu(x, y, scale, dy, size, alpha_eff, beta)
