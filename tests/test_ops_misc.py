import numpy as np
import pytest

from cpnet.backend import to_host
from cpnet.ops import (
    dropout_backward,
    dropout_forward,
    dropout_with_mask,
    linear_backward,
    linear_forward,
    relu_backward,
    relu_forward,
    softmax_cross_entropy_backward,
    softmax_cross_entropy_forward,
    tanh_backward,
    tanh_forward,
)
from gradcheck import numerical_grad, projected, rel_error


def _r(xp, shape, seed, dtype=np.float64):
    return xp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


# linear

@pytest.mark.parametrize("x_shape", [(4, 6), (3, 2, 2, 3)])
def test_linear_gradient(xp, x_shape):
    """Max relative error of dx, dW, db against central differences (float64, eps 1e-3; linear in each
    argument) below 1e-8."""
    x = _r(xp, x_shape, 0)
    d = int(np.prod(x_shape[1:]))
    W, b = _r(xp, (5, d), 1), _r(xp, (5,), 2)
    y, cache = linear_forward(x, W, b)
    assert y.shape == (x_shape[0], 5)
    np.testing.assert_allclose(to_host(y), to_host(x).reshape(x_shape[0], -1) @ to_host(W).T + to_host(b))
    dy = _r(xp, y.shape, 3)
    dx, dW, db = linear_backward(dy, cache)
    assert dx.shape == x.shape
    f = projected(xp, lambda: linear_forward(x, W, b)[0], dy)
    for a, p in ((dx, x), (dW, W), (db, b)):
        assert rel_error(a, numerical_grad(f, p, 1e-3)) < 1e-8


def test_linear_without_bias_and_float32(xp):
    x, W = _r(xp, (3, 4), 0, np.float32), _r(xp, (2, 4), 1, np.float32)
    y, cache = linear_forward(x, W, None)
    dx, dW, db = linear_backward(xp.ones_like(y), cache)
    assert y.dtype == dx.dtype == dW.dtype == np.float32 and db is None


def test_linear_errors(xp):
    with pytest.raises(ValueError, match=r"linear_forward: W must have shape \(out, in=6\), got \(5, 7\)"):
        linear_forward(xp.zeros((4, 6)), xp.zeros((5, 7)), None)
    with pytest.raises(ValueError, match=r"linear_forward: x must have shape \(N, in\) or \(N, \.\.\.\), got \(6,\)"):
        linear_forward(xp.zeros(6), xp.zeros((5, 6)), None)
    with pytest.raises(ValueError, match=r"linear_forward: b must have shape \(out,\)=\(5,\), got \(4,\)"):
        linear_forward(xp.zeros((4, 6)), xp.zeros((5, 6)), xp.zeros(4))
    with pytest.raises(ValueError, match=r"linear_forward: x must have a floating dtype or be bf16 \(uint16\), got int64"):
        linear_forward(xp.zeros((4, 6), dtype=np.int64), xp.zeros((5, 6)), None)
    with pytest.raises(ValueError, match="linear_forward: W must have x's dtype float32, got float64"):
        linear_forward(xp.zeros((4, 6), dtype=np.float32), xp.zeros((5, 6)), None)


# relu, tanh

def test_relu_gradient_away_from_zero(xp):
    """Inputs at least 0.1 from the kink; eps 1e-3; max relative error below 1e-8."""
    r = np.random.default_rng(4)
    x = r.uniform(0.1, 2.0, (3, 4, 5)) * r.choice([-1.0, 1.0], (3, 4, 5))
    x = xp.asarray(x)
    y, cache = relu_forward(x)
    np.testing.assert_array_equal(to_host(y), np.maximum(to_host(x), 0))
    dy = _r(xp, x.shape, 5)
    dx = relu_backward(dy, cache)
    assert rel_error(dx, numerical_grad(projected(xp, lambda: relu_forward(x)[0], dy), x, 1e-3)) < 1e-8


def test_relu_derivative_at_zero_is_zero(xp):
    y, cache = relu_forward(xp.zeros((2, 2), dtype=np.float32))
    assert y.dtype == np.float32
    assert float(relu_backward(xp.ones((2, 2), dtype=np.float32), cache).sum()) == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_keeps_nan_maps_negative_zero_to_zero_and_caches_y(xp, dtype):
    """NaN propagates (the training guard must see it); a NaN or inf upstream gradient stays non-finite where
    the unit is off (dy * 0), a finite one gives +0 or -0 there."""
    x = xp.asarray(np.array([np.nan, -0.0, 0.0, -np.inf, np.inf, -2.5, 3.0, -1.0, -1.0], dtype))
    y, cache = relu_forward(x)
    assert cache is y and y.dtype == dtype
    np.testing.assert_array_equal(np.signbit(to_host(y)), False)
    np.testing.assert_array_equal(to_host(y), [np.nan, 0, 0, 0, np.inf, 0, 3, 0, 0])
    with np.errstate(invalid="ignore"):
        dx = relu_backward(xp.asarray(np.array([1, 2, 3, 4, 5, 6, 7, np.nan, np.inf], dtype)), cache)
    np.testing.assert_array_equal(to_host(dx), [0, 0, 0, 0, 5, 0, 7, np.nan, np.nan])
    assert dx.dtype == dtype


