"""CoarseGTSimulator through the whole detectron2 path (tools/train_net.py --eval-only) gives the
numbers of crm-eval --coarse-from-gt on the same data, and writes its tables to OUTPUT_DIR."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "detectron2",
    reason="detectron2 is not installed: install it from its GitHub repository (see README) "
    "to run the detectron2-layer tests",
)
pytestmark = pytest.mark.detectron2

import torch  # noqa: E402
from test_d2_train_net import REPO, require_panopticapi, run_train_net  # noqa: E402

from crm_d2.cli import eval as crm_eval  # noqa: E402
from crm_d2.crm_eval.coarse import CoarseSpec  # noqa: E402
from crm_d2.d2.simulator import ANNOTATIONS_KEY, CoarseGTSimulator  # noqa: E402

SIMULATOR = str(REPO / "configs" / "coarse_gt_simulator_crm.yaml")
FAST = ["MODEL.CRM.SCALES", "(0.5,)"]  # one half-resolution pass: cheap, same code path


def _eval_report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _d2_tables(out: Path, dataset: str) -> dict:
    tables = json.loads((out / "crm_before_after.json").read_text())[dataset]
    return tables["before (inner model)"], tables["after (CRM-refined)"]


def test_simulator_renders_the_ground_truth_coarse():
    sim = CoarseGTSimulator(coarse=CoarseSpec.parse("stride8_binary")).eval()
    square = [[10.0, 10.0, 60.0, 10.0, 60.0, 50.0, 10.0, 50.0]]
    inputs = {"height": 64, "width": 80, "image_id": 3, ANNOTATIONS_KEY: [
        {"segmentation": square, "category_id": 4, "iscrowd": 0},
        {"segmentation": square, "category_id": 1, "iscrowd": 1},  # crowd: not a prediction
        {"segmentation": [[0.0, 0.0, 2.0, 0.0, 2.0, 2.0]], "category_id": 2, "iscrowd": 0},
    ]}
    out = sim([inputs])[0]["instances"]
    assert len(out) == 1 and out.pred_classes.tolist() == [4]  # the tiny one vanished at 1/8
    mask = out.pred_masks[0]
    assert mask.dtype == torch.bool and mask.shape == (64, 80)
    assert 0.9 < mask.sum().item() / (50 * 40) < 1.1 and out.scores.tolist() == [1.0]
    with pytest.raises(ValueError, match="needs the ground truth in its inputs"):
        sim([{"height": 4, "width": 4}])


def test_train_net_with_the_simulator_equals_crm_eval_panoptic(panoptic_sample, tmp_path):
    """coco_panoptic_sample: PQ before/after of train_net (detectron2's COCOPanopticEvaluator)
    equal crm-eval --coarse-from-gt stride8_binary (its own PQ), and the simulated coarse panoptic
    maps are crm-eval's coarse maps."""
    require_panopticapi()
    d2_out, eval_out = tmp_path / "d2", tmp_path / "eval"
    run_train_net([
        "--config-file", SIMULATOR, "--eval-only",
        "--panoptic-dataset", "crm_sim_sample", str(panoptic_sample / "input_images"),
        str(panoptic_sample / "panoptic_examples"),
        str(panoptic_sample / "panoptic_examples.json"),
        "MODEL.DEVICE", "cpu", "MODEL.CRM.EVALUATORS", "('panoptic_seg',)", *FAST,
        "OUTPUT_DIR", str(d2_out),
    ], tmp_path)
    crm_eval.main([
        "--coco-panoptic", str(panoptic_sample / "panoptic_examples.json"),
        "--panoptic-dir", str(panoptic_sample / "panoptic_examples"),
        "--images", str(panoptic_sample / "input_images"), "--coarse-from-gt", "stride8_binary",
        "--scales", "0.5", "--overlays", "0", "--quiet", "--output", str(eval_out),
    ])
    before, after = _d2_tables(d2_out, "crm_sim_sample")
    report = _eval_report(eval_out)
    for d2_key, split in (("PQ", "All"), ("PQ_th", "Things"), ("PQ_st", "Stuff"),
                          ("SQ", "All"), ("RQ", "All")):
        key = f"pq/{split}/{d2_key[:2].lower()}"
        assert before["panoptic_seg"][d2_key] == pytest.approx(report["before"][key], abs=1e-6)
        assert after["panoptic_seg"][d2_key] == pytest.approx(report["after"][key], abs=1e-6)
    assert after["panoptic_seg"]["PQ"] != before["panoptic_seg"]["PQ"]  # CRM changed something
    assert (d2_out / "crm_before_after.md").read_text().count("| PQ ") == 1


@pytest.mark.slow
def test_train_net_with_the_simulator_equals_crm_eval_instances(shared_data, tmp_path):
    """coco_tiny (80 images): mask AP before/after of train_net (detectron2's COCOEvaluator)
    equal crm-eval --coarse-from-gt stride8_binary on the same images."""
    root = shared_data / "coco_tiny"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    gt, images = root / "annotations" / "instances_train2017.json", root / "train2017"
    d2_out, eval_out = tmp_path / "d2", tmp_path / "eval"
    run_train_net([
        "--config-file", SIMULATOR, "--eval-only",
        "--instance-dataset", "crm_sim_tiny", str(images), str(gt),
        "MODEL.DEVICE", "cpu", *FAST, "OUTPUT_DIR", str(d2_out),
    ], tmp_path)
    crm_eval.main([
        "--coco-instances", str(gt), "--images", str(images), "--coarse-from-gt", "stride8_binary",
        "--scales", "0.5", "--overlays", "0", "--quiet", "--output", str(eval_out),
    ])
    before, after = _d2_tables(d2_out, "crm_sim_tiny")
    report = _eval_report(eval_out)
    for key in ("AP", "AP50", "AP75"):
        for d2_side, side in ((before, "before"), (after, "after")):
            want = report[side][f"segm/{key}"]
            got = d2_side["segm"][key]
            assert (math.isnan(got) and want is None) or got == pytest.approx(want, abs=1e-6)
    assert np.isfinite(after["segm"]["AP"])
