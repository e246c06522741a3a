"""The training configuration: architecture presets and :class:`TrainConfig` (the paper's recipe).

The paper's recipe (Shen et al., CVPR 2022, section 3) is the default of :class:`TrainConfig`:
crop 224, batch 12, 45,000 iterations, Adam (lr 2.25e-4, weight decay 1e-4), lr x0.1 at 22,500
and 37,500.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..inference import DEFAULT_SCALES
from ..modeling.crm import OFFICIAL_ARCH, CRMArch

__all__ = [
    "DEFAULT_LOSS_WEIGHTS",
    "PAPER_ITERATIONS",
    "PAPER_MILESTONES",
    "PRESETS",
    "TrainConfig",
    "resolve_arch",
]

PRESETS: dict[str, CRMArch] = {
    # The authors' network (ResNet-50 trunk, 256-channel features): encoder 15.0 GMACs for a
    # 224 x 224 input, 9.30 M trained parameters (without layer4).
    "official": OFFICIAL_ARCH,
    # ResNet-18-like basic-block trunk, 128-channel features: 4.57 GMACs, 2.96 M parameters.
    "lite": CRMArch(block="basic", layers=(2, 2, 2, 2), width=64, feat_dim=128, with_layer4=False),
    # Half-width lite (1.18 GMACs, 0.75 M parameters), for tests and quick experiments.
    "tiny": CRMArch(block="basic", layers=(2, 2, 2, 2), width=32, feat_dim=64, with_layer4=False),
    # EfficientNet-Lite trunks (ImageNet-initialisable with init="imagenet"), 128-channel
    # features: 0.87 M (lite0) and 1.15 M (lite1) parameters.
    "effnet_lite0": CRMArch(encoder="efficientnet_lite0", feat_dim=128, with_layer4=False),
    "effnet_lite1": CRMArch(encoder="efficientnet_lite1", feat_dim=128, with_layer4=False),
}
# The paper's term weights; "boundary" (0 = off) is crm_d2's optional boundary emphasis.
DEFAULT_LOSS_WEIGHTS = {"ce": 1.0, "l1": 0.5, "l2": 0.5, "grad": 2.0, "boundary": 0.0}
# The paper's lr steps (22,500 and 37,500 of 45,000 iterations) as fractions of the schedule.
PAPER_ITERATIONS = 45_000
PAPER_MILESTONES = (22_500, 37_500)
AMP_MODES = ("none", "bf16", "fp16")


def resolve_arch(arch: str | CRMArch | dict) -> CRMArch:
    """A preset name (``"official"``, ``"lite"``, ``"tiny"``), a CRMArch or its dict -> CRMArch."""
    if isinstance(arch, CRMArch):
        return arch
    if isinstance(arch, str):
        if arch not in PRESETS:
            raise ValueError(f"unknown architecture preset {arch!r}; choose from {sorted(PRESETS)}")
        return PRESETS[arch]
    if isinstance(arch, dict):
        return CRMArch.from_dict(arch)
    raise ValueError(f"arch must be a preset name, a CRMArch or a dict, got {type(arch).__name__}")


@dataclass
class TrainConfig:
    """Everything :func:`train` needs besides the data. Defaults are the paper's recipe.

    Attributes:
        arch: preset name (see :data:`PRESETS`), :class:`CRMArch` or its dict. layer4 is never
            run, so it is left out of the trained network whatever the preset says.
        crop_size: S, the side of the training crops (paper 224); must match the datasets'.
        batch_size: global batch (paper 12); each of the N ranks gets ``batch_size // N``.
        iterations: optimizer steps in total (paper 45,000).
        lr: Adam learning rate (paper 2.25e-4).
        lr_mult: ``{parameter-name prefix: factor}``: those parameters train at ``lr * factor``
            (e.g. ``{"pixel_skip": 10}`` for a zero-initialised :attr:`CRMArch.pixel_skip`
            added to trained weights); empty = the paper's single lr.
        weight_decay: Adam (L2) weight decay (paper 1e-4).
        milestones: iterations where the lr is multiplied by ``gamma``; None scales the paper's
            (22,500, 37,500 of 45,000) to ``iterations``.
        gamma: lr factor at each milestone (paper 0.1).
        loss_weights: ``ce``, ``l1``, ``l2``, ``grad`` weights of :func:`crm_loss` and its
            ``boundary`` emphasis (0 = the paper's loss).
        num_workers: DataLoader worker processes per rank (0 = load in the main process).
        seed: seeds model initialisation, data order, augmentation streams and dropout.
        log_every: iterations between training log lines / metrics records.
        val_every: iterations between validations (0 = only at the end).
        ckpt_every: iterations between ``last.pth`` writes (it is always written at the end).
        val_scales: scales of :meth:`CRMRefiner.refine` during validation (the official
            ``(0.125, 0.25, 0.5, 1.0)``; fewer is cheaper), also stored in the saved weights as
            their default inference scales.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` autocast of the encoder; CUDA only (ignored
            with a warning elsewhere). The decoder and the loss always run in float32.
        init: ``"scratch"`` (random initialisation), ``"imagenet"`` (EfficientNet-Lite encoders:
            the trunk from the ImageNet file of the training extra, the mask channel at zero,
            the rest random; ``"imagenet:PATH"`` names the file) or a checkpoint path for
            fine-tuning (the official ``model_45705`` or a project file); tensors that do not
            match the architecture by name and shape are skipped and listed in the log.
        resume: None (start fresh), ``"auto"`` (continue from ``output_dir/last.pth`` if it
            exists) or the path of a ``last.pth`` to continue from.
        output_dir: where checkpoints and metrics go.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        threads: ``torch.set_num_threads`` for this process (None = torch's default).
        data: human-readable description of the training data, recorded in the checkpoints.
        dist_timeout_min: collective timeout in minutes (rank 0 validates while others wait).
        time_limit_min: stop after the first iteration past this many minutes of this start's
            wall time (validate, write ``last.pth`` and the final weights as at the end; a
            ``--resume`` continues towards ``iterations``); None = no limit. For machines lent
            for a fixed time.
    """

    arch: str | CRMArch | dict = "official"
    crop_size: int = 224
    batch_size: int = 12
    iterations: int = PAPER_ITERATIONS
    lr: float = 2.25e-4
    lr_mult: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 1e-4
    milestones: tuple[int, ...] | None = None
    gamma: float = 0.1
    loss_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LOSS_WEIGHTS))
    num_workers: int = 2
    seed: int = 0
    log_every: int = 20
    val_every: int = 2000
    ckpt_every: int = 1000
    val_scales: tuple[float, ...] = DEFAULT_SCALES
    amp: str = "none"
    init: str = "scratch"
    resume: str | None = None
    output_dir: str = "output/crm_train"
    device: str = "auto"
    threads: int | None = None
    data: tuple[str, ...] = ()
    dist_timeout_min: float = 60.0
    time_limit_min: float | None = None

    def __post_init__(self) -> None:
        resolve_arch(self.arch)
        positive = ("crop_size", "batch_size", "iterations", "log_every", "ckpt_every")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.val_every < 0 or self.num_workers < 0:
            raise ValueError("val_every and num_workers must be >= 0")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 < self.gamma <= 1:
            raise ValueError(
                f"need lr > 0, weight_decay >= 0 and 0 < gamma <= 1, got lr={self.lr}, "
                f"weight_decay={self.weight_decay}, gamma={self.gamma}"
            )
        self.lr_mult = {str(k): float(v) for k, v in self.lr_mult.items()}
        if any(not v > 0 for v in self.lr_mult.values()):
            raise ValueError(f"lr_mult factors must be > 0, got {self.lr_mult}")
        unknown = set(self.loss_weights) - set(DEFAULT_LOSS_WEIGHTS)
        if unknown:
            raise ValueError(
                f"unknown loss weights {sorted(unknown)}; allowed: {sorted(DEFAULT_LOSS_WEIGHTS)}"
            )
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **self.loss_weights}
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.time_limit_min is not None and not self.time_limit_min > 0:
            raise ValueError(f"time_limit_min must be > 0, got {self.time_limit_min}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.milestones is not None:
            self.milestones = tuple(int(m) for m in self.milestones)
            if (
                list(self.milestones) != sorted(self.milestones)
                or min(self.milestones, default=1) < 1
            ):
                raise ValueError(f"milestones must be increasing and >= 1, got {self.milestones}")
        self.val_scales = tuple(float(s) for s in self.val_scales)
        self.data = tuple(self.data)

    @property
    def training_arch(self) -> CRMArch:
        """The trained architecture: :attr:`arch` without the never-run layer4."""
        return dataclasses.replace(resolve_arch(self.arch), with_layer4=False)

    @property
    def lr_milestones(self) -> tuple[int, ...]:
        """The milestones in use (explicit, or the paper's scaled to :attr:`iterations`)."""
        if self.milestones is not None:
            return self.milestones
        return tuple(
            max(1, round(m * self.iterations / PAPER_ITERATIONS)) for m in PAPER_MILESTONES
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the architecture resolved to its fields)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["arch"] = self.training_arch.to_dict()
        d["arch_name"] = self.arch if isinstance(self.arch, str) else None
        d["milestones"] = list(self.lr_milestones)
        d["val_scales"] = list(self.val_scales)
        d["data"] = list(self.data)
        return d
