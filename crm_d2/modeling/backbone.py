"""ResNet trunk of CRM: a 4-channel stem (RGB + mask) and a dilated, output-stride-8 layer3.

Attribute names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1..4``,
``downsample.0/1``) because the official CRM checkpoint stores them that way.

Shape shorthand: B batch, H/W input size. The trunk returns three taps:

- ``x1``: (B, C1, ~H/2, ~W/2), the stem after BN + ReLU (before the max-pool);
- ``x2``: (B, C2, ~H/4, ~W/4), the output of layer1;
- ``x3``: (B, C3, ~H/8, ~W/8), the output of layer3 (dilated, still stride 8).

``layer4`` exists only so that official checkpoints load with strict key matching; CRM's
official forward computes it and discards the result, so we never run it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .fused import conv_bn

__all__ = ["BasicBlock", "Bottleneck", "ResNetTrunk"]


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1), stride and dilation on the 3x3 conv."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else conv_bn(x, *self.downsample)
        out = self.relu(conv_bn(x, self.conv1, self.bn1))
        out = self.relu(conv_bn(out, self.conv2, self.bn2))
        out = conv_bn(out, self.conv3, self.bn3)
        return self.relu(out + identity)


class BasicBlock(nn.Module):
    """ResNet basic block (3x3 -> 3x3); used by the project's lighter encoders."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else conv_bn(x, *self.downsample)
        out = self.relu(conv_bn(x, self.conv1, self.bn1))
        out = conv_bn(out, self.conv2, self.bn2)
        return self.relu(out + identity)


_BLOCKS = {"bottleneck": Bottleneck, "basic": BasicBlock}


class ResNetTrunk(nn.Module):
    """The CRM encoder trunk.

    Args:
        block: ``"bottleneck"`` (ResNet-50, official) or ``"basic"`` (ResNet-18/34 style).
        layers: number of blocks in layer1..layer4, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
        width: channels of the stem; layer k has ``width * 2**(k-1)`` planes.
        in_chans: input channels (4 = RGB + mask).
        with_layer4: build layer4. It is never run; keep it for official checkpoints.
    """

    def __init__(
        self,
        block: str = "bottleneck",
        layers: Sequence[int] = (3, 4, 6, 3),
        width: int = 64,
        in_chans: int = 4,
        with_layer4: bool = True,
    ) -> None:
        super().__init__()
        if block not in _BLOCKS:
            raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {block!r}")
        if len(layers) != 4:
            raise ValueError(f"layers must list 4 block counts, got {tuple(layers)}")
        block_cls = _BLOCKS[block]
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block_cls, width, layers[0])
        self.layer2 = self._make_layer(block_cls, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block_cls, width * 4, layers[2], dilation=2)
        if with_layer4:
            self.layer4 = self._make_layer(block_cls, width * 8, layers[3], dilation=4)
        self.out_channels = (
            width,
            width * block_cls.expansion,
            width * 4 * block_cls.expansion,
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(
        self, block: type, planes: int, blocks: int, stride: int = 1, dilation: int = 1
    ) -> nn.Sequential:
        # As in the official code: the first block of a layer has dilation 1 (and the stride),
        # the following ones carry the layer's dilation.
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 4, H, W) -> taps ``(x1, x2, x3)`` (see the module docstring)."""
        x1 = self.relu(conv_bn(x, self.conv1, self.bn1))
        x2 = self.layer1(self.maxpool(x1))
        x3 = self.layer3(self.layer2(x2))
        return x1, x2, x3
