"""`cpnet bench`, the FLOP counts, and (when torch is installed) bench/compare_torch.py's network and weight copy."""

import importlib.util
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from cpnet import backend, bench
from cpnet.cli.main import cli
from cpnet.model import make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args):
    return CliRunner().invoke(cli, ["bench"] + args, catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_json():
    r = _run(["--model", "alexnet-tiny", "--batch-size", "4", "--steps", "2", "--warmup", "1", "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_bench_json_has_every_layer(tiny_json):
    d = tiny_json
    names = [r["name"] for r in d["layers"]]
    for n in ("conv1", "act1", "lrn1", "pool1", "conv2", "lrn2", "pool2", "conv3", "conv4", "conv5", "pool5",
              "fc6", "drop6", "fc7", "drop7", "fc8", "loss", "exchange"):
        assert n in names, n
    assert len(names) == len(set(names))
    for r in d["layers"]:
        assert r["forward_ms"] >= 0 and r["backward_ms"] >= 0
    assert d["layers_total"]["forward_ms"] > 0 and d["update_ms"] >= 0
    s = d["step"]
    assert s["images_per_s"] > 0 and s["ms"] > 0 and np.isfinite(s["first_loss"])
    assert d["config"] == {**d["config"], "model": "alexnet-tiny", "batch_size": 4, "steps": 2, "warmup": 1}


def test_bench_json_memory_loader_flops(tiny_json):
    d = tiny_json
    m = d["memory"]
    assert m["host_peak_rss_bytes"] > 0
    assert isinstance(m["gpu_pool_bytes"], dict)
    if backend.use_gpu():
        assert all(v["total"] >= v["used"] >= 0 for v in m["gpu_pool_bytes"].values())
    ld = d["loader"]
    assert "error" not in ld, ld
    assert ld["images_per_s"] > 0 and ld["synthetic"] and ld["stored_size"] == bench.STORED_SIZE["alexnet-tiny"]
    f = d["flops"]
    assert f["forward_macs_per_image"] == bench.forward_macs(make_config("alexnet-tiny", 10))["total"]
    assert f["gemm_gflops"] > 0 and f["floor_images_per_s"] > 0
    assert d["machine"]["cpu_count"] >= 1 and d["run"]["date"]


def test_bench_table_output():
    r = _run(["--model", "alexnet-tiny", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--no-loader"])
    assert r.exit_code == 0, r.output
    for word in ("conv1", "exchange", "images/s", "host peak RSS", "multiply-adds"):
        assert word in r.output
    assert "loader:" not in r.output


def test_bench_width_times_and_counts_the_wider_net(tiny_json):
    r = _run(["--model", "alexnet-tiny", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--no-loader",
              "--width", "2", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    wide = make_config("alexnet-tiny", 10, width=2.0)
    assert d["config"]["width"] == 2.0 and d["config"]["params"] > 3 * tiny_json["config"]["params"]
    assert d["flops"]["forward_macs_per_image"] == bench.forward_macs(wide)["total"]
    assert tiny_json["config"]["width"] == 1.0
    r = _run(["--model", "alexnet-tiny", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--no-loader",
              "--width", "2"])
    assert r.exit_code == 0 and "Timing alexnet-tiny at --width 2 (" in r.output, r.output
    r = CliRunner().invoke(cli, ["bench", "--model", "alexnet-tiny", "--width", "-1"])
    assert r.exit_code != 0 and "Error: --width -1.0: expected a positive number" in r.output, r.output


def test_bench_loader_data(tmp_path):
    r = CliRunner().invoke(cli, ["prep", "synthetic", "--out", str(tmp_path), "--n", "24", "--size", "17", "--quiet"])
    assert r.exit_code == 0, r.output
    r = _run(["--model", "alexnet-tiny", "--batch-size", "4", "--steps", "2", "--warmup", "0", "--json",
              "--loader-data", str(tmp_path)])
    assert r.exit_code == 0, r.output
    ld = json.loads(r.output)["loader"]
    assert ld["synthetic"] is False and ld["path"].endswith("train.h5") and ld["images_per_s"] > 0
    assert ld["raw"] is False                       # the host model takes float32 crops
    from cpnet.bench import bench_loader            # what a model on a GPU takes: uint8 batches
    raw = bench_loader(str(tmp_path / "train.h5"), 4, 15, batches=2, raw=True)
    assert raw["raw"] is True and raw["images_per_s"] > 0


@pytest.mark.parametrize("args, words", [
    (["--model", "resnet"], ["--model", "alexnet-tiny"]),
    (["--model", "alexnet-tiny", "--batch-size", "0"], ["--batch-size", "0"]),
    (["--model", "alexnet-tiny", "--steps", "0"], ["--steps"]),
    (["--model", "alexnet-tiny", "--warmup", "-1"], ["--warmup"]),
    (["--model", "alexnet-tiny", "--loader-data", "/no/such/dir"], ["--loader-data", "does not exist"]),
    (["--model", "alexnet-tiny", "--crop", "3"], ["--crop 3", "at least"]),
    (["--model", "alexnet-tiny", "--no-loader", "--loader-data", "."], ["contradict"]),
])
def test_bench_bad_flags(args, words):
    r = _run(args)
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    for w in words:
        assert w in r.output, (w, r.output)


def test_forward_macs_alexnet():
    cfg = make_config("alexnet", 1000)
    g = bench.forward_macs(cfg)
    # conv1: 96 maps of 55x55, each output reads 3*11*11 inputs
    assert g["conv1"] == 96 * 55 * 55 * 3 * 11 * 11
    # conv2 reads its own tower's 48 channels, conv3 both towers' 256
    assert g["conv2"] == 256 * 27 * 27 * 48 * 25
    assert g["conv3"] == 384 * 13 * 13 * 256 * 9
    assert g["fc6"] == 4096 * 9216 and g["fc8"] == 1000 * 4096
    assert abs(g["total"] / 1e9 - 0.7244) < 1e-3
    u = bench.forward_macs(cfg, grouped=False)
    assert u["conv2"] == 2 * g["conv2"] and u["conv3"] == g["conv3"] and u["total"] > g["total"]
    assert bench.forward_macs(make_config("alexnet", 1000, crop=224))["total"] == g["total"]
    assert bench.step_flops_per_image(cfg) == 6 * g["total"] - 2 * g["conv1"]  # conv1 has no input gradient


def test_flop_table_every_preset():
    t = bench.flop_table()
    assert set(t) == {"alexnet", "alexnet-small", "alexnet-tiny"}
    for v in t.values():
        assert v["grouped"]["total"] == sum(x for k, x in v["grouped"].items() if k != "total")


@pytest.mark.gpu
def test_bench_on_gpu(monkeypatch):
    monkeypatch.setenv("CPNET_DEVICE", "gpu")
    r = _run(["--model", "alexnet-tiny", "--batch-size", "4", "--steps", "2", "--warmup", "1", "--no-loader", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert all(dev.startswith("gpu:") for dev in d["devices"])
    assert d["memory"]["gpu_pool_bytes"]["gpu:0"]["total"] > 0
    assert d["machine"]["gpus"] and d["step"]["images_per_s"] > 0
    assert all(row["forward_ms"] >= 0 and row["backward_ms"] >= 0 for row in d["layers"])


@pytest.mark.gpu
def test_timer_cuda_events():
    cp = backend.cupy_module()
    a = cp.ones((512, 512), dtype=cp.float32)
    with backend.Timer(backend.Device("gpu", 0)) as t:
        for _ in range(10):
            a = a @ a / 512
    assert t.ms > 0
    assert float(a[0, 0]) == pytest.approx(1.0)


def test_timer_measures_host_work():
    import time

    with backend.Timer(backend.HOST) as t:
        time.sleep(0.01)
    assert t.ms >= 5


# ---- bench/compare_torch.py (only where torch is installed; CI has none) -----------------------------------------
def _compare_module():
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("compare_torch", os.path.join(ROOT, "bench", "compare_torch.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("tdev", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("conventions", ["paper", "caffe"])
def test_compare_torch_one_step_agrees(conventions, tdev):
    ct = _compare_module()
    if tdev == "cuda" and not ct.torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    r = ct.check_one_step("alexnet-tiny", batch_size=3, num_classes=5, tdev=tdev, dtype=np.float64,
                          conventions=conventions)
    assert r["ok"], r
    assert r["max_grad_rel_err"] < 1e-10 and r["loss_rel_err"] < 1e-12
    assert len(r["grad_rel_err"]) == 2 * 7 * 2 + 2  # every parameter of both towers and fc8


def test_compare_torch_weight_copy_roundtrip():
    ct = _compare_module()
    from cpnet.model import build_model

    cfg = make_config("alexnet-small", 10)
    model = build_model(cfg)
    host = model.host_params()
    net = ct.build_torch_net(cfg)
    ct.copy_weights(net, host)
    back = ct.split_by_tower(net, "data")
    assert set(back) == set(host)
    for k in host:
        np.testing.assert_array_equal(back[k], host[k])


def test_bench_on_a_fused_model_times_the_fused_layers(monkeypatch):
    from cpnet import bench

    monkeypatch.setenv("CPNET_FUSE_TOWERS", "1")
    r = bench.bench_model("alexnet-tiny", batch_size=4, steps=2, warmup=1)
    assert r["fused"] is True
    names = [row["name"] for row in r["layers"]]
    assert "exchange" not in names and names[:2] == ["conv1", "act1"] and "fc8" in names and "drop7" in names
    assert all(row["forward_ms"] >= 0 and row["backward_ms"] >= 0 for row in r["layers"])
    monkeypatch.setenv("CPNET_FUSE_TOWERS", "0")
    assert bench.bench_model("alexnet-tiny", batch_size=4, steps=1, warmup=0)["fused"] is False


# ---- the PyTorch variants (bench/compare_torch.py; torch CPU where installed) ------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["eager", "lrn1", "channels_last", "fused_sgd"])
def test_compare_torch_variant_agrees_with_cpnet(variant, precision):
    ct = _compare_module()
    try:
        r = ct.check_one_step("alexnet-tiny", batch_size=3, num_classes=5, tdev="cpu", seed=1, variant=variant,
                              precision=precision, vs_float64=False)
    except ct.Skipped as e:  # only SGD(fused=True) may be missing from a torch build, and then says why
        assert variant == "fused_sgd" and "fused" in str(e)
        pytest.skip(str(e))
    assert r["ok"], r
    assert r["tol"] == ct.TOLERANCE[precision] and r["variant"] == variant
    assert len(r["grad_rel_err"]) == 2 * 7 * 2 + 2
    if precision == "fp32":  # the variants change the layout and the call pattern, not the arithmetic
        assert r["max_grad_rel_err"] < 1e-4 and r["loss_rel_err"] < 1e-5
    else:  # bf16 autocast really ran: its rounding shows, far above fp32's
        assert r["max_grad_rel_err"] > 1e-4


def test_compare_torch_lrn_one_call_equals_per_tower():
    ct = _compare_module()
    torch = ct.torch
    lrn = make_config("alexnet-tiny", 10).lrn
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    a, b = ct.TowerLRN(**lrn)(x), ct.TowerLRN(**lrn, one_call=True)(x)
    assert torch.allclose(a, b, rtol=1e-14, atol=0)
    c = ct.TowerLRN(**lrn, one_call=True)(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(a, c, rtol=1e-14, atol=0)


def test_compare_torch_skips_with_reasons():
    ct = _compare_module()
    import time

    with pytest.raises(ct.Skipped, match="TF32"):
        ct.check_one_step("alexnet-tiny", batch_size=2, num_classes=5, tdev="cpu", precision="tf32")
    with pytest.raises(ct.Skipped, match="more than 0.05 s"):
        with ct.time_limit(0.05, "torch.compile"):
            time.sleep(2)
    with pytest.raises(ct.Skipped, match="more than 0.05 s"):  # also where the code inside swallowed the alarm
        with ct.time_limit(0.05, "torch.compile"):
            try:
                time.sleep(2)
            except ct.Skipped:
                pass


def test_compare_torch_cli_table_and_json(tmp_path, capsys, monkeypatch):
    ct = _compare_module()
    monkeypatch.setenv("CPNET_DEVICE", "cpu")
    out = tmp_path / "ct.json"
    with pytest.raises(SystemExit):  # p10/p90 of 3 steps: only with --allow-few-steps
        ct.main(["--model", "alexnet-tiny", "--batch-size", "2", "--steps", "3"])
    assert "at least 20" in capsys.readouterr().err
    rc = ct.main(["--model", "alexnet-tiny", "--batch-size", "2", "--steps", "3", "--allow-few-steps", "--warmup",
                  "0", "--check-batch", "2", "--variants", "eager,compile,lrn1", "--precisions", "fp32,tf32",
                  "--compile-limit", "3", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    r = json.loads(out.read_text())
    assert set(r["variants"]) == {"fp32", "tf32"} and list(r["variants"]["fp32"]) == ["eager", "compile", "lrn1"]
    assert all(v["skipped"] and "TF32" in v["skipped"] for v in r["variants"]["tf32"].values())
    compiled = r["variants"]["fp32"].pop("compile")  # 3 s: skipped with the reason, unless this machine compiles fast
    assert ("torch.compile" in compiled["skipped"]) if compiled["skipped"] else compiled["check"]["ok"]
    for v in r["variants"]["fp32"].values():
        t = v["timing"]
        assert v["check"]["ok"] and t["torch"]["steps"] == 3
        assert t["torch"]["ms_p10"] <= t["torch"]["ms_median"] <= t["torch"]["ms_p90"]
    best = r["best"]["fp32"]
    assert best["variant"] in ("eager", "lrn1", "compile") and "tf32" not in r["best"]
    if best["variant"] != "compile":
        assert best["torch_ms_median"] == min(v["timing"]["torch"]["ms_median"] for v in r["variants"]["fp32"].values())
    assert f"strongest PyTorch in fp32: {best['variant']}" in text
