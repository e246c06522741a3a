"""crm_d2.pipeline and crm_d2.options: selection, chunking, downscaling and fusion options of
the one per-image pipeline (no detectron2)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn import functional as F

from crm_d2 import pipeline
from crm_d2.cli.eval import _config, build_parser
from crm_d2.options import CRM_EVAL_DEFAULTS, RefineOptions
from crm_d2.segments import ROIOptions

H, W = 40, 60


class GrowRefiner:
    """Probability 1 on the input mask dilated by 2 px (inside the ROI); counts its calls."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.batches: list[int] = []

    def refine_tensors(self, image, mask, scales=None, exact=False):
        self.batches.append(mask.shape[0])
        return (F.max_pool2d((mask > 0).float(), 5, stride=1, padding=2) > 0).float()[:, 0]


def rect(top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    m = torch.zeros(H, W, dtype=torch.bool)
    m[top:bottom, left:right] = True
    return m


def image() -> torch.Tensor:
    return torch.randint(
        0, 256, (3, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )


def test_defaults_live_in_refine_options():
    d = RefineOptions()
    assert (d.expand_ratio, d.min_area, d.stuff_factor, d.init_confidence) == (
        0.25,
        1024,
        0.51,
        0.5,
    )
    assert ROIOptions().expand_ratio == d.expand_ratio and ROIOptions().min_area == d.min_area
    assert pipeline.roi_options(d) == ROIOptions()
    assert CRM_EVAL_DEFAULTS == dataclasses.replace(d, exclusive=False)


@pytest.mark.parametrize(
    "bad",
    [{"max_side": 16}, {"mask_chunk": 0}, {"exclusive": "yes"}, {"void_id": 1}, {"min_area": -1}],
)
def test_refine_options_reject_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RefineOptions(**bad)


def test_select_large_is_strict():
    assert pipeline.select_large([1025, 1024, 0, 5000], 1024) == [0, 3]
    assert pipeline.select_large([], 0) == []


def test_refine_masks_selects_at_full_resolution_and_chunks():
    # masks 0 and 2 have ROIs of the same size: one batch when they are sent together
    masks = torch.stack([rect(4, 16, 4, 16), rect(5, 7, 40, 42), rect(20, 32, 30, 42)])
    ref = GrowRefiner()
    opts = RefineOptions(min_area=10, mask_chunk=1)
    out = pipeline.refine_masks(ref, image(), masks, opts)
    assert [r.segment_id for r in out] == [0, 2]  # the 4-pixel mask is not refined
    assert ref.batches == [1, 1]  # one mask per call
    ref_all = GrowRefiner()
    same = pipeline.refine_masks(
        ref_all, image(), masks, dataclasses.replace(opts, mask_chunk=None)
    )
    assert ref_all.batches == [2]
    for a, b in zip(out, same, strict=True):
        assert a.box == b.box and torch.equal(a.prob, b.prob)


def test_refine_masks_max_side_returns_full_resolution():
    masks = torch.stack([rect(4, 30, 6, 50)])
    out = pipeline.refine_masks(
        GrowRefiner(), image(), masks, RefineOptions(min_area=10, max_side=32)
    )
    (seg,) = out
    x0, y0, x1, y1 = seg.box
    assert tuple(seg.prob.shape) == (y1 - y0, x1 - x0)
    full = torch.zeros(H, W)
    full[y0:y1, x0:x1] = seg.prob
    assert bool((full > 0.5)[masks[0]].all())  # the grown mask covers the input


def test_refine_instances_options():
    masks = torch.stack([rect(2, 20, 2, 30), rect(20, 38, 2, 30)])  # touching, not overlapping
    scores = torch.tensor([0.9, 0.8])
    opts = RefineOptions(min_area=10)
    auto = pipeline.refine_instances(GrowRefiner(), image(), masks, opts, scores=scores)
    assert not bool((auto.masks.sum(0) > 1).any())  # auto -> exclusive: they stay disjoint
    assert torch.equal(auto.scores, scores)  # no re-weighting by default
    free = pipeline.refine_instances(
        GrowRefiner(), image(), masks, dataclasses.replace(opts, exclusive=False)
    )
    assert bool((free.masks.sum(0) > 1).any()) and bool(free.changed.all())
    reweighted = pipeline.refine_instances(
        GrowRefiner(), image(), masks, dataclasses.replace(opts, score_reweight=True), scores=scores
    )
    assert torch.allclose(reweighted.scores, scores)  # mean probability 1 inside the new masks


def test_refine_panoptic_stuff_factor_init_confidence_void():
    ids = torch.zeros(H, W, dtype=torch.int32)  # 0 = void
    ids[:, :30] = 3  # stuff
    ids[10:30, 35:55] = 8  # thing
    info = [{"id": 3, "isthing": False}, {"id": 8, "isthing": True}]
    opts = RefineOptions(min_area=10)
    res = pipeline.refine_panoptic(GrowRefiner(), image(), ids, info, opts)
    assert sorted(r.segment_id for r in res.refined) == [3, 8]
    assert int((res.ids == 3).sum()) == H * 32  # stuff: 1 x 0.51 > 0.5, grows 2 px
    assert int((res.ids == 8).sum()) == 24 * 24  # thing grows 2 px on every side
    weak = pipeline.refine_panoptic(
        GrowRefiner(), image(), ids, info, dataclasses.replace(opts, stuff_factor=0.4)
    )
    assert int((weak.ids == 3).sum()) == H * 30  # 0.4 < 0.5: the stuff keeps its pixels
    sure = pipeline.refine_panoptic(
        GrowRefiner(), image(), ids, info, dataclasses.replace(opts, init_confidence=1.0)
    )
    assert torch.equal(sure.ids, ids)  # nothing beats a confidence of 1
    with_zero = [{"id": 0, "isthing": False}, info[1]]  # a segment with id 0: void is -1
    ids0 = torch.where(ids == 3, torch.zeros_like(ids), torch.where(ids == 0, -1, ids))
    assert pipeline.resolve_void_id(with_zero, None) == -1
    pipeline.refine_panoptic(GrowRefiner(), image(), ids0, with_zero, opts)
    with pytest.raises(ValueError, match="void id 0"):
        pipeline.refine_panoptic(
            GrowRefiner(), image(), ids0, with_zero, dataclasses.replace(opts, void_id=0)
        )


def test_crm_eval_flags_reach_the_options(tmp_path):
    args = build_parser().parse_args(
        [
            "--output",
            str(tmp_path),
            "--big",
            str(tmp_path),
            "--stuff-factor",
            "0.7",
            "--init-confidence",
            "0.4",
            "--exclusive",
            "auto",
            "--void-id",
            "-1",
            "--score-reweight",
            "--max-side",
            "64",
        ]
    )
    opts = _config(args).settings
    assert (opts.stuff_factor, opts.init_confidence, opts.exclusive, opts.void_id) == (
        0.7,
        0.4,
        None,
        -1,
    )
    assert opts.score_reweight and opts.max_side == 64
    default = _config(
        build_parser().parse_args(["--output", str(tmp_path), "--big", str(tmp_path)])
    )
    assert default.settings == CRM_EVAL_DEFAULTS
