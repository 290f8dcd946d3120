"""AlexNet with the paper's two towers (Krizhevsky, Sutskever & Hinton 2012, §3.2 and Figure 2).

Each tower holds half of every layer's kernels. Tower t's parameters and activations live on its own device
(`placement[t]`); activations cross towers only at the paper's exchanges:

    conv1 -> conv2                         own tower only
    conv3                                  reads BOTH towers' pool2 maps
    conv4 -> conv5                         own tower only
    fc6, fc7                               read BOTH towers' previous outputs
    fc8                                    reads both towers' fc7 (lives on tower 0)

Backward sends the gradients back along the same edges. Every crossing goes through `backend.transfer`, which is
a no-op when both towers share a device (one GPU, or the host).

`precision='bf16'` (cpnet.precision): the parameters stay float32, the input batch is rounded to bf16 on its
device, every activation and activation gradient is bf16, and the logits come back widened to float32 (the loss
and its gradient are float32; the gradient is rounded to bf16 on its way into fc8).
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import wait
from dataclasses import asdict, dataclass, field

import numpy as np

from . import ops, precision as _precision
from .backend import HOST, Device, check_bf16, default_placement, device_of, to_device, to_host, transfer, upload
from .config import DEFAULT_INIT
from .errors import CpnetError, OptionError
from .layers import (LRN, Conv2D, Dropout, Flatten, Linear, LRNPool, MaxPool, ParamBlock, PoolInLRN, ReLU,
                     ReLUInConv, Sequential, Tanh)
from .shapes import window_out

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")

# Per-tower convolution geometry (out channels per tower, kernel, stride, pad) and per-tower FC widths.
PRESETS = {
    # The paper's net: 227x227 crops (or 224 with conv1 padding 2), fc6 fan-in 6*6*256 = 9216.
    "alexnet": dict(
        conv=[(48, 11, 4, 0), (128, 5, 1, 2), (192, 3, 1, 1), (192, 3, 1, 1), (128, 3, 1, 1)],
        fc=(2048, 2048), crop=227, min_crop=None,
    ),
    # The same 8-layer two-tower topology scaled for 32x32 inputs (CIFAR-sized images stored at 36).
    "alexnet-small": dict(
        conv=[(32, 5, 1, 2), (64, 5, 1, 2), (96, 3, 1, 1), (96, 3, 1, 1), (64, 3, 1, 1)],
        fc=(256, 256), crop=32, min_crop=None,
    ),
    # Small enough for whole-network float64 gradient checks.
    "alexnet-tiny": dict(
        conv=[(3, 3, 1, 1), (4, 3, 1, 1), (4, 3, 1, 1), (4, 3, 1, 1), (3, 3, 1, 1)],
        fc=(6, 6), crop=15, min_crop=None,
    ),
}

# LRN and where it sits, per convention; `init` names the initialisation that goes with it (--init to use it).
CONVENTIONS = {
    # The paper's text (§3.3): k=2, n=5, alpha=1e-4 times the plain sum, beta=0.75; ReLU -> LRN -> pool.
    "paper": dict(lrn=dict(size=5, k=2.0, alpha=1e-4, beta=0.75, alpha_convention="sum"),
                  lrn_position="before_pool", init="paper"),
    # cuda-convnet(2)'s cmrnorm layer: alpha divided by the window size, k=2; LRN before pooling.
    "ccn2": dict(lrn=dict(size=5, k=2.0, alpha=1e-4, beta=0.75, alpha_convention="mean"),
                 lrn_position="before_pool", init="paper"),
    # Caffe's CaffeNet reference model: alpha/size, k=1, pooling BEFORE LRN, biases 0.1.
    "caffe": dict(lrn=dict(size=5, k=1.0, alpha=1e-4, beta=0.75, alpha_convention="mean"),
                  lrn_position="after_pool", init="caffe"),
}

INITS = ("paper", "caffe", "he")
ACTIVATIONS = ("relu", "tanh")


@dataclass
class NetConfig:
    """Everything that defines the network; stored as JSON in checkpoints."""

    preset: str
    num_classes: int
    crop: int
    conv: list
    fc: list
    conventions: str = "paper"
    init: str = "paper"
    lrn: dict | None = None
    lrn_position: str = "before_pool"
    pool: list = field(default_factory=lambda: [3, 2])
    activation: str = "relu"
    dropout: float = 0.5
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "NetConfig":
        d = json.loads(text)
        d["conv"] = [list(c) for c in d["conv"]]
        return cls(**d)


def make_config(preset="alexnet", num_classes=1000, crop=None, conventions="paper", init=None, activation="relu",
                lrn=True, pool=(3, 2), dropout=0.5, seed=0, width=1.0) -> NetConfig:
    """A checked NetConfig for a preset: the conventions' LRN, and `init` (default DEFAULT_INIT); `width`
    multiplies every layer's kernels and fc units (rounded, at least 1 per tower)."""
    if preset not in PRESETS:
        raise OptionError("model", repr(preset), f"expected one of {', '.join(PRESETS)}")
    if conventions not in CONVENTIONS:
        raise OptionError("conventions", repr(conventions), f"expected one of {', '.join(CONVENTIONS)}")
    init = init or DEFAULT_INIT
    if init not in INITS:
        raise OptionError("init", repr(init), f"expected one of {', '.join(INITS)}")
    if activation not in ACTIVATIONS:
        raise CpnetError(f"activation {activation!r}: expected one of {', '.join(ACTIVATIONS)}")
    if int(seed) < 0:
        raise OptionError("seed", seed, "expected 0 or more")
    if not 0 <= dropout < 1:
        raise OptionError("dropout", dropout, "expected a probability in [0, 1)")
    if len(pool) != 2 or min(pool) < 1:
        raise CpnetError(f"pool {pool}: expected (ksize, stride) of positive integers")
    if num_classes < 2:
        raise CpnetError(f"the dataset has {num_classes} class(es); a classifier needs at least 2")
    if not (width > 0 and math.isfinite(width)):
        raise OptionError("width", width, "expected a positive number (1: the preset's widths)")
    p = PRESETS[preset]
    crop = int(crop or p["crop"])
    conv = [[scaled_width(c[0], width), *c[1:]] for c in p["conv"]]
    if preset == "alexnet" and crop == 224:
        conv[0][3] = 2  # 224 crops with conv1 padding 2 give the same 55x55 maps as 227 crops without
    cfg = NetConfig(preset=preset, num_classes=int(num_classes), crop=crop, conv=conv,
                    fc=[scaled_width(f, width) for f in p["fc"]],
                    conventions=conventions, init=init,
                    lrn=dict(CONVENTIONS[conventions]["lrn"]) if lrn else None,
                    lrn_position=CONVENTIONS[conventions]["lrn_position"], pool=list(pool),
                    activation=activation, dropout=float(dropout), seed=int(seed))
    check_crop(cfg)
    return cfg


