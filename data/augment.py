"""The paper's augmentation (section 4.1) and evaluation views, on uint8 HWC images into float32 NCHW batches.

Training, per image: a random crop window, a horizontal flip with probability 1/2, PCA lighting (alpha ~ N(0,
sigma) of shape (3,), add eigvec @ (alpha * eigval) to every pixel's RGB, in float on the 0-255 scale, no
clipping), then subtract the mean image cut at the same window (and flipped with the image), then multiply by
`scale`. Output channels are RGB.

All randomness is a pure function of (seed, epoch, batch index): `epoch_order` and `train_params` derive their
generators from `np.random.SeedSequence`, so a batch is the same whichever process makes it and whenever.
"""

import numpy as np

# SeedSequence tags that keep the shuffle, augmentation and erasing streams apart
_SHUFFLE, _AUGMENT, _ERASE = 1, 2, 3

# Random erasing (Zhong et al. 2017): the rectangle's share of the crop's area and its aspect ratio h/w
ERASE_AREA = (0.02, 0.4)
ERASE_ASPECT = (0.3, 1 / 0.3)

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


def erase_boxes(seed, epoch, batch_index, b, crop, p):
    """Random erasing's rectangles for one training batch of b crops, int32 (b, 4): y0, x0, y1, x1 in the crop's
    own (output, after the flip) coordinates, set to the mean colour (0 after subtraction); an empty box (all 0)
    where an image is left whole.

    Each image is erased with probability p; the rectangle covers a uniform share of ERASE_AREA of the crop with a
    log-uniform aspect ratio (height / width) in ERASE_ASPECT, cut to the crop, at a uniform position where it fits.
    Its own stream (seed, _ERASE, epoch, batch_index): p = 0 draws nothing and leaves every other choice as it was.
    """
    boxes = np.zeros((b, 4), np.int32)
    if not p > 0:
        return boxes
    rng = _rng(seed, _ERASE, epoch, batch_index)
    on = rng.random(b) < p
    area = rng.uniform(*ERASE_AREA, size=b) * crop * crop
    aspect = np.exp(rng.uniform(np.log(ERASE_ASPECT[0]), np.log(ERASE_ASPECT[1]), size=b))
    uy, ux = rng.random(b), rng.random(b)
    h = np.clip(np.rint(np.sqrt(area * aspect)), 1, crop).astype(np.int64)
    w = np.clip(np.rint(np.sqrt(area / aspect)), 1, crop).astype(np.int64)
    y0 = np.minimum((uy * (crop - h + 1)).astype(np.int64), crop - h)
    x0 = np.minimum((ux * (crop - w + 1)).astype(np.int64), crop - w)
    boxes[on] = np.stack([y0, x0, y0 + h, x0 + w], axis=1)[on]
    return boxes


def erase_into(out, boxes):
    """Set out[k, :, y0:y1, x0:x1] = 0 for each crop k's box (boxes from erase_boxes; empty boxes change nothing)."""
    for k, (y0, x0, y1, x1) in enumerate(np.asarray(boxes)):
        out[k, :, y0:y1, x0:x1] = 0
    return out


def lighting_shift(alpha, eigval, eigvec):
    """Per-image RGB shift (b, 3): eigvec @ (alpha_i * eigval) for each row alpha_i."""
    alpha = np.asarray(alpha, np.float64)
    return (alpha * np.asarray(eigval, np.float64)) @ np.asarray(eigvec, np.float64).T


def view_offsets(size, crop, views="center", pad=0):
    """[(oy, ox, flip)] of the evaluation views, in TEN_VIEW_ORDER for 'ten' (centre first, so view 0 is the
    centre crop either way; views 5..9 mirror views 0..4). A crop larger than the image (a canvas, trained with
    offsets in [-pad, size - crop + pad]) puts the corner views at those extremes, the positions training saw."""
    if views not in VIEWS:
        raise ValueError(f"views must be one of {sorted(VIEWS)}, got {views!r}")
    c = (size - crop) // 2
    s, e = (-pad, size - crop + pad) if crop > size else (0, size - crop)
    base = [(c, c)] if views == "center" else [(c, c), (s, s), (s, e), (e, s), (e, e)]
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


def train_batch_into(out, images, rows, params, mean_chw, eigval, eigvec, scale=1.0, boxes=None):
    """Fill out (b, 3, C, C) from images[rows[k]] with the choices `params` = train_params(...), then erase
    `boxes` (erase_boxes(...), or None: nothing erased)."""
    oy, ox, fl, alpha = params
    shift = lighting_shift(alpha, eigval, eigvec)
    for k in range(out.shape[0]):
        crop_into(out[k], images[rows[k]], mean_chw, oy[k], ox[k], fl[k], shift[k], scale)
    return out if boxes is None else erase_into(out, boxes)


