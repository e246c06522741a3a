"""CRM training data: pair discovery, sample transforms and the loss.

Importing this package needs numpy, OpenCV, Pillow and torch only (pycocotools is imported
lazily by :class:`~crm_d2.training.datasets.CocoObjectPairs`).
"""

from .datasets import (
    CocoObjectPairs,
    CRMTrainDataset,
    ImageMaskPairs,
    list_image_mask_pairs,
    split_pairs,
)
from .losses import crm_loss, sobel_magnitude

__all__ = [
    "CRMTrainDataset",
    "CocoObjectPairs",
    "ImageMaskPairs",
    "crm_loss",
    "list_image_mask_pairs",
    "sobel_magnitude",
    "split_pairs",
]
