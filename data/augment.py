"""The paper's augmentation (section 4.1) and evaluation views, on uint8 HWC images into float32 NCHW batches.

Training, per image: a random crop window, a horizontal flip with probability 1/2, PCA lighting (alpha ~ N(0,
sigma) of shape (3,), add eigvec @ (alpha * eigval) to every pixel's RGB, in float on the 0-255 scale, no
clipping), then subtract the mean image cut at the same window (and flipped with the image), then multiply by
`scale`. Output channels are RGB.

All randomness is a pure function of (seed, epoch, batch index): `epoch_order` and `train_params` derive their
generators from `np.random.SeedSequence`, so a batch is the same whichever process makes it and whenever.
"""

import numpy as np

# SeedSequence tags that keep the shuffle stream and the augmentation stream apart
_SHUFFLE, _AUGMENT = 1, 2

VIEWS = {"center": 1, "ten": 10}
TEN_VIEW_ORDER = ("center", "top-left", "top-right", "bottom-left", "bottom-right",
                  "center-mirror", "top-left-mirror", "top-right-mirror", "bottom-left-mirror",
                  "bottom-right-mirror")


def _rng(*words):
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


def epoch_order(seed, epoch, n):
    """The shuffled order of the n images in `epoch` (a permutation of range(n))."""
    return _rng(seed, _SHUFFLE, epoch).permutation(n)


def train_params(seed, epoch, batch_index, b, size, crop, lighting=0.1, flip=True, pad=0):
    """Random choices for one training batch of b images: crop offsets oy, ox, flip flags, lighting alpha (b, 3).

    Offsets lie in [-pad, size - crop + pad]: with pad > 0 the window may leave the image by up to `pad` pixels
    on any side, and what lies outside is the mean (0 after subtraction). pad=0 draws exactly as before.
    Draw order (fixed, part of the format of a run): oy, ox, flip, alpha; all are drawn even when flip is off or
    lighting is 0, so turning one off leaves the others unchanged.
    """
    rng = _rng(seed, _AUGMENT, epoch, batch_index)
    oy = rng.integers(0, size - crop + 2 * pad + 1, size=b) - pad
    ox = rng.integers(0, size - crop + 2 * pad + 1, size=b) - pad
    fl = rng.random(b) < 0.5
    alpha = rng.standard_normal((b, 3)) * float(lighting)
    if not flip:
        fl[:] = False
    return oy, ox, fl, alpha


def lighting_shift(alpha, eigval, eigvec):
    """Per-image RGB shift (b, 3): eigvec @ (alpha_i * eigval) for each row alpha_i."""
    alpha = np.asarray(alpha, np.float64)
    return (alpha * np.asarray(eigval, np.float64)) @ np.asarray(eigvec, np.float64).T


def view_offsets(size, crop, views="center"):
    """[(oy, ox, flip)] of the evaluation views, in TEN_VIEW_ORDER for 'ten' (centre first, so view 0 is the
    centre crop either way; views 5..9 mirror views 0..4)."""
    if views not in VIEWS:
        raise ValueError(f"views must be one of {sorted(VIEWS)}, got {views!r}")
    c = (size - crop) // 2
    e = size - crop
    base = [(c, c)] if views == "center" else [(c, c), (0, 0), (0, e), (e, 0), (e, e)]
    out = [(y, x, False) for y, x in base]
    if views == "ten":
        out += [(y, x, True) for y, x in base]
    return out


def crop_into(out, image, mean_chw, oy, ox, flip, shift=None, scale=1.0):
    """out (3, C, C) float32 = (image cut at (oy, ox) [+ shift] - mean cut at the same window) * scale,
    both mirrored left-right when `flip`. image is uint8 (S, S, 3), mean_chw float32 (3, S, S). A window that
    leaves the image (a padded crop) is 0 outside it: the mean colour, with no lighting shift."""
    c, size = out.shape[-1], image.shape[0]
    if oy < 0 or ox < 0 or oy + c > size or ox + c > size:
        y0, x0, y1, x1 = max(oy, 0), max(ox, 0), min(oy + c, size), min(ox + c, size)
        out[...] = 0
        if y1 > y0 and x1 > x0:
            inner = out[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
            inner[...] = image[y0:y1, x0:x1].transpose(2, 0, 1)
            if shift is not None:
                inner += shift.astype(np.float32)[:, None, None]
            inner -= mean_chw[:, y0:y1, x0:x1]
            if scale != 1.0:
                inner *= np.float32(scale)
        if flip:
            out[...] = out[:, :, ::-1].copy()
        return out
    im = image[oy:oy + c, ox:ox + c]
    m = mean_chw[:, oy:oy + c, ox:ox + c]
    if flip:
        im, m = im[:, ::-1], m[:, :, ::-1]
    out[...] = im.transpose(2, 0, 1)
    if shift is not None:
        out += shift.astype(np.float32)[:, None, None]
    out -= m
    if scale != 1.0:
        out *= np.float32(scale)
    return out


def train_batch_into(out, images, rows, params, mean_chw, eigval, eigvec, scale=1.0):
    """Fill out (b, 3, C, C) from images[rows[k]] with the choices `params` = train_params(...)."""
    oy, ox, fl, alpha = params
    shift = lighting_shift(alpha, eigval, eigvec)
    for k in range(out.shape[0]):
        crop_into(out[k], images[rows[k]], mean_chw, oy[k], ox[k], fl[k], shift[k], scale)
    return out


def eval_batch_into(out, images, rows, offsets, mean_chw, scale=1.0):
    """Fill out (b, V, 3, C, C) with the V views `offsets` = view_offsets(...) of images[rows[k]]."""
    for k in range(out.shape[0]):
        for v, (oy, ox, fl) in enumerate(offsets):
            crop_into(out[k, v], images[rows[k]], mean_chw, oy, ox, fl, None, scale)
    return out
