import numpy as np
import pytest

import naive
from cpnet.backend import to_host
from cpnet.errors import CpnetError
from cpnet.ops import conv as conv_mod
from cpnet.ops import conv2d_backward, conv2d_forward, fourier, winograd
from cpnet.ops.conv import col2im_cpu, im2col_cpu
from gradcheck import numerical_grad, projected, rel_error

EPS = 1e-3

# The host's Winograd tiles per kernel size: the default F(2x2, 3x3), and larger tiles (and 5x5, 2x2 kernels)
WINO = {"winograd": {3: 2, 5: 2, 2: 2}, "winograd-large": {3: 4, 5: 3, 2: 5}}


@pytest.fixture(autouse=True, params=["image-major", "batch-inner", "winograd", "winograd-large", "fourier"])
def host_order(request, monkeypatch):
    """Every test runs with the host's column matrix in each order (the threshold decides per layer), with
    the stride-1 square kernels through Winograd's transforms (im2col otherwise), and with every stride-1 layer
    through the DFT (fourier)."""
    monkeypatch.setattr(conv_mod, "BATCH_INNER_MAX_HW", 0 if request.param == "image-major" else 10**9)
    monkeypatch.setattr(conv_mod, "WINOGRAD_TILES", WINO.get(request.param, {}))
    monkeypatch.setattr(conv_mod, "WINOGRAD_MIN_PIXELS", 0)
    monkeypatch.setattr(conv_mod, "WINOGRAD_MIN_CHANNELS", 0)
    monkeypatch.setattr(conv_mod, "FOURIER", request.param == "fourier")
    monkeypatch.setattr(conv_mod, "FOURIER_MIN_CHANNELS", 0)
    monkeypatch.setattr(conv_mod, "FOURIER_MAX_FILTERS_PER_IMAGE", 10**9)
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
    (2, 4, 7, 7, 6, 3, 3, 1, 1, 2),  # conv4-like: 3x3 stride 1 pad 1, 7x7 maps (not a multiple of the tile)
    (1, 2, 8, 5, 3, 3, 3, 1, (0, 2), 1),  # rectangular maps and padding
    (2, 4, 9, 9, 4, 5, 5, 1, 2, 2),  # conv2-like: 5x5 stride 1
    (2, 3, 6, 7, 4, 2, 2, 1, 0, 1),  # an even kernel
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


@pytest.mark.parametrize("case", [(2, 4, 7, 6, 4, 3, 3, 1, 1, 2), (1, 2, 6, 7, 3, 5, 5, 1, (2, 1), 1)])
def test_gradients_stride_one(xp, host_order, case):
    """The stride-1 layers that the host runs through Winograd's transforms (with a winograd host_order)."""
    x, W, b, kw = _arrays(xp, case, seed=9)
    y, cache = conv2d_forward(x, W, b, **kw)
    assert isinstance(cache, winograd.Cache) == (host_order.startswith("winograd") and xp is np)
    assert isinstance(cache, fourier.Cache) == (host_order == "fourier" and xp is np)
    dy = xp.asarray(np.random.default_rng(10).standard_normal(y.shape))
    dx, dW, db = conv2d_backward(dy, cache)
    f = projected(xp, lambda: conv2d_forward(x, W, b, **kw)[0], dy)
    for a, p in ((dx, x), (dW, W), (db, b)):
        assert rel_error(a, numerical_grad(f, p, EPS)) < 1e-6


