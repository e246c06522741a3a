"""The CRM paper's training perturbation of a ground-truth mask (Shen et al., CVPR 2022, §3).

Shape shorthand: H, W = mask height and width. Masks are ``np.uint8`` arrays of shape (H, W);
binary masks hold 0 / 255 and any non-zero pixel counts as foreground unless stated otherwise.

:func:`perturb_mask` reproduces the CRM/CascadePSP training perturbation: contour
simplification (:func:`simplify_contours`) followed by random rectangle dilate/erode edits
(:func:`random_region_edits`) until the IoU drops below a target. The other coarse-mask kinds
are in :mod:`crm_d2.coarse.kinds`.

All randomness comes from an explicit ``np.random.Generator``; nothing touches global state.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

__all__ = [
    "binary_iou",
    "perturb_mask",
    "random_iou_target",
    "random_region_edits",
    "simplify_contours",
]


def _check_mask(mask: np.ndarray, name: str = "gt") -> None:
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        shape = getattr(mask, "shape", None)
        raise ValueError(f"{name} must be a 2-D numpy array (H, W), got shape {shape}")
    if mask.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype uint8 (values 0..255), got {mask.dtype}")


def binary_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of the non-zero pixels of two masks, as the authors' ``compute_iou``.

    Args:
        a, b: (H, W) arrays; non-zero = foreground.

    Returns:
        (|a & b| + 1e-6) / (|a | b| + 1e-6); two empty masks give 1.0.
    """
    if a.shape != b.shape:
        raise ValueError(f"masks must have the same shape, got {a.shape} and {b.shape}")
    fa = a != 0
    fb = b != 0
    inter = np.count_nonzero(fa & fb)
    union = np.count_nonzero(fa | fb)
    return (inter + 1e-6) / (union + 1e-6)


def random_iou_target(rng: np.random.Generator, low: float = 0.8, high: float = 1.0) -> float:
    """Draw an IoU target uniformly from [low, high) (the paper uses [0.8, 1.0))."""
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"need 0 <= low < high <= 1, got low={low}, high={high}")
    return float(low + (high - low) * rng.random())


def simplify_contours(
    gt: np.ndarray,
    rng: np.random.Generator,
    regional_sample_rate: float = 0.1,
    sample_rate: float = 0.1,
    min_points: int = 10,
) -> np.ndarray:
    """Step (a) of the CRM perturbation: cut a protrusion and coarsen every contour.

    Behaviour of the authors' ``modify_boundary`` (with ``move_rate=0``, as used in training):

    * all contours are found with ``RETR_LIST`` / ``CHAIN_APPROX_NONE`` (outer borders and hole
      borders alike); contours with fewer than ``min_points`` vertices are dropped;
    * for a contour of n vertices, r = int(n * regional_sample_rate) consecutive vertices are
      removed. Candidate runs start at i = 0 .. n-r-1 and are ranked by the squared distance
      between vertex i and vertex i+r (stable sort); the start is drawn uniformly among the
      best ceil(10%) candidates, so narrow protrusions tend to be cut off;
    * of the remaining n-r vertices a random subset of int((n-r) * sample_rate) is kept (in
      contour order);
    * all non-empty simplified contours are filled in ONE ``cv2.drawContours(..., -1, ...)``
      call, whose even-odd filling keeps a hole whose contour survived; holes with fewer than
      ``min_points`` border pixels (or none kept) are filled in.

    If no contour survives, the input mask is returned unchanged (as 0/255).

    Args:
        gt: (H, W) uint8, non-zero = foreground.
        rng: random generator.
        regional_sample_rate: fraction of consecutive vertices cut per contour.
        sample_rate: fraction of the remaining vertices kept.
        min_points: contours with fewer vertices are ignored.

    Returns:
        (H, W) uint8 mask with values 0 / 255.
    """
    _check_mask(gt)
    binary = np.where(gt != 0, 255, 0).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)

    simplified = []
    for contour in contours:
        n = contour.shape[0]
        if n < min_points:
            continue
        n_remove = int(n * regional_sample_rate)
        n_start = n - n_remove
        pts = contour[:, 0, :].astype(np.int64)
        dist = np.sum((pts[:n_start] - pts[n_remove : n_remove + n_start]) ** 2, axis=1)
        order = np.argsort(dist, kind="stable")
        n_candidates = math.ceil(0.1 * n_start)
        start = int(order[rng.integers(n_candidates)])
        kept = np.concatenate([contour[:start], contour[start + n_remove :]], axis=0)

        n_kept = kept.shape[0]
        n_sample = int(n_kept * sample_rate)
        if n_sample == 0:
            continue
        idx = np.sort(rng.choice(n_kept, size=n_sample, replace=False))
        simplified.append(np.ascontiguousarray(kept[idx]).astype(np.int32))

    if not simplified:
        return binary
    out = np.zeros_like(binary)
    cv2.drawContours(out, simplified, -1, 255, thickness=-1)
    return out


