"""Image sources: folders (PNG, JPEG, grayscale, CMYK, corrupt), ImageNet's validation layout, CIFAR tarballs
(binary and python, CIFAR-10 and -100, built here in the real byte layout), a refused pickle, IDX files."""
import gzip
import io
import os
import pickle
import struct
import tarfile

import h5py
import numpy as np
import pytest
from PIL import Image

from cpnet.data import H5Dataset, prep
from cpnet.data.sources import cifar_jobs, folder_jobs, idx_jobs
from cpnet.errors import CpnetError

S = 16


def stored(path):
    with h5py.File(path, "r") as f:
        return f["images"][...], f["labels"][...], [c.decode() for c in f["classes"][...]], f["mean"][...], \
            f["pca/cov"][...]


def check_stats(path, images):
    """The mean image and RGB covariance in the file equal numpy's over the stored training images."""
    with h5py.File(path, "r") as f:
        np.testing.assert_allclose(f["mean"][...], images.astype(np.float64).mean(axis=0), rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(f["pca/cov"][...], np.cov(images.reshape(-1, 3).T.astype(np.float64), bias=True),
                                   rtol=1e-8, atol=1e-8)


def ref_fit(img):
    """Reference resize: transparency over white, shorter side to S with Pillow's bicubic, centre crop."""
    if "A" in img.getbands():
        a = np.asarray(img.convert("RGBA"), np.float64) / 255
        img = Image.fromarray(np.round(255 * (a[..., :3] * a[..., 3:] + 1 - a[..., 3:])).astype(np.uint8))
    img = img.convert("RGB")
    w, h = img.size
    if min(w, h) != S:
        k = S / min(w, h)
        img = img.resize((max(S, round(w * k)), max(S, round(h * k))), Image.Resampling.BICUBIC)
    w, h = img.size
    l, t = (w - S) // 2, (h - S) // 2
    return np.asarray(img.crop((l, t, l + S, t + S)))


@pytest.fixture
def tree(tmp_path):
    """root/<class>/<files>: every kind of image the issue lists, plus two bad files."""
    rng = np.random.default_rng(0)
    root = tmp_path / "root"
    want = {}      # relative path -> expected stored pixels
    for c in ("cat", "dog", "owl"):
        (root / c).mkdir(parents=True)
    def put(rel, img, fmt, **kw):
        img.save(root / rel, fmt, **kw)
        with Image.open(root / rel) as back:
            want[rel] = ref_fit(back)
    exact = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    put("cat/a_exact.png", Image.fromarray(exact), "PNG")
    assert np.array_equal(want["cat/a_exact.png"], exact)          # S x S stored unchanged
    put("cat/b_wide.png", Image.fromarray(rng.integers(0, 256, (20, 33, 3), dtype=np.uint8)), "PNG")
    put("cat/c_gray.jpg", Image.fromarray(rng.integers(0, 256, (24, 18), dtype=np.uint8), "L"), "JPEG")
    put("dog/a_cmyk.jpg", Image.fromarray(rng.integers(0, 256, (S, S, 4), dtype=np.uint8), "CMYK"), "JPEG")
    put("dog/b_rgba.png", Image.fromarray(rng.integers(0, 256, (17, 16, 4), dtype=np.uint8), "RGBA"), "PNG")
    put("dog/c_rgb.jpg", Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)), "JPEG", quality=95)
    put("owl/a_palette.png", Image.fromarray(rng.integers(0, 256, (S, S, 3), dtype=np.uint8)).convert("P"), "PNG")
    (root / "owl" / "b_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "owl" / "c_truncated.jpg").write_bytes(buf.getvalue()[:300])
    (root / "owl" / ".hidden").write_bytes(b"ignored")
    return root, want


def test_folder_tree(tree, tmp_path):
    root, want = tree
    out = tmp_path / "out"
    s = prep.run(out, folder_jobs(root, S))
    assert s["train"]["n"] == 7 and len(s["train"]["skipped"]) == 2 and "val" not in s
    images, labels, classes, _, _ = stored(out / "train.h5")
    assert classes == ["cat", "dog", "owl"]
    order = sorted(want)                     # classes in order, files sorted within a class
    assert list(labels) == [["cat", "dog", "owl"].index(r.split("/")[0]) for r in order]
    for img, rel in zip(images, order):
        # alpha compositing rounds its own way: within one level before the resize
        np.testing.assert_allclose(img, want[rel], atol=2 if "rgba" in rel else 0, err_msg=rel)
    gray = images[order.index("cat/c_gray.jpg")]
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    check_stats(out / "train.h5", images)
    lines = (out / "skipped.txt").read_text().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("train\t" + str(root / "owl" / "b_corrupt.jpg") + "\t")
    assert "c_truncated.jpg" in lines[1] and lines[1].count("\t") == 2
    # --strict: the first bad file stops the run and is named
    with pytest.raises(CpnetError, match=r"b_corrupt\.jpg.*--strict"):
        prep.run(tmp_path / "strict", folder_jobs(root, S), strict=True)


def test_folder_workers_and_val_fraction(tree, tmp_path):
    root, _ = tree
    jobs = folder_jobs(root, S, val_fraction=0.34, seed=1, unit=2)
    s = prep.run(tmp_path / "w", jobs, workers=2)
    assert s["train"]["n"] + s["val"]["n"] == 7
    ref = prep.run(tmp_path / "z", folder_jobs(root, S, val_fraction=0.34, seed=1, unit=5))
    for split in ("train", "val"):
        a, b = stored(tmp_path / "w" / f"{split}.h5"), stored(tmp_path / "z" / f"{split}.h5")
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
        assert s[split]["n"] == ref[split]["n"]
    _, vl, _, _, _ = stored(tmp_path / "w" / "val.h5")
    assert sorted(vl.tolist()) == [0, 1, 2]            # one of each class (3 * 0.34 rounds to 1)


def test_imagenet_val_layout(tree, tmp_path):
    root, want = tree
    flat = tmp_path / "val"
    flat.mkdir()
    rng = np.random.default_rng(5)
    pics = {f"ILSVRC_{i:03d}.png": rng.integers(0, 256, (S, S, 3), dtype=np.uint8) for i in range(5)}
    for name, a in pics.items():
        Image.fromarray(a).save(flat / name)
    names = sorted(pics)
    # one '<class>' per line, in sorted file order; names or 0-based indices
    (tmp_path / "labels.txt").write_text("owl\ncat\n1\n# comment\n\ndog\n0\n")
    s = prep.run(tmp_path / "o1", folder_jobs(root, S, val_root=flat, val_labels=tmp_path / "labels.txt"))
    vi, vl, _, vm, vc = stored(tmp_path / "o1" / "val.h5")
    _, _, _, tm, tc = stored(tmp_path / "o1" / "train.h5")
    assert list(vl) == [2, 0, 1, 1, 0] and s["val"]["n"] == 5
    np.testing.assert_array_equal(vi, np.stack([pics[n] for n in names]))
    np.testing.assert_array_equal(vm, tm)                # the training set's statistics
    np.testing.assert_array_equal(vc, tc)
    # '<file> <class>' lines; a listed file that is not there is skipped, not fatal
    (tmp_path / "pairs.txt").write_text(f"{names[3]} dog\n{names[0]} owl\nmissing.png cat\n")
    s = prep.run(tmp_path / "o2", folder_jobs(root, S, val_root=flat, val_labels=tmp_path / "pairs.txt"))
    _, vl, _, _, _ = stored(tmp_path / "o2" / "val.h5")
    assert list(vl) == [2, 1] and s["val"]["skipped"][0][0].endswith("missing.png")
    with pytest.raises(CpnetError, match=r"nolabels\.txt: no such labels file"):
        folder_jobs(root, S, val_root=flat, val_labels=tmp_path / "nolabels.txt")
    with pytest.raises(CpnetError, match=r"val: a flat validation folder needs --val-labels"):
        folder_jobs(root, S, val_root=flat)
    (tmp_path / "bad.txt").write_text("owl\ncat\nzebra\ndog\ncat\n")
    with pytest.raises(CpnetError, match=r"bad\.txt line 3: unknown class 'zebra'"):
        folder_jobs(root, S, val_root=flat, val_labels=tmp_path / "bad.txt")
    (tmp_path / "short.txt").write_text("owl\ncat\n")
    with pytest.raises(CpnetError, match=r"short\.txt: 2 labels for 5 files"):
        folder_jobs(root, S, val_root=flat, val_labels=tmp_path / "short.txt")


def test_folder_errors(tmp_path):
    (tmp_path / "r" / "a").mkdir(parents=True)
    (tmp_path / "r" / "b").mkdir()
    Image.new("RGB", (S, S)).save(tmp_path / "r" / "a" / "x.png")
    with pytest.raises(CpnetError, match=r"r/b: empty class folder"):
        folder_jobs(tmp_path / "r", S)
    with pytest.raises(CpnetError, match=r"nope: no such folder"):
        folder_jobs(tmp_path / "nope", S)
    (tmp_path / "flat").mkdir()
    with pytest.raises(CpnetError, match=r"flat: no class folders"):
        folder_jobs(tmp_path / "flat", S)


# ----------------------------------------------------------------------------------------------------- CIFAR

class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` opcodes (BINSTRING), as the real CIFAR batches (pickled by Python 2) do."""
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else
                   pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_pickle(obj):
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # the real files name numpy's pre-2.0 module path
    return buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def make_tar(path, members, mode="w:gz"):
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def cifar_data(rng, n, classes, fine=None):
    img = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    lab = rng.integers(0, classes, n)
    rows = img.transpose(0, 3, 1, 2).reshape(n, 3072)       # R plane, G plane, B plane, each row-major
    return img, lab, rows


def test_cifar10_binary_and_python(tmp_path):
    rng = np.random.default_rng(1)
    names = [f"class{i}" for i in range(10)]
    batches = [cifar_data(rng, 3, 10) for _ in range(6)]
    binm = {f"cifar-10-batches-bin/data_batch_{i + 1}.bin": np.concatenate(
        [b[1][:, None].astype(np.uint8), b[2]], axis=1).tobytes() for i, b in enumerate(batches[:5])}
    binm["cifar-10-batches-bin/test_batch.bin"] = np.concatenate(
        [batches[5][1][:, None].astype(np.uint8), batches[5][2]], axis=1).tobytes()
    binm["cifar-10-batches-bin/batches.meta.txt"] = ("\n".join(names) + "\n\n").encode()
    pym = {f"cifar-10-batches-py/data_batch_{i + 1}": py2_pickle(
        {b"batch_label": b"training batch", b"labels": b[1].tolist(), b"data": b[2], b"filenames": [b"x.png"] * 3})
        for i, b in enumerate(batches[:5])}
    pym["cifar-10-batches-py/test_batch"] = py2_pickle({b"labels": batches[5][1].tolist(), b"data": batches[5][2]})
    pym["cifar-10-batches-py/batches.meta"] = py2_pickle(
        {b"label_names": [n.encode() for n in names], b"num_cases_per_batch": 3})
    assert b"numpy.core.multiarray\n_reconstruct" in pym["cifar-10-batches-py/test_batch"]
    for kind, members in (("bin", binm), ("py", pym)):
        tb = make_tar(tmp_path / f"c10-{kind}.tar.gz", members)
        out = tmp_path / kind
        s = prep.run(out, cifar_jobs(tb))
        assert (s["train"]["n"], s["val"]["n"]) == (15, 3)
        im, lab, classes, _, _ = stored(out / "train.h5")
        np.testing.assert_array_equal(im, np.concatenate([b[0] for b in batches[:5]]))
        np.testing.assert_array_equal(lab, np.concatenate([b[1] for b in batches[:5]]))
        assert classes == names
        check_stats(out / "train.h5", im)
        vim, vlab, _, _, _ = stored(out / "val.h5")
        np.testing.assert_array_equal(vim, batches[5][0])
        np.testing.assert_array_equal(vlab, batches[5][1])
    # resized on request
    s = prep.run(tmp_path / "big", cifar_jobs(tmp_path / "c10-bin.tar.gz", size=40))
    with H5Dataset(tmp_path / "big" / "train.h5") as ds:
        assert ds.size == 40 and ds.n == 15


def test_cifar100_binary_and_python(tmp_path):
    rng = np.random.default_rng(2)
    fine, coarse = [f"f{i}" for i in range(100)], [f"c{i}" for i in range(20)]
    tr_img, tr_fine, tr_rows = cifar_data(rng, 7, 100)
    te_img, te_fine, te_rows = cifar_data(rng, 4, 100)
    tr_coarse, te_coarse = tr_fine // 5, te_fine // 5
    rec = lambda c, f, r: np.concatenate([c[:, None], f[:, None], r], axis=1).astype(np.uint8).tobytes()  # noqa
    binm = {"cifar-100-binary/train.bin": rec(tr_coarse, tr_fine, tr_rows),
            "cifar-100-binary/test.bin": rec(te_coarse, te_fine, te_rows),
            "cifar-100-binary/fine_label_names.txt": "\n".join(fine).encode(),
            "cifar-100-binary/coarse_label_names.txt": "\n".join(coarse).encode()}
    pym = {"cifar-100-python/train": py2_pickle({b"fine_labels": tr_fine.tolist(), b"coarse_labels":
                                                 tr_coarse.tolist(), b"data": tr_rows}),
           "cifar-100-python/test": py2_pickle({b"fine_labels": te_fine.tolist(), b"coarse_labels":
                                                te_coarse.tolist(), b"data": te_rows}),
           "cifar-100-python/meta": py2_pickle({b"fine_label_names": [n.encode() for n in fine],
                                                b"coarse_label_names": [n.encode() for n in coarse]})}
    for kind, members in (("bin", binm), ("py", pym)):
        tb = make_tar(tmp_path / f"c100-{kind}.tar.gz", members)
        prep.run(tmp_path / kind, cifar_jobs(tb))
        im, lab, classes, _, _ = stored(tmp_path / kind / "train.h5")
        np.testing.assert_array_equal(im, tr_img)
        np.testing.assert_array_equal(lab, tr_fine)
        assert classes == fine
        vim, vlab, _, _, _ = stored(tmp_path / kind / "val.h5")
        np.testing.assert_array_equal(vim, te_img)
        np.testing.assert_array_equal(vlab, te_fine)
        prep.run(tmp_path / (kind + "c"), cifar_jobs(tb, coarse=True))
        _, lab, classes, _, _ = stored(tmp_path / (kind + "c") / "train.h5")
        np.testing.assert_array_equal(lab, tr_coarse)
        assert classes == coarse


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_disallowed_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = py2_pickle({b"data": Evil(marker), b"labels": [0]})
    assert b"system" in evil
    pickle.loads(evil)                        # the payload is real: a plain unpickler runs it
    assert marker.exists()
    marker.unlink()
    ok = py2_pickle({b"labels": [0], b"data": np.zeros((1, 3072), np.uint8)})
    members = {f"cifar-10-batches-py/data_batch_{i}": ok for i in range(1, 6)}
    members["cifar-10-batches-py/data_batch_3"] = evil
    members["cifar-10-batches-py/test_batch"] = ok
    members["cifar-10-batches-py/batches.meta"] = py2_pickle({b"label_names": [b"a"]})
    tb = make_tar(tmp_path / "evil.tar.gz", members)
    with pytest.raises(CpnetError, match=r"evil\.tar\.gz:cifar-10-batches-py/data_batch_3: .*refused global "
                                         r"(posix|os|nt)\.system"):
        cifar_jobs(tb)
    assert not marker.exists()
    # an object array is refused as well
    members["cifar-10-batches-py/data_batch_3"] = py2_pickle(
        {b"labels": [0], b"data": np.array([None], dtype=object)})
    with pytest.raises(CpnetError, match="refused"):
        cifar_jobs(make_tar(tmp_path / "obj.tar.gz", members))


def test_cifar_errors(tmp_path):
    with pytest.raises(CpnetError, match=r"other\.tar: not a CIFAR-10/100 tarball"):
        cifar_jobs(make_tar(tmp_path / "other.tar", {"readme.txt": b"hi"}, mode="w"))
    (tmp_path / "plain.tar.gz").write_bytes(b"this is not a tarball at all")
    with pytest.raises(CpnetError, match=r"plain\.tar\.gz: not a tar archive"):
        cifar_jobs(tmp_path / "plain.tar.gz")
    members = {f"cifar-10-batches-bin/data_batch_{i}.bin": b"\0" * 3073 for i in range(1, 6)}
    members["cifar-10-batches-bin/test_batch.bin"] = b"\0" * 3000
    members["cifar-10-batches-bin/batches.meta.txt"] = b"a\nb\n"
    with pytest.raises(CpnetError, match=r"test_batch\.bin: 3000 bytes is not a whole number of 3073-byte"):
        cifar_jobs(make_tar(tmp_path / "short.tar.gz", members))
    with pytest.raises(CpnetError, match=r"absent\.tar\.gz: no such file"):
        cifar_jobs(tmp_path / "absent.tar.gz")


# ------------------------------------------------------------------------------------------------------- IDX

def idx_bytes(arr):
    return struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_idx_pair(tmp_path):
    rng = np.random.default_rng(3)
    tr, trl = rng.integers(0, 256, (9, 28, 28), dtype=np.uint8), rng.integers(0, 10, 9).astype(np.uint8)
    te, tel = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), rng.integers(0, 10, 4).astype(np.uint8)
    d = tmp_path / "mnist"
    d.mkdir()
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(tr)))
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(trl)))
    (d / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(te))
    (d / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(tel))
    s = prep.run(tmp_path / "out", idx_jobs(d))
    assert (s["train"]["n"], s["val"]["n"]) == (9, 4)
    im, lab, classes, _, _ = stored(tmp_path / "out" / "train.h5")
    np.testing.assert_array_equal(im, np.repeat(tr[..., None], 3, axis=-1))
    np.testing.assert_array_equal(lab, trl)
    assert classes == [str(i) for i in range(int(max(trl.max(), tel.max())) + 1)]
    check_stats(tmp_path / "out" / "train.h5", im)
    vim, vlab, _, _, _ = stored(tmp_path / "out" / "val.h5")
    np.testing.assert_array_equal(vim[..., 2], te)
    np.testing.assert_array_equal(vlab, tel)
    # a wrong magic number names the file
    (d / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(te))    # images where labels belong
    with pytest.raises(CpnetError, match=r"t10k-labels-idx1-ubyte: magic number 0x00000803, expected 0x00000801"):
        idx_jobs(d)
    os.remove(d / "train-labels-idx1-ubyte.gz")
    with pytest.raises(CpnetError, match=r"mnist: no train-labels-idx1-ubyte"):
        idx_jobs(d)


def test_idx_val_from_train_is_stratified_and_t10k_becomes_test(tmp_path):
    rng = np.random.default_rng(4)
    tr, trl = rng.integers(0, 256, (60, 10, 10), dtype=np.uint8), np.repeat(np.arange(3), [30, 20, 10]).astype(np.uint8)
    te, tel = rng.integers(0, 256, (5, 10, 10), dtype=np.uint8), np.array([0, 1, 2, 0, 1], np.uint8)
    tr[:, 0, 0] = np.arange(60)                     # every training image says which it is
    d = tmp_path / "f"
    d.mkdir()
    for name, arr in (("train-images-idx3-ubyte", tr), ("train-labels-idx1-ubyte", trl),
                      ("t10k-images-idx3-ubyte", te), ("t10k-labels-idx1-ubyte", tel)):
        (d / name).write_bytes(idx_bytes(arr))
    s = prep.run(tmp_path / "out", idx_jobs(d, size=10, val_from_train=0.2, seed=1))
    assert (s["train"]["n"], s["val"]["n"], s["test"]["n"]) == (48, 12, 5)
    im, lab, _, _, _ = stored(tmp_path / "out" / "train.h5")
    vim, vlab, _, _, _ = stored(tmp_path / "out" / "val.h5")
    assert np.bincount(vlab, minlength=3).tolist() == [6, 4, 2]           # 20 % of each class
    ids, vids = im[:, 0, 0, 0].tolist(), vim[:, 0, 0, 0].tolist()
    assert sorted(ids + vids) == list(range(60)) and ids == sorted(ids) and vids == sorted(vids)
    np.testing.assert_array_equal(lab, trl[ids])
    np.testing.assert_array_equal(vlab, trl[vids])
    check_stats(tmp_path / "out" / "train.h5", im)                       # the statistics of what is left
    tim, tlab, _, _, _ = stored(tmp_path / "out" / "test.h5")
    np.testing.assert_array_equal(tim[..., 0], te)
    np.testing.assert_array_equal(tlab, tel)
    with h5py.File(tmp_path / "out" / "test.h5", "r") as f, h5py.File(tmp_path / "out" / "train.h5", "r") as g:
        np.testing.assert_array_equal(f["mean"][...], g["mean"][...])
    # another seed holds out other images; the split is a function of the seed
    held = {seed: idx_jobs(d, size=10, val_from_train=0.2, seed=seed)["val"].tasks[0][1][0][:, 0, 0, 0].tolist()
            for seed in (1, 2)}
    assert held[1] == vids and held[2] != vids
    with pytest.raises(CpnetError, match=r"--val-from-train must be in \[0, 1\), got 1.5"):
        idx_jobs(d, val_from_train=1.5)
