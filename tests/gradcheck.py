"""Central-difference gradient checks in float64, on numpy or cupy arrays."""

import numpy as np

from cpnet.backend import to_host


def numerical_grad(f, x, eps=1e-6):
    """d f() / d x by central differences; f reads x (changed in place and restored) and returns a scalar."""
    g = np.zeros(x.shape)
    flat = x.reshape(-1)
    assert x.flags.c_contiguous, "numerical_grad perturbs x through a flat view"
    for i in range(x.size):
        old = float(flat[i])
        flat[i] = old + eps
        fp = float(f())
        flat[i] = old - eps
        fm = float(f())
        flat[i] = old
        g.reshape(-1)[i] = (fp - fm) / (2 * eps)
    return g


def rel_error(a, n, tiny=1e-8):
    """max over elements of |a - n| / max(|a|, |n|, tiny)."""
    a, n = np.asarray(to_host(a), dtype=np.float64), np.asarray(to_host(n), dtype=np.float64)
    assert a.shape == n.shape, (a.shape, n.shape)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - n) / np.maximum(np.maximum(np.abs(a), np.abs(n)), tiny)))


def projected(xp, forward, dy):
    """The scalar sum(forward() * dy), whose gradient with respect to every input is the op's backward(dy)."""
    return lambda: float(xp.sum(forward() * dy))