def _against_im2col(monkeypatch, case, cache_type, seed):
    """(float64 results, float32 results, im2col's float64 results) of y, dx, dW, db for `case`, the first two
    through the host order's algorithm (its cache a `cache_type`), and max |a - e| / max |e|."""
    got = {}
    for dtype in (np.float64, np.float32):
        x, W, b, kw = _arrays(np, case, dtype=dtype, seed=seed)
        y, cache = conv2d_forward(x, W, b, **kw)
        assert isinstance(cache, cache_type) and y.dtype == dtype and y.flags.c_contiguous
        dy = np.random.default_rng(seed + 1).standard_normal(y.shape).astype(dtype)
        got[dtype] = (y,) + conv2d_backward(dy, cache)
        assert all(a.dtype == dtype for a in got[dtype])
    monkeypatch.setattr(conv_mod, "WINOGRAD_TILES", {})
    monkeypatch.setattr(conv_mod, "FOURIER", False)
    x, W, b, kw = _arrays(np, case, seed=seed)
    y, cache = conv2d_forward(x, W, b, **kw)
    assert not isinstance(cache, (winograd.Cache, fourier.Cache))
    ref = (y,) + conv2d_backward(np.random.default_rng(seed + 1).standard_normal(y.shape), cache)
    rel = lambda a, e: float(np.abs(a - e).max() / np.abs(e).max())
    for a, e in zip(got[np.float64], ref):
        assert a.shape == e.shape
    return got[np.float64], got[np.float32], ref, rel


@pytest.mark.parametrize("case", [CASES[7], CASES[9], (3, 8, 13, 13, 6, 3, 3, 1, 1, 2)])
def test_winograd_equals_im2col(host_order, monkeypatch, case):
    """float64: Winograd's y, dx, dW, db equal im2col's to 1e-12 relative; float32 within 2e-6 of float64 for
    F(2x2, 3x3) (im2col's own float32 error on these maps: about 4e-7)."""
    if not host_order.startswith("winograd"):
        pytest.skip("compares the winograd orders with im2col")
    got64, got32, ref, rel = _against_im2col(monkeypatch, case, winograd.Cache, 11)
    for a, e in zip(got64, ref):
        assert rel(a, e) < 1e-12
    if host_order == "winograd" and case[5] == 3:
        for a, e in zip(got32, ref):
            assert rel(a, e) < 2e-6


@pytest.mark.parametrize("m, r", [(2, 3), (4, 3), (2, 5), (3, 2), (6, 3)])
def test_winograd_transforms_compute_the_correlation(m, r):
    """The derived (A^T, G, B^T): y = A^T [(G g) * (B^T d)] is the 1-D correlation y_i = sum_k g_k d_{i+k},
    exactly in rational arithmetic; the rows of B^T are coprime integers."""
    AT, G, BT = winograd.transforms(m, r)
    n = m + r - 1
    r_ = np.random.default_rng(m * 10 + r)
    from fractions import Fraction

    g = [Fraction(int(v)) for v in r_.integers(-9, 10, r)]
    d = [Fraction(int(v)) for v in r_.integers(-9, 10, n)]
    Gg = [sum(G[k][i] * g[i] for i in range(r)) for k in range(n)]
    Bd = [sum(BT[k][j] * d[j] for j in range(n)) for k in range(n)]
    y = [sum(AT[i][k] * Gg[k] * Bd[k] for k in range(n)) for i in range(m)]
    assert y == [sum(g[k] * d[i + k] for k in range(r)) for i in range(m)]
    assert all(v.denominator == 1 for row in BT for v in row)
    if (m, r) == (2, 3):  # Lavin & Gray's F(2, 3) (up to the sign of the last row): adds and subtracts only
        assert {abs(v) for row in BT + AT for v in row} == {0, 1}


