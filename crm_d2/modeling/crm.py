"""CRM: Continuous Refinement Model (Shen et al., CVPR 2022).

An encoder (ResNet trunk on image + mask, fused to one feature map at stride 2) and an implicit
decoder (LIIF-style MLP, Chen et al. CVPR 2021) that answers a refinement logit at any continuous
coordinate. Module names match the authors' release so that ``model_45705`` loads strictly.

Shape shorthand:
    B: batch; h, w: encoder input size; fh, fw: feature size (~h/2, ~w/2);
    Q: number of queries; C: feature channels (256 for the official model).

Coordinates are pixel centres in [-1, 1] ordered (y, x): for an H x W grid, row i is
``-1 + (2i + 1) / H`` (see :func:`make_coord`). A query's ``cell`` is ``(2 / H, 2 / W)`` of the
grid it belongs to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .backbone import ResNetTrunk
from .efficientnet import EFFICIENTNET_VARIANTS, EfficientNetLiteTrunk
from .fused import conv_bn, fold_conv_bn, is_channels_last

__all__ = ["OFFICIAL_ARCH", "TINY_ARCH", "CRMArch", "CRMNet", "FeatureFusion", "GridGeometry",
           "ImplicitMLP", "make_coord"]


@dataclass(frozen=True)
class CRMArch:
    """Architecture of a CRM network. The defaults are the official ResNet-50 model.

    Attributes:
        encoder: ``"resnet"`` (the paper's, built from ``block`` / ``layers`` / ``width`` /
            ``with_layer4``) or an EfficientNet-Lite trunk (``"efficientnet_lite0"``,
            ``"efficientnet_lite1"``; see :mod:`crm_d2.modeling.efficientnet`), for which the
            ResNet fields are ignored.
        block: trunk block type, ``"bottleneck"`` or ``"basic"``.
        layers: blocks per ResNet stage.
        width: stem channels (64 for ResNet-50).
        feat_dim: channels of the fused feature map (256 official).
        mlp_hidden: hidden widths of the implicit decoder (four layers of 32 official).
        with_layer4: keep the (never run) layer4 in the module tree, as the official file has it.
        pixel_skip: the decoder also reads the image and mask (normalised RGB and the mask
            in [-1, 1]: 4 values) at the query pixel, at full resolution, through a
            zero-initialised linear map added to its first layer (``CRMNet.pixel_skip``;
            crm_d2's addition, not in the paper): the stride-2 features alone cannot give
            back a mask's or an image's pixel detail.
        guided_skip: the pixel skip also reads the guided filter of the coarse mask (He et
            al. 2010, :func:`crm_d2.guided_filter.guide_channel`, in [-1, 1]) at the query
            pixel: a fifth input of ``CRMNet.pixel_skip`` (crm_d2's addition, not in the
            paper; requires ``pixel_skip``). The network can then follow the filter's
            colour-edge snapping where it helps instead of being averaged with it afterwards.
    """

    block: str = "bottleneck"
    layers: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    feat_dim: int = 256
    mlp_hidden: tuple[int, ...] = field(default=(32, 32, 32, 32))
    with_layer4: bool = True
    encoder: str = "resnet"
    pixel_skip: bool = False
    guided_skip: bool = False

    def __post_init__(self) -> None:
        if self.guided_skip and not self.pixel_skip:
            raise ValueError("guided_skip=True needs pixel_skip=True (the guided filter is a "
                             "fifth input of the pixel skip)")
        if self.encoder != "resnet" and self.encoder not in EFFICIENTNET_VARIANTS:
            raise ValueError(
                f"unknown CRM encoder {self.encoder!r}; choose 'resnet' or one of "
                f"{sorted(EFFICIENTNET_VARIANTS)}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.pixel_skip:  # files of plain networks stay readable by older crm_d2
            del d["pixel_skip"]
        if not self.guided_skip:
            del d["guided_skip"]
        d["layers"] = list(self.layers)
        d["mlp_hidden"] = list(self.mlp_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CRMArch:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown CRM architecture fields {sorted(unknown)}")
        d = dict(d)
        for key in ("layers", "mlp_hidden"):
            if key in d:
                d[key] = tuple(int(v) for v in d[key])
        return cls(**d)


OFFICIAL_ARCH = CRMArch()

#: A very small CRM (one basic block per stage, 32-channel features) for tests and plumbing checks.
TINY_ARCH = CRMArch(block="basic", layers=(1, 1, 1, 1), width=16, feat_dim=32, mlp_hidden=(16, 16),
                    with_layer4=False)


#: What a :attr:`CRMArch.pixel_skip` decoder reads at its query pixels: a (B, 4, H, W)
#: :func:`trunk_input`, or the pair (image (B, 3, H, W), mask (B, 1, H, W)) without the copy;
#: a :attr:`CRMArch.guided_skip` decoder also the guided filter (B, 1, H, W) of the coarse
#: mask: (image, mask, guide).
SkipInputs = torch.Tensor | tuple[torch.Tensor, ...]


def make_coord(shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Pixel-centre coordinates of an ``H x W`` grid in [-1, 1], (y, x) order.

    Returns:
        (H, W, 2) float32 tensor.
    """
    seqs = []
    for n in shape:
        r = 1.0 / n  # half a pixel of the [-1, 1] range
        seqs.append(-1 + r + (2 * r) * torch.arange(n, device=device).float())
    return torch.stack(torch.meshgrid(*seqs, indexing="ij"), dim=-1)


def make_coord_axes(shape: Sequence[int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two 1-D axes of :func:`make_coord`: ``(H,)`` row and ``(W,)`` column coordinates.

    ``make_coord(shape)[i, j] == (rows[i], cols[j])`` exactly, which lets callers build the
    coordinates of a chunk of queries without materialising the whole grid.
    """
    axes = []
    for n in shape:
        r = 1.0 / n
        axes.append(-1 + r + (2 * r) * torch.arange(n, device=device).float())
    return axes[0], axes[1]


class _ConvBNReLU(nn.Module):
    """1x1 conv + BN + ReLU; named ``atrous_conv``/``bn`` as in the official release."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.atrous_conv = nn.Conv2d(cin, cout, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(conv_bn(x, self.atrous_conv, self.bn))


class FeatureFusion(nn.Module):
    """Fuse the trunk taps x1 (stride 2), x2 (stride 4) and x3 (stride 8) at stride 2.

    Called ``aspp_`` in the official model, although it has no atrous pyramid. The branch
    widths are ``feat_dim/4, feat_dim/4, feat_dim/2`` (64, 64, 128 official); the attribute
    names keep the official channel numbers whatever the widths.
    """

    def __init__(self, in_channels: Sequence[int], feat_dim: int = 256) -> None:
        super().__init__()
        c1, c2, c3 = in_channels
        b1, b2, b3 = feat_dim // 4, feat_dim // 4, feat_dim - 2 * (feat_dim // 4)
        self.aspp1_128 = _ConvBNReLU(c1, b1)
        self.aspp1_256 = _ConvBNReLU(c2, b2)
        self.aspp1_1024 = _ConvBNReLU(c3, b3)
        self.bn1_128 = nn.BatchNorm2d(b1)
        self.bn1_256 = nn.BatchNorm2d(b2)
        self.bn1_1024 = nn.BatchNorm2d(b3)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(0.5)
        self.last_conv = nn.Sequential(
            nn.Conv2d(feat_dim, feat_dim, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(feat_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor,
        x3: torch.Tensor,
        resize: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Taps -> (B, feat_dim, fh, fw) with (fh, fw) = x1's size.

        ``resize(x, level)`` (level 2 or 3) replaces the bilinear resize of the x2 / x3 branch
        to x1's grid; the tiled encoder (:mod:`crm_d2.tiling`) passes one that keeps the
        whole image's align-corners geometry on a window.
        """
        conv, bn, relu, dropout = self.last_conv
        return dropout(relu(conv_bn(self.branches(x1, x2, x3, resize), conv, bn)))

    def branches(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor,
        x3: torch.Tensor,
        resize: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The three branches on x1's grid, concatenated: the input of ``last_conv``.

        Returns:
            (B, feat_dim, fh, fw).
        """
        x1 = self.dropout(self.relu(self.bn1_128(self.aspp1_128(x1))))
        x2 = self.dropout(self.relu(self.bn1_256(self.aspp1_256(x2))))
        x3 = self.dropout(self.relu(self.bn1_1024(self.aspp1_1024(x3))))
        if resize is None:
            size = x1.shape[-2:]
            x2 = F.interpolate(x2, size=size, mode="bilinear", align_corners=True)
            x3 = F.interpolate(x3, size=size, mode="bilinear", align_corners=True)
        else:
            x2, x3 = resize(x2, 2), resize(x3, 3)
        return torch.cat((x1, x2, x3), dim=1)


class ImplicitMLP(nn.Module):
    """The implicit decoder: ``layers`` = Linear/ReLU stack ending in one logit."""

    def __init__(self, in_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        last = in_dim
        for h in hidden:
            mods += [nn.Linear(last, h), nn.ReLU()]
            last = h
        mods.append(nn.Linear(last, 1))
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., 1)."""
        return self.layers(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], 1)

    def after_first(self, x: torch.Tensor) -> torch.Tensor:
        """The layers after the first linear one, on its output ``x`` (..., hidden[0]).

        Without autograd the ReLUs run in place on ``x`` (inference: no full-size temporaries).
        """
        inplace = not torch.is_grad_enabled()
        for layer in list(self.layers)[1:]:
            x = x.relu_() if inplace and isinstance(layer, nn.ReLU) else layer(x)
        return x


# The 4 neighbouring feature cells of the local ensemble, (dy, dx) in the official order.
_SHIFTS = ((-1, -1), (-1, 1), (1, -1), (1, 1))
_EPS_SHIFT = 1e-6


def _nearest_index(coords: torch.Tensor, shift: float, n: int) -> torch.Tensor:
    """Indices ``grid_sample(mode='nearest', align_corners=False)`` picks on an n-cell axis.

    Args:
        coords: (L,) query coordinates on one axis, in [-1, 1].
        shift: added to every coordinate before the clamp to (-1 + 1e-6, 1 - 1e-6).
        n: number of feature cells on that axis.

    Returns:
        (L,) long indices in [0, n).
    """
    shifted = (coords + shift).clamp(-1 + 1e-6, 1 - 1e-6)
    table = torch.arange(n, device=coords.device, dtype=torch.float32).view(1, 1, 1, n)
    grid = torch.stack([shifted, torch.zeros_like(shifted)], dim=-1).view(1, 1, -1, 2)
    idx = F.grid_sample(table, grid, mode="nearest", align_corners=False)
    return idx.view(-1).round().long()


class GridGeometry:
    """Per-axis lookup tables for decoding pixels of an ``H x W`` grid against an ``fh x fw`` map.

    Built once per (grid, feature) size pair; :meth:`CRMNet.decode_pixels` then decodes any
    subset of the grid's pixels with two table look-ups per axis instead of ``grid_sample``.

    Attributes (``k`` indexes the two shifts -1 and +1 of an axis):
        ys, xs: (H,), (W,) pixel-centre coordinates (:func:`make_coord_axes`).
        iy[k], ix[k]: (H,), (W,) long feature cell chosen for that shift.
        rel_y[k], rel_x[k]: (H,), (W,) relative coordinate (query - cell centre) * (fh | fw).
    """

    def __init__(self, grid_size: tuple[int, int], feat_size: tuple[int, int], device) -> None:
        h, w = grid_size
        fh, fw = feat_size
        self.grid_size = (int(h), int(w))
        self.feat_size = (int(fh), int(fw))
        self.ys, self.xs = make_coord_axes((h, w), device=device)
        fys, fxs = make_coord_axes((fh, fw), device=device)
        self.iy, self.ix, self.rel_y, self.rel_x = [], [], [], []
        for v in (-1, 1):
            iy = _nearest_index(self.ys, v * (1.0 / fh) + _EPS_SHIFT, fh)
            ix = _nearest_index(self.xs, v * (1.0 / fw) + _EPS_SHIFT, fw)
            self.iy.append(iy)
            self.ix.append(ix)
            self.rel_y.append((self.ys - fys[iy]) * fh)
            self.rel_x.append((self.xs - fxs[ix]) * fw)

    def cell_span_rows(self, r0: int, r1: int) -> tuple[int, int]:
        """Feature rows ``[a, b)`` that pixel rows ``r0:r1`` read (both shifts)."""
        return int(self.iy[0][r0:r1].min()), int(self.iy[1][r0:r1].max()) + 1

    def cell_span_cols(self, c0: int, c1: int) -> tuple[int, int]:
        """Feature columns ``[a, b)`` that pixel columns ``c0:c1`` read (both shifts)."""
        return int(self.ix[0][c0:c1].min()), int(self.ix[1][c0:c1].max()) + 1


def trunk_input(image: torch.Tensor, mask: torch.Tensor,
                channels_last: bool | None = None) -> torch.Tensor:
    """(B, 4, h, w) concatenation of image and mask.

    Channels-last when ``channels_last`` is True, or, when it is None, when the image is (the
    concatenation alone would return a contiguous tensor, and the stem would not be fused).
    """
    x = torch.cat((image, mask), dim=1)
    if channels_last is None:
        channels_last = image.shape[1] > 1 and image.stride(1) == 1  # (a window of) channels-last
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


class CRMNet(nn.Module):
    """CRM network: ``feats`` (trunk), ``aspp_`` (fusion) and ``imnet`` (implicit decoder).

    Use :meth:`encode` once per input and :meth:`decode` (any query coordinates, the authors'
    arithmetic) or :meth:`decode_grid` (every pixel of a grid, faster) as often as needed.
    """

    def __init__(self, arch: CRMArch = OFFICIAL_ARCH) -> None:
        super().__init__()
        self.arch = arch
        if arch.encoder == "resnet":
            self.feats = ResNetTrunk(arch.block, arch.layers, arch.width, 4, arch.with_layer4)
        else:
            self.feats = EfficientNetLiteTrunk(arch.encoder, in_chans=4)
        self.aspp_ = FeatureFusion(self.feats.out_channels, arch.feat_dim)
        self.imnet = ImplicitMLP(arch.feat_dim + 6, arch.mlp_hidden)
        self.pixel_skip: nn.Linear | None = None
        if arch.pixel_skip:  # starts at zero: the network begins as plain CRM
            self.pixel_skip = nn.Linear(4 + int(arch.guided_skip),
                                        self.imnet.layers[0].out_features, bias=False)
            nn.init.zeros_(self.pixel_skip.weight)

    def pixel_term(self, values: torch.Tensor) -> torch.Tensor:
        """The :attr:`CRMArch.pixel_skip` part of the decoder's first layer.

        Args:
            values: (..., 4) normalised RGB and mask ([-1, 1]) at the query pixels, and the
                guided filter ([-1, 1]) as a fifth value for :attr:`CRMArch.guided_skip`.

        Returns:
            (..., D) added to the first layer's output of every corner of the ensemble.
        """
        return F.linear(values, self.pixel_skip.weight.to(values.dtype))

    def trunk(self, x: torch.Tensor, autocast: bool = True) -> tuple[torch.Tensor, ...]:
        """The trunk's three taps of a :func:`trunk_input` ``x``.

        ``autocast=False`` runs the trunk in float32 even inside an enclosing
        ``torch.autocast`` (which then covers the fusion only): reduced precision costs the
        EfficientNet-Lite trunk more mask agreement than the fusion (BENCHMARKS.md).
        """
        if autocast:
            return self.feats(x)
        with torch.autocast(x.device.type, enabled=False):  # a no-op outside autocast
            return self.feats(x.float())

    def encode(self, image: torch.Tensor, mask: torch.Tensor,
               autocast_trunk: bool = True) -> torch.Tensor:
        """Encode a normalised image and a mask.

        Args:
            image: (B, 3, h, w) float, ImageNet-normalised RGB.
            mask: (B, 1, h, w) float in [-1, 1].
            autocast_trunk: see :meth:`trunk` (only matters under ``torch.autocast``).

        Returns:
            feat: (B, C, fh, fw).
        """
        return self.aspp_(*self.trunk(trunk_input(image, mask), autocast_trunk))

    def fusion_rows(self, image: torch.Tensor, mask: torch.Tensor,
                    autocast_trunk: bool = True) -> torch.Tensor:
        """:meth:`encode` up to the fusion's last convolution, as zero-padded channels-last rows.

        With :meth:`project_cells` this computes the decoder's projected features
        (:meth:`project_features` of :meth:`encode`) only at the feature cells a sparse decoder
        reads: the fusion's 3x3 convolution is the largest single cost of the encoder and its
        output is only needed near the pixels decoded.

        Args:
            image: (B, 3, h, w); mask: (B, 1, h, w); autocast_trunk: as in :meth:`encode`.

        Returns:
            (B, fh + 2, fw + 2, C): the branches' concatenation, one zero cell on every side
            (the convolution's padding), C = ``feat_dim``.
        """
        pre = self.aspp_.branches(*self.trunk(trunk_input(image, mask), autocast_trunk))
        return F.pad(pre.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))

    def project_cells(
        self, rows: torch.Tensor, pb: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor,
        chunk: int = 8192,
    ) -> torch.Tensor:
        """Projected features (:meth:`project_features` of :meth:`encode`) at some cells.

        Inference only (eval-mode batch norm, dropout off). Equal to the dense computation up
        to float rounding: each cell's 3x3 window is gathered and multiplied by the folded
        convolution + batch-norm weights, then ReLU and the decoder's feature projection.

        Args:
            rows: (B, fh + 2, fw + 2, C) from :meth:`fusion_rows`.
            pb, cy, cx: (N,) long batch index, row and column of the cells (unpadded grid).
            chunk: cells per matrix product (bounds the gathered windows' memory).

        Returns:
            (N, D) projected features, D = the decoder's first hidden width.
        """
        conv, bn = self.aspp_.last_conv[0], self.aspp_.last_conv[1]
        if conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.stride != (1, 1):
            raise ValueError("project_cells expects the fusion's 3x3, padding-1 convolution")
        bsz, hp, wp, c = rows.shape
        weight, bias = fold_conv_bn(conv, bn)
        w_cols = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).to(rows.dtype)
        bias = bias.to(rows.dtype)
        first: nn.Linear = self.imnet.layers[0]
        w_feat = first.weight[:, :c].to(rows.dtype)
        flat = rows.reshape(-1, c)
        offsets = (torch.arange(3, device=rows.device)[:, None] * wp
                   + torch.arange(3, device=rows.device)[None]).flatten()  # (9,)
        corner = pb * (hp * wp) + cy * wp + cx  # top-left cell of each 3x3 window
        out = []
        for a in range(0, corner.numel(), chunk):
            idx = (corner[a : a + chunk, None] + offsets).flatten()
            cols = flat.index_select(0, idx).view(-1, 9 * c)
            out.append(F.linear(torch.relu(F.linear(cols, w_cols, bias)), w_feat))
        if not out:
            return rows.new_zeros(0, w_feat.shape[0])
        return torch.cat(out)

    def decode(self, feat: torch.Tensor, coord: torch.Tensor, cell: torch.Tensor,
               inputs: SkipInputs | None = None) -> torch.Tensor:
        """Logits at query coordinates, with the 4-corner area-weighted local ensemble.

        This follows the authors' arithmetic step by step (it is the ``exact`` path).

        Args:
            feat: (B, C, fh, fw) from :meth:`encode`.
            coord: (B, Q, 2) query coordinates, (y, x) in [-1, 1].
            cell: (B, Q, 2) query cell sizes.
            inputs: (B, 4, H, W) :func:`trunk_input` of the image and mask (or the pair
                ``(image, mask)``, :data:`SkipInputs`) at the resolution
                whose pixel centres are queried (the full-resolution padded grid in inference,
                not the scale's resized encoder input); required by :attr:`CRMArch.pixel_skip`
                networks, which read it at ``coord`` (bilinearly), unused otherwise.

        Returns:
            (B, Q) logits.
        """
        fh, fw = feat.shape[-2:]
        bsz, nq = coord.shape[:2]
        extra = None
        if self.pixel_skip is not None:
            # bilinear at the query coordinates: the pixel's own value at pixel centres
            grid = coord.flip(-1).unsqueeze(1)
            values = torch.cat([F.grid_sample(t, grid, mode="bilinear", padding_mode="border",
                                              align_corners=False)
                                for t in self._skip_inputs(inputs)], dim=1)
            extra = self.pixel_term(values[:, :, 0].permute(0, 2, 1)).reshape(bsz * nq, -1)
        feat_coord = make_coord((fh, fw), device=feat.device).permute(2, 0, 1).unsqueeze(0)
        feat_coord = feat_coord.expand(bsz, 2, fh, fw)
        rel_cell = cell.clone()
        rel_cell[:, :, 0] *= fh
        rel_cell[:, :, 1] *= fw
        preds, areas = [], []
        for vy, vx in _SHIFTS:
            shifted = coord.clone()
            shifted[:, :, 0] += vy * (1.0 / fh) + _EPS_SHIFT
            shifted[:, :, 1] += vx * (1.0 / fw) + _EPS_SHIFT
            shifted.clamp_(-1 + 1e-6, 1 - 1e-6)
            grid = shifted.flip(-1).unsqueeze(1)  # grid_sample wants (x, y)
            q_feat = F.grid_sample(feat, grid, mode="nearest", align_corners=False)
            q_coord = F.grid_sample(feat_coord, grid, mode="nearest", align_corners=False)
            q_feat = q_feat[:, :, 0, :].permute(0, 2, 1)
            rel_coord = coord - q_coord[:, :, 0, :].permute(0, 2, 1)
            rel_coord[:, :, 0] *= fh
            rel_coord[:, :, 1] *= fw
            inp = torch.cat([q_feat, rel_coord, coord, rel_cell], dim=-1).view(bsz * nq, -1)
            if extra is None:
                preds.append(self.imnet(inp).view(bsz, nq))
            else:
                first = self.imnet.layers[0](inp) + extra
                preds.append(self.imnet.after_first(first).view(bsz, nq))
            areas.append(torch.abs(rel_coord[:, :, 0] * rel_coord[:, :, 1]) + 1e-9)
        total = torch.stack(areas).sum(dim=0)
        # Each prediction is weighted by the area of the diagonally opposite corner.
        areas = [areas[3], areas[2], areas[1], areas[0]]
        out = 0
        for pred, area in zip(preds, areas):
            out = out + pred * (area / total)
        return out

    def decode_grid(
        self,
        feat: torch.Tensor,
        grid_size: tuple[int, int],
        rows: tuple[int, int] | None = None,
        inputs: SkipInputs | None = None,
    ) -> torch.Tensor:
        """:meth:`decode` at every pixel centre of an ``H x W`` grid (rows ``r0:r1``).

        On a full grid the query coordinates are separable (row coordinate x column coordinate),
        so the nearest feature cell of each corner shift is a pair of 1-D indices: the gathers
        become two ``index_select`` calls and every coordinate term is an outer sum. Same
        function as :meth:`decode` with ``coord = make_coord((H, W))`` and ``cell = (2/H, 2/W)``,
        up to float rounding (~1e-6); much faster, in training (cheap backward) and inference.

        Args:
            feat: (B, C, fh, fw).
            grid_size: (H, W) of the query grid.
            rows: optional ``(r0, r1)`` range of grid rows to decode (default all).
            inputs: as in :meth:`decode`, (B, 4, H, W).

        Returns:
            (B, r1 - r0, W) logits.
        """
        h, w = grid_size
        rows = (0, h) if rows is None else rows
        return self.decode_grid_window(self.project_features(feat), grid_size,
                                       tuple(feat.shape[-2:]), rows, (0, w), inputs=inputs)

    def decode_grid_window(
        self,
        proj: torch.Tensor,
        grid_size: tuple[int, int],
        feat_size: tuple[int, int],
        rows: tuple[int, int] | torch.Tensor,
        cols: tuple[int, int] | torch.Tensor,
        origin: tuple[int, int] = (0, 0),
        inputs: SkipInputs | None = None,
    ) -> torch.Tensor:
        """:meth:`decode_grid` of the block ``rows x cols`` from a window of projected features.

        Args:
            proj: (B, ph, pw, D) :meth:`project_features` of feature cells ``origin[0]:+ph``,
                ``origin[1]:+pw`` of the whole ``feat_size`` map; it must hold every cell the
                block reads (:meth:`GridGeometry.cell_span_rows` / ``cell_span_cols``).
            grid_size: (H, W) of the whole query grid.
            feat_size: (fh, fw) of the whole feature map.
            rows, cols: ``(r0, r1)``, ``(c0, c1)`` grid rows and columns to decode, or 1-D
                long tensors of (increasing) grid rows / columns: their cross product.
            origin: feature cell of ``proj[:, 0, 0]``.
            inputs: as in :meth:`decode`: the whole grid's (B, 4, H, W) image and mask.

        Returns:
            (B, number of rows, number of columns) logits.
        """
        h, w = grid_size
        fh, fw = feat_size
        first: nn.Linear = self.imnet.layers[0]
        w_ry, w_rx, w_cy, w_cx, w_sy, w_sx = first.weight[:, -6:].unbind(dim=1)
        dev, dt = proj.device, proj.dtype
        ys, xs = make_coord_axes((h, w), device=dev)
        if not isinstance(rows, torch.Tensor):
            rows = torch.arange(rows[0], rows[1], device=dev)
        if not isinstance(cols, torch.Tensor):
            cols = torch.arange(cols[0], cols[1], device=dev)
        ys, xs = ys[rows], xs[cols]
        extra = None
        if self.pixel_skip is not None:
            values = torch.cat([t.index_select(2, rows).index_select(3, cols)
                                for t in self._skip_inputs(inputs, grid_size)], dim=1)
            extra = self.pixel_term(values.permute(0, 2, 3, 1)).to(dt)  # (B, h', w', D)
        fys, fxs = make_coord_axes((fh, fw), device=dev)
        # constant part of the first layer: bias + relative cell (2/H * fh, 2/W * fw)
        const = first.bias + w_sy * (2.0 / h * fh) + w_sx * (2.0 / w * fw)

        preds, areas = [], []
        for vy, vx in _SHIFTS:
            iy = _nearest_index(ys, vy * (1.0 / fh) + _EPS_SHIFT, fh)
            ix = _nearest_index(xs, vx * (1.0 / fw) + _EPS_SHIFT, fw)
            rel_y = (ys - fys[iy]) * fh  # (h',)
            rel_x = (xs - fxs[ix]) * fw  # (w',)
            row_term = torch.outer(rel_y, w_ry) + torch.outer(ys, w_cy) + const  # (h', D)
            col_term = torch.outer(rel_x, w_rx) + torch.outer(xs, w_cx)  # (w', D)
            # (feature + row term) on the (h', pw) rows before the column gather: one
            # full-size pass fewer, the same sums in the same order
            q = proj.index_select(1, iy - origin[0]) + row_term[:, None, :].to(dt)
            out = q.index_select(2, ix - origin[1])
            col = col_term[None, :, :].to(dt)
            # inference: no full-size temporaries beyond ``out`` (and the pixel skip's term)
            out = out + col if torch.is_grad_enabled() else out.add_(col)
            if extra is not None:
                out = out + extra if torch.is_grad_enabled() else out.add_(extra)
            preds.append(self.imnet.after_first(out)[..., 0])
            areas.append(torch.abs(torch.outer(rel_y, rel_x)) + 1e-9)
        total = areas[0] + areas[1] + areas[2] + areas[3]
        areas = [areas[3], areas[2], areas[1], areas[0]]
        result = 0
        for pred, area in zip(preds, areas):
            result = result + pred * (area / total)
        return result

    def project_features(self, feat: torch.Tensor) -> torch.Tensor:
        """The feature part of the decoder's first layer, per feature cell.

        Args:
            feat: (B, C, fh, fw) (or a window of it).

        Returns:
            (B, fh, fw, D) channels-last projection, D = first hidden width (32 official).
        """
        first: nn.Linear = self.imnet.layers[0]
        w_feat = first.weight[:, : feat.shape[1]].to(feat.dtype)
        if is_channels_last(feat):  # a matrix product over the (B, fh, fw, C) rows
            return F.linear(feat.permute(0, 2, 3, 1), w_feat).contiguous()
        proj = F.conv2d(feat, w_feat[:, :, None, None].contiguous())
        return proj.permute(0, 2, 3, 1).contiguous()

    def decode_pixels(
        self,
        proj: torch.Tensor,
        geom: GridGeometry,
        pb: torch.Tensor,
        py: torch.Tensor,
        px: torch.Tensor,
        origin: tuple[int, int] = (0, 0),
        inputs: SkipInputs | None = None,
    ) -> torch.Tensor:
        """:meth:`decode` at chosen pixels of a grid (the sparse form of :meth:`decode_grid`).

        Same function as :meth:`decode_grid` at those pixels, up to float rounding (~1e-6).

        Args:
            proj: (B, ph, pw, D) window of :meth:`project_features` of the whole feature map;
                its cell (0, 0) is the feature map's cell ``origin``. It must hold every cell the
                pixels read (:meth:`GridGeometry.cell_span_rows` / ``cell_span_cols``).
            geom: tables of the grid and of the WHOLE feature map (not of the window).
            pb, py, px: (Q,) long batch index, row and column of each pixel in the grid.
            origin: (row, col) of the window in the feature map.
            inputs: as in :meth:`decode`: the whole grid's (B, 4, H, W) image and mask.

        Returns:
            (Q,) float32 logits.
        """
        h, w = geom.grid_size
        fh, fw = geom.feat_size
        first: nn.Linear = self.imnet.layers[0]
        c = first.weight.shape[1] - 6
        w_ry, w_rx, w_cy, w_cx, w_sy, w_sx = first.weight[:, c:].unbind(dim=1)
        const = first.bias + w_sy * (2.0 / h * fh) + w_sx * (2.0 / w * fw)
        _, ph, pw, d = proj.shape
        q = pb.numel()
        ys, xs = geom.ys[py], geom.xs[px]
        base = pb * (ph * pw)
        rows_y = [geom.iy[k][py] - origin[0] for k in (0, 1)]
        cols_x = [geom.ix[k][px] - origin[1] for k in (0, 1)]
        rel_y = [geom.rel_y[k][py] for k in (0, 1)]
        rel_x = [geom.rel_x[k][px] for k in (0, 1)]
        # the four shifts stacked along the query axis: rows k*Q:(k+1)*Q are shift k
        index, ry, rx = [], [], []
        for vy, vx in _SHIFTS:
            ky, kx = (vy + 1) // 2, (vx + 1) // 2
            index.append(base + rows_y[ky] * pw + cols_x[kx])
            ry.append(rel_y[ky])
            rx.append(rel_x[kx])
        feat = proj.reshape(-1, d).index_select(0, torch.cat(index))  # (4Q, D)
        ry, rx = torch.cat(ry), torch.cat(rx)
        # first layer = projected feature + [rel_y, y, rel_x, x, 1] @ their weights
        coords = torch.stack((ry, ys.repeat(4), rx, xs.repeat(4), torch.ones_like(ry)), dim=1)
        w_coord = torch.stack((w_ry, w_cy, w_rx, w_cx, const), dim=0)  # (5, D)
        coords, w_coord = coords.to(feat.dtype), w_coord.to(feat.dtype)
        # inference: the gathered features become the first layer's output in place
        out = (torch.addmm(feat, coords, w_coord) if torch.is_grad_enabled()
               else feat.addmm_(coords, w_coord))
        del feat
        if self.pixel_skip is not None:
            values = torch.cat([t[pb, :, py, px]
                                for t in self._skip_inputs(inputs, geom.grid_size)], dim=1)
            extra = self.pixel_term(values.to(out.dtype))  # (Q, D), the same for every shift
            if torch.is_grad_enabled():
                out = out + extra.repeat(4, 1)
            else:
                out.view(4, q, out.shape[-1]).add_(extra)
        preds = self.imnet.after_first(out)[:, 0].float().view(4, q)
        areas = (torch.abs(ry * rx) + 1e-9).view(4, q)
        # each shift is weighted by the area of the diagonally opposite one (LIIF)
        return (preds * areas.flip(0)).sum(dim=0) / areas.sum(dim=0)

    def forward(
        self, image: torch.Tensor, mask: torch.Tensor, coord: torch.Tensor, cell: torch.Tensor,
        guide: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training forward: (B,3,h,w), (B,1,h,w), (B,Q,2), (B,Q,2) -> (B, Q) logits.

        The queries are read against the encoded grid (``inputs`` of :meth:`decode`);
        ``guide`` (B, 1, h, w) is the guided filter a :attr:`CRMArch.guided_skip` network reads.
        """
        inputs = None if self.pixel_skip is None else (
            (image, mask) if guide is None else (image, mask, guide))
        return self.decode(self.encode(image, mask), coord, cell, inputs)

    def _skip_inputs(self, inputs: SkipInputs | None,
                     grid_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, ...]:
        """``inputs`` as float tensors whose channels concatenate to the skip's 4 (or, with
        :attr:`CRMArch.guided_skip`, 5) values."""
        parts = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs or ())
        n = self.pixel_skip.in_features
        ok = bool(parts) and all(t.dim() == 4 for t in parts) and (
            sum(t.shape[1] for t in parts) == n
            and len({(t.shape[0], *t.shape[-2:]) for t in parts}) == 1
            and (grid_size is None or tuple(parts[0].shape[-2:]) == tuple(grid_size)))
        if not ok:
            got = [tuple(t.shape) for t in parts] if parts else None
            if n == 5:
                want = ("the image, mask and guided filter of the coarse mask at every query "
                        "pixel (arch.guided_skip): pass inputs=(image, mask, guide) at the query "
                        "grid's resolution, (B, 3 + 1 + 1, H, W)")
            else:
                want = ("the image and mask at every query pixel (arch.pixel_skip): pass "
                        "inputs=(image, mask) or trunk_input(image, mask) at the query grid's "
                        "resolution, (B, 3 + 1, H, W)")
            raise ValueError(f"this CRM reads {want} with (H, W) = {grid_size}, to the "
                             f"decoder; got {got}")
        return tuple(t.float() for t in parts)
