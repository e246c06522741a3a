"""The "modified argmax" that fuses refined masks back into label maps, and label-map helpers.

Shape shorthand used in this module:
    N: number of segments (instances) in one image
    K: number of segments in a panoptic ``segments_info`` list
    H, W: image height and width (the original resolution)
    h, w: height and width of one region of interest (ROI) = ``box`` size

Boxes follow :mod:`crm_d2.boxes`: ``(x0, y0, x1, y1)`` pixel indices, exclusive ``x1``/``y1``.

The fusion rule follows CascadePSP's scene-parsing refinement (Cheng et al. 2020): every
pixel starts with its input label and a confidence ``init_confidence``; each refined segment
competes with its probability inside its box (stuff probabilities are multiplied by
``stuff_factor`` first); a pixel takes the label of the refined segment whose probability strictly
exceeds ``init_confidence`` and every other refined probability at that pixel. Pixels where no
refined probability wins (all <= ``init_confidence``, or a tie for the highest) keep their input
label. The rule does not depend on the order of the refined segments.

Everything here is pure: tensors in, tensors out, on whatever device the inputs live. Only
:func:`semantic_to_segments` leaves torch: it labels connected components with OpenCV on CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .boxes import Box, as_int_box, check_box_inside
from .options import RefineOptions

__all__ = [
    "RefinedSegment",
    "fuse_instances",
    "fuse_panoptic",
    "segment_areas",
    "segments_to_semantic",
    "semantic_to_segments",
]

logger = logging.getLogger(__name__)

_DEFAULT = RefineOptions()


@dataclass
class RefinedSegment:
    """The refined probability of one segment inside its ROI.

    Attributes:
        segment_id: the segment's id (panoptic id for :func:`fuse_panoptic`, instance index for
            :func:`fuse_instances`).
        prob: (h, w) float tensor in [0, 1], the refined foreground probability inside ``box``.
            Values are not range-checked.
        box: (x0, y0, x1, y1) integer ROI in image pixels, exclusive x1/y1; (h, w) = its size.
        isthing: False for stuff segments, whose probability is scaled by ``stuff_factor``.
    """

    segment_id: int
    prob: Tensor
    box: Box
    isthing: bool = True


# --------------------------------------------------------------------------------------------
# Modified argmax
# --------------------------------------------------------------------------------------------


def _check_refined(seg: RefinedSegment, height: int, width: int) -> Box:
    """Validate the box and prob shape of one refined segment; return its int box."""
    box = as_int_box(seg.box)
    check_box_inside(box, height, width)
    x0, y0, x1, y1 = box
    if seg.prob.dim() != 2 or tuple(seg.prob.shape) != (y1 - y0, x1 - x0):
        raise ValueError(
            f"refined segment {seg.segment_id}: prob shape {tuple(seg.prob.shape)} does not "
            f"match its box {box} of size (h, w) = ({y1 - y0}, {x1 - x0})"
        )
    return box


def _modified_argmax(
    labels: Tensor,
    candidates: Sequence[tuple[int, Tensor, Box]],
    init_confidence: float,
) -> Tensor:
    """Core of the fusion, vectorised per candidate over its box.

    Args:
        labels: (H, W) integer input label map.
        candidates: (label, prob, box) with prob an (h, w) float32 tensor on the device of
            ``labels``, already scaled, and box an int box inside the image.
        init_confidence: confidence of every input label.

    Returns:
        (H, W) label map, same dtype as ``labels``: ``label`` of the candidate whose probability
        strictly exceeds ``init_confidence`` and every other candidate's probability at that
        pixel, the input label elsewhere (including ties for the highest probability).
    """
    out = labels.clone()
    best = torch.full(labels.shape, init_confidence, dtype=torch.float32, device=labels.device)
    init = best.new_tensor(init_confidence)
    # tied: the current best probability (> init) was reached by at least two candidates.
    tied = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    for label, prob, (x0, y0, x1, y1) in candidates:
        best_roi = best[y0:y1, x0:x1]
        tied_roi = tied[y0:y1, x0:x1]
        higher = prob > best_roi
        equal = (prob == best_roi) & (best_roi > init)
        tied_roi.logical_or_(equal).logical_and_(~higher)
        best_roi.copy_(torch.where(higher, prob, best_roi))
        out[y0:y1, x0:x1].masked_fill_(higher, label)
    return torch.where(tied, labels, out)


def segment_areas(panoptic: Tensor, segments_info: Sequence[Mapping]) -> dict[int, int]:
    """Pixel count of every segment of ``segments_info`` in a panoptic id map.

    Args:
        panoptic: (H, W) integer id map.
        segments_info: dicts with an ``"id"`` key.

    Returns:
        ``{id: area}`` for every entry of ``segments_info`` (0 for ids without pixels).
    """
    ids, counts = torch.unique(panoptic, return_counts=True)
    found = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    return {int(s["id"]): int(found.get(int(s["id"]), 0)) for s in segments_info}


def fuse_panoptic(
    panoptic: Tensor,
    segments_info: Sequence[Mapping],
    refined: Sequence[RefinedSegment],
    *,
    stuff_factor: float = _DEFAULT.stuff_factor,
    init_confidence: float = _DEFAULT.init_confidence,
    void_id: int = 0,
) -> tuple[Tensor, list[dict]]:
    """Fuse refined segment probabilities into a panoptic id map ("modified argmax").

    Every pixel starts with its input id and confidence ``init_confidence``. Each refined segment
    competes inside its box with its probability, multiplied by ``stuff_factor`` when
    ``isthing`` is False. A pixel takes the id of the refined segment whose (scaled) probability
    strictly exceeds ``init_confidence`` and every other refined probability there; otherwise it
    keeps its input value. Void pixels (``void_id``, or any id absent from ``segments_info``, the
    detectron2 convention) are not a segment: they keep their value unless a refined segment
    claims them.

    Args:
        panoptic: (H, W) integer id map (detectron2 ``panoptic_seg[0]``, int32).
        segments_info: one dict per segment with at least ``"id"`` (detectron2
            ``panoptic_seg[1]``); ids are unique and differ from ``void_id``.
        refined: refined segments; ``segment_id`` must be an id of ``segments_info``, each id at
            most once.
        stuff_factor: multiplier of stuff probabilities (0.51 in the reference, so stuff can only
            take a pixel with a probability above ~0.98).
        init_confidence: confidence of the input labels.
        void_id: id of void pixels (0 for Panoptic FPN / PanopticFCN, -1 for some models).

    Returns:
        ``(panoptic, segments_info)``: the fused (H, W) id map with the input dtype and device,
        and the entries of ``segments_info`` whose id still has pixels, in input order, as
        shallow copies with every field unchanged except ``"area"``, recomputed when present.

    Raises:
        ValueError: for a non-2-D or non-integer map, duplicate or void ids in
            ``segments_info``, refined ids not in ``segments_info`` or repeated, boxes outside
            the image, or a prob whose shape is not its box size.
    """
    if panoptic.dim() != 2:
        raise ValueError(f"panoptic must be an (H, W) id map, got shape {tuple(panoptic.shape)}")
    if panoptic.dtype.is_floating_point or panoptic.dtype == torch.bool:
        raise ValueError(f"panoptic must hold integer ids, got dtype {panoptic.dtype}")
    height, width = panoptic.shape
    info_ids = [int(s["id"]) for s in segments_info]
    if len(set(info_ids)) != len(info_ids):
        raise ValueError(f"segments_info has duplicate ids: {info_ids}")
    if void_id in info_ids:
        raise ValueError(f"segments_info has an entry with the void id {void_id}")

    known = set(info_ids)
    seen: set[int] = set()
    candidates = []
    for seg in refined:
        sid = int(seg.segment_id)
        if sid not in known:
            raise ValueError(f"refined segment id {sid} is not in segments_info ids {info_ids}")
        if sid in seen:
            raise ValueError(f"refined segment id {sid} appears more than once")
        seen.add(sid)
        box = _check_refined(seg, height, width)
        prob = seg.prob.to(device=panoptic.device, dtype=torch.float32)
        if not seg.isthing:
            prob = prob * stuff_factor
        candidates.append((sid, prob, box))

    fused = _modified_argmax(panoptic, candidates, init_confidence)

    areas = segment_areas(fused, segments_info)
    new_info = []
    for entry in segments_info:
        area = areas[int(entry["id"])]
        if area == 0:
            continue
        new_entry = dict(entry)
        if "area" in new_entry:
            new_entry["area"] = area
        new_info.append(new_entry)
    if len(new_info) != len(segments_info):
        logger.debug(
            "fuse_panoptic: %d of %d segments lost all their pixels",
            len(segments_info) - len(new_info),
            len(segments_info),
        )
    return fused, new_info


def fuse_instances(
    masks: Tensor,
    refined: Sequence[RefinedSegment],
    *,
    exclusive: bool,
    init_confidence: float = _DEFAULT.init_confidence,
    threshold: float = 0.5,
) -> Tensor:
    """Fuse refined instance probabilities into instance masks.

    Non-exclusive (Mask R-CNN style, masks may overlap): the new mask of a refined instance is
    ``prob > threshold`` inside its box and False outside it; ``init_confidence`` is unused.

    Exclusive (EntitySeg style, masks do not overlap): the modified argmax of
    :func:`fuse_panoptic` over a label map holding the instance index of every pixel and a
    background label of its own; ``threshold`` is unused. Outputs never overlap.

    In both modes instances without a RefinedSegment (e.g. too small to refine) keep their input
    mask, except for pixels another instance wins in exclusive mode.

    Args:
        masks: (N, H, W) bool masks.
        refined: refined instances; ``segment_id`` is the instance index in [0, N), each at most
            once. ``isthing`` is ignored (all instances are things).
        exclusive: whether the instances partition the image (see above).
        init_confidence: confidence of the input labels (exclusive mode).
        threshold: binarisation threshold of the refined probability (non-exclusive mode).

    Returns:
        (N, H, W) bool masks on the device of ``masks``.

    Raises:
        ValueError: for masks that are not (N, H, W) bool, overlapping masks in exclusive mode,
            bad or repeated instance indices, boxes outside the image, or a prob whose shape is
            not its box size.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool, got dtype {masks.dtype}")
    n, height, width = masks.shape
    seen: set[int] = set()
    checked = []
    for seg in refined:
        idx = int(seg.segment_id)
        if not 0 <= idx < n:
            raise ValueError(f"refined instance index {idx} is outside [0, {n})")
        if idx in seen:
            raise ValueError(f"refined instance index {idx} appears more than once")
        seen.add(idx)
        box = _check_refined(seg, height, width)
        checked.append((idx, seg.prob.to(device=masks.device, dtype=torch.float32), box))

    if not exclusive:
        out = masks.clone()
        for idx, prob, (x0, y0, x1, y1) in checked:
            out[idx] = False
            out[idx, y0:y1, x0:x1] = prob > threshold
        return out

    if n > 0 and bool((masks.sum(dim=0) > 1).any()):
        raise ValueError("exclusive=True needs non-overlapping masks, but some pixels overlap")
    background = n
    labels = torch.full((height, width), background, dtype=torch.int64, device=masks.device)
    if n > 0:
        owner = masks.to(torch.uint8).argmax(dim=0)
        labels = torch.where(masks.any(dim=0), owner, labels)
    fused = _modified_argmax(labels, checked, init_confidence)
    return fused.unsqueeze(0) == torch.arange(n, device=masks.device).view(n, 1, 1)