def test_relu_equals_the_naive_loop_on_odd_sizes(xp):
    """Odd sizes (SIMD tails) with specials: bit for bit the scalar rule x > 0 or x is NaN ? x : 0, and
    dy * (y > 0)."""
    from bitwise import with_specials

    for shape in [(1,), (7,), (3, 5, 17), (2, 3, 33, 31)]:
        x = with_specials(shape, np.float32, 3)
        dy = with_specials(shape, np.float32, 4)[..., ::-1].copy()
        y, cache = relu_forward(xp.asarray(x))
        with np.errstate(invalid="ignore"):
            dx = relu_backward(xp.asarray(dy), cache)
        ref_y = np.array([v if (v > 0 or v != v) else np.float32(0) for v in x.ravel()], np.float32).reshape(shape)
        with np.errstate(invalid="ignore"):
            ref_dx = np.array([d * np.float32(1 if v > 0 else 0) for v, d in zip(ref_y.ravel(), dy.ravel())],
                              np.float32).reshape(shape)
        np.testing.assert_array_equal(to_host(y).view(np.uint32), ref_y.view(np.uint32))
        np.testing.assert_array_equal(to_host(dx).view(np.uint32), ref_dx.view(np.uint32))


def test_tanh_gradient(xp):
    """eps 1e-5; max relative error below 1e-7."""
    x = _r(xp, (3, 7), 6)
    y, cache = tanh_forward(x)
    dy = _r(xp, x.shape, 7)
    dx = tanh_backward(dy, cache)
    assert rel_error(dx, numerical_grad(projected(xp, lambda: tanh_forward(x)[0], dy), x, 1e-5)) < 1e-7


def test_activation_errors(xp):
    with pytest.raises(ValueError, match=r"relu_forward: x must have a floating dtype or be bf16 \(uint16\), got int32"):
        relu_forward(xp.zeros(3, dtype=np.int32))
    with pytest.raises(ValueError, match=r"tanh_backward: dy must have the forward input's shape \(3,\), got \(4,\)"):
        tanh_backward(xp.zeros(4), tanh_forward(xp.zeros(3))[1])


# dropout

def test_dropout_gradient_with_fixed_mask(xp):
    """A fixed mask makes dropout linear: eps 1e-3, max relative error below 1e-8."""
    x = _r(xp, (4, 6), 8)
    mask = xp.asarray(np.random.default_rng(9).random((4, 6)) > 0.5)
    y, cache = dropout_with_mask(x, 0.5, mask)
    np.testing.assert_array_equal(to_host(y), np.where(to_host(mask), 2 * to_host(x), 0.0))
    dy = _r(xp, x.shape, 10)
    dx = dropout_backward(dy, cache)
    f = projected(xp, lambda: dropout_with_mask(x, 0.5, mask)[0], dy)
    assert rel_error(dx, numerical_grad(f, x, 1e-3)) < 1e-8


def test_dropout_mask_of_zeros_and_ones(xp):
    x = xp.ones((2, 3), dtype=np.float32)
    m = xp.asarray(np.array([[1, 0, 1], [0, 0, 1]], dtype=np.float32))
    y, cache = dropout_with_mask(x, 0.25, m)
    assert y.dtype == np.float32
    np.testing.assert_allclose(to_host(y), to_host(m) / 0.75)
    np.testing.assert_allclose(to_host(dropout_backward(x, cache)), to_host(m) / 0.75)


def test_dropout_keeps_one_minus_p_and_preserves_the_mean(xp):
    x = xp.ones((200, 500), dtype=np.float32)
    y, cache = dropout_forward(x, 0.5, 0, 0, True)
    assert y.dtype == np.float32
    yh = to_host(y)
    assert set(np.unique(yh)) <= {0.0, 2.0}
    assert abs((yh > 0).mean() - 0.5) < 0.01
    assert abs(yh.mean() - 1.0) < 0.02
    np.testing.assert_array_equal(to_host(dropout_backward(x, cache)), yh)


