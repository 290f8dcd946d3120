"""HDF5 checkpoints, written atomically (temporary file, flush, fsync, rename over the old one).

Layout (format_version 1):

    attrs   format = "cpnet-checkpoint", format_version, cpnet_version
            config  the model's NetConfig as JSON
            state   training state as JSON: epoch, iteration, position in the epoch, learning rate, schedule,
                    seed, running sums of the unfinished epoch, best validation error
            train   the training options as JSON
    params/<name>     every parameter, per tower ('t0.conv1.W', ..., 'fc8.b'), float32 or float64
    momentum/<name>   the optimizer's velocity for each parameter (absent in weights-only files)
    classes           class names (UTF-8)
    norm/mean         the training set's mean image (S, S, 3) float32; attrs: scale, stored_size

All randomness in training is counter-based (data order and augmentation from (seed, epoch, batch); dropout
masks from (seed, iteration)), so the seed and the position restore every random stream exactly.
No pickle: only arrays, strings and JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field

import h5py
import numpy as np

from . import __version__
from .errors import CpnetError
from .model import NetConfig

FORMAT = "cpnet-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    config: NetConfig
    params: dict
    classes: list
    mean: np.ndarray
    scale: float = 1.0
    stored_size: int = 0
    momentum: dict | None = None
    state: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    path: str = ""


@contextmanager
def atomic_path(path):
    """Yield a temporary file name beside `path`; once the caller has written it, fsync it and rename it over
    `path`. On any failure the temporary file is removed and `path` keeps its old content."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(path, ckpt: Checkpoint):
    """Write `ckpt` to `path` atomically: a crash leaves either the old file or the new one, never half of one."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["cpnet_version"] = __version__
        f.attrs["config"] = ckpt.config.to_json()
        f.attrs["state"] = json.dumps(ckpt.state)
        f.attrs["train"] = json.dumps(ckpt.train)
        g = f.create_group("params")
        for k, v in ckpt.params.items():
            g.create_dataset(k, data=np.asarray(v))
        if ckpt.momentum is not None:
            g = f.create_group("momentum")
            for k, v in ckpt.momentum.items():
                g.create_dataset(k, data=np.asarray(v))
        f.create_dataset("classes", data=np.array([c.encode("utf-8") for c in ckpt.classes], dtype=object),
                         dtype=h5py.string_dtype("utf-8"))
        n = f.create_group("norm")
        n.create_dataset("mean", data=np.asarray(ckpt.mean, dtype=np.float32))
        n.attrs["scale"] = float(ckpt.scale)
        n.attrs["stored_size"] = int(ckpt.stored_size)


def load(path, with_momentum=True) -> Checkpoint:
    """Read a checkpoint; a clear CpnetError naming the file when it is missing or not a cpnet checkpoint."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CpnetError(f"{path}: checkpoint not found")
    if os.path.isdir(path):
        raise CpnetError(f"{path}: a folder, not a checkpoint file (a run folder holds best.h5 and last.h5)")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise CpnetError(f"{path}: not an HDF5 file (expected a checkpoint written by `cpnet train`)") from None
    with f:
        if f.attrs.get("format") != FORMAT:
            raise CpnetError(f"{path}: not a cpnet checkpoint (no format attribute {FORMAT!r})")
        ver = int(f.attrs.get("format_version", -1))
        if ver != FORMAT_VERSION:
            raise CpnetError(f"{path}: checkpoint format version {ver}, this cpnet reads version {FORMAT_VERSION}")
        for need in ("params", "classes", "norm/mean"):
            if need not in f:
                raise CpnetError(f"{path}: checkpoint has no '{need}'")
        try:
            config = NetConfig.from_json(f.attrs["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise CpnetError(f"{path}: unreadable model config ({e})") from None
        params = {k: f["params"][k][()] for k in f["params"]}
        momentum = None
        if with_momentum and "momentum" in f:
            momentum = {k: f["momentum"][k][()] for k in f["momentum"]}
        classes = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in f["classes"][()]]
        return Checkpoint(config=config, params=params, classes=classes, mean=f["norm/mean"][()],
                          scale=float(f["norm"].attrs.get("scale", 1.0)),
                          stored_size=int(f["norm"].attrs.get("stored_size", 0)), momentum=momentum,
                          state=json.loads(f.attrs.get("state", "{}")), train=json.loads(f.attrs.get("train", "{}")),
                          path=path)


def load_model(path, placement=None, dtype=np.float32):
    """(model, checkpoint) with the checkpoint's weights on `placement` (default: the machine's)."""
    from .model import build_model

    ck = load(path, with_momentum=False)
    model = build_model(ck.config, placement=placement, dtype=dtype)
    try:
        model.set_params(ck.params)
    except CpnetError as e:
        raise CpnetError(f"{path}: {e}") from None
    return model, ck
