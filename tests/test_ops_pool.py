import numpy as np
import pytest

import naive
from cpnet.backend import to_host
from cpnet.ops import max_pool2d_backward, max_pool2d_forward
from cpnet.ops.pool import argmax_flat, maxpool_backward_cpu, maxpool_forward_cpu
from gradcheck import numerical_grad, projected, rel_error

# (N, C, H, W, ksize, stride, pad)
CASES = [
    (2, 3, 7, 7, 3, 2, 0),  # overlapping 3/2, exact fit
    (2, 2, 8, 9, 3, 2, 0),  # partial windows dropped: floor output size
    (1, 3, 6, 6, 3, 2, 1),  # padding on every side
    (2, 1, 5, 4, 2, 2, 1),
    (1, 2, 13, 13, 3, 2, 0),  # AlexNet pool5 on 13x13
    (1, 1, 4, 4, 4, 1, 3),  # pad = ksize - 1: corner windows hold one real element
    (1, 2, 3, 3, 3, 3, 0),  # one window covering the whole plane
]


def _distinct(shape, seed):
    """Values spaced 0.1 apart in random order: no ties, and a 1e-3 step never changes a maximum."""
    r = np.random.default_rng(seed)
    return (r.permutation(int(np.prod(shape))) * 0.1 - 1.0).reshape(shape)


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_naive_loops(xp, case):
    N, C, H, W, k, s, p = case
    x = xp.asarray(np.random.default_rng(0).standard_normal((N, C, H, W)))
    y, cache = max_pool2d_forward(x, k, s, p)
    ry, rarg = naive.max_pool2d(to_host(x), k, s, p)
    np.testing.assert_array_equal(to_host(y), ry)
    assert argmax_flat(cache).dtype == np.int32
    np.testing.assert_array_equal(to_host(argmax_flat(cache)), rarg)


def test_padding_never_wins_against_negative_inputs(xp):
    x = xp.asarray(-1.0 - np.random.default_rng(1).random((1, 2, 5, 5)))
    y, _ = max_pool2d_forward(x, 3, 2, 1)
    assert float(y.max()) < -1.0
    ry, _ = naive.max_pool2d(to_host(x), 3, 2, 1)
    np.testing.assert_array_equal(to_host(y), ry)


def test_ties_go_to_the_first_maximum_in_row_major_order(xp):
    x = np.zeros((1, 1, 5, 5))
    x[0, 0, 1, 2] = x[0, 0, 2, 0] = x[0, 0, 2, 2] = 7.0  # window (0, 0) sees all three
    y, cache = max_pool2d_forward(xp.asarray(x), 3, 2, 0)
    arg = to_host(argmax_flat(cache))
    assert arg[0, 0, 0, 0] == 1 * 5 + 2
    assert arg[0, 0, 1, 0] == 2 * 5 + 0  # window (1, 0) starts at row 2: (2, 0) comes before (2, 2)
    assert arg[0, 0, 1, 1] == 2 * 5 + 2
    assert arg[0, 0, 0, 1] == 1 * 5 + 2
    flat = np.ones((1, 1, 4, 4))
    _, cache = max_pool2d_forward(xp.asarray(flat), 2, 2, 1)
    # with pad 1 the first *real* element of each window wins
    np.testing.assert_array_equal(to_host(argmax_flat(cache))[0, 0], [[0, 1, 3], [4, 5, 7], [12, 13, 15]])


def test_first_real_element_wins_when_all_are_minus_infinity(xp):
    x = xp.asarray(np.full((1, 1, 3, 3), -np.inf))
    y, cache = max_pool2d_forward(x, 2, 1, 1)
    np.testing.assert_array_equal(to_host(argmax_flat(cache))[0, 0], [[0, 0, 1, 2], [0, 0, 1, 2], [3, 3, 4, 5], [6, 6, 7, 8]])
    assert np.all(np.isneginf(to_host(y)))


@pytest.mark.parametrize("case", [(2, 2, 7, 7, 3, 2, 0), (1, 3, 6, 7, 3, 2, 1), (1, 2, 5, 5, 2, 1, 1)])
def test_gradient_overlapping_windows(xp, case):
    """Max relative error against central differences (eps 1e-3 << the 0.1 spacing of the inputs) below 1e-8:
    pooling is linear between ties, so the difference quotient is exact up to rounding."""
    N, C, H, W, k, s, p = case
    x = xp.asarray(_distinct((N, C, H, W), 2))
    y, cache = max_pool2d_forward(x, k, s, p)
    dy = xp.asarray(np.random.default_rng(3).standard_normal(y.shape))
    dx = max_pool2d_backward(dy, cache)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    f = projected(xp, lambda: max_pool2d_forward(x, k, s, p)[0], dy)
    assert rel_error(dx, numerical_grad(f, x, 1e-3)) < 1e-8


