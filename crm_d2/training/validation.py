"""Validation during training: fixed held-out samples, their scores, the best result so far.

Shape shorthand: H, W = size of a full validation image.

Each validation image gets one fixed coarse mask of a rotating coarse kind
(:func:`make_val_samples`); :func:`validate` refines them all with the official multi-scale
schedule and reports IoU overall and per coarse kind, and mBA, through the project's one set
aggregator (:func:`~crm_d2.evaluation.aggregate.summarize_objects`). :class:`Validator` runs it
from the training loop, logs it and writes ``best.pth`` when the IoU gain improves.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..checkpoint import save_crm
from ..coarse import CoarseKind, parse_kinds
from ..evaluation.aggregate import summarize_objects
from ..evaluation.binary import object_scores
from ..inference import DEFAULT_SCALES, CRMRefiner
from ..modeling.crm import CRMNet
from .datasets import PairSource
from .state import plain

__all__ = ["BEST_NAME", "VAL_KINDS", "ValSample", "Validator", "make_val_samples", "validate"]

logger = logging.getLogger(__name__)

BEST_NAME = "best.pth"


@dataclass
class ValSample:
    """One full validation image with its ground truth and a fixed coarse mask.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        gt: (H, W) uint8 0..255 ground truth.
        coarse: (H, W) uint8 0..255 coarse mask (the refiner's input).
        name: sample name.
        perturb: the coarse kind that made ``coarse`` (a :class:`~crm_d2.coarse.CoarseKind`
            name, e.g. ``"stride8_binary"``).
    """

    image: np.ndarray
    gt: np.ndarray
    coarse: np.ndarray
    name: str
    perturb: str


VAL_KINDS = ("perturb", "stride8", "stride8_binary", "maskrcnn")


def make_val_samples(
    sources: Sequence[PairSource],
    seed: int = 0,
    max_per_source: int | None = None,
    kinds: Sequence[str] = VAL_KINDS,
) -> list[ValSample]:
    """Load held-out images and give each a fixed coarse mask (deterministic in ``seed``).

    Sample ``k`` gets the coarse kind ``kinds[k % len(kinds)]`` (see :mod:`crm_d2.coarse`),
    rendered from the ground truth binarised at 128 with ``np.random.default_rng([seed, k])``.
    Images whose ground truth is empty are skipped.

    Args:
        sources: pair sources (anything with ``__len__`` and ``load(idx)``).
        seed: seed of the random kinds.
        max_per_source: keep at most this many samples per source, evenly spaced (None = all).
        kinds: coarse kinds to rotate through.

    Returns:
        the samples, in source order.
    """
    parsed: tuple[CoarseKind, ...] = parse_kinds(list(kinds))
    if not parsed:
        raise ValueError("make_val_samples needs at least one coarse kind")
    entries = []
    for si, src in enumerate(sources):
        n = len(src)
        idx = range(n)
        if max_per_source is not None and n > max_per_source:
            idx = np.unique(np.linspace(0, n - 1, max_per_source).round().astype(int)).tolist()
        entries += [(si, int(i)) for i in idx]
    samples, empty = [], 0
    for k, (si, i) in enumerate(entries):
        image, mask, name = sources[si].load(i)
        fg = np.where(mask >= 128, 255, 0).astype(np.uint8)
        if not fg.any():
            empty += 1
            continue
        kind = parsed[k % len(parsed)]
        coarse = kind.render(fg, np.random.default_rng([seed, k]))
        samples.append(ValSample(image, mask, coarse, name, kind.name))
    if empty:
        logger.info("validation: skipped %d sample(s) with an empty ground truth", empty)
    return samples


@torch.no_grad()
def validate(
    model: CRMNet,
    samples: Sequence[ValSample],
    device: torch.device | str = "cpu",
    scales: Sequence[float] = DEFAULT_SCALES,
) -> dict[str, float]:
    """Refine every validation sample with a frozen copy of ``model`` and score it.

    Uses :meth:`CRMRefiner.refine` (the official multi-scale schedule at ``scales``) on an
    eval-mode copy, so ``model`` itself is untouched. Binary masks are ``prob > 0.5`` for the
    refined output and ``> 128`` (0..255) for the ground truth and the coarse input.

    Returns:
        ``iou_before`` / ``iou_after`` (pooled: sum of intersections / sum of unions),
        ``mba_before`` / ``mba_after`` (mean over samples, NaN bands skipped: the NaN rule of
        :mod:`crm_d2.evaluation.aggregate`), the ``*_gain`` differences, the same IoU numbers
        per coarse kind (``iou_after_stride8`` ...), ``num_samples`` (and per kind) and
        ``seconds``.
    """
    if not samples:
        raise ValueError("validate() needs at least one sample")
    start = time.perf_counter()
    # float32 everywhere: validation numbers do not depend on the machine's bf16 support
    refiner = CRMRefiner(copy.deepcopy(model).float(), device, scales=scales, autocast=None)
    rows = []
    for s in samples:
        prob = refiner.refine(s.image, s.coarse)
        rows.append((s.perturb, object_scores(s.coarse, s.gt), object_scores(prob > 0.5, s.gt)))
    out: dict[str, float] = {}
    groups = {"": rows}
    for kind in sorted({r[0] for r in rows}):
        groups[f"_{kind}"] = [r for r in rows if r[0] == kind]
    summaries = {}
    for suffix, group in groups.items():
        for when, col in (("before", 1), ("after", 2)):
            summaries[when, suffix] = summarize_objects([r[col] for r in group])
            out[f"iou_{when}{suffix}"] = summaries[when, suffix]["iou"]
        out[f"iou_gain{suffix}"] = out[f"iou_after{suffix}"] - out[f"iou_before{suffix}"]
        out[f"num_samples{suffix}"] = float(len(group))
    for when in ("before", "after"):
        out[f"mba_{when}"] = summaries[when, ""]["mba"]
    out["mba_gain"] = out["mba_after"] - out["mba_before"]
    out["seconds"] = time.perf_counter() - start
    return out


class Validator:
    """Validation inside the training loop (rank 0 validates; the others only keep count).

    Args:
        samples: the validation samples (empty = no validation and no ``best.pth``).
        device: where the frozen copy refines.
        scales: the refinement scales (also stored in ``best.pth``).
        best_path: where the best weights go.
        config: the run's configuration dict (recorded in ``best.pth``).
        enabled: False on every rank but 0.
        best: the best record of an earlier start (``{"iter", **validate()}``), or None.

    Attributes:
        best: the best record so far. last: the latest result. last_iter: its iteration (-1
            before the first call).
    """

    def __init__(
        self,
        samples: Sequence[ValSample],
        device: torch.device,
        scales: Sequence[float],
        best_path: str,
        config: dict[str, Any],
        enabled: bool,
        best: dict[str, Any] | None = None,
    ) -> None:
        self.samples, self.device, self.scales = list(samples), device, tuple(scales)
        self.best_path, self.config, self.enabled = best_path, config, enabled
        self.best = best
        self.last: dict[str, float] | None = None
        self.last_iter = -1

    def __call__(self, net: CRMNet, it: int) -> dict[str, float] | None:
        """Validate ``net`` at iteration ``it``; returns the result (None when not validating).

        A result whose IoU gain beats the best so far is written to ``best_path`` (float32
        weights without layer4, the validation scales, a ``training`` record).
        """
        self.last_iter = it
        if not self.enabled or not self.samples:
            return None
        res = validate(net, self.samples, self.device, self.scales)
        self.last = res
        logger.info(
            "val @%d: IoU %.4f -> %.4f (%+.4f), mBA %.4f -> %.4f (%+.4f), %d images, %.1fs",
            it,
            res["iou_before"],
            res["iou_after"],
            res["iou_gain"],
            res["mba_before"],
            res["mba_after"],
            res["mba_gain"],
            int(res["num_samples"]),
            res["seconds"],
        )
        if self.best is None or res["iou_gain"] > self.best["iou_gain"]:
            self.best = {"iter": it, **res}
            save_crm(
                net,
                self.best_path,
                half=False,
                drop_layer4=True,
                scales=self.scales,
                training=plain({"iteration": it, "val": res, "config": self.config}),
            )
            logger.info(
                "new best IoU gain %+.4f at iteration %d -> %s",
                res["iou_gain"],
                it,
                self.best_path,
            )
        return res
