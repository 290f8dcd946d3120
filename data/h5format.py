"""The dataset file: layout, reading (`H5Dataset`) and the streaming statistics written with it.

Layout of one file (train and validation are separate files)::

    images       uint8   (N, S, S, 3)  RGB, chunked one image per chunk, uncompressed
    labels       int64   (N,)          0 <= label < len(classes)
    classes      str     (K,)          class names, label i is classes[i]
    mean         float32 (S, S, 3)     mean image of the TRAINING set, 0-255 scale
    pca/eigval   float32 (3,)          lighting eigenvalues, largest first (see `rgb_pca`)
    pca/eigvec   float32 (3, 3)        column i is the eigenvector of eigval[i]
    pca/cov      float64 (3, 3)        covariance of the training set's RGB values, 0-255 scale
    attrs: format_version, source, size, split ('train' | 'val'), stats_from ('train': the mean and the PCA
           are the training set's, in the validation file too), stats_pixels (pixels the PCA was computed from)

A file being written carries the suffix `.partial` and a `_progress` group (see `data.prep`); `H5Dataset` refuses it.
"""

import os

import h5py
import numpy as np

from cpnet.errors import CpnetError

FORMAT_VERSION = 1

REQUIRED = ("images", "labels", "classes", "mean", "pca/eigval", "pca/eigvec")


def rgb_pca(cov):
    """(eigval, eigvec) of the lighting augmentation from the covariance `cov` of RGB values on the 0-255 scale.

    The paper adds eigvec @ (alpha * eigval) with alpha ~ N(0, 0.1) to each pixel, with eigval the eigenvalues of
    the RGB covariance. That sum only has the intended size (a few percent of the intensity range) when the
    eigenvalues are taken on the [0, 1] scale: fb.resnet.torch's well-known ImageNet values 0.2175, 0.0188, 0.0045
    are exactly those. We store them converted to the 0-255 pixel scale, i.e. eigval = 255 * eig(cov / 255**2)
    = eig(cov) / 255, so that the shift `eigvec @ (alpha * eigval)` is directly in stored pixel units (about
    [55.5, 4.8, 1.1] for ImageNet). Eigenvalues are sorted largest first; eigenvector signs are fixed so that
    each column's largest-magnitude entry is positive (the sign does not matter for alpha ~ N(0, sigma)).
    """
    w, v = np.linalg.eigh(np.asarray(cov, dtype=np.float64))
    order = np.argsort(w)[::-1]
    w, v = np.clip(w[order], 0.0, None), v[:, order]
    sign = np.sign(v[np.argmax(np.abs(v), axis=0), np.arange(3)])
    v = v * np.where(sign == 0, 1.0, sign)
    return (w / 255.0).astype(np.float32), v.astype(np.float32)


class RunningStats:
    """Streaming mean image and RGB covariance: sums in float64 over every pixel of every image added."""

    def __init__(self, size):
        self.count = 0
        self.img_sum = np.zeros((size, size, 3), np.float64)
        self.pix_sum = np.zeros(3, np.float64)
        self.pix_outer = np.zeros((3, 3), np.float64)

    @staticmethod
    def of(images):
        """The sums of a batch (k, S, S, 3) uint8, as a RunningStats (computed where the images are decoded)."""
        st = RunningStats(images.shape[1])
        st.count = len(images)
        if len(images):
            st.img_sum = images.sum(axis=0, dtype=np.float64)
            for im in images:   # one image at a time keeps the float64 copy small
                p = im.reshape(-1, 3).astype(np.float64)
                st.pix_outer += p.T @ p
            st.pix_sum = st.img_sum.reshape(-1, 3).sum(axis=0)
        return st

    def add(self, other):
        self.count += other.count
        self.img_sum += other.img_sum
        self.pix_sum += other.pix_sum
        self.pix_outer += other.pix_outer

    @property
    def pixels(self):
        return self.count * self.img_sum.shape[0] * self.img_sum.shape[1]

    def mean(self):
        return (self.img_sum / max(self.count, 1)).astype(np.float32)

    def cov(self):
        n = max(self.pixels, 1)
        mu = self.pix_sum / n
        return self.pix_outer / n - np.outer(mu, mu)


