#!/usr/bin/env python3
"""Lay out CRM's public training data as ``images/`` + ``masks/`` folders of symbolic links.

CRM (Shen et al., CVPR 2022) trains on salient-object data. Two public repositories carry part
of it; clone them anywhere OUTSIDE this repository (nothing here is copied, only linked):

    git clone --depth 1 https://github.com/Nithurshen/salient-object-detection   # DUTS, 411 MB
    git clone --depth 1 https://github.com/frankLeo123/Saliency_Matlab           # PASCAL-S

then::

    python3 tools/build_training_set.py --duts salient-object-detection/data \\
        --pascal-s Saliency_Matlab/config --output /data/crm_train

writes ``OUTPUT/duts_tr``, ``OUTPUT/duts_te`` (DUTS-TR 10,553 and DUTS-TE 5,019 pairs; Wang et
al., CVPR 2017) and ``OUTPUT/pascal_s`` (850 pairs; Li et al., CVPR 2014), each with
``images/<stem>.jpg`` and ``masks/<stem>.png`` links, after checking that every image has a mask
of the same size. Train on them with ``tools/train_crm.py --data folder:OUTPUT/duts_tr ...``
(masks are soft-edged 8-bit maps: training binarises them at 128 for the coarse masks and keeps
them soft as targets).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from crm_d2.io import image_size

logger = logging.getLogger("build_training_set")

_SETS = {
    # name: (option, image folder, mask folder) relative to the option's path
    "duts_tr": ("duts", "DUTS-TR/DUTS-TR-Image", "DUTS-TR/DUTS-TR-Mask"),
    "duts_te": ("duts", "DUTS-TE/DUTS-TE-Image", "DUTS-TE/DUTS-TE-Mask"),
    "pascal_s": ("pascal_s", "pascal", "mask"),
}


def link_pairs(image_dir: Path, mask_dir: Path, out: Path) -> tuple[int, list[str]]:
    """Link every ``<stem>.jpg`` of ``image_dir`` that has ``<stem>.png`` in ``mask_dir``.

    Returns:
        (number of pairs linked, problems found: missing masks, size mismatches).
    """
    if not image_dir.is_dir() or not mask_dir.is_dir():
        raise FileNotFoundError(f"expected folders {image_dir} and {mask_dir}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    problems, n = [], 0
    for image in sorted(image_dir.glob("*.jpg")):
        mask = mask_dir / f"{image.stem}.png"
        if not mask.is_file():
            problems.append(f"{image.name}: no mask")
            continue
        # Sizes as the readers of crm_d2.io see them (EXIF orientation applied).
        size_a, size_b = image_size(image), image_size(mask)
        if size_a != size_b:
            problems.append(f"{image.name}: image (H, W) {size_a} vs mask {size_b}")
            continue
        for src, dst in ((image, out / "images" / image.name), (mask, out / "masks" / mask.name)):
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            os.symlink(src.resolve(), dst)
        n += 1
    return n, problems


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duts", type=Path, help="the 'data' folder of salient-object-detection")
    p.add_argument("--pascal-s", type=Path, help="the 'config' folder of Saliency_Matlab")
    p.add_argument("--output", type=Path, required=True, help="folder to create the sets in")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if args.duts is None and args.pascal_s is None:
        p.error("give --duts and/or --pascal-s")
    repo = Path(__file__).resolve().parents[1]
    if repo in args.output.resolve().parents or args.output.resolve() == repo:
        p.error(f"--output {args.output} is inside the crm_d2 repository: keep data outside it")
    for name, (option, images, masks) in _SETS.items():
        root = getattr(args, option)
        if root is None:
            continue
        n, problems = link_pairs(root / images, root / masks, args.output / name)
        logger.info("%s: %d pairs -> %s", name, n, args.output / name)
        for line in problems[:10]:
            logger.warning("%s: skipped %s", name, line)
        if len(problems) > 10:
            logger.warning("%s: ... %d more skipped", name, len(problems) - 10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
