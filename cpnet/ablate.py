"""The paper's design claims, tested at small scale: trainings of one network that differ in one choice, each
repeated with several seeds so that a difference can be told from noise.

    activation  ReLU vs tanh as in the paper's Figure 1 (§3.1): no regularisation (no dropout, no weight decay),
                each network at its own best learning rate from a small sweep, iterations until the training
                error first reaches a target (CIFAR-10, four-layer net: 25% about 6x sooner with ReLUs).
    lrn         with vs without local response normalisation (§3.3: -1.4% top-1 on ImageNet, -2% on CIFAR-10).
    pool        overlapping 3/2 vs non-overlapping 2/2 max pooling (§3.4: -0.4% top-1, -0.3% top-5).
    dropout     0.5 vs none in fc6/fc7 (§4.2: without it the net overfits substantially): the train/validation
                gap, which needs a budget at which the net without dropout does overfit.

Seeds: every variant is trained with the seeds S, S+1, ..., S+K-1; the seed sets the initial weights, the data
order, the augmentation and the dropout masks, so run k of one variant and run k of the other differ only in the
choice under test. Each cell of the table is a summary over the seeds (mean, standard deviation, min..max), and
an experiment names a direction only when the difference of the means exceeds two standard errors of the
difference (`cpnet.stats`); otherwise it says "no difference at this scale".

The learning-rate sweep (`lr_sweep`) trains each activation at every rate with the first `sweep_seeds` seeds; the
rate whose runs reach the target soonest on average (`stats.best_rate`) is then trained with the remaining seeds.
The other experiments use the shared rate `train.lr`, constant.

The training error for the target is the mean top-1 error of the last `window` training batches (as the training
loop measures it: augmented crops, dropout active). After each run the final weights are also evaluated on the
training images' centre crops without dropout, so that the train/validation gap compares like with like.

Every training is a run folder OUT/runs/<name>: `run` skips the ones that finished (ablation_run.json, for the same
settings), resumes one that was interrupted (last.h5 plus the curve so far in steps.json) and starts the rest, so
an interrupted ablation continues where it stopped. Nothing here prints: `run` reports through callbacks and
returns the results, which `write_outputs` turns into ablation.json, ablation.md and ablation.png.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace

from . import stats
from .config import DEFAULT_INIT, TrainConfig
from .errors import CpnetError

EXPERIMENTS = {
    "activation": dict(
        title="ReLU vs tanh", base={"dropout": 0.0, "weight_decay": 0.0}, metric="iterations",
        variants=[("ReLU", {"activation": "relu"}), ("tanh", {"activation": "tanh"})],
        claim="§3.1/Fig. 1: ReLU reaches 25% training error on CIFAR-10 ~6x sooner than tanh"),
    "lrn": dict(
        title="local response normalisation", base={}, metric="val_top1",
        variants=[("LRN", {"lrn": True}), ("no LRN", {"lrn": False})],
        claim="§3.3: LRN lowers top-1 error by 1.4% (ImageNet), 2% (CIFAR-10, 4-layer net)"),
    "pool": dict(
        title="overlapping pooling", base={}, metric="val_top1",
        variants=[("3/2 overlapping", {"pool": [3, 2]}), ("2/2", {"pool": [2, 2]})],
        claim="§3.4: overlapping 3/2 pooling lowers top-1 error by 0.4% and top-5 by 0.3% vs 2/2, and such "
              "models find it slightly more difficult to overfit"),
    "dropout": dict(
        title="dropout", base={}, metric="gap",
        variants=[("dropout 0.5", {"dropout": 0.5}), ("no dropout", {"dropout": 0.0})],
        claim="§4.2: without dropout the network overfits substantially"),
}
# the variant the paper says is better is always the first ('a')

DEFAULTS = {"activation": "relu", "lrn": True, "pool": [3, 2], "dropout": 0.5}
# training errors at which the activation pair's first crossings are also reported (beside --target)
LEVELS = (0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1)


# where the runs of an ablation start from other defaults than `cpnet train` (a short budget)
TRAIN_DEFAULTS = dict(epochs=4, batch_size=64)
# and what every run of it uses: one constant learning rate, validation, a training error for every iteration
# (on a GPU too)
TRAIN_FIXED = dict(schedule="constant", validate=True, sync_every=1)
# TrainConfig fields that do not change what a run computes: a finished run is reused whatever they are
NOT_SETTINGS = {"out", "workers", "threads", "resume", "max_iterations", "sync_every"}


@dataclass
class AblationConfig:
    """The experiments, their seeds and target; `train` holds what every run shares (its `out` is the ablation's
    folder, each run trains in out/runs/<name>, and the experiments' variants replace activation, lrn, pool,
    dropout, and for the activation pair weight_decay, lr and epochs)."""
    train: TrainConfig
    experiments: list = field(default_factory=lambda: list(EXPERIMENTS))
    target: float = 0.25
    window: int = 20
    seeds: int = 3                     # runs per variant, seeds train.seed .. train.seed + seeds - 1
    lr_sweep: list | None = None       # the activation pair's rates; None: train.lr alone
    sweep_seeds: int | None = None     # seeds each swept rate is tried with; None: all of them
    activation_epochs: int | None = None  # the activation pair's budget; None: train.epochs


def ablation_config(data: str, out: str, **options) -> AblationConfig:
    """An AblationConfig from flat options: AblationConfig's own fields, the rest TrainConfig's (TRAIN_DEFAULTS
    where not given)."""
    own = {f.name: options.pop(f.name) for f in fields(AblationConfig) if f.name in options}
    return AblationConfig(TrainConfig(data=data, out=out, **{**TRAIN_DEFAULTS, **options, **TRAIN_FIXED}), **own)


def config_record(cfg: AblationConfig) -> dict:
    """The flat dict ablation.json keeps as "config": the shared training settings and the ablation's own."""
    own = {f.name: getattr(cfg, f.name) for f in fields(AblationConfig) if f.name != "train"}
    return dict(asdict(cfg.train), **own)


