#!/usr/bin/env bash
# One command for a GPU machine: the GPU tests, `cpnet bench` for alexnet at batch 128, and the PyTorch
# comparison when torch imports. Writes logs and JSON to OUTDIR and prints a short table last.
#
#   scripts/gpu_check.sh OUTDIR
#
# Needs python3 with numpy, h5py, click, pillow, pytest and cupy (torch optional); installs nothing from the
# network: cpnet goes in with `pip install --no-deps --no-build-isolation --no-index -e .`, or, where that
# fails, through a temporary sitecustomize.py on PYTHONPATH that maps cpnet.cli and cpnet.data onto the checkout.
# Every step runs (so one costly GPU session gives every answer) under its own time limit; the script then
# exits 1 with a FAILED banner if any step failed. Budget: about 6 minutes on one GPU even if every step runs to
# its limit (120 + 80 + 30 + 30 + 30 + 80 s; 7 minutes with the 60 s two-replica reduction, run only where two
# GPUs and mpi4py are there). The bench step runs the fused default and the two-tower path; the loader step
# (`bench/loader_bench.py`, 0 to 12 workers), `bench/conv_parts.py` and `bench/allreduce.py` (cpnet.dist's
# gradient reduction: NCCL in a world of one, then 2 replicas under mpiexec) append their tables to bench.log.
# It writes 8 files in OUTDIR
# (env.txt, pytest_gpu.log, bench.log, bench.json, bench_split.json, compare_torch.log/.json, summary.txt): the
# device tool returns at most 8.
#
# Environment:
#   GPU_CHECK_DRY=1      run on the CPU (CPNET_DEVICE=cpu, alexnet-tiny, batch 4, 2 steps): the whole script
#                        end to end on a machine without a GPU, where `pytest -m gpu` skips everything
#   GPU_CHECK_MODEL, GPU_CHECK_BATCH, GPU_CHECK_STEPS   override the model (alexnet), batch (128), steps (10)
#   PYTHON               the interpreter (python3)
#   GPU_CHECK_INSTALL=pythonpath   skip pip and use the sitecustomize route (to test it)
#   GPU_CHECK_LOADER=0   skip the loader step (it measures the host only: once per machine is enough)
set -uo pipefail

OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}
if [ "$DRY" = 1 ]; then
  export CPNET_DEVICE=cpu
  MODEL=${GPU_CHECK_MODEL:-alexnet-tiny}; BATCH=${GPU_CHECK_BATCH:-4}; STEPS=${GPU_CHECK_STEPS:-2}
else
  export CPNET_DEVICE=${CPNET_DEVICE:-gpu}
  MODEL=${GPU_CHECK_MODEL:-alexnet}; BATCH=${GPU_CHECK_BATCH:-128}; STEPS=${GPU_CHECK_STEPS:-10}
fi
FAILED=()
T0=$(date +%s)

