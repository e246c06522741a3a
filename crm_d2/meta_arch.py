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

Shape shorthand: N instances, K panoptic segments, C semantic classes, H/W output size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.structures import BitMasks, Boxes, Instances
from torch import Tensor, nn
from torch.nn import functional as F

from .fusion import (
    RefinedSegment,
    boxes_from_masks,
    fuse_instances,
    fuse_panoptic,
    segment_areas,
    segments_to_semantic,
    semantic_to_segments,
)
from .refiners import Refiner, load_refiner, refiner_class
from .segments import ROIOptions, refine_segments
from .weights import default_weights_path

__all__ = [
    "CRMOptions",
    "CRMRefinedModel",
    "RefinementTiming",
    "parse_exclusive",
    "parse_void_id",
    "resolve_crm_weights",
]

logger = logging.getLogger(__name__)

INNER_KEY = "crm_inner"
_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------
def parse_exclusive(value) -> bool | None:
    """``MODEL.CRM.EXCLUSIVE_INSTANCES`` -> True / False / None (auto).

    Accepts None or "auto" (auto), bools, and the strings true/false/yes/no/1/0/on/off.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low == "auto":
            return None
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise ValueError(
        f"MODEL.CRM.EXCLUSIVE_INSTANCES must be 'auto' (or None), True or False; got {value!r}"
    )


def parse_void_id(value) -> int | None:
    """``MODEL.CRM.VOID_ID`` -> 0, -1 or None (auto). Accepts ints, "0", "-1", "auto", None."""
    if value is None:
        return None
    if isinstance(value, str):
        low = value.strip().lower()
        if low == "auto":
            return None
        try:
            value = int(low)
        except ValueError:
            value = low
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, -1):
        return value
    raise ValueError(f"MODEL.CRM.VOID_ID must be 'auto' (or None), 0 or -1; got {value!r}")


def resolve_crm_weights(path: str) -> str:
    """The refiner checkpoint to load: ``path``, or the weights shipped with crm_d2 if empty."""
    if path:
        return path
    shipped = default_weights_path()
    if shipped is None:
        raise ValueError(
            "MODEL.CRM.WEIGHTS is empty and this crm_d2 install ships no default CRM weights "
            "(crm_d2/weights/crm_d2_lite.pth is missing): set MODEL.CRM.WEIGHTS to a CRM "
            "checkpoint, e.g. the official 'model_45705' (see the README) or one trained with "
            "tools/train_crm.py"
        )
    return shipped


@dataclass(frozen=True)
class CRMOptions:
    """What :class:`CRMRefinedModel` refines and how (mirrors ``cfg.MODEL.CRM``).

    Attributes:
        roi: ROI expansion, minimum area and batching (:class:`crm_d2.segments.ROIOptions`).
        scales: CRM input scales; None = the refiner's.
        exact: run the authors' decoder arithmetic to the letter.
        stuff_factor: multiplier of stuff probabilities in the panoptic fusion.
        init_confidence: confidence of the inner model's labels in the fusion.
        refine_instances / refine_panoptic / refine_semantic: which outputs to refine.
        score_reweight: multiply refined instance scores by the mean refined probability
            inside the new mask (0 for a mask that vanished).
        eval_both: also return the inner output under ``"crm_inner"``.
        reuse_instances: a panoptic thing segment with an ``instance_id`` whose instance was
            refined takes that instance's refined probability (and ROI) instead of being
            refined a second time.
        exclusive: instance fusion mode; None = exclusive when the inner masks of an image do
            not overlap (and there are at least two).
        void_id: panoptic void id; None = -1 if some segment has id 0, else 0.
    """

    roi: ROIOptions = field(default_factory=ROIOptions)
    scales: tuple[float, ...] | None = None
    exact: bool = False
    stuff_factor: float = 0.51
    init_confidence: float = 0.5
    refine_instances: bool = True
    refine_panoptic: bool = True
    refine_semantic: bool = False
    score_reweight: bool = False
    eval_both: bool = False
    reuse_instances: bool = True
    exclusive: bool | None = None
    void_id: int | None = None

    @classmethod
    def from_config(cls, crm_cfg) -> CRMOptions:
        """Build from the ``cfg.MODEL.CRM`` node."""
        c = crm_cfg
        return cls(
            roi=ROIOptions(
                expand_ratio=float(c.EXPAND_RATIO),
                min_area=int(c.MIN_AREA),
                batch_size=int(c.ROI_BATCH_SIZE),
                size_multiple=int(c.ROI_SIZE_MULTIPLE),
                min_roi_size=int(c.MIN_ROI_SIZE),
            ),
            scales=tuple(float(s) for s in c.SCALES) or None,
            exact=bool(c.EXACT),
            stuff_factor=float(c.STUFF_FACTOR),
            init_confidence=float(c.INIT_CONFIDENCE),
            refine_instances=bool(c.REFINE_INSTANCES),
            refine_panoptic=bool(c.REFINE_PANOPTIC),
            refine_semantic=bool(c.REFINE_SEMANTIC),
            score_reweight=bool(c.SCORE_REWEIGHT),
            eval_both=bool(c.EVAL_BOTH),
            reuse_instances=bool(c.get("REUSE_INSTANCES", True)),
            exclusive=parse_exclusive(c.EXCLUSIVE_INSTANCES),
            void_id=parse_void_id(c.VOID_ID),
        )


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
        if kind == "guided_filter":
            if crm.WEIGHTS:
                raise ValueError("MODEL.CRM.REFINER 'guided_filter' takes no weights: set "
                                 "MODEL.CRM.WEIGHTS to ''")
            weights, kwargs = None, {}
        elif kind == "crm":
            weights = resolve_crm_weights(crm.WEIGHTS)
            kwargs = {"chunk_size": int(crm.CHUNK_SIZE)}
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
                ``height`` x ``width``, from :class:`crm_d2.d2_data.OriginalImageMapper`) is
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
            reuse = by_instance if opts.reuse_instances else {}
            result["panoptic_seg"] = self._refine_panoptic(output["panoptic_seg"], image, reuse)
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
                    "crm_d2.d2_data.OriginalImageMapper to refine on the original pixels",
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
        crm_input = raw if isinstance(raw, Tensor) and raw.dtype.is_floating_point else masks
        crm_input = crm_input.clamp(0, 1) if crm_input.dtype.is_floating_point else crm_input
        refined = refine_segments(
            self.refiner,
            self._image_for(image, masks.shape[-2:]),
            crm_input,
            self.options.roi,
            scales=self.options.scales,
            exact=self.options.exact,
        )
        if by_instance is not None:
            by_instance.update({seg.segment_id: seg for seg in refined})
        if not refined:
            return instances
        exclusive = self._exclusive(masks)
        new_masks = fuse_instances(
            masks, refined, exclusive=exclusive, init_confidence=self.options.init_confidence
        )
        out = Instances(instances.image_size)
        for name, value in instances.get_fields().items():
            out.set(name, value)
        out.pred_masks = _masks_like(raw, new_masks)
        changed = (new_masks != masks).flatten(1).any(dim=1)
        if instances.has("pred_boxes") and bool(changed.any()):
            old = instances.pred_boxes
            boxes = old.tensor.clone()
            derived = boxes_from_masks(new_masks).to(boxes)
            boxes[changed.to(boxes.device)] = derived[changed.to(boxes.device)]
            out.pred_boxes = type(old)(boxes) if isinstance(old, Boxes) else Boxes(boxes)
        if self.options.score_reweight and instances.has("scores"):
            out.scores = instances.scores * _mean_refined_prob(refined, new_masks).to(
                instances.scores
            )
        return out

    def _exclusive(self, masks: Tensor) -> bool:
        if self.options.exclusive is not None:
            return self.options.exclusive
        return masks.shape[0] >= 2 and not bool((masks.sum(dim=0) > 1).any())

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
        void_id = self.options.void_id
        if void_id is None:
            void_id = -1 if any(int(s["id"]) == 0 for s in segments_info) else 0
        areas = segment_areas(ids, segments_info)
        chosen = [s for s in segments_info if areas[int(s["id"])] > self.options.roi.min_area]
        refined: list[RefinedSegment] = []
        if reuse:
            kept = []
            for s in chosen:
                inst = s.get("instance_id") if s.get("isthing", True) else None
                seg = reuse.get(int(inst)) if inst is not None else None
                if seg is None:
                    kept.append(s)
                else:
                    refined.append(RefinedSegment(int(s["id"]), seg.prob, seg.box, True))
            logger.debug("panoptic: %d thing segments reuse their instance's refinement",
                         len(chosen) - len(kept))
            chosen = kept
        if chosen:
            masks = torch.stack([ids == int(s["id"]) for s in chosen])
            isthing = [bool(s.get("isthing", True)) for s in chosen]
            new = refine_segments(
                self.refiner,
                self._image_for(image, ids.shape[-2:]),
                masks,
                self.options.roi,
                isthing=isthing,
                scales=self.options.scales,
                exact=self.options.exact,
            )
            for seg in new:
                seg.segment_id = int(chosen[seg.segment_id]["id"])
            refined += new
        fused = fuse_panoptic(
            ids,
            segments_info,
            refined,
            stuff_factor=self.options.stuff_factor,
            init_confidence=self.options.init_confidence,
            void_id=void_id,
        )
        return list(fused) if isinstance(panoptic, list) else fused

    # ---------------------------------------------------------------- semantic
    def _refine_semantic(self, sem_seg: Tensor, image: Tensor) -> Tensor:
        """Refine each large connected component of the argmax; keep the (C, H, W) format.

        Where the label changes, the scores of the old and the new label are swapped, so the
        argmax of the result is the refined label map (up to exact ties) and every pixel's score
        vector stays a permutation of the inner one.
        """
        if sem_seg.dim() != 3:
            raise ValueError(f"sem_seg must be (C, H, W), got {tuple(sem_seg.shape)}")
        labels = sem_seg.argmax(dim=0)
        comp, comp_info = semantic_to_segments(
            labels, ignore_label=-1, min_area=self.options.roi.min_area
        )
        chosen = [s for s in comp_info if s["refine"]]
        if not chosen:
            return sem_seg
        masks = torch.stack([comp == s["id"] for s in chosen])
        refined = refine_segments(
            self.refiner,
            self._image_for(image, labels.shape),
            masks,
            self.options.roi,
            scales=self.options.scales,
            exact=self.options.exact,
        )
        for seg in refined:
            seg.segment_id = int(chosen[seg.segment_id]["id"])
        fused, fused_info = fuse_panoptic(
            comp, comp_info, refined, init_confidence=self.options.init_confidence, void_id=0
        )
        new_labels = segments_to_semantic(fused, fused_info, ignore_label=-1)
        new_labels = torch.where(new_labels < 0, labels, new_labels)
        changed = new_labels != labels
        old_v = sem_seg.gather(0, labels[None])[0]
        new_v = sem_seg.gather(0, new_labels[None])[0]
        out = sem_seg.clone()
        out.scatter_(0, labels[None], torch.where(changed, new_v, old_v)[None])
        out.scatter_(0, new_labels[None], torch.where(changed, old_v, new_v)[None])
        return out

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


def _mean_refined_prob(refined: Sequence[RefinedSegment], masks: Tensor) -> Tensor:
    """(N,) mean refined probability inside each new mask; 1 for unrefined, 0 if emptied."""
    factor = torch.ones(masks.shape[0], dtype=torch.float32)
    for seg in refined:
        x0, y0, x1, y1 = seg.box
        inside = masks[seg.segment_id, y0:y1, x0:x1].to(seg.prob.device)
        factor[seg.segment_id] = float(seg.prob[inside].mean()) if bool(inside.any()) else 0.0
    return factor
