"""CRMArch.pixel_skip: the decoder reads the image and mask at each query pixel (tiny CPU nets)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from conftest import random_crm

from crm_d2 import CRMRefiner
from crm_d2.checkpoint import save_crm
from crm_d2.modeling.crm import TINY_ARCH, CRMNet, GridGeometry, make_coord, trunk_input
from crm_d2.sparse import FastOptions
from crm_d2.training.config import PRESETS, TrainConfig
from crm_d2.training.model import load_init_weights, param_groups

SKIP_ARCH = dataclasses.replace(TINY_ARCH, pixel_skip=True)


def _skip_net(seed: int = 0, scale: float = 1.0) -> CRMNet:
    """A random skip network whose skip weights are not zero (``scale`` sets their size)."""
    net = random_crm(SKIP_ARCH, seed, random_bn=True)
    with torch.no_grad():
        torch.manual_seed(seed + 1)
        net.pixel_skip.weight.normal_(0, scale)
    return net


def _inputs(h: int = 30, w: int = 41, bsz: int = 2):
    torch.manual_seed(3)
    return torch.randn(bsz, 3, h, w), torch.rand(bsz, 1, h, w) * 2 - 1


def _sample(h: int = 57, w: int = 71):
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:h, :w]
    img = np.clip(np.stack([xx * 3, yy * 3, xx + yy], -1) + rng.integers(0, 40, (h, w, 3)), 0,
                  255).astype(np.uint8)
    mask = ((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2.2) / (w / 3)) ** 2 < 1
    return img, mask.astype(np.uint8) * 255


def test_zero_skip_is_the_plain_network():
    """At its zero initialisation the skip changes nothing: trained CRM weights start as they
    were (this is what lets ``--pixel-skip --init <plain CRM>`` continue a trained network)."""
    skip = random_crm(SKIP_ARCH, 0, random_bn=True)
    assert torch.count_nonzero(skip.pixel_skip.weight) == 0
    plain = CRMNet(TINY_ARCH).eval()
    plain.load_state_dict({k: v for k, v in skip.state_dict().items()
                           if not k.startswith("pixel_skip.")})
    image, mask = _inputs()
    with torch.no_grad():
        feat = plain.encode(image, mask)
        ref = plain.decode_grid(feat, (30, 41))
        got = skip.decode_grid(feat, (30, 41), inputs=trunk_input(image, mask))
    assert torch.equal(ref, got)
    assert "pixel_skip.weight" not in plain.state_dict()  # official key lists stay untouched


def test_the_three_decoders_agree_with_the_skip():
    net = _skip_net()
    h, w = 30, 41
    image, mask = _inputs(h, w)
    pixels = trunk_input(image, mask, channels_last=False)
    with torch.no_grad():
        feat = net.encode(image, mask)
        coord = make_coord((h, w)).view(1, -1, 2).expand(2, -1, -1)
        cell = torch.tensor([2 / h, 2 / w]).view(1, 1, 2).expand(2, h * w, 2)
        ref = net.decode(feat, coord, cell, pixels).view(2, h, w)
        grid = net.decode_grid(feat, (h, w), inputs=pixels)
        rows = net.decode_grid(feat, (h, w), rows=(3, 17), inputs=pixels)
        geom = GridGeometry((h, w), tuple(feat.shape[-2:]), "cpu")
        g = torch.Generator().manual_seed(0)
        pb, py, px = (torch.randint(0, n, (60,), generator=g) for n in (2, h, w))
        pix = net.decode_pixels(net.project_features(feat), geom, pb, py, px, inputs=pixels)
        pair = (image, mask)  # the uncopied form of the same values
        grid_pair = net.decode_grid(feat, (h, w), inputs=pair)
        pix_pair = net.decode_pixels(net.project_features(feat), geom, pb, py, px, inputs=pair)
        ref_pair = net.decode(feat, coord, cell, pair).view(2, h, w)
        net.pixel_skip.weight.zero_()  # the skip matters: without it the logits differ
        unskipped = net.decode_grid(feat, (h, w), inputs=pixels)
    tol = 2e-5 * ref.abs().max()  # float rounding of logits up to ~10
    assert (grid - ref).abs().max() < tol
    assert (rows - ref[:, 3:17]).abs().max() < tol
    assert (pix - ref[pb, py, px]).abs().max() < tol
    assert torch.equal(grid_pair, grid) and torch.equal(pix_pair, pix)
    assert torch.equal(ref_pair, ref)
    assert (unskipped - ref).abs().max() > 1e-2
    empty = torch.zeros(0, dtype=torch.long)
    with torch.no_grad():
        none = net.decode_pixels(net.project_features(feat), geom, empty, empty, empty,
                                 inputs=pixels)
    assert none.shape == (0,)


def test_decoders_name_the_missing_pixels():
    net = _skip_net()
    image, mask = _inputs()
    feat = net.encode(image, mask)
    with pytest.raises(ValueError, match="pixel_skip"):
        net.decode_grid(feat, (30, 41))
    with pytest.raises(ValueError, match=r"\(30, 41\)"):  # at the query grid's resolution
        net.decode_grid(feat, (30, 41), inputs=trunk_input(image[..., :20], mask[..., :20]))


@pytest.mark.parametrize("scales", [(1.0,), (0.5, 1.0), (0.125, 0.25, 0.5, 1.0)])
def test_refiner_paths_agree_with_the_skip(scales):
    """exact (the generic decoder), dense, band and windowed decoding read the same pixels:
    the full-resolution padded image and the current mask, at every scale (so dense decoding
    may not skip the pixels that only the next scale's resize would leave unread)."""
    refiner = CRMRefiner(_skip_net(scale=0.5))
    img, mask = _sample()
    exact = refiner.refine(img, mask, scales=scales, exact=True)
    dense = refiner.refine(img, mask, scales=scales, fast=FastOptions.dense())
    wide_band = refiner.refine(img, mask, scales=scales,
                               fast=FastOptions(band=1000.0, halo=200, skip_padding=False))
    windows = refiner.refine(img, mask, scales=scales,
                             fast=FastOptions(band=None, tile=24, halo=200, memory_mb=0.5))
    assert 0.05 < exact.mean() < 0.95
    for got in (dense, wide_band, windows):
        assert np.abs(got - exact).max() < 1e-4


def test_checkpoint_keeps_the_skip(tmp_path):
    net = _skip_net()
    path = tmp_path / "skip.pth"
    save_crm(net, str(path), scales=[1.0])
    refiner = CRMRefiner.from_checkpoint(str(path))
    assert refiner.model.arch.pixel_skip
    assert torch.equal(refiner.model.pixel_skip.weight, net.pixel_skip.weight)
    img, mask = _sample()
    assert refiner.scales == (1.0,)
    direct = CRMRefiner(net).refine(img, mask, scales=(1.0,))
    assert np.abs(refiner.refine(img, mask) - direct).max() < 1e-6


def test_plain_files_keep_their_old_architecture_record():
    """A network without the skip writes no ``pixel_skip`` field (older crm_d2 reads it)."""
    assert "pixel_skip" not in TINY_ARCH.to_dict()
    assert SKIP_ARCH.to_dict()["pixel_skip"] is True
    assert type(SKIP_ARCH).from_dict(TINY_ARCH.to_dict()) == TINY_ARCH


def test_init_into_a_network_without_the_skip_warns(tmp_path, caplog):
    path = tmp_path / "skip.pth"
    save_crm(_skip_net(), str(path))
    log = logging.getLogger("crm_d2.training.model")
    log.addHandler(caplog.handler)  # other tests may stop crm_d2 loggers from propagating
    try:
        with caplog.at_level("WARNING", logger=log.name):
            report = load_init_weights(CRMNet(TINY_ARCH), str(path))
    finally:
        log.removeHandler(caplog.handler)
    assert report["unused"] == 1
    assert any("pixel_skip.weight" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)


def test_init_from_a_plain_network_and_lr_multipliers(tmp_path):
    plain = random_crm(PRESETS["tiny"], 0)
    path = tmp_path / "plain.pth"
    save_crm(plain, str(path))
    net = CRMNet(dataclasses.replace(PRESETS["tiny"], pixel_skip=True))
    report = load_init_weights(net, str(path))
    assert report["missing"] == 1 and report["loaded"] == report["total"] - 1
    assert torch.count_nonzero(net.pixel_skip.weight) == 0

    groups = param_groups(net, 1e-4, {"pixel_skip": 10})
    by_lr = {g["lr"]: g["params"] for g in groups}
    assert groups[0]["lr"] == 1e-4  # the x1 group first: the trainer logs group 0's lr
    assert [p.shape for p in by_lr[1e-3]] == [net.pixel_skip.weight.shape]
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    with pytest.raises(ValueError, match="name no parameter"):
        param_groups(net, 1e-4, {"pixel_skipp": 10})
    with pytest.raises(ValueError, match="lr_mult"):
        TrainConfig(lr_mult={"pixel_skip": 0})
