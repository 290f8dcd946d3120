"""cpnet side by side with PyTorch: the same network, the same weights, the same batch, the same device.

    python bench/compare_torch.py --model alexnet-small --batch-size 128        # CPU: NumPy vs PyTorch CPU
    CPNET_DEVICE=gpu python bench/compare_torch.py --model alexnet --batch-size 128   # GPU: CuPy vs cuDNN

PyTorch is optional (cpnet never imports it). The PyTorch network is built from cpnet's config:

    conv1          one full convolution with both towers' kernels stacked (each tower's conv1 sees all 3 inputs)
    conv2/4/5      groups=2 (each tower sees only its own channels)
    conv3, FC      full (they read both towers), the towers' weights stacked along the outputs
    LRN            applied to each tower's half of the channels separately, as cpnet's towers do; torch's
                   LocalResponseNorm divides alpha by `size`, so the 'sum' convention passes alpha * size
    pooling, ReLU/tanh, dropout as in cpnet (LRN before or after the pool as the conventions say)

First it copies cpnet's initial weights into that network and checks that one training step (dropout off)
gives the same loss, gradients and updated weights within float32 tolerance. Then it times full training steps
(forward, backward, momentum SGD with the paper's weight decay, dropout on in both), alternating cpnet and
PyTorch, on one random batch. On a GPU it does so twice: FP32 with TF32 off everywhere, and TF32 on in both
(cuDNN and cuBLAS for PyTorch; cuBLAS through `backend.set_tf32` for cpnet). It prints each time and
cpnet / PyTorch.

Then the PyTorch variants a user would pick (`--variants`, each on top of the one before it):

    eager          the literal port above (LRN: chunk/cat and F.local_response_norm on each tower's half)
    lrn1           LRN as one call over (2N, C, H, W), as cpnet's fused path does
    channels_last  + the net and the batch in channels_last memory format
    fused_sgd      + torch.optim.SGD(fused=True) (skipped with the reason where this torch cannot fuse on the device)
    compile        + torch.compile of the net (under --compile-limit seconds; skipped with the reason otherwise)

each in every precision of `--precisions`: fp32 (TF32 off), tf32 (TF32 on in both; a GPU only), bf16 (torch's
bf16 autocast against cpnet's --precision bf16: float32 master weights, bf16 activations, bf16 GEMMs with float32
accumulation; on the CPU cpnet emulates that rounding in NumPy). Each variant is first checked on one step (dropout off) against cpnet: loss, gradients and momentum
updates within a tolerance for its precision (fp32 1e-2, tf32 5e-2, bf16 2e-1; max |cpnet - torch| / max |torch|
per parameter), then timed alternately with cpnet: median and p10/p90 over --steps (>= 20; fewer only on the CPU
with --allow-few-steps). The table names the strongest variant per precision and cpnet / it. `--launches` adds
each side's host time to issue one step (no synchronisation inside) and, on a GPU, the CUDA kernels that one step
launches (counted with torch.profiler, which sees CuPy's kernels as well through CUPTI).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from collections import OrderedDict
from contextlib import contextmanager, nullcontext

import numpy as np

try:
    import cpnet  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cpnet import backend  # noqa: E402
from cpnet.model import PRESETS, build_model, make_config  # noqa: E402
from cpnet.optim import MomentumSGD  # noqa: E402

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")  # per tower; fc8 lives on tower 0 only


class TowerLRN(nn.Module):
    """Cross-channel LRN within each tower's half of the channels (zero-padded at each tower's edges)."""

    def __init__(self, size, k, alpha, beta, alpha_convention, one_call=False):
        super().__init__()
        self.size, self.k, self.beta, self.one_call = size, k, beta, one_call
        self.alpha = alpha * size if alpha_convention == "sum" else alpha  # torch uses alpha / size

    def forward(self, x):
        if self.one_call:  # (N, 2C, H, W) -> (2N, C, H, W): each tower's half is an image of its own
            n, c2, h, w = x.shape
            y = F.local_response_norm(x.reshape(2 * n, c2 // 2, h, w), self.size, self.alpha, self.beta, self.k)
            return y.reshape(n, c2, h, w)
        return torch.cat([F.local_response_norm(h, self.size, self.alpha, self.beta, self.k)
                          for h in x.chunk(2, dim=1)], dim=1)


def build_torch_net(cfg, lrn_one_call=False) -> nn.Sequential:
    """The cpnet config `cfg` as one PyTorch stream (towers as stacked channels, grouped where they are separate).

    lrn_one_call: each LRN as one call over (2N, C, H, W) instead of one per tower's half."""
    act = nn.ReLU if cfg.activation == "relu" else nn.Tanh
    pk, ps = cfg.pool
    groups = (1, 2, 1, 2, 2)
    layers = []
    c_in = 3
    for i, (f, k, s, p) in enumerate(cfg.conv):
        n = i + 1
        layers += [(f"conv{n}", nn.Conv2d(c_in, 2 * f, k, stride=s, padding=p, groups=groups[i])), (f"act{n}", act())]
        if n in (1, 2):
            pool = [(f"pool{n}", nn.MaxPool2d(pk, ps))]
            if cfg.lrn is not None:
                lrn = [(f"lrn{n}", TowerLRN(**cfg.lrn, one_call=lrn_one_call))]
                pool = lrn + pool if cfg.lrn_position == "before_pool" else pool + lrn
            layers += pool
        c_in = 2 * f
    layers += [("pool5", nn.MaxPool2d(pk, ps)), ("flat", nn.Flatten())]
    fan6 = c_in * _pool5_side(cfg) ** 2
    widths = [fan6, 2 * cfg.fc[0], 2 * cfg.fc[1]]
    for j, name in enumerate(("fc6", "fc7")):
        layers += [(name, nn.Linear(widths[j], widths[j + 1])), (f"act{6 + j}", act()),
                   (f"drop{6 + j}", nn.Dropout(cfg.dropout))]
    layers += [("fc8", nn.Linear(widths[2], cfg.num_classes))]
    return nn.Sequential(OrderedDict(layers))


