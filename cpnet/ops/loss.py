"""Softmax cross-entropy, the training objective (the paper maximises the multinomial log-probability of the
correct label, §4 and §5):

    p = softmax(z),   loss = -(1/N) sum_n log p[n, label_n]

computed with the log-sum-exp shift (z - max z) so large logits neither overflow nor lose precision.
Backward: dz = (p - onehot(label)) / N.

On a GPU each direction is one kernel (cpnet/kernels/loss.cu) where the array expression below chains about a
dozen; the loss is then the sum of the kernel's per-row terms (one reduction). Labels outside [0, K) are refused on
the host; on a GPU (not read back) they give a NaN loss, which the NaN guard stops.
"""

from __future__ import annotations

import numpy as np

from cpnet import kernels
from cpnet.backend import get_array_module

from . import _check

OP_F = "softmax_cross_entropy_forward"


def log_softmax(logits):
    """Row-wise log-probabilities, shifted by the row maximum so exp never overflows."""
    xp = get_array_module(logits)
    z = logits - logits.max(axis=1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))


def softmax(logits):
    """Row-wise probabilities (N, K)."""
    return get_array_module(logits).exp(log_softmax(logits))


def softmax_cross_entropy_forward(logits, labels):
    """Returns (loss, cache). loss is a 0-d array of logits' dtype on logits' device (no GPU sync);
    cache = (probabilities (N, K), labels)."""
    xp = get_array_module(logits)
    _check.ndim(OP_F, "logits", logits, 2, "(N, K)")
    _check.floating(OP_F, "logits", logits)
    N, K = logits.shape
    if getattr(labels, "ndim", None) != 1 or labels.shape[0] != N:
        got = tuple(labels.shape) if hasattr(labels, "shape") else type(labels).__name__
        _check.fail(OP_F, f"labels must have shape (N,)=({N},), got {got}")
    if not np.issubdtype(labels.dtype, np.integer):
        _check.fail(OP_F, f"labels must have an integer dtype, got {labels.dtype}")
    if get_array_module(labels) is np and isinstance(labels, np.ndarray) and N and (labels.min() < 0 or labels.max() >= K):
        _check.fail(OP_F, f"labels must lie in [0, K={K}), got values in [{labels.min()}, {labels.max()}]")
    labels = xp.asarray(labels)
    if xp is not np and logits.dtype in kernels.DTYPES:
        row_loss, p, labels32 = kernels.softmax_xent_forward_gpu(logits, labels, check=False)
        return row_loss.sum(), (p, labels32)
    logp = log_softmax(logits)
    rows = xp.arange(N)
    loss = -logp[rows, labels].sum() / logits.dtype.type(N)
    return xp.asarray(loss, dtype=logits.dtype), (xp.exp(logp), labels)


def softmax_cross_entropy_backward(cache):
    """dlogits = (p - onehot) / N, for a loss of weight 1."""
    xp = get_array_module(cache[0])
    p, labels = cache
    if xp is not np and p.dtype in kernels.DTYPES:
        return kernels.softmax_xent_backward_gpu(p, labels, check=False)
    N = p.shape[0]
    d = p.copy()
    d[xp.arange(N), labels] -= 1
    d /= p.dtype.type(N)
    return d
