"""Batch loaders over a dataset file: `TrainLoader` (shuffled, augmented) and `EvalLoader` (every image once).

A batch is a pure function of (file, settings, seed, epoch, batch index), made by `_Maker.make`; with workers=0
the calling process makes it, with workers=N worker processes do. The workers start with the "forkserver" method
(else "spawn"), so no open HDF5 handle is ever inherited; each worker opens the file itself on its first batch.
Batches travel back through shared-memory slots (`prefetch` of them, at least one per worker, plus one); the
caller gets x as a view of its slot, and the slot is reused only when no reference to that view is left
(see `_Workers`).
"""

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import sys
import traceback
import types
import weakref

import numpy as np

from cpnet.errors import CpnetError

from . import augment
from .h5format import H5Dataset


class _Spec:
    """What a process needs to make any batch of one loader (small and picklable)."""

    def __init__(self, path, kind, batch_size, crop, seed=0, lighting=0.0, flip=False, scale=1.0, views="center",
                 mean=None, rows=None, span=None, pad=0, layout=None, erase=0.0):
        self.path, self.kind, self.batch_size, self.crop, self.pad = path, kind, batch_size, crop, pad
        self.erase = erase  # training: the probability of random erasing's box in a crop
        self.seed, self.lighting, self.flip, self.scale, self.views = seed, lighting, flip, scale, views
        self.mean = mean  # (S, S, 3) float32 to subtract instead of the file's own, or None
        # training: (first, count) rows of each global batch this loader makes (a replica's share), or all of them
        self.rows = rows or (0, batch_size)
        self.span = span  # evaluation: the (start, stop) range of images this loader visits, or the whole file
        # raw batches (augment.RawLayout): uint8 pixels and per-crop choices for the device to augment, or None
        self.layout = layout

    @property
    def x_dtype(self):
        return np.dtype(np.uint8 if self.layout is not None else np.float32)


def mean_chw_of(ds, mean=None):
    """The mean image to subtract, (3, S, S) float32: the file's own or `mean` (S, S, 3)."""
    mean = ds.mean if mean is None else np.asarray(mean, np.float32)
    if mean.shape != ds.mean.shape:
        raise CpnetError(f"{ds.path}: images are {ds.size}px but the mean image given is {mean.shape[:2]}")
    return np.ascontiguousarray(mean.transpose(2, 0, 1), dtype=np.float32)


class _Maker:
    """Makes batches from an open H5Dataset: reads a batch's indices in increasing order into a preallocated
    buffer, then augments them back into the batch's own (shuffled) order."""

    def __init__(self, ds, spec):
        self.ds, self.spec = ds, spec
        self.mean_chw = mean_chw_of(ds, spec.mean)
        self.buf = np.empty((spec.rows[1], ds.size, ds.size, 3), np.uint8)
        self.offsets = (augment.view_offsets(ds.size, spec.crop, spec.views, spec.pad) if spec.kind == "eval"
                        else None)
        self._order = (None, None)   # (epoch, permutation) of the last epoch seen

    def indices(self, key):
        s, b = self.spec, self.spec.batch_size
        if s.kind == "train":
            epoch, bi = key
            if self._order[0] != epoch:
                self._order = (epoch, augment.epoch_order(s.seed, epoch, self.ds.n))
            first, count = s.rows
            return self._order[1][bi * b + first:bi * b + first + count]
        start, stop = s.span or (0, self.ds.n)
        return np.arange(start + key * b, min(stop, start + (key + 1) * b))

    def make(self, key, x, y):
        """Fill x[:k], y[:k] with batch `key` ((epoch, index) for training, index for evaluation); return k.
        Raw batches (spec.layout): x is the whole uint8 buffer, filled with the raw form of the same batch."""
        s = self.spec
        idx = self.indices(key)
        k = len(idx)
        order = np.argsort(idx, kind="stable")
        self.ds.read_sorted(idx[order], self.buf)
        rows = np.empty(k, np.int64)
        rows[order] = np.arange(k)          # batch position j is buffer row rows[j]
        if s.kind == "train":
            # drawn for the whole global batch, then this loader's rows: an image's crop, flip and lighting
            # depend on its position in the global batch, not on how many replicas share the batch
            first = s.rows[0]
            params = tuple(p[first:first + k] for p in augment.train_params(
                s.seed, key[0], key[1], s.batch_size, self.ds.size, s.crop, s.lighting, s.flip, s.pad))
            boxes = (augment.erase_boxes(s.seed, key[0], key[1], s.batch_size, s.crop, s.erase)[first:first + k]
                     if s.erase > 0 else None)
            if s.layout is not None:
                augment.train_raw_into(x, s.layout, self.buf, rows, params, self.ds.eigval, self.ds.eigvec, boxes)
            else:
                augment.train_batch_into(x[:k], self.buf, rows, params, self.mean_chw, self.ds.eigval,
                                         self.ds.eigvec, s.scale, boxes)
        elif s.layout is not None:
            augment.eval_raw_into(x, s.layout, self.buf, rows, self.offsets)
        else:
            augment.eval_batch_into(x[:k], self.buf, rows, self.offsets, self.mean_chw, s.scale)
        y[:k] = self.ds.labels[idx]
        return k


