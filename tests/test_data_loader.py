"""The loader: H5Dataset checks, training augmentation (crop, flip, lighting, mean), evaluation views, workers."""
import gc
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from cpnet.data import FORMAT_VERSION, EvalLoader, H5Dataset, TrainLoader
from cpnet.data import augment
from cpnet.errors import CpnetError


def write_h5(path, images, labels, classes, mean=None, eigval=None, eigvec=None, version=FORMAT_VERSION):
    """A dataset file written by hand (independent of the prep code)."""
    n, s = images.shape[:2]
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images, chunks=(1, s, s, 3))
        f.create_dataset("labels", data=np.asarray(labels, np.int64))
        f.create_dataset("classes", data=np.array(classes, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("mean", data=np.zeros((s, s, 3), np.float32) if mean is None else mean)
        f.create_dataset("pca/eigval", data=np.zeros(3, np.float32) if eigval is None else eigval)
        f.create_dataset("pca/eigvec", data=np.eye(3, dtype=np.float32) if eigvec is None else eigvec)
        f.attrs.update(format_version=version, source="test", size=s)
    return str(path)


def coded_images(n, s):
    """Image i has R = row, G = column, B = i: every output pixel tells where it came from."""
    img = np.zeros((n, s, s, 3), np.uint8)
    img[..., 0] = np.arange(s)[None, :, None]
    img[..., 1] = np.arange(s)[None, None, :]
    img[..., 2] = np.arange(n)[:, None, None]
    return img


@pytest.fixture
def coded(tmp_path):
    n, s = 37, 12
    labels = (np.arange(n) * 7) % 5
    return write_h5(tmp_path / "coded.h5", coded_images(n, s), labels, list("abcde")), labels


def decode(x):
    """(3, C, C) of a coded image with mean 0 and no lighting -> (index, oy, ox, flipped)."""
    r, g, b = x
    idx = int(b[0, 0])
    oy, ox0, ox1 = int(r[0, 0]), int(g[0, 0]), int(g[0, -1])
    flipped = ox0 > ox1
    ox = ox1 if flipped else ox0
    c = x.shape[-1]
    cols = np.arange(ox, ox + c)[::-1] if flipped else np.arange(ox, ox + c)
    assert np.array_equal(r, np.broadcast_to(np.arange(oy, oy + c)[:, None], (c, c)))
    assert np.array_equal(g, np.broadcast_to(cols[None, :], (c, c)))
    assert np.all(b == idx)
    return idx, oy, ox, flipped


def test_dataset_reads_in_any_order(coded):
    path, labels = coded
    with H5Dataset(path) as ds:
        assert (ds.n, ds.size, ds.num_classes, ds.classes) == (37, 12, 5, list("abcde"))
        assert ds.labels.dtype == np.int64 and np.array_equal(ds.labels, labels)
        idx = [30, 2, 3, 4, 2, 36, 0]
        got = ds.read(idx)
        assert got.dtype == np.uint8 and got.shape == (7, 12, 12, 3)
        assert list(got[:, 0, 0, 2]) == idx
        assert ds.attrs["source"] == "test"


def test_train_crops_flips_and_alignment(coded):
    path, labels = coded
    with TrainLoader(path, 8, 9, seed=3, lighting=0.0) as L:
        assert L.batches_per_epoch == 37 // 8
        seen, offsets, flips = [], set(), []
        for bi, (x, y) in enumerate(L.epoch(2)):
            assert x.dtype == np.float32 and x.shape == (8, 3, 9, 9) and x.flags.c_contiguous
            assert y.dtype == np.int64 and y.shape == (8,)
            oy, ox, fl, _ = augment.train_params(3, 2, bi, 8, 12, 9)
            for k in range(8):
                idx, y0, x0, f = decode(x[k])
                assert labels[idx] == y[k]                       # image/label alignment
                assert (y0, x0, f) == (oy[k], ox[k], fl[k])     # the documented random choices
                seen.append(idx)
                offsets.add((y0, x0))
                flips.append(f)
        # a permutation of the file (the incomplete last batch dropped), the one epoch_order gives
        assert len(set(seen)) == len(seen) == 32
        assert seen == list(augment.epoch_order(3, 2, 37)[:32])
        assert all(0 <= a <= 3 and 0 <= b <= 3 for a, b in offsets) and len(offsets) > 8
        assert 0 < sum(flips) < len(flips)
        # another epoch is another order
        x1, _ = next(iter(L.epoch(3)))
        assert [decode(x)[0] for x in x1] != seen[:8]


def test_no_flip_option(coded):
    path, _ = coded
    with TrainLoader(path, 8, 9, flip=False, lighting=0.0) as L:
        for x, _ in L.epoch(0):
            assert not any(decode(im)[3] for im in x)


def test_mean_subtraction_flip_and_scale(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    mean = rng.uniform(0, 255, (8, 8, 3)).astype(np.float32)
    path = write_h5(tmp_path / "m.h5", imgs, np.zeros(10), ["x"], mean=mean)
    with TrainLoader(path, 5, 6, seed=1, lighting=0.0, scale=0.5) as L:
        for bi, (x, _) in enumerate(L.epoch(0)):
            order = augment.epoch_order(1, 0, 10)[bi * 5:(bi + 1) * 5]
            oy, ox, fl, _ = augment.train_params(1, 0, bi, 5, 8, 6)
            for k in range(5):
                ref = np.empty((6, 6, 3))
                for i in range(6):          # naive per-pixel reference
                    for j in range(6):
                        jj = ox[k] + (5 - j if fl[k] else j)
                        ref[i, j] = imgs[order[k], oy[k] + i, jj].astype(np.float64) - mean[oy[k] + i, jj]
                np.testing.assert_allclose(x[k], 0.5 * ref.transpose(2, 0, 1), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("crop", [8, 11, 12])
def test_padded_crops_leave_the_image_over_mean_coloured_borders(tmp_path, crop):
    """--pad: windows may start up to `pad` pixels outside the image; outside is 0 (the mean, no lighting), inside
    is (pixel + lighting shift - mean) * scale, the whole window mirrored when flipped. Naive per-pixel reference.
    A crop up to 2 x pad larger than the image (11 and 12 of 8 with pad 2) holds the whole image on that canvas."""
    rng = np.random.default_rng(5)
    imgs = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    mean = rng.uniform(0, 255, (8, 8, 3)).astype(np.float32)
    eigval = np.array([3.0, 1.0, 0.5], np.float32)
    eigvec = np.linalg.qr(rng.standard_normal((3, 3)))[0].astype(np.float32)
    path = write_h5(tmp_path / "p.h5", imgs, np.zeros(16), ["x"], mean=mean, eigval=eigval, eigvec=eigvec)
    offsets = set()
    c = crop
    with TrainLoader(path, 8, c, seed=2, lighting=0.5, scale=0.5, pad=2) as L:
        for bi, (x, _) in enumerate(L.epoch(1)):
            order = augment.epoch_order(2, 1, 16)[bi * 8:(bi + 1) * 8]
            oy, ox, fl, alpha = augment.train_params(2, 1, bi, 8, 8, c, 0.5, True, 2)
            shift = augment.lighting_shift(alpha, eigval, eigvec)
            for k in range(8):
                offsets.add((int(oy[k]), int(ox[k])))
                ref = np.zeros((c, c, 3))
                for i in range(c):
                    for j in range(c):
                        yy, xx = oy[k] + i, ox[k] + (c - 1 - j if fl[k] else j)
                        if 0 <= yy < 8 and 0 <= xx < 8:
                            ref[i, j] = imgs[order[k], yy, xx] + shift[k] - mean[yy, xx]
                np.testing.assert_allclose(x[k], 0.5 * ref.transpose(2, 0, 1), rtol=1e-5, atol=1e-3)
    hi = 8 - c + 2                                     # offsets in [-pad, size - crop + pad]
    assert all(-2 <= a <= hi and -2 <= b <= hi for a, b in offsets) and min(min(offsets)) == -2
    assert max(max(offsets)) == hi                     # crop 12 = 8 + 2 x 2: the one offset -2
    if c > 8:                                          # evaluation: the image centred on the canvas, corners
        with EvalLoader(path, 16, c, views="ten", scale=0.5, pad=2) as E:
            xe, _ = next(iter(E))
        views = augment.view_offsets(8, c, "ten", pad=2)
        assert [v[:2] for v in views[:5]] == [((8 - c) // 2,) * 2, (-2, -2), (-2, 10 - c), (10 - c, -2), (10 - c,) * 2]
        for v, (oy, ox, fl) in enumerate(views):                # the corners: training's extreme offsets
            ref = np.zeros((c, c, 3))
            ref[-oy:-oy + 8, -ox:-ox + 8] = imgs[3] - mean
            ref = ref[:, ::-1] if fl else ref
            np.testing.assert_allclose(xe[3, v], 0.5 * ref.transpose(2, 0, 1), rtol=1e-5, atol=1e-3)
    # pad 0 draws what it drew before --pad existed: offsets in [0, size - crop]
    oy0, ox0, _, _ = augment.train_params(2, 1, 0, 64, 12, 9)
    assert oy0.min() >= 0 and oy0.max() <= 3 and len(set(oy0)) == 4
    with pytest.raises(CpnetError, match="pad must be in"):
        TrainLoader(path, 8, 6, pad=6)


def test_erase_boxes_follow_their_distribution():
    """Random erasing's boxes: inside the crop, the drawn share of images (p), areas in ERASE_AREA of the crop and
    aspect ratios in ERASE_ASPECT (up to the rounding to whole pixels and the cut to the crop), all positions."""
    c, b = 32, 4000
    boxes = augment.erase_boxes(5, 0, 0, b, c, 0.5)
    assert boxes.dtype == np.int32 and boxes.shape == (b, 4)
    h, w = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    on = h > 0
    assert (w[on] > 0).all() and not boxes[~on].any()            # left whole: the empty box
    assert abs(on.mean() - 0.5) < 0.03
    assert (boxes >= 0).all() and (boxes[:, 2:] <= c).all()
    share = h[on] * w[on] / c ** 2
    lo, hi = augment.ERASE_AREA
    assert share.min() >= lo * 0.5 and share.max() <= hi * 1.25 and abs(np.median(share) - (lo + hi) / 2) < 0.03
    ratio = h[on] / w[on]
    assert ratio.min() >= augment.ERASE_ASPECT[0] * 0.7 and ratio.max() <= augment.ERASE_ASPECT[1] * 1.4
    assert 0 < (ratio > 1).mean() < 1 and boxes[on, 0].min() == 0 and boxes[on, 2].max() == c
    assert np.array_equal(augment.erase_boxes(5, 0, 0, b, c, 0.5), boxes)        # a function of its arguments
    assert not np.array_equal(augment.erase_boxes(5, 0, 1, b, c, 0.5), boxes)
    assert not augment.erase_boxes(5, 0, 0, b, c, 0.0).any()


@pytest.mark.parametrize("part", [(0, 1), (1, 2)])
def test_erasing_zeroes_its_boxes_and_changes_nothing_else(coded, part):
    """--erase: the same batches as without it (order, crops, flips) but for each crop's box, which is 0 (the
    mean colour); a replica's rows get the boxes those rows have in the global batch."""
    path, _ = coded
    with TrainLoader(path, 8, 9, seed=3, lighting=0.0, part=part) as plain, \
            TrainLoader(path, 8, 9, seed=3, lighting=0.0, part=part, erase=0.7) as erased:
        n_boxes = 0
        for bi, ((x, y), (xe, ye)) in enumerate(zip(plain.epoch(1), erased.epoch(1), strict=True)):
            np.testing.assert_array_equal(y, ye)
            boxes = augment.erase_boxes(3, 1, bi, 8, 9, 0.7)[plain.first_row:plain.first_row + plain.rows]
            keep = np.ones(x.shape, bool)
            for k, (y0, x0, y1, x1) in enumerate(boxes):
                keep[k, :, y0:y1, x0:x1] = False
                n_boxes += y1 > y0
            np.testing.assert_array_equal(xe[keep], x[keep])
            assert not xe[~keep].any() and x[~keep].any()
        assert n_boxes > 0
    with pytest.raises(CpnetError, match="erase must be a probability"):
        TrainLoader(path, 8, 9, erase=1.5)


def test_lighting_formula(tmp_path):
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    eigvec, eigval = q.astype(np.float32), np.array([30.0, 8.0, 2.0], np.float32)
    imgs = np.full((64, 4, 4, 3), 100, np.uint8)
    path = write_h5(tmp_path / "l.h5", imgs, np.zeros(64), ["x"], eigval=eigval, eigvec=eigvec)
    sigma = 0.1
    with TrainLoader(path, 16, 4, lighting=sigma) as L:
        shifts = []
        for e in range(40):
            for bi, (x, _) in enumerate(L.epoch(e)):
                s = x - 100.0
                assert np.allclose(s, s[:, :, :1, :1], atol=1e-4)   # one RGB shift per image, every pixel
                _, _, _, alpha = augment.train_params(0, e, bi, 16, 4, 4, sigma)
                for k in range(16):
                    ref = sum(eigvec[:, i] * alpha[k, i] * eigval[i] for i in range(3))
                    np.testing.assert_allclose(s[k, :, 0, 0], ref, rtol=1e-5, atol=1e-4)
                shifts.append(s[:, :, 0, 0])
    # and the alphas really are N(0, sigma): the shifts' covariance is sigma^2 V diag(eigval^2) V^T
    s = np.concatenate(shifts).astype(np.float64)
    want = sigma ** 2 * (eigvec * eigval ** 2) @ eigvec.T
    np.testing.assert_allclose(np.cov(s.T), want, atol=0.1 * np.abs(want).max())


def test_eval_views(coded):
    path, labels = coded
    c, s = 8, 12
    with EvalLoader(path, 10, c, views="ten") as E, EvalLoader(path, 10, c) as C:
        assert len(E) == 4 and E.n == 37
        ys, want = [], [(2, 2, False), (0, 0, False), (0, 4, False), (4, 0, False), (4, 4, False)]
        want += [(a, b, True) for a, b, _ in want]
        n = 0
        for (x, y), (xc, yc) in zip(E, C):
            assert x.shape == (len(y), 10, 3, c, c) and xc.shape == (len(y), 1, 3, c, c)
            np.testing.assert_array_equal(x[:, :1], xc)
            np.testing.assert_array_equal(y, yc)
            for k in range(len(y)):
                for v in range(10):
                    assert decode(x[k, v]) == (n + k,) + want[v]
            n += len(y)
            ys.append(y)
        assert n == 37 and len(ys[-1]) == 7
        np.testing.assert_array_equal(np.concatenate(ys), labels)
    assert augment.TEN_VIEW_ORDER[0] == "center" and len(augment.TEN_VIEW_ORDER) == 10
    assert s - c == 4


def test_workers_identical_and_resumable(coded):
    path, labels = coded
    kw = dict(seed=5, lighting=0.1)
    with TrainLoader(path, 6, 10, workers=0, **kw) as L0, TrainLoader(path, 6, 10, workers=2, prefetch=2, **kw) as L2:
        for e in (0, 1):
            a, b = list(L0.epoch(e)), list(L2.epoch(e))
            assert len(a) == len(b) == 6
            for (xa, ya), (xb, yb) in zip(a, b):
                np.testing.assert_array_equal(xa, xb)
                np.testing.assert_array_equal(ya, yb)
        # resume in the middle of an epoch; and abandoning an epoch midway does not disturb the next one
        it = L2.epoch(1)
        next(it)
        rest = list(L2.epoch(1, start=4))
        assert len(rest) == 2
        for (xa, ya), (xb, yb) in zip(a[4:], rest):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)


def test_eval_workers_alignment(coded):
    path, labels = coded
    with EvalLoader(path, 4, 12, workers=3) as E:
        idx, ys = [], []
        for x, y in E:
            idx += [int(v) for v in x[:, 0, 2, 0, 0]]
            ys.append(y)
        assert idx == list(range(37))
        np.testing.assert_array_equal(np.concatenate(ys), labels)


def test_worker_error_surfaces_and_workers_stop(coded, tmp_path):
    path, _ = coded
    L = TrainLoader(path, 4, 8, workers=2)
    procs = list(L._workers._procs)
    assert all(p.is_alive() for p in procs)
    with open(path, "wb") as fh:             # the workers open the file only on their first batch
        fh.write(b"not hdf5 any more")
    with pytest.raises(CpnetError, match="coded.h5"):
        list(L.epoch(0))
    L.close()
    assert not any(p.is_alive() for p in procs)


def test_workers_stop_on_garbage_collection(coded):
    path, _ = coded
    L = TrainLoader(path, 4, 8, workers=2)
    procs = list(L._workers._procs)
    next(iter(L.epoch(0)))
    del L
    gc.collect()
    for p in procs:
        p.join(timeout=5)
    assert not any(p.is_alive() for p in procs)


def test_errors_name_the_file(coded, tmp_path):
    path, _ = coded
    with pytest.raises(CpnetError, match=r"coded\.h5.*crop 13.*12"):
        TrainLoader(path, 4, 13)
    with pytest.raises(CpnetError, match=r"coded\.h5.*crop 13"):
        EvalLoader(path, 4, 13)
    with pytest.raises(CpnetError, match=r"coded\.h5: crop 15 does not fit the stored image size 12 \(expected 1 "
                                         r"<= crop <= 12 \+ 2 x pad = 14\)"):
        TrainLoader(path, 4, 15, pad=1)
    with pytest.raises(CpnetError, match=r"coded\.h5.*crop 15.*12 \+ 2 x pad = 14"):
        EvalLoader(path, 4, 15, pad=1)
    TrainLoader(path, 4, 14, pad=1).close()
    EvalLoader(path, 4, 14, pad=1).close()
    with pytest.raises(CpnetError, match=r"coded\.h5: 37 images, fewer than one training batch of 64"):
        TrainLoader(path, 64, 8)
    with pytest.raises(CpnetError, match=r"nothere\.h5: no such"):
        H5Dataset(tmp_path / "nothere.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(CpnetError, match=r"text\.h5: not an HDF5 file"):
        TrainLoader(tmp_path / "text.h5", 4, 8)
    img = coded_images(4, 8)
    old = write_h5(tmp_path / "old.h5", img, np.zeros(4), ["a"], version=99)
    with pytest.raises(CpnetError, match=r"old\.h5: format version 99.*version 1"):
        H5Dataset(old)
    nomean = write_h5(tmp_path / "nomean.h5", img, np.zeros(4), ["a"])
    with h5py.File(nomean, "a") as f:
        del f["mean"]
    with pytest.raises(CpnetError, match=r"nomean\.h5: missing dataset 'mean'"):
        EvalLoader(nomean, 2, 8)
    badlab = write_h5(tmp_path / "badlab.h5", img, [0, 1, 2, 1], ["a", "b"])
    with pytest.raises(CpnetError, match=r"badlab\.h5: label 2 outside \[0, 2\)"):
        H5Dataset(badlab)


def test_workers_wait_for_a_slow_consumer(coded):
    """Idle workers keep waiting (they poll for a vanished parent once a second, and must not mistake the
    forkserver for it)."""
    path, _ = coded
    with TrainLoader(path, 6, 10, workers=1, prefetch=1) as L, TrainLoader(path, 6, 10) as L0:
        it = L.epoch(0)
        first = next(it)
        time.sleep(2.2)
        rest = list(it)
        for (xa, _), (xb, _) in zip([first] + rest, L0.epoch(0)):
            np.testing.assert_array_equal(xa, xb)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_ctrl_c_stops_the_workers(coded):
    """A KeyboardInterrupt in the caller ends the program and its workers; nothing hangs."""
    path, _ = coded
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from cpnet.data import TrainLoader\n"
        f"L = TrainLoader({path!r}, 4, 8, workers=2)\n"
        "print(*[p.pid for p in L._workers._procs], flush=True)\n"
        "for e in range(10 ** 6):\n"
        "    for x, y in L.epoch(e):\n"
        "        time.sleep(0.01)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    pids = []
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode != 0 and "KeyboardInterrupt" in err
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
    finally:                      # leave nothing behind if the test fails
        for pid in [proc.pid] + pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_eval_loader_subtracts_a_given_mean_at_each_view(coded):
    """A checkpoint's training mean replaces the file's own (which is zero here)."""
    path, _ = coded
    mean = np.random.default_rng(0).uniform(0, 50, (12, 12, 3)).astype(np.float32)
    with EvalLoader(path, 10, 8, views="ten") as plain, EvalLoader(path, 10, 8, views="ten", mean=mean) as shifted:
        (x, _), (xm, _) = next(iter(plain)), next(iter(shifted))
    for v, (oy, ox, flip) in enumerate(augment.view_offsets(12, 8, "ten")):
        m = mean[oy:oy + 8, ox:ox + 8].transpose(2, 0, 1)
        if flip:
            m = m[:, :, ::-1]
        np.testing.assert_allclose(x[:, v] - xm[:, v], np.broadcast_to(m, x[:, v].shape), rtol=1e-6, atol=1e-4)
    with pytest.raises(CpnetError, match="coded.h5: images are 12px but the mean image given is"):
        with EvalLoader(path, 10, 8, mean=np.zeros((10, 10, 3), np.float32)) as bad:
            next(iter(bad))


@pytest.mark.parametrize("parts", [2, 4])
def test_replica_parts_are_row_blocks_of_the_global_batch(coded, parts):
    """Replica r of n yields rows [r*B/n, (r+1)*B/n) of every global batch, with the crops, flips and lighting
    those rows have in the whole batch (keyed by the global position); workers change nothing."""
    path, _ = coded
    whole = TrainLoader(path, 8, 9, seed=3, lighting=0.5)
    expect = [(x.copy(), y.copy()) for e in range(2) for x, y in whole.epoch(e)]
    whole.close()
    got = [[] for _ in range(parts)]
    for r in range(parts):
        with TrainLoader(path, 8, 9, seed=3, lighting=0.5, part=(r, parts), workers=r % 2) as part:
            assert part.first_row == r * 8 // parts and part.rows == 8 // parts
            got[r] = [(x.copy(), y.copy()) for e in range(2) for x, y in part.epoch(e)]
    for i, (x, y) in enumerate(expect):
        assert np.array_equal(np.concatenate([got[r][i][0] for r in range(parts)]), x)
        assert np.array_equal(np.concatenate([got[r][i][1] for r in range(parts)]), y)
    # every image of an epoch's batches is used once, by exactly one replica
    seen = np.concatenate([decode_batch(got[r][i][0]) for r in range(parts) for i in range(len(expect) // 2)])
    assert len(seen) == len(set(seen.tolist())) == (37 // 8) * 8


def decode_batch(x):
    return np.array([decode(im)[0] for im in x])


def test_replica_parts_need_a_batch_that_splits(coded):
    path, _ = coded
    with pytest.raises(CpnetError, match="does not split into 3"):
        TrainLoader(path, 8, 9, part=(0, 3))
    with pytest.raises(CpnetError, match="0 <= r < n"):
        TrainLoader(path, 8, 9, part=(2, 2))


@pytest.mark.parametrize("parts", [1, 2, 4, 5])
def test_eval_parts_hold_every_image_once(coded, parts):
    path, labels = coded
    idx, ys = [], []
    for r in range(parts):
        with EvalLoader(path, 4, 12, part=(r, parts), workers=r % 2) as part:
            batches = [(decode_batch(x[:, 0]), y) for x, y in part]
            assert len(batches) == len(part)
        idx += [i for b, _ in batches for i in b]
        ys += [v for _, y in batches for v in y]
    assert idx == list(range(37)) and np.array_equal(ys, labels)