def _check(cfg: AblationConfig):
    tc = cfg.train
    unknown = [e for e in cfg.experiments if e not in EXPERIMENTS]
    if unknown or not cfg.experiments:
        raise CpnetError(f"--experiments {','.join(cfg.experiments)}: expected some of {', '.join(EXPERIMENTS)}")
    if tc.epochs < 1:
        raise CpnetError(f"--epochs {tc.epochs}: expected at least 1")
    if cfg.activation_epochs is not None and cfg.activation_epochs < 1:
        raise CpnetError(f"--activation-epochs {cfg.activation_epochs}: expected at least 1")
    if not 0 < cfg.target < 1:
        raise CpnetError(f"--target {cfg.target}: expected an error rate between 0 and 1")
    if cfg.window < 1:
        raise CpnetError(f"--window {cfg.window}: expected at least 1 batch")
    if cfg.seeds < 1:
        raise CpnetError(f"--seeds {cfg.seeds}: expected at least 1")
    if cfg.sweep_seeds is not None and not 1 <= cfg.sweep_seeds <= cfg.seeds:
        raise CpnetError(f"--sweep-seeds {cfg.sweep_seeds}: expected 1 to --seeds ({cfg.seeds})")
    rates = cfg.lr_sweep or [tc.lr]
    if not all(isinstance(r, (int, float)) and r > 0 and math.isfinite(r) for r in rates) \
            or len(set(rates)) != len(rates):
        raise CpnetError(f"--lr-sweep {','.join(map(str, rates))}: expected distinct positive learning rates")


# ---- the plan: which trainings, in which order ------------------------------------------------------------------

def run_name(opts: dict, base: TrainConfig) -> str:
    """A folder name for one training: the choices that differ from the ablation's shared settings (`base`) and
    the seed, e.g. 'tanh-dropout0-wd0-lr0.05-s1', 'baseline-s0'."""
    parts = []
    if opts["activation"] != "relu":
        parts.append(opts["activation"])
    if not opts["lrn"]:
        parts.append("nolrn")
    if list(opts["pool"]) != [3, 2]:
        parts.append("pool{}-{}".format(*opts["pool"]))
    if opts["dropout"] != 0.5:
        parts.append(f"dropout{opts['dropout']:g}")
    if opts.get("weight_decay", base.weight_decay) != base.weight_decay:
        parts.append(f"wd{opts['weight_decay']:g}")
    if opts.get("lr", base.lr) != base.lr:
        parts.append(f"lr{opts['lr']:g}")
    if opts.get("epochs", base.epochs) != base.epochs:
        parts.append(f"e{opts['epochs']}")
    return "-".join(parts or ["baseline"]) + f"-s{opts['seed']}"


def seeds_of(cfg: AblationConfig) -> list:
    return [cfg.train.seed + i for i in range(cfg.seeds)]


def _options(cfg: AblationConfig, exp: str, over: dict, seed: int, lr=None) -> dict:
    spec = EXPERIMENTS[exp]
    opts = dict(DEFAULTS, **spec["base"], **over, seed=seed)
    if exp == "activation":
        opts.update(lr=lr if lr is not None else cfg.train.lr,
                    epochs=cfg.activation_epochs or cfg.train.epochs)
    return opts


