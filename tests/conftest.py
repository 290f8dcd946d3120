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
    for item in items:
        if "gpu" in item.keywords and gpus == 0:
            item.add_marker(skip)
        elif "multigpu" in item.keywords and gpus < 2:
            item.add_marker(skip_multi)


def _xp_params():
    """numpy always; cupy (marker gpu) as a second parameter, skipped without a GPU."""
    return [pytest.param("numpy", id="numpy"), pytest.param("cupy", id="cupy", marks=pytest.mark.gpu)]


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
    if "gpu" not in request.keywords and os.environ.get("CPNET_DEVICE", "auto").strip().lower() in ("", "auto"):
        monkeypatch.setenv("CPNET_DEVICE", "cpu")
