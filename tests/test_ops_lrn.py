import numpy as np
import pytest

import naive
from cpnet.backend import to_host
from cpnet.ops import lrn_backward, lrn_forward
from cpnet.ops.lrn import lrn_backward_cpu, lrn_forward_cpu
from gradcheck import numerical_grad, projected, rel_error

# (shape, size, k, alpha, beta): the paper's constants, then large alphas so the cross-channel term dominates,
# even sizes (an asymmetric window), and fewer channels than the window.
CASES = [
    ((2, 7, 3, 3), 5, 2.0, 1e-4, 0.75),
    ((1, 6, 2, 3), 5, 1.0, 0.5, 0.75),
    ((2, 5, 2, 2), 4, 2.0, 0.3, 0.6),
    ((1, 3, 3, 2), 5, 1.5, 0.4, 0.75),
    ((1, 1, 3, 3), 3, 2.0, 0.7, 0.75),
    ((1, 8, 2, 2), 2, 1.0, 0.5, 1.0),
    ((1, 4, 2, 2), 1, 1.0, 0.5, 0.5),
]


def _x(xp, shape, seed=0, dtype=np.float64):
    return xp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


@pytest.mark.parametrize("convention", ["sum", "mean"])
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_naive_loops(xp, case, convention):
    shape, size, k, alpha, beta = case
    x = _x(xp, shape)
    y, cache = lrn_forward(x, size, k, alpha, beta, convention)
    ref = naive.lrn(to_host(x), size, k, alpha, beta, convention)
    np.testing.assert_allclose(to_host(y), ref, rtol=1e-12, atol=1e-14)


def test_conventions_differ_by_the_window_size(xp):
    x = _x(xp, (1, 6, 2, 2))
    ys, _ = lrn_forward(x, 5, 2.0, 0.5, 0.75, "sum")
    ym, _ = lrn_forward(x, 5, 2.0, 5 * 0.5, 0.75, "mean")
    np.testing.assert_allclose(to_host(ys), to_host(ym), rtol=1e-14)
    yd, _ = lrn_forward(x, 5, 2.0, 0.5, 0.75, "mean")
    assert not np.allclose(to_host(ys), to_host(yd))


def test_channel_edges_are_zero_padded(xp):
    """Channel 0 with size 5 sums channels 0..2 only; the divisor stays the window size ('mean')."""
    x = xp.asarray(np.arange(1.0, 7.0).reshape(1, 6, 1, 1))
    y, (_, _, scale, *_) = lrn_forward(x, 5, 2.0, 1.0, 0.75, "mean")
    s = to_host(scale)[0, :, 0, 0]
    np.testing.assert_allclose(s[0], 2.0 + (1 + 4 + 9) / 5)
    np.testing.assert_allclose(s[3], 2.0 + (4 + 9 + 16 + 25 + 36) / 5)
    np.testing.assert_allclose(s[5], 2.0 + (16 + 25 + 36) / 5)


@pytest.mark.parametrize("convention", ["sum", "mean"])
@pytest.mark.parametrize("case", CASES)
def test_gradient(xp, case, convention):
    """Max relative error of dx against central differences (float64, eps 1e-5) below 1e-6."""
    shape, size, k, alpha, beta = case
    x = _x(xp, shape, seed=1)
    y, cache = lrn_forward(x, size, k, alpha, beta, convention)
    dy = _x(xp, shape, seed=2)
    dx = lrn_backward(dy, cache)
    assert dx.shape == x.shape
    f = projected(xp, lambda: lrn_forward(x, size, k, alpha, beta, convention)[0], dy)
    assert rel_error(dx, numerical_grad(f, x, 1e-5)) < 1e-6


def test_cpu_helpers_take_alpha_eff():
    x = np.random.default_rng(3).standard_normal((2, 6, 3, 3))
    y, scale = lrn_forward_cpu(x, 5, 2.0, 0.1, 0.75)
    np.testing.assert_allclose(y, naive.lrn(x, 5, 2.0, 0.1, 0.75, "sum"), rtol=1e-12)
    dy = np.ones_like(x)
    np.testing.assert_array_equal(lrn_backward_cpu(x, y, scale, dy, 5, 0.1, 0.75),
                                  lrn_backward(dy, lrn_forward(x, 5, 2.0, 0.5, 0.75, "mean")[1]))


