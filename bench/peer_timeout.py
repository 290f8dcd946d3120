"""The cost of cpnet.dist's deadline on collective operations: run under `mpiexec -n 2` (or more).

With a deadline (CPNET_PEER_TIMEOUT > 0, the default) every sum, broadcast and barrier arms the world's watchdog
thread before MPI's blocking call and disarms it after; without one (0) there is no watchdog. This times both
alternately in one run (with, without, without, with, ...; the world's watchdog switched between rounds), so
that the machine's load falls on both alike, for:
  scalars  World.sum_scalars of 4 numbers (the loss sums, the stop flag: latency)
  sum      World.sum of one host buffer of --mb MB float32 (alexnet-small's gradients are 5.9 MB)
  barrier  World.barrier
Medians over --rounds rounds of --reps calls each, in microseconds, from rank 0.

    mpiexec -n 2 .venv/bin/python bench/peer_timeout.py
"""
import argparse
import contextlib
import statistics
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=5.9)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()

    from cpnet import dist

    w = dist.world()
    if w.size < 2:
        raise SystemExit("run under mpiexec -n 2 (a world of one has no collectives)")
    big = np.ones(int(a.mb * 1e6 / 4), np.float32)
    ops = {"scalars": lambda: w.sum_scalars([1.0, 2.0, 3.0, 4.0]), "sum": lambda: w.sum(big),
           "barrier": w.barrier}
    times = {(op, on): [] for op in ops for on in (True, False)}
    deadline = dist.peer_timeout() or dist.PEER_TIMEOUT
    watchdog = dist._Watchdog(w, deadline)
    for r in range(a.rounds + 1):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            w._deadline = watchdog if on else contextlib.nullcontext
            for op, f in ops.items():
                w.barrier()
                t = time.perf_counter()
                for _ in range(a.reps):
                    f()
                if r:  # round 0 warms up
                    times[op, on].append((time.perf_counter() - t) / a.reps)
    if w.rank == 0:
        print(f"{w.describe()}; {a.rounds} rounds of {a.reps} calls, medians")
        print(f"{'':10} {'deadline ' + format(deadline, 'g') + ' s':>16} {'none':>14}")
        for op in ops:
            med = [statistics.median(times[op, on]) * 1e6 for on in (True, False)]
            print(f"{op:10} {med[0]:13.1f} us {med[1]:11.1f} us")


if __name__ == "__main__":
    main()
