"""Writing dataset files: a split's work as a `Job` of units, written unit by unit to `<name>.h5.partial`.

A `Job` is a list of tasks; a task is a picklable (function, args, items) triple whose function returns
(images uint8 (k, S, S, 3), labels int64 (k,), skipped [(name, reason)]). Tasks run in this process or, with
workers > 0, in a process pool (decode in parallel, write in order). After each unit the partial file records how
far it got (`_progress`: units done, images written, the running sums of the statistics, the skipped list) and
is flushed, so `resume=True` continues after the last finished unit. The finished file gets the mean and PCA, its
`_progress` group is dropped, and it is renamed to `<name>.h5`.
"""

import json
import os
import time

import h5py
import numpy as np

from cpnet import __version__
from cpnet.errors import CpnetError

from .h5format import FORMAT_VERSION, H5Dataset, RunningStats, rgb_pca


class Job:
    """One split's work. tasks: [(function, args, items)], items counting the inputs for progress."""

    def __init__(self, source, classes, size, tasks, signature):
        self.source, self.classes, self.size = source, list(classes), int(size)
        self.tasks, self.signature = list(tasks), dict(signature)

    @property
    def items(self):
        return sum(t[2] for t in self.tasks)


def _run_task(task, stats):
    fn, args, _ = task
    images, labels, skipped = fn(*args)
    return images, labels, skipped, (RunningStats.of(images) if stats else None)


def _run_task_packed(packed):
    return _run_task(*packed)


class _Progress:
    """Callback adapter: progress(split, done_items, total_items, written, skipped, seconds)."""

    def __init__(self, fn, split, total, done=0):
        self.fn, self.split, self.total, self.done = fn, split, total, done
        self.t0, self.done0 = time.monotonic(), done

    def __call__(self, items, written, skipped):
        self.done += items
        if self.fn is not None:
            self.fn(self.split, self.done, self.total, written, skipped, time.monotonic() - self.t0,
                    self.done - self.done0)


def _decode(v):
    return v.decode() if isinstance(v, bytes) else v


def _create(path, job, split):
    S = job.size
    f = h5py.File(path, "w")
    f.create_dataset("images", shape=(0, S, S, 3), maxshape=(None, S, S, 3), dtype=np.uint8, chunks=(1, S, S, 3))
    f.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(16384,))
    f.create_dataset("classes", data=np.array(job.classes, dtype=object), dtype=h5py.string_dtype())
    f.attrs.update(format_version=FORMAT_VERSION, source=job.source, size=S, split=split,
                   created_by=f"cpnet {__version__}")
    g = f.create_group("_progress")
    g.attrs.update(signature=json.dumps(job.signature, sort_keys=True), units_done=0, n_written=0, count=0)
    g.create_dataset("img_sum", data=np.zeros((S, S, 3)))
    g.create_dataset("pix_sum", data=np.zeros(3))
    g.create_dataset("pix_outer", data=np.zeros((3, 3)))
    g.create_dataset("skipped", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(256,))
    f.flush()
    return f


def _open_partial(path, job):
    try:
        f = h5py.File(path, "r+")
    except OSError as e:
        raise CpnetError(f"{path}: cannot reopen the unfinished file to resume ({e}); "
                         "start over with --overwrite") from None
    g = f.get("_progress")
    if g is None or _decode(g.attrs.get("signature")) != json.dumps(job.signature, sort_keys=True):
        f.close()
        raise CpnetError(f"{path}: was started with other inputs or settings than this command; "
                         "start over with --overwrite")
    n = int(g.attrs["n_written"])
    f["images"].resize(n, axis=0)        # drop anything written after the last recorded unit
    f["labels"].resize(n, axis=0)
    return f


def _stats_from_progress(g, size):
    st = RunningStats(size)
    st.count = int(g.attrs["count"])
    st.img_sum[...] = g["img_sum"][...]
    st.pix_sum[...] = g["pix_sum"][...]
    st.pix_outer[...] = g["pix_outer"][...]
    return st


