"""Kernel launches per training step on cpnet's GPU path, counted without a GPU.

A stand-in for CuPy (`StandInCupy`: NumPy arrays that pass for CuPy arrays on GPU 0) runs one training step of
the fused model on the GPU code path: `cpnet.train.Trainer.forward_backward` (set_step, forward, loss, backward,
the top-k counts) and `Trainer.update` (the momentum update), as `cpnet train` runs them. cpnet's own kernels run
through the host shim, counted as the stand-in's RawModule starts them (the same count as the launcher's own
counter, `cpnet.kernels.launch_counts`, where the code has one); what CuPy would launch is counted by the stand-in, one per operation that launches on CuPy:

    cupy     an elementwise ufunc or a reduction (one kernel each in CuPy), a copy (ascontiguousarray of a strided
             array, copy, astype, concatenate, a reshape that cannot be a view), a fill (zeros), arange, a fancy
             index read or any item assignment
    cublas   a matmul (one GEMM; cuBLAS may split it further)
    copy     a host <-> device transfer (the batch upload, through a pinned buffer on a side stream since
             backend.upload; the label uploads; a value read back)

It is a count, not a timing: each launch costs the host about 20 us of Python and CuPy (docs/PERFORMANCE.md),
which is what fewer launches save. The stand-in counts CuPy's launches by its rules above, not CuPy's own code.

    python bench/launch_count.py [--model alexnet-tiny] [--batch-size 4] [--steps 2] [--input raw|float] [--json]
    python bench/launch_count.py --traffic [--model alexnet] [--batch-size 128] [--precision fp32]

(CPNET_FUSE_LRN_POOL=0 counts the step with layers 1-2's LRN and pool apart. --traffic prints the bytes those
kernels move per step, apart and fused, computed from the shapes by `lrn_pool_traffic`; the tests check that
formula against the bytes of the arrays the stand-in's launches are handed.)

--input raw (the default) feeds each step a raw batch as `cpnet train` does on a GPU (data.augment.RawBatch: the
uint8 crop windows and the per-crop choices, one pinned upload, the input made by augment.cu); --input float a
float32 batch, as with CPNET_GPU_AUGMENT=0. The bytes each step uploads are reported too (backend.upload_stats).

(the counts do not depend on the batch size or on the preset's widths, only on the layers; alexnet-tiny is the
quickest to run through the shim.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import types
from collections import Counter

import numpy as np

try:
    import cpnet  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpnet import backend, kernels  # noqa: E402

counts: Counter = Counter()  # kind -> launches counted by the stand-in ('cupy', 'cublas', 'copy')
raw_launches: Counter = Counter()  # cpnet kernel name -> launches through the stand-in's RawModule
raw_bytes: Counter = Counter()  # cpnet kernel name -> bytes of the arrays its launches were handed
ops_seen: Counter = Counter()  # what the 'cupy' launches were (function or method name)


def _count(kind, what):
    counts[kind] += 1
    ops_seen[f"{kind}:{what}"] += 1


def _plain(a):
    return a.view(np.ndarray) if isinstance(a, GpuArray) else a


def _wrap(a):
    """A result as a GpuArray: a view stays a view (its base the array that owns the memory, as CuPy's views and
    the optimizer's layout checks have it); a fresh array is moved into a GpuArray that owns its memory."""
    if not isinstance(a, np.ndarray) or isinstance(a, GpuArray):
        return a
    owner = a.base
    while isinstance(owner, np.ndarray) and not isinstance(owner, GpuArray):
        owner = owner.base
    if isinstance(owner, GpuArray):  # a view of stand-in memory: the same view, based on the array that owns it
        while owner.base is not None:
            owner = owner.base
        return np.ndarray.__new__(GpuArray, a.shape, a.dtype, buffer=owner,
                                  offset=a.ctypes.data - owner.ctypes.data, strides=a.strides)
    own = np.ndarray.__new__(GpuArray, a.shape, a.dtype)
    np.copyto(own.view(np.ndarray), a)
    return own


def _unwrap_all(args):
    if isinstance(args, (list, tuple)):
        return type(args)(_unwrap_all(a) for a in args)
    return _plain(args)


class GpuArray(np.ndarray):
    """A NumPy array that passes for a CuPy array on GPU 0 and counts what CuPy would launch on it."""

    device = types.SimpleNamespace(id=0)

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)

    def __array_ufunc__(self, ufunc, method, *inputs, **kw):
        out = kw.get("out")
        if out is not None:
            kw["out"] = tuple(_plain(o) for o in out)
        result = getattr(ufunc, method)(*(_plain(i) for i in inputs), **kw)
        _count("cublas" if ufunc is np.matmul else "cupy", f"{ufunc.__name__}.{method}")
        if out is not None:
            return out[0] if len(out) == 1 else out
        if isinstance(result, tuple):
            return tuple(_wrap(np.asarray(r)) for r in result)
        return _wrap(np.asarray(result)) if result is not NotImplemented else result

    def __getitem__(self, key):
        out = super().__getitem__(_unwrap_all(key))
        if not (isinstance(out, np.ndarray) and np.shares_memory(out, self)):
            _count("cupy", "getitem (gather)")
        return _wrap(out) if isinstance(out, np.ndarray) else _wrap(np.asarray(out))

    def __setitem__(self, key, value):
        super().__setitem__(_unwrap_all(key), _plain(value))
        _count("cupy", "setitem")

    def copy(self, order="C"):
        _count("cupy", "copy")
        return _wrap(_plain(self).copy(order))

    def astype(self, dtype, *a, copy=True, **k):
        if np.dtype(dtype) == self.dtype and not copy:
            return self
        _count("cupy", "astype")
        return _wrap(_plain(self).astype(dtype, *a, **k))

    def reshape(self, *shape, **k):
        out = super().reshape(*shape, **k)
        if not np.shares_memory(out, self):
            _count("cupy", "reshape (copy)")
        return _wrap(out)

    def __float__(self):
        _count("copy", "read back")
        return float(_plain(self))

    def get(self):
        _count("copy", "device to host")
        return np.array(_plain(self))

    def set(self, host, stream=None):
        _count("copy", "host to device (pinned, side stream)" if stream is not None else "host to device")
        np.copyto(_plain(self), host)


