#!/usr/bin/env python3
"""Evaluate (or train) a detectron2 model wrapped with CRM mask refinement.

One ``--eval-only`` run evaluates the inner model's outputs and the CRM-refined outputs of the
same inference pass (``MODEL.CRM.EVAL_BOTH``, on in ``configs/Base-CRM.yaml``) and logs both
tables and their difference: COCO panoptic PQ/SQ/RQ (detectron2's ``COCOPanopticEvaluator``),
COCO mask AP (``COCOEvaluator``) and class-agnostic entity AP (EntitySeg), as chosen by
``MODEL.CRM.EVALUATORS`` or from the inner meta-architecture.

Examples::

    # Panoptic FPN from detectron2's model zoo on COCO val2017 (registered by detectron2)
    python tools/train_net.py --config-file configs/panoptic_fpn_R_50_1x_crm.yaml --eval-only \\
        MODEL.CRM.WEIGHTS /path/to/model_45705

    # any COCO panoptic folder, by paths
    python tools/train_net.py --config-file configs/panoptic_fpn_R_50_1x_crm.yaml --eval-only \\
        --panoptic-dataset my_val /data/images /data/panoptic_pngs /data/panoptic.json

    # an external project (PanopticFCN), multi-GPU
    python tools/train_net.py --config-file configs/panopticfcn_R50_400_3x_crm.yaml \\
        --extra-path $PANOPTICFCN_ROOT --extra-module panopticfcn \\
        --config-adder add_panopticfcn_config --num-gpus 8 --eval-only MODEL.WEIGHTS model.pth

Training (without ``--eval-only``) trains the inner model exactly as its own ``train_net.py``
would (the refiner is frozen and receives no gradients).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
)
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import (
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from crm_d2.d2.config import add_crm_config, merge_config_file
from crm_d2.d2.data import (
    OriginalImageMapper,
    entity_gt_json,
    prepare_dataset_files,
    register_coco_instance_folder,
    register_coco_panoptic_folder,
)
from crm_d2.d2.evaluators import (
    BeforeAfterEvaluator,
    EntityAPEvaluator,
    format_before_after,
)
from crm_d2.d2.meta_arch import CRMRefinedModel
from crm_d2.d2.simulator import CoarseGTSimulator
from crm_d2.io import write_json, write_text

logger = logging.getLogger("crm_d2.train_net")

TASKS = ("panoptic_seg", "segm", "entity", "sem_seg")
# Evaluation tasks chosen when MODEL.CRM.EVALUATORS is empty, by inner meta-architecture.
TASKS_BY_ARCH = {
    "PanopticFPN": ("panoptic_seg", "segm"),
    "PanopticFCN": ("panoptic_seg", "segm"),
    "MaskFormer": ("panoptic_seg",),
    "GeneralizedRCNN": ("segm",),
    "EntityFPN": ("entity",),
    "CoarseGTSimulator": ("panoptic_seg", "segm"),
}
# Category convention of panoptic folders, by inner meta-architecture (default: separated).
STANDARD_PANOPTIC_ARCHS = ("MaskFormer",)


# --------------------------------------------------------------------------------------------
# Arguments and config
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """detectron2's default parser plus crm_d2's flags (external projects, datasets by path)."""
    parser = default_argument_parser(__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--extra-path",
        action="append",
        default=[],
        metavar="DIR",
        help="folder added to sys.path before importing --extra-module (repeatable)",
    )
    parser.add_argument(
        "--extra-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="module imported to register an external meta-architecture, e.g. panopticfcn "
        "(repeatable)",
    )
    parser.add_argument(
        "--config-adder",
        action="append",
        default=[],
        metavar="FUNC",
        help="function called on the config before the YAML is merged: a name found in an "
        "--extra-module (add_panopticfcn_config) or module:function (repeatable)",
    )
    parser.add_argument(
        "--panoptic-dataset",
        action="append",
        nargs=4,
        default=[],
        metavar=("NAME", "IMAGE_DIR", "PANOPTIC_DIR", "PANOPTIC_JSON"),
        help="register a COCO panoptic folder and evaluate on it (repeatable; replaces "
        "DATASETS.TEST)",
    )
    parser.add_argument(
        "--instance-dataset",
        action="append",
        nargs=3,
        default=[],
        metavar=("NAME", "IMAGE_DIR", "INSTANCE_JSON"),
        help="register a COCO instance folder and evaluate on it (repeatable; replaces "
        "DATASETS.TEST)",
    )
    parser.add_argument(
        "--categories-json",
        default=None,
        metavar="FILE",
        help="panoptic categories (with isthing) for --panoptic-dataset JSONs that have none",
    )
    parser.add_argument(
        "--panoptic-convention",
        choices=("auto", "separated", "standard"),
        default="auto",
        help="category ids of --panoptic-dataset: 'separated' (Panoptic FPN, PanopticFCN) or "
        "'standard' (Mask2Former); auto chooses from the inner meta-architecture",
    )
    return parser


def _resolve_adders(names: Sequence[str], modules: Sequence) -> list[Callable[[CfgNode], None]]:
    adders = []
    for name in names:
        if ":" in name:
            module_name, func = name.split(":", 1)
            adders.append(getattr(importlib.import_module(module_name), func))
            continue
        found = [getattr(m, name) for m in modules if hasattr(m, name)]
        if not found:
            raise ValueError(
                f"--config-adder {name!r} is not defined in the --extra-module(s) "
                f"{[m.__name__ for m in modules]}: pass module:function"
            )
        adders.append(found[0])
    return adders


def inner_arch(cfg: CfgNode) -> str:
    """The wrapped meta-architecture (or the model's own when it is not wrapped)."""
    if cfg.MODEL.META_ARCHITECTURE == CRMRefinedModel.__name__:
        return cfg.MODEL.CRM.INNER_META_ARCHITECTURE
    return cfg.MODEL.META_ARCHITECTURE


def cache_dir(cfg: CfgNode) -> str:
    """Folder of files derived from datasets (ground truths the evaluators need)."""
    return os.path.join(cfg.OUTPUT_DIR, "crm_cache")


def register_datasets(args, cfg: CfgNode) -> list[str]:
    """Register the --panoptic-dataset / --instance-dataset folders; return their names."""
    names = []
    convention = args.panoptic_convention
    if convention == "auto":
        convention = "standard" if inner_arch(cfg) in STANDARD_PANOPTIC_ARCHS else "separated"
    for name, images, pngs, pan_json in args.panoptic_dataset:
        if name not in DatasetCatalog.list():
            register_coco_panoptic_folder(
                name,
                images,
                pngs,
                pan_json,
                cache_dir=cache_dir(cfg),
                categories_json=args.categories_json,
                separated=convention == "separated",
            )
        names.append(name)
    for name, images, json_file in args.instance_dataset:
        if name not in DatasetCatalog.list():
            register_coco_instance_folder(name, images, json_file)
        names.append(name)
    return names


def setup(args) -> CfgNode:
    """Import external projects, build the config, register datasets, derive ground truths."""
    for path in args.extra_path:
        path = os.path.abspath(os.path.expanduser(path))
        if path not in sys.path:
            sys.path.insert(0, path)
    modules = [importlib.import_module(name) for name in args.extra_module]
    cfg = get_cfg()
    for adder in _resolve_adders(args.config_adder, modules):
        adder(cfg)
    add_crm_config(cfg)
    if args.config_file:
        merge_config_file(cfg, args.config_file)
    cfg.merge_from_list(args.opts)
    datasets = register_datasets(args, cfg)
    if datasets:
        cfg.DATASETS.TEST = tuple(datasets)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="crm_d2")
    if args.eval_only:
        require_evaluator_packages(cfg)
    if comm.get_local_rank() == 0:
        for name in cfg.DATASETS.TEST:
            prepare_dataset_files(name)
            if "entity" in evaluation_tasks(cfg, name):
                entity_gt_json(name, cache_dir(cfg))
    comm.synchronize()
    return cfg


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
PANOPTICAPI_HINT = (
    "detectron2's COCOPanopticEvaluator needs panopticapi, which is not installed: "
    "pip install --no-deps panopticapi-lite"
)


