"""cpnet.dist: the world of one, replica placement and row blocks, and real multi-process runs under mpiexec
(MPICH from the venv, oversubscribed on a small machine): gradient sums, start broadcast and checksum, faults."""

import json
import os
import shutil
import signal
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


def mpi_env(env=None):
    e = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
             OPENBLAS_NUM_THREADS="1", CPNET_DEVICE="cpu")
    e.update(env or {})
    return e


def _descendants(pid):
    """The PIDs of every process below `pid` (children, their children, ...), from /proc."""
    children = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p))
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), ()):
            found.append(c)
            todo.append(c)
    return found


def run_job(cmd, timeout, env=None, what="the job"):
    """Run `cmd` (a launcher and its job) to its end; a job still running after `timeout` s is a hang: the
    launcher and every process below it are killed (hydra puts the ranks in sessions of their own, so they are
    found by parentage, before the launcher goes) and the test fails, naming it."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in _descendants(p.pid) + [p.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        out, err = p.communicate()
        pytest.fail(f"{what} did not end within {timeout} s (a hang; its processes were killed): {out[-2000:]}"
                    f"{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def mpirun(n, args, timeout=120, env=None):
    """`mpiexec -n n python ARGS` as a subprocess; returns the CompletedProcess (text output). Fails the test if
    the job has not ended after `timeout` s (and kills what is left of it)."""
    need_mpi()
    return run_job([mpiexec_path(), "-n", str(n), sys.executable] + list(args), timeout, mpi_env(env),
                   f"mpiexec -n {n} {' '.join(map(str, args))}")


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


def test_cpu_share_of_co_located_ranks(monkeypatch):
    """Ranks on one node split its CPUs: BLAS threads per tower and loader workers come from each rank's share."""
    from cpnet import backend

    monkeypatch.setattr(backend, "_cpu_count", lambda: 16)
    assert backend.cpu_share(4) == 4 and backend.cpu_share(32) == 1
    assert backend.default_host_threads(0, 1) == 8 and backend.default_host_threads(0, 4) == 2
    assert backend.default_host_threads(2, 4) == 1
    gpu = [backend.Device("gpu", 0)] * 2
    assert backend.default_loader_workers(gpu, 1) == 12 and backend.default_loader_workers(gpu, 4) == 2


def test_reverse_layer_order():
    names = ["t0.conv1.W", "t0.conv1.b", "t1.conv1.W", "t0.fc7.b", "t1.fc7.W", "t0.fc7.W", "fc8.b", "fc8.W"]
    assert dist._reverse_layer_order(names) == ["fc8.W", "fc8.b", "t0.fc7.W", "t0.fc7.b", "t1.fc7.W",
                                                "t0.conv1.W", "t0.conv1.b", "t1.conv1.W"]


# ---- several processes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,opts", [(2, []), (4, []), (2, ["nccl-standin"]), (2, ["fused"]), (4, ["overlap"]),
                                    (2, ["fused", "overlap"]), (2, ["nccl-standin", "overlap"])],
                         ids=["mpi-2", "mpi-4", "nccl-standin-2", "fused-2", "overlap-4", "fused-overlap-2",
                              "nccl-standin-overlap-2"])
def test_gradient_sum_equals_one_process(tmp_path, n, opts):
    """Each replica's loss is the mean over its B/N rows; after the reduction every replica holds the gradient of
    the whole batch's mean (float64, to rounding), through MPI or the NCCL call path (with a stand-in module),
    with the towers apart or fused (both towers' rows in one array per layer); overlapped with backward, every
    sum has started by the end of backward and the result is the one without overlap, bit for bit."""
    out = tmp_path / "r.npz"
    standin = "nccl-standin" in opts
    r = mpirun(n, [PROG, "reduce", str(out)] + opts)
    assert r.returncode == 0, r.stdout + r.stderr
    res = np.load(out)
    assert int(res["size"]) == n and float(res["err"]) < 1e-12 and bool(res["same"])
    assert ("NCCL" in str(res["describe"])) == standin
    assert ("overlapped with backward" in str(res["describe"])) == ("overlap" in opts)


