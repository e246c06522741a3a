"""CRMRefinedModel around dummy inner models with the output formats of real ones.

The dummies return exactly the conventions of Panoptic FPN, PanopticFCN, EntitySeg and
Mask2Former (as their public releases return them). Known answers come from a fake refiner
whose "refined" probability is the input mask dilated by ``GROW`` pixels, so the expected
masks, boxes and label maps can be written down by hand.
"""

from __future__ import annotations

import logging

import pytest

detectron2 = pytest.importorskip(
    "detectron2",
    reason="detectron2 is not installed: install it from its GitHub repository (see README) "
    "to run the detectron2-layer tests",
)
pytestmark = pytest.mark.detectron2

import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import META_ARCH_REGISTRY, build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from crm_d2 import CRMNet, save_crm  # noqa: E402
from crm_d2.d2.config import (  # noqa: E402
    CRMOptions,
    add_crm_config,
    parse_exclusive,
    parse_void_id,
)
from crm_d2.d2.meta_arch import INNER_KEY, CRMRefinedModel  # noqa: E402
from crm_d2.modeling.crm import TINY_ARCH  # noqa: E402

H, W = 64, 96
GROW = 2
SMALL = TINY_ARCH


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def rect(top: int, bottom: int, left: int, right: int, h: int = H, w: int = W) -> torch.Tensor:
    """(h, w) bool mask of rows top..bottom-1, columns left..right-1."""
    m = torch.zeros(h, w, dtype=torch.bool)
    m[top:bottom, left:right] = True
    return m


def dilate(mask: torch.Tensor, k: int = GROW) -> torch.Tensor:
    """Square dilation by k px of an (..., h, w) bool mask (clipped at the borders)."""
    x = mask.float().reshape(-1, 1, *mask.shape[-2:])
    return (F.max_pool2d(x, 2 * k + 1, stride=1, padding=k) > 0).reshape(mask.shape)


def tight_box(mask: torch.Tensor) -> list[float]:
    rows = torch.nonzero(mask.any(1)).flatten()
    cols = torch.nonzero(mask.any(0)).flatten()
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


class GrowRefiner:
    """Stands in for CRMRefiner: probability ``value`` on the input mask dilated by GROW px."""

    def __init__(self, value: float = 1.0) -> None:
        self.device = torch.device("cpu")
        self.model = nn.Identity()
        self.value = value
        self.calls = 0

    def refine_tensors(self, image, mask, scales=None, exact=False):
        self.calls += 1
        return dilate(mask[:, 0] > 0).float() * self.value


def inputs_for(h: int = H, w: int = W, n: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g),
            "height": h,
            "width": w,
            "image_id": i,
        }
        for i in range(n)
    ]


class _Dummy(nn.Module):
    """Base of the dummy inner models: one parameter, a loss in training mode."""

    def __init__(self, cfg=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))

    def forward(self, batched_inputs):
        if self.training:
            return {"loss_dummy": self.weight.sum() * len(batched_inputs)}
        return [self.output() for _ in batched_inputs]


# Panoptic FPN: instances with bool masks (overlapping), sem_seg 54 channels, panoptic 0 = void,
# ids from 1; things {id, isthing, score, category_id, instance_id}, stuff {.., area}.
STUFF = rect(0, H, 0, 48)  # 3072 px
THING = rect(15, 49, 55, 89)  # 34 x 34 = 1156 px
INST1 = rect(20, 60, 68, 96)  # 40 x 28 = 1120 px, overlaps THING


@META_ARCH_REGISTRY.register()
class CRMTestPanopticFPN(_Dummy):
    def output(self):
        masks = torch.stack([THING, INST1])
        inst = Instances((H, W))
        inst.pred_boxes = Boxes(torch.tensor([[50.0, 10, 95, 55], [65, 15, 96, 60]]))
        inst.scores = torch.tensor([0.9, 0.6])
        inst.pred_classes = torch.tensor([3, 7])
        inst.pred_masks = masks
        pan = torch.zeros(H, W, dtype=torch.int32)
        pan[STUFF] = 1
        pan[THING] = 2
        info = [
            {"id": 1, "isthing": False, "category_id": 5, "area": int(STUFF.sum())},
            {"id": 2, "isthing": True, "score": 0.9, "category_id": 3, "instance_id": 0},
        ]
        sem = torch.rand(54, H, W, generator=torch.Generator().manual_seed(1))
        return {"sem_seg": sem, "instances": inst, "panoptic_seg": (pan, info)}


