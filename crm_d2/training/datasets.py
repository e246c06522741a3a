"""Datasets for CRM training: image/mask pair discovery, COCO objects, the training sample.

Shape shorthand: H, W = source image size, S = crop size. Raw samples are an RGB ``np.uint8``
image (H, W, 3), a ``np.uint8`` mask (H, W) with values 0..255 and a name. Training samples
(:class:`CRMTrainDataset`) are dicts of tensors:

* ``image``: (3, S, S) float32, ImageNet-normalised RGB;
* ``coarse``: (1, S, S) float32 in [-1, 1], the perturbed mask as the network input;
* ``gt``: (1, S, S) float32 in [0, 1], the (soft) ground truth;
* ``name``: str, ``"<parent folder>/<stem>"`` of the image (or a COCO object id).

A *pair source* is anything with ``__len__`` and ``load(idx) -> (image, mask, name)``:
:class:`ImageMaskPairs` (files on disk) and :class:`CocoObjectPairs` (COCO instances).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from ..coarse import BINARY_LEVEL, CoarseMix
from ..io import read_image, read_mask
from .transforms import (
    center_crop_with_pad,
    color_jitter,
    gt_to_tensor,
    image_to_tensor,
    mask_to_tensor,
    random_crop_flip,
    random_grayscale,
    random_rescale,
)

__all__ = [
    "CRMTrainDataset",
    "CocoObjectPairs",
    "ImageMaskPairs",
    "PairSource",
    "list_image_mask_pairs",
    "load_image",
    "load_mask",
    "sample_name",
    "split_pairs",
]

logger = logging.getLogger(__name__)

# Image files in a folder of their own (masks elsewhere) may have any of these extensions.
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Images that sit next to their masks in the same folder (a mask is always a .png there).
SIDE_BY_SIDE_IMAGE_EXTS = (".jpg", ".jpeg")
# Mask extensions, in order of preference.
MASK_EXTS = (".png", ".bmp")

# Folder of images (lower-case name) -> folder names that may hold the matching masks.
_MASK_DIR_NAMES = {
    "images": ("masks", "mask", "gt", "ground_truth_mask", "groundtruth", "annotations"),
    "image": ("mask", "masks", "gt"),
    "imgs": ("masks", "gt", "mask"),
    "img": ("mask", "masks", "gt"),
    "jpegimages": ("annotations",),
}
# DUTS style: "<prefix>-Image" -> "<prefix>-Mask" (also "_" and plural forms).
_IMAGE_SUFFIXES = ("-image", "_image", "-images", "_images")
_MASK_SUFFIXES = ("mask", "masks", "gt")


# --------------------------------------------------------------------------- file layouts


def _mask_dir_candidates(name: str) -> tuple[str, ...]:
    """Lower-case names of the folders that may hold the masks of image folder ``name``."""
    low = name.lower()
    if low in _MASK_DIR_NAMES:
        return _MASK_DIR_NAMES[low]
    for suffix in _IMAGE_SUFFIXES:
        if low.endswith(suffix) and len(low) > len(suffix):
            stem = low[: -len(suffix)]
            sep = suffix[0]
            return tuple(f"{stem}{sep}{m}" for m in _MASK_SUFFIXES)
    return ()


def _find_mask_dirs(root: Path, rel_dir: Path) -> list[Path]:
    """Mask folders for images in ``root / rel_dir``: one path component swapped for its mask
    counterpart (``images`` -> ``masks``, ``DUTS-TR-Image`` -> ``DUTS-TR-Mask``,
    ``JPEGImages/480p/seq`` -> ``Annotations/480p/seq``), deepest component first."""
    parts = rel_dir.parts
    found = []
    for i in range(len(parts) - 1, -1, -1):
        candidates = _mask_dir_candidates(parts[i])
        if not candidates:
            continue
        parent = root.joinpath(*parts[:i])
        try:
            siblings = {p.name.lower(): p.name for p in parent.iterdir() if p.is_dir()}
        except OSError:
            continue
        for cand in candidates:
            if cand in siblings:
                mask_dir = parent / siblings[cand] / Path(*parts[i + 1 :])
                if mask_dir.is_dir():
                    found.append(mask_dir)
    return found


def _find_mask(folder: Path, stem: str, files: set[str] | None = None) -> Path | None:
    for ext in MASK_EXTS:
        name = stem + ext
        if files is not None:
            if name in files:
                return folder / name
        elif (folder / name).is_file():
            return folder / name
    return None


def list_image_mask_pairs(root: str | os.PathLike) -> list[tuple[str, str]]:
    """Find (image, mask) file pairs under ``root``, recursively.

    Recognised layouts (any nesting, several datasets under one root are fine):

    * separate folders, one path component swapped: ``images/`` + ``masks/`` (also ``image``/
      ``mask``, ``imgs``, ``gt``, ``ground_truth_mask``, ...), DUTS ``DUTS-TR-Image/`` +
      ``DUTS-TR-Mask/``, DAVIS ``JPEGImages/480p/<seq>/`` + ``Annotations/480p/<seq>/``; the
      images may have any common extension, masks are ``<stem>.png`` (or ``.bmp``);
    * side by side in one folder: ``<stem>.jpg`` + ``<stem>.png`` (FSS-1000 class folders,
      ECSSD / MSRA-10K / DUTS as CRM's scripts store them, DAVIS-style ``<seq>/NNNNN.jpg`` +
      ``<seq>/NNNNN.png``, any folder of pairs matched by stem).

    Images without a mask are skipped (a warning gives their number).

    Args:
        root: folder to search.

    Returns:
        sorted list of (image path, mask path) strings.

    Raises:
        ValueError: ``root`` is not a folder, or no pair was found.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset root {str(root)!r} is not a directory")
    pairs: list[tuple[str, str]] = []
    unmatched = 0
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        folder = Path(dirpath)
        mask_dirs = _find_mask_dirs(root, folder.relative_to(root))
        files = set(filenames)
        for fname in sorted(filenames):
            stem, ext = os.path.splitext(fname)
            ext = ext.lower()
            mask = None
            if mask_dirs:
                if ext not in IMAGE_EXTS:
                    continue
                for mask_dir in mask_dirs:
                    mask = _find_mask(mask_dir, stem)
                    if mask is not None:
                        break
            else:
                if ext not in SIDE_BY_SIDE_IMAGE_EXTS:
                    continue
                mask = _find_mask(folder, stem, files)
            if mask is None:
                unmatched += 1
                continue
            pairs.append((str(folder / fname), str(mask)))
    if unmatched:
        logger.warning("%d image(s) under %s have no mask and were skipped", unmatched, root)
    if not pairs:
        raise ValueError(
            f"no image/mask pairs found under {str(root)!r}: expected <stem>.jpg next to "
            "<stem>.png, or images/ + masks/ (or *-Image/ + *-Mask/, JPEGImages/ + Annotations/) "
            "folders with matching stems"
        )
    pairs.sort()
    logger.info("found %d image/mask pairs under %s", len(pairs), root)
    return pairs


