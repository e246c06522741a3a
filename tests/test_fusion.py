"""Tests of crm_d2.fusion: box geometry, the modified argmax, semantic <-> segments.

Hand-made cases have answers worked out in the comments; property tests (hypothesis) compare the
vectorised fusion with a literal per-pixel reading of the rule.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crm_d2.boxes import boxes_from_masks, crop, expand_box, mask_to_box
from crm_d2.fusion import (
    RefinedSegment,
    fuse_instances,
    fuse_panoptic,
    segment_areas,
    segments_to_semantic,
    semantic_to_segments,
)

PROPS = settings(max_examples=60, deadline=None)
# Probability values with repeats (ties), the 0.5 border and 1.0 (stuff at 0.51 * 1.0 > 0.5).
PROB_VALUES = [0.0, 0.25, 0.5, 0.6, 0.75, 0.9, 0.99, 1.0]


# --------------------------------------------------------------------------------------------
# mask_to_box / boxes_from_masks
# --------------------------------------------------------------------------------------------


def test_mask_to_box_known_answer():
    mask = torch.zeros(5, 6, dtype=torch.bool)
    mask[1, 2] = True
    mask[3, 4] = True
    # columns 2..4 -> x0=2, x1=5; rows 1..3 -> y0=1, y1=4
    assert mask_to_box(mask) == (2, 1, 5, 4)
    assert mask_to_box(torch.zeros(5, 6, dtype=torch.bool)) is None
    single = torch.zeros(3, 3, dtype=torch.bool)
    single[2, 2] = True
    assert mask_to_box(single) == (2, 2, 3, 3)
    with pytest.raises(ValueError, match="H, W"):
        mask_to_box(torch.zeros(1, 3, 3, dtype=torch.bool))


def test_boxes_from_masks_known_answer():
    masks = torch.zeros(3, 4, 5, dtype=torch.bool)
    masks[0, 1:3, 2:4] = True  # rows 1-2, cols 2-3 -> (2, 1, 4, 3)
    masks[2, 3, 0] = True  # one pixel at row 3, col 0 -> (0, 3, 1, 4)
    boxes = boxes_from_masks(masks)
    assert boxes.dtype == torch.float32
    expected = torch.tensor([[2, 1, 4, 3], [0, 0, 0, 0], [0, 3, 1, 4]], dtype=torch.float32)
    assert torch.equal(boxes, expected)
    assert boxes_from_masks(torch.zeros(0, 4, 5, dtype=torch.bool)).shape == (0, 4)
    with pytest.raises(ValueError, match="N, H, W"):
        boxes_from_masks(torch.zeros(4, 5, dtype=torch.bool))


@PROPS
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 5),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    density=st.sampled_from([0.0, 0.05, 0.3]),
)
def test_boxes_from_masks_matches_mask_to_box(seed, n, h, w, density):
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(n, h, w, generator=gen) < density
    boxes = boxes_from_masks(masks)
    for i in range(n):
        box = mask_to_box(masks[i])
        expected = torch.zeros(4) if box is None else torch.tensor(box, dtype=torch.float32)
        assert torch.equal(boxes[i], expected)
        if box is not None:
            x0, y0, x1, y1 = box
            # the box contains the whole mask and touches it on every side
            assert masks[i, y0:y1, x0:x1].sum() == masks[i].sum()
            assert masks[i, y0, x0:x1].any() and masks[i, y1 - 1, x0:x1].any()
            assert masks[i, y0:y1, x0].any() and masks[i, y0:y1, x1 - 1].any()


# --------------------------------------------------------------------------------------------
# expand_box
# --------------------------------------------------------------------------------------------


def test_expand_box_known_answers():
    # w=8, h=4: grow by 1 px in x and 0.5 px in y per side -> (3, 3.5, 13, 8.5) -> floor/ceil
    assert expand_box((4, 4, 12, 8), (20, 20)) == (3, 3, 13, 9)
    # at the border: (-1, -0.5, 9, 4.5) clipped -> (0, 0, 9, 5)
    assert expand_box((0, 0, 8, 4), (20, 20)) == (0, 0, 9, 5)
    # ratio 0: floats rounded outwards
    assert expand_box((2.5, 1.2, 6.7, 3.0), (10, 10), expand_ratio=0.0) == (2, 1, 7, 3)
    # ratio 1.0 = half the size per side: (10, 10, 14, 12) -> (8, 9, 16, 13)
    assert expand_box((10, 10, 14, 12), (40, 40), expand_ratio=1.0) == (8, 9, 16, 13)
    # min_size 6 on a 2x2 box: deficit 4 -> 2 px per side
    assert expand_box((10, 10, 12, 12), (40, 40), 0.0, min_size=6) == (8, 8, 14, 14)
    # 0.25 first gives (9.75 -> 9, 12.25 -> 13), then deficit 2 -> 1 px per side
    assert expand_box((10, 10, 12, 12), (40, 40), 0.25, min_size=6) == (8, 8, 14, 14)
    # odd deficit 3 on a 3x3 box: 1 px before, 2 px after
    assert expand_box((10, 10, 13, 13), (40, 40), 0.0, min_size=6) == (9, 9, 15, 15)
    # min_size at the corner: the span is shifted inside the image and keeps 6 px
    assert expand_box((0, 0, 2, 2), (40, 40), 0.0, min_size=6) == (0, 0, 6, 6)
    assert expand_box((38, 37, 40, 40), (40, 40), 0.0, min_size=6) == (34, 34, 40, 40)
    # min_size larger than the image: the whole image
    assert expand_box((1, 1, 3, 3), (5, 7), 0.0, min_size=10) == (0, 0, 7, 5)
    # a box sticking out of the image is clipped
    assert expand_box((-4, 2, 3, 6), (8, 8), 0.0) == (0, 2, 3, 6)


@pytest.mark.parametrize(
    ("box", "kwargs", "match"),
    [
        ((3, 3, 3, 5), {}, "empty box"),
        ((5, 3, 2, 6), {}, "empty box"),
        ((1, float("nan"), 3, 4), {}, "non-finite"),
        ((1, 2, 3), {}, "4 values"),
        ((30, 30, 35, 35), {}, "does not overlap"),
        ((1, 1, 3, 3), {"expand_ratio": -0.1}, "expand_ratio"),
        ((1, 1, 3, 3), {"min_size": -1}, "min_size"),
    ],
)
def test_expand_box_rejects_bad_input(box, kwargs, match):
    with pytest.raises(ValueError, match=match):
        expand_box(box, (10, 10), **kwargs)
    with pytest.raises(ValueError, match="image_size"):
        expand_box((1, 1, 3, 3), (0, 10))


@st.composite
def boxes_in_images(draw, allow_float=True):
    h = draw(st.integers(1, 12))
    w = draw(st.integers(1, 12))
    x0 = draw(st.integers(0, w - 1))
    y0 = draw(st.integers(0, h - 1))
    x1 = draw(st.integers(x0 + 1, w))
    y1 = draw(st.integers(y0 + 1, h))
    box = (x0, y0, x1, y1)
    if allow_float and draw(st.booleans()):
        shrink = draw(st.floats(0.0, 0.49))
        box = (x0 + shrink, y0 + shrink, x1 - shrink, y1 - shrink)
    return (h, w), box


@PROPS
@given(case=boxes_in_images(), ratio=st.floats(0.0, 1.5), min_size=st.integers(0, 15))
def test_expand_box_inside_image_and_contains_box(case, ratio, min_size):
    (h, w), box = case
    x0, y0, x1, y1 = expand_box(box, (h, w), ratio, min_size)
    assert all(isinstance(v, int) for v in (x0, y0, x1, y1))
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert x0 <= box[0] and y0 <= box[1] and x1 >= box[2] and y1 >= box[3]
    assert x1 - x0 >= min(min_size, w) and y1 - y0 >= min(min_size, h)
    # min_size only ever adds to the plain (clipped) expansion
    plain = expand_box(box, (h, w), ratio)
    assert x0 <= plain[0] and y0 <= plain[1] and x1 >= plain[2] and y1 >= plain[3]


# --------------------------------------------------------------------------------------------
# crop
# --------------------------------------------------------------------------------------------


def test_crop_known_answer():
    x = torch.arange(20).view(4, 5)
    roi = crop(x, (1, 1, 3, 3))
    assert torch.equal(roi, torch.tensor([[6, 7], [11, 12]]))
    stacked = torch.stack([x, -x])
    assert torch.equal(crop(stacked, (1, 1, 3, 3))[1], -roi)


def test_crop_rejects_bad_boxes():
    x = torch.zeros(4, 5)
    with pytest.raises(ValueError, match="not inside"):
        crop(x, (3, 0, 6, 2))
    with pytest.raises(ValueError, match="empty box"):
        crop(x, (2, 2, 2, 3))
    with pytest.raises(ValueError, match="integers"):
        crop(x, (0.5, 0, 2, 2))


# --------------------------------------------------------------------------------------------
# fuse_panoptic: hand-made cases
# --------------------------------------------------------------------------------------------


def _scene():
    """6x8 map: stuff id 1 everywhere, thing id 2 on rows 1-3 x cols 1-3, void (0) at (5, 6:8)."""
    pan = torch.ones(6, 8, dtype=torch.int32)
    pan[1:4, 1:4] = 2
    pan[5, 6:8] = 0
    info = [
        {"id": 1, "isthing": False, "category_id": 40, "area": 37},
        {"id": 2, "isthing": True, "category_id": 3, "score": 0.9, "instance_id": 0},
    ]
    return pan, info


def test_fuse_panoptic_thing_takes_stuff_pixels():
    pan, info = _scene()
    info_before = copy.deepcopy(info)
    pan_before = pan.clone()
    # thing 2 refined in box (0, 0, 5, 5): 0.95 on its own 3x3, 0.8 on three stuff pixels,
    # 0.4 elsewhere, and 0.2 on its own pixel (1, 1)
    prob = torch.full((5, 5), 0.4)
    prob[1:4, 1:4] = 0.95
    prob[1, 1] = 0.2
    for r, c in [(4, 1), (4, 2), (2, 4)]:
        prob[r, c] = 0.8
    # stuff 1 refined over the whole image at 0.9: 0.9 * 0.51 = 0.459 < 0.5, it takes nothing
    refined = [
        RefinedSegment(2, prob, (0, 0, 5, 5), isthing=True),
        RefinedSegment(1, torch.full((6, 8), 0.9), (0, 0, 8, 6), isthing=False),
    ]
    out, out_info = fuse_panoptic(pan, info, refined)

    expected = pan_before.clone()
    for r, c in [(4, 1), (4, 2), (2, 4)]:
        expected[r, c] = 2
    # (1, 1): thing 0.2, stuff 0.459 -> nobody exceeds 0.5, keeps its input label 2
    assert torch.equal(out, expected)
    assert out.dtype == torch.int32
    # stuff area 37 - 3 = 34 is recomputed; the thing entry has no area and is unchanged
    assert out_info == [
        {"id": 1, "isthing": False, "category_id": 40, "area": 34},
        {"id": 2, "isthing": True, "category_id": 3, "score": 0.9, "instance_id": 0},
    ]
    # inputs untouched
    assert torch.equal(pan, pan_before)
    assert info == info_before
    assert out_info[1] is not info[1]


def test_fuse_panoptic_stuff_factor_border():
    pan, info = _scene()
    # stuff 1 over the void pixels: 0.99 * 0.51 = 0.5049 > 0.5 wins (5, 6);
    # 0.98 * 0.51 = 0.4998 loses (5, 7)
    prob = torch.tensor([[0.99, 0.98]])
    out, out_info = fuse_panoptic(pan, info, [RefinedSegment(1, prob, (6, 5, 8, 6), False)])
    assert out[5, 6] == 1 and out[5, 7] == 0
    assert out_info[0]["area"] == 38
    # with stuff_factor 1.0 both win
    out, _ = fuse_panoptic(
        pan, info, [RefinedSegment(1, prob, (6, 5, 8, 6), False)], stuff_factor=1.0
    )
    assert out[5, 6] == 1 and out[5, 7] == 1


def test_fuse_panoptic_ties_keep_input_label_and_order_does_not_matter():
    pan = torch.ones(3, 4, dtype=torch.int32)  # stuff 1 everywhere
    pan[0, 0] = 2
    pan[2, 3] = 3
    info = [
        {"id": 1, "isthing": False, "category_id": 7},
        {"id": 2, "isthing": True, "category_id": 1},
        {"id": 3, "isthing": True, "category_id": 2},
    ]
    # both things refined over the whole image
    p2 = torch.tensor([[0.9, 0.7, 0.8, 0.3], [0.7, 0.6, 0.5, 0.0], [0.0, 0.0, 0.0, 0.1]])
    p3 = torch.tensor([[0.1, 0.7, 0.7, 0.3], [0.7, 0.6, 0.55, 0.0], [0.0, 0.0, 0.0, 0.9]])
    box = (0, 0, 4, 3)
    refined = [RefinedSegment(2, p2, box), RefinedSegment(3, p3, box)]
    out, _ = fuse_panoptic(pan, info, refined)
    expected = torch.tensor([[2, 1, 2, 1], [1, 1, 3, 1], [1, 1, 1, 3]], dtype=torch.int32)
    # (0,1), (1,0), (1,1): ties 0.7/0.7/0.6 -> stuff stays; (0,2): 0.8 > 0.7 -> 2;
    # (1,2): 0.55 > 0.5 = p2 -> 3; (0,3): both 0.3 -> stays 1
    assert torch.equal(out, expected)
    out_reversed, _ = fuse_panoptic(pan, info, refined[::-1])
    assert torch.equal(out_reversed, expected)


def test_fuse_panoptic_tie_at_init_confidence_does_not_win():
    pan = torch.zeros(1, 3, dtype=torch.int32)
    info = [{"id": 5, "isthing": True, "category_id": 0}]
    out, out_info = fuse_panoptic(
        pan, info, [RefinedSegment(5, torch.tensor([[0.5, 0.51, 0.49]]), (0, 0, 3, 1))]
    )
    assert out.tolist() == [[0, 5, 0]]
    assert out_info == info


@pytest.mark.parametrize("void_id", [0, -1])
def test_fuse_panoptic_void_handling(void_id):
    # with void -1, id 0 is an ordinary segment
    a, b = (1, 2) if void_id == 0 else (0, 1)
    pan = torch.full((2, 4), void_id, dtype=torch.int64)
    pan[0, 0] = a
    pan[1, 3] = b
    info = [
        {"id": a, "isthing": True, "category_id": 0, "area": 1},
        {"id": b, "isthing": False, "category_id": 9, "area": 1},
    ]
    prob = torch.tensor([[0.9, 0.6, 0.5, 0.2], [0.7, 0.4, 0.8, 0.3]])
    out, out_info = fuse_panoptic(
        pan, info, [RefinedSegment(a, prob, (0, 0, 4, 2))], void_id=void_id
    )
    v = void_id
    # void pixels above 0.5 are claimed; 0.5 and below stay void; b keeps its pixel (0.3)
    assert out.tolist() == [[a, a, v, v], [a, v, a, b]]
    assert out.dtype == torch.int64
    assert out_info == [
        {"id": a, "isthing": True, "category_id": 0, "area": 4},
        {"id": b, "isthing": False, "category_id": 9, "area": 1},
    ]
    assert segment_areas(out, info) == {a: 4, b: 1}


def test_fuse_panoptic_unknown_ids_are_void_and_kept():
    # detectron2: a pixel whose id is not in segments_info is void
    pan = torch.tensor([[7, 7, 1]], dtype=torch.int32)
    info = [{"id": 1, "isthing": True, "category_id": 0}]
    out, out_info = fuse_panoptic(
        pan, info, [RefinedSegment(1, torch.tensor([[0.9, 0.1, 0.9]]), (0, 0, 3, 1))]
    )
    assert out.tolist() == [[1, 7, 1]]
    assert out_info == info


def test_fuse_panoptic_drops_vanished_segment_and_keeps_order():
    pan = torch.ones(4, 4, dtype=torch.int32)
    pan[0, 0:2] = 3  # small thing 3, 2 px, not refined
    pan[2:4, 2:4] = 2
    info = [
        {"id": 3, "isthing": True, "category_id": 5, "score": 0.3},
        {"id": 1, "isthing": False, "category_id": 40, "area": 10},
        {"id": 2, "isthing": True, "category_id": 3, "score": 0.8},
    ]
    prob = torch.zeros(4, 4)
    prob[0, 0:2] = 0.9  # thing 2 covers thing 3 entirely
    prob[2:4, 2:4] = 0.9
    out, out_info = fuse_panoptic(pan, info, [RefinedSegment(2, prob, (0, 0, 4, 4))])
    assert not bool((out == 3).any())
    assert [s["id"] for s in out_info] == [1, 2]
    assert out_info[0]["area"] == 10
    assert out_info[1] == info[2]


def test_fuse_panoptic_without_refinement_is_identity():
    pan, info = _scene()
    out, out_info = fuse_panoptic(pan, info, [])
    assert torch.equal(out, pan)
    # the stuff area is recomputed from the map (48 - 9 - 2 = 37)
    assert out_info == info


def test_fuse_panoptic_rejects_bad_input():
    pan, info = _scene()
    good = RefinedSegment(2, torch.zeros(2, 3), (0, 0, 3, 2))
    with pytest.raises(ValueError, match="not in segments_info"):
        fuse_panoptic(pan, info, [RefinedSegment(9, torch.zeros(2, 3), (0, 0, 3, 2))])
    with pytest.raises(ValueError, match="more than once"):
        fuse_panoptic(pan, info, [good, good])
    with pytest.raises(ValueError, match="does not match its box"):
        fuse_panoptic(pan, info, [RefinedSegment(2, torch.zeros(3, 2), (0, 0, 3, 2))])
    with pytest.raises(ValueError, match="not inside"):
        fuse_panoptic(pan, info, [RefinedSegment(2, torch.zeros(2, 3), (6, 0, 9, 2))])
    with pytest.raises(ValueError, match="H, W"):
        fuse_panoptic(pan[None], info, [])
    with pytest.raises(ValueError, match="integer"):
        fuse_panoptic(pan.float(), info, [])
    with pytest.raises(ValueError, match="duplicate"):
        fuse_panoptic(pan, info + [dict(info[0])], [])
    with pytest.raises(ValueError, match="void id"):
        fuse_panoptic(pan, info + [{"id": 0, "isthing": False, "category_id": 1}], [])


# --------------------------------------------------------------------------------------------
# fuse_panoptic: properties against a literal per-pixel reading of the rule
# --------------------------------------------------------------------------------------------


def _naive_argmax(labels, candidates, init_confidence):
    """Per pixel: the candidate whose prob > init and > every other candidate prob, else input.

    candidates: (label, prob (h, w) float32 tensor, (x0, y0, x1, y1)).
    """
    out = labels.clone()
    height, width = labels.shape
    for y in range(height):
        for x in range(width):
            scores = [
                (float(p[y - b[1], x - b[0]]), lab)
                for lab, p, b in candidates
                if b[0] <= x < b[2] and b[1] <= y < b[3]
            ]
            if not scores:
                continue
            top = max(s for s, _ in scores)
            winners = [lab for s, lab in scores if s == top]
            if top > init_confidence and len(winners) == 1:
                out[y, x] = winners[0]
    return out


@st.composite
def panoptic_cases(draw):
    h = draw(st.integers(1, 12))
    w = draw(st.integers(1, 12))
    void_id = draw(st.sampled_from([0, -1]))
    k = draw(st.integers(0, 4))
    ids = list(range(1, k + 1)) if void_id == 0 else list(range(k))
    values = draw(st.lists(st.sampled_from([void_id, *ids]), min_size=h * w, max_size=h * w))
    pan = torch.tensor(values, dtype=torch.int32).view(h, w)
    info = []
    for sid in ids:
        entry = {"id": sid, "isthing": draw(st.booleans()), "category_id": sid + 100}
        if draw(st.booleans()):
            entry["area"] = -1  # stale on purpose: must be recomputed
        if entry["isthing"]:
            entry["score"] = 0.5
        info.append(entry)
    refined_ids = draw(st.lists(st.sampled_from(ids), unique=True)) if ids else []
    refined = []
    for sid in refined_ids:
        x0 = draw(st.integers(0, w - 1))
        y0 = draw(st.integers(0, h - 1))
        x1 = draw(st.integers(x0 + 1, w))
        y1 = draw(st.integers(y0 + 1, h))
        n = (y1 - y0) * (x1 - x0)
        probs = draw(st.lists(st.sampled_from(PROB_VALUES), min_size=n, max_size=n))
        prob = torch.tensor(probs, dtype=torch.float32).view(y1 - y0, x1 - x0)
        isthing = next(e["isthing"] for e in info if e["id"] == sid)
        refined.append(RefinedSegment(sid, prob, (x0, y0, x1, y1), isthing))
    stuff_factor = draw(st.sampled_from([0.51, 1.0]))
    return pan, info, refined, void_id, stuff_factor


@PROPS
@given(case=panoptic_cases())
def test_fuse_panoptic_properties(case):
    pan, info, refined, void_id, stuff_factor = case
    out, out_info = fuse_panoptic(pan, info, refined, stuff_factor=stuff_factor, void_id=void_id)
    assert out.shape == pan.shape and out.dtype == pan.dtype

    info_ids = {s["id"] for s in info}
    out_ids = [s["id"] for s in out_info]
    # every pixel is void or a segment of the input; no id invented
    assert set(out.unique().tolist()) <= info_ids | {void_id}
    # ids in the map == ids in segments_info; order preserved (a subsequence of the input)
    assert set(out_ids) == set(out.unique().tolist()) - {void_id}
    assert out_ids == [s["id"] for s in info if s["id"] in set(out_ids)]
    for entry in out_info:
        original = next(s for s in info if s["id"] == entry["id"])
        assert set(entry) == set(original)
        for key, value in original.items():
            if key == "area":
                assert entry["area"] == int((out == entry["id"]).sum())
            else:
                assert entry[key] == value

    # a pixel changes label only where the winner's scaled prob beats init and every rival
    scaled = [(r.segment_id, r.prob * (1.0 if r.isthing else stuff_factor), r.box) for r in refined]
    changed = (out != pan).nonzero().tolist()
    for y, x in changed:
        scores = {
            sid: float(p[y - b[1], x - b[0]])
            for sid, p, b in scaled
            if b[0] <= x < b[2] and b[1] <= y < b[3]
        }
        winner = int(out[y, x])
        assert scores[winner] > 0.5
        assert all(scores[winner] > s for sid, s in scores.items() if sid != winner)
    # and exactly the literal per-pixel rule
    assert torch.equal(out, _naive_argmax(pan, scaled, 0.5))


@PROPS
@given(case=panoptic_cases(), ratio=st.sampled_from([0.0, 0.25, 1.0]))
def test_fuse_panoptic_with_coarse_masks_as_probs_is_identity(case, ratio):
    pan, info, _, void_id, _ = case
    refined = []
    for entry in info:
        mask = pan == entry["id"]
        tight = mask_to_box(mask)
        if tight is None:
            continue
        box = expand_box(tight, tuple(pan.shape), ratio)
        refined.append(RefinedSegment(entry["id"], crop(mask.float(), box), box, entry["isthing"]))
    out, out_info = fuse_panoptic(pan, info, refined, stuff_factor=1.0, void_id=void_id)
    assert torch.equal(out, pan)
    present = set(pan.unique().tolist())
    assert [s["id"] for s in out_info] == [s["id"] for s in info if s["id"] in present]


# --------------------------------------------------------------------------------------------
# fuse_instances
# --------------------------------------------------------------------------------------------


def test_fuse_instances_non_exclusive_known_answer():
    masks = torch.zeros(2, 5, 5, dtype=torch.bool)
    masks[0, 0:3, 0:3] = True
    masks[1, 2:5, 2:5] = True  # overlaps instance 0 at (2, 2)
    prob = torch.tensor([[0.9, 0.5, 0.2], [0.6, 0.51, 0.0], [0.7, 0.8, 1.0]])
    out = fuse_instances(masks, [RefinedSegment(0, prob, (1, 1, 4, 4))], exclusive=False)
    expected0 = torch.zeros(5, 5, dtype=torch.bool)
    expected0[1:4, 1:4] = prob > 0.5  # 0.5 exactly is not > threshold
    # (0, 0) was in the mask but outside the box: now False
    assert torch.equal(out[0], expected0)
    assert torch.equal(out[1], masks[1])  # not refined: untouched, overlap allowed
    out_t = fuse_instances(
        masks, [RefinedSegment(0, prob, (1, 1, 4, 4))], exclusive=False, threshold=0.75
    )
    assert int(out_t[0].sum()) == 3  # 0.9, 0.8, 1.0


def test_fuse_instances_exclusive_known_answer():
    # labels: instance 0 on column 0-1, instance 1 on column 2-3, background on column 4
    masks = torch.zeros(2, 2, 5, dtype=torch.bool)
    masks[0, :, 0:2] = True
    masks[1, :, 2:4] = True
    p0 = torch.tensor([[0.3, 0.9, 0.8, 0.9, 0.7], [0.9, 0.9, 0.2, 0.7, 0.5]])
    p1 = torch.tensor([[0.0, 0.95, 0.9, 0.7], [0.0, 0.0, 0.4, 0.4]])
    refined = [
        RefinedSegment(0, p0, (0, 0, 5, 2)),
        RefinedSegment(1, p1, (1, 0, 5, 2)),  # box starts at column 1
    ]
    out = fuse_instances(masks, refined, exclusive=True)
    # p1 column j is image column j + 1. Row 0: col 0 0.3 alone -> keeps 0; col 1 0.9 vs 0.0
    # -> 0; col 2 0.8 vs 0.95 -> 1; col 3 0.9 vs 0.9 tie -> keeps 1; col 4 0.7 vs 0.7 tie ->
    # background stays. Row 1: col 0-1 0.9 -> 0; col 2 0.2 vs 0.0 -> keeps 1; col 3 0.7 vs 0.4
    # -> 0 (taken from instance 1); col 4 0.5 vs 0.4 -> background stays.
    labels = torch.tensor([[0, 0, 1, 1, 2], [0, 0, 1, 0, 2]])
    expected = torch.stack([labels == 0, labels == 1])
    assert torch.equal(out, expected)
    assert int(out.sum(dim=0).max()) == 1
    out_reversed = fuse_instances(masks, refined[::-1], exclusive=True)
    assert torch.equal(out_reversed, expected)


def test_fuse_instances_rejects_bad_input():
    masks = torch.zeros(2, 3, 3, dtype=torch.bool)
    prob = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="bool"):
        fuse_instances(masks.float(), [], exclusive=False)
    with pytest.raises(ValueError, match="outside"):
        fuse_instances(masks, [RefinedSegment(2, prob, (0, 0, 3, 3))], exclusive=False)
    with pytest.raises(ValueError, match="more than once"):
        fuse_instances(
            masks,
            [RefinedSegment(1, prob, (0, 0, 3, 3)), RefinedSegment(1, prob, (0, 0, 3, 3))],
            exclusive=True,
        )
    with pytest.raises(ValueError, match="does not match"):
        fuse_instances(masks, [RefinedSegment(0, prob, (0, 0, 2, 3))], exclusive=False)
    overlapping = masks.clone()
    overlapping[:, 1, 1] = True
    with pytest.raises(ValueError, match="non-overlapping"):
        fuse_instances(overlapping, [], exclusive=True)
    assert fuse_instances(torch.zeros(0, 3, 3, dtype=torch.bool), [], exclusive=True).shape == (
        0,
        3,
        3,
    )


@st.composite
def instance_cases(draw):
    h = draw(st.integers(1, 12))
    w = draw(st.integers(1, 12))
    n = draw(st.integers(0, 4))
    values = draw(st.lists(st.integers(0, n), min_size=h * w, max_size=h * w))  # n = background
    labels = torch.tensor(values, dtype=torch.int64).view(h, w)
    masks = labels.unsqueeze(0) == torch.arange(n).view(n, 1, 1)
    refined = []
    indices = draw(st.lists(st.integers(0, n - 1), unique=True)) if n else []
    for idx in indices:
        x0 = draw(st.integers(0, w - 1))
        y0 = draw(st.integers(0, h - 1))
        x1 = draw(st.integers(x0 + 1, w))
        y1 = draw(st.integers(y0 + 1, h))
        k = (y1 - y0) * (x1 - x0)
        probs = draw(st.lists(st.sampled_from(PROB_VALUES), min_size=k, max_size=k))
        prob = torch.tensor(probs, dtype=torch.float32).view(y1 - y0, x1 - x0)
        refined.append(RefinedSegment(idx, prob, (x0, y0, x1, y1)))
    return labels, masks, refined


@PROPS
@given(case=instance_cases())
def test_fuse_instances_exclusive_properties(case):
    labels, masks, refined = case
    n = masks.shape[0]
    out = fuse_instances(masks, refined, exclusive=True)
    assert out.shape == masks.shape and out.dtype == torch.bool
    if n:
        assert int(out.sum(dim=0).max()) <= 1  # never overlap
    expected_labels = _naive_argmax(labels, [(r.segment_id, r.prob, r.box) for r in refined], 0.5)
    expected = expected_labels.unsqueeze(0) == torch.arange(n).view(n, 1, 1)
    assert torch.equal(out, expected)
    # with the coarse masks as probabilities nothing changes
    same = []
    for i in range(n):
        box = mask_to_box(masks[i])
        if box is not None:
            same.append(RefinedSegment(i, crop(masks[i].float(), box), box))
    assert torch.equal(fuse_instances(masks, same, exclusive=True), masks)


@PROPS
@given(case=instance_cases(), threshold=st.sampled_from([0.5, 0.75]))
def test_fuse_instances_non_exclusive_properties(case, threshold):
    _, masks, refined = case
    out = fuse_instances(masks, refined, exclusive=False, threshold=threshold)
    refined_by_idx = {r.segment_id: r for r in refined}
    for i in range(masks.shape[0]):
        if i in refined_by_idx:
            r = refined_by_idx[i]
            x0, y0, x1, y1 = r.box
            expected = torch.zeros_like(masks[i])
            expected[y0:y1, x0:x1] = r.prob > threshold
            assert torch.equal(out[i], expected)
        else:
            assert torch.equal(out[i], masks[i])


# --------------------------------------------------------------------------------------------
# semantic_to_segments / segments_to_semantic / segment_areas
# --------------------------------------------------------------------------------------------


def test_semantic_to_segments_known_answer():
    sem = torch.tensor(
        [
            [1, 1, 0, 2],
            [0, 0, 0, 2],
            [1, 255, 1, 2],
        ]
    )
    ids, info = semantic_to_segments(sem, min_area=2)
    assert ids.dtype == torch.int32
    # class 0: one component of 4 px; class 1: three components (2, 1, 1 px); class 2: 3 px
    by_class = {}
    for s in info:
        by_class.setdefault(s["category_id"], []).append(s["area"])
        assert s["isthing"] is False
        assert s["refine"] == (s["area"] > 2)
        assert int((ids == s["id"]).sum()) == s["area"]
    assert {c: sorted(a) for c, a in by_class.items()} == {0: [4], 1: [1, 1, 2], 2: [3]}
    assert [s["id"] for s in info] == [1, 2, 3, 4, 5]
    assert [s["category_id"] for s in info] == [0, 1, 1, 1, 2]
    assert ids[2, 1] == 0  # ignore label
    assert torch.equal(segments_to_semantic(ids, info), sem)


def test_semantic_to_segments_connectivity():
    sem = torch.tensor([[3, 0], [0, 3]])
    _, info8 = semantic_to_segments(sem, connectivity=8)
    _, info4 = semantic_to_segments(sem, connectivity=4)
    assert sorted(s["category_id"] for s in info8) == [0, 3]
    assert sorted(s["category_id"] for s in info4) == [0, 0, 3, 3]
    with pytest.raises(ValueError, match="connectivity"):
        semantic_to_segments(sem, connectivity=6)
    with pytest.raises(ValueError, match="integer"):
        semantic_to_segments(sem.float())


def test_segments_to_semantic_unknown_ids_are_ignored():
    pan = torch.tensor([[0, 4, 9], [4, -1, 2]], dtype=torch.int32)
    info = [{"id": 4, "category_id": 11}, {"id": 2, "category_id": 7}]
    sem = segments_to_semantic(pan, info, ignore_label=-5)
    assert sem.tolist() == [[-5, 11, -5], [11, -5, 7]]
    assert segments_to_semantic(pan, [], ignore_label=255).unique().tolist() == [255]


@PROPS
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    connectivity=st.sampled_from([4, 8]),
)
def test_semantic_segments_roundtrip_and_scipy_reference(h, w, seed, connectivity):
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(seed)
    sem_np = rng.choice(np.array([0, 1, 2, 255]), size=(h, w))
    sem = torch.from_numpy(sem_np)
    ids, info = semantic_to_segments(sem, connectivity=connectivity, min_area=3)
    assert torch.equal(segments_to_semantic(ids, info), sem)
    assert [s["id"] for s in info] == list(range(1, len(info) + 1))
    assert sum(s["area"] for s in info) == int((sem_np != 255).sum())
    structure = np.ones((3, 3)) if connectivity == 8 else None
    for cls in (0, 1, 2):
        _, count = ndimage.label(sem_np == cls, structure=structure)
        ours = [s for s in info if s["category_id"] == cls]
        assert len(ours) == count
        for s in ours:
            # each of our components is one scipy component
            comp = (ids == s["id"]).numpy()
            _, num = ndimage.label(comp, structure=structure)
            assert num == 1 and s["area"] == int(comp.sum())
            assert s["refine"] == (s["area"] > 3)


def test_segment_areas():
    pan = torch.tensor([[1, 1, 0], [2, 1, 0]])
    assert segment_areas(pan, [{"id": 2}, {"id": 1}, {"id": 7}]) == {2: 1, 1: 3, 7: 0}