def scaled_width(units: int, width: float) -> int:
    """A preset's kernels (or fc units) per tower times --width, rounded half up, at least 1."""
    return max(1, int(math.floor(units * float(width) + 0.5)))


def feature_shapes(cfg: NetConfig, crop=None) -> dict:
    """Per-layer output shapes (whole network, both towers) for one image: {name: (C, H, W) or (D,)}."""
    n = int(crop or cfg.crop)
    pk, ps = cfg.pool
    shapes = {"input": (3, n, n)}
    for i, (f, k, s, p) in enumerate(cfg.conv):
        n = window_out(n, k, s, p)
        shapes[f"conv{i + 1}"] = (2 * f, n, n)
        if i in (0, 1, 4):
            n = window_out(n, pk, ps)
            shapes[f"pool{i + 1}"] = (2 * f, n, n)
    shapes["fc6"] = (2 * cfg.fc[0],)
    shapes["fc7"] = (2 * cfg.fc[1],)
    shapes["fc8"] = (cfg.num_classes,)
    return shapes


def min_crop(cfg: NetConfig) -> int:
    """The smallest crop for which every layer still has at least a 1x1 output."""
    for c in range(1, 1024):
        if all(min(s[1:] or (1,)) >= 1 for s in feature_shapes(cfg, c).values()):
            return c
    raise CpnetError(f"preset {cfg.preset}: no crop up to 1023 fits")


