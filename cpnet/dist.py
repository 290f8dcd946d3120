"""The world: N data-parallel replicas of the two-tower net, each one process (MPI through mpi4py; NCCL on GPUs).

This is the only module that talks to MPI or NCCL. The model knows nothing of replicas; this module plays the part
of ChainerMN's communicator and PyTorch DDP's wrapper:

    world()            the processes of the job: a world of one (no launcher), or MPI's COMM_WORLD when
                       `mpiexec`/`srun` started several (an error if mpi4py is missing then). Rank, size,
                       node-local rank.
    replica_placement  where a replica's two towers live: the host, one GPU (fused) or two GPUs, by node-local rank
    Replicas           start (rank 0's parameters and momentum broadcast, then a checksum check), and the sum of
                       every tower's gradients over the replicas in a few flat buffers per device, in reverse
                       layer order (fc8 first), scaled to the mean over the global batch

A world of one does nothing at all: no buffer, no copy, the numbers and files of a single-process run.

Reduction paths, per tower device: the host (MPI Allreduce on the flat buffers in place), a GPU with NCCL (one
NCCL communicator per tower device across the replicas, its unique id sent by MPI broadcast; the sums on a side
stream, ordered by events after the packing and before the copies back), and a GPU without NCCL (the flat
buffers staged through host memory and reduced with MPI; `Replicas.note` says so).

Faults: when several processes run, an uncaught exception in one of them (and `fail`) prints one line naming the
rank and calls MPI_Abort, which makes the launcher end every process at once; nobody waits in a collective for a
peer that is gone. (That line is the one thing below cli/ that writes to stderr: a process's last words, like
Python's own traceback, which nothing above it gets to print.) A process killed outright (SIGKILL, the
out-of-memory killer, a segmentation fault) has no last words, so `supervise` splits each launched process in
two: a small parent that never touches MPI and a child that is the rank. The parent waits for the child and
passes on the signals it gets; when the child dies of a signal it did not pass on, the parent hands its caller
the line naming the rank, and the caller ends the parent the way the rank ended (`exit_like`): killed by the same
signal, not exit(128 + n). The launcher, seeing a process killed, ends the others (MPICH's hydra within a second;
srun with --kill-on-bad-exit). A rank dead of a signal the parent passed on (the launcher's Ctrl-C or SIGTERM: it
is ending the job already) still makes the parent exit with 128 + n, so that the others may finish their step.

Why the signal and not exit(137): hydra's proxy ends the job when it reaps a process that died of a signal, or when
a process's PMI socket closes while the proxy does not know yet how it ended. The parent holds a copy of that socket
(inherited at the fork), so it closes at the parent's exit. If the proxy reads the parent's line and only then finds
the parent already reaped (waitpid), an exit(137) is an ordinary exit to it, the socket's closing is then ignored,
and the other ranks wait forever in their next sum for the dead one (1 run in 3 to 22 on a loaded 2-core machine,
fewer at other times; every run with the proxy's waitpid delayed by strace). A death by a signal ends the job on either path,
and across nodes too: mpiexec ends the other nodes' ranks only when a proxy reports a process that did not exit
normally (hydra's pmip.c, pmip_cb.c, pmiserv_cb.c).

Where the launcher does not end the job (srun without --kill-on-bad-exit; a rank alive but stuck), the others would
wait for it forever, spinning in MPI over shared memory or the network (MPI itself does not notice a peer that is
gone). So a watchdog thread gives every collective operation here a deadline, `peer_timeout()` (CPNET_PEER_TIMEOUT,
600 s by default; 0: none): the rank waits in MPI's own blocking call, at full speed, and a rank that has waited
that long in one sum, broadcast or barrier ends the job through `fail`, naming itself and what it waited in. The
NCCL sums on GPUs are not covered (NCCL waits on the device).
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import resource
import signal
import socket
import sys
import threading
import time
import zlib
from typing import NamedTuple

import numpy as np

from . import backend
from .backend import HOST, Device, is_gpu_array, to_device, to_host
from .errors import CpnetError

# Environment variables through which common launchers announce how many processes they started.
_SIZE_VARS = ("PMI_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS")

PEER_TIMEOUT = 600.0  # seconds a rank waits in one collective operation for the others (CPNET_PEER_TIMEOUT)
BUCKET_BYTES = 32 << 20  # a flat buffer closes once it holds this much: 3 for alexnet (244 MB), 1 for alexnet-small

_world = None


def launched_size() -> int:
    """How many processes the launcher says it started (1 when no launcher variable is set).

    CPNET_MPI=0 ignores them (a world of one even under a launcher); CPNET_MPI=1 initialises MPI anyway.
    """
    flag = os.environ.get("CPNET_MPI", "").strip()
    if flag not in ("", "0", "1"):
        raise CpnetError(f"CPNET_MPI={flag!r}: expected 0 or 1 (unset: MPI when a launcher started several processes)")
    if flag == "0":
        return 1
    sizes = []
    for var in _SIZE_VARS:
        v = os.environ.get(var, "").strip()
        if v.isdigit():
            sizes.append(int(v))
    return max(sizes + [2 if flag == "1" else 1])


def launched_rank() -> int:
    """This process's rank as the launcher's environment tells it, before (or without) MPI starts; 0 without one."""
    if launched_size() == 1:
        return 0
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        v = os.environ.get(var, "").strip()
        if v.isdigit():
            return int(v)
    return 0


def peer_timeout() -> float:
    """How many seconds a rank waits in one collective operation (a sum, a broadcast, a barrier) for the other ranks
    before it ends the job: CPNET_PEER_TIMEOUT (0: forever), else PEER_TIMEOUT. Long enough for what one rank does
    while the others wait (rank 0's checkpoints at an epoch's end, a first step's kernel builds); short next to
    forever, which is what a job whose peer is gone would otherwise cost."""
    flag = os.environ.get("CPNET_PEER_TIMEOUT", "").strip()
    if flag == "":
        return PEER_TIMEOUT
    try:
        value = float(flag)
    except ValueError:
        value = math.nan
    if not (0 <= value < math.inf):
        raise CpnetError(f"CPNET_PEER_TIMEOUT={flag!r}: expected a number of seconds >= 0 (0: no deadline; unset: "
                         f"{PEER_TIMEOUT:g})")
    return value


FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def _die_with_parent() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_DEATHSIG); False where it cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def _parent_name() -> str:
    """The command name of this process's parent ('' where /proc cannot say)."""
    try:
        with open(f"/proc/{os.getppid()}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


class Ended(NamedTuple):
    """How the rank (the supervising parent's child) ended: `code`, a shell's exit status for it (its exit code, or
    128 + the signal); where it died of a signal nobody sent through the parent, `line`, the line that names the
    rank, and `signal`, that signal, which the parent then dies of too (`exit_like`); else None and 0."""

    code: int
    line: str | None
    signal: int = 0


def exit_like(ended: Ended):
    """End this process (the supervising parent) as its rank ended: killed by `ended.signal`, as the launcher would
    have seen the rank die without the parent (hydra ends the job reliably only on a death by a signal: see the
    module's notes), without a core file of the parent; else os._exit with `ended.code`. Never returns."""
    sig = ended.signal
    if sig:
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        except (ValueError, OSError):
            pass
        try:
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        except (ValueError, OSError):  # not the main thread, or not a signal Python knows: SIGKILL below
            pass
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), signal.SIGKILL)  # only if `sig` did not end this process
    os._exit(ended.code)


