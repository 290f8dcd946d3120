"""Where a convolution's time goes: im2col, the GEMMs, the output layout and bias, col2im, per AlexNet layer.

For each conv layer of a preset at its default crop, as the fused model runs it (both towers in one call, with
groups=2 where the towers are separate), times on the current device, after a warm-up, the mean of --repeats:

    im2col      x -> col (on the host in the column order the layer uses: batch-inner for small maps)
    gemm_fwd    W @ col, one 2-D product per group
    layout      (F, N*Ho*Wo) -> NCHW plus the bias, one pass
    forward     conv2d_forward as a whole
    dW          d @ col.T per group
    dcol        W.T @ d per group
    col2im      dcol -> dx
    backward    conv2d_backward as a whole (conv1 without dx, as the model runs it)
    im2col_rt, col2im_rt   im2col and col2im with the window and stride as run-time values
                (kernels.FIXED_GEOMETRY = 0) where the kernels take them as compile-time constants otherwise
                (the presets' 11x11/4, 5x5/1 and 3x3/1 geometries): whether the constants pay

and the GEMM rate each GEMM reached. Not a test; prints a table (and JSON with --json).

    CPNET_DEVICE=gpu python bench/conv_parts.py [--model alexnet] [--batch-size 128] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

try:
    import cpnet  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpnet import backend, kernels, ops  # noqa: E402
from cpnet.model import feature_shapes, make_config  # noqa: E402
from cpnet.ops.conv import _col2im, _group_gemm, _im2col, _to_nchw  # noqa: E402


def layer_geometry(cfg, batch_size):
    """[(name, x shape, W shape, stride, pad, groups)] for the five conv layers, both towers together."""
    shapes = feature_shapes(cfg)
    inputs = ["input", "pool1", "pool2", "conv3", "conv4"]
    groups = (1, 2, 1, 2, 2)
    out = []
    for i, (f, k, s, p) in enumerate(cfg.conv):
        c, h, w = shapes[inputs[i]]
        out.append((f"conv{i + 1}", (batch_size, c, h, w), (2 * f, c // groups[i], k, k), s, p, groups[i]))
    return out


def _run_time_geometry(fn, *args):
    old, kernels.FIXED_GEOMETRY = kernels.FIXED_GEOMETRY, 0
    try:
        return fn(*args)
    finally:
        kernels.FIXED_GEOMETRY = old


def time_parts(dev, name, x_shape, w_shape, stride, pad, G, repeats, need_dx):
    xp = dev.xp
    rng = np.random.default_rng(0)
    with dev:
        x = backend.to_device(rng.standard_normal(x_shape, dtype=np.float32), dev)
        W = backend.to_device(rng.standard_normal(w_shape, dtype=np.float32) * 0.01, dev)
        b = backend.to_device(np.zeros(w_shape[0], np.float32), dev)
        F, Cg, kh, kw = w_shape
        geom = (kh, kw, stride, stride, pad, pad)
        y, cache = ops.conv2d_forward(x, W, b, stride, pad, G)
        N, _, Ho, Wo = y.shape
        K, M = Cg * kh * kw, N * Ho * Wo
        col, bi = cache[0], cache[-1]  # bi: the host's batch-inner column order (conv.py)
        Wm = xp.ascontiguousarray(W).reshape(G, F // G, K)
        dt = y.reshape(N, F, Ho * Wo).transpose(1, 2, 0) if bi else y.transpose(1, 0, 2, 3)
        d = xp.ascontiguousarray(dt).reshape(G, F // G, M)
        ym = xp.empty((G, F // G, M), np.float32)
        out = xp.empty((N, F, Ho, Wo), np.float32)
        dWb = xp.empty((G, F // G, K), np.float32)
        dcol = xp.empty((G, K, M), np.float32)
        parts = {
            "im2col": lambda: _im2col(x, *geom, batch_inner=bi),
            "gemm_fwd": lambda: _group_gemm(xp, Wm, col.reshape(G, K, M), ym),
            "layout": lambda: _to_nchw(xp, ym, b, out, batch_inner=bi),
            "forward": lambda: ops.conv2d_forward(x, W, b, stride, pad, G),
            "dW": lambda: _group_gemm(xp, d, col.reshape(G, K, M).transpose(0, 2, 1), dWb),
            "dcol": lambda: _group_gemm(xp, Wm.transpose(0, 2, 1), d, dcol),
            "col2im": lambda: _col2im(dcol.reshape(G * K, M), x_shape, *geom, batch_inner=bi),
            "backward": lambda: ops.conv2d_backward(y, cache, need_dx=need_dx),
            "im2col_rt": lambda: _run_time_geometry(_im2col, x, *geom),
            "col2im_rt": lambda: _run_time_geometry(_col2im, dcol.reshape(G * K, M), x_shape, *geom),
        }
        res = {}
        for part, fn in parts.items():
            fn()
            backend.synchronize_all()
            with backend.Timer(dev) as t:
                for _ in range(repeats):
                    fn()
            res[part] = t.ms / repeats
        gemm_flops = 2.0 * F * K * M  # each of the three GEMMs (all groups together)
        for part in ("gemm_fwd", "dW", "dcol"):
            res[f"{part}_tflops"] = gemm_flops / (res[part] * 1e-3) / 1e12
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="alexnet")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    cfg = make_config(a.model, num_classes=1000 if a.model == "alexnet" else 10)
    dev = backend.default_placement(2)[0]
    rows = {}
    for i, (name, xs, ws, s, pad, g) in enumerate(layer_geometry(cfg, a.batch_size)):
        rows[name] = time_parts(dev, name, xs, ws, s, pad, g, a.repeats, need_dx=i > 0)
        rows[name]["shape"] = {"x": xs, "W": ws, "stride": s, "pad": pad, "groups": g}
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = ["im2col", "gemm_fwd", "layout", "forward", "dW", "dcol", "col2im", "backward", "im2col_rt", "col2im_rt"]
    print(f"{a.model}, batch {a.batch_size}, {dev}; ms per call (mean of {a.repeats}); GEMM TFLOP/s fwd/dW/dcol")
    print(f"{'layer':6s} " + " ".join(f"{c:>8s}" for c in cols) + "   TFLOP/s")
    for name, r in rows.items():
        print(f"{name:6s} " + " ".join(f"{r[c]:8.3f}" for c in cols)
              + f"   {r['gemm_fwd_tflops']:.1f}/{r['dW_tflops']:.1f}/{r['dcol_tflops']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