def train_stats(path):
    """(mean, cov, pixels) stored in a finished training file, to copy into its validation file."""
    with h5py.File(path, "r") as f:
        cov = f["pca/cov"][...] if "pca/cov" in f else None
        return f["mean"][...], cov, f["pca/eigval"][...], f["pca/eigvec"][...], int(f.attrs.get("stats_pixels", 0))


def write_split(out, job, split, train_file=None, workers=0, resume=False, overwrite=False, strict=False,
                progress=None):
    """Write `job` to the file `out` (via out + '.partial'); return a summary dict.

    split: 'train' computes the mean and PCA of these images; 'val' copies them from the finished `train_file`.
    resume: continue `out.partial`, or keep a finished `out` made with the same inputs and settings.
    overwrite: replace what is there. Neither: refuse to touch existing files.
    strict: the first skipped input is an error (what was written so far stays in the partial file).
    """
    out = os.fspath(out)
    partial = out + ".partial"
    sig = json.dumps(job.signature, sort_keys=True)
    if os.path.exists(out) and not overwrite:
        if not resume:
            raise CpnetError(f"{out}: already exists; pass --overwrite to replace it or --resume to keep it")
        with h5py.File(out, "r") as f:
            if _decode(f.attrs.get("prep_signature")) != sig:
                raise CpnetError(f"{out}: was made with other inputs or settings; pass --overwrite to replace it")
            skipped = [_decode(s) for s in f["skipped"][...]] if "skipped" in f else []
            n = int(f["images"].shape[0])
        return {"file": out, "n": n, "skipped": [tuple(s.split("\t", 1)) for s in skipped], "kept": True}
    if os.path.exists(partial):
        if overwrite:
            os.remove(partial)
        elif not resume:
            raise CpnetError(f"{partial}: an unfinished prep is there; pass --resume to continue it "
                             "or --overwrite to start over")
    f = _open_partial(partial, job) if os.path.exists(partial) else _create(partial, job, split)
    finished = False
    try:
        g = f["_progress"]
        start = int(g.attrs["units_done"])
        n = int(g.attrs["n_written"])
        st = _stats_from_progress(g, job.size)
        nskip = len(g["skipped"])
        prog = _Progress(progress, split, job.items, sum(t[2] for t in job.tasks[:start]))
        want_stats = split == "train"
        todo = job.tasks[start:]
        pool = None
        if workers > 0 and len(todo) > 1:
            from .loader import _context, without_main_module
            with without_main_module():
                pool = _context().Pool(min(workers, len(todo)))
            results = pool.imap(_run_task_packed, [(t, want_stats) for t in todo])
        else:
            results = (_run_task(t, want_stats) for t in todo)
        try:
            for i, (images, labels, skipped, ust) in enumerate(results, start):
                if strict and skipped:
                    name, reason = skipped[0]
                    raise CpnetError(f"{name}: {reason} (--strict stops at the first bad input)")
                k = len(images)
                if k:
                    if images.shape[1:] != (job.size, job.size, 3) or images.dtype != np.uint8:
                        raise RuntimeError(f"task {i} returned {images.dtype} {images.shape}")
                    bad = (labels < 0) | (labels >= len(job.classes))
                    if bad.any():
                        raise CpnetError(f"{job.source}: label {int(labels[bad][0])} outside "
                                         f"[0, {len(job.classes)})")
                    f["images"].resize(n + k, axis=0)
                    f["images"].write_direct(np.ascontiguousarray(images), dest_sel=np.s_[n:n + k])
                    f["labels"].resize(n + k, axis=0)
                    f["labels"][n:n + k] = labels
                if skipped:
                    d = g["skipped"]
                    d.resize(nskip + len(skipped), axis=0)
                    d[nskip:] = [f"{a}\t{b}" for a, b in skipped]
                    nskip += len(skipped)
                if ust is not None:
                    st.add(ust)
                    g["img_sum"][...] = st.img_sum
                    g["pix_sum"][...] = st.pix_sum
                    g["pix_outer"][...] = st.pix_outer
                n += k
                g.attrs.update(units_done=i + 1, n_written=n, count=st.count)
                f.flush()
                prog(job.tasks[i][2], n, nskip)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        if n == 0:
            raise CpnetError(f"{job.source}: no readable images for {os.path.basename(out)} "
                             f"({nskip} skipped, see skipped.txt)")
        skipped = [_decode(s) for s in g["skipped"][...]]
        if split == "train":
            mean, cov, pixels = st.mean(), st.cov(), st.pixels
            eigval, eigvec = rgb_pca(cov)
        else:
            mean, cov, eigval, eigvec, pixels = train_stats(train_file)
            if mean.shape != (job.size, job.size, 3):
                raise CpnetError(f"{train_file}: mean image is {mean.shape[:2]}, this split is {job.size} px")
        f.create_dataset("mean", data=np.asarray(mean, np.float32))
        f.create_dataset("pca/eigval", data=np.asarray(eigval, np.float32))
        f.create_dataset("pca/eigvec", data=np.asarray(eigvec, np.float32))
        if cov is not None:
            f.create_dataset("pca/cov", data=np.asarray(cov, np.float64))
        f["pca/eigval"].attrs["definition"] = ("eigenvalues of the RGB covariance on the [0, 1] scale times 255 "
                                               "(= eig(pca/cov) / 255), largest first")
        f["pca/eigvec"].attrs["definition"] = "column i is the unit eigenvector of eigval[i]"
        f.attrs.update(stats_from="train", stats_pixels=pixels, prep_signature=sig,
                       stats_note="mean and PCA are the training set's (every pixel of every training image)")
        if skipped:
            f.create_dataset("skipped", data=np.array(skipped, dtype=object), dtype=h5py.string_dtype())
        del f["_progress"]
        f.flush()
        finished = True
    finally:
        f.close()
    if finished:
        os.replace(partial, out)
    return {"file": out, "n": n, "skipped": [tuple(s.split("\t", 1)) for s in skipped], "kept": False}