def supervise():
    """Under a launcher that started several processes: fork. The child returns None and goes on to be the rank
    (MPI, training). The parent never touches MPI: it waits for the child, passes on to it the signals it gets
    (Ctrl-C and SIGTERM, which the launcher sends), and returns how the child ended (`Ended`): its exit status and,
    when the child died of a signal the parent did not get too, the line that names the rank. Its caller prints the
    line and calls `exit_like`, which ends the parent by the rank's signal; the launcher then ends the job.

    Each signal must reach the rank once. MPICH's hydra signals the process group of each process it started,
    other launchers (Open MPI) the process: so the child runs in its own process group and gets them through the
    parent. Slurm's slurmstepd (the parent of what srun starts) signals every process of the step itself: there
    the child stays in the parent's group and the parent passes nothing on. The child dies with the parent (the
    launcher's SIGKILL ends both). A world of one, CPNET_SUPERVISE=0, or a system without fork or
    PR_SET_PDEATHSIG (not Linux): no split, None."""
    if os.environ.get("CPNET_SUPERVISE", "1") == "0" or launched_size() <= 1 or not hasattr(os, "fork") or \
            not sys.platform.startswith("linux"):
        return None
    rank, size, parent = launched_rank(), launched_size(), os.getpid()
    passes_on = _parent_name() != "slurmstepd"
    received, child, unsent = [], [], []

    def forward(signum, frame):
        received.append(signum)
        if not passes_on:
            return
        if not child:  # before the fork's pid is known: sent once it is (each signal once: none is sent twice)
            unsent.append(signum)
            return
        try:
            os.kill(child[0], signum)
        except ProcessLookupError:  # kept as a guard only: the rank is never reaped while child holds its pid
            pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}  # before the fork: no signal is lost
    pid = os.fork()
    if pid == 0:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.environ["CPNET_SUPERVISE"] = "0"  # nothing below splits again
        if not _die_with_parent() or os.getppid() != parent:  # the parent died before the child could ask
            os._exit(1)
        if passes_on:
            os.setpgid(0, 0)
        return None
    child.append(pid)  # from here the handler passes each signal on itself
    while unsent:  # those that came during the fork
        os.kill(pid, unsent.pop(0))
    try:
        # wait for the rank's end without reaping it (retried after each signal, PEP 475): until waitpid below
        # its pid stays a zombie's, so a pass-on cannot reach another process that the system gave the pid to
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        child.clear()  # from here a signal is recorded only
        _, status = os.waitpid(pid, 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig in received:  # the launcher's (Ctrl-C, SIGTERM): it ends the job itself, and dying of the signal
            return Ended(128 + sig, None)  # would make hydra SIGKILL the others, rank 0 perhaps in its last save
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return Ended(128 + sig, f"rank {rank} of {size} (pid {pid} on {socket.gethostname()}) was killed by {name}; "
                     "the job ends", sig)
    return Ended(os.waitstatus_to_exitcode(status), None)


def _deaf_at_exit():
    """At a rank's exit: ignore the launcher's stop signals (those the parent passes on) from here to the end.

    Python resets its signal handlers to the default after the atexit functions, and only then does mpi4py call
    MPI_Finalize, which waits for the other ranks (rank 0 may still be writing last.h5). A Ctrl-C or SIGTERM that
    reaches a rank there (late: the ranks had stopped together on an earlier one's news) killed it in MPI_Finalize,
    silently; hydra then either saw its PMI socket close and SIGKILLed the others, rank 0 in its save, or, having
    reaped the parent first, left them waiting in MPI_Finalize forever (the Ctrl-C test: 1 run in 25 under load;
    2 of 3 with the parent's pass-on delayed 0.5 s). A rank stuck in MPI_Finalize still ends by SIGKILL (hydra's
    second Ctrl-C)."""
    for sig in FORWARDED:
        try:
            signal.signal(sig, signal.SIG_IGN)
        except (ValueError, OSError):  # not the main thread
            pass


def world() -> "World":
    """The world of this process, made once: MPI when a launcher started several processes, else a world of one."""
    global _world
    if _world is None:
        n = launched_size()
        _world = World() if n <= 1 else MPIWorld.start(n)
    return _world


class World:
    """A world of one process: every collective is the identity."""

    kind = "one"
    rank, size, local_rank, local_size, nodes = 0, 1, 0, 1, 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def sum(self, buf):
        """Sum a contiguous host array over the ranks, in place; returns it."""
        return buf

    def sum_start(self, buf):
        """Start summing `buf` in place; returns a handle for `wait`."""
        return None

    def wait(self, handles):
        pass

    def test(self, handles):
        """Let started sums progress (MPICH moves a nonblocking collective on only inside an MPI call)."""

    def sum_scalars(self, values) -> np.ndarray:
        """float64 sums over the ranks of a few numbers (loss sums, error counts, image counts)."""
        return self.sum(np.array(values, dtype=np.float64))

    def any(self, flag) -> bool:
        """True on every rank when `flag` is true on any (e.g. Ctrl-C, which reaches the ranks at different steps)."""
        return bool(self.sum_scalars([1.0 if flag else 0.0])[0])

    def bcast(self, obj, root=0):
        """A small picklable object from `root` to everyone."""
        return obj

    def bcast_array(self, a, root=0):
        """A contiguous host array from `root` into every rank's `a`, in place; returns it."""
        return a

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        return [obj]

    def barrier(self):
        pass

    def describe(self) -> str:
        return "one process"

    def fail(self, message: str, code: int = 1, together: bool = False):
        """End the whole job with `message` (one line) and a non-zero exit code (`together`: every rank calls this
        at the same point, as for ReplicasDiffer)."""
        sys.stderr.write(f"Error: {message}\n")
        sys.stderr.flush()
        os._exit(code)


class MPIWorld(World):
    """MPI's COMM_WORLD through mpi4py."""

    kind = "mpi"

    def __init__(self, MPI, comm, timeout=0.0):
        self.MPI, self.comm = MPI, comm
        # the watchdog calls MPI Abort while this thread waits in MPI: only at MPI_THREAD_MULTIPLE (mpi4py's default)
        multiple = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        self._deadline = _Watchdog(self, timeout) if timeout and multiple else contextlib.nullcontext
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.nodes = int(self.sum_scalars([1.0 if self.local_rank == 0 else 0.0])[0])
        self.pids = self.gather((os.getpid(), socket.gethostname()))
        self._install_excepthook()

    @classmethod
    def start(cls, launched: int) -> "MPIWorld":
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise CpnetError(f"started by a launcher as {launched} processes, but mpi4py cannot be imported ({e}); "
                             f"install it with pip install 'cpnet[dist]' (or run one process, or set CPNET_MPI=0)")
        timeout = peer_timeout()
        atexit.register(_deaf_at_exit)  # before MPI_Finalize, which mpi4py runs after every atexit function
        return cls(MPI, MPI.COMM_WORLD, timeout)

    def _install_excepthook(self):
        """An uncaught exception on any rank ends the job (instead of a hang in MPI_Finalize or a collective)."""
        previous = sys.excepthook

        def hook(kind, value, tb):
            if isinstance(value, CpnetError):  # the user's error: its line is enough
                self.fail(str(value), together=isinstance(value, ReplicasDiffer))
            previous(kind, value, tb)
            self.fail(f"{kind.__name__}: {value}")

        sys.excepthook = hook

    def sum(self, buf):
        with self._deadline("a sum"):
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def sum_start(self, buf):
        return self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def wait(self, handles):
        handles = [h for h in handles if h is not None]
        if handles:
            with self._deadline("a sum"):
                self.MPI.Request.Waitall(handles)

    def test(self, handles):
        handles = [h for h in handles if h is not None]
        if handles:
            self.MPI.Request.Testall(handles)

    def bcast(self, obj, root=0):
        with self._deadline("a broadcast"):
            return self.comm.bcast(obj, root=root)

    def bcast_array(self, a, root=0):
        with self._deadline("a broadcast"):
            self.comm.Bcast(a, root=root)
        return a

    def gather(self, obj) -> list:
        with self._deadline("a gather"):
            return self.comm.allgather(obj)

    def barrier(self):
        with self._deadline("a barrier"):
            self.comm.Barrier()

    def describe(self) -> str:
        where = ", ".join(f"{r}:{pid}" for r, (pid, _) in enumerate(self.pids))
        return (f"{self.size} over MPI on {self.nodes} node{'s' if self.nodes > 1 else ''} ({self.local_size} on this "
                f"one; rank:pid {where})")

    def fail(self, message: str, code: int = 1, together: bool = False):
        """`together` (every rank fails at the same point, ReplicasDiffer): rank 0 alone writes the line, the ranks
        meet at a barrier and all exit normally with `code`, so the launcher forwards the line whole however
        loaded the machine is (an abort can end its output forwarding before the line gets through).

        Otherwise one line naming this rank, then MPI_Abort. Ranks other than 0 wait a moment first: when every rank hits
        the same error (a bad flag, a missing file), rank 0's abort ends the job with its line alone. The line is
        given half a second to pass through the launcher's output forwarding before the abort (hydra's proxies
        end without reading what is left in their pipes: on a loaded machine the line was lost)."""
        if together:
            if self.rank == 0:
                sys.stderr.write(f"Error: rank 0 of {self.size}: {message}\n")
            sys.stderr.flush()
            sys.stdout.flush()
            self.comm.Barrier()
            self.MPI.Finalize()
            os._exit(code)
        if self.rank != 0:
            time.sleep(2.0)
        sys.stderr.write(f"Error: rank {self.rank} of {self.size}: {message}\n")
        sys.stderr.flush()
        time.sleep(0.5)
        self.comm.Abort(code)
        os._exit(code)  # Abort returns while the launcher tears the job down


class _Watchdog:
    """The deadline of a world's collective operations: `with watchdog(what):` around a blocking MPI call. A daemon
    thread looks at the call under way every `period` seconds (at most 1 s); when one has outlasted `timeout` it
    ends the job (`world.fail`: the line naming this rank and `what`, then MPI Abort) while the rank still waits.
    Arming is two attribute stores, no lock and no wake-up: a woken thread would make every small sum wait for it
    and the GIL (0.6-0.8 ms instead of 15-30 us, measured)."""

    def __init__(self, world, timeout):
        self.world, self.timeout = world, timeout
        self.period = min(1.0, timeout / 4)
        self._armed = None  # (deadline, what) of the call under way
        threading.Thread(target=self._watch, name="cpnet-peer-timeout", daemon=True).start()

    @contextlib.contextmanager
    def __call__(self, what):
        self._armed = (time.monotonic() + self.timeout, what)
        try:
            yield
        finally:
            self._armed = None

    def _watch(self):
        while True:
            time.sleep(self.period)
            armed = self._armed
            if armed is not None and time.monotonic() > armed[0]:
                self.world.fail(f"{armed[1]} waited {self.timeout:g} s for the other ranks: one of them is gone or "
                                f"stuck (CPNET_PEER_TIMEOUT sets the limit; 0: none)")


# ---- where a replica's towers live ---------------------------------------------------------------------------

def replica_placement(w: World, gpus_per_replica: int | None = None, gpu_count: int | None = None) -> list[Device]:
    """The two towers' devices for this replica: the host without a GPU; else GPUs taken by node-local rank,
    `gpus_per_replica` of them (2: a tower per GPU as in the paper; 1: both towers fused on one GPU).
    None: 2 when the node has two GPUs per replica, else 1. A world of one with None is `default_placement`."""
    if gpus_per_replica is not None and gpus_per_replica not in (1, 2):
        raise CpnetError(f"--gpus-per-replica {gpus_per_replica}: expected 1 or 2")
    if not backend.use_gpu():
        return [HOST, HOST]
    if w.size == 1 and gpus_per_replica is None:
        return backend.default_placement(2)
    n = backend.gpu_count() if gpu_count is None else gpu_count
    g = gpus_per_replica or (2 if n >= 2 * w.local_size else 1)
    first = w.local_rank * g
    if first + g > n:
        raise CpnetError(f"--gpus-per-replica {g}: rank {w.rank} is replica {w.local_rank} of {w.local_size} on its "
                         f"node and needs GPUs {first}..{first + g - 1}, but the node has {n}")
    return [Device("gpu", first), Device("gpu", first + g - 1)]


def shard_rows(w: World, batch_size: int) -> tuple[int, int]:
    """(first row, rows) of each global batch that this replica takes: rows [r*B/N, (r+1)*B/N)."""
    if batch_size % w.size:
        raise CpnetError(f"--batch-size {batch_size}: the global batch must split evenly over the {w.size} replicas "
                         f"(a multiple of {w.size})")
    b = batch_size // w.size
    return w.rank * b, b


# ---- start and gradient reduction ---------------------------------------------------------------------------

def checksum(arrays) -> int:
    """crc32 of the bytes of host copies of `arrays`, in order (bitwise: any difference changes it)."""
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(to_host(a)).view(np.uint8).ravel(), crc)
    return crc