def check_h5(path, what="dataset file"):
    """Raise CpnetError unless `path` is an existing HDF5 file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CpnetError(f"{path}: no such {what} (expected an HDF5 file made by `cpnet prep`)")
    if os.path.isdir(path):
        raise CpnetError(f"{path}: is a directory (expected an HDF5 {what} made by `cpnet prep`)")
    if not h5py.is_hdf5(path):
        raise CpnetError(f"{path}: not an HDF5 file (expected a {what} made by `cpnet prep`)")


def _decode_attr(v):
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


class H5Dataset:
    """Read access to one dataset file. Metadata (labels, classes, mean, PCA) is loaded at open; images on demand.

    Errors a user can cause (missing file, not HDF5, wrong format version, missing or malformed dataset, labels
    outside the class range) raise CpnetError naming the file and what was expected.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        check_h5(self.path)
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise CpnetError(f"{self.path}: cannot open as HDF5 ({e})") from None
        try:
            self._load_meta()
        except CpnetError:
            self._f.close()
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError, UnicodeDecodeError) as e:
            self._f.close()       # h5py on a damaged (bit-flipped, truncated) file
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CpnetError(f"{self.path}: damaged dataset file ({msg}); make it again with `cpnet prep`") from None

    def _fail(self, msg):
        raise CpnetError(f"{self.path}: {msg}")

    def _load_meta(self):
        f = self._f
        if "_progress" in f:
            self._fail("is an unfinished prep (a .partial file); finish it with `cpnet prep ... --resume`")
        ver = f.attrs.get("format_version")
        if ver is None:
            self._fail(f"no format_version attribute (expected a cpnet dataset file, format version {FORMAT_VERSION})")
        try:
            ver = int(ver)
        except (TypeError, ValueError):
            self._fail(f"format_version is {_decode_attr(ver)!r}, expected a number ({FORMAT_VERSION})")
        if ver != FORMAT_VERSION:
            self._fail(f"format version {ver}, this cpnet reads format version {FORMAT_VERSION}")
        for name in REQUIRED:
            if name not in f:
                self._fail(f"missing dataset '{name}' (a cpnet dataset file has {', '.join(REQUIRED)})")
        img = f["images"]
        if img.ndim != 4 or img.shape[1] != img.shape[2] or img.shape[3] != 3 or img.dtype != np.uint8:
            self._fail(f"'images' is {img.dtype} {img.shape}, expected uint8 (N, S, S, 3)")
        self._images = img
        self.n, self.size = int(img.shape[0]), int(img.shape[1])
        lab = f["labels"]
        if lab.dtype.kind not in "iu":
            self._fail(f"'labels' are {lab.dtype}, expected integers (class indices)")
        self.labels = np.asarray(lab[...], dtype=np.int64)
        if self.labels.shape != (self.n,):
            self._fail(f"'labels' has shape {self.labels.shape}, expected ({self.n},) like 'images'")
        self.classes = [c.decode() if isinstance(c, bytes) else str(c) for c in f["classes"][...]]
        self.num_classes = len(self.classes)
        if self.n and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            bad = int(self.labels.min() if self.labels.min() < 0 else self.labels.max())
            self._fail(f"label {bad} outside [0, {self.num_classes}) for its {self.num_classes} classes")
        self.mean = np.asarray(f["mean"][...], dtype=np.float32)
        if self.mean.shape != (self.size, self.size, 3):
            self._fail(f"'mean' has shape {self.mean.shape}, expected ({self.size}, {self.size}, 3)")
        self.eigval = np.asarray(f["pca/eigval"][...], dtype=np.float32)
        self.eigvec = np.asarray(f["pca/eigvec"][...], dtype=np.float32)
        if self.eigval.shape != (3,) or self.eigvec.shape != (3, 3):
            self._fail(f"'pca/eigval' {self.eigval.shape} / 'pca/eigvec' {self.eigvec.shape}, expected (3,) / (3, 3)")
        for name, a in (("mean", self.mean), ("pca/eigval", self.eigval), ("pca/eigvec", self.eigvec)):
            if not np.isfinite(a).all():    # every input would be non-finite
                self._fail(f"'{name}' holds NaN or infinite values (make the file again with `cpnet prep`)")
        self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}

    def read(self, indices, out=None):
        """Images at `indices`, uint8 (len, S, S, 3) in the given order.

        The file is read in increasing index order (contiguous runs as one slice) into a buffer, then put back in
        the requested order. `out` may be a preallocated (>= len, S, S, 3) uint8 buffer to read into.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        k = len(idx)
        if k and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"{self.path}: image index out of range [0, {self.n})")
        buf = np.empty((k, self.size, self.size, 3), np.uint8)
        order = np.argsort(idx, kind="stable")
        self.read_sorted(idx[order], buf)
        res = out[:k] if out is not None else np.empty_like(buf)
        res[order] = buf
        return res

    def read_sorted(self, sorted_idx, buf):
        """Read increasing indices into buf[:len] (runs of consecutive indices are one read)."""
        k = len(sorted_idx)
        if k == 0:
            return buf[:0]
        breaks = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [k]])
        for a, b in zip(starts, ends):
            i0 = int(sorted_idx[a])   # a run of consecutive indices (a repeated index starts a new run)
            self._images.read_direct(buf, np.s_[i0:i0 + int(b - a)], np.s_[a:b])
        return buf[:k]

    def class_counts(self):
        return np.bincount(self.labels, minlength=self.num_classes)

    def close(self):
        f, self._f = getattr(self, "_f", None), None
        if f is not None:
            try:
                f.close()
            except Exception:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self):
        return self.n

    def __repr__(self):
        return f"H5Dataset({self.path!r}, n={self.n}, size={self.size}, classes={self.num_classes})"
