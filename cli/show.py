"""cpnet show: pictures of a checkpoint or a run, as PNG files."""

import click


@click.group("show")
def command():
    """Pictures as PNG files: conv1 filters, training curves, top-5 predictions, nearest neighbours in fc7 space."""


def _out_option(default):
    return click.option("-o", "--out", "out", default=default, show_default=True, type=click.Path(dir_okay=False),
                        help="PNG file to write.")


def _check_out(out):
    """-o must name a file in a folder that exists: a typo in the folder is an error, not a new folder."""
    import os

    from cpnet.errors import CpnetError

    d = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(d):
        raise CpnetError(f"-o {out}: the folder {d} does not exist (create it first, or pick another -o)")


def _save(image, out):
    """Write `image` as PNG to `out` atomically (a temporary file beside it, read back, then renamed)."""
    from PIL import Image

    from cpnet.checkpoint import atomic_path

    _check_out(out)
    with atomic_path(out) as tmp:
        image.save(tmp, format="PNG")
        with Image.open(tmp) as im:
            im.verify()
    click.echo(f"wrote {out} ({image.width}x{image.height})")


def _open_data(path, flag, ck, checkpoint):
    """An H5Dataset checked against the checkpoint (checkpoint.check_dataset: classes, stored size, crop)."""
    import os

    from cpnet.checkpoint import check_dataset
    from cpnet.data import H5Dataset
    from cpnet.errors import CpnetError

    if not os.path.exists(path):
        raise CpnetError(f"{flag} {path}: file not found")
    ds = H5Dataset(path)
    try:
        check_dataset(ck, ds, f"{flag} {path}", checkpoint)
    except CpnetError:
        ds.close()
        raise
    return ds


def _pick(ds, n, seed, flag, path):
    """n distinct image indices of `ds`, drawn with `seed`, in increasing order."""
    import numpy as np

    from cpnet.errors import CpnetError

    if n < 1:
        raise CpnetError(f"{flag} {n}: expected at least 1")
    if n > ds.n:
        raise CpnetError(f"{flag} {n}: {path} holds only {ds.n} images")
    return np.sort(np.random.default_rng(seed).choice(ds.n, size=n, replace=False))


def _centre_crops(images, mean, crop, scale):
    """uint8 (b, S, S, 3) -> float32 (b, 3, crop, crop): the centre window minus the mean image's, times scale (or,
    for a crop beyond S, the image centred on a canvas of the mean colour): the evaluation loader's centre view."""
    import numpy as np

    from cpnet.data.augment import eval_batch_into, view_offsets

    x = np.empty((len(images), 1, 3, crop, crop), np.float32)
    mean_chw = np.ascontiguousarray(np.asarray(mean, np.float32).transpose(2, 0, 1))
    eval_batch_into(x, images, range(len(images)), view_offsets(images.shape[1], crop), mean_chw, scale)
    return x[:, 0]


@command.command("filters")
@click.argument("checkpoint", type=click.Path())
@_out_option("filters.png")
@click.option("--cols", type=click.IntRange(1), default=None, help="Kernels per row [default: min(F, 16)].")
@click.option("--zoom", type=click.IntRange(1), default=None, help="Screen pixels per weight [default: ~40px tiles].")
def filters(checkpoint, out, cols, zoom):
    """The conv1 kernels of CHECKPOINT as a grid, tower 0 above tower 1 (the paper's Figure 3).

    Each kernel is stretched on its own from its minimum (black) to its maximum (white), colours kept.
    """
    _check_out(out)
    import numpy as np

    from cpnet.checkpoint import load
    from cpnet.errors import CpnetError
    from cpnet.viz import filter_grid

    ck = load(checkpoint, with_momentum=False)
    names = ("t0.conv1.W", "t1.conv1.W")
    missing = [n for n in names if n not in ck.params]
    if missing:
        raise CpnetError(f"{checkpoint}: no conv1 weights (params/{missing[0]} is missing)")
    towers = [np.asarray(ck.params[n]) for n in names]
    for n, w in zip(names, towers):
        if w.ndim != 4 or w.shape[1] != 3 or w.shape[2] != w.shape[3] or w.shape != towers[0].shape:
            raise CpnetError(f"{checkpoint}: params/{n} has shape {w.shape}, expected (F, 3, k, k), the same in "
                             "both towers")
    W = np.concatenate(towers, axis=0)  # tower 0 first, as model.conv1_weights()
    epoch = ck.state.get("epoch")
    trained = f", after {epoch} epoch{'s' if epoch != 1 else ''}" if isinstance(epoch, int) else ""
    title = [f"conv1 kernels of {checkpoint} ({ck.config.preset}{trained})",
             "Each kernel is stretched from its own minimum (black) to its maximum (white). Colour share: the "
             "part of a kernel's variance that is not grey (0: R = G = B; random kernels: about 0.67). In the "
             "paper's Figure 3 one tower's kernels came out largely colour-agnostic and the other's "
             "colour-specific, after 90 epochs on ImageNet; a small net after a few epochs stays close to its "
             "random start."]
    _save(filter_grid(W, cols=cols, zoom=zoom, title=title), out)


