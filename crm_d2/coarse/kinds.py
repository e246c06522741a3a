"""Coarse masks made from ground truth: the one vocabulary of training, validation and crm-eval.

Each *kind* is a string; a *mix* joins kinds with ``+`` (optionally weighted, ``kind*W``) and
draws one kind per sample. Kinds, what they imitate and how they are made from a binary ground
truth ``gt`` (H x W, 0/255):

============================  ===================================================================
``perturb`` / ``perturb:LO-HI``  the CRM paper's training perturbation (Shen et al., CVPR 2022,
                               §3): contour simplification then random region edits down to an
                               IoU target drawn uniformly in [LO, HI) (default [0.8, 1.0)).
``stride<K>``                  a stride-K network's soft output: ``gt`` area-averaged to
                               1/K resolution and upsampled bilinearly (soft 0..255 map).
``stride<K>_binary``           the same thresholded at probability 0.5 (Panoptic FPN,
                               Mask2Former, argmax of upsampled logits).
``stride<K>_t<T>``             the same thresholded at probability T, e.g. ``stride8_t0.4``
                               (PanopticFCN thresholds its sigmoid masks at 0.4).
``maskrcnn`` / ``maskrcnn:M``  Mask R-CNN (He et al., ICCV 2017) as detectron2 runs it: the
                               ground truth inside its tight box rendered at M x M (default 28,
                               area-averaged: the ideal mask-head output), pasted back with
                               bilinear sampling over the box (zero outside it, as
                               ``grid_sample`` in ``paste_masks_in_image``) and thresholded
                               at 0.5.
``shift``                      ``gt`` translated by a small random offset (at most 3% of the
                               square root of its box area, at least 1 px).
``dilate``                     ``gt`` dilated or eroded (equal odds) by a small random radius
                               (at most 2% of the square root of its box area, at least 1 px).
============================  ===================================================================

Every kind returns an (H, W) uint8 0..255 mask; the binary ones return 0/255. Random kinds draw
from the generator they are given, so callers control reproducibility (training: per sample and
epoch; evaluation: per image and segment).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from .perturb import perturb_mask, random_iou_target

__all__ = [
    "BINARY_LEVEL",
    "CoarseKind",
    "CoarseMix",
    "parse_kinds",
    "render_maskrcnn",
    "render_stride",
]

BINARY_LEVEL = 128  # 0..255 value from which a soft coarse pixel counts as foreground (p > 0.5)

_LEGACY = {
    "contour": "perturb",
    "lowres": "stride<K> (lowres:K = stride<K>, e.g. stride8)",
    "lowres_binary": "stride4_binary, stride8_binary or stride16_binary",
    "mixed": "perturb+stride4+stride8+stride16",
}
_HELP = ("perturb, perturb:LO-HI, stride<K>, stride<K>_binary, stride<K>_t<T>, maskrcnn, "
         "maskrcnn:M, shift or dilate (e.g. stride8_binary)")
_STRIDE_RE = re.compile(r"^stride(\d+)(?:_(binary|t(\d*\.?\d+)))?$")


def _check_gt(gt: np.ndarray) -> np.ndarray:
    if not isinstance(gt, np.ndarray) or gt.ndim != 2:
        raise ValueError(f"gt must be an (H, W) array, got {getattr(gt, 'shape', type(gt))}")
    return np.ascontiguousarray(np.where(gt >= BINARY_LEVEL, 255, 0).astype(np.uint8))


def render_stride(gt: np.ndarray, k: int) -> np.ndarray:
    """Soft stride-``k`` rendering: area mean to ``ceil(H/k) x ceil(W/k)``, bilinear back.

    OpenCV ``INTER_AREA`` gives exact k x k block means when k divides the size;
    ``INTER_LINEAR`` upsampling uses half-pixel centres (``align_corners=False``).

    Args:
        gt: (H, W) uint8 0..255.
        k: integer factor >= 1 (1 returns a copy).

    Returns:
        (H, W) uint8 0..255.
    """
    if k == 1:
        return gt.copy()
    h, w = gt.shape
    small = cv2.resize(gt.astype(np.float32), (max(1, math.ceil(w / k)), max(1, math.ceil(h / k))),
                       interpolation=cv2.INTER_AREA)
    up = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(np.rint(up), 0, 255).astype(np.uint8)


def render_maskrcnn(gt: np.ndarray, m: int = 28) -> np.ndarray:
    """Mask R-CNN style coarse mask of one object (see the module table).

    Args:
        gt: (H, W) uint8 0/255 binary mask of ONE object.
        m: mask-head resolution (28 in Mask R-CNN).

    Returns:
        (H, W) uint8 0/255.
    """
    ys, xs = np.nonzero(gt)
    out = np.zeros_like(gt)
    if len(ys) == 0:
        return out
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    bh, bw = y1 - y0, x1 - x0
    head = cv2.resize(gt[y0:y1, x0:x1].astype(np.float32) / 255.0, (m, m),
                      interpolation=cv2.INTER_AREA)
    # Bilinear sampling of the m x m map at every pixel centre of the box, one pixel of margin
    # around it (grid_sample, align_corners=False, zeros outside the map).
    r0, r1 = max(0, y0 - 1), min(gt.shape[0], y1 + 1)
    c0, c1 = max(0, x0 - 1), min(gt.shape[1], x1 + 1)
    map_y = ((np.arange(r0, r1, dtype=np.float32) + 0.5 - y0) / bh * m - 0.5)
    map_x = ((np.arange(c0, c1, dtype=np.float32) + 0.5 - x0) / bw * m - 0.5)
    mx, my = (a.astype(np.float32) for a in np.meshgrid(map_x, map_y))
    pasted = cv2.remap(head, mx, my, interpolation=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    out[r0:r1, c0:c1] = np.where(pasted > 0.5, 255, 0).astype(np.uint8)
    return out


def _box_scale(gt: np.ndarray) -> float:
    ys, xs = np.nonzero(gt)
    if len(ys) == 0:
        return 0.0
    return math.sqrt(float(ys.max() - ys.min() + 1) * float(xs.max() - xs.min() + 1))


def _shift(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    limit = max(1, round(0.03 * _box_scale(gt)))
    while True:
        dy, dx = (int(v) for v in rng.integers(-limit, limit + 1, size=2))
        if dy or dx:
            break
    mat = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(gt, mat, (gt.shape[1], gt.shape[0]), flags=cv2.INTER_NEAREST,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _dilate(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    r = int(rng.integers(1, max(1, round(0.02 * _box_scale(gt))) + 1))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    op = cv2.dilate if rng.random() < 0.5 else cv2.erode
    return op(gt, kernel)


@dataclass(frozen=True)
class CoarseKind:
    """One coarse-mask kind (see the module docstring). Build it with :meth:`parse`.

    Attributes:
        family: ``"perturb"``, ``"stride"``, ``"maskrcnn"``, ``"shift"`` or ``"dilate"``.
        k: stride factor (``stride``) or head resolution (``maskrcnn``).
        threshold: probability threshold of a binary ``stride`` kind (None = soft).
        iou_range: [low, high) IoU target of ``perturb``.
    """

    family: str
    k: int = 0
    threshold: float | None = None
    iou_range: tuple[float, float] = (0.8, 1.0)

    @classmethod
    def parse(cls, text: str) -> CoarseKind:
        """``"stride8_binary"`` -> CoarseKind; raises ValueError naming the accepted forms."""
        t = str(text).strip()
        base, _, arg = t.partition(":")
        if base in _LEGACY:
            raise ValueError(f"coarse kind {t!r} was renamed: use {_LEGACY[base]}")
        try:
            if base == "perturb":
                if not arg:
                    return cls("perturb")
                low, sep, high = arg.partition("-")
                lo, hi = float(low), float(high)
                if not sep or not 0.0 < lo < hi <= 1.0:
                    raise ValueError("need 0 < LO < HI <= 1")
                return cls("perturb", iou_range=(lo, hi))
            if base == "maskrcnn":
                m = int(arg) if arg else 28
                if m < 2:
                    raise ValueError("M must be >= 2")
                return cls("maskrcnn", k=m)
            if base in ("shift", "dilate") and not arg:
                return cls(base)
            match = _STRIDE_RE.match(t)
            if match:
                k = int(match.group(1))
                if k < 2:
                    raise ValueError("K must be >= 2")
                thr = None
                if match.group(2) == "binary":
                    thr = 0.5
                elif match.group(3) is not None:
                    thr = float(match.group(3))
                    if not 0.0 < thr < 1.0:
                        raise ValueError("T must be in (0, 1)")
                return cls("stride", k=k, threshold=thr)
        except ValueError as e:
            raise ValueError(f"bad coarse kind {t!r} ({e}); use {_HELP}") from e
        raise ValueError(f"unknown coarse kind {t!r}; use {_HELP}")

    @property
    def name(self) -> str:
        """The canonical spelling (``parse(kind.name) == kind``)."""
        if self.family == "perturb":
            lo, hi = self.iou_range
            return "perturb" if self.iou_range == (0.8, 1.0) else f"perturb:{lo:g}-{hi:g}"
        if self.family == "maskrcnn":
            return "maskrcnn" if self.k == 28 else f"maskrcnn:{self.k}"
        if self.family == "stride":
            if self.threshold is None:
                return f"stride{self.k}"
            if self.threshold == 0.5:
                return f"stride{self.k}_binary"
            return f"stride{self.k}_t{self.threshold:g}"
        return self.family

    @property
    def binary(self) -> bool:
        """Whether the masks are 0/255 (everything but the soft ``stride<K>``)."""
        return not (self.family == "stride" and self.threshold is None)

    @property
    def random(self) -> bool:
        """Whether :meth:`render` draws from its generator."""
        return self.family in ("perturb", "shift", "dilate")

    def render(self, gt: np.ndarray, rng: np.random.Generator | None = None,
               legacy_kernels: bool = False) -> np.ndarray:
        """Coarse mask of one ground-truth object.

        Args:
            gt: (H, W) mask, 0..255 (binarised at 128) or bool.
            rng: random generator (needed by the random kinds).
            legacy_kernels: ``perturb`` only: the released model's morphology-kernel draw
                (see :func:`~crm_d2.coarse.perturb.perturb_mask`).

        Returns:
            (H, W) uint8 0..255.
        """
        if gt.dtype == bool:
            gt = gt.astype(np.uint8) * 255
        fg = _check_gt(gt)
        if self.random and rng is None:
            raise ValueError(f"coarse kind {self.name!r} needs a random generator")
        if self.family == "perturb":
            target = random_iou_target(rng, *self.iou_range)
            return perturb_mask(fg, target, rng, legacy_kernels=legacy_kernels)
        if self.family == "maskrcnn":
            return render_maskrcnn(fg, self.k)
        if self.family == "shift":
            return _shift(fg, rng) if fg.any() else fg
        if self.family == "dilate":
            return _dilate(fg, rng) if fg.any() else fg
        soft = render_stride(fg, self.k)
        if self.threshold is None:
            return soft
        return np.where(soft.astype(np.float32) > self.threshold * 255.0, 255, 0).astype(np.uint8)


@dataclass(frozen=True)
class CoarseMix:
    """Several kinds, one drawn per sample with the given weights: ``"perturb+stride8_binary*2"``.

    Attributes:
        kinds: the kinds.
        weights: their relative weights (same length).
    """

    kinds: tuple[CoarseKind, ...]
    weights: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> CoarseMix:
        """Parse ``kind[*W]+kind[*W]+...``; a kind may appear once."""
        if str(text).strip() in _LEGACY:
            raise ValueError(f"coarse mix {text!r} was renamed: use {_LEGACY[str(text).strip()]}")
        kinds, weights = [], []
        for part in str(text).split("+"):
            name, star, w = part.strip().partition("*")
            try:
                weight = float(w) if star else 1.0
            except ValueError:
                weight = -1.0
            if not weight > 0:
                raise ValueError(f"bad weight in {part!r} of {text!r}: use kind*W with W > 0")
            kinds.append(CoarseKind.parse(name))
            weights.append(weight)
        names = [k.name for k in kinds]
        if len(set(names)) != len(names):
            raise ValueError(f"coarse mix {text!r} lists a kind twice; give it a weight instead")
        return cls(tuple(kinds), tuple(weights))

    @property
    def name(self) -> str:
        return "+".join(k.name if w == 1 else f"{k.name}*{w:g}"
                        for k, w in zip(self.kinds, self.weights))

    def draw(self, rng: np.random.Generator) -> CoarseKind:
        """One kind, drawn with the mix's weights (no draw for a single kind)."""
        if len(self.kinds) == 1:
            return self.kinds[0]
        p = np.asarray(self.weights) / sum(self.weights)
        return self.kinds[int(np.searchsorted(np.cumsum(p), rng.random(), side="right").clip(
            0, len(self.kinds) - 1))]


def parse_kinds(texts: Sequence[str] | str) -> tuple[CoarseKind, ...]:
    """A list of kinds (or one ``+``-joined string) -> kinds, for evaluations over several."""
    if isinstance(texts, str):
        texts = texts.split("+")
    return tuple(CoarseKind.parse(t) for t in texts)
