"""cpnet train."""

import click

from cpnet.config import defaults

from ._precision import apply_precision, precision_options

D = defaults()  # every flag's default is TrainConfig's


def _top5(ctx, value):
    """' top5 0.123', or nothing where top-5 error is uninformative (5 classes or fewer)."""
    return f" top5 {value:.3f}" if ctx.get("top5", True) else ""


@click.command("train")
@click.option("--data", type=click.Path(exists=True),
              help="The folder `cpnet prep` wrote (train.h5, and val.h5 for validation), or its train.h5 "
                   "[required; with --resume: the run's].")
@click.option("--model", default=D["model"], show_default=True, help="alexnet | alexnet-small | alexnet-tiny")
@click.option("--width", type=float, default=D["width"], show_default=True,
              help="Multiply the preset's kernels per layer and fc units by this (1.5: half as many again, about "
                   "twice the compute; rounded, at least 1 per tower).")
@click.option("--epochs", default=D["epochs"], show_default=True,
              help="Total epochs; with --resume: the run's unless given, more than the run's extends it.")
@click.option("--batch-size", default=D["batch_size"], show_default=True, help="Images per SGD step (the paper: 128).")
@click.option("--lr", default=D["lr"], help="Initial learning rate [default: 0.01, the paper's; 0.03 for whole small images (see --crop), measured on Fashion-MNIST].")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder: last.h5, best.h5, metrics.jsonl.")
@click.option("--resume", is_flag=True, default=D["resume"],
              help="Continue the run in --out from last.h5 with its saved settings, dataset and epochs.")
@click.option("--seed", default=D["seed"], show_default=True,
              help="Seeds the weights, the data order, the augmentation and dropout.")
@click.option("--workers", type=click.IntRange(0), default=D["workers"],
              help="Loader worker processes (0: in-process) [default: 0 on the CPU; on a GPU the CPUs less 2, at most 12].")
@click.option("--crop", type=int, default=D["crop"], help="Crop size [default: 227 for alexnet; for the small presets the stored size minus an eighth, the paper's 224 of 256 in proportion, or, where the whole image is no larger than the preset's crop, that crop: the whole image (32 of 32) or the image on a canvas of the mean colour (28 px on alexnet-small's 32), with --pad, --lr and --dropout chosen for it (see each)].")
@click.option("--pad", type=click.IntRange(0), default=D["pad"], help="Training crops may leave the image by up to this many pixels, filled with the mean (with --crop equal to the stored size: CIFAR's usual shifted whole image, evaluated uncut; --crop may exceed the stored size by up to 2 x pad: the whole image on a canvas of the mean colour, evaluated centred on it) [default: 0; for whole small images a 14th of their size plus the canvas's border: 4 for 28 px on 32 (a shift of 2 px), 2 for 32 on 32].")
@click.option("--conventions", default=D["conventions"], show_default=True, help="paper | ccn2 | caffe: LRN alpha convention, k, where LRN sits.")
@click.option("--init", default=D["init"], show_default=True, help="he | paper | caffe: weight and bias initialisation.")
@click.option("--momentum", default=D["momentum"], show_default=True, help="SGD momentum (the paper: 0.9).")
@click.option("--weight-decay", default=D["weight_decay"], show_default=True,
              help="L2 weight decay (the paper: 0.0005).")
@click.option("--decay-biases", is_flag=True, default=D["decay_biases"], help="Apply weight decay to biases too.")
@click.option("--schedule", default=D["schedule"], show_default=True, help="plateau | step | cosine | constant (cosine: from --lr towards 0 along half a cosine over --epochs; resuming with another --epochs refits the curve).")
@click.option("--patience", type=int, default=D["patience"], help="plateau: epochs without improvement before dividing the lr by 10 [default: an epoch per ten of --epochs, at least 1].")
@click.option("--step-epochs", default=D["step_epochs"], show_default=True, help="step: divide the lr by 10 every N epochs.")
@click.option("--lighting", default=D["lighting"], show_default=True, help="PCA lighting sigma (0 disables).")
@click.option("--erase", type=float, default=D["erase"], show_default=True,
              help="Random erasing (Zhong et al. 2017, not the paper's): the probability that a training crop gets "
                   "a mean-coloured rectangle of 2-40% of its area, aspect 0.3-3.3 (0 disables).")
@click.option("--dropout", type=float, default=D["dropout"],
              help="Probability of dropping a unit of fc6 and fc7 while training (0 disables) [default: 0.5, the "
                   "paper's; 0 for whole small images (see --crop), measured on Fashion-MNIST].")
