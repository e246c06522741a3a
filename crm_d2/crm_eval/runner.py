"""``crm-eval`` orchestration: shard the images over processes, refine each image once (with a
resumable per-image cache), then compute the metrics and write the reports on rank 0.

Distributed runs (``torchrun --nproc_per_node N``, several nodes likewise): every process
refines the images ``rank::world_size`` and writes their records into the SHARED output folder;
after a barrier rank 0 reads all records and evaluates. Several nodes therefore need an output
folder that all of them see (a network file system).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..distributed import DistInfo
from ..distributed import init_distributed as _init_distributed
from ..inference import CRMRefiner
from ..io import image_size
from ..memory import check_memory
from ..options import CRM_EVAL_DEFAULTS, RefineOptions
from ..pipeline import reduced_size
from ..refiners import Refiner
from .coarse import CoarseSpec
from .datasets import ImageItem
from .formats import EvalFormat
from .process import ProcessContext
from .records import ImageRecord, OutputLayout, RecordStore
from .report import (
    RANDOM_WEIGHTS_WARNING,
    format_table,
    object_summary,
    select_overlays,
    write_markdown,
    write_overlays,
    write_report_json,
)

__all__ = ["DistInfo", "EvalConfig", "init_distributed", "run_evaluation"]

logger = logging.getLogger(__name__)

DIST_TIMEOUT = datetime.timedelta(hours=24)  # the barrier waits for the slowest shard


_FUSION_KEYS = ("stuff_factor", "init_confidence", "exclusive", "void_id", "score_reweight")


@dataclass
class EvalConfig:
    """Everything ``crm-eval`` was asked to do (see ``crm-eval --help``).

    Attributes:
        output: the output folder.
        inputs: the input format with its paths (:mod:`.formats`).
        coarse: coarse masks made from the ground truth (None: the input's predictions).
        soft_coarse: give the refiner the soft coarse map (soft ``stride<K>`` kinds).
        limit: only the first N images.
        settings: ROI options, scales, downscaling.
        overlays: before/after pictures of the N most improved and N most degraded objects.
        overwrite: discard the cached records first.
        quiet: no progress bar.
        weights: how the refiner's weights are described in the report.
        random_weights: the refiner is untrained (the report says so).
    """

    output: str
    inputs: EvalFormat
    coarse: CoarseSpec | None = None
    soft_coarse: bool = False
    limit: int | None = None
    settings: RefineOptions = CRM_EVAL_DEFAULTS
    overlays: int = 8
    overwrite: bool = False
    quiet: bool = False
    weights: str = ""
    random_weights: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, EvalFormat):
            raise TypeError(
                f"inputs must be an EvalFormat (crm_d2.crm_eval.formats), got {type(self.inputs)}"
            )
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.overlays < 0:
            raise ValueError(f"overlays must be >= 0, got {self.overlays}")
        self.inputs.check(self.coarse)
        if self.soft_coarse and (self.coarse is None or self.coarse.kind.binary):
            raise ValueError(
                "--soft-coarse needs a soft --coarse-from-gt kind (stride<K>, e.g. stride8)"
            )

    def settings_record(self, refiner: Refiner) -> dict[str, Any]:
        """The settings that shape per-image results (stored with the cache)."""
        opts = self.settings
        inputs = [p for p in self.inputs.inputs() if p.path]
        paths = {p.name: os.path.abspath(p.path) for p in inputs}
        # What the files hold, not only their names: a changed ground truth, prediction or
        # weights file (or an image / PNG folder) invalidates the cached records.
        files = [("weights", self.weights)] + [(p.name, p.path) for p in inputs if not p.folder]
        stamps = {f"{k}_sha256": _file_digest(v) for k, v in files if v and os.path.isfile(v)}
        stamps.update(
            (f"{p.name}_listing", _folder_stamp(p.path))
            for p in inputs
            if p.folder and os.path.isdir(p.path)
        )
        return {
            "mode": self.inputs.settings_name,
            **paths,
            **stamps,
            "coarse": self.coarse.describe() if self.coarse else "given predictions",
            "soft_coarse": self.soft_coarse,
            "weights": self.weights,
            **_refiner_record(refiner, self.settings.scales),
            "random_weights": self.random_weights,
            "expand_ratio": opts.expand_ratio,
            "min_area": opts.min_area,
            "size_multiple": opts.size_multiple,
            "max_side": opts.max_side,
            # The fusion options, only where they differ from crm-eval's defaults, so that the
            # records cached before they could be set stay valid.
            **{
                k: getattr(opts, k)
                for k in _FUSION_KEYS
                if getattr(opts, k) != getattr(CRM_EVAL_DEFAULTS, k)
            },
        }


def _refiner_record(refiner, scales: tuple[float, ...] | None) -> dict[str, Any]:
    """What of the refiner shapes the outputs: CRM's scales, or the other refiner's settings."""
    if isinstance(refiner, CRMRefiner):
        scales = tuple(refiner.scales if scales is None else scales)
        record: dict[str, Any] = {"scales": list(scales)}
        decoding = refiner.fast_options(scales).resolved(refiner.device)
        if not decoding.is_dense:  # records cached with dense decoding stay valid
            record["decoding"] = decoding.describe()
        if refiner.flip:  # absent when off: records cached before the option stay valid
            record["flip"] = True
        if refiner.guided_blend:  # likewise
            record["guided_blend"] = refiner.guided_blend
        return record
    if scales is not None:
        raise ValueError(f"input scales are a CRM setting; the {refiner.kind} refiner has none")
    return refiner.settings_record()


def _file_digest(path: str) -> str:
    """SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_stamp(path: str) -> str:
    """SHA-256 of a folder's listing (names, sizes, modification times; not recursive): a file
    added, removed, replaced or edited in it changes the stamp."""
    digest = hashlib.sha256()
    with os.scandir(path) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.is_file():
                st = entry.stat()
                digest.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------
def init_distributed(device: str) -> tuple[DistInfo, str]:
    """:func:`crm_d2.distributed.init_distributed` with the evaluation tool's timeout (a day:
    the final barrier waits for the slowest shard)."""
    return _init_distributed(device, DIST_TIMEOUT)


def check_dataset_memory(config: EvalConfig, items: list[ImageItem], refiner: Refiner) -> None:
    """Refuse, before any refinement, a set whose largest image (the largest possible ROI, at
    ``--max-side`` if given) would not fit in memory (:func:`crm_d2.memory.check_memory`).
    The estimate is CRM's; other refiners are not checked.

    Raises:
        ValueError: with the estimate and the options that help.
    """
    if not isinstance(refiner, CRMRefiner):
        return
    largest, size = None, (0, 0)
    for item in items:
        if item.height is not None:
            hw = (item.height, item.width)
        elif os.path.isfile(item.image_path):
            hw = image_size(item.image_path)
        else:
            continue
        if hw[0] * hw[1] > size[0] * size[1]:
            largest, size = item, hw
    if largest is None:
        return
    h, w = reduced_size(*size, config.settings.max_side)
    scales = refiner.scales if config.settings.scales is None else config.settings.scales
    try:
        check_memory(
            h,
            w,
            refiner.arch,
            scales,
            refiner.device,
            what=f"image {largest.image_id!r} ({size[1]}x{size[0]}, the largest of the set"
            + (f", refined at {w}x{h}" if (h, w) != size else "")
            + ")",
            helps="--max-side N refines large images at reduced size (outputs and metrics stay "
            "at full resolution); a coarser finest scale (--scales) also helps.",
        )
    except MemoryError as e:
        raise ValueError(str(e)) from e


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def _refine_shard(
    config: EvalConfig,
    items: list[ImageItem],
    ctx: ProcessContext,
    store: RecordStore,
    dist: DistInfo,
) -> int:
    shard = items[dist.rank :: dist.world_size]
    todo = [it for it in shard if not store.has(it.key)]
    logger.info(
        "rank %d/%d: %d images, %d already done, %d to refine",
        dist.rank,
        dist.world_size,
        len(shard),
        len(shard) - len(todo),
        len(todo),
    )
    from tqdm import tqdm

    bar = tqdm(
        todo,
        desc="crm-eval",
        unit="img",
        dynamic_ncols=True,
        disable=config.quiet or dist.rank != 0,
    )
    for item in bar:
        record = config.inputs.process(ctx, item)
        record.rank = dist.rank
        store.write(record)
    bar.close()
    return len(todo)


def run_evaluation(
    config: EvalConfig, refiner: Refiner, dist: DistInfo | None = None
) -> dict | None:
    """Refine the inputs of ``config`` with ``refiner`` and evaluate before/after.

    Returns:
        The report (also written to ``OUTPUT/report.json`` and ``report.md``) on rank 0,
        None on the other ranks. The report's ``table`` holds (metric, before, after) rows in
        percent and ``console`` its text rendering.
    """
    dist = dist or DistInfo()
    t0 = time.perf_counter()
    items = config.inputs.open()
    items = items[: config.limit] if config.limit else items
    if not items:
        raise ValueError("the input has no images")
    config.inputs.validate(items)  # before anything is refined
    check_dataset_memory(config, items, refiner)
    layout = OutputLayout(config.output)
    os.makedirs(layout.root, exist_ok=True)
    store = RecordStore(layout)
    settings = config.settings_record(refiner)
    if dist.rank == 0:
        if config.overwrite:
            n = store.clear()
            if n:
                logger.warning("--overwrite: discarded %d cached per-image records", n)
        store.check_settings(settings, create=True)
    dist.barrier()
    if dist.rank != 0:
        store.check_settings(settings, create=False)
    ctx = ProcessContext(refiner, config.settings, layout, config.coarse, config.soft_coarse)
    done_now = _refine_shard(config, items, ctx, store, dist)
    dist.barrier()
    if dist.rank != 0:
        return None
    missing = [it.key for it in items if not store.has(it.key)]
    if missing:
        raise RuntimeError(
            f"{len(missing)} images have no record in {store.dir} after all processes finished "
            f"(first: {missing[:3]}); in a multi-node run the output folder must be shared by "
            "all nodes"
        )
    records = [store.read(it.key, config.inputs.payload) for it in items]
    report = _evaluate(config, items, records, layout, settings)
    report["world_size"] = dist.world_size
    report["settings"]["processes"] = dist.world_size
    report["timing"]["wall_seconds"] = time.perf_counter() - t0
    report["timing"]["refined_images_this_run"] = done_now
    report["timing"]["resumed_images"] = len(items) - done_now
    rows = [tuple(r) for r in report["table"]]
    write_report_json(layout.path("report.json"), report)
    write_markdown(layout.path("report.md"), report, rows)
    return report


def _evaluate(
    config: EvalConfig,
    items: Sequence[ImageItem],
    records: Sequence[ImageRecord],
    layout: OutputLayout,
    settings: dict,
) -> dict:
    """Compute the metrics of every record, write the collected outputs and overlays; returns
    the report (without the run's timing and process count)."""
    fmt = config.inputs
    objects = [(rec.key, o) for rec in records for o in rec.objects]
    summary = object_summary([o for _, o in objects])
    result = fmt.metrics(records, layout, config.coarse, summary)
    outputs, notes = dict(result.outputs), list(result.notes)
    if config.random_weights:
        notes.insert(0, RANDOM_WEIGHTS_WARNING)
    chosen = select_overlays(objects, config.overlays)
    overlays = write_overlays(
        chosen,
        {it.key: it for it in items},
        {rec.key: rec for rec in records},
        layout,
        fmt.masks,
    )
    outputs["report"] = layout.path("report.md")
    seconds = sum(rec.seconds for rec in records)
    rows = result.rows
    return {
        "tool": "crm-eval",
        "warning": RANDOM_WEIGHTS_WARNING if config.random_weights else None,
        "mode": fmt.kind,
        "input": fmt.main_input,
        "coarse": settings["coarse"] + (" (CRM sees the soft map)" if config.soft_coarse else ""),
        "weights": config.weights,
        "pairing": result.pairing,
        "images": len(items),
        "segments": sum(rec.segments for rec in records),
        "refined_segments": sum(rec.refined for rec in records),
        "units": "before/after and table: percent; objects: fractions in [0, 1]",
        "before": result.before,
        "after": result.after,
        "objects": summary,
        "table": [list(r) for r in rows],
        "console": format_table(rows),
        "timing": {"refine_seconds": seconds, "seconds_per_image": seconds / len(items)},
        "settings": {
            **settings,
            "limit": config.limit,
            "overlays": config.overlays,
            "batch_size": config.settings.batch_size,
        },
        "outputs": outputs,
        "overlays": overlays,
        "notes": notes,
    }
