"""The CRM training loop (Shen et al., CVPR 2022, §3): Adam + MultiStepLR on full-grid queries.

Shape shorthand: B = per-rank batch, S = crop size, Q = S * S queries per crop, H, W = size of a
full validation image.

One iteration: encode the (B, 3, S, S) crop and its (B, 1, S, S) coarse mask, decode ALL S x S
pixel centres of the crop (cell 2 / S) with :meth:`CRMNet.decode_grid`, and apply
:func:`~crm_d2.training.losses.crm_loss` to the (B, 1, S, S) logits against the soft ground
truth. The paper's recipe is the default of :class:`TrainConfig`: crop 224, batch 12, 45,000
iterations, Adam (lr 2.25e-4, weight decay 1e-4), lr x0.1 at 22,500 and 37,500.

Files written to ``TrainConfig.output_dir`` (rank 0 only):

* ``last.pth``: the training state (weights, optimizer, scheduler, iteration, every rank's RNG
  states, best validation so far), written atomically every ``ckpt_every`` iterations and at the
  end; ``resume`` continues from it exactly. It is also a valid project checkpoint
  (:func:`~crm_d2.checkpoint.load_crm` reads it; the training state comes back as metadata).
* ``best.pth``: project-format weights with the highest validation IoU gain so far.
* ``model_final.pth``: the final weights for release, float16, without layer4, with the
  inference scales and a ``training`` record (data, iterations, wall time, hardware). The
  stored scales are ``val_scales``, the schedule the run was validated with (``best.pth`` and
  ``last.pth`` store them too), so the file refines as it was measured.
* ``metrics.jsonl``: one JSON dict per training log, validation and checkpoint event.
* ``config.json``: the configuration of the latest start; ``val_samples.json``: the validation
  images and how each one's coarse mask was made.

Distributed data parallel: launched with ``torchrun`` (``WORLD_SIZE`` > 1 in the environment),
:func:`train` initialises the process group (NCCL on CUDA, gloo on CPU), shards the data with a
:class:`~torch.utils.data.DistributedSampler` and wraps the model in DDP; each rank gets
``batch_size // world_size`` samples; only rank 0 logs, validates and writes files.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler

from ..checkpoint import FORMAT_NAME, FORMAT_VERSION, load_crm, load_state_dict_file, save_crm
from ..coarse import CoarseKind, parse_kinds
from ..distributed import DistInfo, init_distributed
from ..evaluation.binary import object_scores
from ..inference import DEFAULT_SCALES, CRMRefiner
from ..io import torch_save, write_json
from ..modeling.crm import OFFICIAL_ARCH, CRMArch, CRMNet
from .datasets import PairSource
from .losses import crm_loss

__all__ = [
    "PRESETS",
    "TrainConfig",
    "ValSample",
    "load_imagenet_init",
    "load_init_weights",
    "make_val_samples",
    "resolve_arch",
    "train",
    "validate",
]

logger = logging.getLogger(__name__)

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
DEFAULT_LOSS_WEIGHTS = {"ce": 1.0, "l1": 0.5, "l2": 0.5, "grad": 2.0}
# The paper's lr steps (22,500 and 37,500 of 45,000 iterations) as fractions of the schedule.
PAPER_ITERATIONS = 45_000
PAPER_MILESTONES = (22_500, 37_500)
_AMP_MODES = ("none", "bf16", "fp16")

LAST_NAME = "last.pth"
BEST_NAME = "best.pth"
FINAL_NAME = "model_final.pth"
METRICS_NAME = "metrics.jsonl"
VAL_LIST_NAME = "val_samples.json"


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
        weight_decay: Adam (L2) weight decay (paper 1e-4).
        milestones: iterations where the lr is multiplied by ``gamma``; None scales the paper's
            (22,500, 37,500 of 45,000) to ``iterations``.
        gamma: lr factor at each milestone (paper 0.1).
        loss_weights: ``ce``, ``l1``, ``l2``, ``grad`` weights of :func:`crm_loss`.
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
    """

    arch: str | CRMArch | dict = "official"
    crop_size: int = 224
    batch_size: int = 12
    iterations: int = PAPER_ITERATIONS
    lr: float = 2.25e-4
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
        unknown = set(self.loss_weights) - set(DEFAULT_LOSS_WEIGHTS)
        if unknown:
            raise ValueError(
                f"unknown loss weights {sorted(unknown)}; allowed: {sorted(DEFAULT_LOSS_WEIGHTS)}"
            )
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **self.loss_weights}
        if self.amp not in _AMP_MODES:
            raise ValueError(f"amp must be one of {_AMP_MODES}, got {self.amp!r}")
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


