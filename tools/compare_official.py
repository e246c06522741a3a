#!/usr/bin/env python3
"""Compare ``CRMRefiner.refine(exact=True)`` with the authors' released CRM code.

The authors' code is NOT part of crm_d2: point ``--official-root`` at your own checkout of
dvlab-research/Entity's ``High-Quality-Segmention`` folder. The script writes a random checkpoint
in the official format (``module.``-prefixed raw state dict), loads it into both
implementations, runs the authors' data pipeline (``OfflineDataset_crm_pad32``) and their
multi-scale loop (the steps of their ``test.py``) on non-square images of several sizes, and
reports the max absolute difference of the probability maps.

Their code calls CUDA; on a CPU-only machine the script turns ``.cuda()`` and the CUDA timing
calls into no-ops (their arithmetic is unchanged). Needs torchvision (their dataset uses it).

Example::

    python tools/compare_official.py --official-root ~/src/Entity/High-Quality-Segmention \
        --sizes 75x101 130x97 257x190
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import types

import numpy as np
import torch
import torch.nn.functional as F

from crm_d2.io import save_image, torch_save

logger = logging.getLogger("compare_official")


def _cpu_shims() -> None:
    """Make the authors' CUDA-only calls no-ops so their code runs on CPU."""

    class _Event:
        def __init__(self, *a, **k):
            pass

        def record(self, *a, **k):
            pass

        def elapsed_time(self, other):
            return 0.0

    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.Event = _Event
        torch.Tensor.cuda = lambda self, *a, **k: self
        torch.nn.Module.cuda = lambda self, *a, **k: self
    # their dataset module imports `progressbar` (only for its in-memory mode)
    sys.modules.setdefault("progressbar", types.SimpleNamespace(progressbar=lambda x: x))


def random_official_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A random CRM state dict in the official layout, with non-trivial BN statistics."""
    from crm_d2.modeling import CRMNet

    torch.manual_seed(seed)
    net = CRMNet()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 1.5 / m.in_features**0.5)
                m.bias.normal_(0, 0.1)
        # Calibrate the last layer so logits spread around 0 (otherwise sigmoid saturates and the
        # comparison would be vacuous).
        net.eval()
        img = torch.randn(1, 3, 96, 120)
        msk = torch.rand(1, 1, 96, 120) * 2 - 1
        from crm_d2.modeling.crm import make_coord

        coord = make_coord((96, 120)).view(1, -1, 2)
        cell = torch.tensor([2 / 96, 2 / 120]).expand_as(coord)
        logit = net(img, msk, coord, cell)
        last = net.imnet.layers[-1]
        std = float(logit.std()) + 1e-6
        last.weight.mul_(2.0 / std)
        last.bias.sub_(float(logit.mean())).mul_(2.0 / std)
    return {"module." + k: v for k, v in net.state_dict().items()}


def official_refine(model, dataset_item, scales, chunk: int) -> torch.Tensor:
    """The steps of the authors' ``test.py`` for one image (batch 1)."""
    im, seg, gt, _name, crm_data = dataset_item
    im, seg, gt = im[None], seg[None], gt[None]
    coord, cell = crm_data["coord"][None], crm_data["cell"][None]
    n = gt.shape[-2] * gt.shape[-1]
    pred = None
    for s in scales:
        size = (round(im.shape[-2] * s), round(im.shape[-1] * s))
        im_ = F.interpolate(im, size=size, mode="bilinear", align_corners=True)
        seg_ = F.interpolate(seg, size=size, mode="bilinear", align_corners=True)
        feat = fcoord = None
        outs = []
        for i in range(0, n, chunk):
            if feat is None:
                out, fcoord, feat = model(im_, seg_, coord=coord[:, i : i + chunk],
                                          cell=cell[:, i : i + chunk])
            else:
                out = model(im_, seg_, coord=coord[:, i : i + chunk], cell=cell[:, i : i + chunk],
                            transferCoord=fcoord, transferFeat=feat)
            outs.append(out["pred_224"])
        pred = torch.cat(outs, dim=1).view(1, 1, *gt.shape[-2:])
        if (seg[0] + 1).sum() < 2:
            pred[0] = 0
        seg = ((pred[0].float() - 0.5) * 2).unsqueeze(0)
    return pred[0, 0, 32:-32, 32:-32]