def _random_kernel(rng: np.random.Generator, legacy_kernels: bool) -> np.ndarray | None:
    """Structuring element of a random size in 3..9 and random shape (authors' choices).

    Shapes (each with p 1/4): square rectangle, ellipse, ellipse of half height, ellipse of half
    width. With ``legacy_kernels`` the released model's buggy draw is reproduced instead: the
    choice comes from {0, 1, 2, 3}, where 0 returns ``None`` (OpenCV's default 3x3 square) and
    the half-width ellipse never occurs.
    """
    size = int(rng.integers(3, 10))
    choice = int(rng.integers(0, 4)) if legacy_kernels else int(rng.integers(1, 5))
    if choice == 0:
        return None
    if choice == 1:
        return cv2.getStructuringElement(cv2.MORPH_RECT, (size, size))
    if choice == 2:
        return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    if choice == 3:
        return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size // 2))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size // 2, size))


def random_region_edits(
    mask: np.ndarray,
    iou_target: float,
    rng: np.random.Generator,
    max_rounds: int = 250,
    edits_per_round: int = 4,
    legacy_kernels: bool = False,
) -> np.ndarray:
    """Step (b) of the CRM perturbation (the authors' ``perturb_seg``).

    The mask is thresholded at 127. Then, for up to ``max_rounds`` rounds, ``edits_per_round``
    edits are applied, each on a random axis-aligned rectangle [ly:lh, lx:lw] (top-left uniform
    over the image, bottom-right uniform between it and the image corner):

    * with p 0.25 the rectangle's centre pixel is set to 0 or 255 (p 1/2 each), which lets the
      following morphology grow holes or islands;
    * with p 0.5 the rectangle is dilated, otherwise eroded, once, with a random kernel
      (see :func:`_random_kernel`). OpenCV treats the rectangle in isolation (its border does
      not see the pixels outside).

    After each round the IoU with the THRESHOLDED INPUT is checked, and the loop stops as soon
    as it is below ``iou_target``. The result can therefore overshoot the target by whatever
    the last round removed, and if ``max_rounds`` rounds never reach it (tiny or empty masks)
    the IoU stays above the target. Masks with a side <= 2 are returned thresholded, unedited.

    Args:
        mask: (H, W) uint8 mask, foreground > 127.
        iou_target: stop once IoU(result, input) < iou_target.
        rng: random generator.
        max_rounds: maximum number of rounds (250 in the paper).
        edits_per_round: edits between IoU checks (4 in the paper).
        legacy_kernels: reproduce the released model's kernel draw (see :func:`_random_kernel`).

    Returns:
        (H, W) uint8 mask with values 0 / 255.
    """
    _check_mask(mask, "mask")
    h, w = mask.shape
    reference = np.where(mask > 127, 255, 0).astype(np.uint8)
    seg = reference.copy()
    if h <= 2 or w <= 2:
        return seg

    for _ in range(max_rounds):
        for _ in range(edits_per_round):
            lx, ly = int(rng.integers(w)), int(rng.integers(h))
            lw, lh = int(rng.integers(lx + 1, w + 1)), int(rng.integers(ly + 1, h + 1))
            if rng.random() < 0.25:
                cx, cy = (lx + lw) // 2, (ly + lh) // 2
                seg[cy, cx] = int(rng.integers(2)) * 255
            region = np.ascontiguousarray(seg[ly:lh, lx:lw])
            if rng.random() < 0.5:
                kernel = _random_kernel(rng, legacy_kernels)
                seg[ly:lh, lx:lw] = cv2.dilate(region, kernel, iterations=1)
            else:
                kernel = _random_kernel(rng, legacy_kernels)
                seg[ly:lh, lx:lw] = cv2.erode(region, kernel, iterations=1)
        if binary_iou(seg, reference) < iou_target:
            break
    return seg


def perturb_mask(
    gt: np.ndarray,
    iou_target: float,
    rng: np.random.Generator,
    legacy_kernels: bool = False,
) -> np.ndarray:
    """CRM's coarse-mask perturbation (the authors' ``modify_boundary``; paper §3).

    ``simplify_contours`` then ``random_region_edits``. As in the authors' code, the IoU
    target of step (b) is measured against the output of step (a), NOT against ``gt``: the
    IoU of the result with ``gt`` is therefore below ``iou_target`` by the contour step's loss
    as well (usually a few points for smooth shapes, more for thin or detailed ones).

    Args:
        gt: (H, W) uint8, non-zero = foreground (the authors binarise the ground truth at > 0
            before calling this).
        iou_target: in (0, 1]; see above.
        rng: random generator.
        legacy_kernels: see :func:`random_region_edits`.

    Returns:
        (H, W) uint8 coarse mask with values 0 / 255.
    """
    _check_mask(gt)
    if not 0.0 < iou_target <= 1.0:
        raise ValueError(f"iou_target must be in (0, 1], got {iou_target}")
    # OpenCV's drawing functions need C-ordered arrays (pycocotools decodes Fortran-ordered ones)
    simplified = simplify_contours(np.ascontiguousarray(gt), rng)
    return random_region_edits(simplified, iou_target, rng, legacy_kernels=legacy_kernels)
