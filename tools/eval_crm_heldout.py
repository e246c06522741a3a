#!/usr/bin/env python3
"""Measure refiners side by side on the images that ``tools/train_crm.py`` held out.

Pass the same ``--data`` specs, ``--val-fraction`` and ``--seed`` as the training run: the split
is a deterministic hash, so exactly the held-out images are evaluated. Every held-out object gets
one coarse mask of each ``--coarse`` kind (see :mod:`crm_d2.coarse`; random kinds are seeded per
object and kind), and every ``--refiner`` refines the same coarse masks:

* ``--refiner NAME=guided_filter`` (or ``guided_filter:R,EPS``): the training-free baseline;
* ``--refiner NAME=PATH``: CRM weights (the shipped file, the official ``model_45705``, a
  training run's ``model_final.pth`` ...).

For each kind, source and refiner it reports pooled IoU, mean IoU, mBA (CascadePSP's definition)
and Boundary IoU before -> after, and the share of objects whose IoU got worse; the "coarse" row
is the input itself. Writes ``heldout_eval.json`` and ``heldout_eval.md`` to ``--output``.

Example (the model card's table)::

    python tools/eval_crm_heldout.py --output /tmp/heldout \\
        --refiner guided=guided_filter --refiner new=crm_d2/weights/crm_d2_effl0.pth \\
        --data folder:DATA/duts_te --data folder:DATA/pascal_s \\
        --data folder:../shared/data/ecssd --data davis:../shared/data/davis \\
        --data coco:../shared/data/coco_tiny/annotations/instances_train2017.json:\\
../shared/data/coco_tiny/train2017
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from crm_d2 import CRMRefiner
from crm_d2.band import restrict_to_band
from crm_d2.cli.args import non_negative_int, probability
from crm_d2.coarse import CoarseKind, parse_kinds
from crm_d2.evaluation.binary import BinaryMetrics
from crm_d2.inference import check_guided_blend
from crm_d2.io import write_json, write_text
from crm_d2.refiners import load_refiner
from crm_d2.training.sources import build_source

logger = logging.getLogger("eval_crm_heldout")

DEFAULT_KINDS = "perturb+stride8+stride8_binary+maskrcnn"
COLUMNS = ("iou", "mean_iou", "mba", "boundary_iou")


def build_refiner(spec: str, device: str, scales: Sequence[float] | None,
                  min_side: int | None):
    """``guided_filter[:R,EPS]`` or a CRM checkpoint path -> a refiner of the factory."""
    if spec.startswith("guided_filter"):
        _, _, args = spec.partition(":")
        kwargs = {}
        if args:
            radius, eps = args.split(",")
            kwargs = {"radius": int(radius), "eps": float(eps)}
        return load_refiner("guided_filter", None, device, **kwargs)
    return load_refiner("crm", spec, device, scales=scales, min_side=min_side)


def flipped(refiner: CRMRefiner) -> CRMRefiner:
    """The same network and settings with flip test-time augmentation on."""
    out = copy.copy(refiner)
    out.flip = True
    return out


def blended(refiner: CRMRefiner, weight: float) -> CRMRefiner:
    """The same network and settings with the guided filter mixed in at ``weight``."""
    out = copy.copy(refiner)
    out.guided_blend = check_guided_blend(weight)
    return out


class BandRestricted:
    """A refiner whose changes are kept only within ``width`` px of the coarse boundary."""

    def __init__(self, refiner, width: int) -> None:
        self.refiner, self.width, self.scales = refiner, int(width), refiner.scales

    def refine(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        prob = torch.from_numpy(self.refiner.refine(image, mask))[None]
        coarse = torch.from_numpy(mask.astype(np.float32) / 255.0)[None]
        return restrict_to_band(coarse, prob, self.width)[0].numpy()


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` evenly spaced indices of ``range(n)`` (fewer where they round to the same one)."""
    return np.unique(np.linspace(0, n - 1, k).round().astype(int)).tolist()


