"""``crm-refine``: refine one mask of one image with CRM (or CascadePSP).

Example::

    crm-refine photo.jpg coarse.png -o refined.png --weights model_45705 --overlay compare.png
    crm-refine photo.jpg coarse.png -o refined.png --refiner cascadepsp --weights model
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from crm_d2.cli.args import (
    AUTOCAST_CHOICES,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from crm_d2.io import check_output_file, read_image, read_mask, save_image

logger = logging.getLogger("crm_d2.refine")


def build_parser() -> argparse.ArgumentParser:
    from crm_d2.inference import DEFAULT_SCALES

    p = argparse.ArgumentParser(
        prog="crm-refine",
        description="Refine a coarse segmentation mask with CRM (Continuous Refinement Model), "
        "CascadePSP or the guided filter. "
        "Images are read upright (EXIF orientation applied, as detectron2 does); masks follow "
        "crm_d2's one reading rule (gray 0..255 or 0/1, 16-bit, palette index > 0, coloured "
        "non-zero, cut-out alpha: see the README).",
    )
    p.add_argument("image", help="input image (any format Pillow reads)")
    p.add_argument("mask", help="coarse mask of the same size")
    p.add_argument("-o", "--output", required=True,
                   help="refined mask, a lossless image file (.png, .tif, .bmp)")
    p.add_argument("--refiner", choices=("crm", "cascadepsp", "guided_filter"), default="crm",
                   help="refiner: CRM (Shen et al. 2022), CascadePSP (Cheng et al. 2020) or the "
                        "training-free guided filter (He et al. 2010)")
    p.add_argument("--weights", default=None,
                   help="checkpoint: for CRM the official model_45705 or a crm_d2 checkpoint "
                        "(default: the weights shipped with crm_d2, if any); for CascadePSP "
                        "the released file 'model' (no default); none for the guided filter")
    p.add_argument("--scales", type=positive_float, nargs="+", default=None,
                   help="input scales, coarse to fine (default: the checkpoint's, else "
                        f"{' '.join(map(str, DEFAULT_SCALES))})")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--threshold", type=probability, default=None,
                   help="write a binary 0/255 mask (prob > T) instead of probabilities")
    p.add_argument("--overlay", default=None,
                   help="also write a before/after picture (coarse red, refined green)")
    p.add_argument("--overlay-max-side", type=non_negative_int, default=1600,
                   help="longest side of the overlay's overview in pixels (0 = full resolution)")
    p.add_argument("--overlay-zoom", type=non_negative_int, default=512,
                   help="when the overview is shrunk, add below it this many pixels square of "
                        "the region that changed most, at full resolution (0 = no zoom)")
    p.add_argument("--exact", action="store_true",
                   help="run the authors' arithmetic to the letter (slower; with --autocast "
                        "none the default equals it to ~1e-6 over several scales, and is band "
                        "decoding measured against it at one scale)")
    p.add_argument("--chunk-size", type=positive_int, default=None,
                   help="queries per decoder call")
    p.add_argument("--autocast", choices=AUTOCAST_CHOICES, default=None,
                   help="CRM precision: auto (the default: the encoder's fusion in bf16 on large "
                        "inputs where the device computes it natively), none (float32), bf16, "
                        "fp16")
    p.add_argument("--flip", action="store_true",
                   help="CRM test-time augmentation: also refine the mirrored input and average "
                        "(twice the time; fewer objects made worse on held-out binary masks, "
                        "crm_d2/weights/MODEL_CARD.md)")
    p.add_argument("--guided-blend", type=probability, default=None, metavar="W",
                   help="CRM: weight W of the guided filter of the coarse mask in the output, "
                        "(1 - W) CRM + W guided (default: the checkpoint's; the shipped file's "
                        "is in crm_d2/weights/MODEL_CARD.md; 0 = CRM alone)")
    p.add_argument("--no-memory-check", action="store_true",
                   help="run even when the memory estimate exceeds the available memory")
    p.add_argument("--fast", action="store_true",
                   help="CascadePSP: global step only (no local step)")
    p.add_argument("--L", type=positive_int, default=None,
                   help="CascadePSP: long side of the global step and local crop size "
                        "(default 900)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _resolve_weights(weights: str | None, refiner: str = "crm") -> str | None:
    from crm_d2.checkpoint import CASCADEPSP_HINT
    from crm_d2.weights import MissingWeightsError, resolve_weights

    if refiner == "guided_filter":
        if weights:
            raise SystemExit("crm-refine: the guided filter takes no --weights")
        return None
    if weights:
        return weights
    if refiner == "cascadepsp":
        raise SystemExit(
            f"crm-refine: no CascadePSP weights. Pass --weights PATH. {CASCADEPSP_HINT}"
        )
    try:
        return resolve_weights(weights, "--weights PATH")
    except MissingWeightsError as e:
        raise SystemExit(f"crm-refine: {e}") from e


def _fail(message: str) -> SystemExit:
    return SystemExit(f"crm-refine: {message}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from crm_d2.distributed import check_device

    try:
        check_device(args.device)
    except ValueError as e:
        parser.error(f"argument --device: {e}")
    for path in (args.image, args.mask):
        if not os.path.isfile(path):
            raise _fail(f"no such file: {path}")
    inputs = (args.image, args.mask) + ((args.weights,) if args.weights else ())
    try:
        check_output_file(args.output, "--output", inputs=inputs, lossless=True)
        if args.overlay:
            check_output_file(args.overlay, "--overlay", inputs=(*inputs, args.output))
    except ValueError as e:
        raise _fail(str(e)) from e

    logger.info("reading %s and %s", args.image, args.mask)
    try:
        image = read_image(args.image)
        mask = read_mask(args.mask)
    except (OSError, ValueError) as e:
        raise _fail(f"cannot read input: {e}") from e
    if image.shape[:2] != mask.shape:
        raise _fail(
            f"image is {image.shape[1]}x{image.shape[0]} (WxH, EXIF orientation applied) but "
            f"mask is {mask.shape[1]}x{mask.shape[0]}; resize the mask to the image first"
        )
    h, w = mask.shape

    from tqdm import tqdm

    from crm_d2.memory import check_memory
    from crm_d2.refiners import load_refiner

    crm = args.refiner == "crm"
    crm_only = {"--scales": args.scales, "--exact": args.exact, "--chunk-size": args.chunk_size,
                "--autocast": args.autocast, "--flip": args.flip,
                "--guided-blend": args.guided_blend is not None}
    cascadepsp_only = {"--fast": args.fast, "--L": args.L}
    foreign = [k for k, v in crm_only.items() if v not in (None, False)] if not crm else []
    if args.refiner != "cascadepsp":
        foreign += [k for k, v in cascadepsp_only.items() if v not in (None, False)]
    if foreign:
        raise _fail(f"{', '.join(foreign)} do(es) not apply to --refiner {args.refiner}")
    if crm:
        kwargs = {"chunk_size": args.chunk_size, "scales": args.scales,
                  "autocast": args.autocast, "flip": args.flip or None,
                  "guided_blend": args.guided_blend}
        refine_kwargs = {"exact": args.exact}
    elif args.refiner == "cascadepsp":
        kwargs, refine_kwargs = {"L": args.L, "fast": args.fast}, {}
    else:
        kwargs, refine_kwargs = {}, {}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    weights = _resolve_weights(args.weights, args.refiner)
    names = {"crm": "CRM", "cascadepsp": "CascadePSP", "guided_filter": "guided filter"}
    logger.info("loading %s %s", names[args.refiner], f"weights {weights}" if weights else "")
    try:
        refiner = load_refiner(args.refiner, weights, args.device, **kwargs)
    except ValueError as e:  # CheckpointError and bad scales / architecture alike
        raise _fail(str(e)) from e
    need = None
    if crm:
        try:
            need = check_memory(
                h, w, refiner.arch, refiner.scales, refiner.device,
                what=f"{args.image} ({w}x{h})", exact=args.exact,
                helps="Refine a downscaled copy of the image (and mask), leave out the finest "
                      "scale (e.g. --scales 0.125 0.25 0.5), or use a machine or GPU with more "
                      "memory; --no-memory-check runs anyway.",
            )
        except MemoryError as e:
            if not args.no_memory_check:
                raise _fail(str(e)) from e
            logger.warning("%s (--no-memory-check: running anyway)", e)

    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if done == 0:
            logger.info("%s: encoding and decoding", stage)
        if args.quiet:
            return
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="step", leave=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    how = {"crm": lambda: (f"CRM, reflect-padded to {w + 64}x{h + 64}, scales {refiner.scales}"
                           f"{', flip' if refiner.flip else ''}"
                           + (f", guided-filter blend {refiner.guided_blend:g}"
                              if refiner.guided_blend else "")),
           "cascadepsp": lambda: f"CascadePSP, L={refiner.L}{', fast' if refiner.fast else ''}",
           "guided_filter": lambda: repr(refiner)}[args.refiner]()
    logger.info(
        "refining %dx%d with %s on %s%s", w, h, how, refiner.device,
        "" if need is None else f", about {need / 2**30:.1f} GiB of memory",
    )
    t0 = time.perf_counter()
    prob = refiner.refine(image, mask, progress=progress, **refine_kwargs)
    logger.info("refined in %.2f s", time.perf_counter() - t0)

    if args.threshold is None:
        out = np.round(prob * 255).astype(np.uint8)
    else:
        out = (prob > args.threshold).astype(np.uint8) * 255
    try:
        save_image(args.output, out)
        logger.info("wrote %s", args.output)
        if args.overlay:
            from crm_d2.visualize import before_after_zoom

            pic = before_after_zoom(image, mask > 127, prob > 0.5,
                                    max_side=args.overlay_max_side, zoom=args.overlay_zoom)
            save_image(args.overlay, pic)
            logger.info("wrote %s", args.overlay)
    except OSError as e:
        raise _fail(
            f"cannot write the output ({e}); any earlier file at that path is unchanged"
        ) from e
    return 0


if __name__ == "__main__":
    sys.exit(main())
