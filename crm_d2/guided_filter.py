"""A training-free refiner: the colour guided filter of the coarse mask, guided by the image.

He, Sun & Tang, "Guided Image Filtering" (ECCV 2010; TPAMI 2013), colour-guide version: in every
(2r+1) x (2r+1) window the output is an affine function of the RGB guide, ``q = a^T I + b``,
fitted to the coarse probabilities ``p`` by ridge regression with regulariser ``eps``; ``a`` and
``b`` are then averaged over the windows covering each pixel. Edges of ``p`` snap to colour
edges of the image, which is the soft-edge step of Aksoy et al., "Semantic Soft Segmentation"
(SIGGRAPH 2018, supplement). It is the baseline row of every crm_d2 evaluation.

The guide is RGB in [0, 1] and ``p`` a probability in [0, 1]; ``eps`` is on that scale (the
default 1e-2 and radius 4 are the baseline's). Window means use only the pixels inside the
image (``avg_pool2d(count_include_pad=False)``, the normalisation by ``N`` of the paper's
box-filter algorithm). Output probabilities are clipped to [0, 1].

:class:`GuidedFilterRefiner` has the interface of :class:`~crm_d2.inference.CRMRefiner`
(``refine`` on numpy arrays, ``refine_tensors`` on the normalised batches of
:func:`~crm_d2.segments.refine_segments`), so every path that takes a refiner takes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from .inference import IMAGENET_MEAN, IMAGENET_STD, check_batch, prepare_inputs

__all__ = ["GuidedFilterRefiner", "guided_filter"]

DEFAULT_RADIUS = 4
DEFAULT_EPS = 1e-2


def _box(x: torch.Tensor, r: int) -> torch.Tensor:
    return F.avg_pool2d(x, 2 * r + 1, stride=1, padding=r, count_include_pad=False)


def guided_filter(guide: torch.Tensor, src: torch.Tensor, radius: int = DEFAULT_RADIUS,
                  eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Colour guided filter (He et al. 2010, Algorithm 1 with a 3-channel guide).

    Args:
        guide: (B, 3, H, W) float guide image, RGB in [0, 1].
        src: (B, 1, H, W) float input to filter.
        radius: window radius r (window (2r+1)^2); the window is clipped to the image.
        eps: ridge regulariser (in the guide's units squared).

    Returns:
        (B, 1, H, W) filtered ``src`` (float32, not clipped).
    """
    if guide.ndim != 4 or guide.shape[1] != 3 or src.ndim != 4 or src.shape[1] != 1:
        raise ValueError(f"guide must be (B, 3, H, W) and src (B, 1, H, W), got "
                         f"{tuple(guide.shape)} and {tuple(src.shape)}")
    if guide.shape[0] != src.shape[0] or guide.shape[-2:] != src.shape[-2:]:
        raise ValueError(f"guide {tuple(guide.shape)} and src {tuple(src.shape)} differ in size")
    if radius < 1 or not eps > 0:
        raise ValueError(f"need radius >= 1 and eps > 0, got radius={radius}, eps={eps}")
    guide, src = guide.float(), src.float()
    r = min(int(radius), max(guide.shape[-2:]))
    mean_i = _box(guide, r)  # (B, 3, H, W)
    mean_p = _box(src, r)
    cov_ip = _box(guide * src, r) - mean_i * mean_p
    # 3x3 covariance of the guide in each window, as (B, H, W, 3, 3)
    pairs = guide[:, :, None] * guide[:, None, :]  # (B, 3, 3, H, W)
    b, _, h, w = guide.shape
    corr = _box(pairs.reshape(b, 9, h, w), r).reshape(b, 3, 3, h, w)
    sigma = corr - mean_i[:, :, None] * mean_i[:, None, :]
    sigma = sigma.permute(0, 3, 4, 1, 2) + eps * torch.eye(3, device=guide.device)
    a = torch.linalg.solve(sigma, cov_ip.permute(0, 2, 3, 1).unsqueeze(-1)).squeeze(-1)
    a = a.permute(0, 3, 1, 2)  # (B, 3, H, W)
    bias = mean_p - (a * mean_i).sum(dim=1, keepdim=True)
    return (_box(a, r) * guide).sum(dim=1, keepdim=True) + _box(bias, r)


class GuidedFilterRefiner:
    """The guided filter behind the CRM refiner's interface (no weights, no training).

    Example::

        refiner = GuidedFilterRefiner(device="cpu")
        prob = refiner.refine(image_rgb_uint8, coarse_mask_uint8)  # HxW float32 in [0, 1]

    Args:
        radius: window radius (default 4).
        eps: regulariser (default 1e-2, guide in [0, 1]).
        device: torch device of the computation.
    """

    kind = "guided_filter"
    #: one pass, no input scales; kept so callers that log ``refiner.scales`` work
    scales: tuple[float, ...] = (1.0,)

    def __init__(self, radius: int = DEFAULT_RADIUS, eps: float = DEFAULT_EPS,
                 device: torch.device | str = "cpu") -> None:
        if int(radius) < 1 or not float(eps) > 0:
            raise ValueError(f"need radius >= 1 and eps > 0, got radius={radius}, eps={eps}")
        self.radius = int(radius)
        self.eps = float(eps)
        self.device = torch.device(device)
        self.metadata: dict[str, Any] = {"format": "guided_filter", "radius": self.radius,
                                         "eps": self.eps}

    @classmethod
    def from_checkpoint(cls, path: str | None = None, device: torch.device | str = "cpu",
                        **kwargs) -> GuidedFilterRefiner:
        """The refiner factory's entry point: the guided filter has no weights (``path`` must be
        None); ``kwargs`` are ``radius`` and ``eps``."""
        if path is not None:
            raise ValueError(f"the guided filter takes no weights, got {path!r}")
        return cls(device=device, **kwargs)

    def settings_record(self) -> dict[str, Any]:
        """What of the refiner shapes its outputs (crm-eval's resume cache and reports)."""
        return {"refiner": "guided_filter", "radius": self.radius, "eps": self.eps}

    def __repr__(self) -> str:
        return f"GuidedFilterRefiner(radius={self.radius}, eps={self.eps:g})"

    def to(self, device: torch.device | str) -> GuidedFilterRefiner:
        """Compute on ``device`` from now on (returns self)."""
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def refine(self, image: np.ndarray, mask: np.ndarray,
               scales: Sequence[float] | None = None, exact: bool = False,
               progress=None) -> np.ndarray:
        """Filter one coarse mask; same inputs and output as :meth:`CRMRefiner.refine`.

        ``scales`` and ``exact`` are accepted for interface compatibility and ignored (the
        filter has one pass and one implementation).
        """
        img_t, msk_t = prepare_inputs(image, mask, self.device)
        return self.refine_tensors(img_t, msk_t)[0].cpu().numpy()

    @torch.no_grad()
    def refine_tensors(self, image: torch.Tensor, mask: torch.Tensor,
                       scales: Sequence[float] | None = None, exact: bool = False,
                       progress=None) -> torch.Tensor:
        """Filter a batch: ImageNet-normalised (B, 3, H, W) images, (B, 1, H, W) masks in
        [-1, 1] (CRM's input convention) -> (B, H, W) probabilities in [0, 1]."""
        check_batch(image, mask)
        image = image.to(self.device, torch.float32)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        rgb = image * std + mean
        prob = (mask.to(self.device, torch.float32) + 1) / 2
        out = guided_filter(rgb, prob, self.radius, self.eps)
        if progress is not None:
            progress("guided filter", 1, 1)
        return out.clamp_(0, 1)[:, 0]
