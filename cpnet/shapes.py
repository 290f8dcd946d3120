"""The output size of a sliding window (convolution, pooling), written once for the ops, the kernels and the model.

    out = floor((size + 2 * pad - k) / stride) + 1

positions of a k-wide window moved by `stride` over an input padded by `pad` on each side: floor rounding, as
cuda-convnet and Caffe's convolution use (so alexnet's 227-pixel input gives conv1 (227 - 11) / 4 + 1 = 55).
Callers check first that the window fits (k <= size + 2 * pad) and name the op and flag in their own message.
"""


def window_out(size: int, k: int, stride: int = 1, pad: int = 0) -> int:
    return (size + 2 * pad - k) // stride + 1
