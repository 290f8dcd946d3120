"""Cheap argument checks shared by the ops: shapes, dtypes and hyper-parameters, never array data."""

from __future__ import annotations

import numpy as np

from cpnet.kernels import BF16
from cpnet.kernels import DTYPES as KERNEL_DTYPES  # the element types the CUDA kernels are compiled for
from cpnet.shapes import window_out


def fail(op: str, msg: str):
    raise ValueError(f"{op}: {msg}")


def floating(op: str, name: str, a, kernel: bool = False):
    """`a` must be a floating array (float32/float64 when a CUDA kernel handles it) or bf16 (uint16 bit patterns,
    cpnet.precision)."""
    dt = getattr(a, "dtype", None)
    if dt is None:
        fail(op, f"{name} must be an array, got {type(a).__name__}")
    if kernel and dt not in KERNEL_DTYPES:
        fail(op, f"{name} must be float32, float64 or bf16 (uint16), got {dt}")
    if dt != BF16 and not np.issubdtype(dt, np.floating):
        fail(op, f"{name} must have a floating dtype or be bf16 (uint16), got {dt}")


def ndim(op: str, name: str, a, n: int, expected: str):
    if getattr(a, "ndim", None) != n:
        got = tuple(a.shape) if hasattr(a, "shape") else type(a).__name__
        fail(op, f"{name} must have shape {expected}, got {got}")


def param_dtype(op: str, name: str, p, x):
    """A parameter has x's dtype, or float32 when x is bf16 (the float32 master weights of --precision bf16)."""
    if x.dtype != BF16:
        same_dtype(op, name, p, x)
    elif p.dtype != np.float32:
        fail(op, f"{name} must be float32 (the master weights) for bf16 x, got {p.dtype}")


def same_dtype(op: str, name: str, a, ref, ref_name: str = "x"):
    if a.dtype != ref.dtype:
        fail(op, f"{name} must have {ref_name}'s dtype {ref.dtype}, got {a.dtype}")


def same_shape(op: str, name: str, a, shape, expected: str | None = None):
    if tuple(getattr(a, "shape", ())) != tuple(shape):
        got = tuple(a.shape) if hasattr(a, "shape") else type(a).__name__
        fail(op, f"{name} must have {expected or f'shape {tuple(shape)}'}, got {got}")


def pair(op: str, name: str, v, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as (vertical, horizontal)."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        p = (int(v), int(v))
    elif isinstance(v, (tuple, list)) and len(v) == 2 and all(
        isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in v
    ):
        p = (int(v[0]), int(v[1]))
    else:
        fail(op, f"{name} must be an int or a pair of ints, got {v!r}")
    if min(p) < minimum:
        fail(op, f"{name} must be >= {minimum}, got {v!r}")
    return p


def positive_int(op: str, name: str, v, minimum: int = 1) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < minimum:
        fail(op, f"{name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def out_size(op: str, size: int, k: int, s: int, p: int, axis: str) -> int:
    """floor((size + 2p - k) / s) + 1, or a ValueError when the window does not fit the padded input."""
    if k > size + 2 * p:
        fail(op, f"window {k} is larger than the padded input {axis} {size}+2*{p}={size + 2 * p}")
    return window_out(size, k, s, p)
