"""The one set aggregator of per-object binary scores (pooled IoU, mean IoU, mBA, Boundary IoU).

Every set number of the project comes from :func:`summarize_objects`: the BIG evaluation
(:class:`~crm_d2.evaluation.binary.BinaryMetrics`), the training validation
(:func:`crm_d2.training.validation.validate`), crm-eval's per-object and BIG summaries
(``crm_d2/crm_eval/report.py``) and the held-out evaluation (``tools/eval_crm_heldout.py``).

The NaN rule (one rule for every metric and every caller):

* an empty set gives NaN for every metric (there is nothing to average);
* pooled IoU = sum of intersections / sum of unions; 1.0 when every union is 0 (every
  prediction and ground truth empty: nothing to disagree on, as for one object in
  :func:`~crm_d2.evaluation.binary.iou`);
* mean IoU and mean Boundary IoU are plain means (both are defined for every object);
* mBA is the mean over the objects whose mBA is defined. It is undefined (NaN) exactly for a
  constant ground truth, which has no boundary band (see
  :func:`~crm_d2.evaluation.binary.boundary_accuracy`); those objects are left out and counted
  in ``mba_undefined``; the set's mBA is NaN only when no object has a defined mBA.

The official CascadePSP evaluation would instead make the set's mBA NaN as soon as one object's is
(numpy 0 / 0). BIG has no constant ground truth, so its numbers are the same under both rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np

__all__ = ["ScoredObject", "pooled_iou", "summarize_objects"]


class ScoredObject(Protocol):
    """What the aggregator reads of one object (e.g. :class:`~crm_d2.evaluation.ObjectScores`)."""

    intersection: int
    union: int
    iou: float
    mba: float
    boundary_iou: float


def pooled_iou(intersection: int, union: int, count: int) -> float:
    """Set IoU of ``count`` objects whose intersections / unions sum to the given pixel counts.

    Returns:
        ``intersection / union``; 1.0 when ``union`` is 0; NaN when ``count`` is 0.
    """
    if count == 0:
        return math.nan
    return 1.0 if union == 0 else intersection / union


def summarize_objects(scores: Sequence[ScoredObject], prefix: str = "") -> dict[str, float]:
    """Set metrics of per-object scores, as fractions, under the module's NaN rule.

    Args:
        scores: one entry per object (:class:`~crm_d2.evaluation.ObjectScores` or anything with
            its five fields).
        prefix: prepended to every key (``"coarse_"`` ...).

    Returns:
        ``iou`` (pooled), ``mean_iou``, ``mba`` (over the objects with a defined mBA),
        ``boundary_iou``, ``num_objects`` and ``mba_undefined`` (objects left out of ``mba``),
        each key with ``prefix``.
    """
    n = len(scores)
    mba = [s.mba for s in scores if not math.isnan(s.mba)]
    inter = sum(s.intersection for s in scores)
    union = sum(s.union for s in scores)
    return {
        f"{prefix}iou": pooled_iou(inter, union, n),
        f"{prefix}mean_iou": float(np.mean([s.iou for s in scores])) if n else math.nan,
        f"{prefix}mba": float(np.mean(mba)) if mba else math.nan,
        f"{prefix}boundary_iou": (
            float(np.mean([s.boundary_iou for s in scores])) if n else math.nan
        ),
        f"{prefix}num_objects": float(n),
        f"{prefix}mba_undefined": float(n - len(mba)),
    }
