"""CRMArch.guided_skip: the pixel skip also reads the guided filter of the coarse mask."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import random_crm

from crm_d2 import CRMRefiner
from crm_d2.checkpoint import save_crm
from crm_d2.guided_filter import GuidedFilterRefiner, guide_channel
from crm_d2.inference import PAD, prepare_inputs, reflect_pad
from crm_d2.modeling.crm import TINY_ARCH, CRMArch, CRMNet
from crm_d2.sparse import FastOptions
from crm_d2.training.model import GridForward, load_init_weights

SKIP_ARCH = dataclasses.replace(TINY_ARCH, pixel_skip=True)
GUIDED_ARCH = dataclasses.replace(SKIP_ARCH, guided_skip=True)


def _guided_net(seed: int = 0, guide_weight: float = 1.0) -> CRMNet:
    """A random guided-skip network with non-zero skip weights (the guide's column scaled)."""
    net = random_crm(GUIDED_ARCH, seed, random_bn=True)
    with torch.no_grad():
        torch.manual_seed(seed + 1)
        net.pixel_skip.weight.normal_(0, 0.5)
        net.pixel_skip.weight[:, 4] *= guide_weight
    return net


def _sample(h: int = 57, w: int = 71):
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:h, :w]
    img = np.clip(np.stack([xx * 3, yy * 3, xx + yy], -1) + rng.integers(0, 40, (h, w, 3)), 0,
                  255).astype(np.uint8)
    mask = ((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2.2) / (w / 3)) ** 2 < 1
    return img, mask.astype(np.uint8) * 255


def test_arch_record_and_its_requirement():
    assert "guided_skip" not in SKIP_ARCH.to_dict()  # older files and readers unchanged
    assert GUIDED_ARCH.to_dict()["guided_skip"] is True
    assert CRMArch.from_dict(GUIDED_ARCH.to_dict()) == GUIDED_ARCH
    with pytest.raises(ValueError, match="needs pixel_skip"):
        dataclasses.replace(TINY_ARCH, guided_skip=True)
    assert CRMNet(GUIDED_ARCH).pixel_skip.weight.shape[1] == 5


def test_guide_channel_is_the_guided_filter_refiner_in_mask_range():
    img, mask = _sample()
    image, seg = prepare_inputs(img, mask)
    ref = GuidedFilterRefiner().refine_tensors(image, seg)
    got = guide_channel(image, seg)
    assert got.shape == (1, 1, *img.shape[:2])
    assert torch.allclose(got[:, 0], ref * 2 - 1, atol=1e-6)
    assert got.min() >= -1 and got.max() <= 1


def test_init_from_a_pixel_skip_file_starts_as_that_network(tmp_path):
    """``--guided-skip --init <pixel-skip file>``: the file's four skip columns are copied and
    the guide's column is zero, so the refiner gives the file's answer exactly."""
    src = random_crm(SKIP_ARCH, 0, random_bn=True)
    with torch.no_grad():
        src.pixel_skip.weight.normal_(0, 0.5)
    path = tmp_path / "skip.pth"
    save_crm(src, str(path))
    net = CRMNet(GUIDED_ARCH)
    report = load_init_weights(net, str(path))
    assert report["loaded"] == report["total"] and report["widened"] == 1
    assert torch.equal(net.pixel_skip.weight[:, :4], src.pixel_skip.weight)
    assert torch.count_nonzero(net.pixel_skip.weight[:, 4]) == 0
    img, mask = _sample()
    for kw in ({"exact": True}, {}, {"scales": (0.5, 1.0)}):
        a = CRMRefiner(src.eval()).refine(img, mask, **kw)
        b = CRMRefiner(net.eval()).refine(img, mask, **kw)
        assert np.array_equal(a, b)


@pytest.mark.parametrize("scales", [(1.0,), (0.5, 1.0)])
def test_refiner_paths_read_the_guide(scales):
    """exact, dense, band and windowed decoding read the same guide (the padded grid's filter
    of the coarse mask, the same at every scale), with and without flip; the guide matters."""
    net = _guided_net()
    img, mask = _sample()
    refiner = CRMRefiner(net)
    exact = refiner.refine(img, mask, scales=scales, exact=True)
    assert 0.05 < exact.mean() < 0.95
    for fast in (FastOptions.dense(), FastOptions(band=1000.0, halo=200, skip_padding=False),
                 FastOptions(band=None, tile=24, halo=200, memory_mb=0.5)):
        assert np.abs(refiner.refine(img, mask, scales=scales, fast=fast) - exact).max() < 1e-4
    flip = CRMRefiner(net, flip=True)
    mirrored = refiner.refine(img[:, ::-1], mask[:, ::-1], scales=scales, exact=True)[:, ::-1]
    assert np.abs(flip.refine(img, mask, scales=scales, exact=True)
                  - (exact + mirrored) / 2).max() < 1e-5
    blind = CRMRefiner(_guided_net(guide_weight=0.0)).refine(img, mask, scales=scales,
                                                             exact=True)
    assert np.abs(blind - exact).max() > 1e-2


def test_decoder_names_the_missing_guide():
    net = _guided_net()
    image, mask = torch.randn(1, 3, 20, 24), torch.rand(1, 1, 20, 24) * 2 - 1
    feat = net.encode(image, mask)
    with pytest.raises(ValueError, match=r"guided_skip.*\(image, mask, guide\)"):
        net.decode_grid(feat, (20, 24), inputs=(image, mask))


def test_training_forward_reads_the_guide():
    """Training and inference feed the decoder the same guide: the training forward's logits
    equal the refiner's at one scale on the same (unpadded) crop's inputs."""
    net = _guided_net().eval()
    torch.manual_seed(0)
    image = torch.randn(2, 3, 32, 32)
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float() * 2 - 1
    with torch.no_grad():
        got = GridForward(net)(image, mask)
        feat = net.encode(image, mask)
        ref = net.decode_grid(feat, (32, 32), inputs=(image, mask, guide_channel(image, mask)))
    assert torch.allclose(got[:, 0], ref, atol=1e-6)


def test_checkpoint_builds_the_guided_network(tmp_path):
    net = _guided_net()
    path = tmp_path / "guided.pth"
    save_crm(net, str(path), scales=[1.0])
    refiner = CRMRefiner.from_checkpoint(str(path))
    assert refiner.model.arch.guided_skip
    img, mask = _sample()
    direct = CRMRefiner(net).refine(img, mask, scales=(1.0,))
    assert np.abs(refiner.refine(img, mask) - direct).max() < 1e-6


def test_blend_reuses_the_decoders_guide():
    """With ``guided_blend`` a guided-skip refiner mixes in the map its decoder read."""
    net = _guided_net()
    img, mask = _sample()
    alone = CRMRefiner(net).refine(img, mask, scales=(1.0,), exact=True)
    image, seg = prepare_inputs(img, mask)
    guide = guide_channel(reflect_pad(image), reflect_pad(seg))[0, 0, PAD:-PAD, PAD:-PAD]
    blend = CRMRefiner(net, guided_blend=0.25).refine(img, mask, scales=(1.0,), exact=True)
    want = 0.75 * alone + 0.25 * (guide.numpy() + 1) / 2
    assert np.abs(blend - want).max() < 1e-5
