"""PQ and Boundary PQ: hand-made sets with counted answers, and panopticapi on real data."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from crm_d2.evaluation.panoptic import (
    boundary_pq,
    id2rgb,
    pq_compute,
    read_panoptic_png,
    rgb2id,
    write_panoptic_png,
)

CATEGORIES = [
    {"id": 1, "name": "thing_a", "isthing": 1},
    {"id": 2, "name": "thing_b", "isthing": 1},
    {"id": 3, "name": "stuff_c", "isthing": 0},
]


def write_set(
    folder: Path, name: str, images: list[tuple[np.ndarray, list[dict]]], with_area: bool
) -> tuple[dict, Path]:
    """Write id maps as PNGs under folder/name and return (json dict, png folder)."""
    png_dir = folder / name
    png_dir.mkdir(parents=True, exist_ok=True)
    anns = []
    for i, (ids, segments) in enumerate(images, 1):
        file_name = f"{i:06d}.png"
        write_panoptic_png(png_dir / file_name, ids)
        infos = []
        for s in segments:
            info = {"iscrowd": 0, **s}
            if with_area:
                info["area"] = int((ids == s["id"]).sum())
            infos.append(info)
        anns.append({"image_id": i, "file_name": file_name, "segments_info": infos})
    images_info = [{"id": i, "file_name": f"{i:06d}.jpg"} for i in range(1, len(images) + 1)]
    return {"images": images_info, "annotations": anns, "categories": CATEGORIES}, png_dir


def evaluate(tmp_path, gt_images, pred_images, fn=pq_compute, **kw):
    gt, gt_dir = write_set(tmp_path, "gt", gt_images, with_area=True)
    pred, pred_dir = write_set(tmp_path, "pred", pred_images, with_area=False)
    return fn(gt, gt_dir, pred, pred_dir, **kw)


# ---------------------------------------------------------------- PNG helpers


def test_rgb2id_id2rgb_round_trip(tmp_path):
    assert id2rgb(np.array([[1 + 2 * 256 + 3 * 256**2]])).tolist() == [[[1, 2, 3]]]
    ids = np.random.default_rng(0).integers(0, 256**3, size=(7, 5))
    assert np.array_equal(rgb2id(id2rgb(ids)), ids)
    write_panoptic_png(tmp_path / "a.png", ids)
    assert np.array_equal(read_panoptic_png(tmp_path / "a.png"), ids)
    with pytest.raises(ValueError):
        id2rgb(np.array([[256**3]]))


# ---------------------------------------------------------------- hand-made PQ


def hand_made(crowd_pred_category: int):
    """12 x 10 image.

    GT:   1 (cat 1) rows 0-3 cols 0-4 (20 px) | 2 (cat 1) rows 0-3 cols 5-9 (20 px)
          3 (cat 3, stuff) rows 4-7 (40 px)
          4 (cat 2, crowd) rows 8-9 cols 0-4 (10 px) | VOID rows 8-9 cols 5-9 (10 px)
          5 (cat 2) rows 10-11 (20 px)
    Pred: 11 (cat 1) rows 0-3 cols 0-3: IoU with 1 = 16 / 20 = 0.8 -> TP
          12 (cat 1) rows 0-1 cols 4-9: IoU with 2 = 10 / (12 + 20 - 10) < 0.5 -> FP, and 2 is FN
          13 (cat 3) rows 4-7 + the VOID block: union 50 + 40 - 40 - 10 (VOID) = 40, IoU 1 -> TP
          14 (cat given) on the crowd block: ignored if its category is the crowd's (2), else FP
          15 (cat 2) rows 10-11: IoU 1 -> TP
    """
    gt = np.zeros((12, 10), np.int64)
    gt[0:4, 0:5] = 1
    gt[0:4, 5:10] = 2
    gt[4:8] = 3
    gt[8:10, 0:5] = 4
    gt[10:12] = 5
    gt_segments = [
        {"id": 1, "category_id": 1},
        {"id": 2, "category_id": 1},
        {"id": 3, "category_id": 3},
        {"id": 4, "category_id": 2, "iscrowd": 1},
        {"id": 5, "category_id": 2},
    ]
    pred = np.zeros((12, 10), np.int64)
    pred[0:4, 0:4] = 11
    pred[0:2, 4:10] = 12
    pred[4:8] = 13
    pred[8:10, 5:10] = 13
    pred[8:10, 0:5] = 14
    pred[10:12] = 15
    pred_segments = [
        {"id": 11, "category_id": 1},
        {"id": 12, "category_id": 1},
        {"id": 13, "category_id": 3},
        {"id": 14, "category_id": crowd_pred_category},
        {"id": 15, "category_id": 2},
    ]
    return [(gt, gt_segments)], [(pred, pred_segments)]


def test_pq_hand_made_crowd_prediction_ignored(tmp_path):
    # cat 1: TP 1 (IoU 0.8), FP 1, FN 1 -> PQ 0.8 / 2 = 0.4, SQ 0.8, RQ 0.5
    # cat 2: TP 1 (IoU 1); 14 lies on the crowd of its own category -> not an FP -> 1, 1, 1
    # cat 3: TP 1 (IoU 1) -> 1, 1, 1
    r = evaluate(tmp_path, *hand_made(crowd_pred_category=2))
    assert r["All"]["n"] == 3
    assert r["All"]["pq"] == pytest.approx((0.4 + 1 + 1) / 3, abs=1e-12)
    assert r["All"]["sq"] == pytest.approx((0.8 + 1 + 1) / 3, abs=1e-12)
    assert r["All"]["rq"] == pytest.approx((0.5 + 1 + 1) / 3, abs=1e-12)
    assert r["Things"] == pytest.approx({"pq": 0.7, "sq": 0.9, "rq": 0.75, "n": 2}, abs=1e-12)
    assert r["Stuff"] == pytest.approx({"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}, abs=1e-12)
    assert r["per_class"][1] == pytest.approx({"pq": 0.4, "sq": 0.8, "rq": 0.5}, abs=1e-12)


def test_pq_hand_made_crowd_of_other_category_is_fp(tmp_path):
    # 14 now has category 1: the crowd region belongs to category 2, so it is an FP of category 1:
    # TP 1, FP 2, FN 1 -> PQ 0.8 / 2.5 = 0.32, RQ 0.4.
    r = evaluate(tmp_path, *hand_made(crowd_pred_category=1))
    assert r["per_class"][1] == pytest.approx({"pq": 0.32, "sq": 0.8, "rq": 0.4}, abs=1e-12)
    assert r["per_class"][2] == pytest.approx({"pq": 1.0, "sq": 1.0, "rq": 1.0}, abs=1e-12)


@pytest.mark.parametrize(
    "void_cols, fp_expected",
    [((3, 6), False), ((3, 5), True)],  # 8 of 12 pixels on VOID: ignored; 4 of 8: exactly half, FP
)
def test_pq_void_rule(tmp_path, void_cols, fp_expected):
    # 4 x 6 image: GT stuff 1 (cat 3) on cols 0-3, VOID on cols 4-5. Prediction 1 (cat 3) on
    # cols 0-2 (IoU 12 / 16 = 0.75, TP); prediction 2 (cat 1) on the given columns.
    gt = np.zeros((4, 6), np.int64)
    gt[:, 0:4] = 1
    pred = np.zeros((4, 6), np.int64)
    pred[:, 0:3] = 1
    pred[:, void_cols[0] : void_cols[1]] = 2
    r = evaluate(
        tmp_path,
        [(gt, [{"id": 1, "category_id": 3}])],
        [(pred, [{"id": 1, "category_id": 3}, {"id": 2, "category_id": 1}])],
    )
    assert r["per_class"][3]["pq"] == pytest.approx(0.75, abs=1e-12)
    if fp_expected:
        assert r["All"]["n"] == 2 and r["per_class"][1]["pq"] == 0.0
    else:
        assert r["All"]["n"] == 1 and r["All"]["pq"] == pytest.approx(0.75, abs=1e-12)
    assert math.isnan(r["Things"]["pq"]) == (not fp_expected)  # no thing category counted


def test_pq_iou_must_exceed_half(tmp_path):
    # GT 1 (cat 1) = 4 pixels, prediction = 2 of them: IoU exactly 0.5 -> no match: FN + FP.
    gt = np.zeros((2, 4), np.int64)
    gt[:, 0:2] = 1
    pred = np.zeros((2, 4), np.int64)
    pred[:, 0] = 7
    r = evaluate(
        tmp_path, [(gt, [{"id": 1, "category_id": 1}])], [(pred, [{"id": 7, "category_id": 1}])]
    )
    assert r["per_class"][1] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert r["All"]["n"] == 1


def test_pq_gt_against_itself_is_one(tmp_path):
    gt_images, _ = hand_made(crowd_pred_category=2)
    gt_clean = [
        (ids, [{k: v for k, v in s.items() if k != "iscrowd"} for s in segs])
        for ids, segs in gt_images
    ]
    r = evaluate(tmp_path, gt_images, gt_clean)
    for group in ("All", "Things", "Stuff"):
        assert (r[group]["pq"], r[group]["sq"], r[group]["rq"]) == (1.0, 1.0, 1.0)


def test_pq_input_errors(tmp_path):
    gt_images, pred_images = hand_made(crowd_pred_category=2)
    gt, gt_dir = write_set(tmp_path, "gt", gt_images, with_area=True)
    pred, pred_dir = write_set(tmp_path, "pred", pred_images, with_area=False)

    missing_json = copy.deepcopy(pred)
    missing_json["annotations"][0]["segments_info"].pop()
    with pytest.raises(ValueError, match="in the prediction PNG but not in its JSON"):
        pq_compute(gt, gt_dir, missing_json, pred_dir)

    extra_json = copy.deepcopy(pred)
    extra_json["annotations"][0]["segments_info"].append({"id": 99, "category_id": 1})
    with pytest.raises(ValueError, match=r"\[99\] are in the prediction JSON but not in its PNG"):
        pq_compute(gt, gt_dir, extra_json, pred_dir)

    bad_cat = copy.deepcopy(pred)
    bad_cat["annotations"][0]["segments_info"][0]["category_id"] = 42
    with pytest.raises(ValueError, match="unknown category_id 42"):
        pq_compute(gt, gt_dir, bad_cat, pred_dir)

    with pytest.raises(ValueError, match="no prediction for the image"):
        pq_compute(gt, gt_dir, {"annotations": []}, pred_dir)


# ---------------------------------------------------------------- Boundary PQ


def square_scene(shift: int):
    """100 x 100 image: thing 1 (cat 1) = 40x40 square at rows/cols 20-59 (columns shifted by
    ``shift`` in the prediction), stuff 2 (cat 3) = everything else."""

    def ids(dx: int) -> np.ndarray:
        m = np.full((100, 100), 2, np.int64)
        m[20:60, 20 + dx : 60 + dx] = 1
        return m

    segments = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 3}]
    return [(ids(0), segments)], [(ids(shift), segments)]


def test_boundary_pq_shifted_square(tmp_path):
    # d = round(0.02 * 141.4) = 3.
    # Thing: mask IoU 1560 / 1640 = 39/41; boundary IoU 5/7 (rings of 444 px sharing 370).
    # Stuff (the complement): mask IoU (10000 - 1640) / (10000 - 1560) = 209/211. Its boundary =
    # the image-border ring (100^2 - 94^2 = 1164) + the ring around the hole (46^2 - 40^2 = 516);
    # the two hole rings share 46 * 45 - 40 * 41 = 430 -> boundary IoU
    # (1164 + 430) / (2 * 1680 - 1594) = 1594 / 1766.
    gt_images, pred_images = square_scene(shift=1)
    mask = evaluate(tmp_path, gt_images, pred_images)
    assert mask["Things"]["sq"] == pytest.approx(39 / 41, abs=1e-12)
    assert mask["Stuff"]["sq"] == pytest.approx(209 / 211, abs=1e-12)
    boundary = evaluate(tmp_path, gt_images, pred_images, fn=boundary_pq)
    assert boundary["Things"]["pq"] == pytest.approx(5 / 7, abs=1e-12)
    assert boundary["Stuff"]["pq"] == pytest.approx(1594 / 1766, abs=1e-12)
    assert boundary["All"]["rq"] == 1.0


def test_boundary_pq_rejects_match_with_low_boundary_iou(tmp_path):
    # Shift by 4: mask IoU 1440 / 1760 = 0.82 (matched), boundary IoU = 216 / 672 = 0.32
    # (rings share 40 * 36 - 34 * 36 = 216 px): no match in Boundary PQ -> FP + FN, PQ 0.
    gt_images, pred_images = square_scene(shift=4)
    mask = evaluate(tmp_path, gt_images, pred_images)
    assert mask["per_class"][1]["sq"] == pytest.approx(1440 / 1760, abs=1e-12)
    boundary = evaluate(tmp_path, gt_images, pred_images, fn=boundary_pq)
    assert boundary["per_class"][1] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert boundary["Things"]["n"] == 1


# ---------------------------------------------------------------- real data vs panopticapi


def perturb_sample(sample: Path, out: Path) -> Path:
    """Predictions from the GT PNGs: erode segments (eroded pixels -> VOID), merge two segments,
    relabel one, paste a new rectangle segment. Returns the prediction json path."""
    gt = json.loads((sample / "panoptic_examples.json").read_text())
    out.mkdir()
    anns = []
    for ann in gt["annotations"]:
        ids = read_panoptic_png(sample / "panoptic_examples" / ann["file_name"])
        pred = ids.copy()
        order = [s["id"] for s in ann["segments_info"]]
        segs = {
            s["id"]: {"id": s["id"], "category_id": s["category_id"]} for s in ann["segments_info"]
        }
        for k, sid in enumerate(order):
            if k % 4:
                m = (ids == sid).astype(np.uint8)
                eroded = cv2.erode(m, np.ones((5, 5), np.uint8), iterations=2 * (k % 4))
                pred[(m > 0) & (eroded == 0)] = 0
        pred[pred == order[1]] = order[0]  # merge
        segs[order[2]]["category_id"] = segs[order[3]]["category_id"]  # relabel
        h, w = pred.shape
        new_id = max(order) + 1
        pred[h // 3 : h // 3 + 40, w // 2 : w // 2 + 60] = new_id
        segs[new_id] = {"id": new_id, "category_id": segs[order[4]]["category_id"]}
        present = set(np.unique(pred).tolist())
        write_panoptic_png(out / ann["file_name"], pred)
        anns.append(
            {
                "image_id": ann["image_id"],
                "file_name": ann["file_name"],
                "segments_info": [s for i, s in segs.items() if i in present],
            }
        )
    path = out.with_suffix(".json")
    path.write_text(json.dumps({"annotations": anns, "categories": gt["categories"]}))
    return path


@pytest.fixture
def panoptic_sample(shared_data: Path) -> Path:
    sample = shared_data / "coco_panoptic_sample"
    if not sample.is_dir():
        pytest.skip(f"{sample} not found: the shared data has no COCO panoptic sample")
    return sample


@pytest.mark.shared_data
def test_pq_matches_panopticapi_on_coco_sample(panoptic_sample, tmp_path, capsys):
    evaluation = pytest.importorskip(
        "panopticapi.evaluation", reason="reference needs: pip install --no-deps panopticapi-lite"
    )
    gt_json = panoptic_sample / "panoptic_examples.json"
    gt_dir = panoptic_sample / "panoptic_examples"
    pred_json = perturb_sample(panoptic_sample, tmp_path / "pred")

    ours = pq_compute(gt_json, gt_dir, pred_json, tmp_path / "pred")
    ref = evaluation.pq_compute(str(gt_json), str(pred_json), str(gt_dir), str(tmp_path / "pred"))
    capsys.readouterr()  # panopticapi prints its table
    assert 0.0 < ours["All"]["pq"] < 0.9  # the perturbation matters
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["n"] == ref[group]["n"]
        for key in ("pq", "sq", "rq"):
            assert ours[group][key] == pytest.approx(ref[group][key], abs=1e-9), (group, key)
    assert set(ours["per_class"]) == set(ref["per_class"])
    for cat, values in ref["per_class"].items():
        assert ours["per_class"][cat] == pytest.approx(values, abs=1e-9), cat

    parallel = pq_compute(gt_json, gt_dir, pred_json, tmp_path / "pred", workers=2)
    assert parallel["All"] == pytest.approx(ours["All"], abs=1e-12)


@pytest.mark.shared_data
def test_pq_and_boundary_pq_of_sample_gt_against_itself(panoptic_sample):
    gt_json = panoptic_sample / "panoptic_examples.json"
    gt_dir = panoptic_sample / "panoptic_examples"
    for fn in (pq_compute, boundary_pq):
        r = fn(gt_json, gt_dir, gt_json, gt_dir)
        for group in ("All", "Things", "Stuff"):
            assert r[group]["pq"] == pytest.approx(1.0, abs=1e-12), (fn.__name__, group)
