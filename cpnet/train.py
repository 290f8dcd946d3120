"""The training loop: batches -> forward/backward -> momentum SGD -> metrics, validation, checkpoints.

Nothing here prints: `run` reports through callbacks (`on_step`, `on_epoch`) and files in the run directory:

    RUN/last.h5        after every epoch and on interruption (Ctrl-C), written atomically
    RUN/best.h5        the weights with the lowest validation top-1 error so far
    RUN/metrics.jsonl  one JSON line per finished epoch (rewritten atomically from the checkpoint's history)

Resuming restores weights, momentum, learning rate and schedule, epoch, iteration and the position inside the
epoch. Data order, augmentation and dropout are counter-based random streams (functions of the seed, epoch, batch
and iteration), so an interrupted and resumed run on the CPU ends with exactly the parameters of an
uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from . import checkpoint as ckpt_io
from .backend import default_host_threads, default_loader_workers, host_threads, to_device, to_host
from .errors import CpnetError
from .evaluate import evaluate, topk_hits
from .model import PRESETS, build_model, check_crop, make_config
from .optim import MomentumSGD, Schedule


@dataclass
class TrainConfig:
    data: str
    out: str
    model: str = "alexnet-small"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decay_biases: bool = False
    schedule: str = "plateau"
    patience: int = 1
    step_epochs: int = 10
    seed: int = 0
    workers: int | None = None  # loader worker processes; None: backend.default_loader_workers()
    crop: int | None = None
    conventions: str = "paper"
    init: str | None = None
    activation: str = "relu"
    lrn: bool = True
    pool: list = field(default_factory=lambda: [3, 2])
    dropout: float = 0.5
    lighting: float = 0.1
    scale: float | None = None  # None: 1/std of the mean-subtracted pixels for --init he, else 1 (0-255 inputs)
    resume: bool = False
    validate: bool = True
    max_iterations: int | None = None
    threads: int | None = None  # host BLAS threads per tower; None: backend.default_host_threads(workers)
    sync_every: int | None = None  # steps between loss read-backs (and on_step calls); None: 1 on the host, 20 on a GPU


SYNC_EVERY = 20  # on a GPU, read the loss back (and check it) every this many steps


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C once the current step has finished and RUN/last.h5 holds the position."""


def dataset_paths(data: str) -> tuple[str, str | None]:
    """`--data` is a folder with train.h5 (and val.h5), or a train file whose val.h5 sits beside it."""
    if os.path.isdir(data):
        train, val = os.path.join(data, "train.h5"), os.path.join(data, "val.h5")
    else:
        train, val = data, os.path.join(os.path.dirname(data) or ".", "val.h5")
    if not os.path.exists(train):
        raise CpnetError(f"--data {data}: no train.h5 there (make one with `cpnet prep`)")
    return train, (val if os.path.exists(val) and os.path.abspath(val) != os.path.abspath(train) else None)


def input_scale(train_path: str, sample: int = 512) -> float:
    """1 / the standard deviation of mean-subtracted pixels (0-255 scale), from an even sample of the training set.

    He's initialisation assumes unit-variance inputs; the paper fed raw 0-255 values minus the mean to N(0, 0.01)
    weights instead.
    """
    from cpnet.data import H5Dataset

    with H5Dataset(train_path) as ds:
        idx = np.unique(np.linspace(0, ds.n - 1, min(sample, ds.n)).astype(np.int64))
        x = ds.read(idx).astype(np.float32) - ds.mean
    std = float(x.std())
    return 1.0 / std if std > 0 else 1.0


