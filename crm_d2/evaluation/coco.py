"""COCO mask AP (pycocotools) and Boundary AP (faster-coco-eval) with detectron2-style keys.

``segm`` runs pycocotools' ``COCOeval`` with ``iouType="segm"``, the same call as detectron2's
``COCOEvaluator``. ``boundary`` runs faster-coco-eval's ``COCOeval_faster`` with
``iouType="boundary"``: the IoU of a (detection, non-crowd ground truth) pair is
min(mask IoU, Boundary IoU) as in the boundary-iou-api's ``COCOeval`` (Boundary AP, Cheng et al.
2021); crowd ground truths keep the mask IoU.

``class_agnostic=True`` maps every category of the ground truth and of the results to one
category before evaluating, as EntitySeg's modified pycocotools does ("entity AP").
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

__all__ = ["AP_KEYS", "coco_mask_ap"]

logger = logging.getLogger(__name__)

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

_AGNOSTIC_CATEGORY = {"id": 1, "name": "entity", "supercategory": "entity"}


@contextlib.contextmanager
def _quiet(what: str):
    """Capture the libraries' prints and forward them to the logger at DEBUG level."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        text = buffer.getvalue().strip()
        if text:
            logger.debug("%s:\n%s", what, text)


def _load_gt(gt: Mapping[str, Any] | str | os.PathLike) -> dict:
    if isinstance(gt, (str, os.PathLike)):
        with open(gt, encoding="utf-8") as f:
            return json.load(f)
    if isinstance(gt, Mapping):
        return copy.deepcopy(dict(gt))
    raise ValueError(f"gt must be a COCO dict or a path to a COCO json, got {type(gt).__name__}")


def _check_results(results: Sequence[Mapping[str, Any]], image_ids: set) -> list[dict]:
    out = []
    for i, r in enumerate(results):
        for key in ("image_id", "category_id", "segmentation", "score"):
            if key not in r:
                raise ValueError(f"result {i} has no '{key}'")
        if r["image_id"] not in image_ids:
            raise ValueError(f"result {i} refers to image_id {r['image_id']} absent from gt")
        seg = r["segmentation"]
        if not (isinstance(seg, Mapping) and "counts" in seg and "size" in seg):
            raise ValueError(f"result {i}: segmentation must be an RLE dict with 'size', 'counts'")
        r = copy.deepcopy(dict(r))
        # As detectron2 does for segm: a 'bbox' would make COCO.loadRes take the box area.
        r.pop("bbox", None)
        if isinstance(seg["counts"], bytes):
            r["segmentation"]["counts"] = seg["counts"].decode("ascii")
        out.append(r)
    return out


def _to_agnostic(gt: dict, results: list[dict]) -> None:
    gt["categories"] = [dict(_AGNOSTIC_CATEGORY)]
    for ann in gt.get("annotations", []):
        ann["category_id"] = _AGNOSTIC_CATEGORY["id"]
    for r in results:
        r["category_id"] = _AGNOSTIC_CATEGORY["id"]


def _stats_to_dict(stats: Sequence[float]) -> dict[str, float]:
    # COCOeval.summarize() order: AP, AP50, AP75, APs, APm, APl, then recalls. -1 means "no gt".
    return {k: float(v * 100) if v >= 0 else math.nan for k, v in zip(AP_KEYS, stats[:6])}


def _evaluate_pycocotools(gt: dict, results: list[dict]) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with _quiet("pycocotools"):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"]}
            coco_dt.dataset["annotations"] = []
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats)


def _evaluate_boundary(gt: dict, results: list[dict], dilation_ratio: float) -> np.ndarray:
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError as e:
        raise ImportError(
            "iou_type='boundary' needs faster-coco-eval: pip install faster-coco-eval"
        ) from e

    sink: Callable[..., None] = logger.debug
    with _quiet("faster-coco-eval"):
        coco_gt = COCO(gt, print_function=sink)
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:
            empty = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt = COCO(empty, print_function=sink)
        evaluator = COCOeval_faster(
            coco_gt,
            coco_dt,
            iouType="boundary",
            print_function=sink,
            boundary_dilation_ratio=dilation_ratio,
        )
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats)


def coco_mask_ap(
    gt: Mapping[str, Any] | str | os.PathLike,
    results: Sequence[Mapping[str, Any]],
    *,
    class_agnostic: bool = False,
    iou_type: Literal["segm", "boundary"] = "segm",
    dilation_ratio: float = 0.02,
    label: str = "",
) -> dict[str, float]:
    """COCO instance-mask AP of ``results`` against ``gt``.

    Args:
        gt: COCO instance annotations (dict or path to the json) with ``images``, ``annotations``
            and ``categories``. Not modified.
        results: COCO results, one dict per detection with ``image_id``, ``category_id``,
            ``score`` and ``segmentation`` as an RLE dict (``size`` [H, W], ``counts`` str or
            bytes), e.g. from ``pycocotools.mask.encode``. Not modified. May be empty.
        class_agnostic: evaluate every category as one ("entity AP" of EntitySeg).
        iou_type: ``"segm"`` (mask AP, pycocotools) or ``"boundary"`` (Boundary AP,
            faster-coco-eval, which must be installed).
        dilation_ratio: boundary width relative to the image diagonal (``boundary`` only).
        label: what is evaluated, named in the logged line (e.g. ``"after (refined)"``).

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` in percent (0..100), as detectron2's
        ``COCOEvaluator`` reports them; NaN where COCOeval reports -1 (no ground truth in that
        area range).
    """
    if iou_type not in ("segm", "boundary"):
        raise ValueError(f"iou_type must be 'segm' or 'boundary', got {iou_type!r}")
    gt_dict = _load_gt(gt)
    for key in ("images", "annotations", "categories"):
        if key not in gt_dict:
            raise ValueError(f"gt has no '{key}' list: not a COCO instance annotation file")
    image_ids = {img["id"] for img in gt_dict["images"]}
    res = _check_results(results, image_ids)
    if class_agnostic:
        _to_agnostic(gt_dict, res)
    if iou_type == "segm":
        stats = _evaluate_pycocotools(gt_dict, res)
    else:
        stats = _evaluate_boundary(gt_dict, res, dilation_ratio)
    out = _stats_to_dict(stats)
    logger.info(
        "COCO %s AP%s%s: %s",
        iou_type,
        " (class-agnostic)" if class_agnostic else "",
        f" of {label}" if label else "",
        ", ".join(f"{k} {v:.2f}" for k, v in out.items()),
    )
    return out
