"""Gradient reduction and data-parallel step time: run under `mpiexec -n N` (or alone, N = 1).

The measurement is cpnet.bench.bench_allreduce (also `cpnet bench --allreduce`); for the preset's parameters
(float32) it times, per step after warm-up:
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

    from cpnet import bench, dist

    res = bench.bench_allreduce(a.model, a.batch_size, a.steps, a.warmup, a.classes, a.bucket_mb,
                                a.gpus_per_replica, step=not a.no_step,
                                overlap={"on": True, "off": False, "both": "both", None: None}[a.overlap])
    if not dist.world().is_root:
        return
    print(json.dumps(res) if a.json else "\n".join(bench.allreduce_lines(res)))


if __name__ == "__main__":
    main()
