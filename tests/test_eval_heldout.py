"""tools/eval_crm_heldout.py on a tiny synthetic held-out set."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import torch

from crm_d2 import CRMArch, CRMNet, CRMRefiner
from crm_d2.coarse import parse_kinds
from crm_d2.guided_filter import GuidedFilterRefiner

TOOL = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "eval_crm_heldout.py"))


class _Source:
    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(0)
        self.items = []
        for i in range(n):
            img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            mask = np.zeros((48, 64), np.uint8)
            mask[8 + i : 40, 10 : 50 - i] = 255
            self.items.append((img, mask, f"s{i}"))

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int):
        return self.items[i]


def test_evaluate_reports_every_kind_and_refiner():
    torch.manual_seed(0)
    net = CRMNet(CRMArch(block="basic", layers=(1, 1, 1, 1), width=8, feat_dim=16,
                         mlp_hidden=(8,), with_layer4=False))
    refiners = {"crm": CRMRefiner(net), "guided": GuidedFilterRefiner()}
    kinds = parse_kinds("perturb+stride8+stride8_binary+maskrcnn")
    result = TOOL["evaluate"](refiners, [("a", _Source(2)), ("b", _Source(1))], kinds)
    assert result["refiners"] == ["coarse", "crm", "guided"]
    for kind in ("perturb", "stride8", "stride8_binary", "maskrcnn"):
        for r in ("coarse", "crm", "guided"):
            s = result["all"][kind][r]
            assert s["num_objects"] == 3
            assert 0 <= s["coarse_iou"] <= 1 and 0 <= s["iou"] <= 1
            assert 0 <= s["worse_fraction"] <= 1
            assert result["by_source"]["a"][kind][r]["num_objects"] == 2
        # the "coarse" refiner is the input itself: nothing changes
        c = result["all"][kind]["coarse"]
        assert c["iou"] == c["coarse_iou"] and c["worse_fraction"] == 0
        # every refiner saw the same coarse masks
        assert result["all"][kind]["crm"]["coarse_iou"] == c["coarse_iou"]
    # the low-res coarse mask of a big rectangle is close to it: IoU before is high
    assert result["all"]["stride8"]["coarse"]["coarse_iou"] > 0.8
    # soft and binary stride-8 masks threshold to the same coarse mask: same "before" numbers
    soft, hard = result["all"]["stride8"]["coarse"], result["all"]["stride8_binary"]["coarse"]
    assert soft["coarse_iou"] == hard["coarse_iou"] and soft["coarse_mba"] == hard["coarse_mba"]
    table = TOOL["to_markdown"](result)
    assert "| **perturb** | **all** | coarse | 3 |" in table
    assert "| stride8_binary | b | guided | 1 |" in table


def test_flip_rows_share_the_network_and_differ_from_one_pass():
    torch.manual_seed(0)
    net = CRMNet(CRMArch(block="basic", layers=(1, 1, 1, 1), width=8, feat_dim=16,
                         mlp_hidden=(8,), with_layer4=False))
    crm = CRMRefiner(net, scales=(1.0,))
    flip = TOOL["flipped"](crm)
    assert flip.flip and not crm.flip and flip.model is crm.model and flip.scales == crm.scales
    img, mask, _ = _Source(1).load(0)
    assert np.abs(flip.refine(img, mask) - crm.refine(img, mask)).max() > 1e-4


def test_blend_rows_mix_in_the_guided_filter():
    from crm_d2.guided_filter import GuidedFilterRefiner

    torch.manual_seed(0)
    net = CRMNet(CRMArch(block="basic", layers=(1, 1, 1, 1), width=8, feat_dim=16,
                         mlp_hidden=(8,), with_layer4=False))
    crm = CRMRefiner(net, scales=(1.0,))
    blend = TOOL["blended"](crm, 0.5)
    assert blend.guided_blend == 0.5 and crm.guided_blend == 0.0 and blend.model is crm.model
    img, mask, _ = _Source(1).load(0)
    want = 0.5 * crm.refine(img, mask) + 0.5 * GuidedFilterRefiner().refine(img, mask)
    assert np.abs(blend.refine(img, mask) - want).max() < 1e-5


def test_exclude_per_source_leaves_out_the_table_images():
    class Spy(_Source):
        def __init__(self, n):
            super().__init__(n)
            self.seen = []

        def load(self, i):
            self.seen.append(i)
            return super().load(i)

    table, rest = Spy(12), Spy(12)
    kinds = parse_kinds("stride8_binary")
    TOOL["evaluate"]({}, [("a", table)], kinds, max_per_source=4)
    TOOL["evaluate"]({}, [("a", rest)], kinds, max_per_source=3, exclude_per_source=4)
    assert table.seen == [0, 4, 7, 11]
    assert not set(rest.seen) & set(table.seen) and len(rest.seen) == 3
