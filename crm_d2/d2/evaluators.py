"""detectron2 evaluators of crm_d2 (needs detectron2).

- :class:`EntityAPEvaluator`: class-agnostic COCO mask AP (EntitySeg's "entity AP").
- :class:`BeforeAfterEvaluator`: feeds the inner model's outputs (``"crm_inner"``) to one
  evaluator and the refined outputs to another and logs both with their difference
  (:func:`before_after_results`, :func:`format_before_after`).

The ground truth of entity AP comes from :func:`crm_d2.d2.data.entity_gt_json`.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BitMasks
from detectron2.utils import comm
from tabulate import tabulate

from ..evaluation import coco_mask_ap
from .meta_arch import INNER_KEY

__all__ = [
    "BeforeAfterEvaluator",
    "EntityAPEvaluator",
    "before_after_results",
    "format_before_after",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Evaluators
# --------------------------------------------------------------------------------------------
def _instance_masks_numpy(instances) -> np.ndarray:
    masks = instances.pred_masks
    if isinstance(masks, BitMasks):
        masks = masks.tensor
    if isinstance(masks, torch.Tensor):
        if masks.dtype.is_floating_point:
            masks = masks > 0.5
        return masks.bool().cpu().numpy()
    return np.zeros((0, *instances.image_size), dtype=bool)


class EntityAPEvaluator(DatasetEvaluator):
    """Class-agnostic COCO mask AP ("entity AP", EntitySeg) of ``output["instances"]``.

    Every prediction and every ground-truth segment count as one category
    (:func:`crm_d2.evaluation.coco_mask_ap` with ``class_agnostic=True``). Results go under the
    task ``"entity_segm"``.
    """

    def __init__(self, gt_json: str, distributed: bool = True) -> None:
        self._gt_json = gt_json
        self._distributed = distributed
        self._results: list[dict] = []

    def reset(self) -> None:
        self._results = []

    def process(self, inputs, outputs) -> None:
        from pycocotools import mask as mask_util

        for inp, out in zip(inputs, outputs, strict=True):
            if "instances" not in out:
                continue
            instances = out["instances"]
            if len(instances) == 0:
                continue
            masks = _instance_masks_numpy(instances)
            scores = instances.scores.detach().cpu().tolist()
            for mask, score in zip(masks, scores, strict=True):
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                self._results.append(
                    {
                        "image_id": inp["image_id"],
                        "category_id": 1,
                        "segmentation": rle,
                        "score": float(score),
                    }
                )

    def evaluate(self):
        results = self._results
        if self._distributed:
            comm.synchronize()
            results = list(itertools.chain(*comm.gather(results, dst=0)))
            if not comm.is_main_process():
                return None
        metrics = coco_mask_ap(self._gt_json, results, class_agnostic=True)
        return OrderedDict({"entity_segm": metrics})


def _copy_for_evaluation(output: Mapping) -> dict:
    """Copy one output dict so that evaluators that edit it (COCOPanopticEvaluator pops
    ``isthing`` from segments_info entries) cannot affect the other evaluation."""
    out = {k: v for k, v in output.items() if k != INNER_KEY}
    pan = out.get("panoptic_seg")
    if pan is not None and pan[1] is not None:
        out["panoptic_seg"] = (pan[0], [dict(s) for s in pan[1]])
    return out


def _numeric_items(metrics: Mapping) -> dict[str, float]:
    # As detectron2's print_csv_format: per-category metrics ("AP-person") are left out.
    return {
        k: float(v)
        for k, v in metrics.items()
        if "-" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def before_after_results(inner: Mapping, refined: Mapping) -> OrderedDict:
    """Merge two detectron2 result dicts: refined under its task names, the inner results
    under ``"inner/<task>"`` and ``refined - inner`` under ``"delta/<task>"``."""
    merged: OrderedDict = OrderedDict()
    for task, res in refined.items():
        merged[task] = res
    for task, res in inner.items():
        merged[f"inner/{task}"] = res
    for task in refined:
        if task in inner and isinstance(refined[task], Mapping):
            a, b = _numeric_items(inner[task]), _numeric_items(refined[task])
            merged[f"delta/{task}"] = {k: b[k] - a[k] for k in b if k in a}
    return merged


def format_before_after(inner: Mapping, refined: Mapping) -> str:
    """Tables of the inner and refined metrics and their difference, one per task.

    Each table has the columns ``metric | inner | refined | delta``; the title line is
    ``CRM before/after: <task>``.
    """
    parts = []
    for task in refined:
        if task not in inner or not isinstance(refined[task], Mapping):
            continue
        a, b = _numeric_items(inner[task]), _numeric_items(refined[task])
        rows = [[k, a[k], b[k], b[k] - a[k]] for k in b if k in a]
        table = tabulate(
            rows,
            headers=["metric", "inner", "refined", "delta"],
            tablefmt="pipe",
            floatfmt=".3f",
        )
        parts.append(f"CRM before/after: {task}\n{table}")
    return "\n".join(parts)


class BeforeAfterEvaluator(DatasetEvaluator):
    """Evaluate the inner model's and the refined outputs of one inference pass.

    The model must return the inner output under ``"crm_inner"`` (``MODEL.CRM.EVAL_BOTH``).
    ``inner`` receives those, ``refined`` the refined outputs (each a copy, see
    :func:`_copy_for_evaluation`). :meth:`evaluate` logs both evaluators' own tables, then a
    before/after table per task, and returns :func:`before_after_results`.
    """

    def __init__(self, inner: DatasetEvaluator, refined: DatasetEvaluator) -> None:
        self.inner = inner
        self.refined = refined

    def reset(self) -> None:
        self.inner.reset()
        self.refined.reset()

    def process(self, inputs, outputs) -> None:
        inner_outputs, refined_outputs = [], []
        for out in outputs:
            if INNER_KEY not in out:
                raise ValueError(
                    f"model output has no {INNER_KEY!r}: set MODEL.CRM.EVAL_BOTH True to "
                    "evaluate the inner model and the refined outputs in one run"
                )
            inner_outputs.append(_copy_for_evaluation(out[INNER_KEY]))
            refined_outputs.append(_copy_for_evaluation(out))
        self.inner.process(inputs, inner_outputs)
        self.refined.process(inputs, refined_outputs)

    def evaluate(self):
        logger.info("Evaluating the inner model's outputs (before CRM)")
        inner = self.inner.evaluate()
        logger.info("Evaluating the CRM-refined outputs")
        refined = self.refined.evaluate()
        if not comm.is_main_process() or inner is None or refined is None:
            return None
        logger.info("CRM before/after results:\n%s", format_before_after(inner, refined))
        return before_after_results(inner, refined)
