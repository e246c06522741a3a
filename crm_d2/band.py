"""Restrict a refinement to a band around the coarse boundary.

A refiner that only has to fix boundaries should not change pixels far from them; keeping the
coarse answer outside a band of ``width`` pixels around the coarse mask's boundary removes the
refiner's mistakes in object interiors and in the background (the "near contours" idea of the
CRM speed-up literature, used here for quality). Pure functions on tensors.

Shape shorthand: B batch, H, W mask size.
"""

from __future__ import annotations

import torch

from .morphology import dilate, erode

__all__ = ["boundary_band", "restrict_to_band"]


def boundary_band(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Pixels within ``width`` (Chebyshev distance) of the boundary of a binary mask.

    Args:
        mask: (B, H, W) bool.
        width: band half-width in pixels (>= 1).

    Returns:
        (B, H, W) bool: dilation minus erosion of ``mask`` by a (2 width + 1)^2 square.

    This is the exact band (the pixels whose (2 width + 1)^2 window holds both classes; the
    image border is not an edge), because it decides which refined pixels are kept.
    :func:`crm_d2.sparse.boundary_band` is a different, deliberately coarser set: a cheap
    superset of this band computed on cells of about ``width / 2`` pixels, which only decides
    which pixels the sparse decoder evaluates. They are not interchangeable.
    """
    if mask.ndim != 3 or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a (B, H, W) bool tensor, got {mask.dtype} {tuple(mask.shape)}"
        )
    if int(width) < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    return dilate(mask, int(width)) & ~erode(mask, int(width))


def restrict_to_band(coarse: torch.Tensor, refined: torch.Tensor, width: int) -> torch.Tensor:
    """The refined probabilities inside the band of the coarse boundary, the coarse ones outside.

    Args:
        coarse: (B, H, W) coarse probabilities in [0, 1] (binarised at 0.5 for the band).
        refined: (B, H, W) refined probabilities.
        width: band half-width in pixels.

    Returns:
        (B, H, W) probabilities.
    """
    if coarse.shape != refined.shape:
        raise ValueError(
            f"coarse {tuple(coarse.shape)} and refined {tuple(refined.shape)} differ in shape"
        )
    band = boundary_band(coarse > 0.5, width)
    return torch.where(band, refined, coarse.to(refined.dtype))
