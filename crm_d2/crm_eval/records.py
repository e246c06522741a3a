"""The output folder of ``crm-eval`` and its per-image result cache.

Every processed image leaves one small JSON record in ``OUTPUT/cache/`` (an
:class:`ImageRecord`: RLE masks, segment lists and per-object scores, never raw pixels),
written atomically after the image's other outputs. A rerun skips images that have a record,
so an interrupted run resumes where it stopped; in a distributed run every process writes the
records of its own shard and rank 0 reads them all. ``settings.json`` holds the settings that
shape the results; a rerun with different settings is refused instead of mixing two
experiments, and a record that cannot be read (damaged, another version's fields) is refused
with the fix (:class:`RecordError`).

Layout::

    OUTPUT/settings.json                   settings the cached records were made with
    OUTPUT/cache/<key>.json                per-image records
    OUTPUT/refined_instances.json          refined COCO results (instances)
    OUTPUT/coarse_instances.json           coarse results (instances, coarse from ground truth)
    OUTPUT/refined_panoptic/ + .json       refined panoptic PNGs and JSON (panoptic)
    OUTPUT/coarse_panoptic/ + .json        coarse panoptic set (panoptic, coarse from ground truth)
    OUTPUT/gt_panoptic/ + .json            ground truth painted from instances (--as-panoptic)
    OUTPUT/refined/NAME_refined.png        refined masks (BIG layout)
    OUTPUT/overlays/*.jpg                  before/after pictures
    OUTPUT/report.json, report.md          metrics before and after
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Generic, Protocol, TypeVar

from .. import io
from ..evaluation.binary import ObjectScores

__all__ = [
    "ImageRecord",
    "ObjectRecord",
    "OutputLayout",
    "RecordError",
    "RecordStore",
    "SettingsMismatch",
    "write_json",
]


class SettingsMismatch(ValueError):
    """The output folder holds results made with other settings."""


class RecordError(ValueError):
    """A cached per-image record cannot be read (damaged, or written by another version)."""


# --------------------------------------------------------------------------------------------
# The per-image record
# --------------------------------------------------------------------------------------------
def _scores_from_json(d: Mapping[str, Any]) -> ObjectScores:
    """Scores as stored (strict JSON: an undefined value, e.g. mBA, is null) -> NaN."""
    return ObjectScores(**{k: (math.nan if v is None else v) for k, v in d.items()})


@dataclass
class ObjectRecord:
    """One prediction paired with a ground-truth object, scored before and after refinement.

    Attributes:
        index: the prediction's index in its image (instances: position in the image's
            results; panoptic: segment id; BIG: 0).
        gt: the paired ground truth (annotation id, panoptic segment id, or the BIG name).
        category_id: the prediction's category (None for BIG).
        refined: whether the refiner changed it (False: too small, or kept by a rule).
        crop: overlay crop ``[x0, y0, x1, y1]`` in image pixels.
        before, after: scores of the coarse and the refined mask against ``gt``.
    """

    index: int
    gt: Any
    category_id: int | None
    refined: bool
    crop: list[int]
    before: ObjectScores
    after: ObjectScores

    @property
    def iou_change(self) -> float:
        """IoU after minus IoU before."""
        return self.after.iou - self.before.iou

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "gt": self.gt,
            "category_id": self.category_id,
            "refined": self.refined,
            "crop": list(self.crop),
            "before": asdict(self.before),
            "after": asdict(self.after),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ObjectRecord:
        return cls(
            index=d["index"],
            gt=d["gt"],
            category_id=d["category_id"],
            refined=bool(d["refined"]),
            crop=list(d["crop"]),
            before=_scores_from_json(d["before"]),
            after=_scores_from_json(d["after"]),
        )


class Payload(Protocol):
    """The input format's part of a record, stored flat beside the common fields."""

    def to_json(self) -> dict[str, Any]: ...


P = TypeVar("P", bound=Payload)


