"""Refine the predictions of ONE image and score them before and after (one function per input
layout). Each returns the image's JSON record (see :mod:`.records`) and writes the image's
output files (PNGs); nothing is kept in memory after it returns.

Shape shorthand: N predicted segments of the image, M ground-truth objects, H/W image size.

Refinement and fusion are :mod:`crm_d2.pipeline` (the functions the detectron2 meta-architecture
calls), with the :class:`~crm_d2.options.RefineOptions` of the context (``crm-eval``'s defaults:
:data:`crm_d2.options.CRM_EVAL_DEFAULTS`). Instance masks are fused non-exclusively by default
(Mask R-CNN style: a refined instance's new mask is ``prob > 0.5`` inside its ROI box and False
outside); panoptic maps use the modified argmax (stuff probabilities x ``stuff_factor``); a BIG
mask is always ``prob > 0.5`` in its box, the official evaluation's rule keeping an essentially
empty coarse mask. Segments too small to refine keep their input.

Per-object scores (IoU with counts, mBA, Boundary IoU) are computed on full-image masks against
the paired ground truth (:mod:`.matching`) before and after refinement.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..boxes import expand_box, mask_to_box
from ..evaluation.binary import (
    BIG_EMPTY_COARSE_SUM,
    ObjectScores,
    apply_empty_coarse_rule,
    object_scores,
)
from ..evaluation.panoptic import write_panoptic_png
from ..io import read_image, read_mask, save_image
from ..options import RefineOptions
from ..pipeline import refine_instances, refine_panoptic
from ..refiners import Refiner
from .coarse import BINARY_LEVEL, CoarseSpec, render_instances, render_panoptic
from .datasets import BigSet, CocoInstanceSet, ImageItem, decode_segmentation
from .matching import match_instances, match_panoptic, rle_encode
from .records import ObjectRecord, OutputLayout

__all__ = ["ProcessContext", "process_big", "process_instances", "process_panoptic"]

logger = logging.getLogger(__name__)

CROP_EXPAND = 0.5  # overlay crops: the object's box grown by 50% in total
CROP_MIN_SIZE = 64


@dataclass
class ProcessContext:
    """What every per-image function needs.

    Attributes:
        refiner: the refiner (CRM or CascadePSP).
        options: selection, ROI, resolution and fusion options.
        layout: the output folder.
        coarse: coarse masks from the ground truth (None: the given predictions).
        soft_coarse: give CRM the soft coarse map (soft ``stride<K>`` kinds) instead of the
            binary mask.
    """

    refiner: Refiner
    options: RefineOptions
    layout: OutputLayout
    coarse: CoarseSpec | None = None
    soft_coarse: bool = False


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def _read_image(item: ImageItem) -> np.ndarray:
    if not os.path.isfile(item.image_path):
        raise ValueError(f"image {item.image_path} (id {item.image_id}) does not exist")
    image = read_image(item.image_path)
    if item.height is not None and image.shape[:2] != (item.height, item.width):
        raise ValueError(
            f"{item.image_path} is {image.shape[1]}x{image.shape[0]} (WxH) but its annotation "
            f"says {item.width}x{item.height}"
        )
    return image


def _image_tensor(image: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 RGB -> the pipeline's (3, H, W) view (copied when not writable or
    contiguous: torch wants writable memory)."""
    if not image.flags.writeable or not image.flags.c_contiguous:
        image = np.array(image, order="C")
    return torch.from_numpy(image).permute(2, 0, 1)


def _record_header(item: ImageItem, shape: tuple[int, int]) -> dict[str, Any]:
    """The fields every per-image record starts with."""
    return {
        "key": item.key,
        "image_id": item.image_id,
        "file_name": item.file_name,
        "height": shape[0],
        "width": shape[1],
    }


def _crop_box(masks: list[np.ndarray], shape: tuple[int, int]) -> list[int]:
    """Overlay crop: the union box of ``masks`` grown by :data:`CROP_EXPAND`."""
    union = np.logical_or.reduce(masks)
    box = mask_to_box(torch.from_numpy(union))
    if box is None:
        return [0, 0, shape[1], shape[0]]
    return list(expand_box(box, shape, CROP_EXPAND, CROP_MIN_SIZE))


