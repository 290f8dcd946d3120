"""Numeric precision of a run: fp32, tf32 or bf16 (`--precision`), and the bf16 conversions.

- fp32: float32 everywhere.
- tf32: float32 arrays; on a GPU cuBLAS may round the inputs of float32 products to TF32 (backend.enable_tf32).
- bf16: mixed precision. The parameters and their momentum stay float32 (the "master" copy the optimizer
  updates), activations and their gradients are stored in bfloat16 (8 exponent bits as float32, 8 significant
  bits), every product takes bf16 inputs and accumulates in float32, and LRN, pooling, softmax and the sums of
  col2im and the biases compute in float32 and round once when they store.

Why bf16 as uint16 bit patterns (and not fp16): NumPy and CuPy have no bfloat16 dtype, but bf16 has float32's
exponent range, so activations and gradients neither overflow nor underflow where float32 does not, and training
needs no loss scaling. fp16 (a native dtype of both) has 5 exponent bits: its gradients underflow below 6e-8 and
need dynamic loss scaling (scale the loss, skip steps whose gradients overflow, adjust the scale), a second
control loop in the trainer. cuBLAS multiplies bf16 on tensor cores through cublasGemmEx (bf16 inputs, float32
accumulation), which CuPy exposes in its cuBLAS bindings (backend.gemm_bf16); the rest of the bf16 path is our
own kernels (cpnet/kernels, typedef T = bf16, F = float) and the conversions here.

On the host the same semantics run in NumPy: an array of dtype BF16 (uint16) holds bf16 bit patterns, `to_bf16`
rounds float32 to it (to nearest, ties to even, as the kernels' bf16.cuh does), `from_bf16` widens it exactly, and
each op widens its bf16 inputs, computes in float32 and rounds its outputs where the GPU stores bf16. So the CPU
tests check the mathematics of the bf16 path, and the host shim checks the bf16 kernels against it.
"""

from __future__ import annotations

import numpy as np

from .backend import get_array_module
from .errors import CpnetError
from .kernels import BF16

PRECISIONS = ("fp32", "tf32", "bf16")
F32 = np.dtype(np.float32)


def check(precision: str) -> str:
    if precision not in PRECISIONS:
        raise CpnetError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return precision


def activation_dtype(precision: str, param_dtype=np.float32) -> np.dtype:
    """The dtype activations are stored in: BF16 for bf16, else the parameters' dtype."""
    check(precision)
    if precision == "bf16":
        if np.dtype(param_dtype) != F32:
            raise CpnetError(f"precision bf16 keeps float32 master weights; got parameters of dtype "
                             f"{np.dtype(param_dtype)}")
        return BF16
    return np.dtype(param_dtype)


def is_bf16(a) -> bool:
    return getattr(a, "dtype", None) == BF16


def to_bf16(x):
    """float32 (or float64, rounded to float32 first) -> BF16 bit patterns, round to nearest even; NaN stays NaN.
    On a GPU one kernel (kernels.narrow_gpu)."""
    xp = get_array_module(x)
    if xp is not np:
        from . import kernels

        return kernels.narrow_gpu(x.astype(np.float32, copy=False), check=False)
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    r >>= np.uint32(16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        r[nan] = (u[nan] >> np.uint32(16)) | np.uint32(0x40)
    return r.astype(np.uint16)


def from_bf16(a):
    """BF16 bit patterns -> float32 (exact). On a GPU one kernel (kernels.widen_gpu)."""
    xp = get_array_module(a)
    if xp is not np:
        from . import kernels

        return kernels.widen_gpu(a, check=False)
    return (np.ascontiguousarray(a).astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_bf16(x):
    """float32 values rounded to the nearest bf16, as float32 (what storing and reloading them gives)."""
    return from_bf16(to_bf16(x))


def as_float32(a):
    """An activation as float32: widened from bf16, else as it is (cast when it is another float type)."""
    if is_bf16(a):
        return from_bf16(a)
    return a if a.dtype == F32 else a.astype(np.float32)


def store_like(x32, like):
    """float32 values stored in `like`'s dtype: rounded to bf16 when `like` is bf16, else x32 itself."""
    return to_bf16(x32) if is_bf16(like) else x32


def matmul(a, b, out=None, out_dtype=F32):
    """a @ b for 2-D bf16 arrays (views with any strides, transposes included), accumulated in float32; the result
    float32 or (out_dtype=BF16) rounded to bf16, written into `out` when given (C-contiguous, of that dtype). On a
    GPU cuBLAS's GemmEx on tensor cores (backend.gemm_bf16); on the host the float32 product of the widened
    inputs, which is the same sum up to its order."""
    xp = get_array_module(a)
    out_dtype = np.dtype(out_dtype if out is None else out.dtype)
    if out is None:
        out = xp.empty((a.shape[0], b.shape[1]), dtype=out_dtype)
    if xp is not np:
        from . import backend

        return backend.gemm_bf16(a, b, out)
    if out_dtype == BF16:
        out[...] = to_bf16(from_bf16(a) @ from_bf16(b))
        return out
    return np.matmul(from_bf16(a), from_bf16(b), out=out)


def ones_bf16(xp, n):
    """A bf16 column of n ones (n, 1): sums of bf16 rows as products with float32 accumulation."""
    return xp.full((n, 1), 0x3F80, dtype=BF16)


def row_sums(a):
    """float32 sums of the rows of a 2-D bf16 array, (rows,): one product with a column of ones."""
    xp = get_array_module(a)
    return matmul(a, ones_bf16(xp, a.shape[1])).reshape(-1)


def add(a, b):
    """a + b for two activations or gradients of one dtype (bf16: in float32, rounded once)."""
    if is_bf16(a):
        return to_bf16(from_bf16(a) + from_bf16(b))
    return a + b