# PanopticFCN: BitMasks, int32 classes, boxes from the masks, sem_seg 54 ch, panoptic 0 = void.
@META_ARCH_REGISTRY.register()
class CRMTestPanopticFCN(_Dummy):
    def output(self):
        bit = BitMasks(torch.stack([THING, INST1]))
        inst = Instances(
            (H, W),
            pred_masks=bit,
            pred_boxes=bit.get_bounding_boxes(),
            pred_classes=torch.tensor([3, 7], dtype=torch.int32),
            scores=torch.tensor([0.8, 0.3]),
        )
        pan = torch.zeros(H, W, dtype=torch.int32)
        pan[THING] = 1
        pan[STUFF] = 2
        info = [
            {"id": 1, "isthing": True, "score": 0.8, "category_id": 3, "instance_id": 0},
            {"id": 2, "isthing": False, "category_id": 12, "area": int(STUFF.sum())},
        ]
        return {"sem_seg": torch.zeros(54, H, W), "instances": inst, "panoptic_seg": (pan, info)}


# EntitySeg: only instances; float 0/1 masks that partition (part of) the image.
ENT_A = rect(10, 50, 10, 40)  # 1200 px
ENT_B = rect(10, 50, 42, 72)  # 1200 px, 2-px gap (columns 40, 41) to ENT_A


@META_ARCH_REGISTRY.register()
class CRMTestEntitySeg(_Dummy):
    def output(self):
        masks = torch.stack([ENT_A, ENT_B]).float()
        inst = Instances((H, W))
        inst.pred_masks = masks
        inst.pred_masks_score = masks * 0.7 + 0.1
        inst.pred_boxes = Boxes(torch.tensor([[10.0, 10, 39, 49], [42, 10, 71, 49]]))
        inst.scores = torch.tensor([0.5, 0.4])
        inst.pred_classes = torch.zeros(2, dtype=torch.int64)
        inst.ori_scores = torch.tensor([0.55, 0.45])
        return {"instances": inst}


# Mask2Former: panoptic ids from 1, void 0, entries {id, isthing, category_id} (no score/area).
@META_ARCH_REGISTRY.register()
class CRMTestMask2Former(_Dummy):
    def output(self):
        pan = torch.zeros(H, W, dtype=torch.int32)
        pan[STUFF] = 1
        pan[THING] = 2
        info = [
            {"id": 1, "isthing": False, "category_id": 90},
            {"id": 2, "isthing": True, "category_id": 3},
        ]
        return {"panoptic_seg": (pan, info), "sem_seg": torch.zeros(133, H, W)}


# A model whose segment ids start at 0 and whose void is -1.
@META_ARCH_REGISTRY.register()
class CRMTestVoidMinusOne(_Dummy):
    def output(self):
        pan = torch.full((H, W), -1, dtype=torch.int32)
        pan[STUFF] = 0
        pan[THING] = 1
        info = [
            {"id": 0, "isthing": False, "category_id": 90},
            {"id": 1, "isthing": True, "category_id": 3},
        ]
        return {"panoptic_seg": (pan, info)}


def wrap(inner_cls, refiner=None, **options) -> CRMRefinedModel:
    opts = CRMOptions(expand_ratio=0.25, min_area=1024, **options)
    model = CRMRefinedModel(model=inner_cls(), refiner=refiner or GrowRefiner(), options=opts)
    return model.eval()


def expected_panoptic(stuff_id: int, thing_id: int, void: int = 0) -> torch.Tensor:
    """Hand-made answer for the STUFF + THING layout: the thing (p = 1) grows GROW px in its
    ROI, the stuff (p = 1 * 0.51 > 0.5) grows GROW px into the void."""
    out = torch.full((H, W), void, dtype=torch.int32)
    out[:, : 48 + GROW] = stuff_id  # stuff ROI reaches column 54; it grows to columns 48, 49
    out[15 - GROW : 49 + GROW, 55 - GROW : 89 + GROW] = thing_id
    return out


@pytest.fixture(scope="module")
def crm_checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("crm") / "crm_small.pth"
    torch.manual_seed(0)
    save_crm(CRMNet(SMALL), str(path))
    return str(path)