def sample_name(image_path: str | os.PathLike) -> str:
    """Stable, machine-independent name of a sample: ``"<parent folder>/<stem>"``."""
    p = Path(image_path)
    return f"{p.parent.name}/{p.stem}"


def _sequence_name(image_path: str | os.PathLike) -> str:
    return Path(image_path).parent.name


def _unit_hash(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_pairs(
    pairs: Sequence[tuple[str, str]],
    val_fraction: float,
    seed: int = 0,
    group_by: str | Callable[[str], str] = "name",
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Deterministic train/validation split by a stable hash.

    Each pair gets a group key; a group goes to validation iff sha256(seed, key), read as a
    number in [0, 1), is < ``val_fraction``. A sample's split therefore depends only on its
    key and the seed, never on the order or on the other samples (the validation share is
    ``val_fraction`` in expectation, not exactly).

    Args:
        pairs: (image path, mask path) pairs.
        val_fraction: expected share of groups in validation, in [0, 1].
        seed: changes the split.
        group_by: ``"name"`` (each image on its own, key :func:`sample_name`), ``"sequence"``
            (key = the image's parent folder, so a video sequence such as DAVIS ``<seq>/NNNNN.jpg``
            or ``JPEGImages/480p/<seq>/`` is never split across train and validation), or a
            callable mapping an image path to its key.

    Returns:
        (train pairs, validation pairs), each in input order.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    if callable(group_by):
        key_fn = group_by
    elif group_by == "name":
        key_fn = sample_name
    elif group_by == "sequence":
        key_fn = _sequence_name
    else:
        raise ValueError(f"group_by must be 'name', 'sequence' or a callable, got {group_by!r}")
    train, val = [], []
    for pair in pairs:
        (val if _unit_hash(key_fn(pair[0]), seed) < val_fraction else train).append(pair)
    if pairs and val_fraction > 0 and not val:
        logger.warning("split_pairs: the validation split is empty (seed %d)", seed)
    return train, val


# --------------------------------------------------------------------------- loading


# The one image / mask reading rule of crm_d2 (EXIF orientation, palette, 16-bit, 0/1 ...).
load_image = read_image
load_mask = read_mask


class PairSource(Protocol):
    """Anything that yields raw (image, mask, name) samples."""

    def __len__(self) -> int: ...

    def load(self, idx: int) -> tuple[np.ndarray, np.ndarray, str]: ...


class ImageMaskPairs(Dataset):
    """Raw samples from (image path, mask path) pairs.

    ``load(idx)`` / ``dataset[idx]`` give the RGB image (H, W, 3) uint8, the mask (H, W) uint8
    0..255 and :func:`sample_name` of the image (``__getitem__`` as a dict with keys ``image``,
    ``mask``, ``name``).
    """

    def __init__(self, pairs: Sequence[tuple[str, str]]):
        self.pairs = [(str(a), str(b)) for a, b in pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, idx: int) -> tuple[np.ndarray, np.ndarray, str]:
        image_path, mask_path = self.pairs[idx]
        image = load_image(image_path)
        mask = load_mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"mask {mask_path} has size {mask.shape[::-1]} but image {image_path} has "
                f"size {image.shape[1::-1]} (W, H)"
            )
        return image, mask, sample_name(image_path)

    def __getitem__(self, idx: int) -> dict:
        image, mask, name = self.load(idx)
        return {"image": image, "mask": mask, "name": name}


class CocoObjectPairs(Dataset):
    """One raw sample per non-crowd COCO instance, cropped around its box with context.

    The box (x, y, w, h) is enlarged by ``context`` of its size IN TOTAL, i.e. by
    ``context / 2`` of its width (height) on each side (the convention of CascadePSP's
    scene-parsing protocol, Cheng et al. 2020: 0.25 = 12.5% per side), rounded outwards and
    clipped to the image. The mask is the instance alone (other objects in the crop are
    background), 0/255.

    Args:
        json_path: COCO instances JSON (polygons, uncompressed or compressed RLE).
        image_dir: folder holding the images' ``file_name``.
        min_area: instances whose annotated ``area`` (pixels) is below this are skipped.
        context: total relative enlargement of the box (>= 0).
        category_ids: keep only these categories (all if None).
    """

    def __init__(
        self,
        json_path: str | os.PathLike,
        image_dir: str | os.PathLike,
        min_area: float = 1024.0,
        context: float = 0.25,
        category_ids: Sequence[int] | None = None,
    ):
        if context < 0:
            raise ValueError(f"context must be >= 0, got {context}")
        self.image_dir = Path(image_dir)
        self.context = float(context)
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
        if "annotations" not in data or "images" not in data:
            raise ValueError(f"{json_path} is not a COCO instances file (no images/annotations)")
        self.images = {img["id"]: img for img in data["images"]}
        keep_cats = None if category_ids is None else set(category_ids)
        anns = [
            a
            for a in data["annotations"]
            if not a.get("iscrowd", 0)
            and a.get("area", 0) >= min_area
            and (keep_cats is None or a["category_id"] in keep_cats)
            and a["image_id"] in self.images
        ]
        anns.sort(key=lambda a: (a["image_id"], a["id"]))
        self.annotations = anns
        logger.info("%s: %d objects with area >= %s", json_path, len(anns), min_area)

    def __len__(self) -> int:
        return len(self.annotations)

    def crop_box(self, idx: int) -> tuple[int, int, int, int]:
        """Crop (x0, y0, x1, y1), end-exclusive, of object ``idx`` in its image."""
        ann = self.annotations[idx]
        info = self.images[ann["image_id"]]
        x, y, w, h = (float(v) for v in ann["bbox"])
        mx, my = 0.5 * self.context * w, 0.5 * self.context * h
        x0 = max(0, math.floor(x - mx))
        y0 = max(0, math.floor(y - my))
        x1 = min(int(info["width"]), math.ceil(x + w + mx))
        y1 = min(int(info["height"]), math.ceil(y + h + my))
        return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)

    def instance_mask(self, idx: int) -> np.ndarray:
        """Full-image (H, W) uint8 0/255 mask of object ``idx``."""
        from pycocotools import mask as mask_utils

        ann = self.annotations[idx]
        info = self.images[ann["image_id"]]
        h, w = int(info["height"]), int(info["width"])
        segm = ann["segmentation"]
        if isinstance(segm, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
        elif isinstance(segm.get("counts"), list):
            rle = mask_utils.frPyObjects(segm, h, w)
        else:
            rle = segm
        return (mask_utils.decode(rle) > 0).astype(np.uint8) * 255

    def load(self, idx: int) -> tuple[np.ndarray, np.ndarray, str]:
        ann = self.annotations[idx]
        info = self.images[ann["image_id"]]
        image = load_image(self.image_dir / info["file_name"])
        if image.shape[:2] != (int(info["height"]), int(info["width"])):
            raise ValueError(
                f"image {info['file_name']} is {image.shape[1]}x{image.shape[0]} but the "
                f"annotations say {info['width']}x{info['height']}"
            )
        mask = self.instance_mask(idx)
        x0, y0, x1, y1 = self.crop_box(idx)
        name = f"coco/{ann['image_id']:012d}_{ann['id']}"
        return (
            np.ascontiguousarray(image[y0:y1, x0:x1]),
            np.ascontiguousarray(mask[y0:y1, x0:x1]),
            name,
        )

    def __getitem__(self, idx: int) -> dict:
        image, mask, name = self.load(idx)
        return {"image": image, "mask": mask, "name": name}


# --------------------------------------------------------------------------- training samples


class CRMTrainDataset(Dataset):
    """CRM training samples built on the fly (the CRM paper's online dataset, §3).

    With ``augment=True`` (training), per sample: random SxS crop (padding with 0 if smaller,
    torchvision ``pad_if_needed`` style) and horizontal flip of image and ground truth; the
    ground truth CROP is binarised at 128 (0..255; the same as the authors' ``> 0.5`` on binary
    0/255 masks, and the midpoint of soft masks such as DUTS and PASCAL-S) and turned into the
    coarse mask; colour jitter (brightness 0.2, contrast 0.05, saturation 0.05) and random
    grayscale (p 0.1) on the image. The target ``gt`` stays soft.

    With ``augment=False`` (validation): centre crop (same padding), no flip, no colour change,
    and a coarse mask that depends only on (seed, idx), so every epoch sees the same inputs.

    Coarse masks: a :class:`~crm_d2.coarse.CoarseMix` spec, e.g. ``"perturb"`` (the paper's)
    or ``"perturb+stride8_binary*2+maskrcnn"``; one kind is drawn per sample.

    Randomness: sample ``idx`` uses ``np.random.default_rng([seed, epoch, idx])`` (``[seed, idx]``
    when not augmenting), so results are reproducible and independent of worker assignment.
    Call :meth:`set_epoch` to get fresh draws each epoch (before creating the DataLoader iterator;
    persistent workers keep the epoch they were started with).

    Args:
        pairs: (image path, mask path) pairs or a :class:`PairSource` (e.g. CocoObjectPairs).
        crop_size: S.
        coarse: coarse-mask mix spec (see :mod:`crm_d2.coarse.kinds`).
        seed: base seed.
        augment: training (True) or deterministic validation (False) sampling.
        jitter: (brightness, contrast, saturation) strengths.
        grayscale_p: probability of the grayscale conversion.
        legacy_kernels: reproduce the released model's morphology-kernel draw (``perturb``).
        scale_range: (low, high) factor of a random resize of the whole image before the crop
            (:func:`~crm_d2.training.transforms.random_rescale`; training only). ``(1, 1)``, the
            paper's recipe, draws nothing.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]] | PairSource,
        crop_size: int = 224,
        coarse: str = "perturb",
        seed: int = 0,
        augment: bool = True,
        jitter: tuple[float, float, float] = (0.2, 0.05, 0.05),
        grayscale_p: float = 0.1,
        legacy_kernels: bool = False,
        scale_range: tuple[float, float] = (1.0, 1.0),
    ):
        self.coarse_mix = CoarseMix.parse(coarse)
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        if hasattr(pairs, "load"):
            self.source = pairs
        else:
            self.source = ImageMaskPairs(pairs)
        if len(self.source) == 0:
            raise ValueError("CRMTrainDataset got no samples")
        self.crop_size = int(crop_size)
        self.coarse = self.coarse_mix.name
        self.seed = int(seed)
        self.augment = bool(augment)
        self.jitter = tuple(float(j) for j in jitter)
        self.grayscale_p = float(grayscale_p)
        self.legacy_kernels = bool(legacy_kernels)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the random stream of ``epoch`` (training mode only)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def _rng(self, idx: int) -> np.random.Generator:
        if self.augment:
            return np.random.default_rng([self.seed, self.epoch, idx])
        return np.random.default_rng([self.seed, idx])

    def _coarse(self, fg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        kind = self.coarse_mix.draw(rng)
        return kind.render(fg, rng, legacy_kernels=self.legacy_kernels)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor | str]:
        image, mask, name = self.source.load(idx)
        rng = self._rng(idx)
        if self.augment:
            if self.scale_range != (1.0, 1.0):
                image, mask, _ = random_rescale(image, mask, rng, self.scale_range)
            image, gt, _ = random_crop_flip(image, mask, rng, self.crop_size)
        else:
            image = center_crop_with_pad(image, self.crop_size)
            gt = center_crop_with_pad(mask, self.crop_size)
        fg = np.where(gt >= BINARY_LEVEL, 255, 0).astype(np.uint8)
        coarse = self._coarse(fg, rng)
        if self.augment:
            image = color_jitter(image, rng, *self.jitter)
            image = random_grayscale(image, rng, self.grayscale_p)
        return {
            "image": image_to_tensor(image),
            "coarse": mask_to_tensor(coarse),
            "gt": gt_to_tensor(gt),
            "name": name,
        }
