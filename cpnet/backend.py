"""The array backend: the only module in cpnet that imports cupy.

`CPNET_DEVICE` chooses where arrays live:

- ``auto`` (default): CuPy when it imports and sees a CUDA device, else NumPy on the host.
- ``cpu``: NumPy on the host, even when a GPU is present.
- ``gpu``: CuPy; a clear error when CuPy or a GPU is missing.

A `Device` is a tower's home: the host or one GPU. ``with device:`` makes it current (a no-op on the host), and
arrays cross between devices only through `transfer`, which counts the bytes it moves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .errors import CpnetError, OptionError

_MODES = ("auto", "cpu", "gpu")
_cupy = None  # the cupy module once imported; False when it cannot be used
_transfer_stats = {"bytes": 0, "count": 0}


def _load_cupy():
    """Import cupy once; return the module, or None when it is missing or sees no GPU."""
    global _cupy
    if _cupy is None:
        try:
            import cupy

            _cupy = cupy if cupy.is_available() else False
        except Exception:  # ImportError, or a CUDA driver/runtime error at import
            _cupy = False
    return _cupy or None


def requested_mode() -> str:
    """The value of CPNET_DEVICE, checked."""
    mode = os.environ.get("CPNET_DEVICE", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise CpnetError(f"CPNET_DEVICE={mode!r}: expected one of {', '.join(_MODES)}")
    return mode


def use_gpu() -> bool:
    """True when computation should run on CuPy arrays (per CPNET_DEVICE and what is installed)."""
    mode = requested_mode()
    if mode == "cpu":
        return False
    cp = _load_cupy()
    if mode == "gpu" and cp is None:
        raise CpnetError(
            "CPNET_DEVICE=gpu but no CUDA GPU is usable: install the CuPy wheel for your CUDA "
            "(pip install cupy-cuda12x or cupy-cuda13x) on a machine with an NVIDIA GPU, or set CPNET_DEVICE=cpu"
        )
    return cp is not None


def cupy_module():
    """The cupy module (for GPU-only code paths and tests); an error when it is not usable."""
    cp = _load_cupy()
    if cp is None:
        raise CpnetError("CuPy with a CUDA GPU is not available on this machine")
    return cp


def gpu_count() -> int:
    """Number of CUDA devices CuPy can use (0 without CuPy or a GPU). Ignores CPNET_DEVICE."""
    cp = _load_cupy()
    if cp is None:
        return 0
    try:
        return int(cp.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


@dataclass(frozen=True)
class Device:
    """A place where a tower's arrays live: the host (``kind='host'``) or GPU ``index``.

    ``with device:`` makes a GPU current for allocations and kernel launches; on the host it does nothing.
    """

    kind: str = "host"
    index: int = 0

    def __post_init__(self):
        if self.kind not in ("host", "gpu"):
            raise ValueError(f"Device kind must be 'host' or 'gpu', got {self.kind!r}")

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"

    @property
    def xp(self):
        """The array module for this device: numpy on the host, cupy on a GPU."""
        return cupy_module() if self.is_gpu else np

    def __enter__(self):
        if self.is_gpu:
            ctx = cupy_module().cuda.Device(self.index)
            ctx.__enter__()
            _gpu_context_stack.append(ctx)
        return self

    def __exit__(self, *exc):
        if self.is_gpu:
            _gpu_context_stack.pop().__exit__(*exc)
        return False

    def synchronize(self):
        """Wait for all work queued on this device (no-op on the host)."""
        if self.is_gpu:
            cupy_module().cuda.Device(self.index).synchronize()

    def __str__(self):
        return "host" if not self.is_gpu else f"gpu:{self.index}"


_gpu_context_stack: list = []
HOST = Device("host", 0)


def parse_device(spec: str) -> Device:
    """'host'/'cpu' -> HOST, 'gpu' or 'gpu:N' -> that GPU."""
    s = spec.strip().lower()
    if s in ("host", "cpu"):
        return HOST
    if s == "gpu":
        return Device("gpu", 0)
    if s.startswith("gpu:") and s[4:].isdigit():
        return Device("gpu", int(s[4:]))
    raise CpnetError(f"device {spec!r}: expected 'host', 'gpu' or 'gpu:N'")


def default_placement(towers: int = 2) -> list[Device]:
    """Tower i -> device: all on the host without a GPU, all on GPU 0 with one, tower i on GPU i with enough."""
    if not use_gpu():
        return [HOST] * towers
    n = gpu_count()
    if n >= towers:
        return [Device("gpu", i) for i in range(towers)]
    return [Device("gpu", 0)] * towers


def is_gpu_array(x) -> bool:
    if not _cupy and not type(x).__module__.startswith("cupy"):
        return False
    cp = _load_cupy()
    return cp is not None and isinstance(x, cp.ndarray)


def get_array_module(*arrays):
    """numpy or cupy, whichever the arrays belong to (numpy for plain numbers and numpy arrays)."""
    for a in arrays:
        if is_gpu_array(a):
            return _cupy
    return np


def device_of(x) -> Device:
    """The Device an array lives on."""
    if is_gpu_array(x):
        return Device("gpu", int(x.device.id))
    return HOST


def to_host(x) -> np.ndarray:
    """A NumPy copy (or the array itself when it is already on the host)."""
    if is_gpu_array(x):
        return _cupy.asnumpy(x)
    return np.asarray(x)


def to_device(x, device: Device):
    """Put a host or device array on `device` (no copy when it is already there)."""
    if not device.is_gpu:
        return to_host(x)
    cp = cupy_module()
    with cp.cuda.Device(device.index):
        return cp.asarray(x)


def transfer(x, device: Device):
    """Move an activation or gradient between towers, counting the bytes that really move.

    A no-op (and no bytes counted) when `x` already lives on `device`, as when both towers share one GPU or the host.
    """
    if device_of(x) == device:
        return x
    _transfer_stats["bytes"] += int(x.nbytes)
    _transfer_stats["count"] += 1
    return to_device(x, device)


def transfer_stats() -> dict:
    """Bytes and number of arrays moved by `transfer` since the last reset."""
    return dict(_transfer_stats)


def reset_transfer_stats():
    _transfer_stats["bytes"] = 0
    _transfer_stats["count"] = 0


def nccl_module():
    """CuPy's NCCL bindings (cupy.cuda.nccl), or None when CuPy or its NCCL is missing (cpnet.dist uses them)."""
    if _load_cupy() is None:
        return None
    try:
        from cupy.cuda import nccl

        return nccl if getattr(nccl, "available", True) else None
    except Exception:  # ImportError, or a CuPy built without NCCL
        return None