@pytest.mark.parametrize("budget", [1, 700, 10**9])
@pytest.mark.parametrize("beta", [0.75, 0.6])
def test_host_chunks_match_the_naive_loops(monkeypatch, budget, beta):
    """The host path walks the batch in chunks of images (one image, a few, all at once), with odd sizes and
    the two-square-root power for beta = 0.75: float64 equal to the naive loops, float32 within rounding."""
    monkeypatch.setattr("cpnet.ops._host.CHUNK_BYTES", budget)
    x = np.random.default_rng(7).standard_normal((5, 7, 3, 5)) * 4
    dy = np.random.default_rng(8).standard_normal(x.shape)
    y, cache = lrn_forward(x, 5, 2.0, 0.3, beta)
    np.testing.assert_allclose(y, naive.lrn(x, 5, 2.0, 0.3, beta, "sum"), rtol=1e-12, atol=1e-14)
    monkeypatch.setattr("cpnet.ops._host.CHUNK_BYTES", 10**9)
    y1, cache1 = lrn_forward(x, 5, 2.0, 0.3, beta)
    dx1 = lrn_backward(dy, cache1)
    monkeypatch.setattr("cpnet.ops._host.CHUNK_BYTES", budget)
    np.testing.assert_allclose(lrn_backward(dy, cache), dx1, rtol=1e-12, atol=1e-14)
    f = projected(np, lambda: lrn_forward(x, 5, 2.0, 0.3, beta)[0], dy)
    assert rel_error(dx1, numerical_grad(f, x, 1e-5)) < 1e-6
    x32 = x.astype(np.float32)
    y32, c32 = lrn_forward(x32, 5, 2.0, 0.3, beta)
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, y, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(lrn_backward(dy.astype(np.float32), c32), dx1, rtol=1e-5, atol=1e-5)


def test_nan_reaches_every_channel_of_its_window():
    x = np.ones((1, 7, 1, 2))
    x[0, 3, 0, 1] = np.nan
    y, _ = lrn_forward(x, 5, 2.0, 1e-4, 0.75)
    np.testing.assert_array_equal(np.isnan(y[0, :, 0, 1]), [False, True, True, True, True, True, False])
    assert not np.isnan(y[0, :, 0, 0]).any()


def test_float32_stays_float32(xp):
    x = _x(xp, (2, 8, 4, 4), dtype=np.float32)
    y, cache = lrn_forward(x)
    assert y.dtype == np.float32 and cache[2].dtype == np.float32
    ref = naive.lrn(to_host(x).astype(np.float64), 5, 2.0, 1e-4, 0.75, "sum")
    np.testing.assert_allclose(to_host(y), ref, rtol=1e-6)
    assert lrn_backward(xp.ones_like(y), cache).dtype == np.float32


def test_errors_name_the_op_and_shape(xp):
    with pytest.raises(ValueError, match=r"lrn_forward: x must have shape \(N, C, H, W\), got \(4, 5\)"):
        lrn_forward(xp.zeros((4, 5)))
    with pytest.raises(ValueError, match="lrn_forward: alpha_convention must be 'sum' or 'mean', got 'avg'"):
        lrn_forward(xp.zeros((1, 4, 2, 2)), alpha_convention="avg")
    with pytest.raises(ValueError, match="lrn_forward: size must be an int >= 1, got 0"):
        lrn_forward(xp.zeros((1, 4, 2, 2)), size=0)
    with pytest.raises(ValueError, match=r"lrn_forward: x must be float32, float64 or bf16 \(uint16\), got int64"):
        lrn_forward(xp.zeros((1, 4, 2, 2), dtype=np.int64))
    _, cache = lrn_forward(xp.zeros((1, 4, 2, 2)))
    with pytest.raises(ValueError, match=r"lrn_backward: dy must have the forward input's shape \(1, 4, 2, 2\)"):
        lrn_backward(xp.zeros((1, 4, 2, 3)), cache)


def test_host_path_takes_an_empty_batch():
    y, cache = lrn_forward(np.zeros((0, 4, 2, 2), np.float32))
    assert y.shape == (0, 4, 2, 2) and lrn_backward(np.zeros_like(y), cache).shape == (0, 4, 2, 2)