def test_winograd_only_where_it_pays(monkeypatch):
    """The defaults send a stride-1 square kernel through Winograd only with enough output pixels over the batch
    and enough input channels per group; the result is the same either way."""
    monkeypatch.setattr(conv_mod, "WINOGRAD_TILES", {3: 2})
    monkeypatch.setattr(conv_mod, "FOURIER", False)
    monkeypatch.setattr(conv_mod, "WINOGRAD_MIN_PIXELS", 1024)
    monkeypatch.setattr(conv_mod, "WINOGRAD_MIN_CHANNELS", 16)
    r = np.random.default_rng(14)
    for n, c, groups, expect in ((21, 16, 1, True), (20, 16, 1, False), (21, 16, 2, False), (21, 8, 1, False)):
        x, W = r.standard_normal((n, c, 7, 7)), r.standard_normal((4, c // groups, 3, 3))
        y, cache = conv2d_forward(x, W, None, pad=1, groups=groups)  # 21 * 49 = 1029 output pixels
        assert isinstance(cache, winograd.Cache) == expect, (n, c, groups)
        np.testing.assert_allclose(y, naive.conv2d(x, W, None, (1, 1), (1, 1), groups), rtol=1e-10, atol=1e-10)
    x, W = r.standard_normal((21, 16, 7, 7)), r.standard_normal((4, 16, 3, 3))
    assert not isinstance(conv2d_forward(x, W, None, stride=2, pad=1)[1], winograd.Cache)


def test_winograd_setting_parses_and_names_the_variable():
    assert conv_mod.parse_winograd("") == conv_mod.parse_winograd("1") == {3: 2}
    assert conv_mod.parse_winograd("0") == {}
    assert conv_mod.parse_winograd(" 3:4, 5:2 ") == {3: 4, 5: 2}
    for bad in ("yes", "3", "3:0", "1:2", "7:4", "3:2,x"):
        with pytest.raises(CpnetError, match=r"CPNET_WINOGRAD=.*expected 0, 1 or kernel:tile pairs"):
            conv_mod.parse_winograd(bad)


def test_winograd_workspace_changes_no_result(host_order):
    """With a workspace the Winograd and DFT paths reuse their buffers (forward's and backward's share some) from
    call to call: every result equals the one without it, a second backward on the same cache gives the same
    gradients, and a new batch size replaces the buffers."""
    if not host_order.startswith("winograd") and host_order != "fourier":
        pytest.skip("the winograd and fourier orders' buffers")
    r = np.random.default_rng(13)
    W, b = r.standard_normal((6, 2, 3, 3)), r.standard_normal(6)
    ws = {}
    for n in (3, 3, 2):
        x, dy = r.standard_normal((n, 4, 7, 5)), r.standard_normal((n, 6, 7, 5))
        y, cache = conv2d_forward(x, W, b, pad=1, groups=2, workspace=ws, relu=True)
        got = conv2d_backward(dy, cache, workspace=ws)
        again = conv2d_backward(dy, cache, workspace=ws)
        y0, c0 = conv2d_forward(x, W, b, pad=1, groups=2, relu=True)
        np.testing.assert_array_equal(y, y0)
        for a, a2, e in zip(got, again, conv2d_backward(dy, c0)):
            np.testing.assert_array_equal(a, e)
            np.testing.assert_array_equal(a2, e)
    if host_order == "fourier":  # x's width transform: (N*C*H, 2 Kv) on planes of 8 x 6 (Kv = 4), N = 2
        assert ws["fx_a"].shape == (2 * 4 * 7, 2 * 4)
        return
    m = WINO[host_order][3]
    assert ws["wino_V"].size == (m + 2) ** 2 * -(-7 // m) * -(-5 // m) * 2 * 4  # n^2 * tiles * N * C, N = 2


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
    monkeypatch.setattr(conv_mod, "WINOGRAD_TILES", {})
    monkeypatch.setattr(conv_mod, "FOURIER", False)
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


FOURIER_CASES = [
    (3, 32, 15, 15, 16, 5, 5, 1, 2, 1),  # alexnet-small's conv2 (fewer filters)
    (3, 48, 7, 7, 24, 3, 3, 1, 1, 2),  # conv4-like, grouped
    (2, 16, 9, 6, 8, 4, 2, 1, (2, 0), 1),  # rectangular, an even kernel, padding beyond half the kernel
    (2, 16, 1, 3, 4, 5, 3, 1, (2, 1), 1),  # a kernel taller than the map: its taps wrap the plane but for S >= k
]


@pytest.mark.parametrize("case", FOURIER_CASES)
def test_fourier_equals_im2col_and_float32_stays_within_im2cols_rounding(host_order, monkeypatch, case):
    """float64: the DFT's y, dx, dW, db equal im2col's to 1e-12 relative; float32: within 1e-6 of float64
    (im2col's own float32 error on these maps is 2e-7 to 5e-7; Winograd's F(2x2, 5x5) reaches 3e-6 on conv2's)."""
    if host_order != "fourier":
        pytest.skip("compares the fourier order with im2col")
    got64, got32, ref, rel = _against_im2col(monkeypatch, case, fourier.Cache, 21)
    for a, e in zip(got64, ref):
        assert rel(a, e) < 1e-12
    for a, e in zip(got32, ref):
        assert rel(a, e) < 1e-6


def test_fourier_without_dx_and_with_relu(host_order):
    """need_dx=False gives no dx and the same dW, db; relu=True the same bits as a separate ReLU."""
    if host_order != "fourier":
        pytest.skip("the fourier order")
    x, W, b, kw = _arrays(np, FOURIER_CASES[0], seed=23)
    y, cache = conv2d_forward(x, W, b, **kw)
    yr, cache_r = conv2d_forward(x, W, b, relu=True, **kw)
    np.testing.assert_array_equal(yr, np.maximum(y, 0))
    dy = np.random.default_rng(24).standard_normal(y.shape)
    dx, dW, db = conv2d_backward(dy, cache)
    none, dW2, db2 = conv2d_backward(dy, cache, need_dx=False)
    assert none is None
    np.testing.assert_array_equal(dW, dW2)
    np.testing.assert_array_equal(db, db2)
    dxr, dWr, dbr = conv2d_backward(dy, cache_r)
    dxm, dWm, dbm = conv2d_backward(dy * (yr > 0), cache)
    for a, e in ((dxr, dxm), (dWr, dWm), (dbr, dbm)):
        np.testing.assert_array_equal(a, e)
    with pytest.raises(ValueError, match="dy must have the forward input's dtype float64"):
        conv2d_backward(dy.astype(np.float32), cache)


def test_fourier_only_where_it_pays(monkeypatch):
    """The defaults send a stride-1 layer through the DFT only with at least 16 input channels per group and at
    most 1024 filters a group per image; the result is the same either way, and CPNET_FOURIER=0 turns it off."""
    monkeypatch.setattr(conv_mod, "FOURIER", True)
    monkeypatch.setattr(conv_mod, "FOURIER_MIN_CHANNELS", 16)
    monkeypatch.setattr(conv_mod, "FOURIER_MAX_FILTERS_PER_IMAGE", 1024)
    monkeypatch.setattr(conv_mod, "WINOGRAD_TILES", {})
    r = np.random.default_rng(25)
    # (images, channels, filters, groups): filters per group Fg * Cg against 1024 per image
    for n, c, f, groups, expect in ((2, 32, 64, 1, True), (1, 32, 64, 1, False), (1, 32, 32, 1, True),
                                    (2, 16, 64, 1, True), (2, 8, 64, 1, False), (2, 32, 64, 4, False)):
        x, W = r.standard_normal((n, c, 6, 6)), r.standard_normal((f, c // groups, 3, 3))
        y, cache = conv2d_forward(x, W, None, pad=1, groups=groups)
        assert isinstance(cache, fourier.Cache) == expect, (n, c, f, groups)
        np.testing.assert_allclose(y, naive.conv2d(x, W, None, (1, 1), (1, 1), groups), rtol=1e-10, atol=1e-10)
    x, W = r.standard_normal((4, 32, 6, 6)), r.standard_normal((8, 32, 3, 3))
    assert not isinstance(conv2d_forward(x, W, None, stride=2, pad=1)[1], fourier.Cache)
    for env, on in (("0", False), ("1", True), ("", True)):
        monkeypatch.setattr(conv_mod, "FOURIER", None)
        monkeypatch.setenv("CPNET_FOURIER", env)
        assert isinstance(conv2d_forward(x, W, None, pad=1)[1], fourier.Cache) == on
    monkeypatch.setattr(conv_mod, "FOURIER", None)
    monkeypatch.setenv("CPNET_FOURIER", "yes")
    with pytest.raises(CpnetError, match=r"CPNET_FOURIER='yes': expected 0 \(off\) or 1"):
        conv2d_forward(x, W, None, pad=1)
