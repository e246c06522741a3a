"""detectron2 data glue of crm_d2 (needs detectron2).

- :class:`OriginalImageMapper`: wraps a test mapper and keeps the original-resolution pixels
  (``"original_image"``) when the test resize changes the image size, so that CRM refines on
  the real pixels and not on an up-sampled network input.
- Dataset registration by paths: :func:`register_coco_panoptic_folder` (images + panoptic PNGs
  + panoptic JSON) and :func:`register_coco_instance_folder` (images + COCO instance JSON).
  Files a panoptic folder lacks for some evaluators are derived from its panoptic PNGs into a
  cache folder by :func:`prepare_dataset_files`: a COCO instance JSON of the things (mask AP),
  a COCO JSON of all segments (entity AP, :func:`entity_gt_json`) and, for the "separated"
  convention, the semantic PNGs (things = 0, stuff = 1..S, void = 255; Panoptic FPN's sem_seg
  classes).

The evaluators are in :mod:`crm_d2.d2.evaluators`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.detection_utils import read_image

from ..evaluation import read_panoptic_png
from ..io import save_image, write_json
from .simulator import ANNOTATIONS_KEY

__all__ = [
    "OriginalImageMapper",
    "derive_panoptic_annotations",
    "entity_gt_json",
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
    :class:`crm_d2.d2.meta_arch.CRMRefinedModel` refines on it; other models ignore the key.
    """

    def __init__(
        self, mapper: Callable[[dict], dict | None], keep_annotations: bool = False
    ) -> None:
        """
        Args:
            mapper: the test-time mapper (e.g. ``DatasetMapper(cfg, is_train=False)``).
            keep_annotations: also pass the dataset dict's ``annotations`` (which
                detectron2's test mapper drops) as ``out["crm_gt_annotations"]``, for the
                simulated inner model :class:`crm_d2.d2.simulator.CoarseGTSimulator`.
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
    write_json(
        os.path.join(out_dir, _DONE), {"panoptic_json": os.path.abspath(panoptic_json), **paths}
    )
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
