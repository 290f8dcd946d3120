"""`cpnet info FILE.h5|DIR`: what a dataset file holds."""

import click


@click.command("info")
@click.argument("file", type=click.Path())
def command(file):
    """Print a dataset file's size, classes, per-class counts, mean RGB and PCA.

    FILE: a dataset file, or the folder `cpnet prep` wrote (then its train.h5 and val.h5, one after the other).
    """
    import os

    from cpnet.errors import CpnetError

    if os.path.isdir(file):
        files = [os.path.join(file, n) for n in ("train.h5", "val.h5") if os.path.isfile(os.path.join(file, n))]
        if not files:
            raise CpnetError(f"{file}: a folder without train.h5 or val.h5 (give a dataset file, or the folder "
                             "`cpnet prep` wrote)")
    else:
        files = [file]
    for i, f in enumerate(files):
        if i:
            click.echo("")
        _describe(f)


def _describe(file):
    import numpy as np

    from cpnet.data.prep import describe

    d = describe(file)
    a = d["attrs"]
    click.echo(f"file        {d['file']}")
    click.echo(f"format      version {a.get('format_version')}, split {a.get('split', '?')}, "
               f"source: {a.get('source', '?')}")
    click.echo(f"images      {d['n']} x {d['size']}x{d['size']}x3 uint8")
    click.echo(f"classes     {d['num_classes']}")
    width = max([len(c) for c in d["classes"]] + [5])
    for name, count in zip(d["classes"], d["counts"]):
        click.echo(f"  {name:<{width}}  {count}")
    mean = ", ".join(f"{v:.2f}" for v in d["mean_rgb"])
    click.echo(f"mean RGB    {mean}   (stats from: {a.get('stats_from', '?')} set, "
               f"{a.get('stats_pixels', '?')} pixels)")
    click.echo("PCA eigval  " + ", ".join(f"{v:.4g}" for v in d["eigval"]))
    ev = np.asarray(d["eigvec"])
    for i in range(3):
        click.echo(("PCA eigvec  " if i == 0 else "            ") + "  ".join(f"{v:+.4f}" for v in ev[i]))
