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
from collections.abc import Callable
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
from .as_panoptic import InstancesAsPanoptic
from .coarse import CoarseSpec
from .datasets import BigSet, CocoInstanceSet, CocoPanopticSet, ImageItem
from .process import ProcessContext, process_big, process_instances, process_panoptic
from .records import OutputLayout, RecordStore, write_json
from .report import (
    RANDOM_WEIGHTS_WARNING,
    big_masks,
    big_rows,
    big_summary,
    format_table,
    instance_masks,
    instance_metrics,
    instance_rows,
    object_rows,
    object_summary,
    panoptic_masks,
    panoptic_metrics,
    panoptic_rows,
    select_overlays,
    write_markdown,
    write_overlays,
    write_report_json,
)

__all__ = ["DistInfo", "EvalConfig", "init_distributed", "run_evaluation"]

logger = logging.getLogger(__name__)

DIST_TIMEOUT = datetime.timedelta(hours=24)  # the barrier waits for the slowest shard
BEFORE, AFTER = "before (coarse input)", "after (refined by CRM)"  # names in the logs


_FUSION_KEYS = ("stuff_factor", "init_confidence", "exclusive", "void_id", "score_reweight")


@dataclass
class EvalConfig:
    """Everything ``crm-eval`` was asked to do (see ``crm-eval --help``).

    ``mode`` is ``"instances"``, ``"panoptic"`` or ``"big"``; the input fields of the other
    modes stay None.
    """

    output: str
    mode: str
    images: str | None = None
    coco_instances: str | None = None
    predictions: str | None = None
    coco_panoptic: str | None = None
    panoptic_dir: str | None = None
    pred_json: str | None = None
    pred_dir: str | None = None
    big: str | None = None
    coarse: CoarseSpec | None = None
    soft_coarse: bool = False
    as_panoptic: bool = False
    limit: int | None = None
    settings: RefineOptions = CRM_EVAL_DEFAULTS
    overlays: int = 8
    overwrite: bool = False
    quiet: bool = False
    weights: str = ""
    random_weights: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("instances", "panoptic", "big"):
            raise ValueError(f"mode must be instances, panoptic or big, got {self.mode!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.overlays < 0:
            raise ValueError(f"overlays must be >= 0, got {self.overlays}")
        if self.mode == "big" and (self.coarse is not None or self.as_panoptic):
            raise ValueError(
                "the BIG layout brings its own coarse masks: no --coarse-from-gt or --as-panoptic"
            )
        if self.mode == "instances" and (self.predictions is None) == (self.coarse is None):
            raise ValueError(
                "COCO instances need either --predictions RESULTS.json or "
                "--coarse-from-gt SPEC (one of them)"
            )
        if self.mode == "panoptic":
            if self.as_panoptic:
                raise ValueError(
                    "--as-panoptic converts a COCO instance set: use it with --coco-instances"
                )
            if (self.pred_json is None) == (self.coarse is None):
                raise ValueError(
                    "COCO panoptic needs either --pred-json/--pred-dir or "
                    "--coarse-from-gt SPEC (one of them)"
                )
        if self.soft_coarse and (self.coarse is None or self.coarse.kind.binary):
            raise ValueError(
                "--soft-coarse needs a soft --coarse-from-gt kind (stride<K>, e.g. stride8)"
            )

    def settings_record(self, refiner: Refiner) -> dict[str, Any]:
        """The settings that shape per-image results (stored with the cache)."""
        opts = self.settings
        paths = {
            k: os.path.abspath(v) if v else None
            for k, v in (
                ("images", self.images),
                ("coco_instances", self.coco_instances),
                ("predictions", self.predictions),
                ("coco_panoptic", self.coco_panoptic),
                ("panoptic_dir", self.panoptic_dir),
                ("pred_json", self.pred_json),
                ("pred_dir", self.pred_dir),
                ("big", self.big),
            )
        }
        # What the files hold, not only their names: a changed ground truth, prediction or
        # weights file (or an image / PNG folder) invalidates the cached records.
        stamps = {
            f"{k}_sha256": _file_digest(v)
            for k, v in (
                ("weights", self.weights),
                ("coco_instances", self.coco_instances),
                ("coco_panoptic", self.coco_panoptic),
                ("predictions", self.predictions),
                ("pred_json", self.pred_json),
            )
            if v and os.path.isfile(v)
        }
        stamps.update(
            (f"{k}_listing", _folder_stamp(v))
            for k, v in (
                ("images", self.images),
                ("panoptic_dir", self.panoptic_dir),
                ("pred_dir", self.pred_dir),
                ("big", self.big),
            )
            if v and os.path.isdir(v)
        )
        return {
            "mode": self.mode + (" (as panoptic)" if self.as_panoptic else ""),
            **{k: v for k, v in paths.items() if v},
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
        return {"scales": list(refiner.scales if scales is None else scales)}
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
            h, w, refiner.arch, scales, refiner.device,
            what=f"image {largest.image_id!r} ({size[1]}x{size[0]}, the largest of the set"
            + (f", refined at {w}x{h}" if (h, w) != size else "") + ")",
            helps="--max-side N refines large images at reduced size (outputs and metrics stay "
            "at full resolution); a coarser finest scale (--scales) also helps.",
        )
    except MemoryError as e:
        raise ValueError(str(e)) from e


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def build_dataset(config: EvalConfig) -> tuple[Any, Callable[..., dict]]:
    """The dataset object of the input layout and its per-image function."""
    if config.mode == "big":
        return BigSet(config.big), process_big
    if config.mode == "panoptic":
        return CocoPanopticSet(
            config.coco_panoptic,
            config.panoptic_dir,
            config.images,
            config.pred_json,
            config.pred_dir,
        ), process_panoptic
    instances = CocoInstanceSet(config.coco_instances, config.images, config.predictions)
    if config.as_panoptic:
        return InstancesAsPanoptic(instances), process_panoptic
    return instances, process_instances


def _refine_shard(
    config: EvalConfig,
    dataset: Any,
    process: Callable[..., dict],
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
        record = process(ctx, dataset, item)
        record["rank"] = dist.rank
        store.write(item.key, record)
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
    dataset, process = build_dataset(config)
    items = dataset.items[: config.limit] if config.limit else list(dataset.items)
    if not items:
        raise ValueError("the input has no images")
    validate = getattr(dataset, "validate_predictions", None)
    if validate is not None:  # panoptic predictions: checked before anything is refined
        validate(items)
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
    done_now = _refine_shard(config, dataset, process, items, ctx, store, dist)
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
    report = _evaluate(config, dataset, items, store, layout, settings)
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
    dataset: Any,
    items: list[ImageItem],
    store: RecordStore,
    layout: OutputLayout,
    settings: dict,
) -> dict:
    """Read every record, compute the metrics, write the collected outputs and overlays."""
    kind = "panoptic" if config.as_panoptic else config.mode
    objects: list[tuple[str, dict]] = []
    seconds = 0.0
    segments = refined_segments = vanished = 0
    collected: dict[str, list] = {
        "coarse_results": [],
        "refined_results": [],
        "coarse_ann": [],
        "refined_ann": [],
        "gt_ann": [],
    }
    for item in items:
        rec = store.read(item.key)
        seconds += rec.get("seconds", 0.0)
        refined_segments += rec.get("refined", 0)
        vanished += rec.get("vanished", 0)
        objects.extend((item.key, o) for o in rec["objects"])
        segments += rec["segments"]
        if kind == "instances":
            collected["coarse_results"].extend(rec["coarse_results"])
            collected["refined_results"].extend(rec["refined_results"])
        elif kind == "panoptic":
            for name in ("coarse_ann", "refined_ann", "gt_ann"):
                if name in rec:
                    collected[name].append(rec[name])

    outputs: dict[str, str] = {}
    notes: list[str] = []
    summary = object_summary([o for _, o in objects])
    image_ids = [it.image_id for it in items]
    if kind == "instances":
        outputs["refined results"] = layout.path("refined_instances.json")
        write_json(outputs["refined results"], collected["refined_results"])
        if config.coarse is not None:
            outputs["coarse results"] = layout.path("coarse_instances.json")
            write_json(outputs["coarse results"], collected["coarse_results"])
            if vanished:
                notes.append(
                    f"{vanished} ground-truth objects had an empty coarse mask "
                    f"({config.coarse.describe()}) and are not among the predictions"
                )
        gt = dataset.subset(image_ids)
        before = instance_metrics(gt, collected["coarse_results"], label=BEFORE)
        after = instance_metrics(gt, collected["refined_results"], label=AFTER)
        rows = instance_rows(before, after) + object_rows(summary)
        masks_of = instance_masks
        pairing = (
            "known: coarse made from that ground truth"
            if config.coarse
            else "best IoU >= 0.5, same category, greedy by score"
        )
    elif kind == "panoptic":
        categories = list(dataset.categories.values())
        if config.as_panoptic:
            gt_json = {**dataset.subset(image_ids), "annotations": collected["gt_ann"]}
            outputs["ground truth (painted from instances)"] = layout.path("gt_panoptic.json")
            write_json(outputs["ground truth (painted from instances)"], gt_json)
            gt_dir = layout.path("gt_panoptic")
            notes.append(
                "ground truth painted from the instances in decreasing area order "
                "(smaller objects on top); all categories are things"
            )
        else:
            gt_json, gt_dir = dataset.subset(image_ids), dataset.gt_dir
        if collected["coarse_ann"]:
            coarse_json = {"annotations": collected["coarse_ann"], "categories": categories}
            outputs["coarse panoptic"] = layout.path("coarse_panoptic.json")
            write_json(outputs["coarse panoptic"], coarse_json)
            coarse_dir = layout.path("coarse_panoptic")
        else:
            coarse_json, coarse_dir = config.pred_json, config.pred_dir
        refined_json = {"annotations": collected["refined_ann"], "categories": categories}
        outputs["refined panoptic"] = layout.path("refined_panoptic.json")
        write_json(outputs["refined panoptic"], refined_json)
        outputs["refined panoptic PNGs"] = layout.path("refined_panoptic")
        before = panoptic_metrics(gt_json, gt_dir, coarse_json, coarse_dir, label=BEFORE)
        after = panoptic_metrics(
            gt_json, gt_dir, refined_json, layout.path("refined_panoptic"), label=AFTER
        )
        rows = panoptic_rows(before, after) + object_rows(summary)
        masks_of = panoptic_masks
        pairing = (
            "known: coarse made from that ground truth"
            if config.coarse
            else "same category, mask IoU > 0.5"
        )
    else:
        big = big_summary([o for _, o in objects])
        before = {k[len("coarse_") :]: 100 * v for k, v in big.items() if k.startswith("coarse_")}
        after = {k: 100 * big[k] for k in before}
        rows = big_rows(big)
        outputs["refined masks"] = layout.path("refined")
        masks_of = big_masks
        pairing = "one object per image"
        empty = sum(bool(store.read(it.key).get("empty_coarse")) for it in items)
        if empty:
            notes.append(
                f"{empty} images kept their essentially empty coarse mask (sum of "
                "0..255 values < 1024, the official BIG rule)"
            )
    if config.random_weights:
        notes.insert(0, RANDOM_WEIGHTS_WARNING)

    chosen = select_overlays(objects, config.overlays)
    overlays = write_overlays(chosen, {it.key: it for it in items}, store, layout, masks_of)
    outputs["report"] = layout.path("report.md")
    report = {
        "tool": "crm-eval",
        "warning": RANDOM_WEIGHTS_WARNING if config.random_weights else None,
        "mode": kind,
        "input": config.big or config.coco_panoptic or config.coco_instances,
        "coarse": settings["coarse"] + (" (CRM sees the soft map)" if config.soft_coarse else ""),
        "weights": config.weights,
        "pairing": pairing,
        "images": len(items),
        "segments": segments,
        "refined_segments": refined_segments,
        "units": "before/after and table: percent; objects: fractions in [0, 1]",
        "before": before,
        "after": after,
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
    return report
