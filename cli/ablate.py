"""cpnet ablate."""

import click


@click.command("ablate")
@click.option("--data", required=True, type=click.Path(), help="Folder with train.h5 and val.h5 (from `cpnet prep`).")
@click.option("--out", default="ablation", show_default=True, type=click.Path(file_okay=False),
              help="Folder for ablation.md, ablation.json, ablation.png and runs/<name>/ (one training each).")
@click.option("--experiments", default="activation,lrn,pool,dropout", show_default=True,
              help="Comma-separated: activation (ReLU vs tanh), lrn, pool (3/2 vs 2/2), dropout.")
@click.option("--model", default="alexnet-small", show_default=True, help="alexnet | alexnet-small | alexnet-tiny")
@click.option("--epochs", default=4, show_default=True, help="Budget of every run, in epochs.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--lr", default=0.01, show_default=True, help="Learning rate (constant, the same for every run).")
@click.option("--momentum", default=0.9, show_default=True)
@click.option("--weight-decay", default=5e-4, show_default=True)
@click.option("--seed", default=0, show_default=True, help="The same seed for every run.")
@click.option("--crop", type=int, default=None, help="Crop size [default: as `cpnet train`].")
@click.option("--conventions", default="paper", show_default=True, help="paper | ccn2 | caffe (LRN flavour).")
@click.option("--init", default="he", show_default=True, help="he | paper | caffe.")
@click.option("--scale", type=float, default=None, help="Multiply mean-subtracted 0-255 inputs by this "
              "[default: as `cpnet train`: 1/their standard deviation with --init he, 1 otherwise].")
@click.option("--lighting", default=0.1, show_default=True, help="PCA lighting sigma (0 disables).")
@click.option("--workers", default=0, show_default=True, help="Loader worker processes.")
@click.option("--target", default=0.25, show_default=True,
              help="Training error the activation pair races to (the paper's Figure 1: 25%).")
@click.option("--window", default=20, show_default=True,
              help="Batches averaged for the training error that is compared with --target.")
def command(data, out, experiments, model, epochs, batch_size, lr, momentum, weight_decay, seed, crop, conventions,
            init, scale, lighting, workers, target, window):
    """The paper's design claims at small scale: short trainings that differ in one choice each.

    ReLU vs tanh (iterations until the training error first reaches --target), with vs without LRN, overlapping
    3/2 vs 2/2 pooling, dropout 0.5 vs none (train/validation gap). Same seed, budget and optimiser on each side;
    constant learning rate. Writes OUT/ablation.md (table), OUT/ablation.json (all numbers and per-step curves)
    and OUT/ablation.png (plot).
    """
    import time

    from cpnet.ablate import AblationConfig, run, write_outputs

    from ._progress import Line, fmt_time

    cfg = AblationConfig(data=data, out=out, experiments=[e.strip() for e in experiments.split(",") if e.strip()],
                         model=model, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, seed=seed, crop=crop, conventions=conventions, init=init,
                         scale=scale, lighting=lighting, workers=workers, target=target, window=window)
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
