"""CRM training loss (CRM, Shen et al. CVPR 2022, §3).

Shape shorthand: B = batch, C = channels, H, W = target size. ``logit`` and ``gt`` are
(B, 1, H, W) float tensors; ``gt`` holds soft ground truth in [0, 1].

loss = ce * BCEWithLogits(logit, gt > 0.5) + l1 * L1(p, gt) + l2 * MSE(p, gt)
       + grad * L1(sobel(gt), sobel(p)),  with p = sigmoid(logit).

The weights of the released model (authors' README command) are the defaults.

Optional boundary emphasis (``boundary > 0``, not part of the paper's recipe): the CE, L1 and L2
terms become weighted means with per-pixel weight ``1 + boundary`` within ``BOUNDARY_RADIUS``
pixels of the ground-truth boundary and 1 elsewhere. Most pixels of a crop are far from any
edge and trivially right; weighting the uncertain ones is the idea behind PointRend's training
points (Kirillov et al., "PointRend", CVPR 2020, §3.3), here applied to a dense loss. It is meant
for short training budgets, where the plain mean lets the network settle for smooth edges.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..band import boundary_band

__all__ = ["BOUNDARY_RADIUS", "SOBEL_EPS", "boundary_weights", "crm_loss", "sobel_magnitude"]

SOBEL_EPS = 1e-4
#: Half-width in pixels of the ground-truth boundary band that ``boundary`` weights.
BOUNDARY_RADIUS = 4

_KX = (((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0)),)
_KY = (((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0)),)


def sobel_magnitude(x: torch.Tensor, eps: float = SOBEL_EPS) -> torch.Tensor:
    """Smoothed Sobel gradient magnitude, as the authors' ``SobelOperator``.

    Each channel is first smoothed by a 3x3 mean filter (``avg_pool2d`` stride 1, padding 1,
    ``count_include_pad=True``, i.e. zeros outside the image count in the mean), then
    correlated with kx = [[1,0,-1],[2,0,-2],[1,0,-1]]/4 and ky = [[1,2,1],[0,0,0],[-1,-2,-1]]/4
    with zero padding 1, and the magnitude is sqrt(gx^2 + gy^2 + eps). On a constant map the
    interior value is sqrt(eps) (0.01 for the default eps); the zero padding makes the one- and
    two-pixel border respond to the image edge, as in the original.

    Args:
        x: (B, C, H, W) float tensor.
        eps: added under the square root (keeps the gradient finite at 0).

    Returns:
        (B, C, H, W) tensor of magnitudes >= sqrt(eps).
    """
    if x.dim() != 4:
        raise ValueError(f"sobel_magnitude expects (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    flat = x.reshape(b * c, 1, h, w)
    smooth = F.avg_pool2d(flat, kernel_size=3, stride=1, padding=1, count_include_pad=True)
    kernels = torch.tensor((_KX, _KY), dtype=x.dtype, device=x.device) / 4.0
    grads = F.conv2d(smooth, kernels, padding=1)
    mag = torch.sqrt(grads[:, 0:1] ** 2 + grads[:, 1:2] ** 2 + eps)
    return mag.reshape(b, c, h, w)


def boundary_weights(gt: torch.Tensor, boundary: float,
                     radius: int = BOUNDARY_RADIUS) -> torch.Tensor:
    """Per-pixel loss weights: ``1 + boundary`` near the boundary of ``gt > 0.5``, else 1.

    Args:
        gt: (B, 1, H, W) ground truth in [0, 1].
        boundary: extra weight of the band (0: all ones).
        radius: band half-width in pixels: pixels whose (2r+1)^2 window holds both sides.

    Returns:
        (B, 1, H, W) weights, same dtype as ``gt``.
    """
    if int(radius) < 1:
        return torch.ones_like(gt)
    band = boundary_band(gt[:, 0] > 0.5, int(radius))[:, None]
    return 1.0 + float(boundary) * band.to(gt.dtype)


def crm_loss(
    logit: torch.Tensor,
    gt: torch.Tensor,
    ce: float = 1.0,
    l1: float = 0.5,
    l2: float = 0.5,
    grad: float = 2.0,
    boundary: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted CRM training loss.

    Args:
        logit: (B, 1, H, W) raw network output.
        gt: (B, 1, H, W) soft ground truth in [0, 1]; the cross-entropy target is gt > 0.5.
        ce, l1, l2, grad: term weights (released model: 1.0, 0.5, 0.5, 2.0).
        boundary: extra per-pixel weight of the CE, L1 and L2 terms within
            :data:`BOUNDARY_RADIUS` px of the ground-truth boundary (0: the paper's loss).

    Returns:
        (total, terms): ``total`` is the weighted scalar sum; ``terms`` maps "ce", "l1", "l2",
        "grad" to the scalar terms before the term weights (per-pixel means; with ``boundary``
        the CE, L1 and L2 means are weighted by :func:`boundary_weights`), for logging.
    """
    if boundary < 0:
        raise ValueError(f"boundary must be >= 0, got {boundary}")
    if logit.shape != gt.shape:
        raise ValueError(
            f"logit and gt must have the same shape, got {tuple(logit.shape)} and {tuple(gt.shape)}"
        )
    if logit.dim() != 4:
        raise ValueError(f"crm_loss expects (B, 1, H, W) tensors, got shape {tuple(logit.shape)}")
    gt = gt.to(logit.dtype)
    p = torch.sigmoid(logit)
    target = (gt > 0.5).to(logit.dtype)
    w = boundary_weights(gt, boundary) if boundary > 0 else None

    def mean(x: torch.Tensor) -> torch.Tensor:
        return x.mean() if w is None else (w * x).sum() / w.sum()

    ce_map = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
    terms = {
        "ce": mean(ce_map),
        "l1": mean((p - gt).abs()),
        "l2": mean((p - gt) ** 2),
        "grad": F.l1_loss(sobel_magnitude(gt), sobel_magnitude(p)),
    }
    total = ce * terms["ce"] + l1 * terms["l1"] + l2 * terms["l2"] + grad * terms["grad"]
    return total, terms
