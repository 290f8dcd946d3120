"""CUDA kernels for the GPU path of the ops, and the plumbing shared with their host shim.

The sources (`*.cu` beside this file) are plain CUDA C++: `extern "C"` kernels, one thread per output element in a
grid-stride loop (im2col and col2im on a 2-D grid: a row of blocks per channel or plane, so each thread splits its
index once and walks the window without divisions), no shared memory, no atomics. The element type `T` is not in the files: `kernel_source` puts a
line `typedef float T;` (or double) before the text. A command-line `-DT=float` would be the obvious way, but NVRTC
and nvcc pre-include headers whose templates are written `template <typename T>`, and a macro named T breaks them.
Beside T, the compute type `F`: the kernels load T, do their arithmetic in F and store T; F is T for float32 and
float64. For bf16 (`--precision bf16`: arrays of dtype uint16 holding bfloat16 bit patterns, `BF16`), the text
starts with bf16.cuh (a 16-bit struct with round-to-nearest-even conversions to and from float) and
`typedef bf16 T; typedef float F;`, so LRN, pooling, col2im's sums and the elementwise kernels compute in float32
and round once per stored element. Scalars (`F alpha`) and caches that need the precision (LRN's `F* scale`) are
of type F. `narrow_gpu` (float32 -> bf16) and `widen_gpu` (bf16 -> float32) convert whole arrays.

GPU entry points (`im2col_gpu`, `col2im_gpu`, `maxpool_forward_gpu`, `maxpool_backward_gpu`, `lrn_forward_gpu`,
`lrn_backward_gpu`, and LRN -> max pool fused: `lrn_pool_forward_gpu`, `lrn_pool_backward_gpu`) take and return
CuPy arrays; so do the elementwise ones, each one pass where CuPy would chain
several kernels, bit-identical to the NumPy path: `sgd_momentum_gpu` (updates w and v in place),
`sgd_momentum_multi_gpu` (many arrays in one launch), `dropout_forward_gpu`, `dropout_towers_forward_gpu` (both
fused towers in one launch), `relu_forward_gpu`, `relu_backward_gpu`, `softmax_xent_forward_gpu`,
`softmax_xent_backward_gpu` (loss.cu), `conv_layout_forward_gpu`, `conv_layout_backward_gpu` (layout.cu: the
convolution's output layout with bias and ReLU), the conversions `narrow_gpu`, `widen_gpu`, and `augment_gpu`
(augment.cu: the network input from a loader's uint8 pixels and per-crop choices, data/augment.py's RawBatch).
Each compiles its source with `backend.raw_module` on first use, cached per (device, dtype, file). The same Python
bodies drive the host shim (`cpnet.kernels.shim`), which runs the very same kernel text on the CPU, so the tests
without a GPU check everything but the CUDA compiler.

Arguments are checked once per call. The entry points check shapes, dtypes and sizes themselves unless told
`check=False` by a caller that already did (every op does, in its own words); `_on_gpu` checks once that the array
inputs are CuPy arrays on one GPU; the launcher then packs the arrays the bodies made as they are, while the host
shim's launcher checks each one (type, dtype, contiguity), so every test run proves the bodies hand over what the
kernels expect.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .. import backend
from ..shapes import window_out

KERNEL_DIR = Path(__file__).resolve().parent
SOURCES = ("im2col.cu", "maxpool.cu", "lrn.cu", "elementwise.cu", "loss.cu", "layout.cu", "augment.cu")
# headers kernel_source puts before a source (after the T and F typedefs): pool.cuh's comparison and gather rules
# are shared by the plain max pool and the fused LRN -> pool kernels
HEADERS = {"maxpool.cu": ("pool.cuh",), "lrn.cu": ("pool.cuh",)}
# bfloat16 as the kernels see it: a uint16 array of bit patterns (NumPy and CuPy have no bfloat16 dtype).
BF16 = np.dtype(np.uint16)
DTYPES = (np.dtype(np.float32), np.dtype(np.float64), BF16)
_CTYPE = {np.dtype(np.float32): "float", np.dtype(np.float64): "double", BF16: "bf16"}


def compute_dtype(dtype) -> np.dtype:
    """The kernels' F for storage type `dtype`: float32 for bf16, else the type itself."""
    dt = np.dtype(dtype)
    return np.dtype(np.float32) if dt == BF16 else dt

GPU_BLOCK = 256
GPU_GRID_CAP = 65535  # blocks per launch in x (and in y); the grid-stride loops cover any remaining elements
# The indexing kernels take `wide`: 0 runs their index arithmetic in 32 bits, 1 in 64 bits (several times slower
# per division), needed once an array they touch has more elements than this. Tests lower it to run the wide path.
INDEX32_MAX = 2**31 - 1
# im2col/col2im's `fixed`: 1 runs the presets' geometries (11x11 stride 4, 5x5 and 3x3 stride 1) with the window
# and stride as compile-time constants, 0 with run-time values (the same bits; bench/conv_parts.py times both).
FIXED_GEOMETRY = 1


def _wide(*arrays) -> int:
    """1 when any of the arrays has more than INDEX32_MAX elements (64-bit indexing), else 0."""
    return int(max(int(a.size) for a in arrays) > INDEX32_MAX)

# ---------------------------------------------------------------------------------------------------------------
# Sources and signatures


@dataclass(frozen=True)
class Param:
    """One kernel parameter: kind is 'ptr_T', 'ptr_F', 'ptr_int', 'ptr_i64' (long long*), 'ptr_u8' (unsigned char*),
    'ptr_f32' (float* whatever T is), 'int', 'f32' (float whatever T is), 'T' or 'F' (F: the compute type)."""

    name: str
    kind: str


@dataclass(frozen=True)
class Kernel:
    name: str
    source: str  # file name under KERNEL_DIR
    params: tuple


