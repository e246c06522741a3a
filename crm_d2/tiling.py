"""Bounded-memory encoding: CRM's encoder on a window of the image, with a halo of context.

The decoder reads, for each pixel, the four feature cells around it; when only some pixels are
decoded (:mod:`crm_d2.sparse`) only those cells are needed. :func:`encode_window` computes the
decoder's projected features (:meth:`CRMNet.project_features`) of a window of feature cells by
running the trunk and the fusion on the window grown by ``halo`` input pixels, so that memory
and time follow the window, not the image. This is the tiling the CRM authors' follow-up work
applied to the fusion convolution (patches of the fused map), extended to the whole encoder.

Exactness: a window whose input crop covers the whole image gives :meth:`CRMNet.encode`'s
features (up to float rounding of the resize, ~1e-6). Elsewhere the convolutions see zero padding
at the crop border instead of the image; ``halo`` input pixels of context keep that away from the
window. The official ResNet-50 trunk's theoretical receptive-field radius is about 143 input
pixels (:func:`receptive_radius` gives it for any architecture), its effective one much smaller.

Alignment: crops start on multiples of 8 input pixels (the trunk's total stride), so that every
strided layer samples the same positions as on the whole image.

Shape shorthand: B batch, h/w encoder input size, fh/fw feature size (x1 grid, ~h/2), D the
decoder's first hidden width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .modeling.crm import CRMArch, CRMNet, trunk_input

__all__ = ["encode_window", "encoder_bytes_per_pixel", "feature_size", "receptive_radius",
           "tap_sizes"]

STRIDE = 8  # total stride of the trunk (x3)


def _conv_out(n: int) -> int:
    """Length after a stride-2 layer with 'same'-style padding (k3 p1 or k7 p3)."""
    return (n - 1) // 2 + 1


def tap_sizes(n: int) -> tuple[int, int, int]:
    """Sizes of the x1, x2, x3 taps on an axis of ``n`` input pixels."""
    n1 = _conv_out(n)
    n2 = _conv_out(n1)
    return n1, n2, _conv_out(n2)


def feature_size(size: tuple[int, int]) -> tuple[int, int]:
    """(fh, fw) of :meth:`CRMNet.encode` for an (h, w) input."""
    return tap_sizes(size[0])[0], tap_sizes(size[1])[0]


def receptive_radius(arch: CRMArch) -> int:
    """Theoretical receptive-field radius, in input pixels, of one fused feature cell."""
    if arch.encoder != "resnet":
        return _efficientnet_radius(arch.encoder)
    r, jump = 3, 2  # conv1 7x7 stride 2
    r, jump = r + jump, jump * 2  # maxpool 3x3 stride 2
    convs = 2 if arch.block == "basic" else 1  # 3x3 convs per block
    r += arch.layers[0] * convs * jump  # layer1
    r += jump  # layer2 first 3x3, stride 2
    jump *= 2
    r += (arch.layers[1] * convs - 1) * jump
    r += convs * jump  # layer3 block 0, dilation 1
    r += (arch.layers[2] - 1) * convs * 2 * jump  # dilation 2
    # the fusion's bilinear resize reads the next x3 sample; last_conv is 3x3 on the x1 grid
    return r + jump + 2


def _efficientnet_radius(variant: str) -> int:
    """:func:`receptive_radius` of the EfficientNet-Lite trunk: its depthwise convolutions."""
    from .modeling.efficientnet import efficientnet_convs

    r, jump = 0, 1
    for kernel, stride, dilation in efficientnet_convs(variant):
        r += (kernel // 2) * dilation * jump
        jump *= stride
    return r + jump + 2  # the fusion's resize and 3x3 conv, as for the ResNet trunk


def encoder_bytes_per_pixel(net: CRMNet, batch: int = 1, itemsize: int = 4) -> int:
    """Rough peak activation bytes of the encoder per input pixel (for tile sizing).

    Counts the live tensors at the fusion (three branch outputs, their concatenation and the
    last convolution, at stride 2) and the largest trunk stage, times a safety factor of 1.5.
    """
    c1, c2, c3 = net.feats.out_channels
    d = net.arch.feat_dim
    trunk = max(3 * c1 / 4, 3 * c2 / 16, 3 * c3 / 64 + c2 / 16)
    fusion = 3 * d / 4 + c2 / 16 + c3 / 64
    return int(math.ceil(1.5 * max(trunk, fusion) * itemsize * batch)) + 16 * batch


def _resize_axis(x: Tensor, dim: int, n_out: int, n_in: int, out0: int, out_len: int,
                 in0: int) -> Tensor:
    """Bilinear (align_corners=True) resize along ``dim`` of a window.

    The whole axis maps ``n_in`` -> ``n_out`` samples; ``x`` holds input samples ``in0:`` and the
    result holds output samples ``out0:out0 + out_len``. Indices outside the window are clamped.
    """
    dev = x.device
    out_idx = torch.arange(out0, out0 + out_len, device=dev, dtype=torch.float32)
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = out_idx * scale
    lo = src.floor()
    lam = src - lo  # float32
    lo = lo.long()
    hi = torch.clamp(lo + 1, max=n_in - 1)
    n_local = x.shape[dim]
    i0 = (lo - in0).clamp(0, n_local - 1)
    i1 = (hi - in0).clamp(0, n_local - 1)
    a = x.index_select(dim, i0)
    b = x.index_select(dim, i1)
    shape = [1] * x.dim()
    shape[dim] = out_len
    if x.dtype in (torch.float16, torch.bfloat16):  # the weights in float32, as F.interpolate
        return torch.lerp(a.float(), b.float(), lam.view(shape)).to(x.dtype)
    return torch.lerp(a, b, lam.to(x.dtype).view(shape))


def encode_window(
    net: CRMNet,
    image: Tensor,
    mask: Tensor,
    rows: tuple[int, int],
    cols: tuple[int, int],
    halo: int,
    stats=None,
    fixed_shape: bool = False,
    channels_last: bool | None = None,
    autocast_trunk: bool = True,
) -> Tensor:
    """Projected decoder features of feature cells ``rows x cols`` (half-open ranges).

    Args:
        net: the CRM network.
        image: (B, 3, h, w) normalised image at the encoder's input scale.
        mask: (B, 1, h, w) mask in [-1, 1] at the same scale.
        rows, cols: feature-cell ranges ``(a, b)`` of the window on the (fh, fw) grid.
        halo: input pixels of context around the window (rounded up to a multiple of 8).
        stats: optional object whose ``encoded_pixels`` attribute is increased by the number
            of input pixels the trunk ran on.
        fixed_shape: at the image border, shift the window inward (more context on the other
            side) instead of shrinking it, so that same-size windows have one input shape
            (the convolution backends set up work per shape: several times faster on CPU).
        channels_last: run the window in channels-last layout (None: the image's layout);
            only the window's crop is converted, not the whole image.
        autocast_trunk: see :meth:`CRMNet.trunk` (only matters under ``torch.autocast``).

    Returns:
        (B, rows[1] - rows[0], cols[1] - cols[0], D) = ``net.project_features(net.encode(image,
        mask))[:, ra:rb, ca:cb]`` up to the crop effects described in the module docstring.
    """
    h, w = image.shape[-2:]
    halo = int(math.ceil(max(halo, 0) / STRIDE) * STRIDE)
    (ra, rb), (ca, cb) = rows, cols

    def crop_range(a: int, b: int, n: int) -> tuple[int, int]:
        if not fixed_shape:
            return max(0, 2 * a - halo) // STRIDE * STRIDE, min(n, 2 * b + halo)
        length = -(-(2 * (b - a) + 2 * halo) // STRIDE) * STRIDE + STRIDE  # slack: alignment
        if length >= n:
            return 0, n
        length = n - (n - length) // STRIDE * STRIDE  # n - length aligned: border windows fit
        lo = max(0, min(2 * a - halo, n - length)) // STRIDE * STRIDE
        return lo, lo + length  # lo >= 2a - halo - 7, so lo + length > 2b + halo

    y0, y1 = crop_range(ra, rb, h)
    x0, x1 = crop_range(ca, cb, w)
    x = trunk_input(image[:, :, y0:y1, x0:x1], mask[:, :, y0:y1, x0:x1], channels_last)
    if stats is not None:
        stats.encoded_pixels += (y1 - y0) * (x1 - x0)
    t1, t2, t3 = net.trunk(x, autocast_trunk)
    gy, gx = tap_sizes(h), tap_sizes(w)
    n1y, n1x = t1.shape[-2:]

    def resize(t: Tensor, level: int) -> Tensor:
        step = 2 ** (level - 1)  # offset divisor of this tap relative to the x1 grid
        t = _resize_axis(t, 2, gy[0], gy[level - 1], y0 // 2, n1y, y0 // (2 * step))
        return _resize_axis(t, 3, gx[0], gx[level - 1], x0 // 2, n1x, x0 // (2 * step))

    feat = net.aspp_(t1, t2, t3, resize=resize)
    feat = feat[:, :, ra - y0 // 2 : rb - y0 // 2, ca - x0 // 2 : cb - x0 // 2]
    return net.project_features(feat)
