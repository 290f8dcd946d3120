"""Momentum SGD with weight decay (the paper's §5 update) and learning-rate schedules.

    v <- momentum * v - weight_decay * lr * w - lr * grad
    w <- w + v

with momentum 0.9 and weight decay 0.0005 in the paper. The paper writes the rule for "w" without separating
biases; like Caffe's reference models we leave biases out of the decay by default (`decay_biases=False`).
The optimizer walks the model's parameter memory (`model.param_memory()`: contiguous arrays and the named
parameters that are their rows) and keeps one velocity array per block on its device; the update runs in place
there: on a GPU one kernel for all of a device's arrays (kernels.sgd_momentum_multi_gpu, a table of their
addresses; one kernel per array with MULTI_TENSOR = False), with the same operations in the same order as
the NumPy path, which on the host runs in cache-sized slices over two threads. Where one array holds several parameters (the fused model's towers), one update covers it whenever
the gradients are its rows too.
"""

from __future__ import annotations

import math

import numpy as np

from . import backend, kernels
from .backend import is_gpu_array
from .errors import CpnetError, OptionError


class MomentumSGD:
    def __init__(self, model, lr=0.01, momentum=0.9, weight_decay=5e-4, decay_biases=False):
        if lr <= 0 or not math.isfinite(lr):
            raise OptionError("lr", lr, "expected a positive number")
        if not 0 <= momentum < 1:
            raise OptionError("momentum", momentum, "expected a number in [0, 1)")
        if weight_decay < 0:
            raise OptionError("weight_decay", weight_decay, "expected a number >= 0")
        self.model = model
        self.lr, self.momentum, self.weight_decay, self.decay_biases = float(lr), float(momentum), \
            float(weight_decay), bool(decay_biases)
        # One velocity array per block of the model's parameter memory; a parameter's velocity is its rows of it.
        self._blocks = []  # [(ParamBlock, the velocity of the whole block)]
        vel = {}
        for blk in model.param_memory():
            with blk.device:
                v = blk.device.xp.zeros_like(blk.param)
            self._blocks.append((blk, v))
            for name, _, start, stop in blk.parts:
                vel[name] = v if len(blk.parts) == 1 else v[start:stop]
        self.velocity = {name: vel[name] for name, *_ in model.param_slots()}
        self._threads = None  # the host update's thread pool (False: one thread), made at the first step
        self._tables = {}  # (device, dtype) -> the multi-tensor kernel's cached address table

    def _decay(self, key):
        return self.weight_decay if (key == "W" or self.decay_biases) else 0.0

    def step(self):
        """Apply one update from the gradients the last backward pass left in the layers."""
        lr, m = self.lr, self.momentum
        launches = []  # (device, w, g, v, weight decay) for the GPU kernel
        host = []  # (w, g, v, weight decay) for _host_step
        for blk, v in self._blocks:
            wd = self._decay(blk.key)
            if self._whole(blk, v):
                arrays = [(blk.param, blk.grad, v)]
            else:
                arrays = [(holder.params[blk.key], holder.grads[blk.key], self.velocity[name])
                          for name, holder, _, _ in blk.parts]
            for w, g, vv in arrays:
                if _one_kernel(w, g, vv):
                    launches.append((blk.device, w, g, vv, wd))
                    continue
                if not is_gpu_array(w) and _host_chunkable(w, g, vv):
                    host.append((w, g, vv, wd))
                    continue
                with blk.device:
                    vv *= m
                    if wd:
                        vv -= (wd * lr) * w
                    vv -= lr * g
                    w += vv
        if launches:
            self._gpu_step(launches, m, lr)
        if host:
            self._host_step(host, m, lr)

    def _gpu_step(self, launches, m, lr):
        """One kernel per device and dtype for all its arrays (bit-identical to one kernel per array: the same
        operations on each element), or, with MULTI_TENSOR off, one per array."""
        if not MULTI_TENSOR:
            for _, w, g, v, wd in launches:
                kernels.sgd_momentum_gpu(w, g, v, m, wd * lr, lr)
            return
        groups = {}
        for dev, w, g, v, wd in launches:
            groups.setdefault((dev, w.dtype), []).append((w, g, v, wd))
        for (dev, dt), arrays in groups.items():
            with dev:
                gs = [g if g.flags.c_contiguous else dev.xp.ascontiguousarray(g) for _, g, _, _ in arrays]
                kernels.sgd_momentum_multi_gpu([a[0] for a in arrays], gs, [a[2] for a in arrays],
                                               [bool(a[3]) for a in arrays], m, self.weight_decay * lr, lr,
                                               cache=self._tables.setdefault((dev, dt), {}))

    def _host_step(self, arrays, m, lr):
        """The host arrays' update in cache-sized slices (the four passes of the rule then read w, g and v from
        memory once and write w and v once, where whole-array passes with temporaries streamed them about three
        times as often), the slices shared by two threads when there are two CPUs; each element sees the same
        operations in the same order as in the plain rule, so the result does not depend on the slicing."""
        work = []
        for w, g, v, wd in arrays:
            fw, fg, fv = w.reshape(-1), g.reshape(-1), v.reshape(-1)
            step = max(1, UPDATE_SLICE_BYTES // fw.itemsize)
            work += [(fw[i:i + step], fg[i:i + step], fv[i:i + step], wd) for i in range(0, fw.size, step)]

        def run(part):
            t = None
            for w, g, v, wd in part:
                if t is None or t.size < w.size or t.dtype != w.dtype:
                    t = np.empty(w.size, dtype=w.dtype)
                tt = t[:w.size]
                v *= m
                if wd:
                    np.multiply(w, wd * lr, out=tt)
                    v -= tt
                np.multiply(g, lr, out=tt)
                v -= tt
                w += v

        if self._threads is None:
            self._threads = _update_threads()
        if self._threads is False or sum(w.nbytes for w, *_ in arrays) < UPDATE_THREADS_BYTES:
            run(work)
            return
        futures = [self._threads.submit(run, work[i::2]) for i in range(2)]
        for f in futures:
            f.result()

    def _whole(self, blk, v) -> bool:
        """A block of several parameters is updated as one array while its parts' gradients and velocities are
        still its rows (as backward and checkpoint loading leave them); one replaced from outside is updated on
        its own."""
        g = blk.grad
        return len(blk.parts) > 1 and g is not None and all(
            _owner(holder.grads.get(blk.key)) is _owner(g) and self.velocity[name].base is v
            for name, holder, _, _ in blk.parts)

    def state(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "decay_biases": self.decay_biases}


# The GPU update as one multi-tensor kernel per device (False: one kernel per parameter array, as before).
MULTI_TENSOR = True
# Bytes of one slice of the host update: w, g, v and a temporary of this size stay in a core's L2 cache.
UPDATE_SLICE_BYTES = 1 << 18
# Parameter bytes from which the host update is shared by two threads (alexnet's 245 MB: 2.5x faster;
# alexnet-small's 6 MB: slower, the hand-over costing more than the work on a busy machine).
UPDATE_THREADS_BYTES = 1 << 25


def _host_chunkable(w, g, v) -> bool:
    """NumPy arrays of one dtype and shape, all C-contiguous (flat slices of each line up)."""
    return (isinstance(w, np.ndarray) and isinstance(g, np.ndarray) and isinstance(v, np.ndarray)
            and g.dtype == w.dtype == v.dtype and g.shape == w.shape == v.shape
            and w.flags.c_contiguous and g.flags.c_contiguous and v.flags.c_contiguous)


def _update_threads():
    """Two threads for the host update when there are two CPUs or more (the towers' threads are idle then:
    the update runs after the backward pass), else False."""
    if backend._cpu_count() < 2:
        return False
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="cpnet-update")


