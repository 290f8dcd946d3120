"""The training loop: batches -> forward/backward -> momentum SGD -> metrics, validation, checkpoints.

Nothing here prints: `run` reports through callbacks (`on_step`, `on_epoch`) and files in the run directory:

    RUN/last.h5        after every epoch and on interruption (Ctrl-C, SIGTERM), written atomically; the record
                       from which --resume repairs the other two after a crash between their writes
    RUN/best.h5        the weights with the lowest validation top-1 error so far
    RUN/metrics.jsonl  one JSON line per finished epoch (rewritten atomically from the checkpoint's history)

Resuming restores weights, momentum, learning rate and schedule, epoch, iteration and the position inside the
epoch. Data order, augmentation and dropout are counter-based random streams (functions of the seed, epoch, batch
and iteration), so an interrupted and resumed run on the CPU ends with exactly the parameters of an
uninterrupted one.

Data-parallel replicas (`mpiexec -n N cpnet train ...`, cpnet.dist): every process runs this same loop on rows
[r*B/N, (r+1)*B/N) of each global batch of B, with the crops, flips, lighting and dropout masks those rows have in
the whole batch; `Trainer.reduce_gradients` sums the gradients over the replicas, the loss and error sums and the
validation counts are summed over them too, and every decision (divergence, Ctrl-C, the schedule) is taken on
those sums, so all replicas take it together. Only rank 0 calls the callbacks and writes files. The checkpoint
holds no world size: a run resumes on any N that divides B. A world of one does none of this.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from . import checkpoint as ckpt_io
from . import dist, precision
from .backend import (cpu_share, default_host_threads, default_loader_workers, gpu_augment, host_threads, to_device,
                      to_host)
from .config import TrainConfig
from .errors import CpnetError, flag_names
from .files import FolderLock, write_error
from .evaluate import evaluate, topk_hits
from .model import PRESETS, build_model, check_crop, make_config
from .optim import MomentumSGD, Schedule

__all__ = ["TrainConfig", "TrainingDiverged", "TrainingInterrupted", "Trainer", "run"]

SYNC_EVERY = 20  # on a GPU, read the loss back (and check it) every this many steps

# what a resumed run may change; every other setting comes from the checkpoint
RESUMABLE = {"data", "out", "epochs", "workers", "threads", "resume", "max_iterations", "sync_every",
             "gpus_per_replica", "precision"}
# the TrainConfig fields a checkpoint does not record (they belong to one invocation, not to the run)
NOT_RECORDED = ("resume", "max_iterations", "threads", "sync_every", "gpus_per_replica")
SUM_KEYS = ("loss", "top1", "top5", "n", "data_s", "compute_s")


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C or SIGTERM once the current step has finished and RUN/last.h5 holds the position;
    `signum` is the signal that asked (the CLI exits with 128 + signum)."""

    def __init__(self, msg, signum=signal.SIGINT):
        super().__init__(msg)
        self.signum = int(signum)


class TrainingDiverged(CpnetError):
    """The training loss became NaN or infinite; the run stopped before the step that would have used it."""


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


def whole_image(preset: str, stored_size: int) -> bool:
    """Images no larger than a small preset's own crop (Fashion-MNIST at 28 px, CIFAR at 32): there is no border
    to crop away, the object fills the frame, so the net sees the whole image."""
    return preset != "alexnet" and stored_size <= PRESETS[preset]["crop"]


