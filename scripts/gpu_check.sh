#!/usr/bin/env bash
# One command for a GPU machine: the GPU tests, `cpnet bench` for alexnet in fp32, tf32 and bf16 at batch 128 and
# 256 (peak GPU memory; fp32 also with the towers apart and with CPNET_FUSE_LRN_POOL=0), the GEMM rate in fp32/tf32/bf16 (bench/matmul_rate.py: CuPy, cuBLAS's bf16 GemmEx, torch),
# the PyTorch variants side by side (bench/compare_torch.py, with host time and kernel launches per step), ~100
# iterations of real `cpnet train` from a synthetic 256-px file with the default workers, and nvidia-smi's clocks
# and throttle reasons before and after. Writes logs and JSON to OUTDIR and prints a short table last.
#
#   scripts/gpu_check.sh OUTDIR
#
# Needs python3 with numpy, h5py, click, pillow, pytest and cupy (torch optional); installs nothing from the
# network: cpnet goes in with `pip install --no-deps --no-build-isolation --no-index -e .`, or, where that
# fails, through a temporary sitecustomize.py on PYTHONPATH that maps cpnet.cli and cpnet.data onto the checkout.
# Every step runs (so one costly GPU session gives every answer) under its own time limit, and all of them
# under one budget (GPU_CHECK_BUDGET, 330 s): a step gets what is left of it at most, and one that finds less
# than 5 s left is skipped with a line saying so, so the whole call stays under 6 minutes. In order: pytest -m gpu
# -x (75 s), cpnet bench (45), the precision/batch runs (90), GEMM rates (20), compare_torch (150, torch.compile
# 45 s per use), cpnet train (90: raw batches augmented on the GPU, then 2 epochs of float32 ones), conv parts (20), the upload (15), the loader (20), the allreduce (20; 40 more for 2 replicas,
# run only where two GPUs and mpi4py are there). The loader step (`bench/loader_bench.py`, 0 to 12 workers),
# `bench/conv_parts.py`, `bench/upload_bench.py`, `bench/matmul_rate.py`, `bench/allreduce.py` and the training
# run append to bench.log.
# It writes 8 files in OUTDIR (env.txt with nvidia-smi before and after, pytest_gpu.log, bench.log, bench.json,
# bench_more.json (the other bench runs, the GEMM rates, the training epochs), compare_torch.log/.json,
# summary.txt): the device tool returns at most 8.
#
# Environment:
#   GPU_CHECK_DRY=1      run on the CPU (CPNET_DEVICE=cpu, alexnet-tiny, batch 4, few steps, GEMM n=256, torch
#                        CPU where installed): the whole script end to end on a machine without a GPU, where
#                        `pytest -m gpu` skips everything
#   GPU_CHECK_MODEL, GPU_CHECK_BATCH, GPU_CHECK_STEPS   override the model (alexnet), batch (128), steps (20)
#   GPU_CHECK_SKIP       comma-separated steps to leave out: pytest, bench, precisions, matmul, torch, train,
#                        conv_parts, upload, loader, allreduce (e.g. a quick dry run: pytest,loader,allreduce)
#   GPU_CHECK_TORCH_VARIANTS   compare_torch's --variants [all]; GPU_CHECK_COMPILE_LIMIT its --compile-limit
#   GPU_CHECK_BUDGET     seconds for all steps together (330)
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
  BIG=$((2 * BATCH)); GEMM_N=256; TORCH_STEPS=(--steps 3 --allow-few-steps --warmup 1 --check-batch 2)
  COMPILE_LIMIT=${GPU_CHECK_COMPILE_LIMIT:-20}; TRAIN_SIZE=17; TRAIN_BATCHES=3; TRAIN_EPOCHS=2
