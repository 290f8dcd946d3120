"""Winograd minimal filtering F(m x m, r x r) for stride-1 convolutions on the host (NumPy).

One output tile of m x m pixels reads an input tile of n x n = (m + r - 1)^2 pixels; neighbouring input tiles
overlap by r - 1. Per tile and channel pair the correlation is

    Y = A^T [ (G g G^T) (.) (B^T d B) ] A          (.) = elementwise over the n x n transform domain

so that, with U = G g G^T per filter and V = B^T d B per input tile, each of the n^2 transform-domain entries e
is one GEMM over channels: M[e] = V[e] (tiles*N x Cg) @ U[e]^T (Cg x Fg), per group. For F(2x2, 3x3) that is 16
products, 4 multiplies per output pixel where im2col does 9.

The matrices are derived here (Toom-Cook) from the interpolation points, not tabulated. For the linear
convolution s = g * h (g of length r, h of length m, s of length n) evaluated at n - 1 finite points and at
infinity (the leading coefficient), s = C diag(Vr g) Vm h, where Vk is the n x k Vandermonde matrix of the
points (its infinity row picks the last coefficient) and C = Vn^-1 interpolates. The correlation y_i =
sum_k g_k d_{i+k} is the transpose of that convolution in h, so y = Vm^T diag(Vr g) C^T d: A = Vm, G = Vr,
B^T = C^T, and row j of B^T and of G may be scaled by s_j and 1/s_j; rows of B^T are scaled to coprime integers
(for F(2, 3) with points 0, 1, -1: B^T and A^T of entries 0 and +-1, G with halves; Lavin & Gray 2016).

Layout: x is copied zero-padded to (Hp, Wp, N, C), channels innermost, with Hp = m*TY + r - 1 >= H + 2*ph
(TY = ceil(Ho / m) tile rows; the extra rows and columns are zeros, and the output rows and columns they
produce are cropped). The transforms run separably (rows, then columns) as one ufunc per term over whole
(TY, TX, N, C) slabs, runs of N*C contiguous elements (3-4 times faster here than the same passes with the
channels outermost), and V[e] is a (tiles*N, C) matrix. M comes out as (tiles*N, F), the output transform
writes (Ho, Wo, N, F), and one transposing pass adds the bias into NCHW.

Backward in the transform domain: dy into (F, Ho, Wo, N) tiles; dM = A dY A^T per tile, (F, tiles*N) per
entry; dU[e] = dM[e] @ V[e], dg = G^T dU G; dV[e] = dM[e]^T @ U[e] in V's layout, dd = B dV B^T added back onto
the overlapping input tiles (two passes, rows and columns) and cropped to the input. These operand orders are
the fastest of those measured for each product (OpenBLAS, one thread: 95-99 GFLOP/s alone).
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from math import gcd, lcm

import numpy as np

from .activations import relu_backward, relu_forward


def _inverse(a):
    """The inverse of a square matrix of Fractions (Gauss-Jordan, exact)."""
    n = len(a)
    m = [list(row) + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(a)]
    for col in range(n):
        piv = next(r for r in range(col, n) if m[r][col] != 0)
        m[col], m[piv] = m[piv], m[col]
        p = m[col][col]
        m[col] = [v / p for v in m[col]]
        for r in range(n):
            if r != col and m[r][col] != 0:
                f = m[r][col]
                m[r] = [v - f * w for v, w in zip(m[r], m[col])]
    return [row[n:] for row in m]


def _vandermonde(points, k):
    """n x k: row j = (1, p_j, p_j^2, ...), and the last row (the point at infinity) picks the top coefficient."""
    rows = [[Fraction(p) ** e for e in range(k)] for p in points]
    rows.append([Fraction(0)] * (k - 1) + [Fraction(1)])
    return rows


@lru_cache(maxsize=None)
def transforms(m, r, points=None):
    """(AT, G, BT) as exact Fractions (tuples of rows) for F(m, r): AT is m x n, G n x r, BT n x n.
    points: the n - 1 finite interpolation points (default 0, 1, -1, 2, -2, ...)."""
    n = m + r - 1
    if points is None:
        points = [0] + [s * ((i + 2) // 2) for i, s in zip(range(n - 2), (1, -1) * n)]
    points = [Fraction(p) for p in points]
    if len(points) != n - 1 or len(set(points)) != n - 1:
        raise ValueError(f"F({m}, {r}) needs {n - 1} distinct finite points, got {points}")
    C = _inverse(_vandermonde(points, n))
    BT = [[C[i][j] for i in range(n)] for j in range(n)]  # B^T = C^T
    G = _vandermonde(points, r)
    for j in range(n):  # row j of B^T times s_j (coprime integers), row j of G divided by s_j
        den = lcm(*(v.denominator for v in BT[j]))
        num = gcd(*(int(v * den) for v in BT[j]))
        s = Fraction(den, num)
        BT[j] = [v * s for v in BT[j]]
        G[j] = [v / s for v in G[j]]
    A = _vandermonde(points, m)
    AT = [[A[i][j] for i in range(n)] for j in range(m)]
    return tuple(map(tuple, AT)), tuple(map(tuple, G)), tuple(map(tuple, BT))


@lru_cache(maxsize=None)
def _plan(m, r):
    """transforms(m, r) as floats, (AT, G, BT), and whether AT and BT have entries other than 0 and +-1 (then
    their passes need a scratch array)."""
    mats = tuple(tuple(tuple(float(v) for v in row) for row in mat) for mat in transforms(m, r))
    odd = [any(v not in (0.0, 1.0, -1.0) for row in mat for v in row) for mat in (mats[0], mats[2])]
    return mats + tuple(odd)


@lru_cache(maxsize=None)
def _kron(m, r, dtype):
    """(n*n, r*r): U[k*n + l] = sum_ij G[k][i] G[l][j] g[i*r + j], the filter transform as one matrix."""
    g = np.array(_plan(m, r)[1], dtype=dtype)
    return np.kron(g, g)


def _comb(out, terms, tmp, accumulate=False):
    """out = sum(c * t for c, t in terms) (out += ... when accumulate), with as few passes as the coefficients
    allow: +-1 as add / subtract, the first two terms in one ufunc. tmp: scratch of out's shape for the
    other coefficients (or None when all are +-1)."""
    terms = [(c, t) for c, t in terms if c != 0]
    if not accumulate:
        if len(terms) >= 2 and abs(terms[0][0]) == 1 and abs(terms[1][0]) == 1 and terms[0][0] + terms[1][0] != -2:
            (c0, t0), (c1, t1) = terms[:2]
            if c0 == c1:
                np.add(t0, t1, out=out)
            elif c0 == 1:
                np.subtract(t0, t1, out=out)
            else:
                np.subtract(t1, t0, out=out)
            terms = terms[2:]
        else:
            c, t = terms[0]
            if c == 1:
                np.copyto(out, t)
            elif c == -1:
                np.negative(t, out=out)
            else:
                np.multiply(t, c, out=out)
            terms = terms[1:]
    for c, t in terms:
        if c == 1:
            np.add(out, t, out=out)
        elif c == -1:
            np.subtract(out, t, out=out)
        else:
            np.multiply(t, c, out=tmp)
            np.add(out, tmp, out=out)
    return out


def _buffer(workspace, name, shape, dtype):
    """A host array of this shape kept under `name` in `workspace` (a dict the caller owns, as in
    cpnet.ops.conv) as a flat array, so that names used by both passes (forward's M, Z, Y and backward's dM, W1,
    dY: the same sizes, other shapes) share memory; fresh when workspace is None."""
    size = int(np.prod(shape))
    if workspace is None:
        return np.empty(shape, dtype=dtype)
    a = workspace.get(name)
    if a is None or a.size != size or a.dtype != dtype:
        a = workspace[name] = np.empty(size, dtype=dtype)
    return a.reshape(shape)


def _tile_view(a, axis, k, m, count):
    """Offset k within every one of `count` tiles (stride m) along `axis` of a."""
    idx = [slice(None)] * a.ndim
    idx[axis] = slice(k, k + m * (count - 1) + 1, m)
    return a[tuple(idx)]


def _transform(row, src, axis, m, count, out, tmp):
    """out = sum_a row[a] * (offset a of every tile of src along axis): one row of a transform matrix.
    tmp: flat scratch of at least out's size, or None when the row has only entries 0 and +-1."""
    _comb(out, [(c, _tile_view(src, axis, a, m, count)) for a, c in enumerate(row)],
          None if tmp is None else tmp[: out.size].reshape(out.shape))


