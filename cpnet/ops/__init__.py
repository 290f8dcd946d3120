"""Hand-written forward/backward pairs on numpy or cupy arrays: ``<op>_forward(...) -> (y, cache)`` and
``<op>_backward(dy, cache) -> grads``."""

from .activations import relu_backward, relu_forward, tanh_backward, tanh_forward
from .conv import conv2d_backward, conv2d_forward
from .dropout import (counter_keys, counter_uniform, dropout_backward, dropout_forward, dropout_towers_forward,
                      dropout_with_mask)
from .linear import linear_backward, linear_forward
from .loss import log_softmax, softmax, softmax_cross_entropy_backward, softmax_cross_entropy_forward
from .lrn import lrn_backward, lrn_forward
from .lrnpool import lrn_pool_backward, lrn_pool_forward
from .pool import max_pool2d_backward, max_pool2d_forward

__all__ = [
    "conv2d_forward", "conv2d_backward",
    "max_pool2d_forward", "max_pool2d_backward",
    "lrn_forward", "lrn_backward",
    "lrn_pool_forward", "lrn_pool_backward",
    "linear_forward", "linear_backward",
    "relu_forward", "relu_backward",
    "tanh_forward", "tanh_backward",
    "dropout_forward", "dropout_backward", "dropout_towers_forward", "dropout_with_mask", "counter_keys", "counter_uniform",
    "softmax_cross_entropy_forward", "softmax_cross_entropy_backward", "softmax", "log_softmax",
]