class _Recording(dist.World):
    """A world of one that keeps a copy of every buffer when its sum starts, and where that came in the log."""

    def __init__(self, log):
        self.log, self.started = log, []

    def sum_start(self, buf):
        self.started.append((len(self.log), buf.copy()))
        self.log.append(("start", len(self.started) - 1))


@pytest.mark.parametrize("fuse,threads", [(False, False), (False, True), (True, False)],
                         ids=["towers", "tower-threads", "fused"])
def test_overlap_starts_a_buffer_only_once_its_gradients_are_complete(fuse, threads):
    """With overlap each flat buffer is packed and started during backward: after every layer it holds has
    finished its backward (the log), holding exactly that step's gradients (step 2's, which differ from step
    1's, which a too early pack would read), in the buffers' order, and the first one before conv1's backward."""
    from cpnet.model import build_model, make_config

    m = build_model(make_config("alexnet-tiny", 5, 15, dropout=0.0), placement=[HOST, HOST], dtype=np.float64,
                    tower_threads=threads, fuse=fuse)
    assert (m._pool is not None) == threads
    log = []
    w = _Recording(log)
    reps = dist.Replicas(w, m, alone=True, bucket_bytes=1500, overlap=True)
    assert len(reps.buckets) >= 4 and reps.overlap
    layers = {id(blk.layer): blk.layer for b in reps.buckets for blk, _, _ in b.slots}
    for layer in layers.values():
        def logged(dy, layer=layer, backward=layer.backward):
            dx = backward(dy)
            log.append(("done", id(layer)))
            return dx
        layer.backward = logged
    rng = np.random.default_rng(3)
    for step in range(2):  # step 1 reduced after backward leaves gradients that a too early pack in step 2 reads
        log.clear()
        w.started.clear()
        m.loss(rng.standard_normal((4, 3, 15, 15)), rng.integers(0, 5, 4), train=True)
        m.loss_backward(done=reps.backward_done if step else None)
        assert len(w.started) == (len(reps.buckets) if step else 0)  # all started during backward
        final = [np.concatenate([blk.grad.reshape(-1) for blk, _, _ in b.slots]) for b in reps.buckets]
        reps.reduce()
    conv1 = [e for e in log if e[0] == "done" and any(
        id(blk.layer) == e[1] and "conv1" in blk.parts[0][0] for b in reps.buckets for blk, _, _ in b.slots)]
    assert w.started[0][0] < log.index(conv1[0])  # the first sum started before conv1's backward ran
    for i, (at, buf) in enumerate(w.started):
        np.testing.assert_array_equal(buf, final[i], err_msg=f"bucket {i} packed before its gradients were complete")
        finished = {e[1] for e in log[:at] if e[0] == "done"}
        assert {id(blk.layer) for blk, _, _ in reps.buckets[i].slots} <= finished, f"bucket {i} started early"
    assert [e[1] for e in log if e[0] == "start"] == list(range(len(reps.buckets)))


def test_overlap_switch(monkeypatch):
    monkeypatch.delenv("CPNET_OVERLAP", raising=False)
    assert dist.default_overlap({}) is False and dist.default_overlap({"gpu": object()}) is True
    monkeypatch.setenv("CPNET_OVERLAP", "1")
    assert dist.default_overlap({}) is True
    monkeypatch.setenv("CPNET_OVERLAP", "0")
    assert dist.default_overlap({"gpu": object()}) is False
    monkeypatch.setenv("CPNET_OVERLAP", "on")
    with pytest.raises(CpnetError, match="CPNET_OVERLAP='on': expected 0 or 1"):
        dist.default_overlap({})


