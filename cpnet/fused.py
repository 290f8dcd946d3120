"""Both towers on one device as one grouped stream (model.AlexNet with fused towers), on the same memory.

When both towers share a device, running them one after the other only halves every product. Fused, each stage
of the model's schedule is one stream over both towers' channels: conv2, conv4, conv5 are groups=2 convolutions
(each tower reads only its own channels), conv1, conv3, fc6 and fc7 one product over both towers' kernels (they
read the whole input anyway), and LRN and dropout run per tower, so the results are the two-tower run's.

The parameters live once: each fused layer's W and b is one array whose row blocks are the towers' parameters
(the towers' layers hold views), so checkpoints, `set_params` and the per-tower names work unchanged, and the
model's parameter memory (`param_blocks`) is one block per fused array with the towers' rows in it.
"""

from __future__ import annotations

from . import ops
from .layers import LRN, Conv2D, Layer, Linear, LRNPool, ParamBlock, ReLUInConv, Sequential

# groups of each fused convolution: 2 where a tower reads only its own tower's maps (the paper's Figure 2)
GROUPS = {"conv1": 1, "conv2": 2, "conv3": 1, "conv4": 2, "conv5": 2}


class FusedTowers:
    """The fused streams of the model's stages (stem, mid, fc6, fc7; fc8 is the model's own), built on `model`'s
    tower layers: their parameter arrays' memory and their dropout layers (so set_step reaches both)."""

    def __init__(self, model, act):
        self.model = model
        cfg = model.cfg

        def full(name, key):
            a = model.tower_layer(0, name).params[key]
            return a.base if a.base is not None else a

        # On a GPU the ReLU after each convolution runs inside its output's layout pass (one kernel each way
        # where there were two; the same bits)
        in_conv = cfg.activation == "relu" and model.devices[0].is_gpu
        conv = [Conv2D(full(n, "W"), full(n, "b"), stride=c[2], pad=c[3], groups=GROUPS[n], input_grad=n != "conv1",
                       relu=in_conv)
                for n, c in zip(GROUPS, cfg.conv)]
        fc6, fc7 = (Linear(full(n, "W"), full(n, "b")) for n in ("fc6", "fc7"))
        drops = [_PerTower(*(model.tower_layer(t, n) for t in range(2)), axis=1) for n in ("drop6", "drop7")]
        with model.devices[0]:
            self.streams = [Sequential(layers) for layers in
                            model.stage_layers(conv, fc6, fc7, *drops, act=act, lrn=_TowerLRN, lrn_pool=_TowerLRNPool,
                                               conv_act=ReLUInConv if in_conv else None)]

    def named(self):
        return [nl for seq in self.streams for nl in seq.named()]

    def grads_to_towers(self):
        """Hand each tower's layers their rows of the fused gradients (views, no copies)."""
        for lname, layer in self.named():
            if not layer.params:
                continue
            for t in range(2):
                tl = self.model.tower_layer(t, lname)
                for key, g in layer.grads.items():
                    n = tl.params[key].shape[0]
                    tl.grads[key] = g[t * n:(t + 1) * n]

    def param_blocks(self) -> list[ParamBlock]:
        """One block per fused parameter array, the towers' parameters its row halves."""
        blocks = []
        for lname, layer in self.named():
            for key, w in layer.params.items():
                n = w.shape[0] // 2
                parts = [(f"t{t}.{lname}.{key}", self.model.tower_layer(t, lname), t * n, (t + 1) * n)
                         for t in range(2)]
                blocks.append(ParamBlock(layer, key, self.model.devices[0], parts))
        return blocks

    def clear(self):
        for seq in self.streams:
            seq.clear()


def _as_towers(a):
    """(N, 2C, H, W) -> the view (2N, C, H, W): each image's two towers' maps as two images."""
    n, c, h, w = a.shape
    return a.reshape(2 * n, c // 2, h, w)


def _as_fused(a):
    """The inverse view of _as_towers: (2N, C, H, W) -> (N, 2C, H, W)."""
    n, c, h, w = a.shape
    return a.reshape(n // 2, 2 * c, h, w)


class _PerTowerChannels:
    """A layer over both towers' channels at once without mixing them: (N, 2C, H, W) is viewed as (2N, C, H, W)
    (LRN's window stays inside its tower; pooling is per channel anyway)."""

    def forward(self, x, train=False):
        return _as_fused(super().forward(_as_towers(x), train))

    def backward(self, dy):
        return _as_fused(super().backward(_as_towers(dy)))


class _TowerLRN(_PerTowerChannels, LRN):
    pass


class _TowerLRNPool(_PerTowerChannels, LRNPool):
    pass


class _PerTower(Layer):
    """Both towers' dropout layers on the fused (N, 2U) activation: tower 0's layer (its seed) for the first U
    units, tower 1's for the rest, each drawing the mask it draws alone (ops.dropout_towers_forward: one kernel
    per direction on a GPU); the identity when dropout is off."""

    def __init__(self, first, second, axis=1):
        super().__init__()
        if axis != 1 or first.p != second.p:
            raise ValueError("fused dropout needs both towers' layers on the feature axis with one p")
        self.parts = (first, second)

    def forward(self, x, train=False):
        first, second = self.parts
        # step and offset are set on each tower's layer by model.set_step (the same for both)
        y, self._cache = ops.dropout_towers_forward(x, first.p, (first.seed, second.seed), first.step, train,
                                                    first.offset)
        return y

    def backward(self, dy):
        dx = ops.dropout_backward(dy, self._cache)
        self._cache = None
        return dx

    def clear(self):
        self._cache = None
        for p in self.parts:
            p.clear()
