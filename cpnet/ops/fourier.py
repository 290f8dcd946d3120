"""Stride-1 convolutions on the host through the discrete Fourier transform, the DFTs done as small GEMMs.

By the correlation theorem, on zero-extended S_y x S_x planes,

    y[n, f] = IDFT( sum_c DFT(x[n, c]) * conj(DFT(w'[f, c])) )          w' = w shifted by (-ph, -pw)

so each frequency bin (u, v) is one complex product over channels, Y[b] (N x F) = X[b] (N x C) @ W[b]^T (C x F):
4 real multiplies per bin where im2col does one per pixel and kernel tap (alexnet-small's conv2, 15x15 maps and a
5x5 kernel: 17 x 9 bins, 612 real multiplies per (image, input, output channel) against 5625). The planes need
no more than S >= H + ph rows (likewise columns): every index that the correlation reads, o + i - ph for output o
and tap i, lies in [-ph, H + ph - 1], and its negative ones wrap onto zeros. Any S works, since the DFTs are
matrices here, not FFTs: NumPy's FFT spends microseconds per small plane, where these maps take a few GEMMs with
an inner dimension of 15 or 17 over all images and channels at once.

The transforms, separable, real input along the width (half the spectrum, Kv = S_x // 2 + 1 bins), complex along
the height:

    stage A   (rows, W) @ (W, 2 Kv) real, its output read as (rows, Kv) complex (re, im interleaved)
    stage B   (S_y, H) @ (H, Kv * rest) complex, after one transposing pass that brings H to the front

and their inverses in the opposite order (the real part of the width's inverse weighs the bins 1, 2, ..., 2, 1
for the half spectrum). The bins come out as (S_y * Kv, N, C), each bin's matrix contiguous for the product.
Conjugates cost nothing: the input is transformed with e^{+i...} (its spectrum's conjugate), the filters with
e^{-i...}, so the product gives conj(Y), whose real inverse is y with the e^{-i...} matrices. Backward in the
same domain: dX[b] = dY[b] @ W[b], conj(dW^)[b] = dY[b]^T @ conj(X)[b], and the inverses crop dx to the input and
dW to the kernel's taps (the latter with the shift).

float32 through complex64: the errors measured against float64 are below im2col's (the DFT's points, the roots
of unity, make the best-conditioned transform; Winograd's real points do not), see docs/PERFORMANCE.md. They are
errors relative to the image's whole output (rms over the plane), not to each value: every bin mixes every pixel,
so an output near 0 beside a very large input value (a lone pixel 1e4 times the rest) is off by the large
value's rounding, up to tens of per cent of that small output, where im2col's error follows each window's own
values.

A NaN or infinity in an input plane reaches every output of that image (each bin mixes every pixel), where
im2col's reaches the outputs whose windows hold it; either way the image's loss, and every gradient summed over
the batch, is NaN. With a workspace the spectra that the cache keeps live in it, as im2col's columns do.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ._host import buffer as _buffer
from .activations import relu_backward, relu_forward


def plane(H, Ho, k, ph):
    """S for one axis: the smallest zero-extended length on which the circular correlation is the linear one
    (H + ph, see above), holds the output (Ho) and keeps the kernel's taps apart for dW (k)."""
    return max(H + ph, Ho, k)


@lru_cache(maxsize=None)
def _forward_mats(L, S, shift, sign, dtype):
    """The transforms of a length-L signal s[t] (placed at t + shift on the plane of S) to S's bins:
    real (L, 2 Kv) for the width (stage A; columns re, im of bin v interleaved) and complex (S, L) for the
    height (stage B), both sum_t s[t] e^{sign 2 pi i k (t + shift) / S}."""
    kv = S // 2 + 1
    t = np.arange(L) + shift
    ang_a = sign * 2 * np.pi * np.outer(t, np.arange(kv)) / S  # (L, Kv)
    a = np.empty((L, kv, 2))
    a[..., 0], a[..., 1] = np.cos(ang_a), np.sin(ang_a)
    ang_b = sign * 2 * np.pi * np.outer(np.arange(S), t) / S  # (S, L)
    b = np.exp(1j * ang_b)
    cdt = np.result_type(dtype, np.complex64)
    return a.reshape(L, 2 * kv).astype(dtype), b.astype(cdt)


