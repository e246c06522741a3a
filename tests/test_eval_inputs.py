"""crm-eval against hostile inputs and stale caches: every bad input is refused before any
refinement with a message naming it; the resume cache is keyed on what the inputs hold; a
resumed report says so; the logs say which table is before and which is after."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval_tool import coco_args, make_coco, read_report

from crm_d2.cli import eval as cli
from crm_d2.crm_eval.datasets import rle_counts, rle_problem
from crm_d2.crm_eval.matching import rle_encode
from crm_d2.evaluation.panoptic import write_panoptic_png


@pytest.fixture()
def logs(caplog, monkeypatch):
    """caplog that also sees crm_d2's records when detectron2's setup_logger (run by an earlier
    test in this process) stopped the 'crm_d2' logger from propagating."""
    monkeypatch.setattr(logging.getLogger("crm_d2"), "propagate", True)
    caplog.set_level("INFO")
    return caplog


@pytest.fixture()
def no_refine(monkeypatch):
    """Fail the test if CRM runs: the errors must come before any refinement."""
    def refine(*a, **k):
        raise AssertionError("refinement started before the error")
    monkeypatch.setattr("crm_d2.pipeline.refine_segments", refine)


def _results(root: Path) -> list[dict]:
    return json.loads((root / "results.json").read_text())


def _write_results(root: Path, results) -> None:
    (root / "results.json").write_text(json.dumps(results))


# --------------------------------------------------------------------------------------------
# RLE validation
# --------------------------------------------------------------------------------------------
def test_rle_counts_decodes_like_pycocotools():
    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (7, 5), (60, 80), (300, 200)):
        mask = rng.random((h, w)) > rng.random()
        mask[: h // 2, : w // 3] = True  # long runs: multi-character values
        rle = rle_encode(mask)
        runs = rle_counts(rle["counts"])
        assert runs.sum() == h * w and runs.min() >= 0
        flat = mask.T.reshape(-1)  # column-major, starting with a run of zeros
        rebuilt = np.repeat(np.arange(runs.size) % 2 == 1, runs)
        assert np.array_equal(rebuilt, flat)
        assert rle_problem(rle) is None


def test_rle_problems_are_named():
    good = rle_encode(np.eye(6, dtype=bool))
    half = {**good, "counts": good["counts"][: len(good["counts"]) // 2]}
    assert "sum to" in rle_problem(half) or "truncated" in rle_problem(half)
    assert "empty" in rle_problem({**good, "counts": ""})
    assert "negative" in rle_problem({**good, "counts": [10, -4, 30]})
    assert "sum to 3 pixels" in rle_problem({**good, "counts": [1, 2]})
    assert "size" in rle_problem({**good, "size": [6]})
    assert "alphabet" in rle_problem({**good, "counts": "\x01\x02"})


@pytest.mark.parametrize("damage, message", [
    (lambda r: r["segmentation"].update(counts=r["segmentation"]["counts"][:7]), "RLE"),
    (lambda r: r["segmentation"].update(counts=""), "is empty"),
    (lambda r: r["segmentation"].update(counts=[100, -5, 4705]), "negative run"),
    (lambda r: r.update(score=float("nan")), "score nan is not a finite number"),
    (lambda r: r.update(segmentation=rle_encode(np.ones((10, 10), bool))),
     r"RLE size \[10, 10\] differs from the image's \[60, 80\]"),
])
def test_bad_results_are_refused_up_front_naming_the_result(tmp_path, tiny_weights, damage,
                                                            message, no_refine):
    make_coco(tmp_path / "data")
    results = _results(tmp_path / "data")
    damage(results[3])
    _write_results(tmp_path / "data", results)
    args = coco_args(tmp_path / "data", tmp_path / "out", tiny_weights)
    with pytest.raises(SystemExit, match=rf"result 3 \(image_id 1.*{message}.*Nothing was"):
        cli.main(args)


def test_dict_truncated_and_empty_prediction_files(tmp_path, tiny_weights, no_refine, logs):
    make_coco(tmp_path / "data")
    root = tmp_path / "data"
    args = coco_args(root, tmp_path / "out", tiny_weights)
    _write_results(root, {"annotations": []})
    with pytest.raises(SystemExit, match=r"a list .* got a dict with keys \['annotations'\]"):
        cli.main(args)
    (root / "results.json").write_text('[{"image_id": 1, "category_id": 1, "sco')
    with pytest.raises(SystemExit, match=r"results\.json' is not valid JSON .*truncated"):
        cli.main(args)
    (root / "gt.json").write_text((root / "gt.json").read_text()[:50])
    with pytest.raises(SystemExit, match=r"gt\.json' is not valid JSON"):
        cli.main(args)
    make_coco(tmp_path / "data2")
    _write_results(tmp_path / "data2", [])
    cli.main(coco_args(tmp_path / "data2", tmp_path / "out2", tiny_weights))
    assert "holds no results" in logs.text


# --------------------------------------------------------------------------------------------
# Panoptic predictions whose PNG ids disagree with their JSON
# --------------------------------------------------------------------------------------------
def _panoptic_set(root: Path, n: int = 3) -> None:
    """n images with two segments each (a thing and a stuff); predictions = ground truth."""
    rng = np.random.default_rng(0)
    from PIL import Image

    for d in ("images", "gt", "pred"):
        (root / d).mkdir(parents=True)
    images, anns = [], []
    for k in range(1, n + 1):
        h, w = 48, 64 + k
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            root / "images" / f"{k}.png")
        ids = np.full((h, w), 2, np.int64)
        ids[10:30, 10:40] = 1
        write_panoptic_png(root / "gt" / f"{k}.png", ids)
        write_panoptic_png(root / "pred" / f"{k}.png", ids)
        segs = [{"id": 1, "category_id": 1, "iscrowd": 0, "area": int((ids == 1).sum())},
                {"id": 2, "category_id": 2, "iscrowd": 0, "area": int((ids == 2).sum())}]
        images.append({"id": k, "file_name": f"{k}.png", "height": h, "width": w})
        anns.append({"image_id": k, "file_name": f"{k}.png", "segments_info": segs})
    cats = [{"id": 1, "name": "thing", "isthing": 1}, {"id": 2, "name": "stuff", "isthing": 0}]
    (root / "gt.json").write_text(json.dumps({"images": images, "annotations": anns,
                                              "categories": cats}))
    (root / "pred.json").write_text(json.dumps({"annotations": anns}))


def _panoptic_args(root: Path, out: Path, weights: str) -> list[str]:
    return ["--weights", weights, "--output", str(out), "--coco-panoptic", str(root / "gt.json"),
            "--panoptic-dir", str(root / "gt"), "--images", str(root / "images"),
            "--pred-json", str(root / "pred.json"), "--pred-dir", str(root / "pred"),
            "--scales", "0.5", "1", "--quiet", "--overlays", "0"]


def test_panoptic_id_mismatch_is_refused_before_refining(tmp_path, tiny_weights, no_refine):
    root = tmp_path / "pan"
    _panoptic_set(root)
    ids = np.full((48, 67), 2, np.int64)
    ids[0:5, 0:5] = 7  # the last image's PNG holds a segment its JSON does not list
    write_panoptic_png(root / "pred" / "3.png", ids)
    with pytest.raises(SystemExit, match=r"image 3: segment id 7 .*not in its JSON.*nothing was"):
        cli.main(_panoptic_args(root, tmp_path / "out", tiny_weights))
    pred = json.loads((root / "pred.json").read_text())
    pred["annotations"] = pred["annotations"][:2]
    (root / "pred.json").write_text(json.dumps(pred))
    with pytest.raises(SystemExit, match=r"has no entry for image 3"):
        cli.main(_panoptic_args(root, tmp_path / "out", tiny_weights))


# --------------------------------------------------------------------------------------------
# Resume cache and report
# --------------------------------------------------------------------------------------------
def test_cache_is_keyed_on_what_the_inputs_hold(tmp_path, tiny_weights, make_crm):
    from crm_d2 import save_crm

    make_coco(tmp_path / "data")
    root, out = tmp_path / "data", tmp_path / "out"
    weights = tmp_path / "w.pth"
    save_crm(make_crm(seed=0), str(weights))
    args = coco_args(root, out, str(weights), "--overlays", "0")
    cli.main(args)
    gt = json.loads((root / "gt.json").read_text())
    gt["annotations"][0]["category_id"] = 2  # same path, other content
    (root / "gt.json").write_text(json.dumps(gt))
    with pytest.raises(SystemExit, match=r"cached per-image records .*coco_instances_sha256"
                                         r".*not reused.*--overwrite"):
        cli.main(args)
    make_coco(tmp_path / "fresh")
    (root / "gt.json").write_text((tmp_path / "fresh" / "gt.json").read_text())
    cli.main(args)  # the original content again: the cache is valid
    save_crm(make_crm(seed=1), str(weights))  # other weights at the same path
    with pytest.raises(SystemExit, match="weights_sha256"):
        cli.main(args)
    cli.main([*args, "--overwrite"])
    from_gt = ["--weights", str(weights), "--output", str(out), "--coco-instances",
               str(root / "gt.json"), "--images", str(root / "images"), "--coarse-from-gt",
               "stride8", "--scales", "0.5", "1", "--quiet"]
    with pytest.raises(SystemExit, match="differing: .*coarse"):
        cli.main(from_gt)


def test_resumed_report_says_so_and_gives_the_whole_refinement_time(tmp_path, tiny_weights):
    make_coco(tmp_path / "data")
    out = tmp_path / "out"
    args = coco_args(tmp_path / "data", out, tiny_weights, "--overlays", "0")
    cli.main([*args, "--limit", "2"])
    cli.main(args)
    report = read_report(out)
    records = [json.loads(p.read_text()) for p in sorted((out / "cache").glob("*.json"))]
    total = sum(r["seconds"] for r in records)
    assert report["timing"]["resumed_images"] == 2
    assert abs(report["timing"]["refine_seconds"] - total) < 1e-9
    md = (out / "report.md").read_text()
    assert "RESUMED run: 2 of 3 images came from the cache" in md
    assert f"Refinement of all 3 images took {total:.1f} s in total" in md


def test_logs_name_the_before_and_after_tables(tmp_path, tiny_weights, logs):
    caplog = logs
    make_coco(tmp_path / "data")
    cli.main(coco_args(tmp_path / "data", tmp_path / "out", tiny_weights, "--overlays", "0"))
    for label in ("before (coarse input)", "after (refined by CRM)"):
        assert f"COCO segm AP of {label}" in caplog.text
    _panoptic_set(tmp_path / "pan", n=1)
    caplog.clear()
    cli.main(_panoptic_args(tmp_path / "pan", tmp_path / "out_pan", tiny_weights))
    for label in ("before (coarse input)", "after (refined by CRM)"):
        assert f"PQ of {label}" in caplog.text and f"Boundary PQ of {label}" in caplog.text


# --------------------------------------------------------------------------------------------
# Options, output folder, memory
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [["--scales", "0"], ["--chunk-size", "0"],
                                   ["--batch-size", "0"], ["--max-side", "-5"]])
def test_bad_values_are_argparse_errors(tmp_path, tiny_weights, flags, capsys):
    make_coco(tmp_path / "data")
    with pytest.raises(SystemExit) as e:
        cli.main([*coco_args(tmp_path / "data", tmp_path / "out", tiny_weights), *flags])
    assert e.value.code == 2 and f"argument {flags[0]}" in capsys.readouterr().err


def test_cuda_without_cuda_and_output_under_a_file(tmp_path, tiny_weights, capsys, no_refine):
    make_coco(tmp_path / "data")
    args = coco_args(tmp_path / "data", tmp_path / "out", tiny_weights)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            cli.main([*args, "--device", "cuda"])
        assert e.value.code == 2 and "--device" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="is a file"):
        cli.main(coco_args(tmp_path / "data", tmp_path / "file" / "out", tiny_weights))


def test_memory_is_checked_up_front_and_names_max_side(tmp_path, tiny_weights, monkeypatch,
                                                       no_refine):
    make_coco(tmp_path / "data")
    monkeypatch.setattr("crm_d2.memory.available_bytes", lambda device: 2**20)
    with pytest.raises(SystemExit, match=r"image 3 \(90x56, the largest.*--max-side N"):
        cli.main(coco_args(tmp_path / "data", tmp_path / "out", tiny_weights))
