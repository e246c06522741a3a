"""Pairing predictions with ground truth for the per-object before/after scores.

Shape shorthand: N predictions, M ground-truth objects, H/W image size.

The pairing is decided ONCE, on the coarse (input) masks, so that "before" and "after" compare
the same (prediction, ground truth) pair. With coarse masks made from the ground truth the pair
is known; otherwise a prediction is paired with the ground truth of the same category with which
it has the highest IoU, if that IoU is at least 0.5, greedily in decreasing score order, each
ground truth at most once (COCO-style matching at IoU 0.5; crowd regions are never paired).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..evaluation.panoptic import OFFSET, VOID

__all__ = ["match_instances", "match_panoptic", "rle_encode"]

MATCH_IOU = 0.5


def rle_encode(mask: np.ndarray) -> dict:
    """(H, W) bool mask -> COCO RLE dict with ``size`` [H, W] and ``counts`` as a str."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def match_instances(
    pred_masks: np.ndarray,
    pred_categories: Sequence[int],
    scores: Sequence[float],
    gt_masks: np.ndarray,
    gt_categories: Sequence[int],
    threshold: float = MATCH_IOU,
) -> list[int | None]:
    """Greedy same-category matching of instance predictions to (non-crowd) ground truths.

    Args:
        pred_masks: (N, H, W) bool predictions.
        pred_categories, scores: N category ids and scores.
        gt_masks: (M, H, W) bool ground truths (crowd regions left out by the caller).
        gt_categories: M category ids.
        threshold: minimum IoU of a pair.

    Returns:
        For each prediction, the index of its ground truth in ``gt_masks``, or None.
    """
    from pycocotools import mask as mask_utils

    n, m = len(pred_masks), len(gt_masks)
    if len(pred_categories) != n or len(scores) != n or len(gt_categories) != m:
        raise ValueError("one category (and score) per mask is needed")
    out: list[int | None] = [None] * n
    if n == 0 or m == 0:
        return out
    dt = [mask_utils.encode(np.asfortranarray(p.astype(np.uint8))) for p in pred_masks]
    gt = [mask_utils.encode(np.asfortranarray(g.astype(np.uint8))) for g in gt_masks]
    ious = np.asarray(mask_utils.iou(dt, gt, [0] * m), dtype=np.float64).reshape(n, m)
    same = np.asarray(pred_categories)[:, None] == np.asarray(gt_categories)[None, :]
    ious = np.where(same, ious, -1.0)
    taken = np.zeros(m, bool)
    for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable"):
        row = np.where(taken, -1.0, ious[i])
        j = int(np.argmax(row))
        if row[j] >= threshold:
            out[i] = j
            taken[j] = True
    return out


def match_panoptic(
    pred_ids: np.ndarray,
    pred_segments: Sequence[Mapping],
    gt_ids: np.ndarray,
    gt_segments: Sequence[Mapping],
    threshold: float = MATCH_IOU,
) -> dict[int, int]:
    """Pair predicted and ground-truth panoptic segments of the same category with IoU > 0.5.

    Plain mask IoU (VOID pixels count like any other); pairs with IoU > 0.5 are unique, so no
    greedy step is needed. Crowd ground truths are never paired.

    Args:
        pred_ids, gt_ids: (H, W) integer id maps.
        pred_segments, gt_segments: ``segments_info`` lists (``id``, ``category_id``,
            ``iscrowd`` for the ground truth).
        threshold: a pair needs IoU strictly above it.

    Returns:
        ``{predicted id: ground-truth id}``.
    """
    if pred_ids.shape != gt_ids.shape:
        raise ValueError(f"id maps differ in size: {pred_ids.shape} vs {gt_ids.shape}")
    codes = gt_ids.astype(np.int64) * OFFSET + pred_ids.astype(np.int64)
    pairs, counts = np.unique(codes, return_counts=True)
    pred_area = dict(zip(*(a.tolist() for a in np.unique(pred_ids, return_counts=True))))
    gt_area = dict(zip(*(a.tolist() for a in np.unique(gt_ids, return_counts=True))))
    pred_cat = {int(s["id"]): s["category_id"] for s in pred_segments}
    gt_cat = {int(s["id"]): s["category_id"] for s in gt_segments if not s.get("iscrowd", 0)}
    out: dict[int, int] = {}
    for code, inter in zip(pairs.tolist(), counts.tolist()):
        g, p = divmod(code, OFFSET)
        if p == VOID or g not in gt_cat or p not in pred_cat or gt_cat[g] != pred_cat[p]:
            continue
        if inter / (pred_area[p] + gt_area[g] - inter) > threshold:
            out[p] = g
    return out
