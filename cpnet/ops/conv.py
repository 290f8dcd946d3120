"""2-D convolution (cross-correlation, as in every CNN library) by im2col + one GEMM per group.

    y[n, f, oy, ox] = b[f] + sum_{c in group(f), i, j} W[f, c, i, j] * x_pad[n, g*Cg + c, oy*sy + i, ox*sx + j]

Output size floor((H + 2ph - kh) / sy) + 1 (likewise for the width). `groups` splits the channels into
independent blocks: AlexNet's conv2, conv4 and conv5 see only their own tower's maps (Krizhevsky et al. 2012,
§3.2 and Figure 2), which is groups=2 when both towers live in one array.

The im2col layout (shared with the CUDA kernel in cpnet/kernels):
``col`` has shape (C*kh*kw, N*Ho*Wo); row c*kh*kw + i*kw + j, column n*Ho*Wo + oy*Wo + ox holds
x[n, c, oy*sy - ph + i, ox*sx - pw + j], zero where that falls in the padding. Group g's rows are the contiguous
block [g*Cg*kh*kw, (g+1)*Cg*kh*kw), so ``col.reshape(G, Cg*kh*kw, -1)`` is a view, and

    y_g = W_g.reshape(Fg, Cg*kh*kw) @ col_g          (Fg, N*Ho*Wo), then transposed to NCHW.

Backward: dW_g = dy_g @ col_g.T, dcol_g = W_g.T @ dy_g, dx = col2im(dcol), db = sum of dy over (n, y, x).
col2im is the adjoint of im2col: it adds every column entry back onto the pixel it came from.

On the host, layers with small output maps use the *batch-inner* column order instead: column
(oy*Wo + ox)*N + n, from a copy of x transposed to (C, H, W, N). The products are the same (the columns are only
permuted, consistently in col, y and dy), but im2col and col2im then copy runs of Wo*N contiguous elements
instead of Wo (7 or 15 in alexnet-small), and the transposes to and from NCHW move arrays of that layer's size.
For alexnet-small's conv2-conv5 at batch 128 this took im2col + col2im + both transposes from 34 to 23 ms
(conv2) and from 20 to 8 ms (conv3) per tower (docs/PERFORMANCE.md, CPU section). Large maps (conv1) keep the
image-major order: there the transposes of the 32x32 maps cost more than the short rows.

On the host, stride-1 layers with enough channels and images (FOURIER_MIN_CHANNELS and
FOURIER_MAX_FILTERS_PER_IMAGE: alexnet-small's conv2-conv5, alexnet's conv2) skip im2col and multiply in the
frequency domain instead (cpnet/ops/fourier.py): the DFTs as small GEMMs, one complex product over channels per
frequency bin; their cache is a fourier.Cache. Of the other stride-1 layers, those with square kernels listed in
WINOGRAD_TILES (by default the 3x3 ones) skip im2col and run Winograd's minimal filtering F(2x2, 3x3) instead
(cpnet/ops/winograd.py): 16 products over channels, one per entry of the 4x4 transform domain, 4 multiplies per
output pixel where im2col does 9; their cache is a winograd.Cache. conv2d_backward recognises both caches. The
GPU path and bf16 keep im2col.

bf16 (cpnet.precision): x, y, dy, dx and the column matrices are bf16, W and b float32 (the master weights). W is
rounded to bf16 once per forward (the cache keeps that copy for backward), every product takes bf16 inputs and
accumulates in float32; y gets its bias in float32 and is rounded once; dW and db come out in float32 (db as the
product of dy with a column of ones), dcol in bf16, and col2im sums it in float32 before rounding dx.
"""

from __future__ import annotations

import os

import numpy as np

from cpnet import kernels, precision
from cpnet.backend import get_array_module
from cpnet.errors import CpnetError
from cpnet.shapes import window_out

from . import _check, fourier, winograd
from ._host import buffer as _buffer
from .activations import relu_backward, relu_forward