def evaluate(refiners: dict, sources, kinds: Sequence[CoarseKind], seed: int = 0,
             max_per_source: int | None = None, exclude_per_source: int = 0) -> dict:
    """Refine every held-out object with every kind and refiner; returns the metrics dict.

    ``exclude_per_source=K`` first leaves out the K evenly spaced images that ``max_per_source=K``
    would take (a table's images), so that a setting can be chosen on the others.
    """
    names = ["coarse", *refiners]
    metrics = {(src, kind.name, r): BinaryMetrics()
               for src, _ in sources for kind in kinds for r in names}
    items = []
    for name, src in sources:
        idx = list(range(len(src)))
        if exclude_per_source:
            taken = set(evenly_spaced(len(idx), exclude_per_source))
            idx = [i for i in idx if i not in taken]
        if max_per_source is not None and len(idx) > max_per_source:
            idx = [idx[j] for j in evenly_spaced(len(idx), max_per_source)]
        items += [(name, src, int(i)) for i in idx]
    seconds = dict.fromkeys(refiners, 0.0)
    start = time.perf_counter()
    for k, (name, src, i) in enumerate(tqdm(items, desc="held-out", unit="img")):
        image, mask, _ = src.load(i)
        fg = np.where(mask >= 128, 255, 0).astype(np.uint8)
        if not fg.any():
            continue
        gt = fg > 127
        for ki, kind in enumerate(kinds):
            coarse = kind.render(fg, np.random.default_rng([seed, k, ki]))
            coarse_bin = coarse >= 128
            metrics[(name, kind.name, "coarse")].update(coarse_bin, gt, coarse_bin)
            for rname, refiner in refiners.items():
                t = time.perf_counter()
                prob = refiner.refine(image, coarse)
                seconds[rname] += time.perf_counter() - t
                metrics[(name, kind.name, rname)].update(prob > 0.5, gt, coarse_bin)
    out: dict = {"seconds": time.perf_counter() - start, "refiner_seconds": seconds,
                 "images": len(items), "refiners": names, "kinds": [k.name for k in kinds],
                 "by_source": {}, "all": {}}
    for kind in kinds:
        for r in names:
            pooled = BinaryMetrics()
            for name, _ in sources:
                m = metrics[(name, kind.name, r)]
                out["by_source"].setdefault(name, {}).setdefault(kind.name, {})[r] = (
                    m.summary() if len(m) else {})
                pooled.coarse += m.coarse
                pooled.refined += m.refined
            out["all"].setdefault(kind.name, {})[r] = pooled.summary() if len(pooled) else {}
    return out