def d2_cfg(inner: str, weights: str):
    cfg = get_cfg()
    add_crm_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "CRMRefinedModel"
    cfg.MODEL.CRM.INNER_META_ARCHITECTURE = inner
    cfg.MODEL.CRM.WEIGHTS = weights
    cfg.MODEL.DEVICE = "cpu"
    return cfg


# --------------------------------------------------------------------------------------------
# Construction, training, checkpoints
# --------------------------------------------------------------------------------------------
def test_from_config_builds_inner_model_and_frozen_refiner(crm_checkpoint):
    cfg = d2_cfg("CRMTestPanopticFPN", crm_checkpoint)
    cfg.MODEL.CRM.SCALES = [0.5, 1.0]
    cfg.MODEL.CRM.EXCLUSIVE_INSTANCES = "auto"
    cfg.MODEL.CRM.VOID_ID = -1
    model = build_model(cfg)
    assert isinstance(model, CRMRefinedModel)
    assert type(model.model) is CRMTestPanopticFPN
    assert model.refiner.scales == (0.5, 1.0)
    assert model.refiner.autocast == "auto"  # MODEL.CRM.AUTOCAST's default
    assert model.options.exclusive is None and model.options.void_id == -1
    assert not any(k.startswith("refiner") for k in model.state_dict())
    assert set(model.state_dict()) == {"model.weight"}
    cfg.MODEL.CRM.AUTOCAST = "none"
    assert build_model(cfg).refiner.autocast is None
    assert not model.refiner.flip  # MODEL.CRM.FLIP's default
    cfg.MODEL.CRM.FLIP = True
    assert build_model(cfg).refiner.flip
    assert model.refiner.guided_blend == 0.0  # GUIDED_BLEND -1: the checkpoint's (none stored)
    cfg.MODEL.CRM.GUIDED_BLEND = 0.5
    assert build_model(cfg).refiner.guided_blend == 0.5
    cfg.MODEL.CRM.GUIDED_BLEND = 1.5
    with pytest.raises(ValueError, match="GUIDED_BLEND must be in"):
        build_model(cfg)
    cfg.MODEL.CRM.GUIDED_BLEND = -1.0
    cfg.MODEL.CRM.REFINER, cfg.MODEL.CRM.WEIGHTS = "guided_filter", ""
    with pytest.raises(ValueError, match="MODEL.CRM.FLIP is CRM's"):
        build_model(cfg)
    model.train()
    assert model.model.training
    assert not model.refiner.model.training
    assert all(not p.requires_grad for p in model.refiner.model.parameters())


def test_from_config_errors(crm_checkpoint, monkeypatch):
    with pytest.raises(ValueError, match="INNER_META_ARCHITECTURE is empty"):
        build_model(d2_cfg("", crm_checkpoint))
    with pytest.raises(ValueError, match="cannot be CRMRefinedModel"):
        build_model(d2_cfg("CRMRefinedModel", crm_checkpoint))
    monkeypatch.setattr("crm_d2.weights.default_weights_path", lambda: None)
    with pytest.raises(ValueError, match="MODEL.CRM.WEIGHTS is not set.*model_45705"):
        build_model(d2_cfg("CRMTestPanopticFPN", ""))


def test_option_parsing():
    assert parse_exclusive(None) is None and parse_exclusive("auto") is None
    assert parse_exclusive(True) is True and parse_exclusive("false") is False
    assert parse_void_id("auto") is None and parse_void_id("-1") == -1 and parse_void_id(0) == 0
    with pytest.raises(ValueError, match="EXCLUSIVE_INSTANCES"):
        parse_exclusive("sometimes")
    with pytest.raises(ValueError, match="VOID_ID"):
        parse_void_id(5)


def test_training_delegates_to_inner_model():
    refiner = GrowRefiner()
    model = wrap(CRMTestPanopticFPN, refiner).train()
    losses = model(inputs_for(n=2))
    assert set(losses) == {"loss_dummy"}
    assert float(losses["loss_dummy"]) == 6.0
    losses["loss_dummy"].backward()
    assert torch.equal(model.model.weight.grad, torch.full((3,), 2.0))
    assert refiner.calls == 0


