"""The weights shipped with crm_d2: format, metadata, default use, and a held-out check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crm_d2 import CRMRefiner
from crm_d2.weights import default_weights_path


@pytest.fixture(scope="module")
def refiner() -> CRMRefiner:
    if default_weights_path() is None:
        pytest.fail("crm_d2/weights/crm_d2_effl0.pth is missing from this checkout")
    return CRMRefiner.from_checkpoint()


def test_format_and_metadata(refiner):
    obj = torch.load(default_weights_path(), weights_only=True)
    assert obj["format"] == "crm_d2" and obj["arch"]["with_layer4"] is False
    assert obj["arch"]["encoder"] == "efficientnet_lite0" and obj["arch"]["pixel_skip"] is True
    floats = [v for v in obj["state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert refiner.scales == (1.0,)
    assert refiner.guided_blend == 0.5 and "guided_blend 0.5" in refiner.metadata["training"][
        "history"]  # the inference its model card measured
    train = refiner.metadata["training"]
    assert train["iteration"] == 1800 and "Stage H (these weights)" in train["history"]
    assert train["config"]["lr_mult"] == {"pixel_skip": 30.0}
    assert torch.count_nonzero(refiner.model.pixel_skip.weight) == 4 * 32
    assert train["config"]["loss_weights"]["boundary"] == 4.0
    assert "maskrcnn*4" in train["history"]
    assert refiner.model.feats._conv_stem.weight.dtype == torch.float32


def test_the_previous_default_still_loads():
    from pathlib import Path

    lite = Path(default_weights_path()).with_name("crm_d2_lite.pth")
    old = CRMRefiner.from_checkpoint(str(lite))
    assert old.metadata["training"]["iterations"] == 3000 and old.scales == (1.0,)


@pytest.mark.parametrize("source, kind, margin", [
    ("folder:ecssd", "perturb", 0.01),
    ("davis:davis", "stride8_binary", 0.0),
    ("davis:davis", "maskrcnn", 0.0),
])
def test_improves_coarse_masks_on_held_out_images(refiner, shared_data, source, kind, margin):
    """Pooled IoU over 8 held-out images (never trained on) must go up: ECSSD with the paper's
    perturbation (by more than a point), DAVIS frames with the binary masks of a stride-8
    network and of Mask R-CNN's 28x28 head."""
    from crm_d2.coarse import CoarseKind
    from crm_d2.evaluation.binary import PooledIoU
    from crm_d2.training.sources import build_source

    kind_name, _, folder = source.partition(":")
    _, _, held_out = build_source(f"{kind_name}:{shared_data / folder}", 0.05, 0)
    before, after = PooledIoU(), PooledIoU()
    step = max(1, len(held_out) // 8)
    for k in range(0, 8 * step, step):
        image, mask, _ = held_out.load(k)
        fg = np.where(mask > 127, 255, 0).astype(np.uint8)
        rng = np.random.default_rng([0, k, 0])
        coarse = CoarseKind.parse(kind).render(fg, rng)
        before.update(coarse >= 128, fg > 127)
        after.update(refiner.refine(image, coarse) > 0.5, fg > 127)
    assert after.pooled > before.pooled + margin, (before.pooled, after.pooled)
