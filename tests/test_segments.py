"""refine_segments: ROI cutting, skipping, batching equals one-by-one refinement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crm_d2 import CRMRefiner
from crm_d2.boxes import expand_box, mask_to_box
from crm_d2.modeling.crm import TINY_ARCH
from crm_d2.segments import ROIOptions, refine_segments

SMALL = TINY_ARCH


@pytest.fixture(scope="module")
def refiner(make_crm) -> CRMRefiner:
    return CRMRefiner(make_crm(SMALL))


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    masks = np.zeros((4, 60, 80), bool)
    masks[0, 5:25, 10:40] = True  # 600 px
    masks[1, 30:50, 40:70] = True  # 600 px, same size as 0
    masks[2, 2:6, 2:6] = True  # 16 px: too small
    masks[3, 10:55, 50:78] = True
    return img, masks


def test_refines_large_segments_and_matches_single_calls(refiner, scene):
    img, masks = scene
    out = refine_segments(refiner, torch.from_numpy(img).permute(2, 0, 1),
                          torch.from_numpy(masks), ROIOptions(min_area=100, batch_size=4),
                          isthing=[True, False, True, True])
    assert [r.segment_id for r in out] == [0, 1, 3]
    assert [r.isthing for r in out] == [True, False, True]
    for r in out:
        box = expand_box(mask_to_box(torch.from_numpy(masks[r.segment_id])), (60, 80), 0.25)
        assert r.box == box
        x0, y0, x1, y1 = box
        assert r.prob.shape == (y1 - y0, x1 - x0)
        single = refiner.refine(img[y0:y1, x0:x1], masks[r.segment_id, y0:y1, x0:x1])
        assert np.abs(r.prob.numpy() - single).max() < 1e-5


def test_size_multiple_groups_rois(refiner, scene):
    img, masks = scene
    out = refine_segments(refiner, torch.from_numpy(img).permute(2, 0, 1),
                          torch.from_numpy(masks), ROIOptions(min_area=100, size_multiple=16))
    for r in out:
        x0, y0, x1, y1 = r.box
        assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 60
        assert (x1 - x0) % 16 == 0 or x1 - x0 == 80
        assert (y1 - y0) % 16 == 0 or y1 - y0 == 60
        tight = mask_to_box(torch.from_numpy(masks[r.segment_id]))
        assert x0 <= tight[0] and y0 <= tight[1] and x1 >= tight[2] and y1 >= tight[3]


def test_soft_masks_and_errors(refiner, scene):
    img, masks = scene
    image = torch.from_numpy(img).permute(2, 0, 1)
    soft = torch.from_numpy(masks).float() * 0.8
    assert len(refine_segments(refiner, image, soft, ROIOptions(min_area=100))) == 3
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        refine_segments(refiner, image, soft * 2)
    with pytest.raises(ValueError, match="masks must be"):
        refine_segments(refiner, image, soft[:, :10])
    with pytest.raises(ValueError, match="isthing"):
        refine_segments(refiner, image, soft, isthing=[True])


def test_canonical_sizes_batch_rois_of_different_sizes(refiner, scene, monkeypatch):
    img, masks = scene
    image, tmasks = torch.from_numpy(img).permute(2, 0, 1), torch.from_numpy(masks)
    calls = []
    real = refiner.refine_tensors

    def spy(image, mask, **kw):
        calls.append(tuple(image.shape))
        return real(image, mask, **kw)

    monkeypatch.setattr(refiner, "refine_tensors", spy)
    per_size = refine_segments(refiner, image, tmasks, ROIOptions(min_area=100))
    n_per_size = len(calls)
    calls.clear()
    opts = ROIOptions(min_area=100, canonical_sizes=(64, 16))
    assert opts.canonical_sizes == (16, 64)
    out = refine_segments(refiner, image, tmasks, opts)
    assert len(calls) < n_per_size and len(calls) == 1  # one batch for all three ROIs
    assert calls[0][0] == 3
    for r, ref in zip(out, per_size):
        x0, y0, x1, y1 = r.box
        assert (x1 - x0, y1 - y0) == (64, 60)  # 64 wide; the 60-px image height
        rx0, ry0, rx1, ry1 = ref.box
        assert x0 <= rx0 and y0 <= ry0 and x1 >= rx1 and y1 >= ry1  # only context added
    with pytest.raises(ValueError):
        ROIOptions(canonical_sizes=())
