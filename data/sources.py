"""Image sources -> `prep.Job`s: the synthetic set, image folders, CIFAR tarballs, IDX (MNIST-family) files.

Every source ends in the same images: RGB uint8 (S, S, 3), the shorter side resized to S with Pillow's
antialiasing bicubic filter and the centre cut to S x S (the paper's recipe); an image already S x S is stored
unchanged.
"""

import gzip
import hashlib
import io
import os
import pickle
import re
import tarfile

import numpy as np

from cpnet.errors import CpnetError

from . import synthetic
from .prep import Job


# ---------------------------------------------------------------------------------------------------- resizing

WHITE = (255, 255, 255)


def has_alpha(img):
    """Whether a PIL image carries transparency: an alpha band (RGBA, LA, PA, ...) or a palette or grey level
    marked transparent."""
    return "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info


def to_rgb(img, background=WHITE):
    """A PIL image in RGB. Transparent pixels are composited over `background` (an RGB triple): dropping the
    alpha would leave whatever the invisible pixels hold, often black, where only the alpha drew the shape."""
    from PIL import Image
    if has_alpha(img):
        rgba = img.convert("RGBA")
        out = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(out, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")   # L, P, CMYK, I;16 ...


def fit_square(img, size, background=WHITE):
    """A PIL image -> RGB uint8 (size, size, 3): transparency over `background`, shorter side to `size`
    (antialiased), centre crop."""
    from PIL import Image
    img = to_rgb(img, background)
    w, h = img.size
    if (w, h) != (size, size):
        if min(w, h) != size:
            s = size / min(w, h)
            nw, nh = max(size, round(w * s)), max(size, round(h * s))
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
            w, h = nw, nh
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).reshape(size, size, 3)


def fit_array(images, size):
    """uint8 (n, h, w, 3) -> (n, size, size, 3), through `fit_square` unless already at that size."""
    if images.shape[1:3] == (size, size):
        return np.ascontiguousarray(images)
    from PIL import Image
    return np.stack([fit_square(Image.fromarray(im), size) for im in images]) if len(images) else \
        np.zeros((0, size, size, 3), np.uint8)


# --------------------------------------------------------------------------------------------------- synthetic

def _synthetic_task(seed, split, start, count, size, classes):
    images, labels = synthetic.generate(seed, split, count, size, classes, start=start)
    return images, labels, []


def synthetic_jobs(n=6000, classes=10, size=36, seed=0, val_fraction=0.2):
    """Jobs for the built-in synthetic set: n training images and round(val_fraction * n) validation images."""
    if not 1 <= classes <= len(synthetic.SHAPES):
        raise CpnetError(f"--classes must be in [1, {len(synthetic.SHAPES)}] for the synthetic set, got {classes}")
    if n < 1 or size < 8:
        raise CpnetError(f"--n must be at least 1 and --size at least 8, got n={n}, size={size}")
    if not 0 <= val_fraction < 1:
        raise CpnetError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    bs = synthetic.block_size(size)
    jobs = {}
    for split, count in (("train", n), ("val", int(round(val_fraction * n)))):
        tasks = [(_synthetic_task, (seed, split, a, min(bs, count - a), size, classes), min(bs, count - a))
                 for a in range(0, count, bs)]
        sig = {"source": "synthetic", "seed": seed, "n": count, "size": size, "classes": classes, "split": split}
        src = f"synthetic seed={seed} classes={classes} size={size}"
        jobs[split] = Job(src, synthetic.SHAPES[:classes], size, tasks, sig) if tasks else None
    return jobs


def _array_task(images, labels, size):
    return fit_array(images, size), np.asarray(labels, np.int64), []


def array_job(source, classes, images, labels, size, signature, unit=1000):
    """A Job over in-memory uint8 (n, h, w, 3) images, `unit` images per task."""
    tasks = [(_array_task, (images[a:a + unit], labels[a:a + unit], size), len(images[a:a + unit]))
             for a in range(0, len(images), unit)]
    return Job(source, classes, size, tasks, signature)