def require_evaluator_packages(cfg: CfgNode) -> None:
    """Fail before any inference when an evaluator of cfg.DATASETS.TEST needs a missing
    package (panopticapi for panoptic_seg)."""
    import importlib.util

    needs_pq = [n for n in cfg.DATASETS.TEST if "panoptic_seg" in evaluation_tasks(cfg, n)]
    if needs_pq and importlib.util.find_spec("panopticapi") is None:
        raise SystemExit(f"train_net.py: {PANOPTICAPI_HINT} (needed for {needs_pq})")


def write_before_after(cfg: CfgNode, results: dict) -> tuple[str, str] | None:
    """Write the before/after tables of an --eval-only run to OUTPUT_DIR (Markdown + JSON).

    Returns:
        The two paths (``OUTPUT_DIR/crm_before_after.md`` and ``.json``), or None when the
        results hold no before/after pair (MODEL.CRM.EVAL_BOTH off).
    """
    if any(str(k).startswith("inner/") for k in results):  # one dataset: DefaultTrainer
        per_dataset = {cfg.DATASETS.TEST[0]: results}  # returns its results unwrapped
    else:
        per_dataset = dict(results)
    parts, payload = [], {}
    for dataset, merged in per_dataset.items():
        if not isinstance(merged, dict) or not any(str(k).startswith("inner/") for k in merged):
            continue
        inner = {k[len("inner/"):]: v for k, v in merged.items() if str(k).startswith("inner/")}
        refined = {k: v for k, v in merged.items() if "/" not in str(k)}
        payload[dataset] = {"before (inner model)": inner, "after (CRM-refined)": refined}
        parts.append(f"## {dataset}\n\n" + format_before_after(inner, refined).replace(
            "CRM before/after: ", "### "))
    if not payload:
        return None
    md = os.path.join(cfg.OUTPUT_DIR, "crm_before_after.md")
    js = os.path.join(cfg.OUTPUT_DIR, "crm_before_after.json")
    header = (
        "# CRM before/after (inner = the inner model's outputs, refined = after CRM, "
        "delta = refined - inner)\n\n"
        f"Inner model: {inner_arch(cfg)}; CRM weights: {cfg.MODEL.CRM.WEIGHTS or 'shipped'}\n\n"
    )
    write_text(md, header + "\n\n".join(parts) + "\n")
    write_json(js, payload, indent=1, allow_nan=True)
    logger.info("before/after tables written to %s and %s", md, js)
    return md, js

