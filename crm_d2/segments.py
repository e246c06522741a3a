"""Refine many segments of one image on padded ROIs, in batches (no detectron2 needed).

This is the glue between a refiner (:class:`~crm_d2.inference.CRMRefiner` or
:class:`~crm_d2.cascadepsp.CascadePSPRefiner`, see :mod:`crm_d2.refiners`) and the pure fusion
functions of :mod:`crm_d2.fusion`; the detectron2 meta-architecture and the ``crm-eval`` tool
both call :func:`refine_segments`.

Shape shorthand: N segments, H/W image size, h/w ROI size.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .boxes import crop, expand_box, mask_to_box
from .fusion import RefinedSegment
from .inference import normalize_image, normalize_mask
from .options import RefineOptions
from .refiners import Refiner
from .sparse import FastOptions

__all__ = ["ROIOptions", "refine_segments"]

logger = logging.getLogger(__name__)

_DEFAULT = RefineOptions()


@dataclass(frozen=True)
class ROIOptions:
    """How ROIs are cut and batched (defaults: :class:`crm_d2.options.RefineOptions`).

    Attributes:
        expand_ratio: the box grows by this fraction of its size in total (half per side);
            0.25 as in CascadePSP's scene-parsing reference.
        min_area: segments with at most this many pixels are not refined (1024 reference);
            :mod:`crm_d2.pipeline` selects the segments itself and passes 0.
        batch_size: ROIs of the same size refined in one call.
        size_multiple: round ROI sizes up (adding context, clipped at the image border) to a
            multiple of this many pixels so that more ROIs share a size and batch together;
            1 keeps the exact expanded box.
        min_roi_size: grow ROIs smaller than this (per side) around their centre.
        canonical_sizes: cross-size batching: each ROI side grows (adding context, clipped at
            the image border) to the smallest of these sizes that holds it (sides longer than
            all of them keep their size), so that ROIs of different sizes share a few shapes
            and run in one encoder pass per batch. None (default) keeps each ROI's own size:
            on a 2-core CPU the padding costs more than batching saves (BENCHMARKS.md), and
            the added context changes the answers.
    """

    expand_ratio: float = _DEFAULT.expand_ratio
    min_area: int = _DEFAULT.min_area
    batch_size: int = _DEFAULT.batch_size
    size_multiple: int = _DEFAULT.size_multiple
    min_roi_size: int = _DEFAULT.min_roi_size
    canonical_sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.canonical_sizes is not None:
            sizes = tuple(sorted(int(v) for v in self.canonical_sizes))
            if not sizes or sizes[0] < 1:
                raise ValueError(f"canonical_sizes must be positive sizes, got "
                                 f"{self.canonical_sizes}")
            object.__setattr__(self, "canonical_sizes", sizes)
        if self.expand_ratio < 0:
            raise ValueError(f"expand_ratio must be >= 0, got {self.expand_ratio}")
        if self.batch_size < 1 or self.size_multiple < 1:
            raise ValueError("batch_size and size_multiple must be >= 1")


def _grow_axis(lo: int, hi: int, size: int, limit: int) -> tuple[int, int]:
    """The span ``lo:hi`` grown around its centre to ``min(size, limit)``, inside ``0:limit``."""
    size = max(hi - lo, min(limit, size))
    lo = max(0, lo - (size - (hi - lo)) // 2)
    hi = lo + size
    if hi > limit:
        lo, hi = limit - size, limit
    return lo, hi


def _round_box(box, multiple: int, height: int, width: int):
    """Grow each side of ``box`` to a multiple of ``multiple`` (clipped at the image)."""
    if multiple == 1:
        return box
    x0, y0, x1, y1 = box
    x0, x1 = _grow_axis(x0, x1, -(-(x1 - x0) // multiple) * multiple, width)
    y0, y1 = _grow_axis(y0, y1, -(-(y1 - y0) // multiple) * multiple, height)
    return x0, y0, x1, y1


def _canonical_box(box, sizes: tuple[int, ...] | None, height: int, width: int):
    """Grow each side of ``box`` to the smallest of ``sizes`` that holds it (see ROIOptions)."""
    if sizes is None:
        return box
    x0, y0, x1, y1 = box

    def target(n: int) -> int:
        return next((s for s in sizes if s >= n), n)

    x0, x1 = _grow_axis(x0, x1, target(x1 - x0), width)
    y0, y1 = _grow_axis(y0, y1, target(y1 - y0), height)
    return x0, y0, x1, y1


@torch.no_grad()
def refine_segments(
    refiner: Refiner,
    image: Tensor,
    masks: Tensor,
    options: ROIOptions = ROIOptions(),
    *,
    isthing: Sequence[bool] | None = None,
    scales: Sequence[float] | None = None,
    exact: bool = False,
    fast: FastOptions | None = None,
) -> list[RefinedSegment]:
    """Refine every large-enough mask of one image on its expanded box.

    Args:
        refiner: the refiner, CRM or CascadePSP (its device is used).
        image: (3, H, W) uint8 (or 0..255 float) RGB at the ORIGINAL resolution.
        masks: (N, H, W) bool, or float probabilities in [0, 1] (binarised at 0.5 for the box
            and the area; the soft values are what CRM sees).
        options: ROI expansion, minimum area and batching.
        isthing: per-mask flag copied into the results (default all True).
        scales, exact: passed to ``refiner.refine_tensors`` (CRM settings; CascadePSP takes
            ``scales=None`` and ignores ``exact``).
        fast: CRM's fast-path options (:class:`~crm_d2.sparse.FastOptions`), passed only when
            given.

    Returns:
        One :class:`RefinedSegment` per refined mask, ``segment_id`` = its index in ``masks``;
        masks with area <= ``options.min_area`` (or empty) are left out.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W) RGB, got {tuple(image.shape)}")
    if masks.ndim != 3 or masks.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"masks must be (N, H, W) with (H, W) = {tuple(image.shape[-2:])}, "
                         f"got {tuple(masks.shape)}")
    n, height, width = masks.shape
    if isthing is not None and len(isthing) != n:
        raise ValueError(f"isthing has {len(isthing)} flags for {n} masks")
    device = refiner.device
    probs = masks.to(device=device, dtype=torch.float32)
    if probs.numel() and (probs.min() < 0 or probs.max() > 1):
        raise ValueError("float masks must lie in [0, 1]")
    binary = probs > 0.5
    areas = binary.flatten(1).sum(1).tolist()
    norm_image = normalize_image(image.to(device)[None])

    groups: dict[tuple[int, int], list[tuple[int, tuple[int, int, int, int]]]] = defaultdict(list)
    for i in range(n):
        if areas[i] <= options.min_area:
            continue
        box = mask_to_box(binary[i])
        box = expand_box(box, (height, width), options.expand_ratio, options.min_roi_size)
        box = _round_box(box, options.size_multiple, height, width)
        box = _canonical_box(box, options.canonical_sizes, height, width)
        groups[(box[3] - box[1], box[2] - box[0])].append((i, box))

    extra = {} if fast is None else {"fast": fast}  # refiners without fast options work too
    results: list[RefinedSegment] = []
    for items in groups.values():
        for start in range(0, len(items), options.batch_size):
            batch = items[start : start + options.batch_size]
            img_b = torch.cat([crop(norm_image, box) for _, box in batch])
            msk_b = torch.stack([normalize_mask(crop(probs[i], box))[None] for i, box in batch])
            out = refiner.refine_tensors(img_b, msk_b, scales=scales, exact=exact, **extra)
            for (i, box), prob in zip(batch, out):
                thing = True if isthing is None else bool(isthing[i])
                results.append(RefinedSegment(segment_id=i, prob=prob, box=box, isthing=thing))
    results.sort(key=lambda r: r.segment_id)
    logger.debug("refined %d of %d segments in %d size groups", len(results), n, len(groups))
    return results