_FREE = {"empty", "empty_like"}  # allocations: no kernel


stream_log: list = []  # ('record', stream name, event) / ('wait', stream name, event) / ('sync', event)


class _Event:
    def synchronize(self):
        stream_log.append(("sync", self))


class _Stream:
    def __init__(self, non_blocking=False, name="side"):
        self.name = name

    def record(self):
        ev = _Event()
        stream_log.append(("record", self.name, ev))
        return ev

    def wait_event(self, ev):
        stream_log.append(("wait", self.name, ev))


_COMPUTE = _Stream(name="compute")


class _Cuda:
    Stream = _Stream
    Event = _Event

    @staticmethod
    def get_current_stream():
        return _COMPUTE

    @staticmethod
    def alloc_pinned_memory(nbytes):
        return bytearray(nbytes)

    class Device:
        def __init__(self, index=0):
            self.id = int(index)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def synchronize(self):
            pass

    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1)


class StandInCupy(types.ModuleType):
    """Just enough of the cupy module for cpnet's GPU path, on NumPy, counting launches."""

    ndarray = GpuArray
    cuda = _Cuda

    def __init__(self):
        super().__init__("cupy_stand_in")

    @staticmethod
    def asarray(a, dtype=None):
        if isinstance(a, GpuArray):
            if dtype is None or np.dtype(dtype) == a.dtype:
                return a
            _count("cupy", "asarray (astype)")
            return _wrap(_plain(a).astype(dtype))
        _count("copy", "host to device")
        return _wrap(np.array(a, dtype=dtype))

    @staticmethod
    def asnumpy(a):
        _count("copy", "device to host")
        return np.array(_plain(a))

    @staticmethod
    def ascontiguousarray(a, dtype=None):
        p = _plain(a)
        if p.flags.c_contiguous and (dtype is None or np.dtype(dtype) == p.dtype):
            return a if isinstance(a, GpuArray) else _wrap(p)
        _count("cupy", "ascontiguousarray (copy)")
        return _wrap(np.ascontiguousarray(p, dtype=dtype))

    def __getattr__(self, name):
        fn = getattr(np, name)
        # ufuncs count through GpuArray.__array_ufunc__; dtypes (cupy.float64, ...) are NumPy's
        if isinstance(fn, (np.ufunc, type)) or not callable(fn):
            return fn

        def call(*args, **kw):
            if "out" in kw:
                kw["out"] = _plain(kw["out"])
            result = fn(*_unwrap_all(args), **kw)
            if name not in _FREE:
                _count("cupy", name)
            return _wrap(result) if isinstance(result, np.ndarray) else result

        return call


