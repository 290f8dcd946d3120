"""Plain-Python-loop references for the fast ops: slow, obviously right, small inputs only."""

import math

import numpy as np


def conv2d(x, W, b, stride, pad, groups):
    N, C, H, Wd = x.shape
    F, Cg, kh, kw = W.shape
    sy, sx = stride
    ph, pw = pad
    Fg = F // groups
    Ho = (H + 2 * ph - kh) // sy + 1
    Wo = (Wd + 2 * pw - kw) // sx + 1
    y = np.zeros((N, F, Ho, Wo))
    for n in range(N):
        for f in range(F):
            g = f // Fg
            for oy in range(Ho):
                for ox in range(Wo):
                    acc = 0.0 if b is None else float(b[f])
                    for c in range(Cg):
                        for i in range(kh):
                            for j in range(kw):
                                h, w = oy * sy - ph + i, ox * sx - pw + j
                                if 0 <= h < H and 0 <= w < Wd:
                                    acc += float(W[f, c, i, j]) * float(x[n, g * Cg + c, h, w])
                    y[n, f, oy, ox] = acc
    return y


def max_pool2d(x, k, s, p):
    """Returns (y, argmax): first maximum in row-major window order, padding ignored; the first NaN wins."""
    N, C, H, W = x.shape
    Ho = (H + 2 * p - k) // s + 1
    Wo = (W + 2 * p - k) // s + 1
    y = np.zeros((N, C, Ho, Wo))
    arg = np.zeros((N, C, Ho, Wo), dtype=np.int64)
    for n in range(N):
        for c in range(C):
            for oy in range(Ho):
                for ox in range(Wo):
                    best, where = None, None
                    for i in range(k):
                        for j in range(k):
                            h, w = oy * s - p + i, ox * s - p + j
                            if 0 <= h < H and 0 <= w < W:
                                v = float(x[n, c, h, w])
                                if best is None or v > best or (v != v and best == best):
                                    best, where = v, h * W + w
                    y[n, c, oy, ox] = best
                    arg[n, c, oy, ox] = where
    return y, arg


def max_pool2d_backward(dy, arg, x_shape):
    """dx for max_pool2d: each output's gradient added onto the input its argmax names (float64)."""
    N, C, H, W = x_shape
    dx = np.zeros((N, C, H * W), dtype=np.float64)
    for n in range(N):
        for c in range(C):
            for o, a in zip(dy[n, c].ravel(), arg[n, c].ravel()):
                dx[n, c, a] += o
    return dx.reshape(x_shape)


def lrn(x, size, k, alpha, beta, convention):
    N, C, H, W = x.shape
    a = alpha if convention == "sum" else alpha / size
    y = np.zeros(x.shape)
    for n in range(N):
        for c in range(C):
            for h in range(H):
                for w in range(W):
                    s = 0.0
                    for cc in range(c - (size - 1) // 2, c + size // 2 + 1):
                        if 0 <= cc < C:
                            s += float(x[n, cc, h, w]) ** 2
                    y[n, c, h, w] = float(x[n, c, h, w]) * math.pow(k + a * s, -beta)
    return y


def lrn_scale(x, size, k, a):
    """The LRN cache: scale = k + a * (sum of x^2 over each channel's window), a = the effective alpha (float64)."""
    C = x.shape[1]
    x64 = x.astype(np.float64)
    scale = np.zeros(x.shape)
    for c in range(C):
        for cc in range(c - (size - 1) // 2, c + size // 2 + 1):
            if 0 <= cc < C:
                scale[:, c] += x64[:, cc] ** 2
    return k + a * scale


def lrn_backward(x, scale, dy, size, a, beta):
    """From the chain rule term by term: dx[i] = sum_j dy[j] * dy[j]/dx[i], with y[j] = x[j] * scale[j]^-beta and
    a = the effective alpha (float64)."""
    x, scale, dy = (v.astype(np.float64) for v in (x, scale, dy))
    C = x.shape[1]
    dx = dy * scale**-beta
    for i in range(C):
        for j in range(C):
            if j - (size - 1) // 2 <= i <= j + size // 2:  # x[i] is inside j's window
                dx[:, i] -= dy[:, j] * x[:, j] * beta * scale[:, j] ** (-beta - 1) * 2 * a * x[:, i]
    return dx


def _im2col_pairs(x_shape, kh, kw, sy, sx, ph, pw):
    """(col row, col column, (n, c, h, w)) for every in-bounds position of the im2col layout: row
    c*kh*kw + i*kw + j, column n*Ho*Wo + oy*Wo + ox, reading x[n, c, oy*sy - ph + i, ox*sx - pw + j]."""
    N, C, H, W = x_shape
    Ho, Wo = (H + 2 * ph - kh) // sy + 1, (W + 2 * pw - kw) // sx + 1
    for c in range(C):
        for i in range(kh):
            for j in range(kw):
                for n in range(N):
                    for oy in range(Ho):
                        for ox in range(Wo):
                            h, w = oy * sy - ph + i, ox * sx - pw + j
                            if 0 <= h < H and 0 <= w < W:
                                yield c * kh * kw + i * kw + j, n * Ho * Wo + oy * Wo + ox, (n, c, h, w)


def im2col(x, kh, kw, sy, sx, ph, pw):
    """The column matrix (C*kh*kw, N*Ho*Wo), zeros where a window reaches into the padding."""
    N, C, H, W = x.shape
    Ho, Wo = (H + 2 * ph - kh) // sy + 1, (W + 2 * pw - kw) // sx + 1
    col = np.zeros((C * kh * kw, N * Ho * Wo), dtype=x.dtype)
    for r, q, at in _im2col_pairs(x.shape, kh, kw, sy, sx, ph, pw):
        col[r, q] = x[at]
    return col


def col2im(col, x_shape, kh, kw, sy, sx, ph, pw):
    """The adjoint of im2col: every column entry added back onto the input position it was read from (float64)."""
    x = np.zeros(x_shape, dtype=np.float64)
    for r, q, at in _im2col_pairs(x_shape, kh, kw, sy, sx, ph, pw):
        x[at] += col[r, q]
    return x
