"""Binary mask metrics: IoU, boundary accuracy (mBA) and Boundary IoU, per object and per set.

Shape shorthand used in this module:
    H, W: height and width of one mask (prediction and ground truth share them)

Mask inputs are ``(H, W)`` arrays of dtype ``bool`` or ``uint8``. A ``uint8`` mask is read on the
0..255 scale and binarised at ``> 128``, as the official CascadePSP / CRM evaluation does
(``gt = gt > 128`` in its ``eval_post*.py``). A 0/1 ``uint8`` mask (what pycocotools decodes to)
therefore reads as EMPTY: pass it as ``mask.astype(bool)``. Any other dtype is a ``ValueError``.

Definitions:

* IoU of one object = |P & G| / |P | G|; the IoU of a set (BIG protocol) is pooled:
  sum of intersections / sum of unions (:class:`PooledIoU`). Every set number (and its NaN rule)
  comes from :mod:`crm_d2.evaluation.aggregate`.
* mBA (CascadePSP, ``util/compute_boundary_acc.py``): :func:`boundary_accuracy`.
* Boundary IoU (Cheng et al., CVPR 2021, boundary-iou-api ``mask_to_boundary``):
  :func:`boundary_iou`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from .aggregate import pooled_iou, summarize_objects

__all__ = [
    "BIG_EMPTY_COARSE_SUM",
    "BinaryMetrics",
    "ObjectScores",
    "PooledIoU",
    "apply_empty_coarse_rule",
    "binarize",
    "boundary_accuracy",
    "boundary_accuracy_radii",
    "boundary_dilation",
    "boundary_iou",
    "iou",
    "mask_to_boundary",
    "object_scores",
]

logger = logging.getLogger(__name__)

# The official BIG evaluation keeps the coarse mask as the answer when the sum of its 0..255 values
# is below 32 * 32 (i.e. the coarse mask is essentially empty).
BIG_EMPTY_COARSE_SUM = 32 * 32

_MBA_STEPS = 5
_BINARY_THRESHOLD = 128


def binarize(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    """Return a ``(H, W)`` bool copy-or-view of a ``bool`` or 0..255 ``uint8`` mask.

    Args:
        mask: ``(H, W)`` bool, or uint8 on the 0..255 scale (binarised at ``> 128``).
        name: name used in error messages.

    Returns:
        ``(H, W)`` bool array.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) array, got shape {mask.shape}")
    if mask.dtype == np.bool_:
        return mask
    if mask.dtype == np.uint8:
        return mask > _BINARY_THRESHOLD
    raise ValueError(
        f"{name} must be bool or uint8 (0..255, binarised at > 128), got dtype {mask.dtype}"
    )


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = binarize(pred, "pred")
    g = binarize(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt shapes differ: {p.shape} vs {g.shape}")
    return p, g


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mask IoU |P & G| / |P | G| of one object.

    Args:
        pred: ``(H, W)`` bool or 0..255 uint8 prediction.
        gt: ``(H, W)`` bool or 0..255 uint8 ground truth.

    Returns:
        IoU in [0, 1]; 1.0 when both masks are empty (nothing to disagree on).
    """
    p, g = _pair(pred, gt)
    inter = int(np.count_nonzero(p & g))
    union = int(np.count_nonzero(p | g))
    return 1.0 if union == 0 else inter / union


@dataclass
class PooledIoU:
    """Accumulates IoU over a set of objects.

    ``pooled`` is the BIG-style set IoU (sum of intersections / sum of unions); ``ious`` keeps the
    per-object IoUs and ``mean`` is their mean.
    """

    intersection: int = 0
    union: int = 0
    ious: list[float] = field(default_factory=list)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> float:
        """Add one object (``(H, W)`` masks, see :func:`iou`); return its IoU."""
        p, g = _pair(pred, gt)
        inter = int(np.count_nonzero(p & g))
        union = int(np.count_nonzero(p | g))
        self.intersection += inter
        self.union += union
        value = 1.0 if union == 0 else inter / union
        self.ious.append(value)
        return value

    def __len__(self) -> int:
        return len(self.ious)

    @property
    def pooled(self) -> float:
        """Sum of intersections / sum of unions; NaN with no objects, 1.0 if all unions are 0."""
        return pooled_iou(self.intersection, self.union, len(self.ious))

    @property
    def mean(self) -> float:
        """Mean per-object IoU; NaN with no objects."""
        return float(np.mean(self.ious)) if self.ious else math.nan


def boundary_accuracy_radii(height: int, width: int) -> list[int]:
    """The 5 band radii of mBA for an ``height x width`` image.

    With ``R = (H + W) / 300`` (a float), ``r_i = 1 + int((R - 1) / 5 * i)`` for ``i = 0..4``.
    ``int`` truncates toward zero, so images with ``H + W < 300`` (``R < 1``) use radius 1 for
    every step (a floor would give radius 0 and an empty band).
    """
    max_radius = (width + height) / 300
    return [1 + int((max_radius - 1) / _MBA_STEPS * i) for i in range(_MBA_STEPS)]


def boundary_accuracy(pred: np.ndarray, gt: np.ndarray) -> float:
    """mBA of CascadePSP for one object.

    For each radius ``r`` of :func:`boundary_accuracy_radii`, the band is the morphological gradient
    (dilation minus erosion, OpenCV's default borders: the image border itself is not an edge) of
    the binary ground truth with the elliptical ``(2r+1) x (2r+1)`` kernel of
    ``cv2.getStructuringElement(cv2.MORPH_ELLIPSE, ...)``; the accuracy is the share of band pixels
    where the binary prediction equals the ground truth. mBA is the mean of the 5 accuracies.

    Empty band: the band is empty exactly when the ground truth is constant (all 0 or all 1). The
    official code then divides 0 by 0 with numpy and returns NaN (with a RuntimeWarning); this
    function returns NaN too (without the warning); the set aggregator
    (:func:`~crm_d2.evaluation.aggregate.summarize_objects`) leaves such objects out of the set's
    mBA and counts them.

    Args:
        pred: ``(H, W)`` bool or 0..255 uint8 prediction.
        gt: ``(H, W)`` bool or 0..255 uint8 ground truth.

    Returns:
        mBA in [0, 1], or NaN when the band is empty.
    """
    p, g = _pair(pred, gt)
    h, w = g.shape
    g_u8 = g.astype(np.uint8)
    correct = p == g
    accs = []
    for radius in boundary_accuracy_radii(h, w):
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        band = cv2.morphologyEx(g_u8, cv2.MORPH_GRADIENT, kernel) > 0
        n_band = int(np.count_nonzero(band))
        if n_band == 0:
            return math.nan
        accs.append(int(np.count_nonzero(correct[band])) / n_band)
    return sum(accs) / _MBA_STEPS


def boundary_dilation(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    """Boundary width ``d = max(1, round(dilation_ratio * sqrt(H^2 + W^2)))`` in pixels.

    ``round`` is Python's (ties to even), as in the boundary-iou-api: a product of exactly 2.5
    gives 2.
    """
    if dilation_ratio <= 0:
        raise ValueError(f"dilation_ratio must be > 0, got {dilation_ratio}")
    diagonal = math.sqrt(height**2 + width**2)
    return max(1, int(round(dilation_ratio * diagonal)))


def mask_to_boundary(
    mask: np.ndarray, dilation_ratio: float = 0.02, *, dilation: int | None = None
) -> np.ndarray:
    """Inner boundary band of a mask (boundary-iou-api ``mask_to_boundary``).

    The mask is padded by one row/column of zeros on every side (so that a mask cut by the image
    border has a boundary there too), eroded ``d`` times with a 3x3 square kernel, cropped back;
    the boundary is the mask minus its erosion: the mask pixels within ``d`` (chessboard distance)
    of a background pixel or of the outside of the image.

    Args:
        mask: ``(H, W)`` bool or 0..255 uint8 mask.
        dilation_ratio: ``d`` relative to the image diagonal (see :func:`boundary_dilation`).
        dilation: use this ``d`` (pixels, >= 1) instead of the one derived from the mask's size.

    Returns:
        ``(H, W)`` bool boundary.
    """
    m = binarize(mask).astype(np.uint8)
    h, w = m.shape
    if dilation is None:
        dilation = boundary_dilation(h, w, dilation_ratio)
    elif dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    padded = cv2.copyMakeBorder(m, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=dilation)
    return (m > 0) & (eroded[1 : h + 1, 1 : w + 1] == 0)


def boundary_iou(pred: np.ndarray, gt: np.ndarray, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU (Cheng et al. 2021) of one object: IoU of the two :func:`mask_to_boundary` sets.

    Both boundaries use the same ``d`` from the image diagonal. Every non-empty mask has a
    non-empty boundary, so the union is empty only when both masks are empty: then 1.0 is returned
    (the official snippet would divide 0 by 0).

    Args:
        pred: ``(H, W)`` bool or 0..255 uint8 prediction.
        gt: ``(H, W)`` bool or 0..255 uint8 ground truth.
        dilation_ratio: boundary width relative to the image diagonal.

    Returns:
        Boundary IoU in [0, 1].
    """
    p, g = _pair(pred, gt)
    d = boundary_dilation(*g.shape, dilation_ratio)
    pb = mask_to_boundary(p, dilation=d)
    gb = mask_to_boundary(g, dilation=d)
    inter = int(np.count_nonzero(pb & gb))
    union = int(np.count_nonzero(pb | gb))
    return 1.0 if union == 0 else inter / union


def apply_empty_coarse_rule(coarse: np.ndarray, refined: np.ndarray) -> np.ndarray:
    """The official BIG evaluation's answer: ``coarse`` if essentially empty, else ``refined``.

    Args:
        coarse: ``(H, W)`` uint8 0..255 coarse mask; "essentially empty" means the sum of its
            values is below :data:`BIG_EMPTY_COARSE_SUM` (1024).
        refined: ``(H, W)`` refined mask (any dtype accepted by :func:`binarize`).

    Returns:
        ``coarse`` or ``refined`` (the object itself, not a copy).
    """
    coarse = np.asarray(coarse)
    if coarse.dtype != np.uint8:
        raise ValueError(f"coarse must be uint8 on the 0..255 scale, got dtype {coarse.dtype}")
    if coarse.shape != np.shape(refined):
        raise ValueError(f"coarse and refined shapes differ: {coarse.shape} vs {refined.shape}")
    if int(coarse.sum(dtype=np.int64)) < BIG_EMPTY_COARSE_SUM:
        return coarse
    return refined


@dataclass(frozen=True)
class ObjectScores:
    """Metrics of one prediction against its ground truth."""

    intersection: int
    union: int
    iou: float
    mba: float
    boundary_iou: float


def object_scores(pred: np.ndarray, gt: np.ndarray, dilation_ratio: float = 0.02) -> ObjectScores:
    """IoU (with its counts), mBA and Boundary IoU of one ``(H, W)`` prediction."""
    p, g = _pair(pred, gt)
    inter = int(np.count_nonzero(p & g))
    union = int(np.count_nonzero(p | g))
    return ObjectScores(
        intersection=inter,
        union=union,
        iou=1.0 if union == 0 else inter / union,
        mba=boundary_accuracy(p, g),
        boundary_iou=boundary_iou(p, g, dilation_ratio),
    )


class BinaryMetrics:
    """Accumulates binary-mask metrics over a set of objects (BIG-style evaluation).

    Call :meth:`update` once per object with the refined mask, the ground truth and optionally the
    coarse input; :meth:`summary` reports fractions in [0, 1]:

    * ``iou``: pooled IoU (sum of intersections / sum of unions), ``mean_iou``: mean per object,
    * ``mba``: mean mBA over the objects whose mBA is defined, ``mba_undefined``: how many are
      not (constant ground truth; the NaN rule of :mod:`crm_d2.evaluation.aggregate`),
    * ``boundary_iou``: mean Boundary IoU,
    * ``num_objects``,
    * with coarse masks: the same for the coarse masks (``coarse_iou`` ...), and
      ``worse_fraction``, the share of objects whose refined IoU is strictly below their coarse IoU.
    """

    def __init__(self, dilation_ratio: float = 0.02) -> None:
        self.dilation_ratio = dilation_ratio
        self.refined: list[ObjectScores] = []
        self.coarse: list[ObjectScores] = []

    def __len__(self) -> int:
        return len(self.refined)

    def update(
        self, pred: np.ndarray, gt: np.ndarray, coarse: np.ndarray | None = None
    ) -> ObjectScores:
        """Add one object; all masks ``(H, W)`` bool or 0..255 uint8. Returns the refined scores.

        Either every call or no call passes ``coarse``.
        """
        if self.refined and (coarse is None) != (not self.coarse):
            raise ValueError("pass coarse masks for every object or for none")
        scores = object_scores(pred, gt, self.dilation_ratio)
        if coarse is not None:
            self.coarse.append(object_scores(coarse, gt, self.dilation_ratio))
        self.refined.append(scores)
        return scores

    def summary(self) -> dict[str, float]:
        """Set metrics as fractions (see the class docstring)."""
        out = summarize_objects(self.refined)
        if self.coarse:
            coarse = summarize_objects(self.coarse, "coarse_")
            del coarse["coarse_num_objects"]
            out.update(coarse)
            worse = sum(r.iou < c.iou for r, c in zip(self.refined, self.coarse))
            out["worse_fraction"] = worse / len(self.refined)
        return out
