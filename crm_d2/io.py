"""Reading images and masks, and writing files atomically: the one implementation of each.

Shape shorthand: H, W image size.

Every reader of crm_d2 (``crm-refine``, ``crm-eval``, the training data, the numpy API) goes
through :func:`read_image`, :func:`read_mask` and :func:`mask_to_prob`, so that a file means the
same thing everywhere.

**Images** (:func:`read_image`): the EXIF ``Orientation`` tag is applied exactly as detectron2's
``detectron2.data.detection_utils.read_image`` applies it (so crm_d2 and a detectron2 model see
the same pixels), then the image is converted to RGB (gray repeated, alpha dropped, palette
expanded). 16-bit and float images are refused.

**Masks** (:func:`read_mask`), one rule, by how the file stores its pixels:

======================  ===================================================================
file mode               foreground probability
======================  ===================================================================
``1`` (bilevel)         0 or 1
``L`` (8-bit gray)      value / 255, except a mask holding only 0 and 1: binary 0/1
``I;16``, ``I`` (16-bit) value / 65535, except a mask holding only 0 and 1: binary 0/1
``F`` (float)           the value, which must lie in [0, 1]
``P`` (palette)         index > 0 -> 1 (VOC / DAVIS object ids; the colours are ignored)
``LA``, ``RGBA``        the alpha channel when it is not constant (a cut-out), else as below
``RGB`` gray            R = G = B everywhere: as ``L``
``RGB`` coloured        any non-zero channel -> 1 (coloured label masks)
======================  ===================================================================

The EXIF orientation of a mask file is applied too (detectron2 does so for its semantic maps).
:func:`read_mask` returns uint8 0..255 (``round(255 * probability)``); :func:`mask_to_prob`
applies the numeric part of the rule to arrays given through the API.

**Writes** (:func:`atomic_path` and the helpers built on it): every file crm_d2 writes is first
written to a temporary file in the same folder and renamed over the target, so an interrupted or
failed write (Ctrl-C, a full disk) leaves the previous file at that path intact and no truncated
file behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "EXIF_ORIENTATION",
    "apply_exif_orientation",
    "atomic_path",
    "check_output_dir",
    "check_output_file",
    "image_size",
    "mask_to_prob",
    "read_image",
    "read_mask",
    "save_image",
    "torch_save",
    "write_json",
    "write_text",
]

logger = logging.getLogger(__name__)

EXIF_ORIENTATION = 274  # the EXIF 'Orientation' tag

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """``image`` turned upright according to its EXIF Orientation (1-8), like detectron2.

    Unreadable EXIF data counts as no orientation, as in detectron2.
    """
    try:
        exif = image.getexif()
    except Exception:  # noqa: BLE001 - broken EXIF blocks must not stop the read (detectron2 too)
        return image
    method = _TRANSPOSE.get(exif.get(EXIF_ORIENTATION)) if exif is not None else None
    return image if method is None else image.transpose(method)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an image file as :func:`read_image` returns it (EXIF orientation applied),
    from its header only."""
    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(EXIF_ORIENTATION)
        except Exception:  # noqa: BLE001 - as apply_exif_orientation
            orientation = None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB, EXIF orientation applied.

    Raises:
        ValueError: for 16-bit or float images (save them as 8-bit).
        OSError: when Pillow cannot read the file.
    """
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            raise ValueError(f"{path}: {im.mode} images are not supported, save it as 8-bit")
        return np.array(apply_exif_orientation(im).convert("RGB"))


def _binary_01(values: np.ndarray) -> bool:
    """True when an integer array holds only 0 and 1 and at least one 1."""
    return values.size > 0 and int(values.max()) == 1 and int(values.min()) == 0


def mask_to_prob(mask: np.ndarray) -> np.ndarray:
    """The numeric part of the mask rule: an (H, W) array -> float32 probabilities in [0, 1].

    bool -> 0/1; uint8 -> /255; uint16 -> /65535 (an integer mask holding only 0 and 1 is
    binary 0/1 in both); float must already lie in [0, 1].

    Raises:
        ValueError: on other dtypes, NaN / infinite values or floats outside [0, 1].
    """
    if mask.dtype == np.bool_:
        return mask.astype(np.float32)
    if mask.dtype in (np.uint8, np.uint16):
        if _binary_01(mask):
            return mask.astype(np.float32)
        return mask.astype(np.float32) / (255 if mask.dtype == np.uint8 else 65535)
    if np.issubdtype(mask.dtype, np.floating):
        if not np.isfinite(mask).all():
            raise ValueError("mask contains NaN or infinite values")
        if mask.size and (mask.min() < 0 or mask.max() > 1):
            raise ValueError(
                f"float mask must lie in [0, 1], got [{mask.min():.4g}, {mask.max():.4g}]; "
                "pass uint8 for 0..255 masks"
            )
        return mask.astype(np.float32)
    raise ValueError(
        f"mask must be uint8 (0..255), uint16 (0..65535), bool or float in [0, 1]; "
        f"got {mask.dtype}"
    )


def _decode_mask(im: Image.Image, path: str | os.PathLike) -> np.ndarray:
    """A Pillow mask image -> (H, W) bool / uint8 / uint16 / float32 array (module rule)."""
    mode = im.mode
    if mode == "1":
        return np.array(im, dtype=bool)
    if mode == "P":
        return np.array(im) > 0
    if mode in ("I;16", "I;16B", "I;16L"):
        return np.array(im).astype(np.uint16)
    if mode == "I":
        values = np.array(im)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(
                f"{path}: 32-bit mask with values {values.min()}..{values.max()}; masks are "
                "8-bit (0..255) or 16-bit (0..65535)"
            )
        return values.astype(np.uint16)
    if mode == "F":
        return np.array(im, dtype=np.float32)
    if mode in ("LA", "RGBA", "PA"):
        alpha = np.array(im.getchannel("A"))
        if alpha.min() != alpha.max():
            return alpha
        if mode == "PA":
            return np.array(im.getchannel(0)) > 0
        return _decode_mask(im.convert("RGB" if mode == "RGBA" else "L"), path)
    if mode == "L":
        return np.array(im)
    rgb = np.array(im.convert("RGB"))
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return np.ascontiguousarray(rgb[..., 0])
    return rgb.any(axis=2)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask file -> (H, W) uint8 0..255 under the module's rule (EXIF orientation applied).

    Raises:
        ValueError: for float masks outside [0, 1] or 32-bit masks beyond 16-bit values.
        OSError: when Pillow cannot read the file.
    """
    with Image.open(path) as im:
        try:
            prob = mask_to_prob(_decode_mask(apply_exif_orientation(im), path))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
    return np.round(prob * 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Output paths, checked before any work
# --------------------------------------------------------------------------------------------
#: Extensions whose Pillow encoders are lossy by default: refused for masks.
LOSSY_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".jp2", ".j2k", ".jpx", ".heic")


