"""bench/launch_count.py: a training step on the GPU code path without a GPU (a stand-in CuPy on NumPy, cpnet's
kernels through the host shim), its launches counted; and that step against the host path's."""

import numpy as np
import pytest

from cpnet import backend, kernels


def test_launches_of_a_fused_training_step(lc):
    r = lc.count_step("alexnet-tiny", batch_size=2, steps=2)
    ours = r["cpnet kernels"]
    assert ours == r["launcher"]  # the stand-in's RawModule and the launcher's own counter agree
    # one multi-tensor update, one dropout kernel per fused dropout layer, one loss kernel each way
    assert ours["augment_kernel"] == 1  # the input from the raw batch, as cpnet train on a GPU feeds it
    assert ours["sgd_momentum_multi_kernel"] == 1 and "sgd_momentum_kernel" not in ours
    assert ours["dropout_towers_forward_kernel"] == 2 and "dropout_forward_kernel" not in ours
    assert ours["softmax_xent_forward_kernel"] == ours["softmax_xent_backward_kernel"] == 1
    assert ours["im2col_kernel"] == 5 and ours["col2im_kernel"] == 4  # conv1 has no input gradient
    # conv1-5's bias and ReLU in their layout pass, each way; fc6 and fc7's ReLU on their own
    assert ours["conv_layout_forward_kernel"] == ours["conv_layout_backward_kernel"] == 5
    assert ours["relu_forward_kernel"] == ours["relu_backward_kernel"] == 2
    # LRN -> pool of layers 1-2 in one kernel each way; pool5 on its own
    assert r["lrn_pool"] and ours["lrn_pool_forward_kernel"] == ours["lrn_pool_backward_kernel"] == 2
    assert "lrn_forward_kernel" not in ours and "lrn_backward_kernel" not in ours
    assert ours["maxpool_forward_kernel"] == ours["maxpool_backward_kernel"] == 1
    # conv: 2 groups in conv2, 4, 5 -> 8 products forward, 8 weight gradients, 7 input gradients (not conv1's);
    # fc6, fc7, fc8: 3 forward, 3 weight gradients, 3 input gradients
    assert r["cublas"] == 8 + 8 + 7 + 9
    assert r["total"] == sum(ours.values()) + r["cupy"] + r["cublas"] + r["copy"]
    ops = r["cupy ops"]
    assert "cupy:concatenate" not in ops and "cupy:exp.__call__" not in ops  # the old dropout and loss paths
    assert "cupy:ascontiguousarray (copy)" not in ops  # conv backward's layout copy: in the layout kernel
    assert ops["cupy:add.__call__"] == 3  # only fc6-fc8's bias adds (the conv biases: in the layout pass)
    assert r["total"] <= 96, r


def test_fusing_lrn_and_pool_saves_four_launches_and_the_bytes_computed(lc):
    """CPNET_FUSE_LRN_POOL=0 puts layers 1-2's LRN and pool apart again: 4 launches more per step (2 LRN and 2 pool
    kernels each way become 2 fused ones each way), nothing else changes; and the bytes of the arrays those kernels
    are handed in a step are what lrn_pool_traffic computes from the shapes, apart and fused."""
    fused = lc.count_step("alexnet-tiny", batch_size=2, steps=2)
    apart = lc.count_step("alexnet-tiny", batch_size=2, steps=2, lrn_pool=0)
    assert fused["lrn_pool"] and not apart["lrn_pool"]
    assert apart["total"] - fused["total"] == 4
    assert apart["cpnet kernels"]["lrn_forward_kernel"] == apart["cpnet kernels"]["lrn_backward_kernel"] == 2
    assert apart["cpnet kernels"]["maxpool_forward_kernel"] == 3 and "lrn_pool_forward_kernel" not in apart["cpnet kernels"]
    for kind in ("cupy", "cublas", "copy"):
        assert apart[kind] == fused[kind], kind
    t = lc.lrn_pool_traffic("alexnet-tiny", 2, "fp32")
    moved = {name: sum(r["kernel bytes"].get(k, 0) for k in lc.LRN_POOL_KERNELS) for name, r in
             (("fused", fused), ("apart", apart))}
    pool5 = fused["kernel bytes"]["maxpool_forward_kernel"] + fused["kernel bytes"]["maxpool_backward_kernel"]
    assert moved["fused"] - pool5 == t["fused"]["step"]
    assert moved["apart"] - pool5 == t["apart"]["step"]
    assert moved["apart"] - moved["fused"] == t["saved_per_step"] > 0
    big = lc.lrn_pool_traffic("alexnet", 128, "fp32")  # the figure docs/PERFORMANCE.md quotes
    assert big["layers"]["lrn1+pool1"]["E"] == 128 * 96 * 55 * 55 and big["layers"]["lrn2+pool2"]["P"] == 128 * 256 * 13 * 13
    assert round(big["saved_per_step"] / 1e6) == 1797


def test_the_gpu_path_on_the_stand_in_matches_the_host(lc):
    """Two training steps of the fused model (dropout on) on the GPU code path, against the host path in float64:
    the loss kernels, the towers' dropout kernel, the convolutions' layout kernels with bias and ReLU, the fused
    LRN -> pool kernels of layers 1-2 and the multi-tensor update in a real step."""
    from conftest import fused_training_steps

    from cpnet.model import make_config

    cfg = make_config("alexnet-tiny", 5, 15, seed=2)
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((4, 3, 15, 15)), rng.integers(0, 5, 4)

    def step(placement):
        loss, opt = fused_training_steps(cfg, x, y, placement, dtype=np.float64)
        return loss, opt.model.host_params(), {k: backend.to_host(v) for k, v in opt.velocity.items()}

    want = step([backend.HOST] * 2)
    with lc.stand_in():
        kernels.launch_counts.clear()
        got = step([backend.Device("gpu", 0)] * 2)
        assert kernels.launch_counts["dropout_towers_forward_kernel"] > 0
        assert kernels.launch_counts["conv_layout_backward_kernel"] > 0
        assert kernels.launch_counts["lrn_pool_backward_kernel"] > 0 and not kernels.launch_counts["lrn_forward_kernel"]
    assert got[0] == pytest.approx(want[0], rel=1e-12)
    for g, w in zip(got[1:], want[1:]):
        for k in w:
            np.testing.assert_allclose(g[k], w[k], rtol=1e-10, atol=1e-13, err_msg=k)


