"""COCO panoptic: ground-truth JSON and PNG folder, image folder, and panoptic predictions (or
coarse maps made from the ground truth); also a COCO instance set seen as things-only panoptic
(``--as-panoptic``, :mod:`..as_panoptic`). Metrics: PQ / SQ / RQ (All, Things, Stuff) and
Boundary PQ (:func:`crm_d2.evaluation.pq_compute`, :func:`crm_d2.evaluation.boundary_pq`).

Outputs: ``refined_panoptic.json`` + ``refined_panoptic/``; ``coarse_panoptic.json`` +
``coarse_panoptic/`` when this tool made the coarse set; ``gt_panoptic.json`` +
``gt_panoptic/`` for instances seen as panoptic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...evaluation.panoptic import boundary_pq, pq_compute, read_panoptic_png
from ..as_panoptic import InstancesAsPanoptic
from ..coarse import CoarseSpec
from ..datasets import CocoInstanceSet, CocoPanopticSet, ImageItem
from ..process import ProcessContext, process_panoptic
from ..records import ImageRecord, ObjectRecord, OutputLayout, write_json
from ..report import Row, object_rows
from .base import AFTER, BEFORE, KNOWN_PAIRING, EvalFormat, FormatMetrics, InputPath

__all__ = ["PanopticFormat", "PanopticPayload", "panoptic_metrics", "panoptic_rows"]

_SPLITS = ("All", "Things", "Stuff")


@dataclass
class PanopticPayload:
    """The panoptic part of a record.

    Attributes:
        png: the image's PNG file name in every written panoptic folder.
        coarse_png, refined_png: absolute paths of the coarse and refined id maps.
        refined_ann: the refined COCO panoptic annotation (``segments_info``).
        coarse_ann: the coarse annotation, when this tool made the coarse set (else None).
        gt_ann: the ground-truth annotation, when this tool painted it (else None).
    """

    png: str
    coarse_png: str
    refined_png: str
    refined_ann: dict[str, Any]
    coarse_ann: dict[str, Any] | None = None
    gt_ann: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "png": self.png,
            "coarse_png": self.coarse_png,
            "refined_png": self.refined_png,
            "refined_ann": self.refined_ann,
        }
        for name in ("coarse_ann", "gt_ann"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PanopticPayload:
        return cls(
            png=d["png"],
            coarse_png=d["coarse_png"],
            refined_png=d["refined_png"],
            refined_ann=d["refined_ann"],
            coarse_ann=d.get("coarse_ann"),
            gt_ann=d.get("gt_ann"),
        )


def panoptic_metrics(
    gt_json: Any, gt_dir: str, pred_json: Any, pred_dir: str, label: str = ""
) -> dict[str, float]:
    """PQ / SQ / RQ and Boundary PQ, keys ``"pq/<All|Things|Stuff>/<pq|sq|rq>"`` and
    ``"bpq/..."``, in percent; per-class values are left out. ``label`` names the predictions
    in the logs."""
    out: dict[str, float] = {}
    for prefix, fn in (("pq", pq_compute), ("bpq", boundary_pq)):
        res = fn(gt_json, gt_dir, pred_json, pred_dir, label=label)
        for split in _SPLITS:
            for key in ("pq", "sq", "rq"):
                out[f"{prefix}/{split}/{key}"] = 100 * res[split][key]
            out[f"{prefix}/{split}/n"] = res[split]["n"]
    return out


def panoptic_rows(before: dict, after: dict) -> list[Row]:
    """Table rows: PQ / SQ / RQ of every split, then Boundary PQ of every split."""
    rows = []
    for split in _SPLITS:
        for key in ("pq", "sq", "rq"):
            name = f"pq/{split}/{key}"
            rows.append((f"{key.upper()} {split}", before[name], after[name]))
    for split in _SPLITS:
        name = f"bpq/{split}/pq"
        rows.append((f"Boundary PQ {split}", before[name], after[name]))
    return rows


class PanopticFormat(EvalFormat[PanopticPayload]):
    """COCO panoptic (``--coco-panoptic JSON --panoptic-dir DIR --images DIR``), or a COCO
    instance set seen as things-only panoptic (``--as-panoptic``, :meth:`from_instances`).

    Args:
        images: image folder.
        coco_panoptic, panoptic_dir: panoptic ground-truth JSON and its PNG folder.
        pred_json, pred_dir: panoptic predictions (None: coarse maps from the ground truth).
        coco_instances, predictions: instead of the panoptic ones, an instance ground-truth
            JSON and instance results (see :meth:`from_instances`).

    Raises:
        ValueError: not exactly one ground truth (panoptic or instances) given, or the
            panoptic PNG folder missing.
    """

    kind = "panoptic"

    def __init__(
        self,
        *,
        images: str,
        coco_panoptic: str | None = None,
        panoptic_dir: str | None = None,
        pred_json: str | None = None,
        pred_dir: str | None = None,
        coco_instances: str | None = None,
        predictions: str | None = None,
    ) -> None:
        if (coco_panoptic is None) == (coco_instances is None):
            raise ValueError(
                "PanopticFormat needs one ground truth: coco_panoptic or coco_instances"
            )
        if coco_panoptic is not None and panoptic_dir is None:
            raise ValueError(
                "--panoptic-dir DIR (the ground-truth PNGs) is needed with --coco-panoptic"
            )
        if coco_instances is not None and (pred_json or pred_dir or panoptic_dir):
            raise ValueError(
                "an instance set seen as panoptic takes --predictions, not panoptic files"
            )
        self.images = images
        self.coco_panoptic, self.panoptic_dir = coco_panoptic, panoptic_dir
        self.pred_json, self.pred_dir = pred_json, pred_dir
        self.coco_instances, self.predictions = coco_instances, predictions
        self._set: CocoPanopticSet | InstancesAsPanoptic | None = None

    @classmethod
    def from_instances(
        cls, coco_instances: str, images: str, predictions: str | None = None
    ) -> PanopticFormat:
        """A COCO instance set seen as things-only panoptic (``--as-panoptic``): ground truth
        painted by decreasing area, predictions combined by detectron2's rule
        (:mod:`..as_panoptic`)."""
        return cls(images=images, coco_instances=coco_instances, predictions=predictions)

    @property
    def as_panoptic(self) -> bool:
        """Whether the input is an instance set seen as panoptic."""
        return self.coco_instances is not None

    @property
    def settings_name(self) -> str:
        return "instances (as panoptic)" if self.as_panoptic else self.kind

    @property
    def main_input(self) -> str:
        return self.coco_panoptic or self.coco_instances

    def inputs(self) -> list[InputPath]:
        if self.as_panoptic:
            return [
                InputPath("images", self.images, folder=True),
                InputPath("coco_instances", self.coco_instances),
                InputPath("predictions", self.predictions),
            ]
        return [
            InputPath("images", self.images, folder=True),
            InputPath("coco_panoptic", self.coco_panoptic),
            InputPath("panoptic_dir", self.panoptic_dir, folder=True),
            InputPath("pred_json", self.pred_json),
            InputPath("pred_dir", self.pred_dir, folder=True),
        ]

    def check(self, coarse: CoarseSpec | None) -> None:
        if self.as_panoptic:
            if (self.predictions is None) == (coarse is None):
                raise ValueError(
                    "COCO instances need either --predictions RESULTS.json or "
                    "--coarse-from-gt SPEC (one of them)"
                )
        elif (self.pred_json is None) == (coarse is None):
            raise ValueError(
                "COCO panoptic needs either --pred-json/--pred-dir or "
                "--coarse-from-gt SPEC (one of them)"
            )

    def open(self) -> list[ImageItem]:
        if self.as_panoptic:
            self._set = InstancesAsPanoptic(
                CocoInstanceSet(self.coco_instances, self.images, self.predictions)
            )
        else:
            self._set = CocoPanopticSet(
                self.coco_panoptic, self.panoptic_dir, self.images, self.pred_json, self.pred_dir
            )
        return list(self._set.items)

    def validate(self, items: Sequence[ImageItem]) -> None:
        dataset = self._opened(self._set)
        if isinstance(dataset, CocoPanopticSet):
            dataset.validate_predictions(items)

    def payload(self, d: Mapping[str, Any]) -> PanopticPayload:
        return PanopticPayload.from_json(d)

    def process(self, ctx: ProcessContext, item: ImageItem) -> ImageRecord[PanopticPayload]:
        record = process_panoptic(ctx, self._opened(self._set), item)
        return ImageRecord.from_json(record, PanopticPayload.from_json)

    def metrics(
        self,
        records: Sequence[ImageRecord[PanopticPayload]],
        layout: OutputLayout,
        coarse: CoarseSpec | None,
        summary: dict[str, Any],
    ) -> FormatMetrics:
        dataset = self._opened(self._set)
        categories = list(dataset.categories.values())
        image_ids = [rec.image_id for rec in records]
        outputs: dict[str, str] = {}
        notes = []
        if self.as_panoptic:
            gt_anns = [rec.payload.gt_ann for rec in records if rec.payload.gt_ann is not None]
            gt_json = {**dataset.subset(image_ids), "annotations": gt_anns}
            outputs["ground truth (painted from instances)"] = layout.path("gt_panoptic.json")
            write_json(outputs["ground truth (painted from instances)"], gt_json)
            gt_dir = layout.path("gt_panoptic")
            notes.append(
                "ground truth painted from the instances in decreasing area order "
                "(smaller objects on top); all categories are things"
            )
        else:
            gt_json, gt_dir = dataset.subset(image_ids), dataset.gt_dir
        coarse_anns = [
            rec.payload.coarse_ann for rec in records if rec.payload.coarse_ann is not None
        ]
        if coarse_anns:
            coarse_json: Any = {"annotations": coarse_anns, "categories": categories}
            outputs["coarse panoptic"] = layout.path("coarse_panoptic.json")
            write_json(outputs["coarse panoptic"], coarse_json)
            coarse_dir = layout.path("coarse_panoptic")
        else:
            coarse_json, coarse_dir = self.pred_json, self.pred_dir
        refined_anns = [rec.payload.refined_ann for rec in records]
        refined_json = {"annotations": refined_anns, "categories": categories}
        outputs["refined panoptic"] = layout.path("refined_panoptic.json")
        write_json(outputs["refined panoptic"], refined_json)
        outputs["refined panoptic PNGs"] = layout.path("refined_panoptic")
        before = panoptic_metrics(gt_json, gt_dir, coarse_json, coarse_dir, label=BEFORE)
        after = panoptic_metrics(
            gt_json, gt_dir, refined_json, layout.path("refined_panoptic"), label=AFTER
        )
        return FormatMetrics(
            before=before,
            after=after,
            rows=panoptic_rows(before, after) + object_rows(summary),
            pairing=KNOWN_PAIRING if coarse else "same category, mask IoU > 0.5",
            outputs=outputs,
            notes=notes,
        )

    def masks(
        self, record: ImageRecord[PanopticPayload], obj: ObjectRecord
    ) -> tuple[np.ndarray, np.ndarray]:
        sid = obj.index
        return (
            read_panoptic_png(record.payload.coarse_png) == sid,
            read_panoptic_png(record.payload.refined_png) == sid,
        )