def write_skipped(outdir, summaries):
    """OUT/skipped.txt: one line per skipped input, `split<TAB>name<TAB>reason`; removed when nothing was."""
    path = os.path.join(outdir, "skipped.txt")
    lines = [f"{split}\t{name}\t{reason}" for split, s in summaries.items() for name, reason in s["skipped"]]
    if lines:
        with open(path, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    elif os.path.exists(path):
        os.remove(path)
    return path if lines else None


def run(outdir, jobs, workers=0, resume=False, overwrite=False, strict=False, progress=None):
    """Write jobs {'train': Job, 'val': Job or None} to OUT/train.h5 and OUT/val.h5; return the summaries."""
    os.makedirs(outdir, exist_ok=True)
    summaries = {}
    train_file = os.path.join(outdir, "train.h5")
    for split in ("train", "val"):
        job = jobs.get(split)
        if job is None or not job.tasks:
            continue
        summaries[split] = write_split(os.path.join(outdir, f"{split}.h5"), job, split, train_file=train_file,
                                       workers=workers, resume=resume, overwrite=overwrite, strict=strict,
                                       progress=progress)
    write_skipped(outdir, summaries)
    return summaries


def describe(path):
    """A dict describing a finished dataset file (what `cpnet info` prints)."""
    with H5Dataset(path) as ds:
        counts = ds.class_counts()
        return {
            "file": ds.path, "n": ds.n, "size": ds.size, "num_classes": ds.num_classes, "classes": ds.classes,
            "counts": counts.tolist(), "mean_rgb": ds.mean.reshape(-1, 3).mean(axis=0).tolist(),
            "eigval": ds.eigval.tolist(), "eigvec": ds.eigvec.tolist(), "attrs": ds.attrs,
        }


def constant_images(path, sample=2000):
    """(constant, checked): how many of an even sample of at most `sample` images of a dataset file hold one
    colour only (every pixel alike), and how many were checked. Many such images point at a preparation problem,
    e.g. drawings carried by an alpha channel alone."""
    with H5Dataset(path) as ds:
        if ds.n == 0:
            return 0, 0
        idx = np.unique(np.linspace(0, ds.n - 1, min(sample, ds.n)).astype(np.int64))
        constant = 0
        for a in range(0, len(idx), 256):
            x = ds.read(idx[a:a + 256]).reshape(len(idx[a:a + 256]), -1, 3)
            constant += int((x == x[:, :1]).all(axis=(1, 2)).sum())
        return constant, len(idx)
