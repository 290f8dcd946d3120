"""Writing dataset files: a split's work as a `Job` of units, written unit by unit to `<name>.h5.partial`.

A `Job` is a list of tasks; a task is a picklable (function, args, items) triple whose function returns
(images uint8 (k, S, S, 3), labels int64 (k,), skipped [(name, reason)]). Tasks run in this process or, with
workers > 0, in a process pool (decode in parallel, write in order). After each unit the partial file is flushed,
then its progress record (`_progress/record`: units done, images written, skipped count and the running sums of
the statistics, with a CRC, as one dataset written in one call) is updated and flushed again, so the record never
runs ahead of the images. `resume=True` checks the record against the file (the images it holds must add up to
the recorded sums exactly) and continues after the last recorded unit, or starts the split over when anything
disagrees. The finished file gets the mean and PCA, its `_progress` group is dropped, it is read back and checked
against the sums, fsynced, and only then renamed to `<name>.h5`. A failed write (a full disk) is one CpnetError;
the HDF5 file is abandoned without HDF5 retrying its writes (`cpnet.files.abandon_h5`).
"""

import json
import os
import time
import zlib

import h5py
import numpy as np

from cpnet import __version__
from cpnet.errors import CpnetError
from cpnet.files import FolderLock, abandon_h5, write_error

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


class _Doubt(Exception):
    """The partial file cannot be trusted (damaged, or its progress record disagrees with its contents)."""


# The progress record: one float64 dataset, written in one call after the unit's images are flushed, so the
# position, the counters and the running sums can only reach the file together (a torn write fails the CRC):
#   [units_done, n_written, n_skipped, count, img_sum (S*S*3), pix_sum (3), pix_outer (9), crc32 of the rest]
def _record_len(size):
    return 4 + size * size * 3 + 3 + 9 + 1


def _pack_record(units_done, n, nskip, st):
    body = np.concatenate([[units_done, n, nskip, st.count], st.img_sum.ravel(), st.pix_sum, st.pix_outer.ravel()])
    return np.concatenate([body, [zlib.crc32(body.astype(np.float64).tobytes())]])


def _unpack_record(rec, size):
    rec = np.asarray(rec, np.float64)
    if rec.shape != (_record_len(size),):
        raise _Doubt(f"its progress record has {rec.size} values, expected {_record_len(size)}")
    if zlib.crc32(rec[:-1].tobytes()) != rec[-1]:
        raise _Doubt("its progress record fails its checksum (a write was cut short)")
    units_done, n, nskip, count = (int(v) for v in rec[:4])
    st = RunningStats(size)
    st.count = count
    a = 4 + size * size * 3
    st.img_sum[...] = rec[4:a].reshape(size, size, 3)
    st.pix_sum[...] = rec[a:a + 3]
    st.pix_outer[...] = rec[a + 3:a + 12].reshape(3, 3)
    return units_done, n, nskip, st


def _image_sum(images, n, size, block_bytes=1 << 26):
    """Sum over images[:n] in float64 (exact: integer sums far below 2**53), read in blocks of ~64 MB."""
    total = np.zeros((size, size, 3), np.float64)
    step = max(1, block_bytes // (size * size * 3))
    buf = np.empty((min(step, max(n, 1)), size, size, 3), np.uint8)
    for a in range(0, n, step):
        b = min(n, a + step)
        images.read_direct(buf, np.s_[a:b], np.s_[0:b - a])
        total += buf[:b - a].sum(axis=0, dtype=np.float64)
    return total


def _check_contents(f, n, st, size):
    """Raise _Doubt unless the file holds n readable images whose sum is the record's (exactly)."""
    img, lab = f["images"], f["labels"]
    if img.shape[0] < n or lab.shape[0] < n:
        raise _Doubt(f"its progress record says {n} images, the file holds {min(img.shape[0], lab.shape[0])}")
    if st.count != n:
        raise _Doubt(f"its running sums cover {st.count} images, its position {n}")
    if not np.array_equal(_image_sum(img, n, size), st.img_sum):
        raise _Doubt("the images it holds do not add up to its recorded sums")


def _create(path, job, split):
    S = job.size
    f = h5py.File(path, "w")
    f.create_dataset("images", shape=(0, S, S, 3), maxshape=(None, S, S, 3), dtype=np.uint8, chunks=(1, S, S, 3))
    f.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(16384,))
    f.create_dataset("classes", data=np.array(job.classes, dtype=object), dtype=h5py.string_dtype())
    f.attrs.update(format_version=FORMAT_VERSION, source=job.source, size=S, split=split,
                   created_by=f"cpnet {__version__}")
    g = f.create_group("_progress")
    g.attrs["signature"] = json.dumps(job.signature, sort_keys=True)
    g.create_dataset("record", data=_pack_record(0, 0, 0, RunningStats(S)))
    g.create_dataset("skipped", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(256,))
    f.flush()
    return f


