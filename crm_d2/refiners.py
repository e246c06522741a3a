"""The refiners behind one interface: CRM and CascadePSP, chosen by name.

Both :class:`~crm_d2.inference.CRMRefiner` and :class:`~crm_d2.cascadepsp.CascadePSPRefiner`
have ``from_checkpoint(path, device, **kwargs)``, ``refine(image, mask) -> HxW probabilities``,
the batched ``refine_tensors(images, masks) -> (B, H, W)`` that
:func:`crm_d2.segments.refine_segments` calls, and ``device`` / ``model`` attributes. The
command-line tools and the detectron2 layer pick one with :func:`load_refiner`.

Example::

    from crm_d2.refiners import load_refiner
    refiner = load_refiner("cascadepsp", "model", device="cpu", fast=True)
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from .cascadepsp import CascadePSPRefiner
from .guided_filter import GuidedFilterRefiner
from .inference import CRMRefiner

__all__ = ["REFINERS", "Refiner", "load_refiner", "refiner_class"]

#: Refiner names accepted by :func:`load_refiner` (``--refiner``, ``MODEL.CRM.REFINER``).
REFINERS: dict[str, type] = {
    "crm": CRMRefiner,
    "cascadepsp": CascadePSPRefiner,
    "guided_filter": GuidedFilterRefiner,
}


class Refiner(Protocol):
    """What the tools and the detectron2 layer use of a refiner."""

    device: torch.device
    model: torch.nn.Module

    def refine(self, image: np.ndarray, mask: np.ndarray, **kwargs) -> np.ndarray:
        """HxW(x3) uint8 image and HxW mask -> HxW float32 probabilities."""

    def refine_tensors(self, image: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """(B, 3, H, W) normalised images, (B, 1, H, W) masks in [-1, 1] -> (B, H, W)."""

    def to(self, device: torch.device | str) -> Refiner:
        """Compute on ``device`` from now on (returns self)."""


def refiner_class(kind: str) -> type:
    """The refiner class of a name in :data:`REFINERS` (ValueError naming the choices)."""
    try:
        return REFINERS[kind]
    except KeyError:
        raise ValueError(
            f"unknown refiner {kind!r}: choose one of {', '.join(map(repr, REFINERS))}"
        ) from None


def load_refiner(kind: str, path: str | None = None, device: str = "cpu", **kwargs) -> Refiner:
    """Load refiner ``kind`` ("crm", "cascadepsp" or "guided_filter") from a checkpoint.

    Args:
        kind: a name in :data:`REFINERS`.
        path: the checkpoint; None = the weights shipped with crm_d2 (CRM only; the guided
            filter has no weights and takes none).
        device: torch device.
        kwargs: refiner options: ``scales``, ``chunk_size``, ``min_side``, ``autocast``,
            ``flip``, ``guided_blend`` (CRM); ``L``, ``fast``, ``binarize`` (CascadePSP);
            ``radius``, ``eps`` (guided filter). An option of another refiner is a ValueError.

    Raises:
        ValueError: unknown kind or option; :class:`~crm_d2.checkpoint.CheckpointError` on a
        bad file (a CRM file given as CascadePSP, or the reverse, is named as such).
    """
    cls = refiner_class(kind)
    options = {"crm": ("scales", "chunk_size", "min_side", "autocast", "flip", "guided_blend"),
               "cascadepsp": ("L", "fast", "binarize"),
               "guided_filter": ("radius", "eps")}[kind]
    foreign = sorted(k for k, v in kwargs.items() if k not in options and v is not None)
    if foreign:
        raise ValueError(
            f"option(s) {', '.join(foreign)} do not apply to the {kind} refiner (its options: "
            f"{', '.join(options)})"
        )
    kwargs = {k: v for k, v in kwargs.items() if k in options}
    return cls.from_checkpoint(path, device, **kwargs)
