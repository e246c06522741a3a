"""``RefineOptions``: how the masks of one image are refined and fused (the one home of the
defaults).

Every front-end takes its defaults from here: the detectron2 config (``MODEL.CRM.*``,
:func:`crm_d2.d2.config.add_crm_config`), ``crm-eval`` (:mod:`crm_d2.cli.eval`), the ROI
options of :mod:`crm_d2.segments` and the keyword defaults of :mod:`crm_d2.fusion` and
:mod:`crm_d2.boxes`. The pipeline that uses them is :mod:`crm_d2.pipeline`.

Two defaults differ per front-end, each keeping what it did before the two paths were merged:
``exclusive`` (``crm-eval``: False, :data:`CRM_EVAL_DEFAULTS`, COCO results may overlap and
coarse-from-GT instances must not be fused as a partition; the detectron2 layer: None = auto)
and ``mask_chunk`` (the detectron2 layer, :class:`crm_d2.d2.config.CRMOptions`: None = all
masks of an image in one call; ``crm-eval``: 32, to bound memory).

No torch, no detectron2: importing this module costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CRM_EVAL_DEFAULTS", "RefineOptions"]


@dataclass(frozen=True)
class RefineOptions:
    """What to refine in one image, at which resolution, and how to fuse it back.

    ROIs (see :class:`crm_d2.segments.ROIOptions`):
        expand_ratio: the mask box grows by this fraction of its size in total (half per side);
            0.25 as in CascadePSP's scene-parsing refinement.
        min_area: masks / segments with at most this many pixels (of ``> 0.5``, at the
            original resolution) are not refined (1024 in the reference).
        batch_size: ROIs of the same size refined in one refiner call.
        size_multiple: round ROI sizes up to a multiple of this (more ROIs share a size and
            batch together); 1 keeps the exact expanded box.
        min_roi_size: grow ROIs smaller than this (per side) around their centre; 0 = never.

    Refiner and resolution:
        scales: CRM input scales; None = the refiner's.
        exact: run the authors' decoder arithmetic to the letter (CRM only).
        max_side: refine images whose longer side exceeds this many pixels at a reduced size
            (image: OpenCV area averaging; masks: area averaging, so CRM sees soft edges); the
            refined probabilities are resampled to the original pixels. None = never.
        mask_chunk: masks sent to the refiner per call (bounds the float masks alive at once);
            None = all masks of the image in one call.

    Fusion (:mod:`crm_d2.fusion`, the "modified argmax"):
        stuff_factor: multiplier of stuff probabilities in the panoptic fusion (0.51 in the
            reference, so stuff takes a pixel only above ~0.98).
        init_confidence: confidence of the input labels.
        exclusive: instance fusion mode: True = modified argmax (masks stay disjoint), False =
            each refined mask replaces its input (``prob > 0.5`` in its ROI), None = exclusive
            when an image's input masks do not overlap and there are at least two.
        void_id: panoptic void id, 0 or -1; None = -1 if some segment has id 0, else 0.
        score_reweight: multiply each refined instance's score by the mean refined probability
            inside its new mask (0 for a mask that vanished); off keeps the input scores.
        reuse_instances: a panoptic thing segment with an ``instance_id`` whose instance was
            refined in the same image takes that refinement instead of a second one.
    """

    expand_ratio: float = 0.25
    min_area: int = 1024
    batch_size: int = 8
    size_multiple: int = 1
    min_roi_size: int = 0
    scales: tuple[float, ...] | None = None
    exact: bool = False
    max_side: int | None = None
    mask_chunk: int | None = 32
    stuff_factor: float = 0.51
    init_confidence: float = 0.5
    exclusive: bool | None = None
    void_id: int | None = None
    score_reweight: bool = False
    reuse_instances: bool = True

    def __post_init__(self) -> None:
        if self.expand_ratio < 0:
            raise ValueError(f"expand_ratio must be >= 0, got {self.expand_ratio}")
        if self.min_area < 0 or self.min_roi_size < 0:
            raise ValueError(
                f"min_area and min_roi_size must be >= 0, got {self.min_area}, {self.min_roi_size}"
            )
        if self.batch_size < 1 or self.size_multiple < 1:
            raise ValueError(
                f"batch_size and size_multiple must be >= 1, got {self.batch_size}, "
                f"{self.size_multiple}"
            )
        if self.max_side is not None and self.max_side < 32:
            raise ValueError(f"max_side must be None or >= 32 pixels, got {self.max_side}")
        if self.mask_chunk is not None and self.mask_chunk < 1:
            raise ValueError(f"mask_chunk must be None or >= 1, got {self.mask_chunk}")
        if self.stuff_factor < 0:
            raise ValueError(f"stuff_factor must be >= 0, got {self.stuff_factor}")
        if self.exclusive not in (None, True, False):
            raise ValueError(
                f"exclusive must be None (auto), True or False, got {self.exclusive!r}"
            )
        if self.void_id not in (None, 0, -1) or isinstance(self.void_id, bool):
            raise ValueError(f"void_id must be None (auto), 0 or -1, got {self.void_id!r}")


#: The defaults of ``crm-eval`` (:mod:`crm_d2.cli.eval`, :class:`crm_d2.crm_eval.EvalConfig`):
#: instance masks are fused non-exclusively (each refined mask replaces its input inside its ROI).
CRM_EVAL_DEFAULTS = RefineOptions(exclusive=False)
