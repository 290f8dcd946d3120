"""cpnet bench."""

import click

from ._precision import apply_precision, precision_options


def _fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def _synthetic_set(tmp, n, size, workers):
    """A temporary built-in synthetic set (what `cpnet prep synthetic` writes); returns the path of its train.h5."""
    import os

    from cpnet.data import prep
    from cpnet.data.sources import synthetic_jobs

    prep.run(tmp, synthetic_jobs(n, size=size), workers=workers)
    return os.path.join(tmp, "train.h5")


def _loader_figures(loader_data, model, batch_size, crop, workers, batches):
    """The loader as `cpnet train` would use it here: uint8 batches where the model is on a GPU (augmented there),
    float32 crops on the host."""
    import os
    import tempfile

    from cpnet import backend, bench
    from cpnet.errors import CpnetError

    raw = backend.gpu_augment(backend.default_placement(2))

    if loader_data:
        path = os.path.join(loader_data, "train.h5") if os.path.isdir(loader_data) else loader_data
        res = bench.bench_loader(path, batch_size, crop, workers=workers, batches=batches, raw=raw)
        res["synthetic"] = False
        return res
    size = bench.STORED_SIZE[model]
    with tempfile.TemporaryDirectory(prefix="cpnet-bench-") as tmp:
        try:
            path = _synthetic_set(tmp, batch_size * (batches + 2), size, workers)
        except (CpnetError, ImportError) as e:
            return {"error": f"could not make a synthetic dataset: {e}"}
        res = bench.bench_loader(path, batch_size, crop, workers=workers, batches=batches, raw=raw)
    res.update(synthetic=True, stored_size=size, path=None)
    return res


@click.command("bench")
@click.option("--model", default=None, help="alexnet | alexnet-small | alexnet-tiny [default: alexnet-small on the "
              "CPU, as `cpnet train`; alexnet on a GPU].")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(1), help="Images per step.")
@click.option("--steps", default=10, show_default=True, type=click.IntRange(1), help="Timed iterations.")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(0),
              help="Untimed iterations first (kernel compilation, first allocations).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--loader-data", type=click.Path(exists=True),
              help="Time the loader on this dataset (folder with train.h5, or the file) "
                   "[default: a temporary synthetic set at the model's stored size].")
@click.option("--loader-workers", default=0, show_default=True, type=click.IntRange(0),
              help="Loader worker processes (as `cpnet train --workers`).")
@click.option("--no-loader", is_flag=True, help="Skip the loader measurement.")
@click.option("--classes", type=click.IntRange(2), default=None,
              help="Output classes [default: 1000 for alexnet, 10 for the small presets].")
@click.option("--crop", type=int, default=None, help="Input size [default: the preset's].")
@click.option("--width", type=float, default=1.0, show_default=True,
              help="Multiply the preset's kernels and fc units by this, as `cpnet train --width` does.")
@click.option("--threads", type=int, default=None, help="Host BLAS threads [default: as `cpnet train` picks them].")
@click.option("--allreduce", is_flag=True,
              help="Instead: the gradient reduction of data-parallel replicas and their step (run it under "
                   "`mpiexec -n N`; alone it is a world of one).")
@click.option("--overlap", type=click.Choice(["on", "off", "both"]), default=None,
              help="With --allreduce: the reduction overlapped with backward, after it, or both alternately "
                   "[default: as training does, CPNET_OVERLAP or on with NCCL only].")
@click.option("--bucket-mb", type=click.FloatRange(min=0.001), default=32.0, show_default=True,
              help="With --allreduce: the flat buffers' size cap in MiB.")
@click.option("--gpus-per-replica", type=click.IntRange(1, 2), default=None,
              help="With --allreduce: GPUs per replica, as `cpnet train --gpus-per-replica`.")
