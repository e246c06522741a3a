"""Coarse predictions made from ground truth, for demos and benchmarks without a segmentation model.

Shape shorthand: H, W image size; N segments of one image.

``--coarse-from-gt KIND`` takes any kind of :mod:`crm_d2.coarse` (the vocabulary training and
the held-out evaluation use): ``stride8`` (soft 1/8 rendering), ``stride8_binary``,
``stride8_t0.4``, ``maskrcnn``, ``perturb`` / ``perturb:LO-HI``, ``shift``, ``dilate``. The
binary coarse mask of a soft kind is ``soft >= 128`` (probability > 0.5); CRM receives the
soft map only with ``--soft-coarse``.

Every random draw comes from a generator seeded with ``(seed, image key, segment index)``, so a
coarse mask does not depend on the order in which images are processed nor on how they are
sharded across processes.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..coarse import BINARY_LEVEL, CoarseKind

__all__ = [
    "CoarseSpec",
    "image_seed_key",
    "paint_soft_segments",
    "render_instances",
    "render_panoptic",
]


@dataclass(frozen=True)
class CoarseSpec:
    """How crm-eval makes coarse masks from ground truth: a coarse kind and a seed.

    Attributes:
        kind: the :class:`~crm_d2.coarse.CoarseKind`.
        seed: base seed of the random kinds.
    """

    kind: CoarseKind
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.seed) < 0:
            raise ValueError(f"the coarse-mask seed must be >= 0, got {self.seed}")

    @classmethod
    def parse(cls, text: str, seed: int = 0) -> CoarseSpec:
        """Parse a coarse kind (e.g. ``stride8_binary``); ValueError names the accepted forms."""
        return cls(CoarseKind.parse(text), seed=seed)

    def describe(self) -> str:
        if self.kind.random:
            return f"{self.kind.name} (seed {self.seed})"
        return self.kind.name

    def render(self, gt: np.ndarray, key: Sequence[int]) -> np.ndarray:
        """Coarse soft mask of one ground-truth mask.

        Args:
            gt: (H, W) bool ground-truth mask.
            key: integers that identify the segment (image key, segment index); they seed the
                random generator of the random kinds.

        Returns:
            (H, W) uint8 0..255 (soft only for the soft ``stride<K>`` kinds).
        """
        gt_u8 = np.ascontiguousarray(gt, dtype=np.uint8) * 255
        rng = None
        if self.kind.random:
            rng = np.random.default_rng([self.seed, *(int(v) for v in key)])
        return self.kind.render(gt_u8, rng)


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
