#!/usr/bin/env python3
"""Export a training checkpoint as release weights: float16, no layer4, inference settings.

``tools/train_crm.py`` writes ``best.pth`` / ``last.pth`` (full precision, with the training
state); this writes the project format that ``CRMRefiner.from_checkpoint`` reads, with the
inference scales (and the optional ROI-size rule ``min_side`` and guided-filter blend
``guided_blend``, :class:`crm_d2.CRMRefiner`) stored so the file refines as it was measured,
the training record kept, and a free-text ``history`` line appended::

    python3 tools/export_weights.py RUN/best.pth crm_d2/weights/crm_d2_effnet_lite0.pth \\
        --scales 1.0 --note "stage 1: 3000 iterations from ImageNet"
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from crm_d2.checkpoint import load_crm, save_crm
from crm_d2.cli.args import probability

logger = logging.getLogger("export_weights")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a best.pth / last.pth / model_final.pth of a training run")
    p.add_argument("output", help="the release file to write")
    p.add_argument("--scales", type=float, nargs="+", default=None,
                   help="inference scales to store (default: the checkpoint's)")
    p.add_argument("--min-side", type=int, default=None,
                   help="store the ROI-size rule: skip scales whose input is shorter than this")
    p.add_argument("--guided-blend", type=probability, default=None, metavar="W",
                   help="store the weight of the guided filter mixed into the output "
                   "(default: the checkpoint's, if any)")
    p.add_argument("--note", default=None, help="appended to the training history")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    model, meta = load_crm(args.checkpoint)
    scales = list(args.scales) if args.scales else meta.get("scales")
    if not scales:
        p.error(f"{args.checkpoint} stores no inference scales: pass --scales")
    training = dict(meta.get("training") or {})
    if not training and "train_state" in meta:
        training = {"iterations": meta["train_state"].get("iteration")}
    if args.note:
        training["history"] = " ".join(x for x in (training.get("history"), args.note) if x)
    extra = {"min_side": args.min_side} if args.min_side else {}
    blend = meta.get("guided_blend") if args.guided_blend is None else args.guided_blend
    if blend is not None:
        extra["guided_blend"] = float(blend)
    save_crm(model, args.output, half=True, scales=[float(s) for s in scales],
             training=training, **extra)
    logger.info("wrote %s (scales %s%s%s)", args.output, scales,
                f", min_side {args.min_side}" if args.min_side else "",
                "" if blend is None else f", guided_blend {float(blend):g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