def test_dropout_is_the_identity_at_test_time_and_for_p_zero(xp):
    x = _r(xp, (3, 4), 11)
    for p, train in ((0.5, False), (0.0, True)):
        y, cache = dropout_forward(x, p, 1, 2, train)
        assert y is x
        assert dropout_backward(x, cache) is x


def test_dropout_errors(xp):
    with pytest.raises(ValueError, match=r"dropout_forward: p must be in \[0, 1\), got 1.0"):
        dropout_forward(xp.zeros(3), 1.0, 0, 0, True)
    with pytest.raises(ValueError, match=r"dropout_forward: p must be in \[0, 1\), got -0.5"):
        dropout_forward(xp.zeros(3), -0.5, 0, 0, False)   # checked even where the op is the identity
    with pytest.raises(ValueError, match=r"dropout_forward: mask must have x's shape \(3,\), got \(4,\)"):
        dropout_with_mask(xp.zeros(3), 0.5, xp.ones(4))
    with pytest.raises(ValueError, match="dropout_forward: x must have a floating dtype"):
        dropout_forward(xp.zeros(3, dtype=np.int32), 0.5, 0, 0, True)


def test_dropout_offset_draws_the_global_rows_masks(xp):
    """Rows [offset, offset + n) of a global batch get exactly those rows' masks, whatever the split."""
    x = _r(xp, (12, 5, 3), 12).astype(np.float32)
    y_all, m_all = dropout_forward(x, 0.5, 7, 11, True)
    parts = [dropout_forward(x[a:b], 0.5, 7, 11, True, offset=a) for a, b in ((0, 5), (5, 6), (6, 12))]
    np.testing.assert_array_equal(to_host(xp.concatenate([m for _, m in parts])), to_host(m_all))
    np.testing.assert_array_equal(to_host(xp.concatenate([y for y, _ in parts])), to_host(y_all))
    shifted = dropout_forward(x[:6], 0.5, 7, 11, True, offset=1)[1]
    assert not np.array_equal(to_host(shifted), to_host(m_all[:6]))   # the offset moves the counters


# softmax cross-entropy

def _ce_reference(z, labels):
    z = np.asarray(z, dtype=np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return -np.mean(np.log(p[np.arange(len(labels)), labels])), p


def test_softmax_cross_entropy_value_and_gradient(xp):
    """eps 1e-5; max relative error of dlogits below 1e-7."""
    z = _r(xp, (5, 7), 12)
    labels = np.array([0, 6, 3, 3, 1])
    loss, cache = softmax_cross_entropy_forward(z, labels)
    assert loss.shape == () and loss.dtype == np.float64
    ref, p = _ce_reference(to_host(z), labels)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-12)
    np.testing.assert_allclose(to_host(cache[0]), p, rtol=1e-12)
    dz = softmax_cross_entropy_backward(cache)
    num = numerical_grad(lambda: softmax_cross_entropy_forward(z, labels)[0], z, 1e-5)
    assert rel_error(dz, num) < 1e-7


def test_softmax_cross_entropy_is_stable_for_huge_logits(xp):
    z = xp.asarray(np.array([[1000.0, 0.0, -1000.0], [-5000.0, 5000.0, 4990.0]], dtype=np.float32))
    labels = xp.asarray(np.array([0, 2]))
    loss, cache = softmax_cross_entropy_forward(z, labels)
    assert loss.dtype == np.float32
    np.testing.assert_allclose(float(loss), 10.0 / 2, rtol=1e-5)
    dz = to_host(softmax_cross_entropy_backward(cache))
    assert np.all(np.isfinite(dz)) and dz.dtype == np.float32
    np.testing.assert_allclose(dz.sum(axis=1), 0.0, atol=1e-6)


def test_softmax_cross_entropy_errors(xp):
    z = xp.zeros((3, 4))
    with pytest.raises(ValueError, match=r"softmax_cross_entropy_forward: logits must have shape \(N, K\), got \(12,\)"):
        softmax_cross_entropy_forward(xp.zeros(12), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match=r"softmax_cross_entropy_forward: labels must have shape \(N,\)=\(3,\), got \(2,\)"):
        softmax_cross_entropy_forward(z, np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="softmax_cross_entropy_forward: labels must have an integer dtype"):
        softmax_cross_entropy_forward(z, np.zeros(3))
    with pytest.raises(ValueError, match=r"softmax_cross_entropy_forward: labels must lie in \[0, K=4\), got values in \[0, 4\]"):
        softmax_cross_entropy_forward(z, np.array([0, 4, 1]))
