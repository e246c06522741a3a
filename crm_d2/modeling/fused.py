"""Convolution + batch norm, fused at inference on channels-last tensors.

``conv_bn(x, conv, bn)`` is ``bn(conv(x))``. In eval mode, without autograd, on a channels-last
input (the fast inference path, :class:`crm_d2.sparse.FastOptions` ``channels_last``) it runs
as one operation: the batch norm is folded into the convolution's weights and bias (the
standard inference rewrite, as PyTorch's ``torch.nn.utils.fusion.fuse_conv_bn_eval``), and a
1x1 convolution of stride 1 becomes a matrix product over the channels-last rows
(``F.linear`` on the ``(B, H, W, C)`` view). On CPU this skips oneDNN's per-input-shape
convolution set-up, which dominated the time of small ROIs of many different sizes
(BENCHMARKS.md, issue 11), and one pass over the activations (the batch norm).

Everywhere else (training, contiguous tensors, hence the authors' arithmetic of ``exact=True``)
it is the plain ``bn(conv(x))``. The two agree to float rounding (~1e-6 relative in float32;
under bf16 / fp16 autocast to that precision).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["clear_folded", "conv_bn", "fold_conv_bn", "is_channels_last"]


def is_channels_last(x: torch.Tensor) -> bool:
    """``x`` is a 4-D tensor in channels-last layout (and not also plain contiguous)."""
    return (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous())


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(.))`` as one convolution (eval-mode statistics).

    Cached on ``bn`` and recomputed whenever any of the tensors involved is replaced (moved,
    re-laid-out, reloaded) or changed in place (its version counter). Writes through ``.data``
    bypass the version counter: call :func:`clear_folded` after them.
    """
    tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    # inference-mode tensors have no version counter (and cannot change outside that mode)
    key = tuple(None if t is None else (t.data_ptr(), -1 if t.is_inference() else t._version)
                for t in tensors)
    cached = getattr(bn, "_crm_folded", None)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    if conv.kernel_size != (1, 1):
        weight = weight.contiguous(memory_format=torch.channels_last)
    bn._crm_folded = (key, weight, bias)
    return weight, bias


def clear_folded(module: nn.Module) -> None:
    """Drop the folded weights cached by :func:`fold_conv_bn` in ``module`` and below."""
    for m in module.modules():
        if hasattr(m, "_crm_folded"):
            del m._crm_folded


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv(x))``; fused in eval mode under ``no_grad`` on channels-last ``x`` (see above).

    Args:
        x: (B, C_in, H, W).
        conv: a convolution with ``C_in`` input channels (zero padding).
        bn: batch norm over ``conv``'s output channels.

    Returns:
        (B, C_out, H', W'), channels-last when ``x`` is.
    """
    if (conv.training or bn.training or not is_channels_last(x) or torch.is_grad_enabled()
            or not (bn.track_running_stats and bn.affine) or conv.padding_mode != "zeros"):
        return bn(conv(x))
    weight, bias = fold_conv_bn(conv, bn)
    one_by_one = (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1
                  and conv.padding == (0, 0))
    if one_by_one:
        rows = x.permute(0, 2, 3, 1)  # (B, H, W, C_in), a contiguous view
        out = F.linear(rows, weight.flatten(1).to(rows.dtype), bias.to(rows.dtype))
        return out.permute(0, 3, 1, 2)  # (B, C_out, H, W), channels-last
    return F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype), conv.stride, conv.padding,
                    conv.dilation, conv.groups)