def test_start_parameters_broadcast_and_mismatch_detected():
    r = mpirun(2, [PROG, "broadcast"])
    assert r.returncode == 0 and r.stdout.count("same") == 2, r.stdout + r.stderr
    r = mpirun(2, [PROG, "mismatch"])
    assert r.returncode != 0
    assert "Error: rank 0 of 2: start parameters differ between replicas: rank 1 differs from rank 0" in r.stderr


# A job that hung instead of ending would run into mpirun's timeout (subprocess.TimeoutExpired fails the test);
# no test here asserts how fast the job ended, which depends on the machine's load.

def test_a_raising_rank_ends_the_job_naming_itself():
    r = mpirun(2, [PROG, "raise", "1"], timeout=120)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Error: rank 1 of 2: RuntimeError: injected failure" in r.stderr


def test_a_killed_rank_ends_the_job_naming_itself():
    r = mpirun(4, [PROG, "kill", "2"], timeout=120)
    assert r.returncode != 0, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: rank 2 of 4 (pid ") and \
        errors[0].endswith("was killed by SIGKILL; the job ends"), r.stdout + r.stderr


def test_a_late_ctrl_c_does_not_kill_a_rank_in_mpi_finalize(tmp_path):
    """A SIGINT that reaches a rank in MPI_Finalize (after Python has put the default handlers back) must not kill
    it: it would never finish the finalize barrier, and the launcher would SIGKILL the others or leave them waiting
    there forever. Both ranks exit 0 and nobody is named."""
    r = mpirun(2, [PROG, "late-signal", str(tmp_path / "exiting")], timeout=60)
    assert (tmp_path / "exiting").exists(), r.stdout + r.stderr
    assert r.returncode == 0 and "Error:" not in r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("op", ["sum", "bcast", "gather", "barrier"])
def test_a_rank_that_never_comes_ends_the_job_after_the_peer_timeout(op):
    """A rank alive but absent (stuck, or gone where the launcher does not end the job): the others wait in their
    collective CPNET_PEER_TIMEOUT seconds, then one line names the waiting rank and the job ends; without the
    deadline the stalled rank comes back after 30 s and every rank finishes normally."""
    r = mpirun(2, [PROG, "stall", "1", op], timeout=120, env={"CPNET_PEER_TIMEOUT": "2"})
    assert r.returncode != 0, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: rank 0 of 2: a") and \
        "waited 2 s for the other ranks" in errors[0] and "CPNET_PEER_TIMEOUT" in errors[0], r.stdout + r.stderr
    assert "rank 0: " + op + " done" not in r.stdout


def test_collectives_without_a_deadline_and_a_bad_peer_timeout(monkeypatch):
    """CPNET_PEER_TIMEOUT=0: no watchdog (the collectives as ever: a gather of objects); a value that is not a
    number of seconds >= 0 is one line naming the variable."""
    r = mpirun(2, [PROG, "stall", "-1", "gather"], env={"CPNET_PEER_TIMEOUT": "0"})
    assert r.returncode == 0 and "rank 0: gather done" in r.stdout and "rank 1: gather done" in r.stdout, \
        r.stdout + r.stderr
    for bad in ("soon", "-1", "inf", "nan"):
        monkeypatch.setenv("CPNET_PEER_TIMEOUT", bad)
        with pytest.raises(CpnetError, match=r"CPNET_PEER_TIMEOUT=.*expected a number of seconds >= 0"):
            dist.peer_timeout()
    monkeypatch.setenv("CPNET_PEER_TIMEOUT", "2.5")
    assert dist.peer_timeout() == 2.5
    monkeypatch.delenv("CPNET_PEER_TIMEOUT")
    assert dist.peer_timeout() == dist.PEER_TIMEOUT


def _supervised(monkeypatch, then):
    """dist.supervise in this process, as rank 1 of 2 of a launcher; the child does `then()` and never returns."""
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.delenv("CPNET_MPI", raising=False)
    monkeypatch.delenv("CPNET_SUPERVISE", raising=False)
    before = {sig: signal.getsignal(sig) for sig in dist.FORWARDED}
    ended = dist.supervise()
    if ended is None:  # the child: never back into pytest
        try:
            then()
        finally:
            os._exit(3)
    assert {sig: signal.getsignal(sig) for sig in dist.FORWARDED} == before  # the parent's handlers restored
    return ended


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="supervise needs Linux (PR_SET_PDEATHSIG)")
def test_supervise_names_a_killed_rank_and_passes_signals_on(monkeypatch, tmp_path):
    """The supervising parent: the line for a child killed outright; the child's own exit status; a signal the
    parent gets passed on to the child, which lives in its own process group (so a signal the launcher sends to
    the parent's group reaches it once, through the parent), and its death from that signal no fault of the rank
    (no line, and exit status 128 + n for the parent, not a death by the signal); under Slurm's slurmstepd the child stays in the group and nothing is passed on."""
    code, line, sig = _supervised(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGKILL))
    assert code == 128 + 9 and sig == signal.SIGKILL and line.startswith("rank 1 of 2 (pid ") and \
        line.endswith("killed by SIGKILL; the job ends")
    assert _supervised(monkeypatch, lambda: os._exit(5)) == (5, None, 0)
    ready, got = tmp_path / "ready", tmp_path / "got"
    parent_group = os.getpgrp()

    def count_sigterms(wait_for_one):
        n = []
        signal.signal(signal.SIGTERM, lambda *a: n.append(1))
        ready.touch()
        t = time.monotonic()
        while time.monotonic() - t < 1 or (wait_for_one and not n and time.monotonic() - t < 30):
            time.sleep(0.01)
        got.write_text(f"{len(n)} {int(os.getpgrp() != parent_group)}")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    def send():
        t = time.monotonic()
        while not ready.exists() and time.monotonic() - t < 30:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # to the parent (this process) alone

    import threading

    for slurm in (False, True):  # under slurmstepd (which signals every process itself) nothing is passed on
        monkeypatch.setattr(dist, "_parent_name", lambda: "slurmstepd" if slurm else "hydra_pmi_proxy")
        ready.unlink(missing_ok=True)
        sender = threading.Thread(target=send)
        sender.start()
        try:
            ended = _supervised(monkeypatch, lambda: count_sigterms(not slurm))
        finally:
            sender.join()
        assert got.read_text() == ("0 0" if slurm else "1 1") and \
            ended == (128 + signal.SIGTERM, None, 0), slurm  # the launcher's signal: exit 143, not a death by it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="supervise needs Linux (PR_SET_PDEATHSIG)")