def stratified_split(labels, fraction, seed=0):
    """(kept, held out): index arrays, in their original order, holding out round(fraction * n_c) of each class c
    (at least one image of every class that has two, so that a small set still gets a validation file).

    Class c's pick is the first k of a permutation drawn from SeedSequence([seed, c]), so it depends on the seed,
    the class and that class's count only.
    """
    labels = np.asarray(labels, np.int64)
    held = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        k = max(int(round(fraction * len(where))), 1 if len(where) >= 2 else 0)
        held[where[np.random.default_rng(np.random.SeedSequence([seed, int(c)])).permutation(len(where))[:k]]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def _file_signature(path):
    st = os.stat(path)
    return {"file": os.path.abspath(path), "bytes": st.st_size, "mtime": int(st.st_mtime)}


# ------------------------------------------------------------------------------------------------ image folders

IMAGE_HINT = "any format Pillow reads"


def _visible_files(folder):
    """Names of the entries of `folder` that may be images: files, and symlinks that are not folders. A dangling
    symlink or a symlink loop is kept, so that decoding it fails and lists it in skipped.txt with its reason."""
    names = []
    for e in os.scandir(folder):
        if e.name.startswith("."):
            continue
        try:
            if e.is_dir():
                continue
            if e.is_file() or e.is_symlink():
                names.append(e.name)
        except OSError:                 # a symlink loop (ELOOP) and the like
            names.append(e.name)
    return sorted(names)


def _class_dirs(root):
    """Class folder names of `root` (a symlink loop is not one); they must be valid UTF-8 (they are stored)."""
    names = []
    for e in os.scandir(root):
        try:
            if e.name.startswith(".") or not e.is_dir():
                continue
        except OSError:
            continue
        try:
            e.name.encode("utf-8")
        except UnicodeEncodeError:
            shown = e.name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise CpnetError(f"{os.path.join(root, shown)}: class folder name is not UTF-8 (class names are "
                             "stored in the dataset file); rename it") from None
        names.append(e.name)
    return sorted(names)


def _folder_task(items, size, background=WHITE):
    """Decode [(path, label)] -> images, labels, skipped [(path, reason)]."""
    from PIL import Image
    images, labels, skipped = [], [], []
    for path, label in items:
        try:
            with Image.open(path) as img:
                img.draft("RGB", (size, size))   # JPEG: let the decoder shrink by 1/2, 1/4, 1/8 while >= size
                img.load()
                images.append(fit_square(img, size, background))
            labels.append(label)
        except Exception as e:                 # unreadable, truncated, not an image: skipped and listed
            skipped.append((path, f"{type(e).__name__}: {e}".replace("\n", " ").replace("\t", " ")))
    arr = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return arr, np.asarray(labels, np.int64), skipped


def _folder_listing(root):
    """(classes, [(path, label)]) of ROOT/<class>/<image>; an empty class folder is an error."""
    if not os.path.isdir(root):
        raise CpnetError(f"{root}: no such folder (expected ROOT/<class>/<image> folders)")
    classes = _class_dirs(root)
    if not classes:
        raise CpnetError(f"{root}: no class folders (expected ROOT/<class>/<image>)")
    items = []
    for c, name in enumerate(classes):
        files = _visible_files(os.path.join(root, name))
        if not files:
            raise CpnetError(f"{os.path.join(root, name)}: empty class folder (every class needs images)")
        items += [(os.path.join(root, name, f), c) for f in files]
    return classes, items


def read_labels_file(path, files, classes):
    """Labels for the flat validation folder's sorted `files` from a labels file, as a list of ints.

    Each line is either `<file name> <class>` or just `<class>` (then line i belongs to the i-th file in sorted
    order, the ImageNet devkit convention). <class> is a class folder name of the training set (a synset id such
    as n01440764) or a 0-based index into the sorted class list. Blank lines and lines starting with # are ignored.
    """
    if not os.path.isfile(path):
        raise CpnetError(f"{path}: no such labels file (expected one line '<file> <class>' or '<class>' per image)")
    index = {c: i for i, c in enumerate(classes)}

    def label(tok, lineno):
        if tok in index:
            return index[tok]
        if tok.isdigit() and int(tok) < len(classes):
            return int(tok)
        raise CpnetError(f"{path} line {lineno}: unknown class {tok!r} (expected one of the {len(classes)} "
                         "training class names or a 0-based index)")

    rows = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            t = line.split()
            if not t or t[0].startswith("#"):
                continue
            if len(t) > 2:
                raise CpnetError(f"{path} line {lineno}: expected '<file> <class>' or '<class>', got {line.strip()!r}")
            rows.append((lineno, t))
    if rows and all(len(t) == 2 for _, t in rows):
        # listed files that are not in the folder end up in skipped.txt (file not found)
        return sorted({t[0]: label(t[1], n) for n, t in rows}.items())
    if any(len(t) == 2 for _, t in rows):
        raise CpnetError(f"{path}: mixes '<file> <class>' lines with '<class>' lines")
    if len(rows) != len(files):
        raise CpnetError(f"{path}: {len(rows)} labels for {len(files)} files in the validation folder")
    return [(f, label(t[0], n)) for f, (n, t) in zip(files, rows)]


def folder_jobs(root, size=256, val_root=None, val_labels=None, val_fraction=0.0, seed=0, unit=64,
                background=WHITE):
    """Jobs for ROOT/<class>/<image> (ImageNet's training layout) and a validation split.

    Validation: `val_root` with class folders, or flat with a `val_labels` file (ImageNet's validation layout);
    or a stratified `val_fraction` of each class of ROOT (at least one image of a class with two or more), drawn
    from `seed`; or none. Transparent images are
    composited over `background` (RGB).
    """
    root = os.fspath(root)
    classes, items = _folder_listing(root)
    if val_root is not None and val_fraction:
        raise CpnetError("give either --val-root or --val-fraction, not both")
    if not 0 <= val_fraction < 1:
        raise CpnetError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    val_items = []
    if val_root is not None:
        val_root = os.fspath(val_root)
        if not os.path.isdir(val_root):
            raise CpnetError(f"{val_root}: no such validation folder")
        sub = _class_dirs(val_root)
        if sub and val_labels is None:
            unknown = sorted(set(sub) - set(classes))
            if unknown:
                raise CpnetError(f"{val_root}: class folder {unknown[0]!r} is not a class of {root}")
            for name in sub:
                val_items += [(os.path.join(val_root, name, f), classes.index(name))
                              for f in _visible_files(os.path.join(val_root, name))]
        else:
            if val_labels is None:
                raise CpnetError(f"{val_root}: a flat validation folder needs --val-labels FILE "
                                 "(one '<file> <class>' or '<class>' line per image)")
            files = _visible_files(val_root)
            pairs = read_labels_file(val_labels, files, classes)
            val_items = [(os.path.join(val_root, f), c) for f, c in pairs]
    elif val_fraction > 0:
        keep, held = stratified_split([c for _, c in items], val_fraction, seed)
        items, val_items = [items[i] for i in keep], [items[i] for i in held]
    jobs = {}
    for split, its in (("train", items), ("val", val_items)):
        if not its:
            jobs[split] = None
            continue
        h = hashlib.sha1("\n".join(f"{p}\t{c}" for p, c in its).encode("utf-8", "surrogateescape")).hexdigest()
        sig = {"source": "folder", "root": os.path.abspath(root), "size": size, "listing_sha1": h, "n": len(its),
               "classes": classes}
        if tuple(background) != WHITE:   # files made before --background existed keep their signature
            sig["background"] = list(background)
        tasks = [(_folder_task, (its[a:a + unit], size, tuple(background)), len(its[a:a + unit]))
                 for a in range(0, len(its), unit)]
        jobs[split] = Job(f"folder {os.path.abspath(root if split == 'train' or val_root is None else val_root)}",
                          classes, size, tasks, sig)
    return jobs


# ------------------------------------------------------------------------------------------------------- CIFAR

class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles what the CIFAR python batches hold (dicts, lists, bytes, str, ints and numpy arrays) and
    refuses every other global: only numpy's ndarray reconstruction callables are admitted."""

    def find_class(self, module, name):
        if (module, name) in (("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")):
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:                               # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return _plain_dtype
        raise pickle.UnpicklingError(f"refused global {module}.{name} (only numpy arrays are allowed)")


def _plain_dtype(*args):
    dt = np.dtype(*args)
    if dt.hasobject:
        raise pickle.UnpicklingError("refused an object dtype (only plain numeric arrays are allowed)")
    return dt


def safe_unpickle(data, where):
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise CpnetError(f"{where}: not a CIFAR python batch ({e})") from None


def _get(d, key, where):
    for k in (key.encode(), key):
        if isinstance(d, dict) and k in d:
            return d[k]
    raise CpnetError(f"{where}: no {key!r} entry (expected a CIFAR python batch)")


def _names(lines):
    return [(s.decode() if isinstance(s, bytes) else str(s)).strip() for s in lines
            if (s.decode() if isinstance(s, bytes) else str(s)).strip()]


CIFAR_LAYOUTS = {
    # variant: (train members, test member, meta member)
    "cifar10-bin": ([f"data_batch_{i}.bin" for i in range(1, 6)], "test_batch.bin", "batches.meta.txt"),
    "cifar100-bin": (["train.bin"], "test.bin", "fine_label_names.txt"),
    "cifar10-py": ([f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta"),
    "cifar100-py": (["train"], "test", "meta"),
}


def read_cifar(tarball, coarse=False):
    """{'classes', 'variant', 'train': (images, labels), 'val': (images, labels)} from a CIFAR-10/100 tarball
    (binary or python version), reading the members straight from the archive."""
    tarball = os.fspath(tarball)
    if not os.path.isfile(tarball):
        raise CpnetError(f"{tarball}: no such file (expected a CIFAR-10/100 tarball)")
    try:
        tf = tarfile.open(tarball, "r:*")
    except (tarfile.TarError, OSError, EOFError):
        raise CpnetError(f"{tarball}: not a tar archive (plain, gzip, bzip2 or xz); expected a CIFAR-10/100 "
                         "tarball") from None
    with tf:
        members = {os.path.basename(m.name): m for m in tf.getmembers() if m.isfile()}
        variant = next((v for v, (tr, te, meta) in CIFAR_LAYOUTS.items()
                        if all(x in members for x in tr + [te, meta])), None)
        if variant is None:
            raise CpnetError(f"{tarball}: not a CIFAR-10/100 tarball (no data_batch_1..5 + test_batch, "
                             "or train + test, in either the binary or the python version)")
        trn, tst, meta = CIFAR_LAYOUTS[variant]

        def member(name):
            return tf.extractfile(members[name]).read()

        where = lambda name: f"{tarball}:{members[name].name}"   # noqa: E731
        c100 = variant.startswith("cifar100")
        if variant.endswith("bin"):
            if c100 and coarse:
                meta = "coarse_label_names.txt"
                if meta not in members:
                    raise CpnetError(f"{tarball}: no coarse_label_names.txt for --coarse")
            classes = _names(member(meta).decode().splitlines())
            rec = 3074 if c100 else 3073

            def load(name):
                raw = member(name)
                if len(raw) % rec:
                    raise CpnetError(f"{where(name)}: {len(raw)} bytes is not a whole number of "
                                     f"{rec}-byte records")
                a = np.frombuffer(raw, np.uint8).reshape(-1, rec)
                lab = a[:, 0] if (not c100 or coarse) else a[:, 1]
                return a[:, -3072:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), lab.astype(np.int64)
        else:
            m = safe_unpickle(member(meta), where(meta))
            classes = _names(_get(m, ("coarse_label_names" if coarse else "fine_label_names") if c100
                                  else "label_names", where(meta)))

            def load(name):
                d = safe_unpickle(member(name), where(name))
                data = np.asarray(_get(d, "data", where(name)))
                key = ("coarse_labels" if coarse else "fine_labels") if c100 else "labels"
                lab = np.asarray(_get(d, key, where(name)), np.int64)
                if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(lab) != len(data):
                    raise CpnetError(f"{where(name)}: data is {data.dtype} {data.shape} with {len(lab)} labels, "
                                     "expected uint8 (n, 3072) and n labels")
                return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), lab

        parts = [load(n) for n in trn]
        out = {"classes": classes, "variant": variant,
               "train": (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])),
               "val": load(tst)}
    for split in ("train", "val"):
        lab = out[split][1]
        if len(lab) and (lab.min() < 0 or lab.max() >= len(classes)):
            raise CpnetError(f"{tarball}: {split} label {int(lab.max())} outside the {len(classes)} class names")
    return out


