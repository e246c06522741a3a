"""CRM inference: the multi-resolution refinement schedule and the public :class:`CRMRefiner`.

Shape shorthand: B batch of same-size inputs, H/W image size, Hp/Wp padded size
(``H + 2 * PAD``), Q queries.

The schedule (CRM paper §3.3 and the authors' ``test.py``): reflect-pad image and mask by 32 px;
for each scale s in (0.125, 0.25, 0.5, 1.0) resize both to ``round(Hp * s) x round(Wp * s)``
(bilinear, align_corners=True), encode once, decode every full-resolution padded pixel, zero the
output if the current mask is empty, and feed ``(p - 0.5) * 2`` back as the next mask. The answer
is the last probability map cropped by the padding. ``exact=True`` runs exactly that; the
default runs the same schedule through :mod:`crm_d2.sparse` (band decoding, windowed encoder).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from .distributed import check_device
from .frozen import FrozenNetwork
from .io import mask_to_prob
from .modeling.crm import CRMNet, make_coord_axes
from .modeling.fused import clear_folded
from .sparse import DEFAULT_AUTOCAST, FastOptions, parse_autocast, refine_fast

__all__ = [
    "CRMRefiner",
    "check_batch",
    "DEFAULT_SCALES",
    "FastOptions",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "normalize_image",
    "normalize_mask",
    "prepare_inputs",
    "reflect_pad",
    "scales_for_size",
]

logger = logging.getLogger(__name__)

DEFAULT_SCALES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD = 32
OFFICIAL_CHUNK = 802_816  # queries per decoder call in the authors' test.py (50176 * 16)
# most queries per decoder call: cache-sized blocks run the 32-wide decoder MLP about 1.4x
# faster on CPU than 262,144 (BENCHMARKS.md, session 7); the answer does not depend on it
DEFAULT_CHUNK = 32_768

ProgressFn = Callable[[str, int, int], None]

# --------------------------------------------------------------------------------------------
# Input conversion (numpy -> normalised tensors)
# --------------------------------------------------------------------------------------------
def _as_rgb(image: np.ndarray) -> np.ndarray:
    """HxW gray, HxWx1, HxWx3 RGB or HxWx4 RGBA uint8 -> HxWx3 uint8 RGB.

    Gray is repeated on the three channels; RGBA drops alpha (it is not composited: CRM sees the
    colours as stored).
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(
            f"image must be uint8 (0..255), got dtype {image.dtype}; convert with "
            "np.clip(img, 0, 255).astype(np.uint8) or (img * 255).round().astype(np.uint8)"
        )
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be HxW, HxWx3 (RGB) or HxWx4 (RGBA), got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty: shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def _as_prob(mask: np.ndarray) -> np.ndarray:
    """HxW mask -> float32 in [0, 1] by :func:`crm_d2.io.mask_to_prob` (uint8 0..255 or 0/1,
    uint16, bool, or float in [0, 1])."""
    if not isinstance(mask, np.ndarray):
        raise ValueError(f"mask must be a numpy array, got {type(mask).__name__}")
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.ndim != 2:
        raise ValueError(f"mask must be HxW, got shape {mask.shape}")
    if mask.size == 0:
        raise ValueError(f"mask is empty: shape {mask.shape}")
    return mask_to_prob(mask)


