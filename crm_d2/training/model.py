"""The trained network and its optimisation: initial weights, the training forward, the optimizer.

Shape shorthand: B = per-rank batch, S = crop size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_crm
from ..guided_filter import guide_channel
from ..modeling.crm import CRMNet
from .config import TrainConfig
from .state import seed_all

__all__ = [
    "GridForward",
    "TrainingObjects",
    "build_training_objects",
    "load_imagenet_init",
    "load_init_weights",
    "param_groups",
]

logger = logging.getLogger(__name__)


class GridForward(nn.Module):
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
        # the crop's image and mask, read in place by CRMArch.pixel_skip networks (and the
        # guided filter of the coarse mask by CRMArch.guided_skip ones, as in inference)
        inputs = None
        if self.net.pixel_skip is not None:
            inputs = (image, coarse)
            if self.net.arch.guided_skip:
                inputs += (guide_channel(image, coarse),)
        # The decoder compares coordinates to cell centres: keep it in float32 under autocast.
        with torch.autocast(device_type=image.device.type, enabled=False):
            logits = self.net.decode_grid(feat.float(), (h, w), inputs=inputs)
        return logits.view(bsz, 1, h, w)


def load_init_weights(model: CRMNet, path: str) -> dict[str, Any]:
    """Copy into ``model`` the tensors of checkpoint ``path`` that match by name and shape.

    The file is read with :func:`~crm_d2.checkpoint.load_crm` (official ``model_45705`` or a
    project checkpoint, any architecture). Everything that does not match is listed in the log.

    Returns:
        ``{"path", "loaded", "total", "shape_mismatch", "missing", "unused", "widened"}``
        (counts; the first keys of each list are logged; ``widened`` = 1 when a 4-input pixel
        skip was copied into a :attr:`CRMArch.guided_skip` network, see
        :func:`_widen_pixel_skip`).

    Raises:
        ValueError: when no weight matches (BatchNorm step counters do not count).
    """
    src_model, _ = load_crm(path)
    src = src_model.state_dict()
    dst = model.state_dict()
    widened = _widen_pixel_skip(src, dst)
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
    if widened:
        logger.info("init: pixel_skip.weight %s -> %s: the file's columns copied, the guided "
                    "filter's column at zero (the network starts as the file's)",
                    widened[0], widened[1])
    # a file tensor left unused (e.g. pixel_skip.weight into a network without the skip) is a
    # different network from the file's: say so as loudly as a missing one
    log = logger.info if len(loaded) == len(dst) and not unused else logger.warning
    log("init from %s: loaded %d/%d tensors", path, len(loaded), len(dst))
    for what, keys in (
        ("other shapes (kept random)", mismatch),
        ("missing in the file (kept at their initialisation)", missing),
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
        "widened": int(widened is not None),
    }


def _widen_pixel_skip(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]):
    """A 4-input pixel skip of the file into a :attr:`CRMArch.guided_skip` network's 5 inputs:
    ``src["pixel_skip.weight"]`` is replaced by the network's zero-initialised (D, 5) matrix with
    the file's four columns copied in, so that the network starts as the file's.

    Returns:
        ``(old shape, new shape)`` when widened, else None.
    """
    key = "pixel_skip.weight"
    if key not in src or key not in dst:
        return None
    old, new = src[key], dst[key]
    if old.shape == new.shape or old.shape[0] != new.shape[0] or old.shape[1] >= new.shape[1]:
        return None
    wide = torch.zeros_like(new)
    wide[:, : old.shape[1]] = old
    src[key] = wide
    return tuple(old.shape), tuple(new.shape)


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
    logger.info(
        "init: %s trunk from ImageNet (%s): %d tensors, mask channel zero, %d unused "
        "file tensors (stages not built, head)",
        encoder,
        path,
        n,
        len(skipped),
    )
    return {"path": str(path), "imagenet": encoder, "loaded": n, "skipped": len(skipped)}


def param_groups(model: nn.Module, lr: float, lr_mult: dict[str, float]) -> list[dict[str, Any]]:
    """Optimizer groups: every parameter at ``lr``, those named ``prefix...`` at ``lr * factor``
    (when prefixes overlap, the last matching one in ``lr_mult`` wins).

    Raises:
        ValueError: when a prefix names no parameter (a typo would silently train at ``lr``).
    """
    groups: dict[float, list[nn.Parameter]] = {}
    used = set()
    for name, param in model.named_parameters():
        factor = 1.0
        for prefix, f in lr_mult.items():
            if name.startswith(prefix):
                factor = f
                used.add(prefix)
        groups.setdefault(factor, []).append(param)
    unused = sorted(set(lr_mult) - used)
    if unused:
        raise ValueError(f"lr_mult prefixes {unused} name no parameter of the network")
    # the x1 group first: the trainer logs group 0's lr as the run's lr
    order = sorted(groups, key=lambda f: (f != 1.0, f))
    for factor in order:
        if factor != 1.0:
            logger.info("lr x%g for %d parameter tensors", factor, len(groups[factor]))
    return [{"params": groups[f], "lr": lr * f} for f in order]


@dataclass
class TrainingObjects:
    """The network and what optimises it.

    Attributes:
        model: the network, on the training device.
        optimizer: Adam over every parameter.
        scheduler: MultiStepLR at the configured milestones.
        scaler: the fp16 gradient scaler (None unless ``amp="fp16"``).
        init_report: how the weights were initialised (for the training record).
    """

    model: CRMNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    scaler: torch.amp.GradScaler | None
    init_report: dict[str, Any]


def build_training_objects(
    cfg: TrainConfig, device: torch.device, amp: str, rank: int, main: bool
) -> TrainingObjects:
    """Build the network (the same initial weights on every rank) and its optimizer.

    The global RNGs are seeded with ``cfg.seed`` before the network is built and with
    ``cfg.seed + rank`` afterwards, so each rank gets its own dropout stream.

    Args:
        cfg: the configuration (architecture, init, lr, weight decay, milestones, gamma).
        device: the training device.
        amp: the autocast mode in use (``"fp16"`` adds a gradient scaler).
        rank: this process's rank.
        main: whether this is rank 0 (only it logs the from-scratch warning).
    """
    seed_all(cfg.seed)
    model = CRMNet(cfg.training_arch)
    init_report: dict[str, Any] = {"path": "scratch"}
    if cfg.init == "imagenet" or cfg.init.startswith("imagenet:"):
        init_report = load_imagenet_init(model, cfg.init.partition(":")[2] or None)
    elif cfg.init != "scratch":
        init_report = load_init_weights(model, cfg.init)
    elif main and cfg.training_arch.encoder == "resnet" and cfg.training_arch.block == "bottleneck":
        logger.warning(
            "training the ResNet-50 CRM from scratch: the paper starts from ImageNet weights"
        )
    model.to(device)
    optimizer = torch.optim.Adam(param_groups(model, cfg.lr, cfg.lr_mult), lr=cfg.lr,
                                 weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(cfg.lr_milestones), gamma=cfg.gamma
    )
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    seed_all(cfg.seed + rank)
    return TrainingObjects(model, optimizer, scheduler, scaler, init_report)
