"""Refinement network modules: CRM and CascadePSP (no detectron2 needed)."""

from .backbone import BasicBlock, Bottleneck, ResNetTrunk
from .cascadepsp import (
    CASCADEPSP_ARCH,
    CASCADEPSP_TINY_ARCH,
    CascadePSPArch,
    CascadePSPNet,
)
from .crm import OFFICIAL_ARCH, TINY_ARCH, CRMArch, CRMNet, FeatureFusion, ImplicitMLP, make_coord

__all__ = [
    "CASCADEPSP_ARCH",
    "CASCADEPSP_TINY_ARCH",
    "OFFICIAL_ARCH",
    "TINY_ARCH",
    "BasicBlock",
    "Bottleneck",
    "CRMArch",
    "CRMNet",
    "CascadePSPArch",
    "CascadePSPNet",
    "FeatureFusion",
    "ImplicitMLP",
    "ResNetTrunk",
    "make_coord",
]
