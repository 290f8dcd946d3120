"""Top-1 / top-5 error on the centre crop or the paper's 10 views (§4.1: four corners and the centre, and their
horizontal reflections, averaging the softmax), and prediction for single images."""

from __future__ import annotations

import math

import numpy as np

from . import ops
from .backend import get_array_module, to_device, to_host


softmax = ops.softmax


def topk_hits(scores, labels, k=5):
    """(top-1 hits, top-k hits) as device scalars; k is capped at the number of classes."""
    xp = get_array_module(scores)
    k = min(k, scores.shape[1])
    idx = xp.argsort(-scores, axis=1, kind="stable")[:, :k] if xp is np else xp.argsort(-scores, axis=1)[:, :k]
    hit = idx == labels[:, None]
    return hit[:, 0].sum(), hit.any(axis=1).sum()


def evaluate(model, loader, progress=None) -> dict:
    """Loss (cross-entropy of the view-averaged softmax), top-1 and top-5 error over every image of `loader`."""
    dev = model.devices[0]
    xp = dev.xp
    loss_sum = top1 = top5 = 0.0
    n = 0
    for x, y in loader:
        b, v = x.shape[:2]
        logits = model.forward(x.reshape((b * v,) + x.shape[2:]), train=False)
        with dev:
            p = softmax(logits.astype(xp.float64)).reshape(b, v, -1).mean(axis=1)
            yd = to_device(y, dev)
            loss_sum += float(-xp.log(xp.maximum(p[xp.arange(b), yd], 1e-300)).sum())
            h1, h5 = topk_hits(p, yd)
            top1 += float(h1)
            top5 += float(h5)
        n += b
        model.clear()
        if progress:
            progress(n)
    if n == 0:
        return {"n": 0, "loss": math.nan, "top1": math.nan, "top5": math.nan}
    return {"n": n, "loss": loss_sum / n, "top1": 1 - top1 / n, "top5": 1 - top5 / n}


def predict_proba(model, x) -> np.ndarray:
    """Softmax probabilities (host array) for a batch of prepared crops (N, V, 3, C, C), averaged over views."""
    b, v = x.shape[:2]
    logits = model.forward(x.reshape((b * v,) + x.shape[2:]), train=False)
    with model.devices[0]:
        p = softmax(logits.astype(model.devices[0].xp.float64)).reshape(b, v, -1).mean(axis=1)
    model.clear()
    return to_host(p)
