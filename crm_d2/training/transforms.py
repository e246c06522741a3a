"""Training-sample transforms of CRM, without torchvision.

Shape shorthand: H, W = input size, S = crop size. Images are RGB ``np.uint8`` arrays of shape
(H, W, 3); masks are ``np.uint8`` arrays of shape (H, W) with values 0..255.

The authors build their samples with torchvision on PIL images (CRM paper §3 and its code):
``RandomCrop(224, pad_if_needed=True)`` + ``RandomHorizontalFlip()`` shared by image and ground
truth, then ``ColorJitter(0.2, 0.05, 0.05, 0)`` + ``RandomGrayscale(p=0.1)`` on the image only,
then ``ToTensor`` / ``Normalize``. This module reimplements those semantics with numpy:

* padding follows torchvision's ``pad_if_needed``: a side shorter than S is padded by the FULL
  deficit on BOTH ends (width w < S becomes 2S - w), with constant 0 for the image (black, not
  the mean) and for the mask, before the random crop is drawn;
* colour operations follow torchvision's PIL path, i.e. Pillow's ``ImageEnhance`` blends
  (float32 arithmetic, truncation to uint8) and Pillow's integer RGB -> L conversion, in a
  random order, each factor drawn uniformly from [1 - x, 1 + x].

All randomness comes from an explicit ``np.random.Generator``.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

# one definition for training and inference, so the two normalisations cannot drift apart
from ..inference import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "center_crop_with_pad",
    "color_jitter",
    "gt_to_tensor",
    "mask_to_tensor",
    "image_to_tensor",
    "pad_if_needed",
    "random_crop_flip",
    "random_grayscale",
    "random_rescale",
    "rescale_pair",
    "rgb_to_gray",
]


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"image must be a (H, W, 3) RGB numpy array, got shape {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must have dtype uint8, got {image.dtype}")


def _check_mask(mask: np.ndarray, name: str) -> None:
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        shape = getattr(mask, "shape", None)
        raise ValueError(f"{name} must be a (H, W) numpy array, got shape {shape}")
    if mask.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype uint8, got {mask.dtype}")


# --------------------------------------------------------------------------- geometry


def pad_if_needed(array: np.ndarray, size: int, fill: int = 0) -> np.ndarray:
    """Pad like torchvision ``RandomCrop(size, pad_if_needed=True)`` does before cropping.

    If the width w < size, ``size - w`` columns of ``fill`` are added on the left AND on the right
    (same for the height). Sides already >= size are left alone.

    Args:
        array: (H, W) or (H, W, C) array.
        size: crop size S.
        fill: constant pad value.

    Returns:
        array of shape (H', W'[, C]) with H' = H if H >= S else 2S - H (same for W').
    """
    h, w = array.shape[:2]
    dh = max(size - h, 0)
    dw = max(size - w, 0)
    if dh == 0 and dw == 0:
        return array
    pad = [(dh, dh), (dw, dw)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, mode="constant", constant_values=fill)


def random_crop_flip(
    image: np.ndarray,
    gt: np.ndarray,
    rng: np.random.Generator,
    size: int = 224,
    coarse: np.ndarray | None = None,
    flip_p: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Same random crop (padding if needed) and horizontal flip of image, gt and coarse mask.

    Args:
        image: (H, W, 3) uint8 RGB.
        gt: (H, W) uint8 ground truth 0..255.
        rng: random generator.
        size: crop size S.
        coarse: optional (H, W) uint8 coarse mask, transformed identically.
        flip_p: probability of the horizontal flip.

    Returns:
        (image (S, S, 3), gt (S, S), coarse (S, S) or None), all contiguous uint8 arrays.
    """
    _check_image(image)
    _check_mask(gt, "gt")
    if gt.shape != image.shape[:2]:
        raise ValueError(f"gt shape {gt.shape} does not match image shape {image.shape[:2]}")
    if coarse is not None:
        _check_mask(coarse, "coarse")
        if coarse.shape != gt.shape:
            raise ValueError(f"coarse shape {coarse.shape} does not match gt shape {gt.shape}")
    if size < 1:
        raise ValueError(f"crop size must be >= 1, got {size}")

    image = pad_if_needed(image, size)
    gt = pad_if_needed(gt, size)
    coarse = None if coarse is None else pad_if_needed(coarse, size)
    h, w = gt.shape
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    flip = bool(rng.random() < flip_p)

    def crop(a: np.ndarray) -> np.ndarray:
        a = a[top : top + size, left : left + size]
        if flip:
            a = a[:, ::-1]
        return np.ascontiguousarray(a)

    return crop(image), crop(gt), None if coarse is None else crop(coarse)


def random_rescale(
    image: np.ndarray,
    gt: np.ndarray,
    rng: np.random.Generator,
    scale_range: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray, float]:
    """Resize image and ground truth by one factor drawn uniformly from ``scale_range``.

    Not in the paper's recipe (it trains on native-resolution crops only): a crm_d2 option so
    that the network also sees objects at the coarser resolutions of CRM's coarse-to-fine
    inference schedule (0.125 ... 1.0 of the input). Down-scaling uses area averaging, up-scaling
    bilinear interpolation; the ground truth stays soft (0..255). Sides are at least 1 pixel.

    Args:
        image: (H, W, 3) uint8 RGB.
        gt: (H, W) uint8 ground truth 0..255.
        rng: random generator (one draw).
        scale_range: (low, high) with 0 < low <= high.

    Returns:
        (image (H', W', 3), gt (H', W'), the factor), H' = round(H * factor).
    """
    low, high = float(scale_range[0]), float(scale_range[1])
    if not 0 < low <= high:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    factor = float(rng.uniform(low, high)) if high > low else low
    image, gt = rescale_pair(image, gt, factor)
    return image, gt, factor