def test_a_signal_that_comes_as_the_rank_is_reaped_is_no_traceback(monkeypatch):
    """The launcher's SIGTERM can reach the parent just after waitpid reaped the rank and before Python ran the
    handler (seen once under heavy load): the pass-on finds no process and must not raise."""
    real = os.waitpid

    def reaped_then_signalled(pid, options):
        out = real(pid, options)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, with the rank already gone
        return out

    monkeypatch.setattr(os, "waitpid", reaped_then_signalled)
    monkeypatch.setattr(dist, "_parent_name", lambda: "hydra_pmi_proxy")
    assert _supervised(monkeypatch, lambda: os._exit(5)) == (5, None, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="supervise needs Linux (PR_SET_PDEATHSIG)")
def test_after_the_reap_no_signal_is_passed_to_the_ranks_old_pid(monkeypatch):
    """Once waitpid has reaped the rank, the system may give its pid to another process: a signal that comes then
    is recorded, never sent to that pid."""
    real_waitpid, real_kill, sent, reaped = os.waitpid, os.kill, [], []

    def reaped_then_signalled(pid, options):
        out = real_waitpid(pid, options)
        reaped.append(pid)
        signal.raise_signal(signal.SIGTERM)  # the handler runs here, the pid free for reuse
        return out

    def kill(pid, sig):
        if reaped and pid == reaped[0]:
            sent.append((pid, sig))
        return real_kill(pid, sig)

    monkeypatch.setattr(os, "waitpid", reaped_then_signalled)
    monkeypatch.setattr(os, "kill", kill)
    monkeypatch.setattr(dist, "_parent_name", lambda: "hydra_pmi_proxy")
    assert _supervised(monkeypatch, lambda: os._exit(5)) == (5, None, 0)
    assert reaped and sent == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="supervise needs Linux (PR_SET_PDEATHSIG)")
