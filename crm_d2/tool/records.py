"""The output folder of ``crm-eval`` and its per-image result cache.

Every processed image leaves one small JSON record in ``OUTPUT/cache/`` (RLE masks, segment
lists and per-object scores, never raw pixels), written atomically after the image's other
outputs. A rerun skips images that have a record, so an interrupted run resumes where it
stopped; in a distributed run every process writes the records of its own shard and rank 0
reads them all. ``settings.json`` holds the settings that shape the results; a rerun with
different settings is refused instead of mixing two experiments.

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
from dataclasses import dataclass
from typing import Any

from .. import io

__all__ = ["OutputLayout", "RecordStore", "SettingsMismatch", "write_json"]


class SettingsMismatch(ValueError):
    """The output folder holds results made with other settings."""


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

    def write(self, key: str, record: dict) -> None:
        write_json(self._path(key), record)

    def read(self, key: str) -> dict:
        with open(self._path(key), encoding="utf-8") as f:
            return json.load(f)

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
