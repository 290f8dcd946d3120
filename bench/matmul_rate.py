"""The square GEMM rate (n x n by n x n, default 2048) in fp32, tf32 and bf16, through CuPy and through PyTorch.

Are tensor cores in use? On a GPU the fp32 row (TF32 off) runs on the CUDA cores; the tf32 and bf16 rows should
be several times faster where tensor cores take them. The CuPy bf16 row is cpnet's own bf16 product
(backend.gemm_bf16: cuBLAS's mixed-precision cublasGemmEx, bf16 inputs, float32 accumulation and output, through
CuPy's cuBLAS bindings), as `--precision bf16` runs it; the torch rows are what PyTorch gets on the same card.
On the CPU: NumPy's float32 GEMM and torch CPU's fp32 and bf16 (tf32 and the CuPy rows are skipped with the
reason). Each rate is the best of --repeats after a warm-up. Not a test; prints a table (JSON with --json).

    CPNET_DEVICE=gpu python bench/matmul_rate.py [--n 2048] [--repeats 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

try:
    import cpnet  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpnet import backend  # noqa: E402

def _best_ms(fn, sync, repeats):
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def _row(lib, precision, n, ms):
    return {"lib": lib, "precision": precision, "n": n, "ms": ms, "tflops": 2.0 * n ** 3 / (ms * 1e-3) / 1e12}


def cupy_rates(n, repeats):
    """fp32, tf32 (CuPy's matmul under backend.set_tf32) and bf16 (cpnet's cublasGemmEx call) on the current GPU."""
    from cpnet import precision

    cp = backend.cupy_module()
    dev = cp.cuda.Device()
    sync = dev.synchronize
    rng = np.random.default_rng(0)
    a = cp.asarray(rng.standard_normal((n, n), dtype=np.float32))
    b = cp.asarray(rng.standard_normal((n, n), dtype=np.float32))
    rows = []
    for prec in ("fp32", "tf32"):
        backend.set_tf32(prec == "tf32")
        try:
            rows.append(_row("cupy", prec, n, _best_ms(lambda: cp.matmul(a, b), sync, repeats)))
        finally:
            backend.set_tf32(False)

    a16, b16 = precision.to_bf16(a), precision.to_bf16(b)
    c = cp.empty((n, n), cp.float32)
    r = _row("cupy", "bf16", n, _best_ms(lambda: backend.gemm_bf16(a16, b16, c), sync, repeats))
    af, bf = precision.from_bf16(a16), precision.from_bf16(b16)  # the bf16 inputs in float32
    ref = cp.matmul(af, bf)  # TF32 off: checks the call's layout (transposes, leading dimensions)
    r["max_rel_err_vs_fp32_of_bf16_inputs"] = float(cp.abs(c - ref).max() / cp.abs(ref).max())
    rows.append(r)
    return rows


def torch_rates(n, repeats, tdev):
    import torch

    sync = torch.cuda.synchronize if tdev == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(tdev)
    b = torch.randn(n, n, generator=g).to(tdev)
    rows = []
    for prec in ("fp32", "tf32", "bf16"):
        if prec == "tf32" and tdev != "cuda":
            rows.append({"lib": "torch", "precision": prec, "n": n, "skipped": "TF32 needs an NVIDIA GPU"})
            continue
        torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
        x, y = (a.bfloat16(), b.bfloat16()) if prec == "bf16" else (a, b)
        try:
            rows.append(_row("torch", prec, n, _best_ms(lambda: x @ y, sync, repeats)))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args(argv)
    if a.n < 1 or a.repeats < 1:
        p.error("--n and --repeats must be >= 1")
    gpu = backend.use_gpu()
    rows = []
    if gpu:
        try:
            rows += cupy_rates(a.n, a.repeats)
        except Exception as e:  # noqa: BLE001 - the row says what failed; the other rows still run
            rows.append({"lib": "cupy", "precision": "all", "n": a.n, "error": f"{type(e).__name__}: {e}"})
    else:
        from cpnet.bench import gemm_gflops

        g = gemm_gflops(backend.HOST, n=a.n, repeats=a.repeats)
        rows.append(_row("numpy", "fp32", a.n, g["ms"]))
        rows.append({"lib": "cupy", "precision": "all", "n": a.n, "skipped": "no GPU (CPNET_DEVICE or no CuPy)"})
    try:
        import torch  # noqa: F401

        tdev = "cuda" if gpu else "cpu"
        try:
            rows += torch_rates(a.n, a.repeats, tdev)
        except Exception as e:  # noqa: BLE001
            rows.append({"lib": "torch", "precision": "all", "n": a.n, "error": f"{type(e).__name__}: {e}"})
    except ImportError:
        rows.append({"lib": "torch", "precision": "all", "n": a.n, "skipped": "torch does not import"})
    print(f"GEMM rate, {a.n}^3, best of {a.repeats} ({'GPU: ' + backend.gpu_name(0) if gpu else 'CPU'})")
    for r in rows:
        what = (f"{r['tflops'] * 1e3:10.1f} GFLOP/s ({r['ms']:.3f} ms)" if "tflops" in r
                else f"skipped: {r['skipped']}" if "skipped" in r else f"FAILED: {r['error']}")
        extra = (f"; max rel. err {r['max_rel_err_vs_fp32_of_bf16_inputs']:.1e} against fp32 of the same inputs"
                 if "max_rel_err_vs_fp32_of_bf16_inputs" in r else "")
        print(f"  gemm {r['lib']:<6} {r['precision']:<5} {what}{extra}")
    if a.json_out:
        with open(a.json_out + ".tmp", "w") as f:
            json.dump({"n": a.n, "gpu": gpu, "rows": rows}, f, indent=1)
        os.replace(a.json_out + ".tmp", a.json_out)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
