"""CascadePSP inference: the global and local steps and the public :class:`CascadePSPRefiner`.

CascadePSP (Cheng et al., *CascadePSP: Toward Class-Agnostic and Very High-Resolution
Segmentation via Global and Local Refinement*, CVPR 2020) refines a mask in two steps (Sec. 3.2
of the paper; the numbers below are those of the public release, github.com/hkchengrex/CascadePSP
and its pip package ``segmentation-refinement`` 0.6):

- **Global step**: the image and the mask are resized so that the long side is ``L`` (900):
  'area' averaging when shrinking, bicubic (image) and bilinear (mask) when enlarging. The
  network runs its whole 3-level cascade once.
- **Local step** (skipped in ``fast`` mode): at the original resolution, ``L x L`` crops on a
  grid of stride ``L // 2 - 32`` (418 px for L = 900), shifted inside the image at its borders
  (a side shorter than ``L`` gives one crop spanning it). A crop is refined by levels 2 and 3 of
  the cascade with the global output as input (coarse mask: the global prediction upsampled
  and thresholded at 0.5; stride-8 input: the global stride-4 prediction upsampled), unless the
  thresholded global prediction covers more than 90% or less than 10% of it. 16 px are chipped
  off every crop side that is not on the image border and the overlaps are averaged; pixels no
  refined crop covers keep the thresholded global prediction. As in the release, the local step
  also runs when the image is smaller than ``L`` (then the single crop is the whole image at its
  own resolution).
- **Fast mode** (global step only): the global output resized back to the input size ('area'
  when shrinking, bilinear with ``align_corners=True`` when enlarging).

The network needs sizes that are multiples of 8: as in the release, inputs whose height or width
is not are padded at the bottom/right to ``(n // 8 + 1) * 8`` on BOTH axes (image with 0, masks
with -1) and the outputs are cropped back.

Shape shorthand: B batch of same-size inputs, H/W input size, h/w the size of one network call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from .frozen import FrozenNetwork
from .inference import check_batch, prepare_inputs
from .modeling.cascadepsp import CascadePSPNet

__all__ = [
    "DEFAULT_L",
    "CascadePSPRefiner",
    "global_step",
    "local_step",
    "resize_long_side",
]

logger = logging.getLogger(__name__)

DEFAULT_L = 900
CHIP = 16  # px chipped off inner crop borders in the local step
MIN_L = 2 * (2 * CHIP + 1)  # the local step moves by L // 2 - 2 * CHIP >= 1 px
FOREGROUND_RANGE = (0.1, 0.9)  # crops whose global foreground share is outside are skipped

ProgressFn = Callable[[str, int, int], None]


def resize_long_side(x: Tensor, size: int, mode: str) -> Tensor:
    """Resize (B, C, h, w) by the factor ``size / max(h, w)`` (the release's arithmetic).

    The output size is ``floor(n * factor)`` and bilinear / bicubic sampling uses the factor
    itself (``align_corners=False``), exactly as ``F.interpolate(scale_factor=...)`` does.
    """
    factor = size / max(x.shape[-2:])
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(x, scale_factor=factor, mode=mode, align_corners=False)
    return F.interpolate(x, scale_factor=factor, mode=mode)


def _forward_padded(
    model: CascadePSPNet,
    img: Tensor,
    seg: Tensor,
    inter_s8: Tensor | None = None,
    inter_s4: Tensor | None = None,
) -> dict[str, Tensor]:
    """Run ``model`` on inputs of any size (see the module docstring on the padding).

    Args: (B, 3, h, w) image, (B, 1, h, w) mask and optional intermediate inputs in [-1, 1].
    Returns: ``"pred"``, ``"pred_s4"`` as (B, 1, h, w) probabilities.
    """
    h, w = seg.shape[-2:]
    if h % 8 or w % 8:
        hp, wp = (h // 8 + 1) * 8, (w // 8 + 1) * 8

        def pad(x: Tensor, value: float) -> Tensor:
            return F.pad(x, (0, wp - w, 0, hp - h), value=value)

        img, seg = pad(img, 0.0), pad(seg, -1.0)
        inter_s8 = None if inter_s8 is None else pad(inter_s8, -1.0)
        inter_s4 = None if inter_s4 is None else pad(inter_s4, -1.0)
    out = model(img, seg, inter_s8, inter_s4)
    return {k: out[k][:, :, :h, :w] for k in ("pred", "pred_s4")}


def _global_input(img: Tensor, seg: Tensor, L: int) -> tuple[Tensor, Tensor]:
    """Image and mask resized so that the long side is ``L`` (unchanged if it already is)."""
    side = max(seg.shape[-2:])
    if side > L:
        return resize_long_side(img, L, "area"), resize_long_side(seg, L, "area")
    if side < L:
        return resize_long_side(img, L, "bicubic"), resize_long_side(seg, L, "bilinear")
    return img, seg


def global_step(model: CascadePSPNet, img: Tensor, seg: Tensor, L: int) -> dict[str, Tensor]:
    """The global step: the whole cascade on the image resized to long side ``L``.

    Args:
        img: (B, 3, H, W) ImageNet-normalised image.
        seg: (B, 1, H, W) coarse mask in [-1, 1].
        L: long side of the network input.

    Returns:
        ``"pred"`` and ``"pred_s4"``: (B, 1, h, w) probabilities at the resized size (h, w).
    """
    return _forward_padded(model, *_global_input(img, seg, L))


def _crop_starts(n: int, L: int, step: int) -> list[int]:
    """Start of every crop along an axis of length ``n`` (shifted inside, clipped at 0)."""
    starts = []
    for i in range(n // step + 1):
        start = i * step
        if start + L > n:
            start = n - L
        starts.append(max(0, start))
    return starts


def local_step(
    model: CascadePSPNet,
    img: Tensor,
    global_pred: Tensor,
    global_s4: Tensor,
    L: int,
    progress: ProgressFn | None = None,
) -> Tensor:
    """The local step at the input resolution (see the module docstring).

    Args:
        img: (B, 3, H, W) ImageNet-normalised image at full resolution.
        global_pred: (B, 1, h, w) final (stride-1 head) probability of :func:`global_step`,
            at the size (h, w) of the global step.
        global_s4: (B, 1, h, w) stride-4 head probability of :func:`global_step`.
        L: crop size.
        progress: optional callback ``progress(stage, done, total)`` per crop position.

    Returns:
        (B, 1, H, W) refined probabilities.
    """
    bsz, _, height, width = img.shape
    size = (height, width)
    seg = (F.interpolate(global_pred, size=size, mode="bilinear", align_corners=False) > 0.5)
    seg = seg.float() * 2 - 1
    s8 = F.interpolate(global_s4, size=size, mode="bilinear", align_corners=False) * 2 - 1
    total = torch.zeros_like(seg)
    weight = torch.zeros_like(seg)
    step = L // 2 - 2 * CHIP
    # x outer, y inner, each crop once (the release's order of accumulation)
    positions = list(dict.fromkeys(
        (y0, x0) for x0 in _crop_starts(width, L, step) for y0 in _crop_starts(height, L, step)
    ))
    lo, hi = FOREGROUND_RANGE
    refined = 0
    for done, (y0, x0) in enumerate(positions, start=1):
        y1, x1 = min(height, y0 + L), min(width, x0 + L)
        seg_c = seg[:, :, y0:y1, x0:x1]
        share = (seg_c > 0).float().flatten(1).mean(dim=1)
        keep = ((share <= hi) & (share >= lo)).nonzero()[:, 0]
        refined += len(keep)
        if len(keep):
            sub = None if len(keep) == bsz else keep
            out = _forward_padded(model, *(x if sub is None else x.index_select(0, sub) for x in
                                           (img[:, :, y0:y1, x0:x1], seg_c,
                                            s8[:, :, y0:y1, x0:x1])))["pred"]
            if sub is not None:  # skipped samples add 0 (exact)
                out = torch.zeros_like(seg_c).index_copy_(0, sub, out)
            # chip CHIP px off the sides that are not on the image border
            cy0, cx0 = (CHIP if y0 != 0 else 0), (CHIP if x0 != 0 else 0)
            cy1, cx1 = (CHIP if y1 != height else 0), (CHIP if x1 != width else 0)
            out = out[:, :, cy0 : out.shape[-2] - cy1, cx0 : out.shape[-1] - cx1]
            region = (..., slice(y0 + cy0, y1 - cy1), slice(x0 + cx0, x1 - cx1))
            total[region] += out
            counted = torch.zeros(bsz, 1, 1, 1, device=seg.device)
            counted[keep] = 1
            weight[region] += counted
        if progress is not None:
            progress("local step", done, len(positions))
    logger.debug("local step: %d crop positions, %d of %d crops refined (L=%d)",
                 len(positions), refined, bsz * len(positions), L)
    return torch.where(weight == 0, (seg + 1) / 2, total / weight)


def _fast_output(pred: Tensor, size: tuple[int, int]) -> Tensor:
    """The global prediction (B, 1, h, w) back at the input ``size`` (fast mode)."""
    if pred.shape[-2:] == size:
        return pred
    if max(pred.shape[-2:]) > max(size):  # the input was enlarged to L
        return F.interpolate(pred, size=size, mode="area")
    return F.interpolate(pred, size=size, mode="bilinear", align_corners=True)


class CascadePSPRefiner(FrozenNetwork):
    """A frozen CascadePSP network with the paper's global (+ local) inference.

    Same interface as :class:`~crm_d2.inference.CRMRefiner`: build it with
    :meth:`from_checkpoint`, refine one numpy mask with :meth:`refine`, or batches of tensors
    with :meth:`refine_tensors` (what :func:`crm_d2.segments.refine_segments` calls).

    Args:
        model: the network (kept in eval mode, no gradients).
        device: torch device.
        L: long side of the global step and crop size of the local step (900 in the paper; a
            lower value uses less memory, and in fast mode runs faster).
        fast: global step only.
        binarize: threshold the coarse mask at 0.5 first, as the release does (it was trained
            on binary masks); False passes soft masks as they are.
        metadata: checkpoint metadata (kept as :attr:`metadata`).

    Example::

        refiner = CascadePSPRefiner.from_checkpoint("model", device="cpu")
        prob = refiner.refine(image_rgb_uint8, coarse_mask_uint8)  # HxW float32 in [0, 1]
    """

    kind = "cascadepsp"

    def __init__(
        self,
        model: CascadePSPNet,
        device: torch.device | str = "cpu",
        *,
        L: int = DEFAULT_L,
        fast: bool = False,
        binarize: bool = True,
        metadata: dict | None = None,
    ) -> None:
        self._freeze(model, torch.device(device))
        self.L = _check_L(L)
        self.fast = bool(fast)
        self.binarize = bool(binarize)
        self.metadata = dict(metadata or {})

    @classmethod
    def from_checkpoint(
        cls, path: str | None = None, device: str = "cpu", **kwargs
    ) -> CascadePSPRefiner:
        """Load CascadePSP weights from ``path`` (never downloads anything).

        Accepts the released file ``model`` (the asset of github.com/hkchengrex/CascadePSP
        release v1.0, also what ``segmentation-refinement`` stores in
        ``~/.segmentation-refinement/model``), a plain state dict, and the project's checkpoint
        format (:func:`crm_d2.checkpoint.save_cascadepsp`); see :mod:`crm_d2.checkpoint` for
        the errors on bad files. ``kwargs`` go to the constructor (``L``, ``fast``,
        ``binarize``); a project checkpoint's stored ``L`` is used when none is given.
        """
        from .checkpoint import CASCADEPSP_HINT, CheckpointError, load_cascadepsp

        if path is None:
            raise CheckpointError(
                f"crm_d2 ships no CascadePSP weights: pass the path of the released file. "
                f"{CASCADEPSP_HINT}"
            )
        model, meta = load_cascadepsp(path)
        if kwargs.get("L") is None:
            kwargs.pop("L", None)
            if meta.get("L"):
                kwargs["L"] = int(meta["L"])
        return cls(model, device, metadata=meta, **kwargs)

    def settings_record(self) -> dict:
        """The inference settings that shape the outputs (stored with cached results)."""
        return {"refiner": self.kind, "L": self.L, "fast": self.fast,
                "binarize": self.binarize}

    # ---------------------------------------------------------------- numpy entry point
    @torch.no_grad()
    def refine(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        *,
        fast: bool | None = None,
        L: int | None = None,
        progress: ProgressFn | None = None,
    ) -> np.ndarray:
        """Refine one mask of one image.

        Args:
            image: HxWx3 uint8 RGB; HxW (or HxWx1) gray is repeated to RGB; HxWx4 RGBA drops
                alpha.
            mask: HxW uint8 0..255, bool, or float in [0, 1] (the coarse mask; thresholded at
                0.5 unless the refiner was built with ``binarize=False``).
            fast, L: override the refiner's settings for this call.
            progress: optional callback ``progress(stage, done, total)``.

        Returns:
            HxW float32 probability map in [0, 1]; ``> 0.5`` is the refined binary mask.
        """
        img_t, msk_t = prepare_inputs(image, mask, self.device)
        out = self.refine_tensors(img_t, msk_t, fast=fast, L=L, progress=progress)
        return out[0].cpu().numpy()

    # ---------------------------------------------------------------- tensor entry point
    @torch.no_grad()
    def refine_tensors(
        self,
        image: Tensor,
        mask: Tensor,
        scales: Sequence[float] | None = None,
        exact: bool = False,
        progress: ProgressFn | None = None,
        *,
        fast: bool | None = None,
        L: int | None = None,
    ) -> Tensor:
        """Refine a batch of same-size ROIs (the entry point of the detectron2 layer).

        Args:
            image: (B, 3, H, W) ImageNet-normalised float
                (:func:`crm_d2.inference.normalize_image`).
            mask: (B, 1, H, W) float in [-1, 1] (:func:`crm_d2.inference.normalize_mask`).
            scales: CRM's input scales; CascadePSP has none, so it must be None.
            exact: accepted for interface compatibility: CascadePSP has one code path.
            progress: optional callback ``progress(stage, done, total)``.
            fast, L: override the refiner's settings for this call.

        Returns:
            (B, H, W) float32 probabilities on the refiner's device.
        """
        del exact  # one code path: the release's arithmetic
        if scales is not None:
            raise ValueError(
                "CascadePSP has no input scales (that is a CRM setting): leave scales unset and "
                "choose the resolution with L"
            )
        check_batch(image, mask)
        fast = self.fast if fast is None else bool(fast)
        L = self.L if L is None else _check_L(L)
        image = image.to(self.device, torch.float32)
        seg = mask.to(self.device, torch.float32)
        if self.binarize:
            seg = (seg > 0).float() * 2 - 1
        glob = global_step(self.model, image, seg, L)
        if progress is not None:
            progress("global step", 1, 1)
        if fast:
            out = _fast_output(glob["pred"], tuple(seg.shape[-2:]))
        else:
            out = local_step(self.model, image, glob["pred"], glob["pred_s4"], L, progress)
        return out[:, 0]


def _check_L(L: int) -> int:
    if isinstance(L, bool) or int(L) != L or L < MIN_L:
        raise ValueError(
            f"L must be an integer >= {MIN_L} (the local step moves by L // 2 - {2 * CHIP} px); "
            f"got {L!r}. The paper uses 900."
        )
    return int(L)
