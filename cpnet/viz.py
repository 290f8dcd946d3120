"""Pictures of a trained network, composed with Pillow only (no plotting library).

- `filter_grid`: the conv1 kernels, tower 0 above tower 1 (the paper's Figure 3).
- `chart` / `curves_figure`: line charts drawn with ImageDraw (training curves, ablation plots).
- `predictions_panel`: images with their five most probable classes as bars (Figure 4, left).
- `neighbors_panel`: query images and their nearest training images in fc7 space (Figure 4, right).
- `fc7_features` / `nearest_neighbors`: what the last panel shows, computed on the model's array backend.

Every function returns a PIL image (RGB); the layouts are plain arithmetic, exposed as `*_layout` helpers so that
a caller (or a test) can find the tile that shows a given kernel or image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .backend import get_array_module, to_host

WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (0, 0, 0), (110, 110, 110), (228, 228, 228)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]
FILTER_BG = (48, 48, 48)
BAR = (158, 192, 230)        # a top-5 class that is not the true one
BAR_TRUE = (232, 106, 106)   # the true class, when it is among the top 5
SAME, OTHER = (40, 170, 60), (220, 50, 50)  # neighbour frames: same class as the query / another class

_fonts: dict = {}


def font(size=11):
    """Pillow's built-in font (scalable where Pillow has FreeType, else its fixed bitmap font)."""
    if size not in _fonts:
        try:
            _fonts[size] = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: one bitmap size only
            _fonts[size] = ImageFont.load_default()
    return _fonts[size]


def text_size(text, fnt=None):
    l, t, r, b = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=fnt or font())
    return r - l, b - t


def fit_text(text, width, fnt=None):
    """`text`, cut with an ellipsis so that it is at most `width` pixels wide."""
    fnt = fnt or font()
    if text_size(text, fnt)[0] <= width:
        return text
    while text and text_size(text + "…", fnt)[0] > width:
        text = text[:-1]
    return text + "…"


def enlarge(image, zoom):
    """uint8 (H, W, 3) -> PIL image `zoom` times larger, each pixel a zoom x zoom block (no smoothing)."""
    im = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB")
    return im if zoom == 1 else im.resize((im.width * zoom, im.height * zoom), Image.NEAREST)