def _object(
    index: int,
    gt_ref: Any,
    category: Any,
    refined: bool,
    crop: list[int],
    before: ObjectScores,
    after: ObjectScores,
) -> dict:
    """One scored object in the record's stored form (:class:`~.records.ObjectRecord`)."""
    return ObjectRecord(index, gt_ref, category, refined, crop, before, after).to_json()


def _bbox_xywh(mask: np.ndarray) -> list[float]:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    cols = np.flatnonzero(mask.any(axis=0))
    return [
        float(cols[0]),
        float(rows[0]),
        float(cols[-1] - cols[0] + 1),
        float(rows[-1] - rows[0] + 1),
    ]


def _result(base: dict, mask: np.ndarray) -> dict:
    """A COCO result with the mask, its box (XYWH) and area recomputed."""
    out = {k: v for k, v in base.items() if k not in ("segmentation", "bbox", "area")}
    out["segmentation"] = rle_encode(mask)
    out["bbox"] = _bbox_xywh(mask)
    out["area"] = int(mask.sum())
    return out


# --------------------------------------------------------------------------------------------
# COCO instances
# --------------------------------------------------------------------------------------------
def process_instances(ctx: ProcessContext, dataset: CocoInstanceSet, item: ImageItem) -> dict:
    """Refine the instance predictions (or coarse-from-GT masks) of one image.

    Returns:
        The record: ``coarse_results`` and ``refined_results`` (COCO results with RLE masks),
        ``objects`` (per-object scores), ``vanished`` (ground truths whose coarse mask came out
        empty, coarse from GT only), counts and timing.
    """
    t0 = time.perf_counter()
    image = _read_image(item)
    shape = image.shape[:2]
    anns = [a for a in dataset.annotations(item.image_id) if not a.get("iscrowd", 0)]
    gt_masks = [decode_segmentation(a["segmentation"], *shape) for a in anns]
    vanished = 0
    if ctx.coarse is not None:
        rendered = render_instances(ctx.coarse, gt_masks, item.image_id)
        vanished = len(gt_masks) - len(rendered)
        gt_of = [j for j, _ in rendered]
        soft = [s for _, s in rendered]
        preds = [
            {"image_id": item.image_id, "category_id": anns[j]["category_id"], "score": 1.0}
            for j in gt_of
        ]
        binary = [s >= BINARY_LEVEL for s in soft]
    else:
        preds = dataset.predictions(item.image_id)
        binary = [decode_segmentation(p["segmentation"], *shape) for p in preds]
        gt_of = match_instances(
            np.asarray(binary).reshape(len(binary), *shape),
            [p["category_id"] for p in preds],
            [float(p["score"]) for p in preds],
            np.asarray(gt_masks).reshape(len(gt_masks), *shape),
            [a["category_id"] for a in anns],
        )
        soft = None

    record: dict[str, Any] = {
        **_record_header(item, shape),
        "vanished": vanished,
        "segments": len(preds),
        "coarse_results": [],
        "refined_results": [],
        "objects": [],
        "refined": 0,
    }
    if not preds:
        record["seconds"] = time.perf_counter() - t0
        return record
    masks = np.stack(binary)
    soft_t = None
    if ctx.soft_coarse and soft is not None:
        soft_t = torch.from_numpy(np.stack(soft).astype(np.float32) / 255)
    scores = torch.tensor([float(p["score"]) for p in preds], dtype=torch.float64)
    res = refine_instances(
        ctx.refiner, _image_tensor(image), torch.from_numpy(masks), ctx.options,
        soft=soft_t, scores=scores,
    )
    del soft_t
    fused = res.masks.numpy()
    new_scores = res.scores.tolist() if ctx.options.score_reweight else None
    done = {r.segment_id for r in res.refined}
    record["refined"] = len(done)
    for i, pred in enumerate(preds):
        record["coarse_results"].append(_result(pred, masks[i]))
        out = pred if new_scores is None else {**pred, "score": new_scores[i]}
        record["refined_results"].append(_result(out, fused[i]))
        j = gt_of[i]
        if j is None:
            continue
        before = object_scores(masks[i], gt_masks[j])
        after = object_scores(fused[i], gt_masks[j]) if i in done else before
        crop = _crop_box([masks[i], fused[i], gt_masks[j]], shape)
        gt_ref = anns[j].get("id", j)
        record["objects"].append(
            _object(i, gt_ref, pred["category_id"], i in done, crop, before, after)
        )
    record["seconds"] = time.perf_counter() - t0
    return record


