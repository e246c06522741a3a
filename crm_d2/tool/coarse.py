"""Coarse predictions made from ground truth, for demos and benchmarks without a segmentation model.

Shape shorthand: H, W image size; N segments of one image.

Two kinds (``--coarse-from-gt``):

* ``lowres:K``: each ground-truth mask is rendered at 1/K resolution and upsampled bilinearly
  (:func:`crm_d2.training.perturb.lowres_perturb`), what a stride-K network produces. The soft
  0..255 map is what CRM receives with ``--soft-coarse``; the binary coarse mask is
  ``soft >= 128`` (probability > 0.5).
* ``roi:M`` (Mask R-CNN style, ``roi:28``): the mask inside its tight box resampled to M x M
  (area averaging) and pasted back bilinearly into the box, what a Mask R-CNN mask head with
  an M x M output gives for a perfect box; binary as ``lowres``.
* ``perturb`` or ``perturb:LO-HI``: the CRM training perturbation
  (:func:`crm_d2.training.perturb.perturb_mask`) with an IoU target drawn uniformly from
  ``[LO, HI)`` (default ``[0.8, 1.0)``, the training range).

Every random draw comes from a generator seeded with ``(seed, image key, segment index)``, so a
coarse mask does not depend on the order in which images are processed nor on how they are
sharded across processes.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from ..training.perturb import lowres_perturb, perturb_mask, random_iou_target

__all__ = [
    "CoarseSpec",
    "image_seed_key",
    "paint_soft_segments",
    "render_instances",
    "render_panoptic",
]

BINARY_LEVEL = 128  # soft 0..255 value from which a coarse pixel is foreground (prob > 0.5)


@dataclass(frozen=True)
class CoarseSpec:
    """How coarse masks are made from ground truth.

    Attributes:
        kind: ``"lowres"``, ``"roi"`` or ``"perturb"``.
        k: downsampling factor of ``lowres`` (>= 2); mask-head resolution of ``roi``.
        iou_low, iou_high: IoU target range of ``perturb``.
        seed: base seed of ``perturb``.
    """

    kind: str
    k: int = 8
    iou_low: float = 0.8
    iou_high: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("lowres", "roi", "perturb"):
            raise ValueError(
                f"coarse kind must be 'lowres', 'roi' or 'perturb', got {self.kind!r}"
            )
        if self.kind in ("lowres", "roi") and self.k < 2:
            raise ValueError(f"{self.kind} factor must be an integer >= 2, got {self.k}")
        if self.kind == "perturb" and not 0.0 < self.iou_low < self.iou_high <= 1.0:
            raise ValueError(
                f"perturb IoU range must satisfy 0 < LO < HI <= 1, got {self.iou_low}-"
                f"{self.iou_high}"
            )

    @classmethod
    def parse(cls, text: str, seed: int = 0) -> CoarseSpec:
        """Parse ``lowres:K``, ``roi:M`` or ``perturb`` / ``perturb:LO-HI`` (e.g.
        ``perturb:0.6-0.9``)."""
        kind, _, arg = text.strip().partition(":")
        try:
            if kind in ("lowres", "roi"):
                if not arg:
                    raise ValueError("missing factor")
                return cls(kind, k=int(arg), seed=seed)
            if kind == "perturb":
                if not arg:
                    return cls("perturb", seed=seed)
                low, sep, high = arg.partition("-")
                if not sep:
                    raise ValueError("missing '-'")
                return cls("perturb", iou_low=float(low), iou_high=float(high), seed=seed)
        except ValueError as e:
            raise ValueError(
                f"bad coarse-from-gt spec {text!r} ({e}): use lowres:K (K = 4, 8, 16 ...), "
                "roi:M (M = 28), perturb or perturb:LO-HI"
            ) from e
        raise ValueError(
            f"bad coarse-from-gt spec {text!r}: use lowres:K (K = 4, 8, 16 ...), roi:M "
            "(M = 28), perturb or perturb:LO-HI"
        )

    def describe(self) -> str:
        if self.kind in ("lowres", "roi"):
            return f"{self.kind}:{self.k}"
        return f"perturb:{self.iou_low:g}-{self.iou_high:g} (seed {self.seed})"

    def render(self, gt: np.ndarray, key: Sequence[int]) -> np.ndarray:
        """Coarse soft mask of one ground-truth mask.

        Args:
            gt: (H, W) bool ground-truth mask.
            key: integers that identify the segment (image key, segment index); they seed the
                random generator of ``perturb``.

        Returns:
            (H, W) uint8 0..255 (soft for ``lowres``, 0/255 for ``perturb``).
        """
        gt_u8 = np.ascontiguousarray(gt, dtype=np.uint8) * 255
        if self.kind == "lowres":
            return lowres_perturb(gt_u8, self.k)
        if self.kind == "roi":
            return _roi_resample(gt_u8, self.k)
        rng = np.random.default_rng([self.seed, *(int(v) for v in key)])
        target = random_iou_target(rng, self.iou_low, self.iou_high)
        return perturb_mask(gt_u8, target, rng)


def _roi_resample(gt_u8: np.ndarray, size: int) -> np.ndarray:
    """(H, W) uint8 0/255 mask -> its tight box resampled to size x size and pasted back."""
    rows = np.flatnonzero(gt_u8.any(axis=1))
    out = np.zeros_like(gt_u8)
    if rows.size == 0:
        return out
    cols = np.flatnonzero(gt_u8.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = gt_u8[y0:y1, x0:x1].astype(np.float32)
    small = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    back = cv2.resize(small, (int(x1 - x0), int(y1 - y0)), interpolation=cv2.INTER_LINEAR)
    out[y0:y1, x0:x1] = np.clip(np.round(back), 0, 255).astype(np.uint8)
    return out


def image_seed_key(image_id: int | str) -> int:
    """A non-negative integer standing for an image id (ints as they are, strings by CRC32)."""
    if isinstance(image_id, (int, np.integer)) and int(image_id) >= 0:
        return int(image_id)
    return zlib.crc32(str(image_id).encode("utf-8"))


def paint_soft_segments(soft: Sequence[np.ndarray], ids: Sequence[int]) -> np.ndarray:
    """Non-overlapping id map from per-segment soft masks.

    Segments are painted from the largest binary area (``soft >= 128``) to the smallest; a pixel
    takes the segment with the highest soft value among those with ``soft >= 128``, ties going
    to the smaller segment (painted later), so small objects in front of large ones stay
    visible. Pixels no segment claims are VOID (0).

    Args:
        soft: N (H, W) uint8 0..255 maps.
        ids: N positive segment ids.

    Returns:
        (H, W) int64 id map.
    """
    if len(soft) != len(ids):
        raise ValueError(f"got {len(soft)} soft masks for {len(ids)} ids")
    if not soft:
        raise ValueError("paint_soft_segments needs at least one mask to know the image size")
    areas = [int(np.count_nonzero(s >= BINARY_LEVEL)) for s in soft]
    order = sorted(range(len(soft)), key=lambda i: -areas[i])  # stable: equal areas keep order
    out = np.zeros(soft[0].shape, np.int64)
    best = np.full(soft[0].shape, BINARY_LEVEL - 1, np.int16)
    for i in order:
        value = soft[i].astype(np.int16)
        take = value >= best
        take &= value >= BINARY_LEVEL
        out[take] = ids[i]
        best[take] = value[take]
    return out


def render_instances(
    spec: CoarseSpec, gt_masks: Sequence[np.ndarray], image_id: int | str
) -> list[tuple[int, np.ndarray]]:
    """Coarse soft masks of an image's ground-truth instances (crowd regions left out by the
    caller), without those that come out empty.

    Args:
        spec: how the coarse masks are made.
        gt_masks: (H, W) bool masks, in annotation order.
        image_id: the image's id (seeds ``perturb``).

    Returns:
        (index into ``gt_masks``, (H, W) uint8 soft mask) for every mask whose binary part
        (``soft >= BINARY_LEVEL``) is not empty.
    """
    seed_key = image_seed_key(image_id)
    out = []
    for j, gt in enumerate(gt_masks):
        soft = spec.render(gt, (seed_key, j))
        if (soft >= BINARY_LEVEL).any():
            out.append((j, soft))
    return out


def render_panoptic(
    spec: CoarseSpec,
    gt_ids: np.ndarray,
    segments: Sequence[Mapping[str, Any]],
    image_id: int | str,
) -> tuple[np.ndarray, list[dict], dict[int, np.ndarray]]:
    """Coarse panoptic map of an image made from its ground-truth id map.

    Every non-crowd segment is rendered (:meth:`CoarseSpec.render`) and the soft masks are
    painted into one map (:func:`paint_soft_segments`); crowd regions and unclaimed pixels
    are VOID (0).

    Args:
        spec: how the coarse masks are made.
        gt_ids: (H, W) int ground-truth segment ids.
        segments: the ground truth's ``segments_info`` (``id``, ``iscrowd``, ...).
        image_id: the image's id (seeds ``perturb``).

    Returns:
        The (H, W) int64 coarse id map, copies of the segments present in it (ground-truth
        order) and their soft masks by id.
    """
    seed_key = image_seed_key(image_id)
    sources = [s for s in segments if not s.get("iscrowd", 0)]
    ids = [int(s["id"]) for s in sources]
    soft = [spec.render(gt_ids == i, (seed_key, i)) for i in ids]
    coarse = paint_soft_segments(soft, ids) if soft else np.zeros(gt_ids.shape, np.int64)
    present = set(np.unique(coarse).tolist())
    kept = [dict(s) for s in sources if int(s["id"]) in present]
    return coarse, kept, {i: m for i, m in zip(ids, soft) if i in present}
