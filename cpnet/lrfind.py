"""The learning-rate range test (Smith 2017, "Cyclical learning rates"; fast.ai's and Lightning's lr finder).

Train from the run's own initialisation for `steps` batches while the learning rate grows geometrically from
`lr_min` to `lr_max`, recording the loss of each batch (and an exponentially smoothed, bias-corrected copy of it,
averaging over about a tenth of the sweep: beta = 1 - 10/steps, between 0.5 and 0.98);
stop early once the smoothed loss exceeds `diverge` times its lowest value or turns non-finite. The loss falls
fastest somewhat below the rate at which it is lowest, and past that rate training becomes unstable;
`suggest` returns a tenth of the rate at the lowest smoothed loss (fast.ai's "minimum / 10" rule), a safe
starting rate for momentum SGD. Nothing is saved but what the caller writes: the model is thrown away.
"""

from __future__ import annotations

import math
from dataclasses import replace

from .backend import default_host_threads, default_loader_workers, host_threads, to_host
from .config import TrainConfig
from .errors import CpnetError, flag_names


def lr_at(i: int, steps: int, lr_min: float, lr_max: float) -> float:
    """The rate of step i of `steps` (0-based): lr_min at the first, lr_max at the last, geometric between."""
    return lr_min * (lr_max / lr_min) ** (i / max(steps - 1, 1))


def smooth(losses, beta=0.98):
    """Exponential moving average with the bias correction of Adam (so early values are not pulled to 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def suggest(lrs, smoothed) -> float | None:
    """A tenth of the rate at the lowest smoothed loss (None when there is no finite loss)."""
    finite = [(s, lr) for s, lr in zip(smoothed, lrs) if math.isfinite(s)]
    if not finite:
        return None
    return min(finite)[1] / 10


def default_beta(steps: int) -> float:
    """The smoothing that averages over about a tenth of the sweep (0.9 at 100 steps). fast.ai's fixed 0.98
    averages over about 50 batches, most of a short sweep: on Fashion-MNIST's 60-step sweep its minimum sat at
    the last rate instead of at the 0.05 where the batch losses were lowest."""
    return min(0.98, max(0.5, 1 - 10 / steps))


def range_test(cfg: TrainConfig, lr_min=1e-5, lr_max=1.0, steps=100, beta=None, diverge=4.0, placement=None,
               on_step=None, explicit=None) -> dict:
    """Run the range test with the model, data and augmentation `cfg` describes (its lr, epochs, schedule and
    out are not used; `explicit`: the flags given, the others take the data's defaults as in training).
    Returns {lrs, losses, smoothed, suggested, stopped_early, config}."""
    from .train import Trainer, _start, build_loaders, build_model_and_optimizer, check_options, data_defaults

    if not 0 < lr_min < lr_max or not math.isfinite(lr_max):
        raise CpnetError(f"--find-lr range {lr_min}..{lr_max}: expected 0 < min < max")
    if steps < 2:
        raise CpnetError(f"--find-lr steps {steps}: expected at least 2")
    beta = default_beta(steps) if beta is None else beta
    if cfg.workers is None:
        cfg = replace(cfg, workers=default_loader_workers(placement))
    threads = cfg.threads if cfg.threads is not None else default_host_threads(cfg.workers)
    with flag_names(), host_threads(threads):  # the settings' errors from below name the flags
        data = check_options(cfg)
        cfg, net_cfg, state = _start(data_defaults(replace(cfg, validate=False), data.stored, explicit), data, [])
        model, opt = build_model_and_optimizer(cfg, net_cfg, state, placement=placement)
        loader, _ = build_loaders(cfg, net_cfg, data)
        lrs, losses, smoothed, best = [], [], [], math.inf
        stopped = False
        with Trainer(cfg, net_cfg, state, data, model, opt, loader) as tr:
            epoch = 0
            while len(lrs) < steps and not stopped:
                for x, y in loader.epoch(epoch):
                    i = len(lrs)
                    if i >= steps:
                        break
                    opt.lr = lr_at(i, steps, lr_min, lr_max)
                    loss = float(to_host(tr.forward_backward(x, y))[0]) / len(y)
                    tr.iteration += 1
                    tr.update()
                    lrs.append(opt.lr)
                    losses.append(loss)
                    s = smooth(losses, beta)[-1] if math.isfinite(loss) else math.inf
                    smoothed.append(s)
                    best = min(best, s)
                    if on_step:
                        on_step(dict(step=i + 1, steps=steps, lr=opt.lr, loss=loss, smoothed=s))
                    if not math.isfinite(s) or s > diverge * best:
                        stopped = True
                        break
                epoch += 1
    return dict(lrs=lrs, losses=losses, smoothed=smoothed, suggested=suggest(lrs, smoothed), stopped_early=stopped,
                beta=beta, config=cfg)


def figure(result, title="", size=(640, 380)):
    """Loss against learning rate (log axis): each batch's loss, the smoothed curve, the suggested rate marked."""
    from .viz import PALETTE, Mark, Series, chart

    lrs, smoothed = result["lrs"], result["smoothed"]
    finite = [s for s in smoothed if math.isfinite(s)]
    first = finite[0] if finite else 1.0
    hi = first * 1.5  # the divergence at the end would flatten everything else
    keep = lambda v: v if math.isfinite(v) and v <= hi else None  # noqa: E731
    batch, smooth_ = [keep(v) for v in result["losses"]], [keep(v) for v in smoothed]
    shown = [v for v in batch + smooth_ if v is not None]
    lo = min(shown) if shown else 0.0
    sug = result["suggested"]
    if sug:
        title = f"{title}: suggested lr {sug:.2g}" if title else f"suggested lr {sug:.2g}"
    return chart([Series(lrs, batch, "batch loss", (190, 190, 190), width=1),
                  Series(lrs, smooth_, "smoothed loss", PALETTE[0])],
                 size=size, title=title, xlabel="learning rate (log scale)", ylabel="training loss",
                 marks=[Mark(sug, "x")] if sug else [], log_x=True, ylim=(lo, hi))