@dataclass
class ImageRecord(Generic[P]):
    """What processing one image left for the evaluation (stored as ``cache/<key>.json``).

    Attributes:
        key, image_id, file_name: the image (:class:`~.datasets.ImageItem`).
        height, width: its size in pixels.
        segments: predicted segments (instances, panoptic segments, or 1 for BIG).
        refined: segments the refiner changed.
        objects: the predictions paired with a ground truth, scored.
        payload: the input format's part (COCO results, panoptic annotations, PNG paths).
        vanished: ground-truth objects whose coarse mask came out empty (coarse from GT).
        seconds: processing time of the image.
        rank: the process that made it (distributed runs).
    """

    key: str
    image_id: int | str
    file_name: str
    height: int
    width: int
    segments: int
    refined: int
    objects: list[ObjectRecord]
    payload: P
    vanished: int = 0
    seconds: float = 0.0
    rank: int = 0

    def to_json(self) -> dict[str, Any]:
        """The stored form: common fields and the payload's fields in one flat object."""
        out: dict[str, Any] = {
            "key": self.key,
            "image_id": self.image_id,
            "file_name": self.file_name,
            "height": self.height,
            "width": self.width,
            "segments": self.segments,
            "refined": self.refined,
            "vanished": self.vanished,
            "objects": [o.to_json() for o in self.objects],
            "seconds": self.seconds,
            "rank": self.rank,
        }
        payload = self.payload.to_json()
        clash = set(out) & set(payload)
        if clash:
            raise ValueError(f"payload fields {sorted(clash)} clash with the record's own")
        return {**out, **payload}

    @classmethod
    def from_json(
        cls, d: Mapping[str, Any], payload: Callable[[Mapping[str, Any]], P]
    ) -> ImageRecord[P]:
        """Read a stored record (also the plain dicts of the per-image functions).

        Args:
            d: the stored object.
            payload: reads the format's fields from ``d`` (the payload class's ``from_json``).

        Raises:
            KeyError, TypeError, ValueError: a field is missing or malformed.
        """
        return cls(
            key=d["key"],
            image_id=d["image_id"],
            file_name=d["file_name"],
            height=int(d["height"]),
            width=int(d["width"]),
            segments=int(d["segments"]),
            refined=int(d.get("refined", 0)),
            objects=[ObjectRecord.from_json(o) for o in d["objects"]],
            payload=payload(d),
            vanished=int(d.get("vanished", 0)),
            seconds=float(d.get("seconds", 0.0)),
            rank=int(d.get("rank", 0)),
        )


def _finite(obj: Any) -> Any:
    """JSON-safe copy: NaN and infinities become None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str, obj: Any, indent: int | None = None) -> None:
    """Write ``obj`` as strict JSON (NaN -> null) atomically (:func:`crm_d2.io.write_json`)."""
    io.write_json(path, _finite(obj), indent=indent)


@dataclass(frozen=True)
class OutputLayout:
    """Paths inside the output folder (see the module docstring)."""

    root: str

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def cache_dir(self) -> str:
        return self.path("cache")

    def dir(self, name: str) -> str:
        """``OUTPUT/name``, created if needed."""
        path = self.path(name)
        os.makedirs(path, exist_ok=True)
        return path


class RecordStore:
    """Per-image records in ``OUTPUT/cache``."""

    def __init__(self, layout: OutputLayout) -> None:
        self.dir = layout.cache_dir
        self.settings_path = layout.path("settings.json")
        os.makedirs(self.dir, exist_ok=True)

    def _path(self, key: str) -> str:
        return os.path.join(self.dir, f"{key}.json")

    def has(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def write(self, record: ImageRecord) -> None:
        """Store ``record`` as ``cache/<record.key>.json`` (atomically)."""
        write_json(self._path(record.key), record.to_json())

    def read(self, key: str, payload: Callable[[Mapping[str, Any]], P]) -> ImageRecord[P]:
        """The record of image ``key``; ``payload`` reads the input format's fields.

        Raises:
            RecordError: the file is not a record of this input format (damaged, or written by
                a crm-eval version with other record fields).
        """
        path = self._path(key)
        try:
            with open(path, encoding="utf-8") as f:
                return ImageRecord.from_json(json.load(f), payload)
        except (KeyError, TypeError, ValueError) as e:
            raise RecordError(
                f"cached record {path} cannot be read ({type(e).__name__}: {e}); it is damaged "
                "or was written by another crm-eval version. Use another --output, or "
                "--overwrite to discard the cached records"
            ) from e

    def clear(self) -> int:
        """Delete every record and the settings (``--overwrite``); returns the record count."""
        if os.path.isfile(self.settings_path):
            os.remove(self.settings_path)
        n = 0
        for name in os.listdir(self.dir):
            if name.endswith(".json"):
                os.remove(os.path.join(self.dir, name))
                n += 1
        return n

    def check_settings(self, settings: dict, create: bool) -> None:
        """Compare ``settings`` with ``settings.json``; write it when absent and ``create``.

        Raises:
            SettingsMismatch: when ``settings.json`` exists with different settings.
        """
        path = self.settings_path
        wanted = json.loads(json.dumps(_finite(settings)))
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)
            if stored != wanted:
                diff = sorted(
                    k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k)
                )
                records = sum(name.endswith(".json") for name in os.listdir(self.dir))
                raise SettingsMismatch(
                    f"{os.path.dirname(path)} holds {records} cached per-image records made from "
                    f"other inputs or settings (differing: {', '.join(diff)}); they are not "
                    "reused. Use another --output, or --overwrite to discard them"
                )
        elif create:
            write_json(path, wanted, indent=1)
