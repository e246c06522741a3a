"""Binary morphology on bool tensors: square dilation and erosion by shifted ORs.

The same sets as ``max_pool2d`` with a (2r+1)^2 window, stride 1 and ``r`` padding (outside the
map counts as neither class, so the image border is no edge), computed as ``2r`` shifted ORs per
axis on bool maps. On CPU this is 10-40x faster than ``max_pool2d`` on one-channel float maps,
whose kernel parallelises over channels (1 here); the band decoder of :mod:`crm_d2.sparse` calls
it a few times per ROI and scale.

Shape shorthand: (..., H, W) any leading dimensions.
"""

from __future__ import annotations

import torch

__all__ = ["dilate", "erode"]


def _dilate_axis(mask: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    out = mask.clone()
    n = mask.shape[dim]
    for s in range(1, min(radius, n - 1) + 1):
        out.narrow(dim, s, n - s).logical_or_(mask.narrow(dim, 0, n - s))
        out.narrow(dim, 0, n - s).logical_or_(mask.narrow(dim, s, n - s))
    return out


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixels within Chebyshev distance ``radius`` of a True pixel.

    Args:
        mask: (..., H, W) bool.
        radius: >= 0 (0 returns a copy).

    Returns:
        (..., H, W) bool.
    """
    if mask.dtype != torch.bool or mask.dim() < 2:
        raise ValueError(f"mask must be a bool tensor of >= 2 dims, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    return _dilate_axis(_dilate_axis(mask, int(radius), -2), int(radius), -1)


def erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixels whose whole (2 radius + 1)^2 window inside the map is True."""
    return ~dilate(~mask, radius)
