"""``crm-eval``: refine a whole prediction set with CRM and report metrics before and after.

Examples::

    # instance predictions of a detector (detectron2's coco_instances_results.json)
    crm-eval --weights model_45705 --output out/ --coco-instances instances_val2017.json \\
        --images val2017/ --predictions coco_instances_results.json

    # no detector at hand: coarse masks rendered from the ground truth at 1/8 resolution
    crm-eval --weights model_45705 --output out/ --coco-instances instances_val2017.json \\
        --images val2017/ --coarse-from-gt stride8_binary --limit 500

    # panoptic predictions, and a BIG-layout folder
    crm-eval --weights W --output out/ --coco-panoptic panoptic_val2017.json \\
        --panoptic-dir panoptic_val2017/ --images val2017/ --pred-json pred.json --pred-dir pred/
    crm-eval --weights W --output out/ --big BIG/test/

    # the same with CascadePSP (its released file 'model') instead of CRM
    crm-eval --refiner cascadepsp --weights model --output out/ --big BIG/test/

    # several processes (GPUs or CPU), one or several nodes sharing the output folder
    torchrun --nproc_per_node 4 -m crm_d2.cli.eval --device cuda --weights W --output out/ ...
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from crm_d2.cli.args import (
    AUTOCAST_CHOICES,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from crm_d2.options import CRM_EVAL_DEFAULTS

logger = logging.getLogger("crm_d2.eval")

_EXCLUSIVE = {"auto": None, "true": True, "false": False}
_VOID_ID = {"auto": None, "0": 0, "-1": -1}


def _choice_of(choices: dict, value) -> str:
    """The command-line spelling of a default value."""
    return next(k for k, v in choices.items() if v is value or v == value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crm-eval",
        description="Refine every predicted segment of a dataset with CRM, write the refined "
        "predictions in the input's format, and report metrics before and after.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    w = p.add_argument_group("model")
    w.add_argument(
        "--refiner",
        choices=("crm", "cascadepsp", "guided_filter"),
        default="crm",
        help="refiner (CascadePSP: the released file 'model' as --weights; guided_filter: the "
        "training-free baseline, no weights; --scales and --chunk-size are CRM options)",
    )
    w.add_argument(
        "--weights",
        default=None,
        help="CRM checkpoint (official model_45705 or a crm_d2 checkpoint); default: "
        "the weights shipped with crm_d2, if any",
    )
    w.add_argument(
        "--random-weights",
        nargs="?",
        const="official",
        default=None,
        choices=("official", "tiny"),
        help="use an UNTRAINED network of this architecture instead of weights "
        "(speed and plumbing checks only: the numbers are meaningless)",
    )
    w.add_argument("--device", default="cpu", help="torch device (cuda = cuda:LOCAL_RANK)")
    w.add_argument(
        "--scales",
        type=positive_float,
        nargs="+",
        default=None,
        help="CRM input scales, coarse to fine (default: the checkpoint's)",
    )
    w.add_argument("--chunk-size", type=positive_int, default=None, help="decoder queries per call")
    w.add_argument("--autocast", choices=AUTOCAST_CHOICES, default=None,
                   help="CRM precision: auto (the default: the encoder's fusion in bf16 on large "
                        "inputs where the device computes it natively), none (float32), bf16, "
                        "fp16")
    w.add_argument("--flip", action="store_true",
                   help="CRM test-time augmentation: also refine the mirrored input and average "
                        "(twice the time; fewer objects made worse on held-out binary masks, "
                        "crm_d2/weights/MODEL_CARD.md)")
    w.add_argument("--guided-blend", type=probability, default=None, metavar="W",
                   help="CRM: weight W of the guided filter of the coarse mask in the output, "
                        "(1 - W) CRM + W guided (default: the checkpoint's; the shipped file's "
                        "is in crm_d2/weights/MODEL_CARD.md; 0 = CRM alone)")

    i = p.add_argument_group("input (one of --coco-instances, --coco-panoptic, --big)")
    mode = i.add_mutually_exclusive_group(required=True)
    mode.add_argument("--coco-instances", metavar="JSON", help="COCO instance ground truth")
    mode.add_argument("--coco-panoptic", metavar="JSON", help="COCO panoptic ground truth")
    mode.add_argument(
        "--big",
        metavar="DIR",
        help="folder in the BIG / CascadePSP layout (NAME_im.jpg, NAME_seg.png, NAME_gt.png)",
    )
    i.add_argument("--images", metavar="DIR", help="image folder (COCO layouts)")
    i.add_argument(
        "--predictions",
        metavar="JSON",
        help="instance results with RLE masks (detectron2's coco_instances_results.json)",
    )
    i.add_argument("--panoptic-dir", metavar="DIR", help="ground-truth panoptic PNG folder")
    i.add_argument("--pred-json", metavar="JSON", help="panoptic prediction JSON")
    i.add_argument("--pred-dir", metavar="DIR", help="panoptic prediction PNG folder")
    i.add_argument(
        "--coarse-from-gt",
        metavar="SPEC",
        help="make the coarse predictions from the ground truth, with a kind of "
        "crm_d2.coarse: stride<K> (render at 1/K and upsample bilinearly, soft), "
        "stride<K>_binary, stride<K>_t<T>, maskrcnn (28x28 in the box, pasted), perturb or "
        "perturb:LO-HI (CRM's training perturbation), shift, dilate",
    )
    i.add_argument(
        "--soft-coarse",
        action="store_true",
        help="with a soft kind (stride<K>), CRM receives the soft upsampled map (the "
        "binary coarse mask is its > 0.5 part)",
    )
    i.add_argument(
        "--as-panoptic",
        action="store_true",
        help="evaluate a COCO instance set as things-only panoptic (PQ): instances "
        "painted in decreasing area order, smaller objects on top",
    )
    i.add_argument("--seed", type=int, default=0, help="seed of perturb and random weights")
    i.add_argument("--limit", type=positive_int, default=None, help="only the first N images")

    r = p.add_argument_group("refinement")
    r.add_argument(
        "--expand-ratio",
        type=non_negative_float,
        default=CRM_EVAL_DEFAULTS.expand_ratio,
        help="ROI = mask box grown by this fraction of its size (a large value, "
        "e.g. 100, refines on the whole image like the official BIG test)",
    )
    r.add_argument(
        "--min-area",
        type=non_negative_int,
        default=CRM_EVAL_DEFAULTS.min_area,
        help="segments of at most this many pixels are kept unchanged",
    )
    r.add_argument(
        "--batch-size",
        type=positive_int,
        default=CRM_EVAL_DEFAULTS.batch_size,
        help="same-size ROIs per CRM call",
    )
    r.add_argument(
        "--size-multiple",
        type=positive_int,
        default=CRM_EVAL_DEFAULTS.size_multiple,
        help="round ROI sizes up to a multiple of this (more batching)",
    )
    r.add_argument(
        "--max-side",
        type=positive_int,
        default=CRM_EVAL_DEFAULTS.max_side,
        help="refine images larger than this (longer side, px) at reduced size, "
        "for speed; outputs and metrics stay at full resolution",
    )
    f = p.add_argument_group("fusion (the modified argmax, crm_d2.fusion)")
    f.add_argument(
        "--stuff-factor",
        type=non_negative_float,
        default=CRM_EVAL_DEFAULTS.stuff_factor,
        help="panoptic: stuff probabilities are multiplied by this before the fusion",
    )
    f.add_argument(
        "--init-confidence",
        type=probability,
        default=CRM_EVAL_DEFAULTS.init_confidence,
        help="confidence of the coarse labels in the fusion",
    )
    f.add_argument(
        "--exclusive",
        choices=tuple(_EXCLUSIVE),
        default=_choice_of(_EXCLUSIVE, CRM_EVAL_DEFAULTS.exclusive),
        help="instances: true = modified argmax (masks stay disjoint), false = each refined "
        "mask replaces its coarse mask in its ROI, auto = true when an image's coarse masks do "
        "not overlap (the detectron2 layer's default)",
    )
    f.add_argument(
        "--void-id",
        choices=tuple(_VOID_ID),
        default=_choice_of(_VOID_ID, CRM_EVAL_DEFAULTS.void_id),
        help="panoptic void id; auto = -1 if some segment has id 0, else 0",
    )
    f.add_argument(
        "--score-reweight",
        action="store_true",
        default=CRM_EVAL_DEFAULTS.score_reweight,
        help="instances: multiply each refined score by the mean refined probability inside "
        "its new mask",
    )

    o = p.add_argument_group("output")
    o.add_argument("--output", required=True, metavar="DIR", help="output folder")
    o.add_argument(
        "--overlays",
        type=non_negative_int,
        default=8,
        help="before/after pictures of the N most improved and N most degraded objects",
    )
    o.add_argument(
        "--overwrite",
        action="store_true",
        help="discard cached per-image results in the output folder",
    )
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _fail(message: str) -> SystemExit:
    return SystemExit(f"crm-eval: {message}")


def _inputs(args: argparse.Namespace):
    """The input format of the options (the one place that chooses it)."""
    from crm_d2.crm_eval.formats import BigFormat, InstancesFormat, PanopticFormat

    if not args.big and not args.images:
        raise _fail("--images DIR is needed with --coco-instances / --coco-panoptic")
    if args.coco_panoptic and not args.panoptic_dir:
        raise _fail("--panoptic-dir DIR (the ground-truth PNGs) is needed with --coco-panoptic")
    if not args.coco_panoptic and (args.pred_json or args.pred_dir):
        raise _fail(
            "--pred-json/--pred-dir are panoptic predictions: use --predictions with "
            "--coco-instances"
        )
    if not args.coco_instances and args.predictions:
        raise _fail(
            "--predictions is for --coco-instances (use --pred-json/--pred-dir for panoptic)"
        )
    unused = [
        k
        for k, v, used in (
            ("--images", args.images, not args.big),
            ("--panoptic-dir", args.panoptic_dir, args.coco_panoptic),
        )
        if v and not used
    ]
    if unused:
        raise _fail(f"{', '.join(unused)}: not an option of this input layout")
    if args.big:
        if args.as_panoptic:  # --coarse-from-gt is refused by BigFormat.check
            raise _fail(
                "the BIG layout brings its own coarse masks: no --coarse-from-gt or --as-panoptic"
            )
        return BigFormat(args.big)
    if args.coco_panoptic:
        if args.as_panoptic:
            raise _fail("--as-panoptic converts a COCO instance set: use it with --coco-instances")
        return PanopticFormat(
            images=args.images,
            coco_panoptic=args.coco_panoptic,
            panoptic_dir=args.panoptic_dir,
            pred_json=args.pred_json,
            pred_dir=args.pred_dir,
        )
    if args.as_panoptic:
        return PanopticFormat.from_instances(args.coco_instances, args.images, args.predictions)
    return InstancesFormat(args.coco_instances, args.images, args.predictions)


def _config(args: argparse.Namespace):
    import dataclasses

    from crm_d2.crm_eval import CoarseSpec, EvalConfig

    inputs = _inputs(args)
    try:
        coarse = (
            CoarseSpec.parse(args.coarse_from_gt, seed=args.seed) if args.coarse_from_gt else None
        )
        settings = dataclasses.replace(
            CRM_EVAL_DEFAULTS,
            expand_ratio=args.expand_ratio,
            min_area=args.min_area,
            batch_size=args.batch_size,
            size_multiple=args.size_multiple,
            scales=tuple(args.scales) if args.scales else None,
            max_side=args.max_side,
            stuff_factor=args.stuff_factor,
            init_confidence=args.init_confidence,
            exclusive=_EXCLUSIVE[args.exclusive],
            void_id=_VOID_ID[args.void_id],
            score_reweight=args.score_reweight,
        )
        return EvalConfig(
            output=args.output,
            inputs=inputs,
            coarse=coarse,
            soft_coarse=args.soft_coarse,
            limit=args.limit,
            settings=settings,
            overlays=args.overlays,
            overwrite=args.overwrite,
            quiet=args.quiet,
            random_weights=args.random_weights is not None,
        )
    except ValueError as e:
        raise _fail(str(e)) from e


def _cascadepsp_refiner(args: argparse.Namespace, device: str):
    import torch

    from crm_d2 import CascadePSPRefiner
    from crm_d2.checkpoint import CASCADEPSP_HINT, CheckpointError
    from crm_d2.modeling.cascadepsp import (
        CASCADEPSP_ARCH,
        CASCADEPSP_TINY_ARCH,
        CascadePSPNet,
    )

    crm_only = [k for k, v in (("--scales", args.scales), ("--chunk-size", args.chunk_size),
                               ("--autocast", args.autocast), ("--flip", args.flip),
                               ("--guided-blend", args.guided_blend is not None)) if v]
    if crm_only:
        raise _fail(f"{', '.join(crm_only)}: CRM option(s), not for --refiner cascadepsp")
    if args.random_weights is not None:
        if args.weights:
            raise _fail("--weights and --random-weights exclude each other")
        torch.manual_seed(args.seed)
        arch = CASCADEPSP_ARCH if args.random_weights == "official" else CASCADEPSP_TINY_ARCH
        desc = f"RANDOM CascadePSP ({args.random_weights} architecture, seed {args.seed})"
        return CascadePSPRefiner(CascadePSPNet(arch), device), desc
    if not args.weights:
        raise _fail(f"no CascadePSP weights: pass --weights PATH. {CASCADEPSP_HINT}")
    try:
        return CascadePSPRefiner.from_checkpoint(args.weights, device), args.weights
    except CheckpointError as e:
        raise _fail(str(e)) from e


def _refiner(args: argparse.Namespace, device: str):
    import torch

    from crm_d2 import CRMNet, CRMRefiner
    from crm_d2.modeling.crm import OFFICIAL_ARCH, TINY_ARCH
    from crm_d2.weights import MissingWeightsError, resolve_weights

    if args.refiner == "cascadepsp":
        return _cascadepsp_refiner(args, device)
    if args.refiner == "guided_filter":
        from crm_d2.guided_filter import GuidedFilterRefiner

        given = [
            k
            for k, v in (
                ("--scales", args.scales),
                ("--chunk-size", args.chunk_size),
                ("--autocast", args.autocast),
                ("--flip", args.flip),
                ("--guided-blend", args.guided_blend is not None),
                ("--weights", args.weights),
                ("--random-weights", args.random_weights),
            )
            if v
        ]
        if given:
            raise _fail(f"{', '.join(given)}: not for --refiner guided_filter (no weights)")
        refiner = GuidedFilterRefiner(device=device)
        return refiner, repr(refiner)
    kwargs = {}
    if args.chunk_size is not None:
        kwargs["chunk_size"] = args.chunk_size
    if args.autocast is not None:
        kwargs["autocast"] = args.autocast
    if args.flip:
        kwargs["flip"] = True
    if args.guided_blend is not None:
        kwargs["guided_blend"] = args.guided_blend
    if args.scales:
        kwargs["scales"] = tuple(args.scales)
    if args.random_weights is not None:
        if args.weights:
            raise _fail("--weights and --random-weights exclude each other")
        torch.manual_seed(args.seed)
        arch = OFFICIAL_ARCH if args.random_weights == "official" else TINY_ARCH
        desc = f"RANDOM ({args.random_weights} architecture, seed {args.seed})"
        return CRMRefiner(CRMNet(arch), device, **kwargs), desc
    try:
        path = resolve_weights(args.weights, "--weights PATH")
    except MissingWeightsError as e:
        raise _fail(
            f"{e} (--random-weights runs an untrained network: plumbing and speed checks only)"
        ) from e
    try:
        return CRMRefiner.from_checkpoint(path, device, **kwargs), path
    except ValueError as e:  # CheckpointError, bad scales or architecture
        raise _fail(str(e)) from e


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from crm_d2.crm_eval import init_distributed, run_evaluation
    from crm_d2.crm_eval.records import SettingsMismatch
    from crm_d2.crm_eval.report import timing_line
    from crm_d2.io import check_output_dir

    try:
        dist, device = init_distributed(args.device)
    except ValueError as e:
        parser.error(f"argument --device: {e}")
    try:
        check_output_dir(args.output, "--output")
    except ValueError as e:
        raise _fail(str(e)) from e
    logging.basicConfig(
        level=logging.INFO if dist.rank == 0 else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        config = _config(args)
        refiner, desc = _refiner(args, device)
        config.weights = desc
        if config.random_weights:
            logger.warning(
                "--random-weights: the network is UNTRAINED; the metrics will be "
                "meaningless (speed and plumbing check only)"
            )
        try:
            report = run_evaluation(config, refiner, dist)
        except (ValueError, SettingsMismatch) as e:
            raise _fail(str(e)) from e
    finally:
        if dist.distributed:
            import torch

            torch.distributed.destroy_process_group()
    if report is not None:
        if report["warning"]:
            print(f"\n*** {report['warning']} ***")
        print(
            f"\ncrm-eval: {report['images']} images, {report['segments']} segments "
            f"({report['refined_segments']} refined); {timing_line(report)}"
        )
        print(report["console"])
        print(f"reports: {report['outputs']['report']} and report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