def data_ptr(a) -> int:
    """The address of an array's first element (a CuPy device pointer or a NumPy host pointer)."""
    return int(a.data.ptr) if is_gpu_array(a) else int(a.ctypes.data)


class SideStream:
    """A second CUDA stream on `device` for the gradient sums, so that they run while the compute stream goes on
    with backward; ordered against the compute (current) stream by events. On the host every call is a no-op
    and `ptr` is 0 (the legacy default stream)."""

    def __init__(self, device: "Device"):
        self.device, self.stream = device, None
        if device.is_gpu:
            cp = cupy_module()
            with cp.cuda.Device(device.index):
                self.stream = cp.cuda.Stream(non_blocking=True)

    @property
    def ptr(self) -> int:
        return 0 if self.stream is None else int(self.stream.ptr)

    def wait_for_compute(self):
        """Work queued here from now on starts after the work queued so far on the device's current stream."""
        if self.stream is not None:
            cp = cupy_module()
            with cp.cuda.Device(self.device.index):
                self.stream.wait_event(cp.cuda.get_current_stream().record())

    def join_compute(self):
        """Work queued on the device's current stream from now on starts after the work queued here so far."""
        if self.stream is not None:
            cp = cupy_module()
            with cp.cuda.Device(self.device.index):
                cp.cuda.get_current_stream().wait_event(self.stream.record())


