"""Prep machinery and the synthetic set: stored statistics, determinism, workers, resume, refusing to clobber."""
import os

import h5py
import numpy as np
import pytest

from cpnet.data import H5Dataset, prep, synthetic
from cpnet.data.h5format import rgb_pca
from cpnet.data.sources import synthetic_jobs
from cpnet.errors import CpnetError


def read_all(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][...] for k in ("images", "labels", "mean", "pca/eigval", "pca/eigvec", "pca/cov")}, \
            dict(f.attrs)


def test_synthetic_is_deterministic_and_prefix_stable():
    a, la = synthetic.generate(4, "train", 300, 20, 10)
    b, lb = synthetic.generate(4, "train", 300, 20, 10)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    c, lc = synthetic.generate(4, "train", 700, 20, 10)
    np.testing.assert_array_equal(c[:300], a)          # a larger n extends a smaller one
    d, _ = synthetic.generate(4, "train", 50, 20, 10, start=280)
    np.testing.assert_array_equal(d, c[280:330])        # any range
    e, _ = synthetic.generate(5, "train", 300, 20, 10)
    v, _ = synthetic.generate(4, "val", 300, 20, 10)
    assert not np.array_equal(a, e) and not np.array_equal(a, v)
    assert a.dtype == np.uint8 and a.shape == (300, 20, 20, 3)
    assert np.all(np.bincount(la, minlength=10) >= 25)  # roughly balanced


def test_synthetic_classes_are_not_a_colour():
    """No class is told apart by its average colour: per-class mean RGB all close to the overall mean."""
    x, y = synthetic.generate(0, "train", 2000, 24, 10)
    per_image = x.reshape(len(x), -1, 3).mean(axis=1)
    overall = per_image.mean(axis=0)
    for c in range(10):
        assert np.abs(per_image[y == c].mean(axis=0) - overall).max() < 12


def test_stored_pixels_and_stats_match_numpy(tmp_path):
    sums = prep.run(tmp_path, synthetic_jobs(n=300, classes=5, size=16, seed=2, val_fraction=0.3))
    assert sums["train"]["n"] == 300 and sums["val"]["n"] == 90
    tr, at = read_all(tmp_path / "train.h5")
    x, y = synthetic.generate(2, "train", 300, 16, 5)
    np.testing.assert_array_equal(tr["images"], x)
    np.testing.assert_array_equal(tr["labels"], y)
    np.testing.assert_allclose(tr["mean"], x.astype(np.float64).mean(axis=0), rtol=1e-6, atol=1e-4)
    pix = x.reshape(-1, 3).astype(np.float64)
    cov = np.cov(pix.T, bias=True)
    np.testing.assert_allclose(tr["pca/cov"], cov, rtol=1e-9)
    w, v = np.linalg.eigh(cov / 255.0 ** 2)
    np.testing.assert_allclose(tr["pca/eigval"], 255.0 * w[::-1], rtol=1e-5)
    for i in range(3):   # same axes up to sign
        assert abs(abs(float(tr["pca/eigvec"][:, i] @ v[:, 2 - i])) - 1) < 1e-5
    ev = tr["pca/eigvec"].astype(np.float64)
    np.testing.assert_allclose(ev @ np.diag(tr["pca/eigval"] * 255.0) @ ev.T, cov, rtol=1e-4, atol=1e-3)
    assert at["format_version"] == 1 and at["size"] == 16 and at["split"] == "train"
    assert at["stats_pixels"] == 300 * 16 * 16
    # the validation file carries the TRAINING set's statistics, and says so
    va, vat = read_all(tmp_path / "val.h5")
    for k in ("mean", "pca/eigval", "pca/eigvec", "pca/cov"):
        np.testing.assert_array_equal(va[k], tr[k])
    assert vat["stats_from"] == "train" and vat["split"] == "val"
    xv, _ = synthetic.generate(2, "val", 90, 16, 5)
    np.testing.assert_array_equal(va["images"], xv)
    with H5Dataset(tmp_path / "val.h5") as ds:
        assert ds.classes == list(synthetic.SHAPES[:5])


def test_rgb_pca_orders_and_scales():
    cov = np.array([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 1.0]]) * 1000
    val, vec = rgb_pca(cov)
    assert val[0] >= val[1] >= val[2]
    np.testing.assert_allclose(vec.astype(np.float64) @ np.diag(val * 255.0) @ vec.T, cov, rtol=1e-5, atol=1e-2)


def test_workers_write_the_same_file(tmp_path):
    jobs = lambda: synthetic_jobs(n=600, classes=4, size=12, seed=1, val_fraction=0.1)   # noqa: E731
    prep.run(tmp_path / "a", jobs(), workers=0)
    prep.run(tmp_path / "b", jobs(), workers=2)
    for split in ("train", "val"):
        a, _ = read_all(tmp_path / "a" / f"{split}.h5")
        b, _ = read_all(tmp_path / "b" / f"{split}.h5")
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


class _Stop(Exception):
    pass


def test_resume_after_interruption(tmp_path):
    jobs = lambda: synthetic_jobs(n=2000, classes=6, size=10, seed=3, val_fraction=0.1)   # noqa: E731
    assert len(jobs()["train"].tasks) == 8                   # 256-image units

    def stop_after_three(split, done, total, *rest):
        if done >= 3 * 256:
            raise _Stop()

    out = tmp_path / "r"
    with pytest.raises(_Stop):
        prep.run(out, jobs(), progress=stop_after_three)
    assert os.path.exists(out / "train.h5.partial") and not os.path.exists(out / "train.h5")
    with h5py.File(out / "train.h5.partial", "r") as f:
        assert f["_progress/record"][0] == 3 and f["_progress/record"][1] == 768 and f["images"].shape[0] == 768
    with pytest.raises(CpnetError, match=r"train\.h5\.partial.*--resume"):
        prep.run(out, jobs())
    with pytest.raises(CpnetError, match="partial"):
        H5Dataset(out / "train.h5.partial")
    done = []
    prep.run(out, jobs(), resume=True, progress=lambda s, d, *r: done.append((s, d)))
    assert done[0] == ("train", 4 * 256)                     # nothing redone
    assert not os.path.exists(out / "train.h5.partial")
    prep.run(tmp_path / "ref", jobs())
    for split in ("train", "val"):
        a, _ = read_all(out / f"{split}.h5")
        b, _ = read_all(tmp_path / "ref" / f"{split}.h5")
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-12)
    # finished files: kept with --resume, refused without, and a different setting is refused
    s = prep.run(out, jobs(), resume=True)
    assert s["train"]["kept"] and s["train"]["n"] == 2000
    with pytest.raises(CpnetError, match=r"train\.h5: already exists"):
        prep.run(out, jobs())
    other = synthetic_jobs(n=2000, classes=6, size=10, seed=4, val_fraction=0.1)
    with pytest.raises(CpnetError, match="other inputs or settings"):
        prep.run(out, other, resume=True)
    prep.run(out, other, overwrite=True)
    a, _ = read_all(out / "train.h5")
    b, _ = read_all(tmp_path / "ref" / "train.h5")
    assert not np.array_equal(a["images"], b["images"])


def test_partial_with_other_settings_is_refused(tmp_path):
    def stop(split, done, *rest):
        raise _Stop()

    with pytest.raises(_Stop):
        prep.run(tmp_path, synthetic_jobs(n=600, size=10, seed=1), progress=stop)
    with pytest.raises(CpnetError, match=r"train\.h5\.partial: was started with other"):
        prep.run(tmp_path, synthetic_jobs(n=600, size=10, seed=2), resume=True)