def default_crop(preset: str, stored_size: int) -> int:
    """227 for the paper's net; for the small presets the stored size minus an eighth (32 from 36, the paper's
    224 of 256 in proportion), or the whole image where it is no larger than the preset's crop (28 from 28; with
    the data's defaults, `data_defaults`, such an image goes on a canvas of the preset's crop instead)."""
    if preset == "alexnet":
        return 227
    if whole_image(preset, stored_size):
        return int(stored_size)
    return int(stored_size - stored_size // 8)


def default_pad(crop: int, stored_size: int) -> int:
    """--pad for whole small images on a `crop`-px canvas: the canvas's border (half of crop - size, rounded up,
    so that the canvas always fits) plus the shift of a 14th of the size (2 px at 28 and 32): 28 px on 32 -> 4,
    so the image moves by up to 2 px either way about the centre (an odd border moves it 1 px further one way);
    32 on 32 -> 2."""
    return (int(crop) - int(stored_size) + 1) // 2 + int(stored_size) // WHOLE_IMAGE_SHIFT


# Whole small images (whole_image): the preset's crop as a canvas, training crops shifted by up to this fraction
# of the size (2 px at 28 and 32), this initial learning rate and this dropout. Measured on Fashion-MNIST (README,
# "Results on real data"): the shift, the rate and the patience rule below gave validation error 0.082 after 10
# epochs where the paper's proportion (crop 25 of 28, no shift), lr 0.01 and patience 1 gave 0.096 after 8; the
# canvas and no dropout then took the test accuracy from 0.910 to 0.925 (validation error 0.079 -> 0.068).
WHOLE_IMAGE_SHIFT = 14  # the shift is size // 14
WHOLE_IMAGE_LR = 0.03
WHOLE_IMAGE_DROPOUT = 0.0


def default_patience(epochs: int) -> int:
    """Plateau patience: an epoch per ten of the run (1 for the 10-epoch default, 2 for 20), so that one noisy
    validation epoch does not end the high-rate phase of a longer run."""
    return max(1, int(epochs) // 10)


def data_defaults(cfg: TrainConfig, stored_size: int, explicit=None, notices=None) -> TrainConfig:
    """The defaults chosen from the data for the flags the user left out (`explicit`: the flags given; None:
    all of them, as for callers that build a TrainConfig themselves): --crop, --pad, --lr and --dropout for whole
    small images, --patience from --epochs."""
    changes = {}
    if not _given("patience", explicit):
        changes["patience"] = default_patience(cfg.epochs)
    if cfg.model in PRESETS and whole_image(cfg.model, stored_size) and not _given("crop", explicit):
        # the preset's crop as a canvas, so that the net keeps the geometry it was sized for: at crop 28,
        # alexnet-small's 3/2 poolings drop the last row and column of conv1's and conv5's maps and leave fc6 a
        # 2x2 map instead of 3x3
        crop = int(PRESETS[cfg.model]["crop"])
        if _given("pad", explicit) and crop > stored_size + 2 * cfg.pad:
            crop = stored_size  # a --pad too small for the canvas: the whole image, uncut, shifted by that pad
        changes["crop"] = crop
        for name, value in (("pad", default_pad(crop, stored_size)), ("lr", WHOLE_IMAGE_LR),
                            ("dropout", WHOLE_IMAGE_DROPOUT)):
            if not _given(name, explicit):
                changes[name] = value
        if notices is not None:
            pad = changes.get("pad", cfg.pad)
            where = (f"on a {crop}-px canvas of the mean colour (--crop {crop} --pad {pad})" if crop > stored_size
                     else f"(--pad {pad})")
            shift = pad - (crop - stored_size) // 2  # the farthest the image moves from the centre view
            notices.append(f"{stored_size}-px images, no larger than {cfg.model}'s {PRESETS[cfg.model]['crop']}-px "
                           f"crop: the whole image "
                           f"{where}, " + (f"shifted by up to {shift} px" if shift > 0 else "centred")
                           + f", at --lr {changes.get('lr', cfg.lr):g}, dropout {changes.get('dropout', cfg.dropout):g}")
    return replace(cfg, **changes) if changes else cfg


def _write_metrics(path, history):
    """metrics.jsonl rewritten whole from the history, atomically (a full disk: one line, the old file kept)."""
    try:
        with ckpt_io.atomic_path(path) as tmp, open(tmp, "w") as f:
            for row in history:
                f.write(json.dumps(row) + "\n")
    except OSError as e:
        raise write_error(path, e, "writing the metrics", "last.h5 holds them: --resume rewrites the file") from None


class _StopFlag:
    """Ctrl-C or SIGTERM (what `timeout`, Slurm and container stops send) asks the loop to stop at the next batch
    boundary, which saves the position; a second one interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum = signal.SIGINT
        self._old = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _handler(self, signum, frame):
        self.requested, self.signum = True, signum
        for sig in self.SIGNALS:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def check_out(out: str) -> str:
    """`--out` is a folder this process can write in, or can be made one: checked before anything is loaded, so
    a read-only or misplaced folder fails at once instead of after an epoch. Creates nothing that stays."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise CpnetError(f"--out {out}: is a file, expected a run folder")
    where = os.path.abspath(out)
    while not os.path.exists(where):      # the folder to be made: its nearest existing ancestor must take it
        where = os.path.dirname(where)
    if not os.path.isdir(where):
        raise CpnetError(f"--out {out}: cannot create the run folder ({where} is a file)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".cpnet-write-test.", suffix=".tmp", dir=where)
        try:
            os.write(fd, b"cpnet")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise write_error(where, e, "checking that the run folder can be written",
                          "choose another --out or free some space") from None
    return out


def repair_run_files(out: str, ck) -> list:
    """After a crash inside the end of an epoch, make best.h5 and metrics.jsonl agree with last.h5 (the record);
    remove the temporary files a killed write left. A list of what was done, for the user."""
    done = [f"removed {os.path.join(out, n)} (left by a killed write)"
            for n in ckpt_io.remove_stale_temporaries(out, ("last.h5", "best.h5", "metrics.jsonl"))]
    state = ck.state
    history = list(state.get("history") or [])
    metrics = os.path.join(out, "metrics.jsonl")
    want = "".join(json.dumps(row) + "\n" for row in history)
    try:
        with open(metrics) as fh:
            have = fh.read()
    except OSError:
        have = None
    if history and have != want:
        _write_metrics(metrics, history)
        done.append(f"{metrics} rewritten from last.h5 ({len(history)} epoch{'s' * (len(history) != 1)}; a crash "
                    "had cut it short)")
    best_val = state.get("best_val")
    rows = [r for r in history if r.get("val_top1") == best_val] if best_val is not None else []
    if rows:
        best_epoch = int(rows[0]["epoch"])
        best = os.path.join(out, "best.h5")
        if ckpt_io.read_state(best).get("epoch") != best_epoch:
            if best_epoch == int(state.get("epoch", -1)) and not state.get("pos"):
                ckpt_io.save(best, replace(ck, momentum=None))
                done.append(f"{best} rebuilt from last.h5 (epoch {best_epoch}; a crash had left it stale)")
            else:
                done.append(f"{best} does not hold epoch {best_epoch}, the best so far, and last.h5 cannot "
                            "rebuild it")
    return done


# ---- the run, in parts: options, start-or-resume, build, one epoch, end of epoch ---------------------------------

def run(cfg: TrainConfig, on_step=None, on_epoch=None, on_start=None, placement=None, explicit=None) -> dict:
    """Train per `cfg`; returns the last epoch's metrics. See the module docstring for the files it writes.

    `explicit`: the TrainConfig fields the user set on purpose (the CLI's flags); with `resume`, one that differs
    from the saved run is an error instead of being silently replaced by the saved value, and `data` / `epochs`
    left out come from the saved run. None: every field counts as set (the API's behaviour).

    Nothing is created before every check has passed: RUN appears only when training starts. `on_start` gets,
    besides the run's parts, `notices`: one-line remarks on choices made for the user (a constant schedule for
    want of validation data, a resumed run extended or already finished, a preset that does not suit the images).
    """
    world = dist.world()
    if placement is None and (world.size > 1 or cfg.gpus_per_replica is not None):
        placement = dist.replica_placement(world, cfg.gpus_per_replica)
    ranks = world.local_size  # processes of this job on this node share its CPUs
    if cfg.workers is None:
        cfg = replace(cfg, workers=default_loader_workers(placement, ranks))
    threads = cfg.threads if cfg.threads is not None else default_host_threads(cfg.workers, ranks)
    # two host towers in two threads only where this process has two CPUs of its own (None: the model decides)
    tower_threads = None if ranks == 1 else cpu_share(ranks) >= 2
    notices = []
    with flag_names(), host_threads(threads):  # the settings' errors from below name the flags
        cfg = saved_data(cfg)
        if world.is_root:
            check_out(cfg.out)
        data = check_options(cfg)
        dist.shard_rows(world, cfg.batch_size)
        # rank 0 alone writes the run folder, so it alone locks it, for the run's life (a resumed one too): a
        # second run into it is refused before it reads or writes anything there. The folder stays only once
        # every check has passed (FolderLock removes a folder it made that holds nothing but its lock).
        with FolderLock(cfg.out, "cpnet train") if world.is_root else contextlib.nullcontext():
            cfg, net_cfg, state, ck = start_or_resume(cfg, data, explicit, world, notices)
            if ck is not None and world.is_root:
                notices += repair_run_files(cfg.out, ck)
            model, opt = build_model_and_optimizer(cfg, net_cfg, state, ck, placement, tower_threads)
            if model.bf16 and not any(d.is_gpu for d in model.devices):
                notices.append("--precision bf16 on the host emulates bf16's rounding in NumPy (float32 arithmetic): "
                               "it trains as bf16 does on a GPU, and more slowly than fp32")
            replicas = dist.Replicas(world, model, opt)
            if world.size > 1:
                dist.check_same(world, "the training options (each rank's TrainConfig)",
                                json.dumps(asdict(cfg), sort_keys=True, default=str))
                replicas.start()
                if not world.is_root:  # rank 0 alone reports
                    on_step = on_epoch = on_start = None
            if cfg.batch_size > data.n:  # before a loader allocates a batch (--batch-size 1e11: MemoryError)
                raise CpnetError(f"--batch-size {cfg.batch_size}: {data.train} has {data.n} images, fewer than one "
                                 "training batch")
            loaders = build_loaders(cfg, net_cfg, data, (world.rank, world.size), gpu_augment(model.devices))
            trainer = Trainer(cfg, net_cfg, state, data, model, opt, *loaders, replicas=replicas)
            with trainer:
                return trainer.run(on_step, on_epoch,
                                   on_start and (lambda info: on_start(dict(info, notices=notices))))


@dataclass
class DataFiles:
    """The dataset as the loop needs it before anything is built: the two files and the training file's header."""
    train: str
    val: str | None
    classes: list
    stored: int       # stored image size (pixels)
    mean: np.ndarray  # mean image, (S, S, 3), 0-255 scale
    n: int = 0        # training images


def saved_data(cfg: TrainConfig) -> TrainConfig:
    """With --resume and no --data: the data folder the saved run recorded."""
    if cfg.data is not None or not cfg.resume:
        return cfg
    last = os.path.join(cfg.out, "last.h5")
    if not os.path.exists(last):
        raise CpnetError(f"--resume: {last} does not exist (nothing to resume)")
    data = ckpt_io.load(last, with_momentum=False).train.get("data")
    if not data:
        raise CpnetError(f"--resume: {last} does not record its dataset; give --data")
    if not os.path.exists(data):
        raise CpnetError(f"--resume: the run's dataset {data} is not there any more (moved? give --data)")
    return replace(cfg, data=data)


def check_options(cfg: TrainConfig) -> DataFiles:
    """The options that need no checkpoint, and the dataset files (`--data`)."""
    from cpnet.data import H5Dataset

    if cfg.data is None:
        raise CpnetError("--data: missing (the folder `cpnet prep` wrote; only --resume can take it from the run)")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise CpnetError(f"--out {cfg.out}: a file, not a run folder")
    train_path, val_path = dataset_paths(cfg.data)
    if cfg.epochs < 1:
        raise CpnetError(f"--epochs {cfg.epochs}: expected at least 1")
    if cfg.batch_size < 1:
        raise CpnetError(f"--batch-size {cfg.batch_size}: expected at least 1")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise CpnetError(f"--lr {cfg.lr}: expected a positive number")
    if not (cfg.lighting >= 0 and math.isfinite(cfg.lighting)):
        raise CpnetError(f"--lighting {cfg.lighting}: expected a standard deviation >= 0 (finite)")
    if not 0 <= cfg.erase <= 1:
        raise CpnetError(f"--erase {cfg.erase}: expected a probability in [0, 1]")
    if cfg.crop is not None and cfg.crop < 1:
        raise CpnetError(f"--crop {cfg.crop}: expected a crop size of at least 1 pixel (leave it out for the "
                         "default)")
    if cfg.workers < 0:
        raise CpnetError(f"--workers {cfg.workers}: expected 0 or more")
    if cfg.precision not in precision.PRECISIONS:
        raise CpnetError(f"--precision {cfg.precision}: expected one of {', '.join(precision.PRECISIONS)}")
    with H5Dataset(train_path) as ds:
        classes, stored, mean = list(ds.classes), ds.size, np.array(ds.mean)  # labels checked at open
        n = ds.n
    if val_path:
        with H5Dataset(val_path) as vds:
            if list(vds.classes) != classes:
                raise CpnetError(f"{val_path}: its classes differ from {train_path}'s")
            if vds.size != stored:
                raise CpnetError(f"{val_path}: images stored at {vds.size} px, {train_path} at {stored} px "
                                 "(prepare both with one --size)")
            if vds.n == 0:
                raise CpnetError(f"{val_path}: no images (validation needs at least one; remove the file to "
                                 "train without validation)")
    return DataFiles(train_path, val_path, classes, stored, mean, n)


def _given(name, explicit):
    return explicit is None or name in explicit


def start_or_resume(cfg: TrainConfig, data: DataFiles, explicit=None, world=None, notices=None):
    """(the run's TrainConfig, its NetConfig, the loop state, the checkpoint or None) for a new or resumed run;
    remarks on choices made for the user are appended to `notices`."""
    world = world or dist.World()
    notices = [] if notices is None else notices
    last = os.path.join(cfg.out, "last.h5")
    # every rank must see what rank 0 sees (a run folder on a file system all nodes share)
    found = world.gather(os.path.exists(last))
    if cfg.resume:
        if not found[0]:
            raise CpnetError(f"--resume: {last} does not exist (nothing to resume)")
        missing = [r for r, f in enumerate(found) if not f]
        if missing:
            raise CpnetError(f"--resume: rank {missing[0]} does not see {last} (put --out on a file system that "
                             f"every node shares)")
        cfg, net_cfg, state, ck = _resume(cfg, data, last, explicit, notices)
    else:
        if found[0]:
            raise CpnetError(f"--out {cfg.out}: already holds a run (last.h5); use --resume or another --out")
        cfg = data_defaults(cfg, data.stored, explicit, notices)
        if cfg.schedule == "plateau" and data.val is None and cfg.validate and not _given("schedule", explicit):
            cfg = replace(cfg, schedule="constant")
            notices.append(f"no val.h5 beside {data.train}: the plateau schedule needs validation data, so the "
                           f"learning rate stays at {cfg.lr:g} (--schedule step divides it every --step-epochs)")
        cfg, net_cfg, state = _start(cfg, data, notices)
        ck = None
    if cfg.schedule == "plateau" and (data.val is None or not cfg.validate):
        raise CpnetError("--schedule plateau needs validation data (val.h5 beside train.h5)")
    check_crop(net_cfg, data.stored, cfg.pad)
    return cfg, net_cfg, state, ck


# the small presets are sized for images of about this many pixels; far larger ones get a notice
SMALL_PRESET_SIZE = 96


def _start(cfg: TrainConfig, data: DataFiles, notices):
    if cfg.model not in PRESETS:
        raise CpnetError(f"--model {cfg.model!r}: expected one of {', '.join(PRESETS)}")
    crop = cfg.crop or default_crop(cfg.model, data.stored)
    if cfg.crop is None and crop > data.stored + 2 * cfg.pad:
        raise CpnetError(f"--model {cfg.model} takes {crop}-px crops, larger than the {data.stored}-px images of "
                         f"{data.train} (prepare them with --size 256, or use --model alexnet-small)")
    if cfg.model != "alexnet" and data.stored > SMALL_PRESET_SIZE:
        notices.append(f"{cfg.model} is sized for small images (36 px: crop 32); on these {data.stored}-px images "
                       f"its crop is {crop} and fc6 grows with it, slow on a CPU (prepare with --size 64, or use "
                       "--model alexnet)")
    net_cfg = make_config(cfg.model, len(data.classes), crop, cfg.conventions, cfg.init, cfg.activation, cfg.lrn,
                          cfg.pool, cfg.dropout, cfg.seed, cfg.width)
    if not 0 <= cfg.pad < crop:
        raise CpnetError(f"--pad {cfg.pad}: expected 0 <= pad < the crop ({crop})")
    if cfg.scale is None:
        cfg = replace(cfg, scale=input_scale(data.train) if net_cfg.init == "he" else 1.0)
    if not (cfg.scale > 0 and math.isfinite(cfg.scale)):
        raise CpnetError(f"--scale {cfg.scale}: expected a positive number")
    cosine = cfg.schedule == "cosine"  # the only schedule that needs the run's length and starting rate
    state = dict(epoch=0, pos=0, iteration=0, lr=cfg.lr, schedule=Schedule(
        cfg.schedule, patience=cfg.patience, step_epochs=cfg.step_epochs, total=cfg.epochs if cosine else None,
        base=cfg.lr if cosine else None).state(), best_val=None,
        sums=None, history=[])
    return cfg, net_cfg, state


def _resume(cfg: TrainConfig, data: DataFiles, last: str, explicit, notices):
    """The saved run's settings, with what this invocation may change (RESUMABLE) taken from `cfg`; --epochs left
    out: the saved run's."""
    if not os.path.exists(last):
        raise CpnetError(f"--resume: {last} does not exist (nothing to resume)")
    ck = ckpt_io.load(last)
    if ck.classes != data.classes:
        raise CpnetError(f"--resume: {last} was trained on other classes than {data.train}")
    if ck.stored_size and ck.stored_size != data.stored:
        raise CpnetError(f"--resume: {last} was trained on images stored at {ck.stored_size} px, --data "
                         f"{data.train} holds {data.stored} px")
    net_cfg = ck.config
    done, was = int(ck.state.get("epoch", 0)), int(ck.train.get("epochs", cfg.epochs))
    epochs = cfg.epochs if _given("epochs", explicit) else was
    if epochs < done or (epochs == done and ck.state.get("pos")):
        raise CpnetError(f"--epochs {epochs}: the run in {cfg.out} has already trained {done} epochs"
                         + (" and part of the next" if ck.state.get("pos") else "")
                         + (f" (give more than {done} to extend it)" if done >= was else
                            f" (leave --epochs out to finish its {was}, or give more than {done})"))
    if epochs > was:
        notices.append(f"extending the run from {was} to {epochs} epochs")
    elif epochs == done:
        notices.append(f"the run in {cfg.out} is finished ({done} of {epochs} epochs); --epochs N with N > {done} "
                       "trains it further")
    state = ck.state
    if epochs != was and state["schedule"]["kind"] == "cosine":
        # the half cosine is stretched (or squeezed) over the new total: the rate moves to where it would be now
        sch = Schedule.from_state(state["schedule"])
        sch.total = epochs
        state = {**state, "schedule": sch.state(), "lr": sch.cosine_lr(done)}
        if epochs > done:
            notices.append(f"the cosine schedule now spans {epochs} epochs: epoch {done + 1} runs at lr "
                           f"{state['lr']:.3g}")
    cfg = replace(cfg, epochs=epochs)
    saved = TrainConfig(**{**ck.train, **{k: getattr(cfg, k) for k in RESUMABLE}})
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
    return saved, net_cfg, state, ck


def build_model_and_optimizer(cfg: TrainConfig, net_cfg, state: dict, ck=None, placement=None, tower_threads=None):
    """The model on its devices and its MomentumSGD, with the checkpoint's weights and momentum when resuming."""
    model = build_model(net_cfg, placement=placement, tower_threads=tower_threads, precision=cfg.precision)
    opt = MomentumSGD(model, lr=state["lr"], momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                      decay_biases=cfg.decay_biases)
    if ck is not None:
        try:
            model.set_params(ck.params)
            if ck.momentum is None:
                raise CpnetError("no momentum/ in the file (a weights-only checkpoint cannot be resumed)")
            model.set_params(ck.momentum, into=opt.velocity)
        except CpnetError as e:
            raise CpnetError(f"--resume: {os.path.join(cfg.out, 'last.h5')}: {e}") from None
    return model, opt


def build_loaders(cfg: TrainConfig, net_cfg, data: DataFiles, part=(0, 1), raw=False):
    """(training loader, validation loader or None); `part` (r, n): replica r of n takes rows [r*B/n, (r+1)*B/n)
    of each global batch, and its n-th of the validation images. `raw`: batches as uint8 pixels and per-crop
    choices, augmented on the model's GPU (backend.gpu_augment)."""
    from cpnet.data import EvalLoader, TrainLoader

    loader = TrainLoader(data.train, cfg.batch_size, net_cfg.crop, seed=cfg.seed, workers=cfg.workers,
                         lighting=cfg.lighting, scale=cfg.scale, part=part, pad=cfg.pad, raw=raw, erase=cfg.erase)
    val_loader = EvalLoader(data.val, cfg.batch_size, net_cfg.crop, views="center", workers=cfg.workers,
                            scale=cfg.scale, part=part, pad=cfg.pad, raw=raw) if (data.val and cfg.validate) else None
    return loader, val_loader


class _Pending:
    """The device-side loss and error sums of the steps since the last read-back (one host synchronisation)."""

    def __init__(self):
        self.sums, self.n, self.steps = None, 0, 0

    def add(self, part, b):
        self.sums = part if self.sums is None else self.sums + part
        self.n += b
        self.steps += 1

    def flush(self, totals: dict, iteration: int, epoch: int, last: str, world=None) -> dict | None:
        """Read the sums back (summed over the replicas of `world`), check them, add them to `totals`; the mean
        loss and errors of these steps."""
        if self.sums is None:
            return None
        loss_sum, miss1, miss5 = (float(v) for v in to_host(self.sums))
        n, steps = self.n, self.steps
        if world is not None and world.size > 1:
            loss_sum, miss1, miss5, n = (float(v) for v in world.sum_scalars([loss_sum, miss1, miss5, n]))
        self.sums, self.n, self.steps = None, 0, 0
        if not math.isfinite(loss_sum):
            where = (f"at iteration {iteration - 1}" if steps == 1 else
                     f"between iterations {iteration - steps} and {iteration - 1}")
            raise TrainingDiverged(
                f"loss became {loss_sum / n} {where} (epoch {epoch + 1}): training stopped; "
                f"{last if os.path.exists(last) else 'no checkpoint'} keeps the last good state (try a lower --lr)")
        for key, v in (("loss", loss_sum), ("top1", miss1), ("top5", miss5), ("n", n)):
            totals[key] += v
        return dict(loss=loss_sum / n, top1=miss1 / n, top5=miss5 / n)


class Trainer:
    """One run's live parts (model, optimizer, loaders, schedule, counters) and the loop over them.

    Data-parallel replicas (`replicas`, a cpnet.dist.Replicas): `reduce_gradients()` runs between backward and the
    optimizer step, `loader` / `val_loader` yield this replica's part of each batch, and the sums, the stop
    decision and validation are summed over the world; only rank 0 writes files. Without `replicas`, a world of one.
    """

    def __init__(self, cfg, net_cfg, state, data: DataFiles, model, opt, loader, val_loader=None, replicas=None):
        self.cfg, self.net_cfg, self.state, self.data = cfg, net_cfg, dict(state), data
        self.model, self.opt, self.loader, self.val_loader = model, opt, loader, val_loader
        self.replicas = replicas or dist.Replicas(dist.World(), model, opt)
        self.world = self.replicas.world
        self.schedule = Schedule.from_state(state["schedule"])
        self.history = list(state["history"])
        self.iteration, self.best_val = int(state["iteration"]), state["best_val"]
        self.dev0 = model.devices[0]
        self.sync_every = cfg.sync_every or (SYNC_EVERY if self.dev0.is_gpu else 1)
        self.last, self.best, self.metrics = (os.path.join(cfg.out, n) for n in ("last.h5", "best.h5",
                                                                                  "metrics.jsonl"))
        self.train_record = {k: v for k, v in asdict(cfg).items() if k not in NOT_RECORDED}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.loader.close()
        if self.val_loader is not None:
            self.val_loader.close()
        return False

    def run(self, on_step=None, on_epoch=None, on_start=None) -> dict:
        """Every remaining epoch; the last one's metrics (the saved run's last row if none remained)."""
        if on_start:
            on_start(dict(model=self.model, config=self.net_cfg, train=self.cfg,
                          batches_per_epoch=self.loader.batches_per_epoch, classes=self.data.classes,
                          start_epoch=self.state["epoch"], start_pos=self.state["pos"], iteration=self.iteration,
                          world=self.world.describe() if self.world.size > 1 else None, world_size=self.world.size,
                          replicas=self.replicas.describe(), note=self.replicas.note))
        result = self.history[-1] if self.history else {}
        with _StopFlag() as stop:
            for epoch in range(int(self.state["epoch"]), self.cfg.epochs):
                row = self.end_epoch(epoch, self.train_epoch(epoch, stop, on_step))
                result = {k: v for k, v in row.items() if k not in ("improved", "best_val")}
                if on_epoch:
                    on_epoch(row)
        return result

    def check_finite(self, epoch: int, momentum: bool = True):
        """Stop (TrainingDiverged) when a parameter or a momentum array holds NaN or infinity.

        The loss alone misses such values (a NaN input can reach conv1's gradient while ReLU and max pool turn
        the activations finite again); a non-finite gradient makes its parameter non-finite at the update, so
        checking the parameters after it covers the gradients too, and a non-finite velocity reaches its
        parameter at the next update. One float64 sum per array, on its device: the parameters at every loss
        read-back, the parameters and the momentum before every save, so nothing non-finite reaches a file."""
        groups = [("parameter", self.model.params())] + ([("momentum of", self.opt.velocity)] if momentum else [])
        for group, arrays in groups:
            for name, v in arrays.items():
                if not math.isfinite(float(v.sum(dtype=np.float64))):
                    raise TrainingDiverged(
                        f"{group} {name} became NaN or infinite by iteration {self.iteration} (epoch {epoch + 1}): "
                        f"training stopped; {self.last if os.path.exists(self.last) else 'no checkpoint'} keeps "
                        "the last good state (try a lower --lr, a smaller --lighting or --scale)")

    def save(self, path, epoch, pos, sums, weights_only=False):
        if not self.world.is_root:
            return
        opt = self.opt
        self.check_finite(epoch if pos else epoch - 1)
        ckpt_io.save(path, ckpt_io.Checkpoint(
            config=self.net_cfg, params=self.model.host_params(), classes=self.data.classes, mean=self.data.mean,
            scale=self.cfg.scale, stored_size=self.data.stored,
            momentum=None if weights_only else {k: to_host(v) for k, v in opt.velocity.items()},
            state=dict(epoch=epoch, pos=pos, iteration=self.iteration, lr=opt.lr, schedule=self.schedule.state(),
                       best_val=self.best_val, sums=sums, history=self.history, seed=self.cfg.seed),
            train=self.train_record))

    def forward_backward(self, x, y):
        """One batch's forward and backward; the device-side [loss sum, top-1 misses, top-5 misses]."""
        model, dev0, b = self.model, self.dev0, len(y)
        model.set_step(self.iteration, offset=getattr(self.loader, "first_row", 0))
        loss, logits = model.loss(x, y, train=True)
        model.loss_backward(done=self.replicas.backward_done)  # a gradient reduction may start during it
        with dev0:
            h1, h5 = topk_hits(logits, to_device(y, dev0))
            return dev0.xp.stack([loss.astype(np.float64) * b, b - h1, b - h5])

    def reduce_gradients(self):
        """Between backward and the update: the replicas' gradients summed (a world of one has none to add)."""
        self.replicas.reduce()

    def update(self):
        self.opt.step()
        self.model.clear()

    def train_epoch(self, epoch: int, stop, on_step=None) -> dict:
        """One pass over the training batches (from the saved position when resuming); the epoch's sums."""
        cfg, nb = self.cfg, self.loader.batches_per_epoch
        resuming = epoch == self.state["epoch"]
        start = int(self.state["pos"]) if resuming else 0
        sums = dict(self.state["sums"] or {}) if (resuming and start) else {}
        for key in SUM_KEYS:
            sums.setdefault(key, 0.0)
        t_epoch = t_wait = time.perf_counter()
        pos, pending = start, _Pending()
        for x, y in self.loader.epoch(epoch, start=start):
            t0 = time.perf_counter()
            sums["data_s"] += t0 - t_wait
            pending.add(self.forward_backward(x, y), len(y))
            self.reduce_gradients()
            self.iteration += 1
            pos += 1
            at_max = cfg.max_iterations is not None and self.iteration >= cfg.max_iterations
            # the read-back is collective across replicas: only what they all know decides it (Ctrl-C reaches
            # them at different steps, so it counts here in a world of one alone)
            seen = stop.requested and self.world.size == 1
            step_info = None
            if self.iteration % self.sync_every == 0 or pos == nb or pos == start + 1 or at_max or seen:
                step_info = pending.flush(sums, self.iteration, epoch, self.last, self.world)
            self.update()
            if step_info is not None:
                self.check_finite(epoch, momentum=False)
            t_wait = time.perf_counter()
            sums["compute_s"] += t_wait - t0
            if on_step and step_info is not None:
                on_step(dict(step_info, epoch=epoch, batch=pos, batches=nb, iteration=self.iteration,
                             lr=self.opt.lr, ln_classes=math.log(len(self.data.classes)), sums=dict(sums),
                             elapsed=t_wait - t_epoch))
            if self.world.any(stop.requested or at_max):  # the replicas stop together, at the same step
                pending.flush(sums, self.iteration, epoch, self.last, self.world)
                self.save(self.last, epoch, pos, sums)
                raise TrainingInterrupted(
                    f"stopped at epoch {epoch + 1}, batch {pos}/{nb} (iteration {self.iteration}); "
                    f"{self.last} holds the position: continue with --resume", stop.signum)
        return sums

    def end_epoch(self, epoch: int, sums: dict) -> dict:
        """Validation, the schedule, last.h5 / best.h5 / metrics.jsonl; the epoch's row (+ improved, best_val)."""
        n = max(sums["n"], 1)
        row = dict(epoch=epoch + 1, iteration=self.iteration, lr=self.opt.lr, train_loss=sums["loss"] / n,
                   train_top1=sums["top1"] / n, train_top5=sums["top5"] / n,
                   images_per_s=sums["n"] / max(sums["data_s"] + sums["compute_s"], 1e-9),
                   data_s=sums["data_s"], compute_s=sums["compute_s"])
        if self.val_loader is not None:
            v = evaluate(self.model, self.val_loader, reduce=self.world.sum_scalars if self.world.size > 1 else None)
            row.update(val_loss=v["loss"], val_top1=v["top1"], val_top5=v["top5"])
        self.history.append(row)
        improved = self.val_loader is not None and (self.best_val is None or row["val_top1"] < self.best_val)
        if improved:
            self.best_val = row["val_top1"]
        self.opt.lr = self.schedule.update(self.opt.lr, row.get("val_top1"))
        # one transaction: last.h5 first (it is the record: its history and best_val say what best.h5 and
        # metrics.jsonl must hold, and repair_run_files makes them so on --resume after a crash in between)
        self.save(self.last, epoch + 1, 0, None)
        if improved:
            self.save(self.best, epoch + 1, 0, None, weights_only=True)
        if self.world.is_root:
            _write_metrics(self.metrics, self.history)
        self.state = dict(self.state, epoch=epoch + 1, pos=0, sums=None)
        return dict(row, improved=improved, best_val=self.best_val)
