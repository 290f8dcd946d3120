"""cpnet ablate."""

import click

from cpnet.ablate import TRAIN_DEFAULTS, AblationConfig
from cpnet.config import defaults

D = {**defaults(), **TRAIN_DEFAULTS, **defaults(AblationConfig)}  # the flags' defaults: the configs'


def _rates(ctx, param, value):
    if value is None:
        return None
    try:
        rates = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated learning rates, e.g. 0.005,0.01,0.02")
    if not rates:
        raise click.BadParameter(f"{value!r}: expected at least one learning rate")
    return rates


@click.command("ablate")
@click.option("--data", required=True, type=click.Path(), help="Folder with train.h5 and val.h5 (from `cpnet prep`).")
@click.option("--out", default="ablation", show_default=True, type=click.Path(file_okay=False),
              help="Folder for ablation.md, ablation.json, ablation.png and runs/<name>/ (one training each; "
                   "running the same command again reuses the finished ones and resumes an interrupted one).")
@click.option("--experiments", default=",".join(D["experiments"]), show_default=True,
              help="Comma-separated: activation (ReLU vs tanh), lrn, pool (3/2 vs 2/2), dropout.")
@click.option("--seeds", default=D["seeds"], show_default=True, type=click.IntRange(1),
              help="Runs per variant, with seeds --seed .. --seed + K - 1 (initial weights, data order, "
                   "augmentation, dropout masks).")
@click.option("--lr-sweep", default=None, callback=_rates,
              help="ReLU vs tanh: comma-separated learning rates; each activation is trained at each and compared "
                   "at its own best (the paper's Figure 1) [default: --lr alone].")
@click.option("--sweep-seeds", type=click.IntRange(1), default=D["sweep_seeds"],
              help="Seeds each swept rate is tried with; the best rate is then trained with the rest "
                   "[default: all --seeds].")
@click.option("--activation-epochs", type=click.IntRange(1), default=D["activation_epochs"],
              help="Budget of the ReLU vs tanh runs, in epochs [default: --epochs].")
@click.option("--model", default=D["model"], show_default=True, help="alexnet | alexnet-small | alexnet-tiny")
@click.option("--epochs", default=D["epochs"], show_default=True, help="Budget of every run, in epochs.")
@click.option("--batch-size", default=D["batch_size"], show_default=True, help="Images per SGD step.")
@click.option("--lr", default=D["lr"], show_default=True,
              help="Learning rate (constant) of the LRN, pooling and dropout runs.")
@click.option("--momentum", default=D["momentum"], show_default=True, help="SGD momentum.")
@click.option("--weight-decay", default=D["weight_decay"], show_default=True,
              help="L2 weight decay of the LRN, pooling and dropout runs (ReLU vs tanh: none).")
@click.option("--seed", default=D["seed"], show_default=True, help="The first seed.")
@click.option("--crop", type=int, default=D["crop"], help="Crop size [default: as `cpnet train`].")
@click.option("--conventions", default=D["conventions"], show_default=True, help="paper | ccn2 | caffe (LRN flavour).")
@click.option("--init", default=D["init"], show_default=True, help="he | paper | caffe.")
@click.option("--scale", type=float, default=D["scale"], help="Multiply mean-subtracted 0-255 inputs by this "
              "[default: as `cpnet train`: 1/their standard deviation with --init he, 1 otherwise].")
@click.option("--lighting", default=D["lighting"], show_default=True, help="PCA lighting sigma (0 disables).")
@click.option("--workers", type=click.IntRange(0), default=D["workers"],
              help="Loader worker processes (0: in-process) [default: as `cpnet train`: 0 on the CPU; on a GPU "
                   "the CPUs less 2, at most 12].")
@click.option("--target", default=D["target"], show_default=True,
              help="Training error the activation pair races to (the paper's Figure 1: 25%).")
@click.option("--window", default=D["window"], show_default=True,
              help="Batches averaged for the training error that is compared with --target.")
def command(experiments, **options):
    """The paper's design claims at small scale: trainings that differ in one choice each, K seeds each.

    ReLU vs tanh (iterations until the training error first reaches --target, each at its best rate of
    --lr-sweep, no dropout or weight decay), with vs without LRN, overlapping 3/2 vs 2/2 pooling (validation
    error), dropout 0.5 vs none (train/validation gap). Each cell is the mean, standard deviation and min..max
    over the seeds; a direction is named only when the difference of the means exceeds two standard errors.
    Writes OUT/ablation.md (table), OUT/ablation.json (every run, with its per-step curve) and OUT/ablation.png
    (plot). Interrupted (Ctrl-C), the same command continues where it stopped.
    """
    import time

    from cpnet.ablate import ablation_config, run, write_outputs
    from cpnet.train import TrainingInterrupted

    from ._progress import Line, fmt_time

    cfg = ablation_config(experiments=[e.strip() for e in experiments.split(",") if e.strip()], **options)
    out, target = cfg.train.out, cfg.target
    line = Line()
    t0 = time.monotonic()
    ctx = {}

    def eta(p):
        if not p["trained"]:
            return "ETA –"
        return f"ETA {fmt_time(max(p['todo'] - p['trained'], 0) * p['seconds'] / p['trained'])}"

    def on_run_start(name, opts, i, total, p):
        line.done()
        ctx.update(i=i, total=total)
        o = ", ".join(f"{k} {v}" for k, v in opts.items())
        click.echo(f"run {i + 1} of {total}: {name} ({o}) [{fmt_time(p['seconds'])}, {eta(p)}]")

    def on_step(name, s, p):
        line.show(f"  run {ctx['i'] + 1} of {ctx['total']} {name}: epoch {s['epoch'] + 1} batch "
                  f"{s['batch']}/{s['batches']} loss {s['loss']:.3f} top-1 {s['top1']:.3f}  "
                  f"[{fmt_time(time.monotonic() - t0)}, {eta(p)}]")

    def on_run_end(name, r, p):
        line.done()
        last = r["epochs"][-1] if r["epochs"] else {}
        n = len(r["steps"]["top1"])
        hit = None
        if not r["diverged"]:
            from cpnet.ablate import first_crossing

            hit = first_crossing(r["steps"]["top1"], target, cfg.window)
        msg = (f"  {name}: {n} iterations, {fmt_time(r['seconds'])} of training; "
               + (f"diverged ({r['diverged']})" if r["diverged"] else
                  f"train top-1 {last.get('train_top1', float('nan')):.3f}, val top-1 "
                  f"{last.get('val_top1', float('nan')):.3f}; "
                  + (f"reached {100 * target:g}% training error at iteration {hit}" if hit
                     else f"did not reach {100 * target:g}% training error")))
        click.echo(msg)

    try:
        results = run(cfg, on_run_start=on_run_start, on_step=on_step, on_run_end=on_run_end)
    except TrainingInterrupted as e:
        line.done()
        click.echo(f"interrupted: {e}; run the same command again to continue the ablation", err=True)
        raise SystemExit(130)
    finally:
        line.done()
    paths = write_outputs(results, out)
    click.echo("")
    with open(paths["md"]) as f:
        click.echo(f.read())
    click.echo(f"took {fmt_time(time.monotonic() - t0)}; wrote {paths['md']}, {paths['json']}, {paths['png']}")