def _pool5_side(cfg):
    from cpnet.model import feature_shapes

    return feature_shapes(cfg)["pool5"][1]


def copy_weights(net: nn.Sequential, host_params: dict):
    """cpnet's parameters ('t0.conv1.W', ...) into the PyTorch net: tower 0's outputs first, then tower 1's."""
    mods = dict(net.named_children())
    with torch.no_grad():
        for name in LAYERS:
            for key, attr in (("W", "weight"), ("b", "bias")):
                both = np.concatenate([host_params[f"t0.{name}.{key}"], host_params[f"t1.{name}.{key}"]], axis=0)
                getattr(mods[name], attr).copy_(torch.from_numpy(np.ascontiguousarray(both)))
        mods["fc8"].weight.copy_(torch.from_numpy(np.ascontiguousarray(host_params["fc8.W"])))
        mods["fc8"].bias.copy_(torch.from_numpy(np.ascontiguousarray(host_params["fc8.b"])))


def split_by_tower(net: nn.Sequential, which="grad") -> dict:
    """The PyTorch net's gradients (or weights, which='data') under cpnet's parameter names."""
    mods = dict(net.named_children())
    out = {}
    for name in LAYERS + ("fc8",):
        for key, attr in (("W", "weight"), ("b", "bias")):
            t = getattr(getattr(mods[name], attr), which).detach().cpu().numpy()
            if name == "fc8":
                out[f"fc8.{key}"] = t
            else:
                half = t.shape[0] // 2
                out[f"t0.{name}.{key}"], out[f"t1.{name}.{key}"] = t[:half], t[half:]
    return out


def torch_sgd(net, cfg_lr, momentum=0.9, weight_decay=5e-4, fused=False):
    """torch's SGD set up to match cpnet's MomentumSGD: weight decay on weights only.

    torch keeps v' = m v + g + wd w and steps w -= lr v'; cpnet keeps v = m v - lr (g + wd w) and steps w += v.
    With a constant learning rate v = -lr v', so the two give the same weights.
    """
    decay = [p for n, p in net.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in net.named_parameters() if not n.endswith("weight")]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                           lr=cfg_lr, momentum=momentum, **({"fused": True} if fused else {}))


# ---- the variants a PyTorch user would pick ---------------------------------------------------------------------
VARIANTS = OrderedDict([  # each on top of the one before it
    ("eager", {}),
    ("lrn1", {"lrn_one_call": True}),
    ("channels_last", {"lrn_one_call": True, "channels_last": True}),
    ("fused_sgd", {"lrn_one_call": True, "channels_last": True, "fused_sgd": True}),
    ("compile", {"lrn_one_call": True, "channels_last": True, "fused_sgd": True, "compile": True}),
])
PRECISIONS = ("fp32", "tf32", "bf16")
# of the one-step check (max |cpnet - torch| / max |torch| per parameter). fp32: see check_one_step; tf32 keeps
# 10 bits of each product's inputs; bf16 keeps 8 (torch's autocast against cpnet's fp32: 7.5e-2 measured on
# alexnet-tiny; against cpnet's bf16 not measured yet, no torch where it was built); a wrong layer (an LRN over the wrong channels, a missing bias) is off by O(1) and still fails.
TOLERANCE = {"fp32": 1e-2, "tf32": 5e-2, "bf16": 2e-1}


