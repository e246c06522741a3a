"""Binary morphology by shifted ORs equals max-pool dilation / erosion."""

import pytest
import torch
from torch.nn import functional as F

from crm_d2.morphology import dilate, erode


def _maxpool_dilate(mask: torch.Tensor, r: int) -> torch.Tensor:
    k = 2 * r + 1
    return F.max_pool2d(mask[:, None].float(), k, stride=1, padding=r)[:, 0] > 0.5


@pytest.mark.parametrize("r", [0, 1, 2, 5, 40])
def test_dilate_and_erode_match_max_pool(r):
    g = torch.Generator().manual_seed(r)
    mask = torch.rand(3, 23, 17, generator=g) > 0.8
    assert torch.equal(dilate(mask, r), _maxpool_dilate(mask, r) if r else mask)
    # erosion: max-pool of the complement (outside the map counts as neither class)
    expect = ~_maxpool_dilate(~mask, r) if r else mask
    assert torch.equal(erode(mask, r), expect)


def test_dilate_single_pixel_is_a_square_and_checks_inputs():
    mask = torch.zeros(1, 9, 9, dtype=torch.bool)
    mask[0, 4, 4] = True
    out = dilate(mask, 2)
    assert int(out.sum()) == 25 and bool(out[0, 2:7, 2:7].all())
    assert not mask[0, 3, 3], "the input must not be modified"
    with pytest.raises(ValueError, match="bool"):
        dilate(mask.float(), 1)
    with pytest.raises(ValueError, match="radius"):
        dilate(mask, -1)
