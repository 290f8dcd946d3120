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
    with pytest.raises(CpnetError, match="^threads 0: expected at least 1") as e:  # the setting; the CLI: --threads
        backend.host_threads(0)
    assert str(e.value.flagged()) == "--threads 0: expected at least 1"


@pytest.mark.skipif(backend.gpu_count() > 0, reason="CuPy is already imported on a GPU machine")
def test_enable_tf32_sets_cupys_switch_and_switches_a_loaded_cupy(monkeypatch):
    import os
    import sys
    import types

    monkeypatch.setenv("CUPY_TF32", "0")  # teardown restores the environment
    backend.enable_tf32()  # CuPy not loaded: only the variable CuPy reads at its first float32 GEMM
    assert os.environ["CUPY_TF32"] == "1"

    # CuPy already loaded: the switch goes through CuPy's per-dtype compute type, on and off.
    calls = []
    linalg = types.SimpleNamespace(COMPUTE_TYPE_DEFAULT=1, COMPUTE_TYPE_TF32=7,
                                   set_compute_type=lambda dt, kind: calls.append((np.dtype(dt), kind)))
    core = types.ModuleType("cupy._core")
    core._routines_linalg = linalg
    fake = types.ModuleType("cupy")
    fake.__version__ = "0-test"
    fake._core = core
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "cupy._core", core)
    monkeypatch.setitem(sys.modules, "cupy._core._routines_linalg", linalg)
    monkeypatch.setattr(backend, "_cupy", fake)
    backend.enable_tf32()
    backend.set_tf32(False)
    assert calls == [(np.dtype(np.float32), 7), (np.dtype(np.float32), 1)]

    del linalg.set_compute_type  # a CuPy without the switch: a clear error, not an AttributeError
    with pytest.raises(CpnetError, match="cannot switch TF32 at run time"):
        backend.set_tf32(True)


def test_set_tf32_is_a_no_op_on_the_host(monkeypatch):
    import os

    monkeypatch.setattr(backend, "_cupy", False)
    monkeypatch.delenv("CUPY_TF32", raising=False)
    backend.set_tf32(True)  # no CuPy: nothing to switch, and no error
    backend.set_tf32(False)
    assert "CUPY_TF32" not in os.environ


@pytest.mark.gpu
def test_set_tf32_switches_float32_products_on_a_gpu():
    """Off: float32 products as accurate as FP32 accumulation gives; on: TF32's ~10-bit inputs show."""
    cp = backend.cupy_module()
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((512, 512)).astype(np.float32) for _ in range(2))
    exact = a.astype(np.float64) @ b.astype(np.float64)

    def rel_err():
        got = cp.asnumpy(cp.asarray(a) @ cp.asarray(b)).astype(np.float64)
        return float(np.abs(got - exact).max() / np.abs(exact).max())

    try:
        backend.set_tf32(False)
        off = rel_err()
        backend.set_tf32(True)
        on = rel_err()
    finally:
        backend.set_tf32(False)
    assert off < 2e-5 < on, (off, on)


def test_default_loader_workers_cpu_and_gpu(monkeypatch):
    import os

    monkeypatch.setattr(backend, "use_gpu", lambda: False)
    assert backend.default_loader_workers() == 0  # the host's CPUs run the BLAS threads
    monkeypatch.setattr(backend, "use_gpu", lambda: True)
    monkeypatch.setattr(backend, "gpu_count", lambda: 1)
    for cpus, want in ((16, 12), (8, 6), (2, 0), (1, 0), (64, 12)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        assert backend.default_loader_workers() == want, cpus
        assert backend.default_loader_workers([backend.HOST, backend.HOST]) == 0  # towers placed on the host


def test_upload_to_the_host_is_to_device():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert backend.upload(x, backend.HOST) is x


@pytest.mark.gpu
def test_upload_through_pinned_buffers_on_a_gpu():
    """backend.upload on a real GPU: each batch arrives whole, while the next two uploads and kernels on the
    compute stream are queued behind it (the stream protocol itself is tested on the stand-in in
    tests/test_launch_count.py); the result equals to_device's."""
    cp = backend.cupy_module()
    dev = backend.Device("gpu", 0)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((64, 3, 64, 64)).astype(np.float32) for _ in range(5)]
    sums = []
    with dev:
        for x in xs:
            g = backend.upload(x, dev)
            sums.append(g.sum(dtype=cp.float64))  # queued on the compute stream right behind the copy
        for x, s in zip(xs, sums):
            assert float(s) == pytest.approx(float(x.sum(dtype=np.float64)), rel=1e-12)
        last = backend.upload(xs[0][:8], dev)
        np.testing.assert_array_equal(cp.asnumpy(last), xs[0][:8])
        np.testing.assert_array_equal(cp.asnumpy(backend.upload(xs[1], dev)), xs[1])
