"""Every CUDA kernel, run on the CPU through the host shim, against naive loops and the NumPy ops.

The shim compiles the same text CuPy compiles (cpnet/kernels/*.cu after a `typedef float T;` line) with g++ and
launches it block by block, thread by thread, so these tests execute each kernel's indexing and bounds logic
without a GPU. Where nvcc (or libnvrtc) exists, the same text is also compiled for sm_90.
"""

import ctypes.util
import math
import os
import re
import shutil
import subprocess
import types

import numpy as np
import pytest
from bitwise import float_bits, random_array, with_specials
import naive

from cpnet import kernels
from cpnet.shapes import window_out

shim_module = pytest.importorskip("cpnet.kernels.shim")

DTYPES = [np.float32, np.float64]
BUILDS = [np.float32, np.float64, kernels.BF16]  # every dtype a .cu file is compiled for
TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


def _ops(module, name):
    """A NumPy `_cpu` reference from cpnet.ops, or skip when the ops are not there."""
    try:
        mod = __import__(f"cpnet.ops.{module}", fromlist=[name])
        return getattr(mod, name)
    except (ImportError, AttributeError) as e:
        pytest.skip(f"cpnet.ops.{module}.{name} not available: {e}")


# ------------------------------------------------------------------------------------------------------------
# Cases: hand-picked edge cases first, then random shapes.

# (N, C, H, W, kh, kw, sy, sx, ph, pw)
CONV_CASES = [
    (2, 3, 7, 6, 3, 3, 1, 1, 1, 1),  # "same" padding
    (2, 2, 9, 8, 3, 2, 2, 3, 1, 0),  # non-square kernel and strides
    (1, 3, 23, 23, 11, 11, 4, 4, 0, 0),  # conv1-like
    (2, 2, 5, 5, 5, 5, 1, 1, 2, 2),  # window as large as the input, heavy padding
    (1, 1, 6, 7, 2, 3, 3, 2, 1, 2),  # stride larger than the kernel: some inputs are never read
    (3, 1, 4, 4, 1, 1, 1, 1, 0, 0),  # 1x1
    (1, 2, 1, 5, 1, 3, 1, 2, 0, 1),  # a single row
]
# (N, C, H, W, ksize, stride, pad)
POOL_CASES = [
    (2, 3, 7, 7, 3, 2, 0),  # AlexNet's overlapping pool
    (2, 2, 8, 8, 3, 2, 1),  # padding on both sides
    (1, 2, 6, 5, 3, 2, 1),  # partial windows, floor size leaves a row unread
    (2, 2, 9, 9, 2, 2, 0),  # non-overlapping
    (1, 1, 5, 7, 3, 3, 2),  # windows mostly in the padding
    (1, 2, 4, 4, 4, 1, 3),  # large pad: corner windows see one input element
]
# (N, C, H, W, size)
LRN_CASES = [
    (2, 7, 3, 4, 5),  # the paper's size, C > size
    (2, 3, 2, 2, 5),  # C < size: both edges clipped at once
    (1, 4, 3, 3, 4),  # even size: the window is lopsided
    (1, 2, 2, 3, 6),  # even size larger than C
    (2, 5, 1, 1, 1),  # size 1: a per-element normalisation
    (1, 6, 2, 2, 3),
]
LRN_PARAMS = [(2.0, 1e-4, 0.75), (1.5, 0.1, 0.75), (1.0, 0.3, 0.5)]  # (k, alpha_eff, beta); the paper's first


def _random_conv_cases(seed, count=4):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        kh, kw, sy, sx = (int(v) for v in rng.integers(1, 5, 4))
        ph, pw = int(rng.integers(0, kh)), int(rng.integers(0, kw))
        H, W = int(rng.integers(max(1, kh - 2 * ph), 10)), int(rng.integers(max(1, kw - 2 * pw), 10))
        out.append((int(rng.integers(1, 3)), int(rng.integers(1, 4)), H, W, kh, kw, sy, sx, ph, pw))
    return out


def _random_pool_cases(seed, count=4):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        k, s = int(rng.integers(1, 5)), int(rng.integers(1, 4))
        p = int(rng.integers(0, k))
        H, W = int(rng.integers(max(1, k - 2 * p), 10)), int(rng.integers(max(1, k - 2 * p), 10))
        out.append((int(rng.integers(1, 3)), int(rng.integers(1, 4)), H, W, k, s, p))
    return out


def _random_lrn_cases(seed, count=4):
    rng = np.random.default_rng(seed)
    return [tuple(int(v) for v in (rng.integers(1, 3), rng.integers(1, 9), rng.integers(1, 4),
                                   rng.integers(1, 4), rng.integers(1, 8))) for _ in range(count)]


ALL_CONV = CONV_CASES + _random_conv_cases(1)
ALL_POOL = POOL_CASES + _random_pool_cases(2)
ALL_LRN = LRN_CASES + _random_lrn_cases(3)


def _distinct(shape, dtype, seed=0):
    """A random permutation of well-separated values: no ties anywhere."""
    return (np.random.default_rng(seed).permutation(math.prod(shape)).reshape(shape) * 0.5 - 7.0).astype(dtype)


def _close(actual, expected, dtype):
    np.testing.assert_allclose(actual, expected, **TOL[dtype])


# ------------------------------------------------------------------------------------------------------------
# One test per kernel (KERNEL_TESTS below maps each parsed kernel to its test).


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ALL_CONV, ids=str)
def test_im2col(shim, case, dtype):
    N, C, H, W, *geom = case
    x = random_array((N, C, H, W), dtype)
    col = shim.im2col_host(x, *geom)
    assert col.dtype == dtype and col.flags.c_contiguous
    np.testing.assert_array_equal(col, naive.im2col(x, *geom))
    np.testing.assert_array_equal(col, _ops("conv", "im2col_cpu")(x, *geom))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ALL_CONV, ids=str)
def test_col2im(shim, case, dtype):
    N, C, H, W, kh, kw, sy, sx, ph, pw = case
    Ho, Wo = window_out(H, kh, sy, ph), window_out(W, kw, sx, pw)
    col = random_array((C * kh * kw, N * Ho * Wo), dtype, seed=1)
    x = shim.col2im_host(col, (N, C, H, W), kh, kw, sy, sx, ph, pw)
    assert x.shape == (N, C, H, W) and x.dtype == dtype
    _close(x, naive.col2im(col, (N, C, H, W), kh, kw, sy, sx, ph, pw), dtype)
    # The gather adds the window offsets in the host path's order (i, then j, ascending): the same bits.
    _bitwise(x, _ops("conv", "col2im_cpu")(col, (N, C, H, W), kh, kw, sy, sx, ph, pw))


