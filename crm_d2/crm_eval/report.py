"""Metrics before and after refinement, the report files and the before/after pictures.

Everything here works on the per-image records of :mod:`.records` and runs on rank 0 after
all images are done. The metrics of each input layout belong to its format
(:mod:`.formats`); here are the parts every layout shares:

* per-object scores of the predictions paired with a ground truth (:func:`object_summary`:
  pooled and mean IoU, mBA (mean over objects with a defined mBA), Boundary IoU) and the share
  of objects whose IoU went down / up;
* the BIG set metrics (:func:`big_summary`, :class:`crm_d2.evaluation.BinaryMetrics`, the
  official evaluation's definitions);
* the table, the before/after pictures and the report files.

Both set summaries come from :func:`crm_d2.evaluation.aggregate.summarize_objects` (one NaN rule).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from ..evaluation.aggregate import summarize_objects
from ..evaluation.binary import BinaryMetrics
from ..io import read_image, save_image, write_text
from ..visualize import before_after
from .datasets import ImageItem
from .records import ImageRecord, ObjectRecord, OutputLayout, write_json

__all__ = [
    "big_summary",
    "format_table",
    "object_rows",
    "object_summary",
    "select_overlays",
    "write_markdown",
    "write_overlays",
    "write_report_json",
]

logger = logging.getLogger(__name__)

Row = tuple[str, float, float]  # label, before, after (percent; NaN when undefined)

RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: this run used an untrained CRM (--random-weights). Its numbers measure "
    "speed and plumbing only; as refinement results they are MEANINGLESS."
)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def object_summary(objects: Sequence[ObjectRecord]) -> dict[str, float]:
    """Per-object before/after summary of paired predictions.

    Returns:
        ``before``/``after`` dicts with ``iou`` (pooled), ``mean_iou``, ``mba`` (mean over the
        objects whose mBA is defined), ``boundary_iou`` (fractions), plus ``count``, ``refined``
        (objects that went through CRM), ``worse``/``better`` counts and fractions (IoU strictly
        down / up), ``worse_fraction_refined`` (among refined objects), ``mba_undefined``.
    """
    out: dict[str, Any] = {"count": len(objects)}
    for side in ("before", "after"):
        summary = summarize_objects([getattr(o, side) for o in objects])
        out[side] = {k: summary[k] for k in ("iou", "mean_iou", "mba", "boundary_iou")}
        out["mba_undefined"] = int(summary["mba_undefined"])
    deltas = [_delta(o) for o in objects]
    refined = [d for d, o in zip(deltas, objects) if o.refined]
    n = len(objects)
    out["refined"] = len(refined)
    out["worse"] = sum(d < 0 for d in deltas)
    out["better"] = sum(d > 0 for d in deltas)
    out["worse_fraction"] = out["worse"] / n if n else math.nan
    out["better_fraction"] = out["better"] / n if n else math.nan
    out["worse_fraction_refined"] = (
        sum(d < 0 for d in refined) / len(refined) if refined else math.nan
    )
    return out


def big_summary(objects: Sequence[ObjectRecord]) -> dict[str, float]:
    """BIG metrics of the official evaluation (pooled IoU, mBA, Boundary IoU) before/after."""
    metrics = BinaryMetrics()
    metrics.refined = [o.after for o in objects]
    metrics.coarse = [o.before for o in objects]
    return metrics.summary()


def object_rows(summary: dict) -> list[Row]:
    """Table rows of :func:`object_summary` (fractions) in percent."""
    b, a = summary["before"], summary["after"]
    return [
        ("object IoU (pooled)", 100 * b["iou"], 100 * a["iou"]),
        ("object IoU (mean)", 100 * b["mean_iou"], 100 * a["mean_iou"]),
        ("object mBA", 100 * b["mba"], 100 * a["mba"]),
        ("object Boundary IoU", 100 * b["boundary_iou"], 100 * a["boundary_iou"]),
    ]


def _delta(obj: ObjectRecord) -> float:
    return obj.iou_change


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table (readable as plain text too): metric | before | after | change."""
    lines = [("metric", "before", "after", "change")]
    for label, before, after in rows:
        change = after - before
        sign = "+" if change > 0 else ""
        lines.append(
            (
                label,
                _fmt(before),
                _fmt(after),
                "n/a" if math.isnan(change) else f"{sign}{change:.2f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(4)]

    def render(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join([first, *rest]) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]])
    return "\n".join([render(lines[0]), rule + "|", *(render(r) for r in lines[1:])])


# --------------------------------------------------------------------------------------------
# Overlays
# --------------------------------------------------------------------------------------------
def select_overlays(
    objects: Iterable[tuple[str, ObjectRecord]], n: int
) -> list[tuple[str, str, ObjectRecord]]:
    """The ``n`` most improved and ``n`` most degraded objects by IoU change.

    Args:
        objects: (image key, object record) pairs.
        n: how many of each kind.

    Returns:
        (kind, image key, object) triples, kind ``"improved"`` (largest gains first, gains > 0)
        then ``"degraded"`` (largest losses first, losses > 0).
    """
    if n <= 0:
        return []
    pairs = list(objects)
    gains = sorted((p for p in pairs if _delta(p[1]) > 0), key=lambda p: -_delta(p[1]))
    losses = sorted((p for p in pairs if _delta(p[1]) < 0), key=lambda p: _delta(p[1]))
    return [("improved", k, o) for k, o in gains[:n]] + [("degraded", k, o) for k, o in losses[:n]]


MaskLoader = Callable[[ImageRecord, ObjectRecord], tuple[np.ndarray, np.ndarray]]

OVERLAY_MIN_SIDE = 320  # small crops are enlarged to this longer side so that they stay legible


