"""COCO instances seen as a things-only panoptic set (``crm-eval --as-panoptic``).

Shape shorthand: N instances of one image, H/W image size.

Ground truth: every annotation of an image (crowd regions included, they keep ``iscrowd: 1``)
is painted into one id map in order of DECREASING area, each over the previous ones, so where
instances overlap the smaller one is visible (a small object in front of a large one keeps its
pixels). Annotation ``k`` of the image (JSON order) gets the segment id ``k + 1``; its ``area``
and ``bbox`` are those of its visible pixels; fully hidden annotations are left out. Every
category becomes a thing (``isthing: 1``), so PQ equals PQ-things and "Stuff" is empty.

Instance predictions: detectron2's rule for turning instances into a panoptic map
(``combine_semantic_and_instance_outputs`` without the stuff part): by decreasing score, skip
instances scored below 0.5 or with more than half of their pixels already taken, and give the
rest their still-free pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .datasets import CocoInstanceSet, ImageItem, decode_segmentation

__all__ = ["InstancesAsPanoptic", "combine_instances", "paint_by_area"]


def _bbox_xywh(mask: np.ndarray) -> list[int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def paint_by_area(masks: Sequence[np.ndarray], ids: Sequence[int]) -> np.ndarray:
    """Paint masks from the largest to the smallest area (ties: input order) into an id map.

    Args:
        masks: N (H, W) bool masks (at least one).
        ids: N positive ids.

    Returns:
        (H, W) int64 id map, 0 where no mask is.
    """
    if len(masks) != len(ids) or not masks:
        raise ValueError("paint_by_area needs one id per mask and at least one mask")
    areas = [int(m.sum()) for m in masks]
    out = np.zeros(masks[0].shape, np.int64)
    for i in sorted(range(len(masks)), key=lambda i: -areas[i]):
        out[masks[i]] = ids[i]
    return out


def combine_instances(
    masks: Sequence[np.ndarray],
    scores: Sequence[float],
    shape: tuple[int, int],
    score_threshold: float = 0.5,
    overlap_threshold: float = 0.5,
) -> tuple[np.ndarray, list[int]]:
    """detectron2's instance-to-panoptic rule (see the module docstring).

    Args:
        masks: N (H, W) bool masks.
        scores: N scores.
        shape: (H, W), for N = 0.
        score_threshold, overlap_threshold: detectron2's defaults 0.5 and 0.5.

    Returns:
        (H, W) int64 id map (instance ``k`` of the input has id ``k + 1``) and the list of the
        input indices that were placed, in placement order.
    """
    out = np.zeros(shape, np.int64)
    placed: list[int] = []
    for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable").tolist():
        if scores[i] < score_threshold:
            continue
        area = int(masks[i].sum())
        if area == 0:
            continue
        taken = int(np.count_nonzero(masks[i] & (out > 0)))
        if taken / area > overlap_threshold:
            continue
        out[masks[i] & (out == 0)] = i + 1
        placed.append(i)
    return out, placed


class InstancesAsPanoptic:
    """A :class:`CocoInstanceSet` with the panoptic-set interface used by the tool.

    Ground-truth PNGs do not exist on disk (``gt_dir`` is None): the tool writes them.
    """

    gt_dir = None

    def __init__(self, instances: CocoInstanceSet) -> None:
        self.instances = instances
        self.items = instances.items
        self.gt_path = instances.gt_path
        self.categories = {cid: {**c, "isthing": 1} for cid, c in instances.categories.items()}

    @staticmethod
    def png_name(item: ImageItem) -> str:
        return f"{item.key}.png"

    def read_gt(self, image_id: Any, shape: tuple[int, int]) -> tuple[np.ndarray, list[dict]]:
        """(H, W) int64 painted id map and its ``segments_info`` (see the module docstring)."""
        anns = self.instances.annotations(image_id)
        if not anns:
            return np.zeros(shape, np.int64), []
        masks = [decode_segmentation(a["segmentation"], *shape) for a in anns]
        ids = paint_by_area(masks, list(range(1, len(anns) + 1)))
        segments = []
        for k, ann in enumerate(anns, 1):
            visible = ids == k
            area = int(visible.sum())
            if area == 0:
                continue
            segments.append(
                {
                    "id": k,
                    "category_id": int(ann["category_id"]),
                    "iscrowd": int(ann.get("iscrowd", 0)),
                    "area": area,
                    "bbox": _bbox_xywh(visible),
                }
            )
        return ids, segments

    def read_prediction(
        self, image_id: Any, shape: tuple[int, int]
    ) -> tuple[np.ndarray, list[dict], None]:
        """Instance predictions combined into a panoptic map (no file: path None)."""
        preds = self.instances.predictions(image_id)
        masks = [decode_segmentation(p["segmentation"], *shape) for p in preds]
        ids, placed = combine_instances(masks, [float(p["score"]) for p in preds], shape)
        present = set(np.unique(ids).tolist())
        segments = [
            {
                "id": i + 1,
                "category_id": int(preds[i]["category_id"]),
                "score": float(preds[i]["score"]),
            }
            for i in placed
            if i + 1 in present
        ]
        return ids, segments, None

    def subset(self, image_ids) -> dict:
        """Ground-truth JSON skeleton (images and categories) for the written GT annotations."""
        wanted = set(image_ids)
        return {
            "images": [im for im in self.instances.gt["images"] if im["id"] in wanted],
            "categories": list(self.categories.values()),
        }