_KERNEL_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)')


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _parse_param(kernel: str, decl: str) -> Param:
    words = decl.replace("*", " * ").split()
    name = words[-1]
    rest = [w for w in words[:-1] if w not in ("const", "__restrict__")]
    if rest == ["T", "*"]:
        return Param(name, "ptr_T")
    if rest == ["F", "*"]:
        return Param(name, "ptr_F")
    if rest == ["F"]:
        return Param(name, "F")
    if rest == ["int", "*"]:
        return Param(name, "ptr_int")
    if rest == ["long", "long", "*"]:
        return Param(name, "ptr_i64")
    if rest == ["unsigned", "char", "*"]:
        return Param(name, "ptr_u8")
    if rest == ["float", "*"]:
        return Param(name, "ptr_f32")
    if rest == ["float"]:
        return Param(name, "f32")
    if rest == ["int"]:
        return Param(name, "int")
    if rest == ["T"]:
        return Param(name, "T")
    raise ValueError(f"kernel {kernel}: parameter {decl.strip()!r} has a type the launchers do not handle")


def read_source(filename: str) -> str:
    return (KERNEL_DIR / filename).read_text()


def parse_kernels(text: str, filename: str = "<text>") -> list[Kernel]:
    """Every `extern "C" __global__` kernel in CUDA source text, with its parameters, in file order."""
    found = []
    for m in _KERNEL_RE.finditer(_strip_comments(text)):
        params = tuple(_parse_param(m.group(1), p) for p in m.group(2).split(",") if p.strip())
        found.append(Kernel(m.group(1), filename, params))
    return found


@lru_cache(maxsize=None)
def kernels() -> dict:
    """name -> Kernel for every `extern "C"` kernel in every source file."""
    table = {}
    for filename in SOURCES:
        for k in parse_kernels(read_source(filename), filename):
            if k.name in table:
                raise ValueError(f"kernel {k.name} defined in both {table[k.name].source} and {filename}")
            table[k.name] = k
    return table


def list_kernels() -> list[str]:
    """Names of every `extern "C"` kernel in cpnet/kernels/*.cu (parsed from the source text)."""
    return list(kernels())


def kernel_source(filename: str, dtype) -> str:
    """The text compiled for `dtype` (float32, float64 or BF16): typedefs for T and F (bf16.cuh first for BF16),
    the file's HEADERS, then the file as written."""
    dt = np.dtype(dtype)
    ctype, ftype = _CTYPE[dt], _CTYPE[compute_dtype(dt)]
    head = f'typedef {ctype} T;\ntypedef {ftype} F;\n'
    if dt == BF16:
        head = f'#line 1 "bf16.cuh"\n{read_source("bf16.cuh")}\n{head}'
    for h in HEADERS.get(filename, ()):
        head += f'#line 1 "{h}"\n{read_source(h)}\n'
    return f'{head}#line 1 "{filename}"\n' + read_source(filename)


def pack_args(name: str, dtype, args, array_check=None) -> list:
    """Check `args` against kernel `name`'s parameters and convert scalars to the exact C types.

    `array_check(param, array, expected_dtype)`, when given, validates array arguments (type, dtype, contiguity)
    and returns the value to pass; without it arrays pass as they are. Scalars become np.int32 for `int`, np.float32 for
    `f32` and the compute type (np.float32 / np.float64) for `F` (and for `T`, which a BF16 build does not take).
    """
    kernel = kernels()[name]
    if len(args) != len(kernel.params):
        raise TypeError(f"{name}: {len(kernel.params)} arguments expected, got {len(args)}")
    dtype = np.dtype(dtype)
    fdtype = compute_dtype(dtype)
    expected = {"ptr_T": dtype, "ptr_F": fdtype, "ptr_int": np.dtype(np.int32), "ptr_i64": np.dtype(np.int64),
                "ptr_u8": np.dtype(np.uint8), "ptr_f32": np.dtype(np.float32)}
    out = []
    for p, a in zip(kernel.params, args):
        if p.kind in expected:
            out.append(a if array_check is None else array_check(p, a, expected[p.kind]))
        elif p.kind == "int":
            v = int(a)
            if not -(2**31) <= v < 2**31:
                raise ValueError(f"{name}: {p.name}={v} does not fit in a 32-bit int")
            out.append(np.int32(v))
        elif p.kind == "f32":
            out.append(np.float32(a))
        elif p.kind == "T" and dtype == BF16:
            raise ValueError(f"{name}: scalar {p.name} of type T has no bf16 form (declare it F)")
        else:
            out.append(fdtype.type(a))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The indexing operations (im2col, col2im, max pool, LRN), written once for any launcher.
# `run(name, dtype, n, *args)` launches kernel `name` for `n` output elements on a 1-D grid, or, with n a pair
# (nx, ny), on a 2-D grid: threads in x for nx elements, ny rows of blocks in y (each capped, the kernels
# grid-stride in both); xp is numpy or cupy.


def _float_dtype(op: str, *arrays):
    dt = np.dtype(arrays[0].dtype)
    if dt not in DTYPES:
        raise ValueError(f"{op}: expected float32, float64 or bf16 (uint16) arrays, got {dt}")
    for a in arrays[1:]:
        if np.dtype(a.dtype) != dt:
            raise ValueError(f"{op}: all float inputs must share one dtype, got {dt} and {a.dtype}")
    return dt


def _nchw(op: str, shape) -> tuple:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise ValueError(f"{op}: expected a 4-d (N, C, H, W) shape, got {shape}")
    return shape


def out_size(op: str, size: int, k: int, s: int, p: int) -> int:
    """floor((size + 2p - k) / s) + 1, with a clear error when the window does not fit."""
    if k < 1 or s < 1 or p < 0:
        raise ValueError(f"{op}: need kernel >= 1, stride >= 1, pad >= 0, got kernel={k} stride={s} pad={p}")
    if size + 2 * p < k:
        raise ValueError(f"{op}: kernel {k} larger than the padded input {size} + 2*{p}")
    return window_out(size, k, s, p)