def _run_settings(folder):
    """'alexnet-small, batch 32, lr 0.02 (plateau), ...' from folder/last.h5, or '' when there is none."""
    import os

    from cpnet.checkpoint import load
    from cpnet.errors import CpnetError

    last = os.path.join(folder, "last.h5")
    if not os.path.isfile(last):
        return ""
    try:
        t = load(last, with_momentum=False).train
    except CpnetError:
        return ""
    wide = t.get("width", 1.0) != 1.0  # runs from before --width: 1
    parts = [t.get("model") and t["model"] + (f" width {t['width']:g}" if wide else ""),
             t.get("batch_size") and f"batch {t['batch_size']}",
             t.get("lr") and f"lr {t['lr']:g}" + (f" ({t['schedule']})" if t.get("schedule") else ""),
             t.get("init") and f"init {t['init']}", t.get("epochs") and f"{t['epochs']} epochs",
             t.get("data") and f"data {t['data']}"]
    return ", ".join(str(p) for p in parts if p)


@command.command("curves")
@click.argument("run", type=click.Path())
@_out_option("curves.png")
@click.option("--width", type=click.IntRange(300), default=900, show_default=True, help="Image width in pixels.")
@click.option("--height", type=click.IntRange(200), default=380, show_default=True,
              help="Image height in pixels, title included.")
def curves(run, out, width, height):
    """Training and validation loss and top-1/top-5 error per epoch from RUN/metrics.jsonl (RUN: a run folder or
    the metrics file itself); learning-rate drops are dashed vertical lines. The title names the run and, from
    RUN/last.h5, its settings."""
    _check_out(out)
    import json
    import os

    from cpnet.errors import CpnetError
    from cpnet.viz import curves_figure

    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.exists(path):
        raise CpnetError(f"{path}: no metrics file (a run folder from `cpnet train` holds metrics.jsonl)")
    with open(path, "rb") as f:
        if f.read(8) == b"\x89HDF\r\n\x1a\n":
            raise CpnetError(f"{path}: an HDF5 file (a checkpoint?), not a metrics file; give the run folder "
                             "or its metrics.jsonl")
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise CpnetError(f"{path} line {i}: not a JSON object (expected metrics.jsonl from `cpnet "
                                 "train`)") from None
            if not isinstance(row, dict) or "epoch" not in row:
                raise CpnetError(f"{path} line {i}: expected a JSON object with an 'epoch' field")
            rows.append(row)
    if not rows:
        raise CpnetError(f"{path}: empty metrics file (no finished epoch yet)")
    folder = os.path.dirname(path) or "."
    name = os.path.relpath(folder) if not os.path.relpath(folder).startswith("..") else os.path.abspath(folder)
    settings = _run_settings(folder)
    title = f"run {name}" + (f": {settings}" if settings else "")
    _save(curves_figure(rows, title=title, size=(width, height)), out)