def evaluation_tasks(cfg: CfgNode, dataset_name: str) -> list[str]:
    """Tasks to evaluate: MODEL.CRM.EVALUATORS, else from the inner meta-architecture (else
    from the dataset's evaluator_type), restricted to what the dataset can evaluate."""
    meta = MetadataCatalog.get(dataset_name)
    explicit = list(cfg.MODEL.CRM.EVALUATORS)
    unknown = [t for t in explicit if t not in TASKS]
    if unknown:
        raise ValueError(f"MODEL.CRM.EVALUATORS has unknown tasks {unknown}; known: {TASKS}")
    if explicit:
        tasks = explicit
    elif inner_arch(cfg) in TASKS_BY_ARCH:
        tasks = list(TASKS_BY_ARCH[inner_arch(cfg)])
    else:
        kind = meta.get("evaluator_type", "")
        tasks = ["panoptic_seg", "segm"] if kind == "coco_panoptic_seg" else ["segm"]
    possible = {
        "panoptic_seg": bool(meta.get("panoptic_json", None)),
        "segm": bool(meta.get("json_file", None)),
        "entity": bool(meta.get("panoptic_json", None) or meta.get("json_file", None)),
        "sem_seg": bool(meta.get("stuff_classes", None)),
    }
    missing = [t for t in tasks if not possible[t]]
    if missing and explicit:
        raise ValueError(f"dataset {dataset_name!r} cannot evaluate {missing}: no ground truth")
    if missing:
        logger.warning("dataset %s cannot evaluate %s: skipped", dataset_name, missing)
    return [t for t in tasks if possible[t]]


def build_evaluator(cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
    """Evaluators of the chosen tasks; before/after pairs when MODEL.CRM.EVAL_BOTH."""
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    tasks = evaluation_tasks(cfg, dataset_name)
    if not tasks:
        raise NotImplementedError(f"no evaluation task for dataset {dataset_name!r}")

    def make(sub: str) -> DatasetEvaluators:
        out = os.path.join(output_folder, sub) if sub else output_folder
        evaluators = []
        for task in tasks:
            if task == "panoptic_seg":
                evaluators.append(COCOPanopticEvaluator(dataset_name, out))
            elif task == "segm":
                evaluators.append(COCOEvaluator(dataset_name, ("segm",), True, out))
            elif task == "entity":
                evaluators.append(EntityAPEvaluator(entity_gt_json(dataset_name, cache_dir(cfg))))
            elif task == "sem_seg":
                evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=out))
        return DatasetEvaluators(evaluators)

    wrapped = cfg.MODEL.META_ARCHITECTURE == CRMRefinedModel.__name__
    if wrapped and cfg.MODEL.CRM.EVAL_BOTH:
        return BeforeAfterEvaluator(make("inner"), make("refined"))
    return make("")


def _crm_model(model) -> CRMRefinedModel | None:
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model if isinstance(model, CRMRefinedModel) else None


class Trainer(DefaultTrainer):
    """DefaultTrainer with crm_d2's evaluators, test mapper and timing report."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        # the simulated inner model reads the ground truth from its inputs
        keep = inner_arch(cfg) == CoarseGTSimulator.__name__
        mapper = OriginalImageMapper(DatasetMapper(cfg, is_train=False), keep_annotations=keep)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        crm = _crm_model(model)
        if crm is not None:
            crm.reset_timing()
        results = super().test(cfg, model, evaluators)
        if crm is not None:
            crm.log_timing()
        return results


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if comm.is_main_process() and results:
            write_before_after(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = build_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
