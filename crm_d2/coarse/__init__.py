"""Coarse masks made from ground truth, in one vocabulary (see :mod:`crm_d2.coarse.kinds`).

Used by training (:mod:`crm_d2.training`), validation, the held-out evaluation and crm-eval's
``--coarse-from-gt``. Needs numpy and OpenCV only.
"""

from .kinds import BINARY_LEVEL, CoarseKind, CoarseMix, parse_kinds, render_maskrcnn, render_stride
from .perturb import binary_iou, perturb_mask, random_iou_target

__all__ = [
    "BINARY_LEVEL",
    "CoarseKind",
    "CoarseMix",
    "binary_iou",
    "parse_kinds",
    "perturb_mask",
    "random_iou_target",
    "render_maskrcnn",
    "render_stride",
]
