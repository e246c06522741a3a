"""tools/eval_crm_heldout.py on a tiny synthetic held-out set."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import torch

from crm_d2 import CRMArch, CRMNet, CRMRefiner

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


def test_evaluate_reports_every_coarse_kind():
    torch.manual_seed(0)
    net = CRMNet(CRMArch(block="basic", layers=(1, 1, 1, 1), width=8, feat_dim=16,
                         mlp_hidden=(8,), with_layer4=False))
    result = TOOL["evaluate"](CRMRefiner(net), [("a", _Source(2)), ("b", _Source(1))])
    for kind in ("perturb", "lowres8", "lowres8_binary"):
        s = result["all"][kind]
        assert s["num_objects"] == 3
        assert 0 <= s["coarse_iou"] <= 1 and 0 <= s["iou"] <= 1
        assert 0 <= s["worse_fraction"] <= 1
        assert result["by_source"]["a"][kind]["num_objects"] == 2
    # the low-res coarse mask of a big rectangle is close to it: IoU before is high
    assert result["all"]["lowres8"]["coarse_iou"] > 0.8
    # soft and binary low-res masks threshold to the same coarse mask: same "before" numbers
    soft, hard = result["all"]["lowres8"], result["all"]["lowres8_binary"]
    assert soft["coarse_iou"] == hard["coarse_iou"] and soft["coarse_mba"] == hard["coarse_mba"]
    table = TOOL["to_markdown"](result)
    assert "**perturb, all**" in table and "lowres8, b" in table
    assert "**lowres8_binary, all**" in table
