"""The GPU input path: loaders hand over raw batches (uint8 pixels and the per-crop choices, data.augment.RawBatch)
that the model turns into its input on the GPU (cpnet/kernels/augment.cu). Without a GPU: the loaders' raw batches
against their float32 batches, and the model's GPU path on bench/launch_count.py's stand-in CuPy (the kernels
through the host shim) against the host path."""

import os

import numpy as np
import pytest
from bitwise import float_bits
from conftest import fused_training_steps, invoke

from cpnet import backend
from cpnet.data import EvalLoader, TrainLoader
from cpnet.errors import CpnetError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu_input")
    r = invoke("prep", "synthetic", "--out", d, "--n", "24", "--classes", "3", "--size", "17", "--seed", "3", "-q")
    assert r.exit_code == 0, r.output
    return d


def _expand(x):
    return x.expand()


@pytest.mark.parametrize("workers, crop, erase", [(0, 13, 0.0), (1, 13, 0.5), (0, 20, 0.5)])  # 20: beyond 17 px
def test_raw_training_batches_are_the_float_batches(data_dir, workers, crop, erase):
    """Batch for batch, a raw loader's RawBatch expands to the float32 loader's batch, bit for bit (crops with a
    --pad border, flips, lighting, input scale, random erasing; in-process and through worker processes' shared
    slots)."""
    path = os.path.join(data_dir, "train.h5")
    kw = dict(seed=4, lighting=0.1, scale=1 / 64, pad=3, workers=workers, erase=erase)
    with TrainLoader(path, 5, crop, **kw) as plain, TrainLoader(path, 5, crop, raw=True, **kw) as raw:
        assert raw.raw and not plain.raw
        for epoch in (0, 1):
            pairs = list(zip(plain.epoch(epoch), raw.epoch(epoch), strict=True))
            assert len(pairs) == 4
            for (x, y), (r, ry) in pairs:
                assert getattr(r, "raw_batch", False) and r.shape == x.shape == (5, 3, crop, crop)
                np.testing.assert_array_equal(ry, y)
                np.testing.assert_array_equal(float_bits(_expand(r)), float_bits(x))
                # the crop windows (or the whole images, when smaller) and 44 bytes of choices an image (a table
                # row of 8 int32, 3 float32 of lighting shift)
                assert r.nbytes == 5 * (min(crop, 17) ** 2 * 3 + 44)
            del pairs, x, r


@pytest.mark.parametrize("views", ["center", "ten"])
@pytest.mark.parametrize("crop, pad", [(13, 0), (19, 1)])  # 19: beyond the 17 px stored images
def test_raw_evaluation_batches_are_the_float_batches(data_dir, views, crop, pad):
    path = os.path.join(data_dir, "val.h5")
    kw = dict(views=views, scale=0.5, pad=pad)
    with EvalLoader(path, 4, crop, **kw) as plain, EvalLoader(path, 4, crop, raw=True, **kw) as raw:
        for (x, y), (r, ry) in zip(plain, raw, strict=True):
            assert r.shape == x.shape
            np.testing.assert_array_equal(ry, y)
            np.testing.assert_array_equal(float_bits(_expand(r)), float_bits(x))
            # ten views of 17 px images at crop 13: the whole image once (17^2 px) beats ten windows (10 * 13^2);
            # a crop larger than the image: the whole image too
            assert r.layout.windowed == (views == "center" and crop <= 17)


def test_the_switch(monkeypatch):
    gpu = backend.Device("gpu", 0)
    monkeypatch.delenv("CPNET_GPU_AUGMENT", raising=False)
    assert backend.gpu_augment([gpu, gpu]) and not backend.gpu_augment([backend.HOST] * 2)
    monkeypatch.setenv("CPNET_GPU_AUGMENT", "0")
    assert not backend.gpu_augment([gpu, gpu])
    monkeypatch.setenv("CPNET_GPU_AUGMENT", "yes")
    with pytest.raises(CpnetError, match="CPNET_GPU_AUGMENT='yes': expected 0 or 1"):
        backend.gpu_augment([gpu, gpu])


