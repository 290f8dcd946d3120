"""The CUDA kernels on a real GPU (marker gpu; skipped without CuPy and a CUDA device): each `_gpu` entry point
equals the NumPy `_cpu` function of cpnet.ops, and the host shim run of the same source.

Pure copies and pure sums (im2col, col2im, max pool both ways) add in the same order on both sides and must match
bit for bit (col2im against col2im_cpu too); LRN uses pow and may fuse multiply-adds on the GPU, so it is compared with a per-dtype tolerance.
The elementwise kernels (SGD, dropout, ReLU) repeat the NumPy operations exactly and must match bit for bit.
"""

import numpy as np
import pytest
from bitwise import float_bits, random_array, with_specials

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


def _host(a):
    return backend.to_host(a)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_im2col_col2im_gpu(cp, case, dtype):
    from cpnet.ops.conv import col2im_cpu, im2col_cpu

    N, C, H, W, *geom = case
    x = random_array((N, C, H, W), dtype)
    col = kernels.im2col_gpu(cp.asarray(x), *geom)
    assert isinstance(col, cp.ndarray) and col.dtype == dtype
    np.testing.assert_array_equal(_host(col), im2col_cpu(x, *geom))

    c = random_array(col.shape, dtype, seed=1)
    xg = kernels.col2im_gpu(cp.asarray(c), x.shape, *geom)
    assert xg.shape == x.shape and xg.dtype == dtype
    # The gather adds the window offsets in col2im_cpu's order; only FMA-free additions, so the same bits.
    np.testing.assert_array_equal(_host(xg), col2im_cpu(c, x.shape, *geom))
    shim = _shim()
    if shim is not None:
        np.testing.assert_array_equal(_host(xg), shim.col2im_host(c, x.shape, *geom))


@pytest.mark.parametrize("fixed", [1, 0])
@pytest.mark.parametrize("case", [(2, 3, 35, 35, 11, 11, 4, 4, 0, 0), (2, 4, 13, 13, 5, 5, 1, 1, 2, 2),
                                  (2, 6, 9, 9, 3, 3, 1, 1, 1, 1)], ids=str)
def test_im2col_col2im_fixed_geometry_gpu(cp, case, fixed, monkeypatch):
    """The presets' geometries with compile-time window and stride (fixed=1) and with run-time ones: NumPy's bits."""
    from cpnet.ops.conv import col2im_cpu, im2col_cpu

    monkeypatch.setattr(kernels, "FIXED_GEOMETRY", fixed)
    N, C, H, W, *geom = case
    x = random_array((N, C, H, W), np.float32, seed=7)
    col = kernels.im2col_gpu(cp.asarray(x), *geom)
    np.testing.assert_array_equal(_host(col), im2col_cpu(x, *geom))
    c = random_array(col.shape, np.float32, seed=8)
    np.testing.assert_array_equal(_host(kernels.col2im_gpu(cp.asarray(c), x.shape, *geom)),
                                  col2im_cpu(c, x.shape, *geom))


