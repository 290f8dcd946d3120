"""cpnet eval."""

import click


def dataset_file(data, flag="--data", name="val.h5"):
    """A dataset file from a flag that takes the file or the folder `cpnet prep` wrote (then its `name`)."""
    import os

    from cpnet.errors import CpnetError

    if os.path.isdir(data):
        path = os.path.join(data, name)
        if not os.path.isfile(path):
            raise CpnetError(f"{flag} {data}: a folder without {name} (give a dataset file, or the folder "
                             f"`cpnet prep` wrote)")
        return path
    if not os.path.exists(data):
        raise CpnetError(f"{flag} {data}: file not found")
    return data


@click.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--data", required=True, type=click.Path(),
              help="An HDF5 dataset file (e.g. DIR/val.h5), or the folder `cpnet prep` wrote (then its val.h5).")
@click.option("--ten-crop", is_flag=True,
              help="Average the softmax over the paper's 10 views instead of the centre crop: 10 times the "
                   "compute; the views go through the network in chunks of at most --batch-size images.")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(1),
              help="Images per forward pass.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(0),
              help="Loader worker processes (0: in-process).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def command(checkpoint, data, ten_crop, batch_size, workers, as_json):
    """Top-1 and top-5 error of CHECKPOINT on every image of an HDF5 dataset."""
    import json

    from cpnet.backend import gpu_augment
    from cpnet.checkpoint import check_dataset, load_model
    from cpnet.data import EvalLoader, H5Dataset
    from cpnet.evaluate import evaluate, top5_informative

    data = dataset_file(data)
    model, ck = load_model(checkpoint)
    with H5Dataset(data) as ds:
        check_dataset(ck, ds, f"--data {data}", checkpoint)
    views = "ten" if ten_crop else "center"
    with EvalLoader(data, batch_size, ck.config.crop, views=views, workers=workers, scale=ck.scale,
                    mean=ck.mean, pad=ck.pad, raw=gpu_augment(model.devices)) as loader:
        r = evaluate(model, loader)
    informative = top5_informative(len(ck.classes))
    r = dict(r, views=views, checkpoint=checkpoint, data=data, top5_informative=informative)
    if as_json:
        click.echo(json.dumps(r))
    else:
        top5 = (f"top-5 error {r['top5']:.4f}" if informative else
                f"top-5 error {r['top5']:.4f} (uninformative: {len(ck.classes)} classes, all in the top 5)")
        click.echo(f"{r['n']} images, {'10 views' if ten_crop else 'centre crop'}: top-1 error {r['top1']:.4f}, "
                   f"{top5}, loss {r['loss']:.4f}")