else
  export CPNET_DEVICE=${CPNET_DEVICE:-gpu}
  MODEL=${GPU_CHECK_MODEL:-alexnet}; BATCH=${GPU_CHECK_BATCH:-128}; STEPS=${GPU_CHECK_STEPS:-20}
  BIG=256; GEMM_N=2048; TORCH_STEPS=(--steps "$(( STEPS < 20 ? 20 : STEPS ))")
  COMPILE_LIMIT=${GPU_CHECK_COMPILE_LIMIT:-45}; TRAIN_SIZE=256; TRAIN_BATCHES=20; TRAIN_EPOCHS=5
fi
BUDGET=${GPU_CHECK_BUDGET:-330}
SKIP=",${GPU_CHECK_SKIP:-},"
FAILED=()
SKIPPED=()
T0=$(date +%s)
TMPD=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$TMPD"' EXIT

say() { printf '[gpu_check %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
wanted() { case "$SKIP" in *",$1,"*) say "$1: skipped (GPU_CHECK_SKIP)"; SKIPPED+=("$1 (GPU_CHECK_SKIP)"); return 1;; esac; }

# step NAME LIMIT_S LOG CMD...: run CMD under a time limit (its own, or what is left of the budget if less),
# output to LOG (appended to when APPEND=1); on failure show the log's tail.
step() {
  local name=$1 limit=$2 log=$3; shift 3
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ "$left" -lt 5 ]; then
    say "$name: skipped, ${left}s of the ${BUDGET}s budget left"; SKIPPED+=("$name (budget spent)")
    echo "==== $name: skipped, budget spent" >>"$log"; return 0
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  local cmd="$*"; [ ${#cmd} -gt 200 ] && cmd="${cmd:0:200}..."
  say "$name (limit ${limit}s): $cmd"
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

# clocks, temperature, power and the active clock-event (throttle) reasons, before and after the measurements
smi() {
  echo "== nvidia-smi $1 ($(date -u +%FT%TZ))"
  if ! command -v nvidia-smi >/dev/null; then echo "nvidia-smi: not found (no NVIDIA driver here)"; return; fi
  local q=timestamp,name,clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,power.draw,power.limit
  nvidia-smi --query-gpu=$q,clocks_event_reasons.active --format=csv 2>/dev/null ||
    nvidia-smi --query-gpu=$q,clocks_throttle_reasons.active --format=csv
  nvidia-smi -q -d PERFORMANCE 2>&1 | grep -vE '^\s*$|^=+|Timestamp|Driver Version|CUDA Version|Attached GPUs'
}
smi before >>"$OUT/env.txt" 2>&1

# ---- 1. the GPU tests (-x: the first failure stops them, the rest of the check still runs) ------------------
if wanted pytest; then
  step "pytest -m gpu" 75 "$OUT/pytest_gpu.log" "$PY" -m pytest -q -x -m gpu -p no:cacheprovider --durations=15 tests
  rc=$?
  if [ $rc -eq 5 ] && [ "$DRY" = 1 ]; then unset 'FAILED[${#FAILED[@]}-1]'; say "(dry: no GPU tests collected)"; fi
else
  echo "skipped (GPU_CHECK_SKIP)" >"$OUT/pytest_gpu.log"
fi

# ---- 2. cpnet bench ----------------------------------------------------------------------------------------
# the default path (towers sharing the GPU run fused) in fp32 at batch $BATCH; every later step appends to bench.log
if wanted bench; then
  step "cpnet bench" 45 "$OUT/bench.log" \
    bash -c "'$PY' -m cpnet bench --model '$MODEL' --batch-size '$BATCH' --steps '$STEPS' --precision fp32 --json \
             >'$TMPD/bench.json' && mv '$TMPD/bench.json' '$OUT/bench.json'"
fi
APPEND=1

# ---- 2b. precisions and batches: tf32, bf16, batch $BIG (peak GPU memory per precision), the two-tower path, and
# fp32 with layers 1-2's LRN and pool apart (CPNET_FUSE_LRN_POOL=0: the fused LRN -> pool kernels' gain) ----------
if wanted precisions; then
  runs=("1 tf32 $BATCH 1" "2 bf16 $BATCH 1" "3 fp32 $BIG 1" "4 tf32 $BIG 1" "5 bf16 $BIG 1" "6 fp32 $BATCH 0"
        "7 fp32 $BATCH 1 0")
  step "precisions" 90 "$OUT/bench.log" bash -c '
    py=$1 model=$2 steps=$3 dir=$4; shift 4
    for r in "$@"; do
      set -- $r
      lp=${5:-}  # CPNET_FUSE_LRN_POOL: empty = the default (fused on a GPU)
      echo "== cpnet bench --precision $2 --batch-size $3 (CPNET_FUSE_TOWERS=$4${lp:+ CPNET_FUSE_LRN_POOL=$lp})"
      CPNET_FUSE_TOWERS=$4 CPNET_FUSE_LRN_POOL=$lp "$py" -m cpnet bench --model "$model" --batch-size "$3" \
        --steps "$steps" --no-loader --precision "$2" --json >"$dir/bench_$1_$2_$3_fuse$4${lp:+_lrnpool$lp}.json" \
        || exit 1
    done' _ "$PY" "$MODEL" "$STEPS" "$TMPD" "${runs[@]}"
fi

# ---- 2c. the GEMM rate per precision (tensor cores in use?) -----------------------------------------------------
if wanted matmul; then
  step "matmul" 20 "$OUT/bench.log" "$PY" bench/matmul_rate.py --n "$GEMM_N" --repeats 10 --json "$TMPD/matmul.json"
fi

# ---- 3. PyTorch side by side: the variants per precision, host time and kernel launches per step --------------
if wanted torch; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    step "compare_torch" 150 "$OUT/compare_torch.log" "$PY" bench/compare_torch.py --model "$MODEL" \
      --batch-size "$BATCH" "${TORCH_STEPS[@]}" --compile-limit "$COMPILE_LIMIT" --launches \
      --variants "${GPU_CHECK_TORCH_VARIANTS:-eager,lrn1,channels_last,fused_sgd,compile}" --json "$OUT/compare_torch.json"
  else
    say "torch does not import: comparison skipped"; echo "torch not importable: skipped" >"$OUT/compare_torch.log"
  fi
else
  echo "skipped (GPU_CHECK_SKIP)" >"$OUT/compare_torch.log"
fi

# ---- 4. real training: a synthetic ${TRAIN_SIZE}-px file, $TRAIN_EPOCHS epochs of $TRAIN_BATCHES batches, the default
# workers; images/s and data wait vs compute per epoch from metrics.jsonl (the first epoch includes the warm-up).
# The default run feeds raw batches (uint8 crop windows, augmented on the GPU by augment.cu); a second, shorter run
# (2 epochs: the warm-up and one more) with CPNET_GPU_AUGMENT=0 feeds float32 batches from the same file, so the
# table shows the data wait both ways.
if wanted train; then
  TP=$([ "$DRY" = 1 ] && echo fp32 || echo tf32)
  step "train" 90 "$OUT/bench.log" bash -c '
    py=$1 model=$2 batch=$3 n=$4 size=$5 epochs=$6 prec=$7 dir=$8
    "$py" -m cpnet prep synthetic --size "$size" --n "$n" --val-fraction 0.05 --workers "$(nproc)" -q \
      --out "$dir/syn" || exit 1
    for way in run:"$epochs":1 run_f32:2:0; do
      IFS=: read -r name ep aug <<<"$way"
      echo "==== cpnet train, CPNET_GPU_AUGMENT=$aug, $ep epochs"
      CPNET_GPU_AUGMENT=$aug "$py" -m cpnet train --data "$dir/syn" --model "$model" --batch-size "$batch" \
        --epochs "$ep" --precision "$prec" --out "$dir/$name" </dev/null | tr "\r" "\n" | grep -v "^\s*$" | tail -n 12
      rc=${PIPESTATUS[0]}
      cat "$dir/$name/metrics.jsonl"
      [ "$rc" = 0 ] || exit $rc
    done' _ "$PY" "$MODEL" "$BATCH" "$(( BATCH * TRAIN_BATCHES ))" "$TRAIN_SIZE" "$TRAIN_EPOCHS" "$TP" "$TMPD"
  cp "$TMPD/run/metrics.jsonl" "$TMPD/train_metrics.jsonl" 2>/dev/null
  cp "$TMPD/run_f32/metrics.jsonl" "$TMPD/train_metrics_f32.jsonl" 2>/dev/null
  echo "$TP" >"$TMPD/train_precision"
fi

# ---- 5. the loader beside the step (S=256, crop 227, batch 128) with several worker counts ----------------------
if [ "$DRY" = 1 ]; then LW=0,1; LN=256; else LW=0,4,8,12; LN=1024; fi
if [ "${GPU_CHECK_LOADER:-1}" = 1 ] && wanted loader; then
  APPEND=1 step "loader" 20 "$OUT/bench.log" "$PY" bench/loader_bench.py --n "$LN" --epochs 1 --workers "$LW"
fi

# ---- 6. where each convolution's time goes (im2col, GEMMs, layout, col2im), appended to bench.log ------------
if wanted conv_parts; then
  APPEND=1 step "conv parts" 20 "$OUT/bench.log" "$PY" bench/conv_parts.py --model "$MODEL" --batch-size "$BATCH" \
    --repeats "$STEPS"
fi

# ---- 6b. the batch upload: pageable against pinned on a side stream (bench/upload_bench.py), to bench.log -------
if wanted upload; then
  APPEND=1 step "upload" 15 "$OUT/bench.log" "$PY" bench/upload_bench.py --batch-size "$BATCH" \
    --crop "$( [ "$DRY" = 1 ] && echo 17 || echo 227 )" --repeats "$( [ "$DRY" = 1 ] && echo 2 || echo 10 )"
fi

# ---- 7. the gradient reduction (cpnet.dist): NCCL in a world of one; 2 replicas when 2 GPUs and mpi4py are there
if wanted allreduce; then
APPEND=1 step "allreduce" 20 "$OUT/bench.log" "$PY" bench/allreduce.py --model "$MODEL" --batch-size "$BATCH" \
  --steps "$STEPS" --no-step
MPIEXEC=$(dirname "$(command -v "$PY")")/mpiexec; [ -x "$MPIEXEC" ] || MPIEXEC=$(command -v mpiexec || true)
GPUS=$("$PY" -c "from cpnet import backend; print(backend.gpu_count())" 2>/dev/null || echo 0)
if [ -n "$MPIEXEC" ] && "$PY" -c "import mpi4py" >/dev/null 2>&1 && { [ "$GPUS" -ge 2 ] || [ "$DRY" = 1 ]; }; then
  APPEND=1 step "allreduce x2" 40 "$OUT/bench.log" "$MPIEXEC" -n 2 "$PY" bench/allreduce.py --model "$MODEL" \
    --batch-size "$BATCH" --steps "$STEPS" --gpus-per-replica 1 --overlap both
else
  say "allreduce with 2 replicas skipped (needs 2 GPUs, mpi4py and mpiexec; $GPUS GPU(s) here)"
fi
fi

smi after >>"$OUT/env.txt" 2>&1

# ---- bench_more.json: the other bench runs, the GEMM rates, the training epochs ------------------------------
"$PY" - "$TMPD" "$OUT/bench_more.json" <<'PYEOF' || FAILED+=("bench_more.json")
import glob, json, os, sys
d, dest = sys.argv[1:]
def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"error": f"{os.path.basename(path)}: {e}"}
more = {"bench": {os.path.basename(p)[len("bench_"):-len(".json")]: load(p)
                  for p in sorted(glob.glob(os.path.join(d, "bench_*.json")))},
        "matmul": load(os.path.join(d, "matmul.json")) if os.path.exists(os.path.join(d, "matmul.json")) else None,
        "train": None}
mp = os.path.join(d, "train_metrics.jsonl")
if os.path.exists(mp):
    more["train"] = {"precision": open(os.path.join(d, "train_precision")).read().strip(),
                     "epochs": [json.loads(line) for line in open(mp) if line.strip()]}
    mf = os.path.join(d, "train_metrics_f32.jsonl")  # the same with CPNET_GPU_AUGMENT=0 (float32 batches)
    if os.path.exists(mf):
        more["train"]["epochs_gpu_augment_off"] = [json.loads(line) for line in open(mf) if line.strip()]
with open(dest + ".tmp", "w") as f:
    json.dump(more, f, indent=1)
os.replace(dest + ".tmp", dest)
PYEOF

# ---- the table ---------------------------------------------------------------------------------------------
SKIPPED_LIST=$(IFS=';'; echo "${SKIPPED[*]:-}") "$PY" - "$OUT" "$MODEL" "$BATCH" >"$OUT/summary.txt" 2>&1 <<'PYEOF'
import json, os, re, sys
out, model, batch = sys.argv[1], sys.argv[2], sys.argv[3]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
def text(name):
    p = os.path.join(out, name)
    return open(p, errors="replace").read() if os.path.exists(p) else ""
mib = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
rows = []
env = text("env.txt")
for when in ("before", "after"):
    m = re.search(rf"^== nvidia-smi {when}.*\n(.*)\n(.*)", env, re.M)
    if m:
        rows.append((f"nvidia-smi {when}", m.group(2) if m.group(1).startswith("timestamp") else m.group(1)))
m = re.findall(r"^=*\s*(.*(?:passed|failed|skipped|deselected|error).*?)\s*=*$", text("pytest_gpu.log"), re.M)
rows.append(("pytest -m gpu -x", m[-1] if m else text("pytest_gpu.log").strip()[:80] or "no summary line"))
b = load("bench.json")
if b:
    s = b["step"]
    rows.append(("device", ", ".join(b["machine"]["gpus"]) or b["machine"]["cpu"]))
    path = ("fused towers" if b.get("fused") else "two towers") + (", LRN+pool fused" if b.get("lrn_pool") else "")
    rows.append((f"cpnet step fp32 ({model}, batch {batch}, {path})", f"{s['ms_median']:.2f} ms median = {s['images_per_s']:.0f} images/s"))
    top = sorted(b["layers"], key=lambda r: -(r["forward_ms"] + r["backward_ms"]))[:4]
    rows.append(("top layers (fwd+bwd ms)", ", ".join(f"{r['name']} {r['forward_ms'] + r['backward_ms']:.2f}" for r in top)))
    f = b["flops"]
    rows.append(("GEMM / floor", f"{f['gemm_gflops']:.0f} GFLOP/s -> {f['floor_images_per_s']:.0f} images/s"))
    ld = b.get("loader") or {}
    rows.append(("loader", f"{ld['images_per_s']:.0f} images/s ({ld['workers']} workers)" if "images_per_s" in ld else ld.get("error", "not measured")))
    mem = b["memory"]
    gp = "; ".join(f"{k} {mib(v['total'])}" for k, v in mem["gpu_pool_bytes"].items())
    rows.append(("memory", f"host RSS {mib(mem['host_peak_rss_bytes'])}" + (f"; pool {gp}" if gp else "")))
else:
    rows.append(("cpnet bench", "no bench.json"))
more = load("bench_more.json") or {}
for key, r in (more.get("bench") or {}).items():
    if "step" not in r:
        rows.append((f"cpnet {key}", r.get("error", "no result")))
        continue
    pool = sum(v["total"] for v in r["memory"]["gpu_pool_bytes"].values())
    where = ("fused towers" if r.get("fused") else "two towers") + (
        ", CPNET_FUSE_LRN_POOL=0" if key.endswith("_lrnpool0") else "")
    rows.append((f"cpnet {r.get('precision', '?')} batch {r['config']['batch_size']} ({where})",
                 f"{r['step']['ms_median']:.2f} ms median = {r['step']['images_per_s']:.0f} images/s; "
                 + (f"GPU pool {mib(pool)}" if pool else f"host RSS {mib(r['memory']['host_peak_rss_bytes'])}")))
blog = text("bench.log")
for r in ((more.get("matmul") or {}).get("rows") or []):
    v = (f"{r['tflops'] * 1e3:.0f} GFLOP/s" if "tflops" in r else r.get("skipped") or f"FAILED: {r.get('error')}")
    rows.append((f"GEMM {r['n']}^3 {r['lib']} {r['precision']}", v))
lw = re.findall(r"^\s*train S=\S+ C=\S+ B=\S+\s+(\d+)\s+(\d+)", blog, re.M)
if lw:
    rows.append(("loader by workers", ", ".join(f"{w}: {v} images/s" for w, v in lw)))
tr = more.get("train")
if tr and tr["epochs"]:
    for key, how in (("epochs", ""), ("epochs_gpu_augment_off", " CPNET_GPU_AUGMENT=0")):
        for e in tr.get(key) or []:
            tot = e["data_s"] + e["compute_s"]
            rows.append((f"cpnet train {tr['precision']}{how} epoch {e['epoch']} (it {e['iteration']})",
                         f"{e['images_per_s']:.0f} images/s; data wait {e['data_s']:.2f} s "
                         f"({100 * e['data_s'] / max(tot, 1e-9):.0f}%), compute {e['compute_s']:.2f} s"))
else:
    rows.append(("cpnet train", "no metrics"))
cp = re.search(r"^layer +im2col.*?(?=^====|\Z)", blog, re.M | re.S)
if cp:
    rows.append(("conv parts (ms)", "\n" + cp.group(0).rstrip()))
c = load("compare_torch.json")
if c:
    for dt, chk in (c.get("check") or {}).items():
        r64 = chk.get("grad_rel_err_vs_float64") or {}
        vs64 = f"; vs float64: cpnet {r64['cpnet']:.1e}, torch {r64['torch']:.1e}" if r64 else ""
        rows.append((f"torch check eager {dt}", f"{'OK' if chk['ok'] else 'MISMATCH'} (grad rel err {chk['max_grad_rel_err']:.1e}{vs64})"))
    for prec, row in (c.get("variants") or {}).items():
        bad = [v for v, r in row.items() if r.get("check") and not r["check"]["ok"]]
        skipped = [f"{v} ({r['skipped'][:60]})" for v, r in row.items() if r.get("skipped")]
        ran = [v for v, r in row.items() if r.get("timing")]
        rows.append((f"torch {prec} variants", f"timed: {', '.join(ran) or 'none'}"
                     + (f"; MISMATCH: {', '.join(bad)}" if bad else "") + (f"; skipped: {'; '.join(skipped)}" if skipped else "")))
    for prec, bst in (c.get("best") or {}).items():
        rows.append((f"strongest torch {prec}", f"{bst['variant']} {bst['torch_ms_median']:.2f} ms; cpnet {bst['cpnet_precision']} "
                     f"{bst['cpnet_ms_median']:.2f} ms; cpnet / it = {bst['ratio']:.2f}"))
    for prec, r in (c.get("launches") or {}).items():
        for side in ("cpnet", "torch"):
            k = r[side]["kernels"]
            rows.append((f"launches {prec} {side}", f"host {r[side]['host_ms_median']:.2f} ms to issue a step"
                         + (f"; {k} kernels + {r[side]['memops']} memcpy/memset" if k is not None else "; kernels not counted (CPU)")))
else:
    rows.append(("vs torch", "not run"))
sk = os.environ.get("SKIPPED_LIST", "")
if sk:
    rows.append(("steps skipped", sk))
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
