"""Box geometry and the "modified argmax" that fuses refined masks back into label maps.

Shape shorthand used in this module:
    N: number of segments (instances) in one image
    K: number of segments in a panoptic ``segments_info`` list
    H, W: image height and width (the original resolution)
    h, w: height and width of one region of interest (ROI) = ``box`` size

Boxes are ``(x0, y0, x1, y1)`` in pixel indices with exclusive ``x1``/``y1``: the ROI of a box is
``t[..., y0:y1, x0:x1]`` and has ``h = y1 - y0`` rows and ``w = x1 - x0`` columns. This is
detectron2's convention for boxes computed from masks (``x1 = last column + 1``).

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
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Box",
    "RefinedSegment",
    "boxes_from_masks",
    "crop",
    "expand_box",
    "fuse_instances",
    "fuse_panoptic",
    "mask_to_box",
    "paste",
    "segment_areas",
    "segments_to_semantic",
    "select_segments",
    "semantic_to_segments",
]

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]

# Tolerance for floor/ceil in expand_box, so that 2.0000000001 does not grow a box by a pixel.
_ROUND_EPS = 1e-6


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
# Boxes
# --------------------------------------------------------------------------------------------


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


def _as_int_box(box: Sequence) -> Box:
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


def _check_box_inside(box: Box, height: int, width: int) -> None:
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
    expand_ratio: float = 0.25,
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
    x0, y0, x1, y1 = ibox = _as_int_box(box)
    _check_box_inside(ibox, t.shape[-2], t.shape[-1])
    return t[..., y0:y1, x0:x1]


def paste(
    roi: Tensor, box: Sequence[int], image_size: tuple[int, int], fill: float = 0.0
) -> Tensor:
    """Put an ROI back into a full image filled with ``fill``: the inverse of :func:`crop`.

    Args:
        roi: (h, w) tensor (leading dimensions (..., h, w) are kept as well).
        box: (x0, y0, x1, y1) integer box inside the image, with (h, w) = its size.
        image_size: (H, W).
        fill: value outside the box.

    Returns:
        (H, W) (or (..., H, W)) tensor with the dtype and device of ``roi``.
    """
    height, width = _check_image_size(image_size)
    x0, y0, x1, y1 = ibox = _as_int_box(box)
    _check_box_inside(ibox, height, width)
    if roi.dim() < 2 or tuple(roi.shape[-2:]) != (y1 - y0, x1 - x0):
        raise ValueError(
            f"roi shape {tuple(roi.shape)} does not match box {ibox} of size "
            f"(h, w) = ({y1 - y0}, {x1 - x0})"
        )
    out = roi.new_full((*roi.shape[:-2], height, width), fill)
    out[..., y0:y1, x0:x1] = roi
    return out


# --------------------------------------------------------------------------------------------
# Modified argmax
# --------------------------------------------------------------------------------------------


def _check_refined(seg: RefinedSegment, height: int, width: int) -> Box:
    """Validate the box and prob shape of one refined segment; return its int box."""
    box = _as_int_box(seg.box)
    _check_box_inside(box, height, width)
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
    stuff_factor: float = 0.51,
    init_confidence: float = 0.5,
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
    init_confidence: float = 0.5,
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
    min_area: int = 1024,
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


def select_segments(
    segments_info: Sequence[Mapping],
    areas: Mapping[int, int] | Sequence[int],
    min_area: int = 1024,
) -> list[int]:
    """Ids of the segments large enough to refine (``area > min_area``).

    Args:
        segments_info: dicts with an ``"id"`` key.
        areas: either ``{id: area}`` (ids missing from it count as area 0; see
            :func:`segment_areas`) or one area per entry of ``segments_info``, in its order.
        min_area: segments with ``area <= min_area`` are skipped (1024 in the reference).

    Returns:
        Selected ids, in ``segments_info`` order.
    """
    ids = [int(s["id"]) for s in segments_info]
    if isinstance(areas, Mapping):
        sizes = [int(areas.get(i, 0)) for i in ids]
    else:
        if len(areas) != len(ids):
            raise ValueError(
                f"areas has {len(areas)} values but segments_info has {len(ids)} entries"
            )
        sizes = [int(a) for a in areas]
    return [i for i, a in zip(ids, sizes, strict=True) if a > min_area]