def make_case(folder: str, name: str, h: int, w: int, rng: np.random.Generator, kind: str):
    """Write NAME_im.png / NAME_seg.png / NAME_gt.png (the authors' offline layout)."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1),
                     (xx + yy) * 127 // max(h + w - 2, 1)], -1)
    img = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    if kind == "empty":
        seg = np.zeros((h, w), np.uint8)
    elif kind == "soft":
        seg = rng.integers(0, 256, (h, w), dtype=np.uint8)
    else:
        cy, cx, r = h / 2, w / 2, min(h, w) / 3
        seg = (((yy - cy) / r) ** 2 + ((xx - cx) / (1.3 * r)) ** 2 < 1).astype(np.uint8) * 255
    save_image(os.path.join(folder, f"{name}_im.png"), img)
    save_image(os.path.join(folder, f"{name}_seg.png"), seg)
    save_image(os.path.join(folder, f"{name}_gt.png"), seg)
    return img, seg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official-root", required=True,
                    help="path of the authors' High-Quality-Segmention folder")
    ap.add_argument("--sizes", nargs="+", default=["75x101", "130x97", "257x190"],
                    help="HxW image sizes (non-square recommended)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--official-chunk", type=int, default=50176 * 16)
    ap.add_argument("--chunk", type=int, default=30_000, help="crm_d2 query chunk size")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    _cpu_shims()
    sys.path.insert(0, os.path.abspath(args.official_root))
    from dataset.offline_dataset_crm_pad32 import OfflineDataset_crm_pad32
    from models.network.crm_transferCoord_transferFeat import CRMNet as OfficialCRMNet

    from crm_d2 import CRMRefiner
    from crm_d2.sparse import FastOptions

    scales = (0.125, 0.25, 0.5, 1.0)
    rng = np.random.default_rng(args.seed)
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "model_45705")
        torch_save(random_official_state_dict(args.seed), ckpt)
        official = torch.nn.DataParallel(OfficialCRMNet(backend="resnet50", pretrained=False))
        official.load_state_dict(torch.load(ckpt))
        official.eval()
        ours = CRMRefiner.from_checkpoint(ckpt, chunk_size=args.chunk)
        data_dir = os.path.join(tmp, "data")
        os.makedirs(data_dir)
        cases = []
        for i, size in enumerate(args.sizes):
            h, w = (int(v) for v in size.lower().split("x"))
            for kind in ("ellipse", "soft"):
                name = f"case{i:02d}{kind}"
                cases.append((name, *make_case(data_dir, name, h, w, rng, kind)))
        name = "zz_empty"
        cases.append((name, *make_case(data_dir, name, 64, 90, rng, "empty")))
        ds = OfflineDataset_crm_pad32(data_dir, need_name=True, resize=False, do_crop=False,
                                      padding=True)
        by_name = {os.path.basename(p)[:-7]: i for i, p in enumerate(ds.im_list)}
        for name, img, seg in cases:
            with torch.no_grad():
                ref = official_refine(official, ds[by_name[name]], scales, args.official_chunk)
            got = ours.refine(img, seg, exact=True)
            fast = ours.refine(img, seg, exact=False, fast=FastOptions.dense())
            d = float(np.abs(ref.numpy() - got).max())
            d_fast = float(np.abs(ref.numpy() - fast).max())
            worst = max(worst, d)
            logger.info(
                "%-14s %4dx%-4d max|official - exact| = %.3g   max|official - fast| = %.3g   "
                "(p mean %.3f, std %.3f, >0.5: %.1f%%)",
                name, img.shape[0], img.shape[1], d, d_fast, ref.mean(), ref.std(),
                100 * (ref > 0.5).float().mean(),
            )
    ok = worst <= args.tol
    logger.info("worst max abs difference %.3g -> %s (tolerance %g)", worst,
                "PASS" if ok else "FAIL", args.tol)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