def test_inner_checkpoint_loads_into_wrapper(tmp_path, crm_checkpoint):
    inner = CRMTestPanopticFPN()
    with torch.no_grad():
        inner.weight.copy_(torch.tensor([1.5, -2.0, 3.0]))
    path = tmp_path / "inner.pth"
    torch.save({"model": inner.state_dict()}, path)
    model = build_model(d2_cfg("CRMTestPanopticFPN", crm_checkpoint))
    DetectionCheckpointer(model).load(str(path))
    assert torch.equal(model.model.weight.detach(), torch.tensor([1.5, -2.0, 3.0]))
    # the wrapper's own checkpoints (prefixed keys) load too
    model.load_state_dict({"model.weight": torch.zeros(3)})
    assert torch.equal(model.model.weight.detach(), torch.zeros(3))


# --------------------------------------------------------------------------------------------
# Output formats
# --------------------------------------------------------------------------------------------
def test_panoptic_fpn_format_and_known_answer():
    model = wrap(CRMTestPanopticFPN)
    inner = model.model.output()
    (out,) = model(inputs_for())
    assert set(out) == {"sem_seg", "instances", "panoptic_seg"}
    # sem_seg untouched (same tensor values)
    assert torch.equal(out["sem_seg"], inner["sem_seg"])
    # instances: overlapping masks -> each replaced by its refinement; type kept
    inst = out["instances"]
    assert set(inst.get_fields()) == {"pred_boxes", "scores", "pred_classes", "pred_masks"}
    assert inst.pred_masks.dtype == torch.bool
    want = dilate(torch.stack([THING, INST1]))
    assert torch.equal(inst.pred_masks, want)
    assert inst.pred_boxes.tensor.tolist() == [tight_box(want[0]), tight_box(want[1])]
    assert torch.equal(inst.scores, inner["instances"].scores)
    assert torch.equal(inst.pred_classes, inner["instances"].pred_classes)
    # panoptic: ids, dtype, void 0, fields kept, stuff area recomputed
    pan, info = out["panoptic_seg"]
    assert pan.dtype == torch.int32
    assert torch.equal(pan, expected_panoptic(stuff_id=1, thing_id=2))
    assert info == [
        {"id": 1, "isthing": False, "category_id": 5, "area": int((pan == 1).sum())},
        {"id": 2, "isthing": True, "score": 0.9, "category_id": 3, "instance_id": 0},
    ]
    assert info[0]["area"] == H * (48 + GROW)


def test_panoptic_fcn_format():
    model = wrap(CRMTestPanopticFCN)
    (out,) = model(inputs_for())
    inst = out["instances"]
    assert isinstance(inst.pred_masks, BitMasks)
    assert inst.pred_classes.dtype == torch.int32
    assert torch.equal(inst.pred_masks.tensor, dilate(torch.stack([THING, INST1])))
    assert torch.equal(inst.pred_boxes.tensor, inst.pred_masks.get_bounding_boxes().tensor)
    assert out["sem_seg"].shape == (54, H, W)
    pan, info = out["panoptic_seg"]
    assert torch.equal(pan, expected_panoptic(stuff_id=2, thing_id=1))
    assert [s["id"] for s in info] == [1, 2] and "score" in info[0] and "area" in info[1]


def test_panoptic_fcn_empty_instances_unchanged():
    model = wrap(CRMTestPanopticFCN)
    empty = Instances((H, W), pred_masks=[], pred_boxes=[], pred_classes=[], scores=[])
    out = model.refine_output({"instances": empty}, torch.zeros(3, H, W))
    assert out["instances"] is empty


def test_entityseg_format_exclusive_known_answer():
    model = wrap(CRMTestEntitySeg)
    inner = model.model.output()["instances"]
    (out,) = model(inputs_for())
    assert set(out) == {"instances"}
    inst = out["instances"]
    assert set(inst.get_fields()) == set(inner.get_fields())
    assert inst.pred_masks.dtype == torch.float32
    assert set(inst.pred_masks.unique().tolist()) <= {0.0, 1.0}
    # both grow by GROW px; the gap columns 40-41 are claimed by both (tie): they stay empty
    want = dilate(torch.stack([ENT_A, ENT_B]))
    want[:, :, 40:42] = False
    assert torch.equal(inst.pred_masks.bool(), want)
    assert int(inst.pred_masks.sum(0).max()) == 1  # still non-overlapping
    assert inst.pred_boxes.tensor.tolist() == [tight_box(want[0]), tight_box(want[1])]
    for name in ("pred_masks_score", "scores", "pred_classes", "ori_scores"):
        assert torch.equal(inst.get(name), inner.get(name))