def stack(images, direction="vertical", gap=0, bg=WHITE):
    """Images one below (or beside) the other, centred across, `gap` pixels apart."""
    images = [im for im in images if im is not None]
    if direction == "vertical":
        w, h = max(im.width for im in images), sum(im.height for im in images) + gap * (len(images) - 1)
    else:
        w, h = sum(im.width for im in images) + gap * (len(images) - 1), max(im.height for im in images)
    out = Image.new("RGB", (w, h), bg)
    pos = 0
    for im in images:
        if direction == "vertical":
            out.paste(im, ((w - im.width) // 2, pos))
            pos += im.height + gap
        else:
            out.paste(im, (pos, (h - im.height) // 2))
            pos += im.width + gap
    return out


def wrap_text(text, width, fnt=None):
    """`text` broken at spaces into lines at most `width` pixels wide (a word wider than that is cut)."""
    fnt = fnt or font()
    lines = []
    for para in str(text).split("\n"):
        cur = ""
        for word in para.split():
            trial = f"{cur} {word}" if cur else word
            if cur and text_size(trial, fnt)[0] > width:
                lines.append(cur)
                cur = word
            else:
                cur = trial
        lines.append(fit_text(cur, width, fnt))
    return lines


def title_block(lines, width, size=13, fg=BLACK, bg=WHITE, note_size=11, note_fg=GREY):
    """A strip `width` pixels wide: the first of `lines` as a title in `size` px, the rest as notes in
    `note_size` px, each wrapped to the width. An empty `lines` gives None."""
    lines = [ln for ln in lines if ln]
    if not lines:
        return None
    rows = []
    for i, text in enumerate(lines):
        fnt, color = (font(size), fg) if i == 0 else (font(note_size), note_fg)
        rows += [(ln, fnt, color) for ln in wrap_text(text, width - 8, fnt)]
    heights = [text_size("Ag", f)[1] + 5 for _, f, _ in rows]
    out = Image.new("RGB", (width, sum(heights) + 6), bg)
    d = ImageDraw.Draw(out)
    y = 3
    for (text, fnt, color), h in zip(rows, heights):
        d.text((4, y), text, fill=color, font=fnt)
        y += h
    return out


def titled(image, title, size=13, width=None):
    """`image` with its title (and notes: further lines of `title`, a str or a list) above it, wrapped to the
    image's width (or `width`)."""
    lines = [title] if isinstance(title, str) else list(title)
    head = title_block(lines, width or image.width, size)
    return stack([head, image], "vertical") if head is not None else image


# ---- conv1 filters ----------------------------------------------------------------------------------------------

def normalise_kernel(w):
    """One kernel (3, k, k) -> uint8 (k, k, 3): its own minimum black, its own maximum white, colours kept
    (one min/max over all three channels). A constant kernel is mid-grey."""
    w = np.asarray(w, dtype=np.float64)
    lo, hi = w.min(), w.max()
    if not hi > lo:
        return np.full(w.shape[1:] + (3,), 128, np.uint8)
    return np.round((w - lo) / (hi - lo) * 255).astype(np.uint8).transpose(1, 2, 0)


def colour_share(w):
    """The fraction of a kernel's (3, k, k) variance that is not grey: 0 for a kernel with R = G = B at every
    pixel (colour-agnostic), near 1 when its channels cancel (colour-opponent). The paper's Figure 3 found one
    tower's kernels largely colour-agnostic and the other's colour-specific."""
    w = np.asarray(w, dtype=np.float64)
    w0 = w - w.mean()
    total = float((w0 * w0).sum())
    if not total > 0:
        return 0.0
    chroma = w0 - w0.mean(axis=0, keepdims=True)
    return float((chroma * chroma).sum()) / total


@dataclass
class GridLayout:
    """Where tile j of tower t sits in a filter grid: each tower a block of a label line and rows of tiles, the
    blocks one below the other `gap` apart, below a title strip `top` pixels high, centred across `width`."""

    per_tower: int
    cols: int
    tile: int
    pad: int
    gap: int
    towers: int = 2
    label: int = 0
    top: int = 0
    min_width: int = 0

    @property
    def rows(self):
        return -(-self.per_tower // self.cols)

    @property
    def grid_width(self):
        return self.pad + self.cols * (self.tile + self.pad)

    @property
    def block(self):
        return self.label + self.pad + self.rows * (self.tile + self.pad)

    @property
    def left(self):
        return (self.size[0] - self.grid_width) // 2

    @property
    def size(self):
        return (max(self.grid_width, self.min_width),
                self.top + self.towers * self.block + (self.towers - 1) * self.gap)

    def tower_top(self, t):
        """y of tower t's label line."""
        return self.top + t * (self.block + self.gap)

    def box(self, t, j):
        """(left, top, right, bottom) of kernel j of tower t (right/bottom exclusive)."""
        r, c = divmod(j, self.cols)
        x = self.left + self.pad + c * (self.tile + self.pad)
        y = self.tower_top(t) + self.label + self.pad + r * (self.tile + self.pad)
        return x, y, x + self.tile, y + self.tile


FILTER_TEXT, FILTER_NOTE = (235, 235, 235), (175, 175, 175)


def filter_layout(W_shape, cols=None, zoom=None, pad=2, gap=10, towers=2, top=0, labels=True, min_width=0):
    """The layout of `filter_grid` for conv1 weights of shape W_shape, and the zoom it uses: about 48-pixel
    tiles, rows of at most 16 kernels."""
    n, _, k, _ = W_shape
    per = n // towers
    cols = int(cols or min(per, 16))
    zoom = int(zoom or max(1, math.ceil(48 / k)))
    label = text_size("Ag", font(12))[1] + 8 if labels else 0
    return GridLayout(per_tower=per, cols=cols, tile=k * zoom, pad=pad, gap=gap, towers=towers, label=label,
                      top=top, min_width=min_width), zoom


def filter_grid(W, cols=None, zoom=None, pad=2, gap=10, towers=2, title=None):
    """conv1 kernels W (towers * F, 3, k, k), tower 0's first, as a grid: each tower's F kernels in rows of `cols`
    under a label line (the tower, its kernel count and mean `colour_share`), tower 0 above tower 1; each kernel
    normalised on its own and enlarged `zoom` times. `title`: a str or lines (title, then notes) drawn above,
    wrapped to at least 480 pixels."""
    W = np.asarray(W)
    if W.ndim != 4 or W.shape[1] != 3 or W.shape[2] != W.shape[3] or W.shape[0] % towers:
        raise ValueError(f"conv1 weights of shape {W.shape}: expected ({towers}*F, 3, k, k)")
    lay, zoom = filter_layout(W.shape, cols, zoom, pad, gap, towers)
    width = max(lay.grid_width, 480 if title else 0)
    head = title_block([title] if isinstance(title, str) else list(title or []), width, fg=FILTER_TEXT,
                       bg=FILTER_BG, note_fg=FILTER_NOTE)
    lay, zoom = filter_layout(W.shape, cols, zoom, pad, gap, towers, top=head.height if head else 0,
                              min_width=width)
    out = Image.new("RGB", lay.size, FILTER_BG)
    if head is not None:
        out.paste(head, (0, 0))
    d = ImageDraw.Draw(out)
    fnt = font(12)
    for t in range(towers):
        if t:
            y = lay.tower_top(t) - gap // 2 - 1
            d.rectangle([0, y, out.width - 1, y + 1], fill=(150, 150, 150))
        kernels = W[t * lay.per_tower:(t + 1) * lay.per_tower]
        share = np.mean([colour_share(w) for w in kernels])
        text = f"tower {t}: {lay.per_tower} kernels of {W.shape[2]}x{W.shape[3]}x3, mean colour share {share:.2f}"
        d.text((lay.left + pad, lay.tower_top(t) + 4), fit_text(text, out.width - 2 * pad, fnt), fill=FILTER_TEXT,
               font=fnt)
        for j in range(lay.per_tower):
            out.paste(enlarge(normalise_kernel(kernels[j]), zoom), lay.box(t, j)[:2])
    return out


# ---- line charts ------------------------------------------------------------------------------------------------

@dataclass
class Series:
    x: list
    y: list
    label: str | None = None
    color: tuple = PALETTE[0]
    dashed: bool = False
    markers: bool = False
    width: int = 2
    band: tuple | None = None   # (lo, hi): per-x bounds drawn as a light area behind the line (spread over seeds)


@dataclass
class Mark:
    """A dashed reference line: horizontal at y=value (axis 'y') or vertical at x=value (axis 'x')."""

    value: float
    axis: str = "x"
    label: str = ""
    color: tuple = GREY


def nice_ticks(lo, hi, n=5, integer=False):
    """About n round tick values covering [lo, hi] (steps of 1, 2, 2.5 or 5 times a power of ten; whole numbers
    only when `integer`)."""
    if not hi > lo:
        hi = lo + 1
    raw = (hi - lo) / max(n, 1)
    if integer:
        raw = max(raw, 1.0)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw and not (integer and m * mag % 1))
    start = math.ceil(lo / step - 1e-9) * step
    ticks, v = [], start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _fmt(v):
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.0e}"


def _dashed_line(draw, pts, color, width, dash=6, gap=4):
    """A polyline drawn as dashes of `dash` px separated by `gap` px, the pattern running on across vertices."""
    on, left = True, dash
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        seg = math.hypot(x1 - x0, y1 - y0)
        pos = 0.0
        while pos < seg:
            step = min(left, seg - pos)
            if on:
                a, b = pos / seg, (pos + step) / seg
                draw.line([(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                          fill=color, width=width)
            pos += step
            left -= step
            if left <= 1e-9:
                on = not on
                left = dash if on else gap


def _finite(v):
    return v is not None and isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(v)


def _band_runs(s, log_x):
    """The stretches of (x, lo, hi) where a series' band is finite (a missing bound breaks the band)."""
    runs, cur = [], []
    for x, lo, hi in zip(s.x, *s.band):
        if _finite(x) and _finite(lo) and _finite(hi) and (x > 0 or not log_x):
            cur.append((x, lo, hi))
        elif cur:
            runs.append(cur)
            cur = []
    return [r for r in runs + [cur] if len(r) > 1]


def chart(series, size=(460, 320), title="", xlabel="", ylabel="", xlim=None, ylim=None, marks=(), legend=True,
          log_x=False, integer_x=False, xticks=None):
    """A line chart of `series` (lists of Series) with axes, ticks, a light grid, dashed `marks` and a legend.

    Points whose x or y is None/NaN are skipped and break the line. `ylim`/`xlim` default to the data's range
    (rounded out to ticks). With log_x the x axis is logarithmic (x values must be positive); integer_x puts x ticks
    on whole numbers only (epochs); `xticks` gives the x ticks instead (e.g. the learning rates of a sweep).
    """
    W, H = size
    fnt, small = font(11), font(10)
    img = Image.new("RGB", (W, H), WHITE)
    d = ImageDraw.Draw(img)
    th = text_size("Ag", fnt)[1]
    left, right, top, bottom = 50, 12, (th + 12 if title else 8), th * 2 + 16
    labelled = [s for s in series if s.label]
    above = legend == "above" and labelled   # one row of legend entries between the title and the plot
    if above:
        top += th + 8
    px0, px1, py0, py1 = left, W - right, top, H - bottom   # plot box, y grows downwards

    xs = [x for s in series for x, y in zip(s.x, s.y) if _finite(x) and _finite(y) and (x > 0 or not log_x)]
    ys = [y for s in series for x, y in zip(s.x, s.y) if _finite(x) and _finite(y)]
    ys += [v for s in series if s.band for x, lo, hi in zip(s.x, *s.band) if _finite(x) for v in (lo, hi)
           if _finite(v)]
    xs += [m.value for m in marks if m.axis == "x" and _finite(m.value)]
    ys += [m.value for m in marks if m.axis == "y" and _finite(m.value)]
    tx = lambda v: math.log10(v) if log_x else v  # noqa: E731
    if xlim is None:
        xlim = (min(xs), max(xs)) if xs else (0, 1)
    if ylim is None:
        ylim = (min(ys), max(ys)) if ys else (0, 1)
    x_lo, x_hi = tx(xlim[0]), tx(xlim[1])
    if not x_hi > x_lo:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    y_lo, y_hi = ylim
    if not y_hi > y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    yt = nice_ticks(y_lo, y_hi)
    y_lo, y_hi = min(y_lo, yt[0]), max(y_hi, yt[-1])

    def X(v):
        return px0 + (tx(v) - x_lo) / (x_hi - x_lo) * (px1 - px0)

    def Y(v):
        return py1 - (v - y_lo) / (y_hi - y_lo) * (py1 - py0)

    if xticks is not None:
        xt = [v for v in xticks if x_lo - 1e-9 <= tx(v) <= x_hi + 1e-9]
    elif log_x:
        xt = [10 ** e for e in range(math.floor(x_lo), math.ceil(x_hi) + 1) if x_lo - 1e-9 <= e <= x_hi + 1e-9]
    else:
        xt = [v for v in nice_ticks(x_lo, x_hi, integer=integer_x) if x_lo - 1e-9 <= v <= x_hi + 1e-9]
    for v in yt:
        y = Y(v)
        d.line([(px0, y), (px1, y)], fill=LIGHT)
        lab = _fmt(v)
        d.text((px0 - 5 - text_size(lab, small)[0], y - th / 2), lab, fill=GREY, font=small)
    for v in xt:
        x = X(v)
        d.line([(x, py0), (x, py1)], fill=LIGHT)
        lab = _fmt(v)
        d.text((x - text_size(lab, small)[0] / 2, py1 + 4), lab, fill=GREY, font=small)
    d.rectangle([px0, py0, px1, py1], outline=GREY)
    if title:
        d.text(((W - text_size(title, fnt)[0]) / 2, 5), title, fill=BLACK, font=fnt)
    if xlabel:
        d.text(((px0 + px1 - text_size(xlabel, fnt)[0]) / 2, H - th - 6), xlabel, fill=BLACK, font=fnt)
    if ylabel:
        lab = Image.new("RGB", (text_size(ylabel, fnt)[0] + 4, th + 4), WHITE)
        ImageDraw.Draw(lab).text((2, 0), ylabel, fill=BLACK, font=fnt)
        lab = lab.rotate(90, expand=True)
        img.paste(lab, (2, int((py0 + py1 - lab.height) / 2)))

    for s in series:   # each band a translucent layer, so that overlapping bands stay visible
        runs = _band_runs(s, log_x) if s.band else []
        if runs:
            layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
            ld = ImageDraw.Draw(layer)
            for pts in runs:
                ld.polygon([(X(x), Y(hi)) for x, lo, hi in pts] + [(X(x), Y(lo)) for x, lo, hi in reversed(pts)],
                           fill=s.color + (64,))
            img = Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")
            d = ImageDraw.Draw(img)

    row_ends = []  # per text row, the right end of the last x-mark label in it: close marks' labels stack
    for m in marks:
        if not _finite(m.value):
            continue
        if m.axis == "x":
            x = X(m.value)
            _dashed_line(d, [(x, py0), (x, py1)], m.color, 1)
            if m.label:
                w = text_size(m.label, small)[0]
                lx = x + 3 if x + 3 + w <= px1 - 2 else x - 3 - w  # near the right edge: left of the line
                row = next((i for i, end in enumerate(row_ends) if lx > end + 4), len(row_ends))
                if row == len(row_ends):
                    row_ends.append(0)
                row_ends[row] = lx + w
                d.text((lx, py0 + 2 + row * (th + 2)), m.label, fill=m.color, font=small)
        else:
            y = Y(m.value)
            _dashed_line(d, [(px0, y), (px1, y)], m.color, 1)
            if m.label:
                d.text((px1 - 3 - text_size(m.label, small)[0], y - th - 2), m.label, fill=m.color, font=small)

    for s in series:
        runs, cur = [], []
        for x, y in zip(s.x, s.y):
            if _finite(x) and _finite(y) and (x > 0 or not log_x):
                cur.append((X(x), Y(y)))
            elif cur:
                runs.append(cur)
                cur = []
        if cur:
            runs.append(cur)
        for pts in runs:
            if len(pts) > 1:
                if s.dashed:
                    _dashed_line(d, pts, s.color, s.width)
                else:
                    d.line(pts, fill=s.color, width=s.width, joint="curve")
            if s.markers or len(pts) == 1:
                for x, y in pts:
                    d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=s.color)

    def swatch(s, x, y):
        if s.dashed:
            _dashed_line(d, [(x, y), (x + 20, y)], s.color, s.width, dash=5, gap=3)
        else:
            d.line([(x, y), (x + 20, y)], fill=s.color, width=s.width)

    if above:
        widths = [text_size(s.label, small)[0] + 38 for s in labelled]
        x, y = (px0 + px1 - sum(widths)) / 2, py0 - th / 2 - 6
        for s, w in zip(labelled, widths):
            swatch(s, x, y)
            d.text((x + 25, y - th / 2 - 1), s.label, fill=BLACK, font=small)
            x += w
    elif legend and labelled:
        lw = max(text_size(s.label, small)[0] for s in labelled) + 34
        lh = len(labelled) * (th + 3) + 6
        pts = [(X(x), Y(y)) for s in series for x, y in zip(s.x, s.y)
               if _finite(x) and _finite(y) and (x > 0 or not log_x)]
        corners = [(px1 - lw - 6, py0 + 6), (px0 + 6, py0 + 6), (px1 - lw - 6, py1 - lh - 6), (px0 + 6, py1 - lh - 6)]
        # the corner that hides the fewest data points (top right on ties)
        lx, ly = min(corners, key=lambda c: sum(c[0] - 4 <= x <= c[0] + lw + 4 and c[1] - 4 <= y <= c[1] + lh + 4
                                                for x, y in pts))
        d.rectangle([lx, ly, lx + lw, ly + lh], fill=WHITE, outline=LIGHT)
        for i, s in enumerate(labelled):
            y = ly + 4 + i * (th + 3) + th / 2
            swatch(s, lx + 4, y)
            d.text((lx + 29, y - th / 2 - 1), s.label, fill=BLACK, font=small)
    return img


def lr_drops(rows):
    """[(epoch, new lr)] where the learning rate fell at least fivefold at once (a division of a plateau or step
    schedule, not the cosine schedule's glide): row i's lr is the one used during epoch i, so a drop between rows
    i-1 and i took effect right after epoch rows[i-1]['epoch']."""
    out = []
    for a, b in zip(rows, rows[1:]):
        if _finite(a.get("lr")) and _finite(b.get("lr")) and 5 * b["lr"] <= a["lr"]:
            out.append((a["epoch"], b["lr"]))
    return out


def curves_figure(rows, title="", size=(900, 340)):
    """Loss (left) and top-1/top-5 error (right) per epoch from metrics.jsonl rows; training dashed, validation
    solid; learning-rate drops as dashed vertical lines. The whole picture, title included, is `size`
    (width, height); `title` is a str or lines (title, then notes), wrapped to the width."""
    ep = [r.get("epoch") for r in rows]
    col = lambda key: [r.get(key) for r in rows]  # noqa: E731
    marks = [Mark(e, "x", f"lr {lr:g}") for e, lr in lr_drops(rows)]
    head = title_block([title] if isinstance(title, str) else list(title), size[0])
    h = size[1] - (head.height if head else 0)
    if h < 120:
        raise ValueError(f"a curves figure of height {size[1]} leaves {h} px for the charts under its title")
    left = (size[0] // 2, h)
    loss = chart([Series(ep, col("train_loss"), "train", PALETTE[0], dashed=True, markers=True),
                  Series(ep, col("val_loss"), "validation", PALETTE[0], markers=True)],
                 left, "loss", "epoch", "cross-entropy", marks=marks, integer_x=True, legend="above")
    err = chart([Series(ep, col("train_top1"), "train top-1", PALETTE[3], dashed=True, markers=True),
                 Series(ep, col("val_top1"), "val top-1", PALETTE[3], markers=True),
                 Series(ep, col("train_top5"), "train top-5", PALETTE[2], dashed=True, markers=True),
                 Series(ep, col("val_top5"), "val top-5", PALETTE[2], markers=True)],
                (size[0] - left[0], h), "error", "epoch", "error rate", ylim=(0, 1), marks=marks, integer_x=True,
                legend="above")
    return stack([head, stack([loss, err], "horizontal")], "vertical")


# ---- predictions ------------------------------------------------------------------------------------------------

@dataclass
class PanelLayout:
    cols: int
    rows: int
    image: int         # enlarged image side
    cell_w: int
    cell_h: int
    pad: int = 8
    bars: int = 5
    line: int = 14
    header: int = 0    # title and legend strip above the cells
    pct: int = 0       # width of the column that holds the percentages, right of the bars

    @property
    def size(self):
        return (self.pad + self.cols * (self.cell_w + self.pad),
                self.header + self.pad + self.rows * (self.cell_h + self.pad))

    def origin(self, i):
        r, c = divmod(i, self.cols)
        return self.pad + c * (self.cell_w + self.pad), self.header + self.pad + r * (self.cell_h + self.pad)

    def image_box(self, i):
        x, y = self.origin(i)
        x += (self.cell_w - self.image) // 2
        return x, y, x + self.image, y + self.image

    def bar_box(self, i, rank):
        """(left, top, right, bottom) of the full-length (100 %) bar of the rank-th most probable class of image
        i (rank 0: the most probable); the percentage is written right of it, never over it."""
        x, y = self.origin(i)
        y += self.image + 4 + self.line + rank * self.line
        return x, y + 1, x + self.cell_w - self.pct, y + self.line - 1


PANEL_FONT = 11


def predictions_layout(n, size, top=5, cols=None, zoom=None, header=0):
    zoom = int(zoom or max(1, math.ceil(96 / size)))
    image = size * zoom
    cols = int(cols or min(n, 4))
    fnt = font(PANEL_FONT)
    line = text_size("Ag", fnt)[1] + 6
    cell_w = max(image, 170)
    cell_h = image + 4 + line + top * line
    return PanelLayout(cols=cols, rows=-(-n // cols), image=image, cell_w=cell_w, cell_h=cell_h, bars=top, line=line,
                       header=header, pct=text_size("100%", fnt)[0] + 8)


def _swatch_legend(items, width, fnt):
    """One line of coloured squares and their labels: items [(colour, label)]."""
    h = text_size("Ag", fnt)[1] + 8
    out = Image.new("RGB", (width, h), WHITE)
    d = ImageDraw.Draw(out)
    x = 4
    for color, label in items:
        d.rectangle([x, 4, x + h - 9, h - 5], fill=color)
        x += h - 4
        d.text((x, 3), label, fill=BLACK, font=fnt)
        x += text_size(label, fnt)[0] + 16
    return out


def predictions_panel(images, probs, labels, classes, top=5, cols=None, zoom=None, title=None):
    """Each image with its true class under it and its `top` most probable classes as bars (length =
    probability, the percentage right of the bar); the true class's bar is red when it is among them, and its
    rank is given when it is not (the paper's Figure 4, left). Above: `title` (a str or lines: title, then
    notes) and a legend of the bar colours."""
    images, probs, labels = np.asarray(images), np.asarray(probs), np.asarray(labels)
    n = len(images)
    top = min(top, probs.shape[1])
    fnt = font(PANEL_FONT)
    lay = predictions_layout(n, images.shape[1], top, cols, zoom)
    head = title_block([title] if isinstance(title, str) else list(title or []), lay.size[0])
    legend = _swatch_legend([(BAR_TRUE, "the true class"), (BAR, "another class")], lay.size[0], fnt)
    header = stack([head, legend], "vertical")
    lay = predictions_layout(n, images.shape[1], top, cols, zoom, header=header.height)
    zoom = lay.image // images.shape[1]
    out = Image.new("RGB", lay.size, WHITE)
    out.paste(header, (0, 0))
    d = ImageDraw.Draw(out)
    name = lambda c: str(classes[c]) if 0 <= c < len(classes) else str(c)  # noqa: E731
    for i in range(n):
        x, y = lay.origin(i)
        ix, iy, _, _ = lay.image_box(i)
        out.paste(enlarge(images[i], zoom), (ix, iy))
        y += lay.image + 4
        label = int(labels[i])
        order = np.argsort(-probs[i], kind="stable")
        truth = f"true: {name(label)}"
        if label not in order[:top].tolist():
            truth += f" (rank {order.tolist().index(label) + 1})" if 0 <= label < probs.shape[1] else ""
        d.text((x + 2, y), fit_text(truth, lay.cell_w - 4, fnt), fill=BLACK, font=fnt)
        for rank, c in enumerate(order[:top]):
            p = float(probs[i, c])
            x0, y0, x1, y1 = lay.bar_box(i, rank)
            w = int(round(p * (x1 - x0)))
            d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(244, 244, 244))
            if w > 0:
                d.rectangle([x0, y0, x0 + w - 1, y1 - 1], fill=BAR_TRUE if c == label else BAR)
            d.text((x0 + 3, y0 + 1), fit_text(name(int(c)), x1 - x0 - 6, fnt), fill=BLACK, font=fnt)
            pct = f"{100 * p:.0f}%"
            d.text((x0 + lay.cell_w - 2 - text_size(pct, fnt)[0], y0 + 1), pct, fill=GREY, font=fnt)
    return out


# ---- nearest neighbours -----------------------------------------------------------------------------------------

@dataclass
class RowsLayout:
    k: int
    tile: int          # enlarged image side
    frame: int = 3
    pad: int = 4
    sep: int = 14      # extra space between the query and its neighbours
    rows: int = 1
    label: int = 0     # height of the caption lines under each tile (0: none)
    header: int = 0    # title strip above the rows

    @property
    def cell(self):
        return self.tile + 2 * self.frame

    @property
    def size(self):
        return (self.pad + (self.k + 1) * (self.cell + self.pad) + self.sep,
                self.header + self.pad + self.rows * (self.cell + self.label + self.pad))

    def box(self, r, j):
        """Frame box of tile j of row r (j = 0: the query, 1..k: its neighbours, nearest first)."""
        x = self.pad + j * (self.cell + self.pad) + (self.sep if j else 0)
        y = self.header + self.pad + r * (self.cell + self.label + self.pad)
        return x, y, x + self.cell, y + self.cell

    def image_box(self, r, j):
        x, y, _, _ = self.box(r, j)
        return x + self.frame, y + self.frame, x + self.frame + self.tile, y + self.frame + self.tile


def neighbors_layout(n, k, size, zoom=None, captions=True, header=0, lines=2):
    zoom = int(zoom or max(1, math.ceil(72 / size)))
    label = lines * (text_size("Ag", font(10))[1] + 3) + 2 if captions else 0
    return RowsLayout(k=k, tile=size * zoom, rows=n, label=label, header=header), zoom


def neighbors_panel(queries, neighbours, same=None, captions=None, zoom=None, title=None):
    """One row per query: the query (black frame), then its k neighbours nearest first, framed green when of the
    query's class and red otherwise (`same`: bool (n, k)); `captions`: optional (n, k + 1) strings under the
    tiles, each up to two lines ('\n'); `title`: a str or lines (title, then notes) above."""
    queries, neighbours = np.asarray(queries), np.asarray(neighbours)
    n, k = neighbours.shape[:2]
    lay, zoom = neighbors_layout(n, k, queries.shape[1], zoom, captions is not None)
    head = title_block([title] if isinstance(title, str) else list(title or []), lay.size[0])
    lay, zoom = neighbors_layout(n, k, queries.shape[1], zoom, captions is not None,
                                 header=head.height if head else 0)
    out = Image.new("RGB", lay.size, WHITE)
    if head is not None:
        out.paste(head, (0, 0))
    d = ImageDraw.Draw(out)
    fnt = font(10)
    lh = text_size("Ag", fnt)[1] + 3
    for r in range(n):
        for j in range(k + 1):
            im = queries[r] if j == 0 else neighbours[r, j - 1]
            color = BLACK if j == 0 else (GREY if same is None else (SAME if same[r][j - 1] else OTHER))
            x0, y0, x1, y1 = lay.box(r, j)
            d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=color)
            out.paste(enlarge(im, zoom), lay.image_box(r, j)[:2])
            if captions is not None:
                for li, text in enumerate(str(captions[r][j]).split("\n")[:2]):
                    d.text((x0, y1 + 1 + li * lh), fit_text(text, lay.cell, fnt), fill=BLACK, font=fnt)
    return out


def fc7_features(model, batches, n=None):
    """Both towers' fc7 outputs (N, 2 * fc7) for every batch (x (b, 1, 3, C, C) or (b, 3, C, C), ...) of
    `batches`, in order, left on tower 0's device (the model's array module)."""
    xp = model.devices[0].xp
    parts = []
    for item in batches:
        x = item[0] if isinstance(item, tuple) else item
        if x.ndim == 5:
            x = x.reshape((-1,) + x.shape[2:])
        f = model.forward(x, train=False, upto="fc7")
        with model.devices[0]:
            parts.append(f.astype(xp.float32, copy=False))
        model.clear()
    with model.devices[0]:
        if not parts:
            return xp.zeros((0, 2 * model.cfg.fc[1]), xp.float32)
        return xp.concatenate(parts, axis=0)


def nearest_neighbors(queries, pool, k, chunk=8192):
    """Indices and Euclidean distances (host arrays, (n, k), nearest first) of the k rows of `pool` nearest to
    each row of `queries`, on the pool's array module.

    Squared distances come from one matrix product per chunk of the pool, ||q||^2 - 2 q.p + ||p||^2; a running
    top-k per query (argpartition over the current best and the new chunk) keeps memory at n x (k + chunk).
    """
    xp = get_array_module(pool)
    q = xp.asarray(queries, dtype=xp.float32)
    n, N = q.shape[0], pool.shape[0]
    k = min(int(k), N)
    qq = (q * q).sum(axis=1)[:, None]
    best_d = xp.zeros((n, 0), xp.float32)
    best_i = xp.zeros((n, 0), xp.int64)
    for s in range(0, N, chunk):
        p = xp.asarray(pool[s:s + chunk], dtype=xp.float32)
        d2 = qq - 2.0 * (q @ p.T) + (p * p).sum(axis=1)[None, :]
        idx = xp.broadcast_to(xp.arange(s, s + p.shape[0], dtype=xp.int64)[None, :], d2.shape)
        D = xp.concatenate([best_d, d2], axis=1)
        I = xp.concatenate([best_i, idx], axis=1)
        if D.shape[1] > k:
            sel = xp.argpartition(D, k - 1, axis=1)[:, :k]
            D, I = xp.take_along_axis(D, sel, axis=1), xp.take_along_axis(I, sel, axis=1)
        best_d, best_i = D, I
    order = xp.argsort(best_d, axis=1)
    best_d = xp.take_along_axis(best_d, order, axis=1)
    best_i = xp.take_along_axis(best_i, order, axis=1)
    return to_host(best_i), to_host(xp.sqrt(xp.maximum(best_d, 0)))


__all__ = ["filter_grid", "filter_layout", "normalise_kernel", "chart", "Series", "Mark", "curves_figure", "lr_drops",
           "predictions_panel", "predictions_layout", "neighbors_panel", "neighbors_layout", "fc7_features",
           "nearest_neighbors", "stack", "titled", "title_block", "wrap_text", "colour_share", "enlarge", "nice_ticks"]
