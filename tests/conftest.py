import os

import numpy as np
import pytest

from cpnet import backend


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CuPy and a CUDA GPU (skipped otherwise)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "multigpu: needs two or more CUDA GPUs (also marked gpu; skipped otherwise)")


def pytest_collection_modifyitems(config, items):
    gpus = backend.gpu_count()
    skip = pytest.mark.skip(reason="no CUDA GPU with CuPy on this machine")
    skip_multi = pytest.mark.skip(reason=f"needs two or more CUDA GPUs ({gpus} here)")
    for item in items:  # markers, not keywords: those hold the folder names too (a checkout in .../gpu/)
        if item.get_closest_marker("gpu") and gpus == 0:
            item.add_marker(skip)
        elif item.get_closest_marker("multigpu") and gpus < 2:
            item.add_marker(skip_multi)


def _xp_params():
    """numpy always; cupy (marker gpu) as a second parameter, skipped without a GPU."""
    return [pytest.param("numpy", id="numpy"), pytest.param("cupy", id="cupy", marks=pytest.mark.gpu)]


@pytest.fixture(scope="session")
def shim():
    """The host shim (cpnet.kernels.shim) with every library built once per session (skips, with the reason,
    without g++)."""
    from cpnet.kernels import shim as shim_module

    try:
        shim_module.build_all()
    except shim_module.ShimUnavailable as e:
        pytest.skip(str(e))
    return shim_module


def load_launch_count():
    """bench/launch_count.py as a module: its stand-in CuPy (NumPy arrays passing for GPU 0's) and its counts."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "launch_count.py")
    spec = importlib.util.spec_from_file_location("launch_count", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def lc(shim):
    """bench/launch_count.py's module, with the host shim built (its stand-in runs cpnet's kernels through it)."""
    return load_launch_count()


@pytest.fixture(params=_xp_params())
def xp(request):
    """The array module under test: one test body runs on numpy and, with a GPU, on cupy."""
    if request.param == "numpy":
        return np
    return backend.cupy_module()


@pytest.fixture(autouse=True)
def _host_unless_marked_gpu(request, monkeypatch):
    """Tests not marked gpu run on the host on any machine: with CPNET_DEVICE=auto a GPU machine would otherwise
    put their models on the GPU, where they compare against NumPy without copying back."""
    if not request.node.get_closest_marker("gpu") and os.environ.get("CPNET_DEVICE", "auto").strip().lower() in ("", "auto"):
        monkeypatch.setenv("CPNET_DEVICE", "cpu")


def make_tiny_run(data_dir, ckpt_path, n=24, classes=3, size=17):
    """A synthetic dataset in `data_dir` (n training images of `size` px, `classes` classes) and an untrained
    alexnet-tiny checkpoint for it at `ckpt_path`; returns the Checkpoint."""
    from click.testing import CliRunner

    from cpnet import checkpoint
    from cpnet.cli.main import cli
    from cpnet.data import H5Dataset
    from cpnet.model import build_model, make_config

    r = CliRunner().invoke(cli, ["prep", "synthetic", "--out", str(data_dir), "--n", str(n), "--classes",
                                 str(classes), "--size", str(size), "--seed", "3", "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    with H5Dataset(os.path.join(data_dir, "train.h5")) as ds:
        names, mean = list(ds.classes), np.array(ds.mean)
    cfg = make_config("alexnet-tiny", classes, 15, init="he", seed=1)
    ck = checkpoint.Checkpoint(config=cfg, params=build_model(cfg).host_params(), classes=names, mean=mean,
                               scale=1 / 64, stored_size=size)
    checkpoint.save(ckpt_path, ck)
    return ck


def invoke(*args):
    """`cpnet ARGS...` through click's CliRunner (arguments as strings), exceptions raised, not caught."""
    from click.testing import CliRunner

    from cpnet.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def fused_training_steps(cfg, x, y, placement, steps=2, **build):
    """`steps` momentum-SGD steps (train mode, dropout step 5 at row offset 8, lr 0.05) of the fused model built
    from `cfg` on `placement` (build: build_model's dtype/precision); returns (last loss, the optimizer), whose
    model and velocities the caller compares between the host path and a GPU path."""
    from cpnet.model import build_model
    from cpnet.optim import MomentumSGD

    model = build_model(cfg, placement=placement, fuse=True, tower_threads=False, **build)
    model.set_step(5, offset=8)
    opt = MomentumSGD(model, lr=0.05)
    for _ in range(steps):
        loss, _ = model.loss(x, y, train=True)
        model.loss_backward()
        opt.step()
    return float(loss), opt