def _open_partial(path, job):
    """(file, units_done, n, nskip, stats) of an unfinished file, checked against its record; CpnetError when it
    was started with other settings, _Doubt when it is damaged."""
    try:
        f = h5py.File(path, "r+")
    except Exception as e:
        raise _Doubt(f"it cannot be opened ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    try:
        g = f.get("_progress")
        if g is None or "record" not in g:
            raise _Doubt("it has no progress record")
        if _decode(g.attrs.get("signature")) != json.dumps(job.signature, sort_keys=True):
            f.close()
            raise CpnetError(f"{path}: was started with other inputs or settings than this command; "
                             "start over with --overwrite")
        units_done, n, nskip, st = _unpack_record(g["record"][...], job.size)
        if not 0 <= units_done <= len(job.tasks) or n > sum(t[2] for t in job.tasks[:units_done]):
            raise _Doubt(f"its progress record ({units_done} units, {n} images) does not fit this job")
        if g["skipped"].shape[0] < nskip:
            raise _Doubt(f"its progress record lists {nskip} skipped inputs, the file {g['skipped'].shape[0]}")
        _check_contents(f, n, st, job.size)
        for name in ("images", "labels"):     # drop anything written after the last recorded unit
            f[name].resize(n, axis=0)
        g["skipped"].resize(nskip, axis=0)
        for name in ("mean", "pca", "skipped"):   # a finish that was cut short
            if name in f:
                del f[name]
        return f, units_done, n, nskip, st
    except (_Doubt, CpnetError):
        abandon_h5(f)
        raise
    except Exception as e:          # h5py: a damaged structure inside the file
        abandon_h5(f)
        raise _Doubt(f"it is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def train_stats(path):
    """(mean, cov, pixels) stored in a finished training file, to copy into its validation file."""
    with h5py.File(path, "r") as f:
        cov = f["pca/cov"][...] if "pca/cov" in f else None
        return f["mean"][...], cov, f["pca/eigval"][...], f["pca/eigvec"][...], int(f.attrs.get("stats_pixels", 0))


def _verify(path, job, n, st):
    """Read the finished file back before it is renamed: readable as a dataset, n images adding up to the sums."""
    try:
        with H5Dataset(path) as ds:
            if ds.n != n or ds.classes != job.classes or ds.size != job.size:
                raise _Doubt(f"reads back as {ds.n} images of {ds.size} px in {ds.num_classes} classes, "
                             f"{n} of {job.size} px in {len(job.classes)} were written")
            if not np.array_equal(_image_sum(ds._images, n, job.size), st.img_sum):
                raise _Doubt("its images read back differ from what was written")
    except CpnetError as e:
        raise _Doubt(str(e)) from None
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise _Doubt(f"cannot be read back ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _fsync(path):
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_split(out, job, split, train_file=None, workers=0, resume=False, overwrite=False, strict=False,
                progress=None, notice=None):
    """Write `job` to the file `out` (via out + '.partial'); return a summary dict.

    split: 'train' computes the mean and PCA of these images; 'val' copies them from the finished `train_file`.
    resume: continue `out.partial`, or keep a finished `out` made with the same inputs and settings. A partial
    file that fails its checks (unreadable, or its progress record disagrees with the images it holds) is
    started over, and `notice(message)` says so.
    overwrite: replace what is there. Neither: refuse to touch existing files.
    strict: the first skipped input is an error (what was written so far stays in the partial file).
    A failed write (a full disk) is a CpnetError naming the file; what was recorded before it stays resumable.
    """
    out = os.fspath(out)
    partial = out + ".partial"
    sig = json.dumps(job.signature, sort_keys=True)
    if os.path.exists(out) and not overwrite:
        if not resume:
            raise CpnetError(f"{out}: already exists; pass --overwrite to replace it or --resume to keep it")
        try:
            with H5Dataset(out) as ds:
                if _decode(ds.attrs.get("prep_signature")) != sig:
                    raise CpnetError(f"{out}: was made with other inputs or settings; pass --overwrite to replace it")
                n = ds.n
                skipped = [_decode(s) for s in ds._f["skipped"][...]] if "skipped" in ds._f else []
        except (OSError, RuntimeError, KeyError) as e:
            raise CpnetError(f"{out}: cannot be read ({str(e).splitlines()[0]}); pass --overwrite to make it "
                             "again") from None
        return {"file": out, "n": n, "skipped": [_split_skipped(s) for s in skipped], "kept": True}
    if os.path.exists(partial):
        if overwrite:
            os.remove(partial)
        elif not resume:
            raise CpnetError(f"{partial}: an unfinished prep is there; pass --resume to continue it "
                             "or --overwrite to start over")
    doing = f"writing {split} images"
    then = "free some space, then continue with --resume"
    f = None
    try:
        if os.path.exists(partial):
            try:
                f, start, n, nskip, st = _open_partial(partial, job)
            except _Doubt as d:
                if notice is not None:
                    notice(f"{partial}: {d}; starting {split} over")
                os.remove(partial)
        if f is None:
            f = _create(partial, job, split)
            start, n, nskip, st = 0, 0, 0, RunningStats(job.size)
        # one handle per dataset for the whole loop: a temporary h5py object closed mid-loop would flush from its
        # destructor, where a failed write is only printed, not raised
        g = f["_progress"]
        images_d, labels_d, skipped_d, record_d = f["images"], f["labels"], g["skipped"], g["record"]
        prog = _Progress(progress, split, job.items, sum(t[2] for t in job.tasks[:start]))
        todo = job.tasks[start:]
        pool = None
        if workers > 0 and len(todo) > 1:
            from .loader import _context, without_main_module
            with without_main_module():
                pool = _context().Pool(min(workers, len(todo)))
            results = pool.imap(_run_task_packed, [(t, True) for t in todo])
        else:
            results = (_run_task(t, True) for t in todo)
        try:
            for i, (images, labels, skipped, ust) in enumerate(results, start):
                if strict and skipped:
                    name, reason = skipped[0]
                    raise CpnetError(f"{name}: {reason} (--strict stops at the first bad input)")
                k = len(images)
                if k:
                    if images.shape[1:] != (job.size, job.size, 3) or images.dtype != np.uint8:
                        raise ValueError(f"task {i} returned {images.dtype} {images.shape}")
                    bad = (labels < 0) | (labels >= len(job.classes))
                    if bad.any():
                        raise CpnetError(f"{job.source}: label {int(labels[bad][0])} outside "
                                         f"[0, {len(job.classes)})")
                    images_d.resize(n + k, axis=0)
                    images_d.write_direct(np.ascontiguousarray(images), dest_sel=np.s_[n:n + k])
                    labels_d.resize(n + k, axis=0)
                    labels_d[n:n + k] = labels
                if skipped:
                    skipped_d.resize(nskip + len(skipped), axis=0)
                    skipped_d[nskip:] = [_join_skipped(a, b) for a, b in skipped]
                    nskip += len(skipped)
                st.add(ust)
                n += k
                f.flush()                                   # the unit's images first ...
                record_d[...] = _pack_record(i + 1, n, nskip, st)
                f.flush()                                   # ... then the record that says they are there
                prog(job.tasks[i][2], n, nskip)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        if n == 0:
            raise CpnetError(f"{job.source}: no readable images for {os.path.basename(out)} "
                             f"({nskip} skipped, see skipped.txt)")
        skipped = [_decode(s) for s in skipped_d[...]]
        del images_d, labels_d, skipped_d, record_d, g
        if split == "train":
            mean, cov, pixels = st.mean(), st.cov(), st.pixels
            eigval, eigvec = rgb_pca(cov)
        else:
            mean, cov, eigval, eigvec, pixels = train_stats(train_file)
            if mean.shape != (job.size, job.size, 3):
                raise CpnetError(f"{train_file}: mean image is {mean.shape[:2]}, this split is {job.size} px")
        doing, then = f"finishing {os.path.basename(out)}", "free some space, then continue with --resume"
        hold = [f.create_dataset("mean", data=np.asarray(mean, np.float32)),   # handles kept: see the loop
                f.create_dataset("pca/eigval", data=np.asarray(eigval, np.float32)),
                f.create_dataset("pca/eigvec", data=np.asarray(eigvec, np.float32))]
        if cov is not None:
            hold.append(f.create_dataset("pca/cov", data=np.asarray(cov, np.float64)))
        hold[1].attrs["definition"] = ("eigenvalues of the RGB covariance on the [0, 1] scale times 255 "
                                       "(= eig(pca/cov) / 255), largest first")
        hold[2].attrs["definition"] = "column i is the unit eigenvector of eigval[i]"
        f.attrs.update(stats_from="train", stats_pixels=pixels, prep_signature=sig,
                       stats_note="mean and PCA are the training set's (every pixel of every training image)")
        if skipped:
            hold.append(f.create_dataset("skipped", data=np.array(skipped, dtype=object), dtype=h5py.string_dtype()))
        del f["_progress"]
        f.flush()
        f.close()
        f = hold = None
        doing, then = f"verifying {os.path.basename(out)}", ""
        _verify(partial, job, n, st)
        _fsync(partial)
        os.replace(partial, out)
    except _Doubt as d:
        raise CpnetError(f"{partial}: {d}; nothing was renamed to {os.path.basename(out)}: start over with "
                         "--overwrite") from None
    except (OSError, RuntimeError) as e:
        if f is not None:
            abandon_h5(f)
            f = None
        raise write_error(partial, e, doing, then) from None
    finally:
        if f is not None:     # interrupted (Ctrl-C, --strict): close normally, the record says how far it got
            try:
                f.close()
            except Exception:
                abandon_h5(f)
    return {"file": out, "n": n, "skipped": [_split_skipped(s) for s in skipped], "kept": False}


def _join_skipped(name, reason):
    """`name<TAB>reason` with tabs, newlines and other control characters in either shown as escapes."""
    return f"{_escape(name)}\t{_escape(reason)}"


def _split_skipped(line):
    a, _, b = line.partition("\t")
    return a, b


def _escape(text):
    """A one-line printable form of a file name or message: control characters as backslash escapes, bytes
    that are not UTF-8 (surrogate-escaped names) as \\xNN."""
    out = []
    for ch in str(text):
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:
            out.append(f"\\x{o - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif o < 32 or o == 127:
            out.append({"\t": "\\t", "\n": "\\n", "\r": "\\r"}.get(ch, f"\\x{o:02x}"))
        else:
            out.append(ch)
    return "".join(out)


def write_skipped(outdir, summaries):
    """OUT/skipped.txt: one line per skipped input, `split<TAB>name<TAB>reason` (tabs, newlines and bytes that are
    not UTF-8 in names escaped, so that every input is one line); removed when nothing was skipped."""
    path = os.path.join(outdir, "skipped.txt")
    lines = [f"{split}\t{name}\t{reason}" for split, s in summaries.items() for name, reason in s["skipped"]]
    if lines:
        tmp = path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    elif os.path.exists(path):
        os.remove(path)
    return path if lines else None


def run(outdir, jobs, workers=0, resume=False, overwrite=False, strict=False, progress=None, notice=None):
    """Write jobs {'train': Job, 'val': Job or None, 'test': Job or None (optional)} to OUT/train.h5, OUT/val.h5
    and OUT/test.h5; return the summaries. val and test carry the training set's mean and PCA.

    OUT is locked for the run (`cpnet.files.FolderLock`): a second prep into it is refused, naming the first.
    """
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as e:
        raise write_error(outdir, e, "creating the output folder") from None
    with FolderLock(outdir, "cpnet prep"):
        summaries = {}
        train_file = os.path.join(outdir, "train.h5")
        for split in ("train", "val", "test"):
            job = jobs.get(split)
            if job is None or not job.tasks:
                continue
            summaries[split] = write_split(os.path.join(outdir, f"{split}.h5"), job, split, train_file=train_file,
                                           workers=workers, resume=resume, overwrite=overwrite, strict=strict,
                                           progress=progress, notice=notice)
        try:
            write_skipped(outdir, summaries)
        except OSError as e:
            raise write_error(os.path.join(outdir, "skipped.txt"), e, "writing the list of skipped inputs") from None
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