def _adjoint_transform(mat, src, axis, m, count, out, tmp):
    """The adjoint of _forward_transform: out (offsets along axis) = sum_k mat[k][a] * src[k] added onto offset a
    of every tile. Offsets a < m tile the first m*count entries without overlap and are written; the entries
    beyond them are zeroed, and offsets a >= m are added."""
    n = len(mat[0])
    idx = [slice(None)] * out.ndim
    idx[axis] = slice(m * count, None)
    out[tuple(idx)] = 0
    for a in range(n):
        view = _tile_view(out, axis, a, m, count)
        _comb(view, [(mat[k][a], src[k]) for k in range(len(mat))], None if tmp is None else tmp[: view.size]
              .reshape(view.shape), accumulate=a >= m)


class Cache:
    """What backward needs: the transformed input tiles V and filters U, and the geometry."""

    __slots__ = ("V", "U", "x_shape", "W_shape", "y_shape", "has_b", "pad", "tiles", "m", "y_relu")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


def forward(x, W, b, pad, groups, m, workspace=None, relu=False):
    """y = conv(x, W) + b (stride 1, W of shape (F, C/groups, r, r)) by F(m x m, r x r); returns (y, Cache)."""
    N, C, H, Wd = x.shape
    F, Cg, r, _ = W.shape
    G_, dt = groups, x.dtype
    Fg = F // G_
    ph, pw = pad
    Ho, Wo = H + 2 * ph - r + 1, Wd + 2 * pw - r + 1
    n = m + r - 1
    TY, TX = -(-Ho // m), -(-Wo // m)
    Hp, Wp = m * TY + r - 1, m * TX + r - 1
    AT, _, BT, odd_a, tmp_t = _plan(m, r)

    # the filters in the transform domain, U[k*n + l] = (G g G^T)[k, l]: (n*n, groups, Fg, Cg)
    U = (_kron(m, r, np.dtype(dt)) @ W.reshape(F * Cg, r * r).T).reshape(n * n, G_, Fg, Cg)

    # x zero-padded, channels innermost: (Hp, Wp, N, C)
    xt = _buffer(workspace, "wino_x", (Hp, Wp, N, C), dt)
    xt[:ph] = 0
    xt[ph + H:] = 0
    xt[ph : ph + H, :pw] = 0
    xt[ph : ph + H, pw + Wd:] = 0
    xt[ph : ph + H, pw : pw + Wd] = x.transpose(2, 3, 0, 1)
    # V = B^T d B per tile: over the rows' offsets, then the columns': (n, n, TY, TX, N, C)
    # one row k of the transform domain at a time: rows[k] = (B^T d)[k] over the tiles' row offsets; then for
    # each l, V[k, l] over the column offsets and at once its product M[k, l] = V[k, l] @ U[k, l]^T per group
    # (V[k, l], 1 MB for conv3 at b128, still in cache); then Z[k, j] = sum_l AT[j][l] M[k, l] (the output
    # transform's column pass) from the n products just written. V: (n, n, TY, TX, N, C), M: (n, n, T, F).
    T = TY * TX * N
    rows = _buffer(workspace, "wino_rows", (n, TY, Wp, N, C), dt)
    tmp = _buffer(workspace, "wino_tmp", rows.shape[1:], dt).reshape(-1) if tmp_t else None
    V = _buffer(workspace, "wino_V", (n, n, TY, TX, N, C), dt)
    Vm = V.reshape(n, n, T, C)
    Mt = _buffer(workspace, "wino_M", (n, n, T, F), dt)
    M6 = Mt.reshape(n, n, TY, TX, N, F)
    Z = _buffer(workspace, "wino_Z", (n, m, TY, TX, N, F), dt)
    tmp_a = _buffer(workspace, "wino_tmpa", Z.shape[2:], dt) if odd_a else None
    for k in range(n):
        _transform(BT[k], xt, 0, m, TY, rows[k], tmp)
        for l in range(n):
            _transform(BT[l], rows[k], 1, m, TX, V[k, l], tmp)
            for gi in range(G_):
                np.matmul(Vm[k, l, :, gi * Cg : (gi + 1) * Cg], U[k * n + l, gi].T,
                          out=Mt[k, l, :, gi * Fg : (gi + 1) * Fg])
        for j in range(m):
            _comb(Z[k, j], [(AT[j][l], M6[k, l]) for l in range(n)], tmp_a)
    # the output transform's row pass, into (TY, m, TX, m, N, F)
    Yt = _buffer(workspace, "wino_Y", (TY, m, TX, m, N, F), dt)
    for i in range(m):
        for j in range(m):
            _comb(Yt[:, i, :, j], [(AT[i][k], Z[k, j]) for k in range(n)], tmp_a)
    src = Yt.reshape(TY * m, TX * m, N, F)[:Ho, :Wo].transpose(2, 3, 0, 1)
    y = np.empty((N, F, Ho, Wo), dtype=dt)
    if b is not None:
        np.add(src, b[None, :, None, None], out=y)
    else:
        y[...] = src
    if relu:
        y, _ = relu_forward(y)
    return y, Cache(V=V, U=U, x_shape=(N, C, H, Wd), W_shape=(F, Cg, r, r), y_shape=(N, F, Ho, Wo),
                    has_b=b is not None, pad=(ph, pw), tiles=(TY, TX), m=m, y_relu=y if relu else None)


def backward(dy, cache, need_dx=True, workspace=None):
    """(dx, dW, db) for forward; dx is None when need_dx is False."""
    c = cache
    N, C, H, Wd = c.x_shape
    F, Cg, r, _ = c.W_shape
    _, _, Ho, Wo = c.y_shape
    (ph, pw), (TY, TX), m = c.pad, c.tiles, c.m
    n = m + r - 1
    G_ = C // Cg
    Fg = F // G_
    dt = dy.dtype
    T = TY * TX * N
    AT, _, BT, odd_a, odd_b = _plan(m, r)
    if c.y_relu is not None:
        dy = relu_backward(dy, c.y_relu)

    # dy in the tiles' layout (F, TY*m, TX*m, N), zeros beyond the output
    dyt = _buffer(workspace, "wino_Y", (F, TY, m, TX, m, N), dt)
    d4 = dyt.reshape(F, TY * m, TX * m, N)
    d4[:, Ho:] = 0
    d4[:, :Ho, Wo:] = 0
    d4[:, :Ho, :Wo] = dy.transpose(1, 2, 3, 0)
    db = d4.reshape(F, -1).sum(axis=1) if c.has_b else None

    # dM = A dY A^T: W1[i, l] = sum_j AT[j][l] dY[i, j], then dM[k, l] = sum_i AT[i][k] W1[i, l]
    W1 = _buffer(workspace, "wino_Z", (m, n, F, TY, TX, N), dt)
    tmp_a = _buffer(workspace, "wino_tmpa", W1.shape[2:], dt) if odd_a else None
    for i in range(m):
        for l in range(n):
            _comb(W1[i, l], [(AT[j][l], dyt[:, :, i, :, j]) for j in range(m)], tmp_a)
    dM = _buffer(workspace, "wino_M", (n * n, G_, Fg, T), dt)
    dM6 = dM.reshape(n, n, F, TY, TX, N)

    # per entry e = (k, l): dM[k, l], then dU[e] = dM[e] @ V[e] and dV[e] = dM[e]^T @ U[e] while dM[e] is in
    # cache, dV in V's layout (n, n, TY, TX, N, C); after each row k of entries, dd's column pass (B dV)[k] over
    # the tiles' column offsets into rows[k] while those products are in cache
    Vm = c.V.reshape(n * n, T, C)
    dU = np.empty((n * n, G_, Fg, Cg), dtype=dt)
    Hp, Wp = m * TY + r - 1, m * TX + r - 1
    if need_dx:
        dV = _buffer(workspace, "wino_dV", (n * n, T, C), dt)
        dV6 = dV.reshape(n, n, TY, TX, N, C)
        rows = _buffer(workspace, "wino_rows", (n, TY, Wp, N, C), dt)
        tmp = _buffer(workspace, "wino_tmp", rows.shape[1:], dt).reshape(-1) if odd_b else None
    for k in range(n):
        for l in range(n):
            e = k * n + l
            _comb(dM6[k, l], [(AT[i][k], W1[i, l]) for i in range(m)], tmp_a)
            for gi in range(G_):
                cs = slice(gi * Cg, (gi + 1) * Cg)
                np.matmul(dM[e, gi], Vm[e, :, cs], out=dU[e, gi])
                if need_dx:
                    np.matmul(dM[e, gi].T, c.U[e, gi], out=dV[e, :, cs])
        if need_dx:
            _adjoint_transform(BT, dV6[k], 1, m, TX, rows[k], tmp)
    dW = (dU.reshape(n * n, F * Cg).T @ _kron(m, r, np.dtype(dt))).reshape(F, Cg, r, r)
    if not need_dx:
        return None, dW, db
    dxt = _buffer(workspace, "wino_x", (Hp, Wp, N, C), dt)
    _adjoint_transform(BT, rows, 0, m, TY, dxt, tmp)
    dx = np.ascontiguousarray(dxt[ph : ph + H, pw : pw + Wd].transpose(2, 3, 0, 1))
    return dx, dW, db
