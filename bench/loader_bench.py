"""Loader throughput: training images/s for S=256, crop 227, batch 128 with 0, 1, 2 and 4 workers.

Makes its own synthetic 256-px dataset file (a few hundred images) in a temporary folder, then times whole
epochs after one warm-up batch (worker start-up and first file open excluded). Not a test; prints a table.

    .venv/bin/python bench/loader_bench.py [--n 512] [--epochs 2] [--workers 0,1,2,4]
"""
import argparse
import os
import platform
import tempfile
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512, help="images in the file")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--crop", type=int, default=227)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", default="0,1,2,4")
    a = ap.parse_args()

    from cpnet.data import EvalLoader, TrainLoader, prep
    from cpnet.data.sources import synthetic_jobs

    print(f"cpus: {os.cpu_count()}  python {platform.python_version()}  numpy {np.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        prep.run(tmp, synthetic_jobs(n=a.n, size=a.size, val_fraction=0.0))
        path = os.path.join(tmp, "train.h5")
        print(f"made {a.n} synthetic {a.size}px images in {time.perf_counter() - t:.1f} s "
              f"({os.path.getsize(path) / 2 ** 20:.0f} MiB)")
        print(f"{'loader':>28} {'workers':>8} {'images/s':>10} {'ms/batch':>9}")
        for w in [int(x) for x in a.workers.split(",")]:
            with TrainLoader(path, a.batch, a.crop, workers=w) as L:
                it = L.epoch(0)
                next(it)                                   # warm-up: start workers, open the file
                t = time.perf_counter()
                nb = 0
                for _ in it:
                    nb += 1
                for e in range(1, a.epochs + 1):
                    for _ in L.epoch(e):
                        nb += 1
                dt = time.perf_counter() - t
            print(f"{f'train S={a.size} C={a.crop} B={a.batch}':>28} {w:>8} {nb * a.batch / dt:>10.0f} "
                  f"{1000 * dt / nb:>9.1f}")
        for w in (0, 2):
            with EvalLoader(path, a.batch, a.crop, views="center", workers=w) as E:
                it = iter(E)
                next(it)
                t, n = time.perf_counter(), 0
                for x, _ in it:
                    n += len(x)
                dt = time.perf_counter() - t
            print(f"{'eval centre crop':>28} {w:>8} {n / dt:>10.0f} {1000 * dt * a.batch / max(n, 1):>9.1f}")


if __name__ == "__main__":
    main()
