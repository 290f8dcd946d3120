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
from .files import abandon_h5, write_error
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

    @property
    def pad(self) -> int:
        """How far the training crops could leave the image (--pad): evaluation may then use a crop up to
        2 x pad larger than the stored images (the image centred on a canvas of the mean colour)."""
        return int(self.train.get("pad", 0) or 0)


@contextmanager
def atomic_path(path):
    """Yield a temporary file name beside `path`; once the caller has written it, fsync it and rename it over
    `path`. On any failure the temporary file is removed and `path` keeps its old content.

    Temporary names are `<name>.<random>.tmp`; a process killed while writing leaves one, which
    `remove_stale_temporaries` clears."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=d)
    except OSError as e:
        raise write_error(path, e, "creating a temporary file beside it") from None
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(d)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_dir(d):
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder, names):
    """Remove `<name>.*.tmp` files that `atomic_path` left in `folder` for each of `names` (a killed writer's);
    the list of what was removed."""
    gone = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return gone
    for e in entries:
        if e.endswith(".tmp") and any(e.startswith(n + ".") for n in names):
            try:
                os.unlink(os.path.join(folder, e))
                gone.append(e)
            except OSError:
                pass
    return gone


def nonfinite(arrays: dict):
    """The first name in `arrays` whose array holds NaN or infinity, or None."""
    for k, v in arrays.items():
        a = np.asarray(v)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            return k
    return None


def save(path, ckpt: Checkpoint):
    """Write `ckpt` to `path` atomically: a crash leaves either the old file or the new one, never half of one.

    Arrays carry HDF5's Fletcher-32 checksum (a flipped bit fails the read); the file is read back and compared
    before the rename. Non-finite parameters are refused (never written), and a failed write (a full disk) is one
    CpnetError; `path` then keeps its previous content."""
    bad = nonfinite(ckpt.params)
    if bad is not None:
        raise CpnetError(f"{os.fspath(path)}: not written: parameter {bad} holds NaN or infinite values")
    keeps = f"{os.fspath(path)} keeps its previous content" if os.path.exists(path) else ""
    with atomic_path(path) as tmp:
        f = None
        try:
            f = h5py.File(tmp, "w")
            hold = []          # handles kept until the close: a destructor's failed flush would only be printed
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["cpnet_version"] = __version__
            f.attrs["config"] = ckpt.config.to_json()
            f.attrs["state"] = json.dumps(ckpt.state)
            f.attrs["train"] = json.dumps(ckpt.train)
            for group, arrays in (("params", ckpt.params), ("momentum", ckpt.momentum)):
                if arrays is None:
                    continue
                g = f.create_group(group)
                hold.append(g)
                for k, v in arrays.items():
                    hold.append(g.create_dataset(k, data=np.asarray(v), fletcher32=np.asarray(v).size > 0))
            hold.append(f.create_dataset("classes", data=np.array([c.encode("utf-8") for c in ckpt.classes],
                                                                  dtype=object), dtype=h5py.string_dtype("utf-8")))
            n = f.create_group("norm")
            hold += [n, n.create_dataset("mean", data=np.asarray(ckpt.mean, dtype=np.float32), fletcher32=True)]
            n.attrs["scale"] = float(ckpt.scale)
            n.attrs["stored_size"] = int(ckpt.stored_size)
            f.flush()
            f.close()
            f = hold = None
        except (OSError, RuntimeError) as e:
            if f is not None:
                abandon_h5(f)
            raise write_error(path, e, "writing the checkpoint", keeps) from None
        _verify(tmp, path, ckpt)


def _verify(tmp, path, ckpt):
    """Read the written file back: it loads, and its arrays are the ones given."""
    try:
        back = load(tmp, with_momentum=ckpt.momentum is not None)
    except CpnetError as e:
        raise CpnetError(f"{os.fspath(path)}: not written: the new file does not read back "
                         f"({str(e).replace(tmp + ': ', '')})") from None
    for group, want, got in (("params", ckpt.params, back.params), ("momentum", ckpt.momentum, back.momentum)):
        if want is None:
            continue
        if set(want) != set(got or {}) or any(not np.array_equal(np.asarray(want[k]), got[k]) for k in want):
            raise CpnetError(f"{os.fspath(path)}: not written: the new file's {group} read back differ")


def _damaged(path, e):
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return CpnetError(f"{path}: damaged checkpoint ({msg})")


def _json_attr(f, path, name):
    raw = f.attrs.get(name, "{}")
    try:
        value = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except (TypeError, ValueError, UnicodeDecodeError) as e:
        raise CpnetError(f"{path}: damaged checkpoint (its '{name}' attribute is not JSON: {e})") from None
    if not isinstance(value, dict):
        raise CpnetError(f"{path}: damaged checkpoint (its '{name}' attribute is not a JSON object)")
    return value


def _number_attr(attrs, path, name, kind, default):
    v = attrs.get(name, default)
    try:
        out = kind(v)
        if kind is float and not np.isfinite(out):
            raise ValueError
        return out
    except (TypeError, ValueError, OverflowError):
        raise CpnetError(f"{path}: damaged checkpoint (attribute '{name}' is {v!r}, expected a number)") from None


def load(path, with_momentum=True) -> Checkpoint:
    """Read a checkpoint; a clear CpnetError naming the file when it is missing, not a cpnet checkpoint, damaged
    (a checksum or structure error, attributes that are not JSON or not numbers) or holds non-finite weights."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CpnetError(f"{path}: checkpoint not found")
    if os.path.isdir(path):
        raise CpnetError(f"{path}: a folder, not a checkpoint file (a run folder holds best.h5 and last.h5)")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise CpnetError(f"{path}: not an HDF5 file (expected a checkpoint written by `cpnet train`)") from None
    try:
        with f:
            return _load_open(f, path, with_momentum)
    except CpnetError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, UnicodeDecodeError) as e:
        raise _damaged(path, e) from None


