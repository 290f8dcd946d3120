"""The two-tower AlexNet: shapes, presets, the exchanges against a grouped single-stream reference, whole-network
gradient check, and overfitting a small batch."""

import math

import numpy as np
import pytest

from cpnet import backend, ops
from cpnet.errors import CpnetError
from cpnet.ops import conv as conv_mod
from cpnet.model import build_model, fc6_fan_in, feature_shapes, make_config, min_crop
from cpnet.optim import MomentumSGD

from gradcheck import rel_error


def tiny(classes=5, **kw):
    kw.setdefault("conventions", "paper")
    return make_config("alexnet-tiny", classes, **kw)


def test_window_out_is_the_one_output_size_formula():
    from cpnet import kernels
    from cpnet.ops import _check
    from cpnet.shapes import window_out

    assert window_out(227, 11, 4) == 55 and window_out(55, 3, 2) == 27 and window_out(224, 11, 4, 2) == 55
    assert window_out(13, 3, 2) == 6 and window_out(5, 5) == 1 and window_out(32, 5, 1, 2) == 32
    for size, k, s, p in ((227, 11, 4, 0), (17, 3, 2, 1), (8, 2, 3, 0)):  # the checked variants agree with it
        assert _check.out_size("op", size, k, s, p, "height") == kernels.out_size("op", size, k, s, p) \
            == window_out(size, k, s, p)


def test_alexnet_fc6_fan_in_is_9216_for_227_and_224():
    assert fc6_fan_in(make_config("alexnet", 1000, 227)) == 9216
    cfg224 = make_config("alexnet", 1000, 224)
    assert cfg224.conv[0][3] == 2 and fc6_fan_in(cfg224) == 9216
    s = feature_shapes(make_config("alexnet", 1000, 227))
    assert s["conv1"] == (96, 55, 55) and s["pool1"] == (96, 27, 27) and s["pool2"] == (256, 13, 13)
    assert s["pool5"] == (256, 6, 6) and s["fc6"] == (4096,) and s["fc8"] == (1000,)


def test_alexnet_parameter_count_matches_paper_scale():
    m = build_model(make_config("alexnet", 1000, 227), placement=[backend.HOST, backend.HOST])
    # the paper: "60 million parameters"
    assert 60e6 < m.num_params() < 61.5e6


def test_small_preset_shapes_and_crop_limits():
    cfg = make_config("alexnet-small", 10, 32)
    s = feature_shapes(cfg)
    assert s["pool1"] == (64, 15, 15) and s["pool2"] == (128, 7, 7) and s["pool5"] == (128, 3, 3)
    assert fc6_fan_in(cfg) == 1152
    lo = min_crop(cfg)
    with pytest.raises(CpnetError, match="at least"):
        make_config("alexnet-small", 10, lo - 1)
    make_config("alexnet-small", 10, 40)  # larger crops work: the fc fan-in follows


def test_width_scales_every_layers_kernels_and_units_and_the_wider_net_runs():
    base, wide = make_config("alexnet-small", 10), make_config("alexnet-small", 10, width=1.5)
    assert [c[0] for c in wide.conv] == [48, 96, 144, 144, 96] and wide.fc == [384, 384]
    assert [c[1:] for c in wide.conv] == [c[1:] for c in base.conv]  # kernels, strides and pads as the preset's
    assert fc6_fan_in(wide) == 2 * 96 * 3 * 3 and feature_shapes(wide)["conv3"] == (288, 7, 7)
    assert make_config("alexnet-small", 10, width=1.0) == base
    # rounded half up, at least one kernel or unit per tower
    assert [c[0] for c in tiny(width=0.5).conv] == [2, 2, 2, 2, 2] and tiny(width=0.5).fc == [3, 3]
    assert [c[0] for c in tiny(width=0.01).conv] == [1] * 5 and tiny(width=0.01).fc == [1, 1]
    m1, m2 = build_model(tiny(width=1.0)), build_model(tiny(width=2.0))
    assert m2.num_params() > 3 * m1.num_params()
    x = np.random.default_rng(0).standard_normal((3, 3, 15, 15)).astype(np.float32)
    loss, logits = m2.loss(x, np.array([0, 1, 2]))
    assert np.isfinite(float(loss)) and logits.shape == (3, 5)
    m2.loss_backward()
    params, grads = m2.params(), m2.grads()
    assert params.keys() == grads.keys()
    assert all(grads[k].shape == params[k].shape and np.isfinite(backend.to_host(grads[k])).all() for k in params)
    assert params["t0.conv1.W"].shape == (6, 3, 3, 3) and params["t1.conv2.W"].shape == (8, 6, 3, 3)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(CpnetError, match="^width .*: expected a positive number") as e:
            make_config("alexnet-tiny", 10, width=bad)
        assert str(e.value.flagged()).startswith("--width ")


