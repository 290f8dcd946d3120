"""The batch upload: pageable `to_device` against `backend.upload` (a pinned buffer, a side stream).

For a training batch of float32 (batch, 3, crop, crop), alternating the two ways --repeats times each, prints
the median host milliseconds per call (what the training loop waits before it can queue the step's kernels)
and the median milliseconds until the batch is on the device (the call plus a synchronisation); then both again
with a queue of GPU work ahead (a matmul chain of about --busy-ms), the case of a training step's upload while
the previous step's kernels still run. Not a test; on the host both ways are the same.

    CPNET_DEVICE=gpu python bench/upload_bench.py [--batch-size 128] [--crop 227] [--repeats 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

try:
    import cpnet  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpnet import backend  # noqa: E402


def _busy(dev, ms):
    """Queue roughly `ms` of GPU work on the compute stream (a chain of 2048^2 products; nothing on the host)."""
    if not dev.is_gpu or ms <= 0:
        return
    xp = dev.xp
    a = xp.ones((2048, 2048), np.float32) * np.float32(1e-3)
    for _ in range(max(1, int(ms / 0.4))):  # ~0.4 ms per product at ~45 TFLOP/s
        a = a @ a


def measure(batch=128, crop=227, repeats=10, busy_ms=20.0):
    dev = backend.default_placement(1)[0]
    x = np.random.default_rng(0).standard_normal((batch, 3, crop, crop)).astype(np.float32)
    ways = {"pageable": backend.to_device, "pinned": backend.upload}
    res = {f"{k}{w}": {"host_ms": [], "ready_ms": []} for k in ways for w in ("", "_behind_work")}
    with dev:
        for fn in ways.values():  # warm-up: buffers, streams
            fn(x, dev)
        _busy(dev, 1)
        backend.synchronize_all()
        for _ in range(repeats):
            for name, fn in ways.items():
                for behind in ("", "_behind_work"):
                    if behind:
                        _busy(dev, busy_ms)
                    t0 = time.perf_counter()
                    y = fn(x, dev)
                    t1 = time.perf_counter()
                    dev.synchronize()
                    t2 = time.perf_counter()
                    res[name + behind]["host_ms"].append((t1 - t0) * 1e3)
                    res[name + behind]["ready_ms"].append((t2 - t0) * 1e3)
                    del y
    out = {"device": str(dev), "batch": batch, "crop": crop, "repeats": repeats, "mb": x.nbytes / 1e6,
           "busy_ms": busy_ms}
    for name, r in res.items():
        out[name] = {k: statistics.median(v) for k, v in r.items()}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--crop", type=int, default=227)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--busy-ms", type=float, default=20.0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = measure(a.batch_size, a.crop, a.repeats, a.busy_ms)
    if a.json:
        print(json.dumps(r, indent=1))
        return 0
    print(f"upload of a {r['mb']:.1f} MB batch ({a.batch_size}x3x{a.crop}x{a.crop} float32) to {r['device']}, "
          f"median of {a.repeats}:")
    for name in ("pageable", "pinned", "pageable_behind_work", "pinned_behind_work"):
        print(f"  {name:20s} host {r[name]['host_ms']:8.3f} ms   on the device after {r[name]['ready_ms']:8.3f} ms")
    print(f"  (_behind_work: called with about {a.busy_ms:g} ms of GPU work queued, which the ready time includes:"
          " the pinned copy runs beside it, the pageable one after it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
