"""The host shim: run cpnet's CUDA kernels on the CPU, from the very same source text.

Each `.cu` file, with its `typedef float T;` (or double, or bf16: bf16.cuh's struct, the bf16 stand-in with the
GPU's own round-to-nearest-even conversions) lines from `kernel_source`, goes through

    g++ -O2 -shared -fPIC -ffp-contract=off -include host_shim.h -x c++ - -o <cache>/<name>-<hash>.so

`host_shim.h` turns the CUDA keywords into plain C++ and makes `gridDim`, `blockDim`, `blockIdx`, `threadIdx`
global variables. A launch here does what the GPU does, only one thread at a time: set gridDim and blockDim,
then for every block and every thread set blockIdx and threadIdx and call the kernel. So each kernel's own index
arithmetic, grid-stride loop and bounds checks run, with a launch shape small enough (`launch_config`) that
the grid-stride loop really strides.

Libraries are cached in ``$CPNET_SHIM_DIR``, else ``$XDG_CACHE_HOME/cpnet/shim`` or ``~/.cache/cpnet/shim``,
under a name hashed from the source, the header, the compiler and its flags; each is compiled to a temporary
name and renamed into place, so concurrent processes never load a half-written file.

The `_host` functions take and return NumPy arrays, with the signatures of the `_gpu` functions.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from ..errors import CpnetError
from . import (
    KERNEL_DIR,
    BF16,
    _augment,
    _col2im,
    _conv_layout_backward,
    _conv_layout_forward,
    _convert,
    _dropout_forward,
    _im2col,
    _lrn_backward,
    _lrn_forward,
    _lrn_pool_backward,
    _lrn_pool_forward,
    _maxpool_backward,
    _maxpool_forward,
    _dropout_towers_forward,
    _relu_backward,
    _relu_forward,
    _sgd_momentum,
    _sgd_momentum_multi,
    _softmax_xent_backward,
    _softmax_xent_forward,
    compute_dtype,
    kernel_source,
    kernels,
    launch_grid,
    pack_args,
)

HEADER = KERNEL_DIR / "host_shim.h"
CXXFLAGS = ("-O2", "-shared", "-fPIC", "-ffp-contract=off", "-Wall", "-Wextra", "-x", "c++")


class ShimUnavailable(CpnetError):
    """No C++ compiler to build the host shim with."""


class _Dim3(ctypes.Structure):
    _fields_ = [("x", ctypes.c_uint), ("y", ctypes.c_uint), ("z", ctypes.c_uint)]


_launch = {"block": 32, "grid_cap": 4}
_libs: dict = {}  # (source file, dtype name) -> ctypes.CDLL
_warnings: dict = {}  # (source file, dtype name) -> compiler diagnostics of the build that made the library
_lock = threading.Lock()


def compiler() -> str:
    """The C++ compiler ($CXX or g++), or ShimUnavailable."""
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise ShimUnavailable(f"the host shim needs a C++ compiler: {cxx!r} not found (install g++ or set CXX)")
    return path


def cache_dir() -> Path:
    explicit = os.environ.get("CPNET_SHIM_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cpnet" / "shim"


def _writable_cache_dir() -> Path:
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    d = Path(tempfile.gettempdir()) / f"cpnet-shim-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def build(filename: str, dtype) -> tuple[Path, str]:
    """Compile one source for one dtype (or reuse the cached library); -> (library path, compiler diagnostics)."""
    cxx = compiler()
    dt = np.dtype(dtype)
    text = kernel_source(filename, dt)
    header = HEADER.read_text()
    key = hashlib.sha256("\0".join([cxx, " ".join(CXXFLAGS), header, text]).encode()).hexdigest()[:16]
    out_dir = _writable_cache_dir()
    lib = out_dir / f"{Path(filename).stem}-{dt.name}-{key}.so"
    log = lib.with_suffix(".log")
    if lib.exists():
        return lib, log.read_text() if log.exists() else ""
    fd, tmp = tempfile.mkstemp(prefix=lib.stem + ".", suffix=".tmp.so", dir=out_dir)
    os.close(fd)
    try:
        cmd = [cxx, *CXXFLAGS[:-2], "-include", str(HEADER), *CXXFLAGS[-2:], "-", "-o", tmp]
        proc = subprocess.run(cmd, input=text, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CpnetError(f"host shim: {cxx} failed on {filename} ({dt.name}):\n{proc.stderr.strip()}")
        fd, tmp_log = tempfile.mkstemp(prefix=lib.stem + ".", suffix=".tmp.log", dir=out_dir)
        with os.fdopen(fd, "w") as f:
            f.write(proc.stderr)
        os.replace(tmp_log, log)
        os.replace(tmp, lib)
        return lib, proc.stderr
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library(filename: str, dtype) -> ctypes.CDLL:
    """The loaded shared library for one source and dtype (built on first use, then cached)."""
    key = (filename, np.dtype(dtype).name)
    with _lock:
        lib = _libs.get(key)
        if lib is None:
            path, diagnostics = build(filename, dtype)
            lib = ctypes.CDLL(str(path))
            for k in kernels().values():
                if k.source == filename:
                    fn = getattr(lib, k.name)
                    fn.restype = None
                    fn.argtypes = [_ctype(p.kind, dtype) for p in k.params]
            _libs[key] = lib
            _warnings[key] = diagnostics
        return lib


def diagnostics(filename: str, dtype) -> str:
    """What the compiler printed while building this library ('' when it was silent)."""
    library(filename, dtype)
    return _warnings[(filename, np.dtype(dtype).name)]


def build_all():
    """Build every source for float32, float64 and bf16 (the tests call this once per session)."""
    from . import DTYPES, SOURCES

    for filename in SOURCES:
        for dt in DTYPES:
            library(filename, dt)


def _ctype(kind, dtype):
    if kind in ("ptr_T", "ptr_F", "ptr_int", "ptr_i64", "ptr_u8", "ptr_f32"):
        return ctypes.c_void_p
    if kind == "int":
        return ctypes.c_int
    if kind == "f32":
        return ctypes.c_float
    return ctypes.c_float if compute_dtype(dtype) == np.float32 else ctypes.c_double


@contextlib.contextmanager
def launch_config(block: int = 32, grid_cap: int = 4):
    """Temporarily change the host launch shape: `block` threads per block, at most `grid_cap` blocks."""
    if block < 1 or grid_cap < 1:
        raise ValueError("launch_config: block and grid_cap must be >= 1")
    old = dict(_launch)
    _launch.update(block=block, grid_cap=grid_cap)
    try:
        yield
    finally:
        _launch.update(old)


def _host_array(kernel_name):
    def check(p, a, dtype):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{kernel_name}: {p.name} must be a numpy array, got {type(a).__name__}")
        if a.dtype != dtype or not a.flags.c_contiguous:
            raise ValueError(f"{kernel_name}: {p.name} must be C-contiguous {dtype}, got {a.dtype}")
        return a

    return check


def launch(name: str, dtype, grid, block: int, packed) -> None:
    """Run kernel `name` as a <<<grid, block>>> launch would, one (block, thread) at a time.

    `grid`: blocks in x (an int or a 1-tuple) or (x, y) blocks of a 2-D grid; `block`: threads in x. `packed` is
    the argument list `pack_args` made: arrays (anything exposing the NumPy `ctypes` interface) and NumPy scalars
    of the kernel's exact types.
    """
    gx, gy = (grid, 1) if not isinstance(grid, tuple) else (grid[0], grid[1] if len(grid) > 1 else 1)
    lib = library(kernels()[name].source, dtype)
    fn = getattr(lib, name)
    cargs = [a.ctypes.data if isinstance(a, np.ndarray) else a.item() for a in packed]
    grid_dim, block_dim = _Dim3.in_dll(lib, "gridDim"), _Dim3.in_dll(lib, "blockDim")
    block_idx, thread_idx = _Dim3.in_dll(lib, "blockIdx"), _Dim3.in_dll(lib, "threadIdx")
    with _lock:  # the launch built-ins are globals of the library
        grid_dim.x, grid_dim.y, grid_dim.z = gx, gy, 1
        block_dim.x, block_dim.y, block_dim.z = block, 1, 1
        block_idx.z = thread_idx.y = thread_idx.z = 0
        for by in range(gy):
            block_idx.y = by
            for b in range(gx):
                block_idx.x = b
                for t in range(block):
                    thread_idx.x = t
                    fn(*cargs)


def _host_run(name, dtype, n, *args):
    packed = pack_args(name, dtype, args, _host_array(name))
    block = _launch["block"]
    grid = launch_grid(n, block, _launch["grid_cap"])
    if grid is not None:
        launch(name, dtype, grid, block, packed)


def im2col_host(x, kh, kw, sy, sx, ph, pw):
    return _im2col(_host_run, np, x, kh, kw, sy, sx, ph, pw)


def col2im_host(col, x_shape, kh, kw, sy, sx, ph, pw):
    return _col2im(_host_run, np, col, x_shape, kh, kw, sy, sx, ph, pw)


def maxpool_forward_host(x, ksize, stride, pad):
    return _maxpool_forward(_host_run, np, x, ksize, stride, pad)


def maxpool_backward_host(dy, argmax, x_shape, ksize, stride, pad):
    return _maxpool_backward(_host_run, np, dy, argmax, x_shape, ksize, stride, pad)


def lrn_forward_host(x, size, k, alpha_eff, beta):
    return _lrn_forward(_host_run, np, x, size, k, alpha_eff, beta)


def lrn_backward_host(x, y, scale, dy, size, alpha_eff, beta):
    return _lrn_backward(_host_run, np, x, y, scale, dy, size, alpha_eff, beta)


def lrn_pool_forward_host(x, size, k, alpha_eff, beta, ksize, stride, pad):
    return _lrn_pool_forward(_host_run, np, x, size, k, alpha_eff, beta, ksize, stride, pad)


def lrn_pool_backward_host(x, dy, off, size, k, alpha_eff, beta, ksize, stride, pad):
    return _lrn_pool_backward(_host_run, np, x, dy, off, size, k, alpha_eff, beta, ksize, stride, pad)


def sgd_momentum_host(w, g, v, momentum, wd_lr, lr):
    _sgd_momentum(_host_run, np, w, g, v, momentum, wd_lr, lr)


def dropout_forward_host(x, p, key0, key1, first=0):
    return _dropout_forward(_host_run, np, x, p, key0, key1, first)


def narrow_host(x):
    return _convert(_host_run, np, x, BF16)


def widen_host(x):
    return _convert(_host_run, np, x, np.float32)


def relu_forward_host(x):
    return _relu_forward(_host_run, np, x)


def relu_backward_host(y, dy):
    return _relu_backward(_host_run, np, y, dy)


def sgd_momentum_multi_host(ws, gs, vs, decays, momentum, wd_lr, lr, cache=None):
    _sgd_momentum_multi(_host_run, np, ws, gs, vs, decays, momentum, wd_lr, lr, cache)


def dropout_towers_forward_host(x, p, keys0, keys1, first=0):
    return _dropout_towers_forward(_host_run, np, x, p, keys0, keys1, first)


def softmax_xent_forward_host(z, labels):
    return _softmax_xent_forward(_host_run, np, z, labels)


def softmax_xent_backward_host(p, labels):
    return _softmax_xent_backward(_host_run, np, p, labels)


def conv_layout_forward_host(ym, b, y, relu=True):
    return _conv_layout_forward(_host_run, np, ym, b, y, relu)


def conv_layout_backward_host(dy, y, groups, relu=True):
    return _conv_layout_backward(_host_run, np, dy, y, groups, relu)


def augment_host(src, table, shift, mean, dtype, crop, windowed, scale, first=0, n=None):
    return _augment(_host_run, np, src, table, shift, mean, dtype, crop, windowed, scale, first, n)
