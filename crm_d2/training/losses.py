"""CRM training loss (CRM, Shen et al. CVPR 2022, §3).

Shape shorthand: B = batch, C = channels, H, W = target size. ``logit`` and ``gt`` are
(B, 1, H, W) float tensors; ``gt`` holds soft ground truth in [0, 1].

loss = ce * BCEWithLogits(logit, gt > 0.5) + l1 * L1(p, gt) + l2 * MSE(p, gt)
       + grad * L1(sobel(gt), sobel(p)),  with p = sigmoid(logit).

The weights of the released model (authors' README command) are the defaults.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["SOBEL_EPS", "crm_loss", "sobel_magnitude"]

SOBEL_EPS = 1e-4

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


def crm_loss(
    logit: torch.Tensor,
    gt: torch.Tensor,
    ce: float = 1.0,
    l1: float = 0.5,
    l2: float = 0.5,
    grad: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted CRM training loss.

    Args:
        logit: (B, 1, H, W) raw network output.
        gt: (B, 1, H, W) soft ground truth in [0, 1]; the cross-entropy target is gt > 0.5.
        ce, l1, l2, grad: term weights (released model: 1.0, 0.5, 0.5, 2.0).

    Returns:
        (total, terms): ``total`` is the weighted scalar sum; ``terms`` maps "ce", "l1", "l2",
        "grad" to the UNWEIGHTED scalar terms (means over all pixels), for logging.
    """
    if logit.shape != gt.shape:
        raise ValueError(
            f"logit and gt must have the same shape, got {tuple(logit.shape)} and {tuple(gt.shape)}"
        )
    if logit.dim() != 4:
        raise ValueError(f"crm_loss expects (B, 1, H, W) tensors, got shape {tuple(logit.shape)}")
    gt = gt.to(logit.dtype)
    p = torch.sigmoid(logit)
    terms = {
        "ce": F.binary_cross_entropy_with_logits(logit, (gt > 0.5).to(logit.dtype)),
        "l1": F.l1_loss(p, gt),
        "l2": F.mse_loss(p, gt),
        "grad": F.l1_loss(sobel_magnitude(gt), sobel_magnitude(p)),
    }
    total = ce * terms["ce"] + l1 * terms["l1"] + l2 * terms["l2"] + grad * terms["grad"]
    return total, terms
