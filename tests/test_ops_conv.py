import numpy as np
import pytest

import naive
from cpnet.backend import to_host
from cpnet.ops import conv as conv_mod
from cpnet.ops import conv2d_backward, conv2d_forward
from cpnet.ops.conv import col2im_cpu, im2col_cpu
from gradcheck import numerical_grad, projected, rel_error

EPS = 1e-3


@pytest.fixture(autouse=True, params=["image-major", "batch-inner"])
def host_order(request, monkeypatch):
    """Every test runs with the host's column matrix in each order (the threshold decides per layer)."""
    monkeypatch.setattr(conv_mod, "BATCH_INNER_MAX_HW", 0 if request.param == "image-major" else 10**9)
    return request.param

# (N, C, H, W, F, kh, kw, stride, pad, groups)
CASES = [
    (2, 3, 7, 7, 4, 3, 3, 1, 0, 1),
    (2, 4, 9, 8, 6, 3, 2, (2, 1), (1, 2), 2),
    (1, 6, 11, 11, 4, 5, 5, 2, 2, 2),
    (2, 2, 8, 8, 3, 3, 3, 2, 0, 1),  # stride does not divide: floor output size
    (1, 2, 5, 5, 2, 5, 5, 3, 0, 1),  # the window is the whole input
    (2, 6, 6, 5, 6, 1, 1, 1, 0, 3),  # 1x1, three groups
    (1, 4, 12, 12, 4, 11, 11, 4, 2, 1),  # conv1-like: 11x11 at stride 4
]


def _arrays(xp, case, dtype=np.float64, seed=0, bias=True):
    N, C, H, W, F, kh, kw, stride, pad, groups = case
    r = np.random.default_rng(seed)
    x = r.standard_normal((N, C, H, W))
    Wt = r.standard_normal((F, C // groups, kh, kw))
    b = r.standard_normal(F) if bias else None
    cast = lambda a: None if a is None else xp.asarray(a.astype(dtype))
    return cast(x), cast(Wt), cast(b), dict(stride=stride, pad=pad, groups=groups)


def _pairs(kw):
    p = lambda v: v if isinstance(v, tuple) else (v, v)
    return p(kw["stride"]), p(kw["pad"]), kw["groups"]


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_naive_loops(xp, case):
    x, W, b, kw = _arrays(xp, case)
    y, _ = conv2d_forward(x, W, b, **kw)
    ref = naive.conv2d(to_host(x), to_host(W), to_host(b), *_pairs(kw))
    assert y.shape == ref.shape and y.flags.c_contiguous
    np.testing.assert_allclose(to_host(y), ref, rtol=1e-10, atol=1e-10)


def test_forward_float32_stays_float32(xp):
    case = CASES[1]
    x, W, b, kw = _arrays(xp, case, dtype=np.float32)
    y, cache = conv2d_forward(x, W, b, **kw)
    assert y.dtype == np.float32
    ref = naive.conv2d(to_host(x), to_host(W), to_host(b), *_pairs(kw))
    np.testing.assert_allclose(to_host(y), ref, rtol=1e-4, atol=1e-4)
    dx, dW, db = conv2d_backward(xp.ones_like(y), cache)
    assert dx.dtype == dW.dtype == db.dtype == np.float32


@pytest.mark.parametrize("bias", [True, False])
def test_gradients_grouped_strided_padded(xp, bias):
    """Max relative error of dx, dW, db against central differences in float64 below 1e-6.

    conv is linear in each argument, so a large step (eps 1e-3) has no truncation error and little rounding."""
    case = (2, 4, 7, 6, 4, 3, 3, 2, 1, 2)
    x, W, b, kw = _arrays(xp, case, seed=1, bias=bias)
    y, cache = conv2d_forward(x, W, b, **kw)
    dy = xp.asarray(np.random.default_rng(2).standard_normal(y.shape))
    dx, dW, db = conv2d_backward(dy, cache)
    f = projected(xp, lambda: conv2d_forward(x, W, b, **kw)[0], dy)
    assert dx.shape == x.shape and dW.shape == W.shape
    assert rel_error(dx, numerical_grad(f, x, EPS)) < 1e-6
    assert rel_error(dW, numerical_grad(f, W, EPS)) < 1e-6
    if bias:
        assert rel_error(db, numerical_grad(f, b, EPS)) < 1e-6
    else:
        assert db is None


def test_need_dx_false_skips_only_the_input_gradient(xp):
    x, W, b, kw = _arrays(xp, (2, 3, 9, 9, 4, 3, 3, 2, 1, 1), seed=4, bias=True)
    y, cache = conv2d_forward(x, W, b, **kw)
    dy = xp.asarray(np.random.default_rng(5).standard_normal(y.shape))
    dx, dW, db = conv2d_backward(dy, cache)
    none, dW2, db2 = conv2d_backward(dy, cache, need_dx=False)
    assert dx is not None and none is None
    assert xp.array_equal(dW, dW2) and xp.array_equal(db, db2)


def test_gradients_rectangular_stride_and_pad(xp):
    case = (1, 2, 6, 7, 2, 2, 3, (1, 2), (2, 1), 1)
    x, W, b, kw = _arrays(xp, case, seed=3)
    y, cache = conv2d_forward(x, W, b, **kw)
    dy = xp.asarray(np.random.default_rng(4).standard_normal(y.shape))
    dx, dW, db = conv2d_backward(dy, cache)
    f = projected(xp, lambda: conv2d_forward(x, W, b, **kw)[0], dy)
    for a, p in ((dx, x), (dW, W), (db, b)):
        assert rel_error(a, numerical_grad(f, p, EPS)) < 1e-6


# The im2col layout is a contract with cpnet/kernels: row c*kh*kw + i*kw + j, column n*Ho*Wo + oy*Wo + ox.
@pytest.mark.parametrize("geom", [(3, 3, 1, 1, 0, 0), (3, 2, 2, 1, 1, 2), (5, 5, 3, 2, 2, 1), (1, 1, 2, 2, 0, 0)])
def test_im2col_layout(geom):
    kh, kw, sy, sx, ph, pw = geom
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 7))
    N, C, H, W = x.shape
    Ho, Wo = (H + 2 * ph - kh) // sy + 1, (W + 2 * pw - kw) // sx + 1
    col = im2col_cpu(x, *geom)
    assert col.shape == (C * kh * kw, N * Ho * Wo) and col.flags.c_contiguous
    np.testing.assert_array_equal(col, naive.im2col(x, *geom))  # every entry, padding zeros included