class _Module:
    """cupy.RawModule: its kernels run through the host shim (the launcher counts them)."""

    def __init__(self, code, options=()):
        import re

        self.dtype = next(dt for dt, c in kernels._CTYPE.items() if re.search(rf"typedef {c} T;", code))

    def get_function(self, name):
        from cpnet.kernels import shim

        def run(grid, block, args):
            raw_launches[name] += 1
            raw_bytes[name] += sum(int(a.nbytes) for a in args if isinstance(a, np.ndarray) and a.ndim)
            shim.launch(name, self.dtype, grid, block[0], [_plain(a) if isinstance(a, np.ndarray) else a
                                                           for a in args])

        return run


@contextlib.contextmanager
def stand_in():
    """cpnet's backend on the stand-in CuPy for the duration (GPU 0 is the host's memory)."""
    fake = StandInCupy()
    saved = (backend._cupy, backend.raw_module, dict(kernels._modules), dict(kernels._functions),
             dict(backend._uploads))
    backend._cupy = fake
    backend._uploads.clear()
    backend.raw_module = lambda code, options=(): _Module(code, options)
    kernels._modules.clear()
    kernels._functions.clear()
    try:
        yield fake
    finally:
        backend._cupy, backend.raw_module = saved[0], saved[1]
        kernels._modules.clear()
        kernels._modules.update(saved[2])
        kernels._functions.clear()
        kernels._functions.update(saved[3])
        backend._uploads.clear()
        backend._uploads.update(saved[4])


@contextlib.contextmanager
def _env(name, value):
    """Environment variable `name` set to `value` (None: left as it is) for the duration."""
    saved = os.environ.get(name)
    if value is not None:
        os.environ[name] = str(value)
    try:
        yield
    finally:
        if value is not None:
            if saved is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = saved


def raw_batches(crop, batch_size, seed=0, pad=0):
    """make(step) -> a training RawBatch of random uint8 images 4 px larger than the crop, drawn as TrainLoader
    draws them (lighting 0.1, flips, `pad`), and the float32 batch the host loader makes of the same images."""
    from cpnet.data import augment

    size = crop + 4
    rng = np.random.default_rng(seed)
    mean = np.ascontiguousarray((rng.random((3, size, size)) * 255).astype(np.float32))
    eigval, eigvec = rng.random(3).astype(np.float32) * 0.2, rng.standard_normal((3, 3)).astype(np.float32)
    lay = augment.RawLayout.choose(batch_size, 1, crop, size)

    def make(step):
        images = np.random.default_rng([seed, step]).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
        rows = np.arange(batch_size)
        params = augment.train_params(seed, 0, step, batch_size, size, crop, 0.1, True, pad)
        buf = np.empty(lay.nbytes, np.uint8)
        augment.train_raw_into(buf, lay, images, rows, params, eigval, eigvec)
        x = np.empty((batch_size, 3, crop, crop), np.float32)
        augment.train_batch_into(x, images, rows, params, mean, eigval, eigvec, 1 / 64)
        return augment.RawBatch(buf, batch_size, lay, mean, 1 / 64, train=True), x

    return make


