"""Parameter holders that call the ops: each layer keeps its parameters, its cache and its gradients.

A layer's arrays live on one device (its tower's); `forward(x, train)` keeps the op's cache, `backward(dy)`
stores gradients for the parameters in `self.grads` (same keys as `self.params`) and returns dx.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import ops


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
    """`input_grad=False` for a first layer: backward then skips dx (and returns None). `relu=True`: the ReLU
    that follows is applied here (ops.conv2d_forward's relu: on a GPU inside the output's layout pass), and the
    model's activation layer after it is a `ReLUInConv`."""

    def __init__(self, W, b, stride=1, pad=0, groups=1, input_grad=True, relu=False):
        super().__init__()
        self.params = {"W": W, "b": b}
        self.stride, self.pad, self.groups, self.input_grad, self.relu = stride, pad, groups, input_grad, relu
        self._workspace = {}  # host: the column matrix and its gradient, reused from step to step

    def forward(self, x, train=False):
        y, self._cache = ops.conv2d_forward(x, self.params["W"], self.params["b"], self.stride, self.pad, self.groups,
                                            workspace=self._workspace, relu=self.relu)
        return y

    def backward(self, dy):
        dx, self.grads["W"], self.grads["b"] = ops.conv2d_backward(dy, self._cache, need_dx=self.input_grad,
                                                                   workspace=self._workspace)
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


class _Absorbed(Layer):
    """The place of a layer that the layer before it applies: the identity both ways, kept so that the stage table,
    its names and the hooks that time each layer stay as they were."""

    def forward(self, x, train=False):
        return x

    def backward(self, dy):
        return dy


class ReLUInConv(_Absorbed):
    """The place of a ReLU that the convolution before it applies (Conv2D(relu=True))."""


class PoolInLRN(_Absorbed):
    """The place of a max pool that the LRN before it applies (LRNPool: one kernel each way on a GPU)."""


class Tanh(_Stateless):
    _fwd = staticmethod(ops.tanh_forward)
    _bwd = staticmethod(ops.tanh_backward)


class LRN(_Stateless):
    _fwd = staticmethod(ops.lrn_forward)
    _bwd = staticmethod(ops.lrn_backward)


class MaxPool(_Stateless):
    _fwd = staticmethod(ops.max_pool2d_forward)
    _bwd = staticmethod(ops.max_pool2d_backward)


class LRNPool(_Stateless):
    """LRN then max pooling (ops.lrn_pool_forward: the LRN's keyword arguments plus ksize, stride, pad)."""

    _fwd = staticmethod(ops.lrn_pool_forward)
    _bwd = staticmethod(ops.lrn_pool_backward)


class Flatten(Layer):
    def forward(self, x, train=False):
        self._cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        shape, self._cache = self._cache, None
        return dy.reshape(shape)


class Dropout(Layer):
    """Holds p, the seed and the training step (set by the model before each training forward pass) for
    ops.dropout_forward; `offset` is the global row of the batch's first row (0 in a world of one)."""

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed, self.step, self.offset = p, int(seed), 0, 0

    def forward(self, x, train=False):
        y, self._cache = ops.dropout_forward(x, self.p, self.seed, self.step, train, self.offset)
        return y

    def backward(self, dy):
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


@dataclass
class ParamBlock:
    """One contiguous parameter array: what an optimizer updates, and a gradient reduction sums, in one go.

    `layer.params[key]` is the array, on `device`; after backward `layer.grads[key]` is its gradient. `parts`:
    [(name, holder, start, stop)], the named parameter `name` is rows start:stop of the array, held by the layer
    `holder` as a view (one part covering the whole array where a parameter has its own memory; the fused towers'
    two row blocks where both towers share one array).
    """
    layer: Layer
    key: str
    device: object
    parts: list

    @property
    def param(self):
        return self.layer.params[self.key]

    @property
    def grad(self):
        return self.layer.grads.get(self.key)