def test_bad_names_are_clear_errors():
    """The model names the setting; the option checks above it (CLI, train.run) name the flag."""
    with pytest.raises(CpnetError, match="^model 'vgg': expected one of alexnet, ") as e:
        make_config("vgg", 10)
    assert str(e.value.flagged()).startswith("--model 'vgg': expected one of")
    with pytest.raises(CpnetError, match="^conventions 'torch'"):
        make_config("alexnet-tiny", 10, conventions="torch")
    with pytest.raises(CpnetError, match="^init 'xavier'"):
        make_config("alexnet-tiny", 10, init="xavier")
    with pytest.raises(CpnetError, match=r"^crop 3: model alexnet-tiny needs crops of at least 15") as e:
        make_config("alexnet-tiny", 10, 3)
    assert str(e.value.flagged()).startswith("--crop 3: ")


def test_init_presets():
    cfg = make_config("alexnet-tiny", 4, init="paper")
    p = build_model(cfg).host_params()
    assert np.all(p["t0.conv2.b"] == 1) and np.all(p["t1.fc7.b"] == 1) and np.all(p["t0.conv1.b"] == 0)
    assert np.all(p["t0.conv3.b"] == 0) and np.all(p["fc8.b"] == 0)
    assert abs(p["t0.fc6.W"].std() - 0.01) < 0.01
    p = build_model(make_config("alexnet-tiny", 4, init="caffe")).host_params()
    assert np.all(p["t0.conv4.b"] == np.float32(0.1))
    w = build_model(make_config("alexnet-small", 4, init="he")).host_params()["t0.conv2.W"]
    std = math.sqrt(2 / (w.shape[1] * w.shape[2] * w.shape[3]))
    assert abs(w.std() - std) < 0.05 * std


# ---- the exchanges: two towers == one stream with grouped convolutions -------------------------------------------

def _cat(p, name):
    return np.concatenate([p[f"t0.{name}"], p[f"t1.{name}"]], axis=0)


def _lrn_grouped(x, cfg):
    """LRN normalises within a tower: split the channels, normalise each half, concatenate."""
    h = x.shape[1] // 2
    outs, caches = zip(*(ops.lrn_forward(x[:, g * h:(g + 1) * h], **cfg.lrn) for g in range(2)))
    return np.concatenate(outs, axis=1), caches


def _lrn_grouped_back(dy, caches):
    h = dy.shape[1] // 2
    return np.concatenate([ops.lrn_backward(dy[:, g * h:(g + 1) * h], caches[g]) for g in range(2)], axis=1)


def reference_forward_backward(p, cfg, x, labels):
    """A single stream: conv2, conv4, conv5 as groups=2 convolutions; conv1 (both towers see the image), conv3 and
    the FC layers full."""
    pk, ps = cfg.pool
    tape = []

    def push(kind, cache):
        tape.append((kind, cache))

    h = x
    for i, groups in ((0, 1), (1, 2)):
        name = f"conv{i + 1}"
        h, c = ops.conv2d_forward(h, _cat(p, f"{name}.W"), _cat(p, f"{name}.b"), cfg.conv[i][2], cfg.conv[i][3], groups)
        push(("conv", name), c)
        h, c = ops.relu_forward(h)
        push(("relu",), c)
        h, c = _lrn_grouped(h, cfg)
        push(("lrn",), c)
        h, c = ops.max_pool2d_forward(h, pk, ps)
        push(("pool",), c)
    for i, groups in ((2, 1), (3, 2), (4, 2)):
        name = f"conv{i + 1}"
        h, c = ops.conv2d_forward(h, _cat(p, f"{name}.W"), _cat(p, f"{name}.b"), cfg.conv[i][2], cfg.conv[i][3], groups)
        push(("conv", name), c)
        h, c = ops.relu_forward(h)
        push(("relu",), c)
    h, c = ops.max_pool2d_forward(h, pk, ps)
    push(("pool",), c)
    shape = h.shape
    h = h.reshape(len(h), -1)
    for name in ("fc6", "fc7"):
        h, c = ops.linear_forward(h, _cat(p, f"{name}.W"), _cat(p, f"{name}.b"))
        push(("fc", name), c)
        h, c = ops.relu_forward(h)
        push(("relu",), c)
    logits, c = ops.linear_forward(h, p["fc8.W"], p["fc8.b"])
    push(("fc", "fc8"), c)
    loss, lc = ops.softmax_cross_entropy_forward(logits, labels)
    grads = {}
    d = ops.softmax_cross_entropy_backward(lc)
    for kind, c in reversed(tape):
        if kind[0] in ("conv", "fc"):
            d, gW, gb = (ops.conv2d_backward if kind[0] == "conv" else ops.linear_backward)(d, c)
            grads[kind[1]] = (gW, gb)
        elif kind[0] == "relu":
            d = ops.relu_backward(d, c)
        elif kind[0] == "lrn":
            d = _lrn_grouped_back(d, c)
        else:
            d = ops.max_pool2d_backward(d, c)
        if kind == ("fc", "fc6"):
            d = d.reshape(shape)
    return float(loss), logits, grads