def _im2col(run, xp, x, kh, kw, sy, sx, ph, pw, check=True):
    if check:
        _nchw("im2col", x.shape)
        _float_dtype("im2col", x)
        out_size("im2col", x.shape[2], kh, sy, ph), out_size("im2col", x.shape[3], kw, sx, pw)
    N, C, H, W = (int(s) for s in x.shape)
    Ho, Wo = window_out(H, kh, sy, ph), window_out(W, kw, sx, pw)
    x = xp.ascontiguousarray(x)
    col = xp.empty((C * kh * kw, N * Ho * Wo), dtype=x.dtype)
    run("im2col_kernel", x.dtype, (N * Ho * Wo, C), x, col, N, C, H, W, kh, kw, sy, sx, ph, pw, Ho, Wo,
        FIXED_GEOMETRY, _wide(x, col))
    return col


def _col2im(run, xp, col, x_shape, kh, kw, sy, sx, ph, pw, check=True):
    N, C, H, W = _nchw("col2im", x_shape)
    Ho, Wo = window_out(H, kh, sy, ph), window_out(W, kw, sx, pw)
    if check:
        _float_dtype("col2im", col)
        out_size("col2im", H, kh, sy, ph), out_size("col2im", W, kw, sx, pw)
        if tuple(col.shape) != (C * kh * kw, N * Ho * Wo):
            raise ValueError(f"col2im: expected col of shape {(C * kh * kw, N * Ho * Wo)}, got {tuple(col.shape)}")
    col = xp.ascontiguousarray(col)
    x = xp.empty((N, C, H, W), dtype=col.dtype)
    run("col2im_kernel", col.dtype, (H * W, N * C), col, x, N, C, H, W, kh, kw, sy, sx, ph, pw, Ho, Wo,
        FIXED_GEOMETRY, _wide(col, x))
    return x


def _check_pool(op, ksize, pad):
    # pad < ksize guarantees every window holds at least one input element.
    if not 0 <= pad < ksize:
        raise ValueError(f"{op}: pad must be in [0, ksize={ksize}), got {pad}")


def _maxpool_forward(run, xp, x, ksize, stride, pad, check=True):
    if check:
        _check_pool("maxpool_forward", ksize, pad)
        _nchw("maxpool_forward", x.shape)
        _float_dtype("maxpool_forward", x)
        for size in x.shape[2:]:
            out_size("maxpool_forward", size, ksize, stride, pad)
    N, C, H, W = (int(s) for s in x.shape)
    Ho, Wo = window_out(H, ksize, stride, pad), window_out(W, ksize, stride, pad)
    x = xp.ascontiguousarray(x)
    y = xp.empty((N, C, Ho, Wo), dtype=x.dtype)
    argmax = xp.empty((N, C, Ho, Wo), dtype=np.int32)
    run("maxpool_forward_kernel", x.dtype, y.size, x, y, argmax, N, C, H, W, ksize, stride, pad, Ho, Wo,
        _wide(x, y))
    return y, argmax


def _maxpool_backward(run, xp, dy, argmax, x_shape, ksize, stride, pad, check=True):
    N, C, H, W = _nchw("maxpool_backward", x_shape)
    Ho, Wo = window_out(H, ksize, stride, pad), window_out(W, ksize, stride, pad)
    if check:
        _check_pool("maxpool_backward", ksize, pad)
        _float_dtype("maxpool_backward", dy)
        out_size("maxpool_backward", H, ksize, stride, pad), out_size("maxpool_backward", W, ksize, stride, pad)
        if tuple(dy.shape) != (N, C, Ho, Wo) or tuple(argmax.shape) != (N, C, Ho, Wo):
            raise ValueError(
                f"maxpool_backward: expected dy and argmax of shape {(N, C, Ho, Wo)}, "
                f"got {tuple(dy.shape)} and {tuple(argmax.shape)}"
            )
        if not np.issubdtype(np.dtype(argmax.dtype), np.integer):
            raise ValueError(f"maxpool_backward: argmax must hold integers, got {argmax.dtype}")
    dy = xp.ascontiguousarray(dy)
    argmax = xp.ascontiguousarray(argmax, dtype=np.int32)
    dx = xp.empty((N, C, H, W), dtype=dy.dtype)
    run("maxpool_backward_kernel", dy.dtype, dx.size, dy, argmax, dx, N, C, H, W, ksize, stride, pad, Ho, Wo,
        _wide(dy, dx))
    return dx


def _check_lrn_size(op, size):
    if int(size) < 1:
        raise ValueError(f"{op}: size must be >= 1, got {size}")


def _lrn_forward(run, xp, x, size, k, alpha_eff, beta, check=True):
    if check:
        _nchw("lrn_forward", x.shape)
        _float_dtype("lrn_forward", x)
        _check_lrn_size("lrn_forward", size)
    N, C, H, W = (int(s) for s in x.shape)
    x = xp.ascontiguousarray(x)
    y = xp.empty_like(x)
    scale = xp.empty(x.shape, dtype=compute_dtype(x.dtype))  # F: bf16 keeps its scale in float32
    run("lrn_forward_kernel", x.dtype, x.size, x, y, scale, N, C, H * W, size, k, alpha_eff, beta, _wide(x))
    return y, scale


def _lrn_backward(run, xp, x, y, scale, dy, size, alpha_eff, beta, check=True):
    if check:
        _nchw("lrn_backward", x.shape)
        _float_dtype("lrn_backward", x, y, dy)
        if np.dtype(scale.dtype) != compute_dtype(x.dtype):
            raise ValueError(f"lrn_backward: expected scale of dtype {compute_dtype(x.dtype)}, got {scale.dtype}")
        _check_lrn_size("lrn_backward", size)
        for nm, a in (("y", y), ("scale", scale), ("dy", dy)):
            if tuple(a.shape) != tuple(x.shape):
                raise ValueError(f"lrn_backward: expected {nm} of shape {tuple(x.shape)}, got {tuple(a.shape)}")
    N, C, H, W = (int(s) for s in x.shape)
    x, y, scale, dy = (xp.ascontiguousarray(a) for a in (x, y, scale, dy))
    dx = xp.empty_like(x)
    run("lrn_backward_kernel", x.dtype, x.size, x, y, scale, dy, dx, N, C, H * W, size, alpha_eff, beta, _wide(x))
    return dx