def rescale_pair(
    image: np.ndarray, gt: np.ndarray, factor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Resize an (H, W, 3) image and its (H, W) mask by ``factor`` (area averaging down,
    bilinear up; sides rounded, at least 1 pixel; the mask stays soft). Unchanged sizes return
    the inputs themselves."""
    h, w = gt.shape
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    if size == (w, h):
        return image, gt
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    image = cv2.resize(image, size, interpolation=interp)
    gt = cv2.resize(gt, size, interpolation=interp)
    return np.ascontiguousarray(image), np.ascontiguousarray(gt)


def center_crop_with_pad(array: np.ndarray, size: int, fill: int = 0) -> np.ndarray:
    """Deterministic counterpart of the random crop: pad as :func:`pad_if_needed`, take the centre.

    Args:
        array: (H, W) or (H, W, C) array.
        size: crop size S.
        fill: constant pad value.

    Returns:
        contiguous (S, S[, C]) array.
    """
    array = pad_if_needed(array, size, fill)
    h, w = array.shape[:2]
    top = (h - size) // 2
    left = (w - size) // 2
    return np.ascontiguousarray(array[top : top + size, left : left + size])


# --------------------------------------------------------------------------- colour


def rgb_to_gray(image: np.ndarray) -> np.ndarray:
    """Pillow's RGB -> L conversion: (19595 R + 38470 G + 7471 B + 32768) >> 16.

    Args:
        image: (H, W, 3) uint8 RGB.

    Returns:
        (H, W) uint8 luma.
    """
    _check_image(image)
    rgb = image.astype(np.uint32)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)


def _blend(degenerate: np.ndarray, image: np.ndarray, factor: float) -> np.ndarray:
    """Pillow ``Image.blend(degenerate, image, factor)`` on uint8 arrays (float32, truncation)."""
    d = degenerate.astype(np.float32)
    out = d + np.float32(factor) * (image.astype(np.float32) - d)
    return np.clip(out, 0.0, 255.0).astype(np.uint8)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with black (torchvision ``adjust_brightness`` on a PIL image)."""
    _check_image(image)
    return _blend(np.zeros_like(image), image, factor)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the rounded mean luma (torchvision ``adjust_contrast`` on a PIL image)."""
    _check_image(image)
    mean = int(float(rgb_to_gray(image).mean()) + 0.5)
    return _blend(np.full_like(image, mean), image, factor)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the grayscale image (torchvision ``adjust_saturation`` on a PIL image)."""
    _check_image(image)
    gray = np.repeat(rgb_to_gray(image)[..., None], 3, axis=2)
    return _blend(gray, image, factor)


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.2,
    contrast: float = 0.05,
    saturation: float = 0.05,
) -> np.ndarray:
    """torchvision ``ColorJitter(brightness, contrast, saturation, hue=0)`` on an RGB image.

    Factors are drawn uniformly from [max(0, 1 - x), 1 + x]; the three adjustments are applied
    in a random order. A strength of 0 disables that adjustment (no factor drawn).

    Args:
        image: (H, W, 3) uint8 RGB.
        rng: random generator.
        brightness, contrast, saturation: jitter strengths (non-negative).

    Returns:
        (H, W, 3) uint8 RGB.
    """
    _check_image(image)
    ops = []
    for strength, op in (
        (brightness, adjust_brightness),
        (contrast, adjust_contrast),
        (saturation, adjust_saturation),
    ):
        if strength < 0:
            raise ValueError(f"jitter strengths must be >= 0, got {strength}")
        ops.append((strength, op))
    order = rng.permutation(len(ops))
    factors = [None if s == 0 else float(rng.uniform(max(0.0, 1.0 - s), 1.0 + s)) for s, _ in ops]
    for i in order:
        if factors[i] is not None:
            image = ops[i][1](image, factors[i])
    return image


def random_grayscale(image: np.ndarray, rng: np.random.Generator, p: float = 0.1) -> np.ndarray:
    """With probability ``p`` replace the image by its luma replicated on 3 channels.

    Args:
        image: (H, W, 3) uint8 RGB.
        rng: random generator.
        p: probability.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    _check_image(image)
    if rng.random() < p:
        return np.repeat(rgb_to_gray(image)[..., None], 3, axis=2)
    return image


# --------------------------------------------------------------------------- tensors


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> float32 (3, H, W): x/255, then ImageNet mean/std normalisation."""
    _check_image(image)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    x = (image.astype(np.float32) / np.float32(255.0) - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def mask_to_tensor(mask: np.ndarray) -> torch.Tensor:
    """Coarse-mask input: uint8 (H, W) 0..255 -> float32 (1, H, W), (m/255 - 0.5)/0.5 in [-1, 1]."""
    _check_mask(mask, "mask")
    x = (mask.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(x[None])


def gt_to_tensor(gt: np.ndarray) -> torch.Tensor:
    """Training target: uint8 (H, W) 0..255 -> float32 (1, H, W) = m/255 in [0, 1] (kept soft)."""
    _check_mask(gt, "gt")
    return torch.from_numpy((gt.astype(np.float32) / np.float32(255.0))[None])
