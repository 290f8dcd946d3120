"""The model, the optimizer and training on a GPU against the host (marker gpu: skipped without CuPy and a GPU).

These run in `make test-gpu` and scripts/gpu_check.sh; on a machine without a GPU they are collected and skipped.
"""

import numpy as np
import pytest

from cpnet import backend
from cpnet.model import build_model, make_config
from cpnet.optim import MomentumSGD

pytestmark = pytest.mark.gpu


def _step(model, x, y, opt=None):
    loss, logits = model.loss(x, y, train=True)
    model.loss_backward()
    grads = {k: backend.to_host(v).copy() for k, v in model.grads().items()}
    if opt is not None:
        opt.step()
    model.clear()
    return float(loss), backend.to_host(logits), grads


def _host_and_gpu_steps(host, dev, steps=3):
    """Per SGD step of both models on the same random batch (16 crops of 32 px, 10 classes): (the host's _step,
    the GPU's _step)."""
    oh, od = MomentumSGD(host, lr=0.01), MomentumSGD(dev, lr=0.01)
    rng = np.random.default_rng(1)
    for i in range(steps):
        x = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
        y = rng.integers(0, 10, 16)
        host.set_step(i)
        dev.set_step(i)
        yield _step(host, x, y, oh), _step(dev, x, y, od)


@pytest.mark.parametrize("gpus,fuse", [(1, None), (1, False), (2, None)])
def test_gpu_towers_equal_the_host_in_float64(gpus, fuse, monkeypatch):
    """One GPU: the fused default and the two-tower path; two GPUs: a tower on each, exchanging activations."""
    monkeypatch.delenv("CPNET_FUSE_TOWERS", raising=False)
    if backend.gpu_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")
    placement = [backend.Device("gpu", 0), backend.Device("gpu", gpus - 1)]
    cfg = make_config("alexnet-small", 7, 32, seed=1)
    host = build_model(cfg, placement=[backend.HOST, backend.HOST], dtype=np.float64)
    dev = build_model(cfg, placement=placement, dtype=np.float64, check_devices=True, fuse=fuse)
    assert dev.fused == (gpus == 1 and fuse is None)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 32, 32))
    y = rng.integers(0, 7, 5)
    for m in (host, dev):
        m.set_step(3)  # dropout masks are the same function of (seed, step) on both
    backend.reset_transfer_stats()
    lh, zh, gh = _step(host, x, y)
    ld, zd, gd = _step(dev, x, y)
    assert abs(lh - ld) < 1e-10
    np.testing.assert_allclose(zd, zh, rtol=1e-9, atol=1e-11)
    for k in gh:
        np.testing.assert_allclose(gd[k], gh[k], rtol=1e-8, atol=1e-11, err_msg=k)
    moved = backend.transfer_stats()["bytes"]
    assert (moved > 0) == (gpus == 2)  # exchanges move bytes only between distinct devices


def test_gpu_training_steps_follow_the_host_in_float32():
    cfg = make_config("alexnet-small", 10, 32, seed=2)
    host = build_model(cfg, placement=[backend.HOST, backend.HOST])
    dev = build_model(cfg, placement=[backend.Device("gpu", 0)] * 2)
    for (lh, _, _), (ld, _, _) in _host_and_gpu_steps(host, dev):
        assert abs(lh - ld) < 1e-3 * max(1.0, abs(lh))
    ph, pd = host.host_params(), dev.host_params()
    for k in ph:
        np.testing.assert_allclose(pd[k], ph[k], rtol=1e-3, atol=1e-5, err_msg=k)


def test_gpu_train_run_end_to_end(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from cpnet.cli.main import cli

    monkeypatch.setenv("CPNET_DEVICE", "gpu")
    r = CliRunner().invoke(cli, ["prep", "synthetic", "--out", str(tmp_path / "d"), "--n", "256", "--classes", "4",
                                 "--size", "36", "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["train", "--data", str(tmp_path / "d"), "--model", "alexnet-small", "--epochs", "2",
                                 "--batch-size", "32", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert "tower 0: gpu:0" in r.output
    r = CliRunner().invoke(cli, ["eval", str(tmp_path / "run" / "best.h5"), "--data", str(tmp_path / "d" / "val.h5"),
                                 "--ten-crop", "--json"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("fuse", [None, False])
def test_gpu_bf16_step_follows_the_host_emulation(fuse, monkeypatch):
    """--precision bf16 on a GPU (bf16 kernels, cuBLAS GemmEx with float32 accumulation) against the host's
    emulation of the same rounding: the loss within 1e-2, the logits within 3 % of their largest, the whole
    gradient within 5 % in norm (cuBLAS and NumPy sum in different orders, and a bf16 rounding that flips moves a
    pooling winner), and the parameters after three steps within 5e-3 in norm."""
    monkeypatch.delenv("CPNET_FUSE_TOWERS", raising=False)
    cfg = make_config("alexnet-small", 10, 32, seed=2)
    host = build_model(cfg, placement=[backend.HOST, backend.HOST], precision="bf16")
    dev = build_model(cfg, placement=[backend.Device("gpu", 0)] * 2, precision="bf16", fuse=fuse)
    for (lh, zh, gh), (ld, zd, gd) in _host_and_gpu_steps(host, dev):
        assert zd.dtype == np.float32 and abs(lh - ld) < 1e-2 * max(1.0, abs(lh))
        assert np.abs(zd - zh).max() < 3e-2 * np.abs(zh).max()
        vh, vd = (np.concatenate([g[k].ravel() for k in sorted(g)]) for g in (gh, gd))
        assert np.linalg.norm(vd - vh) < 5e-2 * np.linalg.norm(vh)
    ph, pd = host.host_params(), dev.host_params()
    wh, wd = (np.concatenate([p[k].ravel() for k in sorted(p)]) for p in (ph, pd))
    assert np.linalg.norm(wd - wh) < 5e-3 * np.linalg.norm(wh)


def test_gpu_bf16_gemm_against_float32_of_the_same_inputs():
    """backend.gemm_bf16 on the GPU (the layouts the layers use) equals the float32 product of the widened inputs
    to float32 rounding (float32 output) or within one bf16 unit (bf16 output)."""
    from cpnet import precision

    cp = backend.cupy_module()
    rng = np.random.default_rng(3)
    a = precision.to_bf16(rng.standard_normal((64, 96)).astype(np.float32))
    b = precision.to_bf16(rng.standard_normal((96, 40)).astype(np.float32))
    ga, gb = cp.asarray(a), cp.asarray(b)
    at, bt = cp.asarray(np.ascontiguousarray(a.T)).T, cp.asarray(np.ascontiguousarray(b.T)).T  # transposed views
    for A, B in ((ga, gb), (at, gb), (ga, bt), (at, bt), (ga[3:50, 5:90], gb[5:90])):
        ref = precision.from_bf16(backend.to_host(A)) @ precision.from_bf16(backend.to_host(B))
        got = backend.to_host(precision.matmul(A, B))
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        got16 = precision.from_bf16(backend.to_host(precision.matmul(A, B, out_dtype=precision.BF16)))
        assert np.all(np.abs(got16 - ref) <= np.abs(ref) * 2**-7 + 1e-6 * np.abs(ref).max())
