"""cpnet.dist: the world of one, replica placement and row blocks, and real multi-process runs under mpiexec
(MPICH from the venv, oversubscribed on a small machine): gradient sums, start broadcast and checksum, faults."""

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from cpnet import dist
from cpnet.backend import HOST
from cpnet.errors import CpnetError

HERE = os.path.dirname(os.path.abspath(__file__))
PROG = os.path.join(HERE, "mpi_prog.py")


def mpiexec_path():
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return local if os.path.exists(local) else shutil.which("mpiexec")


_mpi_ok = None


def need_mpi():
    """Skip (with the reason) unless `mpiexec -n 2` can start two Python processes that import mpi4py."""
    global _mpi_ok
    if _mpi_ok is None:
        exe = mpiexec_path()
        if exe is None:
            _mpi_ok = "no mpiexec (pip install 'cpnet[dist]' brings MPICH's)"
        else:
            try:
                r = subprocess.run([exe, "-n", "2", sys.executable, "-c", "from mpi4py import MPI; "
                                    "assert MPI.COMM_WORLD.size == 2"], capture_output=True, text=True, timeout=60)
                _mpi_ok = True if r.returncode == 0 else f"mpiexec -n 2 cannot start MPI: {r.stderr.strip()[-300:]}"
            except (OSError, subprocess.TimeoutExpired) as e:
                _mpi_ok = f"mpiexec -n 2 cannot start MPI: {e}"
    if _mpi_ok is not True:
        pytest.skip(_mpi_ok)


def mpirun(n, args, timeout=120, env=None):
    """`mpiexec -n n python ARGS` as a subprocess; returns the CompletedProcess (text output)."""
    need_mpi()
    e = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
             OPENBLAS_NUM_THREADS="1", CPNET_DEVICE="cpu", **(env or {}))
    return subprocess.run([mpiexec_path(), "-n", str(n), sys.executable] + list(args), capture_output=True,
                          text=True, timeout=timeout, env=e)


# ---- one process ------------------------------------------------------------------------------------------------

def test_world_of_one_is_the_identity(monkeypatch):
    for var in dist._SIZE_VARS + ("CPNET_MPI",):
        monkeypatch.delenv(var, raising=False)
    assert dist.launched_size() == 1
    w = dist.World()
    a = np.arange(4.0)
    assert w.sum(a) is a and w.bcast_array(a) is a and np.array_equal(a, np.arange(4.0))
    assert w.any(True) and not w.any(False) and w.gather(3) == [3] and w.is_root
    from cpnet.model import build_model, make_config

    m = build_model(make_config("alexnet-tiny", 3, 15), placement=[HOST, HOST], tower_threads=False)
    reps = dist.Replicas(w, m)
    assert reps.buckets == [] and reps.describe() == ""
    m.loss(np.ones((2, 3, 15, 15), np.float32), np.array([0, 1]), train=True)
    m.loss_backward()
    before = {k: v.copy() for k, v in m.grads().items()}
    reps.start()
    reps.reduce()
    assert all(np.array_equal(before[k], v) for k, v in m.grads().items())


def test_launcher_variables(monkeypatch):
    for var in dist._SIZE_VARS + ("CPNET_MPI",):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PMI_SIZE", "4")
    assert dist.launched_size() == 4
    monkeypatch.setenv("CPNET_MPI", "0")
    assert dist.launched_size() == 1
    monkeypatch.setenv("CPNET_MPI", "yes")
    with pytest.raises(CpnetError, match="CPNET_MPI"):
        dist.launched_size()


class _Fake(dist.World):
    def __init__(self, rank, size, local_rank, local_size):
        self.rank, self.size, self.local_rank, self.local_size = rank, size, local_rank, local_size


def test_row_blocks_and_placement(monkeypatch):
    assert dist.shard_rows(_Fake(1, 4, 1, 4), 16) == (4, 4)
    with pytest.raises(CpnetError, match="--batch-size 10.*multiple of 4"):
        dist.shard_rows(_Fake(0, 4, 0, 4), 10)
    assert dist.replica_placement(_Fake(1, 2, 1, 2)) == [HOST, HOST]  # CPNET_DEVICE=cpu in tests
    from cpnet import backend

    monkeypatch.setattr(backend, "use_gpu", lambda: True)
    gpu = lambda i: backend.Device("gpu", i)  # noqa: E731
    # 8 GPUs, 4 replicas per node: two towers on two GPUs each, by node-local rank
    assert dist.replica_placement(_Fake(6, 8, 2, 4), None, gpu_count=8) == [gpu(4), gpu(5)]
    assert dist.replica_placement(_Fake(6, 8, 2, 4), 1, gpu_count=8) == [gpu(2), gpu(2)]
    assert dist.replica_placement(_Fake(2, 4, 2, 4), None, gpu_count=4) == [gpu(2), gpu(2)]
    with pytest.raises(CpnetError, match="needs GPUs 6..7, but the node has 4"):
        dist.replica_placement(_Fake(3, 4, 3, 4), 2, gpu_count=4)
    with pytest.raises(CpnetError, match="expected 1 or 2"):
        dist.replica_placement(_Fake(0, 1, 0, 1), 3)


def test_reverse_layer_order():
    names = ["t0.conv1.W", "t0.conv1.b", "t1.conv1.W", "t0.fc7.b", "t1.fc7.W", "t0.fc7.W", "fc8.b", "fc8.W"]
    assert dist._reverse_layer_order(names) == ["fc8.W", "fc8.b", "t0.fc7.W", "t0.fc7.b", "t1.fc7.W",
                                                "t0.conv1.W", "t0.conv1.b", "t1.conv1.W"]


# ---- several processes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,standin", [(2, False), (4, False), (2, True)], ids=["mpi-2", "mpi-4", "nccl-standin-2"])
def test_gradient_sum_equals_one_process(tmp_path, n, standin):
    """Each replica's loss is the mean over its B/N rows; after the reduction every replica holds the gradient of
    the whole batch's mean (float64, to rounding), through MPI or the NCCL call path (with a stand-in module)."""
    out = tmp_path / "r.npz"
    r = mpirun(n, [PROG, "reduce", str(out)] + (["nccl-standin"] if standin else []))
    assert r.returncode == 0, r.stdout + r.stderr
    res = np.load(out)
    assert int(res["size"]) == n and float(res["err"]) < 1e-12
    assert ("NCCL" in str(res["describe"])) == standin


def test_start_parameters_broadcast_and_mismatch_detected():
    r = mpirun(2, [PROG, "broadcast"])
    assert r.returncode == 0 and r.stdout.count("same") == 2, r.stdout + r.stderr
    r = mpirun(2, [PROG, "mismatch"])
    assert r.returncode != 0
    assert "Error: rank 0 of 2: start parameters differ between replicas: rank 1 differs from rank 0" in r.stderr


def test_a_raising_rank_ends_the_job_naming_itself():
    t = time.monotonic()
    r = mpirun(2, [PROG, "raise", "1"], timeout=60)
    assert r.returncode != 0 and time.monotonic() - t < 30
    assert "Error: rank 1 of 2: RuntimeError: injected failure" in r.stderr


def test_a_killed_rank_ends_the_job():
    t = time.monotonic()
    r = mpirun(4, [PROG, "kill", "2"], timeout=60)
    assert r.returncode != 0 and time.monotonic() - t < 30, r.stdout + r.stderr