def test_exclusive_option_forces_mode():
    # forced non-exclusive: the gap columns go to both masks (they overlap afterwards)
    model = wrap(CRMTestEntitySeg, exclusive=False)
    (out,) = model(inputs_for())
    assert torch.equal(out["instances"].pred_masks.bool(), dilate(torch.stack([ENT_A, ENT_B])))
    # forced exclusive on overlapping masks is refused
    model = wrap(CRMTestPanopticFPN, exclusive=True, refine_panoptic=False)
    with pytest.raises(ValueError, match="overlap"):
        model(inputs_for())


def test_mask2former_entries_without_score_or_area():
    model = wrap(CRMTestMask2Former)
    (out,) = model(inputs_for())
    pan, info = out["panoptic_seg"]
    assert torch.equal(pan, expected_panoptic(stuff_id=1, thing_id=2))
    assert info == [
        {"id": 1, "isthing": False, "category_id": 90},
        {"id": 2, "isthing": True, "category_id": 3},
    ]
    assert out["sem_seg"].shape == (133, H, W)


def test_void_minus_one_detected_and_kept():
    model = wrap(CRMTestVoidMinusOne)
    (out,) = model(inputs_for())
    pan, info = out["panoptic_seg"]
    assert torch.equal(pan, expected_panoptic(stuff_id=0, thing_id=1, void=-1))
    assert [s["id"] for s in info] == [0, 1]
    # a wrong explicit void id is refused by the fusion (0 is a segment id here)
    with pytest.raises(ValueError, match="void id 0"):
        wrap(CRMTestVoidMinusOne, void_id=0)(inputs_for())


def test_segment_left_without_pixels_is_dropped():
    class ClaimRoi(GrowRefiner):
        def refine_tensors(self, image, mask, scales=None, exact=False):
            return torch.full(mask[:, 0].shape, 0.9)  # p = 0.9 on the whole ROI

    model = wrap(CRMTestPanopticFPN, ClaimRoi(), refine_instances=False)
    pan, info = model.model.output()["panoptic_seg"]
    pan = pan.clone()
    pan[49:51, 60:62] = 3  # 4-px thing just below THING: too small to refine, in THING's ROI
    info = [*info, {"id": 3, "isthing": True, "score": 0.1, "category_id": 1, "instance_id": 1}]
    new_pan, new_info = model.refine_output({"panoptic_seg": (pan, info)}, torch.zeros(3, H, W))[
        "panoptic_seg"
    ]
    assert 3 not in new_pan.unique().tolist()
    assert [s["id"] for s in new_info] == [1, 2]
    # the stuff (0.9 * 0.51 < 0.5) never wins: its pixels and area are unchanged
    assert torch.equal(new_pan == 1, STUFF)
    assert new_info[0]["area"] == int(STUFF.sum())


def test_score_reweight_multiplies_by_mean_refined_prob():
    model = wrap(CRMTestPanopticFPN, GrowRefiner(value=0.8), score_reweight=True)
    (out,) = model(inputs_for())
    assert torch.allclose(out["instances"].scores, torch.tensor([0.9, 0.6]) * 0.8)
    model = wrap(CRMTestPanopticFPN, GrowRefiner(value=0.8))
    (out,) = model(inputs_for())
    assert torch.equal(out["instances"].scores, torch.tensor([0.9, 0.6]))


def test_eval_both_returns_inner_outputs():
    model = wrap(CRMTestPanopticFPN, eval_both=True)
    (out,) = model(inputs_for())
    inner = out[INNER_KEY]
    assert set(inner) == {"sem_seg", "instances", "panoptic_seg"}
    assert torch.equal(inner["instances"].pred_masks, torch.stack([THING, INST1]))
    assert torch.equal(inner["panoptic_seg"][0], model.model.output()["panoptic_seg"][0])
    assert not torch.equal(out["instances"].pred_masks, inner["instances"].pred_masks)
    (plain,) = wrap(CRMTestPanopticFPN)(inputs_for())
    assert INNER_KEY not in plain


def test_refine_switches():
    refiner = GrowRefiner()
    model = wrap(CRMTestPanopticFPN, refiner, refine_instances=False, refine_panoptic=False)
    inner = model.model.output()
    (out,) = model(inputs_for())
    assert refiner.calls == 0
    assert torch.equal(out["instances"].pred_masks, inner["instances"].pred_masks)
    assert torch.equal(out["panoptic_seg"][0], inner["panoptic_seg"][0])