def eval_batch_into(out, images, rows, offsets, mean_chw, scale=1.0):
    """Fill out (b, V, 3, C, C) with the V views `offsets` = view_offsets(...) of images[rows[k]]."""
    for k in range(out.shape[0]):
        for v, (oy, ox, fl) in enumerate(offsets):
            crop_into(out[k, v], images[rows[k]], mean_chw, oy, ox, fl, None, scale)
    return out


# ---- batches as uint8 pixels, the augmentation left to the device (the GPU input path) ----------------------------
# Instead of the float32 crops (12 bytes a pixel), the loader can hand over the uint8 pixels (3 bytes a pixel) and
# the small per-crop choices; cpnet's augment kernel (cpnet/kernels/augment.cu) then makes the float32 (or bf16)
# input on the GPU with crop_into's operations in crop_into's order, the same bits. The choices are drawn exactly
# as above (train_params, view_offsets), so a batch does not depend on where it is augmented.
#
# One flat uint8 buffer holds a batch, so it crosses processes (the loader's shared-memory slots) and reaches the
# GPU in one pinned transfer:
#   table   int32 (crops, 8)    per crop: m (the pixel image it reads), oy, ox, flip, and the erased box y0, x0,
#                               y1, x1 in output coordinates (erase_boxes; all 0: none)
#   shift   float32 (crops, 3)  per crop: the lighting's RGB shift (lighting_shift; 0 for evaluation)
#   pixels  uint8 (images, R, R, 3), HWC as stored: windowed, each crop's own window cut at (oy, ox) (R = crop,
#           0 outside the stored image, never read); or whole stored images (R = S), which the views share.
# A loader picks whichever has fewer pixel bytes: for training and centre crops the windows where crop <= S (the
# whole images for a crop beyond S, a canvas); for ten views the whole image once unless 10 crop^2 <= S^2.

TABLE_COLUMNS = 8


class RawLayout:
    """Where table, shift and pixels lie in a raw batch buffer of `crops` crops (capacity) made from `images`
    pixel images of R x R; picklable (the loader's workers fill buffers of this layout)."""

    def __init__(self, crops, views, crop, size, windowed):
        self.crops, self.views, self.crop, self.size = int(crops), int(views), int(crop), int(size)
        self.windowed = bool(windowed)
        self.region = self.crop if self.windowed else self.size
        self.images = self.crops if self.windowed else self.crops // self.views
        self.shift_at = TABLE_COLUMNS * 4 * self.crops
        self.pixels_at = self.shift_at + 3 * 4 * self.crops
        self.nbytes = self.pixels_at + self.images * self.region * self.region * 3

    @classmethod
    def choose(cls, batch, views, crop, size):
        """The layout with fewer pixel bytes for `batch` images of `views` crops each (windows on a tie)."""
        return cls(batch * views, views, crop, size, windowed=views * crop * crop <= size * size)

    def used_bytes(self, k):
        """Bytes of a buffer that hold the first k images' batch (the table and shift at full capacity)."""
        m = k * self.views if self.windowed else k
        return self.pixels_at + m * self.region * self.region * 3

    def parts(self, buf):
        """(table, shift, pixels) views of `buf` (a 1-D uint8 host or device array of at least used_bytes)."""
        c, r = self.crops, self.region
        m = (int(buf.shape[0]) - self.pixels_at) // (r * r * 3)
        table = buf[:self.shift_at].view(np.int32).reshape(c, TABLE_COLUMNS)
        shift = buf[self.shift_at:self.pixels_at].view(np.float32).reshape(c, 3)
        pixels = buf[self.pixels_at:self.pixels_at + m * r * r * 3].reshape(m, r, r, 3)
        return table, shift, pixels


def cut_window(dst, image, oy, ox):
    """dst (C, C, 3) uint8 = image (S, S, 3) cut at (oy, ox), 0 where the window leaves the image."""
    c, size = dst.shape[0], image.shape[0]
    y0, x0, y1, x1 = max(oy, 0), max(ox, 0), min(oy + c, size), min(ox + c, size)
    if y0 != oy or x0 != ox or y1 != oy + c or x1 != ox + c:
        dst[...] = 0
    if y1 > y0 and x1 > x0:
        dst[y0 - oy:y1 - oy, x0 - ox:x1 - ox] = image[y0:y1, x0:x1]
    return dst


def _fill_raw(buf, layout, images, rows, oy, ox, fl, shift, boxes=None):
    """Fill the raw buffer `buf` for len(rows) images, crop j = k * views + v of image images[rows[k]]."""
    k, v = len(rows), layout.views
    table, sh, pixels = layout.parts(buf[:layout.used_bytes(k)])
    n = k * v
    table[:n, 1], table[:n, 2], table[:n, 3] = oy, ox, fl
    table[:n, 4:] = 0 if boxes is None else boxes
    table[:n, 0] = np.arange(n) if layout.windowed else np.repeat(np.arange(k), v)
    sh[:n] = shift
    for j in range(k):
        if layout.windowed:
            for i in range(v):
                cut_window(pixels[j * v + i], images[rows[j]], int(oy[j * v + i]), int(ox[j * v + i]))
        else:
            pixels[j] = images[rows[j]]
    return k


