"""What the network refiners share: a frozen network on a device.

:class:`~crm_d2.inference.CRMRefiner` and :class:`~crm_d2.cascadepsp.CascadePSPRefiner` keep
their network in eval mode without gradients, move it with :meth:`FrozenNetwork.to` (the
detectron2 wrapper follows its inner model's device this way) and expose its architecture.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .modeling.fused import clear_folded

__all__ = ["FrozenNetwork"]


class FrozenNetwork:
    """Base of the network refiners: ``self.model`` frozen on ``self.device``."""

    device: torch.device
    model: nn.Module

    def _freeze(self, model: nn.Module, device: torch.device) -> None:
        self.device = device
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def to(self, device: torch.device | str) -> Any:
        """Move the network to ``device`` and compute there from now on (returns self)."""
        self.device = torch.device(device)
        self.model.to(self.device)
        clear_folded(self.model)  # the folded inference weights of the old device
        return self

    @property
    def arch(self) -> Any:
        """The network's architecture record (``model.arch``)."""
        return self.model.arch
