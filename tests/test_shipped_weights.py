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
        pytest.fail("crm_d2/weights/crm_d2_lite.pth is missing from this checkout")
    return CRMRefiner.from_checkpoint()


def test_format_and_metadata(refiner):
    obj = torch.load(default_weights_path(), weights_only=True)
    assert obj["format"] == "crm_d2" and obj["arch"]["with_layer4"] is False
    floats = [v for v in obj["state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert refiner.scales == (1.0,)
    train = refiner.metadata["training"]
    assert train["iterations"] == 3000 and "Stage 4" in train["history"]
    assert "lowres_binary" in train["datasets"][0]["perturb"]
    assert refiner.model.feats.conv1.weight.dtype == torch.float32


@pytest.mark.parametrize("kind, margin", [("perturb", 0.01), ("stride8", 0.0)])
def test_improves_coarse_masks_on_held_out_ecssd(refiner, shared_data, kind, margin):
    """Pooled IoU over 8 held-out ECSSD images (never trained on) must go up, for the paper's
    perturbation (by more than a point) and for the soft 1/8 rendering."""
    from crm_d2.coarse import CoarseKind
    from crm_d2.evaluation.binary import PooledIoU
    from crm_d2.training.sources import build_source

    _, _, held_out = build_source(f"folder:{shared_data / 'ecssd'}", 0.05, 0)
    before, after = PooledIoU(), PooledIoU()
    for k in range(8):
        image, mask, _ = held_out.load(k)
        fg = np.where(mask > 127, 255, 0).astype(np.uint8)
        rng = np.random.default_rng([0, k, 0])
        coarse = CoarseKind.parse(kind).render(fg, rng)
        before.update(coarse >= 128, fg > 127)
        after.update(refiner.refine(image, coarse) > 0.5, fg > 127)
    assert after.pooled > before.pooled + margin, (before.pooled, after.pooled)
