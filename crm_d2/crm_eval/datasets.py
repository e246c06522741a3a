"""Readers of the inputs of ``crm-eval``: COCO instances, COCO panoptic and the BIG layout.

Shape shorthand: H, W image size.

Nothing here holds pixels of more than one image: a dataset object keeps the (small) JSON
annotations and yields :class:`ImageItem` records; pixels are read per image on demand.

Layouts:

* COCO instances: an image folder, the ground-truth JSON (polygons, RLE or uncompressed crowd
  RLE) and optionally a results JSON (``image_id``, ``category_id``, ``score``,
  ``segmentation`` as RLE), the format of detectron2's ``coco_instances_results.json``.
* COCO panoptic: an image folder, the ground-truth JSON + PNG folder and optionally a prediction
  JSON + PNG folder (``annotations[i]`` with ``image_id``, ``file_name``, ``segments_info``).
* BIG / CascadePSP: one folder with ``NAME_im.jpg`` (or .png), ``NAME_seg.png`` (coarse mask,
  0..255) and ``NAME_gt.png`` (ground truth, 0..255).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..evaluation.panoptic import read_panoptic_png, segment_areas

__all__ = [
    "BigSet",
    "CocoInstanceSet",
    "CocoPanopticSet",
    "ImageItem",
    "decode_segmentation",
    "rle_counts",
    "rle_problem",
]

logger = logging.getLogger(__name__)

_BIG_IMAGE_SUFFIXES = ("_im.jpg", "_im.jpeg", "_im.png")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ImageItem:
    """One image of an evaluation set.

    Attributes:
        key: unique, file-system-safe name of the image (the stem of its cache record).
        image_id: the dataset's id (COCO ``id``; the NAME for BIG).
        file_name: file name of the image inside the image folder.
        image_path: full path of the image.
        height, width: size announced by the annotations (None for BIG).
    """

    key: str
    image_id: int | str
    file_name: str
    image_path: str
    height: int | None = None
    width: int | None = None


def safe_key(value: Any) -> str:
    """A file-system-safe version of an image id or name."""
    text = _UNSAFE.sub("_", str(value)).strip("._")
    return text or "image"


def _load_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{what} {path!r} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}, "
            f"of {os.path.getsize(path)} bytes): the file is truncated or not JSON"
        ) from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path!r} is not UTF-8 text: not a JSON file") from e


def _check_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is not a folder")


def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygons, RLE or uncompressed RLE) -> (H, W) bool mask."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):
        if not segm:
            return np.zeros((height, width), bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm, Mapping) and isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(dict(segm), height, width)
    elif isinstance(segm, Mapping) and "counts" in segm:
        rle = dict(segm)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
        size = tuple(int(v) for v in rle["size"])
        if size != (height, width):
            raise ValueError(f"RLE of size {size} (H, W) for an image of {(height, width)}")
    else:
        raise ValueError(f"unknown COCO segmentation of type {type(segm).__name__}")
    # pycocotools decodes to Fortran order; OpenCV-based consumers need C order
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=bool)


def rle_counts(counts: str | bytes) -> np.ndarray:
    """The run lengths of a compressed COCO RLE ``counts`` string, as int64.

    The format (pycocotools' ``rleToString``): each run is written in 5-bit groups, least
    significant first, as characters ``48 + group`` with bit 0x20 set on every group but the
    last; bit 0x10 of the last group is the sign; from the fourth run on, the value stored is
    the difference to the run two places before.

    Raises:
        ValueError: on characters outside the format or a run cut off at the end.
    """
    raw = np.frombuffer(counts.encode("ascii") if isinstance(counts, str) else counts, np.uint8)
    if raw.size == 0:
        return np.zeros(0, np.int64)
    c = raw.astype(np.int64) - 48
    if c.min() < 0 or c.max() > 63:
        raise ValueError("counts string holds characters outside the COCO RLE alphabet")
    last = (c & 0x20) == 0  # the last group of a run
    if not last[-1]:
        raise ValueError("counts string ends inside a run (truncated)")
    starts = np.flatnonzero(np.concatenate(([True], last[:-1])))
    group = np.cumsum(np.concatenate(([0], last[:-1].astype(np.int64))))
    k = np.arange(c.size) - starts[group]  # position of each group within its run
    if k.max() > 11:
        raise ValueError("counts string holds a run longer than 60 bits")
    values = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    ends = np.flatnonzero(last)
    negative = (c[ends] & 0x10) != 0
    values = values - negative * (np.int64(1) << (5 * (k[ends] + 1)))
    out = values.copy()
    for first in (1, 2):  # runs 3, 5, ... and 4, 6, ... are stored as differences
        chain = out[first::2]
        out[first::2] = np.cumsum(chain)
    return out


def rle_problem(segm: Mapping[str, Any]) -> str | None:
    """What is wrong with an RLE ``segmentation`` (None when it is valid).

    A valid RLE has ``size`` [H, W] with H, W >= 1 and non-negative ``counts`` (compressed
    string or list) that sum to exactly H * W.
    """
    size = segm.get("size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(v, int) and v >= 1 for v in size)):
        return f"its RLE 'size' must be [height, width] with positive integers, got {size!r}"
    counts = segm.get("counts")
    try:
        if isinstance(counts, (str, bytes)):
            runs = rle_counts(counts)
        elif isinstance(counts, list) and all(isinstance(v, int) for v in counts):
            runs = np.asarray(counts, np.int64)
        else:
            kind = type(counts).__name__
            return f"its RLE 'counts' must be a string or a list of integers, got {kind}"
    except ValueError as e:
        return f"its RLE 'counts' cannot be decoded ({e})"
    h, w = size
    if runs.size == 0:
        return "its RLE 'counts' is empty"
    if runs.min() < 0:
        return f"its RLE 'counts' holds a negative run ({int(runs.min())})"
    if int(runs.sum()) != h * w:
        return (
            f"its RLE 'counts' sum to {int(runs.sum())} pixels, but size {list(size)} has "
            f"{h * w} (truncated or corrupt mask)"
        )
    return None


def _index_images(images: Sequence[Mapping], images_dir: str) -> list[ImageItem]:
    items, keys = [], set()
    for info in images:
        key = safe_key(info["id"])
        if key in keys:
            raise ValueError(f"two images map to the same key {key!r} (ids must be unique)")
        keys.add(key)
        items.append(
            ImageItem(
                key=key,
                image_id=info["id"],
                file_name=info["file_name"],
                image_path=os.path.join(images_dir, info["file_name"]),
                height=int(info["height"]) if "height" in info else None,
                width=int(info["width"]) if "width" in info else None,
            )
        )
    return items


class CocoInstanceSet:
    """COCO instance ground truth with optional instance predictions.

    Args:
        gt_json: path of the ground-truth JSON.
        images_dir: folder of the images.
        predictions: path of a results JSON (list of dicts with RLE ``segmentation``), or None.
    """

    def __init__(self, gt_json: str, images_dir: str, predictions: str | None = None) -> None:
        self.gt_path = gt_json
        self.gt: dict = _load_json(gt_json, "ground-truth JSON")
        for key in ("images", "annotations", "categories"):
            if key not in self.gt:
                raise ValueError(f"{gt_json} has no '{key}': not a COCO instance annotation file")
        _check_dir(images_dir, "image folder")
        self.items = _index_images(self.gt["images"], images_dir)
        self.categories = {int(c["id"]): c for c in self.gt["categories"]}
        self._anns: dict[Any, list[dict]] = defaultdict(list)
        for ann in self.gt["annotations"]:
            self._anns[ann["image_id"]].append(ann)
        self._preds: dict[Any, list[dict]] | None = None
        if predictions is not None:
            results = _load_json(predictions, "predictions JSON")
            if not isinstance(results, list):
                hint = (
                    f" with keys {sorted(map(str, results))[:6]}"
                    if isinstance(results, dict) else ""
                )
                raise ValueError(
                    f"{predictions} must hold a list of COCO results (detectron2's "
                    f"coco_instances_results.json), got a {type(results).__name__}{hint}"
                )
            if not results:
                logger.warning(
                    "%s holds no results: nothing will be refined and every 'before' and "
                    "'after' AP will be 0",
                    predictions,
                )
            sizes = {
                it.image_id: None if it.height is None else (it.height, it.width)
                for it in self.items
            }
            self._preds = _group_results(results, sizes, predictions)

    def annotations(self, image_id: Any) -> list[dict]:
        """Ground-truth annotations of one image (JSON order)."""
        return self._anns.get(image_id, [])

    def predictions(self, image_id: Any) -> list[dict]:
        """Predicted instances of one image (input order); [] without a predictions file."""
        if self._preds is None:
            return []
        return self._preds.get(image_id, [])

    def subset(self, image_ids: Iterable[Any]) -> dict:
        """The ground truth restricted to ``image_ids`` (for evaluating a ``--limit`` run)."""
        return _gt_subset(self.gt, image_ids)


def _gt_subset(gt: dict, image_ids: Iterable[Any]) -> dict:
    """A COCO-style ground-truth dict keeping only the images (and annotations) of ``image_ids``."""
    wanted = set(image_ids)
    out = {k: v for k, v in gt.items() if k not in ("images", "annotations")}
    out["images"] = [im for im in gt["images"] if im["id"] in wanted]
    out["annotations"] = [a for a in gt["annotations"] if a["image_id"] in wanted]
    return out


def _finite_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    )


def _group_results(
    results: list, sizes: Mapping[Any, tuple[int, int]], path: str
) -> dict[Any, list[dict]]:
    """Results grouped by image, each validated (keys, RLE, score, size) before any work.

    Args:
        results: the results list.
        sizes: (height, width) of every ground-truth image by id (results for other ids are
            counted and ignored).
        path: the results file, for messages.
    """
    grouped: dict[Any, list[dict]] = defaultdict(list)
    unknown = 0
    for i, r in enumerate(results):
        if not isinstance(r, Mapping):
            raise ValueError(f"{path}: result {i} is a {type(r).__name__}, not a dict")
        for key in ("image_id", "category_id", "score"):
            if key not in r:
                raise ValueError(f"{path}: result {i} has no '{key}'")
        seg = r.get("segmentation")
        if not (isinstance(seg, Mapping) and "counts" in seg and "size" in seg):
            raise ValueError(
                f"{path}: result {i} has no RLE 'segmentation' (a box-only detection file?); "
                "crm-eval refines masks"
            )
        if r["image_id"] not in sizes:
            unknown += 1
            continue
        problem = rle_problem(seg)
        if problem is None and not _finite_number(r["score"]):
            problem = f"its score {r['score']!r} is not a finite number"
        expected = sizes[r["image_id"]]
        if problem is None and expected is not None and tuple(seg["size"]) != expected:
            problem = (
                f"its RLE size {list(seg['size'])} differs from the image's {list(expected)} "
                "(height, width)"
            )
        if problem is not None:
            raise ValueError(
                f"{path}: result {i} (image_id {r['image_id']!r}, category_id "
                f"{r['category_id']!r}): {problem}. Nothing was refined; fix or drop that result"
            )
        grouped[r["image_id"]].append(r)
    if unknown:
        logger.warning(
            "%s: %d results refer to images absent from the ground truth: ignored", path, unknown
        )
    return grouped


class CocoPanopticSet:
    """COCO panoptic ground truth with optional panoptic predictions.

    Args:
        gt_json: ground-truth JSON (``images``, ``annotations``, ``categories`` with
            ``isthing``).
        gt_dir: folder of the ground-truth PNGs.
        images_dir: folder of the images.
        pred_json, pred_dir: prediction JSON and PNG folder (both or neither).
    """

    def __init__(
        self,
        gt_json: str,
        gt_dir: str,
        images_dir: str,
        pred_json: str | None = None,
        pred_dir: str | None = None,
    ) -> None:
        if (pred_json is None) != (pred_dir is None):
            raise ValueError("panoptic predictions need both --pred-json and --pred-dir")
        self.gt_path = gt_json
        self.gt: dict = _load_json(gt_json, "panoptic ground-truth JSON")
        for key in ("images", "annotations", "categories"):
            if key not in self.gt:
                raise ValueError(f"{gt_json} has no '{key}': not a COCO panoptic JSON")
        _check_dir(gt_dir, "panoptic ground-truth PNG folder")
        _check_dir(images_dir, "image folder")
        self.gt_dir = gt_dir
        self.categories = {int(c["id"]): c for c in self.gt["categories"]}
        self._gt_anns = {a["image_id"]: a for a in self.gt["annotations"]}
        images = [im for im in self.gt["images"] if im["id"] in self._gt_anns]
        if len(images) != len(self.gt["images"]):
            logger.warning(
                "%d images of %s have no panoptic annotation: skipped",
                len(self.gt["images"]) - len(images),
                gt_json,
            )
        self.items = _index_images(images, images_dir)
        self.pred_dir = pred_dir
        self.pred_json = pred_json
        self._pred_anns: dict[Any, dict] | None = None
        if pred_json is not None:
            _check_dir(pred_dir, "panoptic prediction PNG folder")
            pred = _load_json(pred_json, "panoptic prediction JSON")
            anns = pred.get("annotations") if isinstance(pred, Mapping) else pred
            if not isinstance(anns, list) or not all(isinstance(a, Mapping) for a in anns):
                raise ValueError(
                    f"{pred_json} must hold a COCO panoptic prediction JSON (a dict with an "
                    "'annotations' list, or that list)"
                )
            for i, a in enumerate(anns):
                for key in ("image_id", "file_name", "segments_info"):
                    if key not in a:
                        raise ValueError(f"{pred_json}: annotation {i} has no '{key}'")
            if not anns:
                logger.warning("%s holds no annotations", pred_json)
            self._pred_anns = {a["image_id"]: a for a in anns}

    def validate_predictions(self, items: Sequence[ImageItem]) -> None:
        """Check the predictions of ``items`` before any refinement: every image has an entry
        in the prediction JSON and a PNG of its size whose segment ids are exactly those of
        its ``segments_info`` (VOID aside), with known categories.

        Raises:
            ValueError: naming the first image whose prediction is wrong.
        """
        if self._pred_anns is None:
            return
        for item in items:
            ann = self._pred_anns.get(item.image_id)
            if ann is None:
                raise ValueError(
                    f"{self.pred_json} has no entry for image {item.image_id!r} "
                    f"({item.file_name}); nothing was refined"
                )
            path = os.path.join(self.pred_dir, ann["file_name"])
            if not os.path.isfile(path):
                raise ValueError(f"prediction PNG {path} of image {item.image_id!r} is missing")
            ids = read_panoptic_png(path)
            if item.height is not None and ids.shape != (item.height, item.width):
                raise ValueError(
                    f"prediction PNG {path} is {ids.shape[1]}x{ids.shape[0]} (WxH) but image "
                    f"{item.image_id!r} is {item.width}x{item.height}"
                )
            try:
                segment_areas(ids, ann["segments_info"], self.categories, item.image_id)
            except ValueError as e:
                raise ValueError(f"{self.pred_json} / {path}: {e}; nothing was refined") from e

    def png_name(self, item: ImageItem) -> str:
        """File name of the image's panoptic PNG (the ground truth's; outputs reuse it)."""
        return self._gt_anns[item.image_id]["file_name"]

    def read_gt(
        self, image_id: Any, shape: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, list[dict]]:
        """(H, W) int64 ground-truth id map and its ``segments_info`` (``shape`` unused)."""
        ann = self._gt_anns[image_id]
        return read_panoptic_png(os.path.join(self.gt_dir, ann["file_name"])), list(
            ann["segments_info"]
        )

    def read_prediction(
        self, image_id: Any, shape: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, list[dict], str]:
        """(H, W) int64 predicted id map, its ``segments_info`` and the PNG path."""
        if self._pred_anns is None:
            raise ValueError("no panoptic predictions were given")
        if image_id not in self._pred_anns:
            raise ValueError(f"the prediction JSON has no entry for image {image_id}")
        ann = self._pred_anns[image_id]
        path = os.path.join(self.pred_dir, ann["file_name"])
        return read_panoptic_png(path), list(ann["segments_info"]), path

    def subset(self, image_ids: Iterable[Any]) -> dict:
        """The ground truth restricted to ``image_ids`` (for evaluating a ``--limit`` run)."""
        return _gt_subset(self.gt, image_ids)


@dataclass(frozen=True)
class BigPaths:
    image: str
    coarse: str
    gt: str


class BigSet:
    """A folder in the BIG / CascadePSP layout (``NAME_im.jpg``, ``NAME_seg.png``,
    ``NAME_gt.png``), images sorted by NAME."""

    def __init__(self, folder: str) -> None:
        _check_dir(folder, "BIG folder")
        self.folder = folder
        self.items: list[ImageItem] = []
        self.paths: dict[str, BigPaths] = {}
        missing = []
        for file_name in sorted(os.listdir(folder)):
            suffix = next((s for s in _BIG_IMAGE_SUFFIXES if file_name.endswith(s)), None)
            if suffix is None:
                continue
            name = file_name[: -len(suffix)]
            coarse = os.path.join(folder, f"{name}_seg.png")
            gt = os.path.join(folder, f"{name}_gt.png")
            if not (os.path.isfile(coarse) and os.path.isfile(gt)):
                missing.append(name)
                continue
            key = safe_key(name)
            if key in self.paths:
                raise ValueError(f"two images of {folder} map to the key {key!r}")
            self.paths[key] = BigPaths(os.path.join(folder, file_name), coarse, gt)
            self.items.append(ImageItem(key, name, file_name, os.path.join(folder, file_name)))
        if missing:
            logger.warning(
                "%d images of %s lack NAME_seg.png or NAME_gt.png: skipped (%s)",
                len(missing),
                folder,
                ", ".join(missing[:5]),
            )
        if not self.items:
            raise ValueError(
                f"{folder} holds no image in the BIG layout (NAME_im.jpg + NAME_seg.png + "
                "NAME_gt.png)"
            )
