"""crm_d2.d2.data and crm_d2.d2.evaluators: original-image mapper, datasets registered by paths,
evaluators."""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict

import numpy as np
import pytest

detectron2 = pytest.importorskip(
    "detectron2",
    reason="detectron2 is not installed: install it from its GitHub repository (see README) "
    "to run the detectron2-layer tests",
)
pytestmark = pytest.mark.detectron2

import torch  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata  # noqa: E402
from detectron2.evaluation import (  # noqa: E402
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
)
from detectron2.structures import BitMasks, Instances  # noqa: E402
from PIL import Image  # noqa: E402

from crm_d2.d2.data import (  # noqa: E402
    OriginalImageMapper,
    entity_gt_json,
    panoptic_metadata,
    prepare_dataset_files,
    register_coco_instance_folder,
    register_coco_panoptic_folder,
)
from crm_d2.d2.evaluators import (  # noqa: E402
    BeforeAfterEvaluator,
    EntityAPEvaluator,
    before_after_results,
    format_before_after,
)
from crm_d2.d2.meta_arch import INNER_KEY  # noqa: E402
from crm_d2.evaluation import read_panoptic_png  # noqa: E402


def unique(name: str) -> str:
    return f"{name}_{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------------------------
# Mapper
# --------------------------------------------------------------------------------------------
def test_original_image_mapper(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(rgb).save(path)

    def shrink(d):  # a test mapper that halves the image
        return {**d, "image": torch.zeros(3, 15, 20, dtype=torch.uint8)}

    def keep(d):
        return {**d, "image": torch.zeros(3, 30, 40, dtype=torch.uint8)}

    record = {"file_name": str(path), "height": 30, "width": 40}
    out = OriginalImageMapper(shrink)(record)
    assert out["original_image"].dtype == torch.uint8
    assert torch.equal(out["original_image"], torch.from_numpy(rgb).permute(2, 0, 1))
    assert "original_image" not in OriginalImageMapper(keep)(record)
    assert OriginalImageMapper(lambda d: None)(record) is None


# --------------------------------------------------------------------------------------------
# Metadata and registration
# --------------------------------------------------------------------------------------------
def test_panoptic_metadata_matches_detectron2_builtin(panoptic_sample):
    cats = json.loads((panoptic_sample / "panoptic_coco_categories.json").read_text())
    for separated, builtin in (
        (True, "coco_panoptic_separated"),
        (False, "coco_panoptic_standard"),
    ):
        ours = panoptic_metadata(list(reversed(cats)), separated=separated)
        ref = _get_builtin_metadata(builtin)
        for key in (
            "thing_dataset_id_to_contiguous_id",
            "stuff_dataset_id_to_contiguous_id",
            "thing_classes",
        ):
            assert ours[key] == ref[key], key
        if separated:
            assert ours["stuff_classes"][0] == "things" and len(ours["stuff_classes"]) == 54


@pytest.fixture(scope="module")
def registered(panoptic_sample, tmp_path_factory):
    name = unique("crm_test_panoptic")
    meta = register_coco_panoptic_folder(
        name,
        str(panoptic_sample / "input_images"),
        str(panoptic_sample / "panoptic_examples"),
        str(panoptic_sample / "panoptic_examples.json"),
        cache_dir=str(tmp_path_factory.mktemp("cache")),
    )
    prepare_dataset_files(name)
    return name, meta


def test_register_panoptic_folder_dicts(registered, panoptic_sample):
    name, meta = registered
    dicts = DatasetCatalog.get(name)
    gt = json.loads((panoptic_sample / "panoptic_examples.json").read_text())
    assert [d["image_id"] for d in dicts] == [a["image_id"] for a in gt["annotations"]]
    for d, ann in zip(dicts, gt["annotations"]):
        assert Image.open(d["file_name"]).size == (d["width"], d["height"])
        assert d["pan_seg_file_name"].endswith(ann["file_name"])
        for seg, ref in zip(d["segments_info"], ann["segments_info"]):
            cat = ref["category_id"]
            if seg["isthing"]:
                assert meta.thing_dataset_id_to_contiguous_id[cat] == seg["category_id"]
            else:
                assert meta.stuff_dataset_id_to_contiguous_id[cat] == seg["category_id"]
    assert meta.evaluator_type == "coco_panoptic_seg"


def test_derived_files(registered, panoptic_sample):
    name, meta = registered
    gt = json.loads((panoptic_sample / "panoptic_examples.json").read_text())
    isthing = {c["id"]: c["isthing"] for c in gt["categories"]}
    segs = [s for a in gt["annotations"] for s in a["segments_info"]]
    instances = json.loads(open(meta.json_file).read())
    entities = json.loads(open(meta.entity_json_file).read())
    assert len(entities["annotations"]) == len(segs) == 50
    assert len(instances["annotations"]) == sum(isthing[s["category_id"]] for s in segs)
    assert {c["id"] for c in instances["categories"]} == {k for k, v in isthing.items() if v}
    from pycocotools import mask as mask_util

    for ann, seg in zip(entities["annotations"], segs):
        assert ann["area"] == seg["area"] == int(mask_util.area(ann["segmentation"]))
        assert ann["iscrowd"] == seg["iscrowd"]
    # semantic PNGs: an independent per-pixel construction
    for record in DatasetCatalog.get(name):
        sem = np.asarray(Image.open(record["sem_seg_file_name"]))
        ids = read_panoptic_png(record["pan_seg_file_name"])
        want = np.full(ids.shape, 255, np.uint8)
        ann = next(a for a in gt["annotations"] if a["image_id"] == record["image_id"])
        for s in ann["segments_info"]:
            cat = s["category_id"]
            want[ids == s["id"]] = (
                0 if isthing[cat] else (meta.stuff_dataset_id_to_contiguous_id[cat])
            )
        assert np.array_equal(sem, want)
        assert set(np.unique(sem)) - {0, 255} <= set(range(1, 54))
    assert entity_gt_json(name, "unused") == meta.entity_json_file


def test_register_errors_and_instance_folder(shared_data, tmp_path):
    with pytest.raises(ValueError, match="panoptic JSON"):
        register_coco_panoptic_folder(
            unique("x"),
            str(tmp_path),
            str(tmp_path),
            str(tmp_path / "none.json"),
            cache_dir=str(tmp_path),
        )
    tiny = shared_data / "coco_tiny"
    if not tiny.is_dir():
        pytest.skip(f"{tiny} not found")
    name = unique("crm_test_instances")
    json_file = str(tiny / "annotations" / "instances_train2017.json")
    register_coco_instance_folder(name, str(tiny / "train2017"), json_file)
    assert len(DatasetCatalog.get(name)) == 80
    assert MetadataCatalog.get(name).json_file == json_file
    assert entity_gt_json(name, str(tmp_path)) == json_file


# --------------------------------------------------------------------------------------------
# Evaluators
# --------------------------------------------------------------------------------------------
def perfect_outputs(record, drop_segment: int | None = None) -> dict:
    """Model outputs equal to the ground truth (optionally without one segment)."""
    ids = read_panoptic_png(record["pan_seg_file_name"])
    info = []
    for s in record["segments_info"]:
        if s["id"] == drop_segment:
            ids[ids == s["id"]] = 0
            continue
        info.append({"id": s["id"], "category_id": s["category_id"], "isthing": s["isthing"]})
    kept = [s for s in record["segments_info"] if s["id"] != drop_segment and not s["iscrowd"]]
    things = [s for s in kept if s["isthing"]]
    inst = Instances((record["height"], record["width"]))
    inst.pred_masks = torch.from_numpy(np.stack([ids == s["id"] for s in things]))
    inst.pred_boxes = BitMasks(inst.pred_masks).get_bounding_boxes()
    inst.scores = torch.ones(len(things))
    inst.pred_classes = torch.tensor([s["category_id"] for s in things])
    ent = Instances((record["height"], record["width"]))
    ent.pred_masks = torch.from_numpy(np.stack([ids == s["id"] for s in kept]))
    ent.scores = torch.ones(len(kept))
    ent.pred_classes = torch.zeros(len(kept), dtype=torch.int64)
    return {"panoptic_seg": (torch.from_numpy(ids).int(), info), "instances": inst, "entities": ent}


class EntityView(DatasetEvaluator):
    """Feeds output["entities"] as "instances" to an EntityAPEvaluator."""

    def __init__(self, inner):
        self.inner = inner

    def reset(self):
        self.inner.reset()

    def process(self, inputs, outputs):
        self.inner.process(inputs, [{"instances": o["entities"]} for o in outputs])

    def evaluate(self):
        return self.inner.evaluate()


def test_before_after_with_detectron2_evaluators_known_answers(
    registered, panoptic_sample, tmp_path
):
    name, meta = registered
    records = DatasetCatalog.get(name)
    gt = json.loads((panoptic_sample / "panoptic_examples.json").read_text())
    cats = {c["id"]: c for c in gt["categories"]}
    # drop the only sports ball (category 37): its category's PQ becomes 0
    ball = [s for a in gt["annotations"] for s in a["segments_info"] if s["category_id"] == 37]
    assert len(ball) == 1 and ball[0]["iscrowd"] == 0
    drop = ball[0]["id"]

    def make(sub):
        return DatasetEvaluators(
            [
                COCOPanopticEvaluator(name, str(tmp_path / sub)),
                COCOEvaluator(name, ("segm",), False, str(tmp_path / sub)),
                EntityView(EntityAPEvaluator(meta.entity_json_file, distributed=False)),
            ]
        )

    evaluator = BeforeAfterEvaluator(make("inner"), make("refined"))
    evaluator.reset()
    for record in records:
        out = perfect_outputs(record, drop_segment=drop)
        out[INNER_KEY] = perfect_outputs(record)
        evaluator.process([record], [out])
    results = evaluator.evaluate()

    non_crowd = {
        s["category_id"] for a in gt["annotations"] for s in a["segments_info"] if not s["iscrowd"]
    }
    things = {c for c in non_crowd if cats[c]["isthing"]}
    assert results["inner/panoptic_seg"]["PQ"] == pytest.approx(100)
    assert results["panoptic_seg"]["PQ"] == pytest.approx(
        100 * (len(non_crowd) - 1) / len(non_crowd)
    )
    assert results["panoptic_seg"]["PQ_th"] == pytest.approx(100 * (len(things) - 1) / len(things))
    assert results["panoptic_seg"]["PQ_st"] == pytest.approx(100)
    assert results["delta/panoptic_seg"]["PQ"] == pytest.approx(results["panoptic_seg"]["PQ"] - 100)
    assert results["inner/segm"]["AP"] == pytest.approx(100)
    assert results["segm"]["AP"] < 100
    assert results["inner/entity_segm"]["AP"] == pytest.approx(100)
    assert results["entity_segm"]["AP"] < 100


class Recorder(DatasetEvaluator):
    """Pops "isthing" like COCOPanopticEvaluator does, and records what it saw."""

    def __init__(self, value):
        self.value = value
        self.seen = []

    def reset(self):
        self.seen = []

    def process(self, inputs, outputs):
        for out in outputs:
            assert INNER_KEY not in out
            self.seen.append([s.pop("isthing") for s in out["panoptic_seg"][1]])

    def evaluate(self):
        return OrderedDict({"panoptic_seg": {"PQ": self.value, "PQ-person": 1.0}})


def test_before_after_evaluator_copies_and_merges(caplog):
    inner, refined = Recorder(40.0), Recorder(41.5)
    evaluator = BeforeAfterEvaluator(inner, refined)
    evaluator.reset()
    info = [{"id": 1, "isthing": True}]
    out = {"panoptic_seg": (torch.zeros(2, 2), info), INNER_KEY: {"panoptic_seg": (None, info)}}
    evaluator.process([{}], [out])
    assert inner.seen == refined.seen == [[True]]
    assert info == [{"id": 1, "isthing": True}]  # the model's own output is not edited
    caplog.set_level("INFO", logger="crm_d2.d2.evaluators")
    results = evaluator.evaluate()
    assert list(results) == ["panoptic_seg", "inner/panoptic_seg", "delta/panoptic_seg"]
    assert results["delta/panoptic_seg"] == {"PQ": pytest.approx(1.5)}
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "CRM before/after: panoptic_seg" in text
    row = next(line for line in text.splitlines() if line.startswith("| PQ "))
    assert [float(v) for v in row.strip("|").split("|")[1:]] == [40.0, 41.5, 1.5]
    with pytest.raises(ValueError, match="EVAL_BOTH"):
        evaluator.process([{}], [{"panoptic_seg": (None, [])}])


def test_format_and_merge_helpers():
    inner = {"segm": {"AP": 10.0, "AP50": float("nan"), "AP-cat": 3.0}}
    refined = {"segm": {"AP": 12.5, "AP50": 20.0, "AP-cat": 4.0}}
    merged = before_after_results(inner, refined)
    assert merged["delta/segm"]["AP"] == 2.5 and np.isnan(merged["delta/segm"]["AP50"])
    assert "AP-cat" not in merged["delta/segm"]
    table = format_before_after(inner, refined)
    assert table.splitlines()[0] == "CRM before/after: segm"
    assert "AP-cat" not in table


def test_entity_ap_evaluator_empty_predictions(registered):
    name, meta = registered
    evaluator = EntityAPEvaluator(meta.entity_json_file, distributed=False)
    evaluator.reset()
    for record in DatasetCatalog.get(name):
        size = (record["height"], record["width"])
        empty = Instances(
            size, pred_masks=torch.zeros(0, *size, dtype=torch.bool), scores=torch.zeros(0)
        )
        evaluator.process([record], [{"instances": empty}])
    assert evaluator.evaluate()["entity_segm"]["AP"] == 0.0
