import os

import numpy as np
import pytest

from cpnet import backend
from cpnet.errors import CpnetError


def test_cpnet_device_values(monkeypatch):
    monkeypatch.setenv("CPNET_DEVICE", "cpu")
    assert backend.use_gpu() is False
    assert backend.default_placement(2) == [backend.HOST, backend.HOST]
    monkeypatch.setenv("CPNET_DEVICE", "tpu")
    with pytest.raises(CpnetError, match="CPNET_DEVICE='tpu': expected one of auto, cpu, gpu"):
        backend.use_gpu()


@pytest.mark.skipif(backend.gpu_count() > 0, reason="needs a machine without a GPU")
def test_forcing_gpu_without_one_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CPNET_DEVICE", "gpu")
    with pytest.raises(CpnetError, match="CPNET_DEVICE=gpu but no CUDA GPU is usable"):
        backend.use_gpu()
    monkeypatch.setenv("CPNET_DEVICE", "auto")
    assert backend.use_gpu() is False


def test_transfer_counts_only_real_moves():
    backend.reset_transfer_stats()
    x = np.ones((4, 5), np.float32)
    assert backend.transfer(x, backend.HOST) is x
    assert backend.transfer_stats() == {"bytes": 0, "count": 0}
    assert backend.get_array_module(x) is np and backend.device_of(x) == backend.HOST
    with backend.HOST:
        pass


def test_parse_device():
    assert backend.parse_device("cpu") == backend.HOST
    assert backend.parse_device("gpu:1") == backend.Device("gpu", 1)
    with pytest.raises(CpnetError, match="expected 'host', 'gpu' or 'gpu:N'"):
        backend.parse_device("cuda")


def test_host_threads_limits_blas_and_restores_it():
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    with backend.host_threads(1):
        assert all(n == 1 for n in blas_threads())
    assert blas_threads() == before
    assert backend.default_host_threads(workers=10**6) == 1
    cpus = len(os.sched_getaffinity(0))
    assert backend.default_host_threads(workers=0) == max(1, cpus // 2)
    with pytest.raises(CpnetError, match="--threads 0"):
        backend.host_threads(0)


@pytest.mark.skipif(backend.gpu_count() > 0, reason="CuPy is already imported on a GPU machine")
def test_enable_tf32_sets_cupys_switch_before_import(monkeypatch):
    import os

    monkeypatch.setenv("CUPY_TF32", "0")  # teardown restores the environment
    backend.enable_tf32()
    assert os.environ["CUPY_TF32"] == "1"
    monkeypatch.setattr(backend, "_cupy", object())  # CuPy already loaded: too late to switch
    monkeypatch.setenv("CUPY_TF32", "0")
    with pytest.raises(CpnetError, match="--tf32 must be chosen before CuPy is first used"):
        backend.enable_tf32()
