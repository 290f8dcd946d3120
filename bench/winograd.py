"""Winograd against im2col on the host: per convolution, and the whole training step layer by layer.

Thread CPU time (`time.thread_time`: this thread's own work, which moves less with the other tenants' load than
wall time), one OpenBLAS thread. Two parts:

    ops     each stride-1 convolution of the preset whose kernel size has a tile in --tiles, with one tower's
            shapes (as the two-tower host model runs it; layers below conv.WINOGRAD_MIN_PIXELS or
            WINOGRAD_MIN_CHANNELS are left out: they take im2col either way), conv2d_forward and conv2d_backward as wholes, the
            algorithms alternating call by call in one process: the minimum of --reps calls each.
    step    the model's training step (towers one after the other, each layer call timed through the model's
            per-layer hook, as `cpnet bench`'s layer pass), im2col and Winograd alternating step by step: per
            layer the minimum over --steps steps, both towers summed.

Not a test; prints tables (and JSON with --json).

    OPENBLAS_NUM_THREADS=1 python bench/winograd.py [--model alexnet-small] [--batch-size 128] [--tiles 3:2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

try:
    import cpnet  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpnet import ops  # noqa: E402
from cpnet.model import build_model, feature_shapes, make_config  # noqa: E402
from cpnet.ops import conv as conv_mod, winograd  # noqa: E402
from cpnet.optim import MomentumSGD  # noqa: E402


def _cpu_ms(fn):
    t = time.thread_time()
    out = fn()
    return (time.thread_time() - t) * 1e3, out


def bench_ops(preset, batch_size, tiles, reps=7, seed=0):
    """{layer: {algorithm: (forward_ms, backward_ms)}} for the layers that `tiles` sends through Winograd."""
    cfg = make_config(preset, num_classes=10)
    shapes = feature_shapes(cfg)
    prev = {"conv1": "input", "conv2": "pool1", "conv3": "pool2", "conv4": "conv3", "conv5": "conv4"}
    rng = np.random.default_rng(seed)
    out = {}
    for i, (f, k, s, p) in enumerate(cfg.conv):
        name = f"conv{i + 1}"
        if s != 1 or k not in tiles:
            continue
        W = rng.standard_normal((f, _in_channels(cfg, i), k, k)).astype(np.float32) * 0.05
        b = rng.standard_normal(f).astype(np.float32)
        hw = shapes[prev[name]][1]
        x = np.maximum(rng.standard_normal((batch_size, W.shape[1], hw, hw)), 0).astype(np.float32)
        algs = {"im2col": {}, "winograd": dict(tiles)}
        conv_mod.WINOGRAD_TILES = algs["winograd"]
        if not isinstance(ops.conv2d_forward(x, W, b, 1, p)[1], winograd.Cache):
            continue  # below conv.WINOGRAD_MIN_PIXELS / _CHANNELS: im2col either way
        ws = {a: {} for a in algs}
        best = {a: [np.inf, np.inf] for a in algs}
        dy = None
        for rep in range(reps + 1):
            for a, t in algs.items():
                conv_mod.WINOGRAD_TILES = t
                tf, (y, cache) = _cpu_ms(lambda: ops.conv2d_forward(x, W, b, 1, p, workspace=ws[a]))
                if dy is None:
                    dy = rng.standard_normal(y.shape).astype(np.float32)
                tb, _ = _cpu_ms(lambda: ops.conv2d_backward(dy, cache, workspace=ws[a]))
                if rep:  # the first round warms the workspaces
                    best[a] = [min(best[a][0], tf), min(best[a][1], tb)]
        out[name] = {a: tuple(v) for a, v in best.items()}
    conv_mod.WINOGRAD_TILES = None
    return out


def _in_channels(cfg, i):
    """Input channels of conv i+1 in one tower of the two-tower model (conv3 sees both towers' maps)."""
    if i == 0:
        return 3
    f_prev = cfg.conv[i - 1][0]
    return 2 * f_prev if i == 2 else f_prev


def bench_step(preset, batch_size, tiles, steps=3, seed=0):
    """{algorithm: {layer: (forward_ms, backward_ms)}}: per layer the minimum over `steps` hooked steps (both
    towers summed within a step), the two algorithms alternating step by step on the same model and batch."""
    cfg = make_config(preset, num_classes=10, seed=seed)
    model = build_model(cfg, tower_threads=False)
    opt = MomentumSGD(model, lr=1e-4)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, 3, cfg.crop, cfg.crop), dtype=np.float32)
    labels = rng.integers(0, 10, size=batch_size)
    algs = {"im2col": {}, "winograd": dict(tiles)}
    best = {a: {} for a in algs}

    def run(a, record):
        rows = {}

        def hook(name, phase, devices, call):
            ms, out = _cpu_ms(call)
            rows.setdefault(name, [0.0, 0.0])[phase == "backward"] += ms
            return out

        conv_mod.WINOGRAD_TILES = algs[a]
        model.loss(x, labels, train=True, hook=hook)
        model.loss_backward(hook=hook)
        ms, _ = _cpu_ms(opt.step)
        rows["update"] = [0.0, ms]
        if record:
            for name, (f, b) in rows.items():
                old = best[a].get(name, (np.inf, np.inf))
                best[a][name] = (min(old[0], f), min(old[1], b))

    for i in range(steps + 1):
        for a in algs:
            model.set_step(i)
            run(a, i > 0)
    model.clear()
    conv_mod.WINOGRAD_TILES = None
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="alexnet-small")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--tiles", default="3:2", help="CPNET_WINOGRAD's syntax: kernel:tile pairs (default 3:2)")
    ap.add_argument("--reps", type=int, default=7, help="calls per algorithm and layer in the ops part")
    ap.add_argument("--steps", type=int, default=3, help="steps per algorithm in the step part (0: skip it)")
    ap.add_argument("--json", help="also write the figures to this file")
    a = ap.parse_args(argv)
    tiles = conv_mod.parse_winograd(a.tiles)
    load = os.getloadavg()
    print(f"{a.model} b{a.batch_size}, tiles {tiles}, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    res = {"model": a.model, "batch_size": a.batch_size, "tiles": tiles, "load_before": load}
    res["ops"] = bench_ops(a.model, a.batch_size, tiles, a.reps)
    print("one tower, thread CPU ms, min of", a.reps, "calls: im2col fwd / bwd -> winograd fwd / bwd")
    s0 = s1 = 0.0
    for name, v in res["ops"].items():
        (f0, b0), (f1, b1) = v["im2col"], v["winograd"]
        s0, s1 = s0 + f0 + b0, s1 + f1 + b1
        print(f"  {name}: {f0:6.1f} / {b0:6.1f} -> {f1:6.1f} / {b1:6.1f}   sum {f0 + b0:6.1f} -> {f1 + b1:6.1f}")
    if res["ops"]:
        print(f"  these layers: {s0:.1f} -> {s1:.1f} ms ({100 * (s1 / s0 - 1):+.1f} %)")
    if a.steps:
        res["step"] = bench_step(a.model, a.batch_size, tiles, a.steps)
        print("training step, both towers, thread CPU ms, per layer the min of", a.steps, "steps (fwd / bwd):")
        tot = {}
        for name in res["step"]["im2col"]:
            (f0, b0), (f1, b1) = res["step"]["im2col"][name], res["step"]["winograd"][name]
            tot[name] = (f0 + b0, f1 + b1)
            if name.startswith("conv"):
                print(f"  {name}: {f0:6.1f} / {b0:6.1f} -> {f1:6.1f} / {b1:6.1f}")
        t0, t1 = sum(v[0] for v in tot.values()), sum(v[1] for v in tot.values())
        c0 = sum(v[0] for k, v in tot.items() if k.startswith("conv"))
        c1 = sum(v[1] for k, v in tot.items() if k.startswith("conv"))
        print(f"  convolutions: {c0:.1f} -> {c1:.1f} ms; whole step (sum of the layers and the update): "
              f"{t0:.1f} -> {t1:.1f} ms ({100 * (t1 / t0 - 1):+.1f} %)")
        res["step_totals"] = {"im2col": t0, "winograd": t1, "conv_im2col": c0, "conv_winograd": c1}
    res["load_after"] = os.getloadavg()
    print(f"load after {res['load_after'][0]:.2f}")
    if a.json:
        with open(a.json + ".tmp", "w") as fh:
            json.dump(res, fh, indent=1, default=str)
        os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
    main()