@command.command("predictions")
@click.argument("checkpoint", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="HDF5 dataset file with the images (e.g. val.h5).")
@click.option("-n", "n", type=int, default=8, show_default=True, help="Number of images.")
@click.option("--seed", default=0, show_default=True, help="Which images: n drawn at random with this seed.")
@click.option("--cols", type=click.IntRange(1), default=None, help="Images per row [default: min(n, 4)].")
@_out_option("predictions.png")
def predictions(checkpoint, data, n, seed, cols, out):
    """Images with their five most probable classes as bars, the true class in red (the paper's Figure 4, left).

    Centre crops; the bars show the softmax probabilities of CHECKPOINT.
    """
    _check_out(out)
    from cpnet.evaluate import predict_proba, top5_informative
    from cpnet.viz import predictions_panel
    from cpnet.checkpoint import load_model

    model, ck = load_model(checkpoint)  # a file missing parameters: a clear error naming it
    with _open_data(data, "--data", ck, checkpoint) as ds:
        idx = _pick(ds, n, seed, "-n", data)
        images, labels = ds.read(idx), ds.labels[idx]
        x = _centre_crops(images, ds.mean, ck.config.crop, ck.scale)
    probs = predict_proba(model, x[:, None])
    k = min(5, len(ck.classes))
    title = [f"top-{k} predictions of {checkpoint} for {n} images of {data} (centre crop)"]
    if not top5_informative(len(ck.classes)):
        title.append(f"With {len(ck.classes)} classes the bars list every class: top-5 says nothing here, "
                     "look at the first bar (top-1).")
    _save(predictions_panel(images, probs, labels, ck.classes, cols=cols, title=title), out)


@command.command("neighbors")
@click.argument("checkpoint", type=click.Path())
@click.option("--query", required=True, type=click.Path(), help="HDF5 file the query images come from (e.g. val.h5).")
@click.option("--pool", required=True, type=click.Path(), help="HDF5 file searched for neighbours (e.g. train.h5).")
@click.option("-n", "n", type=int, default=5, show_default=True, help="Number of query images.")
@click.option("-k", "k", type=int, default=6, show_default=True, help="Neighbours per query.")
@click.option("--seed", default=0, show_default=True, help="Which queries: n drawn at random with this seed.")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True,
              help="Images per forward pass while extracting the pool's features.")
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True, help="Loader processes.")
@_out_option("neighbors.png")
def neighbors(checkpoint, query, pool, n, k, seed, batch_size, workers, out):
    """Query images, each with the k pool images whose fc7 features (the last hidden layer, both towers) are
    nearest in Euclidean distance (the paper's Figure 4, right).

    Features are extracted in batches on the model's device and searched there with matrix products. Frames:
    green when a neighbour has the query's class, red otherwise.
    """
    _check_out(out)
    import time

    from cpnet.data import EvalLoader
    from cpnet.errors import CpnetError
    from cpnet.viz import fc7_features, nearest_neighbors, neighbors_panel
    from cpnet.checkpoint import load_model

    model, ck = load_model(checkpoint)  # a file missing parameters: a clear error naming it
    with _open_data(query, "--query", ck, checkpoint) as qds:
        qi = _pick(qds, n, seed, "-n", query)
        q_images, q_labels = qds.read(qi), qds.labels[qi]
        xq = _centre_crops(q_images, qds.mean, ck.config.crop, ck.scale)
    with _open_data(pool, "--pool", ck, checkpoint) as pds:
        if k < 1:
            raise CpnetError(f"-k {k}: expected at least 1")
        if k > pds.n:
            raise CpnetError(f"-k {k}: {pool} holds only {pds.n} images")
        t0 = time.perf_counter()
        with EvalLoader(pool, batch_size, ck.config.crop, views="center", workers=workers, scale=ck.scale,
                        pad=ck.pad) as ld:
            feats = fc7_features(model, ld)
        fq = fc7_features(model, [xq])
        idx, dist = nearest_neighbors(fq, feats, k)
        click.echo(f"fc7 features of {pds.n} pool images ({feats.shape[1]} each) in "
                   f"{time.perf_counter() - t0:.1f}s on {model.devices[0]}")
        nb_images = pds.read(idx.reshape(-1)).reshape((n, k) + q_images.shape[1:])
        nb_labels = pds.labels[idx]
    captions = [[f"query\n{ck.classes[q_labels[r]]}"]
                + [f"{ck.classes[nb_labels[r, j]]}\nd {dist[r, j]:.3g}" for j in range(k)] for r in range(n)]
    same = nb_labels == q_labels[:, None]
    title = [f"nearest neighbours in fc7 space: {n} images of {query}, each with the {k} images of {pool} "
             f"whose fc7 features are nearest ({checkpoint})",
             "Under each image its class and its Euclidean fc7 distance d from the query; green frame: the query's "
             f"class, red: another class ({int(same.sum())} of {same.size} share the query's class)."]
    _save(neighbors_panel(q_images, nb_images, same, captions, title=title), out)