# ============================================================================ validation data


@dataclass
class ValSample:
    """One full validation image with its ground truth and a fixed coarse mask.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        gt: (H, W) uint8 0..255 ground truth.
        coarse: (H, W) uint8 0..255 coarse mask (the refiner's input).
        name: sample name.
        perturb: the coarse kind that made ``coarse`` (a :class:`~crm_d2.coarse.CoarseKind`
            name, e.g. ``"stride8_binary"``).
    """

    image: np.ndarray
    gt: np.ndarray
    coarse: np.ndarray
    name: str
    perturb: str


VAL_KINDS = ("perturb", "stride8", "stride8_binary", "maskrcnn")


def make_val_samples(
    sources: Sequence[PairSource],
    seed: int = 0,
    max_per_source: int | None = None,
    kinds: Sequence[str] = VAL_KINDS,
) -> list[ValSample]:
    """Load held-out images and give each a fixed coarse mask (deterministic in ``seed``).

    Sample ``k`` gets the coarse kind ``kinds[k % len(kinds)]`` (see :mod:`crm_d2.coarse`),
    rendered from the ground truth binarised at 128 with ``np.random.default_rng([seed, k])``.
    Images whose ground truth is empty are skipped.

    Args:
        sources: pair sources (anything with ``__len__`` and ``load(idx)``).
        seed: seed of the random kinds.
        max_per_source: keep at most this many samples per source, evenly spaced (None = all).
        kinds: coarse kinds to rotate through.

    Returns:
        the samples, in source order.
    """
    parsed: tuple[CoarseKind, ...] = parse_kinds(list(kinds))
    if not parsed:
        raise ValueError("make_val_samples needs at least one coarse kind")
    entries = []
    for si, src in enumerate(sources):
        n = len(src)
        idx = range(n)
        if max_per_source is not None and n > max_per_source:
            idx = np.unique(np.linspace(0, n - 1, max_per_source).round().astype(int)).tolist()
        entries += [(si, int(i)) for i in idx]
    samples, empty = [], 0
    for k, (si, i) in enumerate(entries):
        image, mask, name = sources[si].load(i)
        fg = np.where(mask >= 128, 255, 0).astype(np.uint8)
        if not fg.any():
            empty += 1
            continue
        kind = parsed[k % len(parsed)]
        coarse = kind.render(fg, np.random.default_rng([seed, k]))
        samples.append(ValSample(image, mask, coarse, name, kind.name))
    if empty:
        logger.info("validation: skipped %d sample(s) with an empty ground truth", empty)
    return samples


@torch.no_grad()
def validate(
    model: CRMNet,
    samples: Sequence[ValSample],
    device: torch.device | str = "cpu",
    scales: Sequence[float] = DEFAULT_SCALES,
) -> dict[str, float]:
    """Refine every validation sample with a frozen copy of ``model`` and score it.

    Uses :meth:`CRMRefiner.refine` (the official multi-scale schedule at ``scales``) on an
    eval-mode copy, so ``model`` itself is untouched. Binary masks are ``prob > 0.5`` for the
    refined output and ``> 128`` (0..255) for the ground truth and the coarse input.

    Returns:
        ``iou_before`` / ``iou_after`` (pooled: sum of intersections / sum of unions),
        ``mba_before`` / ``mba_after`` (mean over samples, NaN bands skipped), the ``*_gain``
        differences, the same IoU numbers per perturbation kind (``iou_after_contour`` ...),
        ``num_samples`` and ``seconds``.
    """
    if not samples:
        raise ValueError("validate() needs at least one sample")
    start = time.perf_counter()
    refiner = CRMRefiner(copy.deepcopy(model).float(), device, scales=scales)
    rows = []
    for s in samples:
        prob = refiner.refine(s.image, s.coarse)
        rows.append((s.perturb, object_scores(s.coarse, s.gt), object_scores(prob > 0.5, s.gt)))
    out: dict[str, float] = {}
    groups = {"": rows}
    for kind in sorted({r[0] for r in rows}):
        groups[f"_{kind}"] = [r for r in rows if r[0] == kind]
    for suffix, group in groups.items():
        for when, col in (("before", 1), ("after", 2)):
            inter = sum(r[col].intersection for r in group)
            union = sum(r[col].union for r in group)
            out[f"iou_{when}{suffix}"] = 1.0 if union == 0 else inter / union
        out[f"iou_gain{suffix}"] = out[f"iou_after{suffix}"] - out[f"iou_before{suffix}"]
        out[f"num_samples{suffix}"] = float(len(group))
    for when, col in (("before", 1), ("after", 2)):
        mba = [r[col].mba for r in rows if not math.isnan(r[col].mba)]
        out[f"mba_{when}"] = float(np.mean(mba)) if mba else math.nan
    out["mba_gain"] = out["mba_after"] - out["mba_before"]
    out["seconds"] = time.perf_counter() - start
    return out


