"""A MODEL (not a measurement) of data-parallel alexnet on many GPUs: ring all-reduce time and images/s.

Per replica (one GPU, towers fused, batch 128 per GPU) the step's compute is the measured H200 step
(docs/PERFORMANCE.md, GPU run 2: 21.16 ms); the gradients are alexnet's parameter memory as cpnet lays it out in
its flat buffers (cpnet.dist: fc8, fc7, fc6, then the convolutions; a bucket closes at 32 MiB). A ring all-reduce
of S bytes over N GPUs takes

    t = 2 (N - 1) / N * S / B  +  2 (N - 1) * alpha          (B: bus bandwidth, alpha: latency of one ring step)

per bucket. Without overlap the step is compute + pack/unpack + the buckets one after the other (what cpnet does
today: it reduces after backward). With overlap (DDP-style) the fc buckets, ready once fc6's backward is done,
are summed while the convolutions' backward runs (12.4 ms on the H200: the per-layer rows of conv1-conv5 and
their ReLU/LRN/pool backward), and only what sticks out, plus the last (convolution) bucket, adds to the step.
Every bandwidth and latency below is an ASSUMPTION, named in the table; nothing here ran on more than one GPU.

    .venv/bin/python bench/scaling_model.py [--json]
"""
import argparse
import json

EPOCH_IMAGES = 1_281_167          # ImageNet-1k training images
EPOCHS = 90                       # the paper's ~90 passes
STEP_S = 21.16e-3                 # measured: one H200, alexnet, batch 128, fused towers, FP32 (PERFORMANCE.md)
CONV_BACKWARD_S = 12.4e-3         # measured: the H200's per-layer backward rows from conv5 down to conv1
BATCH_PER_GPU = 128
HBM_BPS = 4.0e12                  # assumed: H200 HBM3e for the pack/unpack copies (4 passes over the gradients)

# (label, GPUs, bus bandwidth B in bytes/s, latency alpha in s) -- assumptions, see the module docstring
SETUPS = [
    ("1 GPU", 1, None, 0.0),
    ("8 GPUs, one node, NVLink/NVSwitch (B = 400 GB/s, alpha = 2 us)", 8, 400e9, 2e-6),
    ("64 GPUs, 8 nodes, InfiniBand NDR, one 400 Gb/s NIC per GPU (B = 8 x 45 = 360 GB/s, alpha = 5 us)",
     64, 360e9, 5e-6),
    ("64 GPUs, 8 nodes, InfiniBand HDR, one 200 Gb/s NIC per node (B = 22.5 GB/s, alpha = 5 us)",
     64, 22.5e9, 5e-6),
]


def buckets(bucket_bytes=32 << 20):
    """[(bytes, is_fc)] of alexnet's gradient buckets, in cpnet.dist's order, for fused towers on one GPU."""
    from cpnet import dist
    from cpnet.backend import HOST
    from cpnet.model import build_model, make_config

    # the fused layout of a GPU replica, built on the host (CPNET_FUSE_TOWERS semantics: fuse=True)
    model = build_model(make_config("alexnet", 1000), placement=[HOST, HOST], fuse=True, tower_threads=False)

    class Two(dist.World):  # a world of two, so that Replicas lays out its buffers (nothing is sent)
        size = 2

    reps = dist.Replicas(Two(), model, bucket_bytes=bucket_bytes, nccl=None)
    return [(b.size * 4, any(blk.parts[0][0].split(".")[-2].startswith("fc") for blk, _, _ in b.slots))
            for b in reps.buckets], model.num_params()


def ring(nbytes, n, bw, alpha):
    return 0.0 if n == 1 else 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * alpha


def model_rows():
    bks, params = buckets()
    total = sum(b for b, _ in bks)
    rows = []
    for label, n, bw, alpha in SETUPS:
        pack = 0.0 if n == 1 else 4 * total / HBM_BPS
        t_buckets = [ring(b, n, bw, alpha) for b, _ in bks]
        t_fc = sum(t for t, (_, fc) in zip(t_buckets, bks) if fc)
        t_conv = sum(t for t, (_, fc) in zip(t_buckets, bks) if not fc)
        plain = STEP_S + pack + sum(t_buckets)
        overlap = STEP_S + pack + max(0.0, t_fc - CONV_BACKWARD_S) + t_conv
        row = dict(setup=label, gpus=n, allreduce_ms=sum(t_buckets) * 1e3)
        for kind, t in (("no_overlap", plain), ("overlap", overlap)):
            ips = n * BATCH_PER_GPU / t
            row[f"{kind}_step_ms"] = t * 1e3
            row[f"{kind}_images_per_s"] = ips
            row[f"{kind}_90_epochs_h"] = EPOCHS * EPOCH_IMAGES / ips / 3600
        rows.append(row)
    return rows, bks, params


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rows, bks, params = model_rows()
    if a.json:
        print(json.dumps(dict(rows=rows, buckets_bytes=[b for b, _ in bks], params=params)))
        return
    total = sum(b for b, _ in bks)
    print(f"MODEL. alexnet: {params:,} parameters = {total / 1e6:.1f} MB of float32 gradients in {len(bks)} "
          f"buckets ({', '.join(f'{b / 1e6:.1f}' for b, _ in bks)} MB); global batch = 128 x GPUs")
    print(f"{'setup':<100} {'all-reduce':>10} | {'no overlap: step, img/s, 90 epochs':>36} | "
          f"{'overlap: step, img/s, 90 epochs':>33}")
    for r in rows:
        print(f"{r['setup']:<100} {r['allreduce_ms']:8.2f}ms | {r['no_overlap_step_ms']:7.2f} ms "
              f"{r['no_overlap_images_per_s']:9,.0f} {r['no_overlap_90_epochs_h']:6.2f} h | "
              f"{r['overlap_step_ms']:7.2f} ms {r['overlap_images_per_s']:9,.0f} {r['overlap_90_epochs_h']:6.2f} h")


if __name__ == "__main__":
    main()