@pytest.mark.parametrize("geom", [(3, 3, 1, 1, 0, 0), (3, 2, 2, 1, 1, 2), (5, 5, 3, 2, 2, 1), (11, 11, 4, 4, 2, 2)])
def test_col2im_is_the_adjoint_of_im2col(geom):
    r = np.random.default_rng(6)
    x = r.standard_normal((2, 3, 13, 12))
    col = im2col_cpu(x, *geom)
    c = r.standard_normal(col.shape)
    back = col2im_cpu(c, x.shape, *geom)
    assert back.shape == x.shape
    assert np.isclose(np.vdot(back, x), np.vdot(c, col), rtol=1e-12)


@pytest.mark.parametrize("geom", [(3, 3, 1, 1, 0, 0), (3, 2, 2, 1, 1, 2), (5, 5, 3, 2, 2, 1), (1, 1, 2, 2, 0, 0)])
def test_batch_inner_im2col_is_the_same_columns_permuted(geom):
    """The host's batch-inner order: column (oy*Wo + ox)*N + n holds what column n*Ho*Wo + oy*Wo + ox holds in
    the kernels' order; col2im in that order is its adjoint."""
    kh, kw, sy, sx, ph, pw = geom
    r = np.random.default_rng(7)
    x = r.standard_normal((3, 2, 8, 7))
    N, C, H, W = x.shape
    Ho, Wo = (H + 2 * ph - kh) // sy + 1, (W + 2 * pw - kw) // sx + 1
    col = im2col_cpu(x, *geom, batch_inner=True)
    assert col.shape == (C * kh * kw, N * Ho * Wo) and col.flags.c_contiguous
    ref = naive.im2col(x, *geom).reshape(-1, N, Ho * Wo).transpose(0, 2, 1).reshape(col.shape)
    np.testing.assert_array_equal(col, ref)
    c = r.standard_normal(col.shape)
    back = col2im_cpu(c, x.shape, *geom, batch_inner=True)
    assert back.shape == x.shape and back.flags.c_contiguous
    assert np.isclose(np.vdot(back, x), np.vdot(c, col), rtol=1e-12)
    c_im = c.reshape(-1, Ho * Wo, N).transpose(0, 2, 1).reshape(col.shape)  # the same entries, kernels' order
    np.testing.assert_allclose(back, naive.col2im(c_im, x.shape, *geom), rtol=1e-12, atol=1e-12)