class Skipped(Exception):
    """A variant this torch or device cannot run; the message says why."""


@contextmanager
def time_limit(seconds, what):
    """Raise Skipped when the block runs longer than `seconds` (SIGALRM; the main thread only; 0: no limit).

    Also after the block where the code inside caught the alarm's exception and went on (torch.compile can fall
    back to eager code when its compilation fails): what ran then is not what the block was to time."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return
    fired = []
    message = f"{what} took more than {seconds:g} s (--compile-limit)"

    def on_alarm(signum, frame):
        fired.append(True)
        raise Skipped(message)

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    if fired:
        raise Skipped(message)


def precision_unavailable(precision, tdev):
    """Why `precision` cannot run on `tdev` (None where it can)."""
    if precision not in PRECISIONS:
        return f"unknown precision {precision!r} (expected {', '.join(PRECISIONS)})"
    if precision == "tf32" and tdev != "cuda":
        return "TF32 is a tensor-core mode of NVIDIA GPUs; on the CPU it would be fp32 again"
    return None


class TorchSide:
    """The PyTorch net of `cfg` as one `variant` in one `precision`, with its optimizer and one training step.

    Raises Skipped (with the reason) where the variant cannot run here: SGD(fused=True) unsupported on the
    device, torch.compile failing or running past `compile_limit` seconds (the compile happens in the first
    `step`, which is why the first step runs under the limit).
    """

    def __init__(self, cfg, host_params, variant="eager", precision="fp32", tdev="cpu", lr=0.01, dtype=None,
                 compile_limit=0):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r} (expected {', '.join(VARIANTS)})")
        why = precision_unavailable(precision, tdev)
        if why:
            raise Skipped(why)
        opts = VARIANTS[variant]
        self.variant, self.precision, self.tdev, self.lr = variant, precision, tdev, lr
        self.channels_last = bool(opts.get("channels_last"))
        self.compile_limit = compile_limit
        net = build_torch_net(cfg, lrn_one_call=bool(opts.get("lrn_one_call")))
        net = net.to(device=tdev, dtype=dtype or torch.float32)
        copy_weights(net, host_params)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        try:
            self.opt = torch_sgd(net, lr, fused=bool(opts.get("fused_sgd")))
        except (RuntimeError, ValueError, TypeError) as e:
            raise Skipped(f"SGD(fused=True) is not available for {tdev} in torch {torch.__version__}: "
                          f"{str(e).splitlines()[0]}") from None
        self.forward = net
        self.compiled = bool(opts.get("compile"))
        if self.compiled:
            try:
                self.forward = torch.compile(net)
            except Exception as e:  # noqa: BLE001 - any failure to set up compilation skips the variant
                raise Skipped(f"torch.compile is not available: {type(e).__name__}: {str(e).splitlines()[0]}") from None
        self._stepped = False

    def input(self, x):
        """The host batch `x` (NumPy) as this side's input tensor."""
        t = torch.from_numpy(x).to(self.tdev)
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.tdev, dtype=torch.bfloat16)
        return nullcontext()

    def step(self, xt, yt, update=True):
        """One training step (forward, backward, and with `update` the SGD step); returns the loss tensor."""
        first = self.compiled and not self._stepped
        with (time_limit(self.compile_limit, "torch.compile") if first else nullcontext()):
            try:
                with self._autocast():
                    out = self.forward(xt)
                loss = F.cross_entropy(out.float() if out.dtype == torch.bfloat16 else out, yt)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
            except Skipped:
                raise
            except Exception as e:  # noqa: BLE001 - a compile error skips the variant with its reason
                if not first:
                    raise
                if isinstance(e.__cause__ or e.__context__, Skipped) or "(--compile-limit)" in str(e):
                    raise Skipped(f"torch.compile took more than {self.compile_limit:g} s (--compile-limit)") from None
                raise Skipped(f"torch.compile failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}") from None
        self._stepped = True
        if update:
            self.opt.step()
        return loss


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def check_one_step(preset="alexnet-tiny", batch_size=4, num_classes=10, tdev="cpu", seed=0, lr=0.01, tol=None,
                   dtype=np.float32, conventions="paper", variant="eager", precision="fp32", compile_limit=0,
                   vs_float64=True) -> dict:
    """One training step on both (dropout off): loss, every gradient and every momentum update compared.

    Errors are max |cpnet - torch| / max |torch| per parameter. `tol` is 1e-8 in float64, where the two agree
    to rounding (about 1e-15), and 1e-2 in float32: there the two sides' different summation orders can flip a
    near-tie in a max pool, which sends one window's gradient to another input, and conv1's gradient then
    differs by up to a few 1e-3 on some batches (1e-6 on most). `variant` and `precision` choose the PyTorch
    side (TorchSide; TOLERANCE gives the default `tol` of tf32 and bf16), and cpnet runs in the same precision
    (`cpnet_precision`: bf16 builds cpnet's model in bf16; tf32 is the caller's set_tf32); raises Skipped where
    that variant cannot run here.
    Returns {'loss_cpnet', 'loss_torch', 'loss_rel_err', 'grad_rel_err': {name: err},
    'update_rel_err': {name: err}, 'max_grad_rel_err', 'max_update_rel_err', 'tol', 'ok'}.
    """
    dtype = np.dtype(dtype)
    if dtype != np.float32 and precision != "fp32":
        raise ValueError(f"precision {precision} needs dtype float32")
    tol = tol if tol is not None else (TOLERANCE[precision] if dtype == np.float32 else 1e-8)
    tdt = torch.float32 if dtype == np.float32 else torch.float64
    cfg = make_config(preset, num_classes=num_classes, dropout=0.0, seed=seed, conventions=conventions)
    model = build_model(cfg, dtype=dtype, precision=_model_precision(precision))
    host0 = {k: v.copy() for k, v in model.host_params().items()}  # host_params may alias the live arrays
    side = TorchSide(cfg, host0, variant, precision, tdev, lr, dtype=tdt, compile_limit=compile_limit)
    net = side.net
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((batch_size, 3, cfg.crop, cfg.crop)).astype(dtype)
    y = rng.integers(0, num_classes, size=batch_size)

    opt = MomentumSGD(model, lr=lr)
    model.set_step(0)
    loss_c, _ = model.loss(backend.to_device(x, model.devices[0]), y)
    model.loss_backward()
    grads_c = {k: backend.to_host(v) for k, v in model.grads().items()}
    opt.step()
    vel_c = {k: backend.to_host(v) for k, v in opt.velocity.items()}

    topt = side.opt
    net.train()
    loss_t = side.step(side.input(x), torch.from_numpy(y).to(tdev), update=False)
    grads_t = split_by_tower(net, "grad")
    topt.step()
    for p in net.parameters():  # torch's buffer v' relates to cpnet's velocity v as v = -lr v'
        p.grad = topt.state[p]["momentum_buffer"] * (-lr)
    vel_t = split_by_tower(net, "grad")

    g_err = {k: _rel_err(grads_c[k], grads_t[k]) for k in grads_t}
    ref_err = None
    if dtype != np.float64 and vs_float64:  # which side is off: both against cpnet's float64 step on the same weights and batch
        ref = build_model(cfg, placement=[backend.HOST, backend.HOST], dtype=np.float64)
        ref.set_params({k: v.astype(np.float64) for k, v in host0.items()})
        ref.set_step(0)
        ref.loss(x.astype(np.float64), y)
        ref.loss_backward()
        g64 = {k: backend.to_host(v) for k, v in ref.grads().items()}
        ref_err = {"cpnet": max(_rel_err(grads_c[k], g64[k]) for k in grads_t),
                   "torch": max(_rel_err(grads_t[k], g64[k]) for k in grads_t)}
    w_err = {k: _rel_err(vel_c[k], vel_t[k]) for k in vel_t}
    lc, lt = float(backend.to_host(loss_c)), float(loss_t.item())
    res = {"loss_cpnet": lc, "loss_torch": lt, "loss_rel_err": abs(lc - lt) / abs(lt),
           "grad_rel_err": g_err, "update_rel_err": w_err,
           "max_grad_rel_err": max(g_err.values()), "max_update_rel_err": max(w_err.values()), "tol": tol,
           "dtype": dtype.name, "grad_rel_err_vs_float64": ref_err, "variant": variant, "precision": precision}
    res["ok"] = bool(res["loss_rel_err"] < tol and res["max_grad_rel_err"] < tol and res["max_update_rel_err"] < tol)
    return res


