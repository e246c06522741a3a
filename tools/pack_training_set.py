#!/usr/bin/env python3
"""Pack the training split of ``--data`` sources into small, downscaled image/mask folders.

For training on a borrowed machine that only takes a small upload (a GPU lease with a size
limit): the images of the TRAINING split of each source (the same hash split as
``tools/train_crm.py`` and ``tools/eval_crm_heldout.py`` with the same ``--val-fraction`` and
``--seed``, so no held-out image is packed), resized to at most ``--max-side`` pixels (area
interpolation; masks keep their soft edges) and written as JPEG images + PNG masks until
``--budget-mb`` is reached. Sources are filled in proportion to their training size times the
number of times their ``--data`` spec is given, which is how ``tools/train_crm.py`` weighs
repeated specs, so the packed mixture is the full one in miniature::

    python3 tools/pack_training_set.py --output /data/crm_pack --budget-mb 48 \\
        --data folder:/data/crm_train/duts_tr ... (the training run's --data specs)

writes ``OUTPUT/<source>/images/*.jpg`` + ``masks/*.png`` and ``OUTPUT/manifest.json`` (counts,
bytes, the arguments, and the ``--data`` specs that train on the pack, each folder given once).
COCO objects are packed as their training crops (the box with 25% context). The output must be
an empty or new folder outside this repository.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from crm_d2.io import atomic_path, write_json
from crm_d2.training.datasets import ImageMaskPairs
from crm_d2.training.sources import build_source, parse_data_spec
from crm_d2.training.transforms import rescale_pair

logger = logging.getLogger("pack_training_set")

MANIFEST = "manifest.json"


def source_name(spec: str) -> str:
    """Folder name of a source in the pack: the folder's name, ``davis`` or the JSON's stem."""
    kind, paths = parse_data_spec(spec)
    if kind == "davis":
        return "davis"
    if kind == "coco":
        return Path(paths[0]).stem
    return Path(paths[0].rstrip("/\\")).name


def encode(array: np.ndarray, fmt: str, **params) -> bytes:
    """``array`` as ``fmt`` ("JPEG", "PNG") file bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **params)
    return buf.getvalue()


def pack(
    specs: Sequence[str],
    output: str | os.PathLike,
    val_fraction: float,
    seed: int = 0,
    max_side: int = 320,
    quality: int = 90,
    budget_mb: float = 48.0,
) -> dict:
    """Write the pack (see the module docstring); returns the manifest.

    Args:
        specs: ``--data`` specs; a spec given k times weighs k times.
        output: the pack's folder (created; must be new or empty).
        val_fraction, seed: the held-out split to leave out (as in ``tools/train_crm.py``).
        max_side: longer side of the packed images.
        quality: JPEG quality of the images.
        budget_mb: stop before the files' total size passes this many MiB.
    """
    if max_side < 16:
        raise ValueError(f"--max-side {max_side} is too small (at least 16)")
    if budget_mb <= 0:
        raise ValueError(f"--budget-mb must be > 0, got {budget_mb}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise ValueError(f"--output {output} is not empty: name a new folder (nothing is "
                         "overwritten)")
    repeats = Counter(specs)
    sources, names = [], set()
    for spec, times in repeats.items():
        name = source_name(spec)
        if name in names:
            raise ValueError(f"two --data sources would both be packed as {name!r}; "
                             "give them folders with different names")
        names.add(name)
        kind, train, _ = build_source(spec, val_fraction, seed)
        train = ImageMaskPairs(train) if kind in ("folder", "davis") else train
        order = np.random.default_rng([seed, len(sources)]).permutation(len(train)).tolist()
        sources.append({"spec": spec, "name": name, "times": times, "data": train,
                        "order": order, "weight": times * len(train), "packed": 0, "bytes": 0})
    budget = int(budget_mb * 2**20)
    total = count = 0
    while True:
        open_ = [s for s in sources if s["packed"] < len(s["order"])]
        if not open_:
            break
        # the source furthest behind its share of the mixture goes next
        src = min(open_, key=lambda s: (s["packed"] + 1) / s["weight"])
        image, mask, name = src["data"].load(src["order"][src["packed"]])
        image, mask = rescale_pair(image, mask, min(1.0, max_side / max(mask.shape)))
        files = {"images": encode(image, "JPEG", quality=quality),
                 "masks": encode(mask, "PNG", optimize=True)}
        size = sum(len(b) for b in files.values())
        if total + size > budget:
            break
        stem = name.replace("/", "__")
        for sub, data in files.items():
            folder = out / src["name"] / sub
            if not src["packed"]:
                folder.mkdir(parents=True)
            with atomic_path(folder / f"{stem}.{'jpg' if sub == 'images' else 'png'}") as tmp:
                Path(tmp).write_bytes(data)
        src["packed"] += 1
        src["bytes"] += size
        total += size
        count += 1
        if count % 500 == 0:
            logger.info("%d samples, %.1f MiB", count, total / 2**20)
    manifest = {
        "val_fraction": val_fraction, "seed": seed, "max_side": max_side, "quality": quality,
        "budget_mb": budget_mb, "bytes": total,
        "sources": [{k: s[k] for k in ("spec", "name", "times", "packed", "bytes")}
                    | {"train_size": len(s["order"])} for s in sources],
        "train_data_args": [f"folder:{out / s['name']}" for s in sources if s["packed"]],
    }
    write_json(out / MANIFEST, manifest, indent=1)
    for s in sources:
        logger.info("%s: %d of %d training samples, %.1f MiB", s["name"], s["packed"],
                    len(s["order"]), s["bytes"] / 2**20)
    logger.info("packed %d samples, %.1f MiB -> %s", count, total / 2**20, out)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", action="append", required=True, metavar="SPEC",
                   help="folder:DIR, davis:ROOT or coco:JSON:IMAGEDIR (as tools/train_crm.py)")
    p.add_argument("--output", type=Path, required=True, help="new folder for the pack")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="held-out share left out (the training run's --val-fraction)")
    p.add_argument("--seed", type=int, default=0, help="the training run's --seed")
    p.add_argument("--max-side", type=int, default=320, help="longer side of packed images")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of packed images")
    p.add_argument("--budget-mb", type=float, default=48.0, help="total size of the pack, MiB")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    repo = Path(__file__).resolve().parents[1]
    if repo in args.output.resolve().parents or args.output.resolve() == repo:
        p.error(f"--output {args.output} is inside the crm_d2 repository: keep data outside it")
    try:
        pack(args.data, args.output, args.val_fraction, args.seed, args.max_side,
             args.quality, args.budget_mb)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
