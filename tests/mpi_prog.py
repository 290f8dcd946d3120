"""Programs that tests/test_dist.py runs under `mpiexec -n N` (one process per replica).

    python tests/mpi_prog.py reduce OUT.npz [nccl-standin] [fused] [gpu1|gpu2] [overlap]
                                                              sum of gradients over the replicas vs one process
                                                              (overlap: started during backward, and the same
                                                              bits as after it)
    python tests/mpi_prog.py mismatch                         replicas built from different seeds, no broadcast
    python tests/mpi_prog.py broadcast                        the same, after Replicas.start()
    python tests/mpi_prog.py raise RANK                       RANK raises after the start; the job must end
    python tests/mpi_prog.py kill RANK                        RANK is killed (SIGKILL) after the start
    python tests/mpi_prog.py late-signal FLAG                 rank 1 exits at once; once it is in MPI_Finalize
                                                              (FLAG written after cpnet's atexit function), rank 0
                                                              sends it SIGINT, then exits too
    python tests/mpi_prog.py stall RANK WHAT                  RANK sleeps 30 s, alive, while the others wait in
                                                              WHAT (sum, bcast, gather, barrier); then all finish
    python tests/mpi_prog.py train DATA OUT [options]         cpnet.train.run on each replica (see `train`)
"""
import ctypes
import os
import signal
import sys
import time

import numpy as np

from cpnet import dist
from cpnet.backend import HOST, to_host
from cpnet.model import build_model, make_config
from cpnet.optim import MomentumSGD


def tiny(seed=0, dtype=np.float64, placement=(HOST, HOST), fuse=None):
    cfg = make_config("alexnet-tiny", 5, 15, dropout=0.0, seed=seed)
    return build_model(cfg, placement=list(placement), dtype=dtype, tower_threads=False, fuse=fuse)


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


def tiny_train_config(data, out, **kw):
    """The training run that tests/test_dist.py compares across world sizes: test_train's tiny run."""
    from test_train import tiny_cfg

    return tiny_cfg(data, out, **kw)


def use_float64():
    """Train in float64 (the world-size test compares to 1e-12): the loop builds its model through this name."""
    import functools

    from cpnet import model as model_mod, train

    train.build_model = functools.partial(model_mod.build_model, dtype=np.float64)


def train(argv):
    """train DATA OUT [float64] [resume] [max=K] [kill=ITER:RANK] [wait=ITER:FILE]

    kill: that rank SIGKILLs itself after iteration ITER's update. wait: rank 0 writes FILE after iteration ITER
    and waits (up to 60 s) for a SIGINT, which the test sends to the launcher (the others wait in their next sum)."""
    from cpnet import train as train_mod

    data, out, opts = argv[0], argv[1], argv[2:]
    kw = dict(o.split("=", 1) for o in opts if "=" in o)
    if "float64" in opts:
        use_float64()
    extra = {"resume": "resume" in opts}
    if "max" in kw:
        extra["max_iterations"] = int(kw["max"])
    w = dist.world()
    got_sigint = []
    handler = train_mod._StopFlag._handler

    def noting(self, signum, frame):
        got_sigint.append(signum)
        handler(self, signum, frame)

    train_mod._StopFlag._handler = noting
    update = train_mod.Trainer.update

    def update_then(self):
        update(self)
        if "kill" in kw:
            at, rank = map(int, kw["kill"].split(":"))
            if self.iteration == at and w.rank == rank:
                os.kill(os.getpid(), signal.SIGKILL)
        if "wait" in kw:
            at, path = kw["wait"].split(":", 1)
            if self.iteration == int(at) and w.rank == 0:
                open(path, "w").close()
                t = time.monotonic()
                while not got_sigint and time.monotonic() - t < 60:
                    time.sleep(0.02)

    train_mod.Trainer.update = update_then
    try:
        train_mod.run(tiny_train_config(data, out, **extra))
    except train_mod.TrainingInterrupted:
        return 130
    return 0