# ---- timing --------------------------------------------------------------------------------------------------------
def _torch_timer(tdev):
    import time

    class T:
        def __enter__(self):
            if tdev == "cuda":
                torch.cuda.synchronize()
                self.s, self.e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                self.s.record()
            else:
                self.t0 = time.perf_counter()
            return self

        def __exit__(self, *exc):
            if tdev == "cuda":
                self.e.record()
                self.e.synchronize()
                self.ms = self.s.elapsed_time(self.e)
            else:
                self.ms = (time.perf_counter() - self.t0) * 1e3
            return False

    return T()


def set_tf32(on: bool):
    backend.set_tf32(on)  # cpnet's GEMMs (a no-op on the host)
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    torch.set_float32_matmul_precision("high" if on else "highest")


def _stats(v, batch_size):
    v = np.asarray(v, np.float64)
    med = float(np.median(v))
    return {"ms_mean": float(np.mean(v)), "ms_median": med, "ms_min": float(np.min(v)),
            "ms_p10": float(np.percentile(v, 10)), "ms_p90": float(np.percentile(v, 90)), "steps": int(v.size),
            "images_per_s": batch_size / (med * 1e-3)}


def time_both(preset, batch_size, steps, warmup, num_classes, tdev, seed=0, lr=0.01, cpnet_threads=None,
              variant="eager", precision="fp32", compile_limit=0) -> dict:
    """Alternating full training steps of cpnet and PyTorch (`variant` in `precision`) on one batch.

    Per framework: mean, median, min, p10 and p90 ms and images/s at the median; `ratio` is cpnet / PyTorch by
    median. cpnet's steps run under its own host BLAS limit (`cpnet_threads`, default: what `cpnet train`
    picks), as a user's training would; PyTorch keeps its own thread settings. cpnet runs in the precision the
    caller set (set_tf32; bf16: cpnet's bf16 model). Raises Skipped where the variant cannot run here."""
    n_threads = cpnet_threads if cpnet_threads is not None else backend.default_host_threads()
    cfg = make_config(preset, num_classes=num_classes, seed=seed)
    model = build_model(cfg, precision=_model_precision(precision))
    opt = MomentumSGD(model, lr=lr)
    side = TorchSide(cfg, model.host_params(), variant, precision, tdev, lr, compile_limit=compile_limit)
    side.net.train()
    rng = np.random.default_rng(seed + 2)
    x = rng.standard_normal((batch_size, 3, cfg.crop, cfg.crop), dtype=np.float32)
    y = rng.integers(0, num_classes, size=batch_size)
    xc, yc = backend.to_device(x, model.devices[0]), backend.to_device(y, model.devices[0])
    xt, yt = side.input(x), torch.from_numpy(y).to(tdev)

    def cp_step(i):
        model.set_step(i)
        with backend.host_threads(n_threads), backend.Timer(model.devices) as t:
            model.loss(xc, yc)
            model.loss_backward()
            opt.step()
        return t.ms

    def th_step(_):
        with _torch_timer(tdev) as t:
            side.step(xt, yt)
        return t.ms

    times = {"cpnet": [], "torch": []}
    try:
        for i in range(max(warmup, 1 if side.compiled else 0) + steps):  # a compiled net compiles in its first step
            a, b = cp_step(i), th_step(i)
            if i >= max(warmup, 1 if side.compiled else 0):
                times["cpnet"].append(a)
                times["torch"].append(b)
    finally:
        model.clear()
    out = {k: _stats(v, batch_size) for k, v in times.items()}
    out["ratio"] = out["cpnet"]["ms_median"] / out["torch"]["ms_median"]  # cpnet / PyTorch, by median step time
    out["cpnet_blas_threads"] = n_threads
    out["cpnet_tower_threads"] = model._pool is not None
    return out