# The presets' geometries, which im2col.cu runs with compile-time window and stride (FIXED_GEOMETRY), on small
# inputs: (N, C, H, W, kh, kw, sy, sx, ph, pw).
FIXED_CASES = [(1, 2, 23, 21, 11, 11, 4, 4, 0, 0), (2, 3, 9, 8, 5, 5, 1, 1, 2, 2), (2, 5, 6, 7, 3, 3, 1, 1, 1, 1),
               (1, 2, 7, 7, 3, 3, 1, 1, 0, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FIXED_CASES, ids=str)
def test_im2col_col2im_fixed_geometry(shim, case, dtype, monkeypatch):
    """With the window and stride as compile-time constants (FIXED_GEOMETRY=1) and as run-time values (0), both
    kernels give the NumPy path's bits."""
    N, C, H, W, *geom = case
    x = random_array((N, C, H, W), dtype, seed=5)
    col_ref = _ops("conv", "im2col_cpu")(x, *geom)
    dcol = random_array(col_ref.shape, dtype, seed=6)
    dx_ref = _ops("conv", "col2im_cpu")(dcol, x.shape, *geom)
    for fixed in (1, 0):
        monkeypatch.setattr(kernels, "FIXED_GEOMETRY", fixed)
        _bitwise(shim.im2col_host(x, *geom), col_ref)
        _bitwise(shim.col2im_host(dcol, x.shape, *geom), dx_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_col2im_is_the_adjoint_of_im2col(shim, dtype):
    """<im2col(x), c> == <x, col2im(c)> for every geometry."""
    for N, C, H, W, *geom in ALL_CONV:
        x = random_array((N, C, H, W), dtype, seed=2)
        c = random_array(shim.im2col_host(x, *geom).shape, dtype, seed=3)
        lhs = float(np.vdot(shim.im2col_host(x, *geom).astype(np.float64), c))
        rhs = float(np.vdot(x.astype(np.float64), shim.col2im_host(c, x.shape, *geom)))
        assert lhs == pytest.approx(rhs, rel=1e-4 if dtype == np.float32 else 1e-12, abs=1e-5)


def _maxpool_forward_agrees(shim, x, k, s, p):
    """The kernel's y and int32 argmax equal the naive loops' and the host path's exactly."""
    y, arg = shim.maxpool_forward_host(x, k, s, p)
    assert arg.dtype == np.int32
    for y_ref, arg_ref in (naive.max_pool2d(x, k, s, p), _ops("pool", "maxpool_forward_cpu")(x, k, s, p)):
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(arg, arg_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ALL_POOL, ids=str)
def test_maxpool_forward(shim, case, dtype):
    N, C, H, W, k, s, p = case
    for x in (_distinct((N, C, H, W), dtype), np.round(random_array((N, C, H, W), dtype, seed=4))):  # no ties, many ties
        _maxpool_forward_agrees(shim, x, k, s, p)


@pytest.mark.parametrize("dtype", DTYPES)
def test_maxpool_ties_go_to_the_first_maximum_and_padding_never_wins(shim, dtype):
    x = np.full((1, 1, 5, 5), -3.0, dtype=dtype)  # all equal and negative: zero padding would win if it counted
    y, arg = shim.maxpool_forward_host(x, 3, 2, 1)
    np.testing.assert_array_equal(y, -3.0)
    # The first valid element of each window in row-major order: window rows/cols start at max(o*2 - 1, 0).
    first = [max(o * 2 - 1, 0) for o in range(3)]
    np.testing.assert_array_equal(arg[0, 0], [[h * 5 + w for w in first] for h in first])


@pytest.mark.parametrize("dtype", DTYPES)
def test_maxpool_nan_propagates_like_the_host_path(shim, dtype):
    """A window holding NaN gives NaN and its first NaN wins, wherever the NaN sits (first, later, several)."""
    x = np.round(random_array((2, 3, 7, 9), dtype, seed=8))
    x.reshape(-1)[[0, 5, 17, 18, 40, 77, 100, 101]] = np.nan
    x[1, 2] = -np.inf
    for k, s, p in ((3, 2, 0), (3, 2, 1), (2, 1, 1)):
        _maxpool_forward_agrees(shim, x, k, s, p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ALL_POOL, ids=str)
def test_maxpool_backward(shim, case, dtype):
    N, C, H, W, k, s, p = case
    for x in (_distinct((N, C, H, W), dtype), np.round(random_array((N, C, H, W), dtype, seed=5))):
        y, arg = shim.maxpool_forward_host(x, k, s, p)
        dy = random_array(y.shape, dtype, seed=6)
        dx = shim.maxpool_backward_host(dy, arg, x.shape, k, s, p)
        assert dx.shape == x.shape and dx.dtype == dtype
        _close(dx, naive.max_pool2d_backward(dy, arg, x.shape), dtype)
        _close(dx, _ops("pool", "maxpool_backward_cpu")(dy, arg, x.shape, k, s, p), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", LRN_PARAMS, ids=str)
@pytest.mark.parametrize("case", ALL_LRN, ids=str)
def test_lrn_forward(shim, case, params, dtype):
    N, C, H, W, size = case
    x = random_array((N, C, H, W), dtype, seed=7)
    y, scale = shim.lrn_forward_host(x, size, *params)
    assert y.dtype == scale.dtype == dtype
    y_ref, scale_ref = naive.lrn(x, size, *params, "sum"), naive.lrn_scale(x, size, params[0], params[1])
    _close(scale, scale_ref, dtype)
    _close(y, y_ref, dtype)
    y_ops, scale_ops = _ops("lrn", "lrn_forward_cpu")(x, size, *params)
    _close(scale, scale_ops, dtype)
    _close(y, y_ops, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", LRN_PARAMS, ids=str)
@pytest.mark.parametrize("case", ALL_LRN, ids=str)
def test_lrn_backward(shim, case, params, dtype):
    N, C, H, W, size = case
    k, alpha, beta = params
    x = random_array((N, C, H, W), dtype, seed=8)
    y, scale = shim.lrn_forward_host(x, size, k, alpha, beta)
    dy = random_array(x.shape, dtype, seed=9)
    dx = shim.lrn_backward_host(x, y, scale, dy, size, alpha, beta)
    assert dx.dtype == dtype
    _close(dx, naive.lrn_backward(x, scale, dy, size, alpha, beta), dtype)
    _close(dx, _ops("lrn", "lrn_backward_cpu")(x, y, scale, dy, size, alpha, beta), dtype)


# LRN -> max pool fused (lrn.cu's lrn_pool kernels): bit for bit the separate LRN and pool kernels (the same
# arithmetic in the same order), and against the NumPy path (lrn_forward_cpu, then the host pool).

# (N, C, H, W, size, ksize, stride, pad): odd map sizes, C below and above the window, padded and partial windows
LRN_POOL_CASES = [
    (2, 7, 9, 9, 5, 3, 2, 0),  # the paper's LRN and overlapping pool, odd maps
    (1, 3, 8, 7, 5, 3, 2, 1),  # C < size, padding, unequal sides
    (2, 4, 6, 5, 4, 2, 2, 0),  # even LRN size, non-overlapping pool, the floor leaves a column unread
    (1, 5, 7, 6, 3, 3, 3, 2),  # windows mostly in the padding
    (1, 2, 5, 5, 1, 4, 1, 3),  # size-1 LRN, a large pad: corner windows see one element
]


def _lrn_pool_inputs(shape, dtype, seed):
    """No ties; many ties (small integers: equal LRN values at positions with equal channel vectors); NaN and -inf
    sprinkled in."""
    ties = np.round(random_array(shape, dtype, seed) * 1.5)
    ties[:, :, ::2] = ties[:, :, :1]  # repeat a row: tied windows
    nan = random_array(shape, dtype, seed + 1)
    nan.reshape(-1)[::7] = np.nan
    nan.reshape(-1)[3::11] = -np.inf
    return [random_array(shape, dtype, seed + 2), ties, nan]


def _same_bits(actual, expected):
    """The same bits (so -0.0 != 0.0), except that a NaN's sign may differ: the host's x86 arithmetic picks a NaN's
    sign by operand order, which the compiler may choose differently in two kernels (a GPU has one NaN)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual.dtype, actual.shape)
    if actual.dtype == kernels.BF16:
        actual, expected = _f32(actual), _f32(expected)
    nan = np.isnan(actual)
    np.testing.assert_array_equal(nan, np.isnan(expected))
    np.testing.assert_array_equal(float_bits(np.where(nan, 0, actual)), float_bits(np.where(nan, 0, expected)))


def _lrn_pool_apart(shim, x, size, k, alpha, beta, ks, s, p):
    """The separate kernels: (y, off as window offsets, the LRN's y and scale, the pool's argmax)."""
    from cpnet.ops.pool import flat_to_window

    ly, scale = shim.lrn_forward_host(x, size, k, alpha, beta)
    y, arg = shim.maxpool_forward_host(ly, ks, s, p)
    return y, flat_to_window(arg, x.shape, ks, s, p), ly, scale, arg


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LRN_POOL_CASES, ids=str)
def test_lrn_pool_forward(shim, case, dtype):
    N, C, H, W, size, ks, s, p = case
    k, alpha, beta = 2.0, 0.125, 0.75  # alpha a power of two: the NumPy path's scale has the kernel's bits
    for x in _lrn_pool_inputs((N, C, H, W), dtype, 60):
        y, off = shim.lrn_pool_forward_host(x, size, k, alpha, beta, ks, s, p)
        assert y.dtype == dtype and off.dtype == np.uint8 and off.shape == y.shape
        y_apart, off_apart, *_ = _lrn_pool_apart(shim, x, size, k, alpha, beta, ks, s, p)
        _bitwise(y, y_apart)
        np.testing.assert_array_equal(off, off_apart)
        with np.errstate(invalid="ignore"):  # -inf * inf^-beta
            ly_np, _ = _ops("lrn", "lrn_forward_cpu")(x, size, k, alpha, beta)
        y_np, off_np = _ops("pool", "maxpool_forward_host")(ly_np, ks, s, p)
        _close(y, y_np, dtype)
        np.testing.assert_array_equal(np.isnan(y), np.isnan(y_np))
        np.testing.assert_array_equal(off, off_np)  # ties to the first maximum, the first NaN wins


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LRN_POOL_CASES, ids=str)
def test_lrn_pool_backward(shim, case, dtype):
    N, C, H, W, size, ks, s, p = case
    k, alpha, beta = 1.5, 0.1, 0.75
    for x in _lrn_pool_inputs((N, C, H, W), dtype, 61):
        y, off = shim.lrn_pool_forward_host(x, size, k, alpha, beta, ks, s, p)
        dy = random_array(y.shape, dtype, seed=62)
        dx = shim.lrn_pool_backward_host(x, dy, off, size, k, alpha, beta, ks, s, p)
        assert dx.shape == x.shape and dx.dtype == dtype
        _, _, ly, scale, arg = _lrn_pool_apart(shim, x, size, k, alpha, beta, ks, s, p)
        _same_bits(dx, shim.lrn_backward_host(x, ly, scale, shim.maxpool_backward_host(dy, arg, x.shape, ks, s, p),
                                            size, alpha, beta))
        dpool = _ops("pool", "maxpool_backward_host")(dy, off, x.shape, ks, s, p)
        with np.errstate(invalid="ignore"):  # -inf * inf^-beta
            ly_np, scale_np = _ops("lrn", "lrn_forward_cpu")(x, size, k, alpha, beta)
            _close(dx, _ops("lrn", "lrn_backward_cpu")(x, ly_np, scale_np, dpool, size, alpha, beta), dtype)


@pytest.mark.parametrize("case", LRN_POOL_CASES, ids=str)
def test_bf16_lrn_pool(shim, case):
    """bf16: the separate bf16 kernels' bits (the LRN output and the pooled gradient rounded where they store
    them), and the float32 NumPy path on the widened input within one bf16 unit."""
    N, C, H, W, size, ks, s, p = case
    k, alpha, beta = 2.0, 0.1, 0.75
    for x32 in _lrn_pool_inputs((N, C, H, W), np.float32, 63):
        x = _bf16(x32)
        y, off = shim.lrn_pool_forward_host(x, size, k, alpha, beta, ks, s, p)
        assert y.dtype == kernels.BF16 and off.dtype == np.uint8
        y_apart, off_apart, ly, scale, arg = _lrn_pool_apart(shim, x, size, k, alpha, beta, ks, s, p)
        np.testing.assert_array_equal(y, y_apart)
        np.testing.assert_array_equal(off, off_apart)
        with np.errstate(invalid="ignore"):
            ly_np, _ = _ops("lrn", "lrn_forward_cpu")(_f32(x), size, k, alpha, beta)
        y_np, _ = _ops("pool", "maxpool_forward_host")(ly_np, ks, s, p)
        np.testing.assert_allclose(_f32(y), y_np, rtol=BF16_RTOL, atol=1e-30)
        dy = _bf16(random_array(y.shape, np.float32, seed=64))
        dx = shim.lrn_pool_backward_host(x, dy, off, size, k, alpha, beta, ks, s, p)
        assert dx.dtype == kernels.BF16
        _same_bits(dx, shim.lrn_backward_host(x, ly, scale, shim.maxpool_backward_host(dy, arg, x.shape, ks, s, p),
                                              size, alpha, beta))


def test_lrn_pool_checks_its_arguments(shim):
    x = random_array((1, 3, 7, 7), np.float32)
    with pytest.raises(ValueError, match="ksize 16 too large for uint8 window offsets"):
        shim.lrn_pool_forward_host(x, 5, 2.0, 0.1, 0.75, 16, 1, 0)
    with pytest.raises(ValueError, match=r"pad must be in \[0, ksize=3\)"):
        shim.lrn_pool_forward_host(x, 5, 2.0, 0.1, 0.75, 3, 2, 3)
    y, off = shim.lrn_pool_forward_host(x, 5, 2.0, 0.1, 0.75, 3, 2, 0)
    with pytest.raises(ValueError, match="off must be uint8"):
        shim.lrn_pool_backward_host(x, y, off.astype(np.int32), 5, 2.0, 0.1, 0.75, 3, 2, 0)
    with pytest.raises(ValueError, match=r"expected dy and off of shape \(1, 3, 3, 3\)"):
        shim.lrn_pool_backward_host(x, y[:, :2], off, 5, 2.0, 0.1, 0.75, 3, 2, 0)


# Elementwise kernels (elementwise.cu): bit for bit against the NumPy paths they replace.

ELEMENTWISE_SHAPES = [(1,), (7,), (31,), (33,), (5, 7), (3, 100), (2, 3, 5, 7)]  # sizes off the 32-thread blocks


def _bitwise(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual.dtype, actual.shape)
    np.testing.assert_array_equal(float_bits(actual), float_bits(expected))


class _OneLayer:
    def __init__(self, params):
        self.params, self.grads = params, {}


class _OneLayerModel:
    """Just enough of a model for MomentumSGD: one layer with W and b on the host."""

    def __init__(self, W, b):
        from cpnet import backend

        self.layer = _OneLayer({"W": W, "b": b})
        self.devices = [backend.HOST]

    def param_slots(self):
        return [(f"l.{k}", self.layer, k, 0) for k in self.layer.params]

    def param_memory(self):
        from cpnet.layers import ParamBlock

        return [ParamBlock(self.layer, k, self.devices[0], [(f"l.{k}", self.layer, 0, len(a))])
                for k, a in self.layer.params.items()]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hyper", [(0.01, 0.9, 5e-4, False), (0.37, 0.5, 0.0, False), (0.1, 0.9, 1e-2, True)],
                         ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 11), (4, 2, 3, 3), (37, 5)], ids=str)
@pytest.mark.parametrize("slice_bytes", [8, 1 << 16])
def test_sgd_momentum(shim, shape, hyper, dtype, slice_bytes, monkeypatch):
    """Three steps of MomentumSGD's NumPy path against the kernel on copies of w, g, v: identical bits, whether
    the host update runs in slices of one or two elements over two threads or in one slice per array."""
    from cpnet.optim import MomentumSGD

    monkeypatch.setattr("cpnet.optim.UPDATE_SLICE_BYTES", slice_bytes)
    monkeypatch.setattr("cpnet.optim.UPDATE_THREADS_BYTES", 0 if slice_bytes < 64 else 1 << 30)

    lr, m, wd, decay_biases = hyper
    model = _OneLayerModel(random_array(shape, dtype, 20), random_array(shape[:1], dtype, 21))
    opt = MomentumSGD(model, lr=lr, momentum=m, weight_decay=wd, decay_biases=decay_biases)
    mine = {k: (a.copy(), np.zeros_like(a)) for k, a in model.layer.params.items()}  # (w, v) the kernel updates
    for step in range(3):
        for i, (k, a) in enumerate(model.layer.params.items()):
            model.layer.grads[k] = random_array(a.shape, dtype, 30 + 2 * step + i) * dtype(10.0 ** (i - step))
        opt.step()
        for k, (w, v) in mine.items():
            wd_k = wd if (k == "W" or decay_biases) else 0.0
            shim.sgd_momentum_host(w, model.layer.grads[k], v, m, wd_k * lr, lr)
            _bitwise(v, opt.velocity[f"l.{k}"])
            _bitwise(w, model.layer.params[k])


@pytest.mark.parametrize("multi", [True, False], ids=["multi-tensor", "per-array"])
def test_momentum_sgd_on_the_gpu_path_with_the_fused_parameter_memory(shim, monkeypatch, multi):
    """The fused model's tower parameters are row blocks of one array per layer: with the GPU path forced onto the
    host shim, MomentumSGD updates all 16 arrays with one multi-tensor kernel (MULTI_TENSOR) or one kernel per such
    array (velocities laid out alike, gradients the row blocks backward hands out), and the parameters and
    velocities equal the NumPy path's bit for bit."""
    from cpnet import backend, optim
    from cpnet.model import build_model, make_config

    cfg = make_config("alexnet-small", 7, 32, seed=1)
    models = [build_model(cfg, placement=[backend.HOST] * 2, dtype=np.float32, fuse=True, tower_threads=False)
              for _ in range(2)]
    calls = []

    def kernel(*args):
        calls.append(("one", args[0].shape))
        shim.sgd_momentum_host(*args)

    def multi_kernel(ws, gs, vs, decays, m, wd_lr, lr, cache=None):
        calls.append(("multi", len(ws)))
        shim.sgd_momentum_multi_host(ws, gs, vs, decays, m, wd_lr, lr, cache)

    monkeypatch.setattr(optim, "MULTI_TENSOR", multi)
    monkeypatch.setattr(optim, "is_gpu_array", lambda a: isinstance(a, np.ndarray))
    monkeypatch.setattr(optim.kernels, "sgd_momentum_gpu", kernel)
    monkeypatch.setattr(optim.kernels, "sgd_momentum_multi_gpu", multi_kernel)
    fast = optim.MomentumSGD(models[0], lr=0.01)
    monkeypatch.setattr(optim, "is_gpu_array", lambda a: False)
    plain = optim.MomentumSGD(models[1], lr=0.01)
    for opt in (fast, plain):  # W and b of conv1-5, fc6, fc7 (both towers' rows), then fc8's W and b
        assert [len(blk.parts) for blk, _ in opt._blocks] == [2] * 14 + [1] * 2
    rng = np.random.default_rng(0)
    for _ in range(2):
        grads = {n: rng.standard_normal(w.shape).astype(np.float32) for n, w in models[0].params().items()}
        for model in models:
            for lname, layer in model.fused_net.named():  # as backward leaves them: one array, then row blocks
                for key in layer.params:
                    layer.grads[key] = np.concatenate([grads[f"t{t}.{lname}.{key}"] for t in range(2)])
            model.fused_net.grads_to_towers()
            for key in model.fc8.params:
                model.fc8.grads[key] = grads[f"fc8.{key}"]
        monkeypatch.setattr(optim, "is_gpu_array", lambda a: isinstance(a, np.ndarray))
        calls.clear()
        fast.step()
        # one launch for the 14 arrays of tower blocks and fc8's W and b, or one per array
        assert calls == ([("multi", 16)] if multi else [("one", blk.param.shape) for blk, _ in fast._blocks])
        monkeypatch.setattr(optim, "is_gpu_array", lambda a: False)
        calls.clear()
        plain.step()
        assert not calls  # the NumPy path
    want = models[1].params()
    for name, got in models[0].params().items():
        _bitwise(got, want[name])
        _bitwise(fast.velocity[name], plain.velocity[name])
    v0, v1 = fast.velocity["t0.conv1.W"], fast.velocity["t1.conv1.W"]
    assert v0.base is not None and v0.base is v1.base and v0.base.size == v0.size + v1.size
    # Gradients laid out otherwise (here: separate arrays per tower): each parameter on its own, all in the one
    # multi-tensor launch (or one kernel per parameter).
    monkeypatch.setattr(optim, "is_gpu_array", lambda a: isinstance(a, np.ndarray))
    for name, layer, key, _t in models[0].param_slots():
        layer.grads[key] = np.zeros_like(layer.params[key])
    calls.clear()
    fast.step()
    n = len(models[0].param_slots())
    assert calls == [("multi", n)] if multi else len(calls) == n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.5, 0.1, 0.9, 1e-3])
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=str)
def test_dropout_forward(shim, shape, p, dtype):
    """y and mask bit for bit equal to the NumPy path (counter_uniform, then ops.dropout_with_mask), from counter 0
    and from a global row offset."""
    from cpnet.ops import counter_keys, counter_uniform, dropout_with_mask

    x = with_specials(shape, dtype, 22)
    for seed, step, first in ((0, 0, 0), (9, 3, 0), (2**31 + 5, 10**6, 0), (9, 3, 7 * 2**29 + 3)):  # wraps 2^32
        keep = counter_uniform(np, shape, seed, step, dtype, first) >= dtype(p)
        with np.errstate(invalid="ignore"):  # inf * 0
            y_ref, mask_ref = dropout_with_mask(x, p, keep)
        y, mask = shim.dropout_forward_host(x, p, *counter_keys(seed, step), first=first)
        _bitwise(mask, mask_ref)
        _bitwise(y, y_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=str)