def _enlarge(
    image: np.ndarray, coarse: np.ndarray, refined: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upscale an (h, w, 3) crop and its two (h, w) bool masks when ``max(h, w)`` is below
    :data:`OVERLAY_MIN_SIDE` (image bilinear, masks nearest)."""
    h, w = coarse.shape
    if max(h, w) >= OVERLAY_MIN_SIDE:
        return image, coarse, refined
    s = OVERLAY_MIN_SIDE / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))

    def grow(mask: np.ndarray) -> np.ndarray:
        return cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0

    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR), grow(coarse), grow(refined)


def write_overlays(
    chosen: Sequence[tuple[str, str, ObjectRecord]],
    items: Mapping[str, ImageItem],
    records: Mapping[str, ImageRecord],
    layout: OutputLayout,
    masks_of: MaskLoader,
    max_side: int = 800,
) -> list[dict]:
    """Write one before/after picture per chosen object into ``OUTPUT/overlays``.

    Args:
        chosen: (kind, image key, object) of :func:`select_overlays`.
        items, records: the images and their records by key.
        layout: the output folder.
        masks_of: (coarse, refined) masks of an object (its format's :meth:`masks`).
        max_side: longer side of a picture.

    Returns:
        One entry per picture: ``kind``, ``file`` (relative to the output folder),
        ``image_id``, ``index``, ``iou_before``, ``iou_after``.
    """
    if not chosen:
        return []
    folder = layout.dir("overlays")
    out = []
    counters = {"improved": 0, "degraded": 0}
    for kind, key, obj in chosen:
        counters[kind] += 1
        record = records[key]
        image = read_image(items[key].image_path)
        coarse, refined = masks_of(record, obj)
        x0, y0, x1, y1 = obj.crop
        before, after = obj.before.iou, obj.after.iou
        crops = _enlarge(image[y0:y1, x0:x1], coarse[y0:y1, x0:x1], refined[y0:y1, x0:x1])
        pic = before_after(
            *crops,
            max_side=max_side,
            labels=(f"coarse IoU {before:.3f}", f"refined IoU {after:.3f}"),
        )
        name = f"{kind}_{counters[kind]:02d}_{key}_{obj.index}.jpg"
        save_image(os.path.join(folder, name), pic, quality=90)
        out.append(
            {
                "kind": kind,
                "file": f"overlays/{name}",
                "image_id": record.image_id,
                "index": obj.index,
                "iou_before": before,
                "iou_after": after,
            }
        )
    return out


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def _nan0(value: float | None) -> float:
    return 0.0 if value is None or math.isnan(value) else value


def timing_line(report: dict) -> str:
    """How long the run took; a resumed run says so and gives the refinement time of all its
    images (the per-image times recorded in the cache, summed over every invocation)."""
    t = report["timing"]
    procs = f"{report['world_size']} process(es)"
    resumed = t.get("resumed_images", 0)
    if not resumed:
        return (
            f"wall time: {t['wall_seconds']:.1f} s on {procs}; refinement "
            f"{t['seconds_per_image']:.2f} s per image"
        )
    return (
        f"RESUMED run: {resumed} of {report['images']} images came from the cache of an earlier "
        f"invocation; this invocation took {t['wall_seconds']:.1f} s on {procs} "
        f"(refined {t.get('refined_images_this_run', 0)} images). Refinement of all "
        f"{report['images']} images took {t['refine_seconds']:.1f} s in total "
        f"({t['seconds_per_image']:.2f} s per image)"
    )


def write_markdown(path: str, report: dict, rows: Sequence[Row]) -> None:
    """Write the human-readable report (metrics table, settings, outputs, overlays)."""
    lines = ["# crm-eval report", ""]
    if report.get("warning"):
        lines += [f"> **{report['warning']}**", ""]
    lines += [
        f"- input: {report['mode']} ({report['input']})",
        f"- coarse masks: {report['coarse']}",
        f"- weights: {report['weights']}",
        f"- images: {report['images']}, predicted segments: {report['segments']}, "
        f"refined by CRM: {report['refined_segments']}",
        f"- {timing_line(report)}",
        "",
        "## Metrics (percent)",
        "",
        format_table(rows),
        "",
    ]
    objs = report["objects"]
    if objs["count"]:
        lines += [
            f"Per-object rows: {objs['count']} predictions paired with a ground truth "
            f"({report['pairing']}); {objs['refined']} went through CRM. IoU went down for "
            f"{objs['worse']} ({100 * objs['worse_fraction']:.1f}%; "
            f"{100 * _nan0(objs['worse_fraction_refined']):.1f}% of the refined ones) and up for "
            f"{objs['better']} ({100 * objs['better_fraction']:.1f}%).",
            "",
        ]
    if report.get("notes"):
        lines += [f"- {note}" for note in report["notes"]] + [""]
    lines += ["## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["settings"].items()]
    lines += ["", "## Output files", ""]
    lines += [f"- {k}: `{v}`" for k, v in report["outputs"].items()]
    if report["overlays"]:
        lines += ["", "## Before / after (red: coarse, green: refined)", ""]
        for ov in report["overlays"]:
            lines += [
                f"### {ov['kind']}: image {ov['image_id']}, object {ov['index']}, IoU "
                f"{ov['iou_before']:.3f} -> {ov['iou_after']:.3f}",
                "",
                f"![{ov['kind']}]({ov['file']})",
                "",
            ]
    write_text(path, "\n".join(lines) + "\n")


def write_report_json(path: str, report: dict) -> None:
    """Write ``report`` as strict JSON (NaN -> null), indented."""
    write_json(path, report, indent=1)
