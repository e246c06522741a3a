"""Before/after pictures of a refinement (numpy + OpenCV only).

Shape shorthand: H, W image size. Images are HxWx3 uint8 RGB; masks HxW bool or 0..255.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = [
    "COARSE_COLOR",
    "REFINED_COLOR",
    "ZOOM_COLOR",
    "before_after",
    "before_after_zoom",
    "changed_window",
    "draw_boundary",
]

COARSE_COLOR = (255, 64, 64)  # RGB red
REFINED_COLOR = (64, 255, 64)  # RGB green
ZOOM_COLOR = (255, 220, 0)  # RGB yellow: the zoomed window on the overview
GAP = 8  # white pixels between panels


def _binary(mask: np.ndarray) -> np.ndarray:
    if mask.dtype == np.bool_:
        return mask
    if np.issubdtype(mask.dtype, np.floating):
        return mask > 0.5
    return mask > 127


def draw_boundary(
    image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int], thickness: int = 2,
    tint: float = 0.35,
) -> np.ndarray:
    """Tint ``mask`` (HxW) over ``image`` (HxWx3 uint8 RGB) and draw its contour.

    Returns a new HxWx3 uint8 image.
    """
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape[:2]} differ in size")
    m = _binary(mask)
    out = image.astype(np.float32)
    out[m] = (1 - tint) * out[m] + tint * np.asarray(color, np.float32)
    out = out.round().astype(np.uint8)
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, color, thickness, lineType=cv2.LINE_AA)
    return out


def before_after(
    image: np.ndarray,
    coarse: np.ndarray,
    refined: np.ndarray,
    max_side: int = 1600,
    labels: tuple[str, str] = ("coarse", "refined"),
) -> np.ndarray:
    """Side-by-side picture: coarse mask (red) | refined mask (green) over the image.

    The picture is downscaled so that its longer side is at most ``max_side`` pixels (0 = keep
    the full resolution); contours are drawn after the resize so they stay visible.

    Returns:
        (h, 2 * w + gap, 3) uint8 RGB.
    """
    h, w = image.shape[:2]
    gap = GAP
    scale = 1.0
    if max_side and max(h, 2 * w + gap) > max_side:
        scale = min(max_side / h, (max_side - gap) / (2 * w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))

    def prep(m: np.ndarray) -> np.ndarray:
        m = _binary(m).astype(np.uint8) * 255
        return cv2.resize(m, size, interpolation=cv2.INTER_LINEAR) > 127

    img = cv2.resize(image, size, interpolation=cv2.INTER_AREA) if scale != 1.0 else image
    thick = max(1, round(min(size) / 300))
    left = draw_boundary(img, prep(coarse), COARSE_COLOR, thick)
    right = draw_boundary(img, prep(refined), REFINED_COLOR, thick)
    # the coarse contour, thin, on the refined panel too, for comparison
    contours, _ = cv2.findContours(prep(coarse).astype(np.uint8), cv2.RETR_LIST,
                                   cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(right, contours, -1, COARSE_COLOR, 1, lineType=cv2.LINE_AA)
    font_scale = max(0.5, min(size) / 500)
    for panel, text, color in ((left, labels[0], COARSE_COLOR), (right, labels[1], REFINED_COLOR)):
        org = (8, int(30 * font_scale) + 4)
        cv2.putText(panel, text, org, cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0),
                    max(2, thick + 2), cv2.LINE_AA)
        cv2.putText(panel, text, org, cv2.FONT_HERSHEY_SIMPLEX, font_scale, color,
                    max(1, thick), cv2.LINE_AA)
    white = np.full((img.shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([left, white, right], axis=1)


def changed_window(coarse: np.ndarray, refined: np.ndarray, side: int) -> tuple[int, int, int, int]:
    """The ``side`` x ``side`` window (clipped to the image) where the two masks differ most.

    Args:
        coarse, refined: HxW masks (bool, 0..255 or probabilities).
        side: window side in pixels.

    Returns:
        (x0, y0, x1, y1) of the window with the most pixels where the masks disagree (the
        middle of the tied positions, so that a small change is centred); the image centre
        when they agree everywhere.
    """
    diff = (_binary(coarse) != _binary(refined)).astype(np.float64)
    h, w = diff.shape
    sh, sw = min(side, h), min(side, w)
    if not diff.any():
        y0, x0 = (h - sh) // 2, (w - sw) // 2
        return x0, y0, x0 + sw, y0 + sh
    integral = cv2.integral(diff)  # (h + 1, w + 1)
    sums = (integral[sh:, sw:] - integral[:-sh, sw:] - integral[sh:, :-sw]
            + integral[:-sh, :-sw])
    best = np.argwhere(sums == sums.max())  # ties: the middle one, the change centred
    y0, x0 = (int(round(v)) for v in best.mean(axis=0))
    return x0, y0, x0 + sw, y0 + sh


def before_after_zoom(
    image: np.ndarray,
    coarse: np.ndarray,
    refined: np.ndarray,
    max_side: int = 1600,
    zoom: int = 512,
) -> np.ndarray:
    """:func:`before_after` of the whole image, and below it, when the overview had to be
    shrunk, the ``zoom`` x ``zoom`` window where the masks differ most at full resolution
    (also side by side; the window is outlined in yellow on the overview).

    Args:
        image: HxWx3 uint8 RGB.
        coarse, refined: HxW masks.
        max_side: longest side of the overview (0 = full resolution, then no zoom is added).
        zoom: side of the zoomed window in image pixels (0 = no zoom).

    Returns:
        uint8 RGB picture.
    """
    top = before_after(image, coarse, refined, max_side=max_side)
    h, w = image.shape[:2]
    pw = (top.shape[1] - GAP) // 2  # width of one overview panel
    if zoom <= 0 or pw >= w:
        return top
    x0, y0, x1, y1 = changed_window(coarse, refined, zoom)
    s = pw / w
    corners = (round(x0 * s), round(y0 * s)), (round(x1 * s) - 1, round(y1 * s) - 1)
    for offset in (0, pw + GAP):
        cv2.rectangle(top, (corners[0][0] + offset, corners[0][1]),
                      (corners[1][0] + offset, corners[1][1]), ZOOM_COLOR, 2)
    crop = before_after(
        image[y0:y1, x0:x1], coarse[y0:y1, x0:x1], refined[y0:y1, x0:x1], max_side=0,
        labels=(f"coarse, zoom x{1 / s:.1f}", "refined"),
    )
    width = max(top.shape[1], crop.shape[1])

    def pad(pic: np.ndarray) -> np.ndarray:
        extra = np.full((pic.shape[0], width - pic.shape[1], 3), 255, np.uint8)
        return np.concatenate([pic, extra], axis=1)

    white = np.full((GAP, width, 3), 255, np.uint8)
    return np.concatenate([pad(top), white, pad(crop)], axis=0)