@pytest.mark.parametrize("preset,crop", [("alexnet-tiny", 15), ("alexnet-small", 32)])
def test_two_towers_equal_grouped_single_stream_float64(preset, crop):
    cfg = make_config(preset, 7, crop, dropout=0.0, seed=3)
    m = build_model(cfg, dtype=np.float64, check_devices=True)
    p = m.host_params()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, crop, crop)) * 50
    y = rng.integers(0, 7, 4)
    loss, logits = m.loss(x, y, train=True)
    m.loss_backward()
    ref_loss, ref_logits, ref_grads = reference_forward_backward(p, cfg, x, y)
    np.testing.assert_allclose(backend.to_host(logits), ref_logits, rtol=1e-10, atol=1e-12)
    assert abs(float(loss) - ref_loss) < 1e-10
    g = {k: backend.to_host(v) for k, v in m.grads().items()}
    for name, (gW, gb) in ref_grads.items():
        if name == "fc8":
            np.testing.assert_allclose(g["fc8.W"], gW, rtol=1e-9, atol=1e-12)
            continue
        np.testing.assert_allclose(_cat(g, f"{name}.W"), gW, rtol=1e-9, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(_cat(g, f"{name}.b"), gb, rtol=1e-9, atol=1e-12, err_msg=name)


def test_transfers_count_bytes_only_between_distinct_devices():
    cfg = tiny()
    m = build_model(cfg, placement=[backend.HOST, backend.HOST])
    backend.reset_transfer_stats()
    m.loss(np.zeros((2, 3, 15, 15), np.float32), np.array([0, 1]))
    m.loss_backward()
    assert backend.transfer_stats()["bytes"] == 0  # one device: exchanges are no-ops


# ---- whole-network gradient check ----------------------------------------------------------------------------------

def _host_algorithm(monkeypatch, algorithm):
    """The host's stride-1 convolutions all through im2col, Winograd's transforms or the DFT, whatever the
    layer's size."""
    monkeypatch.setattr(conv_mod, "WINOGRAD_TILES", {3: 2} if algorithm == "winograd" else {})
    monkeypatch.setattr(conv_mod, "WINOGRAD_MIN_PIXELS", 0)
    monkeypatch.setattr(conv_mod, "WINOGRAD_MIN_CHANNELS", 0)
    monkeypatch.setattr(conv_mod, "FOURIER", algorithm == "fourier")
    monkeypatch.setattr(conv_mod, "FOURIER_MIN_CHANNELS", 0)
    monkeypatch.setattr(conv_mod, "FOURIER_MAX_FILTERS_PER_IMAGE", 10**9)


@pytest.mark.parametrize("conventions, algorithm", [("paper", "im2col"), ("caffe", "im2col"), ("paper", "winograd"),
                                                    ("paper", "fourier")])
def test_whole_network_gradient_check_float64(conventions, algorithm, monkeypatch):
    """Central differences through both towers and every exchange, dropout on (masks fixed by the step); with
    winograd or fourier, every convolution of alexnet-tiny (3x3, stride 1) through the host's Winograd or DFT
    path."""
    _host_algorithm(monkeypatch, algorithm)
    cfg = make_config("alexnet-tiny", 5, 15, conventions=conventions, init="he", seed=1)
    m = build_model(cfg, dtype=np.float64)
    m.set_step(7)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 3, 15, 15))
    y = np.array([0, 3, 4])

    def f():
        loss, _ = m.loss(x, y, train=True)
        m.clear()
        return float(loss)

    m.loss(x, y, train=True)
    m.loss_backward()
    grads = {k: backend.to_host(v).copy() for k, v in m.grads().items()}
    eps = 1e-5
    worst = 0.0
    for name, layer, key, t in m.param_slots():
        w = layer.params[key]
        flat = w.reshape(-1)
        for i in rng.choice(flat.size, size=min(6, flat.size), replace=False):
            old = flat[i]
            flat[i] = old + eps
            fp = f()
            flat[i] = old - eps
            fm = f()
            flat[i] = old
            num = (fp - fm) / (2 * eps)
            ana = grads[name].reshape(-1)[i]
            if abs(num) < 1e-9 and abs(ana) < 1e-9:
                continue
            worst = max(worst, rel_error(ana, num))
            assert rel_error(ana, num) < 1e-5, (name, i, ana, num)
    assert worst < 1e-5


