#!/usr/bin/env python3
"""Measure a CRM checkpoint on the images that ``tools/train_crm.py`` held out.

Pass the same ``--data`` specs, ``--val-fraction`` and ``--seed`` as the training run: the split
is a deterministic hash, so exactly the held-out images are evaluated. Every held-out object is
given three coarse masks:

* ``perturb``: the paper's training perturbation (contour cut + vertex subsampling + random
  rectangle edits) at an IoU target drawn uniformly in [0.8, 1.0) (seeded per object);
* ``lowres8``: the ground truth rendered at 1/8 resolution (area average) and upsampled
  bilinearly, i.e. what a stride-8 network gives; CRM receives the soft map, the "before"
  numbers use it thresholded at 0.5;
* ``lowres8_binary``: the same map thresholded at 0.5 and given to CRM as a 0/255 mask, which
  is what detectron2 models return (same "before" numbers as ``lowres8``).

For each kind it reports, before and after refinement: pooled IoU, mean IoU, mBA (CascadePSP's
definition) and Boundary IoU, plus the share of objects whose IoU got worse. Writes
``heldout_eval.json`` and ``heldout_eval.md`` to ``--output``.

Example::

    python tools/eval_crm_heldout.py --weights crm_d2/weights/crm_d2_lite.pth \\
        --data folder:../shared/data/ecssd --data davis:../shared/data/davis \\
        --data coco:../shared/data/coco_tiny/annotations/instances_train2017.json:\\
../shared/data/coco_tiny/train2017 --output output/heldout
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from crm_d2 import CRMRefiner
from crm_d2.evaluation.binary import BinaryMetrics
from crm_d2.io import write_json, write_text
from crm_d2.training.perturb import lowres_perturb, perturb_mask, random_iou_target
from crm_d2.training.sources import build_source

logger = logging.getLogger("eval_crm_heldout")

KINDS = ("perturb", "lowres8", "lowres8_binary")
COLUMNS = ("iou", "mean_iou", "mba", "boundary_iou")


def coarse_mask(fg: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """(H, W) 0/255 ground truth -> (H, W) uint8 coarse mask of the given kind."""
    if kind == "perturb":
        return perturb_mask(fg, random_iou_target(rng), rng)
    if kind == "lowres8":
        return lowres_perturb(fg, 8)
    if kind == "lowres8_binary":
        return lowres_perturb(fg, 8, binary=True)
    raise ValueError(f"unknown coarse kind {kind!r}")


def evaluate(refiner: CRMRefiner, sources, seed: int = 0, limit: int | None = None) -> dict:
    """Refine every held-out object with both coarse kinds; returns the metrics dict."""
    metrics = {(src, kind): BinaryMetrics() for src, _ in sources for kind in KINDS}
    items = [(name, src, i) for name, src in sources for i in range(len(src))]
    if limit:
        items = items[:limit]
    start = time.perf_counter()
    for k, (name, src, i) in enumerate(tqdm(items, desc="held-out", unit="img")):
        image, mask, _ = src.load(i)
        fg = np.where(mask > 127, 255, 0).astype(np.uint8)
        if not fg.any():
            continue
        for kind in KINDS:
            rng = np.random.default_rng([seed, k, KINDS.index(kind)])
            coarse = coarse_mask(fg, kind, rng)
            prob = refiner.refine(image, coarse)
            metrics[(name, kind)].update(prob > 0.5, fg > 127, coarse >= 128)
    seconds = time.perf_counter() - start
    out: dict = {"seconds": seconds, "images": len(items), "by_source": {}, "all": {}}
    for kind in KINDS:
        pooled = BinaryMetrics()
        for name, _ in sources:
            m = metrics[(name, kind)]
            out["by_source"].setdefault(name, {})[kind] = m.summary() if len(m) else {}
            pooled.coarse += m.coarse
            pooled.refined += m.refined
        out["all"][kind] = pooled.summary() if len(pooled) else {}
    return out


def to_markdown(result: dict) -> str:
    lines = ["| coarse masks | objects | IoU before -> after | mean IoU | mBA | Boundary IoU "
             "| worse |", "|---|---|---|---|---|---|---|"]

    def row(label: str, s: dict) -> str:
        if not s:
            return f"| {label} | 0 | | | | | |"
        cells = [f"{100 * s['coarse_' + c]:.2f} -> {100 * s[c]:.2f}" for c in COLUMNS]
        return (f"| {label} | {int(s['num_objects'])} | " + " | ".join(cells)
                + f" | {100 * s['worse_fraction']:.1f}% |")

    for kind in KINDS:
        lines.append(row(f"**{kind}, all**", result["all"][kind]))
        for name, by_kind in result["by_source"].items():
            lines.append(row(f"{kind}, {name}", by_kind[kind]))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True, help="CRM checkpoint to evaluate")
    ap.add_argument("--data", action="append", required=True, metavar="KIND:PATH",
                    help="the training run's --data specs (repeatable)")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0, help="the training run's split seed")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scales", type=float, nargs="+", default=None,
                    help="refinement scales (default: the ones stored in the checkpoint)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    ap.add_argument("--output", default="output/heldout_eval")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    sources = []
    for spec in args.data:
        kind, _train, val = build_source(spec, args.val_fraction, args.seed)
        name = f"{kind}:{os.path.basename(spec.split(':')[1].rstrip('/'))}"
        sources.append((name, val))
        logger.info("%s: %d held-out samples", name, len(val))
    refiner = CRMRefiner.from_checkpoint(args.weights, args.device, scales=args.scales)
    result = evaluate(refiner, sources, args.seed, args.limit)
    result.update(weights=os.path.abspath(args.weights), scales=list(refiner.scales),
                  data=args.data,
                  val_fraction=args.val_fraction, seed=args.seed)
    os.makedirs(args.output, exist_ok=True)
    write_json(os.path.join(args.output, "heldout_eval.json"), result, indent=2, allow_nan=True)
    table = to_markdown(result)
    write_text(os.path.join(args.output, "heldout_eval.md"), table)
    logger.info("%d images in %.0f s\n%s", result["images"], result["seconds"], table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