def _load_open(f, path, with_momentum):
    fmt = f.attrs.get("format")
    if (fmt.decode("utf-8", "replace") if isinstance(fmt, bytes) else fmt) != FORMAT:
        raise CpnetError(f"{path}: not a cpnet checkpoint (no format attribute {FORMAT!r})")
    ver = _number_attr(f.attrs, path, "format_version", int, -1)
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
    bad = nonfinite(params)
    if bad is not None:
        raise CpnetError(f"{path}: parameter {bad} holds NaN or infinite values (saved from a diverged run?)")
    momentum = None
    if with_momentum and "momentum" in f:
        momentum = {k: f["momentum"][k][()] for k in f["momentum"]}
    classes = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in f["classes"][()]]
    mean = f["norm/mean"][()]
    return Checkpoint(config=config, params=params, classes=classes, mean=mean,
                      scale=_number_attr(f["norm"].attrs, path, "scale", float, 1.0),
                      stored_size=_number_attr(f["norm"].attrs, path, "stored_size", int, 0), momentum=momentum,
                      state=_json_attr(f, path, "state"), train=_json_attr(f, path, "train"), path=path)


def read_state(path) -> dict:
    """The `state` attribute of a checkpoint without reading its arrays; {} when missing or unreadable."""
    try:
        with h5py.File(os.fspath(path), "r") as f:
            value = json.loads(f.attrs.get("state", "{}"))
    except Exception:
        return {}
    return value if isinstance(value, dict) else {}


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


def check_dataset(ck: Checkpoint, ds, where: str, checkpoint=None):
    """A dataset (an open data.H5Dataset) fits the checkpoint: the same classes, images stored at the size the
    model was trained on (and at least its crop). `where` names the dataset in the message (the caller's flag
    and file, e.g. "--data DIR/val.h5"); `checkpoint` names the checkpoint file."""
    name = checkpoint if checkpoint is not None else ck.path
    if list(ds.classes) != list(ck.classes):
        raise CpnetError(f"{where}: its {len(ds.classes)} classes differ from the checkpoint's {len(ck.classes)} "
                         f"({name})")
    if ck.config.crop > ds.size + 2 * ck.pad:
        raise CpnetError(f"{where}: images are {ds.size}px, smaller than the model's crop {ck.config.crop}" if not
                         ck.pad else f"{where}: images are {ds.size}px: the model's crop {ck.config.crop} exceeds "
                         f"them by more than 2 x its training --pad {ck.pad}")
    if ck.stored_size and ds.size != ck.stored_size:
        raise CpnetError(f"{where}: images are stored at {ds.size}px, the checkpoint was trained on "
                         f"{ck.stored_size}px images (prepare the data with --size {ck.stored_size})")