OP_F = "conv2d_forward"
OP_B = "conv2d_backward"


def _out_hw(H, W, kh, kw, sy, sx, ph, pw):
    return window_out(H, kh, sy, ph), window_out(W, kw, sx, pw)


# The host path takes the batch-inner column order when a layer's output maps have at most this many pixels
# (alexnet-small: conv2-5 at 15x15 and 7x7; alexnet: conv3-5 at 13x13). Measured per layer in
# docs/PERFORMANCE.md; tests set it to 0 or a large value to run either order.
BATCH_INNER_MAX_HW = 256


# Host stride-1 convolutions with square kernels go through Winograd's minimal filtering instead of im2col
# (cpnet/ops/winograd.py): kernel size r -> output tile m of F(m x m, r x r). The default, F(2x2, 3x3) for the 3x3
# layers (alexnet-small's and alexnet's conv3-conv5), is as exact as im2col in float32 and faster there
# (docs/PERFORMANCE.md, CPU section, third round). CPNET_WINOGRAD=0 turns it off (im2col everywhere); a list
# such as CPNET_WINOGRAD=3:4,5:2 picks the tiles per kernel size (F(4x4, 3x3) and F(2x2, 5x5) are faster still
# but lose 15-30 times more float32 rounding). None: read from the environment at the first host convolution;
# tests set a dict ({} for im2col only).
WINOGRAD_TILES = None
WINOGRAD_DEFAULT = {3: 2}
# ... and only layers with at least this many output pixels over the batch (N*Ho*Wo) and input channels per
# group: below them the transforms' hundred-odd NumPy passes cost more than the products save (alexnet-small's
# conv3-5 at batch 32: 1568 pixels; its conv1, 5x5 on 3 channels, took 72 -> 196 ms through F(2x2, 5x5)).
WINOGRAD_MIN_PIXELS = 1024
WINOGRAD_MIN_CHANNELS = 16


# Host stride-1 convolutions through the DFT (cpnet/ops/fourier.py) where it pays: at least this many input
# channels per group (alexnet-small's conv1, 3 channels, is faster through im2col: 9.5 against 12.2 ms at batch
# 32), and no more filters per group (Fg * Cg) than this many per image in the batch, since the filters'
# spectra (bins x Fg x Cg) grow with the channels and the products' rows with the images (alexnet's conv3-5 at
# batch 16, 12 to 49 thousand filters a group, are faster through Winograd). Measured in docs/PERFORMANCE.md.
# None: from CPNET_FOURIER ("0" turns it off) at the first host convolution; tests set True or False.
FOURIER = None
FOURIER_MIN_CHANNELS = 16
FOURIER_MAX_FILTERS_PER_IMAGE = 1024


def fourier_on():
    """Whether the host's DFT path is on (CPNET_FOURIER unless set)."""
    global FOURIER
    if FOURIER is None:
        text = os.environ.get("CPNET_FOURIER", "").strip()
        if text not in ("", "0", "1"):
            raise CpnetError(f"CPNET_FOURIER={text!r}: expected 0 (off) or 1 (on, the default)")
        FOURIER = text != "0"
    return FOURIER


def _fourier_pays(N, Cg, Fg):
    return fourier_on() and Cg >= FOURIER_MIN_CHANNELS and Fg * Cg <= FOURIER_MAX_FILTERS_PER_IMAGE * N


def winograd_tiles():
    """{kernel size: output tile} for the host's Winograd path, from CPNET_WINOGRAD unless set."""
    global WINOGRAD_TILES
    if WINOGRAD_TILES is None:
        WINOGRAD_TILES = parse_winograd(os.environ.get("CPNET_WINOGRAD", ""))
    return WINOGRAD_TILES


