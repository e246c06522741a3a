"""CRM training data: pair discovery, synthetic coarse masks, sample transforms and the loss.

Importing this package needs numpy, OpenCV, Pillow and torch only (pycocotools is imported
lazily by :class:`~crm_d2.training.datasets.CocoObjectPairs`).
"""

from .datasets import (
    CocoObjectPairs,
    CRMTrainDataset,
    ImageMaskPairs,
    list_image_mask_pairs,
    parse_perturb,
    split_pairs,
)
from .losses import crm_loss, sobel_magnitude
from .perturb import lowres_perturb, perturb_mask, random_iou_target

__all__ = [
    "CRMTrainDataset",
    "CocoObjectPairs",
    "ImageMaskPairs",
    "crm_loss",
    "list_image_mask_pairs",
    "lowres_perturb",
    "parse_perturb",
    "perturb_mask",
    "random_iou_target",
    "sobel_magnitude",
    "split_pairs",
]