def test_refine_semantic_keeps_format_and_argmax_follows_refinement():
    h, w = 40, 48
    fg = rect(5, 35, 5, 43, h, w)  # 1140 px; background 780 px (<= 1024, not refined)
    scores = torch.rand(3, h, w, generator=torch.Generator().manual_seed(3))
    scores[1] = torch.where(fg, 2.0, scores[1].clamp(max=0.9))
    scores[0] = torch.where(fg, scores[0], 1.5)
    model = wrap(CRMTestPanopticFPN, refine_semantic=True)
    out = model.refine_output({"sem_seg": scores}, torch.zeros(3, h, w))["sem_seg"]
    assert out.shape == scores.shape and out.dtype == scores.dtype
    assert torch.equal(out.argmax(0), dilate(fg).long())
    # every pixel's score vector is a permutation of the inner one
    assert torch.equal(out.sort(0).values, scores.sort(0).values)


def test_original_image_sources(caplog):
    model = wrap(CRMTestPanopticFPN)
    small = torch.randint(0, 256, (3, 32, 48), dtype=torch.uint8)
    original = torch.randint(0, 256, (3, H, W), dtype=torch.uint8)
    # original pixels given: used as they are
    got = model.original_image(
        {"image": small, "height": H, "width": W, "original_image": original}
    )
    assert torch.equal(got, original)
    # same size network input: BGR -> RGB, no warning
    caplog.set_level(logging.WARNING, logger="crm_d2.d2.meta_arch")
    got = model.original_image({"image": original, "height": H, "width": W})
    assert torch.equal(got, original.flip(0))
    assert not [r for r in caplog.records if r.name == "crm_d2.d2.meta_arch"]
    # smaller network input: resized back, warned once
    for _ in range(2):
        got = model.original_image({"image": small, "height": H, "width": W})
    assert got.shape == (3, H, W)
    want = F.interpolate(
        small.flip(0)[None].float(), size=(H, W), mode="bilinear", align_corners=False
    )[0]
    assert torch.allclose(got, want)
    assert len([r for r in caplog.records if "OriginalImageMapper" in r.message]) == 1


def test_timing_is_accumulated(caplog):
    model = wrap(CRMTestPanopticFPN)
    model(inputs_for(n=2))
    model(inputs_for(n=1))
    assert model.timing.images == 3
    assert model.timing.refine_seconds > 0 and model.timing.inner_seconds > 0
    caplog.set_level(logging.INFO, logger="crm_d2.d2.meta_arch")
    summary = model.log_timing()
    assert summary["images"] == 3
    assert summary["refine_s_per_image"] == pytest.approx(model.timing.refine_seconds / 3)
    assert any("CRM timing over 3 images" in r.message for r in caplog.records)
    model.reset_timing()
    assert model.timing.images == 0


def test_real_refiner_keeps_types(crm_checkpoint):
    """With a real (random, tiny) CRM: every format survives and masks stay binary."""
    cfg = d2_cfg("CRMTestEntitySeg", crm_checkpoint)
    cfg.MODEL.CRM.SCALES = [0.5, 1.0]
    cfg.MODEL.CRM.EVAL_BOTH = True
    model = build_model(cfg).eval()
    (out,) = model(inputs_for())
    masks = out["instances"].pred_masks
    assert masks.dtype == torch.float32 and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert int(masks.sum(0).max()) <= 1
    assert INNER_KEY in out


def test_panoptic_things_reuse_their_instance_refinement():
    class CountingRefiner(GrowRefiner):
        rois = 0

        def refine_tensors(self, image, mask, scales=None, exact=False):
            CountingRefiner.rois += mask.shape[0]
            return super().refine_tensors(image, mask, scales, exact)

    outs = {}
    for reuse in (True, False):
        CountingRefiner.rois = 0
        (outs[reuse],) = wrap(CRMTestPanopticFPN, CountingRefiner(), reuse_instances=reuse)(
            inputs_for())
        # 2 instances + the stuff segment, and the thing segment again only without reuse
        assert CountingRefiner.rois == (3 if reuse else 4)
    assert torch.equal(outs[True]["panoptic_seg"][0], outs[False]["panoptic_seg"][0])
    assert torch.equal(outs[True]["panoptic_seg"][0], expected_panoptic(stuff_id=1, thing_id=2))