def test_overfits_a_small_batch():
    cfg = make_config("alexnet-tiny", 4, 15, init="he", dropout=0.0, seed=0)
    m = build_model(cfg)
    opt = MomentumSGD(m, lr=0.02, momentum=0.9, weight_decay=0.0)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 3, 15, 15)) * 1.0).astype(np.float32)
    y = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    first = None
    for it in range(300):
        loss, _ = m.loss(x, y)
        first = first if first is not None else float(loss)
        m.loss_backward()
        opt.step()
        m.clear()
    assert first > 1.0
    assert float(loss) < 0.05, float(loss)


def test_momentum_sgd_matches_the_papers_rule():
    cfg = tiny()
    m = build_model(cfg, dtype=np.float64)
    opt = MomentumSGD(m, lr=0.1, momentum=0.9, weight_decay=0.0005)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 15, 15))
    y = np.array([1, 2])
    w0 = {k: v.copy() for k, v in m.host_params().items()}
    v = {k: np.zeros_like(a) for k, a in w0.items()}
    w = dict(w0)
    for _ in range(2):
        m.loss(x, y)
        m.loss_backward()
        g = {k: backend.to_host(a).copy() for k, a in m.grads().items()}
        opt.step()
        m.clear()
        for k in w:
            wd = 0.0005 if k.endswith(".W") else 0.0
            v[k] = 0.9 * v[k] - wd * 0.1 * w[k] - 0.1 * g[k]
            w[k] = w[k] + v[k]
    for k, a in m.host_params().items():
        np.testing.assert_allclose(a, w[k], rtol=1e-12, atol=1e-14, err_msg=k)


def test_input_shape_error_names_the_expected_shape():
    m = build_model(tiny())
    with pytest.raises(CpnetError, match=r"\(N, 3, 15, 15\)"):
        m.forward(np.zeros((2, 3, 16, 16), np.float32))


@pytest.mark.parametrize("algorithm", ["im2col", "winograd", "fourier"])
def test_host_towers_in_two_threads_give_bitwise_the_same_result(monkeypatch, algorithm):
    """With conv2-5 through im2col, conv3-5 through Winograd's transforms, conv2-5 through the DFT (whatever the
    batch's size)."""
    monkeypatch.delenv("CPNET_FUSE_TOWERS", raising=False)
    _host_algorithm(monkeypatch, algorithm)
    cfg = make_config("alexnet-small", 7, 32, seed=2)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 7, 6)
    out = []
    for threads in (False, True):
        m = build_model(cfg, tower_threads=threads, fuse=False)
        assert (m._pool is not None) == threads
        m.set_step(4)
        loss, logits = m.loss(x, y, train=True)
        m.loss_backward()
        out.append((float(loss), logits.copy(), {k: v.copy() for k, v in m.grads().items()}))
    assert out[0][0] == out[1][0]
    np.testing.assert_array_equal(out[0][1], out[1][1])
    for k in out[0][2]:
        np.testing.assert_array_equal(out[0][2][k], out[1][2][k], err_msg=k)


