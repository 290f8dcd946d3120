"""The paper's design claims, tested at small scale: short trainings of one network that differ in one choice.

    activation  ReLU vs tanh: iterations until the training error first reaches a target (§3.1, Figure 1: a
                four-layer net on CIFAR-10 reached 25% training error about 6x sooner with ReLUs). As in the
                paper's figure, no dropout in this pair.
    lrn         with vs without local response normalisation (§3.3: -1.4% top-1 on ImageNet, -2% on CIFAR-10).
    pool        overlapping 3/2 vs non-overlapping 2/2 max pooling (§3.4: -0.4% top-1, slightly harder to overfit).
    dropout     0.5 vs none in fc6/fc7 (§4.2: without it the net overfits substantially).

Every run uses the same seed (same initial weights where the shapes agree, same data order, augmentation and
dropout streams), the same budget (epochs) and the same optimiser settings. Runs that coincide (the baseline of
lrn/pool/dropout; ReLU-without-dropout and the no-dropout variant) are trained once and shared.

The training error for the target is the mean top-1 error of the last `window` training batches (as the
training loop measures it: augmented crops, dropout active). After each run the final weights are also evaluated
on the training images' centre crops without dropout, so that the train/validation gap compares like with like.

Nothing here prints: `run` reports through callbacks and returns the results, which `write_outputs` turns into
ablation.json, ablation.md and ablation.png.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace

from .config import DEFAULT_INIT, TrainConfig
from .errors import CpnetError

EXPERIMENTS = {
    "activation": dict(
        title="ReLU vs tanh", base={"dropout": 0.0},
        variants=[("ReLU", {"activation": "relu"}), ("tanh", {"activation": "tanh"})],
        claim="§3.1/Fig. 1: ReLU reaches 25% training error on CIFAR-10 ~6x sooner than tanh"),
    "lrn": dict(
        title="local response normalisation", base={},
        variants=[("LRN", {"lrn": True}), ("no LRN", {"lrn": False})],
        claim="§3.3: LRN lowers top-1 error by 1.4% (ImageNet), 2% (CIFAR-10, 4-layer net)"),
    "pool": dict(
        title="overlapping pooling", base={},
        variants=[("3/2 overlapping", {"pool": [3, 2]}), ("2/2", {"pool": [2, 2]})],
        claim="§3.4: overlapping 3/2 pooling lowers top-1 error by 0.4% vs 2/2"),
    "dropout": dict(
        title="dropout", base={},
        variants=[("dropout 0.5", {"dropout": 0.5}), ("no dropout", {"dropout": 0.0})],
        claim="§4.2: without dropout the network overfits substantially"),
}

DEFAULTS = {"activation": "relu", "lrn": True, "pool": [3, 2], "dropout": 0.5}
LEVELS = (0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1)  # training errors whose first crossing is recorded


# where the runs of an ablation start from other defaults than `cpnet train` (a short budget, in-process loading)
TRAIN_DEFAULTS = dict(epochs=4, batch_size=64, workers=0)
# and what every run of it uses: one constant learning rate, validation, a training error for every iteration
# (on a GPU too)
TRAIN_FIXED = dict(schedule="constant", validate=True, sync_every=1)


@dataclass
class AblationConfig:
    """The experiments and their target; `train` holds what every run shares (its `out` is the ablation's folder,
    each run trains in out/runs/<name>, and the experiments' variants replace activation, lrn, pool, dropout)."""
    train: TrainConfig
    experiments: list = field(default_factory=lambda: list(EXPERIMENTS))
    target: float = 0.25
    window: int = 20


def ablation_config(data: str, out: str, **options) -> AblationConfig:
    """An AblationConfig from flat options: AblationConfig's own fields, the rest TrainConfig's (TRAIN_DEFAULTS
    where not given)."""
    own = {f.name: options.pop(f.name) for f in fields(AblationConfig) if f.name in options}
    return AblationConfig(TrainConfig(data=data, out=out, **{**TRAIN_DEFAULTS, **options, **TRAIN_FIXED}), **own)


def config_record(cfg: AblationConfig) -> dict:
    """The flat dict ablation.json keeps as "config": the shared training settings and the ablation's own."""
    return dict(asdict(cfg.train), experiments=list(cfg.experiments), target=cfg.target, window=cfg.window)


def plan(cfg: AblationConfig) -> tuple[dict, list]:
    """({run name: overrides}, [(experiment, [(label, run name)])]): the distinct trainings and who uses them."""
    unknown = [e for e in cfg.experiments if e not in EXPERIMENTS]
    if unknown or not cfg.experiments:
        raise CpnetError(f"--experiments {','.join(cfg.experiments)}: expected some of {', '.join(EXPERIMENTS)}")
    runs, uses = {}, []
    for exp in cfg.experiments:
        spec = EXPERIMENTS[exp]
        labels = []
        for label, over in spec["variants"]:
            full = dict(DEFAULTS, **spec["base"], **over)
            name = run_name(full)
            runs[name] = full
            labels.append((label, name))
        uses.append((exp, labels))
    return runs, uses


def run_name(opts: dict) -> str:
    """A folder name for a combination: the choices that differ from the defaults, or 'baseline'."""
    parts = []
    if opts["activation"] != "relu":
        parts.append(opts["activation"])
    if not opts["lrn"]:
        parts.append("nolrn")
    if list(opts["pool"]) != [3, 2]:
        parts.append("pool{}-{}".format(*opts["pool"]))
    if opts["dropout"] != 0.5:
        parts.append(f"dropout{opts['dropout']:g}")
    return "-".join(parts) or "baseline"


def first_crossing(errors, target, window):
    """The iteration (1-based) at which the mean of the last `window` per-batch errors first is <= target, or None.
    No crossing is counted before `window` batches have been seen."""
    for i in range(window - 1, len(errors)):
        if math.fsum(errors[i + 1 - window:i + 1]) / window <= target:
            return i + 1
    return None


def moving_average(values, window):
    """Mean of the last `window` values at each position (fewer at the start)."""
    return [math.fsum(values[max(0, i + 1 - window):i + 1]) / min(i + 1, window) for i in range(len(values))]


def _train_one(cfg: AblationConfig, name: str, opts: dict, on_step=None) -> dict:
    from .data import EvalLoader
    from .evaluate import evaluate
    from .train import TrainingDiverged, dataset_paths
    from .train import run as train_run

    base = cfg.train
    out = os.path.join(base.out, "runs", name)
    if os.path.isdir(out):
        shutil.rmtree(out)   # a fresh run each time: the folder is this tool's own
    tc = replace(base, out=out, activation=opts["activation"], lrn=opts["lrn"], pool=list(opts["pool"]),
                 dropout=opts["dropout"])
    steps = {"iteration": [], "loss": [], "top1": []}
    epochs, holder = [], {}

    def step(s):
        steps["iteration"].append(s["iteration"])
        steps["loss"].append(s["loss"])
        steps["top1"].append(s["top1"])
        if on_step:
            on_step(name, s)

    t0 = time.perf_counter()
    diverged = None
    try:
        train_run(tc, on_step=step, on_epoch=lambda r: epochs.append(r), on_start=lambda i: holder.update(i))
    except TrainingDiverged as e:
        diverged = str(e)
    seconds = time.perf_counter() - t0
    res = dict(name=name, options=opts, folder=out, seconds=seconds, diverged=diverged, steps=steps,
               epochs=[{k: v for k, v in r.items() if k not in ("improved", "best_val")} for r in epochs],
               iterations_to_target=first_crossing(steps["top1"], cfg.target, cfg.window),
               crossings={f"{t:g}": first_crossing(steps["top1"], t, cfg.window) for t in LEVELS},
               iterations=steps["iteration"][-1] if steps["iteration"] else 0)
    if diverged is None and "model" in holder:
        train_path, _ = dataset_paths(base.data)
        model = holder["model"]
        with EvalLoader(train_path, max(base.batch_size, 128), holder["config"].crop, views="center",
                        workers=base.workers, scale=base.scale) as ld:
            res["train_eval"] = evaluate(model, ld)
    return res


def _summary(res: dict) -> dict:
    """The numbers a table row shows for one run."""
    last = res["epochs"][-1] if res["epochs"] else {}
    te = res.get("train_eval") or {}
    gap = (last["val_top1"] - te["top1"]) if ("val_top1" in last and "top1" in te) else None
    return dict(iterations_to_target=res["iterations_to_target"], iterations=res["iterations"],
                crossings=res.get("crossings", {}),
                train_top1=last.get("train_top1"), train_eval_top1=te.get("top1"), val_top1=last.get("val_top1"),
                val_top5=last.get("val_top5"), gap=gap, seconds=res["seconds"], diverged=res["diverged"])


def run(cfg: AblationConfig, on_run_start=None, on_step=None, on_run_end=None) -> dict:
    """Train every distinct combination the chosen experiments need; return a JSON-ready dict of the results.

    on_run_start(name, options, index, total), on_step(name, step_dict), on_run_end(name, result).
    """
    from .train import dataset_paths, input_scale

    tc = cfg.train
    if tc.epochs < 1:
        raise CpnetError(f"--epochs {tc.epochs}: expected at least 1")
    if not 0 < cfg.target < 1:
        raise CpnetError(f"--target {cfg.target}: expected an error rate between 0 and 1")
    if cfg.window < 1:
        raise CpnetError(f"--window {cfg.window}: expected at least 1 batch")
    train_path, val = dataset_paths(tc.data)
    if val is None:
        raise CpnetError(f"--data {tc.data}: no val.h5 beside train.h5 (the ablations compare validation error)")
    if tc.scale is None:  # resolved once, so every run sees the same inputs
        tc = replace(tc, scale=input_scale(train_path) if (tc.init or DEFAULT_INIT) == "he" else 1.0)
        cfg = replace(cfg, train=tc)
    runs, uses = plan(cfg)
    from .data import H5Dataset

    with H5Dataset(train_path) as ds:
        num_classes = ds.num_classes
    t0 = time.perf_counter()
    results = {}
    for i, (name, opts) in enumerate(runs.items()):
        if on_run_start:
            on_run_start(name, opts, i, len(runs))
        results[name] = _train_one(cfg, name, opts, on_step)
        if on_run_end:
            on_run_end(name, results[name])
    experiments = []
    for exp, labels in uses:
        spec = EXPERIMENTS[exp]
        experiments.append(dict(name=exp, title=spec["title"], claim=spec["claim"],
                                variants=[dict(label=label, run=name, **_summary(results[name]))
                                          for label, name in labels]))
    return dict(config=config_record(cfg), classes=num_classes, seconds=time.perf_counter() - t0, experiments=experiments, runs=results)


# ---- outputs ----------------------------------------------------------------------------------------------------

def _pct(v):
    return "–" if v is None else f"{100 * v:.1f}%"


def _verdict(exp: dict, target: float) -> str:
    a, b = exp["variants"]
    if a["diverged"] or b["diverged"]:
        return "a run diverged (see the table)"
    if exp["name"] == "activation":
        ia, ib = a["iterations_to_target"], b["iterations_to_target"]
        t = f"{100 * target:g}%"
        if ia and ib:
            return f"{b['label']} needed {ib / ia:.2f}x the iterations of {a['label']} to reach {t} training error"
        both = [lv for lv in LEVELS if (a["crossings"] or {}).get(f"{lv:g}") and (b["crossings"] or {}).get(f"{lv:g}")]
        if both:
            lv = min(both)
            ca, cb = a["crossings"][f"{lv:g}"], b["crossings"][f"{lv:g}"]
            extra = (f" (at {100 * lv:g}%, the lowest level both reached: {b['label']} needed {cb / ca:.2f}x the "
                     f"iterations of {a['label']})")
        else:
            extra = ""
        if ia:
            return f"{a['label']} reached {t} at iteration {ia}; {b['label']} not within {b['iterations']}" + extra
        if ib:
            return f"{b['label']} reached {t} at iteration {ib}; {a['label']} not within {a['iterations']}" + extra
        return f"neither reached {t} training error within the budget" + extra
    if a["val_top1"] is None or b["val_top1"] is None:
        return "no validation error"
    d = b["val_top1"] - a["val_top1"]
    s = f"val top-1 {_pct(a['val_top1'])} with {a['label']} vs {_pct(b['val_top1'])} with {b['label']} " \
        f"({b['label']}: {'+' if d >= 0 else ''}{100 * d:.1f} points)"
    if exp["name"] == "dropout" and a["gap"] is not None and b["gap"] is not None:
        s += f"; train/val gap {100 * a['gap']:.1f} vs {100 * b['gap']:.1f} points"
    return s


def markdown(results: dict) -> str:
    cfg = results["config"]
    t = f"{100 * cfg['target']:g}%"
    top5 = results.get("classes", 1000) > 5   # with 5 classes or fewer top-5 error is 0 by definition
    lines = [
        f"| experiment | variant | iterations to {t} train error | train top-1 (eval) | val top-1 "
        + ("| val top-5 " if top5 else "") + "| gap val−train | time |",
        "|---|---|---:|---:|---:|" + ("---:|" if top5 else "") + "---:|---:|",
    ]
    for exp in results["experiments"]:
        for v in exp["variants"]:
            it = v["iterations_to_target"]
            it = f"{it}" if it else (f"> {v['iterations']}" if not v["diverged"] else "diverged")
            gap = "–" if v["gap"] is None else f"{100 * v['gap']:+.1f}"
            lines.append(f"| {exp['title']} | {v['label']} | {it} | {_pct(v['train_eval_top1'])} | "
                         f"{_pct(v['val_top1'])} | " + (f"{_pct(v['val_top5'])} | " if top5 else "")
                         + f"{gap} | {v['seconds']:.0f} s |")
    users = {}
    for exp in results["experiments"]:
        for v in exp["variants"]:
            users.setdefault(v["run"], []).append(v["label"])
    shared = [" = ".join(labels) for labels in users.values() if len(labels) > 1]
    if shared:
        lines.append("")
        lines.append("One training each (same numbers): " + "; ".join(shared) + ".")
    lines.append("")
    for exp in results["experiments"]:
        lines.append(f"- **{exp['title']}**: {_verdict(exp, cfg['target'])}. Paper: {exp['claim']}.")
    lines.append("")
    init = cfg["init"] or DEFAULT_INIT
    lines.append(f"Model {cfg['model']}, {cfg['epochs']} epochs per run, batch {cfg['batch_size']}, lr {cfg['lr']:g} "
                 f"(constant), momentum {cfg['momentum']:g}, weight decay {cfg['weight_decay']:g}, "
                 f"init {init}, input scale {cfg['scale']:g}, seed {cfg['seed']}; "
                 f"training error for the target: mean of the last {cfg['window']} batches; "
                 f"'train top-1 (eval)': final weights on the training images' centre crops without dropout. "
                 f"Total {results['seconds'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def figure(results: dict, size=(460, 300)):
    """One chart per experiment: smoothed training error vs iteration for the activation pair (target dashed),
    validation (solid) and training (dashed) top-1 error per epoch for the others."""
    from . import viz

    cfg = results["config"]
    charts = []
    for exp in results["experiments"]:
        series, marks = [], []
        for j, v in enumerate(exp["variants"]):
            r = results["runs"][v["run"]]
            color = viz.PALETTE[j]
            if exp["name"] == "activation":
                y = moving_average(r["steps"]["top1"], cfg["window"])
                series.append(viz.Series(r["steps"]["iteration"], y, v["label"], color, width=2))
                if v["iterations_to_target"]:
                    marks.append(viz.Mark(v["iterations_to_target"], "x", "", color))
            else:
                ep = [e["epoch"] for e in r["epochs"]]
                series.append(viz.Series(ep, [e.get("val_top1") for e in r["epochs"]], f"{v['label']} val",
                                         color, markers=True))
                series.append(viz.Series(ep, [e.get("train_top1") for e in r["epochs"]], f"{v['label']} train",
                                         color, dashed=True, markers=True))
        if exp["name"] == "activation":
            marks.append(viz.Mark(cfg["target"], "y", f"target {100 * cfg['target']:g}%"))
            charts.append(viz.chart(series, size, exp["title"], "iteration",
                                    f"training error (last {cfg['window']} batches)", ylim=(0, 1), marks=marks))
        else:
            charts.append(viz.chart(series, size, exp["title"], "epoch", "top-1 error", ylim=(0, 1), integer_x=True))
    cols = 2 if len(charts) > 1 else 1
    rows = [viz.stack(charts[i:i + cols], "horizontal", gap=8) for i in range(0, len(charts), cols)]
    return viz.stack(rows, "vertical", gap=8)


def write_outputs(results: dict, out: str) -> dict:
    """ablation.json (everything, per-step curves included), ablation.md (the table), ablation.png (the plot)."""
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f"ablation.{k}") for k in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(results))
    figure(results).save(paths["png"], format="PNG")
    return paths