def _probe_folder(folder: str, what: str) -> None:
    """Create ``folder`` (and its parents) if needed and check that a file can be made in it."""
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{what}: {probe!r} is a file, so no folder can be made under it")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write_test.", dir=folder)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise ValueError(f"{what}: cannot write into {folder!r} ({e.strerror or e})") from e


def check_output_file(
    path: str | os.PathLike,
    what: str,
    *,
    inputs: tuple[str | os.PathLike, ...] = (),
    lossless: bool = False,
) -> str:
    """Check, before any work, that an image can be written at ``path``; create its folder.

    Args:
        path: the output file.
        what: its role, for the messages (e.g. ``"--output"``).
        inputs: files that must not be overwritten (the inputs of the run).
        lossless: refuse lossy formats (masks).

    Returns:
        The absolute path.

    Raises:
        ValueError: when the path is a folder, has no or an unknown image extension, is lossy
            for a mask, is one of ``inputs``, lies under a file, or its folder is not writable.
    """
    text = os.fspath(path)
    full = os.path.abspath(text)
    if text.endswith(("/", os.sep)) or os.path.isdir(full):
        raise ValueError(f"{what} {text!r} is a folder: name a file in it, e.g. "
                         f"{os.path.join(text, 'refined.png')!r}")
    for other in inputs:
        other_full = os.path.abspath(os.fspath(other))
        same = other_full == full or (
            os.path.exists(full) and os.path.exists(other_full)
            and os.path.samefile(full, other_full)
        )
        if same:
            raise ValueError(f"{what} {text!r} is also an input of this run: it would be "
                             "overwritten. Choose another output path")
    ext = os.path.splitext(full)[1].lower()
    if not ext:
        raise ValueError(f"{what} {text!r} has no extension: add one, e.g. .png")
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"{what} {text!r}: {ext} is not an image format Pillow can write; "
                         "use .png")
    if lossless and ext in LOSSY_EXTENSIONS:
        raise ValueError(f"{what} {text!r}: {ext} is lossy, a mask saved in it gets values "
                         "that were never computed; use .png (or .tif, .bmp)")
    _probe_folder(os.path.dirname(full), f"{what} {text!r}")
    return full


def check_output_dir(path: str | os.PathLike, what: str) -> str:
    """Check, before any work, that ``path`` is (or can be made) a writable folder; create it.

    Raises:
        ValueError: when ``path`` is a file, lies under a file or cannot be written.
    """
    full = os.path.abspath(os.fspath(path))
    if os.path.exists(full) and not os.path.isdir(full):
        raise ValueError(f"{what} {os.fspath(path)!r} is a file, expected a folder")
    _probe_folder(full, f"{what} {os.fspath(path)!r}")
    return full


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path to write ``path`` through; renamed over ``path`` when the block succeeds.

    The temporary file lies in the same folder (a rename within one file system is atomic) and
    keeps the extension of ``path`` (writers that pick the format from it keep working). On an
    exception it is deleted and ``path`` is left as it was. The folder must exist.

    Example::

        with atomic_path("out/mask.png") as tmp:
            Image.fromarray(mask).save(tmp)
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual mode
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def save_image(path: str | os.PathLike, array: np.ndarray, **params: Any) -> None:
    """Write an (H, W) or (H, W, 3) uint8 array with Pillow (format from the extension),
    atomically. ``params`` go to ``PIL.Image.save`` (e.g. ``quality=90``)."""
    fmt = Image.registered_extensions().get(os.path.splitext(os.fspath(path))[1].lower())
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format=fmt, **params)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(
    path: str | os.PathLike, obj: Any, indent: int | None = None, allow_nan: bool = False
) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (strict JSON unless ``allow_nan``)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, allow_nan=allow_nan)


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