def normalize_image(image_u8: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 or float 0..255 RGB -> ImageNet-normalised float32."""
    x = image_u8.float() / 255
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def normalize_mask(prob: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) probabilities in [0, 1] -> CRM's mask input in [-1, 1]."""
    return (prob.float() - 0.5) / 0.5


def prepare_inputs(
    image: np.ndarray, mask: np.ndarray, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate numpy inputs and turn them into network tensors.

    Returns:
        image (1, 3, H, W) normalised float32 and mask (1, 1, H, W) in [-1, 1] on ``device``.
    """
    rgb = _as_rgb(image)
    prob = _as_prob(mask)
    if rgb.shape[:2] != prob.shape:
        raise ValueError(f"image is {rgb.shape[:2]} (HxW) but mask is {prob.shape}")
    if not rgb.flags.writeable:  # e.g. np.asarray(PIL image); torch wants writable memory
        rgb = rgb.copy()
    img_t = torch.from_numpy(rgb).to(device).permute(2, 0, 1)[None]
    msk_t = torch.from_numpy(prob).to(device)[None, None]
    return normalize_image(img_t), normalize_mask(msk_t)


def _reflect_index(n: int, pad: int, device) -> torch.Tensor:
    """Indices of a reflect padding of ``pad`` on both sides of a length-``n`` axis.

    Equals ``F.pad(mode='reflect')`` when ``pad < n`` and extends it, like ``np.pad(...,
    'reflect')``, by reflecting again when the axis is shorter than the padding.
    """
    idx = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - idx, idx)


def reflect_pad(x: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """Reflect-pad the last two dims of (B, C, H, W) by ``pad`` px (any H, W >= 1)."""
    h, w = x.shape[-2:]
    if pad < h and pad < w:
        return F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = x.index_select(-2, _reflect_index(h, pad, x.device))
    return x.index_select(-1, _reflect_index(w, pad, x.device))


# --------------------------------------------------------------------------------------------
# The refiner
# --------------------------------------------------------------------------------------------
class CRMRefiner(FrozenNetwork):
    """A frozen CRM network with the official multi-scale inference schedule.

    Build it with :meth:`from_checkpoint` (official ``model_45705``, a plain state dict or the
    project's own format). The network is kept in eval mode and never receives gradients.

    Example::

        refiner = CRMRefiner.from_checkpoint("model_45705", device="cpu")
        prob = refiner.refine(image_rgb_uint8, coarse_mask_uint8)  # HxW float32 in [0, 1]
        binary = prob > 0.5

    ``autocast`` sets the precision of the default fast path (:meth:`fast_options`):
    ``"auto"`` (the default) runs the encoder's fusion in bf16 where the device computes bf16
    natively (:func:`crm_d2.sparse.native_bf16`: CUDA, CPUs with AVX512-BF16 / AMX) on encoder
    inputs of at least :data:`crm_d2.sparse.AUTOCAST_MIN_PIXELS`, and float32 elsewhere;
    ``None`` / ``"none"`` is float32 everywhere; ``"bf16"`` / ``"fp16"`` force it.
    ``exact=True`` and an explicit ``fast`` ignore it.

    ``flip=True`` is test-time augmentation: the left-right mirrored image and mask are refined
    too and the two probability maps averaged (twice the time; with ``exact`` too). The
    averaging cancels part of the network's noise (``crm_d2/weights/MODEL_CARD.md``: fewer
    objects made worse on held-out binary masks).

    ``guided_blend=w`` mixes in the guided filter of the coarse mask (He et al., ECCV 2010; the
    training-free baseline, :mod:`crm_d2.guided_filter`, radius 4, eps 1e-2): the output is
    ``(1 - w) * CRM + w * guided``, after flip. An ensemble of two refiners with different
    errors (CRM's network noise, the filter's pull to every colour edge); not in the paper.
    ``None`` in :meth:`from_checkpoint` takes the checkpoint's ``guided_blend`` (the shipped
    file's: its model card), else 0 (CRM alone, e.g. the official weights).

    A network with :attr:`CRMArch.guided_skip` reads that filter itself: the refiner computes
    it once on the padded ROI (:func:`crm_d2.guided_filter.guide_channel`) and passes it to the
    decoder at every scale (mirrored for the flip pass); a ``guided_blend`` then mixes in the
    same map.
    """

    def __init__(
        self,
        model: CRMNet,
        device: torch.device | str = "cpu",
        *,
        scales: Sequence[float] = DEFAULT_SCALES,
        chunk_size: int = DEFAULT_CHUNK,
        min_side: int | None = None,
        metadata: dict | None = None,
        fast: FastOptions | None = None,
        autocast: str | None = DEFAULT_AUTOCAST,
        flip: bool = False,
        guided_blend: float = 0.0,
    ) -> None:
        self._freeze(model, check_device(device))
        self.scales = _check_scales(scales)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        if min_side is not None and int(min_side) < 1:
            raise ValueError(f"min_side must be >= 1 or None, got {min_side}")
        self.min_side = None if min_side is None else int(min_side)
        self.metadata = dict(metadata or {})
        if fast is not None and not isinstance(fast, FastOptions):
            raise ValueError(f"fast must be a FastOptions or None, got {type(fast).__name__}")
        self.fast = fast  # None: FastOptions.default_for(the scales of each call)
        self.autocast = parse_autocast(autocast)  # precision of the default fast path
        if not isinstance(flip, bool):
            raise ValueError(f"flip must be True or False, got {flip!r}")
        self.flip = flip
        self.guided_blend = check_guided_blend(guided_blend)
        self._channels_last = False  # the network's current weight layout

    def _use_channels_last(self, on: bool) -> None:
        """Put the network's weights in channels-last (or back in contiguous) layout.

        The fast path's ``channels_last`` option wants channels-last weights; ``exact=True``
        wants the contiguous ones, so that it stays the authors' arithmetic to the bit.
        """
        if on != self._channels_last:
            fmt = torch.channels_last if on else torch.contiguous_format
            self.model.to(memory_format=fmt)
            clear_folded(self.model)  # folded weights follow the layout, or are not needed
            self._channels_last = on

    @classmethod
    def from_checkpoint(
        cls, path: str | None = None, device: str = "cpu", **kwargs
    ) -> CRMRefiner:
        """Load CRM weights from ``path`` (never downloads anything).

        Accepts the official ``model_45705`` (also saved as ``model_45705.aspx``), a plain state
        dict, and the project's checkpoint format; see :mod:`crm_d2.checkpoint` for the errors
        raised on bad files. ``path=None`` loads the weights shipped with crm_d2
        (:func:`crm_d2.weights.default_weights_path`). ``kwargs`` go to the constructor
        (``scales``, ``chunk_size``, ``min_side``, ``fast``, ``autocast``, ``flip``,
        ``guided_blend``); the scales, ``min_side`` and ``guided_blend`` stored in a project
        checkpoint are used when none are given.
        """
        from .checkpoint import CheckpointError, load_crm
        from .weights import resolve_weights

        path = resolve_weights(path, "path")

        model, meta = load_crm(path)
        def stored(key: str, check, what: str, flag: str) -> None:
            """``kwargs[key]`` from the checkpoint when the caller gave none (or None)."""
            if kwargs.get(key) is not None:
                return
            kwargs.pop(key, None)
            if meta.get(key) is not None:
                try:
                    kwargs[key] = check(meta[key])
                except (ValueError, TypeError) as e:
                    raise CheckpointError(f"{path!r} stores unusable {what} {meta[key]!r} ({e}): "
                                          f"pass it explicitly ({flag})") from e

        stored("scales", _check_scales, "inference scales", "--scales")
        stored("guided_blend", check_guided_blend, "guided_blend", "--guided-blend")
        if kwargs.get("min_side") is None and meta.get("min_side"):
            kwargs["min_side"] = int(meta["min_side"])
        return cls(model, device, metadata=meta, **kwargs)

    def fast_options(self, scales: Sequence[float] | None = None) -> FastOptions:
        """The decoding used for ``scales`` (default: the refiner's) when none is passed."""
        if self.fast is not None:
            return self.fast
        return FastOptions.default_for(self.scales if scales is None else scales, self.autocast)

    # ---------------------------------------------------------------- numpy entry point
    @torch.no_grad()
    def refine(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        scales: Sequence[float] | None = None,
        exact: bool = False,
        progress: ProgressFn | None = None,
        fast: FastOptions | None = None,
    ) -> np.ndarray:
        """Refine one mask of one image.

        Args:
            image: HxWx3 uint8 RGB; HxW (or HxWx1) gray is repeated to RGB; HxWx4 RGBA drops
                alpha.
            mask: the coarse mask, HxW uint8 0..255 (only 0 and 1: binary 0/1), uint16
                0..65535, bool, or float in [0, 1] (:func:`crm_d2.io.mask_to_prob`).
            scales: input scales of the coarse-to-fine schedule (default: the refiner's,
                ``(0.125, 0.25, 0.5, 1.0)``).
            exact: run the authors' arithmetic to the letter (slowest: every pixel decoded at
                every scale; a ``guided_blend`` is still mixed in afterwards).
                Otherwise the fast path of :mod:`crm_d2.sparse` runs with
                ``fast``. By default (:meth:`FastOptions.default_for`) a schedule of several
                scales decodes every pixel with the grid decoder
                (:meth:`CRMNet.decode_grid`), the same function as ``exact`` to ~1e-6 in
                float32, and a one-scale schedule decodes a band around the boundary (with
                growth), measured equal to dense decoding on held-out images; both run the
                encoder's fusion in bf16 on large inputs where the device computes it natively
                (``autocast`` of the constructor), measured within 0.1 IoU / mBA points of
                float32 on held-out images (BENCHMARKS.md).
            progress: optional callback ``progress(stage, done, total)``, called with
                ``done = 0`` when a scale starts (before its encoder pass) and when its work is
                done (``done == total``; the exact path also after each decoder chunk).
            fast: options of the fast path (default: :meth:`fast_options` of the scales run);
                ignored when ``exact``.

        Returns:
            HxW float32 probability map in [0, 1]; ``> 0.5`` is the refined binary mask.
        """
        # the unpadded tensors are freed once padded (peak memory on large images)
        img_p, seg_p = _padded(*prepare_inputs(image, mask, self.device))
        out = self._refine_padded(img_p, seg_p, scales, exact, progress, fast)
        return out[0].cpu().numpy()

    # ---------------------------------------------------------------- tensor entry point
    @torch.no_grad()
    def refine_tensors(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        scales: Sequence[float] | None = None,
        exact: bool = False,
        progress: ProgressFn | None = None,
        fast: FastOptions | None = None,
        stats: dict | None = None,
    ) -> torch.Tensor:
        """Refine a batch of same-size ROIs (the entry point of the detectron2 layer).

        Args:
            image: (B, 3, H, W) ImageNet-normalised float (see :func:`normalize_image`).
            mask: (B, 1, H, W) float in [-1, 1] (see :func:`normalize_mask`).
            scales, exact, progress, fast: as in :meth:`refine`.
            stats: optional dict filled by the fast path (see :func:`crm_d2.sparse.refine_fast`).

        Returns:
            (B, H, W) float32 probabilities on the refiner's device.
        """
        check_batch(image, mask)
        image, seg = _padded(image.to(self.device, torch.float32),
                             mask.to(self.device, torch.float32))
        return self._refine_padded(image, seg, scales, exact, progress, fast, stats)

    def _refine_padded(self, image, seg, scales, exact, progress, fast, stats=None):
        """:meth:`refine_tensors` on inputs already reflect-padded by ``PAD`` (the reflect
        padding commutes with mirroring, so the mirrored pass sees the padded mirror image)."""
        from .guided_filter import GuidedFilterRefiner, guide_channel  # it imports this module

        guided = guide = None
        if self.model.arch.guided_skip:  # the decoder reads it: on the padded grid
            guide = guide_channel(image, seg)
        if self.guided_blend:  # first, from the coarse mask
            core = (slice(None), slice(None), slice(PAD, -PAD), slice(PAD, -PAD))
            if guide is not None:  # the decoder's (its windows also see the padding)
                guided = guide[core][:, 0].add(1).mul_(0.5)
            else:  # the guided-filter refiner's answer exactly
                guided = GuidedFilterRefiner(device=self.device).refine_tensors(
                    image[core], seg[core], progress=progress)
        prob = self._schedule(image, seg, scales, exact, progress, fast, stats, guide)
        if self.flip:
            if progress is not None:
                def mirrored(stage, done, total):
                    progress(f"mirrored {stage}", done, total)
            flipped = self._schedule(image.flip(-1), seg.flip(-1), scales, exact,
                                     None if progress is None else mirrored, fast,
                                     guide=None if guide is None else guide.flip(-1))
            prob = prob.add_(flipped.flip(-1)).mul_(0.5)
        if guided is not None:
            prob = prob.mul_(1 - self.guided_blend).add_(guided, alpha=self.guided_blend)
        return prob

    def _schedule(self, image, seg, scales, exact, progress, fast, stats=None, guide=None):
        """One pass of the coarse-to-fine schedule on padded inputs -> (B, H, W).

        ``guide``: the padded (B, 1, Hp, Wp) :func:`~crm_d2.guided_filter.guide_channel` of the
        coarse mask, which a :attr:`CRMArch.guided_skip` decoder reads at every scale.
        """
        scales = self.scales if scales is None else _check_scales(scales)
        # the decoding follows the schedule asked for, not what the ROI-size rule leaves of it
        opts = self.fast_options(scales) if fast is None else fast
        scales = scales_for_size(scales, tuple(seg.shape[-2:]), self.min_side)
        self._use_channels_last(not exact and opts.channels_last)
        if not exact:
            prob = refine_fast(self.model, image, seg, scales, opts, crop=PAD,
                               chunk=self.chunk_size, progress=progress, stats=stats,
                               guide=guide)
            return prob[:, 0, PAD:-PAD, PAD:-PAD]
        # the authors' way: flat query list in chunks, generic decoder
        bsz, _, hp, wp = seg.shape
        rows, cols = make_coord_axes((hp, wp), device=self.device)
        n_query = hp * wp
        spans = [(a, min(a + self.chunk_size, n_query))
                 for a in range(0, n_query, self.chunk_size)]
        cell = torch.tensor([2 / hp, 2 / wp], device=self.device).view(1, 1, 2)
        prob = seg
        for si, s in enumerate(scales):
            size = (max(1, round(hp * s)), max(1, round(wp * s)))
            img_s = F.interpolate(image, size=size, mode="bilinear", align_corners=True)
            seg_s = F.interpolate(seg, size=size, mode="bilinear", align_corners=True)
            stage = f"scale {s:g} ({si + 1}/{len(scales)})"
            if progress is not None:
                progress(stage, 0, len(spans))  # the stage starts: encoding
            feat = self.model.encode(img_s, seg_s)
            pixels = None
            if self.model.pixel_skip is not None:
                pixels = (image, seg) if guide is None else (image, seg, guide)
            logits = torch.empty(bsz, hp * wp, device=self.device)
            for ci, (a, b) in enumerate(spans):
                q = torch.arange(a, b, device=self.device)
                coord = torch.stack((rows[q // wp], cols[q % wp]), dim=-1)
                coord = coord.unsqueeze(0).expand(bsz, -1, -1)
                logits[:, a:b] = self.model.decode(feat, coord, cell.expand(bsz, b - a, 2),
                                                   pixels)
                if progress is not None:
                    progress(stage, ci + 1, len(spans))
            prob = torch.sigmoid(logits).view(bsz, 1, hp, wp)
            # The authors' rule: an (essentially) empty input mask gives an empty output.
            empty = (seg + 1).flatten(1).sum(dim=1) < 2
            prob[empty] = 0
            seg = (prob - 0.5) * 2
        return prob[:, 0, PAD:-PAD, PAD:-PAD]


def scales_for_size(
    scales: Sequence[float], size: tuple[int, int], min_side: int | None
) -> tuple[float, ...]:
    """The scales of the schedule worth running on a (padded) input of ``size``.

    CRM is weak when its encoder input is tiny (a 150-px ROI at 1/8 is 19 px, smaller than
    anything it was trained on): scales whose encoder input would have a shorter side than
    ``min_side`` are dropped. The largest scale always runs. ``min_side=None`` keeps all.
    """
    scales = tuple(scales)
    if min_side is None:
        return scales
    keep = tuple(s for s in scales if round(min(size) * s) >= min_side)
    return keep or (max(scales),)


def _padded(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and mask reflect-padded by ``PAD`` (the authors' padding)."""
    return reflect_pad(image), reflect_pad(mask)


def check_batch(image: torch.Tensor, mask: torch.Tensor) -> None:
    """Validate the batched refiner inputs: (B, 3, H, W) images and (B, 1, H, W) masks.

    Raises:
        ValueError: naming the shape that is wrong.
    """
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] != image.shape[0]:
        raise ValueError(f"mask must be (B, 1, H, W) with B={image.shape[0]}, got "
                         f"{tuple(mask.shape)}")
    if mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"image is {tuple(image.shape[-2:])} but mask is "
                         f"{tuple(mask.shape[-2:])}")


def check_guided_blend(weight: float) -> float:
    """The weight of the guided filter in :class:`CRMRefiner`'s output: a number in [0, 1]."""
    if isinstance(weight, (bool, np.bool_)) or not isinstance(weight, numbers.Real):
        raise ValueError(f"guided_blend must be a number in [0, 1], got {weight!r}")
    if not 0.0 <= float(weight) <= 1.0:  # NaN fails too
        raise ValueError(f"guided_blend must be in [0, 1], got {weight}")
    return float(weight)


def _check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    scales = tuple(float(s) for s in scales)
    if not scales:
        raise ValueError("scales must not be empty")
    if any(not (s > 0) or not math.isfinite(s) for s in scales):
        raise ValueError(f"scales must be positive numbers, got {scales}")
    return scales
