"""crm-eval's typed per-image records and input formats: round trip, records of earlier
versions, damaged records, and the per-format option checks."""

from __future__ import annotations

import json
import math

import pytest
from test_eval_tool import coco_args, make_coco, read_report

from crm_d2.cli import eval as cli
from crm_d2.crm_eval import BigFormat, CoarseSpec, EvalConfig, InstancesFormat, PanopticFormat
from crm_d2.crm_eval.formats.big import BigPayload
from crm_d2.crm_eval.formats.instances import InstancesPayload
from crm_d2.crm_eval.formats.panoptic import PanopticPayload
from crm_d2.crm_eval.records import ImageRecord, ObjectRecord, OutputLayout, RecordStore
from crm_d2.evaluation.binary import ObjectScores

SCORES = {"intersection": 3, "union": 5, "iou": 0.6, "boundary_iou": 0.5}


def _object(index: int, mba: float) -> dict:
    """An object as the per-image functions of earlier versions wrote it."""
    return {
        "index": index,
        "gt": 7,
        "category_id": 2,
        "refined": True,
        "crop": [0, 1, 10, 12],
        "before": {**SCORES, "mba": None},  # undefined mBA: null in strict JSON
        "after": {**SCORES, "iou": 0.8, "mba": mba},
    }


def test_record_round_trip_keeps_every_field(tmp_path):
    payload = PanopticPayload("1.png", "/c/1.png", "/r/1.png", {"segments_info": []}, gt_ann={})
    obj = ObjectRecord(
        3,
        7,
        2,
        False,
        [0, 1, 10, 12],
        ObjectScores(3, 5, 0.6, math.nan, 0.5),
        ObjectScores(4, 5, 0.8, 0.9, 0.7),
    )
    rec = ImageRecord(
        "k1", 1, "1.jpg", 12, 10, 4, 2, [obj], payload, vanished=1, seconds=0.5, rank=3
    )
    store = RecordStore(OutputLayout(str(tmp_path)))
    store.write(rec)
    back = store.read("k1", PanopticPayload.from_json)
    assert math.isnan(back.objects[0].before.mba)
    assert json.dumps(back.to_json()) == json.dumps(rec.to_json())  # NaN != NaN: as text
    assert back.objects[0].after == rec.objects[0].after and back.payload == rec.payload
    assert back.payload.coarse_ann is None and back.payload.gt_ann == {}
    assert back.objects[0].iou_change == pytest.approx(0.2)


def test_records_of_earlier_versions_are_read(tmp_path):
    """The dicts the per-image functions return, and the records earlier versions stored (no
    ``vanished`` outside instances, other key order), read as typed records."""
    store = RecordStore(OutputLayout(str(tmp_path)))
    header = {"key": "a", "image_id": "a", "file_name": "a_im.jpg", "height": 9, "width": 8}
    old_big = {
        **header,
        "segments": 1,
        "coarse_png": "/x/a_seg.png",
        "refined_png": "/x/a_refined.png",
        "empty_coarse": False,
        "refined": 1,
        "objects": [_object(0, 0.25)],
        "seconds": 0.1,
        "rank": 1,
    }
    (tmp_path / "cache" / "a.json").write_text(json.dumps(old_big))
    rec = store.read("a", BigPayload.from_json)
    assert (rec.vanished, rec.rank, rec.refined, rec.segments) == (0, 1, 1, 1)
    assert rec.payload == BigPayload("/x/a_seg.png", "/x/a_refined.png", False)
    assert math.isnan(rec.objects[0].before.mba) and rec.objects[0].after.mba == 0.25
    old_instances = {
        **{**header, "key": "b"},
        "vanished": 2,
        "segments": 0,
        "coarse_results": [],
        "refined_results": [],
        "objects": [],
        "refined": 0,
        "seconds": 0.0,
        "rank": 0,
    }
    (tmp_path / "cache" / "b.json").write_text(json.dumps(old_instances))
    rec = store.read("b", InstancesPayload.from_json)
    assert rec.vanished == 2 and rec.payload == InstancesPayload([], [])
    stored = json.loads((tmp_path / "cache" / "b.json").read_text())
    store.write(rec)
    assert json.loads((tmp_path / "cache" / "b.json").read_text()) == stored


def test_damaged_record_is_refused_with_the_fix(tmp_path, tiny_weights):
    make_coco(tmp_path / "data", n_images=2)
    out = tmp_path / "out"
    args = coco_args(tmp_path / "data", out, tiny_weights, "--overlays", "0")
    cli.main(args)
    first = read_report(out)
    path = out / "cache" / "1.json"
    record = json.loads(path.read_text())
    del record["objects"]
    path.write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="1.json cannot be read.*objects.*--overwrite"):
        cli.main(args)
    cli.main([*args, "--overwrite"])
    again = read_report(out)
    assert again["before"] == first["before"] and again["after"] == first["after"]


def test_each_format_refuses_the_options_it_cannot_use():
    coarse = CoarseSpec.parse("stride8")
    with pytest.raises(ValueError, match="BIG layout brings its own coarse masks"):
        EvalConfig(output="o", inputs=BigFormat("big"), coarse=coarse)
    for inputs in (InstancesFormat("gt.json", "im"), PanopticFormat.from_instances("gt", "im")):
        with pytest.raises(ValueError, match="--predictions RESULTS.json or --coarse-from-gt"):
            EvalConfig(output="o", inputs=inputs)
    panoptic = PanopticFormat(images="im", coco_panoptic="p.json", panoptic_dir="p")
    with pytest.raises(ValueError, match="--pred-json/--pred-dir or --coarse-from-gt"):
        EvalConfig(output="o", inputs=panoptic)
    with pytest.raises(ValueError, match="--panoptic-dir"):
        PanopticFormat(images="im", coco_panoptic="p.json")
    with pytest.raises(TypeError, match="EvalFormat"):
        EvalConfig(output="o", inputs="instances")
    assert EvalConfig(output="o", inputs=panoptic, coarse=coarse).inputs.settings_name == "panoptic"
    as_pan = PanopticFormat.from_instances("gt", "im", "res.json")
    assert (as_pan.settings_name, as_pan.kind) == ("instances (as panoptic)", "panoptic")
    with pytest.raises(RuntimeError, match="call open"):
        as_pan.validate([])


def test_cli_refuses_options_of_another_layout(tmp_path):
    out = str(tmp_path / "out")
    for extra, message in (
        (["--big", "b", "--images", "im"], "--images: not an option of this input layout"),
        (["--coco-instances", "g", "--images", "im", "--panoptic-dir", "p"], "--panoptic-dir"),
        (["--big", "b", "--as-panoptic"], "BIG layout brings its own coarse masks"),
        (
            ["--coco-panoptic", "g", "--images", "im", "--panoptic-dir", "p", "--as-panoptic"],
            "--as-panoptic converts a COCO instance set",
        ),
    ):
        with pytest.raises(SystemExit, match=message):
            cli.main(["--output", out, *extra])
