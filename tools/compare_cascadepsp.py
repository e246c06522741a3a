#!/usr/bin/env python3
"""Compare :class:`crm_d2.CascadePSPRefiner` with the released CascadePSP code.

The released code is NOT part of crm_d2: point ``--official-root`` at your own copy of the pip
package ``segmentation-refinement`` 0.6 (the folder that holds ``segmentation_refinement/``,
e.g. the unpacked wheel of ``pip download --no-deps segmentation-refinement==0.6``) or at a
checkout of github.com/hkchengrex/CascadePSP (its ``segmentation-refinement/`` folder is used).

The script writes a random checkpoint in the released format (``module.``-prefixed state dict),
calibrated so that the outputs are not saturated: BatchNorm statistics are measured on a
calibration image, the mask channels of the stem are amplified, and the three heads are scaled
so that their logits are about +3 inside the calibration mask and -3 outside. The random network
then roughly follows the mask, so that the local step both refines crops and skips crops that
its global prediction sees as > 90% or < 10% foreground. Both implementations load that file;
the release's ``refine`` steps (its input transforms, then ``process_high_res_im`` or
``process_im_single_pass``) run on non-square images below and above ``L``, and the script
prints the max absolute difference of the float probability maps (and how many pixels differ
in the release's uint8 output).

Example::

    python tools/compare_cascadepsp.py --official-root /tmp/segref/unpacked
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np
import torch

logger = logging.getLogger("compare_cascadepsp")


def _package_root(root: str) -> str:
    for cand in (root, os.path.join(root, "segmentation-refinement")):
        if os.path.isfile(os.path.join(cand, "segmentation_refinement", "eval_helper.py")):
            return os.path.abspath(cand)
    raise SystemExit(
        f"{root!r} holds neither segmentation_refinement/ (the pip package) nor "
        "segmentation-refinement/segmentation_refinement/ (a CascadePSP checkout)"
    )


def make_case(h: int, w: int, rng: np.random.Generator, kind: str):
    """A textured HxWx3 uint8 image and a HxW uint8 0/255 mask.

    ``ellipse``: an ellipse in the middle. ``band``: foreground on the left ~20% of the width
    with a wavy edge and a few holes (with the default 900x1203 and L = 900, the local step
    refines the left crop and skips the right one, < 10% foreground).
    """
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1),
                     (xx + yy) * 127 // max(h + w - 2, 1)], -1)
    img = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    if kind == "ellipse":
        cy, cx, r = h / 2, w / 2, min(h, w) / 3
        fg = ((yy - cy) / r) ** 2 + ((xx - cx) / (1.3 * r)) ** 2 < 1
    else:
        edge = 0.2 * w + 0.01 * w * np.sin(yy / 37.0)
        fg = xx < edge
        for _ in range(6):
            cy, cx, r = rng.uniform(0.1, 0.9) * h, rng.uniform(0.03, 0.15) * w, 0.03 * h
            fg &= (yy - cy) ** 2 + (xx - cx) ** 2 > r**2
    return img, fg.astype(np.uint8) * 255


def _to_tensors(img: np.ndarray, mask: np.ndarray):
    from crm_d2.inference import prepare_inputs

    return prepare_inputs(img, mask > 127)


def random_calibrated_state_dict(seed: int, size=(160, 224)) -> dict[str, torch.Tensor]:
    """A random CascadePSP state dict in the released layout (see the module docstring)."""
    from crm_d2.modeling.cascadepsp import CascadePSPNet

    torch.manual_seed(seed)
    net = CascadePSPNet()
    rng = np.random.default_rng(seed)
    img_t, seg_t = _to_tensors(*make_case(*size, rng, "ellipse"))
    inside = seg_t > 0
    with torch.no_grad():
        net.feats.conv1.weight[:, 3:].mul_(4.0)  # make the features follow the mask
        bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in bns:  # BN statistics of the calibration image (cumulative average)
            m.reset_running_stats()
            m.momentum = None
        net.train()
        net(img_t, seg_t)
        net.eval()
        for m in bns:
            m.momentum = 0.1
            m.weight.uniform_(0.7, 1.3)
            m.bias.uniform_(-0.1, 0.1)
        heads = (("pred_s8", net.final_28[2]), ("pred_s4", net.final_56[2]),
                 ("pred", net.final_21))
        for _ in range(2):  # the heads feed each other through the cascade
            for key, conv in heads:
                logit = torch.logit(net(img_t, seg_t)[key].clamp(1e-6, 1 - 1e-6))
                m_in, m_out = logit[inside].mean(), logit[~inside].mean()
                gap = float(m_in - m_out)
                if abs(gap) < 0.2 * float(logit.std()) + 1e-6:
                    gap = float(logit.std()) + 1e-6  # does not follow the mask: normalise only
                a = 6.0 / gap
                conv.weight.mul_(a)
                conv.bias.sub_((m_in + m_out) / 2).mul_(a)
    return {"module." + k: v for k, v in net.state_dict().items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official-root", required=True,
                    help="the pip package folder (holding segmentation_refinement/) or a "
                         "CascadePSP checkout")
    ap.add_argument("--small", default="481x637", help="HxW of the image below L")
    ap.add_argument("--large", default="900x1203", help="HxW of the image above L")
    ap.add_argument("--cases", nargs="+", choices=("small", "large"), default=["small", "large"],
                    help="which of the two images to compare")
    ap.add_argument("--modes", nargs="+", choices=("full", "fast"), default=["full", "fast"],
                    help="full = global + local step, fast = global step only")
    ap.add_argument("--L", type=int, default=900)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("crm_d2").setLevel(logging.DEBUG)

    sys.path.insert(0, _package_root(args.official_root))
    from segmentation_refinement import Refiner as OfficialRefiner
    from segmentation_refinement.eval_helper import process_high_res_im, process_im_single_pass

    from crm_d2 import CascadePSPRefiner

    torch.set_grad_enabled(False)
    rng = np.random.default_rng(args.seed)
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "model")
        torch.save(random_calibrated_state_dict(args.seed), ckpt)
        official = OfficialRefiner(device="cpu", model_folder=tmp, download_and_check_model=False)
        ours = CascadePSPRefiner.from_checkpoint(ckpt, L=args.L)
        cases = []
        for label, size, kind in (("small", args.small, "ellipse"),
                                  ("large", args.large, "band")):
            h, w = (int(v) for v in size.lower().split("x"))
            case = (label, *make_case(h, w, rng, kind))  # drawn always: same images per seed
            if label in args.cases:
                cases.append(case)
        for label, img, mask in cases:
            # the release's Refiner.refine up to its final uint8 conversion
            im_t = official.im_transform(img).unsqueeze(0)
            seg_t = official.seg_transform((mask > 127).astype(np.uint8) * 255).unsqueeze(0)
            for fast in [m == "fast" for m in args.modes]:
                t0 = time.perf_counter()
                if fast:
                    ref = process_im_single_pass(official.model, im_t, seg_t, args.L)
                else:
                    ref = process_high_res_im(official.model, im_t, seg_t, args.L)
                ref = ref[0, 0].numpy()
                t1 = time.perf_counter()
                got = ours.refine(img, mask, fast=fast)
                t2 = time.perf_counter()
                d = float(np.abs(ref - got).max())
                u8 = int(((ref * 255).astype(np.uint8) != (got * 255).astype(np.uint8)).sum())
                worst = max(worst, d)
                logger.info(
                    "%-5s %4dx%-4d %-13s max|release - crm_d2| = %.3g  uint8 pixels differing: "
                    "%d  (p mean %.3f, std %.3f, >0.5: %.1f%%; %.0f s release, %.0f s crm_d2)",
                    label, img.shape[0], img.shape[1], "fast" if fast else "global+local", d,
                    u8, ref.mean(), ref.std(), 100 * (ref > 0.5).mean(), t1 - t0, t2 - t1,
                )
    ok = worst <= args.tol
    logger.info("worst max abs difference %.3g -> %s (tolerance %g)", worst,
                "PASS" if ok else "FAIL", args.tol)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
