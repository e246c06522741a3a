"""Panoptic quality (PQ = SQ x RQ) with the definitions of panopticapi's ``pq_compute``, and
Boundary PQ; plus readers/writers for COCO panoptic PNGs.

Shape shorthand used in this module:
    H, W: image height and width

COCO panoptic format: a PNG per image whose RGB colour encodes a segment id,
``id = R + 256 * G + 256^2 * B``; id 0 is VOID (unlabelled). A JSON lists, per image
(``annotations[i]``: ``image_id``, ``file_name``, ``segments_info``), the segments with ``id``,
``category_id``, ``iscrowd`` (ground truth) and ``area`` (ground truth; predictions' areas are
counted from the PNG).

Matching rules (panopticapi ``evaluation.py``), per image:

* a ground-truth segment and a predicted segment of the same category match when their IoU is
  strictly greater than 0.5 (which makes matches unique); crowd ground truths never match;
* IoU = intersection / (pred area + gt area (from the gt JSON) - intersection - pred pixels on
  gt VOID): the part of a prediction that lies on VOID does not count against it;
* unmatched non-crowd ground truths are false negatives;
* an unmatched prediction is a false positive unless more than half of its pixels lie on VOID or on
  the crowd region of its own category (panopticapi keeps one crowd segment per category and
  image: the last one listed).

Per category: PQ = sum(IoU of matches) / (TP + FP/2 + FN/2), SQ = sum(IoU) / TP (0 if TP = 0),
RQ = TP / (TP + FP/2 + FN/2); categories with TP + FP + FN = 0 are left out of the averages
(``n`` counts the others) and get 0.0 in ``per_class``. "All", "Things" (``isthing == 1``) and
"Stuff" average over categories. Values are fractions (panopticapi's), not percent.

Boundary PQ (Cheng et al., CVPR 2021; boundary-iou-api ``coco_panoptic_api``, ``iou_type
="boundary"``): the IoU of a candidate pair is replaced by min(mask IoU, Boundary IoU) both for
the > 0.5 match test and in SQ. Each segment's boundary is :func:`~.binary.mask_to_boundary` of its
full-image mask (width from the image diagonal); the boundary union subtracts the predicted
boundary pixels that lie on ground-truth VOID, like the mask union.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from ..io import save_image
from .binary import boundary_dilation, mask_to_boundary

__all__ = [
    "OFFSET",
    "VOID",
    "boundary_pq",
    "id2rgb",
    "pq_compute",
    "read_panoptic_png",
    "rgb2id",
    "segment_areas",
    "write_panoptic_png",
]

logger = logging.getLogger(__name__)

OFFSET = 256 * 256 * 256  # ids are < 256^3; pairs (gt_id, pred_id) are coded as gt * OFFSET + pred
VOID = 0
_INTERIOR = -1  # label of segment pixels off the boundary in the boundary maps


def rgb2id(color: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` RGB colours -> ``(H, W)`` int64 segment ids ``R + 256 G + 256^2 B``."""
    color = np.asarray(color)
    if color.ndim != 3 or color.shape[2] != 3:
        raise ValueError(f"color must have shape (H, W, 3), got {color.shape}")
    c = color.astype(np.int64)
    return c[..., 0] + 256 * c[..., 1] + 256 * 256 * c[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """``(H, W)`` segment ids in [0, 256^3) -> ``(H, W, 3)`` uint8 RGB colours."""
    ids = np.asarray(ids).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= OFFSET):
        raise ValueError(f"segment ids must lie in [0, {OFFSET}), got {ids.min()}..{ids.max()}")
    rgb = np.empty((*ids.shape, 3), dtype=np.uint8)
    for channel in range(3):
        rgb[..., channel] = (ids // 256**channel) % 256
    return rgb


def read_panoptic_png(path: str | os.PathLike) -> np.ndarray:
    """Read a COCO panoptic PNG as ``(H, W)`` int64 segment ids."""
    with Image.open(path) as im:
        return rgb2id(np.asarray(im.convert("RGB")))


def write_panoptic_png(path: str | os.PathLike, ids: np.ndarray) -> None:
    """Write ``(H, W)`` segment ids as a COCO panoptic (RGB) PNG (atomically)."""
    save_image(path, id2rgb(ids))


@dataclass
class _CategoryStat:
    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0


def _load_json(obj: Mapping[str, Any] | str | os.PathLike, what: str) -> dict:
    if isinstance(obj, (str, os.PathLike)):
        with open(obj, encoding="utf-8") as f:
            return json.load(f)
    if isinstance(obj, Mapping):
        return dict(obj)
    raise ValueError(f"{what} must be a dict or a path to a json file, got {type(obj).__name__}")


def _categories_by_id(
    categories: Sequence[Mapping[str, Any]] | Mapping[int, Mapping[str, Any]] | None, gt: dict
) -> dict[int, Mapping[str, Any]]:
    if categories is None:
        if "categories" not in gt:
            raise ValueError("no categories given and the gt json has no 'categories'")
        categories = gt["categories"]
    if isinstance(categories, Mapping):
        return {int(k): v for k, v in categories.items()}
    return {int(c["id"]): c for c in categories}


def _pair_counts(a: np.ndarray, b: np.ndarray) -> dict[tuple[int, int], int]:
    """Pixel counts of every (a, b) label pair of two ``(H, W)`` label maps with labels >= -1."""
    shift = OFFSET + 1
    codes = (a.astype(np.int64) + 1) * shift + (b.astype(np.int64) + 1)
    labels, counts = np.unique(codes, return_counts=True)
    return {
        (int(c // shift) - 1, int(c % shift) - 1): int(n)
        for c, n in zip(labels.tolist(), counts.tolist())
    }


def _label_counts(labels: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(labels, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


def _boundary_map(ids: np.ndarray, segment_ids: Iterable[int], dilation: int) -> np.ndarray:
    """``(H, W)`` map: segment id on each listed segment's boundary, ``_INTERIOR`` inside it, the
    input id elsewhere (VOID stays VOID).

    The boundary is computed on a crop of the segment's box grown by ``dilation`` pixels (clipped to
    the image): erosion only looks ``dilation`` pixels away and :func:`mask_to_boundary` pads
    outside the crop with zeros, which is what lies there or what the image border stands for.
    """
    out = ids.astype(np.int64, copy=True)
    h, w = ids.shape
    for seg_id in segment_ids:
        mask = ids == seg_id
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            continue
        cols = np.flatnonzero(mask.any(axis=0))
        y0, y1 = max(0, rows[0] - dilation), min(h, rows[-1] + 1 + dilation)
        x0, x1 = max(0, cols[0] - dilation), min(w, cols[-1] + 1 + dilation)
        crop = mask[y0:y1, x0:x1]
        boundary = mask_to_boundary(crop, dilation=dilation)
        region = out[y0:y1, x0:x1]
        region[crop] = _INTERIOR
        region[boundary] = seg_id
    return out


def segment_areas(
    ids: np.ndarray,
    segments_info: Sequence[Mapping[str, Any]],
    categories: Mapping[int, Any],
    image_id: Any,
) -> dict[int, int]:
    """Pixel area of every segment of a predicted panoptic map, with panopticapi's checks.

    Args:
        ids: (H, W) segment-id map (read from the prediction PNG).
        segments_info: the prediction JSON's segments of that image.
        categories: known categories by id.
        image_id: for the messages.

    Returns:
        {segment id: area} for every non-VOID segment.

    Raises:
        ValueError: when an id of the map is not in ``segments_info`` (VOID excepted), a segment
            of ``segments_info`` is absent from the map, or a category is unknown.
    """
    pred_segms = {int(el["id"]): el for el in segments_info}
    areas: dict[int, int] = {}
    labels, counts = np.unique(ids, return_counts=True)
    for label, count in zip(labels.tolist(), counts.tolist()):
        if label not in pred_segms:
            if label == VOID:
                continue
            raise ValueError(
                f"image {image_id}: segment id {label} is in the prediction PNG but not in its JSON"
            )
        if pred_segms[label]["category_id"] not in categories:
            raise ValueError(
                f"image {image_id}: predicted segment {label} has unknown category_id "
                f"{pred_segms[label]['category_id']}"
            )
        areas[label] = count
    missing = sorted(set(pred_segms) - set(areas))
    if missing:
        raise ValueError(
            f"image {image_id}: segment ids {missing} are in the prediction JSON but not in its PNG"
        )
    return areas


def _image_stats(
    gt_ann: Mapping[str, Any],
    pred_ann: Mapping[str, Any],
    gt_folder: str,
    pred_folder: str,
    categories: Mapping[int, Any],
    iou_type: str,
    dilation_ratio: float,
) -> dict[int, _CategoryStat]:
    """Per-category TP/FP/FN and summed IoU of one image (panopticapi's rules, see module doc)."""
    image_id = gt_ann["image_id"]
    pan_gt = read_panoptic_png(os.path.join(gt_folder, gt_ann["file_name"]))
    pan_pred = read_panoptic_png(os.path.join(pred_folder, pred_ann["file_name"]))
    if pan_gt.shape != pan_pred.shape:
        raise ValueError(
            f"image {image_id}: gt PNG is {pan_gt.shape}, prediction PNG is {pan_pred.shape}"
        )
    gt_segms = {int(el["id"]): el for el in gt_ann["segments_info"]}
    pred_segms = {int(el["id"]): el for el in pred_ann["segments_info"]}
    pred_area = segment_areas(pan_pred, pred_ann["segments_info"], categories, image_id)

    gt_pred = _pair_counts(pan_gt, pan_pred)

    if iou_type == "boundary":
        dilation = boundary_dilation(*pan_gt.shape, dilation_ratio)
        gt_b = _boundary_map(pan_gt, gt_segms, dilation)
        pred_b = _boundary_map(pan_pred, pred_segms, dilation)
        gt_pred_b = _pair_counts(gt_b, pred_b)
        gt_b_area = _label_counts(gt_b)
        pred_b_area = _label_counts(pred_b)

    stats: dict[int, _CategoryStat] = defaultdict(_CategoryStat)
    gt_matched: set[int] = set()
    pred_matched: set[int] = set()
    for (gt_label, pred_label), inter in gt_pred.items():
        if gt_label not in gt_segms or pred_label not in pred_segms:
            continue
        gt_info = gt_segms[gt_label]
        if gt_info.get("iscrowd", 0) == 1:
            continue
        if gt_info["category_id"] != pred_segms[pred_label]["category_id"]:
            continue
        union = pred_area[pred_label] + gt_info["area"] - inter - gt_pred.get((VOID, pred_label), 0)
        value = inter / union
        if iou_type == "boundary":
            b_inter = gt_pred_b.get((gt_label, pred_label), 0)
            b_union = (
                pred_b_area[pred_label]
                + gt_b_area.get(gt_label, 0)
                - b_inter
                - gt_pred_b.get((VOID, pred_label), 0)
            )
            value = min(value, b_inter / b_union)
        if value > 0.5:
            stat = stats[gt_info["category_id"]]
            stat.tp += 1
            stat.iou += value
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)

    crowd_by_category: dict[int, int] = {}
    for gt_label, gt_info in gt_segms.items():
        if gt_label in gt_matched:
            continue
        if gt_info.get("iscrowd", 0) == 1:
            crowd_by_category[gt_info["category_id"]] = gt_label
            continue
        stats[gt_info["category_id"]].fn += 1

    for pred_label, pred_info in pred_segms.items():
        if pred_label in pred_matched:
            continue
        ignored = gt_pred.get((VOID, pred_label), 0)
        crowd = crowd_by_category.get(pred_info["category_id"])
        if crowd is not None:
            ignored += gt_pred.get((crowd, pred_label), 0)
        if ignored / pred_area[pred_label] > 0.5:
            continue
        stats[pred_info["category_id"]].fp += 1
    return dict(stats)


def _average(
    stats: Mapping[int, _CategoryStat], categories: Mapping[int, Mapping[str, Any]], isthing
) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    pq = sq = rq = 0.0
    n = 0
    per_class: dict[int, dict[str, float]] = {}
    for cat_id, info in categories.items():
        if isthing is not None and (info.get("isthing") == 1) != isthing:
            continue
        s = stats.get(cat_id, _CategoryStat())
        if s.tp + s.fp + s.fn == 0:
            per_class[cat_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            continue
        n += 1
        denom = s.tp + 0.5 * s.fp + 0.5 * s.fn
        pq_c = s.iou / denom
        sq_c = s.iou / s.tp if s.tp != 0 else 0.0
        rq_c = s.tp / denom
        per_class[cat_id] = {"pq": pq_c, "sq": sq_c, "rq": rq_c}
        pq += pq_c
        sq += sq_c
        rq += rq_c
    if n == 0:
        return {"pq": math.nan, "sq": math.nan, "rq": math.nan, "n": 0}, per_class
    return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class


def _image_stats_star(args: tuple) -> dict[int, _CategoryStat]:
    return _image_stats(*args)


def _pq(
    gt_json: Mapping[str, Any] | str | os.PathLike,
    gt_folder: str | os.PathLike,
    pred_json: Mapping[str, Any] | str | os.PathLike,
    pred_folder: str | os.PathLike,
    categories,
    iou_type: Literal["segm", "boundary"],
    dilation_ratio: float,
    workers: int,
    label: str = "",
) -> dict[str, Any]:
    gt = _load_json(gt_json, "gt_json")
    pred = _load_json(pred_json, "pred_json")
    cats = _categories_by_id(categories, gt)
    for folder, what in ((gt_folder, "ground-truth"), (pred_folder, "prediction")):
        if not os.path.isdir(folder):
            raise ValueError(f"{what} PNG folder {folder} does not exist")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    pred_by_image = {ann["image_id"]: ann for ann in pred["annotations"]}
    jobs = []
    for gt_ann in gt["annotations"]:
        image_id = gt_ann["image_id"]
        if image_id not in pred_by_image:
            raise ValueError(f"no prediction for the image with id {image_id}")
        jobs.append(
            (
                gt_ann,
                pred_by_image[image_id],
                os.fspath(gt_folder),
                os.fspath(pred_folder),
                cats,
                iou_type,
                dilation_ratio,
            )
        )

    totals: dict[int, _CategoryStat] = defaultdict(_CategoryStat)
    with contextlib.ExitStack() as stack:
        if workers == 1 or len(jobs) <= 1:
            per_image: Iterable[dict[int, _CategoryStat]] = map(_image_stats_star, jobs)
        else:
            executor = stack.enter_context(ProcessPoolExecutor(max_workers=workers))
            chunk = max(1, len(jobs) // (4 * workers))
            per_image = executor.map(_image_stats_star, jobs, chunksize=chunk)
        for i, image_stats in enumerate(per_image, 1):
            for cat_id, s in image_stats.items():
                t = totals[cat_id]
                t.iou += s.iou
                t.tp += s.tp
                t.fp += s.fp
                t.fn += s.fn
            if i % 500 == 0:
                logger.info("PQ: %d/%d images", i, len(jobs))

    results: dict[str, Any] = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        results[name], per_class = _average(totals, cats, isthing)
        if name == "All":
            results["per_class"] = per_class
    logger.info(
        "%s | %5s %5s %5s %4s\n%s",
        ("Boundary PQ" if iou_type == "boundary" else "PQ") + (f" of {label}" if label else ""),
        "PQ",
        "SQ",
        "RQ",
        "N",
        "\n".join(
            f"{name:6s} | {100 * r['pq']:5.1f} {100 * r['sq']:5.1f} {100 * r['rq']:5.1f} "
            f"{r['n']:4d}"
            for name, r in ((k, results[k]) for k in ("All", "Things", "Stuff"))
        ),
    )
    return results


def pq_compute(
    gt_json: Mapping[str, Any] | str | os.PathLike,
    gt_folder: str | os.PathLike,
    pred_json: Mapping[str, Any] | str | os.PathLike,
    pred_folder: str | os.PathLike,
    categories: Sequence[Mapping[str, Any]] | Mapping[int, Mapping[str, Any]] | None = None,
    *,
    workers: int = 1,
    label: str = "",
) -> dict[str, Any]:
    """Panoptic quality with panopticapi's ``pq_compute`` definitions (see the module docstring).

    Args:
        gt_json: COCO panoptic ground truth (dict or json path); ``annotations`` with
            ``image_id``, ``file_name``, ``segments_info`` (``id``, ``category_id``, ``iscrowd``,
            ``area``). Not modified.
        gt_folder: folder of the ground-truth PNGs.
        pred_json: predictions in the same format (``iscrowd`` and ``area`` not needed); every
            ground-truth image needs one. Not modified.
        pred_folder: folder of the predicted PNGs.
        categories: list of category dicts (``id``, ``isthing``) or dict id -> category; by default
            ``gt_json["categories"]``, as panopticapi does.
        workers: processes to use (1: in this process).
        label: what is evaluated, named in the logged table (e.g. ``"before (coarse)"``).

    Returns:
        ``{"All" | "Things" | "Stuff": {"pq", "sq", "rq": fraction, "n": number of categories},
        "per_class": {category_id: {"pq", "sq", "rq"}}}``. Where panopticapi would divide by
        ``n = 0`` (e.g. "Stuff" with no stuff category), the averages are NaN.
    """
    return _pq(
        gt_json, gt_folder, pred_json, pred_folder, categories, "segm", 0.02, workers, label
    )


def boundary_pq(
    gt_json: Mapping[str, Any] | str | os.PathLike,
    gt_folder: str | os.PathLike,
    pred_json: Mapping[str, Any] | str | os.PathLike,
    pred_folder: str | os.PathLike,
    categories: Sequence[Mapping[str, Any]] | Mapping[int, Mapping[str, Any]] | None = None,
    *,
    dilation_ratio: float = 0.02,
    workers: int = 1,
    label: str = "",
) -> dict[str, Any]:
    """Boundary PQ: :func:`pq_compute` with the pair IoU replaced by min(mask IoU, Boundary IoU).

    This is the boundary-iou-api's ``pq_compute(..., iou_type="boundary")``; see the module
    docstring. Arguments and result as :func:`pq_compute`; ``dilation_ratio`` sets the boundary
    width relative to the image diagonal.
    """
    return _pq(
        gt_json, gt_folder, pred_json, pred_folder, categories, "boundary", dilation_ratio, workers,
        label,
    )
