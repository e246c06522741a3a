"""``CoarseGTSimulator``: a SIMULATED inner model that renders the ground truth coarse.

It is not a segmentation model. For demos and tests of the detectron2 path without trained
detectron2 weights, it returns, for every input image, its own ground truth degraded the way
``crm-eval --coarse-from-gt`` degrades it (:func:`crm_d2.crm_eval.coarse.render_instances` /
:func:`~crm_d2.crm_eval.coarse.render_panoptic` with ``MODEL.CRM.SIMULATOR_COARSE``, default
``stride8_binary``: each mask rendered at 1/8 resolution, upsampled and thresholded, the
binary mask of a stride-8 network; ``maskrcnn``: Mask R-CNN style, the mask in its box at 28 x 28,
pasted back and thresholded). Wrapped in :class:`crm_d2.d2.meta_arch.CRMRefinedModel`, one
``tools/train_net.py --eval-only`` run then shows real before/after numbers through the whole
detectron2 path (data loader, meta-architecture, fusion, detectron2's evaluators), equal to
``crm-eval --coarse-from-gt`` on the same data.

Inputs: the ground truth must be in the batched inputs:

- COCO panoptic dataset dicts (:func:`crm_d2.d2.data.load_coco_panoptic_folder`) keep
  ``pan_seg_file_name`` and ``segments_info`` through detectron2's test mapper;
- COCO instance dicts lose ``annotations`` in the test mapper: build the test loader with
  :class:`crm_d2.d2.data.OriginalImageMapper` ``(keep_annotations=True)`` (``tools/train_net.py``
  does so for this architecture).

Outputs (at ``height`` x ``width``): ``"instances"`` (the non-crowd thing objects: bool
``pred_masks``, ``pred_classes``, ``scores`` = 1, ``pred_boxes`` of the masks) and, for panoptic
inputs, ``"panoptic_seg"`` (the painted coarse map, VOID = 0, ``segments_info`` with contiguous
``category_id`` and ``isthing``).

Shape shorthand: N objects, H/W image size.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, Instances
from torch import nn

from ..boxes import boxes_from_masks
from ..crm_eval.coarse import BINARY_LEVEL, CoarseSpec, render_instances, render_panoptic
from ..crm_eval.datasets import decode_segmentation
from ..evaluation.panoptic import read_panoptic_png

__all__ = ["ANNOTATIONS_KEY", "CoarseGTSimulator"]

logger = logging.getLogger(__name__)

#: Where :class:`crm_d2.d2.data.OriginalImageMapper` ``(keep_annotations=True)`` puts the
#: dataset dict's ``annotations`` (detectron2's test mapper drops the original key).
ANNOTATIONS_KEY = "crm_gt_annotations"


@META_ARCH_REGISTRY.register()
class CoarseGTSimulator(nn.Module):
    """Return each image's ground truth rendered coarse (a simulation, see the module doc)."""

    @configurable
    def __init__(self, *, coarse: CoarseSpec) -> None:
        """
        Args:
            coarse: how the ground truth is degraded (a :mod:`crm_d2.coarse` kind, e.g.
                ``stride8_binary``).
        """
        super().__init__()
        self.coarse = coarse
        self.register_buffer("_device", torch.zeros(0), persistent=False)
        logger.warning(
            "CoarseGTSimulator is a SIMULATION, not a model: its outputs are the ground truth "
            "rendered %s", coarse.describe()
        )

    @classmethod
    def from_config(cls, cfg) -> dict:
        # detectron2's SEED -1 means "any seed"; the simulation is deterministic, with seed 0
        seed = cfg.SEED if cfg.SEED >= 0 else 0
        return {"coarse": CoarseSpec.parse(cfg.MODEL.CRM.SIMULATOR_COARSE, seed=seed)}

    @property
    def device(self) -> torch.device:
        return self._device.device

    def forward(self, batched_inputs: list[dict]) -> list[dict]:
        if self.training:
            raise RuntimeError(
                "CoarseGTSimulator is a simulation for evaluation: it cannot be trained"
            )
        return [self.simulate(inputs) for inputs in batched_inputs]

    def simulate(self, inputs: dict) -> dict:
        """The coarse outputs of one input dict (see the module doc)."""
        height, width = int(inputs["height"]), int(inputs["width"])
        image_id = inputs.get("image_id", 0)
        if "pan_seg_file_name" in inputs and "segments_info" in inputs:
            gt_ids = read_panoptic_png(inputs["pan_seg_file_name"])
            if gt_ids.shape != (height, width):
                raise ValueError(
                    f"{inputs['pan_seg_file_name']} is {gt_ids.shape} but the image is "
                    f"{(height, width)}"
                )
            ids, segments, _ = render_panoptic(
                self.coarse, gt_ids, inputs["segments_info"], image_id
            )
            things = [s for s in segments if s.get("isthing", True)]
            masks = [ids == int(s["id"]) for s in things]
            classes = [int(s["category_id"]) for s in things]
            panoptic_info = [
                {"id": int(s["id"]), "category_id": int(s["category_id"]),
                 "isthing": bool(s.get("isthing", True))}
                for s in segments
            ]
            out = {"panoptic_seg": (torch.from_numpy(ids).to(self.device), panoptic_info)}
        elif ANNOTATIONS_KEY in inputs:
            anns = [a for a in inputs[ANNOTATIONS_KEY] if not a.get("iscrowd", 0)]
            gt = [decode_segmentation(a["segmentation"], height, width) for a in anns]
            rendered = render_instances(self.coarse, gt, image_id)
            masks = [soft >= BINARY_LEVEL for _, soft in rendered]
            classes = [int(anns[j]["category_id"]) for j, _ in rendered]
            out = {}
        else:
            raise ValueError(
                "CoarseGTSimulator needs the ground truth in its inputs: 'pan_seg_file_name' + "
                f"'segments_info' (COCO panoptic dataset dicts) or {ANNOTATIONS_KEY!r} (COCO "
                "instance dicts through crm_d2.d2.data.OriginalImageMapper(keep_annotations="
                "True)); tools/train_net.py sets this up"
            )
        instances = Instances((height, width))
        if masks:
            stacked = torch.from_numpy(np.stack(masks))
        else:
            stacked = torch.zeros(0, height, width, dtype=torch.bool)
        instances.pred_masks = stacked.to(self.device)
        instances.pred_classes = torch.tensor(classes, dtype=torch.int64, device=self.device)
        instances.scores = torch.ones(len(masks), device=self.device)
        instances.pred_boxes = Boxes(boxes_from_masks(stacked).float().to(self.device))
        out["instances"] = instances
        return out
