"""Box geometry of ROIs: tight boxes of masks, expansion for context, crops.

Shape shorthand: N masks, H/W image size, h/w ROI size (= box size).

Boxes are ``(x0, y0, x1, y1)`` in pixel indices with exclusive ``x1``/``y1``: the ROI of a box is
``t[..., y0:y1, x0:x1]`` and has ``h = y1 - y0`` rows and ``w = x1 - x0`` columns. This is
detectron2's convention for boxes computed from masks (``x1 = last column + 1``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .options import RefineOptions

__all__ = [
    "Box",
    "as_int_box",
    "boxes_from_masks",
    "check_box_inside",
    "crop",
    "expand_box",
    "mask_to_box",
]

Box = tuple[int, int, int, int]

# Tolerance for floor/ceil in expand_box, so that 2.0000000001 does not grow a box by a pixel.
_ROUND_EPS = 1e-6


def mask_to_box(mask: Tensor) -> Box | None:
    """Tight box around a mask.

    Args:
        mask: (H, W) bool tensor.

    Returns:
        ``(x0, y0, x1, y1)`` python ints with exclusive ``x1 = last column + 1`` and
        ``y1 = last row + 1``, or None when the mask is empty.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask_to_box expects an (H, W) mask, got shape {tuple(mask.shape)}")
    mask = mask.bool()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if cols.numel() == 0:
        return None
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def boxes_from_masks(masks: Tensor) -> Tensor:
    """Tight boxes of a stack of masks, vectorised.

    Args:
        masks: (N, H, W) bool tensor.

    Returns:
        (N, 4) float32 tensor of ``(x0, y0, x1, y1)`` with ``x1 = max column + 1`` and
        ``y1 = max row + 1`` (detectron2's ``BitMasks.get_bounding_boxes`` convention), on the
        device of ``masks``; rows of empty masks are all zeros.
    """
    if masks.dim() != 3:
        raise ValueError(
            f"boxes_from_masks expects (N, H, W) masks, got shape {tuple(masks.shape)}"
        )
    n, h, w = masks.shape
    boxes = torch.zeros((n, 4), dtype=torch.float32, device=masks.device)
    if n == 0 or h == 0 or w == 0:
        return boxes
    masks = masks.bool()
    cols = masks.any(dim=1)  # (N, W)
    rows = masks.any(dim=2)  # (N, H)
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    boxes[:, 0] = torch.where(cols, xs, w).amin(dim=1).float()
    boxes[:, 1] = torch.where(rows, ys, h).amin(dim=1).float()
    boxes[:, 2] = (torch.where(cols, xs, -1).amax(dim=1) + 1).float()
    boxes[:, 3] = (torch.where(rows, ys, -1).amax(dim=1) + 1).float()
    boxes[~cols.any(dim=1)] = 0.0
    return boxes


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (H, W), got {image_size!r}")
    height, width = int(image_size[0]), int(image_size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be positive, got (H, W) = ({height}, {width})")
    return height, width


def as_int_box(box: Sequence) -> Box:
    """Validate a non-empty box of integer-valued coordinates and return it as python ints."""
    if len(box) != 4:
        raise ValueError(f"a box must have 4 values (x0, y0, x1, y1), got {box!r}")
    values = []
    for v in box:
        f = float(v)
        if not f.is_integer():
            raise ValueError(f"box coordinates must be integers, got {box!r}")
        values.append(int(f))
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty box {tuple(values)}: need x1 > x0 and y1 > y0")
    return x0, y0, x1, y1


def check_box_inside(box: Box, height: int, width: int) -> None:
    """Raise ValueError unless the int ``box`` lies inside an (H, W) = (height, width) image."""
    x0, y0, x1, y1 = box
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise ValueError(f"box {box} is not inside an image of (H, W) = ({height}, {width})")


def _fit_span(lo: int, hi: int, min_size: int, limit: int) -> tuple[int, int]:
    """Grow [lo, hi) symmetrically to ``min_size``, shift it into [0, limit), then clip."""
    deficit = min_size - (hi - lo)
    if deficit > 0:
        lo -= deficit // 2
        hi += deficit - deficit // 2
        # Shift back inside the image so the span keeps its size where the image allows it.
        if lo < 0:
            hi -= lo
            lo = 0
        if hi > limit:
            lo -= hi - limit
            hi = limit
    return max(lo, 0), min(hi, limit)


def expand_box(
    box: Sequence[float],
    image_size: tuple[int, int],
    expand_ratio: float = RefineOptions.expand_ratio,
    min_size: int = 0,
) -> Box:
    """Grow a box for context, as integer pixel bounds inside the image.

    The box grows by ``expand_ratio`` times its width and height in total
    (``expand_ratio / 2`` on each side); the bounds are then rounded outwards (floor for x0/y0,
    ceil for x1/y1). When ``min_size > 0`` a side shorter than ``min_size`` grows symmetrically
    to ``min_size``; where that crosses the image border, the span is shifted back inside the
    image so that it keeps ``min_size`` whenever the image is large enough. Finally the box is
    clipped to the image.

    Args:
        box: (x0, y0, x1, y1), ints or floats, exclusive x1/y1 (e.g. from :func:`mask_to_box`
            or detectron2 ``pred_boxes``).
        image_size: (H, W).
        expand_ratio: total relative growth per axis (0.25 = 12.5% per side, the reference).
        min_size: minimum side length in pixels before clipping (0 = no minimum).

    Returns:
        (x0, y0, x1, y1) python ints with 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H.

    Raises:
        ValueError: for an empty or non-finite box, a box outside the image, a negative
            ``expand_ratio`` or ``min_size``, or a bad ``image_size``.
    """
    height, width = _check_image_size(image_size)
    if len(box) != 4:
        raise ValueError(f"a box must have 4 values (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box has non-finite coordinates: {box!r}")
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty box {box!r}: need x1 > x0 and y1 > y0")
    if expand_ratio < 0:
        raise ValueError(f"expand_ratio must be >= 0, got {expand_ratio}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")

    dx = 0.5 * expand_ratio * (x1 - x0)
    dy = 0.5 * expand_ratio * (y1 - y0)
    ex0 = math.floor(x0 - dx + _ROUND_EPS)
    ey0 = math.floor(y0 - dy + _ROUND_EPS)
    ex1 = math.ceil(x1 + dx - _ROUND_EPS)
    ey1 = math.ceil(y1 + dy - _ROUND_EPS)
    # Clip first so that min_size growth is measured on the part of the box inside the image.
    ex0, ex1 = max(ex0, 0), min(ex1, width)
    ey0, ey1 = max(ey0, 0), min(ey1, height)
    if ex1 <= ex0 or ey1 <= ey0:
        raise ValueError(f"box {box!r} does not overlap the image of (H, W) = {(height, width)}")
    ex0, ex1 = _fit_span(ex0, ex1, min_size, width)
    ey0, ey1 = _fit_span(ey0, ey1, min_size, height)
    return ex0, ey0, ex1, ey1


def crop(t: Tensor, box: Sequence[int]) -> Tensor:
    """The ROI of ``box`` in the last two dimensions of ``t``.

    Args:
        t: (..., H, W) tensor.
        box: (x0, y0, x1, y1) integer box inside the image.

    Returns:
        (..., h, w) view of ``t`` (not a copy: clone it before writing into it).
    """
    if t.dim() < 2:
        raise ValueError(f"crop expects a (..., H, W) tensor, got shape {tuple(t.shape)}")
    x0, y0, x1, y1 = ibox = as_int_box(box)
    check_box_inside(ibox, t.shape[-2], t.shape[-1])
    return t[..., y0:y1, x0:x1]