def test_host_order_follows_the_output_size(host_order, monkeypatch):
    """The threshold picks the order per layer: maps of at most BATCH_INNER_MAX_HW output pixels take the
    batch-inner one; the result is the same either way."""
    r = np.random.default_rng(8)
    x, W, b = r.standard_normal((2, 3, 6, 6)), r.standard_normal((4, 3, 3, 3)), r.standard_normal(4)
    monkeypatch.setattr(conv_mod, "BATCH_INNER_MAX_HW", 16)
    small = conv2d_forward(x, W, b, pad=0)  # 4x4 output: batch-inner
    big = conv2d_forward(x, W, b, pad=1)  # 6x6 output: image-major
    assert small[1][-1] is True and big[1][-1] is False
    np.testing.assert_allclose(small[0], naive.conv2d(x, W, b, (1, 1), (0, 0), 1), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(big[0], naive.conv2d(x, W, b, (1, 1), (1, 1), 1), rtol=1e-10, atol=1e-10)


def test_col2im_counts_overlaps():
    x = np.ones((1, 1, 5, 5))
    col = im2col_cpu(x, 3, 3, 1, 1, 0, 0)
    back = col2im_cpu(np.ones_like(col), x.shape, 3, 3, 1, 1, 0, 0)
    per_axis = np.array([1, 2, 3, 2, 1])
    np.testing.assert_array_equal(back[0, 0], np.outer(per_axis, per_axis))


def test_errors_name_the_op_and_shape(xp):
    x = xp.zeros((2, 3, 8, 8))
    W = xp.zeros((96, 4, 11, 11))
    msg = r"conv2d_forward: W must have shape \(F, C/groups=3, kh, kw\).*got \(96, 4, 11, 11\)"
    with pytest.raises(ValueError, match=msg):
        conv2d_forward(x, W, None)
    with pytest.raises(ValueError, match=r"conv2d_forward: x must have shape \(N, C, H, W\), got \(3, 8, 8\)"):
        conv2d_forward(x[0], xp.zeros((4, 3, 3, 3)), None)
    with pytest.raises(ValueError, match="conv2d_forward: x has C=3 channels, not divisible by groups=2"):
        conv2d_forward(x, xp.zeros((4, 1, 3, 3)), None, groups=2)
    with pytest.raises(ValueError, match="conv2d_forward: window 11 is larger than the padded input height"):
        conv2d_forward(x, xp.zeros((4, 3, 11, 3)), None, pad=1)
    with pytest.raises(ValueError, match=r"conv2d_forward: x must be float32, float64 or bf16 \(uint16\), got int64"):
        conv2d_forward(xp.zeros((2, 3, 8, 8), dtype=np.int64), xp.zeros((4, 3, 3, 3)), None)
    with pytest.raises(ValueError, match=r"conv2d_forward: b must have shape \(F,\)=\(4,\), got \(5,\)"):
        conv2d_forward(x, xp.zeros((4, 3, 3, 3)), xp.zeros(5))
    with pytest.raises(ValueError, match="conv2d_forward: W must have x's dtype float64, got float32"):
        conv2d_forward(x, xp.zeros((4, 3, 3, 3), dtype=np.float32), None)
    with pytest.raises(ValueError, match="conv2d_forward: stride must be >= 1"):
        conv2d_forward(x, xp.zeros((4, 3, 3, 3)), None, stride=0)
    y, cache = conv2d_forward(x, xp.zeros((4, 3, 3, 3)), None)
    with pytest.raises(ValueError, match="conv2d_backward: dy must have the forward output's shape"):
        conv2d_backward(y[:, :2], cache)


def test_host_workspace_reuses_the_column_buffers_and_changes_no_result():
    """With a workspace the host keeps the column matrix and its gradient from call to call (the same arrays,
    overwritten): each forward/backward equals the one without it, and a new batch size replaces them."""
    r = np.random.default_rng(12)
    W, b = r.standard_normal((6, 2, 3, 3)), r.standard_normal(6)
    ws = {}
    for step, n in enumerate((3, 3, 2)):
        x = r.standard_normal((n, 4, 7, 6))
        dy = r.standard_normal((n, 6, 4, 3))
        y, cache = conv2d_forward(x, W, b, stride=2, pad=1, groups=2, workspace=ws)
        before = (ws["col"], ws.get("dcol"))
        got = conv2d_backward(dy, cache, workspace=ws)
        y0, c0 = conv2d_forward(x, W, b, stride=2, pad=1, groups=2)
        np.testing.assert_array_equal(y, y0)
        for a, e in zip(got, conv2d_backward(dy, c0)):
            np.testing.assert_array_equal(a, e)
        if step == 1:
            assert before[0] is first[0] and before[1] is first[1] and ws["dcol"] is first[1]
        first = (ws["col"], ws["dcol"])
    assert ws["col"].shape[1] == 2 * 4 * 3