def test_im2col_col2im_grid_stride_in_y(cp):
    """More channels (im2col) and planes (col2im) than the 65535 rows of blocks a grid holds in y."""
    from cpnet.ops.conv import col2im_cpu, im2col_cpu

    x = random_array((2, 40000, 2, 2), np.float32, seed=9)  # 40000 channels, 80000 planes
    col = kernels.im2col_gpu(cp.asarray(x), 2, 2, 1, 1, 1, 1)
    np.testing.assert_array_equal(_host(col), im2col_cpu(x, 2, 2, 1, 1, 1, 1))
    np.testing.assert_array_equal(_host(kernels.col2im_gpu(col, x.shape, 2, 2, 1, 1, 1, 1)),
                                  col2im_cpu(_host(col), x.shape, 2, 2, 1, 1, 1, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_maxpool_gpu(cp, case, dtype):
    from cpnet.ops.pool import maxpool_backward_cpu, maxpool_forward_cpu

    N, C, H, W, k, s, p = case
    for x in (random_array((N, C, H, W), dtype), np.round(random_array((N, C, H, W), dtype, seed=2))):  # distinct, and many ties
        y, arg = kernels.maxpool_forward_gpu(cp.asarray(x), k, s, p)
        assert arg.dtype == np.int32
        y_ref, arg_ref = maxpool_forward_cpu(x, k, s, p)
        np.testing.assert_array_equal(_host(y), y_ref)
        np.testing.assert_array_equal(_host(arg), arg_ref)

        dy = random_array(y.shape, dtype, seed=3)
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
    x = random_array((N, C, H, W), dtype)
    y, scale = kernels.lrn_forward_gpu(cp.asarray(x), size, k, alpha, beta)
    y_ref, scale_ref = lrn_forward_cpu(x, size, k, alpha, beta)
    np.testing.assert_allclose(_host(scale), scale_ref, **TOL[dtype])
    np.testing.assert_allclose(_host(y), y_ref, **TOL[dtype])

    dy = random_array(x.shape, dtype, seed=4)
    dx = kernels.lrn_backward_gpu(cp.asarray(x), y, scale, cp.asarray(dy), size, alpha, beta)
    np.testing.assert_allclose(_host(dx), lrn_backward_cpu(x, y_ref, scale_ref, dy, size, alpha, beta), **TOL[dtype])


LRN_POOL_CASES = [(2, 7, 9, 9, 5, 3, 2, 0), (1, 3, 8, 7, 5, 3, 2, 1), (2, 4, 6, 5, 4, 2, 2, 0), (2, 48, 27, 27, 5, 3, 2, 0)]


@pytest.mark.parametrize("dtype", DTYPES + [kernels.BF16])
@pytest.mark.parametrize("case", LRN_POOL_CASES, ids=str)
def test_lrn_pool_gpu_equals_the_separate_kernels(cp, case, dtype):
    """The fused LRN -> pool kernels against lrn_forward_gpu then maxpool_forward_gpu and back (the same
    arithmetic; NVRTC may contract multiply-adds differently in the two, so values within the LRN tolerance), the
    window offsets equal, and against the host shim's run of the fused kernels."""
    from cpnet import precision
    from cpnet.ops.pool import flat_to_window

    N, C, H, W, size, ks, s, p = case
    k, alpha, beta = 2.0, 0.1, 0.75
    x32 = np.round(random_array((N, C, H, W), np.float32, seed=7) * 2)  # ties
    x32[0, 0, 0, :2] = np.nan
    x = precision.to_bf16(x32) if dtype == kernels.BF16 else x32.astype(dtype)
    widen = (lambda a: precision.from_bf16(_host(a))) if dtype == kernels.BF16 else _host
    tol = dict(rtol=2.0 ** -7, atol=1e-30) if dtype == kernels.BF16 else TOL[dtype]
    y, off = kernels.lrn_pool_forward_gpu(cp.asarray(x), size, k, alpha, beta, ks, s, p)
    ly, scale = kernels.lrn_forward_gpu(cp.asarray(x), size, k, alpha, beta)
    y_ref, arg = kernels.maxpool_forward_gpu(ly, ks, s, p)
    np.testing.assert_allclose(widen(y), widen(y_ref), **tol)
    np.testing.assert_array_equal(_host(off), flat_to_window(_host(arg), x.shape, ks, s, p))
    dy = random_array(y.shape, np.float32, seed=8)
    dy = precision.to_bf16(dy) if dtype == kernels.BF16 else dy.astype(dtype)
    dx = kernels.lrn_pool_backward_gpu(cp.asarray(x), cp.asarray(dy), off, size, k, alpha, beta, ks, s, p)
    dx_ref = kernels.lrn_backward_gpu(cp.asarray(x), ly, scale, kernels.maxpool_backward_gpu(
        cp.asarray(dy), arg, x.shape, ks, s, p), size, alpha, beta)
    np.testing.assert_allclose(widen(dx), widen(dx_ref), **tol)
    shim = _shim()
    if shim is not None:
        y_h, off_h = shim.lrn_pool_forward_host(x, size, k, alpha, beta, ks, s, p)
        np.testing.assert_allclose(widen(y), widen(y_h), **tol)
        np.testing.assert_array_equal(_host(off), off_h)
        np.testing.assert_allclose(widen(dx), widen(shim.lrn_pool_backward_host(x, dy, off_h, size, k, alpha, beta,
                                                                                 ks, s, p)), **tol)


def test_grid_stride_loop_covers_more_elements_than_one_launch(cp):
    """More output elements than GPU_GRID_CAP * GPU_BLOCK threads: the grid-stride loop must reach them all."""
    from cpnet.ops.conv import im2col_cpu

    x = random_array((12, 96, 27, 27), np.float32)  # conv2's geometry: 2400 * 12 * 729 = 21M column entries
    col = kernels.im2col_gpu(cp.asarray(x), 5, 5, 1, 1, 2, 2)
    assert col.size > kernels.GPU_GRID_CAP * kernels.GPU_BLOCK
    np.testing.assert_array_equal(_host(col), im2col_cpu(x, 5, 5, 1, 1, 2, 2))


def test_results_are_deterministic_and_modules_cached(cp):
    x = cp.asarray(random_array((2, 6, 9, 9), np.float32))
    dy = cp.asarray(random_array((2, 6, 4, 4), np.float32, seed=5))
    first = None
    for _ in range(2):
        y, arg = kernels.maxpool_forward_gpu(x, 3, 2, 0)
        dx = kernels.maxpool_backward_gpu(dy, arg, x.shape, 3, 2, 0)
        ly, ls = kernels.lrn_forward_gpu(x, 5, 2.0, 1e-4, 0.75)
        out = [_host(a) for a in (y, arg, dx, ly, ls, kernels.col2im_gpu(kernels.im2col_gpu(x, 3, 3, 1, 1, 1, 1),
                                                                          x.shape, 3, 3, 1, 1, 1, 1),
                                  kernels.relu_forward_gpu(x), *kernels.dropout_forward_gpu(x, 0.5, 1, 2))]
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
        kernels.im2col_gpu(random_array((1, 1, 4, 4), np.float32), 3, 3, 1, 1, 0, 0)


@pytest.mark.skipif(backend.gpu_count() < 2, reason="needs two GPUs")
def test_kernels_run_on_the_inputs_device(cp):
    from cpnet.ops.pool import maxpool_forward_cpu

    x = random_array((1, 2, 7, 7), np.float64)
    with cp.cuda.Device(1):
        xg = cp.asarray(x)
    y, arg = kernels.maxpool_forward_gpu(xg, 3, 2, 0)  # the current device is still 0
    assert y.device.id == 1 and arg.device.id == 1
    np.testing.assert_array_equal(_host(y), maxpool_forward_cpu(x, 3, 2, 0)[0])
    assert (1, "float64", "maxpool.cu") in kernels._modules


# Elementwise kernels: the same operations in the same order as the NumPy paths (products kept out of FMAs), so
# every comparison is bit for bit (NaN payloads aside).

ELEMENTWISE_SHAPES = [(1,), (255,), (257,), (3, 1001), (128, 4096)]


def _bitwise(cp, actual, expected):
    """Bit for bit (so -0.0 != 0.0), except NaN payloads: the GPU writes its canonical NaN, x86 another."""
    actual = cp.asnumpy(actual)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual.dtype, actual.shape)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    np.testing.assert_array_equal(float_bits(actual)[~nan], float_bits(expected)[~nan])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=str)
