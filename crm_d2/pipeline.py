"""The refinement pipeline of one image: select -> stack -> refine -> remap ids -> fuse.

The one implementation behind both front-ends: the detectron2 meta-architecture
(:class:`crm_d2.d2.meta_arch.CRMRefinedModel`, on the model's device) and ``crm-eval``
(:mod:`crm_d2.crm_eval.process`, on the CPU side). No detectron2.

- :func:`refine_masks`: the masks large enough (``area > min_area`` of their ``> 0.5`` part, at
  the original resolution; :func:`select_large`, the only place of that rule) are refined on
  their ROIs (:func:`crm_d2.segments.refine_segments`), ``mask_chunk`` masks per call, at a
  reduced size when the image is larger than ``max_side``.
- :func:`refine_instances`: + instance fusion (:func:`crm_d2.fusion.fuse_instances`), the
  changed masks and optionally re-weighted scores.
- :func:`refine_panoptic`: + reuse of refined instances, ids of the segments and the panoptic
  "modified argmax" (:func:`crm_d2.fusion.fuse_panoptic`).
- :func:`refine_semantic`: connected components of a (C, H, W) score map, refined and fused
  back into the scores.

Tensors (shape shorthand: N masks, K panoptic segments, C classes, H/W original image size,
h/w reduced size): ``image`` is (3, H, W) RGB, uint8 or float 0..255 (a numpy (H, W, 3) image
is ``torch.from_numpy(image).permute(2, 0, 1)``); masks are (N, H, W) bool, or float
probabilities in [0, 1] (soft coarse masks: the box and the area use ``> 0.5``, the refiner
sees the soft values). The refiner computes on its own device; every result lies on the
device of the masks (or the id / score map) given.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from .fusion import (
    RefinedSegment,
    fuse_instances,
    fuse_panoptic,
    segment_areas,
    segments_to_semantic,
    semantic_to_segments,
)
from .options import RefineOptions
from .refiners import Refiner
from .segments import ROIOptions, refine_segments

__all__ = [
    "InstanceRefinement",
    "PanopticRefinement",
    "reduced_size",
    "refine_instances",
    "refine_masks",
    "refine_panoptic",
    "refine_semantic",
    "resolve_exclusive",
    "resolve_void_id",
    "roi_options",
    "select_large",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Options and selection
# --------------------------------------------------------------------------------------------
def roi_options(options: RefineOptions) -> ROIOptions:
    """The :class:`~crm_d2.segments.ROIOptions` of ``options``."""
    return ROIOptions(
        expand_ratio=options.expand_ratio,
        min_area=options.min_area,
        batch_size=options.batch_size,
        size_multiple=options.size_multiple,
        min_roi_size=options.min_roi_size,
    )


def select_large(areas: Sequence[int], min_area: int) -> list[int]:
    """Indices of the areas large enough to refine: ``area > min_area`` (the reference skips
    segments of at most 1024 pixels)."""
    return [i for i, area in enumerate(areas) if int(area) > min_area]


def reduced_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """(h, w) at which an (H, W) image is refined with ``max_side`` (None: unchanged)."""
    if max_side is None or max(height, width) <= max_side:
        return height, width
    s = max_side / max(height, width)
    return max(1, round(height * s)), max(1, round(width * s))


def resolve_exclusive(masks: Tensor, exclusive: bool | None) -> bool:
    """The instance fusion mode: ``exclusive``, or for None whether the (N, H, W) bool masks
    are at least two and do not overlap."""
    if exclusive is not None:
        return exclusive
    return masks.shape[0] >= 2 and not bool((masks.sum(dim=0) > 1).any())


def resolve_void_id(segments_info: Sequence[Mapping], void_id: int | None) -> int:
    """The panoptic void id: ``void_id``, or for None -1 if some segment has id 0, else 0."""
    if void_id is not None:
        return void_id
    return -1 if any(int(s["id"]) == 0 for s in segments_info) else 0


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------
def _downscale_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """(3, H, W) image -> (3, h, w), OpenCV area averaging on the CPU (exact area weights, same
    dtype), back on the image's device."""
    array = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
    small = cv2.resize(array, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(small).permute(2, 0, 1).to(image.device)


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


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------
def _check_image(image: Tensor, size: Sequence[int]) -> None:
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W) RGB, got {tuple(image.shape)}")
    if tuple(image.shape[-2:]) != tuple(size):
        raise ValueError(
            f"masks are {tuple(size)} (H, W) but the image is {tuple(image.shape[-2:])}: give "
            "the image at the resolution of the masks"
        )


