"""crm-eval end to end: synthetic COCO / BIG sets, real samples, resume, 2-process gloo run,
and a "perfect refiner" that proves the before/after plumbing."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from crm_d2.cli import eval as cli
from crm_d2.coarse import render_stride
from crm_d2.crm_eval import CoarseSpec
from crm_d2.crm_eval.as_panoptic import combine_instances, paint_by_area
from crm_d2.crm_eval.coarse import paint_soft_segments
from crm_d2.crm_eval.datasets import decode_segmentation
from crm_d2.crm_eval.matching import match_instances, match_panoptic
from crm_d2.evaluation import BinaryMetrics, coco_mask_ap, pq_compute
from crm_d2.evaluation.binary import iou
from crm_d2.evaluation.panoptic import boundary_pq, read_panoptic_png, write_panoptic_png
from crm_d2.fusion import RefinedSegment
from crm_d2.modeling.crm import TINY_ARCH
from crm_d2.options import RefineOptions
from crm_d2.pipeline import refine_masks

REPO = Path(__file__).resolve().parents[1]
TINY = TINY_ARCH
FAST = ["--scales", "0.5", "1.0", "--quiet"]
SIZES = ((60, 80), (64, 72), (56, 90), (52, 84))  # distinct, so a call tells its image


@pytest.fixture(scope="module")
def weights(tiny_weights) -> str:
    return tiny_weights


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------
def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [
        float(xs.min()),
        float(ys.min()),
        float(xs.max() - xs.min() + 1),
        float(ys.max() - ys.min() + 1),
    ]


def make_coco(root: Path, n_images: int = 3) -> dict:
    """COCO set with polygon, RLE and crowd ground truth, and shifted-mask predictions.

    Every non-crowd ground truth has one prediction (its mask rolled by 2 px, so IoU < 1);
    image 1 also has a low-scored false positive.
    """
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, anns, results = [], [], []
    for k, (h, w) in enumerate(SIZES[:n_images], 1):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "images" / f"{k:03d}.png")
        images.append({"id": k, "file_name": f"{k:03d}.png", "height": h, "width": w})
        objects = [
            (1, [[5.0, 5.0, 35.0, 5.0, 35.0, 30.0, 5.0, 30.0]], 0),  # rectangle polygon
            (2, [[40.0, 20.0, 60.0, 12.0, 68.0, 40.0, 45.0, 50.0]], 0),  # quadrilateral
        ]
        if k == 1:
            blob = np.zeros((h, w), bool)
            blob[35:55, 8:30] = True
            objects.append((1, _rle(blob), 0))
        if k == 2:
            crowd = np.zeros((h, w), bool)
            crowd[40:60, 5:25] = True
            objects.append((1, {"size": [h, w], "counts": _uncompressed(crowd)}, 1))
        for category, segm, crowd_flag in objects:
            mask = decode_segmentation(segm, h, w)
            ann_id = len(anns) + 1
            anns.append(
                {
                    "id": ann_id,
                    "image_id": k,
                    "category_id": category,
                    "segmentation": segm,
                    "area": float(mask.sum()),
                    "bbox": _bbox(mask),
                    "iscrowd": crowd_flag,
                }
            )
            if not crowd_flag:
                pred = np.roll(mask, 2, axis=1)
                results.append(
                    {
                        "image_id": k,
                        "category_id": category,
                        "segmentation": _rle(pred),
                        "score": 0.9 - 0.01 * ann_id,
                    }
                )
        if k == 1:
            fp = np.zeros((h, w), bool)
            fp[40:50, 60:75] = True
            results.append(
                {"image_id": k, "category_id": 2, "segmentation": _rle(fp), "score": 0.05}
            )
    gt = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    (root / "gt.json").write_text(json.dumps(gt))
    (root / "results.json").write_text(json.dumps(results))
    return gt


def _uncompressed(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE counts (column-major runs, starting with zeros)."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return counts


def coco_args(root: Path, out: Path, weights: str, *extra: str) -> list[str]:
    return [
        "--weights",
        weights,
        "--output",
        str(out),
        "--coco-instances",
        str(root / "gt.json"),
        "--images",
        str(root / "images"),
        "--predictions",
        str(root / "results.json"),
        *FAST,
        *extra,
    ]


def read_report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def close(a, b) -> bool:
    """Equal numbers, NaN (None in JSON) equal to NaN."""
    a = math.nan if a is None else a
    b = math.nan if b is None else b
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-9


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def test_coarse_spec_parse_and_determinism():
    assert CoarseSpec.parse("stride8").kind.k == 8
    spec = CoarseSpec.parse("perturb:0.6-0.9", seed=3)
    assert (spec.kind.iou_range, spec.seed) == ((0.6, 0.9), 3)
    for bad in ("stride", "stride:x", "stride1", "perturb:0.9", "perturb:0.9-0.5", "blur:3"):
        with pytest.raises(ValueError, match="stride<K>"):
            CoarseSpec.parse(bad)
    gt = np.zeros((60, 70), bool)
    gt[10:50, 15:60] = True
    gt[20:30, 5:15] = True
    a = CoarseSpec.parse("perturb", seed=1).render(gt, (7, 2))
    assert np.array_equal(a, CoarseSpec.parse("perturb", seed=1).render(gt, (7, 2)))
    assert not np.array_equal(a, CoarseSpec.parse("perturb", seed=1).render(gt, (7, 3)))
    low = CoarseSpec.parse("stride4").render(gt, (0, 0))
    assert np.array_equal(low, render_stride(gt.astype(np.uint8) * 255, 4))


def test_paint_rules_put_small_objects_on_top():
    big = np.zeros((10, 10), bool)
    big[1:9, 1:9] = True
    small = np.zeros((10, 10), bool)
    small[3:5, 3:5] = True
    ids = paint_by_area([small, big], [1, 2])
    assert (ids[3:5, 3:5] == 1).all() and (ids == 2).sum() == 64 - 4
    # soft maps: the highest value wins; ties go to the smaller segment; < 128 is void
    s_big = big.astype(np.uint8) * 200
    s_small = small.astype(np.uint8) * 200
    s_small[3, 3] = 150  # lower than big there
    painted = paint_soft_segments([s_big, s_small], [5, 6])
    assert painted[3, 3] == 5 and painted[4, 4] == 6 and painted[0, 0] == 0
    # detectron2's combine: score order, > 50 % overlap skipped, free part kept
    m1, m2, m3 = big.copy(), small.copy(), np.zeros((10, 10), bool)
    m3[7:10, 7:10] = True  # 9 px, 4 of them taken by m1
    ids, placed = combine_instances([m2, m1, m3], [0.6, 0.9, 0.7], (10, 10))
    assert placed == [1, 2]  # m2 (4 px all taken) is skipped
    assert (ids == 3).sum() == 5 and (ids == 2).sum() == 64


def test_match_instances_and_panoptic_known_answer():
    g = np.zeros((3, 8, 8), bool)
    g[0, :4, :4] = True
    g[1, 4:, 4:] = True
    g[2, :4, 4:] = True
    p = np.stack([g[0], g[0], np.roll(g[1], 1, axis=0), g[2]])
    # pred 0 and 1 both fit gt 0: the higher score (pred 1) wins; pred 2 IoU 12/20 = 0.6;
    # pred 3 has the wrong category
    assert match_instances(p, [1, 1, 2, 1], [0.5, 0.8, 0.7, 0.9], g, [1, 2, 2]) == [
        None,
        0,
        1,
        None,
    ]
    gt_ids = np.zeros((8, 8), np.int64)
    gt_ids[g[0]], gt_ids[g[1]] = 10, 20
    pred_ids = np.zeros((8, 8), np.int64)
    pred_ids[:4, :3], pred_ids[4:, 4:] = 1, 2  # IoU 12/16 with 10; category mismatch with 20
    got = match_panoptic(
        pred_ids,
        [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 1}],
        gt_ids,
        [{"id": 10, "category_id": 1}, {"id": 20, "category_id": 2}],
    )
    assert got == {1: 10}


def test_max_side_maps_back_to_original_pixels(monkeypatch):
    """With --max-side the masks go down and the probabilities come back at full size: an
    identity 'refiner' must give back (nearly) the input masks, in original coordinates."""

    def identity(refiner, image, masks, options, *, isthing=None, scales=None, exact=False):
        h, w = masks.shape[-2:]
        assert max(h, w) <= 40 and image.shape[-2:] == (h, w)
        return [RefinedSegment(i, masks[i].float(), (0, 0, w, h)) for i in range(len(masks))]

    monkeypatch.setattr("crm_d2.pipeline.refine_segments", identity)
    masks = np.zeros((3, 90, 120), bool)
    masks[0, 10:60, 20:100] = True
    masks[1, 50:88, 5:40] = True
    masks[2, 1:4, 1:4] = True  # 9 px: not refined
    image = np.zeros((90, 120, 3), np.uint8)
    image_t, masks_t = torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(masks)
    out = refine_masks(None, image_t, masks_t, RefineOptions(min_area=20, max_side=40))
    assert [r.segment_id for r in out] == [0, 1]
    for r in out:
        assert r.box == (0, 0, 120, 90) and tuple(r.prob.shape) == (90, 120)
        assert iou(r.prob.numpy() > 0.5, masks[r.segment_id]) > 0.95


# --------------------------------------------------------------------------------------------
# COCO instances end to end
# --------------------------------------------------------------------------------------------
def test_instances_end_to_end(tmp_path, weights):
    gt = make_coco(tmp_path / "data")
    out = tmp_path / "out"
    inputs = json.loads((tmp_path / "data" / "results.json").read_text())
    assert (
        cli.main(coco_args(tmp_path / "data", out, weights, "--min-area", "100", "--overlays", "2"))
        == 0
    )
    rep = read_report(out)
    refined = json.loads((out / "refined_instances.json").read_text())
    assert len(refined) == len(inputs) == rep["segments"]
    for src, res in zip(inputs, refined):
        assert (res["image_id"], res["category_id"], res["score"]) == (
            src["image_id"],
            src["category_id"],
            src["score"],
        )
        h, w = res["segmentation"]["size"]
        mask = decode_segmentation(res["segmentation"], h, w)
        assert res["bbox"] == (_bbox(mask) if mask.any() else [0.0, 0.0, 0.0, 0.0])
        assert res["area"] == int(mask.sum())
    # "before" is exactly the AP of the input file; "after" that of the written file
    for name, agnostic, iou_type in (
        ("segm", False, "segm"),
        ("boundary_agnostic", True, "boundary"),
    ):
        ap_in = coco_mask_ap(gt, inputs, class_agnostic=agnostic, iou_type=iou_type)
        ap_out = coco_mask_ap(gt, refined, class_agnostic=agnostic, iou_type=iou_type)
        assert close(rep["before"][f"{name}/AP"], ap_in["AP"])
        assert close(rep["after"][f"{name}/AP"], ap_out["AP"])
    # every non-crowd gt has its shifted prediction; the false positive pairs with nothing
    non_crowd = [a for a in gt["annotations"] if not a["iscrowd"]]
    assert rep["objects"]["count"] == len(non_crowd)
    # all segments (false positive included) exceed --min-area 100 and go through CRM
    assert rep["refined_segments"] == len(inputs)
    assert rep["objects"]["refined"] == len(non_crowd)
    md = (out / "report.md").read_text()
    assert "mask AP" in md and "Boundary AP (class-agnostic)" in md
    for ov in rep["overlays"]:
        assert (out / ov["file"]).is_file() and ov["file"] in md
    assert len(rep["overlays"]) >= 1


def test_perfect_refiner_reaches_100(tmp_path, weights, monkeypatch):
    """A refiner that answers the ground truth must give AP 100 and per-object IoU 1: the
    before/after bookkeeping (indices, pairing, fusion, RLE) is right."""
    gt = make_coco(tmp_path / "data")
    by_size = {}
    for ann in gt["annotations"]:
        if ann["iscrowd"]:
            continue
        info = gt["images"][ann["image_id"] - 1]
        hw = (info["height"], info["width"])
        by_size.setdefault(hw, []).append(decode_segmentation(ann["segmentation"], *hw))

    def oracle(refiner, image, masks, options, *, isthing=None, scales=None, exact=False):
        h, w = masks.shape[-2:]
        out = []
        for i, m in enumerate(masks.numpy() > 0.5):
            best = max(by_size[(h, w)], key=lambda g: iou(m, g))
            out.append(RefinedSegment(i, torch.from_numpy(best).float(), (0, 0, w, h)))
        return out

    monkeypatch.setattr("crm_d2.pipeline.refine_segments", oracle)
    out = tmp_path / "out"
    cli.main(coco_args(tmp_path / "data", out, weights, "--min-area", "0"))
    rep = read_report(out)
    for key in ("segm/AP", "boundary/AP", "segm_agnostic/AP", "boundary_agnostic/AP"):
        assert rep["before"][key] < 90
        assert rep["after"][key] == pytest.approx(100.0)
    after = rep["objects"]["after"]
    assert after["iou"] == after["mean_iou"] == after["mba"] == after["boundary_iou"] == 1.0
    assert rep["objects"]["before"]["mean_iou"] < 0.95
    assert rep["objects"]["worse"] == 0 and rep["objects"]["better"] == rep["objects"]["count"]


def test_resume_skips_done_images(tmp_path, weights, monkeypatch):
    make_coco(tmp_path / "data")
    from crm_d2 import pipeline as refine_module

    calls: list[tuple[int, int]] = []
    real = refine_module.refine_segments

    def counting(refiner, image, masks, *args, **kwargs):
        calls.append(tuple(image.shape[-2:]))
        return real(refiner, image, masks, *args, **kwargs)

    monkeypatch.setattr("crm_d2.pipeline.refine_segments", counting)
    out = tmp_path / "out"
    args = coco_args(tmp_path / "data", out, weights, "--min-area", "100", "--overlays", "0")
    cli.main([*args, "--limit", "2"])
    assert set(calls) == {SIZES[0], SIZES[1]}
    first = read_report(out)
    calls.clear()
    cli.main(args)
    assert set(calls) == {SIZES[2]}  # only the image not done yet
    assert read_report(out)["images"] == 3
    calls.clear()
    cli.main(args)
    assert calls == []
    (out / "cache" / "1.json").unlink()
    cli.main([*args, "--limit", "2"])
    assert set(calls) == {SIZES[0]}
    again = read_report(out)
    assert again["before"] == first["before"] and again["after"] == first["after"]
    with pytest.raises(SystemExit, match="other inputs or settings.*min_area"):
        cli.main(coco_args(tmp_path / "data", out, weights, "--min-area", "50"))
    with pytest.raises(SystemExit, match="other inputs or settings.*flip"):
        cli.main([*args, "--flip"])  # flip TTA gives other masks: not mixed with these
    with pytest.raises(SystemExit, match="other inputs or settings.*guided_blend"):
        cli.main([*args, "--guided-blend", "0.5"])
    calls.clear()
    cli.main(
        coco_args(
            tmp_path / "data", out, weights, "--min-area", "50", "--overwrite", "--limit", "1"
        )
    )
    assert set(calls) == {SIZES[0]}


def test_errors_name_the_missing_option(tmp_path, monkeypatch):
    make_coco(tmp_path / "data")
    monkeypatch.setattr("crm_d2.weights.default_weights_path", lambda: None)
    base = [
        "--output",
        str(tmp_path / "o"),
        "--coco-instances",
        str(tmp_path / "data/gt.json"),
        "--images",
        str(tmp_path / "data/images"),
    ]
    with pytest.raises(SystemExit, match="--weights PATH.*--random-weights"):
        cli.main([*base, "--coarse-from-gt", "stride8"])
    with pytest.raises(SystemExit, match="--predictions RESULTS.json or --coarse-from-gt"):
        cli.main([*base, "--random-weights", "tiny"])
    with pytest.raises(SystemExit, match="--soft-coarse needs"):
        cli.main(
            [*base, "--random-weights", "tiny", "--coarse-from-gt", "perturb", "--soft-coarse"]
        )


def test_random_weights_are_flagged_loudly(tmp_path, capsys):
    make_coco(tmp_path / "data", n_images=1)
    out = tmp_path / "out"
    cli.main(
        [
            "--random-weights",
            "tiny",
            "--output",
            str(out),
            "--coco-instances",
            str(tmp_path / "data/gt.json"),
            "--images",
            str(tmp_path / "data/images"),
            "--coarse-from-gt",
            "perturb",
            *FAST,
        ]
    )
    assert "MEANINGLESS" in capsys.readouterr().out
    assert "MEANINGLESS" in read_report(out)["warning"]
    assert "MEANINGLESS" in (out / "report.md").read_text()


# --------------------------------------------------------------------------------------------
# Coarse from ground truth on real COCO images
# --------------------------------------------------------------------------------------------
@pytest.mark.shared_data
def test_coco_tiny_coarse_from_gt_stride(shared_data, tmp_path, weights, monkeypatch):
    from crm_d2 import pipeline as refine_module

    real, soft_seen = refine_module.refine_segments, []

    def spy(refiner, image, masks, *args, **kwargs):
        soft_seen.append(bool(((masks > 0) & (masks < 1)).any()))
        return real(refiner, image, masks, *args, **kwargs)

    monkeypatch.setattr("crm_d2.pipeline.refine_segments", spy)
    root = shared_data / "coco_tiny"
    out = tmp_path / "out"
    cli.main(
        [
            "--weights",
            weights,
            "--output",
            str(out),
            "--coco-instances",
            str(root / "annotations/instances_train2017.json"),
            "--images",
            str(root / "train2017"),
            "--coarse-from-gt",
            "stride8",
            "--soft-coarse",
            "--limit",
            "3",
            "--max-side",
            "128",
            "--min-area",
            "4096",
            "--overlays",
            "1",
            *FAST,
        ]
    )
    rep = read_report(out)
    gt = json.loads((root / "annotations/instances_train2017.json").read_text())
    coarse = json.loads((out / "coarse_instances.json").read_text())
    expected, n_checked = 0, 0
    for info in gt["images"][:3]:
        hw = (info["height"], info["width"])
        anns = [a for a in gt["annotations"] if a["image_id"] == info["id"] and not a["iscrowd"]]
        mine = [c for c in coarse if c["image_id"] == info["id"]]
        kept = []
        for a in anns:
            soft = render_stride(
                decode_segmentation(a["segmentation"], *hw).astype(np.uint8) * 255, 8
            )
            if (soft >= 128).any():
                kept.append((a, soft >= 128))
        assert len(mine) == len(kept)
        for c, (a, want) in zip(mine, kept):
            assert c["category_id"] == a["category_id"]
            assert np.array_equal(decode_segmentation(c["segmentation"], *hw), want)
            n_checked += 1
        expected += len(kept)
    assert rep["segments"] == rep["objects"]["count"] == expected == n_checked > 0
    assert rep["images"] == 3 and rep["coarse"].startswith("stride8")
    assert 0.5 < rep["objects"]["before"]["mean_iou"] < 1.0
    assert rep["before"]["segm/AP"] < 100
    assert soft_seen and all(soft_seen)  # --soft-coarse: CRM saw the upsampled soft maps


@pytest.mark.shared_data
def test_coco_tiny_as_panoptic(shared_data, tmp_path, weights):
    root = shared_data / "coco_tiny"
    out = tmp_path / "out"
    cli.main(
        [
            "--weights",
            weights,
            "--output",
            str(out),
            "--coco-instances",
            str(root / "annotations/instances_train2017.json"),
            "--images",
            str(root / "train2017"),
            "--coarse-from-gt",
            "perturb",
            "--as-panoptic",
            "--limit",
            "2",
            "--max-side",
            "128",
            "--min-area",
            "4096",
            "--overlays",
            "0",
            *FAST,
        ]
    )
    rep = read_report(out)
    gt_json = json.loads((out / "gt_panoptic.json").read_text())
    assert len(gt_json["annotations"]) == 2
    assert all(c["isthing"] == 1 for c in gt_json["categories"])
    expect = pq_compute(
        out / "gt_panoptic.json",
        out / "gt_panoptic",
        out / "coarse_panoptic.json",
        out / "coarse_panoptic",
    )
    assert close(rep["before"]["pq/All/pq"], 100 * expect["All"]["pq"])
    assert rep["before"]["pq/Things/pq"] == rep["before"]["pq/All/pq"]
    assert rep["before"]["pq/Stuff/n"] == 0
    for ann in gt_json["annotations"]:
        ids = read_panoptic_png(out / "gt_panoptic" / ann["file_name"])
        for seg in ann["segments_info"]:
            assert int((ids == seg["id"]).sum()) == seg["area"]


def test_as_panoptic_with_instance_predictions(tmp_path, weights):
    make_coco(tmp_path / "data")
    out = tmp_path / "out"
    cli.main(
        coco_args(
            tmp_path / "data", out, weights, "--as-panoptic", "--min-area", "100", "--overlays", "1"
        )
    )
    rep = read_report(out)
    assert rep["mode"] == "panoptic" and rep["refined_segments"] > 0
    coarse = json.loads((out / "coarse_panoptic.json").read_text())
    # the low-scored false positive (0.05 < 0.5) is not placed; the 7 others are
    assert sum(len(a["segments_info"]) for a in coarse["annotations"]) == 7
    for name, folder in (("coarse_panoptic", "before"), ("refined_panoptic", "after")):
        expect = pq_compute(
            out / "gt_panoptic.json", out / "gt_panoptic", out / f"{name}.json", out / name
        )
        assert close(rep[folder]["pq/All/pq"], 100 * expect["All"]["pq"])
    assert 0 < rep["before"]["pq/All/pq"] < 100


# --------------------------------------------------------------------------------------------
# COCO panoptic
# --------------------------------------------------------------------------------------------
@pytest.mark.shared_data
def test_panoptic_sample_predictions(shared_data, tmp_path, weights):
    sample = shared_data / "coco_panoptic_sample"
    gt = json.loads((sample / "panoptic_examples.json").read_text())
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    anns = []
    for k, ann in enumerate(gt["annotations"]):
        ids = read_panoptic_png(sample / "panoptic_examples" / ann["file_name"])
        ids = np.roll(ids, 3, axis=1)  # shifted: IoUs drop, some matches fail
        dropped = ann["segments_info"][k]["id"]
        ids[ids == dropped] = 0
        write_panoptic_png(pred_dir / ann["file_name"], ids)
        present = set(np.unique(ids).tolist())
        anns.append(
            {
                "image_id": ann["image_id"],
                "file_name": ann["file_name"],
                "segments_info": [
                    {"id": s["id"], "category_id": s["category_id"]}
                    for s in ann["segments_info"]
                    if s["id"] in present
                ],
            }
        )
    (tmp_path / "pred.json").write_text(json.dumps({"annotations": anns}))
    out = tmp_path / "out"
    cli.main(
        [
            "--weights",
            weights,
            "--output",
            str(out),
            "--coco-panoptic",
            str(sample / "panoptic_examples.json"),
            "--panoptic-dir",
            str(sample / "panoptic_examples"),
            "--images",
            str(sample / "input_images"),
            "--pred-json",
            str(tmp_path / "pred.json"),
            "--pred-dir",
            str(pred_dir),
            "--max-side",
            "128",
            "--min-area",
            "8000",
            "--overlays",
            "1",
            *FAST,
        ]
    )
    rep = read_report(out)
    gt_args = (sample / "panoptic_examples.json", sample / "panoptic_examples")
    pq_in = pq_compute(*gt_args, tmp_path / "pred.json", pred_dir)
    bpq_in = boundary_pq(*gt_args, tmp_path / "pred.json", pred_dir)
    for split in ("All", "Things", "Stuff"):
        for key in ("pq", "sq", "rq"):
            assert close(rep["before"][f"pq/{split}/{key}"], 100 * pq_in[split][key])
        assert close(rep["before"][f"bpq/{split}/pq"], 100 * bpq_in[split]["pq"])
    refined = json.loads((out / "refined_panoptic.json").read_text())
    assert len(refined["annotations"]) == 2
    for ann in refined["annotations"]:
        ids = read_panoptic_png(out / "refined_panoptic" / ann["file_name"])
        listed = {s["id"] for s in ann["segments_info"]}
        assert set(np.unique(ids).tolist()) - {0} == listed
        for s in ann["segments_info"]:
            assert s["area"] == int((ids == s["id"]).sum())
    pq_out = pq_compute(*gt_args, out / "refined_panoptic.json", out / "refined_panoptic")
    assert close(rep["after"]["pq/All/pq"], 100 * pq_out["All"]["pq"])
    assert rep["refined_segments"] > 0


# --------------------------------------------------------------------------------------------
# BIG layout
# --------------------------------------------------------------------------------------------
def test_big_layout(tmp_path, weights):
    rng = np.random.default_rng(2)
    folder = tmp_path / "big"
    folder.mkdir()
    gts, coarses = {}, {}
    for name, (h, w) in (("a", (70, 90)), ("b", (64, 64))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            folder / f"{name}_im.jpg"
        )
        gt = np.zeros((h, w), np.uint8)
        gt[10:55, 15:70] = 255
        coarse = np.roll(gt, 4, axis=0)
        coarse[coarse > 0] = 200  # soft values are passed as they are
        if name == "b":
            coarse = np.zeros((h, w), np.uint8)
            coarse[5, 5:8] = 255  # sum 765 < 1024: the official rule keeps it
        Image.fromarray(gt).save(folder / f"{name}_gt.png")
        Image.fromarray(coarse).save(folder / f"{name}_seg.png")
        gts[name], coarses[name] = gt, coarse
    out = tmp_path / "out"
    cli.main(
        [
            "--weights",
            weights,
            "--output",
            str(out),
            "--big",
            str(folder),
            "--min-area",
            "0",
            "--overlays",
            "1",
            *FAST,
        ]
    )
    rep = read_report(out)
    before, after = BinaryMetrics(), BinaryMetrics()
    for name in ("a", "b"):
        refined = np.asarray(Image.open(out / "refined" / f"{name}_refined.png"))
        assert refined.shape == gts[name].shape
        if name == "b":
            assert np.array_equal(refined, coarses[name])
        else:
            assert set(np.unique(refined).tolist()) <= {0, 255}
        before.update(coarses[name], gts[name])
        after.update(refined, gts[name])
    for key in ("iou", "mba", "boundary_iou", "mean_iou"):  # report in percent
        assert close(rep["before"][key], 100 * before.summary()[key])
        assert close(rep["after"][key], 100 * after.summary()[key])
    assert rep["images"] == 2 and "official BIG rule" in " ".join(rep["notes"])
    assert all((out / ov["file"]).is_file() for ov in rep["overlays"])


# --------------------------------------------------------------------------------------------
# torch.distributed: 2 CPU processes (gloo) give the numbers of 1 process
# --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one(tmp_path, weights):
    make_coco(tmp_path / "data", n_images=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    single, multi = tmp_path / "single", tmp_path / "multi"

    def args(out: Path) -> list[str]:
        return coco_args(tmp_path / "data", out, weights, "--min-area", "100", "--overlays", "1")

    subprocess.run(
        [sys.executable, "-m", "crm_d2.cli.eval", *args(single)],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "crm_d2.cli.eval",
            *args(multi),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = read_report(single), read_report(multi)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert one["before"] == two["before"] and one["after"] == two["after"]
    assert one["objects"] == two["objects"] and one["images"] == two["images"] == 4
    assert (single / "refined_instances.json").read_text() == (
        multi / "refined_instances.json"
    ).read_text()
    # each rank refined its shard rank::2 (image ids 1..4 in JSON order)
    ranks = {
        k: json.loads((multi / "cache" / f"{k}.json").read_text())["rank"] for k in (1, 2, 3, 4)
    }
    assert ranks == {1: 0, 2: 1, 3: 0, 4: 1}
    shutil.rmtree(single)


@pytest.mark.shared_data
def test_panoptic_perfect_refiner_from_stride_coarse(shared_data, tmp_path, weights, monkeypatch):
    """Coarse panoptic maps from the ground truth at 1/16, refined by an oracle that answers
    each segment's ground truth: every segment still present in the coarse map must get back
    exactly its ground-truth pixels (segments that vanished at 1/16 cannot come back)."""
    sample = shared_data / "coco_panoptic_sample"
    gt = json.loads((sample / "panoptic_examples.json").read_text())
    by_size = {}
    for ann in gt["annotations"]:
        ids = read_panoptic_png(sample / "panoptic_examples" / ann["file_name"])
        by_size[ids.shape] = [ids == s["id"] for s in ann["segments_info"] if not s["iscrowd"]]

    def oracle(refiner, image, masks, options, *, isthing=None, scales=None, exact=False):
        h, w = masks.shape[-2:]
        out = []
        for i, m in enumerate(masks.numpy() > 0.5):
            best = max(by_size[(h, w)], key=lambda g: iou(m, g))
            out.append(RefinedSegment(i, torch.from_numpy(best).float(), (0, 0, w, h), isthing[i]))
        return out

    monkeypatch.setattr("crm_d2.pipeline.refine_segments", oracle)
    out = tmp_path / "out"
    cli.main(
        ["--weights", weights, "--output", str(out), "--coco-panoptic",
         str(sample / "panoptic_examples.json"), "--panoptic-dir",
         str(sample / "panoptic_examples"), "--images", str(sample / "input_images"),
         "--coarse-from-gt", "stride16", "--min-area", "0", "--overlays", "0", "--quiet"]
    )  # fmt: skip
    rep = read_report(out)
    refined = json.loads((out / "refined_panoptic.json").read_text())
    for ann, coarse in zip(
        refined["annotations"],
        json.loads((out / "coarse_panoptic.json").read_text())["annotations"],
    ):
        gt_ids = read_panoptic_png(sample / "panoptic_examples" / ann["file_name"])
        ids = read_panoptic_png(out / "refined_panoptic" / ann["file_name"])
        for seg in coarse["segments_info"]:  # coarse ids are the ground-truth ids
            assert (ids[gt_ids == seg["id"]] == seg["id"]).all()
    for key in ("pq/All/pq", "pq/Things/pq", "pq/Stuff/pq", "bpq/All/pq"):
        assert rep["after"][key] > rep["before"][key] + 5
    assert rep["after"]["pq/All/rq"] >= rep["before"]["pq/All/rq"]
    assert rep["objects"]["worse"] == 0 and rep["objects"]["after"]["mean_iou"] > 0.95
    expect = pq_compute(
        sample / "panoptic_examples.json", sample / "panoptic_examples",
        out / "coarse_panoptic.json", out / "coarse_panoptic",
    )  # fmt: skip
    assert close(rep["before"]["pq/All/pq"], 100 * expect["All"]["pq"])


def test_maskrcnn_coarse_from_gt():
    """maskrcnn: the mask in its tight box at 28x28, pasted back: a small object keeps its
    outline (up to its 4 corner pixels), a large one loses detail at the scale of its box / 28."""
    spec = CoarseSpec.parse("maskrcnn")
    assert spec.describe() == "maskrcnn"
    small = np.zeros((100, 120), bool)
    small[10:24, 30:58] = True  # 14x28: exactly representable at 28x28
    assert ((spec.render(small, (0, 0)) >= 128) != small).sum() <= 4
    big = np.zeros((400, 500), bool)
    big[50:350, 40:460] = True
    big[100:104, 100:400] = False  # a 4-px slit, thinner than one 28x28 cell of this box
    coarse = spec.render(big, (0, 0)) >= 128
    assert coarse[100:104, 150:350].all()  # the slit is filled
    assert not coarse[:50].any() and not coarse[:, :40].any()  # nothing outside the box
    with pytest.raises(ValueError, match="maskrcnn"):
        CoarseSpec.parse("maskrcnn:1")
