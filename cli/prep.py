"""`cpnet prep ...`: turn an image source into OUT/train.h5 and OUT/val.h5."""

import click

from ._progress import Line, fmt_time


class _Bar:
    """One stderr line per split (_progress.Line), rewritten in place: done/total, images/s, ETA, skipped; not on
    a terminal, only the final line of each split."""

    def __init__(self, quiet):
        self.quiet, self.split = quiet, None
        self.line = Line(pipe_every=None)

    def __call__(self, split, done, total, written, skipped, seconds, done_here):
        if self.quiet:
            return
        rate = done_here / seconds if seconds > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        pct = 100.0 * done / max(total, 1)
        self.line.show(f"{split:>5}: {done}/{total} ({pct:5.1f}%)  {rate:7.0f} img/s  "
                       f"{'ETA ' + fmt_time(eta) if done < total else 'took ' + fmt_time(seconds)}  skipped {skipped}",
                       force=done >= total or (split != self.split and self.line.tty))
        self.split = split
        if done >= total:
            self.line.done()


class Colour(click.ParamType):
    """A colour: a name Pillow knows (white, black, grey, ...), #rrggbb, or R,G,B with values 0-255."""

    name = "colour"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        from PIL import ImageColor

        text = str(value).strip()
        try:
            if "," in text:
                rgb = tuple(int(v) for v in text.split(","))
                if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                    raise ValueError
                return rgb
            return tuple(ImageColor.getrgb(text)[:3])
        except ValueError:
            self.fail(f"{value!r}: expected a colour name (white, black, ...), #rrggbb or R,G,B (0-255)", param, ctx)


BACKGROUND_HELP = ("Colour that transparent pixels are composited over (a name, #rrggbb or R,G,B); use the same "
                   "for `cpnet predict`.")


def _common(f, strict=True):
    f = click.option("--out", "out", required=True, type=click.Path(file_okay=False),
                     help="Output folder for train.h5, val.h5" + (" (and skipped.txt)." if strict else ".") +
                          " Made if missing.")(f)
    f = click.option("--workers", default=0, show_default=True, type=click.IntRange(0),
                     help="Processes " + ("decoding" if strict else "drawing") + " images in parallel (0: this "
                          "process).")(f)
    f = click.option("--resume", is_flag=True, help="Continue an interrupted prep (keeps finished files).")(f)
    f = click.option("--overwrite", is_flag=True, help="Replace existing output files.")(f)
    if strict:
        f = click.option("--strict", is_flag=True, help="Stop at the first unreadable input instead of skipping "
                                                        "it.")(f)
    f = click.option("--quiet", "-q", is_flag=True, help="No progress line.")(f)
    return f


# a prepared set where more than this fraction of the (sampled) images are one colour only gets a warning
CONSTANT_WARN = 0.1


def _run(jobs, out, workers, resume, overwrite, strict, quiet):
    import os

    from cpnet.data import prep

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    summaries = prep.run(out, jobs, workers=workers, resume=resume, overwrite=overwrite, strict=strict,
                         progress=_Bar(quiet), notice=lambda msg: click.echo(msg, err=True))
    total_skipped = 0
    for split, s in summaries.items():
        kept = " (kept, already complete)" if s.get("kept") else ""
        click.echo(f"{s['file']}: {s['n']} images, {len(s['skipped'])} skipped{kept}")
        total_skipped += len(s["skipped"])
    if total_skipped:
        click.echo(f"{total_skipped} inputs skipped, listed in {out}/skipped.txt")
    for split, s in summaries.items():
        constant, checked = prep.constant_images(s["file"])
        if checked and constant > CONSTANT_WARN * checked:
            what = "of its images are" if checked == s["n"] else f"of {checked} sampled images are"
            click.echo(f"warning: {os.path.basename(s['file'])}: {constant} {what} one colour only (transparent "
                       "drawings? blank files?); look at a few before training", err=True)


DEFAULT_VAL_FRACTION = 0.1


@click.group("prep")
def command():
    """Make dataset files (OUT/train.h5, OUT/val.h5) from an image source.

    Images are resized so the shorter side is --size (antialiased) and centre-cropped to a square; the training
    set's mean image and RGB PCA are stored in both files.
    """