@click.option("--scale", type=float, default=D["scale"], help="Multiply mean-subtracted 0-255 inputs by this "
              "[default: 1/their standard deviation with --init he, 1 otherwise].")
@click.option("--threads", type=int, default=D["threads"], help="Host BLAS threads per tower [default: (CPUs - workers) // 2, at least 1].")
@click.option("--gpus-per-replica", type=int, default=D["gpus_per_replica"],
              help="Under mpiexec/srun: GPUs per replica, taken by node-local rank (2: a tower per GPU as in the "
                   "paper; 1: both towers fused on one) [default: 2 when the node has two per replica, else 1].")
@precision_options
@click.option("--find-lr", "find_lr", is_flag=True, help="Instead of training: a learning-rate range test with these "
              "settings (the lr grows from 1e-5 to 1 over --find-lr-steps batches); writes OUT/lr_find.png and "
              "OUT/lr_find.json and prints the suggested --lr (a tenth of the rate at the lowest smoothed loss).")
@click.option("--find-lr-steps", "find_lr_steps", default=100, show_default=True, type=click.IntRange(2),
              help="Batches of the range test.")
def command(precision, tf32, find_lr, find_lr_steps, **options):
    """Train AlexNet on an HDF5 dataset with momentum SGD.

    Under `mpiexec -n N` (or `srun`) N data-parallel replicas train together: --batch-size is the global batch,
    each replica takes B/N rows of it, and the run's numbers do not depend on N (README, "Scaling out").
    Rank 0 alone prints and writes files.

    Shows loss, top-1/top-5 training error, images/s, data-wait vs compute time and ETA; validates on the centre
    crop after each epoch; writes RUN/last.h5 (each epoch, and on Ctrl-C or SIGTERM), RUN/best.h5 and
    RUN/metrics.jsonl; one run at a time per RUN (a lock).
    """
    import time

    from cpnet.evaluate import top5_informative
    from cpnet.train import TrainConfig, TrainingInterrupted, run

    from ._progress import Line, fmt_time

    precision = apply_precision(precision, tf32)
    cfg = TrainConfig(**options, precision=precision)  # the flags are TrainConfig's fields, named alike
    from click.core import ParameterSource

    cctx = click.get_current_context()
    explicit = {n for n in cctx.params if cctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None)}
    if find_lr:
        return _find_lr(cfg, find_lr_steps, explicit)
    out = cfg.out
    line = Line()
    t_start = time.monotonic()
    ctx = {}

    def on_start(info):
        m, c = info["model"], info["config"]
        ctx.update(info)
        devs = ", ".join(f"tower {t}: {d}" for t, d in enumerate(m.devices))
        wide = f" at --width {info['train'].width:g}" if info["train"].width != 1 else ""
        click.echo(f"model {c.preset}{wide} ({m.num_params():,} parameters), crop {c.crop}, {c.num_classes} classes, "
                   f"conventions {c.conventions}, init {c.init}, input scale {info['train'].scale:.4g}, precision "
                   f"{precision}; {devs}")
        for notice in info.get("notices", ()):
            click.echo(f"note: {notice}")
        ctx["top5"] = top5_informative(c.num_classes)
        if not ctx["top5"]:
            click.echo(f"{c.num_classes} classes: every class is among the top 5, so top-5 error (always 0) is not "
                       "shown")
        if info.get("world"):
            b = info["train"].batch_size
            click.echo(f"replicas: {info['world']}; global batch {b} = {b // info['world_size']} rows x "
                       f"{info['world_size']}; gradients: {info['replicas']}")
        if info.get("note"):
            click.echo(f"warning: {info['note']}", err=True)
        if (info["start_epoch"] or info["start_pos"]) and info["start_epoch"] < info["train"].epochs:
            click.echo(f"resuming at epoch {info['start_epoch'] + 1}, batch {info['start_pos']} "
                       f"(iteration {info['iteration']})")
        ctx["t0"] = time.monotonic()
        ctx["it0"] = info["iteration"]

    def on_step(s):
        if s["iteration"] == ctx["it0"] + 1 and ctx["it0"] == 0:
            click.echo(f"first-iteration loss {s['loss']:.4f} (ln {ctx['config'].num_classes} classes = "
                       f"{s['ln_classes']:.4f})")
        sums = s["sums"]
        n = max(sums["n"], 1)
        done = (s["epoch"] - ctx["start_epoch"]) * s["batches"] + s["batch"] - (ctx["start_pos"] if s["epoch"] == ctx["start_epoch"] else 0)
        epochs = ctx["train"].epochs  # the run's: with --resume and no --epochs, the saved run's, not the default
        total = (epochs - ctx["start_epoch"]) * s["batches"] - ctx["start_pos"]
        el = time.monotonic() - ctx["t0"]
        eta = el / max(done, 1) * (total - done)
        ips = sums["n"] / max(sums["data_s"] + sums["compute_s"], 1e-9)
        line.show(f"epoch {s['epoch'] + 1}/{epochs} batch {s['batch']}/{s['batches']} loss {sums['loss'] / n:.4f} "
                  f"top1 {sums['top1'] / n:.3f}{_top5(ctx, sums['top5'] / n)} lr {s['lr']:.2g} {ips:.0f} img/s "
                  f"data {sums['data_s']:.1f}s compute {sums['compute_s']:.1f}s ETA {fmt_time(eta)}")

    def on_epoch(r):
        line.done()
        val = (f" | val loss {r['val_loss']:.4f} top1 {r['val_top1']:.3f}{_top5(ctx, r['val_top5'])}"
               + (" *best*" if r["improved"] else "")) if "val_top1" in r else ""
        click.echo(f"epoch {r['epoch']}: train loss {r['train_loss']:.4f} top1 {r['train_top1']:.3f}"
                   f"{_top5(ctx, r['train_top5'])} ({r['images_per_s']:.0f} img/s){val}")

    from cpnet import dist
    from cpnet.errors import CpnetError

    try:
        r = run(cfg, on_step=on_step, on_epoch=on_epoch, on_start=on_start, explicit=explicit)
    except TrainingInterrupted as e:
        line.done()
        if dist.world().is_root:
            click.echo(f"interrupted: {e}", err=True)
        raise SystemExit(128 + e.signum)
    except (Exception, KeyboardInterrupt) as e:
        if dist.world().size == 1:
            raise
        # one replica's failure ends them all now (the others would wait for it in their next sum)
        line.done()
        if not isinstance(e, CpnetError):
            import traceback

            traceback.print_exc()
        dist.world().fail(str(e) if isinstance(e, CpnetError) else f"{type(e).__name__}: {e}",
                          together=isinstance(e, dist.ReplicasDiffer))
    finally:
        line.done()
    if r and dist.world().is_root:
        best = ""
        if "val_top1" in r:
            import json
            import os

            with open(os.path.join(out, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            b = min(rows, key=lambda row: row.get("val_top1", float("inf")))
            top5 = f", top-5 {b['val_top5']:.4f}" if ctx.get("top5", True) else ""
            best = (f"last epoch val top-1 error {r['val_top1']:.4f}; best.h5 (epoch {b['epoch']}): top-1 "
                    f"{b['val_top1']:.4f}{top5}; ")
        click.echo(f"done in {fmt_time(time.monotonic() - t_start)}: {best}checkpoints in {out}")


def _find_lr(cfg, steps, explicit=None):
    """`cpnet train --find-lr`: the range test, its picture and JSON in --out, the suggestion on stdout."""
    import json
    import os

    from cpnet import checkpoint, lrfind

    from ._progress import Line

    if cfg.resume:
        raise click.UsageError("--find-lr and --resume exclude each other")
    line = Line()

    def on_step(s):
        line.show(f"lr range test: batch {s['step']}/{s['steps']} lr {s['lr']:.3g} loss {s['loss']:.4f} "
                  f"(smoothed {s['smoothed']:.4f})")

    try:
        r = lrfind.range_test(cfg, steps=steps, on_step=on_step, explicit=explicit)
    finally:
        line.done()
    os.makedirs(cfg.out, exist_ok=True)
    png, js = os.path.join(cfg.out, "lr_find.png"), os.path.join(cfg.out, "lr_find.json")
    c = r["config"]
    wide = f" width {c.width:g}" if c.width != 1 else ""
    title = f"lr range test: {c.model}{wide}, batch {c.batch_size}, {len(r['lrs'])} batches"
    with checkpoint.atomic_path(png) as tmp:
        lrfind.figure(r, title=title).save(tmp, format="PNG")
    with checkpoint.atomic_path(js) as tmp, open(tmp, "w") as f:
        json.dump({k: r[k] for k in ("lrs", "losses", "smoothed", "suggested", "stopped_early", "beta")}, f)
    end = "stopped where the loss diverged" if r["stopped_early"] else "reached lr 1"
    sug = f"suggested --lr {r['suggested']:.2g}" if r["suggested"] else "no finite loss: no suggestion"
    click.echo(f"{len(r['lrs'])} batches ({end}); {sug}; picture {png}, values {js}")