class ReplicasDiffer(CpnetError):
    """An error every rank raises at the same point, from the same gathered values (check_same): the job can end
    by a normal exit of every rank after rank 0's line (World.fail(..., together=True)), no MPI_Abort."""


def check_same(w: World, what: str, value):
    """An error on every rank unless `value` (picklable) is the same on all of them."""
    values = w.gather(value)
    odd = [r for r, v in enumerate(values) if v != values[0]]
    if odd:
        raise ReplicasDiffer(f"{what} differ between replicas: rank{'s' if len(odd) > 1 else ''} "
                         f"{', '.join(map(str, odd))} differ{'' if len(odd) > 1 else 's'} from rank 0")


class _Bucket:
    """One flat buffer of a device: the gradients of `slots` [(ParamBlock, offset, size)], contiguous."""

    def __init__(self, device, dtype, slots):
        self.device, self.slots = device, slots
        self.size = sum(s[2] for s in slots)
        with device:
            self.buf = device.xp.empty(self.size, dtype)
        self.host = np.empty(self.size, dtype) if device.is_gpu else self.buf


class Replicas:
    """The data-parallel wrapper around one replica's model and optimizer.

    `start()` makes every replica hold rank 0's parameters and velocities and checks it (crc32 over the ranks);
    `reduce()`, after each backward pass, replaces every gradient by its sum over the replicas divided by the
    number of replicas: each replica's loss is the mean over its B/N rows, so the result is the gradient of the
    mean over the global batch B.

    Gradients are gathered per tower device into flat buffers (each closed once it holds `bucket_bytes`) in reverse
    layer order, fc8 and fc7 first, the order backward produces them in. The unit is the model's parameter memory
    (`model.param_memory()`): one gradient array per block, both towers' rows at once where they share one array
    (fused), and the result is written back into that array, so the towers' views of it stay valid. `nccl`: the
    NCCL module to use on GPU devices (default: CuPy's, when it is there); the host staging path otherwise (`note`
    says so).

    Overlap (`overlap`, default `default_overlap`): backward given `done=replicas.backward_done` reports each
    layer whose gradients are complete; a buffer is packed and its sum started (MPI Iallreduce, or NCCL on the
    device) as soon as every gradient in it is complete, and `reduce()` then only starts the rest and waits.
    Buffers start in one fixed order on every rank (the order of `buckets`), each once all before it have, as
    MPI and NCCL need; every later report calls MPI Test on the started ones to move them on. Without overlap
    `reduce()` packs and starts every buffer after backward. The sums are the same calls on the same buffers
    either way, so the numbers are the same bit for bit.
    """

    def __init__(self, w: World, model, optimizer=None, bucket_bytes=BUCKET_BYTES, nccl="auto", alone=False,
                 overlap=None):
        self.world, self.model, self.optimizer = w, model, optimizer
        self.note = None
        self.buckets = []
        self._nccl_comms = {}
        self.active = w.size > 1 or alone  # alone: buffers and communicators in a world of one (tests, benchmarks)
        self.overlap = False
        if not self.active:
            return
        blocks = {blk.parts[0][0]: blk for blk in model.param_memory()}
        order = {name: i for i, name in enumerate(_reverse_layer_order(list(blocks)))}
        dtype = model.dtype
        by_device = {}
        for name in order:
            by_device.setdefault(blocks[name].device, []).append(blocks[name])
        for device, blks in by_device.items():
            cur, size = [], 0
            for blk in blks:  # a bucket closes once it holds bucket_bytes (fc6's 151 MB fills one alone)
                n = int(blk.param.size)
                cur.append((blk, size, n))
                size += n
                if size * dtype.itemsize >= bucket_bytes:
                    self.buckets.append(_Bucket(device, dtype, cur))
                    cur, size = [], 0
            if cur:
                self.buckets.append(_Bucket(device, dtype, cur))
        # one order over all devices: by the last gradient a buffer waits for (two GPUs' buffers interleave)
        self.buckets.sort(key=lambda b: order[b.slots[-1][0].parts[0][0]])
        self._by_layer = {}  # id(layer) -> indices of the buckets holding a gradient of it
        for i, b in enumerate(self.buckets):
            for layer in {id(blk.layer): blk.layer for blk, _, _ in b.slots}.values():
                self._by_layer.setdefault(id(layer), []).append(i)
        self._layers_of = [len({id(blk.layer) for blk, _, _ in b.slots}) for b in self.buckets]
        gpu_devices = [d for d in by_device if d.is_gpu or nccl not in ("auto", None)]
        if gpu_devices:
            mod = backend.nccl_module() if nccl == "auto" else nccl
            if mod is None:
                self.note = ("NCCL is not available: gradients are staged through host memory and summed with MPI "
                             "(slower; install a CuPy with NCCL)")
            else:
                for device in sorted(gpu_devices, key=lambda d: d.index):  # the same order on every rank
                    self._nccl_comms[device] = _nccl_comm(w, mod, device)
        self.overlap = default_overlap(self._nccl_comms) if overlap is None else bool(overlap)
        self._new_step()

    @property
    def backward_done(self):
        """What the model's backward takes as `done` (None without overlap: nothing to report to)."""
        return self._grads_done if self.active and self.overlap else None

    # -- start ---------------------------------------------------------------------------------------------------
    def start(self):
        """Broadcast rank 0's parameters (and the optimizer's velocities) and check that every replica holds them."""
        w = self.world
        if w.size == 1:
            return
        arrays = dict(self.model.params())
        if self.optimizer is not None:
            arrays.update({f"momentum/{k}": v for k, v in self.optimizer.velocity.items()})
        for name in sorted(arrays):
            a = arrays[name]
            host = np.ascontiguousarray(to_host(a))
            w.bcast_array(host)
            if is_gpu_array(a):
                with backend.device_of(a):
                    a[...] = to_device(host, backend.device_of(a))
            else:
                a[...] = host
        check_same(w, "start parameters (crc32 after the broadcast)", checksum(arrays[n] for n in sorted(arrays)))

    # -- gradients -----------------------------------------------------------------------------------------------
    def _new_step(self):
        self._missing = list(self._layers_of)  # per bucket: its layers whose gradients are not complete yet
        self._next = 0                          # the first bucket not started
        self._pending = []                      # (bucket, MPI request or None) of the started ones

    def _grads_done(self, layers):
        """Backward's report: these layers' gradients are complete. Start every bucket that is now complete and
        whose predecessors have started; move the started sums on."""
        for layer in layers:
            for i in self._by_layer.get(id(layer), ()):
                self._missing[i] -= 1
                if self._missing[i] < 0:
                    raise RuntimeError("a layer's gradients were reported twice in one step (backward ran again "
                                       "before Replicas.reduce())")
        while self._next < len(self.buckets) and self._missing[self._next] == 0:
            self._start(self._next)
        self.world.test([h for _, h in self._pending])

    def reduce(self):
        """Every gradient := (sum over replicas) / replicas, in place (views such as the fused towers' stay valid)."""
        w = self.world
        if not self.active:
            return
        while self._next < len(self.buckets):  # all of them without overlap; with it, none normally
            self._start(self._next)
        pending, self._pending = self._pending, []
        self._finish(pending)
        inv = self.model.dtype.type(1.0 / w.size)
        for bucket in self.buckets:
            with bucket.device:
                xp = bucket.device.xp
                for blk, off, n in bucket.slots:
                    g = blk.grad
                    xp.multiply(bucket.buf[off:off + n].reshape(g.shape), inv, out=g)
        self._new_step()

    def _start(self, i):
        """Pack bucket i from its gradients and start its sum."""
        bucket = self.buckets[i]
        self._next = i + 1
        with bucket.device:
            for blk, off, n in bucket.slots:
                bucket.buf[off:off + n] = blk.grad.reshape(-1)
            comm = self._nccl_comms.get(bucket.device)
            if comm is not None:  # on the side stream, after the packing queued on the compute stream
                comm.side.wait_for_compute()
                comm.sum(bucket.buf)
                handle = None
            elif bucket.device.is_gpu:  # staged through the host
                bucket.host[...] = to_host(bucket.buf)
                handle = self.world.sum_start(bucket.host)
            else:
                handle = self.world.sum_start(bucket.buf)
        self._pending.append((bucket, handle))

    def _finish(self, pending):
        self.world.wait([h for _, h in pending])
        for bucket, _ in pending:
            if bucket.device.is_gpu and bucket.device not in self._nccl_comms:  # staged: back from the host
                with bucket.device:
                    bucket.buf[...] = to_device(bucket.host, bucket.device)
        for comm in self._nccl_comms.values():  # the copies back wait on the compute stream for NCCL's sums
            comm.side.join_compute()

    def describe(self) -> str:
        """Where the reduction runs and how it is laid out (for the start line)."""
        if not self.active:
            return ""
        per = {}
        for b in self.buckets:
            per.setdefault(b.device, []).append(b.size * self.model.dtype.itemsize)
        mpi = "MPI" if self.world.size > 1 else "nothing to sum (one process)"
        how = {d: ("NCCL" if d in self._nccl_comms else f"{mpi} via host" if d.is_gpu else mpi) for d in per}
        when = "overlapped with backward" if self.overlap else "after backward"
        return "; ".join(f"{d}: {len(s)} flat buffer{'s' if len(s) > 1 else ''} of {_size(sum(s))} by {how[d]}"
                         for d, s in per.items()) + f", {when}"


