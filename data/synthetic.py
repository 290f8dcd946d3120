"""A built-in, deterministic image set that a CNN has to learn: classes differ in shape and texture only.

Every image draws, independently of its class: a background (a linear gradient between two random colours in a
random direction), a foreground colour far from the background in every channel (so the sign of the contrast
is random and no colour identifies a class), a position, a size, a rotation, a stripe period and phase, and
Gaussian noise. The class decides only the shape of the foreground mask: a filled disc, a ring, a square, a
triangle, a plus-shaped cross, horizontal / vertical / diagonal stripes, a checkerboard, a grid of dots (textures
fill a random rectangle), an X-shaped cross, a hollow square, an elongated ellipse, concentric rings.

Images are made in blocks of `block_size(S)` from a generator seeded by (seed, split, block index), all arrays at
once (numpy, no per-pixel Python), so the i-th image of a split depends only on (seed, split, S, i and the class
count): a larger --n extends a smaller one.
"""

import numpy as np

SHAPES = ("disc", "ring", "square", "triangle", "cross", "hstripes", "vstripes", "checker", "diagonal", "dots",
          "xcross", "frame", "ellipse", "target")
SPLITS = {"train": 0, "val": 1}


def block_size(size):
    """Images per generator block (depends on S only, so output never depends on how the work is split)."""
    return int(max(8, min(256, 2 ** 20 // (size * size))))


def _soft(sd):
    """Anti-aliased mask from a signed distance in pixels (negative inside)."""
    return np.clip(0.5 - sd, 0.0, 1.0)


def _rotate(x, y, theta):
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    return x * c + y * s, -x * s + y * c


def _mask(shape, p, X, Y, S):
    """Foreground mask (b, S, S) in [0, 1] of class `shape` for the per-image parameters p (arrays of length b)."""
    x, y = X - p["cx"][:, None, None], Y - p["cy"][:, None, None]
    R = p["r"][:, None, None]
    u, v = _rotate(x, y, p["theta"])
    if shape == "disc":
        return _soft(np.hypot(x, y) - R)
    if shape == "ring":
        return _soft(np.abs(np.hypot(x, y) - R) - p["w"][:, None, None] / 2)
    if shape == "square":
        return _soft(np.maximum(np.abs(u), np.abs(v)) - 0.8 * R)
    if shape == "frame":
        return _soft(np.abs(np.maximum(np.abs(u), np.abs(v)) - 0.8 * R) - p["w"][:, None, None] / 2)
    if shape == "triangle":
        d = [u * np.cos(a) + v * np.sin(a) for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3)]
        return _soft(np.maximum(np.maximum(d[0], d[1]), d[2]) - 0.55 * R)
    if shape in ("cross", "xcross"):
        if shape == "xcross":
            u, v = _rotate(x, y, p["theta"] + np.pi / 4)
        h = np.maximum(0.28 * R, 1.2)
        arm1 = np.maximum(np.abs(u) - R, np.abs(v) - h)
        arm2 = np.maximum(np.abs(u) - h, np.abs(v) - R)
        return _soft(np.minimum(arm1, arm2))
    if shape == "ellipse":
        a, b = R * 1.1, np.maximum(R * 0.4, 2.0)
        r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        return _soft((r - 1.0) * b)
    if shape == "target":
        r = np.hypot(x, y)
        w = p["w"][:, None, None] / 2
        return np.maximum(_soft(np.abs(r - R) - w), _soft(r - 0.35 * R))
    # textures inside a random rectangle
    region = _soft(np.maximum(np.abs(x) - p["ha"][:, None, None], np.abs(y) - p["hb"][:, None, None]))
    per, ph = p["period"][:, None, None], p["phase"][:, None, None]
    small = p["tilt"]                               # a small random tilt, radians
    if shape == "hstripes":
        _, t = _rotate(x, y, small)
        pat = np.sin(2 * np.pi * t / per + ph)
    elif shape == "vstripes":
        t, _ = _rotate(x, y, small)
        pat = np.sin(2 * np.pi * t / per + ph)
    elif shape == "diagonal":
        t, _ = _rotate(x, y, small + np.where(p["flip"], np.pi / 4, -np.pi / 4))
        pat = np.sin(2 * np.pi * t / per + ph)
    elif shape == "checker":
        a, b = _rotate(x, y, small)
        pat = np.sin(2 * np.pi * a / (2 * per) + ph) * np.sin(2 * np.pi * b / (2 * per) + ph) * 4
    elif shape == "dots":
        a, b = _rotate(x, y, small)
        pat = (np.cos(2 * np.pi * a / (1.5 * per) + ph) * np.cos(2 * np.pi * b / (1.5 * per) + ph) - 0.45) * 4
    else:
        raise ValueError(f"unknown synthetic class {shape!r}")
    return region * np.clip(0.5 + 1.5 * pat, 0.0, 1.0)


def generate_block(seed, split, block, size, classes):
    """Images (k, S, S, 3) uint8 and labels (k,) int64 of one block (k = block_size(size))."""
    b, S = block_size(size), int(size)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 7, SPLITS[split], int(block)])))
    # Labels: balanced within the block, in a random order.
    labels = rng.permutation((np.arange(b) + block * b) % classes).astype(np.int64)
    f = S / 36.0                                       # geometry is specified for 36 px and scaled
    p = {
        "cx": rng.uniform(0.32, 0.68, b) * S,
        "cy": rng.uniform(0.32, 0.68, b) * S,
        "r": rng.uniform(0.17, 0.32, b) * S,
        "w": rng.uniform(2.2, 3.6, b) * f,
        "theta": rng.uniform(0, 2 * np.pi, b),
        "ha": rng.uniform(0.22, 0.42, b) * S,
        "hb": rng.uniform(0.22, 0.42, b) * S,
        "period": rng.uniform(4.0, 7.0, b) * f,
        "phase": rng.uniform(0, 2 * np.pi, b),
        "tilt": rng.uniform(-0.2, 0.2, b),
        "flip": rng.random(b) < 0.5,
    }
    p = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in p.items()}
    # Plus-crosses keep a near-axis orientation, X-crosses a near-diagonal one: the two classes differ by that.
    p["theta"] = np.where(np.isin(labels, [SHAPES.index("cross"), SHAPES.index("xcross")]), p["tilt"], p["theta"])
    fg = rng.uniform(0, 256, (b, 3))
    bg1 = (fg + rng.uniform(80, 176, (b, 3))) % 256
    bg2 = np.clip(bg1 + rng.normal(0, 40, (b, 3)), 0, 255)
    fg, bg1, bg2 = fg.astype(np.float32), bg1.astype(np.float32), bg2.astype(np.float32)
    phi = rng.uniform(0, 2 * np.pi, b).astype(np.float32)
    noise_sd = rng.uniform(3, 14, b).astype(np.float32)
    noise = rng.standard_normal((b, S, S, 3), dtype=np.float32)

    X, Y = np.meshgrid(np.arange(S, dtype=np.float32) + 0.5, np.arange(S, dtype=np.float32) + 0.5)
    X, Y = X[None], Y[None]
    mask = np.empty((b, S, S), np.float32)
    for c in range(classes):
        sel = np.flatnonzero(labels == c)
        if len(sel):
            mask[sel] = _mask(SHAPES[c], {k: v[sel] for k, v in p.items()}, X, Y, S)
    t = ((X - S / 2) * np.cos(phi)[:, None, None] + (Y - S / 2) * np.sin(phi)[:, None, None]) / S + 0.5
    t = t[..., None].astype(np.float32)
    bg = bg1[:, None, None, :] + (bg2 - bg1)[:, None, None, :] * t
    img = bg + (fg[:, None, None, :] - bg) * mask[..., None]
    img += noise * noise_sd[:, None, None, None].astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels


def generate(seed, split, n, size, classes, start=0):
    """Images start..start+n-1 of a split (any range; made from whole blocks and cut)."""
    if not 1 <= classes <= len(SHAPES):
        raise ValueError(f"classes must be in [1, {len(SHAPES)}], got {classes}")
    bs = block_size(size)
    imgs, labs = [], []
    for blk in range(start // bs, -(-(start + n) // bs)):
        im, lb = generate_block(seed, split, blk, size, classes)
        lo, hi = max(start - blk * bs, 0), min(start + n - blk * bs, bs)
        imgs.append(im[lo:hi])
        labs.append(lb[lo:hi])
    if not imgs:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(imgs), np.concatenate(labs)
