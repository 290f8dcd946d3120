"""Image sources -> `prep.Job`s: the synthetic set, image folders, CIFAR tarballs, IDX (MNIST-family) files.

Every source ends in the same images: RGB uint8 (S, S, 3), the shorter side resized to S with Pillow's
antialiasing bicubic filter and the centre cut to S x S (the paper's recipe); an image already S x S is stored
unchanged.
"""

import numpy as np

from cpnet.errors import CpnetError

from . import synthetic
from .prep import Job


# ---------------------------------------------------------------------------------------------------- resizing

def fit_square(img, size):
    """A PIL image -> RGB uint8 (size, size, 3): shorter side to `size` (antialiased), centre crop."""
    from PIL import Image
    if img.mode != "RGB":
        img = img.convert("RGB")          # L, LA, P, RGBA (alpha dropped), CMYK, I;16 ...
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
