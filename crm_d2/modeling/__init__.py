"""CRM network modules (no detectron2 needed)."""

from .backbone import BasicBlock, Bottleneck, ResNetTrunk
from .crm import OFFICIAL_ARCH, TINY_ARCH, CRMArch, CRMNet, FeatureFusion, ImplicitMLP, make_coord

__all__ = [
    "OFFICIAL_ARCH",
    "TINY_ARCH",
    "BasicBlock",
    "Bottleneck",
    "CRMArch",
    "CRMNet",
    "FeatureFusion",
    "ImplicitMLP",
    "ResNetTrunk",
    "make_coord",
]
