"""`cpnet info FILE.h5`: what a dataset file holds."""

import click


@click.command("info")
@click.argument("file", type=click.Path(dir_okay=False))
def command(file):
    """Print a dataset file's size, classes, per-class counts, mean RGB and PCA."""
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