@precision_options
def command(model, batch_size, steps, warmup, as_json, loader_data, loader_workers, no_loader, classes, crop, width,
            threads, allreduce, overlap, bucket_mb, gpus_per_replica, precision, tf32):
    """Time the training step, layer by layer (like `caffe time`), and the loader beside it.

    Per layer: mean forward and backward milliseconds over --steps iterations after --warmup, both towers
    summed, the device synchronised around each call; `exchange` is the cross-tower traffic. Then the whole step
    (forward, backward, momentum update) on a random batch without inner synchronisation, in images/s; the
    loader's images/s; peak memory (host RSS, CuPy pool per GPU); forward multiply-adds per image and the
    step time that the measured GEMM speed allows. Set CPNET_DEVICE=cpu|gpu to choose the device.

    With --allreduce (`mpiexec -n N cpnet bench --allreduce`): the gradient reduction of cpnet.dist for the
    preset's parameters (pack, sum over the replicas, unpack), one raw MPI Allreduce of the same bytes, and the
    data-parallel step at global batch --batch-size with the reduction's part left after backward, overlapped
    or not (medians; bench/allreduce.py is the same measurement). Rank 0 alone prints.
    """
    import datetime
    import json
    import subprocess

    from cpnet import __version__, backend, bench
    from cpnet.model import make_config  # an unknown --model: a one-line error naming the presets

    precision = apply_precision(precision, tf32)
    if model is None:
        model = "alexnet" if backend.default_placement(2)[0].is_gpu else "alexnet-small"
    if allreduce:
        from cpnet import dist

        unused = [f for f, v in (("--loader-data", loader_data), ("--crop", crop), ("--threads", threads),
                                 ("--width", width != 1.0)) if v]
        if unused:
            raise click.UsageError(f"{', '.join(unused)}: not used by --allreduce (it times the replicas' step at "
                                   "the preset's crop, with each rank's share of the CPUs)")
        make_config(model, num_classes=classes or (1000 if model == "alexnet" else 10))
        res = bench.bench_allreduce(model, batch_size, steps, warmup, classes, bucket_mb, gpus_per_replica,
                                    overlap={"on": True, "off": False, "both": "both", None: None}[overlap])
        if dist.world().is_root:
            click.echo(json.dumps(res, indent=1) if as_json else "\n".join(bench.allreduce_lines(res)))
        return
    if overlap is not None or gpus_per_replica is not None:
        raise click.UsageError("--overlap and --gpus-per-replica go with --allreduce")
    if no_loader and loader_data:
        raise click.UsageError("--no-loader and --loader-data contradict each other")
    num_classes = classes or (1000 if model == "alexnet" else 10)
    cfg = make_config(model, num_classes=num_classes, crop=crop, width=width)

    threads = threads if threads is not None else backend.default_host_threads()
    with backend.host_threads(threads):
        res = bench.bench_model(model, batch_size=batch_size, steps=steps, warmup=warmup, num_classes=num_classes,
                                crop=cfg.crop, precision=precision, width=width)
        dev = backend.default_placement(2)[0]
        gemm = bench.gemm_gflops(dev, n=512 if model == "alexnet-tiny" else 2048)
    res["host_threads"] = threads
    res["precision"] = precision
    res["flops"] = bench.floors(cfg, gemm, batch_size)
    res["memory"] = bench.memory()
    if no_loader:
        res["loader"] = None
    else:
        batches = max(2, min(steps, 8))
        res["loader"] = _loader_figures(loader_data, model, batch_size, cfg.crop, loader_workers, batches)
    res["machine"] = bench.machine()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=__import__("os").path.dirname(__file__), timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    res["run"] = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "commit": commit,
                  "cpnet": __version__}

    if as_json:
        click.echo(json.dumps(res, indent=1))
        return

    c, s = res["config"], res["step"]
    devs = list(dict.fromkeys(res["devices"]))
    where = "the host" if devs == ["host"] else ", ".join(devs)
    lib = {"numpy": "NumPy", "cupy": "CuPy"}.get(res["machine"]["backend"], res["machine"]["backend"])
    wide = f" at --width {c['width']:g}" if c.get("width", 1.0) != 1.0 else ""
    click.echo(f"Timing {c['model']}{wide} ({c['params']:,} parameters) at batch {c['batch_size']} and crop "
               f"{c['crop']}: "
               f"the mean of {_plural(c['steps'], 'step')} after {_plural(c['warmup'], 'warm-up step')}, {lib} on "
               f"{where} with {_plural(threads, 'BLAS thread')}, precision {precision}.")
    click.echo(f"{'layer':<10}{'forward ms':>12}{'backward ms':>13}   (both towers)")
    for r in res["layers"]:
        click.echo(f"{r['name']:<10}{r['forward_ms']:>12.3f}{r['backward_ms']:>13.3f}")
    t = res["layers_total"]
    click.echo(f"{'total':<10}{t['forward_ms']:>12.3f}{t['backward_ms']:>13.3f}   update {res['update_ms']:.3f} ms")
    click.echo(f"step: {s['ms']:.2f} ms mean ({s['ms_median']:.2f} median) = {s['images_per_s']:.1f} images/s "
               f"(forward, backward, update); first loss {s['first_loss']:.4f}")
    ld = res["loader"]
    if ld is None:
        pass
    elif "error" in ld:
        click.echo(f"loader: not measured ({ld['error']})")
    else:
        src = f"synthetic {ld['stored_size']}px" if ld.get("synthetic") else ld["path"]
        kind = ", uint8 batches augmented on the GPU" if ld.get("raw") else ""
        click.echo(f"loader: {ld['images_per_s']:.1f} images/s ({ld['workers']} workers, {src}, crop {ld['crop']}"
                   f"{kind})")
    m = res["memory"]
    gpus = ", ".join(f"{k} pool {_fmt_bytes(v['total'])}" for k, v in m["gpu_pool_bytes"].items())
    click.echo(f"memory: host peak RSS {_fmt_bytes(m['host_peak_rss_bytes'])}" + (f"; {gpus}" if gpus else ""))
    f = res["flops"]
    click.echo(f"flops: {f['forward_macs_per_image'] / 1e9:.4f} G multiply-adds/image forward; GEMM "
               f"{f['gemm_gflops']:.0f} GFLOP/s -> floor {f['floor_step_ms']:.2f} ms/step "
               f"({f['floor_images_per_s']:.0f} images/s)")