def plan(cfg: AblationConfig) -> dict:
    """The trainings the chosen experiments need, before any has run.

    Returns dict(sweep={label: {lr: [run names]}} (the swept rates with the sweep seeds), late={label: [seeds]}
    (the activation pair's remaining seeds, trained at the rate the sweep picks), fixed={exp: {label: [run
    names]}} (the other experiments), runs={name: options} (every training known now, once each: identical
    combinations are shared), total=the number of trainings including the late ones).
    """
    _check(cfg)
    seeds = seeds_of(cfg)
    rates = cfg.lr_sweep or [cfg.train.lr]
    sweep_seeds = seeds[:cfg.sweep_seeds or cfg.seeds] if len(rates) > 1 else seeds
    runs, sweep, late, fixed = {}, {}, {}, {}
    for exp in cfg.experiments:
        spec = EXPERIMENTS[exp]
        if exp == "activation":
            for label, over in spec["variants"]:
                sweep[label] = {}
                for lr in rates:
                    names = []
                    for s in sweep_seeds:
                        o = _options(cfg, exp, over, s, lr)
                        runs[run_name(o, cfg.train)] = o
                        names.append(run_name(o, cfg.train))
                    sweep[label][lr] = names
                late[label] = [s for s in seeds if s not in sweep_seeds]
        else:
            fixed[exp] = {}
            for label, over in spec["variants"]:
                names = []
                for s in seeds:
                    o = _options(cfg, exp, over, s)
                    runs[run_name(o, cfg.train)] = o
                    names.append(run_name(o, cfg.train))
                fixed[exp][label] = names
    total = len(runs) + sum(len(v) for v in late.values())
    return dict(sweep=sweep, late=late, fixed=fixed, runs=runs, total=total)


# ---- one training -----------------------------------------------------------------------------------------------

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


def _settings(tc: TrainConfig) -> dict:
    """What a training computes from: its config less the fields that only say where or how fast."""
    d = {k: v for k, v in asdict(tc).items() if k not in NOT_SETTINGS}
    d["data"] = os.path.abspath(tc.data)
    return d