def test_signals_around_the_fork_reach_the_rank_once_each(monkeypatch):
    """A signal that comes during the fork is sent once the pid is known; one that comes while those are being
    sent is passed on by the handler itself, and not sent a second time."""
    real_fork, real_kill, sent = os.fork, os.kill, []

    def fork():
        pid = real_fork()
        if pid:
            signal.raise_signal(signal.SIGINT)  # the parent gets it before it has noted the child's pid
        return pid

    def kill(pid, sig):
        if pid != os.getpid():
            sent.append(sig)
            if len(sent) == 1:
                signal.raise_signal(signal.SIGTERM)  # comes while the parent sends the first one on
        return real_kill(pid, sig)

    monkeypatch.setattr(os, "fork", fork)
    monkeypatch.setattr(os, "kill", kill)
    monkeypatch.setattr(dist, "_parent_name", lambda: "hydra_pmi_proxy")
    # the rank gets back the handlers from before: ignoring both, it ends by itself wherever the signals find it
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert _supervised(monkeypatch, lambda: os._exit(7)) == (7, None, 0)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    assert sorted(sent) == sorted([signal.SIGINT, signal.SIGTERM]), sent


def test_the_parent_ends_as_its_rank_did(tmp_path):
    """dist.exit_like: an exit code passes through; a rank killed by a signal makes the parent die of that signal
    (what the launcher would have seen of the rank alone; MPICH's hydra ends the job reliably only on a death by a
    signal, not on exit(137)), even where the parent handles or blocks it, and without a core file of the parent."""
    import resource

    def ending(ended, prepare=lambda: None):
        pid = os.fork()
        if pid == 0:
            try:
                os.chdir(tmp_path)  # a core file, if one were written, lands here
                hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
                resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))  # exit_like must lower it itself
                prepare()
                dist.exit_like(ended)
            finally:
                os._exit(99)
        return os.waitpid(pid, 0)[1]

    status = ending(dist.Ended(5, None))
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 5
    status = ending(dist.Ended(137, "rank 1 of 2 ... killed by SIGKILL", signal.SIGKILL))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    status = ending(dist.Ended(128 + signal.SIGTERM, None, signal.SIGTERM),
                    lambda: signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM]))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    status = ending(dist.Ended(128 + signal.SIGSEGV, "... killed by SIGSEGV", signal.SIGSEGV),
                    lambda: signal.signal(signal.SIGSEGV, lambda *a: None))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV and not os.WCOREDUMP(status)


# ---- training: the run does not depend on the number of replicas -----------------------------------------------

from test_train import synth  # noqa: E402,F401  96 training images (6 batches of 16), 19 validation (not 2k or 4k)


@pytest.fixture(scope="module")
def reference64(synth, tmp_path_factory):
    """The single-process float64 run (2 epochs, 12 iterations, dropout 0.5 on fc6 and fc7)."""
    import mpi_prog
    from cpnet import train

    out = tmp_path_factory.mktemp("ref64") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "build_model", train.build_model)  # restored afterwards
        mpi_prog.use_float64()
        train.run(mpi_prog.tiny_train_config(synth, out))
    return out


def _load(run_dir):
    from cpnet import checkpoint

    ck = checkpoint.load(os.path.join(run_dir, "last.h5"))
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    return ck, rows


