"""The host's convolution algorithms against each other: per convolution, and the whole training step layer by layer.

The algorithms (--algorithms, the first is the baseline of the percentages):

    im2col    im2col + GEMM everywhere (CPNET_WINOGRAD=0 CPNET_FOURIER=0)
    winograd  Winograd's F(m x m, r x r) with --tiles where its thresholds let it, im2col elsewhere (CPNET_FOURIER=0)
    fourier   the DFT path where its thresholds let it, then Winograd with --tiles, then im2col (the defaults)

Thread CPU time (`time.thread_time`: this thread's own work, which moves less with the other tenants' load than
wall time), one OpenBLAS thread. Two parts:

    ops     each stride-1 convolution of the preset with one tower's shapes (as the two-tower host model runs it;
            layers that every algorithm sends to im2col are left out), conv2d_forward and conv2d_backward as
            wholes, the algorithms alternating call by call in one process: the minimum of --reps calls each.
    step    the model's training step (towers one after the other, each layer call timed through the model's
            per-layer hook, as `cpnet bench`'s layer pass), the algorithms alternating step by step: per layer the
            minimum over --steps steps, both towers summed.

Not a test; prints tables (and JSON with --json). (Until the DFT path it was bench/winograd.py, im2col against
Winograd.)

    OPENBLAS_NUM_THREADS=1 python bench/conv_algorithms.py [--model alexnet-small] [--batch-size 128] \
        [--tiles 3:2] [--algorithms im2col,winograd,fourier]
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
from cpnet.ops import conv as conv_mod, fourier, winograd  # noqa: E402
from cpnet.optim import MomentumSGD  # noqa: E402


ALGORITHMS = ("im2col", "winograd", "fourier")


def _use(algorithm, tiles):
    """Set the host convolutions' algorithm (conv's module settings)."""
    conv_mod.WINOGRAD_TILES = {} if algorithm == "im2col" else dict(tiles)
    conv_mod.FOURIER = algorithm == "fourier"


def _reset():
    conv_mod.WINOGRAD_TILES = conv_mod.FOURIER = None


def _cpu_ms(fn):
    t = time.thread_time()
    out = fn()
    return (time.thread_time() - t) * 1e3, out


def bench_ops(preset, batch_size, tiles, reps=7, seed=0, algorithms=ALGORITHMS):
    """{layer: {algorithm: (forward_ms, backward_ms)}} for the stride-1 layers that some algorithm takes past
    im2col."""
    cfg = make_config(preset, num_classes=10)
    shapes = feature_shapes(cfg)
    prev = {"conv1": "input", "conv2": "pool1", "conv3": "pool2", "conv4": "conv3", "conv5": "conv4"}
    rng = np.random.default_rng(seed)
    out = {}
    for i, (f, k, s, p) in enumerate(cfg.conv):
        name = f"conv{i + 1}"
        if s != 1:
            continue
        W = rng.standard_normal((f, _in_channels(cfg, i), k, k)).astype(np.float32) * 0.05
        b = rng.standard_normal(f).astype(np.float32)
        hw = shapes[prev[name]][1]
        x = np.maximum(rng.standard_normal((batch_size, W.shape[1], hw, hw)), 0).astype(np.float32)
        algs = []
        for a in algorithms:
            _use(a, tiles)
            if a == "im2col" or isinstance(ops.conv2d_forward(x, W, b, 1, p)[1], (winograd.Cache, fourier.Cache)):
                algs.append(a)
        if len(algs) < 2:
            continue  # below the thresholds: im2col for all
        ws = {a: {} for a in algs}
        best = {a: [np.inf, np.inf] for a in algs}
        dy = None
        for rep in range(reps + 1):
            for a in algs:
                _use(a, tiles)
                tf, (y, cache) = _cpu_ms(lambda: ops.conv2d_forward(x, W, b, 1, p, workspace=ws[a]))
                if dy is None:
                    dy = rng.standard_normal(y.shape).astype(np.float32)
                tb, _ = _cpu_ms(lambda: ops.conv2d_backward(dy, cache, workspace=ws[a]))
                if rep:  # the first round warms the workspaces
                    best[a] = [min(best[a][0], tf), min(best[a][1], tb)]
        out[name] = {a: tuple(v) for a, v in best.items()}
    _reset()
    return out


def _in_channels(cfg, i):
    """Input channels of conv i+1 in one tower of the two-tower model (conv3 sees both towers' maps)."""
    if i == 0:
        return 3
    f_prev = cfg.conv[i - 1][0]
    return 2 * f_prev if i == 2 else f_prev


def bench_step(preset, batch_size, tiles, steps=3, seed=0, algorithms=ALGORITHMS):
    """{algorithm: {layer: (forward_ms, backward_ms)}}: per layer the minimum over `steps` hooked steps (both
    towers summed within a step), the algorithms alternating step by step on the same model and batch."""
    cfg = make_config(preset, num_classes=10, seed=seed)
    model = build_model(cfg, tower_threads=False)
    opt = MomentumSGD(model, lr=1e-4)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, 3, cfg.crop, cfg.crop), dtype=np.float32)
    labels = rng.integers(0, 10, size=batch_size)
    best = {a: {} for a in algorithms}

    def run(a, record):
        rows = {}

        def hook(name, phase, devices, call):
            ms, out = _cpu_ms(call)
            rows.setdefault(name, [0.0, 0.0])[phase == "backward"] += ms
            return out

        _use(a, tiles)
        model.loss(x, labels, train=True, hook=hook)
        model.loss_backward(hook=hook)
        ms, _ = _cpu_ms(opt.step)
        rows["update"] = [0.0, ms]
        if record:
            for name, (f, b) in rows.items():
                old = best[a].get(name, (np.inf, np.inf))
                best[a][name] = (min(old[0], f), min(old[1], b))

    for i in range(steps + 1):
        for a in algorithms:
            model.set_step(i)
            run(a, i > 0)
    model.clear()
    _reset()
    return best


