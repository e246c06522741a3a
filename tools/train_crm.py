#!/usr/bin/env python3
"""Train a CRM refinement network (the paper's recipe by default) on image/mask data.

Data sources are repeatable ``--data KIND:PATH`` options:

* ``folder:DIR``: any layout :func:`crm_d2.training.datasets.list_image_mask_pairs` knows
  (ECSSD ``images/`` + ``masks/``, DUTS ``*-Image/`` + ``*-Mask/``, side-by-side ``.jpg`` +
  ``.png``, FSS-1000 class folders, ...); split image by image;
* ``davis:ROOT``: DAVIS-style ``<sequence>/NNNNN.jpg`` + ``.png`` (or ``JPEGImages/480p`` +
  ``Annotations/480p``); split by sequence, so no video is in both splits;
* ``coco:JSON:IMAGEDIR``: one sample per non-crowd COCO instance (a box crop with context);
  split by image, so no image is in both splits.

``--val-fraction`` of each source is held out (a deterministic hash split); each held-out image
gets one fixed coarse mask (``--val-coarse`` kinds in rotation) and the model is validated on
them every ``--val-every`` iterations. Use ``torchrun --nproc_per_node N tools/train_crm.py ...``
for data parallel training.

Example (CPU, the light encoder)::

    python tools/train_crm.py --preset lite --crop 224 --batch-size 12 --iters 45000 \\
        --data folder:../shared/data/ecssd --data davis:../shared/data/davis \\
        --data coco:../shared/data/coco_tiny/annotations/instances_train2017.json:\\
../shared/data/coco_tiny/images --output output/crm_lite
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

from crm_d2.cli.args import (
    float_list,
    float_range,
    int_list,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from crm_d2.coarse import CoarseMix
from crm_d2.training.sources import build_source

logger = logging.getLogger("train_crm")


def _coarse(text: str) -> str:
    try:
        return CoarseMix.parse(text).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_lr_mult(items: Sequence[str]) -> dict[str, float]:
    """``["pixel_skip=10", ...]`` -> ``{"pixel_skip": 10.0}``."""
    out = {}
    for item in items:
        prefix, _, text = item.partition("=")
        try:
            factor = float(text)
        except ValueError:
            factor = float("nan")
        if not prefix or not 0 < factor < float("inf"):
            raise SystemExit(f"--lr-mult wants PREFIX=FACTOR (e.g. pixel_skip=10), got {item!r}")
        out[prefix] = factor
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="KIND:PATH",
        help="training source, repeatable: folder:DIR, davis:ROOT, coco:JSON:IMAGEDIR",
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="share of each source held out for validation",
    )
    g.add_argument(
        "--val-max-per-source",
        type=int,
        default=32,
        help="validate on at most this many held-out images per source",
    )
    g.add_argument(
        "--coarse",
        type=_coarse,
        default="perturb",
        help="coarse masks of the training crops (paper: perturb), kinds of crm_d2.coarse "
        "joined by '+' (one drawn per sample, optional weights kind*W), e.g. "
        "'perturb+stride8_binary*2+maskrcnn+stride8_t0.4'",
    )
    g.add_argument(
        "--val-coarse",
        default="perturb+stride8+stride8_binary+maskrcnn",
        help="coarse kinds of the validation images (one per image, in rotation)",
    )
    g.add_argument(
        "--scale-range",
        type=float_range,
        default=(1.0, 1.0),
        metavar="LO,HI",
        help="random resize of each training image by a factor in [LO, HI] before the crop "
        "(not in the paper; e.g. '0.25,1' to train for the coarse-to-fine scales)",
    )
    g = p.add_argument_group("model and schedule")
    g.add_argument(
        "--preset",
        choices=("official", "lite", "tiny", "effnet_lite0", "effnet_lite1"),
        default="official",
        help="architecture: official = ResNet-50 CRM, lite = ResNet-18-like encoder "
        "with 128-channel features, tiny = half of lite, effnet_lite0/1 = EfficientNet-Lite "
        "encoder (use --init imagenet)",
    )
    g.add_argument(
        "--pixel-skip",
        action="store_true",
        help="the decoder also reads the image and mask at each query pixel, through a "
        "zero-initialised linear map (crm_d2's CRMArch.pixel_skip, not in the paper); "
        "with --init from a plain CRM the network starts as that CRM",
    )
    g.add_argument(
        "--guided-skip",
        action="store_true",
        help="with --pixel-skip: the skip also reads the guided filter of the coarse mask "
        "(crm_d2's CRMArch.guided_skip, not in the paper); its weights start at zero, so "
        "with --init from a pixel-skip CRM the network starts as that CRM",
    )
    g.add_argument(
        "--lr-mult",
        action="append",
        default=[],
        metavar="PREFIX=FACTOR",
        help="train the parameters whose names start with PREFIX at lr x FACTOR (repeatable), "
        "e.g. pixel_skip=10 for the zero-initialised skip on trained weights",
    )
    g.add_argument("--iters", type=positive_int, default=45_000, help="iterations (paper 45,000)")
    g.add_argument("--batch-size", type=positive_int, default=12, help="global batch (paper 12)")
    g.add_argument("--crop", type=positive_int, default=224, help="crop size (paper 224)")
    g.add_argument("--lr", type=positive_float, default=2.25e-4, help="Adam learning rate")
    g.add_argument("--weight-decay", type=non_negative_float, default=1e-4)
    g.add_argument(
        "--milestones",
        type=int_list,
        default=None,
        help="lr x0.1 iterations, e.g. '22500,37500' (default: the paper's, scaled to --iters)",
    )
    g.add_argument(
        "--loss-weights",
        type=float_list,
        default=(1.0, 0.5, 0.5, 2.0),
        metavar="CE,L1,L2,GRAD",
        help="loss term weights",
    )
    g.add_argument(
        "--boundary-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="extra weight of the CE/L1/L2 terms within 4 px of the ground-truth boundary "
        "(crm_d2.training.losses; 0 = the paper's loss)",
    )
    g.add_argument(
        "--amp",
        choices=("none", "bf16", "fp16"),
        default="none",
        help="encoder autocast (CUDA only)",
    )
    g.add_argument(
        "--init",
        default="scratch",
        help="'scratch', 'imagenet' (effnet presets: ImageNet trunk from the [train] extra; "
        "'imagenet:PATH' for a file) or a checkpoint to fine-tune from (official model_45705 "
        "or a crm_d2 file); non-matching tensors are skipped and listed",
    )
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--output", default="output/crm_train", help="output directory")
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="LAST_PTH",
        help="continue from OUTPUT/last.pth (or the given file)",
    )
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--threads", type=positive_int, default=None, help="torch threads per process")
    g.add_argument(
        "--num-workers", type=non_negative_int, default=2, help="data loader workers per process"
    )
    g.add_argument("--log-every", type=positive_int, default=20)
    g.add_argument(
        "--val-every", type=non_negative_int, default=2000, help="0 = validate at the end only"
    )
    g.add_argument("--ckpt-every", type=positive_int, default=1000)
    g.add_argument(
        "--time-limit",
        type=positive_float,
        default=None,
        metavar="MIN",
        help="stop after this many minutes of training (validate, save and export as at the "
        "end; --resume continues): for machines lent for a fixed time",
    )
    g.add_argument(
        "--val-scales",
        type=float_list,
        default=(0.125, 0.25, 0.5, 1.0),
        help="refinement scales used by validation (fewer = cheaper)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from crm_d2.training.config import resolve_arch
    from crm_d2.training.datasets import CRMTrainDataset
    from crm_d2.training.trainer import TrainConfig, make_val_samples, train

    if len(args.loss_weights) != 4:
        raise SystemExit("--loss-weights needs 4 numbers: CE,L1,L2,GRAD")
    if args.guided_skip and not args.pixel_skip:
        raise SystemExit("--guided-skip is a fifth input of the pixel skip: add --pixel-skip")
    cfg = TrainConfig(
        arch=(dataclasses.replace(resolve_arch(args.preset), pixel_skip=True,
                                  guided_skip=args.guided_skip)
              if args.pixel_skip else args.preset),
        crop_size=args.crop,
        batch_size=args.batch_size,
        iterations=args.iters,
        lr=args.lr,
        lr_mult=parse_lr_mult(args.lr_mult),
        weight_decay=args.weight_decay,
        milestones=args.milestones,
        loss_weights={**dict(zip(("ce", "l1", "l2", "grad"), args.loss_weights)),
                      "boundary": args.boundary_weight},
        num_workers=args.num_workers,
        seed=args.seed,
        log_every=args.log_every,
        val_every=args.val_every,
        ckpt_every=args.ckpt_every,
        val_scales=args.val_scales,
        amp=args.amp,
        init=args.init,
        resume=args.resume,
        output_dir=args.output,
        device=args.device,
        threads=args.threads,
        data=tuple(args.data),
        time_limit_min=args.time_limit,
    )
    train_sets, val_sources, rows = [], [], []
    for i, spec in enumerate(args.data):
        kind, train_src, val_src = build_source(spec, args.val_fraction, args.seed)
        train_sets.append(
            CRMTrainDataset(
                train_src,
                crop_size=args.crop,
                coarse=args.coarse,
                seed=args.seed * 1000 + i,
                scale_range=args.scale_range,
            )
        )
        val_sources.append(val_src)
        rows.append((spec, kind, len(train_src), len(val_src)))
    val_samples = []
    if rank == 0 and args.val_fraction > 0:
        val_samples = make_val_samples(
            val_sources,
            seed=args.seed,
            max_per_source=args.val_max_per_source,
            kinds=args.val_coarse.split("+"),
        )
    if rank == 0:
        print(f"{'kind':<6}  {'train':>7}  {'held out':>8}  source")
        for spec, kind, n_train, n_val in rows:
            print(f"{kind:<6}  {n_train:>7}  {n_val:>8}  {spec}")
        counts = collections.Counter(s.perturb for s in val_samples)
        print(
            f"total: {sum(r[2] for r in rows)} training samples; {len(val_samples)} validation "
            "images (" + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ")"
        )
        sys.stdout.flush()
    cfg = dataclasses.replace(
        cfg, data=tuple(f"{spec} (train {a}, held out {b})" for spec, _, a, b in rows)
    )
    path = train(cfg, train_sets, val_samples)
    if rank == 0:
        print(f"final weights: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
