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

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from .inference import IMAGENET_MEAN, IMAGENET_STD, check_batch, prepare_inputs

__all__ = ["GuidedFilterRefiner", "guide_channel", "guided_filter"]

DEFAULT_RADIUS = 4
DEFAULT_EPS = 1e-2
#: pixels per tile of :func:`guided_filter` (256 x 256: constant tiles are skipped)
MAX_PIXELS = 1 << 16


def _box(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean of ``x`` over the (2r+1)^2 window of each pixel, clipped to the image.

    Separable window sums (2r+1 shifted views of a zero padding added along each axis), divided
    by the number of in-image pixels of each window: the box filter of the paper's Algorithm 1,
    equal to ``avg_pool2d(count_include_pad=False)`` to float rounding and several times faster
    on a CPU.
    """
    h, w = x.shape[-2:]
    rows = F.pad(x, (0, 0, r, r))
    s = rows[..., 0:h, :].clone()
    for k in range(1, 2 * r + 1):
        s += rows[..., k:k + h, :]
    cols = F.pad(s, (r, r))
    s = cols[..., 0:w].clone()
    for k in range(1, 2 * r + 1):
        s += cols[..., k:k + w]

    def count(n: int) -> torch.Tensor:
        i = torch.arange(n, device=x.device)
        return ((i + r).clamp(max=n - 1) - (i - r).clamp(min=0) + 1).to(x.dtype)

    return s.div_(count(h)[:, None] * count(w)[None, :])


def _solve_sym3(s: tuple[torch.Tensor, ...], v: torch.Tensor) -> torch.Tensor:
    """Solve ``S a = v`` per pixel for symmetric positive-definite 3x3 ``S``.

    Args:
        s: the six planes (B, H, W) of ``S``: s00, s01, s02, s11, s12, s22.
        v: (B, 3, H, W).

    Returns:
        (B, 3, H, W) in ``v``'s dtype: ``adj(S) v / det(S)`` with the cofactors written out,
        elementwise on the image planes instead of a batched LU of H*W tiny matrices; in
        float64, because for a grey (rank-1) guide ``S`` is nearly ``eps I`` plus a rank-1 term
        and the cofactors cancel (float32 lost 2e-5 at eps 1e-3 and 0.2 at eps 1e-5).
    """
    dtype = v.dtype
    a, b, c, d, e, f = (x.double() for x in s)
    v = v.double()
    c00, c01, c02 = d * f - e * e, c * e - b * f, b * e - c * d
    c11, c12, c22 = a * f - c * c, b * c - a * e, a * d - b * b
    det = a * c00 + b * c01 + c * c02
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    return torch.stack((c00 * x + c01 * y + c02 * z,
                        c01 * x + c11 * y + c12 * z,
                        c02 * x + c12 * y + c22 * z), dim=1).div_(det[:, None]).to(dtype)


#: the (i, j) entries of the guide's 3x3 covariance that are computed (it is symmetric)
_PAIRS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))


def _filter(guide: torch.Tensor, src: torch.Tensor, r: int, eps: float) -> torch.Tensor:
    """The guided filter of one block: Algorithm 1 of He et al. with a colour guide."""
    prods = [guide[:, i] * guide[:, j] for i, j in _PAIRS]
    means = _box(torch.cat((guide, src, guide * src, torch.stack(prods, dim=1)), dim=1), r)
    mean_i, mean_p, mean_ip = means[:, 0:3], means[:, 3:4], means[:, 4:7]
    cov_ip = mean_ip - mean_i * mean_p
    sigma = tuple(means[:, 7 + k] - mean_i[:, i] * mean_i[:, j] + (eps if i == j else 0.0)
                  for k, (i, j) in enumerate(_PAIRS))
    a = _solve_sym3(sigma, cov_ip)  # (B, 3, H, W)
    bias = mean_p - (a * mean_i).sum(dim=1, keepdim=True)
    ab = _box(torch.cat((a, bias), dim=1), r)
    return (ab[:, 0:3] * guide).sum(dim=1, keepdim=True) + ab[:, 3:4]


def guided_filter(guide: torch.Tensor, src: torch.Tensor, radius: int = DEFAULT_RADIUS,
                  eps: float = DEFAULT_EPS, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Colour guided filter (He et al. 2010, Algorithm 1 with a 3-channel guide).

    Args:
        guide: (B, 3, H, W) float guide image, RGB in [0, 1].
        src: (B, 1, H, W) float input to filter.
        radius: window radius r (window (2r+1)^2); the window is clipped to the image.
        eps: ridge regulariser (in the guide's units squared).
        max_pixels: larger inputs (batch included) are filtered in square tiles of about
            this many pixels, with the same result, so that peak memory follows the tile.

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
    b, _, h, w = guide.shape
    side = max(8 * r, math.isqrt(max(1, int(max_pixels) // b)))
    if h * w <= side * side:
        return _filter(guide, src, r, eps)
    # Tiles with a 2r halo give the whole-image answer (each output pixel reads the window
    # means of its (2r+1)^2 window, which read the guide within 2r): peak memory follows the
    # tile. Where ``src`` is constant over a tile and its halo, the filter returns that
    # constant (cov(I, p) = 0 there), so the tile is copied: a mask's filter costs its boundary.
    out = src.clone()
    for y0 in range(0, h, side):
        for x0 in range(0, w, side):
            y1, x1 = min(h, y0 + side), min(w, x0 + side)
            a0, a1 = max(0, y0 - 2 * r), min(h, y1 + 2 * r)
            b0, b1 = max(0, x0 - 2 * r), min(w, x1 + 2 * r)
            block = src[:, :, a0:a1, b0:b1]
            if bool((block == block[:, :, :1, :1]).all()):
                continue
            part = _filter(guide[:, :, a0:a1, b0:b1], block, r, eps)
            out[:, :, y0:y1, x0:x1] = part[:, :, y0 - a0:y1 - a0, x0 - b0:x1 - b0]
    return out


def filter_normalized(image: torch.Tensor, mask: torch.Tensor, radius: int = DEFAULT_RADIUS,
                      eps: float = DEFAULT_EPS) -> torch.Tensor:
    """The guided filter of CRM's inputs, clipped to probabilities.

    Args:
        image: (B, 3, H, W) ImageNet-normalised float (:func:`~crm_d2.inference.normalize_image`).
        mask: (B, 1, H, W) coarse mask in [-1, 1] (:func:`~crm_d2.inference.normalize_mask`).

    Returns:
        (B, 1, H, W) float32 probabilities in [0, 1] on ``image``'s device.
    """
    image = image.float()
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(1, 3, 1, 1)
    prob = (mask.to(image.device, torch.float32) + 1) / 2
    return guided_filter(image * std + mean, prob, radius, eps).clamp_(0, 1)


@torch.no_grad()
def guide_channel(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What a :attr:`~crm_d2.modeling.crm.CRMArch.guided_skip` CRM reads besides the image and
    mask: the baseline guided filter (radius 4, eps 1e-2) of the coarse mask, in CRM's mask
    range [-1, 1]. Same inputs as :func:`filter_normalized`; returns (B, 1, H, W) float32.
    """
    return filter_normalized(image, mask).mul_(2).sub_(1)


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
        out = filter_normalized(image.to(self.device), mask, self.radius, self.eps)
        if progress is not None:
            progress("guided filter", 1, 1)
        return out[:, 0]
