"""CRMRefiner: input handling, invariants of the schedule, exact vs fast, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_crm

from crm_d2 import CRMArch, CRMRefiner
from crm_d2.inference import normalize_image, normalize_mask, prepare_inputs, reflect_pad
from crm_d2.modeling.crm import TINY_ARCH, make_coord, make_coord_axes
from crm_d2.sparse import FastOptions

SMALL = TINY_ARCH


def _refiner(arch: CRMArch = SMALL, seed: int = 0, **kw) -> CRMRefiner:
    return CRMRefiner(random_crm(arch, seed, random_bn=True), **kw)


@pytest.fixture(scope="module")
def refiner() -> CRMRefiner:
    return _refiner()


@pytest.fixture(scope="module")
def sample():
    rng = np.random.default_rng(0)
    h, w = 37, 53
    yy, xx = np.mgrid[:h, :w]
    img = np.clip(np.stack([xx * 4, yy * 6, xx + yy], -1) + rng.integers(0, 30, (h, w, 3)), 0,
                  255).astype(np.uint8)
    mask = ((yy - 18) ** 2 + (xx - 26) ** 2 < 150).astype(np.uint8) * 255
    return img, mask


def test_make_coord_convention():
    c = make_coord((2, 4))
    assert c.shape == (2, 4, 2)
    assert torch.allclose(c[:, 0, 0], torch.tensor([-0.5, 0.5]))
    assert torch.allclose(c[0, :, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    rows, cols = make_coord_axes((5, 7))
    full = make_coord((5, 7))
    assert torch.equal(full[:, 0, 0], rows) and torch.equal(full[0, :, 1], cols)


def test_reflect_pad_matches_torch_and_numpy():
    x = torch.arange(2 * 3 * 40 * 35, dtype=torch.float32).view(2, 3, 40, 35)
    assert torch.equal(reflect_pad(x, 32), F.pad(x, (32,) * 4, mode="reflect"))
    small = torch.arange(5 * 7, dtype=torch.float32).view(1, 1, 5, 7)
    ref = np.pad(small.numpy(), ((0, 0), (0, 0), (32, 32), (32, 32)), mode="reflect")
    assert np.array_equal(reflect_pad(small, 32).numpy(), ref)
    one = torch.ones(1, 1, 1, 3)
    assert reflect_pad(one, 4).shape == (1, 1, 9, 11)


def test_output_shape_range_determinism(refiner, sample):
    img, mask = sample
    a = refiner.refine(img, mask)
    b = refiner.refine(img, mask)
    assert a.shape == mask.shape and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1
    assert np.array_equal(a, b)
    assert a.std() > 1e-3, "degenerate test network: output is constant"


def test_exact_equals_fast_and_chunking(sample):
    img, mask = sample
    r = _refiner(chunk_size=1000)
    exact = r.refine(img, mask, exact=True)
    fast = r.refine(img, mask, exact=False, fast=FastOptions.dense())
    assert np.abs(exact - fast).max() < 1e-5
    one_chunk = _refiner(chunk_size=10**7).refine(img, mask, exact=True)
    assert np.abs(exact - one_chunk).max() < 1e-6


def test_empty_mask_gives_zeros(refiner, sample):
    img, mask = sample
    assert not refiner.refine(img, np.zeros_like(mask)).any()
    one_px = np.zeros_like(mask)
    one_px[3, 4] = 255  # (m + 1).sum() over the padded mask is 2 per pixel: not "empty"
    out = refiner.refine(img, one_px)
    assert out.shape == mask.shape and np.isfinite(out).all() and out.any()


def test_full_mask_and_tiny_images(refiner, sample):
    img, mask = sample
    full = refiner.refine(img, np.full_like(mask, 255))
    assert full.shape == mask.shape and np.isfinite(full).all()
    tiny = refiner.refine(img[:5, :7], mask[:5, :7])
    assert tiny.shape == (5, 7)
    line = refiner.refine(img[:1, :9], np.full((1, 9), 255, np.uint8))
    assert line.shape == (1, 9)


def test_mask_dtypes_agree(refiner, sample):
    img, mask = sample
    ref = refiner.refine(img, mask)
    assert np.array_equal(refiner.refine(img, mask > 127), ref)
    assert np.array_equal(refiner.refine(img, (mask / 255).astype(np.float32)), ref)
    assert np.array_equal(refiner.refine(img, mask[:, :, None]), ref)


def test_gray_and_rgba_images(refiner, sample):
    img, mask = sample
    gray = img[:, :, 0]
    assert np.array_equal(refiner.refine(gray, mask),
                          refiner.refine(np.repeat(gray[:, :, None], 3, 2), mask))
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 7, np.uint8)], axis=2)
    assert np.array_equal(refiner.refine(rgba, mask), refiner.refine(img, mask))


@pytest.mark.parametrize(
    "image, mask, match",
    [
        (np.zeros((4, 5, 3), np.uint8), np.zeros((4, 6), np.uint8), "image is"),
        (np.zeros((0, 5, 3), np.uint8), np.zeros((0, 5), np.uint8), "empty"),
        (np.zeros((4, 5, 3), np.float32), np.zeros((4, 5), np.uint8), "uint8"),
        (np.zeros((4, 5, 2), np.uint8), np.zeros((4, 5), np.uint8), "HxWx3"),
        (np.zeros((4, 5, 3), np.uint8), np.full((4, 5), np.nan, np.float32), "NaN"),
        (np.zeros((4, 5, 3), np.uint8), np.full((4, 5), 2.0, np.float32), r"\[0, 1\]"),
        (np.zeros((4, 5, 3), np.uint8), np.zeros((4, 5), np.int64), "uint8"),
        (np.zeros((4, 5, 3), np.uint8), np.zeros((2, 4, 5), np.uint8), "HxW"),
        ([[0]], np.zeros((1, 1), np.uint8), "numpy array"),
    ],
)
def test_bad_inputs(refiner, image, mask, match):
    with pytest.raises(ValueError, match=match):
        refiner.refine(image, mask)


def test_bad_scales_and_chunks():
    with pytest.raises(ValueError, match="scales"):
        _refiner(scales=())
    with pytest.raises(ValueError, match="positive"):
        _refiner(scales=(0.5, -1))
    with pytest.raises(ValueError, match="chunk_size"):
        _refiner(chunk_size=0)


def test_batch_entry_point_matches_single(refiner, sample):
    img, mask = sample
    img2 = np.ascontiguousarray(img[::-1])
    t1, m1 = prepare_inputs(img, mask)
    t2, m2 = prepare_inputs(img2, 255 - mask)
    batch = refiner.refine_tensors(torch.cat([t1, t2]), torch.cat([m1, m2]))
    assert batch.shape == (2,) + mask.shape
    assert np.abs(batch[0].numpy() - refiner.refine(img, mask)).max() < 1e-5
    assert np.abs(batch[1].numpy() - refiner.refine(img2, 255 - mask)).max() < 1e-5
    empty = refiner.refine_tensors(torch.cat([t1, t2]), torch.cat([m1, -torch.ones_like(m2)]))
    assert empty[1].abs().max() == 0 and empty[0].abs().max() > 0


def test_normalisation_constants():
    x = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(normalize_image(x).flatten(), expected)
    assert torch.equal(normalize_mask(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([-1.0, 0, 1]))


def test_scale_schedule_is_used(sample):
    img, mask = sample
    r = _refiner()
    a = r.refine(img, mask, scales=(0.5, 1.0))
    b = r.refine(img, mask, scales=(1.0,))
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_progress_callback(sample):
    img, mask = sample
    hp, wp = img.shape[0] + 64, img.shape[1] + 64
    n = -(-hp * wp // 1500)
    calls = []
    r = _refiner(chunk_size=1500)
    r.refine(img, mask, exact=True, progress=lambda *a, c=calls: c.append(a))
    assert len(calls) == 4 * (n + 1) and calls[-1][1:] == (n, n)
    assert calls[0] == ("scale 0.125 (1/4)", 0, n)  # announced before its encoder pass
    assert [c[1] for c in calls[: n + 1]] == list(range(n + 1))
    # the fast path announces each scale, then reports it done
    calls = []
    r.refine(img, mask, progress=lambda *a, c=calls: c.append(a), fast=FastOptions.dense())
    assert calls == [(f"scale {s:g} ({i + 1}/4)", d, 1)
                     for i, s in enumerate((0.125, 0.25, 0.5, 1.0)) for d in (0, 1)]


def test_decode_grid_equals_generic_decoder():
    net = _refiner().model
    for h, w in ((37, 53), (6, 9)):
        torch.manual_seed(h)
        feat = net.encode(torch.randn(2, 3, h, w), torch.rand(2, 1, h, w) * 2 - 1)
        coord = make_coord((h, w)).view(1, -1, 2).expand(2, -1, -1)
        cell = torch.tensor([2 / h, 2 / w]).expand(2, h * w, 2)
        ref = net.decode(feat, coord, cell).view(2, h, w)
        assert (net.decode_grid(feat, (h, w)) - ref).abs().max() < 1e-5
        part = net.decode_grid(feat, (h, w), rows=(2, h - 1))
        assert (part - ref[:, 2 : h - 1]).abs().max() < 1e-5
        # the grid may be finer than the feature map, as in inference
        coord2 = make_coord((2 * h, 3 * w)).view(1, -1, 2).expand(2, -1, -1)
        cell2 = torch.tensor([1 / h, 2 / (3 * w)]).expand(2, 6 * h * w, 2)
        ref2 = net.decode(feat, coord2, cell2).view(2, 2 * h, 3 * w)
        assert (net.decode_grid(feat, (2 * h, 3 * w)) - ref2).abs().max() < 1e-5


def test_flip_averages_the_mirrored_refinement(sample):
    img, mask = sample
    plain, flip = _refiner(), _refiner(flip=True)
    a = plain.refine(img, mask)
    m = plain.refine(np.ascontiguousarray(img[:, ::-1]), np.ascontiguousarray(mask[:, ::-1]))
    expected = (a + m[:, ::-1]) / 2
    assert np.abs(a - expected).max() > 1e-3, "test network is mirror-symmetric: no test"
    for exact in (False, True):
        out = flip.refine(img, mask, exact=exact)
        assert np.abs(out - expected).max() < 1e-5
    # the flipped refiner is equivariant to mirroring, which one pass is not
    out_m = flip.refine(np.ascontiguousarray(img[:, ::-1]), np.ascontiguousarray(mask[:, ::-1]))
    assert np.abs(out_m[:, ::-1] - flip.refine(img, mask)).max() < 1e-5
    # the batched entry point (detectron2 layer) flips too
    t, k = prepare_inputs(img, mask)
    assert np.abs(flip.refine_tensors(t, k)[0].numpy() - expected).max() < 1e-5
    calls = []
    flip.refine(img, mask, progress=lambda *a, c=calls: c.append(a), fast=FastOptions.dense())
    assert len(calls) == 16 and calls[8] == ("mirrored scale 0.125 (1/4)", 0, 1)
    with pytest.raises(ValueError, match="flip"):
        _refiner(flip=1)


def test_guided_blend_mixes_in_the_guided_filter_of_the_coarse_mask(sample):
    from crm_d2.guided_filter import GuidedFilterRefiner

    img, mask = sample
    crm, guided = _refiner(), GuidedFilterRefiner().refine(img, mask)
    a = crm.refine(img, mask)
    assert np.abs(a - guided).max() > 1e-2, "CRM and the filter agree: no test"
    for w in (0.25, 1.0):
        blend = _refiner(guided_blend=w)
        for exact in (False, True):
            want = (1 - w) * crm.refine(img, mask, exact=exact) + w * guided
            assert np.abs(blend.refine(img, mask, exact=exact) - want).max() < 1e-5
    # after flip, and on the batched entry point of the detectron2 layer
    flip, both = _refiner(flip=True), _refiner(flip=True, guided_blend=0.5)
    want = 0.5 * flip.refine(img, mask) + 0.5 * guided
    assert np.abs(both.refine(img, mask) - want).max() < 1e-5
    t, k = prepare_inputs(img, mask)
    assert np.abs(both.refine_tensors(t, k)[0].numpy() - want).max() < 1e-5
    assert _refiner().guided_blend == 0.0  # CRM alone unless asked
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="guided_blend"):
            _refiner(guided_blend=bad)


def test_guided_blend_of_a_checkpoint(tmp_path, sample):
    from crm_d2.checkpoint import CheckpointError, save_crm

    img, mask = sample
    net = random_crm(SMALL, 0, random_bn=True)
    save_crm(net, str(tmp_path / "plain.pth"), scales=[1.0])
    save_crm(net, str(tmp_path / "blend.pth"), scales=[1.0], guided_blend=0.5)
    save_crm(net, str(tmp_path / "bad.pth"), scales=[1.0], guided_blend=2.0)
    assert CRMRefiner.from_checkpoint(str(tmp_path / "plain.pth")).guided_blend == 0.0
    stored = CRMRefiner.from_checkpoint(str(tmp_path / "blend.pth"))
    assert stored.guided_blend == 0.5
    assert CRMRefiner.from_checkpoint(str(tmp_path / "blend.pth"),
                                      guided_blend=0.0).guided_blend == 0.0
    explicit = CRMRefiner.from_checkpoint(str(tmp_path / "plain.pth"), guided_blend=0.5)
    assert np.array_equal(stored.refine(img, mask), explicit.refine(img, mask))
    with pytest.raises(CheckpointError, match="unusable guided_blend 2.0.*--guided-blend"):
        CRMRefiner.from_checkpoint(str(tmp_path / "bad.pth"))