# LRN -> max pool fused (lrn.cu's lrn_pool kernels): the pooled output and uint8 window offsets, never the LRN's.

POOL_OFFSET_MAX = 255  # the window offsets i*ksize + j are uint8: ksize*ksize may not exceed this


def _check_lrn_pool(op, x_shape, size, ksize, stride, pad):
    """-> (N, C, H, W, Ho, Wo) after checking the LRN size, the pool window and that its offsets fit a uint8."""
    N, C, H, W = _nchw(op, x_shape)
    _check_lrn_size(op, size)
    _check_pool(op, ksize, pad)
    if ksize * ksize > POOL_OFFSET_MAX:
        raise ValueError(f"{op}: ksize {ksize} too large for uint8 window offsets (ksize^2 <= {POOL_OFFSET_MAX})")
    return N, C, H, W, out_size(op, H, ksize, stride, pad), out_size(op, W, ksize, stride, pad)


def _lrn_pool_forward(run, xp, x, size, k, alpha_eff, beta, ksize, stride, pad, check=True):
    """-> (y (N, C, Ho, Wo), off uint8 (N, C, Ho, Wo)): max_pool(lrn(x)) and each winner's offset in its window."""
    if check:
        _float_dtype("lrn_pool_forward", x)
        _check_lrn_pool("lrn_pool_forward", x.shape, size, ksize, stride, pad)
    N, C, H, W = (int(s) for s in x.shape)
    Ho, Wo = window_out(H, ksize, stride, pad), window_out(W, ksize, stride, pad)
    x = xp.ascontiguousarray(x)
    y = xp.empty((N, C, Ho, Wo), dtype=x.dtype)
    off = xp.empty((N, C, Ho, Wo), dtype=np.uint8)
    run("lrn_pool_forward_kernel", x.dtype, y.size, x, y, off, N, C, H, W, size, k, alpha_eff, beta, ksize, stride,
        pad, Ho, Wo, _wide(x))
    return y, off


def _lrn_pool_backward(run, xp, x, dy, off, size, k, alpha_eff, beta, ksize, stride, pad, check=True):
    """dx (x's shape) of max_pool(lrn(x)) from the forward's x and offsets and the pooled output's gradient dy."""
    if check:
        _float_dtype("lrn_pool_backward", x, dy)
        N, C, H, W, Ho, Wo = _check_lrn_pool("lrn_pool_backward", x.shape, size, ksize, stride, pad)
        if tuple(dy.shape) != (N, C, Ho, Wo) or tuple(off.shape) != (N, C, Ho, Wo):
            raise ValueError(f"lrn_pool_backward: expected dy and off of shape {(N, C, Ho, Wo)}, got "
                             f"{tuple(dy.shape)} and {tuple(off.shape)}")
        if np.dtype(off.dtype) != np.uint8:
            raise ValueError(f"lrn_pool_backward: off must be uint8 window offsets, got {off.dtype}")
    N, C, H, W = (int(s) for s in x.shape)
    Ho, Wo = (int(s) for s in dy.shape[2:])
    x, dy, off = (xp.ascontiguousarray(a) for a in (x, dy, off))
    dx = xp.empty_like(x)
    run("lrn_pool_backward_kernel", x.dtype, dx.size, x, dy, off, dx, N, C, H, W, size, k, alpha_eff, beta, ksize,
        stride, pad, Ho, Wo, _wide(x))
    return dx


# ---------------------------------------------------------------------------------------------------------------
# Elementwise kernels (elementwise.cu): flat arrays, at most ELEMENTWISE_CHUNK elements per launch (their `n` is a
# 32-bit int; tests lower it to run the chunked path).

ELEMENTWISE_CHUNK = 2**30
ELEMENTWISE_ILP = 4  # ILP in elementwise.cu: grids are sized for n / ILP threads (any value computes the same)


def _bits32(v) -> int:
    """A uint32 bit pattern (v mod 2^32) as the int32 with the same bits, for an `int` kernel parameter."""
    return int(np.uint32(int(v) & 0xFFFFFFFF).view(np.int32))


