"""cpnet ablate: the plan, the target crossing, and an end-to-end run with a tiny budget."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cpnet import ablate
from cpnet.cli.main import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("abl")
    r = invoke("prep", "synthetic", "--out", d, "--n", 32, "--classes", 3, "--size", 17, "--seed", 5, "-q")
    assert r.exit_code == 0, r.output
    return d


def test_plan_shares_identical_runs():
    runs, uses = ablate.plan(ablate.ablation_config("d", "o"))
    assert sorted(runs) == ["baseline", "dropout0", "nolrn", "pool2-2", "tanh-dropout0"]
    used = dict(uses)
    assert used["activation"] == [("ReLU", "dropout0"), ("tanh", "tanh-dropout0")]
    assert used["lrn"][0][1] == used["pool"][0][1] == used["dropout"][0][1] == "baseline"
    assert used["dropout"][1][1] == "dropout0"
    assert runs["pool2-2"] == dict(activation="relu", lrn=True, pool=[2, 2], dropout=0.5)


def test_ablation_config_is_a_train_config_plus_the_experiments():
    cfg = ablate.ablation_config("d", "o", lr=0.05, target=0.3, experiments=["pool"])
    assert (cfg.train.data, cfg.train.out, cfg.train.lr, cfg.target, cfg.experiments) == ("d", "o", 0.05, 0.3, ["pool"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.workers) == (4, 64, 0)   # the ablations' defaults
    assert (cfg.train.schedule, cfg.train.validate, cfg.train.sync_every) == ("constant", True, 1)
    rec = ablate.config_record(cfg)
    assert rec["lr"] == 0.05 and rec["window"] == 20 and rec["experiments"] == ["pool"]


def test_divergence_is_caught_by_type(monkeypatch, tmp_path):
    """A diverged run is recorded; any other error (even one whose text looks alike) propagates."""
    from cpnet import train
    from cpnet.errors import CpnetError

    cfg = ablate.ablation_config(str(tmp_path), str(tmp_path / "o"))

    def diverging(tc, **kw):
        raise train.TrainingDiverged("loss became nan at iteration 3 (epoch 1): training stopped")

    monkeypatch.setattr(train, "run", diverging)
    res = ablate._train_one(cfg, "baseline", dict(ablate.DEFAULTS))
    assert res["diverged"].startswith("loss became nan") and res["iterations"] == 0 and "train_eval" not in res

    def failing(tc, **kw):
        raise CpnetError("loss became a file error")

    monkeypatch.setattr(train, "run", failing)
    with pytest.raises(CpnetError, match="a file error"):
        ablate._train_one(cfg, "baseline", dict(ablate.DEFAULTS))


def test_first_crossing_and_moving_average():
    errs = [0.9, 0.8, 0.3, 0.2, 0.1, 0.6]
    assert ablate.first_crossing(errs, 0.25, 1) == 4
    assert ablate.first_crossing(errs, 0.25, 2) == 4     # mean(0.3, 0.2) = 0.25
    assert ablate.first_crossing(errs, 0.2, 3) == 5      # mean(0.3, 0.2, 0.1) = 0.2
    assert ablate.first_crossing(errs, 0.05, 2) is None
    assert ablate.first_crossing([0.0], 0.25, 2) is None  # never before the window is full
    np.testing.assert_allclose(ablate.moving_average([1, 3, 5, 7], 2), [1, 2, 4, 6])


def test_ablate_end_to_end(data, tmp_path):
    out = tmp_path / "abl"
    r = invoke("ablate", "--data", data, "--out", out, "--model", "alexnet-tiny", "--epochs", 2, "--batch-size", 8,
               "--window", 2, "--target", 0.6, "--init", "he", "--scale", 0.02, "--lr", 0.02)
    assert r.exit_code == 0, r.output
    md = (out / "ablation.md").read_text()
    for label in ("ReLU", "tanh", "no LRN", "3/2 overlapping", "2/2", "dropout 0.5", "no dropout"):
        assert f"| {label} |" in md
    assert "iterations to 60% train error" in md
    res = json.loads((out / "ablation.json").read_text())
    assert [e["name"] for e in res["experiments"]] == ["activation", "lrn", "pool", "dropout"]
    assert len(res["runs"]) == 5
    for run in res["runs"].values():
        assert run["iterations"] == 8 and len(run["steps"]["top1"]) == 8     # 32 images / 8 = 4 batches x 2 epochs
        assert [e["epoch"] for e in run["epochs"]] == [1, 2]
        assert 0 <= run["train_eval"]["top1"] <= 1
        assert (out / "runs" / run["name"] / "metrics.jsonl").exists()
    v = res["experiments"][3]["variants"]
    assert v[0]["gap"] == pytest.approx(v[0]["val_top1"] - v[0]["train_eval_top1"])
    im = Image.open(out / "ablation.png")
    assert im.format == "PNG" and im.mode == "RGB" and im.size == (2 * 460 + 8, 2 * 300 + 8)
    a = np.asarray(im)
    assert (a != 255).any(axis=2).mean() > 0.05      # lines, text and axes, not a blank page
    # running again replaces the runs (no "already holds a run" error)
    r = invoke("ablate", "--data", data, "--out", out, "--model", "alexnet-tiny", "--epochs", 1, "--batch-size", 16,
               "--experiments", "pool")
    assert r.exit_code == 0, r.output
    assert Image.open(out / "ablation.png").size == (460, 300)


def test_ablate_bad_input(data, tmp_path):
    r = invoke("ablate", "--data", data, "--out", tmp_path, "--experiments", "relu,lrn")
    assert r.exit_code != 0 and "--experiments" in r.output and "activation" in r.output
    r = invoke("ablate", "--data", data, "--out", tmp_path, "--target", 1.5)
    assert r.exit_code != 0 and "--target 1.5" in r.output
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "train.h5").write_bytes((data / "train.h5").read_bytes())
    r = invoke("ablate", "--data", lone, "--out", tmp_path / "o")
    assert r.exit_code != 0 and "no val.h5" in r.output and "Traceback" not in r.output
