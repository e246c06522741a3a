"""The full training state of a CRM run: ``last.pth`` written and resumed exactly.

``last.pth`` is a project checkpoint written by the project's one writer,
:func:`~crm_d2.checkpoint.save_crm` (so :func:`~crm_d2.checkpoint.load_crm` reads it, the
training state coming back as metadata). Its layout, fixed since the first release and pinned by
``tests/test_training_loop.py``::

    {"format": "crm_d2", "version": 1, "arch": {...}, "state_dict": {...float32...},
     "scales": [...], "train_state": {"iteration", "optimizer", "scheduler", "scaler", "rng",
     "world_size", "wall_time_s", "best", "config"}}

``rng`` holds every rank's RNG states (torch, Python, numpy, CUDA), so a resumed run draws the
same dropout and augmentation streams as an uninterrupted one. Everything in the file passes
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import collections
import json
import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import FORMAT_NAME, load_state_dict_file, save_crm
from ..distributed import DistInfo
from ..modeling.crm import CRMArch, CRMNet
from .config import DEFAULT_LOSS_WEIGHTS, TrainConfig

__all__ = [
    "LAST_NAME",
    "TRAIN_STATE_KEYS",
    "ResumedState",
    "gather_rng_states",
    "load_training_state",
    "plain",
    "save_training_state",
    "seed_all",
]

logger = logging.getLogger(__name__)

LAST_NAME = "last.pth"
# The keys of ``train_state`` in ``last.pth`` (the resume contract; see the module docstring).
TRAIN_STATE_KEYS = (
    "iteration",
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "world_size",
    "wall_time_s",
    "best",
    "config",
)


def plain(obj: Any) -> Any:
    """A JSON round trip: plain dicts, lists, str, numbers and None only.

    Checkpoint metadata must pass ``torch.load(weights_only=True)``, which rejects numpy scalars
    and ``str`` subclasses such as ``torch.__version__``.
    """
    return json.loads(json.dumps(obj, default=str))


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs."""
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


def gather_rng_states(device: torch.device, info: DistInfo) -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (a collective: call it on every rank)."""
    if not info.distributed:
        return [_rng_state(device)]
    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, _rng_state(device))
    return states


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


def save_training_state(
    path: str,
    model: CRMNet,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    *,
    iteration: int,
    rng: list[dict[str, Any]],
    world_size: int,
    wall_time_s: float,
    best: dict[str, Any] | None,
    config: TrainConfig,
) -> None:
    """Write ``last.pth`` (the layout of the module docstring) atomically, float32 weights.

    Args:
        path: output file.
        model: the trained network (not its DDP wrapper); its layer4 is never built in training.
        optimizer, scheduler, scaler: their states are stored (``scaler`` None without fp16).
        iteration: optimizer steps done.
        rng: every rank's RNG states (:func:`gather_rng_states`).
        world_size: the number of ranks.
        wall_time_s: training wall time so far, over every start of the run.
        best: the best validation record so far (None before the first).
        config: the configuration of this start; its ``val_scales`` become the file's ``scales``.
    """
    train_state = {
        "iteration": iteration,
        "optimizer": optimizer.state_dict(),
        "scheduler": _scheduler_state(scheduler),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng,
        "world_size": world_size,
        "wall_time_s": wall_time_s,
        "best": plain(best),
        "config": plain(config.to_dict()),
    }
    save_crm(
        model,
        path,
        half=False,
        drop_layer4=False,
        scales=list(config.val_scales),
        train_state=train_state,
    )


@dataclass(frozen=True)
class ResumedState:
    """What a resumed run continues from besides the restored objects.

    Attributes:
        iteration: optimizer steps already done.
        wall_time_s: training wall time of the earlier starts.
        best: the best validation record so far (None if there was none).
    """

    iteration: int
    wall_time_s: float
    best: dict[str, Any] | None


def load_training_state(
    path: str,
    model: CRMNet,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    cfg: TrainConfig,
    info: DistInfo,
    device: torch.device,
) -> ResumedState:
    """Restore a ``last.pth`` into the given objects (this rank's RNG streams included).

    Raises:
        ValueError: when the file has no training state or holds another architecture.
    """
    obj = load_state_dict_file(path)
    state = obj.get("train_state") if isinstance(obj, dict) else None
    if state is None or obj.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path!r} is not a training checkpoint (no train_state): resume needs the "
            f"{LAST_NAME} written by train(); use init= to fine-tune from plain weights"
        )
    arch = cfg.training_arch
    saved_arch = CRMArch.from_dict(obj["arch"])
    if saved_arch != arch:
        raise ValueError(f"{path!r} holds architecture {saved_arch}, the config asks for {arch}")
    saved_cfg = state.get("config", {})
    saved_mult = saved_cfg.get("lr_mult", {})
    if saved_mult != cfg.lr_mult:
        # Adam's groups (and their lrs) come back from the state: a new factor would be ignored
        raise ValueError(
            f"{path!r} was trained with lr_mult {saved_mult}, the config asks for "
            f"{cfg.lr_mult}: resume with the same --lr-mult, or start a new run with --init"
        )
    for key in ("crop_size", "batch_size", "lr", "weight_decay", "seed", "loss_weights"):
        old, new = saved_cfg.get(key), cfg.to_dict()[key]
        if key == "loss_weights" and isinstance(old, dict):
            old = {**DEFAULT_LOSS_WEIGHTS, **old}  # runs from before a term existed
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
    return ResumedState(it, float(state.get("wall_time_s", 0.0)), state.get("best"))
