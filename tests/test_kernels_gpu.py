"""The CUDA kernels on a real GPU (marker gpu; skipped without CuPy and a CUDA device): each `_gpu` entry point
equals the NumPy `_cpu` function of cpnet.ops, and the host shim run of the same source.

Pure copies and pure sums (im2col, col2im, max pool both ways) add in the same order on both sides and must match
bit for bit; LRN uses pow and may fuse multiply-adds on the GPU, so it is compared with a per-dtype tolerance.
"""

import numpy as np
import pytest

from cpnet import backend, kernels

pytestmark = pytest.mark.gpu

DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}

CONV_CASES = [  # (N, C, H, W, kh, kw, sy, sx, ph, pw)
    (2, 3, 7, 6, 3, 3, 1, 1, 1, 1),
    (2, 2, 9, 8, 3, 2, 2, 3, 1, 0),
    (2, 3, 35, 35, 11, 11, 4, 4, 0, 0),
    (1, 1, 6, 7, 2, 3, 3, 2, 1, 2),
]
POOL_CASES = [  # (N, C, H, W, ksize, stride, pad)
    (2, 3, 13, 13, 3, 2, 0),
    (2, 2, 8, 8, 3, 2, 1),
    (1, 2, 6, 5, 3, 2, 1),
    (1, 1, 5, 7, 3, 3, 2),
]
LRN_CASES = [(2, 7, 3, 4, 5), (2, 3, 2, 2, 5), (1, 4, 3, 3, 4), (1, 2, 2, 3, 6), (2, 5, 1, 1, 1)]  # (N,C,H,W,size)
LRN_PARAMS = [(2.0, 1e-4, 0.75), (1.5, 0.1, 0.75)]  # (k, alpha_eff, beta)


@pytest.fixture(scope="module")
def cp():
    return backend.cupy_module()


def _shim():
    try:
        from cpnet.kernels import shim

        shim.compiler()
        return shim
    except Exception:
        return None


