import numpy as np

from cpnet.layers import Dropout, counter_uniform


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