@command.command("synthetic")
@click.option("--n", "n", default=6000, show_default=True, type=click.IntRange(1), help="Training images.")
@click.option("--classes", default=10, show_default=True, type=click.IntRange(1), help="Number of classes (max 14).")
@click.option("--size", default=36, show_default=True, type=click.IntRange(8), help="Stored image side S.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="The set is a function of it.")
@click.option("--val-fraction", default=0.2, show_default=True, type=float,
              help="Validation images = round(F * n), generated apart from the training images.")
@lambda f: _common(f, strict=False)
def synthetic(n, classes, size, seed, val_fraction, out, workers, resume, overwrite, quiet):
    """The built-in synthetic set: shapes and textures in random colours, sizes, places, backgrounds, noise."""
    from cpnet.data.sources import synthetic_jobs

    _run(synthetic_jobs(n, classes, size, seed, val_fraction), out, workers, resume, overwrite, False, quiet)


@command.command("folder")
@click.argument("root", type=click.Path(file_okay=False))
@click.option("--size", default=256, show_default=True, type=click.IntRange(8),
              help="Stored image side S (the shorter side is resized to S, then the centre S x S kept). 256 suits "
                   "the paper's alexnet (227 crops); 36-64 suits alexnet-small and small sets.")
@click.option("--val-root", type=click.Path(file_okay=False),
              help="Validation images: VALROOT/<class>/<image>, or a flat folder with --val-labels.")
@click.option("--val-labels", type=click.Path(dir_okay=False),
              help="Labels of a flat --val-root: '<file> <class>' per line, or '<class>' per file in sorted order.")
@click.option("--val-fraction", default=None, type=float,
              help="Hold out this fraction of each class of ROOT as the validation set; 0: none "
                   f"[default: {DEFAULT_VAL_FRACTION} without --val-root].")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="For --val-fraction.")
@click.option("--background", default="white", show_default=True, type=Colour(), help=BACKGROUND_HELP)
@_common
def folder(root, size, val_root, val_labels, val_fraction, seed, background, out, workers, resume, overwrite, strict,
           quiet):
    """ROOT/<class>/<image> folders (ImageNet's training layout), any format Pillow reads.

    Without --val-root, a stratified tenth of each class becomes val.h5 (so that `cpnet train`'s default plateau
    schedule has validation data); --val-fraction 0 keeps every image for training.
    """
    from cpnet.data.sources import folder_jobs

    if val_labels is not None and val_root is None:
        raise click.UsageError("--val-labels needs --val-root")
    if val_fraction is None:
        val_fraction = 0.0 if val_root is not None else DEFAULT_VAL_FRACTION
    jobs = folder_jobs(root, size, val_root, val_labels, val_fraction, seed, background=background)
    _run(jobs, out, workers, resume, overwrite, strict, quiet)


@command.command("cifar")
@click.argument("tarball", type=click.Path(dir_okay=False))
@click.option("--size", default=32, show_default=True, type=click.IntRange(8), help="Stored image side S.")
@click.option("--coarse", is_flag=True, help="CIFAR-100: the 20 coarse labels instead of the 100 fine ones.")
@_common
def cifar(tarball, size, coarse, out, workers, resume, overwrite, strict, quiet):
    """A CIFAR-10 or CIFAR-100 tarball, binary or python version (read in place, never extracted).

    The training batches go to train.h5, the test batch to val.h5.
    """
    from cpnet.data.sources import cifar_jobs

    _run(cifar_jobs(tarball, size, coarse), out, workers, resume, overwrite, strict, quiet)


@command.command("idx")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--size", default=28, show_default=True, type=click.IntRange(8), help="Stored image side S.")
@click.option("--class-names", help="Comma-separated class names [default: 0, 1, 2, ...].")
@click.option("--val-from-train", "val_from_train", default=0.0, show_default=True, type=float,
              help="Hold out this stratified fraction of the training images as val.h5 (for tuning); the t10k "
                   "files then go to test.h5, to be looked at once.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="For --val-from-train.")
@_common
def idx(folder, size, class_names, val_from_train, seed, out, workers, resume, overwrite, strict, quiet):
    """MNIST-family IDX files in FOLDER: train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz] -> train.h5,
    t10k-... -> val.h5 (-> test.h5 with --val-from-train). Grayscale is replicated to RGB."""
    from cpnet.data.sources import idx_jobs

    names = class_names.split(",") if class_names else None
    _run(idx_jobs(folder, size, names, val_from_train, seed), out, workers, resume, overwrite, strict, quiet)
