"""Checkpoint formats: official key list, round trips, and every bad-file error."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_crm

from crm_d2 import CheckpointError, CRMArch, CRMNet, CRMRefiner, load_crm, save_crm

TSV = Path(__file__).resolve().parents[2] / "shared" / "docs" / "checkpoints"
TINY = CRMArch(block="basic", layers=(1, 1, 1, 1), width=8, feat_dim=16, mlp_hidden=(8, 8))


def _official_keys(name: str) -> list[tuple[str, tuple[int, ...]]]:
    path = TSV / name
    if not path.is_file():
        pytest.skip(f"official key list {path} not found (it ships in the project's shared docs)")
    rows = [line.split("\t") for line in path.read_text().strip().splitlines()]
    return [(k, tuple(ast.literal_eval(s))) for k, s in rows]


def _random_model(arch: CRMArch = TINY, seed: int = 0) -> CRMNet:
    return random_crm(arch, seed, random_bn=True, calibrate=False)


def test_official_architecture_matches_key_list():
    keys = _official_keys("crm_model_45705_keys.tsv")
    sd = CRMNet().state_dict()
    assert [k for k, _ in keys] == list(sd), "key order/names differ from model_45705"
    for k, shape in keys:
        assert tuple(sd[k].shape) == shape, k
    n_params = sum(p.numel() for p in CRMNet().parameters())
    assert n_params == 24_265_697  # the official model_45705 (Shen et al. 2022)


def test_official_format_round_trip(tmp_path):
    net = _random_model(CRMArch())
    path = tmp_path / "model_45705.aspx"  # the name a browser may give it
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, path)
    loaded, meta = load_crm(str(path))
    assert meta["format"] == "official"
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    img = torch.randn(1, 3, 40, 56)
    msk = torch.rand(1, 1, 40, 56) * 2 - 1
    assert torch.equal(loaded.encode(img, msk), net.encode(img, msk))


def test_plain_state_dict_and_training_dict(tmp_path):
    net = _random_model()
    torch.save(net.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_crm(str(tmp_path / "plain.pth"))  # a TINY state dict is not the official arch
    save_crm(net, str(tmp_path / "ours.pth"), drop_layer4=False)
    loaded, meta = load_crm(str(tmp_path / "ours.pth"))
    assert meta["format"] == "crm_d2" and CRMArch.from_dict(meta["arch"]) == TINY
    big = _random_model(CRMArch())
    torch.save({"state_dict": big.state_dict(), "iteration": 5}, tmp_path / "train.pth")
    loaded, _ = load_crm(str(tmp_path / "train.pth"))
    assert torch.equal(loaded.feats.conv1.weight, big.feats.conv1.weight)


def test_project_format_half_without_layer4(tmp_path):
    net = _random_model(CRMArch(block="basic", layers=(1, 1, 1, 1), width=8, feat_dim=16))
    path = tmp_path / "w.pth"
    save_crm(net, str(path), half=True, drop_layer4=True, scales=[0.25, 1.0],
             training={"iterations": 3})
    obj = torch.load(path, weights_only=True)
    assert not any(k.startswith("feats.layer4") for k in obj["state_dict"])
    assert obj["state_dict"]["feats.conv1.weight"].dtype == torch.float16
    refiner = CRMRefiner.from_checkpoint(str(path))
    assert refiner.scales == (0.25, 1.0)
    # scales=None means "not given" (command-line tools pass it through); explicit ones win
    assert CRMRefiner.from_checkpoint(str(path), scales=None).scales == (0.25, 1.0)
    assert CRMRefiner.from_checkpoint(str(path), scales=[1.0]).scales == (1.0,)
    assert refiner.metadata["training"] == {"iterations": 3}
    w = refiner.model.feats.conv1.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, net.feats.conv1.weight.half().float())
    assert not hasattr(refiner.model.feats, "layer4")


def test_rejects_html_page(tmp_path):
    path = tmp_path / "model_45705.aspx"
    path.write_text("<!DOCTYPE html>\n<html><head><title>OneDrive</title></head></html>")
    with pytest.raises(CheckpointError, match="HTML page"):
        load_crm(str(path))


def test_rejects_git_lfs_pointer(tmp_path):
    path = tmp_path / "model_45705"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 97000000\n")
    with pytest.raises(CheckpointError, match="git-LFS pointer"):
        load_crm(str(path))


def test_rejects_truncated_file(tmp_path):
    net = _random_model(CRMArch())
    full = tmp_path / "full"
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, full)
    data = full.read_bytes()
    cut = tmp_path / "model_45705"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_crm(str(cut))


def test_rejects_empty_missing_and_non_dict(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_crm(str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_crm(str(tmp_path / "nope"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_crm(str(tmp_path / "list.pth"))


def test_rejects_cascadepsp(tmp_path):
    keys = _official_keys("cascadepsp_model_keys.tsv")
    small = {"module." + k: torch.zeros(s) for k, s in keys if k.startswith(("feats.conv1",
                                                                            "feats.bn1", "psp."))
             and "stages" not in k}
    assert small["module.feats.conv1.weight"].shape[1] == 6
    path = tmp_path / "model"
    torch.save(small, path)
    with pytest.raises(CheckpointError, match="CascadePSP"):
        load_crm(str(path))


def test_lists_missing_unexpected_and_wrong_shapes(tmp_path):
    sd = {"module." + k: v for k, v in _random_model(CRMArch()).state_dict().items()}
    del sd["module.imnet.layers.0.weight"]
    sd["module.extra.weight"] = torch.zeros(3)
    sd["module.aspp_.last_conv.0.weight"] = torch.zeros(256, 256, 1, 1)
    path = tmp_path / "bad"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_crm(str(path))
    msg = str(err.value)
    assert "1 missing keys: imnet.layers.0.weight" in msg
    assert "1 unexpected keys: extra.weight" in msg
    assert "aspp_.last_conv.0.weight: file (256, 256, 1, 1) vs model (256, 256, 3, 3)" in msg


def test_rejects_mixed_prefix(tmp_path):
    sd = _random_model().state_dict()
    sd = {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(sd.items())}
    torch.save(sd, tmp_path / "mixed")
    with pytest.raises(CheckpointError, match="mixes two models"):
        load_crm(str(tmp_path / "mixed"))


def test_from_checkpoint_refines(tmp_path):
    net = _random_model()
    save_crm(net, str(tmp_path / "w.pth"))
    refiner = CRMRefiner.from_checkpoint(str(tmp_path / "w.pth"))
    out = refiner.refine(np.zeros((9, 11, 3), np.uint8), np.full((9, 11), 255, np.uint8))
    assert out.shape == (9, 11) and out.dtype == np.float32


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_rejects_non_finite_weights(tmp_path, value):
    model = _random_model()
    with torch.no_grad():
        model.imnet.layers[-1].weight[0, 0] = value
    for half in (False, True):
        path = tmp_path / f"bad_{half}.pth"
        save_crm(model, str(path), half=half)
        with pytest.raises(CheckpointError, match=r"NaN or infinite weights .*imnet\.layers"):
            load_crm(str(path))
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_crm(str(tmp_path / "plain.pth"))
