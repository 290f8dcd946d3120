"""Parameter holders that call the ops: each layer keeps its parameters, its cache and its gradients.

A layer's arrays live on one device (its tower's); `forward(x, train)` keeps the op's cache, `backward(dy)`
stores gradients for the parameters in `self.grads` (same keys as `self.params`) and returns dx.
"""

from __future__ import annotations

import numpy as np

from . import kernels, ops
from .backend import get_array_module


class Layer:
    """No parameters, no state: subclasses override forward/backward."""

    params: dict
    grads: dict

    def __init__(self):
        self.params = {}
        self.grads = {}
        self._cache = None

    def forward(self, x, train=False):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def clear(self):
        """Drop the cache (frees activations held for backward)."""
        self._cache = None


class Conv2D(Layer):
    """`input_grad=False` for a first layer: backward then skips dx (and returns None)."""

    def __init__(self, W, b, stride=1, pad=0, groups=1, input_grad=True):
        super().__init__()
        self.params = {"W": W, "b": b}
        self.stride, self.pad, self.groups, self.input_grad = stride, pad, groups, input_grad

    def forward(self, x, train=False):
        y, self._cache = ops.conv2d_forward(x, self.params["W"], self.params["b"], self.stride, self.pad, self.groups)
        return y

    def backward(self, dy):
        dx, self.grads["W"], self.grads["b"] = ops.conv2d_backward(dy, self._cache, need_dx=self.input_grad)
        self._cache = None
        return dx


class Linear(Layer):
    def __init__(self, W, b):
        super().__init__()
        self.params = {"W": W, "b": b}

    def forward(self, x, train=False):
        y, self._cache = ops.linear_forward(x, self.params["W"], self.params["b"])
        return y

    def backward(self, dy):
        dx, self.grads["W"], self.grads["b"] = ops.linear_backward(dy, self._cache)
        self._cache = None
        return dx


class _Stateless(Layer):
    """A layer wrapping a (forward, backward) op pair with fixed keyword arguments."""

    _fwd = None
    _bwd = None

    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, x, train=False):
        y, self._cache = type(self)._fwd(x, **self.kw)
        return y

    def backward(self, dy):
        dx = type(self)._bwd(dy, self._cache)
        self._cache = None
        return dx


class ReLU(_Stateless):
    _fwd = staticmethod(ops.relu_forward)
    _bwd = staticmethod(ops.relu_backward)


class Tanh(_Stateless):
    _fwd = staticmethod(ops.tanh_forward)
    _bwd = staticmethod(ops.tanh_backward)


class LRN(_Stateless):
    _fwd = staticmethod(ops.lrn_forward)
    _bwd = staticmethod(ops.lrn_backward)


class MaxPool(_Stateless):
    _fwd = staticmethod(ops.max_pool2d_forward)
    _bwd = staticmethod(ops.max_pool2d_backward)


class Flatten(Layer):
    def forward(self, x, train=False):
        self._cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        shape, self._cache = self._cache, None
        return dy.reshape(shape)


def counter_keys(seed: int, step: int) -> tuple:
    """The two uint32 keys of counter_uniform's hash for (seed, step)."""
    return tuple(np.uint32(v) for v in np.random.SeedSequence([seed, step]).generate_state(2, np.uint32))


def counter_uniform(xp, shape, seed: int, step: int, dtype=np.float32):
    """Uniform [0, 1) numbers that are a pure function of (seed, step, element index): a 32-bit integer hash
    (two rounds of the 'lowbias32' mixer, keyed from a SeedSequence) over the element counter.

    The same few integer operations run on NumPy and CuPy, so the CPU and the GPU draw identical numbers,
    and nothing needs a generator object or state: a resumed run recomputes any step's masks from its number.
    kernels.dropout_forward_gpu computes the same hash inside its one kernel.
    """
    k0, k1 = counter_keys(seed, step)
    n = int(np.prod(shape))
    h = xp.arange(n, dtype=xp.uint32)
    h *= np.uint32(0x9E3779B9)
    for key in (k0, k1):
        h ^= key
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x7FEB352D)
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x846CA68B)
        h ^= h >> np.uint32(16)
    u = (h >> np.uint32(8)).astype(dtype)
    u *= np.dtype(dtype).type(2.0 ** -24)
    return u.reshape(shape)


class Dropout(Layer):
    """Inverted dropout whose mask is a pure function of (seed, step): a resumed run draws the same masks,
    and so do the CPU and the GPU. `step` is set by the model before each training forward pass. On a GPU the
    draw, the mask and the product are one kernel (kernels.dropout_forward_gpu), bit-identical to the NumPy path."""

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed, self.step = p, int(seed), 0

    def forward(self, x, train=False):
        if not train or self.p == 0:
            self._cache = None
            return x
        xp = get_array_module(x)
        if xp is not np and x.dtype in kernels.DTYPES:
            y, self._cache = kernels.dropout_forward_gpu(x, self.p, *counter_keys(self.seed, self.step))
            return y
        keep = counter_uniform(xp, x.shape, self.seed, self.step, x.dtype.type) >= x.dtype.type(self.p)
        y, self._cache = ops.dropout_forward(x, self.p, keep, True)
        return y

    def backward(self, dy):
        if self._cache is None:
            return dy
        dx = ops.dropout_backward(dy, self._cache)
        self._cache = None
        return dx


class Sequential(Layer):
    """Layers applied in order; `layers` is a list of (name, layer)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = list(layers)

    def forward(self, x, train=False):
        for _, layer in self.layers:
            x = layer.forward(x, train)
        return x

    def backward(self, dy):
        for _, layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def clear(self):
        for _, layer in self.layers:
            layer.clear()

    def named(self):
        return list(self.layers)