def device_event_names(prof) -> list:
    """Names of the device-side (CUDA) records of a finished torch.profiler run: kernels, memcpy, memset.

    From kineto's results (every record CUPTI took, CuPy's kernels as well) where this torch exposes them,
    else from the profiler's function events."""
    cuda = torch.autograd.DeviceType.CUDA
    try:
        return [e.name() for e in prof.profiler.kineto_results.events() if e.device_type() == cuda]
    except AttributeError:
        return [e.name for e in prof.events() if e.device_type == cuda]


def launches(preset, batch_size, num_classes, tdev, variant="eager", precision="fp32", seed=0, lr=0.01,
             repeats=5, compile_limit=0) -> dict:
    """Per side: host ms to issue one training step (median of `repeats`, the device synchronised before and
    not inside) and, on a GPU, the CUDA kernels and memcpy/memset operations one step runs, counted with
    torch.profiler (CUPTI records every kernel of the process, CuPy's too). Kernel counts are None on the CPU.
    The host time is an upper bound where a step waits on the device inside (e.g. a full launch queue)."""
    cfg = make_config(preset, num_classes=num_classes, seed=seed)
    model = build_model(cfg, precision=_model_precision(precision))
    opt = MomentumSGD(model, lr=lr)
    side = TorchSide(cfg, model.host_params(), variant, precision, tdev, lr, compile_limit=compile_limit)
    rng = np.random.default_rng(seed + 3)
    x = rng.standard_normal((batch_size, 3, cfg.crop, cfg.crop), dtype=np.float32)
    y = rng.integers(0, num_classes, size=batch_size)
    xc, yc = backend.to_device(x, model.devices[0]), backend.to_device(y, model.devices[0])
    xt, yt = side.input(x), torch.from_numpy(y).to(tdev)

    def sync():
        for d in model.devices:
            d.synchronize()
        if tdev == "cuda":
            torch.cuda.synchronize()

    def cp_issue(i=0):
        model.set_step(i)
        model.loss(xc, yc)
        model.loss_backward()
        opt.step()

    def th_issue(i=0):
        side.step(xt, yt)

    out = {"variant": variant, "precision": precision}
    try:
        for name, fn in (("cpnet", cp_issue), ("torch", th_issue)):
            fn(0)  # warm: kernels compiled, memory pooled (and torch.compile done)
            sync()
            host = []
            for i in range(repeats):
                sync()
                t0 = time.perf_counter()
                fn(i + 1)
                host.append((time.perf_counter() - t0) * 1e3)
                sync()
            r = {"host_ms_median": float(np.median(host)), "kernels": None, "memops": None}
            if tdev == "cuda":
                from torch.profiler import ProfilerActivity, profile

                sync()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    fn(repeats + 1)
                    sync()
                names = device_event_names(prof)
                mem = [n for n in names if n.lower().startswith(("memcpy", "memset"))]
                r["kernels"], r["memops"] = len(names) - len(mem), len(mem)
            out[name] = r
    finally:
        model.clear()
    return out