def parse_winograd(text):
    """CPNET_WINOGRAD's value: "" or "1" the default, "0" none, else "r:m" pairs separated by commas."""
    text = text.strip()
    if text in ("", "1"):
        return dict(WINOGRAD_DEFAULT)
    if text == "0":
        return {}
    tiles = {}
    for item in text.split(","):
        r, _, m = item.strip().partition(":")
        if not (r.isdigit() and m.isdigit() and int(r) >= 2 and int(m) >= 1 and int(m) + int(r) - 1 <= 8):
            raise CpnetError(f"CPNET_WINOGRAD={text!r}: expected 0, 1 or kernel:tile pairs such as 3:2,5:2 "
                             f"(kernel >= 2, tile >= 1, kernel + tile <= 9)")
        tiles[int(r)] = int(m)
    return tiles


def _batch_inner(Ho, Wo):
    return Ho * Wo <= BATCH_INNER_MAX_HW


def _padded_t(x, ph, pw, batch_inner):
    """x (N, C, H, W) as a zero-padded copy (C, N, H+2ph, W+2pw), or (C, H+2ph, W+2pw, N) when batch_inner."""
    N, C, H, W = x.shape
    if batch_inner:
        xt = np.zeros((C, H + 2 * ph, W + 2 * pw, N), dtype=x.dtype)
        xt[:, ph : ph + H, pw : pw + W, :] = x.transpose(1, 2, 3, 0)
    else:
        xt = np.zeros((C, N, H + 2 * ph, W + 2 * pw), dtype=x.dtype)
        xt[:, :, ph : ph + H, pw : pw + W] = x.transpose(1, 0, 2, 3)
    return xt


def _windows(xt, kh, kw, sy, sx, Ho, Wo, batch_inner):
    """Yield (i, j, view): the view of the padded copy `xt` (from _padded_t) that kernel offset (i, j) reads,
    shaped (C, N, Ho, Wo), or (C, Ho, Wo, N) when batch_inner."""
    for i in range(kh):
        for j in range(kw):
            rows, cols = slice(i, i + sy * (Ho - 1) + 1, sy), slice(j, j + sx * (Wo - 1) + 1, sx)
            yield i, j, (xt[:, rows, cols, :] if batch_inner else xt[:, :, rows, cols])


def _col6(col, C, kh, kw, N, Ho, Wo, batch_inner):
    return col.reshape((C, kh, kw, Ho, Wo, N) if batch_inner else (C, kh, kw, N, Ho, Wo))


def im2col_cpu(x, kh, kw, sy, sx, ph, pw, out=None, batch_inner=False):
    """(N, C, H, W) -> col (C*kh*kw, N*Ho*Wo) in the layout above; one strided copy per kernel offset.
    `out`: a C-contiguous array of that shape and x's dtype to write into (a reused buffer), or None.
    batch_inner: the batch-inner column order, (oy*Wo + ox)*N + n (host only; the kernels keep the other)."""
    N, C, H, W = x.shape
    Ho, Wo = _out_hw(H, W, kh, kw, sy, sx, ph, pw)
    xt = _padded_t(x, ph, pw, batch_inner)
    col = np.empty((C * kh * kw, N * Ho * Wo), dtype=x.dtype) if out is None else out
    c6 = _col6(col, C, kh, kw, N, Ho, Wo, batch_inner)
    for i, j, view in _windows(xt, kh, kw, sy, sx, Ho, Wo, batch_inner):
        c6[:, i, j] = view
    return col


def col2im_cpu(col, x_shape, kh, kw, sy, sx, ph, pw, batch_inner=False):
    """The adjoint of im2col_cpu: col (C*kh*kw, N*Ho*Wo) -> x (N, C, H, W), overlapping entries summed.
    batch_inner: col is in the batch-inner column order (as im2col_cpu's)."""
    N, C, H, W = x_shape
    Ho, Wo = _out_hw(H, W, kh, kw, sy, sx, ph, pw)
    c6 = _col6(col, C, kh, kw, N, Ho, Wo, batch_inner)
    shape = (C, H + 2 * ph, W + 2 * pw, N) if batch_inner else (C, N, H + 2 * ph, W + 2 * pw)
    xt = np.zeros(shape, dtype=col.dtype)
    for i, j, view in _windows(xt, kh, kw, sy, sx, Ho, Wo, batch_inner):
        view += c6[:, i, j]
    if batch_inner:
        return np.ascontiguousarray(xt[:, ph : ph + H, pw : pw + W, :].transpose(3, 0, 1, 2))
    return np.ascontiguousarray(xt[:, :, ph : ph + H, pw : pw + W].transpose(1, 0, 2, 3))