@pytest.mark.parametrize("conventions", ["paper", "caffe"])
def test_fused_towers_on_one_device_equal_the_two_tower_path(conventions):
    """The shared-device fast path (one grouped convolution / one GEMM per layer for both towers, the towers'
    parameters as views into one array) gives the two-tower results, dropout included, and trains the same."""
    cfg = make_config("alexnet-small", 7, 32, conventions=conventions, seed=4)
    split = build_model(cfg, dtype=np.float64, fuse=False, tower_threads=False)
    fused = build_model(cfg, dtype=np.float64, fuse=True)
    assert fused.fused and not split.fused
    assert fused.params()["t1.conv2.W"].base is fused.params()["t0.conv2.W"].base  # one array per layer
    opts = [MomentumSGD(m, lr=0.01) for m in (split, fused)]
    rng = np.random.default_rng(5)
    for step in range(3):
        x = rng.standard_normal((4, 3, 32, 32))
        y = rng.integers(0, 7, 4)
        out = []
        for m, opt in zip((split, fused), opts):
            m.set_step(step)
            loss, logits = m.loss(x, y, train=True)
            m.loss_backward()
            out.append((float(loss), logits.copy(), {k: v.copy() for k, v in m.grads().items()}))
            opt.step()
            m.clear()
        assert abs(out[0][0] - out[1][0]) < 1e-12 * max(1.0, abs(out[0][0]))
        np.testing.assert_allclose(out[1][1], out[0][1], rtol=1e-10, atol=1e-12)
        for k in out[0][2]:
            np.testing.assert_allclose(out[1][2][k], out[0][2][k], rtol=1e-9, atol=1e-12, err_msg=k)
    ps, pf = split.host_params(), fused.host_params()
    for k in ps:
        np.testing.assert_allclose(pf[k], ps[k], rtol=1e-10, atol=1e-13, err_msg=k)
    feats = [m.forward(x, upto="fc7") for m in (split, fused)]
    np.testing.assert_allclose(feats[1], feats[0], rtol=1e-10, atol=1e-12)


def test_cpnet_fuse_towers_values(monkeypatch):
    cfg = make_config("alexnet-tiny", 5, 15)
    monkeypatch.setenv("CPNET_FUSE_TOWERS", "1")
    assert build_model(cfg).fused
    monkeypatch.setenv("CPNET_FUSE_TOWERS", "0")
    assert not build_model(cfg).fused
    monkeypatch.setenv("CPNET_FUSE_TOWERS", "off")
    with pytest.raises(CpnetError, match="CPNET_FUSE_TOWERS='off': expected 0 or 1"):
        build_model(cfg)


def test_cpnet_fuse_lrn_pool_values(monkeypatch):
    """LRN -> pool of layers 1-2 as one layer: off on the host by default, on with =1 where the conventions
    normalise before pooling (never for Caffe's pool-then-LRN); the stage names stay."""
    from cpnet.layers import LRNPool, PoolInLRN

    cfg = make_config("alexnet-tiny", 5, 15)
    assert not build_model(cfg).lrn_pool
    monkeypatch.setenv("CPNET_FUSE_LRN_POOL", "1")
    for fuse in (True, False):
        m = build_model(cfg, fuse=fuse)
        layers = dict(m.stages[0].streams[0].named())
        assert m.lrn_pool and isinstance(layers["lrn1"], LRNPool) and isinstance(layers["pool2"], PoolInLRN)
        assert [n for n, _ in m.stages[0].streams[0].named()] == [
            "conv1", "act1", "lrn1", "pool1", "conv2", "act2", "lrn2", "pool2"]
    assert not build_model(make_config("alexnet-tiny", 5, 15, conventions="caffe")).lrn_pool
    assert not build_model(make_config("alexnet-tiny", 5, 15, lrn=False)).lrn_pool
    monkeypatch.setenv("CPNET_FUSE_LRN_POOL", "yes")
    with pytest.raises(CpnetError, match="CPNET_FUSE_LRN_POOL='yes': expected 0 or 1"):
        build_model(cfg)