def test_relu_forward(shim, shape, dtype):
    from cpnet.ops import relu_forward

    x = with_specials(shape, dtype, 23)
    y_ref, cache = relu_forward(x)
    y = shim.relu_forward_host(x)
    _bitwise(y, y_ref)
    _bitwise(y, np.where((x > 0) | np.isnan(x), x, dtype(0)))  # NaN stays NaN, -0.0 gives +0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=str)
def test_relu_backward(shim, shape, dtype):
    from cpnet.ops import relu_backward, relu_forward

    x = with_specials(shape, dtype, 24)
    y, cache = relu_forward(x)
    dy = with_specials(shape, dtype, 25)[..., ::-1].copy()
    dx = shim.relu_backward_host(y, dy)
    _bitwise(dx, relu_backward(dy, cache))
    with np.errstate(invalid="ignore"):  # inf * 0
        _bitwise(dx, dy * (x > 0).astype(dtype))


# bf16 (--precision bf16): the kernels built with T = bf16 (bf16.cuh, the stand-in with the GPU's own rounding),
# F = float, against cpnet.precision's NumPy conversions around the float32 NumPy paths: widen the inputs, compute
# in float32, round the outputs. Copies and maxima are exact; sums and LRN may differ from NumPy's float32 by its
# rounding, which moves a stored bf16 value by at most one unit in its last place (2^-7 relative).

BF16_RTOL = 2.0 ** -7


def _bf16(x):
    from cpnet.precision import to_bf16

    return to_bf16(x)


def _f32(b):
    from cpnet.precision import from_bf16

    assert b.dtype == kernels.BF16, b.dtype
    return from_bf16(b)


def _bf16_close(actual, expected32):
    """bf16 `actual` within one bf16 unit of the float32 reference (exact where the reference rounds exactly)."""
    np.testing.assert_allclose(_f32(actual), expected32, rtol=BF16_RTOL, atol=1e-30)


@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=str)
def test_narrow_and_widen(shim, shape):
    """float32 -> bf16 rounds to nearest, ties to even, bit for bit as cpnet.precision.to_bf16 (NaN stays NaN,
    infinities stay, overflow goes to inf, subnormals and both zeros keep their bits); widening is exact."""
    x = with_specials(shape, np.float32, 40) * np.float32(1e3)
    b = shim.narrow_host(x)
    assert b.dtype == kernels.BF16 and b.shape == x.shape
    np.testing.assert_array_equal(b, _bf16(x))
    np.testing.assert_array_equal(shim.widen_host(b), _f32(b))
    np.testing.assert_array_equal(shim.narrow_host(shim.widen_host(b)), b)  # bf16 -> float32 -> bf16 is exact
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.4e38, -3.4e38, 1e-40, -0.0, 2**-133], np.float32)
    want = np.array([1.0, 1 + 2**-6, -1.0, np.inf, -np.inf, 1e-40, -0.0, 2**-133], np.float32)
    got = shim.widen_host(shim.narrow_host(ties))
    np.testing.assert_allclose(got[[0, 1, 2, 3, 4, 6, 7]], want[[0, 1, 2, 3, 4, 6, 7]], rtol=0)
    assert abs(got[5] - 1e-40) <= 2**-133 and np.signbit(got[6])  # a subnormal keeps 7 bits; -0 stays -0
    with pytest.raises(ValueError, match="float32 -> bf16"):
        shim.narrow_host(x.astype(np.float64))


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_bf16_im2col_col2im(shim, case):
    N, C, H, W, kh, kw, sy, sx, ph, pw = case
    x = _bf16(random_array((N, C, H, W), np.float32, seed=41))
    col = shim.im2col_host(x, kh, kw, sy, sx, ph, pw)
    assert col.dtype == kernels.BF16
    np.testing.assert_array_equal(col, _ops("conv", "im2col_cpu")(x, kh, kw, sy, sx, ph, pw))  # a copy: exact
    c = _bf16(random_array(col.shape, np.float32, seed=42))
    dx = shim.col2im_host(c, x.shape, kh, kw, sy, sx, ph, pw)
    _bf16_close(dx, _ops("conv", "col2im_cpu")(_f32(c), x.shape, kh, kw, sy, sx, ph, pw))


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_bf16_maxpool(shim, case):
    N, C, H, W, k, s, p = case
    x = _bf16(np.round(random_array((N, C, H, W), np.float32, seed=43), 1))  # ties in bf16
    y, arg = shim.maxpool_forward_host(x, k, s, p)
    y_ref, arg_ref = _ops("pool", "maxpool_forward_cpu")(_f32(x), k, s, p)
    np.testing.assert_array_equal(_f32(y), y_ref)
    np.testing.assert_array_equal(arg, arg_ref)
    dy = _bf16(random_array(y.shape, np.float32, seed=44))
    dx = shim.maxpool_backward_host(dy, arg, x.shape, k, s, p)
    _bf16_close(dx, _ops("pool", "maxpool_backward_cpu")(_f32(dy), arg, x.shape, k, s, p))