def default_overlap(nccl_comms) -> bool:
    """Overlap the reduction with backward? CPNET_OVERLAP=0|1 says; unset: PLACEHOLDER."""
    flag = os.environ.get("CPNET_OVERLAP", "").strip()
    if flag not in ("", "0", "1"):
        raise CpnetError(f"CPNET_OVERLAP={flag!r}: expected 0 or 1 (unset: overlap where NCCL sums on GPUs)")
    return bool(nccl_comms) if flag == "" else flag == "1"


def _size(nbytes):
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


def _reverse_layer_order(names):
    """Parameter names in the order backward produces their gradients: fc8, fc7, fc6, conv5, ..., conv1 (tower 0
    before tower 1 within a layer, W before b)."""
    layers = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]

    def key(name):
        parts = name.split(".")
        tower, layer = (0, parts[0]) if parts[0] == "fc8" else (int(parts[0][1:]), parts[1])
        return (-layers.index(layer), tower, parts[-1] != "W", name)

    return sorted(names, key=key)


class _NcclComm:
    """One NCCL communicator: this replica's `device` with the same device slot of every other replica; its sums
    run on a side stream of the device (`side`), so that backward's kernels go on meanwhile."""

    def __init__(self, mod, comm, device, size):
        self.mod, self.comm, self.device, self.size = mod, comm, device, size
        self.side = backend.SideStream(device)

    def sum(self, buf):
        dtypes = {np.dtype(np.float32): self.mod.NCCL_FLOAT32, np.dtype(np.float64): self.mod.NCCL_FLOAT64}
        ptr = backend.data_ptr(buf)
        self.comm.allReduce(ptr, ptr, buf.size, dtypes[np.dtype(buf.dtype)], self.mod.NCCL_SUM, self.side.ptr)


def _nccl_comm(w: World, mod, device) -> _NcclComm:
    """Rank 0 draws the unique id, MPI broadcasts it, every rank joins with its rank (inside its device)."""
    uid = mod.get_unique_id() if w.rank == 0 else None
    uid = w.bcast(uid)
    with device:
        return _NcclComm(mod, mod.NcclCommunicator(w.size, uid, w.rank), device, w.size)


__all__ = ["World", "MPIWorld", "Replicas", "default_overlap", "world", "replica_placement", "shard_rows", "checksum", "check_same",
           "launched_size", "launched_rank", "supervise", "Ended", "exit_like", "peer_timeout", "PEER_TIMEOUT"]