def _x_bytes(x_shape, x_dtype):
    """Bytes of a slot's x, rounded up to 8 so that y (int64) behind it is aligned."""
    return -(-int(np.prod(x_shape)) * np.dtype(x_dtype).itemsize // 8) * 8


def _slot_arrays(raw, x_shape, y_len, x_dtype=np.float32):
    """(x, y) arrays over one shared slot. x's base is the raw buffer itself, so every view of x (any depth) has
    x as its base, and sys.getrefcount(x) counts the views alive."""
    nx = _x_bytes(x_shape, x_dtype)
    x = np.ndarray(x_shape, x_dtype, buffer=raw)
    y = np.ndarray((y_len,), np.int64, buffer=raw, offset=nx)
    return x, y


def _worker_main(spec, raws, x_shape, y_len, tasks, results, alive):
    """Worker process: make the batches asked for on `tasks` into the slots, report on `results`.

    `alive` is the read end of a pipe whose only write end the loader's process holds: it reads EOF as soon as
    that process is gone, however it died (SIGKILL included), and the worker then exits within a second.
    """
    # the parent decides when to stop: Ctrl-C or SIGTERM sent to the whole process group (a terminal, Slurm, a
    # container stop) must not kill a worker while the parent saves its position
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    results.cancel_join_thread()
    slots = [_slot_arrays(r, x_shape, y_len, spec.x_dtype) for r in raws]
    maker = None
    try:
        while True:
            if alive.poll():                  # EOF (or anything): the loader's process is gone
                return
            try:
                task = tasks.get(timeout=0.5)
            except queue.Empty:
                continue
            if task is None:
                return
            slot, key = task
            try:
                if maker is None:
                    maker = _Maker(H5Dataset(spec.path), spec)
                k = maker.make(key, *slots[slot])
                results.put((slot, key, k, None))
            except Exception as e:
                results.put((slot, key, 0, (type(e).__name__, isinstance(e, CpnetError), str(e),
                                            traceback.format_exc())))
    finally:
        if maker is not None:
            maker.ds.close()


def _shutdown(procs, tasks, results, alive):
    """Stop the workers: ask politely, then terminate whatever is still running."""
    for _ in procs:
        try:
            tasks.put(None)
        except Exception:
            pass
    for p in procs:
        p.join(timeout=2.0)
        if p.is_alive():
            p.kill()           # SIGTERM is ignored (see _worker_main)
            p.join(timeout=2.0)
    for q in (tasks, results):
        try:
            q.cancel_join_thread()
            q.close()
        except Exception:
            pass
    alive.close()


def _context():
    """The start method for worker processes: a fresh interpreter (forkserver, else spawn), never a fork of a
    parent that may hold open HDF5 files, CUDA state or threads."""
    return mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")


@contextlib.contextmanager
def without_main_module():
    """While starting workers, hide the caller's __main__ module from multiprocessing.

    forkserver/spawn children normally re-import the parent's main script (which breaks for stdin, notebooks,
    and scripts without an `if __name__ == "__main__":` guard). Our workers need nothing from it: their target
    and arguments live in cpnet.data. So the children see an empty __main__ instead.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


class _Workers:
    """Worker processes and their shared-memory slots; `run(keys)` yields the batches of `keys` in order.

    A batch is identified by its key alone (it is a pure function of it), so a result that arrives for a key
    that a later run wants is used, not remade. When a run has submitted all its keys, the slots left over work
    on `ahead` keys (the next epoch's first batches) while the caller finishes this one.

    The x of a yielded batch is lent: a view into its slot, not a copy. The slot goes back to work only when no
    reference to that view (or any view of it) is left, which `sys.getrefcount` on the slot array tells exactly.
    Only `slots - 1` slots are ever lent; when the caller holds on to that many batches, later ones are copied.
    """

    def __init__(self, spec, workers, slots, x_shape, y_len, wrap):
        ctx = _context()
        nbytes = _x_bytes(x_shape, spec.x_dtype) + y_len * 8
        self._wrap = wrap  # (x, k) -> the batch handed out: x[:k], or a RawBatch over x
        self._raws = [ctx.RawArray("b", nbytes) for _ in range(slots)]
        self._slots = [_slot_arrays(r, x_shape, y_len, spec.x_dtype) for r in self._raws]
        # references to each slot's x held by us alone, counted the way _reclaim counts them
        self._baseline = [sys.getrefcount(self._slots[i][0]) for i in range(slots)]
        self._free = list(range(slots))
        self._lent = []
        self._inflight = set()          # keys submitted and not yet back
        self._ready = {}                # key -> (slot, k) made and not yet yielded
        self._tasks, self._results = ctx.Queue(), ctx.Queue()
        self._procs = []
        alive_r, self._alive = ctx.Pipe(duplex=False)     # this process holds the only write end
        try:
            for i in range(workers):
                p = ctx.Process(target=_worker_main, name=f"cpnet-loader-{i}", daemon=True,
                                args=(spec, self._raws, x_shape, y_len, self._tasks, self._results, alive_r))
                with without_main_module():
                    p.start()
                self._procs.append(p)
        finally:
            alive_r.close()
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._tasks, self._results, self._alive)

    def _reclaim(self):
        for slot in [s for s in self._lent if sys.getrefcount(self._slots[s][0]) == self._baseline[s]]:
            self._lent.remove(slot)
            self._free.append(slot)

    def _get(self):
        while True:
            try:
                return self._results.get(timeout=0.5)
            except queue.Empty:
                dead = [p for p in self._procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"loader worker {dead[0].name} died (exit code {dead[0].exitcode})")

    def run(self, keys, ahead=()):
        keys = list(keys)
        wanted = set(keys)
        upcoming = keys + [a for a in ahead if a not in wanted]
        keep = set(upcoming)
        for key in [k for k in self._ready if k not in keep]:       # made for a run that was abandoned
            self._free.append(self._ready.pop(key)[0])
        nxt = 0

        def fill():
            nonlocal nxt
            self._reclaim()
            while self._free and nxt < len(upcoming):
                key = upcoming[nxt]
                nxt += 1
                if key not in self._inflight and key not in self._ready:
                    self._inflight.add(key)
                    self._tasks.put((self._free.pop(), key))

        for i, want in enumerate(keys):
            nxt = max(nxt, i)          # keys before want were yielded: never submit them again
            fill()
            while want not in self._ready:
                if want not in self._inflight:
                    self._reclaim()
                    if not self._free:
                        # every slot is busy with later keys (a run restarted before an abandoned one's
                        # position): give up the ready batch needed last; it is made again when its turn comes
                        order = {key: j for j, key in enumerate(upcoming)}
                        last = max(self._ready, key=order.get, default=None)
                        if last is not None:
                            self._free.append(self._ready.pop(last)[0])
                            nxt = min(nxt, order[last])
                    if self._free:
                        self._inflight.add(want)
                        self._tasks.put((self._free.pop(), want))
                slot, key, k, err = self._get()
                self._inflight.discard(key)
                if err is not None and key in wanted:
                    self._free.append(slot)
                    name, user, msg, tb = err
                    if user:
                        raise CpnetError(msg)
                    raise RuntimeError(f"loader worker failed on batch {key}: {name}: {msg}\n{tb}")
                if err is None and key in keep and key not in self._ready:
                    self._ready[key] = (slot, k)
                else:
                    self._free.append(slot)
                    fill()
            slot, k = self._ready.pop(want)
            wanted.discard(want)
            keep.discard(want)
            x, y = self._slots[slot]
            if len(self._lent) < len(self._slots) - 1:
                batch = (self._wrap(x, k), y[:k].copy())
                self._lent.append(slot)
            else:
                batch = (self._wrap(x.copy(), k), y[:k].copy())
                self._free.append(slot)
            del x, y
            yield batch
            del batch                  # the caller's reference is the only one left

    def close(self):
        self._finalizer()


def _plain_wrap(x, k):
    return x[:k]


class _RawWrap:
    """(x, k) -> the RawBatch over a raw buffer x holding a batch of k images."""

    def __init__(self, layout, mean_chw, scale, train):
        self.layout, self.mean_chw, self.scale, self.train = layout, mean_chw, scale, train

    def __call__(self, x, k):
        return augment.RawBatch(x, k, self.layout, self.mean_chw, self.scale, self.train)


def _check_part(part):
    """(r, n) with 0 <= r < n."""
    r, n = (int(v) for v in part)
    if not (n >= 1 and 0 <= r < n):
        raise CpnetError(f"part {tuple(part)}: expected (r, n) with 0 <= r < n")
    return r, n


class _Loader:
    def _setup(self, path, batch_size, crop, workers, spec, slots, x_shape, beyond=0, raw=False, views=1):
        """`beyond`: how many pixels a crop may exceed the stored size by (2 x pad: crops that may leave the image
        by pad px on each side). `raw`: batches as augment.RawBatch (of `views` crops an image)."""
        self.path = os.fspath(path)
        self._workers = None
        if int(batch_size) < 1:
            raise CpnetError(f"batch size must be at least 1, got {batch_size}")
        if int(workers) < 0:
            raise CpnetError(f"workers must be 0 or more, got {workers}")
        ds = H5Dataset(self.path)
        try:
            self.n, self.size, self.classes = ds.n, ds.size, list(ds.classes)
            self.num_classes = ds.num_classes
            if crop < 1 or crop > ds.size + beyond:
                limit = f"{ds.size}" + (f" + 2 x pad = {ds.size + beyond}" if beyond else "")
                raise CpnetError(f"{self.path}: crop {crop} does not fit the stored image size {ds.size} "
                                 f"(expected 1 <= crop <= {limit})")
            self.raw = bool(raw)
            if self.raw:  # uint8 pixels and the per-crop choices instead of float32 crops (see augment.RawBatch)
                spec.layout = augment.RawLayout.choose(x_shape[0], views, int(crop), ds.size)
                x_shape = (spec.layout.nbytes,)
                self._wrap = _RawWrap(spec.layout, mean_chw_of(ds, spec.mean), spec.scale, spec.kind == "train")
            else:
                self._wrap = _plain_wrap
        except BaseException:
            ds.close()
            raise
        self.batch_size, self.crop, self.workers = int(batch_size), int(crop), int(workers)
        self._spec = spec
        self._x_shape = x_shape
        if self.workers == 0:
            self._ds, self._maker = ds, _Maker(ds, spec)
        else:
            ds.close()
            self._ds = self._maker = None
            self._slots = max(slots, self.workers) + 1    # + the one the caller is holding
            self._workers = _Workers(spec, self.workers, self._slots, x_shape, spec.rows[1], self._wrap)

    def _batches(self, keys, sizes, ahead=()):
        if self._workers is not None:
            yield from self._workers.run(keys, ahead)
            return
        if self._maker is None:
            raise CpnetError(f"{self.path}: loader is closed")
        for key, k in zip(keys, sizes):
            x = np.empty(self._spec.layout.nbytes, np.uint8) if self.raw else np.empty((k,) + self._x_shape[1:],
                                                                                      np.float32)
            y = np.empty(k, np.int64)
            self._maker.make(key, x, y)
            yield self._wrap(x, k), y

    def close(self):
        """Stop the workers and close the file (idempotent)."""
        w, self._workers = getattr(self, "_workers", None), None
        if w is not None:
            w.close()
        ds, self._ds, self._maker = getattr(self, "_ds", None), None, None
        if ds is not None:
            ds.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class TrainLoader(_Loader):
    """Shuffled, augmented training batches: (x float32 (B, 3, crop, crop), y int64 (B,)).

    Each epoch visits a permutation of the file drawn from (seed, epoch); the incomplete last batch is dropped.
    Crop position, flip, lighting and erased box of batch i of epoch e come from (seed, e, i) alone, so
    `epoch(e, start=k)`
    yields exactly batches k.. of `epoch(e)`, for any number of workers. See `data.augment` for the maths.

    `part=(r, n)`: this loader is replica r of n and yields rows [r*B/n, (r+1)*B/n) of each global batch of B
    (the same order, crops, flips and lighting as those rows of the whole batch; B must be a multiple of n).
    `first_row` is r*B/n.

    `raw=True`: each x is an `augment.RawBatch` instead, the uint8 pixels of the crop windows with the crops,
    flips and lighting shifts drawn as above, which the model turns into the same float32 batch on its device
    (the GPU input path: a quarter of the bytes to upload, the float work on the GPU).
    """

    def __init__(self, path, batch_size, crop, seed=0, workers=0, lighting=0.1, flip=True, prefetch=4, scale=1.0,
                 part=(0, 1), pad=0, raw=False, erase=0.0):
        if int(seed) < 0:
            raise CpnetError(f"seed must be 0 or more, got {seed}")
        if not 0 <= int(pad) < int(crop):
            raise CpnetError(f"pad must be in [0, crop={crop}), got {pad}")
        if int(prefetch) < 1:
            raise CpnetError(f"prefetch must be at least 1, got {prefetch}")
        if not 0 <= float(erase) <= 1:
            raise CpnetError(f"erase must be a probability in [0, 1], got {erase}")
        r, n = _check_part(part)
        if int(batch_size) % n:
            raise CpnetError(f"batch size {batch_size} does not split into {n} equal parts")
        rows = int(batch_size) // n
        self.first_row, self.rows = r * rows, rows
        spec = _Spec(os.fspath(path), "train", int(batch_size), int(crop), int(seed), float(lighting), bool(flip),
                     float(scale), rows=(self.first_row, rows), pad=int(pad), erase=float(erase))
        self.seed, self.lighting, self.flip, self.scale = int(seed), float(lighting), bool(flip), float(scale)
        self.pad, self.erase = int(pad), float(erase)
        self._setup(path, batch_size, crop, workers, spec, int(prefetch), (rows, 3, int(crop), int(crop)),
                    beyond=2 * self.pad, raw=raw)
        if self.n < self.batch_size:
            n = self.n
            self.close()
            raise CpnetError(f"{self.path}: {n} images, fewer than one training batch of {self.batch_size}")
        self.batches_per_epoch = self.n // self.batch_size

    def epoch(self, epoch, start=0):
        """Iterator over batches start..batches_per_epoch-1 of `epoch` (starting a new one abandons the last)."""
        if not 0 <= int(start) <= self.batches_per_epoch:
            raise ValueError(f"start must be in [0, {self.batches_per_epoch}], got {start}")
        keys = [(int(epoch), i) for i in range(int(start), self.batches_per_epoch)]
        ahead = [(int(epoch) + 1, i) for i in range(min(self.batches_per_epoch, getattr(self, "_slots", 0)))]
        return self._batches(keys, [self.rows] * len(keys), ahead)

    def __len__(self):
        return self.batches_per_epoch


class EvalLoader(_Loader):
    """Every image exactly once, in file order: (x float32 (b, V, 3, crop, crop), y int64 (b,)), the last batch
    possibly smaller. views='center': V=1, the centre crop; views='ten': the paper's 10 views in
    `augment.TEN_VIEW_ORDER` (centre, top-left, top-right, bottom-left, bottom-right, then the same mirrored).
    A crop larger than the stored images by up to 2 x `pad` (a net trained with crops that left whole small
    images by up to `pad` px) sees each image on a canvas of the mean colour: centred, or in the canvas's
    corners for the corner views.
    No lighting; the mean image is subtracted at each view's window: the file's own, or `mean` (S, S, 3) when
    given (a checkpoint's training mean, for a file prepared apart from the training set).

    `part=(r, n)`: only images [r*N/n, (r+1)*N/n) of the file's N (replica r's share of a sharded evaluation:
    the n parts together hold every image exactly once). `len(loader.span)` images are visited.

    `raw=True`: each x is an `augment.RawBatch` of the same views (see TrainLoader), the pixels as crop windows or
    as whole images, whichever is fewer bytes (`augment.RawLayout.choose`)."""

    def __init__(self, path, batch_size, crop, views="center", workers=0, scale=1.0, prefetch=2, mean=None,
                 part=(0, 1), pad=0, raw=False):
        if views not in augment.VIEWS:
            raise CpnetError(f"views must be 'center' or 'ten', got {views!r}")
        r, n = _check_part(part)
        self.views, self.num_views, self.scale = views, augment.VIEWS[views], float(scale)
        with H5Dataset(os.fspath(path)) as ds:
            total = ds.n
        if total == 0:
            raise CpnetError(f"{os.fspath(path)}: no images to evaluate")
        batch_size = max(1, min(int(batch_size), total))   # never a buffer larger than the file
        self.span = range(r * total // n, (r + 1) * total // n)
        spec = _Spec(os.fspath(path), "eval", int(batch_size), int(crop), scale=float(scale), views=views,
                     mean=None if mean is None else np.ascontiguousarray(mean, np.float32),
                     span=(self.span.start, self.span.stop), pad=int(pad))
        self._setup(path, batch_size, crop, workers, spec, max(1, int(prefetch)),
                    (int(batch_size), self.num_views, 3, int(crop), int(crop)), beyond=2 * int(pad), raw=raw,
                    views=self.num_views)

    def __len__(self):
        return -(-len(self.span) // self.batch_size)

    def __iter__(self):
        b, m = self.batch_size, len(self.span)
        keys = list(range(len(self)))
        return self._batches(keys, [min(b, m - i * b) for i in keys])
