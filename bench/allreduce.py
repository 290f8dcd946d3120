"""Gradient reduction and data-parallel step time: run under `mpiexec -n N` (or alone, N = 1).

For the preset's parameters (float32) it times, per step after warm-up:
  reduce   cpnet.dist.Replicas.reduce: pack each tower device's gradients into its flat buffers, sum them over
           the N replicas (MPI on the host, NCCL on GPUs, host staging without NCCL), divide, write back
  raw      one MPI Allreduce of a single host buffer of the same bytes (the transport alone)
  step     a whole data-parallel training step at global batch B: forward and backward of this replica's B/N
           rows, the reduction, the momentum update; global images/s = B / step time
  exposed  within the step, the time of Replicas.reduce() after backward has returned: the reduction that
           backward did not hide (all of it without overlap; the rest and the wait with it)
--overlap on|off|both: the reduction overlapped with backward (cpnet.dist.Replicas `overlap`) or after it; `both`
times the two alternately, step by step in one run (off, on, on, off, ...), so that the machine's load falls on
both alike. Each figure is the median over --steps, measured between barriers (and a device synchronisation on
GPUs). With N = 1 the reduction still packs and unpacks its buffers (what a world of one skips in training).

    mpiexec -n 2 .venv/bin/python bench/allreduce.py --model alexnet-small --batch-size 128
    mpiexec -n 2 .venv/bin/python bench/allreduce.py --model alexnet-small --bucket-mb 1 --overlap both
    .venv/bin/python bench/allreduce.py --model alexnet --no-step        # the 244 MB reduction alone
"""
import argparse
import json
import os
import platform
import statistics
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="alexnet-small")
    ap.add_argument("--batch-size", type=int, default=128, help="global batch (split over the replicas)")
    ap.add_argument("--classes", type=int, default=None, help="[default: 1000 for alexnet, 10 otherwise]")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--bucket-mb", type=float, default=32.0, help="flat-buffer size cap")
    ap.add_argument("--gpus-per-replica", type=int, default=None)
    ap.add_argument("--no-step", action="store_true", help="time the reduction only, not the training step")
    ap.add_argument("--overlap", choices=("on", "off", "both"), default=None,
                    help="reduction overlapped with backward, after it, or both alternately [default: as training "
                         "does (cpnet.dist.default_overlap)]")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    a = ap.parse_args()

    from cpnet import backend, dist
    from cpnet.model import build_model, make_config
    from cpnet.optim import MomentumSGD

    w = dist.world()
    placement = dist.replica_placement(w, a.gpus_per_replica)
    first, rows = dist.shard_rows(w, a.batch_size)
    classes = a.classes or (1000 if a.model == "alexnet" else 10)
    cfg = make_config(a.model, classes)
    cpus = backend.cpu_share(w.local_size)
    with backend.host_threads(backend.default_host_threads(0, w.local_size)):
        model = build_model(cfg, placement=placement, tower_threads=None if w.local_size == 1 else cpus >= 2)
        opt = MomentumSGD(model, lr=1e-4)
        modes = {"on": [True], "off": [False], "both": [False, True], None: [None]}[a.overlap]
        replicas = [dist.Replicas(w, model, opt, bucket_bytes=int(a.bucket_mb * 2 ** 20), alone=True, overlap=on)
                    for on in modes]
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
            for i in range(a.warmup + a.steps):
                for v in (range(variants) if i % 2 == 0 else reversed(range(variants))):
                    sync()
                    t = time.perf_counter()
                    fn(i, v)
                    sync()
                    if i >= a.warmup:
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

        def step(i, v):
            r = replicas[v]
            model.set_step(i, offset=first)
            model.loss(x, y, train=True)
            model.loss_backward(done=r.backward_done)
            t = time.perf_counter()
            r.reduce()
            backend.synchronize_all()
            if i >= a.warmup:
                exposed[v].append(time.perf_counter() - t)
            opt.step()
            model.clear()

        t_steps = None if a.no_step else timed(step, len(replicas))
    if not w.is_root:
        return
    t_step = None if t_steps is None else t_steps[0]
    res = dict(model=a.model, params=model.num_params(), grad_bytes=nbytes, replicas=w.size, nodes=w.nodes,
               devices=[str(d) for d in model.devices], reduction=reps.describe(), buckets=len(reps.buckets),
               batch_size=a.batch_size, rows_per_replica=rows, reduce_s=t_reduce, raw_allreduce_s=t_raw,
               reduce_GB_per_s=nbytes / t_reduce / 1e9, step_s=t_step,
               images_per_s=None if t_step is None else a.batch_size / t_step, cpus=os.cpu_count(),
               cpus_per_rank=cpus, load=os.getloadavg(), python=platform.python_version(), numpy=np.__version__)
    if t_steps is not None:
        res["modes"] = {("on" if r.overlap else "off"): dict(step_s=t, exposed_reduce_s=statistics.median(e),
                                                             images_per_s=a.batch_size / t)
                        for r, t, e in zip(replicas, t_steps, exposed)}
    if a.json:
        print(json.dumps(res))
        return
    print(f"{a.model}: {res['params']:,} parameters, {nbytes / 1e6:.1f} MB of float32 gradients; {w.describe()}; "
          f"towers on {', '.join(res['devices'])}; {res['reduction']}")
    print(f"reduce (pack, sum, unpack) {t_reduce * 1e3:9.2f} ms  ({res['reduce_GB_per_s']:.2f} GB/s of gradients)")
    print(f"raw Allreduce, one buffer  {t_raw * 1e3:9.2f} ms")
    for mode, m in (res.get("modes") or {}).items():
        print(f"step at global batch {a.batch_size} ({rows} rows per replica), overlap {mode:3s} "
              f"{m['step_s'] * 1e3:9.1f} ms = {m['images_per_s']:.0f} images/s; reduction exposed after backward "
              f"{m['exposed_reduce_s'] * 1e3:.2f} ms")
    print(f"load average {res['load'][0]:.2f}, {res['cpus']} CPUs, {cpus} per rank")


if __name__ == "__main__":
    main()
