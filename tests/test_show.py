"""cpnet show: every picture from a tiny checkpoint and dataset made here, checked for size and content."""

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from cpnet import checkpoint, viz
from cpnet.data import H5Dataset
from cpnet.model import build_model, make_config
from conftest import invoke, make_tiny_run

SIZE, CLASSES, N = 17, 3, 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A synthetic dataset (24 train / 6 val images of 17px, 3 classes) and an untrained alexnet-tiny checkpoint."""
    d = tmp_path_factory.mktemp("tiny")
    return d, make_tiny_run(d, d / "ck.h5", N, CLASSES, SIZE)


def png(path, size=None):
    im = Image.open(path)
    assert im.format == "PNG" and im.mode == "RGB"
    if size is not None:
        assert im.size == tuple(size)
    return np.asarray(im)


def count(a, color):
    return int((a.reshape(-1, 3) == np.array(color, np.uint8)).all(axis=1).sum())


# ---- filters ----------------------------------------------------------------------------------------------------

def test_filters_grid_shows_each_kernel_in_its_tile(tiny, tmp_path):
    d, ck = tiny
    params = dict(ck.params)
    W0, W1 = params["t0.conv1.W"].copy(), params["t1.conv1.W"].copy()
    F, _, k, _ = W0.shape
    W0[1] = -1.0
    W0[1, 0, :, 0] = 1.0                  # tower 0, kernel 1: left column pure red, everything else black
    W1[F - 1] = 0.25                      # tower 1, last kernel: constant -> mid grey
    params.update({"t0.conv1.W": W0, "t1.conv1.W": W1})
    path = tmp_path / "pattern.h5"
    checkpoint.save(path, checkpoint.Checkpoint(**{**ck.__dict__, "params": params}))

    r = invoke("show", "filters", path, "-o", tmp_path / "f.png", "--zoom", 5)
    assert r.exit_code == 0, r.output
    lay, zoom = viz.filter_layout((2 * F, 3, k, k), zoom=5)
    a = png(tmp_path / "f.png")
    # the title strip sits above the grid, which is centred across the picture's width (at least 480 px)
    assert a.shape[1] == 480 > lay.size[0] and a.shape[0] > lay.size[1]
    lay = replace(lay, top=a.shape[0] - lay.size[1], min_width=a.shape[1])
    assert tuple(a.shape[1::-1]) == lay.size
    x0, y0, x1, y1 = lay.box(0, 1)
    tile = a[y0:y1, x0:x1]
    assert tile.shape == (k * zoom, k * zoom, 3)
    assert (tile[:, :zoom] == [255, 0, 0]).all()
    assert (tile[:, zoom:] == 0).all()
    x0, y0, x1, y1 = lay.box(1, F - 1)
    assert (a[y0:y1, x0:x1] == 128).all()
    # tower 1 sits below tower 0, after the gap
    assert lay.box(1, 0)[1] > lay.box(0, F - 1)[3] + lay.gap - 1


def test_filters_checkpoint_without_conv1(tiny, tmp_path):
    d, ck = tiny
    params = {k: v for k, v in ck.params.items() if "conv1" not in k}
    path = tmp_path / "noconv1.h5"
    checkpoint.save(path, checkpoint.Checkpoint(**{**ck.__dict__, "params": params}))
    r = invoke("show", "filters", path, "-o", tmp_path / "x.png")
    assert r.exit_code != 0
    assert "no conv1 weights" in r.output and "noconv1.h5" in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "x.png").exists()


def test_filters_missing_checkpoint(tmp_path):
    r = invoke("show", "filters", tmp_path / "nope.h5", "-o", tmp_path / "x.png")
    assert r.exit_code != 0 and "checkpoint not found" in r.output


# ---- curves -----------------------------------------------------------------------------------------------------

def test_curves_from_metrics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [dict(epoch=e, iteration=10 * e, lr=0.01 if e < 4 else 0.001, train_loss=2.0 / e, train_top1=0.8 / e,
                 train_top5=0.4 / e, val_loss=2.1 / e, val_top1=0.85 / e, val_top5=0.45 / e) for e in range(1, 7)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = invoke("show", "curves", run, "-o", tmp_path / "c.png", "--width", 700, "--height", 300)
    assert r.exit_code == 0, r.output
    a = png(tmp_path / "c.png", (700, 300))   # --height is the picture's height, title included
    assert count(a, viz.PALETTE[3]) > 100     # top-1 error lines
    assert count(a, viz.PALETTE[2]) > 100     # top-5 error lines
    assert count(a, viz.PALETTE[0]) > 100     # loss lines
    assert count(a, viz.GREY) > 20            # axes and the dashed learning-rate drop
    assert viz.lr_drops(rows) == [(3, 0.001)]


def test_curves_without_validation_and_one_epoch(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text(json.dumps(dict(epoch=1, lr=0.01, train_loss=1.0, train_top1=0.5, train_top5=0.1)) + "\n")
    r = invoke("show", "curves", p, "-o", tmp_path / "c.png")
    assert r.exit_code == 0, r.output
    png(tmp_path / "c.png")


def test_curves_bad_input(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    r = invoke("show", "curves", tmp_path, "-o", tmp_path / "c.png")
    assert r.exit_code != 0 and "empty metrics file" in r.output and "Traceback" not in r.output
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n')
    r = invoke("show", "curves", tmp_path, "-o", tmp_path / "c.png")
    assert r.exit_code != 0 and "line 2" in r.output
    r = invoke("show", "curves", tmp_path / "missing", "-o", tmp_path / "c.png")
    assert r.exit_code != 0 and "no metrics file" in r.output


# ---- predictions ------------------------------------------------------------------------------------------------

def test_predictions_panel(tiny, tmp_path):
    d, _ = tiny
    r = invoke("show", "predictions", d / "ck.h5", "--data", d / "val.h5", "-n", 5, "-o", tmp_path / "p.png")
    assert r.exit_code == 0, r.output
    lay = viz.predictions_layout(5, SIZE, top=CLASSES)
    a = png(tmp_path / "p.png")
    assert a.shape[1] == lay.size[0] and a.shape[0] > lay.size[1]   # a title and a legend above the cells
    lay = replace(lay, header=a.shape[0] - lay.size[1])
    with H5Dataset(d / "val.h5") as ds:
        images = ds.read(np.arange(ds.n))
    zoom = lay.image // SIZE
    for i in range(5):
        x0, y0, x1, y1 = lay.image_box(i)
        tile = a[y0:y1, x0:x1]
        assert any((tile == np.asarray(viz.enlarge(im, zoom))).all() for im in images)
    # 3 classes, so the true class is always among the bars: one red bar per image
    assert count(a, viz.BAR_TRUE) > 5 * 3
    assert count(a, viz.BAR) > 0


def test_predictions_n_beyond_file(tiny, tmp_path):
    d, _ = tiny
    r = invoke("show", "predictions", d / "ck.h5", "--data", d / "val.h5", "-n", 999, "-o", tmp_path / "p.png")
    assert r.exit_code != 0 and "-n 999" in r.output and "holds only" in r.output and "Traceback" not in r.output


def test_predictions_incomplete_checkpoint(tiny, tmp_path):
    d, ck = tiny
    path = tmp_path / "nofc8.h5"
    checkpoint.save(path, checkpoint.Checkpoint(**{**ck.__dict__, "params": {
        k: v for k, v in ck.params.items() if not k.startswith("fc8")}}))
    r = invoke("show", "predictions", path, "--data", d / "val.h5", "-o", tmp_path / "p.png")
    assert r.exit_code != 0 and "parameters missing" in r.output and "Traceback" not in r.output


def test_show_checks_the_data_against_the_checkpoint_as_eval_does(tiny, tmp_path):
    """One check (checkpoint.check_dataset) for eval and show: classes, and the size the images are stored at."""
    d, _ = tiny
    other = tmp_path / "other"
    r = invoke("prep", "synthetic", "--out", other, "--n", N, "--classes", CLASSES, "--size", SIZE + 2, "-q")
    assert r.exit_code == 0, r.output
    msg = f"images are stored at {SIZE + 2}px, the checkpoint was trained on {SIZE}px"
    r = invoke("show", "predictions", d / "ck.h5", "--data", other / "val.h5", "-o", tmp_path / "p.png")
    assert r.exit_code != 0 and f"--data {other / 'val.h5'}: {msg}" in r.output and "Traceback" not in r.output
    r = invoke("show", "neighbors", d / "ck.h5", "--query", d / "val.h5", "--pool", other / "train.h5",
               "-o", tmp_path / "nn.png")
    assert r.exit_code != 0 and f"--pool {other / 'train.h5'}: {msg}" in r.output
    r = invoke("eval", d / "ck.h5", "--data", other / "val.h5")
    assert r.exit_code != 0 and msg in r.output
    fewer = tmp_path / "fewer"
    assert invoke("prep", "synthetic", "--out", fewer, "--n", N, "--classes", CLASSES + 1, "--size", SIZE,
                  "-q").exit_code == 0
    for args in (("show", "predictions", d / "ck.h5", "--data", fewer / "val.h5", "-o", tmp_path / "p.png"),
                 ("eval", d / "ck.h5", "--data", fewer / "val.h5")):
        r = invoke(*args)
        assert r.exit_code != 0 and f"its {CLASSES + 1} classes differ from the checkpoint's {CLASSES}" in r.output


# ---- neighbours -------------------------------------------------------------------------------------------------

def test_neighbors_query_finds_itself(tiny, tmp_path):
    d, _ = tiny
    n, k = 4, 3
    r = invoke("show", "neighbors", d / "ck.h5", "--query", d / "train.h5", "--pool", d / "train.h5", "-n", n,
               "-k", k, "--batch-size", 7, "-o", tmp_path / "nn.png")
    assert r.exit_code == 0, r.output
    lay, _ = viz.neighbors_layout(n, k, SIZE)
    a = png(tmp_path / "nn.png")
    assert a.shape[1] == lay.size[0] and a.shape[0] > lay.size[1]   # a title above the rows
    lay = replace(lay, header=a.shape[0] - lay.size[1])
    for row in range(n):
        q = lay.image_box(row, 0)
        first = lay.image_box(row, 1)
        assert (a[q[1]:q[3], q[0]:q[2]] == a[first[1]:first[3], first[0]:first[2]]).all()
        # the query's own class: the nearest neighbour's frame is green
        x0, y0, _, _ = lay.box(row, 1)
        assert tuple(a[y0, x0]) == viz.SAME


def test_neighbors_bad_counts(tiny, tmp_path):
    d, _ = tiny
    r = invoke("show", "neighbors", d / "ck.h5", "--query", d / "val.h5", "--pool", d / "train.h5", "-n", 50,
               "-o", tmp_path / "nn.png")
    assert r.exit_code != 0 and "-n 50" in r.output and "holds only" in r.output
    r = invoke("show", "neighbors", d / "ck.h5", "--query", d / "val.h5", "--pool", d / "train.h5", "-k", 500,
               "-o", tmp_path / "nn.png")
    assert r.exit_code != 0 and "-k 500" in r.output and "holds only" in r.output


def test_nearest_neighbors_matches_brute_force(xp):
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((203, 12)).astype(np.float32)
    q = rng.standard_normal((7, 12)).astype(np.float32)
    idx, dist = viz.nearest_neighbors(xp.asarray(q), xp.asarray(pool), 5, chunk=16)
    d = np.sqrt(((q[:, None, :].astype(np.float64) - pool[None]) ** 2).sum(-1))
    ref = np.argsort(d, axis=1)[:, :5]
    assert isinstance(idx, np.ndarray) and idx.shape == (7, 5)
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(dist, np.take_along_axis(d, ref, 1), rtol=1e-4, atol=1e-4)
    # k larger than the pool: every row, nearest first
    idx, _ = viz.nearest_neighbors(xp.asarray(q), xp.asarray(pool[:3]), 10)
    assert idx.shape == (7, 3)


def test_fc7_features_match_one_big_batch(tiny):
    cfg = make_config("alexnet-tiny", CLASSES, 15, init="he", seed=2)
    model = build_model(cfg)
    x = np.random.default_rng(1).standard_normal((10, 1, 3, 15, 15)).astype(np.float32)
    f = viz.fc7_features(model, [(x[:4], None), (x[4:], None)])
    ref = model.forward(x[:, 0], train=False, upto="fc7")
    assert f.shape == (10, 2 * cfg.fc[1])
    np.testing.assert_allclose(np.asarray(f), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_chart_ticks_and_nan_gaps():
    assert viz.nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert viz.nice_ticks(1, 3, integer=True) == [1, 2, 3]
    im = viz.chart([viz.Series([1, 2, 3, 4], [0.5, float("nan"), 0.3, 0.2], "a")], (300, 200), "t", "x", "y")
    assert im.size == (300, 200)


def test_an_x_mark_label_at_the_right_edge_goes_left_of_its_line():
    """A rate drop in the last epoch: its label is drawn left of the dashed line, inside the plot, not cut off at
    the image's right edge (the Fashion-MNIST curves' 'lr 0.0003' was)."""
    red = (200, 0, 0)
    marks = [viz.Mark(10, "x", "lr 0.0003", red), viz.Mark(5, "x", "lr 0.003", red)]
    im = np.asarray(viz.chart([viz.Series([0, 10], [0.5, 0.4], "a", viz.PALETTE[0])], (300, 200), xlim=(0, 10),
                              ylim=(0, 1), marks=marks, legend=False)).astype(int)
    cols = np.nonzero((np.abs(im - red).sum(-1) < 60).any(0))[0]   # columns holding the marks' colour
    lines = [c for c in cols if (np.abs(im[:, c] - red).sum(-1) < 60).sum() > 60]  # the two dashed lines
    assert len(lines) == 2
    right = max(lines)
    assert cols.max() <= right + 1                                  # nothing right of the last line
    assert any(min(lines) + 3 < c < right - 3 for c in cols)       # its label, left of it