@pytest.mark.parametrize("params", LRN_PARAMS, ids=str)
@pytest.mark.parametrize("case", LRN_CASES, ids=str)
def test_bf16_lrn(shim, case, params):
    """bf16 x, y, dy, dx; the scale (cached for backward) and all arithmetic in float32."""
    N, C, H, W, size = case
    k, alpha, beta = params
    x = _bf16(random_array((N, C, H, W), np.float32, seed=45) * np.float32(3))
    y, scale = shim.lrn_forward_host(x, size, k, alpha, beta)
    assert y.dtype == kernels.BF16 and scale.dtype == np.float32
    y_ref, scale_ref = _ops("lrn", "lrn_forward_cpu")(_f32(x), size, k, alpha, beta)
    _close(scale, scale_ref, np.float32)
    _bf16_close(y, y_ref)
    dy = _bf16(random_array(x.shape, np.float32, seed=46))
    dx = shim.lrn_backward_host(x, y, scale, dy, size, alpha, beta)
    _bf16_close(dx, _ops("lrn", "lrn_backward_cpu")(_f32(x), _f32(y), scale, _f32(dy), size, alpha, beta))
    with pytest.raises(ValueError, match="scale of dtype float32"):
        shim.lrn_backward_host(x, y, y, dy, size, alpha, beta)  # a bf16 scale


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_bf16_dropout_and_relu(shim, p):
    """Dropout's mask is the float32 scale rounded to bf16 (exact for p = 0.5) and y = x * that mask, rounded; ReLU
    forward and backward are exact in bf16."""
    from cpnet.ops import counter_keys, counter_uniform

    x = _bf16(with_specials((3, 41), np.float32, 47))
    y, mask = shim.dropout_forward_host(x, p, *counter_keys(5, 9), 11)
    keep = counter_uniform(np, x.shape, 5, 9, np.float32, 11) >= np.float32(p)
    mask_ref = _bf16(np.where(keep, np.float32(1 / (1 - p)), np.float32(0)))
    np.testing.assert_array_equal(mask, mask_ref)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(y, _bf16(_f32(x) * _f32(mask_ref)))
    r = shim.relu_forward_host(x)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(_f32(r), np.maximum(_f32(x), np.float32(0)))
    dy = _bf16(random_array(x.shape, np.float32, 48))
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(shim.relu_backward_host(r, dy), _bf16(_f32(dy) * (_f32(r) > 0)))


# The convolution's output layout with bias and ReLU (layout.cu), against the array path's two passes.

