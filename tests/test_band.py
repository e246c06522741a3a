"""Band restriction of a refinement around the coarse boundary (crm_d2.band)."""

from __future__ import annotations

import pytest
import torch

from crm_d2.band import boundary_band, restrict_to_band


def test_band_is_dilation_minus_erosion():
    mask = torch.zeros(1, 12, 12, dtype=torch.bool)
    mask[0, 4:8, 4:8] = True
    band = boundary_band(mask, 1)
    want = torch.zeros(1, 12, 12, dtype=torch.bool)
    want[0, 3:9, 3:9] = True
    want[0, 5:7, 5:7] = False
    assert torch.equal(band, want)
    assert not boundary_band(torch.zeros(1, 5, 5, dtype=torch.bool), 2).any()
    with pytest.raises(ValueError, match="width"):
        boundary_band(mask, 0)
    with pytest.raises(ValueError, match="bool"):
        boundary_band(mask.float(), 1)


def test_restrict_keeps_coarse_outside_the_band():
    coarse = torch.zeros(1, 20, 20)
    coarse[0, 5:15, 5:15] = 1
    refined = torch.full((1, 20, 20), 0.7)
    out = restrict_to_band(coarse, refined, 2)
    band = boundary_band(coarse > 0.5, 2)
    assert torch.equal(out[band], refined[band]) and torch.equal(out[~band], coarse[~band])
    assert out[0, 0, 0] == 0 and out[0, 10, 10] == 1 and out[0, 5, 5] == pytest.approx(0.7)


def test_sparse_cell_band_is_a_superset_of_the_exact_band():
    """The two boundary bands differ on purpose: the sparse decoder's cell band covers the exact
    band of the same width (so no boundary pixel is skipped) and is wider in places."""
    from crm_d2.sparse import boundary_band as cell_band

    g = torch.Generator().manual_seed(0)
    wider = False
    for width in (1, 2, 3, 5, 8):
        for _ in range(10):
            low = (torch.rand(1, 1, 8, 9, generator=g) > 0.5).float()
            mask = torch.nn.functional.interpolate(low, size=(37, 45))[:, 0] > 0.5
            exact = boundary_band(mask, width)
            cells = cell_band(mask[:, None].float(), width)
            assert not (exact & ~cells).any(), width
            wider |= bool((cells & ~exact).any())
    assert wider
