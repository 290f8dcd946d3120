"""Programs that tests/test_dist.py runs under `mpiexec -n N` (one process per replica).

    python tests/mpi_prog.py reduce OUT.npz [nccl-standin]   sum of gradients over the replicas vs one process
    python tests/mpi_prog.py mismatch                         replicas built from different seeds, no broadcast
    python tests/mpi_prog.py broadcast                        the same, after Replicas.start()
    python tests/mpi_prog.py raise RANK                       RANK raises after the start; the job must end
    python tests/mpi_prog.py kill RANK                        RANK is killed (SIGKILL) after the start
"""
import ctypes
import os
import signal
import sys

import numpy as np

from cpnet import dist
from cpnet.backend import HOST
from cpnet.model import build_model, make_config
from cpnet.optim import MomentumSGD


def tiny(seed=0, dtype=np.float64):
    cfg = make_config("alexnet-tiny", 5, 15, dropout=0.0, seed=seed)
    return build_model(cfg, placement=[HOST, HOST], dtype=dtype, tower_threads=False)


def batch(b=8):
    rng = np.random.default_rng(11)
    return rng.standard_normal((b, 3, 15, 15)), rng.integers(0, 5, b)


class StandInNccl:
    """A stand-in for cupy.cuda.nccl on host memory: the same calls (unique id, one communicator per device,
    allReduce on raw pointers with a dtype code and a stream), the sum done by MPI. It checks what the reducer
    passes: a unique id that every rank received from rank 0, the buffer's dtype code, in-place operation."""

    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 7, 8, 0
    calls = []

    def __init__(self, world):
        self.world = world

    def get_unique_id(self):
        return tuple(np.random.default_rng().integers(0, 255, 128).tolist())

    def NcclCommunicator(self, ndev, uid, rank):
        assert ndev == self.world.size and rank == self.world.rank
        assert self.world.gather(uid) == [uid] * ndev, "unique id not the same on every rank"
        outer = self

        class Comm:
            def allReduce(self, send, recv, count, dtype, op, stream):
                assert send == recv and op == outer.NCCL_SUM and stream == 0
                ct = {outer.NCCL_FLOAT32: ctypes.c_float, outer.NCCL_FLOAT64: ctypes.c_double}[dtype]
                buf = np.ctypeslib.as_array((ct * count).from_address(send))
                outer.world.sum(buf)
                outer.calls.append(count)

        return Comm()


def main(argv):
    w = dist.world()
    what = argv[0]
    if what == "reduce":
        standin = len(argv) > 2 and argv[2] == "nccl-standin"
        x, y = batch()
        ref = tiny()
        ref.loss(x, y, train=True)
        ref.loss_backward()
        model = tiny()
        nccl = StandInNccl(w) if standin else None
        reps = dist.Replicas(w, model, bucket_bytes=2000, nccl=nccl)
        assert len(reps.buckets) >= 3, reps.describe()
        first, rows = dist.shard_rows(w, len(y))
        model.loss(x[first:first + rows], y[first:first + rows], train=True)
        model.loss_backward()
        reps.reduce()
        if standin:
            assert sum(StandInNccl.calls) == model.num_params(), (StandInNccl.calls, model.num_params())
        g, r = model.grads(), ref.grads()
        err = max(float(np.abs(g[k] - r[k]).max() / max(np.abs(r[k]).max(), 1e-300)) for k in g)
        if w.rank == 0:
            np.savez(argv[1], err=err, size=w.size, note=str(reps.note), describe=reps.describe())
    elif what in ("mismatch", "broadcast"):
        model = tiny(seed=w.rank)
        opt = MomentumSGD(model)
        reps = dist.Replicas(w, model, opt)
        if what == "broadcast":
            reps.start()
            assert np.array_equal(model.host_params()["t1.fc7.W"], tiny(seed=0).host_params()["t1.fc7.W"])
        dist.check_same(w, "start parameters", dist.checksum(model.params().values()))
        print(f"rank {w.rank}: same")
    elif what in ("raise", "kill"):
        w.barrier()
        if w.rank == int(argv[1]):
            if what == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected failure")
        w.barrier()  # the others wait here for a peer that is gone
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
