import numpy as np
import pytest

from cpnet.backend import to_host
from cpnet.layers import Dropout
from cpnet.ops import counter_uniform


def test_counter_uniform_is_a_function_of_seed_step_and_index(xp):
    a = counter_uniform(xp, (64, 512), seed=3, step=7)
    b = counter_uniform(xp, (64, 512), seed=3, step=7)
    c = counter_uniform(xp, (64, 512), seed=3, step=8)
    d = counter_uniform(xp, (64, 512), seed=4, step=7)
    assert a.dtype == np.float32 and a.shape == (64, 512)
    assert bool(xp.all(a == b)) and not bool(xp.all(a == c)) and not bool(xp.all(a == d))
    u = np.asarray(a.get() if hasattr(a, "get") else a, np.float64).ravel()
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - 12 ** -0.5) < 0.01
    counts, _ = np.histogram(u, bins=16, range=(0, 1))
    assert counts.min() > 0.9 * len(u) / 16 and counts.max() < 1.1 * len(u) / 16
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.02  # neighbouring counters are not correlated


def test_counter_uniform_is_the_same_on_every_backend(xp):
    a = counter_uniform(xp, (5, 7), seed=1, step=2)
    ref = counter_uniform(np, (5, 7), seed=1, step=2)
    np.testing.assert_array_equal(a.get() if hasattr(a, "get") else a, ref)


def test_dropout_layer_masks_depend_on_step_only():
    layer = Dropout(0.5, seed=9)
    x = np.ones((32, 64), np.float32)
    layer.step = 3
    y1 = layer.forward(x, train=True)
    y2 = layer.forward(x, train=True)
    layer.step = 4
    y3 = layer.forward(x, train=True)
    assert np.array_equal(y1, y2) and not np.array_equal(y1, y3)
    assert set(np.unique(y1)) == {0.0, 2.0} and abs((y1 == 0).mean() - 0.5) < 0.05
    assert np.array_equal(layer.forward(x, train=False), x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_layer_is_the_same_on_every_backend(xp, dtype):
    """y, the cached mask and dx bit for bit equal to the NumPy path (on a GPU: one kernel), odd sizes too."""
    for shape, p, seed, step in (((33, 65), 0.5, 9, 3), ((3, 7, 5), 0.2, 1, 0), ((4, 1000), 0.9, 2**40, 10**7)):
        x = np.random.default_rng(seed % 97).standard_normal(shape).astype(dtype)
        layers = [Dropout(p, seed), Dropout(p, seed)]
        for layer in layers:
            layer.step = step
        y, y_ref = layers[0].forward(xp.asarray(x), train=True), layers[1].forward(x, train=True)
        mask, mask_ref = layers[0]._cache, layers[1]._cache
        dy = x[..., ::-1].copy()
        dx, dx_ref = layers[0].backward(xp.asarray(dy)), layers[1].backward(dy)
        for a, b in ((y, y_ref), (mask, mask_ref), (dx, dx_ref)):
            a = to_host(a)
            assert a.dtype == dtype and a.shape == shape
            np.testing.assert_array_equal(a.view(f"u{a.itemsize}"), np.ascontiguousarray(b).view(f"u{a.itemsize}"))
        assert set(np.unique(to_host(mask))) == {0, dtype(1 / (1 - p))}
