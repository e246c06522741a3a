#!/usr/bin/env python3
"""Band decoding vs dense decoding on held-out real images (issue 11's quality check).

Refines the held-out images of ``tools/train_crm.py``'s split (same ``--data`` specs, seed and
fraction) once with the dense grid decoder and once per band variant, and prints, per variant,
the agreement of its binary mask with the dense one (IoU and mBA of the variant's mask scored
against the dense mask: 1.0 = identical) and the refinement time. Coarse masks rotate through
``--coarse`` kinds (:mod:`crm_d2.coarse`).

Example (the shipped weights and their own scales)::

    python tools/band_vs_dense.py --per-source 6 \\
        --data davis:../shared/data/davis --data folder:../shared/data/ecssd \\
        --variant band= --variant grow2_halo64=grow:2,halo:64
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

from crm_d2.coarse import parse_kinds
from crm_d2.evaluation.binary import object_scores
from crm_d2.inference import CRMRefiner
from crm_d2.sparse import FastOptions
from crm_d2.training.sources import build_source

logger = logging.getLogger("band_vs_dense")


def _value(text: str):
    """A FastOptions value: ``none`` -> None, ``true``/``false``, a number (``inf``), else the
    text (``autocast:bf16``)."""
    low = text.strip().lower()
    if low == "none":
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return float(low) if "." in low or low == "inf" else int(low)
    except ValueError:
        return text.strip()


def parse_variant(spec: str) -> tuple[str, FastOptions]:
    """``NAME=[dense,]key:value,...`` -> options.

    FastOptions fields change :class:`FastOptions`'s defaults (nothing: ``FastOptions()``), or
    :meth:`FastOptions.dense`'s when the first item is ``dense`` (``NAME=dense,autocast:bf16``).
    """
    name, _, body = spec.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"variant {spec!r}: expected NAME=key:value,...")
    items = [item for item in body.split(",") if item]
    base = FastOptions()
    if items and items[0] == "dense":
        base, items = FastOptions.dense(), items[1:]
    kwargs = {}
    for item in items:
        key, _, value = item.partition(":")
        if key not in FastOptions.__dataclass_fields__:
            raise argparse.ArgumentTypeError(
                f"variant {spec!r}: {key!r} is not a FastOptions field"
            )
        kwargs[key] = _value(value)
    try:
        return name, base.with_(**kwargs)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"variant {spec!r}: {e}") from e


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None, help="CRM checkpoint (default: the shipped one)")
    ap.add_argument("--scales", type=float, nargs="+", default=None,
                    help="refinement scales (default: the checkpoint's)")
    ap.add_argument("--data", action="append", required=True, help="KIND:PATH, repeatable")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-source", type=int, default=6, help="held-out images per source")
    ap.add_argument("--coarse", default="stride8_binary+maskrcnn+perturb")
    ap.add_argument("--variant", action="append", type=parse_variant, required=True,
                    help="NAME=FIELD:VALUE,... of FastOptions (repeatable; NAME= is the default)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)

    variants = [("dense", FastOptions.dense()), *args.variant]
    refiners = {
        name: CRMRefiner.from_checkpoint(args.weights, "cpu", fast=opts, scales=args.scales,
                                          guided_blend=0.0)
        for name, opts in variants
    }
    kinds = parse_kinds(args.coarse.split("+"))
    scores: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in variants}
    vs_gt: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in variants}
    seconds = {name: 0.0 for name, _ in variants}
    k = 0
    for spec in args.data:
        _, _, held_out = build_source(spec, args.val_fraction, args.seed)
        n = min(args.per_source, len(held_out))
        for i in np.unique(np.linspace(0, len(held_out) - 1, n).round().astype(int)):
            image, mask, name = held_out.load(int(i))
            gt = np.where(mask >= 128, 255, 0).astype(np.uint8)
            kind = kinds[k % len(kinds)]
            coarse = kind.render(gt, np.random.default_rng([args.seed, k]))
            k += 1
            masks = {}
            for vname, refiner in refiners.items():
                start = time.perf_counter()
                masks[vname] = refiner.refine(image, coarse) > 0.5
                seconds[vname] += time.perf_counter() - start
            for vname in refiners:
                s = object_scores(masks[vname], masks["dense"])
                scores[vname].append((s.iou, s.mba))
                g = object_scores(masks[vname], gt >= 128)
                vs_gt[vname].append((g.iou, g.mba))
            agreement = "  ".join(
                f"{v} {scores[v][-1][0]:.4f}/{scores[v][-1][1]:.4f}"
                for v in refiners
                if v != "dense"
            )
            logger.info("%s %s %s: %s", spec, name, kind.name, agreement)
    print(f"{k} held-out images; agreement with the dense mask (IoU / mBA, 1 = identical)")
    print("and each variant's own scores against the ground truth (mean IoU / mBA in points, and "
          "their change vs dense)")
    print("| variant | mean IoU | min IoU | mean mBA | min mBA | IoU vs GT | mBA vs GT | seconds "
          "| speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    ref = 100 * np.nanmean(np.array(vs_gt["dense"]), axis=0)
    for vname, _ in variants:
        a = np.array(scores[vname])
        g = 100 * np.nanmean(np.array(vs_gt[vname]), axis=0)
        d = g - ref
        print(f"| {vname} | {a[:, 0].mean():.4f} | {a[:, 0].min():.4f} | {np.nanmean(a[:, 1]):.4f} "
              f"| {np.nanmin(a[:, 1]):.4f} | {g[0]:.2f} ({d[0]:+.2f}) | {g[1]:.2f} ({d[1]:+.2f}) "
              f"| {seconds[vname]:.1f} | {seconds['dense'] / seconds[vname]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
