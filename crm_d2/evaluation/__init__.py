"""Metrics: binary-mask IoU / mBA / Boundary IoU, COCO mask and Boundary AP, PQ and Boundary PQ.

Definitions follow the papers and the official implementations named in each module.
Only numpy, OpenCV, Pillow and pycocotools are needed (faster-coco-eval for Boundary AP).
"""

from .aggregate import pooled_iou, summarize_objects
from .binary import (
    BinaryMetrics,
    ObjectScores,
    PooledIoU,
    apply_empty_coarse_rule,
    binarize,
    boundary_accuracy,
    boundary_accuracy_radii,
    boundary_iou,
    iou,
    mask_to_boundary,
)
from .coco import AP_KEYS, coco_mask_ap
from .panoptic import (
    boundary_pq,
    id2rgb,
    pq_compute,
    read_panoptic_png,
    rgb2id,
    write_panoptic_png,
)

__all__ = [
    "AP_KEYS",
    "BinaryMetrics",
    "ObjectScores",
    "PooledIoU",
    "apply_empty_coarse_rule",
    "binarize",
    "boundary_accuracy",
    "boundary_accuracy_radii",
    "boundary_iou",
    "boundary_pq",
    "coco_mask_ap",
    "id2rgb",
    "iou",
    "mask_to_boundary",
    "pooled_iou",
    "pq_compute",
    "read_panoptic_png",
    "rgb2id",
    "summarize_objects",
    "write_panoptic_png",
]