def synchronize_all():
    """Wait for every GPU (no-op on the host); benchmarks call this before reading a clock."""
    for i in range(gpu_count()):
        cupy_module().cuda.Device(i).synchronize()


def raw_module(code: str, options: tuple = ()):
    """Compile CUDA source with cupy.RawModule on the current device (kernels/ caches the result)."""
    return cupy_module().RawModule(code=code, options=tuple(options))


def memory_pool_bytes() -> dict:
    """Per-GPU bytes held by CuPy's default memory pool ({} on the host)."""
    cp = _load_cupy()
    if cp is None:
        return {}
    pool = cp.get_default_memory_pool()
    return {"used": int(pool.used_bytes()), "total": int(pool.total_bytes())}


# ---- timing and memory for `cpnet bench` ------------------------------------------------------------------------
class Timer:
    """Milliseconds of the work queued on `devices` inside ``with Timer(devices) as t: ...`` (then read ``t.ms``).

    On entry every device is synchronised, so earlier work is not counted. On one GPU the interval is measured
    with a pair of CUDA events on its current stream; on the host, or when the work spans several GPUs, with
    ``time.perf_counter`` after synchronising them all.
    """

    def __init__(self, devices=(HOST,)):
        devs = [devices] if isinstance(devices, Device) else list(devices)
        self.devices = list(dict.fromkeys(devs)) or [HOST]
        gpus = [d for d in self.devices if d.is_gpu]
        self._event_dev = gpus[0] if len(gpus) == 1 and len(self.devices) == 1 else None
        self.ms = 0.0

    def _sync(self):
        for d in self.devices:
            d.synchronize()

    def __enter__(self):
        import time

        self._sync()
        if self._event_dev is not None:
            cp = cupy_module()
            with cp.cuda.Device(self._event_dev.index):
                self._start, self._end = cp.cuda.Event(), cp.cuda.Event()
                self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import time

        if self._event_dev is not None:
            cp = cupy_module()
            with cp.cuda.Device(self._event_dev.index):
                self._end.record()
                self._end.synchronize()
                self.ms = float(cp.cuda.get_elapsed_time(self._start, self._end))
        else:
            self._sync()
            self.ms = (time.perf_counter() - self._t0) * 1e3
        return False


def memory_pool_bytes_per_device() -> dict:
    """{'gpu:i': {'used': bytes, 'total': bytes}} from CuPy's default pool on every GPU ({} on the host).

    The pool keeps what it has allocated until freed explicitly, so 'total' after a run is its peak footprint.
    """
    cp = _load_cupy()
    if cp is None:
        return {}
    pool = cp.get_default_memory_pool()
    out = {}
    for i in range(gpu_count()):
        with cp.cuda.Device(i):
            out[f"gpu:{i}"] = {"used": int(pool.used_bytes()), "total": int(pool.total_bytes())}
    return out