def _im2col(x, *geom, workspace=None, batch_inner=False):
    if get_array_module(x) is np:
        N, C, H, W = x.shape
        Ho, Wo = _out_hw(H, W, *geom)
        out = _buffer(workspace, "col", (C * geom[0] * geom[1], N * Ho * Wo), x.dtype)
        return im2col_cpu(x, *geom, out=out, batch_inner=batch_inner)
    from cpnet import kernels

    return kernels.im2col_gpu(x, *geom, check=False)


def _col2im(col, x_shape, *geom, batch_inner=False):
    if get_array_module(col) is np:
        if precision.is_bf16(col):  # the kernel's semantics: the sums in float32, dx rounded once
            return precision.to_bf16(col2im_cpu(precision.from_bf16(col), x_shape, *geom, batch_inner=batch_inner))
        return col2im_cpu(col, x_shape, *geom, batch_inner=batch_inner)
    from cpnet import kernels

    return kernels.col2im_gpu(col, x_shape, *geom, check=False)


def _group_gemm(xp, a, b, out):
    """out[g] = a[g] @ b[g] for every group g, as one 2-D product per group; returns out.

    2-D products take transposed views as they are (BLAS/cuBLAS transpose flags, no copy), and on a GPU they
    follow the TF32 switch (`backend.set_tf32`). CuPy's 3-D `matmul` (as of CuPy 14, `_routines_linalg.matmul`)
    makes its operands contiguous first, copying a transposed one whole (for conv1's weight gradient the 560 MB
    column matrix at batch 128), and calls cuBLAS's strided-batched GEMM with the FP32 compute type whatever
    the switch.
    `out` must be C-contiguous, so each out[g] is too. bf16 operands: precision.matmul (float32 accumulation, out
    float32 or bf16).
    """
    if precision.is_bf16(a):
        for g in range(a.shape[0]):
            precision.matmul(a[g], b[g], out=out[g])
        return out
    for g in range(a.shape[0]):
        xp.matmul(a[g], b[g], out=out[g])
    return out


def _to_nchw(xp, ym, b, y, batch_inner=False):
    """The GEMM's (F, N*Ho*Wo) output (any leading group split of F) written into y (N, F, Ho, Wo), plus the
    bias when b is not None, in one pass over the output; returns y. batch_inner: ym's columns are in the
    batch-inner order."""
    N, F, Ho, Wo = y.shape
    if batch_inner:
        src = ym.reshape(F, Ho * Wo, N).transpose(2, 0, 1)
    else:
        src = ym.reshape(F, N, Ho * Wo).transpose(1, 0, 2)
    if b is not None:
        xp.add(src, b[None, :, None], out=y.reshape(N, F, Ho * Wo))
    else:
        y.reshape(N, F, Ho * Wo)[...] = src
    return y