def _readable(tmp):
    """The mode a plain open() would have given (the temporary file of atomic_path is private, 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


def _write_json(path, obj):
    """JSON written to a temporary name, flushed, read back and renamed over `path`."""
    from .checkpoint import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        with open(tmp) as f:
            json.load(f)
        _readable(tmp)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class _Restart(Exception):
    """The saved curve of an interrupted run does not reach its checkpoint: train it again from the start."""


def _finished(cfg: AblationConfig, name: str, opts: dict):
    """(the run's TrainConfig, its settings, its record if OUT/runs/<name> holds it finished with them, else None)"""
    tc = replace(cfg.train, out=os.path.join(cfg.train.out, "runs", name),
                 **{k: (list(v) if k == "pool" else v) for k, v in opts.items()})
    settings = _settings(tc)
    done = _read_json(os.path.join(tc.out, "ablation_run.json"))
    return tc, settings, (done if done and _same_settings(done.get("settings"), settings) else None)


def _same_settings(saved, current) -> bool:
    """Whether a run saved with `saved` settings computed what `current` asks for. A field the saved run does not
    have (TrainConfig grew since) matches when it holds its default, which is what the older code did."""
    from .config import defaults

    if not isinstance(saved, dict):
        return False
    d = defaults()
    return all(saved[k] == v if k in saved else (k in d and v == d[k]) for k, v in current.items())


def train_one(cfg: AblationConfig, name: str, opts: dict, on_step=None) -> dict:
    """Train (or finish, or reuse) one run in OUT/runs/<name>; returns its record: options, seconds, diverged,
    the per-step curve (`steps`), the per-epoch metrics and the final weights' error on the training images.

    OUT/runs/<name>/ablation_run.json holds the record of a finished run; steps.json the curve of an unfinished
    one (written after every epoch and on Ctrl-C), beside train's last.h5. A folder whose settings differ from
    `opts` (or that holds anything else) is replaced: it is this tool's own.
    """
    from .train import TrainingDiverged, TrainingInterrupted
    from .train import run as train_run

    tc, settings, done = _finished(cfg, name, opts)
    out = tc.out
    if done:
        return done
    partial = _read_json(os.path.join(out, "steps.json"))
    resume = bool(partial and _same_settings(partial.get("settings"), settings)
                  and os.path.exists(os.path.join(out, "last.h5")))
    if not resume and os.path.isdir(out):
        shutil.rmtree(out)
    try:
        return _train(cfg, tc, name, opts, settings, partial if resume else None, on_step,
                      train_run, TrainingDiverged, TrainingInterrupted)
    except _Restart:
        shutil.rmtree(out)
        return _train(cfg, tc, name, opts, settings, None, on_step, train_run, TrainingDiverged, TrainingInterrupted)


def _train(cfg, tc, name, opts, settings, partial, on_step, train_run, TrainingDiverged, TrainingInterrupted):
    from .data import EvalLoader
    from .evaluate import evaluate
    from .train import dataset_paths

    rec = dict(name=name, options=opts, folder=tc.out, settings=settings, seconds=0.0, diverged=None,
               steps={"iteration": [], "loss": [], "top1": []}, epochs=[])
    holder = {}
    if partial:
        rec.update(steps=partial["steps"], epochs=partial["epochs"], seconds=partial["seconds"])
    t0 = time.perf_counter()

    def save_partial():
        _write_json(os.path.join(tc.out, "steps.json"),
                    dict(settings=settings, steps=rec["steps"], epochs=rec["epochs"],
                         seconds=rec["seconds"] + time.perf_counter() - t0))

    def start(info):
        holder.update(info)
        it, ep = info["iteration"], info["start_epoch"]
        st = rec["steps"]
        if partial and (not st["iteration"] or st["iteration"][-1] < it) and it > 0:
            raise _Restart()
        keep = sum(1 for i in st["iteration"] if i <= it)
        rec["steps"] = {k: v[:keep] for k, v in st.items()}
        rec["epochs"] = [e for e in rec["epochs"] if e["epoch"] <= ep]

    def step(s):
        for k in ("iteration", "loss", "top1"):
            rec["steps"][k].append(s[k])
        if on_step:
            on_step(name, s)

    def epoch(r):
        rec["epochs"].append({k: v for k, v in r.items() if k not in ("improved", "best_val")})
        save_partial()

    try:
        train_run(replace(tc, resume=partial is not None), on_step=step, on_epoch=epoch, on_start=start)
    except TrainingDiverged as e:
        rec["diverged"] = str(e)
    except TrainingInterrupted:
        save_partial()
        raise
    if rec["diverged"] is None and "model" in holder:
        train_path, _ = dataset_paths(tc.data)
        workers = holder["train"].workers
        with EvalLoader(train_path, max(tc.batch_size, 128), holder["config"].crop, views="center",
                        workers=workers, scale=tc.scale, pad=holder["train"].pad) as ld:
            rec["train_eval"] = evaluate(holder["model"], ld)
    rec["seconds"] += time.perf_counter() - t0
    _write_json(os.path.join(tc.out, "ablation_run.json"), rec)
    return rec


# ---- what a run's record says -----------------------------------------------------------------------------------

def run_values(rec: dict, cfg: dict) -> dict:
    """The numbers of one run that the table summarises (None where the run diverged or lacks them)."""
    last = rec["epochs"][-1] if rec["epochs"] and not rec["diverged"] else {}
    te = rec.get("train_eval") or {}
    top1 = rec["steps"]["top1"]
    gap = (last["val_top1"] - te["top1"]) if ("val_top1" in last and "top1" in te) else None
    final = moving_average(top1, cfg["window"])[-1] if (top1 and not rec["diverged"]) else None
    return dict(iterations=first_crossing(top1, cfg["target"], cfg["window"]) if not rec["diverged"] else None,
                budget=len(top1), final_train=final, train_top1=last.get("train_top1"),
                train_eval_top1=te.get("top1"), val_top1=last.get("val_top1"), val_top5=last.get("val_top5"),
                gap=gap, seconds=rec["seconds"], diverged=rec["diverged"],
                crossings={f"{lv:g}": (first_crossing(top1, lv, cfg["window"]) if not rec["diverged"] else None)
                           for lv in LEVELS})


METRICS = ("iterations", "final_train", "train_top1", "train_eval_top1", "val_top1", "val_top5", "gap", "seconds")


def _variant(label, names, runs, cfg, lr=None) -> dict:
    vals = [run_values(runs[n], cfg) for n in names]
    v = dict(label=label, runs=list(names), lr=lr, budget=max((x["budget"] for x in vals), default=0),
             diverged=sum(x["diverged"] is not None for x in vals),
             diverged_runs=[x["diverged"] is not None for x in vals],
             values={m: [x[m] for x in vals] for m in METRICS},
             crossings={f"{lv:g}": [x["crossings"][f"{lv:g}"] for x in vals] for lv in LEVELS})
    v["summary"] = {m: stats.summary(v["values"][m]) for m in METRICS}
    return v


def _iterations(v):
    """A variant's iterations to the target per seed, the runs that never reached it counted as the budget (a
    lower bound), the diverged ones None (left out)."""
    return [None if d else (v["budget"] if i is None else i)
            for i, d in zip(v["values"]["iterations"], v["diverged_runs"])]


def _levels(a: dict, b: dict) -> list:
    """The activation pair at every level of LEVELS that some run reached: iterations per side (never reached:
    None), the comparison with unreached runs counted as the budget, the per-seed ratio b/a."""
    rows = []
    for lv in LEVELS:
        ca, cb = a["crossings"][f"{lv:g}"], b["crossings"][f"{lv:g}"]
        if all(i is None for i in ca + cb):
            continue
        cens = lambda v, c: [None if d else (v["budget"] if i is None else i)  # noqa: E731
                             for i, d in zip(c, v["diverged_runs"])]
        den = [None if (da or db) else i for i, da, db in zip(ca, a["diverged_runs"], b["diverged_runs"])]
        rows.append(dict(level=lv, a=stats.summary(ca), b=stats.summary(cb),
                         comparison=stats.compare(cens(a, ca), cens(b, cb)),
                         ratio=stats.ratios(cb, den, budget=b["budget"])))
    return rows


def assess(exp: str, a: dict, b: dict, classes: int) -> dict:
    """The comparison of an experiment's two variants (a: the paper's better one) and its sentences."""
    la, lb = a["label"], b["label"]
    out = {}
    if exp == "activation":
        ia, ib = _iterations(a), _iterations(b)
        c = stats.compare(ia, ib)
        # per seed: tanh's iterations over ReLU's; a seed where either diverged is left out
        den = [None if (da or db) else i for i, da, db in zip(a["values"]["iterations"], a["diverged_runs"],
                                                               b["diverged_runs"])]
        r = stats.ratios(b["values"]["iterations"], den, budget=b["budget"])
        out.update(comparison=c, ratio=r)
        text = stats.verdict(c, (la, lb), paper="a", unit="iterations", scale=1)
        if r["of_means"] is not None:
            gt = "≥ " if r["lower_bound"] else ""
            text += (f"; {lb}/{la} iterations: {gt}{r['of_means']:.2f}x (per seed {r['min']:.2f}–{r['max']:.2f}x"
                     + (", a lower bound: some tanh runs never reached the target" if r["lower_bound"] else "") + ")")
        out["levels"] = _levels(a, b)
        miss = [lab for lab, v in ((la, a), (lb, b)) if any(i is None for i in v["values"]["iterations"])]
        if miss:
            text += (f"; runs that never reached the target count as their budget ({a['budget']} iterations): "
                     + ", ".join(miss))
    elif exp == "dropout":
        c = stats.compare(a["values"]["gap"], b["values"]["gap"])
        v = stats.compare(a["values"]["val_top1"], b["values"]["val_top1"])
        out.update(comparison=c, val=v)
        text = ("train/val gap: " + stats.verdict(c, (la, lb), paper="a")
                + "; val top-1: " + stats.verdict(v, (la, lb), paper=None))
    else:
        c = stats.compare(a["values"]["val_top1"], b["values"]["val_top1"])
        out.update(comparison=c)
        text = "val top-1: " + stats.verdict(c, (la, lb), paper="a")
        if exp == "pool" and classes > 5:
            t5 = stats.compare(a["values"]["val_top5"], b["values"]["val_top5"])
            out["top5"] = t5
            text += "; val top-5: " + stats.verdict(t5, (la, lb), paper="a")
        if exp == "pool":   # §3.4: "models with overlapping pooling find it slightly more difficult to overfit"
            g = stats.compare(a["values"]["gap"], b["values"]["gap"])
            out["gap"] = g
            text += "; train/val gap: " + stats.verdict(g, (la, lb), paper="a")
    if a["diverged"] or b["diverged"]:
        text += f" ({a['diverged'] + b['diverged']} runs diverged and are left out)"
    out["verdict"] = text
    return out


# ---- the whole ablation -----------------------------------------------------------------------------------------

def run(cfg: AblationConfig, on_run_start=None, on_step=None, on_run_end=None) -> dict:
    """Train (or reuse) every run the chosen experiments need; return a JSON-ready dict of the results.

    on_run_start(name, options, index, total, progress), on_step(name, step_dict, progress),
    on_run_end(name, record, progress); progress = dict(done=iterations finished or reused, total=iterations of
    the whole ablation, todo=iterations it had to train when the call started (the runs not found finished),
    trained=iterations trained in this call, seconds=since the call started, reused=runs found finished).
    """
    from .data import H5Dataset
    from .train import dataset_paths, input_scale

    tc = cfg.train
    _check(cfg)
    train_path, val = dataset_paths(tc.data)
    if val is None:
        raise CpnetError(f"--data {tc.data}: no val.h5 beside train.h5 (the ablations compare validation error)")
    if tc.scale is None:  # resolved once, so every run sees the same inputs
        tc = replace(tc, scale=input_scale(train_path) if (tc.init or DEFAULT_INIT) == "he" else 1.0)
        cfg = replace(cfg, train=tc)
    p = plan(cfg)
    with H5Dataset(train_path) as ds:
        num_classes, n_train = ds.num_classes, ds.n
    with H5Dataset(val) as ds:
        n_val = ds.n
    per_epoch = n_train // tc.batch_size
    act_epochs = cfg.activation_epochs or tc.epochs
    budget = lambda o: o["epochs"] * per_epoch if "epochs" in o else tc.epochs * per_epoch  # noqa: E731
    late_n = sum(len(s) for s in p["late"].values())
    late_iterations = late_n * act_epochs * per_epoch   # their rate is not known yet: counted as to be trained
    todo = sum(budget(o) for n, o in p["runs"].items() if _finished(cfg, n, o)[2] is None) + late_iterations
    progress = dict(done=0, total=sum(budget(o) for o in p["runs"].values()) + late_iterations, todo=todo,
                    trained=0, seconds=0.0, reused=0)
    t0 = time.perf_counter()
    runs, index = {}, [0]
    cfgd = config_record(cfg)

    def train(name, opts):
        if name in runs:
            return
        if on_run_start:
            on_run_start(name, opts, index[0], p["total"], dict(progress, seconds=time.perf_counter() - t0))
        base_done = progress["done"]

        def step(n, s):
            progress["done"] = base_done + s["iteration"]
            progress["trained"] += 1
            if on_step:
                on_step(n, s, dict(progress, seconds=time.perf_counter() - t0))

        before = progress["trained"]
        runs[name] = train_one(cfg, name, opts, step)
        if progress["trained"] == before:
            progress["reused"] += 1
        progress["done"] = base_done + budget(opts)
        index[0] += 1
        if on_run_end:
            on_run_end(name, runs[name], dict(progress, seconds=time.perf_counter() - t0))

    # the sweep first (its result decides the late runs' rate), then the late runs, then the other experiments
    for label, by_rate in p["sweep"].items():
        for names in by_rate.values():
            for n in names:
                train(n, p["runs"][n])
    sweep, best = {}, {}
    if p["sweep"]:
        variants = dict(EXPERIMENTS["activation"]["variants"])
        for label, by_rate in p["sweep"].items():
            sweep[label] = {}
            for lr, names in by_rate.items():
                v = _variant(label, names, runs, cfgd, lr)
                sweep[label][f"{lr:g}"] = dict(runs=names, iterations=v["values"]["iterations"],
                                               budget=v["budget"], final=v["values"]["final_train"],
                                               summary=v["summary"]["iterations"],
                                               final_summary=v["summary"]["final_train"])
            best[label] = stats.best_rate({lr: dict(iterations=sweep[label][f"{lr:g}"]["iterations"],
                                                    budget=sweep[label][f"{lr:g}"]["budget"],
                                                    final=sweep[label][f"{lr:g}"]["final"]) for lr in by_rate})
            if best[label] is None:
                best[label] = min(by_rate)   # every rate diverged: the smallest, its runs recorded as diverged
            for s in p["late"][label]:
                o = _options(cfg, "activation", variants[label], s, best[label])
                train(run_name(o, cfg.train), o)
    experiments = []
    for exp in cfg.experiments:
        spec = EXPERIMENTS[exp]
        if exp == "activation":
            vs = []
            for label, over in spec["variants"]:
                names = [run_name(_options(cfg, exp, over, s, best[label]), cfg.train) for s in seeds_of(cfg)]
                vs.append(_variant(label, names, runs, cfgd, best[label]))
        else:
            for label, names in p["fixed"][exp].items():
                for n in names:
                    train(n, p["runs"][n])
            vs = [_variant(label, names, runs, cfgd) for label, names in p["fixed"][exp].items()]
        experiments.append(dict(name=exp, title=spec["title"], claim=spec["claim"], metric=spec["metric"],
                                variants=vs, **assess(exp, vs[0], vs[1], num_classes)))
    return dict(config=cfgd, classes=num_classes, train_images=n_train, val_images=n_val, seeds=seeds_of(cfg),
                seconds=time.perf_counter() - t0, train_seconds=math.fsum(r["seconds"] for r in runs.values()),
                reused=progress["reused"], sweep=sweep, best_lr=best, experiments=experiments, runs=runs)


# ---- outputs ----------------------------------------------------------------------------------------------------

def _cell(s: dict, pct=True, signed=False, missing_as=None) -> str:
    """'35.2 ± 1.1 (33.9–36.4)' from a stats.summary; percentages of rates, or plain numbers."""
    if s["n"] == 0:
        return missing_as or "–"
    f = (lambda v: f"{100 * v:{'+' if signed else ''}.1f}") if pct else (lambda v: f"{v:.0f}")  # noqa: E731
    unit = "%" if pct and not signed else ""
    if s["n"] == 1:
        return f(s["mean"]) + unit
    sd = f"{100 * s['sd']:.1f}" if pct else f"{s['sd']:.0f}"
    return f"{f(s['mean'])}{unit} ± {sd} ({f(s['min'])}–{f(s['max'])})"


def _iter_cell(v: dict) -> str:
    vals = v["values"]["iterations"]
    reached = [i for i in vals if i is not None]
    never = len(vals) - len(reached) - v["diverged"]
    if not reached:
        return f"> {v['budget']} (all {never})" if never else "diverged"
    s = _cell(stats.summary(reached), pct=False)
    if never:
        s += f"; {never} of {len(vals)}: > {v['budget']}"
    return s


def _reach_cell(s: dict) -> str:
    n = s["n"] + s["missing"]
    return (_cell(s, pct=False) + (f" ({s['n']} of {n})" if s["missing"] else "")) if s["n"] else f"– (0 of {n})"


def markdown(results: dict) -> str:
    cfg = results["config"]
    t = f"{100 * cfg['target']:g}%"
    top5 = results.get("classes", 1000) > 5   # with 5 classes or fewer top-5 error is 0 by definition
    k = len(results["seeds"])
    race = "activation" in cfg["experiments"]
    lines = [f"Each cell: mean ± standard deviation (min–max) over {k} seed{'s' if k > 1 else ''} "
             f"({', '.join(map(str, results['seeds']))}).", "",
             f"| experiment | variant | lr | " + (f"iterations to {t} train error | " if race else "")
             + "train top-1 (eval) | val top-1 " + ("| val top-5 " if top5 else "") + "| gap val−train (points) | "
             "time per run |",
             "|---|---|---:|" + ("---:|" if race else "") + "---:|---:|" + ("---:|" if top5 else "") + "---:|---:|"]
    for exp in results["experiments"]:
        for v in exp["variants"]:
            s = v["summary"]
            lr = v["lr"] if v["lr"] is not None else cfg["lr"]
            lines.append(f"| {exp['title']} | {v['label']} | {lr:g} | " + (f"{_iter_cell(v)} | " if race else "")
                         + f"{_cell(s['train_eval_top1'])} | {_cell(s['val_top1'])} | "
                         + (f"{_cell(s['val_top5'])} | " if top5 else "")
                         + f"{_cell(s['gap'], signed=True)} | {s['seconds']['mean']:.0f} s |")
    users = {}
    for exp in results["experiments"]:
        for v in exp["variants"]:
            users.setdefault(tuple(v["runs"]), []).append(v["label"])
    shared = [" = ".join(labels) for labels in users.values() if len(labels) > 1]
    if shared:
        lines += ["", "The same trainings (same numbers): " + "; ".join(shared) + "."]
    if any(len(by_rate) > 1 for by_rate in results["sweep"].values()):
        lines += ["", f"Learning-rate sweep of the activation pair (iterations to {t} training error, mean ± sd "
                  f"(min–max) over the runs that reached it; final: training error of the last {cfg['window']} "
                  "batches):", "",
                  "| activation | lr | seeds | iterations | reached | final training error |",
                  "|---|---:|---:|---:|---:|---:|"]
        for label, by_rate in results["sweep"].items():
            for lr, r in by_rate.items():
                mark = " **best**" if float(lr) == results["best_lr"][label] else ""
                n = len(r["iterations"])
                reached = sum(i is not None for i in r["iterations"])
                lines.append(f"| {label} | {lr}{mark} | {n} | {_cell(r['summary'], pct=False)} | {reached} of {n} | "
                             f"{_cell(r['final_summary'])} |")
    for exp in results["experiments"]:
        if exp.get("levels"):
            a, b = (v["label"] for v in exp["variants"])
            lines += ["", f"{exp['title']} at each training-error level some run reached (iterations to it, mean ± "
                      "sd (min–max) over the runs that reached it; per-seed ratio with unreached runs counted as "
                      "the budget, a lower bound):", "",
                      f"| training error | {a} | {b} | {b}/{a} (per seed) | difference |", "|---:|---:|---:|---:|---|"]
            for row in exp["levels"]:
                r = row["ratio"]
                ratio = "–" if r["min"] is None else (("≥ " if r["lower_bound"] else "")
                                                      + f"{r['of_means']:.2f}x ({r['min']:.2f}–{r['max']:.2f})")
                c = row["comparison"]
                diff = ("no difference at this scale" if c["better"] is None else
                        f"{a if c['better'] == 'a' else b} sooner")
                lines.append(f"| {100 * row['level']:g}% | {_reach_cell(row['a'])} | {_reach_cell(row['b'])} | "
                             f"{ratio} | {diff} |")
    lines.append("")
    for exp in results["experiments"]:
        lines.append(f"- **{exp['title']}**: {exp['verdict']}. Paper: {exp['claim']}.")
    lines.append("")
    init = cfg["init"] or DEFAULT_INIT
    act = cfg["activation_epochs"] or cfg["epochs"]
    others = set(cfg["experiments"]) - {"activation"}
    lines.append(
        f"Model {cfg['model']}, {results['train_images']} training and {results['val_images']} validation images, "
        f"batch {cfg['batch_size']}; "
        + (f"ReLU vs tanh: {act} epochs per run, no dropout, no weight decay, each activation at its own constant "
           f"rate (the lr column); " if "activation" in cfg["experiments"] else "")
        + (f"LRN, pooling, dropout: {cfg['epochs']} epochs per run, constant lr {cfg['lr']:g}, weight decay "
           f"{cfg['weight_decay']:g}; " if others else "")
        + f"momentum {cfg['momentum']:g}, init {init}, input scale {cfg['scale']:.4g}. A direction is named only "
        "when the difference of the means exceeds 2 standard errors of the difference. Training error for the "
        f"target: mean of the last {cfg['window']} batches (augmented, dropout on); 'train top-1 (eval)': final "
        "weights on the training images' centre crops without dropout; gap = val top-1 − train top-1 (eval). "
        f"{len(results['runs'])} trainings, {results['train_seconds'] / 60:.1f} min of training"
        + (f" ({results['reused']} reused from an earlier call)" if results.get("reused") else "") + ".")
    return "\n".join(lines) + "\n"


def _band(curves):
    """Mean, min and max at each position of curves of possibly different lengths (the longer ones alone at the
    end)."""
    n = max((len(c) for c in curves), default=0)
    cols = [[c[i] for c in curves if i < len(c) and c[i] is not None] for i in range(n)]
    return ([math.fsum(v) / len(v) if v else None for v in cols], [min(v) if v else None for v in cols],
            [max(v) if v else None for v in cols])


def figure(results: dict, size=(460, 300)):
    """The plot: per experiment the mean over seeds with a band from the lowest to the highest seed.

    ReLU vs tanh: smoothed training error vs iteration, each at its best rate (target dashed); the sweep:
    iterations to the target vs learning rate (a run that never reached it drawn at the budget); the others:
    validation (solid) and training (dashed) top-1 error per epoch."""
    from . import viz

    cfg = results["config"]
    runs = results["runs"]
    charts = []
    for exp in results["experiments"]:
        series, marks = [], []
        for j, v in enumerate(exp["variants"]):
            color = viz.PALETTE[j]
            recs = [runs[n] for n in v["runs"] if not runs[n]["diverged"]]
            if exp["name"] == "activation":
                curves = [moving_average(r["steps"]["top1"], cfg["window"]) for r in recs]
                m, lo, hi = _band(curves)
                series.append(viz.Series(list(range(1, len(m) + 1)), m, f"{v['label']} (lr {v['lr']:g})", color,
                                         band=(lo, hi)))
                it = v["summary"]["iterations"]
                if it["n"]:
                    marks.append(viz.Mark(it["mean"], "x", "", color))
            else:
                ep = list(range(1, max((len(r["epochs"]) for r in recs), default=0) + 1))
                m, lo, hi = _band([[e.get("val_top1") for e in r["epochs"]] for r in recs])
                series.append(viz.Series(ep, m, f"{v['label']} val", color, markers=True, band=(lo, hi)))
                tm, _, _ = _band([[e.get("train_top1") for e in r["epochs"]] for r in recs])
                series.append(viz.Series(ep, tm, f"{v['label']} train", color, dashed=True, markers=True))
        k = len(results["seeds"])
        band = f"mean of {k} seeds, band min-max" if k > 1 else "one seed"
        if exp["name"] == "activation":
            marks.append(viz.Mark(cfg["target"], "y", f"target {100 * cfg['target']:g}%"))
            charts.append(viz.chart(series, size, f"{exp['title']} ({band})", "iteration",
                                    f"training error (last {cfg['window']} batches)", ylim=(0, 1), marks=marks))
            if any(len(by_rate) > 1 for by_rate in results["sweep"].values()):
                charts.append(_sweep_chart(results, size))
        else:
            charts.append(viz.chart(series, size, f"{exp['title']} ({band})", "epoch", "top-1 error",
                                    ylim=(0, 1), integer_x=True))
    cols = 2 if len(charts) > 1 else 1
    rows = [viz.stack(charts[i:i + cols], "horizontal", gap=8) for i in range(0, len(charts), cols)]
    return viz.stack(rows, "vertical", gap=8)


def _sweep_chart(results, size):
    from . import viz

    cfg = results["config"]
    series, budget = [], 0
    for j, (label, by_rate) in enumerate(results["sweep"].items()):
        xs, m, lo, hi = [], [], [], []
        for lr, r in sorted(by_rate.items(), key=lambda kv: float(kv[0])):
            vals = [v for v, f in zip(stats.censored(r["iterations"], r["budget"]), r["final"]) if f is not None]
            budget = max(budget, r["budget"])
            xs.append(float(lr))
            s = stats.summary(vals)
            m.append(s["mean"])
            lo.append(s["min"])
            hi.append(s["max"])
        series.append(viz.Series(xs, m, f"{label} (best {results['best_lr'][label]:g})", viz.PALETTE[j],
                                 markers=True, band=(lo, hi)))
    rates = sorted({float(lr) for by_rate in results["sweep"].values() for lr in by_rate})
    return viz.chart(series, size, "learning-rate sweep (not reached: at the budget)", "learning rate",
                     f"iterations to {100 * cfg['target']:g}% train error", log_x=True, xticks=rates,
                     xlim=(rates[0] / 1.25, rates[-1] * 1.25),
                     marks=[viz.Mark(budget, "y", "budget")], ylim=(0, budget * 1.05 or 1))


def write_outputs(results: dict, out: str) -> dict:
    """ablation.json (everything, every run's per-step curve included), ablation.md (the table), ablation.png
    (the plot), each written to a temporary name and renamed."""
    from .checkpoint import atomic_path

    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f"ablation.{k}") for k in ("json", "md", "png")}
    _write_json(paths["json"], results)
    with atomic_path(paths["md"]) as tmp:
        with open(tmp, "w") as f:
            f.write(markdown(results))
        _readable(tmp)
    with atomic_path(paths["png"]) as tmp:
        figure(results).save(tmp, format="PNG")
        _readable(tmp)
    return paths