def count_step(preset="alexnet-tiny", batch_size=4, steps=2, seed=0, lrn_pool=None, input="raw"):
    """Launches of one training step (the last of `steps`, after warm-up steps that compile and fill caches),
    as {'cpnet kernels': {name: n}, 'launcher': the launcher's own count (None where it has none), 'cupy': n,
    'cublas': n, 'copy': n, 'total': n, 'cupy ops': {what: n}, 'kernel bytes': {name: bytes of the arrays handed
    to its launches}, 'upload bytes': the batch's bytes sent}. `lrn_pool`: CPNET_FUSE_LRN_POOL for the model (0:
    LRN and pool apart; None: as set). `input`: 'raw' (a RawBatch each step, augmented by augment.cu, as cpnet
    train on a GPU) or 'float'."""
    from cpnet import dist
    from cpnet.model import build_model, make_config
    from cpnet.optim import MomentumSGD
    from cpnet.train import Trainer

    cfg = make_config(preset, 10, seed=seed)
    rng = np.random.default_rng(seed)
    if input not in ("raw", "float"):
        raise ValueError(f"input must be 'raw' or 'float', got {input!r}")
    make = raw_batches(cfg.crop, batch_size, seed)
    y = rng.integers(0, 10, batch_size)
    with stand_in(), _env("CPNET_FUSE_LRN_POOL", lrn_pool):
        dev = backend.Device("gpu", 0)
        model = build_model(cfg, placement=[dev, dev], fuse=True)
        opt = MomentumSGD(model, lr=0.01)
        trainer = types.SimpleNamespace(model=model, dev0=dev, loader=None, iteration=0, opt=opt,
                                        replicas=dist.Replicas(dist.World(), model, opt))  # a world of one
        for step in range(steps):
            counts.clear()
            ops_seen.clear()
            raw_launches.clear()
            raw_bytes.clear()
            launcher = getattr(kernels, "launch_counts", None)  # the launcher's own counter (where it has one)
            if launcher is not None:
                launcher.clear()
            trainer.iteration = step
            raw, x = make(step)
            backend.reset_upload_stats()
            Trainer.forward_backward(trainer, raw if input == "raw" else x, y)
            uploaded = backend.upload_stats()["bytes"]
            Trainer.reduce_gradients(trainer)
            Trainer.update(trainer)
        ours = dict(sorted(raw_launches.items()))
        launcher = None if launcher is None else dict(sorted(launcher.items()))
    total = sum(ours.values()) + sum(counts.values())
    return {"cpnet kernels": ours, "launcher": launcher, "cpnet kernels total": sum(ours.values()), **dict(counts),
            "total": total, "upload bytes": uploaded, "input": input,
            "cupy ops": dict(sorted(ops_seen.items())), "kernel bytes": dict(sorted(raw_bytes.items())),
            "lrn_pool": bool(model.lrn_pool)}



LRN_POOL_KERNELS = ("lrn_forward_kernel", "lrn_backward_kernel", "maxpool_forward_kernel", "maxpool_backward_kernel",
                    "lrn_pool_forward_kernel", "lrn_pool_backward_kernel")


