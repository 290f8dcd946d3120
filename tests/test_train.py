"""Training end to end on the synthetic set: CLI runs, checkpoints, exact resume, NaN handling, bad input."""

import json
import os
import signal
from dataclasses import replace

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cpnet import checkpoint, ops
from cpnet.cli.main import cli
from cpnet.errors import CpnetError
from cpnet.train import TrainConfig, TrainingDiverged, TrainingInterrupted, run


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    r = CliRunner().invoke(cli, ["prep", "synthetic", "--out", str(d), "--n", "96", "--classes", "4",
                                 "--size", "17", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert (d / "train.h5").exists() and (d / "val.h5").exists()
    return d


def tiny_cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), model="alexnet-tiny", epochs=2, batch_size=16, lr=0.01, seed=5,
                crop=15, init="he", schedule="constant", scale=1 / 64)
    base.update(kw)
    return TrainConfig(**base)


def test_cli_train_eval_predict_end_to_end(synth, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(cli, ["train", "--data", str(synth), "--model", "alexnet-tiny", "--epochs", "2",
                            "--batch-size", "16", "--lr", "0.01", "--out", str(out), "--init", "he",
                            "--schedule", "constant", "--scale", "0.015625"])
    assert r.exit_code == 0, r.output
    assert "first-iteration loss" in r.output and "ln 4 classes = 1.3863" in r.output
    assert "epoch 2:" in r.output and "val loss" in r.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    for key in ("train_loss", "train_top1", "train_top5", "val_loss", "val_top1", "val_top5", "lr", "images_per_s"):
        assert key in rows[0]
    assert (out / "last.h5").exists() and (out / "best.h5").exists()
    ck = checkpoint.load(out / "last.h5")
    assert ck.state["epoch"] == 2 and ck.momentum is not None and ck.classes == checkpoint.load(out / "best.h5").classes

    r = runner.invoke(cli, ["eval", str(out / "last.h5"), "--data", str(synth / "val.h5"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    with h5py.File(synth / "val.h5") as f:
        n_val = len(f["labels"])
    assert res["n"] == n_val and 0 <= res["top5"] <= res["top1"] <= 1
    r10 = runner.invoke(cli, ["eval", str(out / "last.h5"), "--data", str(synth / "val.h5"), "--ten-crop", "--json"])
    assert r10.exit_code == 0, r10.output
    assert json.loads(r10.output)["n"] == n_val and json.loads(r10.output)["views"] == "ten"

    from PIL import Image

    img = tmp_path / "x.png"
    with h5py.File(synth / "val.h5") as f:
        Image.fromarray(f["images"][0]).resize((40, 30)).save(img)
    r = runner.invoke(cli, ["predict", str(out / "last.h5"), str(img)])
    assert r.exit_code == 0, r.output
    probs = [float(line.split()[-1]) for line in r.output.splitlines() if line.strip()[:1].isdigit()]
    assert len(probs) == 4 and abs(sum(probs) - 1) < 0.01 and probs == sorted(probs, reverse=True)


def _params(path):
    return checkpoint.load(path).params


@pytest.mark.parametrize("how", ["sigint", "sigterm", "max_iterations"])
def test_interrupted_and_resumed_run_equals_uninterrupted(synth, tmp_path, how):
    full = tmp_path / "full"
    run(tiny_cfg(synth, full, epochs=3))
    part = tmp_path / "part"
    from cpnet.data import TrainLoader

    with TrainLoader(str(synth / "train.h5"), 16, 15) as L:
        nb = L.batches_per_epoch
    stop_at = nb + 2  # mid-epoch 2

    def on_step(s):
        if how.startswith("sig") and s["iteration"] == stop_at:
            os.kill(os.getpid(), signal.SIGINT if how == "sigint" else signal.SIGTERM)

    kw = {"max_iterations": stop_at} if how == "max_iterations" else {}
    with pytest.raises(TrainingInterrupted, match="--resume") as e:
        run(tiny_cfg(synth, part, epochs=3, **kw), on_step=on_step)
    assert e.value.signum == (signal.SIGTERM if how == "sigterm" else signal.SIGINT)
    st = checkpoint.load(part / "last.h5").state
    assert st["iteration"] == stop_at and st["epoch"] == 1 and st["pos"] == 2 and st["sums"]["n"] == 32
    run(tiny_cfg(synth, part, epochs=3, resume=True))
    a, b = _params(full / "last.h5"), _params(part / "last.h5")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    la = (full / "metrics.jsonl").read_text().splitlines()
    lb = (part / "metrics.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(x).items() if not k.endswith("_s") and k != "images_per_s"}
                          for x in rows]
    assert strip(la) == strip(lb)


def test_resume_continues_up_to_new_total(synth, tmp_path):
    out = tmp_path / "r"
    run(tiny_cfg(synth, out, epochs=1))
    r = run(tiny_cfg(synth, out, epochs=2, resume=True))
    assert r["epoch"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_nan_loss_stops_and_keeps_last_good_checkpoint(synth, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    run(tiny_cfg(synth, out, epochs=1))
    before = _params(out / "last.h5")
    real = ops.softmax_cross_entropy_forward

    def poisoned(logits, labels):
        loss, cache = real(logits, labels)
        return loss * np.nan, cache

    monkeypatch.setattr(ops, "softmax_cross_entropy_forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at iteration \d+ \(epoch 2\).*last\.h5"):
        run(tiny_cfg(synth, out, epochs=2, resume=True))
    after = _params(out / "last.h5")
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    assert checkpoint.load(out / "last.h5").state["epoch"] == 1


def test_input_scale_defaults_to_unit_variance_for_he_and_one_for_the_paper(synth, tmp_path):
    from cpnet.data import H5Dataset
    from cpnet.train import input_scale

    run(tiny_cfg(synth, tmp_path / "he", epochs=1, scale=None))
    with H5Dataset(str(synth / "train.h5")) as ds:
        x = ds.read(np.arange(ds.n)).astype(np.float64) - ds.mean
    assert abs(checkpoint.load(tmp_path / "he" / "last.h5").scale * x.std() - 1) < 0.05
    assert checkpoint.load(tmp_path / "he" / "last.h5").scale == pytest.approx(input_scale(str(synth / "train.h5")))
    run(tiny_cfg(synth, tmp_path / "paper", epochs=1, scale=None, init="paper"))
    assert checkpoint.load(tmp_path / "paper" / "last.h5").scale == 1.0
    with pytest.raises(CpnetError, match="--scale -1"):
        run(tiny_cfg(synth, tmp_path / "bad", scale=-1.0))


def test_bad_input_errors(synth, tmp_path):
    with pytest.raises(CpnetError, match="--crop 18: larger than the stored image size 17"):
        run(tiny_cfg(synth, tmp_path / "a", crop=18))
    with pytest.raises(CpnetError, match="needs crops of at least"):
        run(tiny_cfg(synth, tmp_path / "a", crop=4))
    with pytest.raises(CpnetError, match="no train.h5"):
        run(tiny_cfg(tmp_path, tmp_path / "a"))
    with pytest.raises(CpnetError, match="nothing to resume"):
        run(tiny_cfg(synth, tmp_path / "b", resume=True))
    out = tmp_path / "c"
    run(tiny_cfg(synth, out, epochs=1))
    with pytest.raises(CpnetError, match="already holds a run"):
        run(tiny_cfg(synth, out, epochs=1))
    r = CliRunner().invoke(cli, ["eval", str(tmp_path / "missing.h5"), "--data", str(synth / "val.h5")])
    assert r.exit_code != 0 and "missing.h5: checkpoint not found" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["predict", str(out / "last.h5"), str(tmp_path / "nope.jpg")])
    assert r.exit_code != 0 and "nope.jpg" in r.output


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves the previous checkpoint intact and no temporary file behind."""
    from cpnet.model import make_config

    cfg = make_config("alexnet-tiny", 3, 15)
    ck = checkpoint.Checkpoint(config=cfg, params={"a": np.ones(3)}, classes=["x", "y", "z"],
                               mean=np.zeros((17, 17, 3), np.float32))
    path = tmp_path / "c.h5"
    checkpoint.save(path, ck)
    bad = checkpoint.Checkpoint(config=cfg, params={"a": object()}, classes=["x", "y", "z"],
                                mean=np.zeros((17, 17, 3), np.float32))
    with pytest.raises(Exception):
        checkpoint.save(path, bad)
    assert checkpoint.load(path).params["a"].tolist() == [1, 1, 1]
    assert os.listdir(tmp_path) == ["c.h5"]
    with pytest.raises(CpnetError, match=r"c.h5: parameters missing: t0.conv1.W"):
        checkpoint.load_model(path)
    path2 = tmp_path / "junk.h5"
    path2.write_bytes(b"not hdf5")
    with pytest.raises(CpnetError, match="junk.h5: not an HDF5 file"):
        checkpoint.load(path2)


@pytest.mark.parametrize("flags,message", [
    (["--schedule", "step", "--step-epochs", "0"], "--step-epochs 0: expected at least 1"),
    (["--patience", "-1"], "--patience -1: expected at least 1"),
    (["--schedule", "cosin"], "--schedule 'cosin': expected one of plateau, step, cosine, constant"),
    (["--dropout", "1.0"], r"--dropout 1.0: expected a probability in \[0, 1\)"),
    (["--dropout", "-0.5"], r"--dropout -0.5: expected a probability"),
    (["--lighting", "-1"], "--lighting -1.0: expected a standard deviation"),
    (["--erase", "1.5"], r"--erase 1.5: expected a probability in \[0, 1\]"),
    (["--erase", "nan"], r"--erase nan: expected a probability"),
    (["--lr", "0"], "--lr 0.0: expected a positive number"),
    (["--lr", "nan", "--schedule", "cosine"], "--lr nan: expected a positive number"),
    (["--seed", "-1"], "--seed -1: expected 0 or more"),
    (["--width", "0"], r"--width 0.0: expected a positive number \(1: the preset's widths\)"),
    (["--width", "inf"], "--width inf: expected a positive number"),
])
def test_bad_flags_are_one_line_errors(synth, tmp_path, flags, message):
    import re

    r = CliRunner().invoke(cli, ["train", "--data", str(synth), "--model", "alexnet-tiny", "--epochs", "1",
                                 "--batch-size", "16", "--out", str(tmp_path / "r")] + flags)
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    assert re.search(message, r.output), r.output
    assert not (tmp_path / "r" / "last.h5").exists()


def test_resume_refuses_changed_settings_and_keeps_its_own(synth, tmp_path):
    out = tmp_path / "r"
    base = ["train", "--data", str(synth), "--model", "alexnet-tiny", "--batch-size", "16", "--crop", "15",
            "--schedule", "constant", "--out", str(out)]
    r = CliRunner().invoke(cli, base + ["--epochs", "1"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, base + ["--epochs", "2", "--resume", "--lr", "5"])
    assert r.exit_code != 0 and "--lr 5.0 differs from the saved run's 0.01" in r.output, r.output
    r = CliRunner().invoke(cli, base + ["--epochs", "2", "--resume"])  # the usual way: the same command again
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["train", "--data", str(synth), "--out", str(out), "--epochs", "3", "--resume",
                                 "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert checkpoint.load(out / "last.h5").state["epoch"] == 3
    # a run that left --crop to its default (15 from 17) resumes with --crop 15 spelled out; --pad is kept
    out2 = tmp_path / "d"
    base2 = ["train", "--data", str(synth), "--model", "alexnet-tiny", "--batch-size", "16", "--schedule",
             "constant", "--out", str(out2)]
    assert CliRunner().invoke(cli, base2 + ["--epochs", "1"]).exit_code == 0
    r = CliRunner().invoke(cli, base2 + ["--epochs", "2", "--resume", "--crop", "15", "--pad", "0"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, base2 + ["--epochs", "3", "--resume", "--pad", "2"])
    assert r.exit_code != 0 and "--pad 2 differs from the saved run's 0" in r.output, r.output


def test_erase_reaches_the_training_and_the_checkpoint_and_resume_keeps_it(synth, tmp_path):
    """--erase: the training batches change (the same seed without it trains on whole crops), the checkpoint
    records it, and a resumed run refuses another value."""
    losses = {}
    for p in (0.0, 1.0):
        out = tmp_path / f"e{p}"
        run(tiny_cfg(synth, out, epochs=1, erase=p, workers=0))
        losses[p] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]
        assert checkpoint.load(out / "last.h5").train["erase"] == p
    assert losses[0.0] != losses[1.0]
    r = CliRunner().invoke(cli, ["train", "--data", str(synth), "--out", str(tmp_path / "e1.0"), "--epochs", "2",
                                 "--resume", "--erase", "0.5"])
    assert r.exit_code != 0 and "--erase 0.5 differs from the saved run's 1.0" in r.output, r.output


def test_width_trains_a_wider_net_that_eval_loads_and_resume_keeps(synth, tmp_path):
    """--width 2: twice the kernels and units in every layer, recorded in the checkpoint's net config and train
    record; eval rebuilds it from the file; a resumed run refuses another width and keeps its own."""
    out = tmp_path / "w"
    base = ["train", "--data", str(synth), "--model", "alexnet-tiny", "--batch-size", "16", "--crop", "15",
            "--schedule", "constant", "--out", str(out)]
    r = CliRunner().invoke(cli, base + ["--epochs", "1", "--width", "2"])
    assert r.exit_code == 0, r.output
    from cpnet.model import build_model, make_config

    wide = build_model(make_config("alexnet-tiny", 4, 15, width=2.0)).num_params()
    assert f"model alexnet-tiny at --width 2 ({wide:,} parameters)" in r.output, r.output
    ck = checkpoint.load(out / "last.h5")
    assert [c[0] for c in ck.config.conv] == [6, 8, 8, 8, 6] and ck.config.fc == [12, 12]
    assert ck.train["width"] == 2.0 and ck.params["t0.conv2.W"].shape == (8, 6, 3, 3)
    r = CliRunner().invoke(cli, ["eval", str(out / "best.h5"), "--data", str(synth / "val.h5"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["n"] > 0 and 0 <= json.loads(r.output)["top1"] <= 1
    r = CliRunner().invoke(cli, base + ["--epochs", "2", "--resume", "--width", "1"])
    assert r.exit_code != 0 and "--width 1.0 differs from the saved run's 2.0" in r.output, r.output
    r = CliRunner().invoke(cli, ["train", "--data", str(synth), "--out", str(out), "--epochs", "2", "--resume"])
    assert r.exit_code == 0, r.output
    ck = checkpoint.load(out / "last.h5")
    assert ck.state["epoch"] == 2 and [c[0] for c in ck.config.conv] == [6, 8, 8, 8, 6]
    from cpnet.cli.show import _run_settings

    assert _run_settings(str(out)).startswith("alexnet-tiny width 2, batch 16")  # the curves' title


def test_cosine_schedule_values_state_and_errors():
    from cpnet.optim import Schedule

    sch = Schedule("cosine", total=4, base=0.02)
    lrs = [0.02] + [sch.update(None, None) for _ in range(4)]  # the rate of epochs 1-4, then after the last
    last = 0.02 * (1 - np.cos(np.pi / 4)) / 2
    assert np.allclose(lrs, [0.02, 0.02 * (1 + np.cos(np.pi / 4)) / 2, 0.01, last, last])
    from cpnet import viz

    for total in (1, 2, 3, 7, 20, 200, 5000):  # a glide is never marked as a division, however long
        sch = Schedule("cosine", total=total, base=1.0)
        rows = [dict(epoch=e + 1, lr=sch.cosine_lr(e)) for e in range(total)]
        assert viz.lr_drops(rows) == [], total
    again = Schedule.from_state(json.loads(json.dumps(Schedule("cosine", total=4, base=0.02).state())))
    again.update(0.02, 0.5)
    assert again.update(0.017, 0.4) == pytest.approx(0.01)  # the validation error plays no part
    old = Schedule("plateau").state()  # a checkpoint from before the cosine schedule has no total / base
    del old["total"], old["base"]
    assert Schedule.from_state(old).kind == "plateau"
    for total, base in ((None, 0.01), (0, 0.01), (5, None), (5, 0.0)):
        with pytest.raises(CpnetError, match="cosine schedule: expected total epochs"):
            Schedule("cosine", total=total, base=base)


def test_cosine_training_follows_the_curve_and_an_extension_stretches_it(synth, tmp_path):
    out = tmp_path / "c"
    run(tiny_cfg(synth, out, epochs=3, schedule="cosine", lr=0.02, workers=0))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.allclose([r["lr"] for r in rows], [0.02, 0.015, 0.005])
    assert checkpoint.load(out / "last.h5").state["lr"] == pytest.approx(0.005)  # the last epoch's, never 0
    r = CliRunner().invoke(cli, ["train", "--data", str(synth), "--out", str(out), "--resume", "--workers", "0"])
    assert r.exit_code == 0 and "is finished (3 of 3 epochs)" in r.output, r.output
    r = CliRunner().invoke(cli, ["train", "--data", str(synth), "--out", str(out), "--resume", "--epochs", "4",
                                 "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "the cosine schedule now spans 4 epochs: epoch 4 runs at lr 0.00293" in r.output, r.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[3]["lr"] == pytest.approx(0.02 * (1 - np.cos(np.pi / 4)) / 2)
    from cpnet import viz

    assert viz.lr_drops(rows) == []  # a glide, not a division: no dashed marks on the curves
    # an unfinished run resumed with fewer epochs: the curve is squeezed to them and still ends low
    short = tmp_path / "s"
    with pytest.raises(TrainingInterrupted):
        run(tiny_cfg(synth, short, epochs=10, schedule="cosine", lr=0.02, workers=0, max_iterations=12))
    r = CliRunner().invoke(cli, ["train", "--data", str(synth), "--out", str(short), "--resume", "--epochs", "3",
                                 "--workers", "0"])
    assert r.exit_code == 0 and "the cosine schedule now spans 3 epochs" in r.output, r.output
    assert json.loads((short / "metrics.jsonl").read_text().splitlines()[-1])["lr"] == pytest.approx(0.005)
    # a run cut short exactly at an epoch's end (10 planned, 3 done) and resumed with --epochs 3: it is finished,
    # and the notices say so, not which rate an epoch that will not run would have
    ck = checkpoint.load(out / "last.h5")
    ck.train["epochs"], ck.state["epoch"] = 10, 3
    checkpoint.save(out / "last.h5", ck)
    r = CliRunner().invoke(cli, ["train", "--data", str(synth), "--out", str(out), "--resume", "--epochs", "3",
                                 "--workers", "0"])
    assert r.exit_code == 0 and "is finished (3 of 3 epochs)" in r.output, r.output
    assert "cosine schedule now spans" not in r.output, r.output


def test_eval_refuses_data_stored_at_another_size(synth, tmp_path):
    out = tmp_path / "r"
    run(tiny_cfg(synth, out, epochs=1))
    other = tmp_path / "other"
    r = CliRunner().invoke(cli, ["prep", "synthetic", "--out", str(other), "--n", "16", "--classes", "4",
                                 "--size", "19", "--seed", "3"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["eval", str(out / "last.h5"), "--data", str(other / "val.h5")])
    assert r.exit_code != 0 and "stored at 19px, the checkpoint was trained on 17px" in r.output, r.output


def test_sync_every_batches_the_loss_read_back_without_changing_the_run(synth, tmp_path, monkeypatch):
    """What a GPU run does (read the loss back every N steps) gives the same parameters and epoch metrics."""
    seen = []
    run(tiny_cfg(synth, tmp_path / "a", epochs=2))
    run(tiny_cfg(synth, tmp_path / "b", epochs=2, sync_every=4), on_step=lambda s: seen.append(s["iteration"]))
    a, b = _params(tmp_path / "a" / "last.h5"), _params(tmp_path / "b" / "last.h5")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ra = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    rb = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1])
    assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-12) and ra["val_top1"] == rb["val_top1"]
    assert 1 in seen and 4 in seen and 2 not in seen and 3 not in seen
    real = ops.softmax_cross_entropy_forward
    calls = []

    def nan_from_third_step(logits, labels):
        calls.append(1)
        loss, cache = real(logits, labels)
        return (loss * np.nan if len(calls) >= 3 else loss), cache

    monkeypatch.setattr(ops, "softmax_cross_entropy_forward", nan_from_third_step)
    # step 0 is read back alone (the first of the epoch); steps 1..3 together at iteration 4
    with pytest.raises(TrainingDiverged, match=r"loss became nan between iterations 1 and 3 \(epoch 1\)"):
        run(tiny_cfg(synth, tmp_path / "c", epochs=1, sync_every=4))


def test_resume_from_a_damaged_checkpoint_names_the_file(synth, tmp_path):
    out = tmp_path / "r"
    run(tiny_cfg(synth, out, epochs=1))
    with h5py.File(out / "last.h5", "a") as f:
        del f["momentum/fc8.b"]
    with pytest.raises(CpnetError, match=r"--resume: .*last\.h5: parameters missing: fc8\.b"):
        run(tiny_cfg(synth, out, epochs=2, resume=True))


def test_predict_rejects_folders_and_a_zero_top(synth, tmp_path):
    out = tmp_path / "r"
    run(tiny_cfg(synth, out, epochs=1))
    r = CliRunner().invoke(cli, ["predict", str(out / "last.h5"), str(tmp_path)])
    assert r.exit_code != 0 and "a folder, not an image file" in r.output
    r = CliRunner().invoke(cli, ["predict", str(out / "last.h5"), "--top", "0", str(tmp_path)])
    assert r.exit_code != 0 and "--top" in r.output


def test_cli_defaults_are_the_configs():
    """`cpnet train` and `cpnet ablate` take their flags' defaults from TrainConfig (and the ablation's own)."""
    from cpnet import ablate
    from cpnet.cli.ablate import command as ablate_command
    from cpnet.cli.train import command as train_command
    from cpnet.config import defaults

    assert issubclass(TrainingDiverged, CpnetError)
    # --precision's default is None: fp32 unless the deprecated --tf32 is given (TrainConfig: fp32)
    train_flags = {p.name: p.default for p in train_command.params if p.name in defaults() and p.name != "precision"}
    assert len(train_flags) >= 20 and train_flags == {k: defaults()[k] for k in train_flags}
    expected = {**defaults(), **ablate.TRAIN_DEFAULTS, **defaults(ablate.AblationConfig)}
    expected["experiments"] = ",".join(expected["experiments"])
    ablate_flags = {p.name: p.default for p in ablate_command.params if p.name in expected and p.name != "out"}
    assert len(ablate_flags) >= 15 and ablate_flags == {k: expected[k] for k in ablate_flags}
    assert ablate_flags["epochs"] == 4 and ablate_flags["workers"] is None and train_flags["workers"] is None


def test_settings_checked_below_train_are_named_by_their_flags(synth, tmp_path):
    """The model and the optimizer name a bad setting ("weight_decay -1"); train.run and the CLI name the flag."""
    with pytest.raises(CpnetError, match=r"^--weight-decay -1.0: expected a number >= 0"):
        run(tiny_cfg(synth, tmp_path / "a", weight_decay=-1.0))
    with pytest.raises(CpnetError, match=r"^--crop 40: larger than the stored image size 17"):
        run(tiny_cfg(synth, tmp_path / "b", crop=40))
    r = CliRunner().invoke(cli, ["train", "--data", str(synth), "--out", str(tmp_path / "c"), "--model",
                                 "alexnet-tiny", "--momentum", "1.5"])
    assert r.exit_code != 0 and "Error: --momentum 1.5: expected a number in [0, 1)" in r.output


def test_default_crop_is_the_papers_proportion_or_the_whole_small_image():
    from cpnet.train import default_crop

    # no larger than alexnet-small's 32-px crop: the whole image (the data's defaults put it on a canvas of 32, see
    # below; callers that build a TrainConfig themselves get this); larger: the paper's 224 of 256 in proportion
    assert [default_crop("alexnet-small", s) for s in (17, 28, 32, 33, 36, 64)] == [17, 28, 32, 29, 32, 56]
    assert [default_crop("alexnet-tiny", s) for s in (15, 17)] == [15, 15]
    assert default_crop("alexnet", 256) == 227


def test_data_defaults_fill_only_the_flags_left_out():
    from cpnet.train import data_defaults

    cfg = TrainConfig(data="d", out="o", epochs=20)
    given = {"data", "out", "epochs"}
    small = data_defaults(cfg, 28, given)        # Fashion-MNIST's 28 px: on a 32-px canvas, shifted 2 px, lr 0.03
    assert (small.crop, small.pad, small.lr, small.dropout, small.patience) == (32, 4, 0.03, 0.0, 2)
    # --pad: the border (32 - s) / 2 rounded up, so the canvas always fits, + s // 14
    assert [data_defaults(cfg, s, given).pad for s in (13, 17, 29, 32)] == [10, 9, 4, 2]
    assert data_defaults(cfg, 32, given).crop == 32                                # 32 of 32: no canvas
    tight = data_defaults(replace(cfg, pad=1), 28, given | {"pad"})  # too small a --pad for the canvas: uncut
    assert (tight.crop, tight.pad, tight.lr) == (28, 1, 0.03)
    wide = data_defaults(replace(cfg, pad=3), 28, given | {"pad"})   # room for it: the canvas, shifted 1 px
    assert (wide.crop, wide.pad) == (32, 3)
    cifar = data_defaults(cfg, 36, given)        # stored with a border (36 for crops of 32): the paper's recipe
    assert (cifar.pad, cifar.lr, cifar.patience) == (0, 0.01, 2)
    assert data_defaults(replace(cfg, epochs=10), 36, {"data", "out"}).patience == 1
    assert data_defaults(replace(cfg, epochs=9), 36, {"data", "out"}).patience == 1
    mine = data_defaults(replace(cfg, lr=0.05, pad=5, patience=3, dropout=0.5), 28,
                         given | {"lr", "pad", "patience", "dropout"})
    assert (mine.crop, mine.pad, mine.lr, mine.patience, mine.dropout) == (32, 5, 0.05, 3, 0.5)
    assert data_defaults(replace(cfg, crop=24), 28, given | {"crop"}) == replace(cfg, crop=24, patience=2)
    assert data_defaults(cfg, 28, None) == cfg   # a TrainConfig built in code is taken as it is
    paper = data_defaults(replace(cfg, model="alexnet"), 28, given)
    assert (paper.crop, paper.pad, paper.lr, paper.dropout) == (None, 0, 0.01, 0.5)
    assert (cifar.crop, cifar.dropout) == (None, 0.5)


def test_whole_small_images_train_with_their_defaults_and_resume_with_them(tmp_path):
    """alexnet-tiny's crop is 15: on 15-px images `cpnet train` picks the whole image, --pad 1, --lr 0.03 and no
    dropout, says so, records them in the checkpoint, and --resume keeps them."""
    data = tmp_path / "d15"
    r = CliRunner().invoke(cli, ["prep", "synthetic", "--out", str(data), "--n", "32", "--classes", "3",
                                 "--size", "15", "--seed", "3", "-q"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--model", "alexnet-tiny", "--batch-size", "16", "--out", str(out)]
    r = CliRunner().invoke(cli, args + ["--epochs", "1"])
    assert r.exit_code == 0, r.output
    assert "crop 15," in r.output
    assert ("note: 15-px images, no larger than alexnet-tiny's 15-px crop: the whole image (--pad 1), shifted by up "
            "to 1 px, at --lr 0.03, dropout 0") in r.output
    ck = checkpoint.load(out / "last.h5")
    assert (ck.config.crop, ck.train["pad"], ck.train["lr"], ck.train["patience"]) == (15, 1, 0.03, 1)
    assert ck.config.dropout == ck.train["dropout"] == 0.0
    r = CliRunner().invoke(cli, ["train", "--out", str(out), "--resume", "--epochs", "2"])
    assert r.exit_code == 0, r.output
    ck = checkpoint.load(out / "last.h5")
    assert ck.state["epoch"] == 2 and (ck.train["pad"], ck.train["lr"]) == (1, 0.03)


def test_smaller_images_train_on_the_presets_crop_as_a_canvas(tmp_path):
    """13-px images for alexnet-tiny's 15-px crop: the default crop is 15, the image on a canvas of the mean
    colour (--pad 1: the border only, so centred), said in the note; cpnet eval then evaluates it so."""
    data = tmp_path / "d13"
    r = CliRunner().invoke(cli, ["prep", "synthetic", "--out", str(data), "--n", "32", "--classes", "3",
                                 "--size", "13", "--seed", "3", "-q"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--data", str(data), "--model", "alexnet-tiny", "--batch-size", "16",
                                 "--out", str(out), "--epochs", "1"])
    assert r.exit_code == 0, r.output
    assert ("note: 13-px images, no larger than alexnet-tiny's 15-px crop: the whole image on a 15-px canvas of the "
            "mean colour (--crop 15 --pad 1), centred, at --lr 0.03, dropout 0") in r.output
    ck = checkpoint.load(out / "last.h5")
    assert (ck.config.crop, ck.pad, ck.stored_size, ck.train["crop"]) == (15, 1, 13, 15)
    r = CliRunner().invoke(cli, ["eval", str(out / "last.h5"), "--data", str(data / "val.h5")])
    assert r.exit_code == 0 and "centre crop: top-1 error" in r.output, r.output


def test_runs_record_their_pad_and_a_bad_pad_names_the_flag(synth, tmp_path):
    run(tiny_cfg(synth, tmp_path / "a", epochs=1, crop=17, pad=2))
    ck = checkpoint.load(tmp_path / "a" / "last.h5")
    assert (ck.config.crop, ck.train["pad"]) == (17, 2)
    with pytest.raises(CpnetError, match=r"--pad 15: expected 0 <= pad < the crop \(15\)"):
        run(tiny_cfg(synth, tmp_path / "b", pad=15))


def test_crops_may_exceed_the_stored_size_by_twice_the_pad(synth, tmp_path):
    """17-px images, crop 19, --pad 1: the whole image on a 19-px canvas of the mean colour, shifted by up to 1 px;
    evaluation (cpnet eval, the show commands' centre crops) centres it on that canvas; a crop beyond 2 x pad
    names both flags."""
    from cpnet.cli.show import _centre_crops
    from cpnet.data import EvalLoader, H5Dataset

    out = tmp_path / "canvas"
    run(tiny_cfg(synth, out, epochs=1, crop=19, pad=1))
    ck = checkpoint.load(out / "last.h5")
    assert (ck.config.crop, ck.pad, ck.stored_size) == (19, 1, 17)
    r = CliRunner().invoke(cli, ["eval", str(out / "last.h5"), "--data", str(synth / "val.h5"), "--json"])
    assert r.exit_code == 0, r.output
    with H5Dataset(str(synth / "val.h5")) as ds:
        assert json.loads(r.stdout)["n"] == ds.n
        images, mean = ds.read(np.arange(4)), ds.mean
    with EvalLoader(str(synth / "val.h5"), 4, 19, scale=ck.scale, pad=1) as E:
        x, _ = next(iter(E))
    np.testing.assert_array_equal(_centre_crops(images, mean, 19, ck.scale), x[:, 0])
    assert np.all(x[:, :, :, 0, :] == 0) and np.any(x[:, :, :, 1, 1] != 0)   # the canvas row, then the image
    with pytest.raises(CpnetError, match=r"^--crop 20: larger than the stored image size 17 \+ 2 x --pad 1"):
        run(tiny_cfg(synth, tmp_path / "b", crop=20, pad=1))


def test_find_lr_sweeps_geometrically_and_suggests_a_tenth_of_the_best(synth, tmp_path):
    from cpnet import lrfind

    assert lrfind.lr_at(0, 5, 1e-4, 1.0) == 1e-4 and abs(lrfind.lr_at(4, 5, 1e-4, 1.0) - 1.0) < 1e-12
    assert abs(lrfind.lr_at(2, 5, 1e-4, 1.0) - 1e-2) < 1e-12
    sm = lrfind.smooth([2.0, 2.0, 2.0], beta=0.9)
    np.testing.assert_allclose(sm, [2.0, 2.0, 2.0])           # bias-corrected: a constant stays itself
    assert lrfind.suggest([1e-3, 1e-2, 1e-1], [2.0, 1.0, 3.0]) == pytest.approx(1e-3)
    assert lrfind.suggest([1e-3], [float("inf")]) is None
    assert (lrfind.default_beta(100), lrfind.default_beta(12), lrfind.default_beta(10 ** 4)) == (0.9, 0.5, 0.98)

    out = tmp_path / "lr"
    r = CliRunner().invoke(cli, ["train", "--data", str(synth), "--model", "alexnet-tiny", "--batch-size", "16",
                                 "--out", str(out), "--find-lr", "--find-lr-steps", "12"])
    assert r.exit_code == 0, r.output
    assert "suggested --lr" in r.output and not (out / "last.h5").exists()
    res = json.loads((out / "lr_find.json").read_text())
    n = len(res["lrs"])
    assert 2 <= n <= 12 and res["lrs"][0] == pytest.approx(1e-5)
    assert all(b > a for a, b in zip(res["lrs"], res["lrs"][1:]))
    assert res["stopped_early"] or res["lrs"][-1] == pytest.approx(1.0)
    np.testing.assert_allclose(res["smoothed"], lrfind.smooth(res["losses"], res["beta"]))
    best = min(range(n), key=lambda i: res["smoothed"][i])
    assert res["suggested"] == pytest.approx(res["lrs"][best] / 10)
    from PIL import Image
    assert Image.open(out / "lr_find.png").size == (640, 380)