def _x(shape, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _host(a):
    return backend.to_host(a)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_im2col_col2im_gpu(cp, case, dtype):
    from cpnet.ops.conv import col2im_cpu, im2col_cpu

    N, C, H, W, *geom = case
    x = _x((N, C, H, W), dtype)
    col = kernels.im2col_gpu(cp.asarray(x), *geom)
    assert isinstance(col, cp.ndarray) and col.dtype == dtype
    np.testing.assert_array_equal(_host(col), im2col_cpu(x, *geom))

    c = _x(col.shape, dtype, seed=1)
    xg = kernels.col2im_gpu(cp.asarray(c), x.shape, *geom)
    assert xg.shape == x.shape and xg.dtype == dtype
    np.testing.assert_allclose(_host(xg), col2im_cpu(c, x.shape, *geom), **TOL[dtype])
    shim = _shim()
    if shim is not None:
        np.testing.assert_array_equal(_host(xg), shim.col2im_host(c, x.shape, *geom))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_maxpool_gpu(cp, case, dtype):
    from cpnet.ops.pool import maxpool_backward_cpu, maxpool_forward_cpu

    N, C, H, W, k, s, p = case
    for x in (_x((N, C, H, W), dtype), np.round(_x((N, C, H, W), dtype, seed=2))):  # distinct, and many ties
        y, arg = kernels.maxpool_forward_gpu(cp.asarray(x), k, s, p)
        assert arg.dtype == np.int32
        y_ref, arg_ref = maxpool_forward_cpu(x, k, s, p)
        np.testing.assert_array_equal(_host(y), y_ref)
        np.testing.assert_array_equal(_host(arg), arg_ref)

        dy = _x(y.shape, dtype, seed=3)
        dx = kernels.maxpool_backward_gpu(cp.asarray(dy), arg, x.shape, k, s, p)
        np.testing.assert_allclose(_host(dx), maxpool_backward_cpu(dy, arg_ref, x.shape, k, s, p), **TOL[dtype])
        shim = _shim()
        if shim is not None:
            np.testing.assert_array_equal(_host(dx), shim.maxpool_backward_host(dy, arg_ref, x.shape, k, s, p))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", LRN_PARAMS, ids=str)
@pytest.mark.parametrize("case", LRN_CASES, ids=str)
def test_lrn_gpu(cp, case, params, dtype):
    from cpnet.ops.lrn import lrn_backward_cpu, lrn_forward_cpu

    N, C, H, W, size = case
    k, alpha, beta = params
    x = _x((N, C, H, W), dtype)
    y, scale = kernels.lrn_forward_gpu(cp.asarray(x), size, k, alpha, beta)
    y_ref, scale_ref = lrn_forward_cpu(x, size, k, alpha, beta)
    np.testing.assert_allclose(_host(scale), scale_ref, **TOL[dtype])
    np.testing.assert_allclose(_host(y), y_ref, **TOL[dtype])

    dy = _x(x.shape, dtype, seed=4)
    dx = kernels.lrn_backward_gpu(cp.asarray(x), y, scale, cp.asarray(dy), size, alpha, beta)
    np.testing.assert_allclose(_host(dx), lrn_backward_cpu(x, y_ref, scale_ref, dy, size, alpha, beta), **TOL[dtype])


def test_grid_stride_loop_covers_more_elements_than_one_launch(cp):
    """More output elements than GPU_GRID_CAP * GPU_BLOCK threads: the grid-stride loop must reach them all."""
    from cpnet.ops.conv import im2col_cpu

    x = _x((12, 96, 27, 27), np.float32)  # conv2's geometry: 2400 * 12 * 729 = 21M column entries
    col = kernels.im2col_gpu(cp.asarray(x), 5, 5, 1, 1, 2, 2)
    assert col.size > kernels.GPU_GRID_CAP * kernels.GPU_BLOCK
    np.testing.assert_array_equal(_host(col), im2col_cpu(x, 5, 5, 1, 1, 2, 2))


def test_results_are_deterministic_and_modules_cached(cp):
    x = cp.asarray(_x((2, 6, 9, 9), np.float32))
    dy = cp.asarray(_x((2, 6, 4, 4), np.float32, seed=5))
    first = None
    for _ in range(2):
        y, arg = kernels.maxpool_forward_gpu(x, 3, 2, 0)
        dx = kernels.maxpool_backward_gpu(dy, arg, x.shape, 3, 2, 0)
        ly, ls = kernels.lrn_forward_gpu(x, 5, 2.0, 1e-4, 0.75)
        out = [_host(a) for a in (y, arg, dx, ly, ls, kernels.col2im_gpu(kernels.im2col_gpu(x, 3, 3, 1, 1, 1, 1),
                                                                          x.shape, 3, 3, 1, 1, 1, 1))]
        if first is None:
            first = out
        else:
            for a, b in zip(out, first):
                np.testing.assert_array_equal(a, b)
    dev = cp.cuda.Device().id
    for filename in kernels.SOURCES:
        assert (dev, "float32", filename) in kernels._modules


def test_gpu_functions_reject_host_arrays(cp):
    with pytest.raises(TypeError, match="cupy array"):
        kernels.im2col_gpu(_x((1, 1, 4, 4), np.float32), 3, 3, 1, 1, 0, 0)


@pytest.mark.skipif(backend.gpu_count() < 2, reason="needs two GPUs")
def test_kernels_run_on_the_inputs_device(cp):
    from cpnet.ops.pool import maxpool_forward_cpu

    x = _x((1, 2, 7, 7), np.float64)
    with cp.cuda.Device(1):
        xg = cp.asarray(x)
    y, arg = kernels.maxpool_forward_gpu(xg, 3, 2, 0)  # the current device is still 0
    assert y.device.id == 1 and arg.device.id == 1
    np.testing.assert_array_equal(_host(y), maxpool_forward_cpu(x, 3, 2, 0)[0])
    assert (1, "float64", "maxpool.cu") in kernels._modules