# --------------------------------------------------------------------------------------------
# COCO panoptic (real panoptic sets and instances seen as panoptic)
# --------------------------------------------------------------------------------------------
def _segments_out(ids: np.ndarray, segments: list[dict]) -> list[dict]:
    """Copies of ``segments`` present in ``ids`` with ``area`` and ``bbox`` recomputed."""
    out = []
    for seg in segments:
        mask = ids == int(seg["id"])
        area = int(mask.sum())
        if area == 0:
            continue
        entry = dict(seg)
        entry["area"] = area
        entry["bbox"] = [int(v) for v in _bbox_xywh(mask)]
        out.append(entry)
    return out


def process_panoptic(ctx: ProcessContext, dataset: Any, item: ImageItem) -> dict:
    """Refine every segment of one panoptic prediction (or coarse-from-GT map) of one image.

    ``dataset`` is a :class:`~.datasets.CocoPanopticSet` or an
    :class:`~.as_panoptic.InstancesAsPanoptic`.

    Returns:
        The record: ``refined_ann`` (and ``coarse_ann`` / ``gt_ann`` when this tool made the
        coarse set / the ground truth), ``coarse_png`` and ``refined_png`` paths, ``objects``.
    """
    t0 = time.perf_counter()
    image = _read_image(item)
    shape = image.shape[:2]
    png = dataset.png_name(item)
    gt_ids, gt_segments = dataset.read_gt(item.image_id, shape)
    if gt_ids.shape != shape:
        raise ValueError(
            f"image {item.image_id}: ground-truth PNG is {gt_ids.shape}, image {shape}"
        )
    record: dict[str, Any] = {
        **_record_header(item, shape),
        "png": png,
    }
    if dataset.gt_dir is None:
        write_panoptic_png(os.path.join(ctx.layout.dir("gt_panoptic"), png), gt_ids)
        record["gt_ann"] = {
            "image_id": item.image_id,
            "file_name": png,
            "segments_info": gt_segments,
        }

    soft_by_id: dict[int, np.ndarray] = {}
    if ctx.coarse is not None:
        coarse_ids, kept, soft_by_id = render_panoptic(
            ctx.coarse, gt_ids, gt_segments, item.image_id
        )
        coarse_segments = [
            {"id": int(s["id"]), "category_id": int(s["category_id"])} for s in kept
        ]
        coarse_segments = _segments_out(coarse_ids, coarse_segments)
        coarse_png = os.path.join(ctx.layout.dir("coarse_panoptic"), png)
        write_panoptic_png(coarse_png, coarse_ids)
        record["coarse_ann"] = {
            "image_id": item.image_id,
            "file_name": png,
            "segments_info": coarse_segments,
        }
        gt_of = {int(s["id"]): int(s["id"]) for s in coarse_segments}
    else:
        coarse_ids, coarse_segments, coarse_png = dataset.read_prediction(item.image_id, shape)
        if coarse_ids.shape != shape:
            raise ValueError(
                f"image {item.image_id}: prediction PNG is {coarse_ids.shape}, image {shape}"
            )
        if coarse_png is None:  # made in memory (instances as panoptic): keep a copy
            coarse_png = os.path.join(ctx.layout.dir("coarse_panoptic"), png)
            write_panoptic_png(coarse_png, coarse_ids)
            record["coarse_ann"] = {
                "image_id": item.image_id,
                "file_name": png,
                "segments_info": _segments_out(coarse_ids, coarse_segments),
            }
        gt_of = match_panoptic(coarse_ids, coarse_segments, gt_ids, gt_segments)
    record["coarse_png"] = os.path.abspath(coarse_png)

    seg_ids = [int(s["id"]) for s in coarse_segments]
    record["segments"] = len(seg_ids)
    isthing = []
    for s in coarse_segments:
        category = dataset.categories.get(int(s["category_id"]))
        if category is None:
            raise ValueError(
                f"image {item.image_id}: segment {s['id']} has unknown category {s['category_id']}"
            )
        isthing.append(category.get("isthing", 1) == 1)
    soft_t = None
    if ctx.soft_coarse and soft_by_id and seg_ids:
        soft_np = np.stack([soft_by_id[i] for i in seg_ids]).astype(np.float32) / 255
        soft_t = torch.from_numpy(soft_np)
        del soft_np
    res = refine_panoptic(
        ctx.refiner, _image_tensor(image), torch.from_numpy(coarse_ids), coarse_segments,
        ctx.options, isthing=isthing, soft=soft_t,
    )
    del soft_t
    fused, fused_segments, refined = res.ids.numpy(), res.segments_info, res.refined
    refined_png = os.path.join(ctx.layout.dir("refined_panoptic"), png)
    write_panoptic_png(refined_png, fused)
    record["refined_png"] = os.path.abspath(refined_png)
    record["refined_ann"] = {
        "image_id": item.image_id,
        "file_name": png,
        "segments_info": _segments_out(fused, fused_segments),
    }
    record["refined"] = len(refined)
    done = {r.segment_id for r in refined}
    categories = {int(s["id"]): s["category_id"] for s in coarse_segments}
    objects = []
    for sid, gid in sorted(gt_of.items()):
        before_mask, after_mask, gt_mask = coarse_ids == sid, fused == sid, gt_ids == gid
        before = object_scores(before_mask, gt_mask)
        after = object_scores(after_mask, gt_mask) if sid in done else before
        crop = _crop_box([before_mask, after_mask, gt_mask], shape)
        objects.append(_object(sid, gid, categories[sid], sid in done, crop, before, after))
    record["objects"] = objects
    record["seconds"] = time.perf_counter() - t0
    return record


