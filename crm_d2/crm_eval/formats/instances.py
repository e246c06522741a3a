"""COCO instances: ground-truth JSON, image folder, and instance results (or coarse masks made
from the ground truth). Metrics: COCO mask AP and Boundary AP, class-aware and class-agnostic
(:func:`crm_d2.evaluation.coco_mask_ap`), on the processed images only.

Outputs: ``refined_instances.json`` (and ``coarse_instances.json`` with coarse from GT).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...evaluation.coco import coco_mask_ap
from ..coarse import CoarseSpec
from ..datasets import CocoInstanceSet, ImageItem, decode_segmentation
from ..process import ProcessContext, process_instances
from ..records import ImageRecord, ObjectRecord, OutputLayout, write_json
from ..report import Row, object_rows
from .base import AFTER, BEFORE, KNOWN_PAIRING, EvalFormat, FormatMetrics, InputPath

__all__ = ["InstancesFormat", "InstancesPayload", "instance_metrics", "instance_rows"]

_AP_RUNS = (
    ("segm", False, "segm", "mask AP"),
    ("boundary", False, "boundary", "Boundary AP"),
    ("segm_agnostic", True, "segm", "mask AP (class-agnostic)"),
    ("boundary_agnostic", True, "boundary", "Boundary AP (class-agnostic)"),
)


@dataclass
class InstancesPayload:
    """The instance part of a record: the image's COCO results (RLE masks, boxes, areas), one
    per prediction, before and after refinement."""

    coarse_results: list[dict[str, Any]]
    refined_results: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"coarse_results": self.coarse_results, "refined_results": self.refined_results}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> InstancesPayload:
        return cls(list(d["coarse_results"]), list(d["refined_results"]))


def instance_metrics(gt: dict, results: Sequence[dict], label: str = "") -> dict[str, float]:
    """Mask AP and Boundary AP, class-aware and class-agnostic, keys ``"<run>/<AP key>"``
    (``segm``, ``boundary``, ``segm_agnostic``, ``boundary_agnostic``), in percent. ``label``
    names the predictions in the logs (``"before (coarse)"``, ``"after (refined)"``)."""
    out: dict[str, float] = {}
    for name, agnostic, iou_type, _ in _AP_RUNS:
        for key, value in coco_mask_ap(
            gt, results, class_agnostic=agnostic, iou_type=iou_type, label=label
        ).items():
            out[f"{name}/{key}"] = value
    return out


def instance_rows(before: dict, after: dict) -> list[Row]:
    """Table rows: mask AP / AP50 / AP75, Boundary AP, and both class-agnostic."""
    rows = []
    for name, _, _, label in _AP_RUNS:
        keys = ("AP", "AP50", "AP75") if name == "segm" else ("AP",)
        for key in keys:
            suffix = "" if key == "AP" else key[2:]
            text = label.replace("AP", f"AP{suffix}", 1)
            rows.append((text, before[f"{name}/{key}"], after[f"{name}/{key}"]))
    return rows


class InstancesFormat(EvalFormat[InstancesPayload]):
    """COCO instances (``--coco-instances JSON --images DIR``).

    Args:
        coco_instances: COCO instance ground-truth JSON.
        images: image folder.
        predictions: instance results with RLE masks (None: coarse masks from the ground
            truth, ``--coarse-from-gt``).
    """

    kind = "instances"

    def __init__(self, coco_instances: str, images: str, predictions: str | None = None) -> None:
        self.coco_instances = coco_instances
        self.images = images
        self.predictions = predictions
        self._set: CocoInstanceSet | None = None

    @property
    def main_input(self) -> str:
        return self.coco_instances

    def inputs(self) -> list[InputPath]:
        return [
            InputPath("images", self.images, folder=True),
            InputPath("coco_instances", self.coco_instances),
            InputPath("predictions", self.predictions),
        ]

    def check(self, coarse: CoarseSpec | None) -> None:
        if (self.predictions is None) == (coarse is None):
            raise ValueError(
                "COCO instances need either --predictions RESULTS.json or "
                "--coarse-from-gt SPEC (one of them)"
            )

    def open(self) -> list[ImageItem]:
        self._set = CocoInstanceSet(self.coco_instances, self.images, self.predictions)
        return list(self._set.items)

    def payload(self, d: Mapping[str, Any]) -> InstancesPayload:
        return InstancesPayload.from_json(d)

    def process(self, ctx: ProcessContext, item: ImageItem) -> ImageRecord[InstancesPayload]:
        record = process_instances(ctx, self._opened(self._set), item)
        return ImageRecord.from_json(record, InstancesPayload.from_json)

    def metrics(
        self,
        records: Sequence[ImageRecord[InstancesPayload]],
        layout: OutputLayout,
        coarse: CoarseSpec | None,
        summary: dict[str, Any],
    ) -> FormatMetrics:
        coarse_results = [r for rec in records for r in rec.payload.coarse_results]
        refined_results = [r for rec in records for r in rec.payload.refined_results]
        outputs = {"refined results": layout.path("refined_instances.json")}
        write_json(outputs["refined results"], refined_results)
        notes = []
        if coarse is not None:
            outputs["coarse results"] = layout.path("coarse_instances.json")
            write_json(outputs["coarse results"], coarse_results)
            vanished = sum(rec.vanished for rec in records)
            if vanished:
                notes.append(
                    f"{vanished} ground-truth objects had an empty coarse mask "
                    f"({coarse.describe()}) and are not among the predictions"
                )
        gt = self._opened(self._set).subset([rec.image_id for rec in records])
        before = instance_metrics(gt, coarse_results, label=BEFORE)
        after = instance_metrics(gt, refined_results, label=AFTER)
        return FormatMetrics(
            before=before,
            after=after,
            rows=instance_rows(before, after) + object_rows(summary),
            pairing=KNOWN_PAIRING if coarse else "best IoU >= 0.5, same category, greedy by score",
            outputs=outputs,
            notes=notes,
        )

    def masks(
        self, record: ImageRecord[InstancesPayload], obj: ObjectRecord
    ) -> tuple[np.ndarray, np.ndarray]:
        h, w, i = record.height, record.width, obj.index
        return (
            decode_segmentation(record.payload.coarse_results[i]["segmentation"], h, w),
            decode_segmentation(record.payload.refined_results[i]["segmentation"], h, w),
        )
