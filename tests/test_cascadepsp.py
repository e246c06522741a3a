"""CascadePSP: released key list, loader errors, global / local / fast inference, the shared
refiner interface (refine_segments, load_refiner, crm-refine and crm-eval flags).

Equivalence with the released code itself is checked by tools/compare_cascadepsp.py (it needs
that code); these tests use tiny random networks and small L on tiny images.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_crm
from PIL import Image

from crm_d2 import (
    CascadePSPRefiner,
    CheckpointError,
    load_cascadepsp,
    load_crm,
    load_refiner,
    save_cascadepsp,
    save_crm,
)
from crm_d2.cascadepsp import _crop_starts, global_step, local_step
from crm_d2.inference import prepare_inputs
from crm_d2.modeling.cascadepsp import CASCADEPSP_ARCH, CASCADEPSP_TINY_ARCH, CascadePSPNet
from crm_d2.segments import ROIOptions, refine_segments

TSV = Path(__file__).resolve().parents[2] / "shared" / "docs" / "checkpoints"
TINY = CASCADEPSP_TINY_ARCH
L_TEST = 128  # small L: smaller images take the "enlarge" branch, larger ones get crops


def random_cascadepsp(arch=TINY, seed: int = 0) -> CascadePSPNet:
    """A random CascadePSP with non-trivial BatchNorm statistics and spread-out logits."""
    torch.manual_seed(seed)
    net = CascadePSPNet(arch)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        net.final_21.weight.mul_(5.0)
    return net.eval()


@pytest.fixture(scope="module")
def net() -> CascadePSPNet:
    return random_cascadepsp()


@pytest.fixture(scope="module")
def refiner(net) -> CascadePSPRefiner:
    return CascadePSPRefiner(net, L=L_TEST)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, net) -> str:
    """A tiny CascadePSP in the project format that stores L = L_TEST."""
    path = tmp_path_factory.mktemp("psp") / "tiny_psp.pth"
    save_cascadepsp(net, str(path), L=L_TEST)
    return str(path)


def scene(h: int, w: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 5 : 4 * h // 5, w // 4 : 3 * w // 5] = 255
    return img, mask


# --------------------------------------------------------------------------------------------
# Network and checkpoints
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def released_net() -> CascadePSPNet:
    """The full-size network (67.7 M parameters, ~270 MB), built once."""
    torch.manual_seed(0)
    return CascadePSPNet(CASCADEPSP_ARCH).eval()


def test_released_architecture_matches_key_list(released_net):
    sd = released_net.state_dict()
    assert len(sd) == 426
    assert sum(p.numel() for p in released_net.parameters()) == 67_683_433
    path = TSV / "cascadepsp_model_keys.tsv"
    if not path.is_file():
        pytest.skip(f"released key list {path} not found (it ships in the project's shared docs)")
    rows = [line.split("\t") for line in path.read_text().strip().splitlines()]
    assert [k for k, _ in rows] == list(sd), "key order/names differ from the released file"
    for k, shape in rows:
        assert tuple(sd[k].shape) == tuple(ast.literal_eval(shape)), k


@pytest.mark.slow  # writes and reads 270 MB
def test_released_format_round_trip(tmp_path, released_net):
    path = tmp_path / "model"  # the released file's name
    torch.save({"module." + k: v for k, v in released_net.state_dict().items()}, path)
    loaded, meta = load_cascadepsp(str(path))
    assert meta["format"] == "official" and meta["network"] == "cascadepsp"
    for k, v in released_net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="CascadePSP checkpoint .*CascadePSPRefiner"):
        load_crm(str(path))


def test_project_format_round_trip_half(tmp_path, net):
    path = tmp_path / "psp_half.pth"
    save_cascadepsp(net, str(path), half=True, L=128)
    loaded, meta = load_cascadepsp(str(path))
    assert loaded.arch == TINY and meta["network"] == "cascadepsp" and meta["L"] == 128
    for k, v in net.state_dict().items():
        assert torch.allclose(loaded.state_dict()[k].float(), v.float(), atol=1e-2, rtol=1e-3), k
    assert CascadePSPRefiner.from_checkpoint(str(path)).L == 128  # stored L is the default
    assert CascadePSPRefiner.from_checkpoint(str(path), L=200).L == 200
    with pytest.raises(CheckpointError, match="CascadePSP checkpoint .*--refiner cascadepsp"):
        load_crm(str(path))


def test_crm_files_are_named_as_such(tmp_path):
    crm = random_crm()
    raw = tmp_path / "model_45705"
    torch.save({"module." + k: v for k, v in crm.state_dict().items()}, raw)
    project = tmp_path / "crm.pth"
    save_crm(crm, str(project))
    for path in (raw, project):
        with pytest.raises(CheckpointError, match="CRM checkpoint .*not CascadePSP"):
            load_cascadepsp(str(path))
        with pytest.raises(CheckpointError, match="CRM checkpoint"):
            load_refiner("cascadepsp", str(path))


def test_bad_files_say_what_they_are(tmp_path, net):
    html = tmp_path / "model.html"
    html.write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    lfs = tmp_path / "lfs"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 270000000\n")
    good = tmp_path / "good.pth"
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="HTML page.*hkchengrex/CascadePSP"):
        load_cascadepsp(str(html))
    with pytest.raises(CheckpointError, match="git-LFS pointer"):
        load_cascadepsp(str(lfs))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_cascadepsp(str(cut))
    with pytest.raises(CheckpointError, match="does not exist.*7478d4a9c42ab52beb6d7e9683402fe0"):
        load_cascadepsp(str(tmp_path / "absent"))
    # a tiny raw state dict is read as the released architecture: every mismatch is listed
    with pytest.raises(CheckpointError, match="CascadePSP architecture") as info:
        load_cascadepsp(str(good))
    message = str(info.value)
    assert "missing keys" in message and "wrong shapes" in message
    assert "feats.layer1.0.conv3.weight" in message  # bottleneck keys absent from basic blocks
    odd = tmp_path / "odd.pth"
    save_cascadepsp(net, str(odd))
    obj = torch.load(odd, weights_only=True)
    obj["state_dict"]["extra.weight"] = torch.zeros(1)
    torch.save(obj, odd)
    with pytest.raises(CheckpointError, match="1 unexpected keys: extra.weight"):
        load_cascadepsp(str(odd))


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------
def test_crop_grid():
    # L = 900: stride 418, last crop shifted inside, duplicates removed by the caller
    assert _crop_starts(1203, 900, 418) == [0, 303, 303]
    assert _crop_starts(900, 900, 418) == [0, 0, 0]
    assert _crop_starts(500, 900, 418) == [0, 0]  # one crop spanning the short side
    assert _crop_starts(2000, 900, 418) == [0, 418, 836, 1100, 1100]


@pytest.mark.parametrize("size", [(50, 70), (130, 201)])
def test_both_modes_give_probabilities(refiner, size):
    img, mask = scene(*size)
    full = refiner.refine(img, mask)
    fast = refiner.refine(img, mask, fast=True)
    for p in (full, fast):
        assert p.shape == size and p.dtype == np.float32
        assert 0 <= p.min() and p.max() <= 1
    assert np.abs(full - fast).max() > 1e-3  # the local step changes the output
    again = CascadePSPRefiner(refiner.model, L=L_TEST, fast=True).refine(img, mask)
    np.testing.assert_array_equal(again, fast)


def test_mask_is_binarised_like_the_release(refiner):
    img, mask = scene(60, 90)
    soft = np.where(mask > 0, 200, 100).astype(np.uint8)  # > 127 inside, <= 127 outside
    np.testing.assert_array_equal(refiner.refine(img, soft), refiner.refine(img, mask))
    keep_soft = CascadePSPRefiner(refiner.model, L=L_TEST, binarize=False)
    assert np.abs(keep_soft.refine(img, soft) - keep_soft.refine(img, mask)).max() > 1e-4


class _Pointwise(torch.nn.Module):
    """Stands in for the network: ``pred`` is a fixed function of the image pixel."""

    def forward(self, img, seg, inter_s8=None, inter_s4=None):
        pred = torch.sigmoid(img[:, :1] * 3)
        return {"pred": pred, "pred_s4": pred}


def test_local_step_covers_refined_crops_and_keeps_the_global_mask_elsewhere():
    torch.manual_seed(0)
    h, w, L = 100, 300, 96  # crops every 16 px (L // 2 - 32), 96 px wide
    img = torch.randn(1, 3, h, w)
    glob = torch.zeros(1, 1, h, w)
    glob[:, :, :, :120] = 1.0  # foreground on the left 40%
    out = local_step(_Pointwise(), img, glob, glob, L)
    f = torch.sigmoid(img[:, :1] * 3)
    # crops entirely inside (> 90%) or outside (< 10%) are skipped: the binary global mask
    # stays there; in refined crops (minus the chipped borders) the pointwise answer is averaged
    assert torch.equal(out[..., :, :20], glob[..., :, :20])
    assert torch.equal(out[..., :, 250:], glob[..., :, 250:])
    assert torch.allclose(out[..., 16:84, 110:130], f[..., 16:84, 110:130], atol=1e-6)
    # refined crops start at x = 48, 64, 80, 96 (10%..90% foreground); with 16 px chipped off
    # their inner sides they cover columns 64..175, every row (crops at y = 0 and 4)
    changed = (out != glob).any(dim=-2)[0, 0]
    assert changed.nonzero()[:, 0].tolist() == list(range(64, 176))


def test_all_foreground_skips_every_crop():
    img = torch.randn(1, 3, 120, 150)
    glob = torch.ones(1, 1, 120, 150)
    out = local_step(_Pointwise(), img, glob, glob, 96)
    assert torch.equal(out, glob)


class _FollowMask(torch.nn.Module):
    """Stands in for the network: a prediction that follows the coarse mask."""

    def forward(self, img, seg, inter_s8=None, inter_s4=None):
        pred = torch.sigmoid(3 * seg + img[:, :1])
        return {"pred": pred, "pred_s4": pred}


@pytest.mark.parametrize("stub", [False, True], ids=["tiny-net", "mask-follower"])
def test_batch_equals_single_calls(refiner, caplog, stub):
    if stub:
        refiner = CascadePSPRefiner(_FollowMask(), L=L_TEST)
    imgs, masks = [], []
    for seed, full in ((0, False), (1, True), (2, False)):
        img, mask = scene(100, 140, seed)  # two crop positions at L = 128
        if full:
            mask[:] = 255  # all foreground: with the stub its crops are skipped, not the others'
        i, m = prepare_inputs(img, mask)
        imgs.append(i)
        masks.append(m)
    with caplog.at_level(logging.DEBUG, logger="crm_d2.cascadepsp"):
        batch = refiner.refine_tensors(torch.cat(imgs), torch.cat(masks))
    if stub:  # some crops of the batch are skipped and others refined: the sub-batch path ran
        (line,) = [r.getMessage() for r in caplog.records if "crops refined" in r.getMessage()]
        assert "4 of 6 crops refined" in line, line
    for b in range(3):
        single = refiner.refine_tensors(imgs[b], masks[b])
        torch.testing.assert_close(batch[b], single[0], atol=1e-5, rtol=0)


def test_global_step_long_side(net):
    img, seg = torch.randn(1, 3, 50, 70), torch.ones(1, 1, 50, 70)
    assert global_step(net, img, seg, 96)["pred"].shape[-2:] == (68, 96)  # enlarged (bicubic)
    img, seg = torch.randn(1, 3, 150, 200), torch.ones(1, 1, 150, 200)
    assert global_step(net, img, seg, 96)["pred"].shape[-2:] == (72, 96)  # shrunk ('area')


def test_errors_name_the_fix(refiner):
    with pytest.raises(ValueError, match="L must be an integer >= 66"):
        CascadePSPRefiner(refiner.model, L=40)
    img, mask = prepare_inputs(*scene(40, 40))
    with pytest.raises(ValueError, match="no input scales"):
        refiner.refine_tensors(img, mask, scales=(0.5, 1.0))
    with pytest.raises(ValueError, match=r"mask must be \(B, 1, H, W\)"):
        refiner.refine_tensors(img, mask[0])
    with pytest.raises(CheckpointError, match="ships no CascadePSP weights"):
        CascadePSPRefiner.from_checkpoint(None)


# --------------------------------------------------------------------------------------------
# The shared interface
# --------------------------------------------------------------------------------------------
def test_load_refiner_and_refine_segments(weights, tiny_weights):
    ref = load_refiner("cascadepsp", weights, fast=False)
    assert isinstance(ref, CascadePSPRefiner) and ref.L == L_TEST
    with pytest.raises(ValueError, match="scales do not apply to the cascadepsp refiner"):
        load_refiner("cascadepsp", weights, scales=(1.0,))
    with pytest.raises(ValueError, match="L do not apply to the crm refiner"):
        load_refiner("crm", tiny_weights, L=900)
    with pytest.raises(ValueError, match="unknown refiner 'psp'"):
        load_refiner("psp", weights)
    with pytest.raises(CheckpointError, match="CascadePSP checkpoint"):
        load_refiner("crm", weights)

    img, _ = scene(90, 120)
    masks = torch.zeros(3, 90, 120, dtype=torch.bool)
    masks[0, 10:60, 20:80] = True
    masks[1, 40:85, 60:115] = True
    masks[2, 5:8, 5:8] = True  # below min_area: not refined
    image = torch.from_numpy(img).permute(2, 0, 1)
    out = refine_segments(ref, image, masks, ROIOptions(min_area=100))
    assert [r.segment_id for r in out] == [0, 1]
    from crm_d2.boxes import crop
    from crm_d2.inference import normalize_image, normalize_mask

    norm = normalize_image(image[None])
    for r in out:
        mask = normalize_mask(crop(masks[r.segment_id].float(), r.box))[None, None]
        single = ref.refine_tensors(crop(norm, r.box), mask)
        torch.testing.assert_close(r.prob, single[0], atol=1e-5, rtol=0)


def test_crm_refine_cli_flag(tmp_path, weights):
    from crm_d2.cli import refine as cli

    img, mask = scene(45, 61)
    Image.fromarray(img).save(tmp_path / "im.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    base = [str(tmp_path / "im.png"), str(tmp_path / "mask.png"), "--quiet"]
    for extra in ([], ["--fast"], ["--L", "100"]):
        out = tmp_path / f"out{len(extra)}.png"
        assert cli.main([*base, "-o", str(out), "--refiner", "cascadepsp", "--weights", weights,
                         *extra]) == 0
        assert np.asarray(Image.open(out)).shape == (45, 61)
    ref = CascadePSPRefiner.from_checkpoint(weights).refine(img, mask)
    written = np.asarray(Image.open(tmp_path / "out0.png"))
    np.testing.assert_array_equal(written, np.round(ref * 255).astype(np.uint8))
    with pytest.raises(SystemExit, match="--scales do"):
        cli.main([*base, "-o", str(tmp_path / "x.png"), "--refiner", "cascadepsp",
                  "--weights", weights, "--scales", "0.5", "1"])
    with pytest.raises(SystemExit, match="--fast do"):
        cli.main([*base, "-o", str(tmp_path / "x.png"), "--weights", weights, "--fast"])
    with pytest.raises(SystemExit, match="no CascadePSP weights.*hkchengrex"):
        cli.main([*base, "-o", str(tmp_path / "x.png"), "--refiner", "cascadepsp"])
    with pytest.raises(SystemExit, match="CascadePSP checkpoint"):
        cli.main([*base, "-o", str(tmp_path / "x.png"), "--weights", weights])  # as CRM


def test_crm_eval_flag(tmp_path, weights):
    from test_eval_tool import make_coco, read_report

    from crm_d2.cli import eval as cli

    make_coco(tmp_path / "data", n_images=2)
    args = ["--coco-instances", str(tmp_path / "data/gt.json"), "--images",
            str(tmp_path / "data/images"), "--predictions", str(tmp_path / "data/results.json"),
            "--quiet", "--min-area", "200"]
    out = tmp_path / "out"
    assert cli.main(["--refiner", "cascadepsp", "--weights", weights, "--output", str(out),
                     *args]) == 0
    rep = read_report(out)
    assert rep["refined_segments"] > 0
    assert rep["settings"]["refiner"] == "cascadepsp" and rep["settings"]["L"] == L_TEST
    with pytest.raises(SystemExit, match="--scales: CRM option"):
        cli.main(["--refiner", "cascadepsp", "--weights", weights, "--output",
                  str(tmp_path / "o2"), "--scales", "1.0", *args])
    with pytest.raises(SystemExit, match="no CascadePSP weights"):
        cli.main(["--refiner", "cascadepsp", "--output", str(tmp_path / "o3"), *args])
    # the CascadePSP run's cache is not reused by a CRM run in the same folder
    with pytest.raises(SystemExit, match="other inputs or settings.*refiner"):
        cli.main(["--random-weights", "tiny", "--output", str(out), *args])
