"""Numbers over seeds: a summary per cell, the verdict rule, per-seed ratios and the choice of a learning rate.

The ablations train every variant with K seeds. A cell of the table is `summary(values)`: mean, sample standard
deviation, min and max over the seeds. Two variants are compared by `compare`: the difference of their means and
its standard error (Welch: sqrt(sd_a^2 / n_a + sd_b^2 / n_b)); a direction is named only when the difference
exceeds `z` (2) standard errors, otherwise it is "no difference at this scale". With one seed a side there is no
spread, so nothing is ever named.

Some values are censored: a run that never reached the target training error has "more than its budget"
iterations. `summary` counts such values (None) apart; `compare` and `ratios` are given them as the budget, a
lower bound, and say so.
"""

from __future__ import annotations

import math

Z = 2.0   # standard errors the difference of means must exceed before a direction is named


def summary(values) -> dict:
    """mean, sd (sample, n-1; None for one value), min, max and n over the values that are not None;
    `missing` counts the Nones (runs that diverged or never reached a target)."""
    vals = [float(v) for v in values if v is not None]
    out = dict(n=len(vals), missing=sum(v is None for v in values), mean=None, sd=None, min=None, max=None)
    if vals:
        m = math.fsum(vals) / len(vals)
        out.update(mean=m, min=min(vals), max=max(vals))
        if len(vals) > 1:
            out["sd"] = math.sqrt(math.fsum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return out


def compare(a, b, lower_is_better=True, z=Z) -> dict:
    """Variant a's values against variant b's (one per seed each).

    Returns diff = mean(b) - mean(a), se (None when either side has fewer than two values), significant
    (|diff| > z * se), and better: 'a', 'b' or None (no difference at this scale, or no spread to judge by).
    """
    sa, sb = summary(a), summary(b)
    out = dict(a=sa, b=sb, diff=None, se=None, z=z, significant=False, better=None)
    if sa["n"] == 0 or sb["n"] == 0:
        return out
    out["diff"] = sb["mean"] - sa["mean"]
    if sa["n"] < 2 or sb["n"] < 2:
        return out
    out["se"] = math.sqrt(sa["sd"] ** 2 / sa["n"] + sb["sd"] ** 2 / sb["n"])
    if abs(out["diff"]) > z * out["se"]:
        out["significant"] = True
        b_lower = out["diff"] < 0
        out["better"] = "b" if b_lower == lower_is_better else "a"
    return out


def verdict(cmp: dict, labels, paper: str | None, unit: str = "points", scale: float = 100.0,
            fmt: str = "{:.1f}") -> str:
    """One sentence for a comparison from `compare`: which of labels (a, b) is better, by how much, with 2 SE, and
    whether that is the paper's direction (`paper`: 'a', 'b' or None); else 'no difference at this scale'."""
    la, lb = labels
    if cmp["diff"] is None:
        return "no result (a side has no finished run)"
    d = cmp["diff"] * scale
    if cmp["se"] is None:
        return (f"no difference at this scale (one seed a side, no spread to judge by; {lb} − {la} = "
                f"{fmt.format(d)} {unit})")
    two = fmt.format(cmp["z"] * cmp["se"] * scale)
    if not cmp["significant"]:
        return (f"no difference at this scale ({lb} − {la} = {fmt.format(d)} {unit}, within {cmp['z']:g} standard "
                f"errors = {two})")
    win, lose = (la, lb) if cmp["better"] == "a" else (lb, la)
    s = f"{win} better than {lose} by {fmt.format(abs(d))} {unit} (more than {cmp['z']:g} standard errors = {two})"
    if paper is not None:
        s += ": the paper's direction" if cmp["better"] == paper else ": against the paper"
    return s


def censored(values, budget):
    """Censored values (None: not reached within the budget) replaced by the budget, a lower bound."""
    return [budget if v is None else v for v in values]


def ratios(num, den, budget=None) -> dict:
    """Per-seed ratios num[i] / den[i] (the seeds pair the runs), the ratio of their means and the range.

    With `budget`, a None in num (never reached) counts as the budget and makes that ratio a lower bound
    (`lower_bound` True); a None in den leaves the seed out (its ratio could be anything up to the budget).
    """
    per, lower, pairs = [], False, []
    for a, b in zip(num, den):
        if b is None or b == 0:
            per.append(None)
            continue
        if a is None:
            if budget is None:
                per.append(None)
                continue
            a, lower = budget, True
        per.append(a / b)
        pairs.append((a, b))
    # the ratio of the means over the same seeds as the per-seed ratios
    of_means = math.fsum(a for a, _ in pairs) / math.fsum(b for _, b in pairs) if pairs else None
    s = summary(per)
    return dict(per_seed=per, of_means=of_means, min=s["min"], max=s["max"], lower_bound=lower)


def best_rate(by_rate: dict) -> float | None:
    """The learning rate whose runs reach the target soonest.

    by_rate: {lr: dict(iterations=[per seed, None if not reached], budget=iterations run, final=[last smoothed
    training error per seed, None if diverged])}. The key is the mean of the iterations with the runs that did
    not reach the target counted as the budget; ties (e.g. no run reached it) go to the lowest mean final training
    error, then to the smaller rate. A rate with a diverged run is never chosen; None when every rate diverged.
    """
    keys = []
    for lr, r in by_rate.items():
        if not r["final"] or any(f is None for f in r["final"]):
            continue
        it = summary(censored(r["iterations"], r["budget"]))["mean"]
        keys.append(((it, summary(r["final"])["mean"], lr), lr))
    return min(keys)[1] if keys else None
