"""cpnet ablate."""

import click

from cpnet.ablate import TRAIN_DEFAULTS, AblationConfig
from cpnet.config import defaults

D = {**defaults(), **TRAIN_DEFAULTS, **defaults(AblationConfig)}  # the flags' defaults: the configs'


@click.command("ablate")
@click.option("--data", required=True, type=click.Path(), help="Folder with train.h5 and val.h5 (from `cpnet prep`).")
@click.option("--out", default="ablation", show_default=True, type=click.Path(file_okay=False),
              help="Folder for ablation.md, ablation.json, ablation.png and runs/<name>/ (one training each).")
@click.option("--experiments", default=",".join(D["experiments"]), show_default=True,
              help="Comma-separated: activation (ReLU vs tanh), lrn, pool (3/2 vs 2/2), dropout.")
@click.option("--model", default=D["model"], show_default=True, help="alexnet | alexnet-small | alexnet-tiny")
@click.option("--epochs", default=D["epochs"], show_default=True, help="Budget of every run, in epochs.")
@click.option("--batch-size", default=D["batch_size"], show_default=True, help="Images per SGD step.")
@click.option("--lr", default=D["lr"], show_default=True, help="Learning rate (constant, the same for every run).")
@click.option("--momentum", default=D["momentum"], show_default=True, help="SGD momentum.")
@click.option("--weight-decay", default=D["weight_decay"], show_default=True, help="L2 weight decay.")
@click.option("--seed", default=D["seed"], show_default=True, help="The same seed for every run.")
@click.option("--crop", type=int, default=D["crop"], help="Crop size [default: as `cpnet train`].")
@click.option("--conventions", default=D["conventions"], show_default=True, help="paper | ccn2 | caffe (LRN flavour).")
@click.option("--init", default=D["init"], show_default=True, help="he | paper | caffe.")
@click.option("--scale", type=float, default=D["scale"], help="Multiply mean-subtracted 0-255 inputs by this "
              "[default: as `cpnet train`: 1/their standard deviation with --init he, 1 otherwise].")
@click.option("--lighting", default=D["lighting"], show_default=True, help="PCA lighting sigma (0 disables).")
@click.option("--workers", default=D["workers"], show_default=True, type=click.IntRange(0),
              help="Loader worker processes.")
@click.option("--target", default=D["target"], show_default=True,
              help="Training error the activation pair races to (the paper's Figure 1: 25%).")
@click.option("--window", default=D["window"], show_default=True,
              help="Batches averaged for the training error that is compared with --target.")
def command(experiments, **options):
    """The paper's design claims at small scale: short trainings that differ in one choice each.

    ReLU vs tanh (iterations until the training error first reaches --target), with vs without LRN, overlapping
    3/2 vs 2/2 pooling, dropout 0.5 vs none (train/validation gap). Same seed, budget and optimiser on each side;
    constant learning rate. Writes OUT/ablation.md (table), OUT/ablation.json (all numbers and per-step curves)
    and OUT/ablation.png (plot).
    """
    import time

    from cpnet.ablate import ablation_config, run, write_outputs

    from ._progress import Line, fmt_time

    cfg = ablation_config(experiments=[e.strip() for e in experiments.split(",") if e.strip()], **options)
    out, epochs, target = cfg.train.out, cfg.train.epochs, cfg.target
    line = Line()
    t0 = time.monotonic()

    def on_run_start(name, opts, i, total):
        line.done()
        o = ", ".join(f"{k} {v}" for k, v in opts.items())
        click.echo(f"run {i + 1}/{total}: {name} ({o})")

    def on_step(name, s):
        line.show(f"  {name}: epoch {s['epoch'] + 1}/{epochs} batch {s['batch']}/{s['batches']} "
                  f"loss {s['loss']:.3f} top-1 {s['top1']:.3f}  [{fmt_time(time.monotonic() - t0)}]")

    def on_run_end(name, r):
        line.done()
        last = r["epochs"][-1] if r["epochs"] else {}
        hit = r["iterations_to_target"]
        msg = (f"  {name}: {r['iterations']} iterations in {fmt_time(r['seconds'])}; "
               + (f"diverged ({r['diverged']})" if r["diverged"] else
                  f"train top-1 {last.get('train_top1', float('nan')):.3f}, val top-1 "
                  f"{last.get('val_top1', float('nan')):.3f}; "
                  + (f"reached {100 * target:g}% training error at iteration {hit}" if hit
                     else f"did not reach {100 * target:g}% training error")))
        click.echo(msg)

    try:
        results = run(cfg, on_run_start=on_run_start, on_step=on_step, on_run_end=on_run_end)
    finally:
        line.done()
    paths = write_outputs(results, out)
    click.echo("")
    with open(paths["md"]) as f:
        click.echo(f.read())
    click.echo(f"took {fmt_time(time.monotonic() - t0)}; wrote {paths['md']}, {paths['json']}, {paths['png']}")
