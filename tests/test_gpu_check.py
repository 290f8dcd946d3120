"""scripts/gpu_check.sh run dry (GPU_CHECK_DRY=1): the script end to end on the CPU, its cheaper steps."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run_writes_its_files_and_the_table(tmp_path):
    for tool in ("bash", "timeout", "nproc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not on PATH (the script needs it)")
    try:
        import torch  # noqa: F401

        has_torch = True
    except ImportError:
        has_torch = False
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_DRY="1", PYTHON=sys.executable, GPU_CHECK_TORCH_VARIANTS="lrn1",
               GPU_CHECK_SKIP="pytest,loader,allreduce,conv_parts")  # the GPU tests and host-only steps: elsewhere
    env.pop("CPNET_DEVICE", None)
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "all steps passed" in r.stdout
    files = set(os.listdir(out))
    assert files == {"env.txt", "pytest_gpu.log", "bench.log", "bench.json", "bench_more.json", "compare_torch.log",
                     "summary.txt"} | ({"compare_torch.json"} if has_torch else set())
    assert len(files) <= 8  # what the device tool brings back

    b = json.loads((out / "bench.json").read_text())
    assert b["precision"] == "fp32" and b["config"]["batch_size"] == 4 and b["step"]["ms_median"] > 0
    more = json.loads((out / "bench_more.json").read_text())
    runs = sorted((v["precision"], v["config"]["batch_size"], v["fused"]) for v in more["bench"].values())
    assert runs == [("bf16", 4, True), ("bf16", 8, True), ("fp32", 4, False), ("fp32", 4, True), ("fp32", 8, True),
                    ("tf32", 4, True), ("tf32", 8, True)]
    apart = more["bench"]["7_fp32_4_fuse1_lrnpool0"]  # the fused LRN -> pool kernels off (on the CPU: off anyway)
    assert apart["lrn_pool"] is False and apart["step"]["ms_median"] > 0
    gemm = {(row["lib"], row["precision"]): row for row in more["matmul"]["rows"]}
    assert gemm[("numpy", "fp32")]["tflops"] > 0 and "skipped" in gemm[("cupy", "all")]
    epochs = more["train"]["epochs"]  # 2 epochs of 3 batches of 4 from the synthetic file
    assert [e["iteration"] for e in epochs] == [3, 6] and more["train"]["precision"] == "fp32"
    assert all(e["images_per_s"] > 0 and e["data_s"] >= 0 and e["compute_s"] > 0 for e in epochs)
    off = more["train"]["epochs_gpu_augment_off"]  # the same file, float32 batches (CPNET_GPU_AUGMENT=0)
    assert [e["iteration"] for e in off] == [3, 6] and all(e["images_per_s"] > 0 for e in off)
    env_txt = (out / "env.txt").read_text()
    assert "== nvidia-smi before" in env_txt and "== nvidia-smi after" in env_txt

    summary = (out / "summary.txt").read_text()
    for words in ("cpnet step fp32 (alexnet-tiny, batch 4", "cpnet tf32 batch 8", "GEMM 256^3 numpy fp32",
                  "cpnet train fp32 epoch 2 (it 6)", "cpnet train fp32 CPNET_GPU_AUGMENT=0 epoch 2 (it 6)",
                  "cpnet bf16 batch 4 (fused towers)", "cpnet bf16 batch 8",
                  "cpnet fp32 batch 4 (fused towers, CPNET_FUSE_LRN_POOL=0)",
                  "steps skipped", "pytest (GPU_CHECK_SKIP)"):
        assert words in summary, (words, summary)
    if has_torch:
        c = json.loads((out / "compare_torch.json").read_text())
        assert c["device"] == "cpu" and c["check"]["float64"]["ok"] and c["check"]["float32"]["ok"]
        assert set(c["variants"]) == {"fp32", "tf32", "bf16"}
        assert c["variants"]["fp32"]["lrn1"]["check"]["ok"] and c["variants"]["bf16"]["lrn1"]["timing"]
        assert "TF32" in c["variants"]["tf32"]["lrn1"]["skipped"]
        assert set(c["best"]) == {"fp32", "bf16"} and set(c["launches"]) == {"fp32", "bf16"}
        assert "strongest torch fp32" in summary and "launches fp32 cpnet" in summary
