"""Top-1 / top-5 error on the centre crop or the paper's 10 views (§4.1: four corners and the centre, and their
horizontal reflections, averaging the softmax), and prediction for single images."""

from __future__ import annotations

import math

import numpy as np

from . import ops
from .backend import get_array_module, to_device, to_host


softmax = ops.softmax


def top5_informative(num_classes: int) -> bool:
    """Top-5 error means something only with more than 5 classes: with 5 or fewer every class is among the five
    most probable, so the top-5 error is 0 whatever the network does."""
    return num_classes > 5


def topk_hits(scores, labels, k=5):
    """(top-1 hits, top-k hits) as device scalars; k is capped at the number of classes."""
    xp = get_array_module(scores)
    k = min(k, scores.shape[1])
    idx = xp.argsort(-scores, axis=1, kind="stable")[:, :k] if xp is np else xp.argsort(-scores, axis=1)[:, :k]
    hit = idx == labels[:, None]
    return hit[:, 0].sum(), hit.any(axis=1).sum()


def view_probs(model, x, chunk=None):
    """Softmax probabilities (float64, on the model's device) of a batch of prepared crops x (b, V, 3, C, C) (or
    its raw form, a RawBatch, augmented on the model's device), averaged over the V views. The b * V crops go
    through the network `chunk` at a time (default b), so the 10 views cost 10 times the compute but no more
    activation memory than one batch of b crops."""
    dev = model.devices[0]
    xp = dev.xp
    b, v = x.shape[:2]
    # a raw batch (data.augment.RawBatch, the GPU input path) is sliced by crops as the float32 one is
    flat = x.crops() if getattr(x, "raw_batch", False) else x.reshape((b * v,) + x.shape[2:])
    chunk = max(1, int(chunk or b))
    parts = []
    for s in range(0, b * v, chunk):
        logits = model.forward(flat[s:s + chunk], train=False)
        with dev:
            parts.append(softmax(logits.astype(xp.float64)))
        model.clear()
    with dev:
        p = parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=0)
        return p.reshape(b, v, -1).mean(axis=1)


def evaluate(model, loader, progress=None, chunk=None, reduce=None) -> dict:
    """Loss (cross-entropy of the view-averaged softmax), top-1 and top-5 error over every image of `loader`;
    a batch's views go through the network `chunk` crops at a time (default: the batch's image count).

    `reduce`: sums a list of floats over the replicas of a sharded evaluation (each replica's loader holds its share
    of the images; cpnet.dist.World.sum_scalars), so every replica returns the figures of the whole set."""
    dev = model.devices[0]
    xp = dev.xp
    loss_sum = top1 = top5 = 0.0
    n = 0
    for x, y in loader:
        b = x.shape[0]
        p = view_probs(model, x, chunk)
        with dev:
            yd = to_device(y, dev)
            loss_sum += float(-xp.log(xp.maximum(p[xp.arange(b), yd], 1e-300)).sum())
            h1, h5 = topk_hits(p, yd)
            top1 += float(h1)
            top5 += float(h5)
        n += b
        if progress:
            progress(n)
    if reduce is not None:
        loss_sum, top1, top5, n = (float(v) for v in reduce([loss_sum, top1, top5, n]))
        n = int(n)
    if n == 0:
        return {"n": 0, "loss": math.nan, "top1": math.nan, "top5": math.nan}
    return {"n": n, "loss": loss_sum / n, "top1": 1 - top1 / n, "top5": 1 - top5 / n}


def predict_proba(model, x, chunk=None) -> np.ndarray:
    """Softmax probabilities (host array) for a batch of prepared crops (N, V, 3, C, C), averaged over views."""
    return to_host(view_probs(model, x, chunk))
