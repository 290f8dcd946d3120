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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections import OrderedDict
import sys

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

    def __init__(self, size, k, alpha, beta, alpha_convention):
        super().__init__()
        self.size, self.k, self.beta = size, k, beta
        self.alpha = alpha * size if alpha_convention == "sum" else alpha  # torch uses alpha / size

    def forward(self, x):
        return torch.cat([F.local_response_norm(h, self.size, self.alpha, self.beta, self.k)
                          for h in x.chunk(2, dim=1)], dim=1)


def build_torch_net(cfg) -> nn.Sequential:
    """The cpnet config `cfg` as one PyTorch stream (towers as stacked channels, grouped where they are separate)."""
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
                lrn = [(f"lrn{n}", TowerLRN(**cfg.lrn))]
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


def torch_sgd(net, cfg_lr, momentum=0.9, weight_decay=5e-4):
    """torch's SGD set up to match cpnet's MomentumSGD: weight decay on weights only.

    torch keeps v' = m v + g + wd w and steps w -= lr v'; cpnet keeps v = m v - lr (g + wd w) and steps w += v.
    With a constant learning rate v = -lr v', so the two give the same weights.
    """
    decay = [p for n, p in net.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in net.named_parameters() if not n.endswith("weight")]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                           lr=cfg_lr, momentum=momentum)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def check_one_step(preset="alexnet-tiny", batch_size=4, num_classes=10, tdev="cpu", seed=0, lr=0.01, tol=None,
                   dtype=np.float32, conventions="paper") -> dict:
    """One training step on both (dropout off): loss, every gradient and every momentum update compared.

    Errors are max |cpnet - torch| / max |torch| per parameter. `tol` is 1e-8 in float64, where the two agree
    to rounding (about 1e-15), and 1e-2 in float32: there the two sides' different summation orders can flip a
    near-tie in a max pool, which sends one window's gradient to another input, and conv1's gradient then
    differs by up to a few 1e-3 on some batches (1e-6 on most).
    Returns {'loss_cpnet', 'loss_torch', 'loss_rel_err', 'grad_rel_err': {name: err},
    'update_rel_err': {name: err}, 'max_grad_rel_err', 'max_update_rel_err', 'tol', 'ok'}.
    """
    dtype = np.dtype(dtype)
    tol = tol if tol is not None else (1e-2 if dtype == np.float32 else 1e-8)
    tdt = torch.float32 if dtype == np.float32 else torch.float64
    cfg = make_config(preset, num_classes=num_classes, dropout=0.0, seed=seed, conventions=conventions)
    model = build_model(cfg, dtype=dtype)
    host0 = {k: v.copy() for k, v in model.host_params().items()}  # host_params may alias the live arrays
    net = build_torch_net(cfg).to(device=tdev, dtype=tdt)
    copy_weights(net, host0)
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

    topt = torch_sgd(net, lr)
    net.train()
    out = net(torch.from_numpy(x).to(tdev))
    loss_t = F.cross_entropy(out, torch.from_numpy(y).to(tdev))
    topt.zero_grad()
    loss_t.backward()
    grads_t = split_by_tower(net, "grad")
    topt.step()
    for p in net.parameters():  # torch's buffer v' relates to cpnet's velocity v as v = -lr v'
        p.grad = topt.state[p]["momentum_buffer"] * (-lr)
    vel_t = split_by_tower(net, "grad")

    g_err = {k: _rel_err(grads_c[k], grads_t[k]) for k in grads_t}
    ref_err = None
    if dtype != np.float64:  # which side is off: both against cpnet's float64 step on the same weights and batch
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
           "dtype": dtype.name, "grad_rel_err_vs_float64": ref_err}
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