def test_sgd_momentum_gpu(cp, shape, dtype):
    """Three updates in place on the GPU against MomentumSGD's NumPy statements."""
    w, v = random_array(shape, dtype, 10), np.zeros(shape, dtype)
    wg, vg = cp.asarray(w), cp.asarray(v)
    for step, (lr, m, wd) in enumerate(((0.01, 0.9, 5e-4), (0.37, 0.5, 0.0), (0.001, 0.99, 1e-2))):
        g = random_array(shape, dtype, 11 + step) * dtype(10.0 ** -step)
        v *= m
        if wd:
            v -= (wd * lr) * w
        v -= lr * g
        w += v
        assert kernels.sgd_momentum_gpu(wg, cp.asarray(g), vg, m, wd * lr, lr) is None
        _bitwise(cp, vg, v)
        _bitwise(cp, wg, w)


@pytest.mark.parametrize("multi", [True, False], ids=["multi-tensor", "per-array"])
def test_momentum_sgd_updates_the_fused_models_parameters_in_place(cp, monkeypatch, multi):
    """The fused model's parameters are row blocks of one array per layer: one multi-tensor kernel for all of them
    (or one kernel per such array) updates them in place, and the result equals the host optimizer's bit for bit."""
    from cpnet import optim
    from cpnet.model import build_model, make_config
    from cpnet.optim import MomentumSGD

    monkeypatch.setattr(optim, "MULTI_TENSOR", multi)

    cfg = make_config("alexnet-small", 7, 32, seed=1)
    host = build_model(cfg, placement=[backend.HOST, backend.HOST], dtype=np.float32)
    dev = build_model(cfg, placement=[backend.Device("gpu", 0)] * 2, dtype=np.float32, fuse=True)
    assert dev.fused
    calls = []
    launch, launch_multi = kernels.sgd_momentum_gpu, kernels.sgd_momentum_multi_gpu
    monkeypatch.setattr(kernels, "sgd_momentum_gpu", lambda *a: calls.append(1) or launch(*a))
    monkeypatch.setattr(kernels, "sgd_momentum_multi_gpu", lambda *a, **k: calls.append(len(a[0])) or launch_multi(*a, **k))
    oh, od = MomentumSGD(host, lr=0.01), MomentumSGD(dev, lr=0.01)
    rng = np.random.default_rng(0)
    for _ in range(2):
        grads = {n: rng.standard_normal(w.shape).astype(np.float32) for n, w in host.params().items()}
        for name, layer, key, _t in host.param_slots():
            layer.grads[key] = grads[name]
        for lname, layer in dev.fused_net.named():  # as backward leaves them: one array per layer, then views
            for key in layer.params:
                layer.grads[key] = cp.asarray(np.concatenate([grads[f"t{t}.{lname}.{key}"] for t in range(2)]))
        dev.fused_net.grads_to_towers()
        for key in dev.fc8.params:
            dev.fc8.grads[key] = cp.asarray(grads[f"fc8.{key}"])
        oh.step()
        od.step()
    assert [len(blk.parts) for blk, _ in od._blocks] == [2] * 14 + [1] * 2  # W, b of conv1-5, fc6, fc7; fc8's
    assert calls == ([16, 16] if multi else [1] * 2 * (14 + 2))
    want = host.host_params()
    for name, got in dev.host_params().items():
        np.testing.assert_array_equal(float_bits(got), float_bits(want[name]), err_msg=name)
    for lname, layer in dev.fused_net.named():  # the fused layers see the same memory
        for key, full in layer.params.items():
            both = np.concatenate([want[f"t{t}.{lname}.{key}"] for t in range(2)])
            np.testing.assert_array_equal(float_bits(cp.asnumpy(full)), float_bits(both), err_msg=f"{lname}.{key}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.5, 0.1, 0.9])
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=str)
def test_dropout_forward_gpu(cp, shape, p, dtype):
    from cpnet.ops import counter_keys, counter_uniform, dropout_with_mask

    x = with_specials(shape, dtype, 12)
    for seed, step, first in ((0, 0, 0), (9, 3, 0), (2**31 + 5, 10**6, 0), (9, 3, 7 * 2**29 + 3)):  # wraps 2^32
        keep = counter_uniform(np, shape, seed, step, dtype, first) >= dtype(p)
        with np.errstate(invalid="ignore"):
            y_ref, mask_ref = dropout_with_mask(x, p, keep)
        y, mask = kernels.dropout_forward_gpu(cp.asarray(x), p, *counter_keys(seed, step), first=first)
        _bitwise(cp, mask, mask_ref)
        _bitwise(cp, y, y_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=str)