def assert_same_run(a, b, rtol, bitwise=False):
    """Parameters, momentum and per-epoch figures of two run folders agree (to rtol of each array's scale)."""
    (ca, ra), (cb, rb) = _load(a), _load(b)
    for name in ca.params:
        for x, y in ((ca.params[name], cb.params[name]), (ca.momentum[name], cb.momentum[name])):
            assert x.dtype == y.dtype
            if bitwise:
                np.testing.assert_array_equal(x, y, err_msg=name)
            else:
                assert np.abs(x - y).max() <= rtol * max(np.abs(x).max(), 1e-30), name
    if bitwise:
        assert {k: v for k, v in ca.state.items() if k != "history"} == \
            {k: v for k, v in cb.state.items() if k != "history"}
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        for k in ("train_loss", "train_top1", "train_top5", "val_loss", "val_top1", "val_top5", "lr", "iteration"):
            assert abs(x[k] - y[k]) <= rtol * max(abs(x[k]), 1e-30) + (0 if bitwise else 1e-15), (k, x[k], y[k])


@pytest.mark.parametrize("n,overlap", [(2, "0"), (4, "0"), (2, "1")], ids=["2", "4", "2-overlap"])
def test_replicas_train_like_one_process_float64(synth, reference64, tmp_path, n, overlap):
    """N replicas at the same global batch: parameters, momentum, training and (sharded) validation figures equal
    the one-process run's to float64 rounding, with the reduction after or overlapped with backward; rank 0
    alone wrote files."""
    out = tmp_path / "run"
    r = mpirun(n, [PROG, "train", str(synth), str(out), "float64"], env={"CPNET_OVERLAP": overlap})
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_run(reference64, out, 1e-12)
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference64))