def test_backward_sums_every_window_an_input_wins(xp):
    x = np.zeros((1, 1, 5, 5))
    x[0, 0, 2, 2] = 1.0  # the centre wins all four overlapping 3/2 windows
    y, cache = max_pool2d_forward(xp.asarray(x), 3, 2, 0)
    dy = xp.asarray(np.array([[[[1.0, 2.0], [3.0, 4.0]]]]))
    dx = to_host(max_pool2d_backward(dy, cache))
    assert dx[0, 0, 2, 2] == 10.0 and dx.sum() == 10.0


def test_cpu_helpers_round_trip():
    x = _distinct((2, 3, 9, 8), 4)
    y, arg = maxpool_forward_cpu(x, 3, 2, 1)
    dx = maxpool_backward_cpu(np.ones_like(y), arg, x.shape, 3, 2, 1)
    winners = np.zeros(x.shape)
    for n in range(2):
        for c in range(3):
            np.add.at(winners[n, c].reshape(-1), arg[n, c].reshape(-1), 1.0)
    np.testing.assert_array_equal(dx, winners)


# (N, C, H, W, k, s, p): odd sizes, windows that do and do not overlap, padding, k*k > 255 (int32 offsets)
HOST_CASES = [(5, 3, 9, 11, 3, 2, 0), (3, 2, 8, 7, 3, 2, 1), (2, 3, 7, 9, 2, 2, 0), (2, 1, 6, 6, 3, 1, 2),
              (1, 2, 17, 18, 16, 1, 0), (2, 2, 11, 10, 2, 3, 1), (2, 2, 12, 12, 3, 2, 0)]  # gaps; even sizes


@pytest.mark.parametrize("budget", [1, 2000, 10**9])
@pytest.mark.parametrize("case", HOST_CASES, ids=str)
def test_host_chunks_ties_and_nan_match_the_naive_loops(monkeypatch, case, budget):
    """The host path in chunks of one image, a few, all at once, on inputs with many ties (rounded values, zeros
    of both signs), -inf and NaN: values and winners equal to the naive loops (first maximum, first NaN), and
    the backward equal to the naive gather over those winners."""
    monkeypatch.setattr("cpnet.ops._host.CHUNK_BYTES", budget)
    N, C, H, W, k, s, p = case
    r = np.random.default_rng(11)
    for dtype in (np.float32, np.float64):
        x = np.round(r.standard_normal((N, C, H, W)) * 1.5).astype(dtype)
        x.reshape(-1)[r.choice(x.size, 6, replace=False)] = [np.nan, np.nan, -np.inf, np.inf, -0.0, 0.0]
        x[0, 0] = -np.inf  # a whole plane of -inf: the first real element of each window wins
        y, cache = max_pool2d_forward(x, k, s, p)
        ry, rarg = naive.max_pool2d(x, k, s, p)
        np.testing.assert_array_equal(y, ry.astype(dtype))
        np.testing.assert_array_equal(argmax_flat(cache), rarg)
        dy = r.standard_normal(y.shape).astype(dtype)
        dx = max_pool2d_backward(dy, cache)
        ref = np.zeros((N, C, H * W))
        for n in range(N):
            for c in range(C):
                for a, d in zip(rarg[n, c].ravel(), dy[n, c].ravel()):
                    ref[n, c, a] += d
        np.testing.assert_allclose(dx, ref.reshape(x.shape), rtol=1e-6, atol=1e-6)
        assert dx.dtype == dtype


def test_nan_propagates_and_the_first_nan_wins(xp):
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 2, 1], x[0, 0, 1, 2], x[0, 0, 0, 0] = np.nan, np.nan, 5.0
    y, cache = max_pool2d_forward(xp.asarray(x), 3, 2, 0)
    assert np.isnan(to_host(y)).all()
    assert int(to_host(argmax_flat(cache))[0, 0, 0, 0]) == 1 * 3 + 2


def test_float32_stays_float32(xp):
    x = xp.asarray(np.random.default_rng(5).standard_normal((2, 3, 7, 7)).astype(np.float32))
    y, cache = max_pool2d_forward(x)
    assert y.dtype == np.float32
    assert max_pool2d_backward(xp.ones_like(y), cache).dtype == np.float32


def test_errors_name_the_op_and_shape(xp):
    with pytest.raises(ValueError, match=r"max_pool2d_forward: x must have shape \(N, C, H, W\), got \(3, 8, 8\)"):
        max_pool2d_forward(xp.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match=r"max_pool2d_forward: x must be float32, float64 or bf16 \(uint16\), got int32"):
        max_pool2d_forward(xp.zeros((1, 3, 8, 8), dtype=np.int32))
    with pytest.raises(ValueError, match="max_pool2d_forward: window 3 is larger than the padded input width"):
        max_pool2d_forward(xp.zeros((1, 3, 8, 2)))
    with pytest.raises(ValueError, match="max_pool2d_forward: pad must be smaller than ksize=3, got 3"):
        max_pool2d_forward(xp.zeros((1, 3, 8, 8)), 3, 2, 3)
    y, cache = max_pool2d_forward(xp.zeros((1, 3, 8, 8)))
    with pytest.raises(ValueError, match=r"max_pool2d_backward: dy must have the forward output's shape \(1, 3, 3, 3\)"):
        max_pool2d_backward(xp.zeros((1, 3, 8, 8)), cache)