def train_raw_into(buf, layout, images, rows, params, eigval, eigvec, boxes=None):
    """The raw form of train_batch_into: the same crops, flips, lighting and erased boxes, as table, shift and
    pixels."""
    oy, ox, fl, alpha = params
    shift = lighting_shift(alpha, eigval, eigvec).astype(np.float32)
    return _fill_raw(buf, layout, images, rows, oy, ox, fl, shift, boxes)


def eval_raw_into(buf, layout, images, rows, offsets):
    """The raw form of eval_batch_into (the views `offsets` of each image, no lighting)."""
    k = len(rows)
    oy, ox, fl = (np.tile(np.array([o[i] for o in offsets]), k) for i in range(3))
    return _fill_raw(buf, layout, images, rows, oy, ox, fl.astype(np.int32), np.zeros((k * len(offsets), 3)))


class RawBatch:
    """A batch of k images as a raw buffer (see RawLayout), for the device to augment: shape (k, 3, C, C) for
    training, (k, V, 3, C, C) for evaluation, as the float32 batch it stands for. `crops()` is the same batch as
    (k*V, 3, C, C) and can be sliced by crops ([s:t]); the slices share one upload per device (`on_device`).
    cpnet's model knows one by its `raw_batch` attribute (cpnet/ does not import the data package)."""

    raw_batch = True

    def __init__(self, buf, k, layout, mean_chw, scale, train, first=0, n=None, shared=None):
        self.buf, self.k, self.layout, self.mean_chw, self.scale = buf, int(k), layout, mean_chw, float(scale)
        self.train, self.first = bool(train), int(first)
        self.n = self.k * layout.views if n is None else int(n)  # crops from `first`
        self.on_device = {} if shared is None else shared  # device -> what the model made of buf there
        c = layout.crop
        self._flat = n is not None or train
        self.shape = (self.n, 3, c, c) if self._flat else (self.k, layout.views, 3, c, c)
        self.ndim = len(self.shape)

    def __len__(self):
        return self.shape[0]

    @property
    def nbytes(self):
        """The bytes that travel to the device: the buffer's used part."""
        return self.layout.used_bytes(self.k)

    def used(self):
        return self.buf[:self.nbytes]

    def crops(self):
        return RawBatch(self.buf, self.k, self.layout, self.mean_chw, self.scale, self.train, self.first, self.n,
                        self.on_device)

    def __getitem__(self, key):
        if not (self._flat and isinstance(key, slice) and key.step in (None, 1)):
            raise TypeError("a RawBatch slices only by a contiguous range of crops, on its crops() form")
        s, t, _ = key.indices(self.n)
        return RawBatch(self.buf, self.k, self.layout, self.mean_chw, self.scale, self.train, self.first + s,
                        max(0, t - s), self.on_device)

    def expand(self):
        """The float32 crops (n, 3, C, C) on the host, in NumPy, with crop_into's operations and order (the same
        bits as the device kernel and as the float32 loader)."""
        lay = self.layout
        table, shift, pixels = lay.parts(self.used())
        rows = slice(self.first, self.first + self.n)
        m, oy, ox, fl = (table[rows, i].astype(np.int64) for i in range(4))
        c, size = lay.crop, lay.size
        a = np.arange(c)
        xs = np.where(fl[:, None] != 0, c - 1 - a, a)                       # (n, C): window column per x
        sy, sx = oy[:, None] + a, ox[:, None] + xs                          # stored coordinates
        inside = ((sy >= 0) & (sy < size))[:, :, None] & ((sx >= 0) & (sx < size))[:, None, :]
        ry, rx = (np.broadcast_to(a, sy.shape), xs) if lay.windowed else (sy, sx)
        ry, rx = np.clip(ry, 0, lay.region - 1), np.clip(rx, 0, lay.region - 1)
        u = pixels[m[:, None, None], ry[:, :, None], rx[:, None, :]]          # (n, C, C, 3)
        out = np.ascontiguousarray(u.transpose(0, 3, 1, 2), dtype=np.float32)
        out += shift[rows][:, :, None, None]
        syc, sxc = np.clip(sy, 0, size - 1), np.clip(sx, 0, size - 1)
        out -= self.mean_chw[:, syc[:, :, None], sxc[:, None, :]].transpose(1, 0, 2, 3)
        out *= np.float32(self.scale)
        y0, x0, y1, x1 = (table[rows, i].astype(np.int64)[:, None] for i in range(4, 8))
        erased = ((a >= y0) & (a < y1))[:, :, None] & ((a >= x0) & (a < x1))[:, None, :]
        out[np.broadcast_to((~inside | erased)[:, None], out.shape)] = 0  # a --pad border, or random erasing's box
        return out if self._flat else out.reshape(self.shape)