@lru_cache(maxsize=None)
def _inverse_mats(L, S, shift, sign, dtype):
    """The inverses back to L positions t (read at t + shift on the plane): complex (L, S) for the height,
    real (2 Kv, L) for the width, which takes the real part and weighs the half spectrum's bins; both with
    e^{sign 2 pi i k (t + shift) / S} / S."""
    kv = S // 2 + 1
    t = np.arange(L) + shift
    b = np.exp(sign * 2j * np.pi * np.outer(t, np.arange(S)) / S) / S  # (L, S)
    w = np.full(kv, 2.0)
    w[0] = 1.0
    if S % 2 == 0:
        w[-1] = 1.0
    ang = sign * 2 * np.pi * np.outer(np.arange(kv), t) / S  # (Kv, L)
    a = np.empty((kv, 2, L))
    a[:, 0], a[:, 1] = w[:, None] * np.cos(ang) / S, -w[:, None] * np.sin(ang) / S  # Re((p + iq) e^{i ang})
    cdt = np.result_type(dtype, np.complex64)
    return b.astype(cdt), a.reshape(2 * kv, L).astype(dtype)


def _spectrum(a, S, shifts, sign, workspace, name):
    """a (R, Q, L_y, L_x) real -> its bins (S_y * Kv, R, Q) complex (a's rows at y + shifts[0], x + shifts[1])."""
    R, Q, Ly, Lx = a.shape
    Sy, Sx = S
    kv = Sx // 2 + 1
    ma, _ = _forward_mats(Lx, Sx, shifts[1], sign, a.dtype)
    _, mb = _forward_mats(Ly, Sy, shifts[0], sign, a.dtype)
    cdt = mb.dtype
    sa = _buffer(workspace, name + "_a", (R * Q * Ly, 2 * kv), a.dtype)
    np.matmul(a.reshape(R * Q * Ly, Lx), ma, out=sa)
    st = _buffer(workspace, name + "_t", (Ly, kv, R * Q), cdt)
    st[...] = sa.view(cdt).reshape(R * Q, Ly, kv).transpose(1, 2, 0)
    out = _buffer(workspace, name + "_s", (Sy, kv * R * Q), cdt)  # the cache refers to it, as to im2col's columns
    np.matmul(mb, st.reshape(Ly, kv * R * Q), out=out)
    return out.reshape(Sy * kv, R, Q)


def _signal(spec, S, L, shifts, sign, out, workspace, name):
    """The inverse of _spectrum: spec (S_y * Kv, R, Q) complex -> out (R, Q, L_y, L_x) real, the real part."""
    _, R, Q = spec.shape
    Sy, Sx = S
    Ly, Lx = L
    kv = Sx // 2 + 1
    mb, _ = _inverse_mats(Ly, Sy, shifts[0], sign, out.dtype)
    _, ma = _inverse_mats(Lx, Sx, shifts[1], sign, out.dtype)
    z = _buffer(workspace, name + "_z", (Ly, kv * R * Q), spec.dtype)
    np.matmul(mb, spec.reshape(Sy, kv * R * Q), out=z)
    zt = _buffer(workspace, name + "_t", (R, Q, Ly, kv), spec.dtype)
    zt[...] = z.reshape(Ly, kv, R, Q).transpose(2, 3, 0, 1)
    np.matmul(zt.view(out.dtype).reshape(R * Q * Ly, 2 * kv), ma, out=out.reshape(R * Q * Ly, Lx))
    return out


def _products(a, b, groups, out):
    """out[bin] = a[bin] @ b[bin].T per group of a's columns / out's columns (b: the filters' spectra, one row
    per output channel)."""
    G = groups
    if G == 1:
        np.matmul(a, b.transpose(0, 2, 1), out=out)
        return out
    ka, ko = a.shape[2] // G, out.shape[2] // G
    for g in range(G):
        out[:, :, g * ko : (g + 1) * ko] = np.matmul(a[:, :, g * ka : (g + 1) * ka],
                                                     b[:, g * ko : (g + 1) * ko].transpose(0, 2, 1))
    return out