@torch.no_grad()
def refine_masks(
    refiner: Refiner,
    image: Tensor,
    masks: Tensor,
    options: RefineOptions,
    *,
    isthing: Sequence[bool] | None = None,
) -> list[RefinedSegment]:
    """Refine every mask whose ``> 0.5`` part has more than ``options.min_area`` pixels.

    Args:
        refiner: the refiner (CRM, CascadePSP or the guided filter).
        image: (3, H, W) uint8 (or 0..255 float) RGB at the original resolution.
        masks: (N, H, W) bool, or float probabilities in [0, 1].
        options: ROI, resolution and chunking options (the fusion ones are unused here).
        isthing: per-mask flag copied into the results (default all True).

    Returns:
        One :class:`RefinedSegment` per refined mask, ``segment_id`` = its index in ``masks``,
        in original image coordinates, ``prob`` on the device of ``masks``, sorted by index.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got {tuple(masks.shape)}")
    n, height, width = masks.shape
    _check_image(image, (height, width))
    if isthing is not None and len(isthing) != n:
        raise ValueError(f"isthing has {len(isthing)} flags for {n} masks")
    binary = masks if masks.dtype == torch.bool else masks > 0.5
    selected = select_large(binary.flatten(1).sum(1).tolist(), options.min_area)
    if not selected:
        return []
    small = reduced_size(height, width, options.max_side)
    scaled = small != (height, width)
    image_in = _downscale_image(image, small) if scaled else image
    # The selection is done here, at the original resolution: refine_segments keeps every mask.
    roi = dataclasses.replace(roi_options(options), min_area=0)
    chunk = options.mask_chunk or len(selected)
    results: list[RefinedSegment] = []
    for start in range(0, len(selected), chunk):
        idx = selected[start : start + chunk]
        part = masks[idx]
        if scaled:
            part = F.interpolate(part.float()[None], size=small, mode="area")[0].clamp_(0, 1)
        flags = None if isthing is None else [bool(isthing[i]) for i in idx]
        out = refine_segments(
            refiner, image_in, part, roi, isthing=flags, scales=options.scales, exact=options.exact
        )
        for seg in out:
            seg = RefinedSegment(
                idx[seg.segment_id], seg.prob.to(masks.device), seg.box, seg.isthing
            )
            results.append(_to_original(seg, small, (height, width)) if scaled else seg)
    results.sort(key=lambda r: r.segment_id)
    logger.debug("refined %d of %d masks (%d selected)", len(results), n, len(selected))
    return results


# --------------------------------------------------------------------------------------------
# Instances
# --------------------------------------------------------------------------------------------
@dataclass
class InstanceRefinement:
    """The refined instances of one image.

    Attributes:
        masks: (N, H, W) bool fused masks (the input masks where nothing was refined).
        refined: the refined segments, ``segment_id`` = instance index.
        changed: (N,) bool, True where the fused mask differs from the input.
        scores: (N,) scores (re-weighted with ``score_reweight``), or None if none were given.
    """

    masks: Tensor
    refined: list[RefinedSegment]
    changed: Tensor
    scores: Tensor | None


def _mean_refined_prob(refined: Sequence[RefinedSegment], masks: Tensor) -> Tensor:
    """(N,) mean refined probability inside each new mask; 1 for unrefined, 0 if emptied."""
    factor = torch.ones(masks.shape[0], dtype=torch.float32)
    for seg in refined:
        x0, y0, x1, y1 = seg.box
        inside = masks[seg.segment_id, y0:y1, x0:x1].to(seg.prob.device)
        factor[seg.segment_id] = float(seg.prob[inside].mean()) if bool(inside.any()) else 0.0
    return factor


@torch.no_grad()
def refine_instances(
    refiner: Refiner,
    image: Tensor,
    masks: Tensor,
    options: RefineOptions,
    *,
    soft: Tensor | None = None,
    scores: Tensor | None = None,
) -> InstanceRefinement:
    """Refine the instance masks of one image and fuse them (see :class:`RefineOptions`).

    Args:
        refiner: the refiner.
        image: (3, H, W) RGB at the resolution of the masks.
        masks: (N, H, W) bool instance masks.
        options: selection, ROI and fusion options (``exclusive``, ``init_confidence``,
            ``score_reweight``).
        soft: (N, H, W) float probabilities in [0, 1] that the refiner receives instead of
            ``masks`` (soft coarse masks); their ``> 0.5`` part selects what is refined.
        scores: (N,) instance scores, re-weighted when ``options.score_reweight``.

    Returns:
        The fused masks (on the device of ``masks``), the refined segments, the changed flags
        and the scores.
    """
    if masks.ndim != 3 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be (N, H, W) bool, got {tuple(masks.shape)} {masks.dtype}")
    if soft is not None and soft.shape != masks.shape:
        raise ValueError(f"soft is {tuple(soft.shape)} but masks are {tuple(masks.shape)}")
    refined = refine_masks(refiner, image, masks if soft is None else soft, options)
    if not refined:
        changed = torch.zeros(masks.shape[0], dtype=torch.bool, device=masks.device)
        return InstanceRefinement(masks, [], changed, scores)
    fused = fuse_instances(
        masks,
        refined,
        exclusive=resolve_exclusive(masks, options.exclusive),
        init_confidence=options.init_confidence,
    )
    changed = (fused != masks).flatten(1).any(dim=1)
    if options.score_reweight and scores is not None:
        scores = scores * _mean_refined_prob(refined, fused).to(scores)
    return InstanceRefinement(fused, refined, changed, scores)


# --------------------------------------------------------------------------------------------
# Panoptic
# --------------------------------------------------------------------------------------------
@dataclass
class PanopticRefinement:
    """The refined panoptic map of one image.

    Attributes:
        ids: (H, W) fused id map (input dtype and device).
        segments_info: the input entries whose id still has pixels, in input order, shallow
            copies with ``"area"`` recomputed when present.
        refined: the refined (or reused) segments, ``segment_id`` = panoptic id.
    """

    ids: Tensor
    segments_info: list[dict]
    refined: list[RefinedSegment]


@torch.no_grad()
def refine_panoptic(
    refiner: Refiner,
    image: Tensor,
    ids: Tensor,
    segments_info: Sequence[Mapping],
    options: RefineOptions,
    *,
    isthing: Sequence[bool] | None = None,
    soft: Tensor | None = None,
    reuse: Mapping[int, RefinedSegment] | None = None,
) -> PanopticRefinement:
    """Refine every large-enough segment of one panoptic map and fuse ("modified argmax").

    Args:
        refiner: the refiner.
        image: (3, H, W) RGB at the resolution of ``ids``.
        ids: (H, W) integer id map.
        segments_info: one dict per segment with ``"id"`` (and optionally ``"isthing"``,
            ``"instance_id"``, ``"area"``).
        options: selection, ROI and fusion options (``stuff_factor``, ``init_confidence``,
            ``void_id``, ``reuse_instances``).
        isthing: per-entry thing flag; default each entry's ``"isthing"`` (True if missing).
            Stuff probabilities are multiplied by ``stuff_factor``.
        soft: (K, H, W) float probabilities in [0, 1], one per entry of ``segments_info``, that
            the refiner receives instead of the binary segment masks.
        reuse: ``{instance index: refined instance}``; with ``options.reuse_instances`` a
            large-enough thing segment whose ``instance_id`` is in it takes that refinement.

    Returns:
        The fused map and segments and the refined segments (ids remapped to panoptic ids).
    """
    if ids.ndim != 2:
        raise ValueError(f"ids must be an (H, W) id map, got {tuple(ids.shape)}")
    _check_image(image, ids.shape)
    if not segments_info:
        return PanopticRefinement(ids, [], [])
    k = len(segments_info)
    flags = [bool(s.get("isthing", True)) for s in segments_info] if isthing is None else isthing
    if len(flags) != k:
        raise ValueError(f"isthing has {len(flags)} flags for {k} segments")
    if soft is not None and (soft.ndim != 3 or soft.shape[0] != k or soft.shape[1:] != ids.shape):
        raise ValueError(f"soft must be ({k}, H, W) = one map per segment, got {tuple(soft.shape)}")
    void_id = resolve_void_id(segments_info, options.void_id)
    seg_ids = [int(s["id"]) for s in segments_info]
    if soft is None:
        by_id = segment_areas(ids, segments_info)
        areas = [by_id[i] for i in seg_ids]
    else:
        areas = (soft > 0.5).flatten(1).sum(1).tolist()
    chosen = select_large(areas, options.min_area)
    refined: list[RefinedSegment] = []
    if reuse and options.reuse_instances:
        kept = []
        for j in chosen:
            inst = segments_info[j].get("instance_id") if flags[j] else None
            seg = reuse.get(int(inst)) if inst is not None else None
            if seg is None:
                kept.append(j)
            else:
                refined.append(RefinedSegment(seg_ids[j], seg.prob, seg.box, True))
        logger.debug(
            "panoptic: %d thing segments reuse their instance's refinement", len(chosen) - len(kept)
        )
        chosen = kept
    if chosen:
        if soft is None:
            masks = torch.stack([ids == seg_ids[j] for j in chosen])
        else:
            masks = soft[chosen]
        new = refine_masks(refiner, image, masks, options, isthing=[flags[j] for j in chosen])
        del masks
        refined += [
            RefinedSegment(seg_ids[chosen[r.segment_id]], r.prob, r.box, r.isthing) for r in new
        ]
    fused, fused_info = fuse_panoptic(
        ids,
        segments_info,
        refined,
        stuff_factor=options.stuff_factor,
        init_confidence=options.init_confidence,
        void_id=void_id,
    )
    return PanopticRefinement(fused, fused_info, refined)


# --------------------------------------------------------------------------------------------
# Semantic
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def refine_semantic(
    refiner: Refiner, image: Tensor, sem_seg: Tensor, options: RefineOptions
) -> Tensor:
    """Refine each large connected component of the argmax of a (C, H, W) score map.

    Components (:func:`crm_d2.fusion.semantic_to_segments`) are refined as things (no
    ``stuff_factor``) and fused with the modified argmax (``init_confidence``, void 0). Where the
    label changes, the scores of the old and the new label are swapped, so the argmax of the
    result is the refined label map (up to exact ties) and every pixel's score vector stays a
    permutation of the input one.

    Returns:
        (C, H, W) scores, ``sem_seg`` itself when no component is large enough.
    """
    if sem_seg.dim() != 3:
        raise ValueError(f"sem_seg must be (C, H, W), got {tuple(sem_seg.shape)}")
    labels = sem_seg.argmax(dim=0)
    _check_image(image, labels.shape)
    comp, comp_info = semantic_to_segments(labels, ignore_label=-1, min_area=options.min_area)
    chosen = [comp_info[j] for j in select_large([s["area"] for s in comp_info], options.min_area)]
    if not chosen:
        return sem_seg
    masks = torch.stack([comp == s["id"] for s in chosen])
    refined = refine_masks(refiner, image, masks, options)
    refined = [RefinedSegment(int(chosen[r.segment_id]["id"]), r.prob, r.box) for r in refined]
    fused, fused_info = fuse_panoptic(
        comp, comp_info, refined, init_confidence=options.init_confidence, void_id=0
    )
    new_labels = segments_to_semantic(fused, fused_info, ignore_label=-1)
    new_labels = torch.where(new_labels < 0, labels, new_labels)
    changed = new_labels != labels
    old_v = sem_seg.gather(0, labels[None])[0]
    new_v = sem_seg.gather(0, new_labels[None])[0]
    out = sem_seg.clone()
    out.scatter_(0, labels[None], torch.where(changed, new_v, old_v)[None])
    out.scatter_(0, new_labels[None], torch.where(changed, old_v, new_v)[None])
    return out
