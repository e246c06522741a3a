"""Binary-mask metrics against answers counted by hand (and scipy for the boundary erosion)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from crm_d2.evaluation.binary import (
    BIG_EMPTY_COARSE_SUM,
    BinaryMetrics,
    PooledIoU,
    apply_empty_coarse_rule,
    binarize,
    boundary_accuracy,
    boundary_accuracy_radii,
    boundary_dilation,
    boundary_iou,
    iou,
    mask_to_boundary,
)


def square(y0: int, x0: int, size: int, shape: tuple[int, int] = (100, 100)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[y0 : y0 + size, x0 : x0 + size] = True
    return m


# ---------------------------------------------------------------- binarize / IoU


def test_binarize_uint8_threshold_is_strictly_above_128():
    m = np.array([[0, 128, 129, 255]], dtype=np.uint8)
    assert binarize(m).tolist() == [[False, False, True, True]]


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4), np.float32), np.zeros((4, 4), np.int64), np.zeros((2, 4, 4), bool)]
)
def test_binarize_rejects_other_dtypes_and_shapes(bad):
    with pytest.raises(ValueError):
        binarize(bad)


def test_iou_of_shifted_squares():
    # 10x10 squares shifted by 3 columns: intersection 10 * 7 = 70, union 100 + 100 - 70 = 130.
    gt = square(2, 2, 10, (20, 20))
    pred = square(2, 5, 10, (20, 20))
    assert iou(pred, gt) == pytest.approx(70 / 130, abs=1e-15)
    assert iou(pred.astype(np.uint8) * 255, gt) == pytest.approx(70 / 130, abs=1e-15)


def test_iou_edge_cases():
    empty = np.zeros((5, 5), bool)
    assert iou(empty, empty) == 1.0
    assert iou(square(0, 0, 2, (5, 5)), empty) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        iou(np.zeros((5, 5), bool), np.zeros((5, 6), bool))


def test_pooled_iou_sums_intersections_and_unions():
    acc = PooledIoU()
    assert math.isnan(acc.pooled) and math.isnan(acc.mean)
    # object 1: 70 / 130 (as above); object 2: two disjoint 5x5 squares -> 0 / 50.
    assert acc.update(square(2, 5, 10, (20, 20)), square(2, 2, 10, (20, 20))) == pytest.approx(
        70 / 130
    )
    assert acc.update(square(0, 0, 5, (20, 20)), square(10, 10, 5, (20, 20))) == 0.0
    assert len(acc) == 2
    assert (acc.intersection, acc.union) == (70, 180)
    assert acc.pooled == pytest.approx(70 / 180, abs=1e-15)
    assert acc.mean == pytest.approx((70 / 130 + 0.0) / 2, abs=1e-15)
    assert acc.ious == pytest.approx([70 / 130, 0.0])


# ---------------------------------------------------------------- mBA


@pytest.mark.parametrize(
    "hw, radii",
    [
        ((10, 10), [1, 1, 1, 1, 1]),  # R < 1: int() truncates toward 0 (a floor would give 0)
        ((100, 150), [1, 1, 1, 1, 1]),
        ((750, 750), [1, 1, 2, 3, 4]),  # R = 5: 1 + int(0.8 i)
        ((1500, 1500), [1, 2, 4, 6, 8]),  # R = 10: 1 + int(1.8 i)
    ],
)
def test_mba_radii(hw, radii):
    assert boundary_accuracy_radii(*hw) == radii


def test_mba_counted_band_on_small_square():
    # 10x10 image (all radii 1, kernel = 3x3 cross), GT = 4x4 square at rows/cols 3..6.
    # Dilation adds 4 strips of 4 pixels (16, no corners); erosion keeps the inner 2x2 (4).
    # Band = 32 - 4 = 28 pixels: 12 with gt = 1 (square minus inner 2x2), 16 with gt = 0.
    gt = square(3, 3, 4, (10, 10))
    assert boundary_accuracy(gt, gt) == pytest.approx(1.0)
    assert boundary_accuracy(np.zeros_like(gt), gt) == pytest.approx(16 / 28, abs=1e-15)
    assert boundary_accuracy(np.ones_like(gt), gt) == pytest.approx(12 / 28, abs=1e-15)
    # Errors outside the band do not count.
    far = gt.copy()
    far[0, 9] = True
    assert boundary_accuracy(far, gt) == pytest.approx(1.0)


def test_mba_half_plane_known_band_widths():
    # 750x750: radii 1, 1, 2, 3, 4. GT = columns < 375, so the band of radius r is the 2r columns
    # 375 - r .. 374 + r (the image border is not an edge). A prediction one column too wide is
    # wrong on one of those columns: accuracy (2r - 1) / (2r).
    gt = np.zeros((750, 750), np.uint8)
    gt[:, :375] = 255
    pred = np.zeros((750, 750), np.uint8)
    pred[:, :376] = 200
    expected = (1 / 2 + 1 / 2 + 3 / 4 + 5 / 6 + 7 / 8) / 5
    assert boundary_accuracy(pred, gt) == pytest.approx(expected, abs=1e-15)


def test_mba_is_nan_for_constant_ground_truth():
    # The band is empty; the official code returns NaN (numpy 0 / 0).
    pred = square(1, 1, 3, (10, 10))
    assert math.isnan(boundary_accuracy(pred, np.zeros((10, 10), bool)))
    assert math.isnan(boundary_accuracy(pred, np.ones((10, 10), bool)))


# ---------------------------------------------------------------- Boundary IoU


@pytest.mark.parametrize(
    "h, w, ratio, d",
    [
        (100, 100, 0.02, 3),  # 0.02 * 141.42 = 2.83
        (10, 10, 0.02, 1),  # 0.28 rounds to 0, clamped to 1
        (3, 4, 0.5, 2),  # 0.5 * 5 = 2.5: Python rounds ties to even
        (3, 4, 0.3, 2),  # 1.5 -> 2
    ],
)
def test_boundary_dilation(h, w, ratio, d):
    assert boundary_dilation(h, w, ratio) == d


def test_mask_to_boundary_counts():
    # d = 3 in 100x100. A 40x40 square away from the border: ring of width 3 = 40^2 - 34^2.
    assert mask_to_boundary(square(20, 20, 40)).sum() == 40**2 - 34**2
    # A full-image mask: the image border counts as boundary, 100^2 - 94^2.
    assert mask_to_boundary(np.ones((100, 100), bool)).sum() == 100**2 - 94**2
    assert mask_to_boundary(np.zeros((100, 100), bool)).sum() == 0


def test_mask_to_boundary_matches_scipy_erosion():
    # Independent reference: mask minus its d-fold 3x3 erosion with zeros outside the image.
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = ndimage.binary_opening(rng.random((64, 80)) < 0.6, iterations=2)
        for d in (1, 2, 5):
            ref = m & ~ndimage.binary_erosion(
                m, structure=np.ones((3, 3)), iterations=d, border_value=0
            )
            assert np.array_equal(mask_to_boundary(m, dilation=d), ref)


def test_boundary_iou_of_shifted_squares():
    # 40x40 squares at cols 20..59 (A) and 21..60 (B), rows 20..59, d = 3, rings of 444 pixels.
    # A & B (rings): rows 20..59 x cols 21..59 = 1560, minus the union of the interiors
    # (rows 23..56 x cols 23..57 = 34 * 35 = 1190) -> 370. Union 444 + 444 - 370 = 518 -> 5/7.
    gt = square(20, 20, 40)
    pred = square(20, 21, 40)
    assert boundary_iou(pred, gt) == pytest.approx(5 / 7, abs=1e-15)
    assert iou(pred, gt) == pytest.approx(39 / 41, abs=1e-15)
    assert boundary_iou(gt, gt) == 1.0
    assert boundary_iou(square(0, 0, 10), square(50, 50, 10)) == 0.0
    empty = np.zeros((100, 100), bool)
    assert boundary_iou(empty, empty) == 1.0


# ---------------------------------------------------------------- accumulator


def test_binary_metrics_with_coarse_masks():
    gt = square(20, 20, 40)
    shifted = square(20, 21, 40)
    acc = BinaryMetrics()
    acc.update(gt, gt, coarse=shifted)  # refined perfect, coarse shifted
    acc.update(shifted, gt, coarse=gt)  # refined worse than coarse
    s = acc.summary()
    # mBA of the shifted square (radii 1, cross kernel): band = 160 outer + 156 inner = 316 pixels;
    # wrong: gt column 20 (inner ring, 40 px) and column 60 (outer strip, 40 px) -> 236 / 316.
    mba_shifted = 236 / 316
    for prefix in ("", "coarse_"):
        assert s[prefix + "iou"] == pytest.approx((1600 + 1560) / (1600 + 1640), abs=1e-15)
        assert s[prefix + "mean_iou"] == pytest.approx((1 + 39 / 41) / 2, abs=1e-15)
        assert s[prefix + "mba"] == pytest.approx((1 + mba_shifted) / 2, abs=1e-15)
        assert s[prefix + "boundary_iou"] == pytest.approx((1 + 5 / 7) / 2, abs=1e-15)
    assert s["worse_fraction"] == 0.5
    assert s["num_objects"] == 2
    with pytest.raises(ValueError, match="coarse"):
        acc.update(gt, gt)


def test_binary_metrics_without_coarse_and_empty():
    acc = BinaryMetrics()
    assert math.isnan(acc.summary()["iou"])
    acc.update(square(20, 20, 40), square(20, 20, 40))
    s = acc.summary()
    assert s["iou"] == 1.0 and s["mba"] == 1.0 and s["boundary_iou"] == 1.0
    assert "worse_fraction" not in s
    with pytest.raises(ValueError, match="coarse"):
        acc.update(square(20, 20, 40), square(20, 20, 40), coarse=square(20, 20, 40))


def test_empty_coarse_rule_threshold():
    refined = np.ones((8, 8), bool)
    coarse = np.zeros((8, 8), np.uint8)
    coarse[0, :4] = 255  # 1020
    coarse[1, 0] = 3  # 1023 < 1024: keep the coarse mask
    assert BIG_EMPTY_COARSE_SUM == 1024
    assert apply_empty_coarse_rule(coarse, refined) is coarse
    coarse[1, 0] = 4  # 1024: use the refined mask
    assert apply_empty_coarse_rule(coarse, refined) is refined
    with pytest.raises(ValueError):
        apply_empty_coarse_rule(coarse.astype(bool), refined)


# ---------------------------------------------------------------- the one set aggregator


def test_one_aggregator_and_nan_rule_for_every_set_summary():
    """BinaryMetrics, crm-eval's object and BIG summaries and the training validation's rule
    agree: a constant ground truth (undefined mBA) is left out of the set's mBA and counted."""
    import dataclasses

    from crm_d2.crm_eval.records import ObjectRecord
    from crm_d2.crm_eval.report import big_summary, object_summary
    from crm_d2.evaluation.aggregate import summarize_objects
    from crm_d2.evaluation.binary import object_scores

    gt = [square(20, 20, 40), square(10, 10, 30), np.ones((100, 100), bool)]
    pred = [square(20, 21, 40), square(10, 10, 30), square(0, 0, 90)]
    coarse = [square(22, 20, 40), square(12, 12, 30), square(0, 0, 80)]
    metrics = BinaryMetrics()
    for p, g, c in zip(pred, gt, coarse):
        metrics.update(p, g, coarse=c)
    s = metrics.summary()
    after = [object_scores(p, g) for p, g in zip(pred, gt)]
    assert math.isnan(after[2].mba)
    assert s["mba"] == pytest.approx((after[0].mba + after[1].mba) / 2, abs=1e-15)
    assert s["mba_undefined"] == 1 and s["coarse_mba_undefined"] == 1
    inter = sum(a.intersection for a in after)
    union = sum(a.union for a in after)
    assert s["iou"] == inter / union

    def as_json(scores):
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in dataclasses.asdict(scores).items()
        }

    before = [object_scores(c, g) for c, g in zip(coarse, gt)]
    objects = [  # through crm-eval's on-disk JSON (NaN written as null)
        ObjectRecord.from_json(
            {
                "index": i,
                "gt": i,
                "category_id": 1,
                "refined": True,
                "crop": [0, 0, 1, 1],
                "before": as_json(b),
                "after": as_json(a),
            }
        )
        for i, (b, a) in enumerate(zip(before, after))
    ]
    summary = object_summary(objects)
    for key in ("iou", "mean_iou", "mba", "boundary_iou"):
        assert summary["after"][key] == s[key], key
        assert summary["before"][key] == s["coarse_" + key], key
    assert summary["mba_undefined"] == 1
    assert big_summary(objects) == s
    assert summarize_objects(after) == {
        k: v for k, v in s.items() if not k.startswith(("coarse_", "worse"))
    }

    empty = summarize_objects([])
    assert all(math.isnan(empty[k]) for k in ("iou", "mean_iou", "mba", "boundary_iou"))
    assert empty["num_objects"] == 0
    # Every object with a constant ground truth: no defined mBA, the set's mBA is NaN.
    flat = BinaryMetrics()
    flat.update(np.ones((10, 10), bool), np.ones((10, 10), bool))
    assert math.isnan(flat.summary()["mba"]) and flat.summary()["iou"] == 1.0