LAYOUT_CASES = [(2, 3, 1, 4, 5), (1, 4, 2, 3, 3), (3, 6, 3, 1, 1), (2, 70, 2, 5, 7)]  # (N, F, G, Ho, Wo)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
def test_conv_layout_forward(shim, case, dtype):
    """relu(ym + b) into NCHW equals ops.conv's layout pass then ReLU bit for bit (NaN, -0.0 and inf included);
    without relu, the layout pass alone."""
    from cpnet.ops import relu_forward
    from cpnet.ops.conv import _to_nchw

    N, F, G, Ho, Wo = case
    ym = with_specials((G, F // G, N * Ho * Wo), dtype, 60)
    b = random_array((F,), dtype, 61)
    for relu in (True, False):
        y = np.empty((N, F, Ho, Wo), dtype)
        assert shim.conv_layout_forward_host(ym, b, y, relu=relu) is y
        want = _to_nchw(np, ym, b, np.empty_like(y))
        _bitwise(y, relu_forward(want)[0] if relu else want)


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
def test_bf16_conv_layout(shim, case):
    """bf16 y from the float32 GEMM output and the float32 bias: relu(ym + b) rounded once, as the host path's
    float32 layout pass then the rounding then ReLU; backward in bf16 exact (a mask)."""
    from cpnet.ops import relu_forward
    from cpnet.ops.conv import _to_nchw

    N, F, G, Ho, Wo = case
    ym = with_specials((G, F // G, N * Ho * Wo), np.float32, 64)
    b = random_array((F,), np.float32, 65)
    for relu in (True, False):
        y = np.empty((N, F, Ho, Wo), kernels.BF16)
        shim.conv_layout_forward_host(ym, b, y, relu=relu)
        want = _bf16(_to_nchw(np, ym, b, np.empty(y.shape, np.float32)))
        np.testing.assert_array_equal(y, relu_forward(want)[0] if relu else want)
    dy = _bf16(random_array(y.shape, np.float32, 66))
    d = shim.conv_layout_backward_host(dy, y, G, relu=True)
    src = _bf16(_f32(dy) * (_f32(y) > 0))
    np.testing.assert_array_equal(d, np.ascontiguousarray(src.transpose(1, 0, 2, 3)).reshape(G, F // G, -1))
    with pytest.raises(ValueError, match="ym and b of dtype float32 for y of dtype uint16"):
        shim.conv_layout_forward_host(_bf16(ym), b, y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
def test_conv_layout_backward(shim, case, dtype):
    """dy * (y > 0) in the GEMM's (G, F/G, N*Ho*Wo) layout equals ReLU backward then the layout copy bit for bit."""
    from cpnet.ops import relu_backward, relu_forward

    N, F, G, Ho, Wo = case
    y, _ = relu_forward(with_specials((N, F, Ho, Wo), dtype, 62))
    dy = with_specials((N, F, Ho, Wo), dtype, 63)[..., ::-1]  # strided: made contiguous first
    for relu in (True, False):
        d = shim.conv_layout_backward_host(dy, y, G, relu=relu)
        src = relu_backward(np.ascontiguousarray(dy), y) if relu else dy
        _bitwise(d, np.ascontiguousarray(src.transpose(1, 0, 2, 3)).reshape(G, F // G, N * Ho * Wo))
    with pytest.raises(ValueError, match="expected ym of shape"):
        shim.conv_layout_forward_host(np.zeros((G, F // G, 1), dtype), np.zeros(F, dtype), y)
    with pytest.raises(ValueError, match="expected b of shape"):
        shim.conv_layout_forward_host(np.zeros((G, F // G, N * Ho * Wo), dtype), np.zeros(F + 1, dtype), y)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_with_relu_is_conv_then_relu(groups):
    """conv2d_forward(relu=True) and its backward equal the convolution followed by a separate ReLU, bit for bit
    (the host path; the GPU path's layout kernels are compared with it in tests/test_launch_count.py)."""
    from cpnet import ops

    rng = np.random.default_rng(64)
    x = rng.standard_normal((2, 4, 7, 6)).astype(np.float32)
    W = rng.standard_normal((6, 4 // groups, 3, 3)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    y, cache = ops.conv2d_forward(x, W, b, 1, 1, groups, relu=True)
    yc, cc = ops.conv2d_forward(x, W, b, 1, 1, groups)
    yr, cr = ops.relu_forward(yc)
    _bitwise(y, yr)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    for got, want in zip(ops.conv2d_backward(dy, cache), ops.conv2d_backward(ops.relu_backward(dy, cr), cc)):
        _bitwise(got, want)


# Fewer launches: the multi-tensor momentum update, the fused towers' dropout, softmax cross-entropy.


def _arrays_for_multi(dtype, shapes, seed):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [None, 40, 7])
def test_sgd_momentum_multi(shim, dtype, chunk, monkeypatch):
    """One launch over many arrays (some decayed, an empty one, sizes off the blocks) equals one sgd_momentum
    launch per array bit for bit, also when the total passes ELEMENTWISE_CHUNK (several launches; an array
    larger than a chunk goes alone); a second call with the same arrays reuses the cached address table."""
    if chunk is not None:
        monkeypatch.setattr(kernels, "ELEMENTWISE_CHUNK", chunk)
    shapes = [(3, 11), (5,), (0,), (4, 2, 3), (1,), (37,)]
    decays = [True, False, True, True, False, True]
    ws, gs, vs = _arrays_for_multi(dtype, shapes, 40)
    ref_w, ref_v = [w.copy() for w in ws], [v.copy() for v in vs]
    cache = {}
    for step in range(2):
        shim.sgd_momentum_multi_host(ws, gs, vs, decays, 0.9, 5e-3, 0.1, cache)
        for w, g, v, d in zip(ref_w, gs, ref_v, decays):
            shim.sgd_momentum_host(w, g, v, 0.9, 5e-3 if d else 0.0, 0.1)
        for a, b in zip(ws + vs, ref_w + ref_v):
            _bitwise(a, b)
        if step == 0:
            tables = {k: v[1] for k, v in cache.items()}
    assert cache and all(cache[k][1] is t for k, t in tables.items())  # no new table for the same addresses
    # table launches: sizes 33, 5, 0, 24, 1, 37 pack into [33 5] [24 1] [37] within 40; within 7 only [5 1] shares
    # one, the larger arrays go alone to sgd_momentum_kernel
    assert len(cache) == {None: 1, 40: 3, 7: 1}[chunk]


def test_sgd_momentum_multi_checks_its_inputs(shim):
    (w, w2), (g, g2), (v, v2) = _arrays_for_multi(np.float32, [(4, 6), (3,)], 41)
    with pytest.raises(ValueError, match="g must be C-contiguous"):
        shim.sgd_momentum_multi_host([w], [np.asfortranarray(g)], [v], [True], 0.9, 0.0, 0.1)
    with pytest.raises(ValueError, match="expected g of w's shape"):
        shim.sgd_momentum_multi_host([w, w2], [g2, g], [v, v2], [True, True], 0.9, 0.0, 0.1)
    with pytest.raises(ValueError, match="as many"):
        shim.sgd_momentum_multi_host([w], [g], [v], [True, False], 0.9, 0.0, 0.1)
    with pytest.raises(ValueError, match="share one dtype"):
        shim.sgd_momentum_multi_host([w, w2.astype(np.float64)], [g, g2], [v, v2], [True, True], 0.9, 0.0, 0.1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (3, 10), (5, 66), (2, 2 * 33)], ids=str)
def test_dropout_towers_forward(shim, shape, dtype):
    """y and mask of the (rows, 2*units) kernel equal each half's own dropout_forward (NumPy path) bit for bit,
    from row offset 0 and from one whose counters wrap 2^32."""
    from cpnet.ops import counter_keys, dropout_forward

    x = with_specials(shape, dtype, 42)
    units = shape[1] // 2
    for step, offset, p in ((0, 0, 0.5), (7, 3, 0.1), (10**6, 2**32 // units - 1, 0.9)):
        keys = [counter_keys(seed, step) for seed in (11, 12)]
        y, mask = shim.dropout_towers_forward_host(x, p, keys[0], keys[1], first=offset * units)
        with np.errstate(invalid="ignore"):  # inf * 0
            halves = [dropout_forward(np.ascontiguousarray(x[:, t * units:(t + 1) * units]), p, 11 + t, step, True,
                                      offset) for t in range(2)]
        _bitwise(mask, np.concatenate([m for _, m in halves], axis=1))
        _bitwise(y, np.concatenate([h for h, _ in halves], axis=1))
    with pytest.raises(ValueError, match="rows, 2"):
        shim.dropout_towers_forward_host(np.zeros((2, 3), dtype), 0.5, (1, 2), (3, 4))


XENT_CASES = [(1, 1), (3, 7), (4, 10), (2, 1000), (33, 5)]  # (N, K)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", XENT_CASES, ids=str)
def test_softmax_xent_forward(shim, case, dtype):
    """The row losses sum to the NumPy path's loss and p is its softmax (float rounding: exp and log differ)."""
    from cpnet.ops import softmax_cross_entropy_forward

    N, K = case
    rng = np.random.default_rng(N * K)
    z = (rng.standard_normal((N, K)) * 4).astype(dtype)
    z[0, 0] = 80.0  # exp(80) overflows float32 without the shift by the row maximum
    labels = rng.integers(0, K, N)
    row_loss, p, lab32 = shim.softmax_xent_forward_host(z, labels)
    loss, (p_ref, _) = softmax_cross_entropy_forward(z, labels)
    assert row_loss.dtype == dtype and p.dtype == dtype and lab32.dtype == np.int32
    _close(p, p_ref, dtype)
    _close(row_loss.sum(), loss, dtype)
    logp = np.log(p_ref.astype(np.float64))
    _close(row_loss, -logp[np.arange(N), labels] / N, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_xent_forward_bad_labels_and_nan(shim, dtype):
    """A label outside [0, K) gives a NaN row (the NaN guard then stops the run), not a read out of bounds;
    a NaN logit makes its row NaN."""
    z = random_array((4, 5), dtype, 43)
    z[3, 2] = np.nan
    row_loss, p, _ = shim.softmax_xent_forward_host(z, np.array([0, 5, -1, 1]))
    assert np.isfinite(row_loss[0]) and np.isnan(row_loss[1:]).all()
    assert np.isfinite(p[:3]).all() and np.isnan(p[3]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", XENT_CASES, ids=str)
def test_softmax_xent_backward(shim, case, dtype):
    """From the same p, the gradient equals the NumPy path's bit for bit (one subtraction, one division)."""
    from cpnet.ops import softmax_cross_entropy_backward

    N, K = case
    rng = np.random.default_rng(N + K)
    p = rng.random((N, K)).astype(dtype)
    labels = rng.integers(0, K, N)
    dz = shim.softmax_xent_backward_host(p, labels.astype(np.int32))
    _bitwise(dz, softmax_cross_entropy_backward((p, labels)))


# (stored size S, crop C, pad, flip, lighting, scale)
AUGMENT_CASES = [
    (12, 9, 0, True, 0.1, 1.0),      # crop inside the image
    (17, 13, 3, True, 0.1, 1 / 64),  # odd sizes, a --pad border on every side, the input scale
    (9, 9, 2, True, 0.5, 0.3),       # the whole image shifted (crop = S), windows always partly outside
    (11, 4, 0, False, 0.0, 1.0),     # no flip, no lighting (a zero shift)
    (7, 6, 5, True, 0.1, 2.0),       # pad nearly the crop: windows mostly in the border
    (8, 11, 2, True, 0.1, 1.0),      # a crop larger than the stored image (up to 2 x pad beyond it)
]


def _augment_data(S, B=5, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (B + 2, S, S, 3), dtype=np.uint8)
    mean = (rng.random((S, S, 3)) * 255).astype(np.float32)
    eigval = (rng.random(3) * 0.2).astype(np.float32)
    eigvec = rng.standard_normal((3, 3)).astype(np.float32)
    rows = rng.permutation(B + 2)[:B]
    return images, np.ascontiguousarray(mean.transpose(2, 0, 1)), eigval, eigvec, rows


def _expected_input(want, dtype):
    """The host loader's float32 batch as the model's input of `dtype` (bf16: precision.to_bf16's rounding)."""
    from cpnet import precision

    return precision.to_bf16(want) if np.dtype(dtype) == kernels.BF16 else want.astype(dtype)


@pytest.mark.parametrize("dtype", BUILDS)
@pytest.mark.parametrize("erase", [0.0, 1.0])
@pytest.mark.parametrize("case", AUGMENT_CASES, ids=str)
def test_augment(shim, case, dtype, erase):
    """augment.cu against data/augment.py: the training batch from the raw form (windows, and whole images) is
    the float32 loader's batch bit for bit (widened for float64, rounded as to_bf16 rounds it for bf16), with
    random erasing's boxes (erase 1: one in every crop) or without."""
    from cpnet.data import augment

    S, C, pad, flip, lighting, scale = case
    B = 5
    images, mean_chw, eigval, eigvec, rows = _augment_data(S, B, seed=S + C)
    params = augment.train_params(3, 1, 2, B, S, C, lighting, flip, pad)
    assert (params[0] < 0).any() or pad == 0  # the cases do reach the border
    boxes = augment.erase_boxes(3, 1, 2, B, C, erase) if erase else None
    want = augment.train_batch_into(np.empty((B, 3, C, C), np.float32), images, rows, params, mean_chw, eigval,
                                    eigvec, scale, boxes)
    if erase:  # every crop has a box, and it is the mean colour, 0
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
        for k, (y0, x0, y1, x1) in enumerate(boxes):
            assert not want[k, :, y0:y1, x0:x1].any()
    for windowed in (True, False):
        lay = augment.RawLayout(B, 1, C, S, windowed)
        buf = np.full(lay.nbytes, 77, np.uint8)  # what the raw form does not write must not matter
        augment.train_raw_into(buf, lay, images, rows, params, eigval, eigvec, boxes)
        table, shift, pixels = lay.parts(buf)
        got = shim.augment_host(pixels, table, shift, mean_chw, dtype, C, windowed, scale)
        assert got.dtype == np.dtype(dtype) and got.shape == (B, 3, C, C)
        want_in = _expected_input(want, dtype)
        np.testing.assert_array_equal(got if want_in.itemsize == 2 else float_bits(got),
                                      want_in if want_in.itemsize == 2 else float_bits(want_in))
        if np.dtype(dtype) == np.float32:  # the NumPy expansion of the same buffer (a host model's fallback)
            batch = augment.RawBatch(buf, B, lay, mean_chw, scale, train=True)
            np.testing.assert_array_equal(float_bits(batch.expand()), float_bits(want))
            part = shim.augment_host(pixels, table, shift, mean_chw, dtype, C, windowed, scale, first=2, n=2)
            np.testing.assert_array_equal(float_bits(part), float_bits(want[2:4]))
            np.testing.assert_array_equal(float_bits(batch[1:4].expand()), float_bits(want[1:4]))


@pytest.mark.parametrize("views", ["center", "ten"])
def test_augment_evaluation_views(shim, views):
    """The evaluation views (centre, and the ten of section 4.1) from their raw form: windows or whole images,
    whichever RawLayout.choose picks, and the other one, each equal to eval_batch_into's bits."""
    from cpnet.data import augment

    S, C, k = 13, 8, 3
    images, mean_chw, _, _, rows = _augment_data(S, k, seed=4)
    offsets = augment.view_offsets(S, C, views)
    V = len(offsets)
    want = augment.eval_batch_into(np.empty((k, V, 3, C, C), np.float32), images, rows, offsets, mean_chw, 0.25)
    chosen = augment.RawLayout.choose(k, V, C, S)
    assert chosen.windowed == (views == "center")  # 10 * 8^2 > 13^2: the whole image once beats ten windows
    for windowed in (True, False):
        lay = augment.RawLayout(k * V, V, C, S, windowed)
        buf = np.zeros(lay.nbytes, np.uint8)
        augment.eval_raw_into(buf, lay, images, rows, offsets)
        table, shift, pixels = lay.parts(buf)
        got = shim.augment_host(pixels, table, shift, mean_chw, np.float32, C, windowed, 0.25)
        np.testing.assert_array_equal(float_bits(got.reshape(want.shape)), float_bits(want))
        batch = augment.RawBatch(buf, k, lay, mean_chw, 0.25, train=False)
        assert batch.shape == want.shape and batch.crops().shape == (k * V, 3, C, C)
        np.testing.assert_array_equal(float_bits(batch.expand()), float_bits(want))


def test_augment_checks_its_arguments(shim):
    from cpnet.data import augment

    images, mean_chw, eigval, eigvec, rows = _augment_data(9, 2)
    lay = augment.RawLayout(2, 1, 5, 9, True)
    buf = np.zeros(lay.nbytes, np.uint8)
    table, shift, pixels = lay.parts(buf)
    with pytest.raises(ValueError, match="src images of 5 px, expected 9"):
        shim.augment_host(pixels, table, shift, mean_chw, np.float32, 5, False, 1.0)
    with pytest.raises(ValueError, match="mean must be C-contiguous float32"):
        shim.augment_host(pixels, table, shift, mean_chw.astype(np.float64), np.float32, 5, True, 1.0)
    with pytest.raises(ValueError, match="outside the table"):
        shim.augment_host(pixels, table, shift, mean_chw, np.float32, 5, True, 1.0, first=1, n=2)
    with pytest.raises(ValueError, match="output"):
        shim.augment_host(pixels, table, shift, mean_chw, np.int32, 5, True, 1.0)


KERNEL_TESTS = {
    "im2col_kernel": test_im2col,
    "col2im_kernel": test_col2im,
    "maxpool_forward_kernel": test_maxpool_forward,
    "maxpool_backward_kernel": test_maxpool_backward,
    "lrn_forward_kernel": test_lrn_forward,
    "lrn_backward_kernel": test_lrn_backward,
    "lrn_pool_forward_kernel": test_lrn_pool_forward,
    "lrn_pool_backward_kernel": test_lrn_pool_backward,
    "sgd_momentum_kernel": test_sgd_momentum,
    "dropout_forward_kernel": test_dropout_forward,
    "relu_forward_kernel": test_relu_forward,
    "relu_backward_kernel": test_relu_backward,
    "sgd_momentum_multi_kernel": test_sgd_momentum_multi,
    "dropout_towers_forward_kernel": test_dropout_towers_forward,
    "softmax_xent_forward_kernel": test_softmax_xent_forward,
    "softmax_xent_backward_kernel": test_softmax_xent_backward,
    "conv_layout_forward_kernel": test_conv_layout_forward,
    "augment_kernel": test_augment,
    "conv_layout_backward_kernel": test_conv_layout_backward,
    "narrow_kernel": test_narrow_and_widen,
    "widen_kernel": test_narrow_and_widen,
}


# ------------------------------------------------------------------------------------------------------------
# The kernel inventory, launch shapes, and the compilers.


def test_every_kernel_has_a_host_test():
    cu_files = sorted(p.name for p in kernels.KERNEL_DIR.glob("*.cu"))
    assert cu_files == sorted(kernels.SOURCES), "a .cu file is missing from cpnet.kernels.SOURCES"
    for filename in kernels.SOURCES:
        assert kernels.parse_kernels(kernels.read_source(filename)), f"{filename} has no extern \"C\" kernel"
    names = kernels.list_kernels()
    missing = sorted(set(names) - set(KERNEL_TESTS))
    assert not missing, f"kernels without a host test (add them to KERNEL_TESTS): {missing}"
    stale = sorted(set(KERNEL_TESTS) - set(names))
    assert not stale, f"KERNEL_TESTS names kernels that no longer exist: {stale}"
    for test in KERNEL_TESTS.values():
        assert test.__name__.startswith("test_") and globals()[test.__name__] is test


def test_parse_kernels_reads_signatures_and_skips_comments():
    src = """
    // extern "C" __global__ void commented_out(int a)
    /* extern "C" __global__ void also_commented(int a) */
    extern "C" __global__ void k1(const T* __restrict__ x, int* arg, int n, T alpha) { }
    extern "C"
    __global__ void k2(T *y) { }
    """
    found = kernels.parse_kernels(src)
    assert [k.name for k in found] == ["k1", "k2"]
    assert [p.kind for p in found[0].params] == ["ptr_T", "ptr_int", "int", "T"]
    assert [(p.name, p.kind) for p in found[1].params] == [("y", "ptr_T")]
    with pytest.raises(ValueError, match="unsigned"):
        kernels.parse_kernels('extern "C" __global__ void k3(unsigned n) { }')


def test_sources_keep_the_kernel_rules():
    """No includes (NVRTC compiles them without a search path), no shared memory, no atomics, T left open."""
    for filename in kernels.SOURCES:
        text = kernels.read_source(filename)
        code = re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)
        for banned in ("#include", "__shared__", "__syncthreads", "atomic", "#define T", "typedef"):
            assert banned not in code, f"{filename} uses {banned}"
        assert kernels.kernel_source(filename, np.float64).startswith("typedef double T;\n")


_LAUNCHES = [(1, 1), (7, 3), (32, 1), (64, 10**6)]  # one thread; odd shape; one block; more threads than elements


def _run_all_kernels(shim):
    """Every kernel once, on small odd shapes; returns their outputs in a fixed order."""
    x = random_array((2, 5, 6, 7), np.float32, seed=10)
    dy_pool = random_array((2, 5, 2, 3), np.float32, seed=11)
    dy = random_array(x.shape, np.float32, seed=12)
    col = shim.im2col_host(x, 3, 2, 2, 1, 1, 1)
    y, arg = shim.maxpool_forward_host(x, 3, 2, 0)
    ly, ls = shim.lrn_forward_host(x, 5, 2.0, 0.1, 0.75)
    fy, off = shim.lrn_pool_forward_host(x, 5, 2.0, 0.1, 0.75, 3, 2, 1)
    return [
        fy,
        off,
        shim.lrn_pool_backward_host(x, random_array(fy.shape, np.float32, seed=13), off, 5, 2.0, 0.1, 0.75, 3, 2, 1),
        col,
        shim.col2im_host(col, x.shape, 3, 2, 2, 1, 1, 1),
        y,
        arg,
        shim.maxpool_backward_host(dy_pool, arg, x.shape, 3, 2, 0),
        ly,
        ls,
        shim.lrn_backward_host(x, ly, ls, dy, 5, 0.1, 0.75),
    ]


@pytest.mark.parametrize("launch", _LAUNCHES, ids=str)
def test_results_do_not_depend_on_the_launch_shape(shim, launch):
    """Each output element is one thread's work in a fixed order: any grid gives bit-identical results."""
    expected = _run_all_kernels(shim)
    block, grid_cap = launch
    with shim.launch_config(block=block, grid_cap=grid_cap):
        got = _run_all_kernels(shim)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_the_64_bit_index_path_gives_the_same_results(shim, monkeypatch):
    """Arrays of 2^31 elements or more switch the kernels to 64-bit index arithmetic (`wide`); with the threshold
    lowered to 0 the small test arrays take that path, and every output is bit-identical to the 32-bit path's."""
    assert kernels._wide(np.empty(3), np.empty(5)) == 0
    expected = _run_all_kernels(shim)
    monkeypatch.setattr(kernels, "INDEX32_MAX", 4)
    assert kernels._wide(np.empty(3), np.empty(5)) == 1
    monkeypatch.setattr(kernels, "INDEX32_MAX", 0)
    got = _run_all_kernels(shim)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def _run_elementwise_kernels(shim):
    """Every elementwise kernel once on an odd size; returns the outputs in a fixed order."""
    x = with_specials((3, 37), np.float32, 26)
    dy = random_array(x.shape, np.float32, 27)
    w, v = random_array(x.shape, np.float32, 28), random_array(x.shape, np.float32, 29)
    shim.sgd_momentum_host(w, dy, v, 0.9, 5e-6, 0.01)
    y = shim.relu_forward_host(x)
    return [w, v, *shim.dropout_forward_host(x, 0.5, 12345, 2**32 - 7), *shim.dropout_forward_host(x, 0.5, 1, 2, 2**32 - 50),
            y, shim.relu_backward_host(y, dy)]


@pytest.mark.parametrize("launch", _LAUNCHES, ids=str)
def test_elementwise_results_do_not_depend_on_the_launch_shape(shim, launch):
    expected = _run_elementwise_kernels(shim)
    with shim.launch_config(*launch):
        got = _run_elementwise_kernels(shim)
    for a, b in zip(got, expected):
        _bitwise(a, b)


def test_elementwise_kernels_in_chunks_give_the_same_results(shim, monkeypatch):
    """Arrays longer than ELEMENTWISE_CHUNK run in several launches (dropout's counter continues across them)."""
    expected = _run_elementwise_kernels(shim)
    for chunk in (1, 5, 32, 110):
        monkeypatch.setattr(kernels, "ELEMENTWISE_CHUNK", chunk)
        for a, b in zip(_run_elementwise_kernels(shim), expected):
            _bitwise(a, b)


def test_elementwise_functions_check_their_inputs(shim):
    assert kernels._bits32(2**32 - 1) == -1 and kernels._bits32(2**31) == -(2**31) and kernels._bits32(5) == 5
    w = random_array((4, 6), np.float32)
    with pytest.raises(ValueError, match="w is updated in place and must be C-contiguous"):
        shim.sgd_momentum_host(w.T, w.T.copy(), np.zeros((6, 4), np.float32), 0.9, 0.0, 0.1)
    with pytest.raises(ValueError, match="expected v of w's shape"):
        shim.sgd_momentum_host(w, w.copy(), np.zeros((4, 5), np.float32), 0.9, 0.0, 0.1)
    with pytest.raises(ValueError, match="share one dtype"):
        shim.sgd_momentum_host(w, w.astype(np.float64), np.zeros_like(w), 0.9, 0.0, 0.1)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        shim.dropout_forward_host(w, 1.0, 1, 2)
    with pytest.raises(ValueError, match="expected dy of y's shape"):
        shim.relu_backward_host(w, w[:2])
    # In place through row-block views of one array (the fused model's parameters), and g may be strided.
    full, vfull = random_array((6, 5), np.float64, 1), np.zeros((6, 5))
    ref_w, ref_v = full.copy(), vfull.copy()
    g = random_array((5, 6), np.float64, 2).T
    for rows in (slice(0, 2), slice(2, 6)):
        shim.sgd_momentum_host(full[rows], g[rows], vfull[rows], 0.9, 1e-3, 0.1)
    shim.sgd_momentum_host(ref_w, np.ascontiguousarray(g), ref_v, 0.9, 1e-3, 0.1)
    _bitwise(full, ref_w)
    _bitwise(vfull, ref_v)


class _StandInGpuArray(np.ndarray):
    """A NumPy array that passes for a CuPy array on device 0."""

    device = types.SimpleNamespace(id=0)


class _StandInCupy:
    """Just enough of cupy for cpnet.kernels' GPU path; its kernels run through the host shim."""

    ndarray = _StandInGpuArray
    cuda = types.SimpleNamespace(Device=lambda *a: types.SimpleNamespace(id=0))

    @staticmethod
    def asarray(a):
        return np.array(a).view(_StandInGpuArray)

    @staticmethod
    def ascontiguousarray(a, dtype=None):
        return np.ascontiguousarray(a, dtype=dtype).view(_StandInGpuArray)

    @staticmethod
    def empty(shape, dtype):
        return np.empty(shape, dtype=dtype).view(_StandInGpuArray)

    @staticmethod
    def empty_like(a):
        return np.empty_like(np.asarray(a)).view(_StandInGpuArray)


@pytest.fixture
def stand_in_gpu(shim, monkeypatch):
    """cupy replaced by the stand-in, whose RawModule runs the host shim and checks each launch's exact argument
    types; yields (compiled, launches): what was compiled and launched."""
    compiled, launches = [], []

    class Module:
        def __init__(self, code, options):
            self.dtype = {"float": np.float32, "double": np.float64,
                          "bf16": kernels.BF16}[re.search(r"^typedef (\w+) T;", code, re.M).group(1)]
            compiled.append((self.dtype, re.findall(r'#line 1 "(.+)"', code)[-1], tuple(options)))

        def get_function(self, name):
            def run(grid, block, args):
                kinds = [p.kind for p in kernels.kernels()[name].params]
                for kind, a in zip(kinds, args, strict=True):
                    expected = {"ptr_T": _StandInGpuArray, "ptr_F": _StandInGpuArray, "ptr_int": _StandInGpuArray,
                                "ptr_i64": _StandInGpuArray, "ptr_u8": _StandInGpuArray,
                                "ptr_f32": _StandInGpuArray, "int": np.int32, "f32": np.float32}
                    assert type(a) is expected.get(kind, kernels.compute_dtype(self.dtype).type), (name, kind, type(a))
                launches.append((name, grid, block))
                shim.launch(name, self.dtype, grid, block[0], args)

            return run

    monkeypatch.setattr(kernels.backend, "cupy_module", lambda: _StandInCupy)
    monkeypatch.setattr(kernels.backend, "raw_module", lambda code, options=(): Module(code, options))
    monkeypatch.setattr(kernels, "_modules", {})
    monkeypatch.setattr(kernels, "_functions", {})
    yield compiled, launches


def test_gpu_entry_points_with_a_stand_in_cupy(shim, stand_in_gpu):
    """The `_gpu` functions without a GPU: what they compile (once per dtype and file), the launch shape, the exact
    argument types, and the results, with cupy replaced by a stand-in whose RawModule runs the host shim."""
    compiled, launches = stand_in_gpu
    cp = _StandInCupy

    for dtype in DTYPES:
        for _ in range(2):  # the second round must reuse the compiled modules
            x = random_array((2, 3, 7, 6), dtype, seed=13)
            col = kernels.im2col_gpu(cp.asarray(x), 3, 2, 2, 1, 1, 1)
            np.testing.assert_array_equal(col, shim.im2col_host(x, 3, 2, 2, 1, 1, 1))
            np.testing.assert_array_equal(kernels.col2im_gpu(col, x.shape, 3, 2, 2, 1, 1, 1),
                                          shim.col2im_host(np.asarray(col), x.shape, 3, 2, 2, 1, 1, 1))
            y, arg = kernels.maxpool_forward_gpu(cp.asarray(x), 3, 2, 1)
            y_ref, arg_ref = shim.maxpool_forward_host(x, 3, 2, 1)
            np.testing.assert_array_equal(y, y_ref)
            np.testing.assert_array_equal(arg, arg_ref)
            dy = random_array(y.shape, dtype, seed=14)
            np.testing.assert_array_equal(kernels.maxpool_backward_gpu(cp.asarray(dy), arg, x.shape, 3, 2, 1),
                                          shim.maxpool_backward_host(dy, arg_ref, x.shape, 3, 2, 1))
            ly, ls = kernels.lrn_forward_gpu(cp.asarray(x), 4, 2.0, 0.1, 0.75)
            ly_ref, ls_ref = shim.lrn_forward_host(x, 4, 2.0, 0.1, 0.75)
            np.testing.assert_array_equal(ly, ly_ref)
            np.testing.assert_array_equal(ls, ls_ref)
            dly = random_array(x.shape, dtype, seed=15)
            np.testing.assert_array_equal(kernels.lrn_backward_gpu(cp.asarray(x), ly, ls, cp.asarray(dly), 4, 0.1, 0.75),
                                          shim.lrn_backward_host(x, ly_ref, ls_ref, dly, 4, 0.1, 0.75))
            fy, off = kernels.lrn_pool_forward_gpu(cp.asarray(x), 4, 2.0, 0.1, 0.75, 3, 2, 1)
            for a, b in zip((fy, off), shim.lrn_pool_forward_host(x, 4, 2.0, 0.1, 0.75, 3, 2, 1), strict=True):
                np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(
                kernels.lrn_pool_backward_gpu(cp.asarray(x), cp.asarray(dy), off, 4, 2.0, 0.1, 0.75, 3, 2, 1),
                shim.lrn_pool_backward_host(x, dy, np.asarray(off), 4, 2.0, 0.1, 0.75, 3, 2, 1))
            # The elementwise kernels; sgd_momentum_gpu updates its w and v in place.
            w, v, g = cp.asarray(random_array(x.shape, dtype, 16)), cp.asarray(random_array(x.shape, dtype, 17)), random_array(x.shape, dtype, 18)
            w_ref, v_ref = np.array(w), np.array(v)
            assert kernels.sgd_momentum_gpu(w, cp.asarray(g), v, 0.9, 5e-6, 0.01) is None
            shim.sgd_momentum_host(w_ref, g, v_ref, 0.9, 5e-6, 0.01)
            np.testing.assert_array_equal(w, w_ref)
            np.testing.assert_array_equal(v, v_ref)
            for a, b in zip(kernels.dropout_forward_gpu(cp.asarray(x), 0.5, 7, 2**32 - 1),
                            shim.dropout_forward_host(x, 0.5, 7, 2**32 - 1), strict=True):
                np.testing.assert_array_equal(a, b)
            ry = kernels.relu_forward_gpu(cp.asarray(x))
            np.testing.assert_array_equal(ry, shim.relu_forward_host(x))
            np.testing.assert_array_equal(kernels.relu_backward_gpu(ry, cp.asarray(dly)),
                                          shim.relu_backward_host(np.asarray(ry), dly))
            # Fewer launches: the multi-tensor update, the towers' dropout, softmax cross-entropy.
            ws = [cp.asarray(random_array(s, dtype, 30 + i)) for i, s in enumerate(((3, 4), (5,)))]
            vs = [cp.asarray(random_array(a.shape, dtype, 40 + i)) for i, a in enumerate(ws)]
            gs = [random_array(a.shape, dtype, 50 + i) for i, a in enumerate(ws)]
            ws_ref, vs_ref = [np.array(a) for a in ws], [np.array(a) for a in vs]
            assert kernels.sgd_momentum_multi_gpu(ws, [cp.asarray(g) for g in gs], vs, [True, False], 0.9, 5e-4,
                                                  0.01) is None
            shim.sgd_momentum_multi_host(ws_ref, gs, vs_ref, [True, False], 0.9, 5e-4, 0.01)
            for a, b in zip(ws + vs, ws_ref + vs_ref):
                np.testing.assert_array_equal(a, b)
            x2 = x.reshape(6, 42)
            for a, b in zip(kernels.dropout_towers_forward_gpu(cp.asarray(x2), 0.5, (1, 2), (3, 2**32 - 1), first=9),
                            shim.dropout_towers_forward_host(x2, 0.5, (1, 2), (3, 2**32 - 1), first=9), strict=True):
                np.testing.assert_array_equal(a, b)
            labels = np.arange(6) * 7
            for a, b in zip(kernels.softmax_xent_forward_gpu(cp.asarray(x2), cp.asarray(labels)),
                            shim.softmax_xent_forward_host(x2, labels), strict=True):
                np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(kernels.softmax_xent_backward_gpu(cp.asarray(x2), cp.asarray(labels)),
                                          shim.softmax_xent_backward_host(x2, labels))
            ym, bias = random_array((2, 3, 2 * 21), dtype, 55), random_array((6,), dtype, 56)
            y_nchw = kernels.conv_layout_forward_gpu(cp.asarray(ym), cp.asarray(bias), cp.empty((2, 6, 3, 7), dtype))
            np.testing.assert_array_equal(y_nchw, shim.conv_layout_forward_host(ym, bias, np.empty((2, 6, 3, 7), dtype)))
            np.testing.assert_array_equal(kernels.conv_layout_backward_gpu(y_nchw, y_nchw, 2),
                                          shim.conv_layout_backward_host(np.asarray(y_nchw), np.asarray(y_nchw), 2))
            from cpnet.data import augment as aug  # the network input from uint8 pixels

            imgs, mean_chw, ev, evec, rows = _augment_data(9, 2, seed=57)
            lay = aug.RawLayout(2, 1, 7, 9, True)
            buf = np.zeros(lay.nbytes, np.uint8)
            aug.train_raw_into(buf, lay, imgs, rows, aug.train_params(1, 0, 0, 2, 9, 7, 0.1, True, 1), ev, evec)
            table, shift, pixels = lay.parts(buf)
            np.testing.assert_array_equal(
                kernels.augment_gpu(*(cp.asarray(a) for a in (pixels, table, shift, mean_chw)), dtype, 7, True, 0.5),
                shim.augment_host(pixels, table, shift, mean_chw, dtype, 7, True, 0.5))
            if dtype == np.float32:  # the bf16 conversions (elementwise.cu built for bf16)
                b = kernels.narrow_gpu(cp.asarray(x))
                np.testing.assert_array_equal(b, shim.narrow_host(x))
                np.testing.assert_array_equal(kernels.widen_gpu(b), shim.widen_host(np.asarray(b)))

    assert sorted(compiled, key=str) == sorted(
        [(dt, f, ()) for dt in DTYPES for f in kernels.SOURCES] + [(kernels.BF16, "elementwise.cu", ())], key=str
    ), "each (dtype, file) compiles exactly once"
    assert {n for n, _, _ in launches} == set(kernels.list_kernels())
    two_d = {"im2col_kernel", "col2im_kernel", "conv_layout_forward_kernel", "conv_layout_backward_kernel",
             "augment_kernel"}  # 2-D
    # grids: x over columns (pixels), y over channels (planes)
    for name, grid, block in launches:
        assert block == (kernels.GPU_BLOCK,) and len(grid) == (2 if name in two_d else 1), (name, grid)
        assert all(1 <= g <= kernels.GPU_GRID_CAP for g in grid)
    assert ("im2col_kernel", (math.ceil(2 * 4 * 7 / 256), 3), (256,)) in launches  # N*Ho*Wo columns, C channels
    assert ("col2im_kernel", (math.ceil(7 * 6 / 256), 2 * 3), (256,)) in launches  # H*W pixels, N*C planes
    assert ("sgd_momentum_kernel", (1,), (256,)) in launches  # 2*3*7*6 = 252 elements

    with pytest.raises(TypeError, match="cupy array"):
        kernels.lrn_forward_gpu(random_array((1, 2, 2, 2), np.float32), 5, 2.0, 1e-4, 0.75)
    other_gpu = cp.asarray(random_array((1, 2, 2, 2), np.float32))
    other_gpu.device = types.SimpleNamespace(id=1)
    with pytest.raises(ValueError, match="GPU 0 and GPU 1"):
        kernels.relu_backward_gpu(cp.asarray(random_array((1, 2, 2, 2), np.float32)), other_gpu)


# The checks of shapes, dtypes and sizes inside cpnet.kernels; the ops make their own and pass check=False.
_KERNEL_CHECKS = ("_float_dtype", "out_size", "_same_shapes", "_check_pool", "_check_lrn_size", "_check_lrn_pool",
                  "_xent_check",
                  "_layout_check")


def _forbid_kernel_checks(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("a kernel-side argument check ran although the caller passed check=False")

    for name in _KERNEL_CHECKS:
        monkeypatch.setattr(kernels, name, forbidden)


def test_gpu_entry_points_skip_their_checks_when_told(shim, stand_in_gpu, monkeypatch):
    """check=False: the same results without the entry points' own argument checks (a bad argument is then the
    caller's to catch: the ops check theirs first)."""
    cp = _StandInCupy
    x = random_array((2, 3, 7, 6), np.float32, seed=21)
    checked = dict(col=kernels.im2col_gpu(cp.asarray(x), 3, 2, 2, 1, 1, 1),
                   pool=kernels.maxpool_forward_gpu(cp.asarray(x), 3, 2, 1),
                   lrn=kernels.lrn_forward_gpu(cp.asarray(x), 5, 2.0, 1e-4, 0.75),
                   drop=kernels.dropout_forward_gpu(cp.asarray(x), 0.5, 3, 4, first=7),
                   relu=kernels.relu_forward_gpu(cp.asarray(x)))
    dy = random_array(checked["pool"][0].shape, np.float32, seed=22)
    checked["dpool"] = kernels.maxpool_backward_gpu(cp.asarray(dy), checked["pool"][1], x.shape, 3, 2, 1)
    _forbid_kernel_checks(monkeypatch)
    with pytest.raises(AssertionError, match="check=False"):
        kernels.relu_forward_gpu(cp.asarray(x))  # the default still checks
    unchecked = dict(col=kernels.im2col_gpu(cp.asarray(x), 3, 2, 2, 1, 1, 1, check=False),
                     pool=kernels.maxpool_forward_gpu(cp.asarray(x), 3, 2, 1, check=False),
                     lrn=kernels.lrn_forward_gpu(cp.asarray(x), 5, 2.0, 1e-4, 0.75, check=False),
                     drop=kernels.dropout_forward_gpu(cp.asarray(x), 0.5, 3, 4, first=7, check=False),
                     relu=kernels.relu_forward_gpu(cp.asarray(x), check=False))
    unchecked["dpool"] = kernels.maxpool_backward_gpu(cp.asarray(dy), checked["pool"][1], x.shape, 3, 2, 1,
                                                      check=False)
    for key, a in checked.items():
        pairs = zip(unchecked[key], a, strict=True) if isinstance(a, tuple) else [(unchecked[key], a)]
        for u, c in pairs:
            np.testing.assert_array_equal(u, c, err_msg=key)


def test_ops_on_a_gpu_check_their_arguments_once(shim, stand_in_gpu, monkeypatch):
    """An op on GPU arrays validates its arguments itself (naming the op) and launches the kernels with
    check=False, so no argument is checked twice on the way; its results equal the NumPy path's."""
    from cpnet import ops
    from cpnet.ops import activations, conv, dropout, loss, lrn, lrnpool, pool

    def xp_of(a):
        return _StandInCupy if isinstance(a, _StandInGpuArray) else np

    for module in (activations, conv, dropout, loss, lrn, lrnpool, pool):
        monkeypatch.setattr(module, "get_array_module", xp_of)
    _forbid_kernel_checks(monkeypatch)
    cp = _StandInCupy
    x = random_array((2, 4, 9, 8), np.float32, seed=23)
    dy = random_array((2, 4, 9, 8), np.float32, seed=24)

    y, cache = ops.relu_forward(cp.asarray(x))
    y_ref, cache_ref = ops.relu_forward(x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(ops.relu_backward(cp.asarray(dy), cache), ops.relu_backward(dy, cache_ref))
    y, cache = ops.lrn_forward(cp.asarray(x), 5, 2.0, 1e-4, 0.75)
    y_ref, cache_ref = ops.lrn_forward(x, 5, 2.0, 1e-4, 0.75)
    np.testing.assert_allclose(y, y_ref, **TOL[np.float32])
    np.testing.assert_allclose(ops.lrn_backward(cp.asarray(dy), cache), ops.lrn_backward(dy, cache_ref),
                               **TOL[np.float32])
    y, cache = ops.max_pool2d_forward(cp.asarray(x), 3, 2, 0)
    y_ref, cache_ref = ops.max_pool2d_forward(x, 3, 2, 0)
    np.testing.assert_array_equal(y, y_ref)
    dyp = random_array(y_ref.shape, np.float32, seed=25)
    np.testing.assert_allclose(ops.max_pool2d_backward(cp.asarray(dyp), cache),  # overlapping windows: sum order
                               ops.max_pool2d_backward(dyp, cache_ref), **TOL[np.float32])
    y, _ = ops.dropout_forward(cp.asarray(x), 0.5, seed=3, step=2, train=True, offset=5)
    np.testing.assert_array_equal(y, ops.dropout_forward(x, 0.5, seed=3, step=2, train=True, offset=5)[0])
    x2 = x.reshape(8, 72)
    y, mask = ops.dropout_towers_forward(cp.asarray(x2), 0.5, (3, 4), step=2, train=True, offset=5)
    y_ref, mask_ref = ops.dropout_towers_forward(x2, 0.5, (3, 4), step=2, train=True, offset=5)  # the halves
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(ops.dropout_backward(cp.asarray(x2), mask), ops.dropout_backward(x2, mask_ref))
    labels = np.arange(8) % 72
    lo, cache = ops.softmax_cross_entropy_forward(cp.asarray(x2), cp.asarray(labels))
    lo_ref, cache_ref = ops.softmax_cross_entropy_forward(x2, labels)
    assert lo.shape == () and lo.dtype == np.float32
    np.testing.assert_allclose(lo, lo_ref, **TOL[np.float32])
    np.testing.assert_allclose(ops.softmax_cross_entropy_backward(cache),
                               ops.softmax_cross_entropy_backward(cache_ref), **TOL[np.float32])
    col = conv._im2col(cp.asarray(x), 3, 3, 1, 1, 1, 1)
    np.testing.assert_array_equal(col, conv._im2col(x, 3, 3, 1, 1, 1, 1))
    np.testing.assert_array_equal(conv._col2im(col, x.shape, 3, 3, 1, 1, 1, 1),
                                  conv._col2im(np.asarray(col), x.shape, 3, 3, 1, 1, 1, 1))
    y, cache = ops.lrn_pool_forward(cp.asarray(x), 5, 2.0, 1e-4, 0.75, "mean", 3, 2, 1)
    y_ref, cache_ref = ops.lrn_pool_forward(x, 5, 2.0, 1e-4, 0.75, "mean", 3, 2, 1)
    assert cache[0] == "fused" and cache_ref[0] == "apart" and cache[2].dtype == np.uint8
    np.testing.assert_allclose(y, y_ref, **TOL[np.float32])
    np.testing.assert_array_equal(cache[2], cache_ref[2][0])  # the host pool's window offsets
    dyp = random_array(y_ref.shape, np.float32, seed=26)
    np.testing.assert_allclose(ops.lrn_pool_backward(cp.asarray(dyp), cache), ops.lrn_pool_backward(dyp, cache_ref),
                               **TOL[np.float32])
    with pytest.raises(ValueError, match="max_pool2d_forward: pad"):  # the op's own check still speaks
        ops.max_pool2d_forward(cp.asarray(x), 3, 2, 3)
    with pytest.raises(ValueError, match="lrn_pool_forward: pad"):
        ops.lrn_pool_forward(cp.asarray(x), ksize=3, stride=2, pad=3)
    with pytest.raises(ValueError, match="lrn_pool_backward: dy must have"):
        ops.lrn_pool_backward(cp.asarray(x), cache)


def test_bf16_ops_on_a_gpu_agree_with_their_host_emulation(shim, stand_in_gpu, monkeypatch):
    """The ops' GPU branches on bf16 arrays (the bf16 kernels through the stand-in cupy) against the host path's
    emulation of the same semantics (widen, float32 NumPy, round): equal where nothing is summed, within one bf16
    unit where float32 sums may round differently."""
    from cpnet import ops, precision
    from cpnet.ops import activations, conv, dropout, lrn, pool

    def xp_of(a):
        return _StandInCupy if isinstance(a, _StandInGpuArray) else np

    for module in (activations, conv, dropout, lrn, pool, precision):
        monkeypatch.setattr(module, "get_array_module", xp_of)
    cp = _StandInCupy
    x = _bf16(random_array((2, 4, 9, 8), np.float32, seed=51) * np.float32(3))
    dy = _bf16(random_array(x.shape, np.float32, seed=52))
    g = cp.asarray(x)
    assert type(precision.to_bf16(cp.asarray(_f32(x)))) is _StandInGpuArray  # the conversions run the kernels
    np.testing.assert_array_equal(precision.to_bf16(cp.asarray(_f32(x))), x)
    np.testing.assert_array_equal(precision.from_bf16(g), _f32(x))

    y, c = ops.relu_forward(g)
    y_ref, c_ref = ops.relu_forward(x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(ops.relu_backward(cp.asarray(dy), c), ops.relu_backward(dy, c_ref))
    y, c = ops.lrn_forward(g, 5, 2.0, 1e-2, 0.75)
    y_ref, c_ref = ops.lrn_forward(x, 5, 2.0, 1e-2, 0.75)
    _bf16_close(np.asarray(y), _f32(y_ref))
    _close(c[2], c_ref[2], np.float32)
    _bf16_close(np.asarray(ops.lrn_backward(cp.asarray(dy), c)), _f32(ops.lrn_backward(dy, c_ref)))
    y, c = ops.max_pool2d_forward(g, 3, 2, 0)
    y_ref, c_ref = ops.max_pool2d_forward(x, 3, 2, 0)
    np.testing.assert_array_equal(y, y_ref)
    dyp = _bf16(random_array(y_ref.shape, np.float32, seed=53))
    _bf16_close(np.asarray(ops.max_pool2d_backward(cp.asarray(dyp), c)), _f32(ops.max_pool2d_backward(dyp, c_ref)))
    for p in (0.5, 0.3):
        (y, m), (y_ref, m_ref) = (ops.dropout_forward(a, p, seed=3, step=2, train=True, offset=5) for a in (g, x))
        np.testing.assert_array_equal(m, m_ref)
        np.testing.assert_array_equal(y, y_ref)
    col = conv._im2col(g, 3, 3, 1, 1, 1, 1)
    np.testing.assert_array_equal(col, conv._im2col(x, 3, 3, 1, 1, 1, 1))
    _bf16_close(np.asarray(conv._col2im(col, x.shape, 3, 3, 1, 1, 1, 1)),
                _f32(conv._col2im(np.asarray(col), x.shape, 3, 3, 1, 1, 1, 1)))


def test_host_functions_check_their_inputs(shim):
    x = random_array((1, 2, 5, 5), np.float32)
    with pytest.raises(ValueError, match="float32, float64 or bf16"):
        shim.im2col_host(x.astype(np.int32), 3, 3, 1, 1, 0, 0)
    with pytest.raises(ValueError, match="4-d"):
        shim.maxpool_forward_host(x[0], 3, 2, 0)
    with pytest.raises(ValueError, match="pad"):
        shim.maxpool_forward_host(x, 3, 2, 3)
    with pytest.raises(ValueError, match="larger than the padded input"):
        shim.im2col_host(x, 7, 7, 1, 1, 0, 0)
    with pytest.raises(ValueError, match="col of shape"):
        shim.col2im_host(np.zeros((3, 3), np.float32), x.shape, 3, 3, 1, 1, 0, 0)
    with pytest.raises(ValueError, match="share one dtype"):
        y, s = shim.lrn_forward_host(x, 5, 2.0, 1e-4, 0.75)
        shim.lrn_backward_host(x, y, s, x.astype(np.float64), 5, 1e-4, 0.75)
    # Non-contiguous inputs are copied, not misread.
    xt = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    np.testing.assert_array_equal(shim.im2col_host(xt, 3, 3, 1, 1, 1, 1), shim.im2col_host(x, 3, 3, 1, 1, 1, 1))


def test_shim_without_a_compiler_says_so(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-cpnet")
    with pytest.raises(shim_module.ShimUnavailable, match="no-such-compiler-cpnet"):
        shim_module.compiler()


@pytest.mark.parametrize("dtype", BUILDS)
@pytest.mark.parametrize("filename", kernels.SOURCES)
def test_gxx_compiles_without_warnings(shim, filename, dtype):
    assert shim.diagnostics(filename, dtype) == "", shim.diagnostics(filename, dtype)


@pytest.mark.parametrize("dtype", BUILDS)
@pytest.mark.parametrize("filename", kernels.SOURCES)
def test_nvcc_compiles_for_sm90(tmp_path, filename, dtype):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    src = tmp_path / filename
    src.write_text(kernels.kernel_source(filename, dtype))
    cmd = [nvcc, "-arch=sm_90", "--cubin", "-Werror", "all-warnings", "-o", str(tmp_path / "k.cubin"), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and "warning" not in out.lower(), out


def _nvrtc():
    path = os.environ.get("CPNET_NVRTC_LIB") or ctypes.util.find_library("nvrtc")
    if not path:
        pytest.skip("libnvrtc not found (set CPNET_NVRTC_LIB to its path)")
    return ctypes.CDLL(path)


@pytest.mark.parametrize("dtype", BUILDS)
@pytest.mark.parametrize("filename", kernels.SOURCES)
def test_nvrtc_compiles_the_loader_text(filename, dtype):
    """The exact text and options that cpnet.kernels hands to cupy.RawModule compile under NVRTC."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    text = kernels.kernel_source(filename, dtype).encode()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), text, filename.encode(), 0, None, None) == 0
    opts = [b"--gpu-architecture=compute_90"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    assert rc == 0, log.value.decode(errors="replace")


def test_each_launcher_decides_wide_by_the_largest_array_it_indexes(monkeypatch):
    """`wide` must be 1 as soon as any array a kernel indexes passes INDEX32_MAX, not only the one it loops over."""
    seen = {}

    def run(name, dtype, n, *args):  # records the launch instead of running it
        seen[name] = args[-1]

    x = np.zeros((2, 3, 8, 8), np.float32)
    col = np.zeros((27, 72), np.float32)  # im2col of x for a 3x3 window, stride 1, no padding: larger than x
    pooled = np.zeros((2, 3, 3, 3), np.float32)  # 3x3 pool, stride 2: smaller than x
    argmax = np.zeros(pooled.shape, np.int32)
    cases = [  # (kernel, launch, smaller array, larger array)
        ("im2col_kernel", lambda: kernels._im2col(run, np, x, 3, 3, 1, 1, 0, 0), x, col),
        ("col2im_kernel", lambda: kernels._col2im(run, np, col, x.shape, 3, 3, 1, 1, 0, 0), x, col),
        ("maxpool_forward_kernel", lambda: kernels._maxpool_forward(run, np, x, 3, 2, 0), pooled, x),
        ("maxpool_backward_kernel", lambda: kernels._maxpool_backward(run, np, pooled, argmax, x.shape, 3, 2, 0),
         pooled, x),
    ]
    for name, launch, small, large in cases:
        for limit, want in ((small.size, 1), (large.size, 0)):
            monkeypatch.setattr(kernels, "INDEX32_MAX", limit)
            launch()
            assert seen.pop(name) == want, (name, limit)
    for limit, want in ((x.size - 1, 1), (x.size, 0)):
        monkeypatch.setattr(kernels, "INDEX32_MAX", limit)
        kernels._lrn_forward(run, np, x, 5, 2.0, 1e-4, 0.75)
        kernels._lrn_backward(run, np, x, x, x + 1, x, 5, 1e-4, 0.75)
        assert (seen.pop("lrn_forward_kernel"), seen.pop("lrn_backward_kernel")) == (want, want)
