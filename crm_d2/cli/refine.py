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
from PIL import Image

logger = logging.getLogger("crm_d2.refine")


def read_image(path: str) -> np.ndarray:
    """An image file -> HxWx3 uint8 RGB (gray and RGBA are converted, alpha dropped)."""
    with Image.open(path) as im:
        if im.mode in ("I;16", "I", "F"):
            raise ValueError(f"{path}: {im.mode} images are not supported, save as 8-bit")
        return np.asarray(im.convert("RGB"))


def read_mask(path: str) -> np.ndarray:
    """A mask file -> HxW uint8 0..255.

    Gray masks are used as they are; RGB(A) masks use their alpha channel when it is not
    constant (a cut-out), else their luminance. A 0/1 mask is scaled to 0/255.
    """
    with Image.open(path) as im:
        if im.mode == "P":
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA"):
            alpha = np.asarray(im.getchannel("A"))
            if alpha.min() != alpha.max():
                return alpha.copy()
        if im.mode == "1":
            return np.asarray(im, dtype=np.uint8) * 255
        m = np.asarray(im.convert("L")).copy()
    if m.max() == 1:
        m *= 255
    return m


def build_parser() -> argparse.ArgumentParser:
    from crm_d2.inference import DEFAULT_SCALES

    p = argparse.ArgumentParser(
        prog="crm-refine",
        description="Refine a coarse segmentation mask with CRM (Continuous Refinement Model) "
        "or CascadePSP.",
    )
    p.add_argument("image", help="input image (any format Pillow reads)")
    p.add_argument("mask", help="coarse mask of the same size (gray 0..255, 0/1, or RGBA alpha)")
    p.add_argument("-o", "--output", required=True, help="refined mask (PNG)")
    p.add_argument("--refiner", choices=("crm", "cascadepsp"), default="crm",
                   help="refinement network: CRM (Shen et al. 2022) or CascadePSP (Cheng et al. "
                        "2020)")
    p.add_argument("--weights", default=None,
                   help="checkpoint: for CRM the official model_45705 or a crm_d2 checkpoint "
                        "(default: the weights shipped with crm_d2, if any); for CascadePSP "
                        "the released file 'model' (no default)")
    p.add_argument("--scales", type=float, nargs="+", default=None,
                   help="input scales, coarse to fine (default: the checkpoint's, else "
                        f"{' '.join(map(str, DEFAULT_SCALES))})")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--threshold", type=float, default=None,
                   help="write a binary 0/255 mask (prob > T) instead of probabilities")
    p.add_argument("--overlay", default=None,
                   help="also write a before/after picture (coarse red, refined green)")
    p.add_argument("--overlay-max-side", type=int, default=1600,
                   help="longest side of the overlay picture in pixels (0 = full size)")
    p.add_argument("--exact", action="store_true",
                   help="run the authors' arithmetic to the letter (slower, same result ~1e-6)")
    p.add_argument("--chunk-size", type=int, default=None, help="queries per decoder call")
    p.add_argument("--fast", action="store_true",
                   help="CascadePSP: global step only (no local step)")
    p.add_argument("--L", type=int, default=None,
                   help="CascadePSP: long side of the global step and local crop size "
                        "(default 900)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _resolve_weights(weights: str | None, refiner: str = "crm") -> str:
    from crm_d2.checkpoint import CASCADEPSP_HINT
    from crm_d2.weights import default_weights_path

    if weights:
        return weights
    if refiner == "cascadepsp":
        raise SystemExit(
            f"crm-refine: no CascadePSP weights. Pass --weights PATH. {CASCADEPSP_HINT}"
        )
    default = default_weights_path()
    if default is None:
        raise SystemExit(
            "crm-refine: no CRM weights. Pass --weights PATH with the official CRM checkpoint "
            "'model_45705' (download it yourself from the link in dvlab-research/Entity, folder "
            "High-Quality-Segmention) or a checkpoint written by tools/train_crm.py."
        )
    return default


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from tqdm import tqdm

    from crm_d2.checkpoint import CheckpointError
    from crm_d2.refiners import load_refiner

    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise SystemExit(f"crm-refine: --threshold must be in [0, 1], got {args.threshold}")
    for path in (args.image, args.mask):
        if not os.path.isfile(path):
            raise SystemExit(f"crm-refine: no such file: {path}")
    try:
        image = read_image(args.image)
        mask = read_mask(args.mask)
    except (OSError, ValueError) as e:
        raise SystemExit(f"crm-refine: cannot read input: {e}") from e
    if image.shape[:2] != mask.shape:
        raise SystemExit(
            f"crm-refine: image is {image.shape[1]}x{image.shape[0]} (WxH) but mask is "
            f"{mask.shape[1]}x{mask.shape[0]}; resize the mask to the image first"
        )
    crm = args.refiner == "crm"
    crm_only = {"--scales": args.scales, "--exact": args.exact, "--chunk-size": args.chunk_size}
    cascadepsp_only = {"--fast": args.fast, "--L": args.L}
    foreign = [k for k, v in (cascadepsp_only if crm else crm_only).items()
               if v not in (None, False)]
    if foreign:
        raise SystemExit(f"crm-refine: {', '.join(foreign)} do(es) not apply to "
                         f"--refiner {args.refiner}")
    if crm:
        kwargs = {"chunk_size": args.chunk_size, "scales": args.scales}
        refine_kwargs = {"exact": args.exact}
    else:
        kwargs, refine_kwargs = {"L": args.L, "fast": args.fast}, {}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        refiner = load_refiner(args.refiner, _resolve_weights(args.weights, args.refiner),
                               args.device, **kwargs)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"crm-refine: {e}") from e

    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if args.quiet:
            return
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="chunk", leave=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    h, w = mask.shape
    how = (f"CRM, scales {refiner.scales}" if crm else
           f"CascadePSP, L={refiner.L}{', fast' if refiner.fast else ''}")
    logger.info("refining %s (%dx%d) with %s on %s", args.image, w, h, how, refiner.device)
    t0 = time.perf_counter()
    prob = refiner.refine(image, mask, progress=progress, **refine_kwargs)
    logger.info("refined in %.2f s", time.perf_counter() - t0)

    if args.threshold is None:
        out = np.round(prob * 255).astype(np.uint8)
    else:
        out = (prob > args.threshold).astype(np.uint8) * 255
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    Image.fromarray(out).save(args.output)
    logger.info("wrote %s", args.output)
    if args.overlay:
        from crm_d2.visualize import before_after

        pic = before_after(image, mask > 127, prob > 0.5, max_side=args.overlay_max_side)
        os.makedirs(os.path.dirname(os.path.abspath(args.overlay)), exist_ok=True)
        Image.fromarray(pic).save(args.overlay)
        logger.info("wrote %s", args.overlay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