def cifar_jobs(tarball, size=32, coarse=False):
    d = read_cifar(tarball, coarse)
    jobs = {}
    for split in ("train", "val"):
        im, lab = d[split]
        sig = dict(_file_signature(tarball), source="cifar", variant=d["variant"], size=size, coarse=coarse,
                   split=split)
        jobs[split] = array_job(f"{d['variant']} {os.path.abspath(tarball)}", d["classes"],
                                np.ascontiguousarray(im), lab, size, sig)
    return jobs


# --------------------------------------------------------------------------------------------------------- IDX

IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path, ndim):
    """An IDX file (plain or .gz) as a numpy array; the magic number must say uint8 data of `ndim` dimensions."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as e:
        raise CpnetError(f"{path}: cannot read ({e})") from None
    want = 0x0800 | ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else -1
    if magic != want:
        raise CpnetError(f"{path}: magic number {magic:#010x}, expected {want:#010x} "
                         f"(IDX uint8 {'images' if ndim == 3 else 'labels'})")
    dims = np.frombuffer(raw[4:4 + 4 * ndim], ">u4").astype(np.int64)
    n = int(np.prod(dims))
    if len(dims) != ndim or len(raw) != 4 + 4 * ndim + n:
        raise CpnetError(f"{path}: {len(raw)} bytes, expected {4 + 4 * ndim + n} for dimensions {tuple(dims)}")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(tuple(dims))


def _find_idx(folder, split, kind):
    stem = {"train": "train", "test": "(t10k|test)"}[split]
    pat = re.compile(rf"(^|.*-){stem}-{kind}[-.]idx{3 if kind == 'images' else 1}-ubyte(\.gz)?$")
    found = sorted(f for f in os.listdir(folder) if pat.match(f))
    plain = [f for f in found if not f.endswith(".gz")]
    found = plain if plain else found     # prefer the uncompressed copy when both are there
    if len(found) > 1:
        raise CpnetError(f"{folder}: several {split} {kind} files ({', '.join(found)}); keep one set per folder")
    return os.path.join(folder, found[0]) if found else None


def idx_jobs(folder, size=28, class_names=None, val_from_train=0.0, seed=0):
    """Jobs from a folder of MNIST-family IDX files: train-images/labels (-> train.h5), t10k-... (-> val.h5).

    val_from_train F > 0: a stratified fraction F of the training images (drawn from `seed`) becomes val.h5 and
    train.h5 keeps the rest, so that tuning never looks at the official test set; t10k-... goes to test.h5.
    """
    folder = os.fspath(folder)
    if not 0 <= val_from_train < 1:
        raise CpnetError(f"--val-from-train must be in [0, 1), got {val_from_train}")
    if not os.path.isdir(folder):
        raise CpnetError(f"{folder}: no such folder (expected train-images-idx3-ubyte[.gz] and friends)")
    data = {}
    for split in ("train", "test"):
        ip, lp = _find_idx(folder, split, "images"), _find_idx(folder, split, "labels")
        if ip is None and lp is None and split == "test":
            continue
        if ip is None or lp is None:
            miss = "images-idx3" if ip is None else "labels-idx1"
            raise CpnetError(f"{folder}: no {'train' if split == 'train' else 't10k'}-{miss}-ubyte[.gz] file")
        im, lab = read_idx(ip, 3), read_idx(lp, 1).astype(np.int64)
        if len(im) != len(lab):
            raise CpnetError(f"{ip}: {len(im)} images but {lp} has {len(lab)} labels")
        data[split] = (im, lab, ip, lp)
    k = int(max(int(d[1].max()) if len(d[1]) else 0 for d in data.values())) + 1
    if class_names is None:
        classes = [str(i) for i in range(k)]
    else:
        classes = [c.strip() for c in class_names]
        if len(classes) < k:
            raise CpnetError(f"--class-names gives {len(classes)} names, the labels need {k}")
    parts = {}
    for split, (im, lab, ip, lp) in data.items():
        sig = dict(_file_signature(ip), labels=_file_signature(lp), source="idx", size=size, classes=classes)
        if split == "train" and val_from_train > 0:
            keep, held = stratified_split(lab, val_from_train, seed)
            if len(held) == 0 or len(keep) == 0:
                raise CpnetError(f"--val-from-train {val_from_train}: leaves {len(keep)} training and {len(held)} "
                                 f"validation images of {len(lab)}")
            split_sig = dict(val_from_train=val_from_train, seed=seed)
            parts["train"] = (im[keep], lab[keep], ip, dict(sig, **split_sig, part="train"))
            parts["val"] = (im[held], lab[held], ip, dict(sig, **split_sig, part="val"))
        else:
            parts["test" if (split == "test" and val_from_train > 0) else
                  "train" if split == "train" else "val"] = (im, lab, ip, sig)
    jobs = {"train": None, "val": None, "test": None}
    for split, (im, lab, ip, sig) in parts.items():
        rgb = np.repeat(im[..., None], 3, axis=-1)        # grayscale replicated to RGB
        jobs[split] = array_job(f"idx {os.path.abspath(ip)}", classes, rgb, lab, size, sig)
    return jobs
