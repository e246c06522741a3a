"""Refine the masks of one image at (optionally) reduced resolution, in bounded memory.

Shape shorthand: N masks of one image, H/W original image size, h/w reduced size.

This wraps :func:`crm_d2.segments.refine_segments` for the evaluation tool: which masks are
refined is decided at the ORIGINAL resolution (``area > min_area``); masks are sent in chunks so
that at most ``chunk`` float masks exist at once; with ``max_side`` the image and the masks are
downscaled (image: area averaging; masks: area averaging, so CRM sees soft edges) and every
refined probability is resampled back to original pixel centres with exact bilinear geometry.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from ..fusion import RefinedSegment
from ..refiners import Refiner
from ..segments import ROIOptions, refine_segments

__all__ = ["RefineSettings", "reduced_size", "refine_masks"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefineSettings:
    """What the tool passes to the refiner.

    Attributes:
        roi: ROI expansion, minimum area (in original pixels) and batching.
        scales: CRM input scales (None: the refiner's).
        max_side: refine images whose longer side exceeds this at a reduced size (None: never).
        chunk: masks sent to :func:`refine_segments` per call (bounds memory).
    """

    roi: ROIOptions = ROIOptions()
    scales: tuple[float, ...] | None = None
    max_side: int | None = None
    chunk: int = 32

    def __post_init__(self) -> None:
        if self.max_side is not None and self.max_side < 32:
            raise ValueError(f"max_side must be >= 32 pixels, got {self.max_side}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")


def reduced_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """(h, w) at which an (H, W) image is refined with ``max_side`` (None: unchanged)."""
    if max_side is None or max(height, width) <= max_side:
        return height, width
    s = max_side / max(height, width)
    return max(1, round(height * s)), max(1, round(width * s))


def _to_original(
    seg: RefinedSegment, small: tuple[int, int], full: tuple[int, int]
) -> RefinedSegment:
    """Resample a segment refined at ``small`` (h, w) size to the ``full`` (H, W) image.

    Original pixel centre X + 0.5 lies at (X + 0.5) * w / W in reduced pixel units; the box is the
    smallest integer box covering the reduced box, and the probability is sampled bilinearly at
    every original pixel centre inside it (border values beyond the reduced box).
    """
    (h, w), (big_h, big_w) = small, full
    sx, sy = big_w / w, big_h / h
    x0, y0, x1, y1 = seg.box
    bx0, by0 = math.floor(x0 * sx), math.floor(y0 * sy)
    bx1, by1 = min(big_w, math.ceil(x1 * sx)), min(big_h, math.ceil(y1 * sy))
    prob = seg.prob.float()
    rh, rw = prob.shape
    xs = (torch.arange(bx0, bx1, dtype=torch.float32) + 0.5) / sx - x0  # reduced-box units
    ys = (torch.arange(by0, by1, dtype=torch.float32) + 0.5) / sy - y0
    gx = (2 * xs / rw - 1).to(prob.device)
    gy = (2 * ys / rh - 1).to(prob.device)
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
    out = F.grid_sample(
        prob[None, None], grid, mode="bilinear", padding_mode="border", align_corners=False
    )[0, 0]
    return RefinedSegment(seg.segment_id, out, (bx0, by0, bx1, by1), seg.isthing)


@torch.no_grad()
def refine_masks(
    refiner: Refiner,
    image: np.ndarray,
    masks: np.ndarray,
    settings: RefineSettings,
    isthing: Sequence[bool] | None = None,
) -> list[RefinedSegment]:
    """Refine every mask of one image whose original area exceeds ``settings.roi.min_area``.

    Args:
        refiner: the refiner (CRM or CascadePSP).
        image: (H, W, 3) uint8 RGB.
        masks: (N, H, W) bool, or float32 probabilities in [0, 1] (soft coarse masks: the box
            and the area use ``> 0.5``, CRM sees the soft values).
        settings: ROI options, scales, optional downscaling.
        isthing: per-mask flag copied into the results (default all True).

    Returns:
        One :class:`RefinedSegment` per refined mask, in original image coordinates, with
        ``segment_id`` = index in ``masks`` and ``prob`` on the CPU, sorted by index.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"masks must be (N, H, W) with (H, W) = {image.shape[:2]}, got {masks.shape}"
        )
    n, height, width = masks.shape
    if isthing is not None and len(isthing) != n:
        raise ValueError(f"isthing has {len(isthing)} flags for {n} masks")
    binary = masks if masks.dtype == np.bool_ else masks > 0.5
    areas = binary.reshape(n, -1).sum(axis=1)
    selected = [i for i in range(n) if areas[i] > settings.roi.min_area]
    if not selected:
        return []
    small = reduced_size(height, width, settings.max_side)
    scaled = small != (height, width)
    img = image
    if scaled:
        img = cv2.resize(image, (small[1], small[0]), interpolation=cv2.INTER_AREA)
    if not img.flags.writeable or not img.flags.c_contiguous:  # torch wants writable memory
        img = np.array(img, order="C")
    image_t = torch.from_numpy(img).permute(2, 0, 1)
    # The selection is done here, at full resolution: refine_segments must keep every mask.
    options = dataclasses.replace(settings.roi, min_area=0)
    results: list[RefinedSegment] = []
    for start in range(0, len(selected), settings.chunk):
        idx = selected[start : start + settings.chunk]
        chunk = torch.from_numpy(masks[idx])
        if scaled:
            chunk = F.interpolate(chunk.float()[None], size=small, mode="area")[0]
            chunk.clamp_(0, 1)
        flags = None if isthing is None else [bool(isthing[i]) for i in idx]
        out = refine_segments(
            refiner, image_t, chunk, options, isthing=flags, scales=settings.scales
        )
        for seg in out:
            seg = RefinedSegment(idx[seg.segment_id], seg.prob.cpu(), seg.box, seg.isthing)
            results.append(_to_original(seg, small, (height, width)) if scaled else seg)
    results.sort(key=lambda r: r.segment_id)
    return results
