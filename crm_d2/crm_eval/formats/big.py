"""The BIG / CascadePSP layout: one folder of ``NAME_im.jpg``, ``NAME_seg.png`` (the coarse
mask) and ``NAME_gt.png``. Metrics: pooled IoU, mBA, Boundary IoU and mean IoU per image
(:func:`..report.big_summary`, the official evaluation's definitions).

Outputs: ``refined/NAME_refined.png``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...io import read_mask
from ..coarse import CoarseSpec
from ..datasets import BigSet, ImageItem
from ..process import ProcessContext, process_big
from ..records import ImageRecord, ObjectRecord, OutputLayout
from ..report import Row, big_summary
from .base import EvalFormat, FormatMetrics, InputPath

__all__ = ["BigFormat", "BigPayload", "big_rows"]


@dataclass
class BigPayload:
    """The BIG part of a record.

    Attributes:
        coarse_png, refined_png: absolute paths of the coarse (input) and refined masks.
        empty_coarse: the coarse mask is essentially empty (the official rule kept it).
    """

    coarse_png: str
    refined_png: str
    empty_coarse: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "coarse_png": self.coarse_png,
            "refined_png": self.refined_png,
            "empty_coarse": self.empty_coarse,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> BigPayload:
        return cls(d["coarse_png"], d["refined_png"], bool(d.get("empty_coarse")))


def big_rows(summary: dict) -> list[Row]:
    """Table rows of :func:`..report.big_summary` (fractions) in percent."""
    return [
        ("IoU (pooled)", 100 * summary["coarse_iou"], 100 * summary["iou"]),
        ("mBA", 100 * summary["coarse_mba"], 100 * summary["mba"]),
        ("Boundary IoU", 100 * summary["coarse_boundary_iou"], 100 * summary["boundary_iou"]),
        ("IoU (mean per image)", 100 * summary["coarse_mean_iou"], 100 * summary["mean_iou"]),
    ]


class BigFormat(EvalFormat[BigPayload]):
    """A folder in the BIG layout (``--big DIR``); it brings its own coarse masks.

    Args:
        folder: the folder.
    """

    kind = "big"

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._set: BigSet | None = None

    @property
    def main_input(self) -> str:
        return self.folder

    def inputs(self) -> list[InputPath]:
        return [InputPath("big", self.folder, folder=True)]

    def check(self, coarse: CoarseSpec | None) -> None:
        if coarse is not None:
            raise ValueError(
                "the BIG layout brings its own coarse masks: no --coarse-from-gt or --as-panoptic"
            )

    def open(self) -> list[ImageItem]:
        self._set = BigSet(self.folder)
        return list(self._set.items)

    def payload(self, d: Mapping[str, Any]) -> BigPayload:
        return BigPayload.from_json(d)

    def process(self, ctx: ProcessContext, item: ImageItem) -> ImageRecord[BigPayload]:
        record = process_big(ctx, self._opened(self._set), item)
        return ImageRecord.from_json(record, BigPayload.from_json)

    def metrics(
        self,
        records: Sequence[ImageRecord[BigPayload]],
        layout: OutputLayout,
        coarse: CoarseSpec | None,
        summary: dict[str, Any],
    ) -> FormatMetrics:
        big = big_summary([o for rec in records for o in rec.objects])
        before = {k[len("coarse_") :]: 100 * v for k, v in big.items() if k.startswith("coarse_")}
        after = {k: 100 * big[k] for k in before}
        notes = []
        empty = sum(rec.payload.empty_coarse for rec in records)
        if empty:
            notes.append(
                f"{empty} images kept their essentially empty coarse mask (sum of "
                "0..255 values < 1024, the official BIG rule)"
            )
        return FormatMetrics(
            before=before,
            after=after,
            rows=big_rows(big),
            pairing="one object per image",
            outputs={"refined masks": layout.path("refined")},
            notes=notes,
        )

    def masks(
        self, record: ImageRecord[BigPayload], obj: ObjectRecord
    ) -> tuple[np.ndarray, np.ndarray]:
        return read_mask(record.payload.coarse_png) > 128, read_mask(
            record.payload.refined_png
        ) > 128