def test_a_training_step_from_raw_batches_on_the_gpu_path_matches_the_host(lc):
    """Two training steps of the fused model on the GPU code path (the stand-in CuPy) fed a raw batch, whose input
    augment.cu makes on the device, against the host path fed the float32 batch of the same images and choices;
    in float64 (the input widened from float32 either way), within test_launch_count's tolerance. The raw batch
    uploads once for both steps (the batch's device copy is shared), the mean image once."""
    from cpnet.model import make_config

    cfg = make_config("alexnet-tiny", 5, 15, seed=2)
    raw, x = lc.raw_batches(15, 4, seed=7, pad=2)(0)
    y = np.random.default_rng(3).integers(0, 5, 4)

    def step(placement, batch):
        loss, opt = fused_training_steps(cfg, batch, y, placement, dtype=np.float64)
        return loss, opt.model.host_params(), {k: backend.to_host(v) for k, v in opt.velocity.items()}

    want = step([backend.HOST] * 2, x)
    from cpnet import kernels

    with lc.stand_in():
        kernels.launch_counts.clear()
        backend.reset_upload_stats()
        got = step([backend.Device("gpu", 0)] * 2, raw)
        assert kernels.launch_counts["augment_kernel"] == 2
        assert backend.upload_stats() == {"bytes": raw.nbytes, "count": 1}
    assert got[0] == pytest.approx(want[0], rel=1e-12)
    for g, w in zip(got[1:], want[1:]):
        for k in w:
            np.testing.assert_allclose(g[k], w[k], rtol=1e-10, atol=1e-13, err_msg=k)
    # a host model given a raw batch expands it in NumPy (the same bits as the float32 batch)
    again = step([backend.HOST] * 2, raw)
    assert again[0] == want[0]


def test_validation_on_ten_views_from_raw_batches_on_the_gpu_path(lc, data_dir):
    """evaluate() over a raw EvalLoader (ten views from whole images, in chunks of crops) on the stand-in GPU path
    gives the host's figures from the float32 loader."""
    from cpnet.evaluate import evaluate
    from cpnet.model import build_model, make_config

    cfg = make_config("alexnet-tiny", 3, 15, seed=5)
    path = os.path.join(data_dir, "val.h5")
    host = build_model(cfg, placement=[backend.HOST] * 2, dtype=np.float64)
    with EvalLoader(path, 3, 15, views="ten", scale=1 / 64) as loader:
        want = evaluate(host, loader, chunk=7)
    with lc.stand_in():
        gpu = build_model(cfg, placement=[backend.Device("gpu", 0)] * 2, dtype=np.float64)
        with EvalLoader(path, 3, 15, views="ten", scale=1 / 64, raw=True) as loader:
            backend.reset_upload_stats()
            got = evaluate(gpu, loader, chunk=7)
            assert backend.upload_stats()["count"] == len(loader)  # one upload a batch, whatever the chunks
    assert got["n"] == want["n"] > 0 and got["top1"] == want["top1"] and got["top5"] == want["top5"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_raw_input_on_a_gpu_is_the_float_batch(lc, precision):
    """On a real GPU: the input augment.cu makes from a raw batch (with a --pad border) is the float32 loader's
    batch bit for bit (bf16: that batch rounded by precision.to_bf16), the batch through the pinned upload."""
    from cpnet import precision as prec
    from cpnet.model import raw_input

    cp = backend.cupy_module()
    raw, x = lc.raw_batches(31, 6, seed=11, pad=3)(0)
    dev = backend.Device("gpu", 0)
    dtype = prec.BF16 if precision == "bf16" else np.float32
    with dev:
        got = cp.asnumpy(raw_input(raw, dev, dtype))
    want = prec.to_bf16(x) if precision == "bf16" else x
    np.testing.assert_array_equal(got.view(np.uint16 if precision == "bf16" else np.uint32),
                                  want.view(np.uint16 if precision == "bf16" else np.uint32))
