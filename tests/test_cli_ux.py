"""What a new user meets first: one error style, flags that explain themselves, own images, pictures."""

import json
import os
import re

import click

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cpnet import checkpoint, viz
from cpnet.cli.main import cli
from cpnet.data import H5Dataset
from cpnet.evaluate import view_probs
from cpnet.model import build_model, make_config
from conftest import invoke, make_tiny_run

SIZE, CLASSES, N = 17, 3, 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A synthetic dataset (24 train / 6 val images of 17px, 3 classes) and an untrained alexnet-tiny checkpoint."""
    d = tmp_path_factory.mktemp("ux")
    make_tiny_run(d / "data", d / "ck.h5", N, CLASSES, SIZE)
    (d / "empty").mkdir()
    (d / "notes.txt").write_text("not a checkpoint\n")
    return d


def one_line_error(r):
    """The command failed with exactly one line on stderr, `Error: ...`, and no exception class name."""
    assert r.exit_code != 0, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "Traceback" not in r.output
    assert not re.search(r"\(\w*(Error|Exception)\)", lines[0]), lines[0]
    return lines[0]


BAD = [
    (["train"], "Missing option '--out'"),
    (["train", "--out", "{t}/run"], "--data: missing"),
    (["train", "--data", "{d}/data", "--out", "{t}/run", "--model", "alexnet"], "takes 227-px crops"),
    (["train", "--data", "{d}/data", "--out", "{t}/run", "--model", "alexnet-tiny"], "fewer than one training batch"),
    (["train", "--data", "{d}/data", "--out", "{t}/run", "--model", "alexnet-tiny", "--batch-size", "8",
      "--schedule", "plateau", "--crop", "99"], "--crop 99"),
    (["train", "--foo"], "No such option '--foo'"),
    (["train", "--data", "{d}/data", "--out", "{t}/run", "--workers", "-1"], "--workers"),
    (["bench", "--model", "alexnet-tinyy"], "--model 'alexnet-tinyy': expected one of"),
    (["nosuch"], "No such command 'nosuch'"),
    (["train", "--data", "{d}/data", "--out", "{t}/r", "--precision", "fp16"],
     "'fp16' is not one of 'fp32', 'tf32', 'bf16'"),
    (["train", "--data", "{d}/data", "--out", "{t}/r", "--tf32", "--precision", "bf16"],
     "--tf32 contradicts --precision bf16"),
    (["train", "--data", "{d}/data", "--out", "{t}/r", "--tf32", "--precision", "fp32"],
     "--tf32 contradicts --precision fp32"),
    (["bench", "--model", "alexnet-tiny", "--tf32", "--precision", "fp32"], "--tf32 contradicts --precision fp32"),
    (["eval", "{d}/empty", "--data", "{d}/data/val.h5"], "a folder, not a checkpoint file"),
    (["eval", "{d}/notes.txt", "--data", "{d}/data/val.h5"], "not an HDF5 file"),
    (["eval", "{d}/ck.h5", "--data", "{d}/data", "--workers", "-1"], "--workers"),
    (["eval", "{d}/ck.h5", "--data", "{d}/empty"], "a folder without val.h5"),
    (["show", "curves", "{d}/ck.h5", "-o", "{t}/c.png"], "not a metrics file"),
    (["show", "filters", "{d}/ck.h5", "-o", "{t}/typo/f.png"], "does not exist"),
    (["info", "{d}/empty"], "a folder without train.h5 or val.h5"),
    (["prep", "cifar", "{d}/notes.txt", "--out", "{t}/cifar"], "not a tar archive"),
    (["prep", "synthetic", "--strict", "--out", "{t}/syn"], "No such option '--strict'"),
    (["predict", "{d}/ck.h5", "{t}/missing.png"], "missing.png: image not found"),
]


@pytest.mark.parametrize("args,words", BAD, ids=[" ".join(a[:2]) + f" {i}" for i, (a, _) in enumerate(BAD)])
def test_every_error_is_one_line_and_creates_nothing(tiny, tmp_path, args, words):
    r = CliRunner().invoke(cli, [a.format(d=tiny, t=tmp_path) for a in args])
    line = one_line_error(r)
    assert words in line, line
    assert list(tmp_path.iterdir()) == []   # no output folder, no parent folder for a typo'd -o


def test_every_flag_has_help_text():
    ctx = click.Context(cli)
    missing = []

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), path + [name])
            return
        missing.extend(f"{' '.join(path)} {p.opts[0]}" for p in cmd.params
                       if isinstance(p, click.Option) and not (p.help or "").strip())
    walk(cli, ["cpnet"])
    assert missing == []


def test_prep_synthetic_lists_only_flags_that_mean_something():
    out = invoke("prep", "synthetic", "--help").output
    assert "--strict" not in out and "skipped.txt" not in out
    assert "--strict" in invoke("prep", "folder", "--help").output


def test_predict_reports_a_bad_file_and_goes_on(tiny, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((20, 24, 3), 90, np.uint8)).save(good)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    r = CliRunner().invoke(cli, ["predict", str(tiny / "ck.h5"), str(tmp_path / "bad.jpg"), str(good),
                                 str(tmp_path), "--top", "2"])
    assert r.exit_code == 1
    errs = r.stderr.strip().splitlines()
    assert len(errs) == 2 and all(e.startswith("Error: ") for e in errs)
    assert "bad.jpg: cannot read the image" in errs[0] and "a folder, not an image file" in errs[1]
    assert r.stdout.splitlines()[0] == str(good) and len(r.stdout.splitlines()) == 3   # its two classes


def _icons(root, n=4):
    """Two classes of RGBA icons whose drawing is in the alpha channel only (RGB all black), plus one blank."""
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            rgba = np.zeros((20, 20, 4), np.uint8)
            rgba[5:15, 5:15, 3] = 255 if c == "a" else 128     # an opaque (a) or half-transparent (b) square
            Image.fromarray(rgba, "RGBA").save(root / c / f"{i}.png")


def test_transparent_images_are_composited_over_the_background(tmp_path):
    _icons(tmp_path / "icons")
    r = invoke("prep", "folder", tmp_path / "icons", "--out", tmp_path / "w", "--size", 20, "--val-fraction", 0, "-q")
    assert r.exit_code == 0, r.output
    with H5Dataset(tmp_path / "w" / "train.h5") as ds:
        x = ds.read(np.arange(ds.n))
    assert (x[:, 0, 0] == 255).all()                   # transparent corner: white
    assert (x[:4, 10, 10] == 0).all()                  # class a: the opaque black square
    assert (np.abs(x[4:, 10, 10].astype(int) - 127) <= 1).all()   # class b: half black over white
    r = invoke("prep", "folder", tmp_path / "icons", "--out", tmp_path / "blue", "--size", 20, "--val-fraction", 0,
               "--background", "0,0,255", "-q")
    assert r.exit_code == 0, r.output
    with H5Dataset(tmp_path / "blue" / "train.h5") as ds:
        assert (ds.read([0])[0, 0, 0] == [0, 0, 255]).all()
    r = CliRunner().invoke(cli, ["prep", "folder", str(tmp_path / "icons"), "--out", str(tmp_path / "x"),
                                 "--background", "nocolour"])
    assert "--background" in one_line_error(r)


def test_prep_warns_when_many_images_are_one_colour(tmp_path):
    root = tmp_path / "blank"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.zeros((12, 12, 4), np.uint8), "RGBA").save(root / c / f"{i}.png")
    r = invoke("prep", "folder", root, "--out", tmp_path / "o", "--size", 12, "-q")
    assert r.exit_code == 0
    warn = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert warn and "train.h5: 8 of its images are one colour only" in warn[0], r.stderr


def test_prep_folder_holds_out_a_stratified_tenth_by_default(tmp_path):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    r = invoke("prep", "folder", root, "--out", tmp_path / "o", "--size", 12, "-q")
    assert r.exit_code == 0, r.output
    with H5Dataset(tmp_path / "o" / "val.h5") as v, H5Dataset(tmp_path / "o" / "train.h5") as t:
        assert (v.n, t.n) == (2, 18) and sorted(v.labels.tolist()) == [0, 1]
    r = invoke("prep", "folder", root, "--out", tmp_path / "all", "--size", 12, "--val-fraction", 0, "-q")
    assert r.exit_code == 0 and not (tmp_path / "all" / "val.h5").exists()


def test_eval_and_info_take_the_prep_folder(tiny):
    r = invoke("eval", tiny / "ck.h5", "--data", tiny / "data")
    assert r.exit_code == 0, r.output
    assert "5 images, centre crop" in r.output and "uninformative: 3 classes" in r.output
    r = invoke("info", tiny / "data")
    assert r.exit_code == 0 and "split train" in r.output and "split val" in r.output


def test_ten_views_go_through_the_network_in_chunks():
    cfg = make_config("alexnet-tiny", 4, 15, init="he", seed=3)
    model = build_model(cfg, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((5, 10, 3, 15, 15))
    seen, forward = [], model.forward

    def spy(inp, **kw):
        seen.append(len(inp))
        return forward(inp, **kw)
    model.forward = spy
    p = np.asarray(view_probs(model, x))
    assert max(seen) == 5                       # default chunk: the batch's image count, not 5 x 10 crops
    seen.clear()
    q = np.asarray(view_probs(model, x, chunk=3))
    assert max(seen) == 3 and sum(seen) == 50
    np.testing.assert_allclose(q, p, rtol=1e-12)
    ref = np.stack([np.asarray(view_probs(model, x[:, v:v + 1])) for v in range(10)]).mean(axis=0)
    np.testing.assert_allclose(p, ref, rtol=1e-12)


def test_bench_defaults_to_trains_model_on_the_cpu_and_says_what_it_times(monkeypatch):
    monkeypatch.setenv("CPNET_DEVICE", "cpu")
    r = invoke("bench", "--steps", 1, "--warmup", 0, "--batch-size", 2, "--no-loader")
    assert r.exit_code == 0, r.output
    head = r.output.splitlines()[0]
    assert head.startswith("Timing alexnet-small (") and "at batch 2" in head and head.endswith(".")
    assert "1 step after 0 warm-up steps, NumPy on the host" in head


def test_colour_share_tells_grey_from_coloured_kernels():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((1, 5, 5))
    assert viz.colour_share(np.repeat(g, 3, axis=0)) < 1e-12          # R = G = B: colour-agnostic
    assert viz.colour_share(np.stack([g[0], -g[0], 0 * g[0]])) > 0.99  # red against green
    assert 0.5 < viz.colour_share(rng.standard_normal((3, 5, 5))) < 0.8


def test_prediction_percentages_sit_beside_the_bars():
    images = np.zeros((2, 16, 16, 3), np.uint8)
    probs = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    im = viz.predictions_panel(images, probs, [0, 1], ["a", "b", "c"], title="t")
    a = np.asarray(im)
    lay = viz.predictions_layout(2, 16, top=3)
    from dataclasses import replace
    lay = replace(lay, header=a.shape[0] - lay.size[1])
    x0, y0, x1, y1 = lay.bar_box(0, 0)
    assert (a[y0 + 1, x1 - 2] == viz.BAR_TRUE).all()             # the 100 % bar reaches the end of its track
    pct = a[y0:y1, x1:x0 + lay.cell_w].reshape(-1, 3)
    assert not (pct == viz.BAR_TRUE).all(axis=1).any()            # and the percentage column stays clear of it
    assert (pct != 255).any(axis=1).sum() > 5                      # where "100%" is written
    legend = a[:lay.header].reshape(-1, 3)
    assert (legend == viz.BAR_TRUE).all(axis=1).sum() > 20 and (legend == viz.BAR).all(axis=1).sum() > 20


# ---- resume and the defaults that fit together ------------------------------------------------------------------

def train(*args):
    r = CliRunner().invoke(cli, ["train", "--model", "alexnet-tiny", "--batch-size", "8"] + [str(a) for a in args])
    return r


def epochs_in(run):
    import json

    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_takes_data_and_epochs_from_the_run(tiny, tmp_path):
    from cpnet.config import TrainConfig
    from cpnet.train import TrainingInterrupted, run

    out = tmp_path / "run"
    cfg = TrainConfig(data=str(tiny / "data"), out=str(out), model="alexnet-tiny", epochs=2, batch_size=8,
                      workers=0, max_iterations=4)
    with pytest.raises(TrainingInterrupted):
        run(cfg)                                        # stopped in epoch 2 (3 batches an epoch)
    r = train("--out", out, "--resume")                 # what the interrupt message says: no --data, no --epochs
    assert r.exit_code == 0, r.output
    assert "resuming at epoch 2, batch 1" in r.stdout and epochs_in(out) == [1, 2]   # 2 epochs, not the default 10
    assert "epoch 2/2 batch" in r.output and "/10 batch" not in r.output             # and the progress line says so
    r = train("--out", out, "--resume")
    assert r.exit_code == 0 and "note: the run in" in r.stdout and "is finished (2 of 2 epochs)" in r.stdout
    assert epochs_in(out) == [1, 2]
    r = train("--out", out, "--resume", "--epochs", 3)
    assert r.exit_code == 0 and "note: extending the run from 2 to 3 epochs" in r.stdout
    assert epochs_in(out) == [1, 2, 3]
    line = one_line_error(train("--out", out, "--resume", "--epochs", 1))
    assert "--epochs 1: the run in" in line and "already trained 3 epochs" in line


def test_without_validation_data_the_default_schedule_falls_back_to_constant(tiny, tmp_path):
    import shutil

    data = tmp_path / "noval"
    data.mkdir()
    shutil.copy(tiny / "data" / "train.h5", data / "train.h5")
    r = train("--data", data, "--out", tmp_path / "run", "--epochs", 1)
    assert r.exit_code == 0, r.output
    notes = [ln for ln in r.stdout.splitlines() if ln.startswith("note: ")]
    assert len(notes) == 1 and "no val.h5" in notes[0] and "stays at 0.01" in notes[0]
    assert checkpoint.load(tmp_path / "run" / "last.h5").train["schedule"] == "constant"
    line = one_line_error(train("--data", data, "--out", tmp_path / "r2", "--schedule", "plateau"))
    assert "--schedule plateau needs validation data" in line and not (tmp_path / "r2").exists()


def test_a_small_preset_on_large_images_says_so(tmp_path):
    r = invoke("prep", "synthetic", "--out", tmp_path / "big", "--n", 8, "--classes", 2, "--size", 100, "-q")
    assert r.exit_code == 0, r.output
    r = train("--data", tmp_path / "big", "--out", tmp_path / "run", "--epochs", 1, "--schedule", "constant")
    assert r.exit_code == 0, r.output
    assert "note: alexnet-tiny is sized for small images" in r.stdout and "100-px images" in r.stdout


def test_precision_is_chosen_shown_and_tf32_is_its_old_spelling(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("CUPY_TF32", raising=False)
    r = train("--data", tiny / "data", "--out", tmp_path / "a", "--epochs", "1")
    assert r.exit_code == 0, r.output
    assert "precision fp32;" in r.stdout and "CUPY_TF32" not in os.environ
    r = train("--data", tiny / "data", "--out", tmp_path / "b", "--epochs", "1", "--precision", "tf32")
    assert r.exit_code == 0, r.output
    assert "precision tf32;" in r.stdout and os.environ.get("CUPY_TF32") == "1"  # what CuPy reads on a GPU
    monkeypatch.delenv("CUPY_TF32")
    r = CliRunner().invoke(cli, ["bench", "--model", "alexnet-tiny", "--batch-size", "2", "--steps", "1",
                                 "--warmup", "0", "--no-loader", "--tf32", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["precision"] == "tf32" and "--tf32 is deprecated" in r.stderr
    monkeypatch.delenv("CUPY_TF32")
    r = train("--data", tiny / "data", "--out", tmp_path / "c", "--epochs", "1", "--precision", "bf16")
    assert r.exit_code == 0, r.output
    assert "precision bf16;" in r.stdout and "CUPY_TF32" not in os.environ
    assert "note: --precision bf16 on the host emulates" in r.stdout
    ck = checkpoint.load(tmp_path / "c" / "last.h5")
    assert ck.train["precision"] == "bf16"
    assert all(v.dtype == np.float32 for v in ck.params.values())  # the master weights
    assert all(v.dtype == np.float32 for v in ck.momentum.values())
    r = CliRunner().invoke(cli, ["bench", "--model", "alexnet-tiny", "--batch-size", "2", "--steps", "1",
                                 "--warmup", "0", "--no-loader", "--precision", "bf16", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["precision"] == "bf16" and np.isfinite(res["step"]["first_loss"])
