"""The coarse-mask vocabulary (crm_d2.coarse): parsing, each kind's rendering, mixes."""

from __future__ import annotations

import collections

import cv2
import numpy as np
import pytest

from crm_d2.coarse import CoarseKind, CoarseMix, binary_iou, parse_kinds, render_stride
from crm_d2.coarse.kinds import render_maskrcnn


def _circle(h=224, w=224, center=(112, 112), radius=60) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.circle(m, center, radius, 255, -1)
    return m


def _rect(h=160, w=200) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[30:120, 40:170] = 255
    return m


def test_parse_names_round_trip():
    for text in ("perturb", "perturb:0.6-0.9", "stride4", "stride8_binary", "stride8_t0.4",
                 "stride16_binary", "maskrcnn", "maskrcnn:14", "shift", "dilate"):
        kind = CoarseKind.parse(text)
        assert kind.name == text and CoarseKind.parse(kind.name) == kind
    assert CoarseKind.parse("stride8").binary is False
    assert CoarseKind.parse("stride8_binary").binary and CoarseKind.parse("maskrcnn").binary
    assert CoarseKind.parse("perturb").random and not CoarseKind.parse("maskrcnn").random


@pytest.mark.parametrize("bad", ["blur", "stride1", "stride8_t1.5", "stride8_binaryx",
                                 "perturb:0.9", "perturb:0.9-0.5", "maskrcnn:1", "shift:3", ""])
def test_parse_rejects_with_the_accepted_forms(bad):
    with pytest.raises(ValueError, match="stride<K>"):
        CoarseKind.parse(bad)


@pytest.mark.parametrize("old, new", [("contour", "perturb"), ("lowres:8", "stride<K>"),
                                      ("lowres_binary", "stride8_binary"), ("mixed", "perturb")])
def test_legacy_names_say_the_new_name(old, new):
    with pytest.raises(ValueError, match="renamed") as e:
        CoarseKind.parse(old)
    assert new in str(e.value)


def test_stride_known_answer():
    gt = np.zeros((64, 64), np.uint8)
    gt[:32, :32] = 255
    out = render_stride(gt, 32)  # 2x2 area map [[255, 0], [0, 0]]
    assert out.shape == gt.shape and out.dtype == np.uint8
    assert out[0, 0] == 255 and out[63, 63] == 0
    # Column 31: source position (31 + 0.5) / 32 - 0.5 = 0.484375 between small pixels 0 and 1;
    # row 0 clamps to small row 0 -> 255 * (1 - 0.484375) = 131.48 -> 131.
    assert out[0, 31] == 131
    assert np.array_equal(render_stride(gt, 1), gt)
    # Area averaging (not subsampling): a 1 px line becomes a 255/4 plateau at k = 4.
    line = np.zeros((8, 8), np.uint8)
    line[:, 1] = 255
    assert (render_stride(line, 4)[:, 0] == 64).all()


def test_stride_binary_and_threshold_are_the_thresholded_soft_map():
    for gt in (_circle(), _rect()):
        for k in (4, 8, 16):
            soft = CoarseKind.parse(f"stride{k}").render(gt)
            assert np.array_equal(soft, render_stride(gt, k))
            hard = CoarseKind.parse(f"stride{k}_binary").render(gt)
            assert hard.dtype == np.uint8 and set(np.unique(hard)) <= {0, 255}
            assert np.array_equal(hard > 0, soft >= 128)
            t04 = CoarseKind.parse(f"stride{k}_t0.4").render(gt)
            assert np.array_equal(t04 > 0, soft > 0.4 * 255)
            assert (t04 >= hard).all() and (t04 > hard).any()  # a lower threshold grows it
    # the corner of a square is rounded off: a blocky 1/8 map, not a copy of the input
    gt = np.zeros((64, 64), np.uint8)
    gt[8:40, 8:40] = 255
    hard = CoarseKind.parse("stride8_binary").render(gt)
    assert hard[20, 20] == 255 and hard[60, 60] == 0 and not np.array_equal(hard, gt)