def main(argv):
    what = argv[0]
    if what == "train":
        return train(argv[1:])
    if what == "late-signal":  # registered before the world's: atexit runs it after cpnet's
        import atexit

        atexit.register(lambda: dist.launched_rank() == 1 and open(argv[1], "w").close())
    w = dist.world()
    if what == "reduce":
        standin = "nccl-standin" in argv[2:]
        x, y = batch()
        ref = tiny()
        ref.loss(x, y, train=True)
        ref.loss_backward()
        # gpu1 / gpu2: this replica's towers on 1 or 2 GPUs by node-local rank, summed by NCCL (multigpu tests)
        gpus = [int(a[3:]) for a in argv[2:] if a.startswith("gpu")]
        overlap = "overlap" in argv[2:]
        first, rows = dist.shard_rows(w, len(y))
        results = []
        for on in ([False, True] if overlap else [False]):
            model = tiny(placement=dist.replica_placement(w, gpus[0]) if gpus else (HOST, HOST),
                         fuse=True if "fused" in argv[2:] else None)
            nccl = StandInNccl(w) if standin else ("auto" if gpus else None)
            StandInNccl.calls = []
            reps = dist.Replicas(w, model, bucket_bytes=2000, nccl=nccl, overlap=on)
            assert len(reps.buckets) >= 3, reps.describe()
            model.loss(x[first:first + rows], y[first:first + rows], train=True)
            model.loss_backward(done=reps.backward_done)
            # with overlap every sum has started by the end of backward (conv1, the last layer, reports too)
            assert reps._next == (len(reps.buckets) if on else 0), (reps._next, len(reps.buckets))
            reps.reduce()
            if standin:
                assert sum(StandInNccl.calls) == model.num_params(), (StandInNccl.calls, model.num_params())
            results.append({k: to_host(v) for k, v in model.grads().items()})
        g, r = results[-1], ref.grads()
        err = max(float(np.abs(g[k] - r[k]).max() / max(np.abs(r[k]).max(), 1e-300)) for k in g)
        same = all(np.array_equal(results[0][k], results[-1][k]) for k in g)
        if w.rank == 0:
            np.savez(argv[1], err=err, size=w.size, note=str(reps.note), describe=reps.describe(), same=same)
    elif what in ("mismatch", "broadcast"):
        model = tiny(seed=w.rank)
        opt = MomentumSGD(model)
        reps = dist.Replicas(w, model, opt)
        if what == "broadcast":
            reps.start()
            assert np.array_equal(model.host_params()["t1.fc7.W"], tiny(seed=0).host_params()["t1.fc7.W"])
        dist.check_same(w, "start parameters", dist.checksum(model.params().values()))
        print(f"rank {w.rank}: same")
    elif what == "late-signal":
        w.barrier()
        if w.rank == 0:
            t = time.monotonic()
            while not os.path.exists(argv[1]) and time.monotonic() - t < 60:
                time.sleep(0.01)
            time.sleep(0.5)  # rank 1 is now in MPI_Finalize, waiting for this rank
            os.kill(w.pids[1][0], signal.SIGINT)  # as the launcher's Ctrl-C would, late
            time.sleep(0.5)
    elif what == "stall":
        w.barrier()
        if w.rank == int(argv[1]):
            time.sleep(30)  # the others give up first when CPNET_PEER_TIMEOUT is shorter
        op = argv[2]
        if op == "sum":
            assert w.sum(np.ones(3))[0] == w.size
        elif op == "bcast":
            assert w.bcast({"rank": w.rank}, root=1) == {"rank": 1}
        elif op == "gather":
            assert w.gather(("r", w.rank)) == [("r", r) for r in range(w.size)]
        else:
            w.barrier()
        print(f"rank {w.rank}: {op} done")
    elif what in ("raise", "kill"):
        w.barrier()
        if w.rank == int(argv[1]):
            if what == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected failure")
        w.barrier()  # the others wait here for a peer that is gone
    return 0


if __name__ == "__main__":
    ended = dist.supervise()  # as the CLI does: a rank killed outright is named by the process waiting for it
    if ended is not None:
        if ended.line:
            sys.stderr.write(f"Error: {ended.line}\n")
        sys.stderr.flush()
        dist.exit_like(ended)
    sys.exit(main(sys.argv[1:]))