def default_crop(preset: str, stored_size: int) -> int:
    """227 for the paper's net; the stored size minus an eighth for the small presets (32 from 36)."""
    if preset == "alexnet":
        return 227
    return int(stored_size - stored_size // 8)


def _write_metrics(path, history):
    """metrics.jsonl rewritten whole from the history, atomically."""
    with ckpt_io.atomic_path(path) as tmp, open(tmp, "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")


class _StopFlag:
    """Ctrl-C asks the loop to stop at the next batch boundary; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handler(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


# what a resumed run may change; every other setting comes from the checkpoint
RESUMABLE = {"data", "out", "epochs", "workers", "threads", "resume", "max_iterations", "sync_every"}


def run(cfg: TrainConfig, on_step=None, on_epoch=None, on_start=None, placement=None, explicit=None) -> dict:
    """Train per `cfg`; returns the last epoch's metrics. See the module docstring for the files it writes.

    `explicit`: the TrainConfig fields the user set on purpose (the CLI's flags); with `resume`, one that differs
    from the saved run is an error instead of being silently replaced by the saved value.
    """
    if cfg.workers is None:
        cfg = replace(cfg, workers=default_loader_workers(placement))
    threads = cfg.threads if cfg.threads is not None else default_host_threads(cfg.workers)
    with host_threads(threads):
        return _run(cfg, on_step, on_epoch, on_start, placement, explicit)


def _run(cfg, on_step, on_epoch, on_start, placement, explicit):
    from cpnet.data import EvalLoader, H5Dataset, TrainLoader

    train_path, val_path = dataset_paths(cfg.data)
    if cfg.epochs < 1:
        raise CpnetError(f"--epochs {cfg.epochs}: expected at least 1")
    if cfg.batch_size < 1:
        raise CpnetError(f"--batch-size {cfg.batch_size}: expected at least 1")
    if not cfg.lighting >= 0:
        raise CpnetError(f"--lighting {cfg.lighting}: expected a standard deviation >= 0")
    if cfg.workers < 0:
        raise CpnetError(f"--workers {cfg.workers}: expected 0 or more")
    with H5Dataset(train_path) as ds:
        classes, stored, mean = list(ds.classes), ds.size, np.array(ds.mean)  # labels checked at open
    if val_path:
        with H5Dataset(val_path) as vds:
            if list(vds.classes) != classes:
                raise CpnetError(f"{val_path}: its classes differ from {train_path}'s")
    os.makedirs(cfg.out, exist_ok=True)
    last, best, metrics_path = (os.path.join(cfg.out, n) for n in ("last.h5", "best.h5", "metrics.jsonl"))

    if cfg.resume:
        if not os.path.exists(last):
            raise CpnetError(f"--resume: {last} does not exist (nothing to resume)")
        ck = ckpt_io.load(last)
        if ck.classes != classes:
            raise CpnetError(f"--resume: {last} was trained on other classes than {train_path}")
        net_cfg, state = ck.config, ck.state
        saved = TrainConfig(**{**ck.train, "data": cfg.data, "out": cfg.out, "epochs": cfg.epochs,
                               "workers": cfg.workers, "threads": cfg.threads, "resume": True,
                               "max_iterations": cfg.max_iterations, "sync_every": cfg.sync_every})
        resolved = {"crop": net_cfg.crop, "init": net_cfg.init}  # what a run that left these out actually used
        for name in sorted(explicit or ()):
            if name in RESUMABLE or not hasattr(saved, name):
                continue
            was = getattr(saved, name)
            if was is None:
                was = resolved.get(name)
            if getattr(cfg, name) != was:
                raise CpnetError(f"--resume: --{name.replace('_', '-')} {getattr(cfg, name)} differs from the saved "
                                 f"run's {was}; a resumed run keeps its settings (drop the flag, or start a new run "
                                 f"in another --out)")
        cfg = saved
    else:
        if os.path.exists(last):
            raise CpnetError(f"--out {cfg.out}: already holds a run (last.h5); use --resume or another --out")
        crop = cfg.crop or default_crop(cfg.model, stored)
        if cfg.model not in PRESETS:
            raise CpnetError(f"--model {cfg.model!r}: expected one of {', '.join(PRESETS)}")
        net_cfg = make_config(cfg.model, len(classes), crop, cfg.conventions, cfg.init, cfg.activation, cfg.lrn,
                              cfg.pool, cfg.dropout, cfg.seed)
        if cfg.scale is None:
            cfg = replace(cfg, scale=input_scale(train_path) if net_cfg.init == "he" else 1.0)
        if not (cfg.scale > 0 and math.isfinite(cfg.scale)):
            raise CpnetError(f"--scale {cfg.scale}: expected a positive number")
        state = dict(epoch=0, pos=0, iteration=0, lr=cfg.lr, schedule=Schedule(
            cfg.schedule, patience=cfg.patience, step_epochs=cfg.step_epochs).state(), best_val=None,
            sums=None, history=[])
        ck = None
    if cfg.schedule == "plateau" and (val_path is None or not cfg.validate):
        raise CpnetError("--schedule plateau needs validation data (val.h5 beside train.h5)")
    check_crop(net_cfg, stored)

    model = build_model(net_cfg, placement=placement)
    opt = MomentumSGD(model, lr=state["lr"], momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                      decay_biases=cfg.decay_biases)
    if ck is not None:
        try:
            model.set_params(ck.params)
            if ck.momentum is None:
                raise CpnetError("no momentum/ in the file (a weights-only checkpoint cannot be resumed)")
            model.set_params(ck.momentum, into=opt.velocity)
        except CpnetError as e:
            raise CpnetError(f"--resume: {last}: {e}") from None
    schedule = Schedule.from_state(state["schedule"])
    history = list(state["history"])
    train_dict = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "max_iterations", "threads",
                                                                     "sync_every")}

    def save(path, epoch, pos, sums, weights_only=False):
        ckpt_io.save(path, ckpt_io.Checkpoint(
            config=net_cfg, params=model.host_params(), classes=classes, mean=mean, scale=cfg.scale,
            stored_size=stored,
            momentum=None if weights_only else {k: to_host(v) for k, v in opt.velocity.items()},
            state=dict(epoch=epoch, pos=pos, iteration=iteration, lr=opt.lr, schedule=schedule.state(),
                       best_val=best_val, sums=sums, history=history, seed=cfg.seed),
            train=train_dict))

    loader = TrainLoader(train_path, cfg.batch_size, net_cfg.crop, seed=cfg.seed, workers=cfg.workers,
                         lighting=cfg.lighting, scale=cfg.scale)
    val_loader = EvalLoader(val_path, cfg.batch_size, net_cfg.crop, views="center", workers=cfg.workers,
                            scale=cfg.scale) if (val_path and cfg.validate) else None
    iteration, best_val = int(state["iteration"]), state["best_val"]
    nb = loader.batches_per_epoch
    dev0 = model.devices[0]
    sync_every = cfg.sync_every or (SYNC_EVERY if dev0.is_gpu else 1)
    if on_start:
        on_start(dict(model=model, config=net_cfg, train=cfg, batches_per_epoch=nb, classes=classes,
                      start_epoch=state["epoch"], start_pos=state["pos"], iteration=iteration))
    result = history[-1] if history else {}

    def flush(pending, pending_n, n_steps, sums, epoch):
        """Read the pending device sums back (the step's only host synchronisation), check them, add them up."""
        if pending is None:
            return None
        loss_sum, miss1, miss5 = (float(v) for v in to_host(pending))
        if not math.isfinite(loss_sum):
            where = (f"at iteration {iteration - 1}" if n_steps == 1 else
                     f"between iterations {iteration - n_steps} and {iteration - 1}")
            raise CpnetError(
                f"loss became {loss_sum / pending_n} {where} (epoch {epoch + 1}): training stopped; "
                f"{last if os.path.exists(last) else 'no checkpoint'} keeps the last good state (try a lower --lr)")
        sums["loss"] += loss_sum
        sums["top1"] += miss1
        sums["top5"] += miss5
        sums["n"] += pending_n
        return dict(loss=loss_sum / pending_n, top1=miss1 / pending_n, top5=miss5 / pending_n)

    try:
        with _StopFlag() as stop:
            for epoch in range(int(state["epoch"]), cfg.epochs):
                start = int(state["pos"]) if epoch == state["epoch"] else 0
                sums = dict(state["sums"] or {}) if (epoch == state["epoch"] and start) else {}
                for key in ("loss", "top1", "top5", "n", "data_s", "compute_s"):
                    sums.setdefault(key, 0.0)
                t_epoch = time.perf_counter()
                t_wait = time.perf_counter()
                pos = start
                pending, pending_n, pending_steps = None, 0, 0
                for x, y in loader.epoch(epoch, start=start):
                    t0 = time.perf_counter()
                    sums["data_s"] += t0 - t_wait
                    model.set_step(iteration)
                    loss, logits = model.loss(x, y, train=True)
                    model.loss_backward()
                    b = len(y)
                    with dev0:
                        h1, h5 = topk_hits(logits, to_device(y, dev0))
                        part = dev0.xp.stack([loss.astype(np.float64) * b, b - h1, b - h5])
                        pending = part if pending is None else pending + part
                    pending_n += b
                    pending_steps += 1
                    iteration += 1
                    pos += 1
                    stopping = stop.requested or (cfg.max_iterations is not None and iteration >= cfg.max_iterations)
                    step_info = None
                    if iteration % sync_every == 0 or pos == nb or pos == start + 1 or stopping:
                        step_info = flush(pending, pending_n, pending_steps, sums, epoch)
                        pending, pending_n, pending_steps = None, 0, 0
                    opt.step()
                    model.clear()
                    t_wait = time.perf_counter()
                    sums["compute_s"] += t_wait - t0
                    if on_step and step_info is not None:
                        on_step(dict(step_info, epoch=epoch, batch=pos, batches=nb, iteration=iteration, lr=opt.lr,
                                     ln_classes=math.log(len(classes)), sums=dict(sums), elapsed=t_wait - t_epoch))
                    if stopping or stop.requested:
                        flush(pending, pending_n, pending_steps, sums, epoch)
                        save(last, epoch, pos, sums)
                        raise TrainingInterrupted(
                            f"stopped at epoch {epoch + 1}, batch {pos}/{nb} (iteration {iteration}); "
                            f"{last} holds the position: continue with --resume")
                n = max(sums["n"], 1)
                row = dict(epoch=epoch + 1, iteration=iteration, lr=opt.lr, train_loss=sums["loss"] / n,
                           train_top1=sums["top1"] / n, train_top5=sums["top5"] / n,
                           images_per_s=sums["n"] / max(sums["data_s"] + sums["compute_s"], 1e-9),
                           data_s=sums["data_s"], compute_s=sums["compute_s"])
                if val_loader is not None:
                    v = evaluate(model, val_loader)
                    row.update(val_loss=v["loss"], val_top1=v["top1"], val_top5=v["top5"])
                history.append(row)
                improved = val_loader is not None and (best_val is None or row["val_top1"] < best_val)
                if improved:
                    best_val = row["val_top1"]
                opt.lr = schedule.update(opt.lr, row.get("val_top1"))
                save(last, epoch + 1, 0, None)
                if improved:
                    save(best, epoch + 1, 0, None, weights_only=True)
                _write_metrics(metrics_path, history)
                state = dict(state, epoch=epoch + 1, pos=0, sums=None)
                result = row
                if on_epoch:
                    on_epoch(dict(row, improved=improved, best_val=best_val))
    finally:
        loader.close()
        if val_loader is not None:
            val_loader.close()
    return result
