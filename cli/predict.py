"""cpnet predict."""

import click

from .prep import BACKGROUND_HELP, Colour


@click.command("predict")
@click.argument("checkpoint", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--ten-crop", is_flag=True, help="Average the softmax over the paper's 10 views (10 times the work).")
@click.option("--top", default=5, show_default=True, type=click.IntRange(1), help="How many classes to list per image.")
@click.option("--background", default="white", show_default=True, type=Colour(), help=BACKGROUND_HELP.replace(
    "; use the same for `cpnet predict`", "; the one the training set was prepared with"))
def command(checkpoint, images, ten_crop, top, background):
    """The most probable classes for each IMAGE (any format Pillow reads), with probabilities.

    Each image is prepared like the training data: transparency over --background, shorter side resized to the
    stored size, centre square, then the model's centre crop (or 10 views) minus the training mean. An image that
    cannot be read is reported on one line and the others still run; the exit status is then 1.
    """
    import os

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from cpnet.checkpoint import load_model
    from cpnet.data.augment import eval_batch_into, view_offsets
    from cpnet.data.sources import fit_square
    from cpnet.evaluate import predict_proba

    model, ck = load_model(checkpoint)
    size, crop = ck.stored_size or ck.mean.shape[0], ck.config.crop
    offsets = view_offsets(size, crop, "ten" if ten_crop else "center", ck.pad)
    mean_chw = np.ascontiguousarray(ck.mean.transpose(2, 0, 1), dtype=np.float32)
    k = max(1, min(top, len(ck.classes)))
    failed = 0
    for path in images:
        if os.path.isdir(path):
            problem = "a folder, not an image file"
        elif not os.path.isfile(path):
            problem = "image not found"
        else:
            try:
                with Image.open(path) as im:
                    im.load()
                    arr = fit_square(im, size, background)
                problem = None
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
                problem = "cannot read the image (expected a format Pillow reads: JPEG, PNG, GIF, BMP, TIFF, ...)"
        if problem:
            click.echo(f"Error: {path}: {problem}", err=True)
            failed += 1
            continue
        x = np.empty((1, len(offsets), 3, crop, crop), np.float32)
        eval_batch_into(x, arr[None], [0], offsets, mean_chw, ck.scale)
        p = predict_proba(model, x)[0]
        click.echo(path)
        for rank, c in enumerate(np.argsort(-p, kind="stable")[:k], 1):
            click.echo(f"  {rank}. {ck.classes[c]:<24} {p[c]:.4f}")
    if failed:
        raise SystemExit(1)