# --------------------------------------------------------------------------------------------
# Semantic maps as segments
# --------------------------------------------------------------------------------------------


def semantic_to_segments(
    sem: Tensor,
    *,
    ignore_label: int = 255,
    min_area: int = _DEFAULT.min_area,
    connectivity: int = 8,
) -> tuple[Tensor, list[dict]]:
    """Split a semantic label map into per-class connected components, panoptic style.

    Components are labelled with OpenCV's ``cv2.connectedComponentsWithStats`` on a CPU numpy
    copy (OpenCV is imported on first use); the result is moved back to the device of ``sem``.
    Ids are 1..K, assigned by increasing class and, within a class, in the order OpenCV numbers
    the components.

    Args:
        sem: (H, W) integer class map.
        ignore_label: class value that is not a segment (id 0 in the output).
        min_area: components with ``area > min_area`` get ``refine: True`` (the reference skips
            components with <= 1024 px).
        connectivity: 4 or 8.

    Returns:
        ``(panoptic, segments_info)``: (H, W) int32 id map (0 = not a segment) and one dict per
        component ``{"id", "category_id", "area", "isthing": False, "refine"}``. Callers with
        thing/stuff metadata may set ``isthing`` themselves.
    """
    if sem.dim() != 2:
        raise ValueError(f"sem must be an (H, W) class map, got shape {tuple(sem.shape)}")
    if sem.dtype.is_floating_point or sem.dtype == torch.bool:
        raise ValueError(f"sem must hold integer class ids, got dtype {sem.dtype}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    import cv2

    sem_np = sem.detach().cpu().numpy()
    ids = np.zeros(sem_np.shape, dtype=np.int32)
    segments_info: list[dict] = []
    next_id = 1
    for cls in np.unique(sem_np).tolist():
        if cls == ignore_label:
            continue
        in_class = sem_np == cls
        num, cc, stats, _ = cv2.connectedComponentsWithStats(
            in_class.astype(np.uint8), connectivity=connectivity, ltype=cv2.CV_32S
        )
        # OpenCV numbers components 1..num-1 (0 = outside the class): shift them to next_id.
        ids[in_class] = cc[in_class] + (next_id - 1)
        for j in range(1, num):
            area = int(stats[j, cv2.CC_STAT_AREA])
            segments_info.append(
                {
                    "id": next_id + j - 1,
                    "category_id": int(cls),
                    "area": area,
                    "isthing": False,
                    "refine": area > min_area,
                }
            )
        next_id += num - 1
    return torch.from_numpy(ids).to(sem.device), segments_info


def segments_to_semantic(
    panoptic: Tensor, segments_info: Sequence[Mapping], ignore_label: int = 255
) -> Tensor:
    """Class map of a panoptic id map: each segment's pixels get its ``category_id``.

    Args:
        panoptic: (H, W) integer id map.
        segments_info: dicts with ``"id"`` and ``"category_id"``.
        ignore_label: value of pixels whose id is not in ``segments_info``.

    Returns:
        (H, W) int64 class map on the device of ``panoptic``.
    """
    if panoptic.dim() != 2:
        raise ValueError(f"panoptic must be an (H, W) id map, got shape {tuple(panoptic.shape)}")
    out = torch.full(panoptic.shape, ignore_label, dtype=torch.int64, device=panoptic.device)
    if len(segments_info) == 0:
        return out
    ids = torch.tensor([int(s["id"]) for s in segments_info], dtype=torch.int64)
    if ids.unique().numel() != ids.numel():
        raise ValueError(f"segments_info has duplicate ids: {ids.tolist()}")
    cats = torch.tensor([int(s["category_id"]) for s in segments_info], dtype=torch.int64)
    ids, order = ids.to(panoptic.device).sort()
    cats = cats.to(panoptic.device)[order]
    flat = panoptic.to(torch.int64)
    pos = torch.searchsorted(ids, flat).clamp_(max=ids.numel() - 1)
    hit = ids[pos] == flat
    return torch.where(hit, cats[pos], out)