def time_both(preset, batch_size, steps, warmup, num_classes, tdev, seed=0, lr=0.01, cpnet_threads=None) -> dict:
    """Alternating full training steps of cpnet and PyTorch on one batch; per-framework mean/median ms.

    cpnet's steps run under its own host BLAS limit (`cpnet_threads`, default: what `cpnet train` picks), as a
    user's training would; PyTorch keeps its own thread settings."""
    n_threads = cpnet_threads if cpnet_threads is not None else backend.default_host_threads()
    cfg = make_config(preset, num_classes=num_classes, seed=seed)
    model = build_model(cfg)
    opt = MomentumSGD(model, lr=lr)
    net = build_torch_net(cfg).to(tdev)
    copy_weights(net, model.host_params())
    net.train()
    topt = torch_sgd(net, lr)
    rng = np.random.default_rng(seed + 2)
    x = rng.standard_normal((batch_size, 3, cfg.crop, cfg.crop), dtype=np.float32)
    y = rng.integers(0, num_classes, size=batch_size)
    xc, yc = backend.to_device(x, model.devices[0]), backend.to_device(y, model.devices[0])
    xt, yt = torch.from_numpy(x).to(tdev), torch.from_numpy(y).to(tdev)

    def cp_step(i):
        model.set_step(i)
        with backend.host_threads(n_threads), backend.Timer(model.devices) as t:
            model.loss(xc, yc)
            model.loss_backward()
            opt.step()
        return t.ms

    def th_step(_):
        with _torch_timer(tdev) as t:
            loss = F.cross_entropy(net(xt), yt)
            topt.zero_grad(set_to_none=True)
            loss.backward()
            topt.step()
        return t.ms

    times = {"cpnet": [], "torch": []}
    for i in range(warmup + steps):
        a, b = cp_step(i), th_step(i)
        if i >= warmup:
            times["cpnet"].append(a)
            times["torch"].append(b)
    model.clear()
    out = {}
    for k, v in times.items():
        out[k] = {"ms_mean": float(np.mean(v)), "ms_median": float(np.median(v)), "ms_min": float(np.min(v)),
                  "images_per_s": batch_size / (float(np.median(v)) * 1e-3)}
    out["ratio"] = out["cpnet"]["ms_median"] / out["torch"]["ms_median"]  # cpnet / PyTorch, by median step time
    out["cpnet_blas_threads"] = n_threads
    out["cpnet_tower_threads"] = model._pool is not None
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="preset [default: alexnet on a GPU, alexnet-small on the CPU]")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--classes", type=int, default=None, help="[default: 1000 for alexnet, 10 otherwise]")
    p.add_argument("--check-batch", type=int, default=8, help="batch of the equality check")
    p.add_argument("--check-seed", type=int, default=1,
                   help="weights and batch of the equality check [default 1: with seed 0 a max-pool near-tie in "
                        "alexnet's batch of 8 sends one window's float32 gradient to another pixel than float64 "
                        "does, which moves conv1's gradient by 1e-2 on the CPU and the GPU alike]")
    p.add_argument("--no-check", action="store_true", help="skip the one-step equality check")
    p.add_argument("--no-time", action="store_true", help="only the equality check")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads [default: torch's own]")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    if a.batch_size < 1 or a.steps < 1 or a.warmup < 0 or a.check_batch < 1:
        p.error("--batch-size, --steps and --check-batch must be >= 1, --warmup >= 0")

    gpu = backend.use_gpu()
    tdev = "cuda" if gpu else "cpu"
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
           "platform": platform.platform(), "gpu": backend.gpu_name(0) if gpu else None}
    print(f"cpnet vs PyTorch {torch.__version__}: {preset}, batch {a.batch_size}, device {tdev}"
          + (f" ({res['gpu']})" if gpu else f" ({os.cpu_count()} CPUs, torch threads {torch.get_num_threads()})"))
    failed = False
    if not a.no_check:
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
    if not a.no_time:
        modes = [("fp32", False)] + ([("tf32", True)] if gpu else [])
        res["timing"] = {}
        for mode, tf32 in modes:
            set_tf32(tf32)
            r = time_both(preset, a.batch_size, a.steps, a.warmup, classes, tdev)
            res["timing"][mode] = r
            note = " (TF32 on in both)" if tf32 else " (TF32 off)" if gpu else ""
            print(f"{mode}{note}: cpnet {r['cpnet']['ms_median']:.2f} ms/step ({r['cpnet']['images_per_s']:.1f} img/s), "
                  f"PyTorch {r['torch']['ms_median']:.2f} ms/step ({r['torch']['images_per_s']:.1f} img/s); "
                  f"cpnet / PyTorch = {r['ratio']:.2f}")
        set_tf32(False)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(res, f, indent=1)
    if failed:
        print("\nFAILED: cpnet and PyTorch disagree on one training step", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
