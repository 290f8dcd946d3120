"""The settings of a training run, written once: `cpnet train`'s flags and defaults, the ablations' runs and the
checkpoints' `train` record all come from TrainConfig.

A plain dataclass with no heavy imports, so the CLI reads its defaults when it declares its flags.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

# The paper's N(0, 0.01) did not start learning alexnet-small on the synthetic set within 2 epochs, where He's
# initialisation on unit-variance inputs did (README, "Conventions and initialisation"): he is the default.
DEFAULT_INIT = "he"


@dataclass
class TrainConfig:
    data: str
    out: str
    model: str = "alexnet-small"
    width: float = 1.0  # multiplies the preset's kernels per layer and fc units (runs before it: 1)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decay_biases: bool = False
    schedule: str = "plateau"
    patience: int = 1
    step_epochs: int = 10
    seed: int = 0
    workers: int | None = None  # loader worker processes; None: backend.default_loader_workers()
    crop: int | None = None
    pad: int = 0  # training crops may leave the image by this many pixels (runs from before --pad: 0)
    conventions: str = "paper"
    init: str | None = DEFAULT_INIT  # None: DEFAULT_INIT as well (checkpoints of older runs hold None)
    activation: str = "relu"
    lrn: bool = True
    pool: list = field(default_factory=lambda: [3, 2])
    dropout: float = 0.5
    lighting: float = 0.1
    erase: float = 0.0  # random erasing: the probability of a crop getting a mean-coloured box (runs before it: 0)
    scale: float | None = None  # None: 1/std of the mean-subtracted pixels for --init he, else 1 (0-255 inputs)
    resume: bool = False
    validate: bool = True
    max_iterations: int | None = None
    threads: int | None = None  # host BLAS threads per tower; None: backend.default_host_threads(workers)
    sync_every: int | None = None  # steps between loss read-backs (and on_step calls); None: 1 on the host, 20 on a GPU
    gpus_per_replica: int | None = None  # GPUs per data-parallel replica (1: towers fused, 2: a tower each); None: auto
    precision: str = "fp32"  # fp32 | tf32 | bf16 (cpnet.precision); a resumed run may change it


def defaults(cls=TrainConfig) -> dict:
    """{field: default} of a config dataclass; fields without a default are left out."""
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out
