"""cpnet.stats: summaries over seeds, the verdict rule, per-seed ratios, the choice of a learning rate."""

import math

import pytest

from cpnet import stats


def test_summary():
    s = stats.summary([0.30, 0.32, 0.34, None])
    assert s["n"] == 3 and s["missing"] == 1
    assert s["mean"] == pytest.approx(0.32) and s["sd"] == pytest.approx(0.02)
    assert (s["min"], s["max"]) == (0.30, 0.34)
    one = stats.summary([5])
    assert one["mean"] == 5 and one["sd"] is None
    assert stats.summary([None])["mean"] is None


def test_clear_difference_names_the_paper_direction():
    # validation errors: LRN (a) 0.30 +- 0.01, no LRN (b) 0.35 +- 0.01 -> diff 0.05, se 0.0082: clear
    c = stats.compare([0.29, 0.30, 0.31], [0.34, 0.35, 0.36])
    assert c["diff"] == pytest.approx(0.05)
    assert c["se"] == pytest.approx(math.sqrt(2 * 0.01 ** 2 / 3))
    assert c["significant"] and c["better"] == "a"
    v = stats.verdict(c, ("LRN", "no LRN"), paper="a")
    assert v.startswith("LRN better than no LRN by 5.0 points") and v.endswith("the paper's direction")


def test_overlap_is_no_difference():
    # diff 0.01 against a spread of 0.05 a side: 2 se = 0.058 > 0.01
    c = stats.compare([0.25, 0.30, 0.35], [0.26, 0.31, 0.36])
    assert not c["significant"] and c["better"] is None
    v = stats.verdict(c, ("LRN", "no LRN"), paper="a")
    assert v.startswith("no difference at this scale") and "paper" not in v


def test_reversed_sign_says_against_the_paper():
    c = stats.compare([0.34, 0.35, 0.36], [0.29, 0.30, 0.31])
    assert c["significant"] and c["better"] == "b"
    v = stats.verdict(c, ("3/2 overlapping", "2/2"), paper="a")
    assert v.startswith("2/2 better than 3/2 overlapping by 5.0 points") and v.endswith("against the paper")


def test_higher_is_better_and_threshold():
    c = stats.compare([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], lower_is_better=False)
    assert c["se"] == 0 and c["significant"] and c["better"] == "b"   # no spread at all: any difference counts
    same = stats.compare([1.0, 1.0], [1.0, 1.0])
    assert not same["significant"]
    # just inside and just outside 2 standard errors
    a = [0.0, 1.0]                                   # sd 0.7071, se (both sides) = 0.7071
    assert not stats.compare(a, [x + 1.41 for x in a])["significant"]
    assert stats.compare(a, [x + 1.42 for x in a])["significant"]


def test_one_seed_never_names_a_direction():
    c = stats.compare([0.2], [0.5])
    assert c["diff"] == pytest.approx(0.3) and c["se"] is None and not c["significant"]
    assert "one seed" in stats.verdict(c, ("a", "b"), paper="a")
    assert stats.verdict(stats.compare([None], [0.5]), ("a", "b"), "a").startswith("no result")


def test_ratios_pair_seeds_and_mark_lower_bounds():
    r = stats.ratios([600, 900, 1200], [100, 200, 300])
    assert r["per_seed"] == [6, 4.5, 4] and (r["min"], r["max"]) == (4, 6)
    assert r["of_means"] == pytest.approx(900 / 200) and not r["lower_bound"]
    r = stats.ratios([None, 900], [100, 300], budget=1000)
    assert r["per_seed"] == [10, 3] and r["lower_bound"]
    r = stats.ratios([500, 900], [None, 300], budget=1000)
    assert r["per_seed"] == [None, 3] and (r["min"], r["max"]) == (3, 3)
    assert r["of_means"] == 3                               # over the seeds that have a ratio
    assert stats.ratios([None], [None], budget=10)["of_means"] is None


def test_best_rate():
    by = {0.01: dict(iterations=[400, 500], budget=800, final=[0.2, 0.2]),
          0.02: dict(iterations=[300, None], budget=800, final=[0.2, 0.3]),    # mean 550 with the budget
          0.05: dict(iterations=[100, 120], budget=800, final=[0.1, None])}    # diverged once: never chosen
    assert stats.best_rate(by) == 0.01
    none = {0.01: dict(iterations=[None, None], budget=800, final=[0.5, 0.4]),
            0.02: dict(iterations=[None, None], budget=800, final=[0.3, 0.4])}
    assert stats.best_rate(none) == 0.02                                      # nobody reached it: lowest final
    assert stats.best_rate({0.1: dict(iterations=[None], budget=10, final=[None])}) is None


def test_chart_draws_the_spread_band():
    """viz.Series(band=(lo, hi)): a translucent area in the series' colour between lo and hi, the line on top."""
    import numpy as np

    from cpnet import viz

    x = [0, 1, 2, 3]
    s = viz.Series(x, [0.5] * 4, "m", viz.PALETTE[0], band=([0.3] * 4, [0.7] * 4))
    a = np.asarray(viz.chart([s], (300, 200), ylim=(0, 1), legend=False)).astype(int)
    plain = np.asarray(viz.chart([viz.Series(x, [0.5] * 4, "m", viz.PALETTE[0])], (300, 200), ylim=(0, 1),
                                 legend=False)).astype(int)
    changed = (a != plain).any(axis=2)
    rows = np.nonzero(changed.any(axis=1))[0]
    # the band spans 0.3..0.7 of the plot's height: about 40% of its rows, centred on the line
    assert 0.3 < len(rows) / a.shape[0] < 0.5
    tinted = a[changed]
    assert (tinted[:, 2] > tinted[:, 0]).all()        # PALETTE[0] is blue: the tint keeps blue above red
    band_only = viz.chart([viz.Series([0, 1], [None, None], band=([0.2, 0.2], [float("nan"), 0.4]))], (300, 200))
    assert band_only.size == (300, 200)               # a broken band draws nothing and does not fail