@pytest.mark.parametrize("fuse", [True, False])
def test_lrn_pool_layers_train_as_the_separate_ones(monkeypatch, fuse):
    """On the host the LRNPool layer runs the two ops it stands for: the same loss and gradients, bit for bit."""
    cfg = make_config("alexnet-tiny", 5, 15, seed=4)
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((3, 3, 15, 15)), rng.integers(0, 5, 3)
    out = []
    for flag in ("0", "1"):
        monkeypatch.setenv("CPNET_FUSE_LRN_POOL", flag)
        m = build_model(cfg, dtype=np.float64, fuse=fuse, tower_threads=False)
        loss, _ = m.loss(x, y)
        m.loss_backward()
        out.append((float(loss), m.grads()))
    assert out[0][0] == out[1][0]
    for k, g in out[0][1].items():
        np.testing.assert_array_equal(out[1][1][k], g, err_msg=k)


def test_fused_model_loads_parameters_into_its_shared_arrays():
    cfg = make_config("alexnet-tiny", 5, 15, seed=1)
    src = build_model(make_config("alexnet-tiny", 5, 15, seed=9), dtype=np.float64).host_params()
    fused = build_model(cfg, dtype=np.float64, fuse=True)
    split = build_model(cfg, dtype=np.float64, fuse=False)
    fused.set_params(src)
    split.set_params(src)
    x = np.random.default_rng(0).standard_normal((3, 3, 15, 15))
    np.testing.assert_allclose(fused.forward(x), split.forward(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fuse", [False, True])
def test_param_memory_describes_every_parameter_once(fuse):
    """The blocks an optimizer (and a gradient reduction) walk: every named parameter is rows of exactly one
    contiguous block, held by its layer as a view of it; fused, both towers' rows share one block per array."""
    m = build_model(make_config("alexnet-tiny", 5, 15, seed=2), dtype=np.float64, fuse=fuse, tower_threads=False)
    blocks = m.param_memory()
    names = [name for blk in blocks for name, *_ in blk.parts]
    assert sorted(names) == sorted(m.params()) and len(names) == len(set(names))
    for blk in blocks:
        w = blk.param
        assert w.flags.c_contiguous and sum(b - a for _, _, a, b in blk.parts) == w.shape[0]
        for name, holder, a, b in blk.parts:
            assert holder.params[blk.key] is m.params()[name]
            assert np.shares_memory(holder.params[blk.key], w) and np.array_equal(holder.params[blk.key], w[a:b])
    assert [len(blk.parts) for blk in blocks] == ([2] * 14 + [1] * 2 if fuse else [1] * 30)
    x, y = np.random.default_rng(0).standard_normal((2, 3, 15, 15)), np.array([0, 4])
    m.loss(x, y)
    m.loss_backward()
    for blk in blocks:  # after backward each block's gradient holds its parts' gradients, in their rows
        for name, holder, a, b in blk.parts:
            np.testing.assert_array_equal(blk.grad[a:b], m.grads()[name])


@pytest.mark.parametrize("fuse", [False, True])
def test_the_stage_hook_sees_every_layer_call_and_changes_nothing(fuse):
    """forward/backward with a hook call each layer of the stage table through it, in order, and the exchanges
    (none when fused); the loss and every gradient are those of the unhooked pass, bit for bit."""
    cfg = make_config("alexnet-tiny", 5, 15, seed=2)
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((3, 3, 15, 15)), rng.integers(0, 5, 3)
    plain = build_model(cfg, dtype=np.float64, fuse=fuse)
    hooked = build_model(cfg, dtype=np.float64, fuse=fuse)
    calls = []

    def hook(name, phase, devices, call):
        calls.append((name, phase))
        return call()

    results = []
    for m, h in ((plain, None), (hooked, hook)):
        m.set_step(4)
        loss, logits = m.loss(x, y, train=True, hook=h)
        m.loss_backward(hook=h)
        results.append((float(loss), logits.copy(), {k: v.copy() for k, v in m.grads().items()}))
    assert results[0][0] == results[1][0] and np.array_equal(results[0][1], results[1][1])
    for k, g in results[0][2].items():
        np.testing.assert_array_equal(results[1][2][k], g, err_msg=k)
    towers = 1 if fuse else 2
    per_stage = [[n for n, _ in st.streams[0].named()] * (towers if len(st.streams) == 2 else 1)
                 for st in hooked.stages]
    forward = []
    for i, names in enumerate(per_stage):
        forward += (["exchange"] if (i and not fuse) else []) + names
    forward.append("loss")
    assert [n for n, p in calls if p == "forward"] == forward
    backward = [n for n, p in calls if p == "backward"]
    assert backward[:2] == ["loss", "fc8"] and backward.count("exchange") == (0 if fuse else 4)
    assert sorted(backward) == sorted(forward)