# ============================================================================ model helpers


class _GridForward(nn.Module):
    """Training forward: crop + coarse mask -> logits at every pixel centre of the crop.

    Wrapping encode + decode in one ``forward`` lets DDP see the whole computation.
    """

    def __init__(self, net: CRMNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) image, (B, 1, S, S) coarse in [-1, 1] -> (B, 1, S, S) float32 logits."""
        bsz, _, h, w = image.shape
        feat = self.net.encode(image, coarse)
        # The decoder compares coordinates to cell centres: keep it in float32 under autocast.
        with torch.autocast(device_type=image.device.type, enabled=False):
            logits = self.net.decode_grid(feat.float(), (h, w))
        return logits.view(bsz, 1, h, w)


def load_init_weights(model: CRMNet, path: str) -> dict[str, Any]:
    """Copy into ``model`` the tensors of checkpoint ``path`` that match by name and shape.

    The file is read with :func:`~crm_d2.checkpoint.load_crm` (official ``model_45705`` or a
    project checkpoint, any architecture). Everything that does not match is listed in the log.

    Returns:
        ``{"path", "loaded", "total", "shape_mismatch", "missing", "unused"}`` (counts; the first
        keys of each list are logged).

    Raises:
        ValueError: when no weight matches (BatchNorm step counters do not count).
    """
    src_model, _ = load_crm(path)
    src = src_model.state_dict()
    dst = model.state_dict()
    loaded = [k for k in dst if k in src and src[k].shape == dst[k].shape]
    mismatch = [k for k in dst if k in src and src[k].shape != dst[k].shape]
    missing = [k for k in dst if k not in src]
    unused = [k for k in src if k not in dst]
    if not any(not k.endswith("num_batches_tracked") for k in loaded):
        raise ValueError(
            f"no tensor of {path!r} (architecture {src_model.arch}) matches the trained "
            f"architecture {model.arch} by name and shape"
        )
    model.load_state_dict({**dst, **{k: src[k] for k in loaded}})
    log = logger.info if len(loaded) == len(dst) else logger.warning
    log("init from %s: loaded %d/%d tensors", path, len(loaded), len(dst))
    for what, keys in (
        ("other shapes (kept random)", mismatch),
        ("missing in the file (kept random)", missing),
        ("in the file but unused", unused),
    ):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")
            log("init: %d tensors %s: %s", len(keys), what, shown)
    return {
        "path": str(path),
        "loaded": len(loaded),
        "total": len(dst),
        "shape_mismatch": len(mismatch),
        "missing": len(missing),
        "unused": len(unused),
    }


def load_imagenet_init(model: CRMNet, path: str | None = None) -> dict[str, Any]:
    """Initialise an EfficientNet-Lite CRM's trunk from ImageNet (strict key and shape checks).

    Args:
        model: a CRMNet whose ``arch.encoder`` is an EfficientNet-Lite variant.
        path: the ImageNet state dict; None = the file of the installed training extra.

    Returns:
        ``{"path", "imagenet", "loaded", "skipped"}`` for the training record.
    """
    from ..modeling.efficientnet import imagenet_weights_path, load_imagenet_weights

    encoder = model.arch.encoder
    if encoder == "resnet":
        raise ValueError(
            "init='imagenet' is for the EfficientNet-Lite encoders (presets effnet_lite0 / "
            "effnet_lite1); for ResNet-50 pass a checkpoint path (e.g. the official model_45705)"
        )
    path = path or imagenet_weights_path(encoder)
    skipped = load_imagenet_weights(model.feats, path)
    n = len(model.feats.state_dict())
    logger.info("init: %s trunk from ImageNet (%s): %d tensors, mask channel zero, %d unused "
                "file tensors (stages not built, head)", encoder, path, n, len(skipped))
    return {"path": str(path), "imagenet": encoder, "loaded": n, "skipped": len(skipped)}


# ============================================================================ infrastructure


def _device_type(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name).type


def _resolve_device(name: str, info: DistInfo) -> torch.device:
    kind = _device_type(name)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available; use 'cpu'")
        if info.distributed or name in ("auto", "cuda"):
            return torch.device("cuda", info.local_rank if info.distributed else 0)
    return torch.device(name if name != "auto" else kind)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every global RNG this process uses, in a ``torch.load(weights_only=True)``-safe form."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["name"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    state = scheduler.state_dict()
    # A Counter does not pass torch.load(weights_only=True): store a plain dict.
    if isinstance(state.get("milestones"), collections.Counter):
        state["milestones"] = dict(state["milestones"])
    return state


def _load_scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict) -> None:
    state = dict(state)
    if isinstance(state.get("milestones"), dict):
        state["milestones"] = collections.Counter(state["milestones"])
    scheduler.load_state_dict(state)


def _hardware(device: torch.device, world_size: int) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "world_size": world_size,
        "torch": str(torch.__version__),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _describe_datasets(datasets: Sequence[Dataset]) -> list[dict[str, Any]]:
    out = []
    for ds in datasets:
        d: dict[str, Any] = {"type": type(ds).__name__, "samples": len(ds)}
        for attr in ("crop_size", "coarse", "scale_range", "seed"):
            if hasattr(ds, attr):
                value = getattr(ds, attr)
                d[attr] = list(value) if isinstance(value, tuple) else value
        out.append(d)
    return out


def _plain(obj: Any) -> Any:
    """A JSON round trip: plain dicts, lists, str, numbers and None only.

    Checkpoint metadata must pass ``torch.load(weights_only=True)``, which rejects numpy scalars
    and ``str`` subclasses such as ``torch.__version__``.
    """
    return json.loads(json.dumps(obj, default=str))


class _MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        record = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return str(datetime.timedelta(seconds=seconds))


# ============================================================================ the loop


def train(
    cfg: TrainConfig,
    train_datasets: Dataset | Sequence[Dataset],
    val_samples: Sequence[ValSample] = (),
) -> str:
    """Train a CRM network and return the path of the final exported checkpoint.

    Args:
        cfg: the configuration.
        train_datasets: one or several datasets whose items are dicts with ``image``
            (3, S, S) normalised float, ``coarse`` (1, S, S) in [-1, 1] and ``gt`` (1, S, S) in
            [0, 1] (e.g. :class:`~crm_d2.training.datasets.CRMTrainDataset`), S = ``crop_size``.
            Datasets with a ``set_epoch`` method get the epoch before each pass.
        val_samples: full images for validation (see :func:`make_val_samples`); empty = no
            validation (and no ``best.pth``).

    Returns:
        the path of ``model_final.pth`` (the same on every rank).
    """
    if isinstance(train_datasets, Dataset):
        train_datasets = [train_datasets]
    train_datasets = list(train_datasets)
    if not train_datasets:
        raise ValueError("train() needs at least one training dataset")
    for ds in train_datasets:
        crop = getattr(ds, "crop_size", cfg.crop_size)
        if crop != cfg.crop_size:
            raise ValueError(
                f"{type(ds).__name__} makes {crop}px crops but cfg.crop_size is {cfg.crop_size}"
            )
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)

    info, _ = init_distributed(
        _device_type(cfg.device), datetime.timedelta(minutes=cfg.dist_timeout_min)
    )
    try:
        return _train(cfg, train_datasets, list(val_samples), info)
    finally:
        if info.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    cfg: TrainConfig, datasets: list[Dataset], val_samples: list[ValSample], info: DistInfo
) -> str:
    device = _resolve_device(cfg.device, info)
    main = info.is_main
    out_dir = cfg.output_dir
    if main:
        os.makedirs(out_dir, exist_ok=True)
    last_path = os.path.join(out_dir, LAST_NAME)
    best_path = os.path.join(out_dir, BEST_NAME)
    final_path = os.path.join(out_dir, FINAL_NAME)
    metrics = _MetricsWriter(os.path.join(out_dir, METRICS_NAME) if main else None)

    if cfg.batch_size % info.world_size:
        raise ValueError(
            f"batch_size {cfg.batch_size} is not divisible by the {info.world_size} ranks"
        )
    per_rank = cfg.batch_size // info.world_size
    dataset = ConcatDataset(datasets)
    sampler = DistributedSampler(
        dataset,
        num_replicas=info.world_size,
        rank=info.rank,
        shuffle=True,
        seed=cfg.seed,
        drop_last=True,
    )
    batches_per_epoch = len(sampler) // per_rank
    if batches_per_epoch < 1:
        raise ValueError(
            f"{len(dataset)} training samples are fewer than one global batch of {cfg.batch_size}"
        )

    amp = cfg.amp
    if amp != "none" and device.type != "cuda":
        if main:
            logger.warning("amp=%s needs CUDA; training in float32 on %s", amp, device)
        amp = "none"
    arch = cfg.training_arch

    # Same initial weights on every rank; then a distinct dropout stream per rank.
    _seed_all(cfg.seed)
    model = CRMNet(arch)
    init_report: dict[str, Any] = {"path": "scratch"}
    if cfg.init == "imagenet" or cfg.init.startswith("imagenet:"):
        init_report = load_imagenet_init(model, cfg.init.partition(":")[2] or None)
    elif cfg.init != "scratch":
        init_report = load_init_weights(model, cfg.init)
    elif main and resolve_arch(cfg.arch).block == "bottleneck":
        logger.warning(
            "training the ResNet-50 CRM from scratch: the paper starts from ImageNet weights"
        )
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(cfg.lr_milestones), gamma=cfg.gamma
    )
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    _seed_all(cfg.seed + info.rank)

    start_iter, wall_before, best = 0, 0.0, None
    resume_path = cfg.resume
    if resume_path == "auto":
        resume_path = last_path if os.path.exists(last_path) else None
        if resume_path is None and main:
            logger.info("resume=auto: no %s yet, starting from iteration 0", last_path)
    if resume_path is not None:
        start_iter, wall_before, best = _load_training_state(
            resume_path, model, optimizer, scheduler, scaler, arch, cfg, info, device
        )

    net = model
    if info.distributed:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        forward = nn.parallel.DistributedDataParallel(_GridForward(model), **ddp_kwargs)
    else:
        forward = _GridForward(model)

    if main:
        write_json(os.path.join(out_dir, "config.json"), cfg.to_dict(), indent=2)
        # Which coarse kind each validation image got.
        write_json(
            os.path.join(out_dir, VAL_LIST_NAME),
            [
                {
                    "name": v.name,
                    "coarse": v.perturb,
                    "size": list(v.gt.shape),
                }
                for v in val_samples
            ],
            indent=1,
        )
        n_params = sum(p.numel() for p in net.parameters())
        logger.info(
            "CRM training: arch %s (%.2f M params), %d training samples, %d validation images, "
            "crop %d, batch %d (%d rank(s) x %d), %d iterations from %d, lr %g, milestones %s, "
            "device %s, %d thread(s), amp %s",
            arch,
            n_params / 1e6,
            len(dataset),
            len(val_samples),
            cfg.crop_size,
            cfg.batch_size,
            info.world_size,
            per_rank,
            cfg.iterations,
            start_iter,
            cfg.lr,
            list(cfg.lr_milestones),
            device,
            torch.get_num_threads(),
            amp,
        )
        metrics.write(
            {
                "event": "start",
                "iter": start_iter,
                "time": time.time(),
                "train_samples": len(dataset),
                "val_samples": len(val_samples),
                "world_size": info.world_size,
                "per_rank_batch": per_rank,
            }
        )

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
        if amp != "none"
        else contextlib.nullcontext()
    )
    weights = cfg.loss_weights
    t_start = time.perf_counter()
    last_val: dict[str, float] | None = None
    last_val_iter = -1

    def wall() -> float:
        return wall_before + time.perf_counter() - t_start

    def save_last(it: int) -> None:
        states = [_rng_state(device)]
        if info.distributed:
            states = [None] * info.world_size
            dist.all_gather_object(states, _rng_state(device))
        if not main:
            return
        obj = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "arch": arch.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "scales": list(cfg.val_scales),
            "train_state": {
                "iteration": it,
                "optimizer": optimizer.state_dict(),
                "scheduler": _scheduler_state(scheduler),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": states,
                "world_size": info.world_size,
                "wall_time_s": wall(),
                "best": _plain(best),
                "config": _plain(cfg.to_dict()),
            },
        }
        torch_save(obj, last_path)
        metrics.write({"event": "checkpoint", "iter": it, "path": last_path, "time": time.time()})

    def run_validation(it: int) -> None:
        nonlocal best, last_val, last_val_iter
        last_val_iter = it
        if not main or not val_samples:
            return
        res = validate(net, val_samples, device, cfg.val_scales)
        last_val = res
        logger.info(
            "val @%d: IoU %.4f -> %.4f (%+.4f), mBA %.4f -> %.4f (%+.4f), %d images, %.1fs",
            it,
            res["iou_before"],
            res["iou_after"],
            res["iou_gain"],
            res["mba_before"],
            res["mba_after"],
            res["mba_gain"],
            int(res["num_samples"]),
            res["seconds"],
        )
        metrics.write({"event": "val", "iter": it, "time": time.time(), **res})
        if best is None or res["iou_gain"] > best["iou_gain"]:
            best = {"iter": it, **res}
            save_crm(
                net,
                best_path,
                half=False,
                drop_layer4=True,
                scales=cfg.val_scales,
                training=_plain({"iteration": it, "val": res, "config": cfg.to_dict()}),
            )
            logger.info(
                "new best IoU gain %+.4f at iteration %d -> %s", res["iou_gain"], it, best_path
            )

    it = start_iter
    epoch, skip = divmod(it, batches_per_epoch)
    window = collections.defaultdict(float)
    win_iters, win_time, win_data = 0, 0.0, 0.0
    forward.train()
    while it < cfg.iterations:
        loader = _epoch_loader(dataset, datasets, sampler, epoch, skip, per_rank, cfg, device)
        t_prev = time.perf_counter()
        for batch in loader:
            t_data = time.perf_counter()
            image = batch["image"].to(device, non_blocking=True)
            coarse = batch["coarse"].to(device, non_blocking=True)
            gt = batch["gt"].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                logits = forward(image, coarse)
            loss, terms = crm_loss(logits.float(), gt, **weights)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at iteration {it} (terms "
                    f"{ {k: v.item() for k, v in terms.items()} }); lower the lr or disable amp"
                )
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            it += 1

            window["loss"] += loss.item()
            for k, v in terms.items():
                window[k] += v.item()
            win_iters += 1
            t_now = time.perf_counter()
            win_time += t_now - t_prev
            win_data += t_data - t_prev

            if it % cfg.log_every == 0 or it == cfg.iterations:
                means = torch.tensor(
                    [window[k] / win_iters for k in ("loss", *terms)], dtype=torch.float64
                )
                if info.distributed:
                    dist.all_reduce(means)
                    means /= info.world_size
                s_iter = win_time / win_iters
                if main:
                    rec = dict(zip(("loss", *terms), means.tolist()))
                    eta = s_iter * (cfg.iterations - it)
                    logger.info(
                        "iter %d/%d  loss %.4f (%s)  lr %.3g  %.3f s/iter (data %.3f)  ETA %s",
                        it,
                        cfg.iterations,
                        rec["loss"],
                        " ".join(f"{k} {rec[k]:.4f}" for k in terms),
                        lr,
                        s_iter,
                        win_data / win_iters,
                        _fmt_time(eta),
                    )
                    metrics.write(
                        {
                            "event": "train",
                            "iter": it,
                            **rec,
                            "lr": lr,
                            "s_per_iter": s_iter,
                            "data_s_per_iter": win_data / win_iters,
                            "eta_s": eta,
                            "wall_s": wall(),
                            "time": time.time(),
                        }
                    )
                window.clear()
                win_iters, win_time, win_data = 0, 0.0, 0.0

            if cfg.val_every and it % cfg.val_every == 0 and it < cfg.iterations:
                run_validation(it)
                forward.train()
            if it % cfg.ckpt_every == 0 and it < cfg.iterations:
                save_last(it)
            t_prev = time.perf_counter()
            if it >= cfg.iterations:
                break
        epoch, skip = epoch + 1, 0

    if last_val_iter != it:
        run_validation(it)
    save_last(it)
    if main:
        total = wall()
        training = {
            "recipe": "CRM (Shen et al., CVPR 2022) section 3 loss and schedule",
            "data": list(cfg.data),
            "datasets": _describe_datasets(datasets),
            "train_samples": len(dataset),
            "val_samples": len(val_samples),
            "iterations": it,
            "batch_size": cfg.batch_size,
            "crop_size": cfg.crop_size,
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "milestones": list(cfg.lr_milestones),
            "gamma": cfg.gamma,
            "loss_weights": dict(weights),
            "amp": amp,
            "seed": cfg.seed,
            "init": init_report,
            "wall_time_s": total,
            "hardware": _hardware(device, info.world_size),
            "val": last_val,
            "best": best,
        }
        save_crm(
            net,
            final_path,
            half=True,
            drop_layer4=True,
            scales=cfg.val_scales,
            training=_plain(training),
        )
        metrics.write(
            {"event": "end", "iter": it, "path": final_path, "wall_s": total, "time": time.time()}
        )
        logger.info(
            "training done: %d iterations in %s; final weights %s", it, _fmt_time(total), final_path
        )
    if info.distributed:
        dist.barrier()
    return final_path


def _epoch_loader(
    dataset: ConcatDataset,
    datasets: list[Dataset],
    sampler: DistributedSampler,
    epoch: int,
    skip_batches: int,
    per_rank: int,
    cfg: TrainConfig,
    device: torch.device,
) -> DataLoader:
    """The DataLoader of one epoch, starting after ``skip_batches`` batches (for resuming).

    The order depends only on (seed, epoch, rank); the loader draws its worker seeds from its
    own generator, so the global torch RNG (dropout) sees the same sequence whether or not the
    run was interrupted.
    """
    sampler.set_epoch(epoch)
    for ds in datasets:
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
    indices = list(sampler)[skip_batches * per_rank :]
    gen = torch.Generator()
    gen.manual_seed(cfg.seed * 1_000_003 + epoch)
    return DataLoader(
        dataset,
        batch_size=per_rank,
        sampler=indices,
        drop_last=True,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        generator=gen,
    )


def _load_training_state(
    path: str,
    model: CRMNet,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    arch: CRMArch,
    cfg: TrainConfig,
    info: DistInfo,
    device: torch.device,
) -> tuple[int, float, dict | None]:
    """Restore a ``last.pth``; returns (iteration, wall time so far, best validation)."""
    obj = load_state_dict_file(path)
    state = obj.get("train_state") if isinstance(obj, dict) else None
    if state is None or obj.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path!r} is not a training checkpoint (no train_state): resume needs the "
            f"{LAST_NAME} written by train(); use init= to fine-tune from plain weights"
        )
    saved_arch = CRMArch.from_dict(obj["arch"])
    if saved_arch != arch:
        raise ValueError(f"{path!r} holds architecture {saved_arch}, the config asks for {arch}")
    saved_cfg = state.get("config", {})
    for key in ("crop_size", "batch_size", "lr", "weight_decay", "seed", "loss_weights"):
        old, new = saved_cfg.get(key), cfg.to_dict()[key]
        if old is not None and old != new and info.is_main:
            logger.warning(
                "resume: %s was %s, now %s: the run will not match an uninterrupted one",
                key,
                old,
                new,
            )
    model.load_state_dict(obj["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    _load_scheduler_state(scheduler, state["scheduler"])
    if list(scheduler.milestones.elements()) != list(cfg.lr_milestones):
        # The config may extend the schedule; the optimizer lr already reflects past steps.
        scheduler.milestones = collections.Counter(cfg.lr_milestones)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng = state.get("rng") or []
    if len(rng) == info.world_size:
        _set_rng_state(rng[info.rank], device)
    elif info.is_main:
        logger.warning(
            "resume: checkpoint from %d rank(s), now %d: RNG streams restart",
            len(rng),
            info.world_size,
        )
    it = int(state["iteration"])
    if info.is_main:
        logger.info("resumed from %s at iteration %d", path, it)
    return it, float(state.get("wall_time_s", 0.0)), state.get("best")
