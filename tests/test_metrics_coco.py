"""COCO mask AP / Boundary AP on hand-made sets whose precision-recall curves are known."""

from __future__ import annotations

import copy
import json
import math
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from crm_d2.evaluation.coco import AP_KEYS, coco_mask_ap


def rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def box_mask(y0: int, x0: int, h: int, w: int, shape=(200, 200)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[y0 : y0 + h, x0 : x0 + w] = True
    return m


def make_gt(masks: list[np.ndarray], cats: list[int], n_categories: int = 2) -> dict:
    h, w = masks[0].shape
    anns = []
    for i, (m, c) in enumerate(zip(masks, cats), 1):
        ys, xs = np.nonzero(m)
        bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]
        anns.append(
            {
                "id": i,
                "image_id": 1,
                "category_id": c,
                "segmentation": rle(m),
                "area": int(m.sum()),
                "bbox": bbox,
                "iscrowd": 0,
            }
        )
    return {
        "images": [{"id": 1, "height": h, "width": w, "file_name": "a.jpg"}],
        "annotations": anns,
        "categories": [{"id": i, "name": f"c{i}"} for i in range(1, n_categories + 1)],
    }


def result(mask: np.ndarray, cat: int, score: float, **extra) -> dict:
    return {"image_id": 1, "category_id": cat, "segmentation": rle(mask), "score": score, **extra}


# small (20x20 = 400 < 32^2), medium (50x50 = 2500), large (100x100 = 10000 > 96^2)
SIZED = [box_mask(0, 0, 20, 20), box_mask(0, 30, 50, 50), box_mask(90, 90, 100, 100)]


def test_perfect_predictions_give_100_everywhere(capsys):
    gt = make_gt(SIZED, [1, 2, 1])
    gt_before = copy.deepcopy(gt)
    res = [result(m, c, 0.9) for m, c in zip(SIZED, [1, 2, 1])]
    res_before = copy.deepcopy(res)
    out = coco_mask_ap(gt, res)
    assert set(out) == set(AP_KEYS)
    for k in AP_KEYS:
        assert out[k] == pytest.approx(100.0, abs=1e-9), k
    assert gt == gt_before and res == res_before  # inputs untouched
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""  # library prints are swallowed


def test_false_positive_ranked_first_halves_ap():
    # One large GT. Detections by score: a disjoint false positive (0.9), then the exact match
    # (0.5). PR points: (recall 0, precision 0), (recall 1, precision 1/2); COCO's interpolated
    # precision (max precision at recall >= r) is 1/2 at every recall threshold: AP = 50 at every
    # IoU threshold. The FP has the same area, so it is not ignored in APl.
    gt_mask = box_mask(0, 0, 100, 100)
    fp_mask = box_mask(100, 100, 100, 100)
    gt = make_gt([gt_mask], [1])
    res = [result(fp_mask, 1, 0.9), result(gt_mask, 1, 0.5)]
    out = coco_mask_ap(gt, res)
    for k in ("AP", "AP50", "AP75", "APl"):
        assert out[k] == pytest.approx(50.0, abs=1e-9), k
    assert math.isnan(out["APs"]) and math.isnan(out["APm"])  # no GT in those ranges
    # Ranked after the match, the same false positive costs nothing.
    res_low = [result(fp_mask, 1, 0.1), result(gt_mask, 1, 0.5)]
    assert coco_mask_ap(gt, res_low)["AP"] == pytest.approx(100.0, abs=1e-9)


def test_result_bbox_is_ignored():
    # A tiny 'bbox' would make COCO.loadRes use the box area (1 px): the false positive would fall
    # outside the large range and be ignored in APl (giving 100). detectron2 drops it; so do we.
    gt_mask = box_mask(0, 0, 100, 100)
    fp_mask = box_mask(100, 100, 100, 100)
    gt = make_gt([gt_mask], [1])
    res = [result(fp_mask, 1, 0.9, bbox=[0, 0, 1, 1]), result(gt_mask, 1, 0.5, bbox=[0, 0, 1, 1])]
    assert coco_mask_ap(gt, res)["APl"] == pytest.approx(50.0, abs=1e-9)


def test_class_agnostic_ignores_categories(tmp_path):
    # Perfect mask with the wrong category: class-aware AP 0 (category 1 has a GT and no
    # detection; category 2 has no GT and is left out), class-agnostic AP 100.
    gt = make_gt([SIZED[2]], [1])
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    res = [result(SIZED[2], 2, 0.9)]
    assert coco_mask_ap(str(path), res)["AP"] == pytest.approx(0.0, abs=1e-9)
    assert coco_mask_ap(path, res, class_agnostic=True)["AP"] == pytest.approx(100.0, abs=1e-9)


def test_no_results_gives_zero():
    out = coco_mask_ap(make_gt([SIZED[2]], [1]), [])
    assert out["AP"] == 0.0 and out["APl"] == 0.0


def test_bad_inputs():
    gt = make_gt([SIZED[2]], [1])
    with pytest.raises(ValueError, match="image_id"):
        coco_mask_ap(gt, [{**result(SIZED[2], 1, 0.9), "image_id": 7}])
    with pytest.raises(ValueError, match="RLE"):
        coco_mask_ap(gt, [{**result(SIZED[2], 1, 0.9), "segmentation": [[0, 0, 1, 0, 1, 1]]}])
    with pytest.raises(ValueError, match="iou_type"):
        coco_mask_ap(gt, [], iou_type="bbox")


def test_boundary_ap_min_of_mask_and_boundary_iou():
    pytest.importorskip("faster_coco_eval", reason="Boundary AP needs faster-coco-eval")
    # 100x100 image, 40x40 squares shifted by one column: mask IoU 39/41 = 0.951 (matched at
    # every threshold 0.50..0.95), Boundary IoU (d = 3) 5/7 = 0.714 (matched at 0.50..0.70, 5 of
    # the 10 thresholds). Boundary AP uses min(mask IoU, boundary IoU).
    shape = (100, 100)
    gt_mask = box_mask(20, 20, 40, 40, shape)
    pred_mask = box_mask(20, 21, 40, 40, shape)
    gt = make_gt([gt_mask], [1])
    res = [result(pred_mask, 1, 0.9)]
    segm = coco_mask_ap(gt, res)
    assert segm["AP"] == pytest.approx(100.0, abs=1e-9)
    boundary = coco_mask_ap(gt, res, iou_type="boundary")
    assert boundary["AP"] == pytest.approx(50.0, abs=1e-9)
    assert boundary["AP50"] == pytest.approx(100.0, abs=1e-9)
    assert boundary["AP75"] == pytest.approx(0.0, abs=1e-9)
    perfect = coco_mask_ap(gt, [result(gt_mask, 1, 0.9)], iou_type="boundary")
    assert perfect["AP"] == pytest.approx(100.0, abs=1e-9)


def test_boundary_ap_without_faster_coco_eval_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # makes the import fail
    gt = make_gt([SIZED[2]], [1])
    with pytest.raises(ImportError, match="pip install faster-coco-eval"):
        coco_mask_ap(gt, [result(SIZED[2], 1, 0.9)], iou_type="boundary")