def _owner(a):
    """The array that owns `a`'s memory (a itself when it is not a view)."""
    return a if getattr(a, "base", None) is None else a.base


def _one_kernel(w, g, v) -> bool:
    """The GPU kernel applies: cupy arrays of one kernel dtype, w and v contiguous (updated in place; the fused
    model's parameters are row blocks of one array per layer, contiguous too)."""
    return (is_gpu_array(w) and w.dtype in kernels.DTYPES and g.dtype == w.dtype and v.dtype == w.dtype
            and w.flags.c_contiguous and v.flags.c_contiguous)


class Schedule:
    """Learning-rate schedules, stepped once per epoch with that epoch's validation error.

    plateau  divide by `factor` when the validation error has not improved for `patience` epochs, at most
             `max_drops` times (the paper: divide by 10 when the validation error stopped improving, three times)
    step     divide by `factor` every `step_epochs` epochs
    cosine   0-based epoch e of E runs at base·(1 + cos(π·e/E))/2: from the starting rate towards 0 along half a
             cosine, the last epoch at base·(1 − cos(π/E))/2 (Loshchilov & Hutter 2017, without restarts; not the
             paper's), so it needs `total` (E) and `base`; only it stores them
    constant never change
    """

    KINDS = ("plateau", "step", "cosine", "constant")

    def __init__(self, kind="plateau", factor=10.0, patience=1, max_drops=3, step_epochs=10, min_delta=1e-4,
                 total=None, base=None):
        if kind not in self.KINDS:
            raise OptionError("schedule", repr(kind), f"expected one of {', '.join(self.KINDS)}")
        if int(step_epochs) < 1:
            raise OptionError("step_epochs", step_epochs, "expected at least 1")
        if int(patience) < 1:
            raise OptionError("patience", patience, "expected at least 1")
        if not float(factor) > 1:
            raise CpnetError(f"schedule factor {factor}: expected a number above 1")
        self.kind, self.factor, self.patience, self.max_drops, self.step_epochs, self.min_delta = \
            kind, float(factor), int(patience), int(max_drops), int(step_epochs), float(min_delta)
        if kind == "cosine" and not (total is not None and int(total) >= 1 and base is not None and base > 0):
            raise CpnetError(f"cosine schedule: expected total epochs >= 1 and a positive base rate, got "
                             f"{total}, {base}")
        self.total, self.base = (int(total) if total is not None else None), base
        self.best = math.inf
        self.bad_epochs = 0
        self.drops = 0
        self.epochs = 0

    def update(self, lr: float, val_error: float | None) -> float:
        """The learning rate for the next epoch."""
        self.epochs += 1
        if self.kind == "cosine":
            return self.cosine_lr(self.epochs)
        if self.kind == "step":
            if self.epochs % self.step_epochs == 0:
                self.drops += 1
                return lr / self.factor
            return lr
        if self.kind == "plateau" and val_error is not None:
            if val_error < self.best - self.min_delta:
                self.best, self.bad_epochs = val_error, 0
            else:
                self.bad_epochs += 1
                if self.bad_epochs >= self.patience and self.drops < self.max_drops:
                    self.drops += 1
                    self.bad_epochs = 0
                    return lr / self.factor
        return lr

    def cosine_lr(self, epoch: int) -> float:
        """The cosine schedule's rate for (0-based) `epoch`; past the last epoch, the last epoch's (a finished
        run's checkpoint keeps a rate the optimizer accepts; the curve's end, 0, is never used)."""
        return self.base * 0.5 * (1.0 + math.cos(math.pi * min(epoch, self.total - 1) / self.total))

    def state(self) -> dict:
        return dict(kind=self.kind, factor=self.factor, patience=self.patience, max_drops=self.max_drops,
                    step_epochs=self.step_epochs, min_delta=self.min_delta, best=self.best,
                    bad_epochs=self.bad_epochs, drops=self.drops, epochs=self.epochs, total=self.total,
                    base=self.base)

    @classmethod
    def from_state(cls, s: dict) -> "Schedule":
        sch = cls(s["kind"], s["factor"], s["patience"], s["max_drops"], s["step_epochs"], s["min_delta"],
                  s.get("total"), s.get("base"))
        sch.best, sch.bad_epochs, sch.drops, sch.epochs = s["best"], s["bad_epochs"], s["drops"], s["epochs"]
        return sch