# --------------------------------------------------------------------------------------------
# BIG / CascadePSP layout
# --------------------------------------------------------------------------------------------
def process_big(ctx: ProcessContext, dataset: BigSet, item: ImageItem) -> dict:
    """Refine the coarse mask of one image of a BIG-layout folder; write NAME_refined.png.

    CRM receives the coarse mask as stored (soft 0..255 values included). The written mask is
    0/255: ``prob > 0.5`` inside the ROI box, 0 outside; the coarse mask itself when it is too
    small to refine or essentially empty (sum of its 0..255 values < 1024, the official rule).
    """
    t0 = time.perf_counter()
    paths = dataset.paths[item.key]
    image = read_image(paths.image)
    coarse = read_mask(paths.coarse)
    gt = read_mask(paths.gt)
    shape = image.shape[:2]
    for mask, what in ((coarse, paths.coarse), (gt, paths.gt)):
        if mask.shape != shape:
            raise ValueError(
                f"{what} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
                f"{shape[1]}x{shape[0]}"
            )
    soft = torch.from_numpy(coarse.astype(np.float32) / 255)[None]
    # The official BIG rule: the refined mask replaces the coarse one (never exclusive).
    res = refine_instances(
        ctx.refiner, _image_tensor(image), soft > 0.5,
        dataclasses.replace(ctx.options, exclusive=False), soft=soft,
    )
    refined = res.refined
    out = res.masks[0].numpy().astype(np.uint8) * 255 if refined else coarse
    answer = apply_empty_coarse_rule(coarse, out)
    used_refined = bool(refined) and answer is out
    refined_png = os.path.join(ctx.layout.dir("refined"), f"{item.image_id}_refined.png")
    save_image(refined_png, answer)
    before = object_scores(coarse, gt)
    after = object_scores(answer, gt) if used_refined else before
    crop = _crop_box([coarse > 128, answer > 128, gt > 128], shape)
    return {
        **_record_header(item, shape),
        "segments": 1,
        "coarse_png": os.path.abspath(paths.coarse),
        "refined_png": os.path.abspath(refined_png),
        "empty_coarse": int(coarse.sum(dtype=np.int64)) < BIG_EMPTY_COARSE_SUM,
        "refined": int(used_refined),
        "objects": [_object(0, item.image_id, None, used_refined, crop, before, after)],
        "seconds": time.perf_counter() - t0,
    }