def test_the_two_tower_gpu_path_with_fused_lrn_pool_on_the_stand_in_matches_the_host(lc):
    """Towers not fused (CPNET_FUSE_TOWERS=0 on one GPU, or two GPUs): each tower's LRN -> pool is one LRNPool layer
    and each convolution's ReLU is in its layout pass on the GPU path; one step's loss and gradients against the
    host path in float64."""
    from cpnet.model import build_model, make_config

    cfg = make_config("alexnet-tiny", 5, 15, seed=2)
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((3, 3, 15, 15)), rng.integers(0, 5, 3)

    def step(placement):
        m = build_model(cfg, placement=placement, dtype=np.float64, fuse=False, tower_threads=False)
        loss, _ = m.loss(x, y)
        m.loss_backward()
        return m, float(loss), {k: backend.to_host(g) for k, g in m.grads().items()}

    _, want_loss, want = step([backend.HOST] * 2)
    with lc.stand_in():
        kernels.launch_counts.clear()
        m, got_loss, got = step([backend.Device("gpu", 0)] * 2)
        assert m.lrn_pool and kernels.launch_counts["lrn_pool_forward_kernel"] == 4  # 2 layers x 2 towers
        assert not kernels.launch_counts["lrn_forward_kernel"]
        # the ReLU of conv1-conv5 in their layout pass, as on the fused path: only fc6 and fc7's on their own
        assert kernels.launch_counts["conv_layout_backward_kernel"] == 2 * 5
        assert kernels.launch_counts["relu_forward_kernel"] == kernels.launch_counts["relu_backward_kernel"] == 4
    assert got_loss == pytest.approx(want_loss, rel=1e-12)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=1e-13, err_msg=k)


def test_the_batch_upload_through_pinned_buffers_on_a_side_stream(lc):
    """backend.upload on the stand-in: the same arrays as to_device; the side stream copies only after the compute
    stream released the slot's device buffer (at the upload after next), the compute stream waits for each copy,
    and a pinned buffer is refilled only after its last copy."""
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((3, 2, 4, 4)).astype(np.float32) for _ in range(4)]
    with lc.stand_in():
        dev = backend.Device("gpu", 0)
        lc.stream_log.clear()
        outs = [backend.upload(x, dev) for x in xs[:2]]
        for o, x in zip(outs, xs):
            assert backend.is_gpu_array(o) and o.dtype == x.dtype and o.shape == x.shape
            np.testing.assert_array_equal(backend.to_host(o), x)  # the first still valid after the second
        log = list(lc.stream_log)
        third = backend.upload(xs[2], dev)  # slot 0 again
        np.testing.assert_array_equal(backend.to_host(third), xs[2])
        log3 = lc.stream_log[len(log):]
        backend.upload(xs[3][:2], dev)  # smaller: the same buffers
        lc.stream_log.clear()
        saved = backend.PINNED_UPLOAD
        backend.PINNED_UPLOAD = False
        try:
            plain = backend.upload(xs[0], dev)
        finally:
            backend.PINNED_UPLOAD = saved
        assert not lc.stream_log and np.array_equal(backend.to_host(plain), xs[0])
    kinds = [(e[0], e[1]) if e[0] != "sync" else ("sync",) for e in log]
    # upload 1 (slot 0, new buffer): released by the compute stream, copied on the side stream, waited for
    assert kinds[:4] == [("record", "compute"), ("wait", "side"), ("record", "side"), ("wait", "compute")]
    assert log[1][2] is log[0][2] and log[3][2] is log[2][2]
    # upload 2 (slot 1): the same, and slot 0 released (every read of batch 1 is queued by then)
    assert kinds[4:] == [("record", "compute"), ("wait", "side"), ("record", "side"), ("record", "compute"),
                         ("wait", "compute")]
    released0 = log[7][2]
    # upload 3 (slot 0): its pinned buffer's last copy done, the side stream waits on slot 0's release
    assert log3[0] == ("sync", log[2][2]) and log3[1] == ("wait", "side", released0)


def test_a_training_step_uploads_its_batch_through_the_pinned_path(lc):
    """One pinned copy a step either way; the raw batch (uint8 crop windows, 44 bytes of choices an image:
    a table row of 8 int32 with random erasing's box, 3 float32 of lighting) is
    close to a quarter of the float32 batch's bytes, and costs one launch more (augment.cu)."""
    r = {i: lc.count_step("alexnet-tiny", batch_size=2, steps=2, input=i) for i in ("raw", "float")}
    for i in r:
        assert r[i]["cupy ops"].get("copy:host to device (pinned, side stream)") == 1  # the batch; labels as before
    c = 15  # alexnet-tiny's crop
    assert r["float"]["upload bytes"] == 2 * 3 * c * c * 4
    assert r["raw"]["upload bytes"] == 2 * (3 * c * c + 8 * 4 + 3 * 4)
    assert 3.7 < r["float"]["upload bytes"] / r["raw"]["upload bytes"] < 4
    assert "augment_kernel" not in r["float"]["cpnet kernels"]
    assert r["raw"]["total"] == r["float"]["total"] + 1