def test_resume_on_another_world_size(synth, reference64, tmp_path):
    """Start on 1 process, stop mid-epoch 2, continue on 4 replicas: the run of one process throughout."""
    import mpi_prog
    from cpnet import train

    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "build_model", train.build_model)
        mpi_prog.use_float64()
        with pytest.raises(train.TrainingInterrupted):
            train.run(mpi_prog.tiny_train_config(synth, out, max_iterations=8))
    r = mpirun(4, [PROG, "train", str(synth), str(out), "float64", "resume"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_run(reference64, out, 1e-12)


def _processes_with(text):
    """PIDs of processes whose command line holds `text`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def test_killed_rank_ends_the_job_and_the_run_resumes(synth, reference64, tmp_path):
    """SIGKILL on rank 1 in epoch 2: one line names it, no process of the job is left, last.h5 (epoch 1) loads,
    and --resume ends with the uninterrupted run's numbers."""
    out = tmp_path / "run"
    r = mpirun(2, [PROG, "train", str(synth), str(out), "float64", "kill=9:1"], timeout=60)  # a hang fails
    assert r.returncode != 0, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: rank 1 of 2 (pid ") and "SIGKILL" in errors[0], \
        r.stdout + r.stderr
    t = time.monotonic()
    while _processes_with(str(out)) and time.monotonic() - t < 30:  # the launcher's clean-up may take a moment
        time.sleep(0.1)
    assert _processes_with(str(out)) == []
    ck, _ = _load(out)  # the end of epoch 1, intact
    assert ck.state["epoch"] == 1 and ck.state["iteration"] == 6
    r = mpirun(2, [PROG, "train", str(synth), str(out), "float64", "resume"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_run(reference64, out, 1e-12)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (to delay the launcher's waitpid)")
def test_a_killed_rank_ends_the_job_when_the_launcher_reaps_its_parent_late(synth, tmp_path):
    """The race behind a hang in 1 run of 3 to 60: hydra's proxy reads the parent's line, and its waitpid finds the
    parent already gone. strace delays every waitpid in the job by 0.3 s, which makes that the order in every run;
    the parent then must have died of the rank's signal (an exit(137) hung every such run, rank 0 spinning in its
    next sum for the dead peer)."""
    need_mpi()
    out, trace = tmp_path / "run", tmp_path / "trace"
    cmd = ["strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=wait4", "-e", "inject=wait4:delay_enter=300000",
           "-o", str(trace), mpiexec_path(), "-n", "2", sys.executable, PROG, "train", str(synth), str(out), "float64",
           "kill=9:1"]
    r = run_job(cmd, 60, mpi_env(), "the killed-rank job with waitpid delayed")
    if "DELAYED" not in (trace.read_text() if trace.exists() else ""):
        pytest.skip(f"strace cannot trace here: {r.stderr.strip()[-300:]}")
    assert r.returncode != 0, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: rank 1 of 2 (pid ") and "SIGKILL" in errors[0], \
        r.stdout + r.stderr
    t = time.monotonic()
    while _processes_with(str(out)) and time.monotonic() - t < 30:
        time.sleep(0.1)
    assert _processes_with(str(out)) == []


def test_ctrl_c_on_the_launcher_saves_the_position_and_resumes_bit_exactly(synth, tmp_path):
    """float32, 2 replicas: an uninterrupted run, and one whose launcher gets SIGINT after iteration 8 and is
    resumed on 2 replicas again; the two end bit for bit alike. The float32 run also agrees with one process to
    the level of summation order."""
    full, part = tmp_path / "full", tmp_path / "part"
    r = mpirun(2, [PROG, "train", str(synth), str(full)])
    assert r.returncode == 0, r.stdout + r.stderr
    flag = tmp_path / "at8"
    need_mpi()
    p = subprocess.Popen([mpiexec_path(), "-n", "2", sys.executable, PROG, "train", str(synth), str(part),
                          f"wait=8:{flag}"], env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t = time.monotonic()
    while not flag.exists() and p.poll() is None and time.monotonic() - t < 60:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    output = p.communicate(timeout=60)[0]
    assert p.returncode == 130, output
    ck, _ = _load(part)
    assert (ck.state["epoch"], ck.state["pos"], ck.state["iteration"]) == (1, 2, 8)
    r = mpirun(2, [PROG, "train", str(synth), str(part), "resume"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_run(full, part, 0, bitwise=True)

    import mpi_prog
    from cpnet import train

    one = tmp_path / "one"
    train.run(mpi_prog.tiny_train_config(synth, one))
    assert_same_run(one, full, 1e-4)


def test_cli_under_mpiexec_prints_once_and_refuses_a_batch_that_does_not_split(synth, tmp_path):
    """Rank 0 alone prints progress, and a usage error or a bad --batch-size is one line, not one per rank."""
    cmd = ["-m", "cpnet", "train", "--data", str(synth), "--model", "alexnet-tiny", "--epochs", "1",
           "--schedule", "constant", "--scale", "0.015625", "--out"]
    r = mpirun(2, cmd + [str(tmp_path / "a"), "--batch-size", "16"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("epoch 1:") == 1 and r.stdout.count("done in") == 1
    assert "replicas: 2 over MPI on 1 node (2 on this one; rank:pid 0:" in r.stdout and "global batch 16 = 8 rows x 2" in r.stdout
    r = mpirun(2, cmd + [str(tmp_path / "c"), "--no-such-flag"])
    assert r.returncode == 2 and [line for line in r.stderr.splitlines() if line.startswith("Error:")] == \
        [line for line in r.stderr.splitlines() if "--no-such-flag" in line] and r.stderr.count("Error:") == 1, \
        r.stderr
    r = mpirun(4, cmd + [str(tmp_path / "b"), "--batch-size", "10"])
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: rank 0 of 4: --batch-size 10: the global batch must split evenly over the 4 replicas "
                      "(a multiple of 4)"], r.stderr


# ---- GPUs: NCCL (skipped without them) --------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [False, True], ids=["after-backward", "overlap"])
def test_nccl_world_of_one_on_one_gpu(overlap):
    """The NCCL path in a world of one: one communicator on GPU 0, the buffers summed over one rank (on the side
    stream, during backward or after it) unchanged, the gradients of both (fused) towers divided by 1."""
    from cpnet import backend
    from cpnet.model import build_model, make_config

    if backend.nccl_module() is None:
        pytest.skip("this CuPy has no NCCL")
    gpu = backend.Device("gpu", 0)
    m = build_model(make_config("alexnet-tiny", 3, 15), placement=[gpu, gpu], dtype=np.float64)
    reps = dist.Replicas(dist.World(), m, alone=True, bucket_bytes=4000, overlap=overlap)
    assert "NCCL" in reps.describe() and len(reps.buckets) > 1
    m.loss(np.ones((4, 3, 15, 15)), np.array([0, 1, 2, 0]), train=True)
    m.loss_backward(done=reps.backward_done)
    before = {k: backend.to_host(v) for k, v in m.grads().items()}
    reps.reduce()
    for k, v in m.grads().items():
        np.testing.assert_array_equal(backend.to_host(v), before[k], err_msg=k)


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.parametrize("per_replica", [1, 2])
def test_nccl_gradient_sum_on_two_gpus(tmp_path, per_replica):
    """Two replicas summing by NCCL on the side stream, after backward and overlapped with it (the same bits)."""
    from cpnet import backend

    if backend.gpu_count() < 2 * per_replica:
        pytest.skip(f"needs {2 * per_replica} GPUs")
    out = tmp_path / "r.npz"
    r = mpirun(2, [PROG, "reduce", str(out), f"gpu{per_replica}", "overlap"], env={"CPNET_DEVICE": "gpu"})
    assert r.returncode == 0, r.stdout + r.stderr
    res = np.load(out)
    assert float(res["err"]) < 1e-12 and "NCCL" in str(res["describe"]) and bool(res["same"])


# ---- the benchmark and the model --------------------------------------------------------------------------------

def test_allreduce_bench_runs_under_mpiexec():
    r = mpirun(2, [os.path.join(HERE, "..", "bench", "allreduce.py"), "--model", "alexnet-tiny", "--batch-size", "8",
                   "--steps", "1", "--warmup", "0", "--json"])
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])  # rank 0 alone prints
    assert res["replicas"] == 2 and res["rows_per_replica"] == 4 and res["reduce_s"] > 0 and res["step_s"] > 0
    assert res["grad_bytes"] == res["params"] * 4 and "by MPI" in res["reduction"]
    assert list(res["modes"]) == ["off"] and "after backward" in res["reduction"]  # the host's default


def test_cli_bench_allreduce_times_overlap_both_ways():
    """`cpnet bench --allreduce` under mpiexec: the same measurement, both overlap settings, rank 0 alone prints;
    its flags that do not apply are one-line errors."""
    cmd = ["-m", "cpnet", "bench", "--allreduce", "--model", "alexnet-tiny", "--batch-size", "8", "--steps", "2",
           "--warmup", "0", "--bucket-mb", "0.002"]
    r = mpirun(2, cmd + ["--overlap", "both", "--json"])
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)
    assert res["replicas"] == 2 and res["buckets"] >= 3 and set(res["modes"]) == {"off", "on"}
    assert all(m["step_s"] > 0 and 0 < m["exposed_reduce_s"] < m["step_s"] for m in res["modes"].values())
    r = mpirun(2, cmd)
    assert r.returncode == 0 and r.stdout.count("reduce (pack, sum, unpack)") == 1, r.stdout + r.stderr
    from conftest import invoke

    for extra, flag in ((["--allreduce", "--crop", "9"], "--crop"), (["--overlap", "on"], "--overlap")):
        out = invoke("bench", "--model", "alexnet-tiny", *extra)
        assert out.exit_code == 2 and out.output.startswith("Error: " + flag) and out.output.count("\n") == 1, \
            out.output


def test_scaling_model_ring_formula():
    sys.path.insert(0, os.path.join(HERE, "..", "bench"))
    import scaling_model

    assert scaling_model.ring(1e9, 1, 1e9, 1.0) == 0.0
    assert scaling_model.ring(800e6, 8, 400e9, 0.0) == pytest.approx(2 * 7 / 8 * 2e-3)
    assert scaling_model.ring(0, 4, 1e9, 1e-6) == pytest.approx(6e-6)