class Cache:
    """What backward needs: the input's and the filters' spectra (conj(X) and W), and the geometry."""

    __slots__ = ("Xc", "Wf", "dtype", "x_shape", "W_shape", "y_shape", "has_b", "pad", "S", "groups", "y_relu")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


def forward(x, W, b, pad, groups, workspace=None, relu=False):
    """y = conv(x, W) + b (stride 1) through the DFT; returns (y, Cache)."""
    N, C, H, Wd = x.shape
    F, Cg, kh, kw = W.shape
    ph, pw = pad
    Ho, Wo = H + 2 * ph - kh + 1, Wd + 2 * pw - kw + 1
    S = (plane(H, Ho, kh, ph), plane(Wd, Wo, kw, pw))
    Xc = _spectrum(x, S, (0, 0), +1, workspace, "fx")  # conj(X): (bins, N, C)
    # W's spectrum as (bins, F, Cg): the filters' taps i at i - ph on the plane
    Wf = _spectrum(W.reshape(1, F * Cg, kh, kw), S, (-ph, -pw), -1, workspace, "fw").reshape(-1, F, Cg)
    Yc = _products(Xc, Wf, groups, _buffer(workspace, "fy", (Xc.shape[0], N, F), Xc.dtype))
    y = _signal(Yc, S, (Ho, Wo), (0, 0), -1, np.empty((N, F, Ho, Wo), dtype=x.dtype), workspace, "iy")
    if b is not None:
        y += b[None, :, None, None]
    if relu:
        y, _ = relu_forward(y)
    return y, Cache(Xc=Xc, Wf=Wf, dtype=x.dtype, x_shape=(N, C, H, Wd), W_shape=(F, Cg, kh, kw), y_shape=(N, F, Ho, Wo),
                    has_b=b is not None, pad=(ph, pw), S=S, groups=groups, y_relu=y if relu else None)


def backward(dy, cache, need_dx=True, workspace=None):
    """(dx, dW, db) for forward; dx is None when need_dx is False."""
    c = cache
    N, C, H, Wd = c.x_shape
    F, Cg, kh, kw = c.W_shape
    ph, pw = c.pad
    if c.y_relu is not None:
        dy = relu_backward(dy, c.y_relu)
    db = dy.sum(axis=(0, 2, 3)) if c.has_b else None
    dY = _spectrum(dy, c.S, (0, 0), -1, workspace, "fdy")  # (bins, N, F)
    nb = dY.shape[0]
    G = c.groups
    # conj(dW^)[bin] = dY[bin]^T @ conj(X)[bin], per group: (bins, F, Cg)
    dWc = np.empty((nb, F, Cg), dtype=dY.dtype)
    Fg = F // G
    for g in range(G):
        np.matmul(dY[:, :, g * Fg : (g + 1) * Fg].transpose(0, 2, 1), c.Xc[:, :, g * Cg : (g + 1) * Cg],
                  out=dWc[:, g * Fg : (g + 1) * Fg])
    dW = _signal(dWc.reshape(nb, 1, F * Cg), c.S, (kh, kw), (-ph, -pw), -1,
                 np.empty((1, F * Cg, kh, kw), dtype=dy.dtype), workspace, "idw").reshape(F, Cg, kh, kw)
    if not need_dx:
        return None, dW, db
    dX = _buffer(workspace, "fdx", (nb, N, C), dY.dtype)
    for g in range(G):
        np.matmul(dY[:, :, g * Fg : (g + 1) * Fg], c.Wf[:, g * Fg : (g + 1) * Fg], out=dX[:, :, g * Cg : (g + 1) * Cg])
    dx = _signal(dX, c.S, (H, Wd), (0, 0), +1, np.empty((N, C, H, Wd), dtype=dy.dtype), workspace, "idx")
    return dx, dW, db
