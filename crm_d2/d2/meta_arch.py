"""``CRMRefinedModel``: a detectron2 meta-architecture that refines another model's masks with CRM.

The wrapper builds the inner model from a clone of the config with
``MODEL.META_ARCHITECTURE = MODEL.CRM.INNER_META_ARCHITECTURE``, runs it, and replaces the masks
of its outputs by CRM-refined ones, keeping every key, type and convention of the inner model:

- ``"instances"``: each ``pred_masks`` entry large enough is refined on its padded ROI of the
  original-resolution image; the masks keep their type (``BitMasks``, bool tensor, float 0/1
  tensor); ``pred_boxes`` of the masks that changed are re-derived from them; every other field
  is kept. Masks that do not overlap (EntitySeg) are fused exclusively and stay non-overlapping.
- ``"panoptic_seg"``: every segment (things and stuff) is refined and fused with the "modified
  argmax" (:func:`crm_d2.fusion.fuse_panoptic`): surviving segments keep their id and fields,
  stuff ``area`` is recomputed, segments left without pixels are dropped.
- ``"sem_seg"``: unchanged unless ``MODEL.CRM.REFINE_SEMANTIC``.
- ``"crm_inner"`` (``MODEL.CRM.EVAL_BOTH``): the inner model's own output dict, so that one pass
  of the inner model serves a before/after evaluation.

Training delegates to the inner model; the refiner is frozen, in eval mode, and is not a
submodule (its weights are not in the wrapper's ``state_dict``). The wrapper's ``state_dict`` is
the inner model's with a ``model.`` prefix, and loading accepts the inner model's own checkpoints
(keys without the prefix), so ``MODEL.WEIGHTS`` is the inner model's usual checkpoint.

The refinement itself is :mod:`crm_d2.pipeline` (the same functions as ``crm-eval``); this
module converts detectron2's output formats to and from its tensors.

Shape shorthand: N instances, K panoptic segments, C semantic classes, H/W output size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.structures import BitMasks, Boxes, Instances
from torch import Tensor, nn
from torch.nn import functional as F

from .. import pipeline
from ..boxes import boxes_from_masks
from ..fusion import RefinedSegment
from ..refiners import Refiner, load_refiner, refiner_class
from ..weights import resolve_weights
from .config import CRMOptions

__all__ = ["CRMRefinedModel", "RefinementTiming", "resolve_crm_weights"]

logger = logging.getLogger(__name__)

INNER_KEY = "crm_inner"


# --------------------------------------------------------------------------------------------
# Weights and timing
# --------------------------------------------------------------------------------------------
def resolve_crm_weights(path: str) -> str:
    """The refiner checkpoint to load: ``path``, or the weights shipped with crm_d2 if empty."""
    return resolve_weights(path, "MODEL.CRM.WEIGHTS")


@dataclass
class RefinementTiming:
    """Accumulated wall-clock seconds of the inner model and of the refinement."""

    images: int = 0
    inner_seconds: float = 0.0
    refine_seconds: float = 0.0

    def add(self, inner: float, refine: float) -> None:
        self.images += 1
        self.inner_seconds += inner
        self.refine_seconds += refine

    def summary(self) -> dict[str, float]:
        """``{"images", "inner_s_per_image", "refine_s_per_image"}`` (0 when no image)."""
        n = max(self.images, 1)
        return {
            "images": float(self.images),
            "inner_s_per_image": self.inner_seconds / n,
            "refine_s_per_image": self.refine_seconds / n,
        }


# --------------------------------------------------------------------------------------------
# The meta-architecture
# --------------------------------------------------------------------------------------------
@META_ARCH_REGISTRY.register()
class CRMRefinedModel(nn.Module):
    """Run an inner detectron2 model and refine its masks with a frozen CRM (see module doc)."""

    @configurable
    def __init__(
        self,
        *,
        model: nn.Module,
        refiner: Refiner,
        input_format: str = "BGR",
        options: CRMOptions | None = None,
    ) -> None:
        """
        Args:
            model: the inner model; ``model(batched_inputs)`` returns one dict per image.
            refiner: the frozen refiner, CRM or CascadePSP (kept outside the module tree).
            input_format: channel order of ``batched_inputs[i]["image"]`` (``cfg.INPUT.FORMAT``:
                "BGR", "RGB" or "L"), used only when no ``"original_image"`` is given.
            options: see :class:`CRMOptions`.
        """
        super().__init__()
        if input_format not in ("BGR", "RGB", "L"):
            raise ValueError(f"input_format must be 'BGR', 'RGB' or 'L', got {input_format!r}")
        self.model = model
        self.refiner = refiner
        self.input_format = input_format
        self.options = options if options is not None else CRMOptions()
        self.timing = RefinementTiming()
        self._warned: set[str] = set()

    @classmethod
    def from_config(cls, cfg) -> dict:
        crm = cfg.MODEL.CRM
        inner = crm.INNER_META_ARCHITECTURE
        if not inner:
            raise ValueError(
                "MODEL.CRM.INNER_META_ARCHITECTURE is empty: set it to the meta-architecture "
                "to refine, e.g. 'PanopticFPN', 'GeneralizedRCNN', 'PanopticFCN', 'EntityFPN'"
            )
        if inner == cls.__name__:
            raise ValueError("MODEL.CRM.INNER_META_ARCHITECTURE cannot be CRMRefinedModel itself")
        inner_cfg = cfg.clone()
        inner_cfg.defrost()
        inner_cfg.MODEL.META_ARCHITECTURE = inner
        inner_cfg.freeze()
        model = build_model(inner_cfg)
        kind = crm.REFINER
        refiner_class(kind)  # an unknown name fails here, naming the choices
        if crm.FLIP and kind != "crm":
            raise ValueError(f"MODEL.CRM.FLIP is CRM's test-time augmentation: set it to False "
                             f"for MODEL.CRM.REFINER {kind!r}")
        blend = float(crm.GUIDED_BLEND)
        if blend != -1.0 and not 0.0 <= blend <= 1.0:
            raise ValueError(f"MODEL.CRM.GUIDED_BLEND must be in [0, 1] or -1.0 (the "
                             f"checkpoint's), got {crm.GUIDED_BLEND}")
        if blend != -1.0 and kind != "crm":
            raise ValueError(f"MODEL.CRM.GUIDED_BLEND is a CRM option: set it to -1.0 for "
                             f"MODEL.CRM.REFINER {kind!r}")
        if kind == "guided_filter":
            if crm.WEIGHTS:
                raise ValueError("MODEL.CRM.REFINER 'guided_filter' takes no weights: set "
                                 "MODEL.CRM.WEIGHTS to ''")
            weights, kwargs = None, {}
        elif kind == "crm":
            weights = resolve_crm_weights(crm.WEIGHTS)
            kwargs = {"chunk_size": int(crm.CHUNK_SIZE), "autocast": crm.AUTOCAST,
                      "flip": bool(crm.FLIP),
                      "guided_blend": None if blend == -1.0 else blend}
            if len(crm.SCALES):
                kwargs["scales"] = tuple(float(s) for s in crm.SCALES)
        else:
            if not crm.WEIGHTS:
                raise ValueError(
                    f"MODEL.CRM.WEIGHTS is empty: MODEL.CRM.REFINER {kind!r} needs its "
                    "checkpoint (crm_d2 ships CRM weights only)"
                )
            weights = crm.WEIGHTS
            kwargs = {"scales": tuple(float(s) for s in crm.SCALES) or None}
        refiner = load_refiner(kind, weights, device=cfg.MODEL.DEVICE, **kwargs)
        logger.info("%s refiner loaded from %s (%s)", kind, weights,
                    getattr(refiner, "scales", None) or refiner.settings_record())
        return {
            "model": model,
            "refiner": refiner,
            "input_format": cfg.INPUT.FORMAT,
            "options": CRMOptions.from_config(crm),
        }

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Runs before the submodules load: inner-model keys get the "model." prefix here.
        _accept_inner_checkpoint(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------- timing
    def reset_timing(self) -> None:
        """Forget the accumulated times (call before an evaluation)."""
        self.timing = RefinementTiming()

    def log_timing(self) -> dict[str, float]:
        """Log and return the average inner-model and refinement seconds per image."""
        s = self.timing.summary()
        logger.info(
            "CRM timing over %d images: inner model %.4f s/img, CRM refinement %.4f s/img",
            self.timing.images,
            s["inner_s_per_image"],
            s["refine_s_per_image"],
        )
        return s

    # ---------------------------------------------------------------- forward
    def forward(self, batched_inputs: list[dict]):
        """Training: the inner model's losses. Inference: the inner outputs, masks refined.

        Args:
            batched_inputs: detectron2 inputs; ``"original_image"`` ((3, H, W) uint8 RGB at
                ``height`` x ``width``, from :class:`crm_d2.d2.data.OriginalImageMapper`) is
                used when present, otherwise ``"image"`` is converted to RGB and resized back to
                ``height`` x ``width`` (a warning is logged once).
        """
        if self.training:
            return self.model(batched_inputs)
        self._follow_inner_device()
        _synchronize(self.refiner.device)
        start = time.perf_counter()
        outputs = self.model(batched_inputs)
        _synchronize(self.refiner.device)
        inner_each = (time.perf_counter() - start) / max(len(batched_inputs), 1)
        results = []
        for inputs, output in zip(batched_inputs, outputs, strict=True):
            start = time.perf_counter()
            image = self.original_image(inputs)
            refined = self.refine_output(output, image)
            if self.options.eval_both:
                refined[INNER_KEY] = output
            _synchronize(self.refiner.device)
            spent = time.perf_counter() - start
            self.timing.add(inner_each, spent)
            logger.debug(
                "image %s: inner model %.3f s, CRM refinement %.3f s",
                inputs.get("image_id", inputs.get("file_name", "?")),
                inner_each,
                spent,
            )
            results.append(refined)
        return results

    @torch.no_grad()
    def refine_output(self, output: Mapping, image: Tensor) -> dict:
        """Refine the masks of one inner output dict.

        Args:
            output: one inner output (``"instances"``, ``"panoptic_seg"``, ``"sem_seg"``...).
            image: (3, H, W) uint8 (or 0..255 float) RGB at the output resolution.

        Returns:
            A new dict with the same keys; refined entries replaced, the others shared.
        """
        opts = self.options
        result = dict(output)
        by_instance: dict[int, RefinedSegment] = {}
        if opts.refine_instances and isinstance(output.get("instances"), Instances):
            result["instances"] = self._refine_instances(output["instances"], image, by_instance)
        if opts.refine_panoptic and output.get("panoptic_seg") is not None:
            result["panoptic_seg"] = self._refine_panoptic(
                output["panoptic_seg"], image, by_instance
            )
        if opts.refine_semantic and isinstance(output.get("sem_seg"), Tensor):
            result["sem_seg"] = self._refine_semantic(output["sem_seg"], image)
        return result

    # ---------------------------------------------------------------- image
    def original_image(self, inputs: Mapping) -> Tensor:
        """(3, H, W) RGB of one input at its output size (``height`` x ``width``).

        Uses ``inputs["original_image"]`` when present; otherwise converts the network input
        ``inputs["image"]`` from ``input_format`` and resizes it (bilinear) when its size
        differs from (height, width), with a warning logged once.
        """
        if "original_image" in inputs:
            img = inputs["original_image"]
            if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(
                    "inputs['original_image'] must be a (3, H, W) RGB tensor, got "
                    f"{type(img).__name__} {tuple(getattr(img, 'shape', ()))}"
                )
        else:
            img = inputs["image"]
            if self.input_format == "BGR":
                img = img.flip(0)
            elif self.input_format == "L":
                img = img.expand(3, -1, -1)
        height = int(inputs.get("height", img.shape[-2]))
        width = int(inputs.get("width", img.shape[-1]))
        if tuple(img.shape[-2:]) != (height, width):
            if "original_image" not in inputs:
                self._warn_once(
                    "resize",
                    "CRM refines on the network input resized back to the original size "
                    f"({tuple(img.shape[-2:])} -> {(height, width)}): use "
                    "crm_d2.d2.data.OriginalImageMapper to refine on the original pixels",
                )
            img = _resize_image(img, (height, width))
        return img.to(self.refiner.device)

    # ---------------------------------------------------------------- instances
    def _refine_instances(
        self, instances: Instances, image: Tensor, by_instance: dict | None = None
    ) -> Instances:
        n = len(instances)
        if n == 0 or not instances.has("pred_masks"):
            return instances
        raw = instances.pred_masks
        masks = _masks_as_bool(raw)
        if masks is None:
            self._warn_once(
                "mask_type",
                f"instances.pred_masks of type {type(raw).__name__} "
                f"{tuple(getattr(raw, 'shape', ()))} is not refined: CRM needs (N, H, W) "
                "BitMasks or tensors",
            )
            return instances
        soft = raw.clamp(0, 1) if isinstance(raw, Tensor) and raw.dtype.is_floating_point else None
        scores = instances.scores if instances.has("scores") else None
        res = pipeline.refine_instances(
            self.refiner,
            self._image_for(image, masks.shape[-2:]),
            masks,
            self.options,
            soft=soft,
            scores=scores,
        )
        if by_instance is not None:
            by_instance.update({seg.segment_id: seg for seg in res.refined})
        if not res.refined:
            return instances
        out = Instances(instances.image_size)
        for name, value in instances.get_fields().items():
            out.set(name, value)
        out.pred_masks = _masks_like(raw, res.masks)
        changed = res.changed
        if instances.has("pred_boxes") and bool(changed.any()):
            old = instances.pred_boxes
            boxes = old.tensor.clone()
            derived = boxes_from_masks(res.masks).to(boxes)
            boxes[changed.to(boxes.device)] = derived[changed.to(boxes.device)]
            out.pred_boxes = type(old)(boxes) if isinstance(old, Boxes) else Boxes(boxes)
        if self.options.score_reweight and scores is not None:
            out.scores = res.scores
        return out

    # ---------------------------------------------------------------- panoptic
    def _refine_panoptic(self, panoptic, image: Tensor, reuse: Mapping | None = None):
        ids, segments_info = panoptic
        if segments_info is None:
            self._warn_once(
                "panoptic_none",
                "panoptic_seg with segments_info=None (label-divisor format) is not refined",
            )
            return panoptic
        if len(segments_info) == 0:
            return ids, [dict(s) for s in segments_info]
        res = pipeline.refine_panoptic(
            self.refiner,
            self._image_for(image, ids.shape[-2:]),
            ids,
            segments_info,
            self.options,
            reuse=reuse,
        )
        fused = (res.ids, res.segments_info)
        return list(fused) if isinstance(panoptic, list) else fused

    # ---------------------------------------------------------------- semantic
    def _refine_semantic(self, sem_seg: Tensor, image: Tensor) -> Tensor:
        """Refine each large connected component of the argmax; keep the (C, H, W) format
        (:func:`crm_d2.pipeline.refine_semantic`)."""
        if sem_seg.dim() != 3:
            raise ValueError(f"sem_seg must be (C, H, W), got {tuple(sem_seg.shape)}")
        return pipeline.refine_semantic(
            self.refiner, self._image_for(image, sem_seg.shape[-2:]), sem_seg, self.options
        )

    # ---------------------------------------------------------------- helpers
    def _image_for(self, image: Tensor, size: Sequence[int]) -> Tensor:
        size = (int(size[0]), int(size[1]))
        if tuple(image.shape[-2:]) == size:
            return image
        self._warn_once(
            f"mask_size_{size}",
            f"output masks are {size} but the image is {tuple(image.shape[-2:])}: resizing the "
            "image to the masks",
        )
        return _resize_image(image, size)

    def _follow_inner_device(self) -> None:
        """Keep the refiner on the inner model's device (e.g. after ``.to("cuda")``)."""
        param = next(self.model.parameters(), None)
        if param is not None and param.device != self.refiner.device:
            self.refiner.to(param.device)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------
def _accept_inner_checkpoint(state_dict: dict, prefix: str) -> None:
    """Give the keys of an inner-model checkpoint the ``model.`` prefix, in place."""
    inner = prefix + "model."
    keys = [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]
    if not keys:
        return
    logger.info("loading %d inner-model keys into CRMRefinedModel.model", len(keys))
    for key in keys:
        state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """(3, h, w) 0..255 image -> (3, H, W) float32 0..255, bilinear."""
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)
    return out[0].clamp_(0, 255)


def _masks_as_bool(raw) -> Tensor | None:
    """(N, H, W) bool view of BitMasks / bool / float / integer masks; None if unsupported."""
    if isinstance(raw, BitMasks):
        return raw.tensor.bool()
    if not isinstance(raw, Tensor) or raw.dim() != 3:
        return None
    if raw.dtype == torch.bool:
        return raw
    if raw.dtype.is_floating_point:
        return raw > 0.5
    return raw != 0


def _masks_like(raw, masks: Tensor):
    """Bool (N, H, W) masks converted back to the type, dtype and device of ``raw``."""
    if isinstance(raw, BitMasks):
        return BitMasks(masks.to(raw.tensor.device))
    return masks.to(device=raw.device, dtype=raw.dtype)