def gpu_name(index: int = 0) -> str:
    """The name CUDA reports for GPU `index` (e.g. 'NVIDIA H100 80GB HBM3')."""
    name = cupy_module().cuda.runtime.getDeviceProperties(index)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def _cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_share(ranks: int = 1) -> int:
    """This process's share of the CPUs when `ranks` processes of one job run on the node (at least 1)."""
    return max(1, _cpu_count() // max(1, int(ranks)))


def default_host_threads(workers: int = 0, ranks: int = 1) -> int:
    """BLAS threads for the host path: this process's share of the CPUs (`ranks` processes of one job share the
    node: cpnet.dist's node-local size) less its loader worker processes, shared by the two towers that run in
    two threads (model.AlexNet): half of them each, at least 1.

    OpenBLAS threads spin while they wait: with more runnable threads than cores a GEMM can run a hundred times
    slower (docs/PERFORMANCE.md). `--threads` overrides this.
    """
    return max(1, (cpu_share(ranks) - max(0, int(workers))) // 2)


def default_loader_workers(devices=None, ranks: int = 1) -> int:
    """Loader worker processes when --workers is not given: 0 when the towers run on the host (`devices`, default
    `default_placement(2)`), where the CPUs run their BLAS threads, and with a GPU this process's share of the
    CPUs (`ranks` processes of one job on the node) less two (the training process and one spare), at most 12.

    Measured on a 16-CPU H200 host (docs/PERFORMANCE.md): the in-process loader makes about 2,000 images/s at
    S=256/C=227, 8 workers about 7,900 and 12 about 11,800, against a step of about 6,000 (FP32) and 10,000 (TF32).
    """
    if not any(d.is_gpu for d in (devices if devices is not None else default_placement(2))):
        return 0
    return max(0, min(12, cpu_share(ranks) - 2))


def host_threads(n: int | None):
    """A context manager limiting the host BLAS (OpenBLAS, MKL, ...) to `n` threads; None leaves it as it is."""
    from contextlib import nullcontext

    if n is None:
        return nullcontext()
    if int(n) < 1:
        raise OptionError("threads", n, "expected at least 1")
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=int(n), user_api="blas")


def enable_tf32():
    """Let cuBLAS use TF32 tensor cores for float32 GEMMs (opt-in; about 10 bits of mantissa in the products).

    Sets CUPY_TF32=1 in the environment, which CuPy reads at its first float32 matrix product; when CuPy is
    already in use the switch is made at run time (`set_tf32`). On the host nothing else changes.
    """
    os.environ["CUPY_TF32"] = "1"
    if _cupy:
        set_tf32(True)


def set_tf32(on: bool):
    """Switch TF32 for float32 GEMMs on or off now, on a GPU (CuPy's per-dtype compute type); no-op on the host.

    Benchmarks use this to time FP32 and TF32 in one process (bench/compare_torch.py).
    """
    cp = _load_cupy()
    if cp is None:
        return
    try:
        from cupy._core import _routines_linalg as linalg

        kind = linalg.COMPUTE_TYPE_TF32 if on else linalg.COMPUTE_TYPE_DEFAULT
        linalg.set_compute_type(np.dtype(np.float32), kind)
    except (ImportError, AttributeError) as e:  # a CuPy without this internal switch
        raise CpnetError(f"this CuPy ({cp.__version__}) cannot switch TF32 at run time: set CUPY_TF32="
                         f"{int(bool(on))} before starting ({e})") from e


# ---- the batch upload: pinned host buffers, a side stream -------------------------------------------------------
# From pageable memory a batch goes to the GPU through the driver's staging buffer, in a copy the host waits for.
# `upload` copies it into a page-locked (pinned) host buffer and has the GPU fetch it from there on a side stream:
# the host goes on as soon as the transfer is queued, the transfer runs beside the kernels still queued from the
# previous step, and the compute stream waits for it (an event) before the first kernel that reads the batch.
# Two slots per GPU take turns, each a pinned buffer and a device buffer of its own (kept, not returned to the
# memory pool, so no kernel of the compute stream can still be reading memory the side stream writes):
#   - the pinned buffer is refilled only after the transfer that last read it has finished (a host wait on its
#     event, normally long passed);
#   - the device buffer is rewritten only after the compute stream's work queued up to the next upload (by then
#     every read of that batch is queued) has finished: the side stream waits on an event recorded then.
# So a batch handed out stays valid until the next-but-one upload to its GPU.
PINNED_UPLOAD = True  # False: every upload through to_device (pageable memory, the compute stream), as before


class _Slot:
    __slots__ = ("pinned", "pinned_bytes", "dev", "copied", "released")

    def __init__(self):
        self.pinned, self.pinned_bytes, self.dev, self.copied, self.released = None, 0, None, None, None


class _Uploads:
    def __init__(self, cp, index):
        self.cp, self.index = cp, index
        with cp.cuda.Device(index):
            self.stream = cp.cuda.Stream(non_blocking=True)
        self.slots = [_Slot(), _Slot()]
        self.turn = 0

    def put(self, x: np.ndarray):
        cp = self.cp
        slot, other = self.slots[self.turn], self.slots[1 - self.turn]
        self.turn = 1 - self.turn
        with cp.cuda.Device(self.index):
            compute = cp.cuda.get_current_stream()
            if slot.copied is not None:
                slot.copied.synchronize()  # the pinned buffer's last transfer
            if slot.pinned_bytes < x.nbytes:
                slot.pinned, slot.pinned_bytes = cp.cuda.alloc_pinned_memory(x.nbytes), x.nbytes
            if slot.dev is None or slot.dev.nbytes < x.nbytes:
                slot.dev = cp.empty((x.nbytes,), dtype=np.uint8)  # from the compute stream's pool
                slot.released = compute.record()  # whatever that memory held before is done with after this
            host = np.frombuffer(slot.pinned, dtype=x.dtype, count=x.size).reshape(x.shape)
            np.copyto(host, x)
            out = slot.dev[:x.nbytes].view(x.dtype).reshape(x.shape)
            self.stream.wait_event(slot.released)
            out.set(host, stream=self.stream)
            slot.copied = self.stream.record()
            if other.dev is not None:
                other.released = compute.record()  # every read of the previous batch is queued before this
            compute.wait_event(slot.copied)
        return out


def gpu_augment(devices) -> bool:
    """Whether loaders feeding a model on `devices` should hand over raw batches (uint8 pixels and the per-crop
    choices, augmented on the GPU by augment.cu) instead of float32 crops: where one of the devices is a GPU,
    unless CPNET_GPU_AUGMENT=0 (the float32 batches, through the same pinned upload)."""
    flag = os.environ.get("CPNET_GPU_AUGMENT", "").strip()
    if flag not in ("", "0", "1"):
        raise CpnetError(f"CPNET_GPU_AUGMENT={flag!r}: expected 0 or 1 (unset: augment on the GPU when there is one)")
    return flag != "0" and any(d.is_gpu for d in devices)


_uploads: dict = {}  # GPU index -> _Uploads
_upload_stats = {"bytes": 0, "count": 0}  # host batches `upload` sent to a GPU (either way)


def upload(x, device: Device):
    """The batch `x` (a host array) on `device`, as to_device gives it, through a pinned buffer on a side stream
    when the device is a GPU (PINNED_UPLOAD); ready for every kernel queued after the call, valid until the
    next-but-one upload to that GPU."""
    if device.is_gpu and isinstance(x, np.ndarray) and not is_gpu_array(x):
        _upload_stats["bytes"] += int(x.nbytes)
        _upload_stats["count"] += 1
    if not (device.is_gpu and PINNED_UPLOAD and isinstance(x, np.ndarray) and not is_gpu_array(x) and x.size):
        return to_device(x, device)
    cp = cupy_module()
    up = _uploads.get(device.index)
    if up is None or up.cp is not cp:
        up = _uploads[device.index] = _Uploads(cp, device.index)
    return up.put(np.ascontiguousarray(x))


def upload_stats() -> dict:
    """Bytes and number of host batches `upload` sent to a GPU since the last reset (the input path's traffic)."""
    return dict(_upload_stats)


def reset_upload_stats():
    _upload_stats["bytes"] = 0
    _upload_stats["count"] = 0


# ---- bf16 products (--precision bf16) -----------------------------------------------------------------------------
# cublasGemmEx with bf16 inputs (A, B) and float32 accumulation, the output float32 or bf16, called through CuPy's
# cuBLAS bindings (cupy_backends.cuda.libs.cublas.gemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda,
# B, Btype, ldb, beta, C, Ctype, ldc, computeType, algo), pointers as integers, alpha/beta host pointers). CuPy's
# own matmul has no bfloat16 dtype to take this route.
CUDA_R_32F, CUDA_R_16BF = 0, 14  # cudaDataType_t
CUBLAS_COMPUTE_32F = 68  # cublasComputeType_t
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
_ONE, _ZERO = np.ones(1, np.float32), np.zeros(1, np.float32)


def gemm_layout(a):
    """How cuBLAS (column-major) reads a 2-D row-major operand without a copy: (op, ld), or None when the strides
    allow neither. A C-ordered array (row stride ld) is, read column-major, its own transpose with that ld: op N
    in the swapped product C^T = B^T A^T; a transposed view (column stride ld) is op T."""
    r, c = (int(s) for s in a.shape)
    it = int(a.itemsize)
    # the stride of an axis of length 1 is never used (and arbitrary in NumPy and CuPy)
    s0 = int(a.strides[0]) if r > 1 else None
    s1 = int(a.strides[1]) if c > 1 else None
    for op, inner, outer, width in ((CUBLAS_OP_N, s1, s0, c), (CUBLAS_OP_T, s0, s1, r)):
        if inner not in (it, None):
            continue
        if outer is None:
            return op, max(1, width)
        if outer > 0 and outer % it == 0 and outer // it >= max(1, width):
            return op, outer // it
    return None


def gemm_bf16_call(gemm_ex, handle, a, b, out, ptr):
    """out = a @ b through `gemm_ex` (the signature of cublas.gemmEx): a (m, k) and b (k, n) bf16 (uint16) views,
    out (m, n) C-contiguous float32 or bf16. Row-major C = A B is column-major C^T = B^T A^T: cuBLAS gets B's
    buffer first. Operands whose strides cuBLAS cannot read are made contiguous first. Returns out."""
    m, k = (int(s) for s in a.shape)
    n = int(b.shape[1])
    if m == 0 or n == 0:
        return out
    if k == 0:
        out.fill(0)
        return out
    la, lb = gemm_layout(a), gemm_layout(b)
    if la is None:
        a = a.copy()
        la = gemm_layout(a)
    if lb is None:
        b = b.copy()
        lb = gemm_layout(b)
    ctype = CUDA_R_16BF if out.dtype == np.uint16 else CUDA_R_32F
    gemm_ex(handle, lb[0], la[0], n, m, k, int(_ONE.ctypes.data), ptr(b), CUDA_R_16BF, lb[1], ptr(a), CUDA_R_16BF,
            la[1], int(_ZERO.ctypes.data), ptr(out), ctype, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
    return out


def gemm_bf16(a, b, out):
    """out = a @ b on the current GPU: bf16 (uint16) a, b; float32 accumulation; out float32 or bf16 (see
    gemm_bf16_call)."""
    cp = cupy_module()
    from cupy_backends.cuda.libs import cublas

    if out.dtype not in (np.float32, np.uint16) or not out.flags.c_contiguous:
        raise CpnetError(f"gemm_bf16: out must be a C-contiguous float32 or bf16 array, got {out.dtype}")
    return gemm_bf16_call(cublas.gemmEx, cp.cuda.Device().cublas_handle, a, b, out, lambda x: int(x.data.ptr))


def check_bf16(device: Device):
    """An error naming what is missing where `device` cannot run the bf16 path: on a GPU cuBLAS's bf16 GEMM needs
    compute capability 8.0 or newer (Ampere, Hopper, ...) and a CuPy whose cuBLAS bindings have gemmEx. The host
    always can (emulated in NumPy)."""
    if not device.is_gpu:
        return
    cp = cupy_module()
    cc = str(cp.cuda.Device(device.index).compute_capability)
    if int(cc) < 80:
        raise CpnetError(f"--precision bf16: {device} ({gpu_name(device.index)}) has compute capability "
                         f"{cc[:-1]}.{cc[-1]}; bf16 GEMMs need 8.0 or newer (use --precision tf32 or fp32)")
    try:
        from cupy_backends.cuda.libs import cublas

        cublas.gemmEx  # noqa: B018 - the binding the bf16 products call
    except (ImportError, AttributeError) as e:
        raise CpnetError(f"--precision bf16: this CuPy ({cp.__version__}) has no cuBLAS gemmEx binding ({e})") \
            from e
