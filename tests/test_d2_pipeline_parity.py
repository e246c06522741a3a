"""crm-eval and the detectron2 meta-architecture refine through the same pipeline: for the same
image, coarse masks, refiner (a tiny random CRM on CPU) and options they write IDENTICAL
refined instance masks and panoptic maps, with and without ``max_side`` downscaling."""

from __future__ import annotations

import dataclasses

import pytest

detectron2 = pytest.importorskip(
    "detectron2",
    reason="detectron2 is not installed: install it from its GitHub repository (see README) "
    "to run the detectron2-layer tests",
)
pytestmark = pytest.mark.detectron2

import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from crm_d2 import CRMNet, CRMRefiner  # noqa: E402
from crm_d2.boxes import boxes_from_masks  # noqa: E402
from crm_d2.crm_eval.datasets import ImageItem, decode_segmentation  # noqa: E402
from crm_d2.crm_eval.matching import rle_encode  # noqa: E402
from crm_d2.crm_eval.process import ProcessContext, process_instances, process_panoptic  # noqa: E402
from crm_d2.crm_eval.records import OutputLayout  # noqa: E402
from crm_d2.d2.config import CRMOptions  # noqa: E402
from crm_d2.d2.meta_arch import CRMRefinedModel  # noqa: E402
from crm_d2.evaluation import read_panoptic_png  # noqa: E402
from crm_d2.modeling.crm import TINY_ARCH  # noqa: E402
from crm_d2.options import CRM_EVAL_DEFAULTS  # noqa: E402

H, W = 72, 100


def _ellipse(cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.mgrid[:H, :W]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


@pytest.fixture(scope="module")
def refiner() -> CRMRefiner:
    torch.manual_seed(0)
    return CRMRefiner(CRMNet(TINY_ARCH), "cpu", scales=(0.5, 1.0))


@pytest.fixture()
def image_item(tmp_path) -> tuple[np.ndarray, ImageItem]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (H // 8, W // 8, 3), dtype=np.uint8)
    image = np.array(Image.fromarray(base).resize((W, H), Image.BILINEAR))
    path = tmp_path / "img.png"
    Image.fromarray(image).save(path)
    item = ImageItem(
        key="1", image_id=1, file_name="img.png", image_path=str(path), height=H, width=W
    )
    return image, item


def _options(max_side: int | None):
    return dataclasses.replace(CRM_EVAL_DEFAULTS, min_area=100, max_side=max_side)


def _model(refiner, options) -> CRMRefinedModel:
    crm = CRMOptions(**dataclasses.asdict(options))
    return CRMRefinedModel(model=nn.Linear(1, 1), refiner=refiner, options=crm).eval()


class _InstanceSet:
    """What process_instances reads of a CocoInstanceSet."""

    def __init__(self, masks: np.ndarray) -> None:
        self.masks = masks

    def annotations(self, image_id):
        return [
            {"id": 1, "category_id": 1, "iscrowd": 0, "segmentation": rle_encode(self.masks[0])}
        ]

    def predictions(self, image_id):
        return [
            {
                "image_id": image_id,
                "category_id": 1,
                "score": 0.9 - 0.1 * i,
                "segmentation": rle_encode(m),
            }
            for i, m in enumerate(self.masks)
        ]


class _PanopticSet:
    """What process_panoptic reads of a CocoPanopticSet."""

    gt_dir = "given"  # not None: crm-eval does not write the ground truth
    categories = {1: {"isthing": 1}, 2: {"isthing": 0}}

    def __init__(self, ids: np.ndarray, segments: list[dict]) -> None:
        self.ids, self.segments = ids, segments

    def png_name(self, item):
        return "1.png"

    def read_gt(self, image_id, shape):
        return self.ids, self.segments

    def read_prediction(self, image_id, shape):
        return self.ids, [dict(s) for s in self.segments], None


@pytest.mark.parametrize("max_side", [None, 48])
def test_instances_identical(refiner, image_item, tmp_path, max_side):
    image, item = image_item
    masks = np.stack(
        [
            _ellipse(30, 35, 18, 25),
            _ellipse(40, 60, 20, 22),  # overlaps the first
            _ellipse(10, 90, 3, 3),  # too small to refine
        ]
    )
    options = _options(max_side)
    ctx = ProcessContext(refiner, options, OutputLayout(str(tmp_path / "out")))
    record = process_instances(ctx, _InstanceSet(masks), item)
    eval_masks = np.stack(
        [decode_segmentation(r["segmentation"], H, W) for r in record["refined_results"]]
    )

    inst = Instances((H, W))
    inst.pred_masks = torch.from_numpy(masks)
    inst.pred_boxes = Boxes(boxes_from_masks(inst.pred_masks))
    inst.scores = torch.tensor([0.9, 0.8, 0.7])
    inst.pred_classes = torch.ones(3, dtype=torch.int64)
    image_t = torch.from_numpy(image).permute(2, 0, 1)
    out = _model(refiner, options).refine_output({"instances": inst}, image_t)
    d2_masks = out["instances"].pred_masks.numpy()

    assert record["refined"] == 2  # the small mask is kept as it is
    assert not np.array_equal(eval_masks, masks)  # the refinement changed something
    assert np.array_equal(eval_masks, d2_masks)


@pytest.mark.parametrize("max_side", [None, 48])
def test_panoptic_identical(refiner, image_item, tmp_path, max_side):
    image, item = image_item
    ids = np.full((H, W), 2, np.int64)  # stuff id 2 everywhere ...
    ids[_ellipse(36, 40, 20, 26)] = 5  # ... a thing ...
    ids[_ellipse(30, 80, 12, 12)] = 7  # ... another thing ...
    ids[60:, :10] = 0  # ... and void
    segments = [
        {"id": 2, "category_id": 2},
        {"id": 5, "category_id": 1},
        {"id": 7, "category_id": 1},
    ]
    options = _options(max_side)
    ctx = ProcessContext(refiner, options, OutputLayout(str(tmp_path / "out")))
    record = process_panoptic(ctx, _PanopticSet(ids, segments), item)
    eval_ids = read_panoptic_png(record["refined_png"])

    info = [{**s, "isthing": s["category_id"] == 1} for s in segments]
    pan = (torch.from_numpy(ids).to(torch.int32), info)
    image_t = torch.from_numpy(image).permute(2, 0, 1)
    out = _model(refiner, options).refine_output({"panoptic_seg": pan}, image_t)
    d2_ids, d2_info = out["panoptic_seg"]

    assert record["refined"] == 3
    assert not np.array_equal(eval_ids, ids)
    assert np.array_equal(eval_ids, d2_ids.numpy())
    kept = [s["id"] for s in record["refined_ann"]["segments_info"]]
    assert kept == [s["id"] for s in d2_info]


def test_config_defaults_come_from_the_options():
    from detectron2.config import get_cfg

    from crm_d2.d2.config import add_crm_config

    cfg = get_cfg()
    add_crm_config(cfg)
    assert CRMOptions.from_config(cfg.MODEL.CRM) == CRMOptions()
    assert CRMOptions().max_side is None and CRMOptions().mask_chunk is None  # today's behaviour
    cfg.merge_from_list(["MODEL.CRM.MAX_SIDE", "48", "MODEL.CRM.MASK_CHUNK", "4"])
    opts = CRMOptions.from_config(cfg.MODEL.CRM)
    assert (opts.max_side, opts.mask_chunk) == (48, 4)
    cfg.merge_from_list(["MODEL.CRM.MAX_SIDE", "16"])
    with pytest.raises(ValueError, match="max_side"):
        CRMOptions.from_config(cfg.MODEL.CRM)