def test_relu_gpu(cp, shape, dtype):
    from cpnet.ops import relu_backward, relu_forward

    x = with_specials(shape, dtype, 13)
    y_ref, cache_ref = relu_forward(x)
    y = kernels.relu_forward_gpu(cp.asarray(x))
    _bitwise(cp, y, y_ref)
    dy = with_specials(shape, dtype, 14)
    _bitwise(cp, kernels.relu_backward_gpu(y, cp.asarray(dy)), relu_backward(dy, cache_ref))
    y_op, cache = relu_forward(cp.asarray(x))  # the op takes the kernel path for CuPy arrays
    _bitwise(cp, y_op, y_ref)
    _bitwise(cp, relu_backward(cp.asarray(dy), cache), relu_backward(dy, cache_ref))


@pytest.mark.parametrize("chunk", [None, 5_000_003])
def test_elementwise_kernels_cover_more_elements_than_one_launch(cp, chunk, monkeypatch):
    """More elements than GPU_GRID_CAP * GPU_BLOCK threads (the grid-stride loop); then in several chunks."""
    from cpnet.ops import counter_keys, counter_uniform

    if chunk is not None:
        monkeypatch.setattr(kernels, "ELEMENTWISE_CHUNK", chunk)
    x = random_array((4100, 4100), np.float32, 15)
    assert x.size > kernels.GPU_GRID_CAP * kernels.GPU_BLOCK
    y, mask = kernels.dropout_forward_gpu(cp.asarray(x), 0.5, *counter_keys(3, 4))
    keep = counter_uniform(np, x.shape, 3, 4, np.float32) >= np.float32(0.5)
    _bitwise(cp, mask, keep.astype(np.float32) * np.float32(2.0))
    _bitwise(cp, y, x * (keep.astype(np.float32) * np.float32(2.0)))
    _bitwise(cp, kernels.relu_forward_gpu(cp.asarray(x)), np.maximum(x, np.float32(0)))


