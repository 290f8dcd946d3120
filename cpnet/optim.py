"""Momentum SGD with weight decay (the paper's §5 update) and learning-rate schedules.

    v <- momentum * v - weight_decay * lr * w - lr * grad
    w <- w + v

with momentum 0.9 and weight decay 0.0005 in the paper. The paper writes the rule for "w" without separating
biases; like Caffe's reference models we leave biases out of the decay by default (`decay_biases=False`).
Each velocity lives on the device of its parameter, and the update runs in place there: on a GPU one kernel per
parameter array (kernels.sgd_momentum_gpu), with the same operations in the same order as the NumPy path. Where
parameters are row blocks that together make up one array (the fused model's towers), their velocities are row
blocks of one array too, and one kernel updates each such array whenever the gradients are laid out alike.
"""

from __future__ import annotations

import math

from . import backend, kernels
from .backend import is_gpu_array
from .errors import CpnetError


class MomentumSGD:
    def __init__(self, model, lr=0.01, momentum=0.9, weight_decay=5e-4, decay_biases=False):
        if lr <= 0 or not math.isfinite(lr):
            raise CpnetError(f"--lr {lr}: expected a positive number")
        if not 0 <= momentum < 1:
            raise CpnetError(f"--momentum {momentum}: expected a number in [0, 1)")
        if weight_decay < 0:
            raise CpnetError(f"--weight-decay {weight_decay}: expected a number >= 0")
        self.model = model
        self.lr, self.momentum, self.weight_decay, self.decay_biases = float(lr), float(momentum), \
            float(weight_decay), bool(decay_biases)
        self.velocity = {}
        self._tiles = []  # [(w, v, [(name, layer, key, element offset)])]: GPU arrays whose row blocks are parameters
        shared = {}
        for name, layer, key, t in model.param_slots():
            w = layer.params[key]
            if is_gpu_array(w) and w.base is not None and w.flags.c_contiguous and w.base.flags.c_contiguous:
                shared.setdefault(id(w.base), (w.base, []))[1].append((name, layer, key, _offset(w, w.base)))
        for base, parts in shared.values():
            spans = sorted((off, layer.params[key].size) for _, layer, key, off in parts)
            if len(parts) < 2 or [a + n for a, n in spans[:-1]] != [a for a, _ in spans[1:]] or \
                    spans[0][0] != 0 or sum(n for _, n in spans) != base.size:
                continue  # the blocks do not make up the whole array
            with backend.device_of(base):
                vb = backend.get_array_module(base).zeros(base.shape, dtype=base.dtype)
            for name, layer, key, off in parts:
                w = layer.params[key]
                self.velocity[name] = vb.reshape(-1)[off:off + w.size].reshape(w.shape)
            self._tiles.append((base, vb, parts))
        for name, layer, key, t in model.param_slots():
            if name not in self.velocity:
                with model.devices[t]:
                    self.velocity[name] = model.devices[t].xp.zeros_like(layer.params[key])

    def _decay(self, key):
        return self.weight_decay if (key == "W" or self.decay_biases) else 0.0

    def step(self):
        """Apply one update from the gradients the last backward pass left in the layers."""
        lr, m = self.lr, self.momentum
        launches, done = [], set()  # (w, g, v, weight decay) for the GPU kernel
        for w, v, parts in self._tiles:
            g = _tiled_grad(w, parts)
            wds = {self._decay(key) for _, _, key, _ in parts}
            if g is not None and len(wds) == 1 and _one_kernel(w, g, v) \
                    and all(self.velocity[name].base is v for name, *_ in parts):
                launches.append((w, g, v, wds.pop()))
                done.update((id(layer), key) for _, layer, key, _ in parts)
        for name, layer, key, t in self.model.param_slots():
            if (id(layer), key) in done:
                continue
            w, g, v = layer.params[key], layer.grads[key], self.velocity[name]
            wd = self._decay(key)
            if _one_kernel(w, g, v):
                launches.append((w, g, v, wd))
                continue
            with self.model.devices[t]:
                v *= m
                if wd:
                    v -= (wd * lr) * w
                v -= lr * g
                w += v
        for w, g, v, wd in launches:
            kernels.sgd_momentum_gpu(w, g, v, m, wd * lr, lr)

    def state(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "decay_biases": self.decay_biases}


def _offset(a, base) -> int:
    """Where view `a` starts inside `base`, in elements."""
    def address(x):  # cupy's MemoryPointer, or NumPy's array interface
        d = x.data
        return d.ptr if hasattr(d, "ptr") else x.__array_interface__["data"][0]

    return (address(a) - address(base)) // a.itemsize


def _tiled_grad(w, parts):
    """The one array whose row blocks are the gradients of `parts` at the parameters' offsets inside `w` (as the
    fused model's backward hands them out), viewed with w's shape; None when they are laid out otherwise."""
    grads = [layer.grads.get(key) for _, layer, key, _ in parts]
    gb = getattr(grads[0], "base", None)
    if gb is None or not is_gpu_array(gb) or gb.size != w.size or not gb.flags.c_contiguous:
        return None
    for (_, layer, key, off), g in zip(parts, grads):
        if layer.params[key].base is not w or g.base is not gb or not g.flags.c_contiguous \
                or g.shape != layer.params[key].shape or _offset(g, gb) != off:
            return None
    return gb.reshape(w.shape)


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
    constant never change
    """

    KINDS = ("plateau", "step", "constant")

    def __init__(self, kind="plateau", factor=10.0, patience=1, max_drops=3, step_epochs=10, min_delta=1e-4):
        if kind not in self.KINDS:
            raise CpnetError(f"--schedule {kind!r}: expected one of {', '.join(self.KINDS)}")
        if int(step_epochs) < 1:
            raise CpnetError(f"--step-epochs {step_epochs}: expected at least 1")
        if int(patience) < 1:
            raise CpnetError(f"--patience {patience}: expected at least 1")
        if not float(factor) > 1:
            raise CpnetError(f"schedule factor {factor}: expected a number above 1")
        self.kind, self.factor, self.patience, self.max_drops, self.step_epochs, self.min_delta = \
            kind, float(factor), int(patience), int(max_drops), int(step_epochs), float(min_delta)
        self.best = math.inf
        self.bad_epochs = 0
        self.drops = 0
        self.epochs = 0

    def update(self, lr: float, val_error: float | None) -> float:
        """The learning rate for the next epoch."""
        self.epochs += 1
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

    def state(self) -> dict:
        return dict(kind=self.kind, factor=self.factor, patience=self.patience, max_drops=self.max_drops,
                    step_epochs=self.step_epochs, min_delta=self.min_delta, best=self.best,
                    bad_epochs=self.bad_epochs, drops=self.drops, epochs=self.epochs)

    @classmethod
    def from_state(cls, s: dict) -> "Schedule":
        sch = cls(s["kind"], s["factor"], s["patience"], s["max_drops"], s["step_epochs"], s["min_delta"])
        sch.best, sch.bad_epochs, sch.drops, sch.epochs = s["best"], s["bad_epochs"], s["drops"], s["epochs"]
        return sch
