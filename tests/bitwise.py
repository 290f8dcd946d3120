"""Helpers for the kernel tests that compare results bit for bit (host shim and GPU alike)."""

import numpy as np


def random_array(shape, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def float_bits(a):
    """The raw bits of a float array (so -0.0 != 0.0 and NaNs compare by payload)."""
    a = np.ascontiguousarray(a)
    return a.view({4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def with_specials(shape, dtype, seed):
    """Random values with zeros of both signs, infinities and a NaN sprinkled in (where there is room)."""
    x = random_array(shape, dtype, seed).ravel()
    for i, v in enumerate((0.0, -0.0, np.inf, -np.inf, np.nan)):
        if 3 * i < x.size:
            x[3 * i] = v
    return x.reshape(shape)
