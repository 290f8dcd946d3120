"""Measurements behind `cpnet bench`: per-layer times, the training step, the loader, memory and FLOP counts, and
(`--allreduce`) the gradient reduction of data-parallel replicas.

Nothing here prints; every function returns plain dicts (JSON-ready). Times are milliseconds measured by
`backend.Timer`: CUDA events on one GPU, `perf_counter` on the host, always after synchronising the devices, so
each figure is the work of exactly the call it brackets. Warm-up iterations (kernel compilation, first
allocations, BLAS thread start-up) are run and discarded first.

Per-layer times follow `caffe time`: the model's own forward and backward passes run with a per-layer hook
(model.AlexNet's `hook`), which synchronises the devices around each layer call and times it; a layer's figure is
the sum over both towers (run one after the other while hooked). The cross-tower exchanges (the concatenations
before conv3, fc6, fc7 and fc8, and the gradient splits after them) are reported as one row, `exchange`. A model
whose towers share a GPU runs fused (cpnet.fused): then each row is one fused layer doing both towers' work, and
there is no exchange row. On a GPU the rows act1-act5 are the identity (the ReLU runs in its convolution's row)
and, where layers 1-2's LRN and pool run as one kernel (`lrn_pool` in the JSON; CPNET_FUSE_LRN_POOL), lrn1 and
lrn2 hold the pooling too and pool1, pool2 are the identity. Because of the synchronisation around every call, the layer rows add up to a little
more than the whole step, which is timed separately without it.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time

import numpy as np

from . import backend
from .model import PRESETS, build_model, feature_shapes, make_config
from .optim import MomentumSGD

# The image size `cpnet prep` would store for each preset (the default crops are cut from it).
STORED_SIZE = {"alexnet": 256, "alexnet-small": 36, "alexnet-tiny": 17}


# ---- FLOP counts ---------------------------------------------------------------------------------------------------
def forward_macs(cfg, crop=None, grouped=True) -> dict:
    """Multiply-adds per image in the forward pass of every convolution and fully connected layer.

    Derived from `feature_shapes` and the per-tower layer geometry. With ``grouped=True`` (the paper's net)
    conv2, conv4 and conv5 see only their own tower's channels; conv3 and the FC layers see both towers'.
    ``grouped=False`` counts the same widths as one stream (every conv sees all channels). conv1 reads the 3
    input channels in both cases. Returns {'conv1': macs, ..., 'fc8': macs, 'total': macs}.
    """
    shapes = feature_shapes(cfg, crop)
    k_in = [3]  # input channels each conv reads, per output channel
    towers_in = [s[0] for s in (shapes["pool1"], shapes["pool2"], shapes["conv3"], shapes["conv4"])]
    for i, c_all in enumerate(towers_in):
        own_tower_only = i in (0, 2, 3)  # conv2, conv4, conv5 read their own tower
        k_in.append(c_all // 2 if (grouped and own_tower_only) else c_all)
    out = {}
    for i, (f, k, s, p) in enumerate(cfg.conv):
        c, h, w = shapes[f"conv{i + 1}"]
        out[f"conv{i + 1}"] = int(c * h * w * k_in[i] * k * k)
    fan6 = int(np.prod(shapes["pool5"]))
    out["fc6"] = int(shapes["fc6"][0] * fan6)
    out["fc7"] = int(shapes["fc7"][0] * shapes["fc6"][0])
    out["fc8"] = int(shapes["fc8"][0] * shapes["fc7"][0])
    out["total"] = int(sum(out.values()))
    return out


def flop_table(num_classes=1000) -> dict:
    """{preset: {'crop', 'grouped': forward_macs, 'ungrouped': forward_macs}} for every preset at its default crop."""
    table = {}
    for name in PRESETS:
        cfg = make_config(name, num_classes=num_classes)
        table[name] = {"crop": cfg.crop, "grouped": forward_macs(cfg), "ungrouped": forward_macs(cfg, grouped=False)}
    return table


def step_flops_per_image(cfg) -> int:
    """FLOPs (2 per multiply-add) of one training step per image: forward, the input gradient and the weight
    gradient of every conv and FC layer, each as large as the forward GEMM, less conv1's input gradient, which
    the model never computes (its input is the image: Conv2D input_grad=False)."""
    macs = forward_macs(cfg)
    return int(2 * (3 * macs["total"] - macs["conv1"]))


def gemm_gflops(device=backend.HOST, n=2048, repeats=5) -> dict:
    """Measured float32 GEMM speed on `device`: the best of `repeats` (n, n) @ (n, n) products."""
    with device:
        xp = device.xp
        rng = np.random.default_rng(0)
        a = backend.to_device(rng.standard_normal((n, n), dtype=np.float32), device)
        b = backend.to_device(rng.standard_normal((n, n), dtype=np.float32), device)
        xp.matmul(a, b)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            with backend.Timer(device) as t:
                xp.matmul(a, b)
            best = min(best, t.ms)
    return {"n": n, "ms": best, "gflops": 2.0 * n ** 3 / (best * 1e-3) / 1e9}


# ---- the training step, layer by layer -----------------------------------------------------------------------------
class _Recorder:
    """The model's per-layer hook: times every call on its devices and adds the milliseconds to the layer's row
    (rows in first-seen order; the model reports the exchanges as 'exchange' and the loss as 'loss')."""

    def __init__(self):
        self.rows = {}
        self.on = True

    def __call__(self, name, phase, devices, call):
        with backend.Timer(devices) as tm:
            out = call()
        if self.on:
            self.rows.setdefault(name, {"forward_ms": 0.0, "backward_ms": 0.0})[f"{phase}_ms"] += tm.ms
        return out


def _timed_step(model, x, labels, rec: _Recorder, opt):
    """One training step (forward, backward, update) with every layer call timed on its own."""
    loss, _ = model.loss(x, labels, train=True, hook=rec)
    model.loss_backward(hook=rec)
    with backend.Timer(model.devices) as tm:
        opt.step()
    return float(backend.to_host(loss)), tm.ms


def _batch(cfg, batch_size, device, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, 3, cfg.crop, cfg.crop), dtype=np.float32)
    y = rng.integers(0, cfg.num_classes, size=batch_size)
    return backend.to_device(x, device), backend.to_device(y, device)


def bench_model(preset="alexnet", batch_size=128, steps=10, warmup=2, num_classes=None, crop=None, placement=None,
                lr=0.01, seed=0, precision="fp32", width=1.0) -> dict:
    """Per-layer forward/backward times and the whole training step on random batches.

    Returns {'config', 'devices', 'layers': [{'name', 'forward_ms', 'backward_ms'}], 'layers_total', 'update_ms',
    'step': {'ms', 'ms_median', 'ms_min', 'images_per_s', 'first_loss'}}; per-layer figures are means over
    `steps` iterations after `warmup`, summed over both towers. `precision` 'bf16' builds the model in bf16
    (cpnet.precision); tf32 is the caller's switch (backend.set_tf32 / enable_tf32), as for training.
    """
    if num_classes is None:
        num_classes = 1000 if preset == "alexnet" else 10
    cfg = make_config(preset, num_classes=num_classes, crop=crop, seed=seed, width=width)
    model = build_model(cfg, placement=placement, precision=precision)
    devs = model.devices
    opt = MomentumSGD(model, lr=lr)
    x, y = _batch(cfg, batch_size, devs[0], seed)

    # Per-layer pass.
    rec = _Recorder()
    update = []
    first_loss = None
    for i in range(warmup + steps):
        rec.on = i >= warmup
        model.set_step(i)
        loss, upd_ms = _timed_step(model, x, y, rec, opt)
        first_loss = loss if first_loss is None else first_loss
        if rec.on:
            update.append(upd_ms)
    model.clear()
    layers = [{"name": n, "forward_ms": v["forward_ms"] / steps, "backward_ms": v["backward_ms"] / steps}
              for n, v in rec.rows.items()]
    totals = {"forward_ms": sum(r["forward_ms"] for r in layers), "backward_ms": sum(r["backward_ms"] for r in layers)}

    # Whole steps, no synchronisation inside.
    times = []
    for i in range(warmup + steps):
        model.set_step(warmup + steps + i)
        with backend.Timer(devs) as tm:
            model.loss(x, y)
            model.loss_backward()
            opt.step()
        if i >= warmup:
            times.append(tm.ms)
    model.clear()
    mean_ms = float(np.mean(times))
    return {
        "config": {"model": preset, "batch_size": int(batch_size), "crop": cfg.crop, "num_classes": num_classes,
                   "steps": int(steps), "warmup": int(warmup), "conventions": cfg.conventions, "width": float(width),
                   "dropout": cfg.dropout, "params": model.num_params()},
        "devices": [str(d) for d in devs],
        "fused": bool(model.fused),  # towers sharing a device as one grouped layer each (no exchange row)
        "lrn_pool": bool(model.lrn_pool),  # layers 1-2's LRN -> pool as one layer (its time in the lrn rows)
        "layers": layers,
        "layers_total": totals,
        "update_ms": float(np.mean(update)),
        "step": {"ms": mean_ms, "ms_median": float(np.median(times)), "ms_min": float(np.min(times)),
                 "images_per_s": batch_size / (mean_ms * 1e-3), "first_loss": first_loss},
    }


# ---- data-parallel replicas: the gradient reduction and the step (run under mpiexec -n N, or alone) --------------
def bench_allreduce(preset="alexnet-small", batch_size=128, steps=10, warmup=2, num_classes=None, bucket_mb=32.0,
                    gpus_per_replica=None, step=True, overlap=None) -> dict:
    """The gradient reduction of cpnet.dist and the data-parallel step, on every rank of the world (rank 0's dict
    is the one to report; every rank must call this, it runs collectives).

    Per step after `warmup`, medians over `steps`, between barriers (and a device synchronisation):
      reduce_s        Replicas.reduce(): pack each tower device's gradients into its flat buffers, sum them over
                      the replicas (MPI on the host, NCCL on GPUs, host staging without NCCL), divide, write back
      raw_allreduce_s one MPI Allreduce of a single host buffer of the same bytes (the transport alone)
      modes           per overlap setting ('off', 'on'): step_s, a whole step at global batch B (forward and
                      backward of this replica's B/N rows, the reduction, the update), images_per_s = B / step_s,
                      and exposed_reduce_s, the time of Replicas.reduce() after backward has returned
    `overlap`: None (as training does: dist.default_overlap), True, False, or 'both': the two alternately, step
    by step (off, on, on, off, ...), so that the machine's load falls on both alike. With N = 1 the reduction
    still packs and unpacks its buffers (what a world of one skips in training).
    """
    import statistics

    from . import dist

    w = dist.world()
    placement = dist.replica_placement(w, gpus_per_replica)
    first, rows = dist.shard_rows(w, batch_size)
    classes = num_classes or (1000 if preset == "alexnet" else 10)
    cfg = make_config(preset, classes)
    cpus = backend.cpu_share(w.local_size)
    settings = {"both": [False, True]}.get(overlap, [overlap])
    with backend.host_threads(backend.default_host_threads(0, w.local_size)):
        model = build_model(cfg, placement=placement, tower_threads=None if w.local_size == 1 else cpus >= 2)
        opt = MomentumSGD(model, lr=1e-4)
        replicas = [dist.Replicas(w, model, opt, bucket_bytes=int(bucket_mb * 2 ** 20), alone=True, overlap=on)
                    for on in settings]
        reps = replicas[0]
        reps.start()
        rng = np.random.default_rng(w.rank)
        x = rng.standard_normal((rows, 3, cfg.crop, cfg.crop)).astype(np.float32)
        y = rng.integers(0, classes, rows)

        def sync():
            backend.synchronize_all()
            w.barrier()

        def timed(fn, variants=1):
            """Median seconds of fn(i, v) per variant v, the variants alternating (0 1 1 0 0 1 ...)."""
            out = [[] for _ in range(variants)]
            for i in range(warmup + steps):
                for v in (range(variants) if i % 2 == 0 else reversed(range(variants))):
                    sync()
                    t = time.perf_counter()
                    fn(i, v)
                    sync()
                    if i >= warmup:
                        out[v].append(time.perf_counter() - t)
            return [statistics.median(o) for o in out]

        model.set_step(0, offset=first)
        model.loss(x, y, train=True)
        model.loss_backward()  # gradients to reduce
        nbytes = model.num_params() * model.dtype.itemsize
        t_reduce, = timed(lambda i, v: reps.reduce())
        raw = np.zeros(model.num_params(), model.dtype)
        t_raw, = timed(lambda i, v: w.sum(raw))
        model.clear()
        exposed = [[] for _ in replicas]

        def one_step(i, v):
            r = replicas[v]
            model.set_step(i, offset=first)
            model.loss(x, y, train=True)
            model.loss_backward(done=r.backward_done)
            t = time.perf_counter()
            r.reduce()
            backend.synchronize_all()
            if i >= warmup:
                exposed[v].append(time.perf_counter() - t)
            opt.step()
            model.clear()

        t_steps = timed(one_step, len(replicas)) if step else None
    res = dict(model=preset, params=model.num_params(), grad_bytes=nbytes, replicas=w.size, nodes=w.nodes,
               world=w.describe(), devices=[str(d) for d in model.devices], reduction=reps.describe(),
               buckets=len(reps.buckets), batch_size=batch_size, rows_per_replica=rows, reduce_s=t_reduce,
               raw_allreduce_s=t_raw, reduce_GB_per_s=nbytes / t_reduce / 1e9, step_s=None, images_per_s=None,
               cpus=os.cpu_count(), cpus_per_rank=cpus, load=os.getloadavg(), python=platform.python_version(),
               numpy=np.__version__)
    if t_steps is not None:
        res.update(step_s=t_steps[0], images_per_s=batch_size / t_steps[0])
        res["modes"] = {("on" if r.overlap else "off"): dict(step_s=t, exposed_reduce_s=statistics.median(e),
                                                             images_per_s=batch_size / t)
                        for r, t, e in zip(replicas, t_steps, exposed)}
    return res


def allreduce_lines(res: dict) -> list[str]:
    """`bench_allreduce`'s result as the lines of a small table (for `cpnet bench --allreduce` and
    bench/allreduce.py)."""
    nbytes, rows = res["grad_bytes"], res["rows_per_replica"]
    lines = [f"{res['model']}: {res['params']:,} parameters, {nbytes / 1e6:.1f} MB of float32 gradients; "
             f"{res['world']}; towers on {', '.join(res['devices'])}; {res['reduction']}",
             f"reduce (pack, sum, unpack) {res['reduce_s'] * 1e3:9.2f} ms  ({res['reduce_GB_per_s']:.2f} GB/s of "
             "gradients)",
             f"raw Allreduce, one buffer  {res['raw_allreduce_s'] * 1e3:9.2f} ms"]
    for mode, m in (res.get("modes") or {}).items():
        lines.append(f"step at global batch {res['batch_size']} ({rows} rows per replica), overlap {mode:3s} "
                     f"{m['step_s'] * 1e3:9.1f} ms = {m['images_per_s']:.0f} images/s; reduction exposed after "
                     f"backward {m['exposed_reduce_s'] * 1e3:.2f} ms")
    lines.append(f"load average {res['load'][0]:.2f}, {res['cpus']} CPUs, {res['cpus_per_rank']} per rank")
    return lines


# ---- the loader, memory, the machine -------------------------------------------------------------------------------
def bench_loader(path, batch_size, crop, workers=0, batches=8, seed=0, raw=False) -> dict:
    """Images/s of `TrainLoader` over `batches` batches after one warm-up batch (epochs wrap as needed); `raw`:
    the uint8 batches a model on a GPU takes (backend.gpu_augment), which leave the augmentation to the GPU."""
    from cpnet.data import TrainLoader

    with TrainLoader(path, batch_size, crop, seed=seed, workers=workers, raw=raw) as loader:
        def stream():
            e = 0
            while True:
                yield from loader.epoch(e)
                e += 1

        it = stream()
        next(it)
        t0 = time.perf_counter()
        n = 0
        for _ in range(batches):
            xb, _ = next(it)
            n += len(xb)
        dt = time.perf_counter() - t0
    return {"path": os.fspath(path), "workers": int(workers), "batch_size": int(batch_size), "crop": int(crop),
            "batches": int(batches), "images_per_s": n / dt, "raw": bool(raw)}


def memory() -> dict:
    """Peak host RSS of this process (bytes) and CuPy's pool on every GPU (bytes held; the pool's peak)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss *= 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return {"host_peak_rss_bytes": int(rss), "gpu_pool_bytes": backend.memory_pool_bytes_per_device()}


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform(), "backend": "cupy" if backend.use_gpu() else "numpy",
            "threads_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
                            if k in os.environ}}
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]  # other work on the machine skews CPU figures
    except OSError:
        pass
    info["gpus"] = [backend.gpu_name(i) for i in range(backend.gpu_count())] if backend.use_gpu() else []
    return info


def floors(cfg, gemm: dict, batch_size: int) -> dict:
    """The fastest step the measured GEMM speed allows: all conv/FC work at that speed, everything else free."""
    f = step_flops_per_image(cfg)
    per_image_s = f / (gemm["gflops"] * 1e9)
    return {"forward_macs_per_image": forward_macs(cfg)["total"], "step_flops_per_image": f,
            "gemm_gflops": gemm["gflops"], "floor_step_ms": per_image_s * batch_size * 1e3,
            "floor_images_per_s": 1.0 / per_image_s}