def test_a_fused_training_step_updates_with_one_kernel_per_layer_array(cp, monkeypatch):
    """After a real backward pass the tower gradients are row blocks of the fused gradients, so the update takes
    the one-kernel-per-array path (16 launches, not 30) with MULTI_TENSOR off, and one launch for all with it on;
    the two give the same bits."""
    from cpnet import optim

    from cpnet.model import build_model, make_config
    from cpnet.optim import MomentumSGD

    dev = build_model(make_config("alexnet-small", 7, 32, seed=1), placement=[backend.Device("gpu", 0)] * 2,
                      fuse=True)
    opt = MomentumSGD(dev, lr=0.01)
    calls = []
    launch, launch_multi = kernels.sgd_momentum_gpu, kernels.sgd_momentum_multi_gpu
    monkeypatch.setattr(kernels, "sgd_momentum_gpu", lambda *a: calls.append(a) or launch(*a))
    monkeypatch.setattr(kernels, "sgd_momentum_multi_gpu", lambda *a, **k: calls.append(a) or launch_multi(*a, **k))
    rng = np.random.default_rng(0)
    dev.loss(rng.standard_normal((4, 3, 32, 32)).astype(np.float32), rng.integers(0, 7, 4), train=True)
    dev.loss_backward()
    before = dev.host_params()
    velocity = {k: cp.asnumpy(v) for k, v in opt.velocity.items()}
    monkeypatch.setattr(optim, "MULTI_TENSOR", False)
    opt.step()
    assert len(calls) == len(opt._blocks) == 16  # one per parameter array: 14 of both towers, fc8's W and b
    after = dev.host_params()
    assert all(not np.array_equal(after[k], before[k]) for k in before if k.endswith(".W"))  # decayed: all move
    dev.set_params(before)  # the same update again, multi-tensor
    dev.set_params(velocity, into=opt.velocity)
    monkeypatch.setattr(optim, "MULTI_TENSOR", True)
    calls.clear()
    opt.step()
    assert len(calls) == 1 and len(calls[0][0]) == 16
    for k, v in dev.host_params().items():
        np.testing.assert_array_equal(float_bits(v), float_bits(after[k]), err_msg=k)


# Fewer launches: the multi-tensor update, the towers' dropout, softmax cross-entropy.

