"""cpnet eval."""

import click


@click.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="An HDF5 dataset file (e.g. val.h5).")
@click.option("--ten-crop", is_flag=True, help="Average the softmax over the paper's 10 views instead of the centre crop.")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--workers", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def command(checkpoint, data, ten_crop, batch_size, workers, as_json):
    """Top-1 and top-5 error of CHECKPOINT on every image of an HDF5 dataset."""
    import json
    import os

    from cpnet.checkpoint import load_model
    from cpnet.data import EvalLoader, H5Dataset
    from cpnet.errors import CpnetError
    from cpnet.evaluate import evaluate

    if not os.path.exists(data):
        raise CpnetError(f"--data {data}: file not found")
    model, ck = load_model(checkpoint)
    with H5Dataset(data) as ds:
        if list(ds.classes) != ck.classes:
            raise CpnetError(f"--data {data}: its {ds.num_classes} classes differ from the checkpoint's "
                             f"{len(ck.classes)} ({checkpoint})")
        if ck.config.crop > ds.size:
            raise CpnetError(f"--data {data}: images are {ds.size}px, smaller than the model's crop {ck.config.crop}")
        if ck.stored_size and ds.size != ck.stored_size:
            raise CpnetError(f"--data {data}: images are stored at {ds.size}px, the checkpoint was trained on "
                             f"{ck.stored_size}px images (prepare the data with --size {ck.stored_size})")
    views = "ten" if ten_crop else "center"
    with EvalLoader(data, batch_size, ck.config.crop, views=views, workers=workers, scale=ck.scale,
                    mean=ck.mean) as loader:
        r = evaluate(model, loader)
    r = dict(r, views=views, checkpoint=checkpoint, data=data)
    if as_json:
        click.echo(json.dumps(r))
    else:
        click.echo(f"{r['n']} images, {'10 views' if ten_crop else 'centre crop'}: top-1 error {r['top1']:.4f}, "
                   f"top-5 error {r['top5']:.4f}, loss {r['loss']:.4f}")
