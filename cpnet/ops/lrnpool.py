"""LRN then max pooling as one op (layers 1-2 of the paper's and ccn2's conventions: ReLU -> LRN -> pool).

    y = max_pool2d(lrn(x))

On a GPU one kernel each way (cpnet/kernels/lrn.cu's lrn_pool kernels): the forward writes only the pooled output
and the winners' window offsets (uint8, i*ksize + j, the host pool's compact argmax); the backward gathers the
pooled gradient through those offsets per input element and recomputes LRN's scale and output from x. So the
full-size LRN output, its float32 scale, the pool's int32 argmax and the full-size gradient between the two never
reach memory. The values are lrn_forward's then max_pool2d_forward's, bit for bit on the host shim (the same
arithmetic in the same order; bf16 rounds the LRN output and the pooled gradient to bf16 where the separate
kernels store them), so ties still go to the first maximum and NaN still propagates.

On the host, and on a GPU for windows whose offsets do not fit a uint8 (ksize^2 > 255), the op is lrn_forward then
max_pool2d_forward (their caches kept), exactly the unfused path. Caffe's order (pool before LRN) is not fused.
"""

from __future__ import annotations

import numpy as np

from cpnet.backend import get_array_module

from . import _check
from .lrn import lrn_args, lrn_backward, lrn_forward
from .pool import max_pool2d_backward, max_pool2d_forward, pool_args

OP_F = "lrn_pool_forward"
OP_B = "lrn_pool_backward"


def fusable(ksize) -> bool:
    """Whether the GPU runs LRN -> pool with window size `ksize` as one kernel (its offsets fit a uint8)."""
    from cpnet.kernels import POOL_OFFSET_MAX

    return int(ksize) ** 2 <= POOL_OFFSET_MAX


def lrn_pool_forward(x, size=5, k=2.0, alpha=1e-4, beta=0.75, alpha_convention="sum", ksize=3, stride=2, pad=0):
    """max_pool2d_forward(lrn_forward(x, size, k, alpha, beta, alpha_convention), ksize, stride, pad) on NCHW;
    returns (y, cache)."""
    size, kk, alpha_eff, beta = lrn_args(OP_F, x, size, k, alpha, beta, alpha_convention)
    ks, s, p = pool_args(OP_F, x, ksize, stride, pad)
    if get_array_module(x) is np or not fusable(ks):
        y_lrn, lrn_cache = lrn_forward(x, size, k, alpha, beta, alpha_convention)
        y, pool_cache = max_pool2d_forward(y_lrn, ks, s, p)
        return y, ("apart", lrn_cache, pool_cache)
    from cpnet import kernels

    y, off = kernels.lrn_pool_forward_gpu(x, size, kk, alpha_eff, beta, ks, s, p, check=False)
    return y, ("fused", x, off, (size, kk, alpha_eff, beta, ks, s, p))


def lrn_pool_backward(dy, cache):
    """dx for lrn_pool_forward."""
    if cache[0] == "apart":
        return lrn_backward(max_pool2d_backward(dy, cache[2]), cache[1])
    _, x, off, params = cache
    _check.same_shape(OP_B, "dy", dy, off.shape, f"the forward output's shape {tuple(off.shape)}")
    _check.same_dtype(OP_B, "dy", dy, x, "the forward input")
    from cpnet import kernels

    return kernels.lrn_pool_backward_gpu(x, dy, off, *params, check=False)