def to_markdown(result: dict) -> str:
    """One table: rows = (kind, source, refiner), columns = the metrics before -> after."""
    lines = ["| coarse kind | source | refiner | objects | IoU | mean IoU | mBA | Boundary IoU "
             "| worse |", "|---|---|---|---|---|---|---|---|---|"]

    def row(kind: str, source: str, refiner: str, s: dict) -> str:
        if not s:
            return f"| {kind} | {source} | {refiner} | 0 | | | | | |"
        if refiner == "coarse":
            cells = [f"{100 * s['coarse_' + c]:.2f}" for c in COLUMNS]
            worse = ""
        else:
            cells = [f"{100 * s[c]:.2f} ({100 * (s[c] - s['coarse_' + c]):+.2f})"
                     for c in COLUMNS]
            worse = f"{100 * s['worse_fraction']:.1f}%"
        return (f"| {kind} | {source} | {refiner} | {int(s['num_objects'])} | "
                + " | ".join(cells) + f" | {worse} |")

    for kind in result["kinds"]:
        for r in result["refiners"]:
            lines.append(row(f"**{kind}**", "**all**", r, result["all"][kind][r]))
        for source, by_kind in result["by_source"].items():
            for r in result["refiners"]:
                lines.append(row(kind, source, r, by_kind[kind][r]))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--refiner", action="append", metavar="NAME=SPEC",
                    help="a refiner to measure, repeatable: NAME=guided_filter[:R,EPS] or "
                    "NAME=CRM_CHECKPOINT (default: guided=guided_filter and "
                    "shipped=the shipped weights)")
    ap.add_argument("--weights", default=None,
                    help="shorthand for --refiner crm=WEIGHTS (kept for old commands)")
    ap.add_argument("--data", action="append", required=True, metavar="KIND:PATH",
                    help="the training run's --data specs (repeatable)")
    ap.add_argument("--coarse", default=DEFAULT_KINDS,
                    help="coarse kinds joined by '+' (see crm_d2.coarse)")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0, help="the training run's split seed")
    ap.add_argument("--max-per-source", type=int, default=None,
                    help="at most N held-out images per source, evenly spaced")
    ap.add_argument("--exclude-per-source", type=non_negative_int, default=0, metavar="K",
                    help="leave out the K images per source that --max-per-source K takes (the "
                    "model card's table: K=10), e.g. to choose a setting on the others")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scales", type=float, nargs="+", default=None,
                    help="CRM refinement scales (default: the ones stored in each checkpoint)")
    ap.add_argument("--min-side", type=int, default=None,
                    help="CRM: skip scales whose encoder input is shorter than this")
    ap.add_argument("--band", type=int, nargs="+", default=(),
                    help="also measure each CRM refiner with its changes restricted to W px "
                    "around the coarse boundary (rows NAME|bandW)")
    ap.add_argument("--flip", action="store_true",
                    help="also measure each CRM refiner with flip test-time augmentation "
                    "(rows NAME|flip; the mirrored input refined too, the two maps averaged)")
    ap.add_argument("--guided-blend", type=probability, nargs="+", default=(), metavar="W",
                    help="also measure each CRM refiner (and its flip rows) with the guided filter "
                    "mixed in at weight W (rows NAME|blendW, NAME|flip|blendW; the NAME rows "
                    "use the checkpoint's own guided_blend)")
    ap.add_argument("--output", required=True, help="folder for heldout_eval.json / .md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    specs = list(args.refiner or [])
    if args.weights:
        specs.append(f"crm={args.weights}")
    if not specs:
        from crm_d2.weights import default_weights_path

        specs = ["guided=guided_filter", f"shipped={default_weights_path()}"]
    refiners = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name or not value or name == "coarse" or name in refiners:
            ap.error(f"--refiner {spec!r}: expected a new NAME=SPEC (NAME not 'coarse')")
        refiners[name] = build_refiner(value, args.device, args.scales, args.min_side)
    for name, refiner in list(refiners.items()):
        if isinstance(refiner, CRMRefiner):
            variants = {name: refiner}
            if args.flip:
                variants[f"{name}|flip"] = refiners[f"{name}|flip"] = flipped(refiner)
            for base, r in variants.items():
                for w in args.guided_blend:
                    refiners[f"{base}|blend{w:g}"] = blended(r, w)
            for width in args.band:
                refiners[f"{name}|band{width}"] = BandRestricted(refiner, width)
    try:
        kinds = parse_kinds(args.coarse)
    except ValueError as e:
        ap.error(str(e))
    sources = []
    for spec in args.data:
        kind, _train, val = build_source(spec, args.val_fraction, args.seed)
        name = f"{kind}:{os.path.basename(spec.split(':')[1].rstrip('/'))}"
        sources.append((name, val))
        logger.info("%s: %d held-out samples", name, len(val))
    result = evaluate(refiners, sources, kinds, args.seed, args.max_per_source,
                      args.exclude_per_source)
    result.update(refiner_specs=specs, data=args.data, val_fraction=args.val_fraction,
                  seed=args.seed, max_per_source=args.max_per_source,
                  exclude_per_source=args.exclude_per_source,
                  scales={n: list(r.scales) for n, r in refiners.items()},
                  min_side=args.min_side)
    os.makedirs(args.output, exist_ok=True)
    write_json(os.path.join(args.output, "heldout_eval.json"), result, indent=2, allow_nan=True)
    table = to_markdown(result)
    write_text(os.path.join(args.output, "heldout_eval.md"), table)
    logger.info("%d images in %.0f s (%s)\n%s", result["images"], result["seconds"],
                ", ".join(f"{n} {s:.0f} s" for n, s in result["refiner_seconds"].items()), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