def conv2d_forward(x, W, b, stride=1, pad=0, groups=1, workspace=None, relu=False):
    """y = conv(x, W) + b on NCHW arrays; returns (y, cache). W is (F, C/groups, kh, kw), b is (F,) or None.

    `workspace`: on the host, a dict in which the column matrix is kept for the next call (the Conv2D layer
    owns one); the cache then refers to it, so a later forward with the same workspace overwrites it.
    `relu=True`: y = max(conv(x, W) + b, 0), the ReLU that follows the convolution applied here (and its mask in
    backward): on a GPU in the layout pass itself (one kernel for layout, bias and ReLU where there were two, the
    same for backward), elsewhere as ops.relu_forward; the same bits as a separate ReLU either way."""
    xp = get_array_module(x)
    _check.ndim(OP_F, "x", x, 4, "(N, C, H, W)")
    _check.floating(OP_F, "x", x, kernel=True)
    G = _check.positive_int(OP_F, "groups", groups)
    N, C, H, Wd = x.shape
    if C % G:
        _check.fail(OP_F, f"x has C={C} channels, not divisible by groups={G}")
    Cg = C // G
    _check.ndim(OP_F, "W", W, 4, f"(F, C/groups={Cg}, kh, kw)")
    F, Cw, kh, kw = W.shape
    if Cw != Cg or F % G or kh < 1 or kw < 1:
        _check.fail(OP_F, f"W must have shape (F, C/groups={Cg}, kh, kw) with F divisible by groups={G}, "
                          f"got {tuple(W.shape)}")
    _check.param_dtype(OP_F, "W", W, x)
    if b is not None:
        _check.same_shape(OP_F, "b", b, (F,), f"shape (F,)=({F},)")
        _check.param_dtype(OP_F, "b", b, x)
    sy, sx = _check.pair(OP_F, "stride", stride, 1)
    ph, pw = _check.pair(OP_F, "pad", pad, 0)
    Ho = _check.out_size(OP_F, H, kh, sy, ph, "height")
    Wo = _check.out_size(OP_F, Wd, kw, sx, pw, "width")

    bf16 = precision.is_bf16(x)
    if xp is np and not bf16 and sy == sx == 1 and _fourier_pays(N, Cg, F // G):
        return fourier.forward(x, W, b, (ph, pw), G, workspace=workspace, relu=relu)
    if (xp is np and not bf16 and sy == sx == 1 and kh == kw and kh in winograd_tiles()
            and N * Ho * Wo >= WINOGRAD_MIN_PIXELS and Cg >= WINOGRAD_MIN_CHANNELS):
        return winograd.forward(x, W, b, (ph, pw), G, winograd_tiles()[kh], workspace=workspace, relu=relu)
    geom = (kh, kw, sy, sx, ph, pw)
    bi = xp is np and _batch_inner(Ho, Wo)
    col = _im2col(x, *geom, workspace=workspace, batch_inner=bi)
    K, M = Cg * kh * kw, N * Ho * Wo
    Wm = xp.ascontiguousarray(W).reshape(G, F // G, K)
    if bf16:
        Wm = precision.to_bf16(Wm)
    acc = precision.F32 if bf16 else x.dtype  # the products' output: float32 for bf16, rounded once when stored
    y = xp.empty((N, F, Ho, Wo), dtype=x.dtype)
    if xp is np and not bf16 and not bi and G == 1:
        # image-major columns: image n's are the (K, Ho*Wo) block at column n*Ho*Wo, so a product per image
        # writes y in NCHW itself, and only the bias is left (in place): one pass less than the layout below
        # (alexnet-small's conv1 at b128, one tower: 19.1 -> 14.9 ms, docs/PERFORMANCE.md)
        np.matmul(Wm[0], col.reshape(K, N, Ho * Wo).transpose(1, 0, 2), out=y.reshape(N, F, Ho * Wo))
        if b is not None:
            y += b[None, :, None, None]
        if relu:
            y, _ = relu_forward(y)
        return y, (col, Wm, tuple(x.shape), tuple(W.shape), tuple(y.shape), b is not None, geom,
                   y if relu else None, bi)
    ym = _group_gemm(xp, Wm, col.reshape(G, K, M), xp.empty((G, F // G, M), dtype=acc))
    if (relu or bf16) and b is not None and xp is not np:  # layout, bias, ReLU and bf16's rounding in one pass
        kernels.conv_layout_forward_gpu(ym, b, y, relu=relu, check=False)
    else:
        y = _to_nchw(xp, ym, b, y if not bf16 else xp.empty((N, F, Ho, Wo), dtype=acc), batch_inner=bi)
        if bf16:
            y = precision.to_bf16(y)
        if relu:
            y, _ = relu_forward(y)
    return y, (col, Wm, tuple(x.shape), tuple(W.shape), tuple(y.shape), b is not None, geom, y if relu else None,
               bi)


def conv2d_backward(dy, cache, need_dx=True, workspace=None):
    """(dx, dW, db) for conv2d_forward; db is None when the forward had no bias.

    need_dx=False skips the input gradient (dx is None): the first layer's input is the image, and its col2im is
    the most expensive one in the network. `workspace`: as in conv2d_forward, for the column gradient.
    """
    xp = get_array_module(dy)
    if isinstance(cache, winograd.Cache):
        _check.same_shape(OP_B, "dy", dy, cache.y_shape, f"the forward output's shape {cache.y_shape}")
        _check.same_dtype(OP_B, "dy", dy, cache.V, "the forward input")
        return winograd.backward(dy, cache, need_dx=need_dx, workspace=workspace)
    if isinstance(cache, fourier.Cache):
        _check.same_shape(OP_B, "dy", dy, cache.y_shape, f"the forward output's shape {cache.y_shape}")
        _check.same_dtype(OP_B, "dy", dy, cache, "the forward input")  # the cache's .dtype: the input's
        return fourier.backward(dy, cache, need_dx=need_dx, workspace=workspace)
    col, Wm, x_shape, W_shape, y_shape, has_b, geom, y_relu, bi = cache
    _check.same_shape(OP_B, "dy", dy, y_shape, f"the forward output's shape {y_shape}")
    _check.same_dtype(OP_B, "dy", dy, col, "the forward input")
    G, Fg, K = Wm.shape
    M = col.shape[1]
    N, F, Ho, Wo = y_shape
    if y_relu is not None and xp is not np and not bi:  # the ReLU mask and the layout below in one kernel
        d = kernels.conv_layout_backward_gpu(dy, y_relu, G, relu=True, check=False)
    else:
        if y_relu is not None:
            dy = relu_backward(dy, y_relu)
        # dy in the columns' order: (F, N, Ho*Wo), or (F, Ho*Wo, N) when batch-inner
        dt = dy.reshape(N, F, Ho * Wo).transpose(1, 2, 0) if bi else dy.transpose(1, 0, 2, 3)
        d = xp.ascontiguousarray(dt).reshape(G, Fg, M)
    bf16 = precision.is_bf16(d)
    grad = precision.F32 if bf16 else col.dtype  # parameter gradients: float32 for bf16 (the master weights')
    if not has_b:
        db = None
    elif bf16:
        db = precision.row_sums(d.reshape(G * Fg, M))
    else:
        db = d.reshape(G * Fg, M).sum(axis=1)  # rows of the (F, N*Ho*Wo) layout: contiguous
    cg = col.reshape(G, K, M)
    if xp is np and not bf16:  # dW^T = col @ d^T: 12-18 % faster with OpenBLAS than d @ col^T on conv1's shapes
        dWt = _group_gemm(xp, cg, d.transpose(0, 2, 1), xp.empty((G, K, Fg), dtype=grad))
        dW = np.ascontiguousarray(dWt.transpose(0, 2, 1)).reshape(W_shape)
    else:
        dW = _group_gemm(xp, d, cg.transpose(0, 2, 1), xp.empty((G, Fg, K), dtype=grad)).reshape(W_shape)
    if not need_dx:
        return None, dW, db
    out = _buffer(workspace, "dcol", (G, K, M), col.dtype) if xp is np else xp.empty((G, K, M), dtype=col.dtype)
    dcol = _group_gemm(xp, Wm.transpose(0, 2, 1), d, out).reshape(G * K, M)
    dx = _col2im(dcol, x_shape, *geom, batch_inner=bi)
    return dx, dW, db
