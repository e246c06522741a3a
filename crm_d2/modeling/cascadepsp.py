"""CascadePSP refinement network (Cheng et al., CVPR 2020).

A ResNet trunk reads the image, the coarse mask and two intermediate masks (6 channels), a
pyramid pooling module (PSP, Zhao et al. CVPR 2017) summarises its stride-8 output, and three
upsampling blocks bring the features back to full resolution with skips from the trunk (layer1
output and the raw stem convolution) and from the RGB input. Heads predict logits at strides
8 (``final_28``), 4 (``final_56``) and 1 (``final_11`` + ``final_21``).

One forward runs the paper's 3-level cascade (Sec. 3.1, Fig. 3): level 1 refines at stride 8
from ``[img, seg, seg, seg]``; level 2 from ``[img, seg, s8, s8]`` gives new stride-8 and
stride-4 outputs; level 3 from ``[img, seg, s8', s4]`` gives the full-resolution output.
Intermediate outputs are fed on as ``tanh`` of the upsampled logits. The local step of the
paper's inference passes its own stride-8 (or stride-8 and stride-4) inputs and starts at a
later level.

Module and attribute names follow the public release (github.com/hkchengrex/CascadePSP, MIT)
so that its checkpoint (426 keys, 67,683,433 parameters, ``module.`` prefix) loads strictly.

Shape shorthand: B batch; H, W input size, multiples of 8 (the inference pads to them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .backbone import ResNetTrunk

__all__ = [
    "CASCADEPSP_ARCH",
    "CASCADEPSP_TINY_ARCH",
    "CascadePSPArch",
    "CascadePSPNet",
    "CascadePSPTrunk",
    "PSPModule",
    "PSPUpsample",
]


@dataclass(frozen=True)
class CascadePSPArch:
    """Architecture of a CascadePSP network. The defaults are the released ResNet-50 model.

    Attributes:
        block: trunk block type, ``"bottleneck"`` (ResNet-50) or ``"basic"``.
        layers: blocks per ResNet stage.
        width: stem channels (64 for ResNet-50).
        psp_sizes: output sizes of the PSP module's average poolings.
        psp_dim: channels after the PSP bottleneck (1024 released).
        up_dims: output channels of the three upsampling blocks (512, 256, 32 released).
        head_dim: hidden channels of the stride-8 / stride-4 heads and of ``final_11`` (32).
    """

    block: str = "bottleneck"
    layers: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    psp_sizes: tuple[int, ...] = (1, 2, 3, 6)
    psp_dim: int = 1024
    up_dims: tuple[int, ...] = (512, 256, 32)
    head_dim: int = 32

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("layers", "psp_sizes", "up_dims"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CascadePSPArch:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown CascadePSP architecture fields {sorted(unknown)}")
        d = dict(d)
        for key in ("layers", "psp_sizes", "up_dims"):
            if key in d:
                d[key] = tuple(int(v) for v in d[key])
        return cls(**d)


#: The released model (ResNet-50 trunk).
CASCADEPSP_ARCH = CascadePSPArch()

#: A very small CascadePSP (one basic block per stage, narrow heads) for tests and plumbing.
CASCADEPSP_TINY_ARCH = CascadePSPArch(
    block="basic", layers=(1, 1, 1, 1), width=8, psp_dim=32, up_dims=(16, 16, 8), head_dim=8
)


class CascadePSPTrunk(ResNetTrunk):
    """The ResNet trunk of :class:`~crm_d2.modeling.backbone.ResNetTrunk` with a 6-channel stem
    and CascadePSP's taps: layer4 is run (dilation 4, still stride 8).

    Forward returns ``(f, f_1, f_2)``:

    - ``f``: (B, C4, H/8, W/8), the layer4 output;
    - ``f_1``: (B, width, H/2, W/2), the stem convolution output BEFORE its BatchNorm;
    - ``f_2``: (B, C1, H/4, W/4), the layer1 output.
    """

    def __init__(self, block: str, layers: Sequence[int], width: int) -> None:
        super().__init__(block, layers, width, in_chans=6, with_layer4=True)
        expansion = self.layer1[0].expansion
        #: channels of (f, f_1, f_2)
        self.tap_channels = (width * 8 * expansion, width, width * expansion)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        """(B, 6, H, W) -> ``(f, f_1, f_2)`` (see the class docstring)."""
        f_1 = self.conv1(x)
        f_2 = self.layer1(self.maxpool(self.relu(self.bn1(f_1))))
        f = self.layer4(self.layer3(self.layer2(f_2)))
        return f, f_1, f_2


class PSPModule(nn.Module):
    """Pyramid pooling: average-pool to each size, 1x1 conv (no bias), upsample back
    (bilinear), concatenate with the input, 1x1 conv (with bias) + ReLU.

    (B, C, h, w) -> (B, out_features, h, w).
    """

    def __init__(self, features: int, out_features: int, sizes: Sequence[int]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(output_size=(s, s)),
                nn.Conv2d(features, features, kernel_size=1, bias=False),
            )
            for s in sizes
        )
        self.bottleneck = nn.Conv2d(features * (len(sizes) + 1), out_features, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, feats: Tensor) -> Tensor:
        size = feats.shape[-2:]
        priors = [
            F.interpolate(stage(feats), size=size, mode="bilinear", align_corners=False)
            for stage in self.stages
        ]
        return self.relu(self.bottleneck(torch.cat([*priors, feats], dim=1)))


def _bn_relu_conv_twice(cin: int, cout: int) -> nn.Sequential:
    """BN-ReLU-conv3x3 twice (pre-activation); indices 0..5 as in the release."""
    return nn.Sequential(
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
    )


class PSPUpsample(nn.Module):
    """Upsample by 2 and refine with a skip connection: two pre-activation residual units.

    ``x``: (B, x_channels, h, w); ``skip``: (B, skip_channels, 2h, 2w) ->
    (B, out_channels, 2h, 2w). The first unit sees ``cat(up(x), skip)`` and has a 1x1 shortcut
    from ``up(x)``; the second is an identity residual.
    """

    def __init__(self, x_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = _bn_relu_conv_twice(x_channels + skip_channels, out_channels)
        self.conv2 = _bn_relu_conv_twice(out_channels, out_channels)
        self.shortcut = nn.Conv2d(x_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        p = self.conv(torch.cat([x, skip], dim=1)) + self.shortcut(x)
        return p + self.conv2(p)


def _head(cin: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, hidden, kernel_size=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, 1, kernel_size=1),
    )


def _up(x: Tensor, factor: int) -> Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class CascadePSPNet(nn.Module):
    """The CascadePSP refinement module (see the module docstring).

    Args:
        arch: architecture (default: the released ResNet-50 model).
    """

    def __init__(self, arch: CascadePSPArch = CASCADEPSP_ARCH) -> None:
        super().__init__()
        self.arch = arch
        self.feats = CascadePSPTrunk(arch.block, arch.layers, arch.width)
        c4, c_stem, c1 = self.feats.tap_channels
        u1, u2, u3 = arch.up_dims
        self.psp = PSPModule(c4, arch.psp_dim, arch.psp_sizes)
        self.up_1 = PSPUpsample(arch.psp_dim, c1, u1)
        self.up_2 = PSPUpsample(u1, c_stem, u2)
        self.up_3 = PSPUpsample(u2, 3, u3)
        self.final_28 = _head(arch.psp_dim, arch.head_dim)
        self.final_56 = _head(u1, arch.head_dim)
        self.final_11 = nn.Conv2d(u3 + 3, arch.head_dim, kernel_size=1)
        self.final_21 = nn.Conv2d(arch.head_dim, 1, kernel_size=1)

    def _encode(self, img: Tensor, seg: Tensor, a: Tensor, b: Tensor):
        f, f_1, f_2 = self.feats(torch.cat((img, seg, a, b), dim=1))
        return self.psp(f), f_1, f_2

    def forward(
        self,
        img: Tensor,
        seg: Tensor,
        inter_s8: Tensor | None = None,
        inter_s4: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Run the cascade from the level the given inputs allow.

        Args:
            img: (B, 3, H, W) ImageNet-normalised image, H and W multiples of 8.
            seg: (B, 1, H, W) coarse mask in [-1, 1].
            inter_s8: (B, 1, H, W) stride-8 input in [-1, 1] (the tanh of an upsampled logit, or
                a probability mapped to [-1, 1]); given, level 1 is skipped.
            inter_s4: (B, 1, H, W) stride-4 input; given with ``inter_s8``, level 2 is skipped
                as well (``inter_s8`` then stands for level 2's stride-8 output).

        Returns:
            A dict of (B, 1, H, W) maps from the last level: ``"logit"`` (full-resolution logit),
            ``"pred"`` (its sigmoid), ``"pred_s8"`` and ``"pred_s4"`` (sigmoids of the
            upsampled stride-8 and stride-4 logits of level 3).
        """
        if inter_s8 is None:
            p, _, _ = self._encode(img, seg, seg, seg)
            inter_s8 = torch.tanh(_up(self.final_28(p), 8))
        if inter_s4 is None:
            p, _, f_2 = self._encode(img, seg, inter_s8, inter_s8)
            s8_2 = torch.tanh(_up(self.final_28(p), 8))
            s4 = torch.tanh(_up(self.final_56(self.up_1(p, f_2)), 4))
        else:
            s8_2, s4 = inter_s8, inter_s4
        p, f_1, f_2 = self._encode(img, seg, s8_2, s4)
        logit_s8 = _up(self.final_28(p), 8)
        p = self.up_1(p, f_2)
        logit_s4 = _up(self.final_56(p), 4)
        p = self.up_3(self.up_2(p, f_1), img)
        logit = self.final_21(F.relu(self.final_11(torch.cat([p, img], dim=1))))
        return {
            "logit": logit,
            "pred": torch.sigmoid(logit),
            "pred_s8": torch.sigmoid(logit_s8),
            "pred_s4": torch.sigmoid(logit_s4),
        }