say() { printf '[gpu_check %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }

# step NAME LIMIT_S LOG CMD...: run CMD under a time limit, output to LOG (appended to when APPEND=1); on
# failure show the log's tail.
step() {
  local name=$1 limit=$2 log=$3; shift 3
  say "$name: $*"
  if [ "${APPEND:-0}" = 1 ]; then echo "==== $name: $*" >>"$log"; else : >"$log"; fi
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    [ $rc -eq 124 ] && echo "(timed out after ${limit}s)" >>"$log"
    FAILED+=("$name (exit $rc, log $(basename "$log"))")
    say "FAILED: $name (exit $rc); last lines of $log:"
    tail -n 25 "$log" | sed 's/^/    /'
  fi
  return $rc
}

# ---- cpnet importable, with cpnet.cli and cpnet.data -------------------------------------------------------
importable() { "$PY" -c "import cpnet.cli.main, cpnet.data, cpnet.bench, threadpoolctl, PIL" >/dev/null 2>&1; }
{
  echo "== install ($(date -u +%FT%TZ))"
  if importable && [ "$("$PY" -c 'import cpnet, os; print(os.path.dirname(os.path.dirname(cpnet.__file__)))')" = "$ROOT" ]; then
    echo "cpnet already importable from $ROOT"
  elif [ "${GPU_CHECK_INSTALL:-pip}" = pip ] && PIP_NO_INDEX=1 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . && importable; then
    echo "installed with pip -e (no network)"
  else
    PYPATH=$(mktemp -d "${TMPDIR:-/tmp}/cpnet-pypath.XXXXXX")
    echo "no pip -e install: using $PYPATH/sitecustomize.py"
    cat >"$PYPATH/sitecustomize.py" <<PYEOF
import sys
sys.path.insert(0, "$ROOT")
import cpnet
cpnet.__path__.append("$ROOT")  # cpnet.cli -> cli/, cpnet.data -> data/ (setup.py's package_dir)
PYEOF
    export PYTHONPATH="$PYPATH${PYTHONPATH:+:$PYTHONPATH}"
    importable && echo "importable through sitecustomize"
  fi
} >"$OUT/env.txt" 2>&1
if ! importable; then
  say "FAILED: cpnet does not import; see $OUT/env.txt"; tail -n 25 "$OUT/env.txt"; exit 1
fi
cpnet() { "$PY" -m cpnet "$@"; }
export -f cpnet 2>/dev/null || true

# ---- the machine -------------------------------------------------------------------------------------------
{
  echo "date: $(date -u +%FT%TZ)"
  # a copied working tree may carry an older .git than its files: the count of changed files shows that
  echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
       "($(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l) files differ from it)"
  echo "CPNET_DEVICE=$CPNET_DEVICE model=$MODEL batch=$BATCH steps=$STEPS dry=$DRY"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  lscpu 2>/dev/null | grep -E '^(Model name|CPU\(s\))'
  "$PY" - <<'PYEOF'
import importlib, platform
print("python", platform.python_version())
for m in ("numpy", "cupy", "torch", "h5py", "click", "pytest", "threadpoolctl", "PIL"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "not importable:", type(e).__name__)
from cpnet import backend
print("cpnet backend:", "cupy" if backend.use_gpu() else "numpy", "gpus:", backend.gpu_count())
if backend.gpu_count():  # one line each for CuPy's cuBLAS, NVRTC and cpnet's own kernels, before the long steps
    import numpy as np
    cp = backend.cupy_module()
    for what, fn in (("cuBLAS matmul", lambda: float((cp.ones((64, 64), cp.float32) @ cp.ones((64, 64), cp.float32)).sum())),
                     ("NVRTC elementwise", lambda: float((cp.arange(10, dtype=cp.float32) * 2).sum())),
                     ("cpnet maxpool kernel", lambda: __import__("cpnet.kernels", fromlist=["x"]).maxpool_forward_gpu(
                         cp.ones((1, 2, 4, 4), cp.float32), 2, 2, 0)[0].shape)):
        try:
            print(f"{what}: ok ({fn()})")
        except Exception as e:
            print(f"{what}: FAILED: {type(e).__name__}: {e}")
    try:
        cp.show_config()
    except Exception as e:
        print("cupy.show_config failed:", e)
PYEOF
} >>"$OUT/env.txt" 2>&1
if [ "$DRY" != 1 ] && ! "$PY" -c "from cpnet import backend; assert backend.use_gpu()" >>"$OUT/env.txt" 2>&1; then
  say "FAILED: no usable GPU for cpnet (see $OUT/env.txt); GPU_CHECK_DRY=1 runs the script on the CPU"
  tail -n 20 "$OUT/env.txt"; exit 1
fi

# ---- 1. the GPU tests --------------------------------------------------------------------------------------
step "pytest -m gpu" 120 "$OUT/pytest_gpu.log" "$PY" -m pytest -q -m gpu -p no:cacheprovider --durations=15 tests
rc=$?
if [ $rc -eq 5 ] && [ "$DRY" = 1 ]; then unset 'FAILED[${#FAILED[@]}-1]'; say "(dry: no GPU tests collected)"; fi

# ---- 2. cpnet bench ----------------------------------------------------------------------------------------
# the default path (towers sharing the GPU run fused), then the two-tower path for comparison
step "cpnet bench" 80 "$OUT/bench.log" \
  bash -c "'$PY' -m cpnet bench --model '$MODEL' --batch-size '$BATCH' --steps '$STEPS' --json >'$OUT/bench.json' &&
           CPNET_FUSE_TOWERS=0 '$PY' -m cpnet bench --model '$MODEL' --batch-size '$BATCH' --steps '$STEPS' \
             --no-loader --json >'$OUT/bench_split.json'"

# ---- 3. the loader beside the step (S=256, crop 227, batch 128) with several worker counts ----------------------
if [ "$DRY" = 1 ]; then LW=0,1; LN=256; else LW=0,4,8,12; LN=1024; fi
if [ "${GPU_CHECK_LOADER:-1}" = 1 ]; then
  APPEND=1 step "loader" 30 "$OUT/bench.log" "$PY" bench/loader_bench.py --n "$LN" --epochs 1 --workers "$LW"
fi

# ---- 4. where each convolution's time goes (im2col, GEMMs, layout, col2im), appended to bench.log ------------
APPEND=1 step "conv parts" 30 "$OUT/bench.log" "$PY" bench/conv_parts.py --model "$MODEL" --batch-size "$BATCH" \
  --repeats "$STEPS"

# ---- 4b. the gradient reduction (cpnet.dist): NCCL in a world of one; 2 replicas when 2 GPUs and mpi4py are there
APPEND=1 step "allreduce" 30 "$OUT/bench.log" "$PY" bench/allreduce.py --model "$MODEL" --batch-size "$BATCH" \
  --steps "$STEPS" --no-step
MPIEXEC=$(dirname "$(command -v "$PY")")/mpiexec; [ -x "$MPIEXEC" ] || MPIEXEC=$(command -v mpiexec || true)
GPUS=$("$PY" -c "from cpnet import backend; print(backend.gpu_count())" 2>/dev/null || echo 0)
if [ -n "$MPIEXEC" ] && "$PY" -c "import mpi4py" >/dev/null 2>&1 && { [ "$GPUS" -ge 2 ] || [ "$DRY" = 1 ]; }; then
  APPEND=1 step "allreduce x2" 60 "$OUT/bench.log" "$MPIEXEC" -n 2 "$PY" bench/allreduce.py --model "$MODEL" \
    --batch-size "$BATCH" --steps "$STEPS" --gpus-per-replica 1
else
  say "allreduce with 2 replicas skipped (needs 2 GPUs, mpi4py and mpiexec; $GPUS GPU(s) here)"
fi

# ---- 5. PyTorch side by side -------------------------------------------------------------------------------
if "$PY" -c "import torch" >/dev/null 2>&1; then
  step "compare_torch" 80 "$OUT/compare_torch.log" "$PY" bench/compare_torch.py --model "$MODEL" \
    --batch-size "$BATCH" --steps "$STEPS" --json "$OUT/compare_torch.json"
else
  say "torch does not import: comparison skipped"; echo "torch not importable: skipped" >"$OUT/compare_torch.log"
fi

# ---- the table ---------------------------------------------------------------------------------------------
"$PY" - "$OUT" "$MODEL" "$BATCH" >"$OUT/summary.txt" 2>&1 <<'PYEOF'
import json, os, re, sys
out, model, batch = sys.argv[1], sys.argv[2], sys.argv[3]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
rows = []
log = open(os.path.join(out, "pytest_gpu.log")).read() if os.path.exists(os.path.join(out, "pytest_gpu.log")) else ""
m = re.findall(r"^=*\s*(.*(?:passed|failed|skipped|deselected|error).*?)\s*=*$", log, re.M)
rows.append(("pytest -m gpu", m[-1] if m else "no summary line"))
b = load("bench.json")
if b:
    s = b["step"]
    rows.append(("device", ", ".join(b["machine"]["gpus"]) or b["machine"]["cpu"]))
    path = "fused towers" if b.get("fused") else "two towers"
    rows.append((f"cpnet step ({model}, batch {batch}, {path})", f"{s['ms_median']:.2f} ms median = {s['images_per_s']:.0f} images/s"))
    bs = load("bench_split.json")
    if bs:
        rows.append(("  with CPNET_FUSE_TOWERS=0", f"{bs['step']['ms_median']:.2f} ms median = {bs['step']['images_per_s']:.0f} images/s"))
    top = sorted(b["layers"], key=lambda r: -(r["forward_ms"] + r["backward_ms"]))[:4]
    rows.append(("top layers (fwd+bwd ms)", ", ".join(f"{r['name']} {r['forward_ms'] + r['backward_ms']:.2f}" for r in top)))
    f = b["flops"]
    rows.append(("GEMM / floor", f"{f['gemm_gflops']:.0f} GFLOP/s -> {f['floor_images_per_s']:.0f} images/s"))
    ld = b.get("loader") or {}
    rows.append(("loader", f"{ld['images_per_s']:.0f} images/s ({ld['workers']} workers)" if "images_per_s" in ld else ld.get("error", "not measured")))
    blog = open(os.path.join(out, "bench.log")).read() if os.path.exists(os.path.join(out, "bench.log")) else ""
    lw = re.findall(r"^\s*train S=\S+ C=\S+ B=\S+\s+(\d+)\s+(\d+)", blog, re.M)
    if lw:
        rows.append(("loader by workers", ", ".join(f"{w}: {v} images/s" for w, v in lw)))
    cp = re.search(r"^layer +im2col.*?(?=^====|\Z)", blog, re.M | re.S)
    if cp:
        rows.append(("conv parts (ms)", "\n" + cp.group(0).rstrip()))
    mem = b["memory"]
    gp = "; ".join(f"{k} {v['total'] / 2**20:.0f} MiB" for k, v in mem["gpu_pool_bytes"].items())
    rows.append(("memory", f"host RSS {mem['host_peak_rss_bytes'] / 2**20:.0f} MiB" + (f"; pool {gp}" if gp else "")))
else:
    rows.append(("cpnet bench", "no bench.json"))
c = load("compare_torch.json")
if c:
    for dt, chk in (c.get("check") or {}).items():
        r64 = chk.get("grad_rel_err_vs_float64") or {}
        vs64 = f"; vs float64: cpnet {r64['cpnet']:.1e}, torch {r64['torch']:.1e}" if r64 else ""
        rows.append((f"torch check {dt}", f"{'OK' if chk['ok'] else 'MISMATCH'} (grad rel err {chk['max_grad_rel_err']:.1e}{vs64})"))
    for mode, r in (c.get("timing") or {}).items():
        rows.append((f"vs torch {mode}", f"cpnet {r['cpnet']['ms_median']:.2f} ms, torch {r['torch']['ms_median']:.2f} ms, ratio {r['ratio']:.2f}"))
else:
    rows.append(("vs torch", "not run"))
w = max(len(k) for k, _ in rows)
for k, v in rows:
    print(f"{k:<{w}}  {v}")
PYEOF
[ $? -ne 0 ] && FAILED+=("summary table (see summary.txt)")

echo
echo "==== gpu_check summary ($(( $(date +%s) - T0 )) s; files in $OUT) ===="
cat "$OUT/summary.txt"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo
  echo "!!!! FAILED: ${#FAILED[@]} step(s):"
  for f in "${FAILED[@]}"; do echo "!!!!   $f"; done
  exit 1
fi
echo "all steps passed"