def test_stride_iou_decreases_with_k():
    mean_iou = []
    for k in (2, 4, 8, 16):
        ious = [binary_iou(CoarseKind.parse(f"stride{k}_binary").render(g) > 0, g > 0)
                for g in (_circle(), _rect(), _circle(101, 77, (40, 50), 30))]
        mean_iou.append(np.mean(ious))
    assert all(a > b for a, b in zip(mean_iou, mean_iou[1:]))
    assert CoarseKind.parse("stride8").render(_circle(101, 77, (40, 50), 30)).shape == (101, 77)


def test_maskrcnn_paste():
    # A box-filling rectangle: the 28x28 map is all ones, and the zero padding of grid_sample
    # takes the 4 corner pixels only (bilinear weight 0.61 x 0.66 < 0.5 there).
    gt = _rect()
    diff = np.argwhere(render_maskrcnn(gt) != gt)
    assert sorted(map(tuple, diff)) == [(30, 40), (30, 169), (119, 40), (119, 169)]
    # A large circle loses detail at 28x28: close, not equal, and never outside a 1 px margin
    # of the box.
    gt = _circle(480, 640, (300, 240), 200)
    out = CoarseKind.parse("maskrcnn").render(gt)
    assert set(np.unique(out)) <= {0, 255}
    assert 0.97 < binary_iou(out > 0, gt > 0) < 1.0
    ys, xs = np.nonzero(out)
    assert ys.min() >= 40 - 1 and ys.max() <= 440 and xs.min() >= 100 - 1 and xs.max() <= 500
    # A coarser head is worse; an empty mask stays empty.
    coarse = CoarseKind.parse("maskrcnn:7").render(gt)
    assert binary_iou(coarse > 0, gt > 0) < binary_iou(out > 0, gt > 0)
    assert not CoarseKind.parse("maskrcnn").render(np.zeros((9, 9), np.uint8)).any()


def test_shift_and_dilate_are_small_and_seeded():
    gt = _circle(240, 320, (160, 120), 80)
    for name in ("shift", "dilate"):
        kind = CoarseKind.parse(name)
        a = kind.render(gt, np.random.default_rng(3))
        b = kind.render(gt, np.random.default_rng(3))
        assert np.array_equal(a, b) and not np.array_equal(a, gt)
        assert 0.85 < binary_iou(a > 0, gt > 0) < 1.0
    with pytest.raises(ValueError, match="random generator"):
        CoarseKind.parse("shift").render(gt)


def test_render_binarises_soft_gt_at_128():
    soft = (_circle() > 0).astype(np.uint8) * 200
    kind = CoarseKind.parse("stride8_binary")
    assert np.array_equal(kind.render(soft), kind.render(_circle()))
    assert np.array_equal(kind.render(_circle() > 0), kind.render(_circle()))
    assert not kind.render((_circle() > 0).astype(np.uint8) * 100).any()


def test_mix_parse_weights_and_draw():
    mix = CoarseMix.parse("perturb+stride8_binary*3+maskrcnn")
    assert mix.name == "perturb+stride8_binary*3+maskrcnn"
    assert mix.weights == (1.0, 3.0, 1.0)
    rng = np.random.default_rng(0)
    counts = collections.Counter(mix.draw(rng).name for _ in range(5000))
    assert set(counts) == {"perturb", "stride8_binary", "maskrcnn"}
    assert 0.55 < counts["stride8_binary"] / 5000 < 0.65
    assert CoarseMix.parse("stride8").draw(rng).name == "stride8"
    for bad in ("perturb+perturb", "perturb+", "stride8*0", "stride8*x", "mixed"):
        with pytest.raises(ValueError):
            CoarseMix.parse(bad)
    assert [k.name for k in parse_kinds("perturb+maskrcnn")] == ["perturb", "maskrcnn"]