def test_sgd_momentum_multi_gpu(cp):
    """One launch over many arrays equals one launch per array bit for bit; the address table is cached."""
    rng = np.random.default_rng(20)
    shapes = [(300, 11), (5,), (0,), (4, 2, 3), (1,), (70001,)]
    decays = [True, False, True, True, False, True]
    ws = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    gs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    vs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    wg, gg, vg = ([cp.asarray(a) for a in arrays] for arrays in (ws, gs, vs))
    w1, v1 = [cp.asarray(a) for a in ws], [cp.asarray(a) for a in vs]
    cache = {}
    for _ in range(2):
        kernels.sgd_momentum_multi_gpu(wg, gg, vg, decays, 0.9, 5e-3, 0.1, cache=cache)
        for w, g, v, d in zip(w1, gg, v1, decays):
            kernels.sgd_momentum_gpu(w, g, v, 0.9, 5e-3 if d else 0.0, 0.1)
        for a, b in zip(wg + vg, w1 + v1):
            _bitwise(cp, a, cp.asnumpy(b))
    assert len(cache) == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_towers_forward_gpu(cp, dtype):
    """The fused towers' (rows, 2*units) dropout in one kernel: each half's NumPy dropout bit for bit."""
    from cpnet.ops import counter_keys, dropout_forward

    x = with_specials((128, 2 * 2048), dtype, 21)
    for step, offset in ((0, 0), (5, 2**32 // 2048 - 3)):
        keys = [counter_keys(s, step) for s in (7, 8)]
        y, mask = kernels.dropout_towers_forward_gpu(cp.asarray(x), 0.5, keys[0], keys[1], first=offset * 2048)
        with np.errstate(invalid="ignore"):
            halves = [dropout_forward(np.ascontiguousarray(x[:, t * 2048:(t + 1) * 2048]), 0.5, 7 + t, step, True,
                                      offset) for t in range(2)]
        _bitwise(cp, mask, np.concatenate([m for _, m in halves], axis=1))
        _bitwise(cp, y, np.concatenate([h for h, _ in halves], axis=1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_xent_gpu(cp, dtype):
    """The loss (sum of the row terms) and p against the NumPy path, the gradient from the same p bit for bit;
    the op takes the kernel path for CuPy arrays."""
    from cpnet.ops import softmax_cross_entropy_backward, softmax_cross_entropy_forward

    rng = np.random.default_rng(22)
    z = (rng.standard_normal((128, 1000)) * 5).astype(dtype)
    labels = rng.integers(0, 1000, 128)
    loss_ref, cache_ref = softmax_cross_entropy_forward(z, labels)
    loss, cache = softmax_cross_entropy_forward(cp.asarray(z), cp.asarray(labels))
    assert loss.shape == () and loss.dtype == dtype
    np.testing.assert_allclose(float(loss), float(loss_ref), **TOL[dtype])
    np.testing.assert_allclose(cp.asnumpy(cache[0]), cache_ref[0], **TOL[dtype])
    _bitwise(cp, softmax_cross_entropy_backward(cache),
             softmax_cross_entropy_backward((cp.asnumpy(cache[0]), labels)))
    row_loss, _, _ = kernels.softmax_xent_forward_gpu(cp.asarray(z[:2]), cp.asarray(np.array([3, 1000])))
    assert np.isfinite(float(row_loss[0])) and np.isnan(float(row_loss[1]))  # an out-of-range label: NaN


def test_fused_gpu_step_matches_the_host(cp):
    """A training step of the fused model on the GPU (the fused loss, the towers' dropout kernel, the multi-tensor
    update) against the same step on the host, in float64."""
    from cpnet.model import build_model, make_config
    from cpnet.optim import MomentumSGD

    cfg = make_config("alexnet-tiny", 5, 15, seed=3)
    host = build_model(cfg, placement=[backend.HOST] * 2, dtype=np.float64, fuse=True, tower_threads=False)
    dev = build_model(cfg, placement=[backend.Device("gpu", 0)] * 2, dtype=np.float64, fuse=True)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((6, 3, 15, 15)), rng.integers(0, 5, 6)
    for model in (host, dev):
        model.set_step(4, offset=2)
        opt = MomentumSGD(model, lr=0.05)
        loss, _ = model.loss(x, y, train=True)
        model.loss_backward()
        opt.step()
        model.last_loss = float(loss)
    assert dev.last_loss == pytest.approx(host.last_loss, rel=1e-12)
    want = host.host_params()
    for k, v in dev.host_params().items():
        np.testing.assert_allclose(v, want[k], rtol=1e-9, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_layout_gpu(cp, dtype):
    """The layout pass with bias and ReLU, forward and backward, against the array path's two passes bit for bit;
    conv2d with relu=True on the GPU against conv then ReLU."""
    from cpnet import ops
    from cpnet.ops import relu_backward, relu_forward
    from cpnet.ops.conv import _to_nchw

    N, F, G, Ho, Wo = 8, 96, 2, 27, 27
    ym = with_specials((G, F // G, N * Ho * Wo), dtype, 30)
    b = random_array((F,), dtype, 31)
    y = kernels.conv_layout_forward_gpu(cp.asarray(ym), cp.asarray(b), cp.empty((N, F, Ho, Wo), dtype))
    want, _ = relu_forward(_to_nchw(np, ym, b, np.empty((N, F, Ho, Wo), dtype)))
    _bitwise(cp, y, want)
    dy = with_specials((N, F, Ho, Wo), dtype, 32)
    d = kernels.conv_layout_backward_gpu(cp.asarray(dy), y, G)
    _bitwise(cp, d, np.ascontiguousarray(relu_backward(dy, want).transpose(1, 0, 2, 3)).reshape(G, F // G, -1))

    rng = np.random.default_rng(33)
    x = rng.standard_normal((4, 6, 9, 9)).astype(dtype)
    W = rng.standard_normal((8, 3, 3, 3)).astype(dtype)
    bb = rng.standard_normal(8).astype(dtype)
    xg, Wg, bg = cp.asarray(x), cp.asarray(W), cp.asarray(bb)
    yf, cf = ops.conv2d_forward(xg, Wg, bg, 1, 1, 2, relu=True)
    yc, cc = ops.conv2d_forward(xg, Wg, bg, 1, 1, 2)
    yr, cr = ops.relu_forward(yc)
    _bitwise(cp, yf, cp.asnumpy(yr))
    g = cp.asarray(rng.standard_normal(yf.shape).astype(dtype))
    for got, ref in zip(ops.conv2d_backward(g, cf), ops.conv2d_backward(ops.relu_backward(g, cr), cc)):
        _bitwise(cp, got, cp.asnumpy(ref))




def test_bf16_kernels_on_the_gpu_equal_the_host_shim(cp):
    """Every kernel built for bf16 (T = bf16, F = float) on the GPU against the host shim's run of the same text:
    copies, maxima, conversions, ReLU and dropout bit for bit; sums and LRN within one bf16 unit (the GPU's powf
    and fused multiply-adds may round float32 differently)."""
    from cpnet.precision import from_bf16, to_bf16

    shim = _shim()
    if shim is None:
        pytest.skip("no C++ compiler for the host shim")
    x32 = with_specials((2, 5, 9, 8), np.float32, 60)
    x = to_bf16(x32)
    fin = to_bf16(random_array(x.shape, np.float32, 61) * np.float32(3))
    dy = to_bf16(random_array(x.shape, np.float32, 62))

    def close(g, h):
        a, b = from_bf16(_host(g)), from_bf16(h)
        np.testing.assert_allclose(a, b, rtol=2.0 ** -7, atol=1e-30)

    np.testing.assert_array_equal(_host(kernels.narrow_gpu(cp.asarray(x32))), shim.narrow_host(x32))
    np.testing.assert_array_equal(_host(kernels.widen_gpu(cp.asarray(x))), shim.widen_host(x))
    col = kernels.im2col_gpu(cp.asarray(fin), 3, 3, 1, 1, 1, 1)
    np.testing.assert_array_equal(_host(col), shim.im2col_host(fin, 3, 3, 1, 1, 1, 1))
    close(kernels.col2im_gpu(col, x.shape, 3, 3, 1, 1, 1, 1), shim.col2im_host(_host(col), x.shape, 3, 3, 1, 1, 1, 1))
    y, arg = kernels.maxpool_forward_gpu(cp.asarray(fin), 3, 2, 0)
    y_ref, arg_ref = shim.maxpool_forward_host(fin, 3, 2, 0)
    np.testing.assert_array_equal(_host(y), y_ref)
    np.testing.assert_array_equal(_host(arg), arg_ref)
    dyp = to_bf16(random_array(y_ref.shape, np.float32, 63))
    close(kernels.maxpool_backward_gpu(cp.asarray(dyp), arg, x.shape, 3, 2, 0),
          shim.maxpool_backward_host(dyp, arg_ref, x.shape, 3, 2, 0))
    ly, ls = kernels.lrn_forward_gpu(cp.asarray(fin), 5, 2.0, 1e-2, 0.75)
    ly_ref, ls_ref = shim.lrn_forward_host(fin, 5, 2.0, 1e-2, 0.75)
    close(ly, ly_ref)
    np.testing.assert_allclose(_host(ls), ls_ref, **TOL[np.float32])
    close(kernels.lrn_backward_gpu(cp.asarray(fin), ly, ls, cp.asarray(dy), 5, 1e-2, 0.75),
          shim.lrn_backward_host(fin, ly_ref, ls_ref, dy, 5, 1e-2, 0.75))
    np.testing.assert_array_equal(_host(kernels.relu_forward_gpu(cp.asarray(x))), shim.relu_forward_host(x))
    np.testing.assert_array_equal(_host(kernels.relu_backward_gpu(cp.asarray(fin), cp.asarray(dy))),
                                  shim.relu_backward_host(fin, dy))
    for a, b in zip(kernels.dropout_forward_gpu(cp.asarray(fin), 0.3, 7, 9), shim.dropout_forward_host(fin, 0.3, 7, 9)):
        np.testing.assert_array_equal(_host(a), b)