def _cells(pairs):
    return "   ".join(f"{f:6.1f} / {b:6.1f}" for f, b in pairs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="alexnet-small")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--tiles", default="3:2", help="CPNET_WINOGRAD's syntax: kernel:tile pairs (default 3:2)")
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS),
                    help=f"comma-separated, of {', '.join(ALGORITHMS)}; the first is the baseline")
    ap.add_argument("--reps", type=int, default=7, help="calls per algorithm and layer in the ops part")
    ap.add_argument("--steps", type=int, default=3, help="steps per algorithm in the step part (0: skip it)")
    ap.add_argument("--json", help="also write the figures to this file")
    a = ap.parse_args(argv)
    tiles = conv_mod.parse_winograd(a.tiles)
    algs = [x.strip() for x in a.algorithms.split(",") if x.strip()]
    if len(algs) < 2 or any(x not in ALGORITHMS for x in algs) or len(set(algs)) != len(algs):
        ap.error(f"--algorithms {a.algorithms!r}: expected two or more of {', '.join(ALGORITHMS)}, comma-separated")
    load = os.getloadavg()
    print(f"{a.model} b{a.batch_size}, tiles {tiles}, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    res = {"model": a.model, "batch_size": a.batch_size, "tiles": tiles, "algorithms": algs, "load_before": load}
    res["ops"] = bench_ops(a.model, a.batch_size, tiles, a.reps, algorithms=algs)
    print(f"one tower, thread CPU ms, min of {a.reps} calls, fwd / bwd: {'   '.join(algs)}")
    sums = dict.fromkeys(algs, 0.0)
    for name, v in res["ops"].items():
        print(f"  {name}: {_cells(v.get(x, (np.nan, np.nan)) for x in algs)}")
        for x in algs:
            sums[x] += sum(v.get(x, v[algs[0]]))  # an algorithm that does not take the layer: the baseline's
    if res["ops"]:
        base = sums[algs[0]]
        print("  these layers: " + ", ".join(f"{x} {t:.1f} ms ({100 * (t / base - 1):+.1f} %)" for x, t in sums.items()))
    if a.steps:
        res["step"] = bench_step(a.model, a.batch_size, tiles, a.steps, algorithms=algs)
        print(f"training step, both towers, thread CPU ms, per layer the min of {a.steps} steps (fwd / bwd): "
              f"{'   '.join(algs)}")
        for name in res["step"][algs[0]]:
            if name.startswith("conv"):
                print(f"  {name}: {_cells(res['step'][x][name] for x in algs)}")
        tot = {x: sum(f + b for f, b in res["step"][x].values()) for x in algs}
        conv = {x: sum(f + b for k, (f, b) in res["step"][x].items() if k.startswith("conv")) for x in algs}
        print("  convolutions: " + ", ".join(f"{x} {conv[x]:.1f}" for x in algs) + " ms")
        print("  whole step (sum of the layers and the update): "
              + ", ".join(f"{x} {tot[x]:.1f} ms ({100 * (tot[x] / tot[algs[0]] - 1):+.1f} %)" for x in algs))
        res["step_totals"] = {**tot, **{f"conv_{x}": v for x, v in conv.items()}}
    res["load_after"] = os.getloadavg()
    print(f"load after {res['load_after'][0]:.2f}")
    if a.json:
        with open(a.json + ".tmp", "w") as fh:
            json.dump(res, fh, indent=1, default=str)
        os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
    main()
