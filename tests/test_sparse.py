"""Fast path: band and strided decoding, windowed encoder, OOM retry, device knobs (tiny CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_crm

from crm_d2 import CRMRefiner
from crm_d2 import sparse as sparse_mod
from crm_d2.inference import prepare_inputs, reflect_pad
from crm_d2.modeling.crm import TINY_ARCH, GridGeometry
from crm_d2.sparse import FastOptions, boundary_band, refine_fast
from crm_d2.tiling import encode_window, feature_size, receptive_radius, tap_sizes

HALO = receptive_radius(TINY_ARCH) + 5  # windows with this halo are exact
# many small windows (not exact: a small halo) on the small sample; the budget forbids a
# whole-image pass
TILED = dict(tile=16, halo=8, memory_mb=0.5)
ONE = (1.0,)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests run many small windows: one intra-op thread is much faster on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def refiner() -> CRMRefiner:
    return CRMRefiner(random_crm(TINY_ARCH, 1, random_bn=True))


@pytest.fixture(scope="module")
def sample():
    return _sample(61, 83)


# exact windows (the halo covers the receptive radius) on the small sample
EXACT_TILED = dict(tile=16, halo=HALO, memory_mb=0.5, skip_padding=False)


@pytest.fixture(scope="module")
def dense_exact_tiled(refiner, sample) -> torch.Tensor:
    """The sample decoded densely in exact windows at one scale (a reference, computed once)."""
    image, seg = _padded(sample)
    return refine_fast(refiner.model, image, seg, ONE, FastOptions(band=None, **EXACT_TILED))


@pytest.fixture
def decodings(monkeypatch) -> list:
    """(scales, FastOptions) of every refine_fast call that CRMRefiner makes."""
    import crm_d2.inference as inference_mod

    seen: list = []
    real = sparse_mod.refine_fast

    def spy(model, image, seg, scales, opts, **kw):
        seen.append((tuple(scales), opts))
        return real(model, image, seg, scales, opts, **kw)

    monkeypatch.setattr(inference_mod, "refine_fast", spy)
    return seen


def _sample(h: int, w: int):
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:h, :w]
    img = np.clip(np.stack([xx * 3, yy * 3, xx + yy], -1) + rng.integers(0, 40, (h, w, 3)), 0,
                  255).astype(np.uint8)
    mask = (((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2.2) / (w / 3)) ** 2 < 1)
    return img, mask.astype(np.uint8) * 255


def test_options_validation():
    for bad in (dict(band=0), dict(stride=0), dict(tile=12), dict(halo=-1), dict(memory_mb=0),
                dict(autocast="fp8"), dict(min_band=-1)):
        with pytest.raises(ValueError):
            FastOptions(**bad)
    assert FastOptions(band=3, min_band=4).band_width(0.125) == 24
    assert FastOptions(band=3, min_band=4).band_width(1.0) == 4
    assert FastOptions(band=None).band_width(0.5) is None


def test_sizes_match_the_encoder(refiner):
    for h, w in ((97, 131), (8, 9), (1, 3), (64, 65)):
        t1, t2, t3 = refiner.model.feats(torch.zeros(1, 4, h, w))
        ny, nx = tap_sizes(h), tap_sizes(w)
        assert (t1.shape[-2], t2.shape[-2], t3.shape[-2]) == ny
        assert (t1.shape[-1], t2.shape[-1], t3.shape[-1]) == nx
        assert feature_size((h, w)) == tuple(t1.shape[-2:])


def test_encode_window_equals_whole_encoder(refiner):
    net = refiner.model
    torch.manual_seed(0)
    img, msk = torch.randn(2, 3, 97, 131), torch.rand(2, 1, 97, 131) * 2 - 1
    with torch.no_grad():
        full = net.project_features(net.encode(img, msk))
        fh, fw = full.shape[1:3]
        whole = encode_window(net, img, msk, (0, fh), (0, fw), halo=0)
        assert (whole - full).abs().max() < 1e-5
        for rows, cols in (((10, 30), (20, 41)), ((0, 7), (fw - 9, fw)), ((fh - 1, fh), (3, 4))):
            win = encode_window(net, img, msk, rows, cols, halo=HALO)
            ref = full[:, rows[0] : rows[1], cols[0] : cols[1]]
            assert (win - ref).abs().max() < 1e-5
        # a small halo is an approximation, not the same features
        small = encode_window(net, img, msk, (20, 30), (20, 30), halo=0)
        assert (small - full[:, 20:30, 20:30]).abs().max() > 1e-3


def test_decode_pixels_equals_grid_decoder(refiner):
    net = refiner.model
    torch.manual_seed(2)
    with torch.no_grad():
        feat = net.encode(torch.randn(2, 3, 30, 41), torch.rand(2, 1, 30, 41) * 2 - 1)
        h, w = 61, 83
        ref = net.decode_grid(feat, (h, w))
        geom = GridGeometry((h, w), feat.shape[-2:], "cpu")
        proj = net.project_features(feat)
        pb = torch.tensor([0, 1, 1, 0, 1])
        py = torch.tensor([0, 60, 5, 33, 17])
        px = torch.tensor([0, 82, 40, 1, 66])
        got = net.decode_pixels(proj, geom, pb, py, px)
        assert (got - ref[pb, py, px]).abs().max() < 1e-5
        rows, cols = geom.cell_span_rows(10, 40), geom.cell_span_cols(20, 70)
        pb2, py2, px2 = (t.flatten() for t in torch.meshgrid(
            torch.arange(2), torch.arange(10, 40), torch.arange(20, 70), indexing="ij"))
        window = proj[:, rows[0] : rows[1], cols[0] : cols[1]]
        got2 = net.decode_pixels(window, geom, pb2, py2, px2, origin=(rows[0], cols[0]))
        assert (got2 - ref[pb2, py2, px2]).abs().max() < 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
def test_project_cells_equals_dense_projection(refiner, channels_last):
    """The sparse fusion convolution at chosen cells = the dense projection there."""
    net = refiner.model
    torch.manual_seed(4)
    img, msk = torch.randn(2, 3, 30, 41), torch.rand(2, 1, 30, 41) * 2 - 1
    if channels_last:
        img = img.contiguous(memory_format=torch.channels_last)
        msk = msk.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = net.project_features(net.encode(img, msk))  # (B, fh, fw, D)
        rows = net.fusion_rows(img, msk)
        fh, fw = ref.shape[1:3]
        assert rows.shape[:3] == (2, fh + 2, fw + 2)
        pb = torch.tensor([0, 1, 1, 0, 1, 0])
        cy = torch.tensor([0, fh - 1, 3, 7, 0, fh - 1])  # corners and borders included
        cx = torch.tensor([0, fw - 1, 11, 0, fw - 1, 5])
        got = net.project_cells(rows, pb, cy, cx, chunk=4)  # several chunks
    torch.testing.assert_close(got, ref[pb, cy, cx], rtol=1e-5, atol=1e-5)


def test_band_decoding_computes_fusion_only_near_the_band(refiner, sample, monkeypatch):
    """The band path runs the fusion convolution at a fraction of the cells, same answer."""
    image, mask = sample
    calls = []
    real = refiner.model.project_cells

    def spy(rows, pb, cy, cx, chunk=8192):
        calls.append(pb.numel())
        return real(rows, pb, cy, cx, chunk)

    img_t, msk_t = prepare_inputs(image, mask)
    band = FastOptions(tile=None, halo=None, memory_mb=1e6)  # the whole map, one pass
    with torch.no_grad():
        dense = refiner.refine_tensors(img_t, msk_t, scales=ONE, fast=FastOptions.dense())
        monkeypatch.setattr(refiner.model, "project_cells", spy)
        got = refiner.refine_tensors(img_t, msk_t, scales=ONE, fast=band)
    fh, fw = feature_size(tuple(s + 64 for s in mask.shape[:2]))
    assert calls and sum(calls) < 0.6 * fh * fw
    # where the band decoder decodes (the band of the coarse mask; away from the border, where
    # the reflect padding adds mirrored boundaries), it gives the dense answer
    inside = boundary_band(msk_t * 0.5 + 0.5, band.band_width(1.0))
    inside[:, :8], inside[:, -8:], inside[:, :, :8], inside[:, :, -8:] = False, False, False, False
    assert inside.sum() > 100
    assert (got - dense)[inside].abs().max() < 1e-4


def test_boundary_band_contains_and_bounds():
    torch.manual_seed(3)
    prob = torch.zeros(2, 1, 70, 90)
    prob[0, 0, 20:50, 10:40] = 1
    prob[1, 0, 5:9, 60:88] = 0.8
    for width in (1, 3, 8):
        band = boundary_band(prob, width)
        fg = prob[:, 0] > 0.5
        # every pixel within `width` (Chebyshev) of the other class is in the band
        k = 2 * width + 1
        pool = torch.nn.functional.max_pool2d
        near_fg = pool(fg[:, None].float(), k, 1, width)[:, 0] > 0
        near_bg = pool((~fg)[:, None].float(), k, 1, width)[:, 0] > 0
        must = near_fg & near_bg
        assert bool((band | ~must).all())
        # and it stays a band: nothing beyond 2 * width + 3 * c of the boundary
        c = max(1, width // 2)
        far = 2 * width + 3 * c + 1
        kf = 2 * far + 1
        near_far = (pool(fg[:, None].float(), kf, 1, far)[:, 0] > 0) & (
            pool((~fg)[:, None].float(), kf, 1, far)[:, 0] > 0)
        assert not bool((band & ~near_far).any())
    assert not boundary_band(torch.zeros(1, 1, 10, 10), 3).any()
    assert not boundary_band(torch.ones(1, 1, 10, 10), 3).any()


def test_full_band_with_windows_equals_dense(refiner):
    img, mask = _sample(97, 131)
    dense = refiner.refine(img, mask, scales=ONE, fast=FastOptions.dense())
    exact_tiles = FastOptions(band=None, tile=40, halo=HALO, memory_mb=4.0)
    stats: dict = {}
    windows = refiner.refine_tensors(*prepare_inputs(img, mask), scales=ONE, fast=exact_tiles,
                                     stats=stats)[0].numpy()
    assert stats["encoder_pixels"][0] > (97 + 64) * (131 + 64)  # it did run on windows
    assert np.abs(dense - windows).max() < 1e-5
    wide = refiner.refine(img, mask, scales=ONE,
                          fast=exact_tiles.with_(band=1000.0, skip_padding=False))
    assert np.abs(dense - wide).max() < 1e-5


def _padded(sample):
    return tuple(reflect_pad(t) for t in prepare_inputs(*sample))


def test_band_keeps_far_pixels_and_decodes_fewer(refiner, sample):
    image, seg = _padded(sample)
    opts = FastOptions(band=2.0, min_band=3, **TILED)
    stats, everything = {}, {}
    prob = refine_fast(refiner.model, image, seg, ONE, opts, stats=stats)
    ref = refine_fast(refiner.model, image, seg, ONE, opts.with_(band=1000.0), stats=everything)
    band = boundary_band(seg * 0.5 + 0.5, opts.band_width(1.0))[:, None]
    assert band.any() and not band.all()
    assert torch.equal(prob[~band], (seg * 0.5 + 0.5)[~band])
    # a pixel's features come from the same window whatever else is decoded
    assert (prob[band] - ref[band]).abs().max() < 1e-6
    total = seg.shape[-2] * seg.shape[-1]
    assert 0 < stats["queries"][0] < total / 2
    # windows without band pixels are never encoded
    assert stats["encoder_pixels"][0] < everything["encoder_pixels"][0]


def test_strided_decoding(refiner, sample):
    image, seg = _padded(sample)
    net = refiner.model
    base = FastOptions(band=None, skip_padding=False, **TILED)
    full = refine_fast(net, image, seg, ONE, base)
    hp, wp = seg.shape[-2:]
    for stride in (2, 4):
        stats: dict = {}
        prob = refine_fast(net, image, seg, ONE, base.with_(stride=stride), stats=stats)
        lat_r = torch.clamp(torch.arange(0, hp + stride, stride), max=hp - 1)
        lat_c = torch.clamp(torch.arange(0, wp + stride, stride), max=wp - 1)
        got = prob[0, 0][lat_r][:, lat_c]
        ref = full[0, 0][lat_r][:, lat_c]
        assert (got - ref).abs().max() < 1e-6  # lattice points are decoded as usual
        assert stats["queries"][0] < hp * wp  # agreeing cells were interpolated
        # the binary masks agree almost everywhere
        agree = ((prob > 0.5) == (full > 0.5)).float().mean()
        assert agree > 0.97
        # a cell is interpolated only if its corners agree, so the interpolated probabilities
        # stay on the corners' side of 0.5
        cell_r, cell_c = torch.arange(hp) // stride, torch.arange(wp) // stride
        corners = full[0, 0][lat_r][:, lat_c] > 0.5
        same = (corners[:-1, :-1] == corners[1:, :-1]) & (corners[:-1, :-1] == corners[:-1, 1:]) \
            & (corners[:-1, :-1] == corners[1:, 1:])
        side = corners[:-1, :-1][cell_r][:, cell_c]
        inside = same[cell_r][:, cell_c]
        assert torch.equal((prob[0, 0] > 0.5)[inside], side[inside])


def test_strided_and_band_combined(refiner, sample):
    image, seg = _padded(sample)
    band_only = FastOptions(band=2.0, **TILED)
    a = refine_fast(refiner.model, image, seg, (0.5, 1.0), band_only, crop=32)
    b = refine_fast(refiner.model, image, seg, (0.5, 1.0), band_only.with_(stride=2), crop=32)
    assert ((a > 0.5) == (b > 0.5)).float().mean() > 0.97


def test_oom_retry_splits_windows(refiner, sample, monkeypatch):
    img, mask = sample
    opts = FastOptions(band=None, tile=32, halo=HALO, memory_mb=2.9)  # windows, not whole
    ref = refiner.refine(img, mask, scales=ONE, fast=opts)
    calls = {"oom": 0}
    real = sparse_mod.encode_window

    def flaky(net, image, mask_, rows, cols, halo, stats=None, **kw):
        if rows[1] - rows[0] > 6:
            calls["oom"] += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(net, image, mask_, rows, cols, halo, stats=stats, **kw)

    monkeypatch.setattr(sparse_mod, "encode_window", flaky)
    got = refiner.refine(img, mask, scales=ONE, fast=opts)
    assert calls["oom"] > 0
    assert np.abs(got - ref).max() < 1e-5  # exact halo: the split windows give the same answer
    with pytest.raises(torch.cuda.OutOfMemoryError):
        refiner.refine(img, mask, scales=ONE, fast=opts.with_(oom_retry=False))


def test_autocast_and_channels_last_on_cpu(sample):
    img, mask = sample
    net = random_crm(TINY_ARCH, 1, random_bn=True)
    ref = CRMRefiner(net).refine(img, mask, scales=ONE,
                                 fast=FastOptions(band=None, channels_last=False, **TILED))
    cl = CRMRefiner(random_crm(TINY_ARCH, 1, random_bn=True),
                    fast=FastOptions(band=None, channels_last=True, **TILED))
    assert np.abs(cl.refine(img, mask, scales=ONE) - ref).max() < 1e-4
    # channels-last is the default; exact=True puts the weights back and stays bit-identical
    assert FastOptions().channels_last and FastOptions.dense().channels_last
    contiguous = CRMRefiner(random_crm(TINY_ARCH, 1, random_bn=True))
    before = contiguous.refine(img, mask, scales=(0.5, 1.0), exact=True)
    contiguous.refine(img, mask, scales=ONE)  # the default: channels-last weights
    conv = contiguous.model.feats.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    after = contiguous.refine(img, mask, scales=(0.5, 1.0), exact=True)
    assert conv.is_contiguous() and np.array_equal(before, after)
    bf = CRMRefiner(net).refine(img, mask, scales=ONE,
                                fast=FastOptions(band=None, autocast="bf16", **TILED))
    assert np.isfinite(bf).all() and np.abs(bf - ref).mean() < 0.05


def test_batch_and_empty_masks_on_fast_path(refiner, sample):
    img, mask = sample
    t1, m1 = prepare_inputs(img, mask)
    opts = FastOptions(**TILED)
    out = refiner.refine_tensors(torch.cat([t1, t1]), torch.cat([m1, -torch.ones_like(m1)]),
                                 fast=opts)
    assert out[1].abs().max() == 0 and out[0].abs().max() > 0
    single = refiner.refine_tensors(t1, m1, fast=opts)
    assert (out[0] - single[0]).abs().max() < 1e-5


def test_grow_follows_a_boundary_the_network_moves(refiner, sample, dense_exact_tiled):
    """With ``grow`` the band widens where the new boundary reaches its edge, never elsewhere."""
    image, seg = _padded(sample)
    net = refiner.model
    dense = dense_exact_tiled
    narrow = FastOptions(band=1.0, min_band=1, **EXACT_TILED)
    stats0, stats1 = {}, {}
    a = refine_fast(net, image, seg, ONE, narrow, stats=stats0)
    b = refine_fast(net, image, seg, ONE, narrow.with_(grow=50), stats=stats1)
    err_a = ((a > 0.5) != (dense > 0.5)).sum()
    err_b = ((b > 0.5) != (dense > 0.5)).sum()
    assert err_a > 0  # the random network moves the boundary past a 1-px band
    assert err_b < err_a
    assert stats1["queries"][0] > stats0["queries"][0]
    # grown pixels are decoded as usual (same windows, exact halo)
    grown = (b != a) & ((seg * 0.5 + 0.5) != b)
    assert (b[grown] - dense[grown]).abs().max() < 1e-5
    # grow=0 is the plain band
    assert torch.equal(refine_fast(net, image, seg, ONE, narrow.with_(grow=0)), a)


def test_scan_gives_every_pixel_a_new_probability(refiner, sample, dense_exact_tiled):
    """At ``scan`` scales the far field is decoded strided, the band in full."""
    image, seg = _padded(sample)
    net = refiner.model
    dense = dense_exact_tiled
    opts = FastOptions(band=2.0, min_band=2, scan=1.0, scan_stride=2.0, **EXACT_TILED)
    prob = refine_fast(net, image, seg, ONE, opts)
    band = boundary_band(seg * 0.5 + 0.5, opts.band_width(1.0))[:, None]
    assert (prob[band] - dense[band]).abs().max() < 1e-5  # the band in full
    far = ~band
    assert not torch.equal(prob[far], (seg * 0.5 + 0.5)[far])  # far pixels not copied
    assert ((prob > 0.5) == (dense > 0.5)).float().mean() > 0.97
    # scales above ``scan`` copy the far field as before
    above = refine_fast(net, image, seg, ONE, opts.with_(scan=0.5))
    assert torch.equal(above[far], (seg * 0.5 + 0.5)[far])


def test_grow_and_scan_options_are_checked():
    for bad in (dict(grow=-1), dict(scan=0.0), dict(scan_stride=0)):
        with pytest.raises(ValueError):
            FastOptions(**bad)


def test_band_vs_dense_tool_parses_fast_options():
    """tools/band_vs_dense.py: NAME=field:value,... gives those FastOptions; unknown fields fail."""
    import argparse
    import runpy
    from pathlib import Path

    tool = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "band_vs_dense.py"),
                          run_name="tool")
    name, opts = tool["parse_variant"]("g=grow:4,halo:96,scan:0.25")
    assert name == "g" and (opts.grow, opts.halo, opts.scan) == (4, 96, 0.25)
    assert tool["parse_variant"]("band=")[1] == FastOptions()
    assert tool["parse_variant"]("d=dense,autocast:bf16")[1] == FastOptions.dense().with_(
        autocast="bf16")
    assert tool["parse_variant"]("b=band:none,halo:none")[1] == FastOptions(band=None, halo=None)
    with pytest.raises(argparse.ArgumentTypeError, match="not a FastOptions field"):
        tool["parse_variant"]("x=halos:3")


def test_default_decoding_follows_the_schedule(sample, decodings):
    """No ``fast`` given: one scale runs the band with growth, several scales run dense; both
    with the fusion under ``autocast="auto"`` unless the refiner says otherwise."""
    auto = FastOptions(grow=4, halo=96, autocast="auto")
    assert FastOptions.default_for((1.0,)) == auto
    assert FastOptions.default_for((1.0,), autocast=None) == FastOptions(grow=4, halo=96)
    assert FastOptions.default_for((0.5, 1.0), autocast="none").is_dense
    dense_auto = FastOptions.default_for((0.5, 1.0))
    assert dense_auto == FastOptions.dense().with_(autocast="auto")
    assert dense_auto.describe() == "dense(autocast=auto)"
    assert FastOptions.dense().describe() == "dense"
    assert FastOptions(grow=4, halo=96).describe() == "band(grow=4, halo=96)"
    assert FastOptions.dense(float("inf")).is_dense  # one pass: whole-image features
    assert not FastOptions(band=None, skip_padding=False).is_dense  # 32-px halo windows
    assert FastOptions(band=None, stride=2).describe() == "all pixels(band=None, stride=2)"
    seen = decodings
    img, mask = sample
    one = CRMRefiner(random_crm(TINY_ARCH, 1, random_bn=True), scales=(1.0,))
    one.refine(img, mask)
    one.refine(img, mask, scales=(0.5, 1.0))
    fixed = CRMRefiner(one.model, scales=(1.0,), fast=FastOptions.dense())
    fixed.refine(img, mask)
    fp32 = CRMRefiner(one.model, scales=(1.0,), autocast="none")
    fp32.refine(img, mask, scales=(0.5, 1.0))
    assert [s for s, _ in seen] == [(1.0,), (0.5, 1.0), (1.0,), (0.5, 1.0)]
    assert seen[0][1] == auto
    assert seen[1][1] == dense_auto and seen[2][1].is_dense and seen[3][1].is_dense
    assert one.fast_options() == auto
    assert fixed.fast_options((1.0,)).is_dense
    assert fp32.fast_options() == FastOptions(grow=4, halo=96)
    with pytest.raises(ValueError, match="autocast must be"):
        CRMRefiner(one.model, autocast="int8")


def test_autocast_auto_follows_the_device(monkeypatch):
    """``"auto"`` is bf16 exactly where the device computes it natively."""
    for amx, avx in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx: v,
                            raising=False)
        native = amx or avx
        assert sparse_mod.native_bf16("cpu") is native
        assert sparse_mod.autocast_dtype("auto", "cpu") == (torch.bfloat16 if native else None)
        big, small = sparse_mod.AUTOCAST_MIN_PIXELS, sparse_mod.AUTOCAST_MIN_PIXELS - 1
        assert sparse_mod.autocast_dtype("auto", "cpu", big) == (torch.bfloat16 if native
                                                                 else None)
        assert sparse_mod.autocast_dtype("auto", "cpu", small) is None  # small ROIs: float32
        assert sparse_mod.autocast_dtype("bf16", "cpu", small) == torch.bfloat16
        resolved = FastOptions.dense().with_(autocast="auto").resolved("cpu")
        assert resolved.autocast == ("auto" if native else None)
        assert resolved.is_dense is not native
    assert sparse_mod.autocast_dtype("fp16", "cpu") == torch.float16
    assert sparse_mod.autocast_dtype(None, "cpu") is None
    assert not sparse_mod.native_bf16("meta")
    for text, value in (("none", None), ("", None), ("OFF", None), (None, None),
                        ("bf16", "bf16"), ("auto", "auto")):
        assert sparse_mod.parse_autocast(text) == value


def test_autocast_keeps_the_trunk_in_float32_unless_asked(refiner):
    """Under autocast the fusion runs in bf16 and the trunk in float32 (``autocast_trunk``)."""
    net = refiner.model
    torch.manual_seed(3)
    x = torch.randn(1, 4, 40, 56)
    dtypes = {}

    def hook(mod, inp, out) -> None:
        dtypes["trunk"] = [t.dtype for t in out]

    handle = net.feats.register_forward_hook(hook)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            feat = net.encode(x[:, :3], x[:, 3:], autocast_trunk=False)
            assert dtypes.pop("trunk") == [torch.float32] * 3 and feat.dtype == torch.bfloat16
            net.encode(x[:, :3], x[:, 3:])
            assert dtypes.pop("trunk") == [torch.bfloat16] * 3
    finally:
        handle.remove()
    img, mask = _sample(64, 80)
    ref = refiner.refine(img, mask, scales=ONE, fast=FastOptions.dense())
    for trunk in (False, True):
        bf = refiner.refine(img, mask, scales=ONE,
                            fast=FastOptions.dense().with_(autocast="bf16", autocast_trunk=trunk))
        assert np.isfinite(bf).all() and 0 < np.abs(bf - ref).max() < 0.05
    # "auto" leaves inputs below AUTOCAST_MIN_PIXELS in float32, bit for bit
    auto = refiner.refine(img, mask, scales=ONE, fast=FastOptions.dense().with_(autocast="auto"))
    assert np.array_equal(auto, ref)


def test_dense_over_budget_is_windowed_and_equal(refiner):
    """Dense decoding of an image over its memory budget: exact-halo windows, the same answer."""
    img, mask = _sample(97, 131)
    whole = refiner.refine(img, mask, scales=(0.5, 1.0), fast=FastOptions.dense(float("inf")))
    small = FastOptions.dense(memory_mb=1.0)
    assert small.is_dense and small.tile is None and small.halo is None
    stats: dict = {}
    windows = refiner.refine_tensors(*prepare_inputs(img, mask), scales=(0.5, 1.0), fast=small,
                                     stats=stats)[0].numpy()
    assert stats["encoder_pixels"][-1] > (97 + 64) * (131 + 64)  # windows with halos ran
    assert stats["queries"][-1] == (97 + 64) * (131 + 64)  # and every pixel was decoded
    assert np.abs(whole - windows).max() < 1e-5


def test_receptive_radius_of_the_efficientnet_trunk():
    """Windows with the computed radius as halo give the whole-image features (Lite0 trunk)."""
    from crm_d2.modeling.crm import CRMArch

    arch = CRMArch(encoder="efficientnet_lite0", feat_dim=32, mlp_hidden=(16, 16))
    net = random_crm(arch, 3, random_bn=True)
    radius = receptive_radius(arch)
    assert radius == 179  # stem, then the depthwise kernels with their strides and dilations
    torch.manual_seed(4)
    img, msk = torch.randn(1, 3, 430, 430), torch.rand(1, 1, 430, 430) * 2 - 1
    with torch.no_grad():
        full = net.project_features(net.encode(img, msk))
        rows, cols = (100, 116), (100, 116)  # a window far from every border
        ref = full[:, rows[0] : rows[1], cols[0] : cols[1]]
        win = encode_window(net, img, msk, rows, cols, halo=radius)
        assert (win - ref).abs().max() < 1e-4
        short = encode_window(net, img, msk, rows, cols, halo=0)  # a window without context
        assert (short - ref).abs().max() > 1e-3


def test_memory_estimate_caps_the_encoder_at_the_budget():
    """Beyond the dense budget the encoder runs on windows: only the full-size maps keep growing."""
    from crm_d2.memory import _FIXED_BYTES, _FULL_RES_BYTES, estimate_refine_bytes
    from crm_d2.modeling.crm import CRMArch
    from crm_d2.sparse import DENSE_MEMORY_MB

    arch = CRMArch()
    small = estimate_refine_bytes(200, 300, arch, (1.0,))
    assert small > _FIXED_BYTES + 264 * 364 * 1000  # the whole-image encoder term, uncapped
    big = estimate_refine_bytes(4000, 6000, arch, (0.125, 0.25, 0.5, 1.0))
    cap = 1.25 * DENSE_MEMORY_MB * 2**20
    assert big == int(_FIXED_BYTES + 4064 * 6064 * _FULL_RES_BYTES + cap)
    assert big < 3 * 2**30


def test_fixed_shape_windows_are_exact_and_share_a_shape(refiner):
    """fixed_shape windows shift inward at the border: one input shape, the same features."""
    net = refiner.model
    torch.manual_seed(5)
    img, msk = torch.randn(1, 3, 161, 203), torch.rand(1, 1, 161, 203) * 2 - 1
    shapes = []

    class Count:
        encoded_pixels = 0

    with torch.no_grad():
        full = net.project_features(net.encode(img, msk))
        fh, fw = full.shape[1:3]
        corner = ((fh - 10, fh), (fw - 10, fw))
        for rows, cols in (((0, 10), (0, 10)), ((40, 50), (45, 55)), corner):
            stats = Count()
            win = encode_window(net, img, msk, rows, cols, halo=HALO, stats=stats,
                                fixed_shape=True)
            shapes.append(stats.encoded_pixels)
            ref = full[:, rows[0] : rows[1], cols[0] : cols[1]]
            assert (win - ref).abs().max() < 1e-5
    assert shapes[0] == shapes[1] == shapes[2]  # border and interior windows: one shape
    # without a halo every requested cell still comes back, at every position
    with torch.no_grad():
        for a in range(0, fh - 3, 7):
            win = encode_window(net, img, msk, (a, a + 4), (fw - 4, fw), halo=0, fixed_shape=True)
            assert win.shape[1:3] == (4, 4)


def test_decoding_follows_the_schedule_asked_for_not_the_roi_rule(sample, decodings):
    """A 4-scale refiner whose ROI-size rule leaves one scale on a small ROI still decodes dense."""
    seen = decodings
    img, mask = sample
    four = CRMRefiner(random_crm(TINY_ARCH, 1, random_bn=True), min_side=100)
    four.refine(img, mask)
    assert seen[0][0] == (1.0,) and seen[0][1] == FastOptions.default_for((0.5, 1.0))


def test_dense_decodes_only_what_the_next_scale_reads(refiner, monkeypatch):
    """At a coarse scale dense decoding skips the pixels the next scale's resize never reads:
    the same answer, fewer queries."""
    img, mask = _sample(97, 131)
    scales = (0.125, 0.25, 0.5, 1.0)
    opts = FastOptions.dense(float("inf"))
    stats: dict = {}
    got = refiner.refine_tensors(*prepare_inputs(img, mask), scales=scales, fast=opts,
                                 stats=stats)
    # windows (a budget below one 1/8-scale input) skip the same pixels
    windowed: dict = {}
    win = refiner.refine_tensors(*prepare_inputs(img, mask), scales=scales,
                                 fast=FastOptions.dense(memory_mb=0.02), stats=windowed)
    assert windowed["encoder_pixels"][0] > 20 * 24  # windows with halos ran at 1/8
    assert windowed["queries"] == stats["queries"]
    monkeypatch.setattr(sparse_mod, "_READ_SHARE", 0.0)  # decode every pixel at every scale
    full: dict = {}
    ref = refiner.refine_tensors(*prepare_inputs(img, mask), scales=scales, fast=opts,
                                 stats=full)
    assert (got - ref).abs().max() < 1e-6
    hp, wp = 97 + 64, 131 + 64
    assert full["queries"] == [hp * wp] * 4
    assert stats["queries"][0] < 0.3 * hp * wp and stats["queries"][1:] == [hp * wp] * 3
    assert (win - ref).abs().max() < 1e-5
    # a mask that the decoded pixels alone do not prove non-empty: everything is decoded
    monkeypatch.setattr(sparse_mod, "_READ_SHARE", 0.7)
    monkeypatch.setattr(sparse_mod, "_surely_nonempty", lambda logits, reads: False)
    again: dict = {}
    fallback = refiner.refine_tensors(*prepare_inputs(img, mask), scales=scales, fast=opts,
                                      stats=again)
    assert again["queries"][0] > hp * wp and (fallback - ref).abs().max() < 1e-6


def test_surely_nonempty_bounds_the_empty_rule():
    rows, cols = torch.tensor([0, 1]), torch.tensor([0, 2])
    logits = torch.full((2, 3, 3), -20.0)
    logits[0, 0, 0] = logits[0, 1, 2] = 20.0  # two decoded pixels at p ~ 1: sum ~ 2
    assert not sparse_mod._surely_nonempty(logits, (rows, cols))  # image 1 sums ~ 0
    logits[1, 1, 0] = logits[1, 0, 2] = 20.0
    assert sparse_mod._surely_nonempty(logits, (rows, cols))
    logits[1, 0, 2] = -20.0  # one decoded pixel at p ~ 1 is not more than 1
    assert not sparse_mod._surely_nonempty(logits, (rows, cols))


def test_resize_reads_covers_every_sample_the_resize_reads():
    from torch.nn import functional as F

    for n_in in (1, 2, 5, 37, 161, 853):
        for n_out in {1, 2, max(1, n_in // 8), max(1, n_in // 4), max(1, n_in // 2), n_in}:
            reads = sparse_mod.resize_reads(n_in, n_out)
            x = torch.full((1, 1, n_in, 1), float("nan"))
            x[0, 0, reads, 0] = 1.0
            y = F.interpolate(x, size=(n_out, 1), mode="bilinear", align_corners=True)
            assert torch.isfinite(y).all(), (n_in, n_out)
    assert sparse_mod.resize_reads(1770, 443).numel() == 885  # 1/8 -> 1/4: half the rows