def lrn_pool_traffic(preset="alexnet", batch_size=128, precision="fp32"):
    """Bytes the LRN and pool kernels of layers 1-2 read and write in one training step, apart and fused, from the
    model's shapes: every array a launch is handed counted once (window re-reads assumed cached), as the stand-in's
    'kernel bytes' count them. E elements of LRN input (conv1, conv2 outputs), P pooled outputs, T bytes per
    activation (4 fp32/tf32, 2 bf16), the LRN scale float32 (4), the pool's argmax int32 (4) apart, uint8 fused:

        apart  forward   LRN x, y, scale; pool y, out, argmax          E (3T + 4) + P (T + 4)
               backward  pool dy, argmax, dx; LRN x, y, scale, dy, dx   E (5T + 4) + P (T + 4)
        fused  forward   x, out, off                                  E T + P (T + 1)
               backward  x, dy, off, dx                               E 2T + P (T + 1)

    and the activation memory held from forward to backward: apart y, scale, argmax; fused off (x is held by
    both, the convolution's backward reads it too)."""
    from cpnet.model import feature_shapes, make_config

    cfg = make_config(preset, 1000 if preset == "alexnet" else 10)
    shapes = feature_shapes(cfg)
    t = 2 if precision == "bf16" else 4
    out = {"preset": preset, "batch_size": batch_size, "precision": precision, "layers": {}}
    for tag in ("1", "2"):
        e = batch_size * int(np.prod(shapes[f"conv{tag}"]))
        p = batch_size * int(np.prod(shapes[f"pool{tag}"]))
        out["layers"][f"lrn{tag}+pool{tag}"] = {
            "E": e, "P": p,
            "apart": {"forward": e * (3 * t + 4) + p * (t + 4), "backward": e * (5 * t + 4) + p * (t + 4),
                      "held": e * (t + 4) + p * 4},
            "fused": {"forward": e * t + p * (t + 1), "backward": 2 * e * t + p * (t + 1), "held": p}}
    for way in ("apart", "fused"):
        out[way] = {k: sum(v[way][k] for v in out["layers"].values()) for k in ("forward", "backward", "held")}
        out[way]["step"] = out[way]["forward"] + out[way]["backward"]
    out["saved_per_step"] = out["apart"]["step"] - out["fused"]["step"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="alexnet-tiny")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--input", choices=("raw", "float"), default="raw")
    p.add_argument("--json", action="store_true")
    p.add_argument("--traffic", action="store_true",
                   help="print the bytes the layer 1-2 LRN and pool kernels move per step, apart and fused, for "
                        "--model at --batch-size (computed from the shapes, not timed) instead of counting")
    p.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"), help="for --traffic")
    a = p.parse_args(argv)
    if a.traffic:
        t = lrn_pool_traffic(a.model, a.batch_size, a.precision)
        if a.json:
            print(json.dumps(t, indent=1))
            return 0
        mb = 1e6
        print(f"{a.model}, batch {a.batch_size}, {a.precision}: bytes the layer 1-2 LRN and pool kernels move per "
              f"training step (each array once)")
        for way in ("apart", "fused"):
            v = t[way]
            print(f"  {way:6s} forward {v['forward'] / mb:8.1f} MB  backward {v['backward'] / mb:8.1f} MB  step "
                  f"{v['step'] / mb:8.1f} MB  held for backward {v['held'] / mb:7.1f} MB")
        print(f"  saved per step {t['saved_per_step'] / mb:.1f} MB")
        return 0
    r = count_step(a.model, a.batch_size, a.steps, input=a.input)
    if a.json:
        print(json.dumps(r, indent=1))
        return 0
    print(f"{a.model}, batch {a.batch_size}: launches in one training step on the GPU path (stand-in CuPy), "
          f"{a.input} input ({r['upload bytes']} bytes uploaded)")
    print(f"  cpnet kernels {r['cpnet kernels total']:4d}  " + ", ".join(f"{k} {v}" for k, v in r["cpnet kernels"].items()))
    for kind in ("cupy", "cublas", "copy"):
        print(f"  {kind:13s} {r.get(kind, 0):4d}")
    print(f"  total         {r['total']:4d}")
    print("  CuPy operations: " + ", ".join(f"{k} {v}" for k, v in r["cupy ops"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
