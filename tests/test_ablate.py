"""cpnet ablate: the plan, the target crossing, the verdicts, resuming, and end-to-end runs with a tiny budget."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cpnet import ablate
from cpnet.cli.main import cli
from conftest import invoke

TINY = ("--model", "alexnet-tiny", "--batch-size", 8, "--window", 2, "--target", 0.6, "--init", "he",
        "--scale", 0.02, "--lr", 0.02)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("abl")
    r = invoke("prep", "synthetic", "--out", d, "--n", 32, "--classes", 3, "--size", 17, "--seed", 5, "-q")
    assert r.exit_code == 0, r.output
    return d


def test_plan_seeds_and_shared_runs():
    p = ablate.plan(ablate.ablation_config("d", "o", seeds=2))
    # ReLU, tanh; baseline (shared by lrn, pool, dropout), nolrn, pool2-2, dropout0; 2 seeds each
    assert p["total"] == len(p["runs"]) == 2 * 2 + 4 * 2
    assert p["sweep"]["ReLU"] == {0.01: ["dropout0-wd0-s0", "dropout0-wd0-s1"]}
    assert p["sweep"]["tanh"] == {0.01: ["tanh-dropout0-wd0-s0", "tanh-dropout0-wd0-s1"]}
    assert p["late"] == {"ReLU": [], "tanh": []}
    fx = p["fixed"]
    assert fx["lrn"]["LRN"] == fx["pool"]["3/2 overlapping"] == fx["dropout"]["dropout 0.5"] == \
        ["baseline-s0", "baseline-s1"]
    assert fx["dropout"]["no dropout"] == ["dropout0-s0", "dropout0-s1"]   # weight decay on: not the ReLU run
    assert p["runs"]["pool2-2-s1"] == dict(activation="relu", lrn=True, pool=[2, 2], dropout=0.5, seed=1)
    assert p["runs"]["dropout0-wd0-s0"]["weight_decay"] == 0.0 and p["runs"]["dropout0-wd0-s0"]["epochs"] == 4


def test_plan_sweep():
    cfg = ablate.ablation_config("d", "o", seeds=3, lr_sweep=[0.01, 0.05], sweep_seeds=1, activation_epochs=6,
                                 experiments=["activation"], seed=4)
    p = ablate.plan(cfg)
    assert p["sweep"]["tanh"] == {0.01: ["tanh-dropout0-wd0-e6-s4"], 0.05: ["tanh-dropout0-wd0-lr0.05-e6-s4"]}
    assert p["late"] == {"ReLU": [5, 6], "tanh": [5, 6]}
    assert p["total"] == 4 + 4 and p["fixed"] == {}


def test_ablation_config_is_a_train_config_plus_the_experiments():
    cfg = ablate.ablation_config("d", "o", lr=0.05, target=0.3, experiments=["pool"], seeds=5)
    assert (cfg.train.data, cfg.train.out, cfg.train.lr, cfg.target, cfg.experiments) == ("d", "o", 0.05, 0.3, ["pool"])
    assert (cfg.train.epochs, cfg.train.batch_size) == (4, 64)   # the ablations' defaults
    assert cfg.train.workers is None                              # as `cpnet train`: resolved by train.run
    assert (cfg.train.schedule, cfg.train.validate, cfg.train.sync_every) == ("constant", True, 1)
    rec = ablate.config_record(cfg)
    assert rec["lr"] == 0.05 and rec["window"] == 20 and rec["experiments"] == ["pool"] and rec["seeds"] == 5


def test_divergence_is_caught_by_type(monkeypatch, tmp_path):
    """A diverged run is recorded; any other error (even one whose text looks alike) propagates."""
    from cpnet import train
    from cpnet.errors import CpnetError

    cfg = ablate.ablation_config(str(tmp_path), str(tmp_path / "o"))

    def diverging(tc, **kw):
        raise train.TrainingDiverged("loss became nan at iteration 3 (epoch 1): training stopped")

    monkeypatch.setattr(train, "run", diverging)
    res = ablate.train_one(cfg, "baseline-s0", dict(ablate.DEFAULTS, seed=0))
    assert res["diverged"].startswith("loss became nan") and res["steps"]["top1"] == [] and "train_eval" not in res
    assert ablate.run_values(res, ablate.config_record(cfg))["val_top1"] is None

    def failing(tc, **kw):
        raise CpnetError("loss became a file error")

    monkeypatch.setattr(train, "run", failing)
    with pytest.raises(CpnetError, match="a file error"):
        ablate.train_one(cfg, "nolrn-s0", dict(ablate.DEFAULTS, lrn=False, seed=0))


def test_first_crossing_and_moving_average():
    errs = [0.9, 0.8, 0.3, 0.2, 0.1, 0.6]
    assert ablate.first_crossing(errs, 0.25, 1) == 4
    assert ablate.first_crossing(errs, 0.25, 2) == 4     # mean(0.3, 0.2) = 0.25
    assert ablate.first_crossing(errs, 0.2, 3) == 5      # mean(0.3, 0.2, 0.1) = 0.2
    assert ablate.first_crossing(errs, 0.05, 2) is None
    assert ablate.first_crossing([0.0], 0.25, 2) is None  # never before the window is full
    np.testing.assert_allclose(ablate.moving_average([1, 3, 5, 7], 2), [1, 2, 4, 6])


def _record(top1_steps, val, train_eval, diverged=None):
    """A made-up run record as train_one writes it."""
    return dict(steps={"iteration": list(range(1, len(top1_steps) + 1)), "loss": [0.0] * len(top1_steps),
                       "top1": top1_steps}, epochs=[dict(epoch=1, train_top1=0.5, val_top1=val, val_top5=0.0)],
                train_eval={"top1": train_eval}, seconds=1.0, diverged=diverged)


def test_assess_on_made_up_runs():
    cfg = dict(target=0.25, window=1)
    runs = {"a0": _record([0.9, 0.2, 0.2, 0.2], 0.30, 0.10), "a1": _record([0.9, 0.9, 0.2, 0.2], 0.31, 0.11),
            "a2": _record([0.2, 0.2, 0.2, 0.2], 0.29, 0.09),
            "b0": _record([0.9, 0.9, 0.9, 0.2], 0.36, 0.30), "b1": _record([0.9, 0.9, 0.9, 0.9], 0.35, 0.31),
            "b2": _record([0.9, 0.9, 0.9, 0.2], 0.34, 0.29)}
    a = ablate._variant("LRN", ["a0", "a1", "a2"], runs, cfg)
    b = ablate._variant("no LRN", ["b0", "b1", "b2"], runs, cfg)
    assert a["values"]["iterations"] == [2, 3, 1] and b["values"]["iterations"] == [4, None, 4]
    lrn = ablate.assess("lrn", a, b, classes=10)
    assert lrn["comparison"]["better"] == "a" and "LRN better than no LRN by 5.0 points" in lrn["verdict"]
    assert "the paper's direction" in lrn["verdict"]
    drop = ablate.assess("dropout", a, b, classes=10)      # a: gaps of 0.20, b: 0.06, so the second is better
    assert drop["comparison"]["better"] == "b" and "against the paper" in drop["verdict"].split(";")[0]
    act = ablate.assess("activation", a, b, classes=10)
    # b's never-reached seed counts as its budget (4): 4, 4, 4 vs 2, 3, 1; ratio per seed 2, >=1.33, 4
    assert act["comparison"]["diff"] == pytest.approx(2.0)
    assert act["ratio"]["per_seed"] == pytest.approx([2, 4 / 3, 4]) and act["ratio"]["lower_bound"]
    assert "≥ 2.00x" in act["verdict"] and "count as their budget" in act["verdict"]
    runs["a1"] = _record([0.9, 0.9, 0.2, 0.2], None, None, diverged="loss became nan")
    a = ablate._variant("LRN", ["a0", "a1", "a2"], runs, cfg)
    assert a["summary"]["val_top1"]["n"] == 2 and a["diverged"] == 1
    assert "1 runs diverged" in ablate.assess("lrn", a, b, classes=10)["verdict"]


def test_ablate_end_to_end(data, tmp_path):
    """2 seeds, a 2-point sweep: the table, the JSON with every run, the plot; a second call reuses every run."""
    out = tmp_path / "abl"
    args = ("ablate", "--data", data, "--out", out, *TINY, "--epochs", 2, "--seeds", 2, "--lr-sweep", "0.01,0.03",
            "--sweep-seeds", 1)
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert "run 1 of 14:" in r.output and "run 14 of 14:" in r.output and "ETA" in r.output
    md = (out / "ablation.md").read_text()
    for label in ("ReLU", "tanh", "no LRN", "3/2 overlapping", "2/2", "dropout 0.5", "no dropout"):
        assert f"| {label} |" in md
    assert "iterations to 60% train error" in md and "over 2 seeds (0, 1)" in md
    assert "Learning-rate sweep" in md and md.count("**best**") == 2
    assert " ± " in md and md.count("- **") == 4
    res = json.loads((out / "ablation.json").read_text())
    assert [e["name"] for e in res["experiments"]] == ["activation", "lrn", "pool", "dropout"]
    # 4 sweep runs + the 2 best rates' second seed + baseline, nolrn, pool2-2, dropout0 with 2 seeds each
    assert len(res["runs"]) == 14 and res["seeds"] == [0, 1]
    for name, run in res["runs"].items():
        assert len(run["steps"]["top1"]) == 8                        # 32 images / 8 = 4 batches x 2 epochs
        assert [e["epoch"] for e in run["epochs"]] == [1, 2]
        assert 0 <= run["train_eval"]["top1"] <= 1
        assert (out / "runs" / name / "metrics.jsonl").exists() and (out / "runs" / name / "ablation_run.json").exists()
    act = res["experiments"][0]
    for v in act["variants"]:
        assert v["lr"] == res["best_lr"][v["label"]] and len(v["runs"]) == 2
        assert all(n.endswith(s) for n, s in zip(v["runs"], ("-s0", "-s1")))
    assert set(res["sweep"]["tanh"]) == {"0.01", "0.03"}
    d = res["experiments"][3]["variants"][0]
    assert d["values"]["gap"] == pytest.approx(np.subtract(d["values"]["val_top1"], d["values"]["train_eval_top1"]))
    assert d["summary"]["val_top1"]["n"] == 2
    umask = os.umask(0)
    os.umask(umask)
    for ext in ("md", "json", "png"):                # the mode open() gives, not the temporary file's 0600
        assert (out / f"ablation.{ext}").stat().st_mode & 0o777 == 0o666 & ~umask
    im = Image.open(out / "ablation.png")
    # five charts (ReLU vs tanh, the sweep, LRN, pooling, dropout) in rows of two
    assert im.format == "PNG" and im.mode == "RGB" and im.size == (2 * 460 + 8, 3 * 300 + 2 * 8)
    a = np.asarray(im)
    assert (a != 255).any(axis=2).mean() > 0.05      # lines, text and axes, not a blank page
    # the same command again trains nothing: every run is reused, the results are the same
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert "14 reused" in (out / "ablation.md").read_text()
    again = json.loads((out / "ablation.json").read_text())
    assert again["experiments"] == res["experiments"]
    # other settings replace the runs whose settings changed
    r = invoke("ablate", "--data", data, "--out", out, "--model", "alexnet-tiny", "--epochs", 1, "--batch-size", 16,
               "--experiments", "pool", "--seeds", 1)
    assert r.exit_code == 0, r.output
    assert Image.open(out / "ablation.png").size == (460, 300)
    assert "one seed" in (out / "ablation.md").read_text()


def test_interrupted_ablation_continues(data, tmp_path):
    """A run stopped after 3 iterations (as by Ctrl-C) is resumed by the next call and ends as an uninterrupted
    one: the same curve and the same final error."""
    kw = dict(model="alexnet-tiny", batch_size=8, window=2, target=0.6, scale=0.02, lr=0.02, epochs=2, seeds=1,
              experiments=["lrn"], workers=0)
    from cpnet.train import TrainingInterrupted

    with pytest.raises(TrainingInterrupted):
        ablate.run(ablate.ablation_config(str(data), str(tmp_path / "a"), max_iterations=3, **kw))
    part = json.loads((tmp_path / "a" / "runs" / "baseline-s0" / "steps.json").read_text())
    assert part["steps"]["iteration"] == [1, 2, 3]
    res = ablate.run(ablate.ablation_config(str(data), str(tmp_path / "a"), **kw))
    ref = ablate.run(ablate.ablation_config(str(data), str(tmp_path / "b"), **kw))
    seen = []
    ablate.run(ablate.ablation_config(str(data), str(tmp_path / "a"), **kw),
               on_run_start=lambda name, opts, i, n, p: seen.append((i, n, p["todo"])))
    assert seen == [(0, 2, 0), (1, 2, 0)]      # both finished: nothing to train, so no ETA to wait for
    # a run saved before TrainConfig had a field is still reused while that field holds its default ...
    rec_path = tmp_path / "a" / "runs" / "nolrn-s0" / "ablation_run.json"
    rec = json.loads(rec_path.read_text())
    del rec["settings"]["pad"]
    rec_path.write_text(json.dumps(rec))
    seen.clear()
    ablate.run(ablate.ablation_config(str(data), str(tmp_path / "a"), **kw),
               on_run_start=lambda name, opts, i, n, p: seen.append(p["todo"]))
    assert seen == [0, 0]
    # ... and trained again when it does not
    seen.clear()
    ablate.run(ablate.ablation_config(str(data), str(tmp_path / "a"), pad=1, **kw),
               on_run_start=lambda name, opts, i, n, p: seen.append(p["todo"]))
    assert seen[0] == 16
    for name in ("baseline-s0", "nolrn-s0"):
        got, want = res["runs"][name], ref["runs"][name]
        assert got["steps"]["iteration"] == list(range(1, 9))
        np.testing.assert_allclose(got["steps"]["top1"], want["steps"]["top1"])
        np.testing.assert_allclose(got["steps"]["loss"], want["steps"]["loss"], rtol=1e-6)
        assert [e["val_top1"] for e in got["epochs"]] == [e["val_top1"] for e in want["epochs"]]
        assert got["train_eval"]["top1"] == want["train_eval"]["top1"]


def test_ablate_bad_input(data, tmp_path):
    r = invoke("ablate", "--data", data, "--out", tmp_path, "--experiments", "relu,lrn")
    assert r.exit_code != 0 and "--experiments" in r.output and "activation" in r.output
    r = invoke("ablate", "--data", data, "--out", tmp_path, "--target", 1.5)
    assert r.exit_code != 0 and "--target 1.5" in r.output
    r = invoke("ablate", "--data", data, "--out", tmp_path, "--lr-sweep", "0.01,x")
    assert r.exit_code != 0 and "--lr-sweep" in r.output and "Traceback" not in r.output
    r = invoke("ablate", "--data", data, "--out", tmp_path, "--lr-sweep", "0.01,-1")
    assert r.exit_code != 0 and "--lr-sweep 0.01,-1.0" in r.output
    r = invoke("ablate", "--data", data, "--out", tmp_path, "--seeds", 2, "--sweep-seeds", 3)
    assert r.exit_code != 0 and "--sweep-seeds 3" in r.output
    r = invoke("ablate", "--data", data, "--out", tmp_path, "--seeds", 0)
    assert r.exit_code != 0 and "--seeds" in r.output
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "train.h5").write_bytes((data / "train.h5").read_bytes())
    r = invoke("ablate", "--data", lone, "--out", tmp_path / "o")
    assert r.exit_code != 0 and "no val.h5" in r.output and "Traceback" not in r.output


def test_cli_interrupted_says_how_to_continue(data, tmp_path, monkeypatch):
    from cpnet.train import TrainingInterrupted

    def stop(*a, **kw):
        raise TrainingInterrupted("stopped at epoch 1, batch 2/4 (iteration 2)")

    monkeypatch.setattr(ablate, "train_one", stop)
    r = CliRunner().invoke(cli, ["ablate", "--data", str(data), "--out", str(tmp_path / "o"), "--epochs", "1"])
    assert r.exit_code == 130 and "run the same command again to continue" in r.output
