"""detectron2 data and evaluation glue of crm_d2 (needs detectron2).

- :class:`OriginalImageMapper`: wraps a test mapper and keeps the original-resolution pixels
  (``"original_image"``) when the test resize changes the image size, so that CRM refines on
  the real pixels and not on an up-sampled network input.
- Dataset registration by paths: :func:`register_coco_panoptic_folder` (images + panoptic PNGs
  + panoptic JSON) and :func:`register_coco_instance_folder` (images + COCO instance JSON).
  Files a panoptic folder lacks for some evaluators are derived from its panoptic PNGs into a
  cache folder by :func:`prepare_dataset_files`: a COCO instance JSON of the things (mask AP),
  a COCO JSON of all segments (entity AP) and, for the "separated" convention, the semantic
  PNGs (things = 0, stuff = 1..S, void = 255; Panoptic FPN's sem_seg classes).
- Evaluators: :class:`EntityAPEvaluator` (class-agnostic COCO mask AP, EntitySeg's "entity AP")
  and :class:`BeforeAfterEvaluator`, which feeds the inner model's outputs (``"crm_inner"``)
  to one evaluator and the refined outputs to another and logs both with their difference.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.detection_utils import read_image
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BitMasks
from detectron2.utils import comm
from tabulate import tabulate

from .evaluation import coco_mask_ap, read_panoptic_png
from .io import save_image, write_json
from .meta_arch import INNER_KEY
from .simulator import ANNOTATIONS_KEY

__all__ = [
    "BeforeAfterEvaluator",
    "EntityAPEvaluator",
    "OriginalImageMapper",
    "before_after_results",
    "derive_panoptic_annotations",
    "entity_gt_json",
    "format_before_after",
    "load_coco_panoptic_folder",
    "panoptic_metadata",
    "prepare_dataset_files",
    "register_coco_instance_folder",
    "register_coco_panoptic_folder",
]

logger = logging.getLogger(__name__)

_DONE = "done.json"


# --------------------------------------------------------------------------------------------
# Mapper
# --------------------------------------------------------------------------------------------
class OriginalImageMapper:
    """Wrap a test-time mapper and keep the original pixels for CRM.

    Calls ``mapper(dataset_dict)`` and, when the network image (``out["image"]``, (C, h, w))
    differs in size from ``(out["height"], out["width"])``, reads ``out["file_name"]`` again
    in RGB and stores it as ``out["original_image"]``: a (3, H, W) uint8 tensor.
    :class:`crm_d2.meta_arch.CRMRefinedModel` refines on it; other models ignore the key.
    """

    def __init__(
        self, mapper: Callable[[dict], dict | None], keep_annotations: bool = False
    ) -> None:
        """
        Args:
            mapper: the test-time mapper (e.g. ``DatasetMapper(cfg, is_train=False)``).
            keep_annotations: also pass the dataset dict's ``annotations`` (which
                detectron2's test mapper drops) as ``out["crm_gt_annotations"]``, for the
                simulated inner model :class:`crm_d2.simulator.CoarseGTSimulator`.
        """
        self.mapper = mapper
        self.keep_annotations = keep_annotations

    def __call__(self, dataset_dict: dict) -> dict | None:
        out = self.mapper(dataset_dict)
        if out is None:
            return None
        if self.keep_annotations and "annotations" in dataset_dict:
            out[ANNOTATIONS_KEY] = copy.deepcopy(dataset_dict["annotations"])
        height, width = out.get("height"), out.get("width")
        if height is None or width is None:
            return out
        if tuple(out["image"].shape[-2:]) != (int(height), int(width)):
            rgb = read_image(out["file_name"], format="RGB")
            if rgb.shape[:2] != (int(height), int(width)):
                logger.warning(
                    "%s is %s but its dataset entry says %dx%d",
                    out["file_name"],
                    rgb.shape[:2],
                    height,
                    width,
                )
            out["original_image"] = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
        return out


# --------------------------------------------------------------------------------------------
# Panoptic folders
# --------------------------------------------------------------------------------------------
def _load_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _categories(panoptic_json: Mapping, categories_json: str | None) -> list[dict]:
    if categories_json:
        cats = _load_json(categories_json)
        cats = cats["categories"] if isinstance(cats, Mapping) else cats
    else:
        cats = panoptic_json.get("categories")
    if not cats:
        raise ValueError(
            "no categories: the panoptic JSON has no 'categories' list; pass a categories file "
            "(e.g. panopticapi's panoptic_coco_categories.json)"
        )
    for c in cats:
        if "isthing" not in c:
            raise ValueError(f"category {c.get('id')} ({c.get('name')}) has no 'isthing' field")
    return sorted(cats, key=lambda c: int(c["id"]))


def panoptic_metadata(categories: Sequence[Mapping], separated: bool = True) -> dict[str, Any]:
    """detectron2 metadata of a panoptic category list (sorted by id, as COCO's).

    Args:
        categories: COCO panoptic categories with ``id``, ``name``, ``isthing`` (and ``color``).
        separated: the convention of Panoptic FPN / PanopticFCN ("coco_2017_*_panoptic_
            separated"): things map to 0..T-1, stuff to 1..S with 0 = the merged "things" class
            of the semantic head. False: the "standard" convention of Mask2Former, one
            contiguous id 0..T+S-1 over all categories.

    Returns:
        ``thing_classes``, ``thing_colors``, ``stuff_classes``, ``stuff_colors``,
        ``thing_dataset_id_to_contiguous_id``, ``stuff_dataset_id_to_contiguous_id``.
    """
    cats = sorted(categories, key=lambda c: int(c["id"]))
    things = [c for c in cats if c["isthing"]]
    stuff = [c for c in cats if not c["isthing"]]
    color = [list(c.get("color", (128, 128, 128))) for c in cats]
    by_id = {int(c["id"]): col for c, col in zip(cats, color, strict=True)}
    if separated:
        stuff_map = {int(c["id"]): i + 1 for i, c in enumerate(stuff)}
        stuff_map[0] = 0
        return {
            "thing_classes": [c["name"] for c in things],
            "thing_colors": [by_id[int(c["id"])] for c in things],
            "stuff_classes": ["things"] + [c["name"] for c in stuff],
            "stuff_colors": [[82, 18, 128]] + [by_id[int(c["id"])] for c in stuff],
            "thing_dataset_id_to_contiguous_id": {int(c["id"]): i for i, c in enumerate(things)},
            "stuff_dataset_id_to_contiguous_id": stuff_map,
        }
    return {
        "thing_classes": [c["name"] for c in cats],
        "thing_colors": color,
        "stuff_classes": [c["name"] for c in cats],
        "stuff_colors": color,
        "thing_dataset_id_to_contiguous_id": {
            int(c["id"]): i for i, c in enumerate(cats) if c["isthing"]
        },
        "stuff_dataset_id_to_contiguous_id": {
            int(c["id"]): i for i, c in enumerate(cats) if not c["isthing"]
        },
    }


def load_coco_panoptic_folder(
    image_root: str,
    panoptic_root: str,
    panoptic_json: str,
    meta: Mapping[str, Any],
    sem_seg_root: str | None = None,
) -> list[dict]:
    """detectron2 dataset dicts of a COCO panoptic folder (no ``annotations``: evaluation).

    Image files are found by the ``file_name`` of the JSON's ``images`` entries. Each dict
    holds ``file_name``, ``image_id``, ``height``, ``width``, ``pan_seg_file_name``,
    ``segments_info`` (contiguous ``category_id`` + ``isthing``, as detectron2's loader) and,
    with ``sem_seg_root``, ``sem_seg_file_name``.
    """
    data = _load_json(panoptic_json)
    images = {img["id"]: img for img in data["images"]}
    thing_map = meta["thing_dataset_id_to_contiguous_id"]
    stuff_map = meta["stuff_dataset_id_to_contiguous_id"]
    dicts = []
    for ann in data["annotations"]:
        img = images.get(ann["image_id"])
        if img is None:
            raise ValueError(f"{panoptic_json}: annotation of unknown image_id {ann['image_id']}")
        segments = []
        for seg in ann["segments_info"]:
            seg = dict(seg)
            cat = int(seg["category_id"])
            seg["isthing"] = cat in thing_map
            seg["category_id"] = thing_map[cat] if cat in thing_map else stuff_map[cat]
            segments.append(seg)
        record = {
            "file_name": os.path.join(image_root, img["file_name"]),
            "image_id": ann["image_id"],
            "height": int(img["height"]),
            "width": int(img["width"]),
            "pan_seg_file_name": os.path.join(panoptic_root, ann["file_name"]),
            "segments_info": segments,
        }
        if sem_seg_root:
            record["sem_seg_file_name"] = os.path.join(sem_seg_root, ann["file_name"])
        dicts.append(record)
    if not dicts:
        raise ValueError(f"{panoptic_json} has no annotations")
    return dicts


def _derived_dir(cache_dir: str, name: str, panoptic_json: str, panoptic_root: str) -> str:
    stat = os.stat(panoptic_json)
    key = f"{os.path.abspath(panoptic_json)}|{stat.st_size}|{stat.st_mtime_ns}|"
    key += os.path.abspath(panoptic_root)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return os.path.join(cache_dir, f"{name}_{digest}")


def derive_panoptic_annotations(
    panoptic_json: str,
    panoptic_root: str,
    out_dir: str,
    *,
    categories_json: str | None = None,
    stuff_contiguous: Mapping[int, int] | None = None,
) -> dict[str, str]:
    """Write the files some evaluators need from a COCO panoptic annotation set.

    Writes ``out_dir/instances.json`` (COCO instance JSON of the thing segments, RLE masks),
    ``out_dir/entities.json`` (all segments, things and stuff: the entity-AP ground truth)
    and, when ``stuff_contiguous`` is given, ``out_dir/semantic/<png>``: uint8 maps with
    things = 0, stuff = ``stuff_contiguous[category]``, void = 255. ``iscrowd`` and the
    segment's ``bbox`` are copied; ``area`` is counted.

    Returns:
        ``{"instances": path, "entities": path, "semantic": folder or ""}``.
    """
    from pycocotools import mask as mask_util

    data = _load_json(panoptic_json)
    cats = _categories(data, categories_json)
    isthing = {int(c["id"]): bool(c["isthing"]) for c in cats}
    sem_dir = os.path.join(out_dir, "semantic") if stuff_contiguous is not None else ""
    os.makedirs(sem_dir or out_dir, exist_ok=True)
    instances, entities = [], []
    for n, ann in enumerate(data["annotations"]):
        ids = read_panoptic_png(os.path.join(panoptic_root, ann["file_name"]))
        sem = np.full(ids.shape, 255, dtype=np.uint8) if sem_dir else None
        for seg in ann["segments_info"]:
            mask = ids == int(seg["id"])
            area = int(mask.sum())
            if area == 0:
                continue
            cat = int(seg["category_id"])
            if cat not in isthing:
                raise ValueError(f"{panoptic_json}: segment of unknown category {cat}")
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            bbox = seg.get("bbox")
            if bbox is None:
                bbox = [float(v) for v in mask_util.toBbox(rle)]
            entry = {
                "image_id": ann["image_id"],
                "category_id": cat,
                "segmentation": rle,
                "area": area,
                "bbox": bbox,
                "iscrowd": int(seg.get("iscrowd", 0)),
            }
            entities.append({**entry, "id": len(entities) + 1})
            if isthing[cat]:
                instances.append({**entry, "id": len(instances) + 1})
            if sem is not None:
                sem[mask] = 0 if isthing[cat] else int(stuff_contiguous[cat])
        if sem is not None:
            save_image(os.path.join(sem_dir, ann["file_name"]), sem)
        if (n + 1) % 500 == 0:
            logger.info("derived annotations of %d / %d images", n + 1, len(data["annotations"]))
    base = {"images": data["images"], "info": data.get("info", {})}
    paths = {
        "instances": os.path.join(out_dir, "instances.json"),
        "entities": os.path.join(out_dir, "entities.json"),
        "semantic": sem_dir,
    }
    things = [c for c in cats if c["isthing"]]
    for key, anns, categories in (
        ("instances", instances, things),
        ("entities", entities, cats),
    ):
        write_json(paths[key], {**base, "categories": categories, "annotations": anns})
    write_json(os.path.join(out_dir, _DONE), {"panoptic_json": os.path.abspath(panoptic_json),
                                              **paths})
    logger.info(
        "derived %d thing and %d entity annotations of %d images into %s",
        len(instances),
        len(entities),
        len(data["annotations"]),
        out_dir,
    )
    return paths


def register_coco_panoptic_folder(
    name: str,
    image_root: str,
    panoptic_root: str,
    panoptic_json: str,
    *,
    cache_dir: str,
    categories_json: str | None = None,
    instances_json: str | None = None,
    sem_seg_root: str | None = None,
    separated: bool = True,
):
    """Register a COCO panoptic folder under ``name`` for evaluation (PQ, mask AP, entity AP).

    Args:
        name: the dataset name (``DATASETS.TEST``).
        image_root: folder of the images (``file_name`` of the JSON's ``images``).
        panoptic_root: folder of the panoptic PNGs.
        panoptic_json: COCO panoptic JSON.
        cache_dir: where derived files go (see :func:`prepare_dataset_files`).
        categories_json: categories file when the panoptic JSON has none.
        instances_json: COCO instance JSON for mask AP; default: derived from the panoptic
            PNGs (non-overlapping masks, so AP differs slightly from COCO's instance JSON).
        sem_seg_root: semantic PNGs of the separated convention; default: derived.
        separated: category convention, see :func:`panoptic_metadata` (True for Panoptic FPN
            and PanopticFCN, False for Mask2Former-style models).

    Returns:
        The dataset's ``Metadata``. Call :func:`prepare_dataset_files` (on one process) before
        evaluating.
    """
    for path, what in (
        (image_root, "image folder"),
        (panoptic_root, "panoptic PNG folder"),
        (panoptic_json, "panoptic JSON"),
    ):
        if not os.path.exists(path):
            raise ValueError(f"dataset {name!r}: {what} {path!r} does not exist")
    cats = _categories(_load_json(panoptic_json), categories_json)
    meta = panoptic_metadata(cats, separated=separated)
    derived = _derived_dir(cache_dir, name, panoptic_json, panoptic_root)
    if instances_json is None:
        instances_json = os.path.join(derived, "instances.json")
    if separated and sem_seg_root is None:
        sem_seg_root = os.path.join(derived, "semantic")
    DatasetCatalog.register(
        name,
        lambda: load_coco_panoptic_folder(
            image_root, panoptic_root, panoptic_json, meta, sem_seg_root
        ),
    )
    metadata = MetadataCatalog.get(name)
    metadata.set(
        image_root=image_root,
        panoptic_root=panoptic_root,
        panoptic_json=panoptic_json,
        json_file=instances_json,
        entity_json_file=os.path.join(derived, "entities.json"),
        crm_derived_dir=derived,
        crm_categories_json=categories_json or "",
        crm_separated=separated,
        evaluator_type="coco_panoptic_seg",
        ignore_label=255,
        label_divisor=1000,
        **meta,
    )
    if sem_seg_root:
        metadata.set(sem_seg_root=sem_seg_root)
    logger.info("registered COCO panoptic folder %r: %s", name, panoptic_json)
    return metadata


def register_coco_instance_folder(name: str, image_root: str, json_file: str):
    """Register a COCO instance folder (images + instance JSON) under ``name``.

    detectron2's ``register_coco_instances``; the JSON is also the entity-AP ground truth.
    """
    for path, what in ((image_root, "image folder"), (json_file, "instance JSON")):
        if not os.path.exists(path):
            raise ValueError(f"dataset {name!r}: {what} {path!r} does not exist")
    register_coco_instances(name, {}, json_file, image_root)
    metadata = MetadataCatalog.get(name)
    metadata.set(entity_json_file=json_file)
    logger.info("registered COCO instance folder %r: %s", name, json_file)
    return metadata


def prepare_dataset_files(dataset_name: str) -> None:
    """Derive the missing files of a panoptic folder registered by crm_d2 (cached, idempotent).

    Does nothing for other datasets. In distributed runs call it on one process per machine
    (local rank 0) and synchronise.
    """
    meta = MetadataCatalog.get(dataset_name)
    derived = meta.get("crm_derived_dir", None)
    if not derived or os.path.isfile(os.path.join(derived, _DONE)):
        return
    separated = bool(meta.get("crm_separated", True))
    derive_panoptic_annotations(
        meta.panoptic_json,
        meta.panoptic_root,
        derived,
        categories_json=meta.get("crm_categories_json", "") or None,
        stuff_contiguous=meta.stuff_dataset_id_to_contiguous_id if separated else None,
    )


def entity_gt_json(dataset_name: str, cache_dir: str) -> str:
    """The entity-AP ground truth of a dataset: a COCO JSON with every segment.

    ``entity_json_file`` of datasets registered by crm_d2; for other panoptic datasets (e.g.
    detectron2's ``coco_2017_val_panoptic_separated``) derived from the panoptic PNGs into
    ``cache_dir``; for instance datasets their ``json_file``.
    """
    meta = MetadataCatalog.get(dataset_name)
    path = meta.get("entity_json_file", None)
    if path:
        prepare_dataset_files(dataset_name)
        return path
    if meta.get("panoptic_json", None):
        derived = _derived_dir(cache_dir, dataset_name, meta.panoptic_json, meta.panoptic_root)
        path = os.path.join(derived, "entities.json")
        if not os.path.isfile(os.path.join(derived, _DONE)):
            derive_panoptic_annotations(meta.panoptic_json, meta.panoptic_root, derived)
        return path
    if meta.get("json_file", None):
        return meta.json_file
    raise ValueError(
        f"dataset {dataset_name!r} has neither panoptic annotations nor a COCO json_file: "
        "entity AP needs one"
    )


# --------------------------------------------------------------------------------------------
# Evaluators
# --------------------------------------------------------------------------------------------
def _instance_masks_numpy(instances) -> np.ndarray:
    masks = instances.pred_masks
    if isinstance(masks, BitMasks):
        masks = masks.tensor
    if isinstance(masks, torch.Tensor):
        if masks.dtype.is_floating_point:
            masks = masks > 0.5
        return masks.bool().cpu().numpy()
    return np.zeros((0, *instances.image_size), dtype=bool)


class EntityAPEvaluator(DatasetEvaluator):
    """Class-agnostic COCO mask AP ("entity AP", EntitySeg) of ``output["instances"]``.

    Every prediction and every ground-truth segment count as one category
    (:func:`crm_d2.evaluation.coco_mask_ap` with ``class_agnostic=True``). Results go under the
    task ``"entity_segm"``.
    """

    def __init__(self, gt_json: str, distributed: bool = True) -> None:
        self._gt_json = gt_json
        self._distributed = distributed
        self._results: list[dict] = []

    def reset(self) -> None:
        self._results = []

    def process(self, inputs, outputs) -> None:
        from pycocotools import mask as mask_util

        for inp, out in zip(inputs, outputs, strict=True):
            if "instances" not in out:
                continue
            instances = out["instances"]
            if len(instances) == 0:
                continue
            masks = _instance_masks_numpy(instances)
            scores = instances.scores.detach().cpu().tolist()
            for mask, score in zip(masks, scores, strict=True):
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                self._results.append(
                    {
                        "image_id": inp["image_id"],
                        "category_id": 1,
                        "segmentation": rle,
                        "score": float(score),
                    }
                )

    def evaluate(self):
        results = self._results
        if self._distributed:
            comm.synchronize()
            results = list(itertools.chain(*comm.gather(results, dst=0)))
            if not comm.is_main_process():
                return None
        metrics = coco_mask_ap(self._gt_json, results, class_agnostic=True)
        return OrderedDict({"entity_segm": metrics})


def _copy_for_evaluation(output: Mapping) -> dict:
    """Copy one output dict so that evaluators that edit it (COCOPanopticEvaluator pops
    ``isthing`` from segments_info entries) cannot affect the other evaluation."""
    out = {k: v for k, v in output.items() if k != INNER_KEY}
    pan = out.get("panoptic_seg")
    if pan is not None and pan[1] is not None:
        out["panoptic_seg"] = (pan[0], [dict(s) for s in pan[1]])
    return out


def _numeric_items(metrics: Mapping) -> dict[str, float]:
    # As detectron2's print_csv_format: per-category metrics ("AP-person") are left out.
    return {
        k: float(v)
        for k, v in metrics.items()
        if "-" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def before_after_results(inner: Mapping, refined: Mapping) -> OrderedDict:
    """Merge two detectron2 result dicts: refined under its task names, the inner results
    under ``"inner/<task>"`` and ``refined - inner`` under ``"delta/<task>"``."""
    merged: OrderedDict = OrderedDict()
    for task, res in refined.items():
        merged[task] = res
    for task, res in inner.items():
        merged[f"inner/{task}"] = res
    for task in refined:
        if task in inner and isinstance(refined[task], Mapping):
            a, b = _numeric_items(inner[task]), _numeric_items(refined[task])
            merged[f"delta/{task}"] = {k: b[k] - a[k] for k in b if k in a}
    return merged


def format_before_after(inner: Mapping, refined: Mapping) -> str:
    """Tables of the inner and refined metrics and their difference, one per task.

    Each table has the columns ``metric | inner | refined | delta``; the title line is
    ``CRM before/after: <task>``.
    """
    parts = []
    for task in refined:
        if task not in inner or not isinstance(refined[task], Mapping):
            continue
        a, b = _numeric_items(inner[task]), _numeric_items(refined[task])
        rows = [[k, a[k], b[k], b[k] - a[k]] for k in b if k in a]
        table = tabulate(
            rows,
            headers=["metric", "inner", "refined", "delta"],
            tablefmt="pipe",
            floatfmt=".3f",
        )
        parts.append(f"CRM before/after: {task}\n{table}")
    return "\n".join(parts)


class BeforeAfterEvaluator(DatasetEvaluator):
    """Evaluate the inner model's and the refined outputs of one inference pass.

    The model must return the inner output under ``"crm_inner"`` (``MODEL.CRM.EVAL_BOTH``).
    ``inner`` receives those, ``refined`` the refined outputs (each a copy, see
    :func:`_copy_for_evaluation`). :meth:`evaluate` logs both evaluators' own tables, then a
    before/after table per task, and returns :func:`before_after_results`.
    """

    def __init__(self, inner: DatasetEvaluator, refined: DatasetEvaluator) -> None:
        self.inner = inner
        self.refined = refined

    def reset(self) -> None:
        self.inner.reset()
        self.refined.reset()

    def process(self, inputs, outputs) -> None:
        inner_outputs, refined_outputs = [], []
        for out in outputs:
            if INNER_KEY not in out:
                raise ValueError(
                    f"model output has no {INNER_KEY!r}: set MODEL.CRM.EVAL_BOTH True to "
                    "evaluate the inner model and the refined outputs in one run"
                )
            inner_outputs.append(_copy_for_evaluation(out[INNER_KEY]))
            refined_outputs.append(_copy_for_evaluation(out))
        self.inner.process(inputs, inner_outputs)
        self.refined.process(inputs, refined_outputs)

    def evaluate(self):
        logger.info("Evaluating the inner model's outputs (before CRM)")
        inner = self.inner.evaluate()
        logger.info("Evaluating the CRM-refined outputs")
        refined = self.refined.evaluate()
        if not comm.is_main_process() or inner is None or refined is None:
            return None
        logger.info("CRM before/after results:\n%s", format_before_after(inner, refined))
        return before_after_results(inner, refined)