def _elementwise(run, name, dt, arrays, *scalars, counter=None):
    """Launch `name` over `arrays` (C-contiguous, one size) in chunks: arrays, n[, first], scalars.
    `counter` (an int): pass each chunk's first counter, counter + its first flat index (mod 2^32)."""
    n = int(arrays[0].size)
    if n <= ELEMENTWISE_CHUNK:  # the common case, without the views (each costs microseconds on CuPy)
        run(name, dt, -(-n // ELEMENTWISE_ILP), *arrays, n, *(() if counter is None else (_bits32(counter),)),
            *scalars)
        return
    flat = [a.reshape(-1) for a in arrays]
    for s in range(0, n, ELEMENTWISE_CHUNK):
        t = min(s + ELEMENTWISE_CHUNK, n)
        first = () if counter is None else (_bits32(counter + s),)
        run(name, dt, -(-(t - s) // ELEMENTWISE_ILP), *(f[s:t] for f in flat), t - s, *first, *scalars)


def _same_shapes(op, ref_name, ref, **others):
    for nm, a in others.items():
        if tuple(a.shape) != tuple(ref.shape):
            raise ValueError(f"{op}: expected {nm} of {ref_name}'s shape {tuple(ref.shape)}, got {tuple(a.shape)}")


def _sgd_momentum(run, xp, w, g, v, momentum, wd_lr, lr, check=True):
    if check:
        _float_dtype("sgd_momentum", w, g, v)
        _same_shapes("sgd_momentum", "w", w, g=g, v=v)
        for nm, a in (("w", w), ("v", v)):
            if not a.flags.c_contiguous:
                raise ValueError(f"sgd_momentum: {nm} is updated in place and must be C-contiguous")
    _elementwise(run, "sgd_momentum_kernel", w.dtype, (w, xp.ascontiguousarray(g), v), momentum, wd_lr, lr)


MULTI_ROW = 5  # int64 per array in sgd_momentum_multi_kernel's table: w, g, v addresses, first index, decay


def _sgd_momentum_multi(run, xp, ws, gs, vs, decays, momentum, wd_lr, lr, cache=None, check=True):
    """The momentum update of many arrays, one launch per ELEMENTWISE_CHUNK elements (alexnet's 61 M parameters:
    one). `decays[i]`: whether array i takes the weight-decay term. `cache`: a dict kept by the caller; the device
    table of addresses is uploaded again only when an address changed since the last call (CuPy's pool hands
    backward the same gradient blocks step after step), so a steady run launches the kernel and nothing else."""
    if check:
        _float_dtype("sgd_momentum_multi", *ws, *gs, *vs)
        if not len(ws) == len(gs) == len(vs) == len(decays):
            raise ValueError("sgd_momentum_multi: expected as many w, g, v and decay flags")
        for w, g, v in zip(ws, gs, vs):
            _same_shapes("sgd_momentum_multi", "w", w, g=g, v=v)
            for nm, a in (("w", w), ("g", g), ("v", v)):
                if not a.flags.c_contiguous:
                    raise ValueError(f"sgd_momentum_multi: {nm} must be C-contiguous (the table holds its address)")
    groups, rows, start = [], [], 0
    for w, g, v, d in zip(ws, gs, vs, decays):
        size = int(w.size)
        if size == 0:
            continue
        if size > ELEMENTWISE_CHUNK:  # alone, in chunks
            _sgd_momentum(run, xp, w, g, v, momentum, wd_lr if d else 0.0, lr, check=False)
            continue
        if start + size > ELEMENTWISE_CHUNK:
            groups.append((rows, start))
            rows, start = [], 0
        rows.append((backend.data_ptr(w), backend.data_ptr(g), backend.data_ptr(v), start, int(bool(d))))
        start += size
    if rows:
        groups.append((rows, start))
    dt = np.dtype(ws[0].dtype) if ws else None
    for i, (rows, n) in enumerate(groups):
        host = np.array(rows, dtype=np.int64).reshape(-1, MULTI_ROW)
        key, entry = host.tobytes(), None if cache is None else cache.get(i)
        if entry is None or entry[0] != key:
            entry = (key, xp.asarray(host))
            if cache is not None:
                cache[i] = entry
        run("sgd_momentum_multi_kernel", dt, -(-n // ELEMENTWISE_ILP), entry[1], len(rows), n, momentum, wd_lr, lr)


def _dropout_forward(run, xp, x, p, key0, key1, first=0, check=True):
    p = float(p)
    if check:
        _float_dtype("dropout_forward", x)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout_forward: p must be in [0, 1), got {p}")
    dt, f = x.dtype, compute_dtype(x.dtype)
    x = xp.ascontiguousarray(x)
    y = xp.empty_like(x)
    mask = xp.empty_like(x)
    _elementwise(run, "dropout_forward_kernel", dt, (x, y, mask), f.type(p), f.type(1.0 / (1.0 - p)),
                 _bits32(key0), _bits32(key1), counter=int(first))
    return y, mask


def _dropout_towers_forward(run, xp, x, p, keys0, keys1, first=0, check=True):
    """Both fused towers' dropout in one launch: x (rows, 2*units), tower 0's keys for the first `units` columns,
    tower 1's for the rest, counters from `first` as each tower's own (rows, units) half draws them."""
    p = float(p)
    if check:
        _float_dtype("dropout_towers_forward", x)
        if x.ndim != 2 or x.shape[1] % 2:
            raise ValueError(f"dropout_towers_forward: expected x of shape (rows, 2*units), got {tuple(x.shape)}")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout_towers_forward: p must be in [0, 1), got {p}")
        if x.size > ELEMENTWISE_CHUNK:
            raise ValueError(f"dropout_towers_forward: at most {ELEMENTWISE_CHUNK} elements, got {x.size}")
    dt, f = x.dtype, compute_dtype(x.dtype)
    x = xp.ascontiguousarray(x)
    y = xp.empty_like(x)
    mask = xp.empty_like(x)
    n = int(x.size)
    run("dropout_towers_forward_kernel", dt, -(-n // ELEMENTWISE_ILP), x, y, mask, n, int(x.shape[1]) // 2,
        _bits32(first), f.type(p), f.type(1.0 / (1.0 - p)), *(_bits32(k) for k in (*keys0, *keys1)))
    return y, mask


def _convert(run, xp, x, to, check=True):
    """x converted between BF16 and float32 (`to`: the dtype wanted), one pass (narrow: round to nearest even)."""
    src, to = np.dtype(x.dtype), np.dtype(to)
    if check and {src, to} != {BF16, np.dtype(np.float32)}:
        raise ValueError(f"convert: expected float32 -> bf16 (uint16) or back, got {src} -> {to}")
    x = xp.ascontiguousarray(x)
    y = xp.empty(x.shape, dtype=to)
    _elementwise(run, "narrow_kernel" if to == BF16 else "widen_kernel", BF16, (x, y))
    return y


def _relu_forward(run, xp, x, check=True):
    if check:
        _float_dtype("relu_forward", x)
    x = xp.ascontiguousarray(x)
    y = xp.empty_like(x)
    _elementwise(run, "relu_forward_kernel", x.dtype, (x, y))
    return y


def _relu_backward(run, xp, y, dy, check=True):
    if check:
        _float_dtype("relu_backward", y, dy)
        _same_shapes("relu_backward", "y", y, dy=dy)
    y, dy = xp.ascontiguousarray(y), xp.ascontiguousarray(dy)
    dx = xp.empty_like(dy)
    _elementwise(run, "relu_backward_kernel", dy.dtype, (y, dy, dx))
    return dx


# ---------------------------------------------------------------------------------------------------------------
# The convolution's output layout with bias and ReLU (layout.cu): one launch per direction.


def _layout_check(op, rows, nchw, G, rows_name):
    N, F, Ho, Wo = (int(s) for s in nchw.shape)
    if tuple(rows.shape) != (G, F // G, N * Ho * Wo) or F % G:
        raise ValueError(f"{op}: expected {rows_name} of shape {(G, F // G, N * Ho * Wo)} for the NCHW "
                         f"{tuple(nchw.shape)}, got {tuple(rows.shape)}")


def _conv_layout_forward(run, xp, ym, b, y, relu=True, check=True):
    """y (N, F, Ho, Wo) = relu(ym + b) from the GEMM's ym (G, F/G, N*Ho*Wo); written into y, returned. ym and b
    are of y's compute type (float32 for a bf16 y: the products' float32 output and the float32 bias)."""
    if check:
        _float_dtype("conv_layout_forward", y)
        f = compute_dtype(y.dtype)
        if np.dtype(ym.dtype) != f or np.dtype(b.dtype) != f:
            raise ValueError(f"conv_layout_forward: expected ym and b of dtype {f} for y of dtype {y.dtype}, got "
                             f"{ym.dtype} and {b.dtype}")
        _layout_check("conv_layout_forward", ym, y, ym.shape[0], "ym")
        if tuple(b.shape) != (y.shape[1],):
            raise ValueError(f"conv_layout_forward: expected b of shape ({y.shape[1]},), got {tuple(b.shape)}")
        if not (ym.flags.c_contiguous and y.flags.c_contiguous and b.flags.c_contiguous):
            raise ValueError("conv_layout_forward: ym, b and y must be C-contiguous")
    N, F, Ho, Wo = (int(s) for s in y.shape)
    run("conv_layout_forward_kernel", y.dtype, (Ho * Wo, N * F), ym, b, y, N, F, Ho * Wo, int(bool(relu)))
    return y


def _conv_layout_backward(run, xp, dy, y, G, relu=True, check=True):
    """-> d (G, F/G, N*Ho*Wo), the GEMM layout of dy (N, F, Ho, Wo) times the ReLU mask y > 0."""
    if check:
        _float_dtype("conv_layout_backward", dy, y)
        _same_shapes("conv_layout_backward", "dy", dy, y=y)
        _nchw("conv_layout_backward", dy.shape)
    N, F, Ho, Wo = (int(s) for s in dy.shape)
    dy, y = xp.ascontiguousarray(dy), xp.ascontiguousarray(y)
    d = xp.empty((G, F // G, N * Ho * Wo), dtype=dy.dtype)
    run("conv_layout_backward_kernel", dy.dtype, (Ho * Wo, N * F), dy, y, d, N, F, Ho * Wo, int(bool(relu)))
    return d


# ---------------------------------------------------------------------------------------------------------------
# The network input from uint8 pixels (augment.cu): crop, flip, lighting, mean and scale in one launch.


def _augment(run, xp, src, table, shift, mean, dtype, crop, windowed, scale, first=0, n=None, check=True):
    """-> out (n, 3, crop, crop) of `dtype` (float32, float64 or BF16) from crops first .. first+n-1 of `table`
    (int32 (crops, 8): src image, oy, ox, flip, erased box y0, x0, y1, x1) and `shift` (float32 (crops, 3)); src uint8 (images, R, R, 3)
    (R = crop: windows cut at each crop's offset, windowed=1; R = S: whole images, windowed=0), mean float32
    (3, S, S). n defaults to the table's crops from `first` on. See augment.cu and data/augment.py's RawBatch."""
    n = int(table.shape[0]) - int(first) if n is None else int(n)
    dt = np.dtype(dtype)
    if check:
        if dt not in DTYPES:
            raise ValueError(f"augment: expected a float32, float64 or bf16 (uint16) output, got {dt}")
        for nm, a, want in (("src", src, np.uint8), ("table", table, np.int32), ("shift", shift, np.float32),
                            ("mean", mean, np.float32)):
            if np.dtype(a.dtype) != want or not a.flags.c_contiguous:
                raise ValueError(f"augment: {nm} must be C-contiguous {np.dtype(want)}, got {a.dtype}")
        if src.ndim != 4 or src.shape[3] != 3 or src.shape[1] != src.shape[2]:
            raise ValueError(f"augment: expected src of shape (images, R, R, 3), got {tuple(src.shape)}")
        if mean.ndim != 3 or mean.shape[0] != 3 or mean.shape[1] != mean.shape[2]:
            raise ValueError(f"augment: expected mean of shape (3, S, S), got {tuple(mean.shape)}")
        region, size = int(src.shape[1]), int(mean.shape[1])
        if region != (crop if windowed else size):
            raise ValueError(f"augment: src images of {region} px, expected {crop if windowed else size} "
                             f"({'crop windows' if windowed else 'whole images'})")
        if tuple(table.shape[1:]) != (8,) or tuple(shift.shape) != (table.shape[0], 3):
            raise ValueError(f"augment: expected table (crops, 8) and shift (crops, 3), got {tuple(table.shape)} "
                             f"and {tuple(shift.shape)}")
        if not (0 <= int(first) and n >= 0 and int(first) + n <= table.shape[0]):
            raise ValueError(f"augment: crops {first}..{int(first) + n - 1} outside the table's {table.shape[0]}")
    out = xp.empty((n, 3, int(crop), int(crop)), dtype=dt)
    run("augment_kernel", dt, (int(crop) * int(crop), 3 * n), src, table, shift, mean, out, n, int(first),
        int(crop), int(mean.shape[1]), int(src.shape[1]), int(bool(windowed)), float(scale))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Softmax cross-entropy (loss.cu): one launch per direction.


def _xent_check(op, z, labels):
    _float_dtype(op, z)
    if z.ndim != 2:
        raise ValueError(f"{op}: expected (N, K) logits, got shape {tuple(z.shape)}")
    if labels.ndim != 1 or labels.shape[0] != z.shape[0] or not np.issubdtype(np.dtype(labels.dtype), np.integer):
        raise ValueError(f"{op}: expected ({z.shape[0]},) integer labels, got {tuple(labels.shape)} {labels.dtype}")


def _softmax_xent_forward(run, xp, z, labels, check=True):
    """-> (row_loss (N,) in the compute type, each row's -log p[label] / N; p (N, K); labels as int32)."""
    if check:
        _xent_check("softmax_xent_forward", z, labels)
    N, K = (int(s) for s in z.shape)
    z = xp.ascontiguousarray(z)
    labels = xp.ascontiguousarray(labels, dtype=np.int32)
    p = xp.empty_like(z)
    row_loss = xp.empty((N,), dtype=compute_dtype(z.dtype))
    run("softmax_xent_forward_kernel", z.dtype, N, z, labels, p, row_loss, N, K)
    return row_loss, p, labels


def _softmax_xent_backward(run, xp, p, labels, check=True):
    """dz = (p - onehot(labels)) / N."""
    if check:
        _xent_check("softmax_xent_backward", p, labels)
    N, K = (int(s) for s in p.shape)
    p = xp.ascontiguousarray(p)
    labels = xp.ascontiguousarray(labels, dtype=np.int32)
    dz = xp.empty_like(p)
    run("softmax_xent_backward_kernel", p.dtype, p.size, p, labels, dz, N, K)
    return dz


# ---------------------------------------------------------------------------------------------------------------
# GPU launcher

_modules: dict = {}  # (device id, dtype name, source file) -> cupy.RawModule
# kernel name -> how many times the GPU launcher started it (tools count the launches of a training step with it)
launch_counts: Counter = Counter()
_functions: dict = {}  # (device id, dtype name, kernel name) -> cupy.RawKernel


def _gpu_function(name: str, dtype):
    cp = backend.cupy_module()
    dev = cp.cuda.Device().id
    dt = np.dtype(dtype)
    fkey = (dev, dt.name, name)
    fn = _functions.get(fkey)
    if fn is None:
        filename = kernels()[name].source
        mkey = (dev, dt.name, filename)
        module = _modules.get(mkey)
        if module is None:
            module = backend.raw_module(code=kernel_source(filename, dt), options=())
            _modules[mkey] = module
        fn = _functions[fkey] = module.get_function(name)
    return fn


def _gpu_run(name, dtype, n, *args):
    # The bodies above hand the launcher C-contiguous arrays of the kernel's types on the current device (they make
    # them so), so the arrays pass through unchecked here; the host shim's launcher does check every one, and the
    # tests run every body through it, so a body that broke this would fail there.
    packed = pack_args(name, dtype, args)
    grid = launch_grid(n, GPU_BLOCK, GPU_GRID_CAP)
    if grid is None:
        return
    _gpu_function(name, dtype)(grid, (GPU_BLOCK,), tuple(packed))
    launch_counts[name] += 1


def launch_grid(n, block: int, cap: int):
    """The grid for `n` elements (an int: 1-D) or (nx, ny) (2-D): ceil(nx / block) blocks in x and ny in y, each
    at most `cap`; None when there is nothing to do."""
    two_d = isinstance(n, tuple)
    nx, ny = (int(n[0]), int(n[1])) if two_d else (int(n), 1)
    if nx <= 0 or ny <= 0:
        return None
    gx = min(math.ceil(nx / block), cap)
    return (gx, min(ny, cap)) if two_d else (gx,)


def _on_gpu(op, body, arrays, *rest, check=True):
    """Run `body` with the device of the array inputs current. Host arrays and inputs on another GPU are refused,
    not silently copied: the one check of the array inputs on a launch. `check=False` skips the body's checks of
    shapes, dtypes and sizes, for a caller that has made them already (the ops, which say what is wrong in their
    own terms); the public entry points check by default."""
    cp = backend.cupy_module()
    for a in arrays:
        if not isinstance(a, cp.ndarray):
            raise TypeError(f"{op}: expected cupy arrays, got {type(a).__module__}.{type(a).__name__}")
    dev = arrays[0].device.id
    for a in arrays[1:]:
        if a.device.id != dev:
            raise ValueError(f"{op}: inputs on GPU {dev} and GPU {a.device.id}; a launch reads one GPU's memory")
    with backend.device_of(arrays[0]):
        return body(_gpu_run, cp, *arrays, *rest, check=check)


def im2col_gpu(x, kh, kw, sy, sx, ph, pw, check=True):
    """x (N, C, H, W) -> col (C*kh*kw, N*Ho*Wo); row c*kh*kw + i*kw + j, column n*Ho*Wo + oy*Wo + ox."""
    return _on_gpu("im2col_gpu", _im2col, (x,), kh, kw, sy, sx, ph, pw, check=check)


def col2im_gpu(col, x_shape, kh, kw, sy, sx, ph, pw, check=True):
    """The adjoint of im2col_gpu: sums each col entry back onto the input position it came from."""
    return _on_gpu("col2im_gpu", _col2im, (col,), x_shape, kh, kw, sy, sx, ph, pw, check=check)


def maxpool_forward_gpu(x, ksize, stride, pad, check=True):
    """-> (y, argmax int32 = h*W + w in the (n, c) plane); floor size, padding never wins, ties to the first max."""
    return _on_gpu("maxpool_forward_gpu", _maxpool_forward, (x,), ksize, stride, pad, check=check)


def maxpool_backward_gpu(dy, argmax, x_shape, ksize, stride, pad, check=True):
    """dx: each input gathers dy from the outputs whose argmax it is."""
    return _on_gpu("maxpool_backward_gpu", _maxpool_backward, (dy, argmax), x_shape, ksize, stride, pad, check=check)


def lrn_forward_gpu(x, size, k, alpha_eff, beta, check=True):
    """-> (y, scale): scale = k + alpha_eff * (sum of x^2 over the channel window), y = x * scale^-beta."""
    return _on_gpu("lrn_forward_gpu", _lrn_forward, (x,), size, k, alpha_eff, beta, check=check)


def lrn_backward_gpu(x, y, scale, dy, size, alpha_eff, beta, check=True):
    """dx = dy * scale^-beta - 2 alpha_eff beta x * sum over the windows containing c of dy * y / scale."""
    return _on_gpu("lrn_backward_gpu", _lrn_backward, (x, y, scale, dy), size, alpha_eff, beta, check=check)


def lrn_pool_forward_gpu(x, size, k, alpha_eff, beta, ksize, stride, pad, check=True):
    """-> (y, off uint8): max pooling of lrn_forward_gpu's output in one pass, off the winner's offset i*ksize + j in
    its window (the host path's compact argmax); the LRN output and scale are not stored."""
    return _on_gpu("lrn_pool_forward_gpu", _lrn_pool_forward, (x,), size, k, alpha_eff, beta, ksize, stride, pad,
                   check=check)


def lrn_pool_backward_gpu(x, dy, off, size, k, alpha_eff, beta, ksize, stride, pad, check=True):
    """dx of lrn_pool_forward_gpu: the pool's gradient gathered through off, LRN's scale recomputed from x."""
    return _on_gpu("lrn_pool_backward_gpu", _lrn_pool_backward, (x, dy, off), size, k, alpha_eff, beta, ksize,
                   stride, pad, check=check)


def sgd_momentum_gpu(w, g, v, momentum, wd_lr, lr, check=True):
    """In place: v = momentum * v - wd_lr * w - lr * g (no wd_lr term when it is 0), then w = w + v."""
    _on_gpu("sgd_momentum_gpu", _sgd_momentum, (w, g, v), momentum, wd_lr, lr, check=check)


def dropout_forward_gpu(x, p, key0, key1, first=0, check=True):
    """-> (y, mask): mask = 1/(1-p) where counter_uniform's draw (keys key0, key1: uint32; counters from
    `first`) is >= p, else 0."""
    return _on_gpu("dropout_forward_gpu", _dropout_forward, (x,), p, key0, key1, first, check=check)


def sgd_momentum_multi_gpu(ws, gs, vs, decays, momentum, wd_lr, lr, cache=None, check=True):
    """In place, for every i: sgd_momentum_gpu(ws[i], gs[i], vs[i], momentum, wd_lr if decays[i] else 0, lr), in one
    launch (all arrays on one GPU, of one dtype, C-contiguous). `cache`: a dict the caller keeps between calls
    (the table of addresses stays on the device while they do not change)."""
    if not ws:
        return
    arrays = (*ws, *gs, *vs)
    k = len(ws)
    _on_gpu("sgd_momentum_multi_gpu",
            lambda run, xp, *a, check: _sgd_momentum_multi(run, xp, a[:k], a[k:2 * k], a[2 * k:], decays, momentum,
                                                           wd_lr, lr, cache, check=check),
            arrays, check=check)


def dropout_towers_forward_gpu(x, p, keys0, keys1, first=0, check=True):
    """-> (y, mask) for the fused towers' (rows, 2*units) activation: the two halves' dropout_forward_gpu results
    (keys0 for tower 0's columns, keys1 for tower 1's, counters from `first`), in one launch."""
    return _on_gpu("dropout_towers_forward_gpu", _dropout_towers_forward, (x,), p, keys0, keys1, first, check=check)


def conv_layout_forward_gpu(ym, b, y, relu=True, check=True):
    """y (N, F, Ho, Wo) <- relu(ym + b) (no ReLU with relu=False), ym the GEMM output (G, F/G, N*Ho*Wo), one pass."""
    return _on_gpu("conv_layout_forward_gpu", _conv_layout_forward, (ym, b, y), relu, check=check)


def conv_layout_backward_gpu(dy, y, groups, relu=True, check=True):
    """-> d (groups, F/groups, N*Ho*Wo) = dy * (y > 0) in the GEMM's layout (dy and y NCHW), one pass."""
    return _on_gpu("conv_layout_backward_gpu", _conv_layout_backward, (dy, y), groups, relu, check=check)


def augment_gpu(src, table, shift, mean, dtype, crop, windowed, scale, first=0, n=None, check=True):
    """The network input (n, 3, crop, crop) of `dtype` from uint8 pixels and per-crop choices (see _augment)."""
    return _on_gpu("augment_gpu", lambda run, xp, *a, check: _augment(run, xp, *a, dtype, crop, windowed, scale,
                                                                       first, n, check=check),
                   (src, table, shift, mean), check=check)


def softmax_xent_forward_gpu(z, labels, check=True):
    """-> (row_loss, p, labels int32): row_loss.sum() is the mean cross-entropy of softmax(z) against labels."""
    return _on_gpu("softmax_xent_forward_gpu", _softmax_xent_forward, (z, labels), check=check)


def softmax_xent_backward_gpu(p, labels, check=True):
    """dz = (p - onehot(labels)) / N, the gradient of the mean cross-entropy."""
    return _on_gpu("softmax_xent_backward_gpu", _softmax_xent_backward, (p, labels), check=check)


def narrow_gpu(x, check=True):
    """float32 -> BF16 (uint16 bit patterns), round to nearest even; NaN stays NaN."""
    return _on_gpu("narrow_gpu", _convert, (x,), BF16, check=check)


def widen_gpu(x, check=True):
    """BF16 (uint16 bit patterns) -> float32, exact."""
    return _on_gpu("widen_gpu", _convert, (x,), np.float32, check=check)


def relu_forward_gpu(x, check=True):
    """y = x > 0 ? x : 0, NaN passing through (as the host path's maximum)."""
    return _on_gpu("relu_forward_gpu", _relu_forward, (x,), check=check)


def relu_backward_gpu(y, dy, check=True):
    """dx = dy * (y > 0), from the forward's output y."""
    return _on_gpu("relu_backward_gpu", _relu_backward, (y, dy), check=check)


def clear_cache():
    """Forget compiled modules (e.g. after editing a .cu file in a running session)."""
    _modules.clear()
    _functions.clear()
    kernels.cache_clear()