def fc6_fan_in(cfg: NetConfig, crop=None) -> int:
    c, h, w = feature_shapes(cfg, crop)["pool5"]
    return c * h * w


def check_crop(cfg: NetConfig, stored_size=None, pad=0):
    """The crop fits the preset, and the stored images where given: at most their size, or their size + 2 x pad
    for training crops that may leave the image by `pad` px on each side."""
    lo = min_crop(cfg)
    if cfg.crop < lo:
        raise OptionError("crop", cfg.crop, f"model {cfg.preset} needs crops of at least {lo}")
    if stored_size is not None and cfg.crop > stored_size + 2 * pad:
        raise OptionError("crop", cfg.crop, f"larger than the stored image size {stored_size}"
                          + (f" + 2 x --pad {pad}" if pad else ""))
    if cfg.preset == "alexnet" and cfg.crop in (224, 227) and fc6_fan_in(cfg) != 9216:
        raise AssertionError(f"alexnet fc6 fan-in is {fc6_fan_in(cfg)}, expected 9216")


_device_means: dict = {}  # (device, id of a host mean image) -> (that host array, its copy on the device)


def raw_input(x, dev: Device, dtype):
    """The network input of a raw batch (data.augment.RawBatch) on GPU `dev`, of `dtype` (float32, float64 or
    bf16): its buffer through `upload` (once per device, shared by the batch's slices), the loader's mean image
    once per device, then one launch of augment.cu with the crops, flips and lighting drawn by the loader; the
    same bits as the float32 loader's batch (widened or rounded to dtype as the model would)."""
    from . import kernels

    buf = x.on_device.get(dev)
    if buf is None:
        buf = x.on_device[dev] = upload(x.used(), dev)
    key = (dev, id(x.mean_chw))
    held = _device_means.get(key)
    if held is None or held[0] is not x.mean_chw:
        if len(_device_means) >= 8:  # loaders come and go (training, validation, a few evaluations)
            _device_means.clear()
        held = _device_means[key] = (x.mean_chw, to_device(x.mean_chw, dev))
    lay = x.layout
    table, shift, pixels = lay.parts(buf)
    return kernels.augment_gpu(pixels, table, shift, held[1], dtype, lay.crop, lay.windowed, x.scale,
                               first=x.first, n=x.n)


def _init_params(cfg: NetConfig, dtype) -> list[dict]:
    """Host arrays for every layer of every tower, drawn from one generator in a fixed order.

    paper: W ~ N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6, fc7 (to give ReLUs positive inputs), 0 elsewhere.
    caffe: as bvlc_alexnet: W ~ N(0, 0.01), fc6/fc7 N(0, 0.005); biases 0.1 where the paper has 1.
    he:    W ~ N(0, sqrt(2 / fan_in)) (fc8: sqrt(1 / fan_in), no ReLU follows it); biases 0.
    """
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x1A1E]))
    ones = {"conv2", "conv4", "conv5", "fc6", "fc7"}
    chans_in = [3] + [c[0] for c in cfg.conv[:-1]]
    towers = [{}, {}]

    def draw(name, shape, fan_in):
        if cfg.init == "he":  # gain 2 for layers that feed a ReLU; fc8 feeds the softmax
            std, bias = np.sqrt((1.0 if name == "fc8" else 2.0) / fan_in), 0.0
        elif cfg.init == "caffe":
            std = 0.005 if name in ("fc6", "fc7") else 0.01
            bias = 0.1 if name in ones else 0.0
        else:
            std, bias = 0.01, (1.0 if name in ones else 0.0)
        W = (rng.standard_normal(shape) * std).astype(dtype)
        b = np.full(shape[0], bias, dtype=dtype)
        return {"W": W, "b": b}

    for t in range(2):
        for i, (f, k, _, _) in enumerate(cfg.conv):
            cin = chans_in[i] * (2 if i == 2 else 1)  # conv3 reads both towers
            towers[t][f"conv{i + 1}"] = draw(f"conv{i + 1}", (f, cin, k, k), cin * k * k)
        fin = fc6_fan_in(cfg)
        towers[t]["fc6"] = draw("fc6", (cfg.fc[0], fin), fin)
        towers[t]["fc7"] = draw("fc7", (cfg.fc[1], 2 * cfg.fc[0]), 2 * cfg.fc[0])
    towers[0]["fc8"] = draw("fc8", (cfg.num_classes, 2 * cfg.fc[1]), 2 * cfg.fc[1])
    return towers