def _cpnet_mode(precision, gpu):
    """The cpnet precision set beside a PyTorch precision: the same one (bf16 on the CPU: cpnet's emulation)."""
    return precision


def _model_precision(precision):
    """The `precision` cpnet's model is built with: bf16 for bf16; fp32 and tf32 build the same float32 model."""
    return "bf16" if precision == "bf16" else "fp32"


def best_per_precision(variants: dict) -> dict:
    """{precision: {'variant', 'torch_ms_median', 'cpnet_ms_median', 'ratio'}} for the fastest PyTorch variant by
    median among those that ran and passed their check (a variant whose check failed is not a baseline)."""
    best = {}
    for prec, row in variants.items():
        ok = {v: r for v, r in row.items()
              if r.get("timing") and (r.get("check") is None or r["check"]["ok"])}
        if not ok:
            continue
        v = min(ok, key=lambda k: ok[k]["timing"]["torch"]["ms_median"])
        t = ok[v]["timing"]
        best[prec] = {"variant": v, "torch_ms_median": t["torch"]["ms_median"],
                      "cpnet_ms_median": t["cpnet"]["ms_median"], "ratio": t["ratio"],
                      "cpnet_precision": ok[v]["cpnet_precision"]}
    return best


def _csv(value, allowed, flag, p):
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        p.error(f"{flag} {value!r}: expected a comma-separated list of {', '.join(allowed)}")
    return items


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="preset [default: alexnet on a GPU, alexnet-small on the CPU]")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (>= 20 unless --allow-few-steps)")
    p.add_argument("--allow-few-steps", action="store_true",
                   help="the CPU only: allow --steps below 20 (a quick look; p10/p90 of few steps mean little)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--classes", type=int, default=None, help="[default: 1000 for alexnet, 10 otherwise]")
    p.add_argument("--check-batch", type=int, default=8, help="batch of the equality check")
    p.add_argument("--check-seed", type=int, default=1,
                   help="weights and batch of the equality check [default 1: with seed 0 a max-pool near-tie in "
                        "alexnet's batch of 8 sends one window's float32 gradient to another pixel than float64 "
                        "does, which moves conv1's gradient by 1e-2 on the CPU and the GPU alike]")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"PyTorch variants to check and time [default: {','.join(VARIANTS)}]")
    p.add_argument("--precisions", default=",".join(PRECISIONS),
                   help="fp32, tf32 (GPU only; skipped with the reason on the CPU), bf16 [default: all three]")
    p.add_argument("--compile-limit", type=float, default=120.0,
                   help="seconds torch.compile may take (its first step), per use; past it the variant is skipped")
    p.add_argument("--launches", action="store_true",
                   help="also the host ms to issue one step and (GPU) the kernels one step launches: cpnet and the "
                        "strongest PyTorch variant per precision")
    p.add_argument("--no-check", action="store_true", help="skip the one-step equality checks")
    p.add_argument("--no-time", action="store_true", help="only the equality checks")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads [default: torch's own]")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    if a.batch_size < 1 or a.steps < 1 or a.warmup < 0 or a.check_batch < 1:
        p.error("--batch-size, --steps and --check-batch must be >= 1, --warmup >= 0")
    variants = _csv(a.variants, list(VARIANTS), "--variants", p)
    precisions = _csv(a.precisions, list(PRECISIONS), "--precisions", p)

    gpu = backend.use_gpu()
    tdev = "cuda" if gpu else "cpu"
    if a.steps < 20 and not a.no_time and (gpu or not a.allow_few_steps):
        p.error(f"--steps {a.steps}: expected at least 20 (p10/p90 need them)"
                + ("" if gpu else "; on the CPU --allow-few-steps allows fewer"))
    if gpu and not torch.cuda.is_available():
        p.error("cpnet runs on a GPU but this torch has no CUDA: set CPNET_DEVICE=cpu or install a CUDA torch")
    preset = a.model or ("alexnet" if gpu else "alexnet-small")
    if preset not in PRESETS:
        p.error(f"--model {preset!r}: expected one of {', '.join(PRESETS)}")
    classes = a.classes or (1000 if preset == "alexnet" else 10)
    if a.threads:
        torch.set_num_threads(a.threads)
    if gpu:
        torch.backends.cudnn.benchmark = True
    set_tf32(False)

    res = {"model": preset, "batch_size": a.batch_size, "device": tdev, "torch": torch.__version__,
           "numpy": np.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "platform": platform.platform(), "gpu": backend.gpu_name(0) if gpu else None, "steps": a.steps}
    print(f"cpnet vs PyTorch {torch.__version__}: {preset}, batch {a.batch_size}, device {tdev}"
          + (f" ({res['gpu']})" if gpu else f" ({os.cpu_count()} CPUs, torch threads {torch.get_num_threads()})"))
    failed = False
    if not a.no_check:  # the literal port in float64 (agreement to rounding) and float32
        res["check"] = {}
        for dt in (np.float64, np.float32):
            chk = check_one_step(preset, a.check_batch, classes, tdev, seed=a.check_seed, dtype=dt)
            res["check"][chk["dtype"]] = chk
            worst = max(chk["grad_rel_err"], key=chk["grad_rel_err"].get)
            print(f"one-step check, {chk['dtype']} (batch {a.check_batch}, seed {a.check_seed}, dropout off): loss {chk['loss_cpnet']:.6f} "
                  f"vs {chk['loss_torch']:.6f}; max rel. error: gradients {chk['max_grad_rel_err']:.1e} ({worst}), "
                  f"momentum update {chk['max_update_rel_err']:.1e}; tolerance {chk['tol']:.0e} -> "
                  f"{'OK' if chk['ok'] else 'MISMATCH'}")
            if chk["grad_rel_err_vs_float64"]:
                r64 = chk["grad_rel_err_vs_float64"]
                print(f"  each against cpnet's float64 step (host): max gradient rel. error cpnet {r64['cpnet']:.1e}, "
                      f"PyTorch {r64['torch']:.1e}")
            failed = failed or not chk["ok"]

    # the variants, precision by precision: check, then time alternately with cpnet. torch.compile (the slow
    # one to set up) comes last, after the launch counts, so a time limit around the whole run cuts it first.
    res["variants"] = {prec: {} for prec in precisions}
    first = [v for v in variants if v != "compile"]
    for prec in precisions:
        failed = _run_variants(a, res, prec, first, preset, classes, tdev, gpu) or failed
    res["best"] = best_per_precision(res["variants"])
    if a.launches and res["best"]:
        _launches(a, res, preset, classes, tdev)
    if "compile" in variants:
        for prec in precisions:
            failed = _run_variants(a, res, prec, ["compile"], preset, classes, tdev, gpu) or failed
        res["variants"] = {prec: {v: res["variants"][prec][v] for v in variants} for prec in precisions}
        res["best"] = best_per_precision(res["variants"])
    if not a.no_time:
        _print_table(res, precisions, variants, a.steps)
    save(res, a.json_out)
    if failed:
        print("\nFAILED: cpnet and PyTorch disagree on one training step", file=sys.stderr)
        return 1
    return 0


def _run_variants(a, res, prec, variants, preset, classes, tdev, gpu):
    """Check and time `variants` in precision `prec` into res['variants'][prec]; True if a check failed."""
    row = res["variants"][prec]
    cp_mode = _cpnet_mode(prec, gpu)
    set_tf32(cp_mode == "tf32" or prec == "tf32")
    failed = False
    try:
        for v in variants:
            r = row[v] = {"check": None, "timing": None, "skipped": None, "cpnet_precision": cp_mode}
            label = f"{prec:<4} {v:<13}"
            try:
                if not a.no_check:
                    chk = check_one_step(preset, a.check_batch, classes, tdev, seed=a.check_seed, variant=v,
                                         precision=prec, compile_limit=a.compile_limit, vs_float64=False)
                    r["check"] = chk
                    print(f"{label} check: loss rel. err {chk['loss_rel_err']:.1e}, gradients "
                          f"{chk['max_grad_rel_err']:.1e}, updates {chk['max_update_rel_err']:.1e} (tolerance "
                          f"{chk['tol']:.0e}, against cpnet {cp_mode}) -> {'OK' if chk['ok'] else 'MISMATCH'}",
                          flush=True)
                    failed = failed or not chk["ok"]
                if not a.no_time:
                    t = r["timing"] = time_both(preset, a.batch_size, a.steps, a.warmup, classes, tdev,
                                                variant=v, precision=prec, compile_limit=a.compile_limit)
                    print(f"{label} time: torch {t['torch']['ms_median']:.2f} ms (p10 {t['torch']['ms_p10']:.2f}, "
                          f"p90 {t['torch']['ms_p90']:.2f}), cpnet {cp_mode} {t['cpnet']['ms_median']:.2f} ms "
                          f"(p10 {t['cpnet']['ms_p10']:.2f}, p90 {t['cpnet']['ms_p90']:.2f}); "
                          f"cpnet / torch = {t['ratio']:.2f}", flush=True)
            except Skipped as e:
                r["skipped"] = str(e)
                print(f"{label} skipped: {e}", flush=True)
            save(res, a.json_out)  # after each variant: a run stopped by a time limit keeps what it measured
    finally:
        set_tf32(False)
    return failed


def _launches(a, res, preset, classes, tdev):
    """Host time and kernels per step: cpnet and the strongest PyTorch variant so far, per precision."""
    res["launches"] = {}
    for prec, b in res["best"].items():
        set_tf32(b["cpnet_precision"] == "tf32" or prec == "tf32")
        try:
            r = res["launches"][prec] = launches(preset, a.batch_size, classes, tdev, b["variant"], prec,
                                                 compile_limit=a.compile_limit)
        except Skipped as e:
            print(f"launches {prec}: skipped: {e}")
            continue
        finally:
            set_tf32(False)
        for side in ("cpnet", "torch"):
            k = r[side]["kernels"]
            what = (f"{k} kernels + {r[side]['memops']} memcpy/memset" if k is not None
                    else "kernels not counted on the CPU")
            name = f"cpnet {b['cpnet_precision']}" if side == "cpnet" else f"torch {b['variant']}"
            print(f"launches {prec} {name}: host {r[side]['host_ms_median']:.2f} ms to issue a step; {what}")
        save(res, a.json_out)


def save(res, path):
    """`res` as JSON at `path` (None: nowhere), atomically: a temporary name, flushed, then renamed."""
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _print_table(res, precisions, variants, steps):
    print(f"\nmedian ms per step (p10-p90) over {steps} steps, cpnet timed alternately with each variant; "
          "* strongest PyTorch variant of its precision")
    print(f"{'precision':<9} {'variant':<13} {'torch ms':>22} {'cpnet ms':>22} {'cpnet/torch':>11}  check")
    for prec in precisions:
        best = res["best"].get(prec, {}).get("variant")
        for v in variants:
            r = res["variants"][prec][v]
            if r["skipped"]:
                print(f"{prec:<9} {v:<13} skipped: {r['skipped']}")
                continue
            t = r["timing"]
            ck = "-" if r["check"] is None else ("OK" if r["check"]["ok"] else "MISMATCH")
            fmt = lambda d: f"{d['ms_median']:.2f} ({d['ms_p10']:.2f}-{d['ms_p90']:.2f})"  # noqa: E731
            print(f"{prec:<9} {v + ('*' if v == best else ''):<13} {fmt(t['torch']):>22} "
                  f"{(r['cpnet_precision'] + ' ' + fmt(t['cpnet'])):>22} {t['ratio']:>11.2f}  {ck}")
    for prec, b in res["best"].items():
        print(f"strongest PyTorch in {prec}: {b['variant']} {b['torch_ms_median']:.2f} ms; cpnet "
              f"{b['cpnet_precision']} {b['cpnet_ms_median']:.2f} ms; cpnet / it = {b['ratio']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