@dataclass
class Stage:
    """One step of the towers' schedule: `streams[s]` (a Sequential) runs on `devices[s]`, one stream per tower, or
    one for both towers fused (and for fc8). `gathers`: the stage reads both towers' previous outputs, so an
    exchange comes before it (none where there is only one previous output: a fused model's)."""
    name: str
    streams: list
    devices: list
    gathers: bool


class AlexNet:
    """The two-tower network. `forward` takes a batch (host or device array), returns logits on tower 0's device.

    `stages` is the schedule, walked in order by forward and in reverse by backward: stem (conv1-pool2, own tower),
    mid (conv3-pool5, conv3 reading both towers), fc6, fc7 (both towers' inputs), fc8 (tower 0, both towers'
    fc7). Both walks take an optional `hook(name, phase, devices, call)` that runs every layer call and every
    exchange (`call()` does the work and its result must be returned): bench times each call through it.
    Backward also takes `done(layers)`, told which layers' gradients are complete as soon as they are: after
    each layer where the streams run one after the other, after the stage where two host towers run in two
    threads (on the calling thread, in the same order on every run). cpnet.dist starts a flat buffer's
    reduction from it once every gradient in the buffer is there.
    """

    def __init__(self, cfg: NetConfig, placement: list[Device] | None = None, dtype=np.float32, params=None,
                 check_devices: bool | None = None, tower_threads: bool | None = None, fuse: bool | None = None,
                 precision: str = "fp32"):
        self.cfg = cfg
        self.dtype = np.dtype(dtype)  # the parameters'
        self.precision = precision
        self.act_dtype = _precision.activation_dtype(precision, self.dtype)  # the activations'
        self.bf16 = self.act_dtype == _precision.BF16
        self.devices = list(placement or default_placement(2))
        if len(self.devices) != 2:
            raise ValueError("AlexNet needs a placement of 2 devices (one per tower)")
        if self.bf16:
            for dev in dict.fromkeys(self.devices):
                check_bf16(dev)
        self.check_devices = bool(int(os.environ.get("CPNET_DEBUG_DEVICES", "0"))) if check_devices is None \
            else check_devices
        host = _init_params(cfg, self.dtype) if params is None else _split_params(params, self.dtype)
        self.fused = self._choose_fuse(fuse)
        self.lrn_pool = self._choose_lrn_pool()
        placed = self._place(host)
        act = ReLU if cfg.activation == "relu" else Tanh
        # on GPUs the ReLU after each convolution runs in its output's layout pass (as the fused towers' do)
        in_conv = cfg.activation == "relu" and all(d.is_gpu for d in self.devices)
        self.towers = []  # per tower: [stem, mid, fc6, fc7] Sequentials
        for t in range(2):
            P = placed[t]
            conv = [Conv2D(P[f"conv{i + 1}"]["W"], P[f"conv{i + 1}"]["b"], stride=c[2], pad=c[3], input_grad=i > 0,
                           relu=in_conv)
                    for i, c in enumerate(cfg.conv)]
            fc6, fc7 = (Linear(P[n]["W"], P[n]["b"]) for n in ("fc6", "fc7"))
            drops = [Dropout(cfg.dropout, seed=cfg.seed * 4 + 2 * t + i) for i in range(2)]
            self.towers.append([Sequential(ls) for ls in self.stage_layers(
                conv, fc6, fc7, *drops, act=act, conv_act=ReLUInConv if in_conv else None)])
        self.fc8 = Linear(placed[0]["fc8"]["W"], placed[0]["fc8"]["b"])
        self.fused_net = None
        if self.fused:  # both towers as one grouped stream on their device, on the same parameter memory
            from .fused import FusedTowers

            self.fused_net = FusedTowers(self, act)
        self.stages = self._stage_table()
        self._widths = {}
        # two host towers run in two threads unless told otherwise (or only one CPU is there)
        if tower_threads is None:
            tower_threads = os.environ.get("CPNET_TOWER_THREADS", "1") != "0" and (os.cpu_count() or 1) >= 2
        self._pool = None
        if tower_threads and not self.fused and not any(d.is_gpu for d in self.devices):
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cpnet-tower")

    def _choose_fuse(self, fuse) -> bool:
        """Towers sharing a GPU run fused (half the kernel launches, larger products); CPNET_FUSE_TOWERS=0|1."""
        if fuse is None:
            env = os.environ.get("CPNET_FUSE_TOWERS", "").strip()
            if env not in ("", "0", "1"):
                raise CpnetError(f"CPNET_FUSE_TOWERS={env!r}: expected 0 or 1 (unset: fused on a shared GPU)")
            fuse = self.devices[0] == self.devices[1] and (self.devices[0].is_gpu if env == "" else env == "1")
        if fuse and self.devices[0] != self.devices[1]:
            raise ValueError("fused towers need both towers on one device")
        return bool(fuse)

    def _choose_lrn_pool(self) -> bool:
        """LRN -> pool of layers 1-2 as one layer (LRNPool: one kernel each way) where the towers run on GPUs and the
        conventions normalise before pooling (paper, ccn2; Caffe pools first and stays apart);
        CPNET_FUSE_LRN_POOL=0 keeps them apart, =1 fuses them wherever the conventions allow (the host then runs
        the same two ops inside one layer)."""
        env = os.environ.get("CPNET_FUSE_LRN_POOL", "").strip()
        if env not in ("", "0", "1"):
            raise CpnetError(f"CPNET_FUSE_LRN_POOL={env!r}: expected 0 or 1 (unset: fused on a GPU)")
        from .ops.lrnpool import fusable

        cfg = self.cfg
        allowed = cfg.lrn is not None and cfg.lrn_position == "before_pool" and fusable(cfg.pool[0])
        return allowed and (all(d.is_gpu for d in self.devices) if env == "" else env == "1")

    def _place(self, host) -> list[dict]:
        """The host parameters on their towers' devices; fused, each layer's two towers are row blocks (views) of
        one array."""
        placed = [{}, {}]
        for name in host[0]:
            if self.fused and name != "fc8":
                with self.devices[0]:
                    full = {k: to_device(np.concatenate([host[0][name][k], host[1][name][k]]), self.devices[0])
                            for k in host[0][name]}
                n = host[0][name]["W"].shape[0]
                placed[0][name] = {k: v[:n] for k, v in full.items()}
                placed[1][name] = {k: v[n:] for k, v in full.items()}
                continue
            for t in range(2 if name != "fc8" else 1):
                with self.devices[t]:
                    placed[t][name] = {k: to_device(v, self.devices[t]) for k, v in host[t][name].items()}
        return placed

    def stage_layers(self, conv, fc6, fc7, drop6, drop7, act, lrn=LRN, conv_act=None, lrn_pool=LRNPool) -> list[list]:
        """The (name, layer) lists of the stages stem, mid, fc6, fc7 from one tower's (or the fused) layers;
        `conv_act` (default `act`): the layer class of act1-act5, the activations after the convolutions. With
        self.lrn_pool, lrn1/lrn2 are `lrn_pool` layers (LRN and pool in one) and pool1/pool2 their PoolInLRN."""
        cfg = self.cfg
        pk, ps = cfg.pool
        cact = conv_act or act

        def norm_pool(tag):
            pool = (f"pool{tag}", MaxPool(ksize=pk, stride=ps))
            if cfg.lrn is None:
                return [pool]
            if self.lrn_pool:
                return [(f"lrn{tag}", lrn_pool(**cfg.lrn, ksize=pk, stride=ps)), (f"pool{tag}", PoolInLRN())]
            norm = (f"lrn{tag}", lrn(**cfg.lrn))
            return [norm, pool] if cfg.lrn_position == "before_pool" else [pool, norm]

        return [[("conv1", conv[0]), ("act1", cact())] + norm_pool(1) + [("conv2", conv[1]), ("act2", cact())]
                + norm_pool(2),
                [("conv3", conv[2]), ("act3", cact()), ("conv4", conv[3]), ("act4", cact()), ("conv5", conv[4]),
                 ("act5", cact()), ("pool5", MaxPool(ksize=pk, stride=ps)), ("flat", Flatten())],
                [("fc6", fc6), ("act6", act()), ("drop6", drop6)],
                [("fc7", fc7), ("act7", act()), ("drop7", drop7)]]

    def _stage_table(self) -> list[Stage]:
        names, gathers = ("stem", "mid", "fc6", "fc7"), (False, True, True, True)
        if self.fused:
            dev = [self.devices[0]]
            stages = [Stage(n, [seq], dev, g) for n, seq, g in zip(names, self.fused_net.streams, gathers)]
        else:
            stages = [Stage(n, [self.towers[t][i] for t in range(2)], list(self.devices), g)
                      for i, (n, g) in enumerate(zip(names, gathers))]
        return stages + [Stage("fc8", [Sequential([("fc8", self.fc8)])], [self.devices[0]], True)]

    def tower_layer(self, t, name):
        """Tower t's layer called `name` ('conv1', 'drop6', ...)."""
        for seq in self.towers[t]:
            for lname, layer in seq.named():
                if lname == name:
                    return layer
        raise KeyError(name)

    # ---- parameters -------------------------------------------------------------------------------------------
    def param_slots(self):
        """[(name, layer, key, tower)] for every parameter, in a fixed order ('t0.conv1.W', ..., 'fc8.b')."""
        slots = []
        for t in range(2):
            for seq in self.towers[t]:
                for lname, layer in seq.named():
                    for key in layer.params:
                        slots.append((f"t{t}.{lname}.{key}", layer, key, t))
        for key in self.fc8.params:
            slots.append((f"fc8.{key}", self.fc8, key, 0))
        return slots

    def param_memory(self) -> list[ParamBlock]:
        """The parameter memory, as an optimizer updates it and a gradient reduction sums it: every contiguous
        parameter array with the named parameters that are its rows. Two-tower: one block per parameter; fused:
        one per fused layer array (both towers' rows), then fc8's."""
        if self.fused_net is not None:
            return self.fused_net.param_blocks() + [
                ParamBlock(self.fc8, key, self.devices[0], [(f"fc8.{key}", self.fc8, 0, w.shape[0])])
                for key, w in self.fc8.params.items()]
        return [ParamBlock(layer, key, self.devices[t], [(name, layer, 0, layer.params[key].shape[0])])
                for name, layer, key, t in self.param_slots()]

    def params(self) -> dict:
        return {name: layer.params[key] for name, layer, key, _ in self.param_slots()}

    def grads(self) -> dict:
        return {name: layer.grads.get(key) for name, layer, key, _ in self.param_slots()}

    def host_params(self) -> dict:
        return {name: to_host(v) for name, v in self.params().items()}

    def num_params(self) -> int:
        return int(sum(v.size for v in self.params().values()))

    def set_params(self, host_params: dict, into: dict | None = None):
        """Copy host arrays {name: array} into the parameters (or into `into`, e.g. an optimizer's velocities, an
        array per parameter name); names and shapes are checked first."""
        missing = [n for n, *_ in self.param_slots() if n not in host_params]
        if missing:
            raise CpnetError(f"parameters missing: {', '.join(missing[:5])}")
        for name, layer, key, t in self.param_slots():
            v = np.asarray(host_params[name])
            if v.shape != layer.params[key].shape:
                raise CpnetError(f"parameter {name}: shape {v.shape}, the model expects {layer.params[key].shape}")
        for name, layer, key, t in self.param_slots():
            dst = layer.params[key] if into is None else into[name]
            with self.devices[t]:
                dst[...] = to_device(np.asarray(host_params[name]).astype(self.dtype, copy=False), self.devices[t])

    def conv1_weights(self):
        """conv1 kernels as a host array (2*F, 3, k, k): tower 0's first, then tower 1's (the paper's Figure 3)."""
        return np.concatenate([to_host(self.tower_layer(t, "conv1").params["W"]) for t in range(2)], axis=0)

    # ---- exchanges --------------------------------------------------------------------------------------------
    def _check(self, a, t):
        if self.check_devices and device_of(a) != self.devices[t]:
            raise AssertionError(f"tower {t}: array on {device_of(a)}, expected {self.devices[t]}")
        return a

    def gather(self, parts, t):
        """Concatenate both towers' activations (channels / features) on tower t's device."""
        dev = self.devices[t]
        with dev:
            return self._check(dev.xp.concatenate([transfer(p, dev) for p in parts], axis=1), t)

    def scatter(self, d, widths, into):
        """Split a gradient w.r.t. a gathered input and add each piece into its source tower's accumulator."""
        start = 0
        for s, w in enumerate(widths):
            dev = self.devices[s]
            piece = d[:, start:start + w]
            start += w
            with dev:
                piece = transfer(piece, dev)
                into[s] = piece.copy() if into[s] is None else _precision.add(into[s], piece)
        return into

    # ---- forward / backward: one walk over the stage table each ---------------------------------------------
    def set_step(self, step: int, offset: int = 0):
        """The training iteration: dropout masks are a function of (seed, step, global row); `offset` is the
        global row of this batch's first row (a data-parallel replica's share starts there; 0 otherwise)."""
        for t in range(2):
            for name in ("drop6", "drop7"):
                layer = self.tower_layer(t, name)
                layer.step, layer.offset = step, int(offset)

    def _each(self, fn, n, hook=None):
        """[fn(0), ..., fn(n-1)]: the streams of a stage. When both towers live on the host they run side by side in
        two threads (NumPy releases the GIL inside its array loops and BLAS), as the paper's towers ran on two
        GPUs; results are the same as one after the other, since the towers share nothing inside a stage. With a
        hook (timing each call) they run one after the other."""
        if not self._threaded(n, hook):
            return [fn(s) for s in range(n)]
        futures = [self._pool.submit(fn, s) for s in range(n)]
        wait(futures)  # both towers finish (or fail) before anyone reads a result or touches the layers again
        return [f.result() for f in futures]

    def _threaded(self, n, hook) -> bool:
        return self._pool is not None and n > 1 and hook is None

    @staticmethod
    def _call(hook, name, phase, devices, call):
        return call() if hook is None else hook(name, phase, devices, call)

    def _layers(self, st, s, x, phase, train, hook, done=None):
        """Stream s of stage `st`, forward or backward, on its device; `done([layer])` after each backward layer
        that has parameters."""
        seq, dev = st.streams[s], st.devices[s]
        with dev:
            if hook is None and done is None:
                return self._check(seq.forward(x, train), s) if phase == "forward" else seq.backward(x)
            layers = seq.layers if phase == "forward" else reversed(seq.layers)
            for name, layer in layers:
                fn = (lambda a, layer=layer: layer.forward(a, train)) if phase == "forward" else layer.backward
                x = fn(x) if hook is None else hook(name, phase, [dev], lambda fn=fn, a=x: fn(a))
                if done is not None and layer.params:
                    done([layer])
            return self._check(x, s) if phase == "forward" else x

    def forward(self, x, train=False, upto=None, hook=None):
        """Logits (N, classes) on tower 0's device; `upto='fc7'` returns both towers' fc7 outputs (features)."""
        if x.ndim != 4 or x.shape[1:] != (3, self.cfg.crop, self.cfg.crop):
            raise CpnetError(f"input batch has shape {tuple(x.shape)}, the model expects (N, 3, {self.cfg.crop}, "
                             f"{self.cfg.crop})")
        inputs = {}  # the batch goes to each distinct device once (not an exchange: to_device, not transfer)
        raw = getattr(x, "raw_batch", False)  # uint8 pixels and choices (data.augment.RawBatch): augmented here
        for dev in self.devices:
            if dev not in inputs:
                with dev:
                    if raw and dev.is_gpu:  # the pixels through the pinned upload, the crops by augment.cu
                        inputs[dev] = raw_input(x, dev, self.act_dtype)
                        continue
                    # a host batch through a pinned buffer on a side stream (GPU)
                    xd = upload(x.expand() if raw else x, dev)
                    if self.bf16:
                        xd = _precision.to_bf16(xd)
                    inputs[dev] = xd if xd.dtype == self.act_dtype else xd.astype(self.dtype)
        h = [inputs[dev] for dev in self.stages[0].devices]
        for st in self.stages:
            if st.gathers and len(h) > 1:
                self._widths[st.name] = [a.shape[1] for a in h]
                h = self._call(hook, "exchange", "forward", self.devices,
                               lambda h=h, n=len(st.streams): [self.gather(h, s) for s in range(n)])
            if upto == "fc7" and st.name == "fc8":
                return self._widen(h[0])
            h = self._each(lambda s, st=st, h=h: self._layers(st, s, h[s], "forward", train, hook), len(st.streams),
                           hook)
        return self._widen(h[0])

    def _widen(self, a):
        """A bf16 output as float32 (on its device); other precisions' outputs as they are."""
        if not self.bf16:
            return a
        with device_of(a):
            return _precision.from_bf16(a)

    def backward(self, dlogits, hook=None, done=None):
        """Gradients for every parameter (in each layer's .grads) from d loss / d logits; `done` as in the class
        docstring."""
        if self.bf16 and not _precision.is_bf16(dlogits):
            with device_of(dlogits):
                dlogits = _precision.to_bf16(dlogits)
        d = [dlogits]
        for st in reversed(self.stages):
            n = len(st.streams)
            threaded = self._threaded(n, hook)
            d = self._each(lambda s, st=st, d=d: self._layers(st, s, d[s], "backward", False, hook,
                                                              None if threaded else done), n, hook)
            if done is not None and threaded:
                done([layer for seq in st.streams for _, layer in reversed(seq.layers) if layer.params])
            widths = self._widths.get(st.name) if st.gathers else None
            if widths:
                d = self._call(hook, "exchange", "backward", self.devices,
                               lambda d=d, w=widths: self._scatter_all(d, w))
        if self.fused_net is not None:
            self.fused_net.grads_to_towers()

    def _scatter_all(self, ds, widths):
        acc = [None] * len(widths)
        for dt in ds:  # stream order, so the sums are the same however the towers ran
            self.scatter(dt, widths, acc)
        return acc

    def loss(self, x, labels, train=True, hook=None):
        """Forward pass and mean softmax cross-entropy; returns (loss, logits) and keeps what backward needs."""
        logits = self.forward(x, train, hook=hook)
        dev = self.devices[0]
        with dev:
            if dev.is_gpu and isinstance(labels, np.ndarray) and labels.dtype != np.int32 and labels.size \
                    and -2**31 <= labels.min() and labels.max() < 2**31:
                labels = labels.astype(np.int32)  # the loss kernel's type, converted here rather than on the GPU
            labels = to_device(labels, dev)
            loss, self._loss_cache = self._call(hook, "loss", "forward", [dev],
                                                lambda: ops.softmax_cross_entropy_forward(logits, labels))
        return loss, logits

    def loss_backward(self, hook=None, done=None):
        dev = self.devices[0]
        with dev:
            dlogits = self._call(hook, "loss", "backward", [dev],
                                 lambda: ops.softmax_cross_entropy_backward(self._loss_cache))
        self._loss_cache = None
        self.backward(dlogits, hook, done)

    def clear(self):
        for st in self.stages:
            for seq in st.streams:
                seq.clear()
        if self.fused_net is not None:
            for t in range(2):
                for seq in self.towers[t]:
                    seq.clear()


def _split_params(flat: dict, dtype) -> list[dict]:
    """{'t0.conv1.W': ...} -> [{'conv1': {'W': ...}}, {...}] as host arrays of `dtype`."""
    towers = [{}, {}]
    for name, v in flat.items():
        if name.startswith("fc8."):
            t, layer, key = 0, "fc8", name.split(".")[1]
        else:
            tt, layer, key = name.split(".")
            t = int(tt[1:])
        towers[t].setdefault(layer, {})[key] = np.asarray(v).astype(dtype)
    # layer names inside Sequential are conv1.., fc6.. ; both match the parameter names
    return towers


def build_model(cfg: NetConfig, placement=None, dtype=np.float32, params=None, check_devices=None,
                tower_threads=None, fuse=None, precision="fp32") -> AlexNet:
    return AlexNet(cfg, placement=placement, dtype=dtype, params=params, check_devices=check_devices,
                   tower_threads=tower_threads, fuse=fuse, precision=precision)


__all__ = ["AlexNet", "NetConfig", "PRESETS", "CONVENTIONS", "INITS", "make_config", "build_model", "feature_shapes",
           "min_crop", "fc6_fan_in", "HOST"]
