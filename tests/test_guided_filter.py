"""The guided-filter refiner: He et al.'s algorithm, and the CRM refiner interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crm_d2.guided_filter import GuidedFilterRefiner, guided_filter
from crm_d2.inference import normalize_image, normalize_mask
from crm_d2.segments import ROIOptions, refine_segments


def _naive(guide: np.ndarray, p: np.ndarray, r: int, eps: float) -> np.ndarray:
    """Per-window ridge regression, straight from the paper (windows clipped to the image)."""
    h, w = p.shape
    a, b = np.zeros((h, w, 3)), np.zeros((h, w))

    def window(y, x):
        return slice(max(0, y - r), y + r + 1), slice(max(0, x - r), x + r + 1)

    for y in range(h):
        for x in range(w):
            ys, xs = window(y, x)
            i_w = guide[ys, xs].reshape(-1, 3).astype(np.float64)
            p_w = p[ys, xs].reshape(-1).astype(np.float64)
            mu, pm = i_w.mean(0), p_w.mean()
            sigma = (i_w - mu).T @ (i_w - mu) / len(p_w)
            cov = ((i_w - mu) * (p_w - pm)[:, None]).mean(0)
            a[y, x] = np.linalg.solve(sigma + eps * np.eye(3), cov)
            b[y, x] = pm - a[y, x] @ mu
    q = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            ys, xs = window(y, x)
            q[y, x] = a[ys, xs].reshape(-1, 3).mean(0) @ guide[y, x] + b[ys, xs].mean()
    return q


def test_matches_the_per_window_definition():
    rng = np.random.default_rng(0)
    guide = rng.random((17, 21, 3)).astype(np.float32)
    p = (rng.random((17, 21)) > 0.5).astype(np.float32)
    for r, eps in ((1, 1e-2), (3, 1e-2), (2, 1e-1)):
        want = _naive(guide, p, r, eps)
        got = guided_filter(torch.from_numpy(guide).permute(2, 0, 1)[None],
                            torch.from_numpy(p)[None, None], r, eps)[0, 0].numpy()
        assert np.abs(got - want).max() < 1e-5


def test_flat_guide_is_a_double_box_blur_and_edges_snap_to_colour():
    p = torch.zeros(1, 1, 20, 20)
    p[..., 5:15, 5:15] = 1
    flat = guided_filter(torch.full((1, 3, 20, 20), 0.5), p, 2, 1e-2)
    box = torch.nn.functional.avg_pool2d
    blur = box(box(p, 5, 1, 2, count_include_pad=False), 5, 1, 2, count_include_pad=False)
    assert torch.allclose(flat, blur, atol=1e-5)
    # coarse mask 2 px too large, colour edge at the true boundary: the filter moves toward it
    guide = torch.zeros(1, 3, 20, 20)
    guide[..., 5:15, 5:15] = 1
    coarse = torch.zeros(1, 1, 20, 20)
    coarse[..., 3:17, 3:17] = 1
    out = guided_filter(guide, coarse, 4, 1e-3)
    truth = guide[:, :1] > 0.5
    assert ((out > 0.5) == truth).float().mean() > ((coarse > 0.5) == truth).float().mean()


def test_refiner_interface():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    mask = np.zeros((30, 40), np.uint8)
    mask[5:25, 8:30] = 255
    ref = GuidedFilterRefiner(radius=3, eps=1e-2)
    prob = ref.refine(image, mask)
    assert prob.shape == (30, 40) and prob.dtype == np.float32
    assert 0 <= prob.min() and prob.max() <= 1
    img_t = normalize_image(torch.from_numpy(image).permute(2, 0, 1)[None])
    msk_t = normalize_mask(torch.from_numpy(mask / 255.0)[None, None])
    batch = ref.refine_tensors(img_t.repeat(2, 1, 1, 1), msk_t.repeat(2, 1, 1, 1))
    assert batch.shape == (2, 30, 40) and torch.allclose(batch[0], torch.from_numpy(prob))
    # refine_segments (the detectron2 and crm-eval ROI batching) takes it as a refiner
    masks = torch.zeros(2, 30, 40, dtype=torch.bool)
    masks[0, 5:25, 8:30] = True
    masks[1, 2:10, 2:12] = True
    out = refine_segments(ref, torch.from_numpy(image).permute(2, 0, 1), masks,
                          ROIOptions(min_area=0))
    assert len(out) == 2
    with pytest.raises(ValueError, match="radius"):
        GuidedFilterRefiner(radius=0)


def test_factory_cli_and_config_switch(tmp_path):
    from crm_d2 import load_refiner
    from crm_d2.cli import refine as cli

    ref = load_refiner("guided_filter", radius=2)
    assert isinstance(ref, GuidedFilterRefiner) and ref.radius == 2
    with pytest.raises(ValueError, match="no weights"):
        load_refiner("guided_filter", "some.pth")
    with pytest.raises(ValueError, match="do not apply"):
        load_refiner("guided_filter", scales=(1.0,))
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    m = np.zeros((24, 32), np.uint8)
    m[4:20, 6:26] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    out = tmp_path / "o.png"
    assert cli.main([str(tmp_path / "i.png"), str(tmp_path / "m.png"), "-o", str(out),
                     "--refiner", "guided_filter", "--quiet"]) == 0
    assert np.asarray(Image.open(out)).shape == (24, 32)
    with pytest.raises(SystemExit, match="no --weights"):
        cli.main([str(tmp_path / "i.png"), str(tmp_path / "m.png"), "-o", str(out),
                  "--refiner", "guided_filter", "--weights", "x.pth"])
    with pytest.raises(SystemExit, match="--scales"):
        cli.main([str(tmp_path / "i.png"), str(tmp_path / "m.png"), "-o", str(out),
                  "--refiner", "guided_filter", "--scales", "1"])
    with pytest.raises(SystemExit, match="--autocast"):
        cli.main([str(tmp_path / "i.png"), str(tmp_path / "m.png"), "-o", str(out),
                  "--refiner", "guided_filter", "--autocast", "bf16"])
    with pytest.raises(ValueError, match="autocast do not apply"):
        load_refiner("guided_filter", autocast="bf16")
    with pytest.raises(SystemExit, match="--flip"):
        cli.main([str(tmp_path / "i.png"), str(tmp_path / "m.png"), "-o", str(out),
                  "--refiner", "guided_filter", "--flip"])
    with pytest.raises(ValueError, match="flip do not apply"):
        load_refiner("guided_filter", flip=True)
    with pytest.raises(SystemExit, match="--guided-blend"):
        cli.main([str(tmp_path / "i.png"), str(tmp_path / "m.png"), "-o", str(out),
                  "--refiner", "guided_filter", "--guided-blend", "0.5"])


def test_tiles_give_the_whole_image_answer_and_copy_constant_tiles():
    torch.manual_seed(0)
    guide = torch.rand(2, 3, 70, 45)
    src = torch.zeros(2, 1, 70, 45)
    src[:, :, 10:30, 5:25] = 1  # the lower part of the image is constant: its tiles are copied
    whole = guided_filter(guide, src, 3, 1e-2)
    for max_pixels in (2 * 24 * 24, 2 * 40 * 40, 1):  # tiles of 24 and 40 px, and the minimum
        tiled = guided_filter(guide, src, 3, 1e-2, max_pixels=max_pixels)
        assert (tiled - whole).abs().max() < 1e-5
    assert (whole[:, :, 45:] - src[:, :, 45:]).abs().max() < 1e-5  # a constant far from edges


def test_grey_guide_at_small_eps():
    """A grey image (repeated to RGB) makes the guide's covariance rank one plus eps: the 3x3
    solve must not lose the answer to cancellation."""
    rng = np.random.default_rng(1)
    grey = rng.random((15, 19)).astype(np.float32)
    guide = np.repeat(grey[..., None], 3, axis=-1)
    p = (rng.random((15, 19)) > 0.5).astype(np.float32)
    for eps in (1e-3, 1e-4, 1e-5):
        want = _naive(guide, p, 2, eps)
        got = guided_filter(torch.from_numpy(guide).permute(2, 0, 1)[None],
                            torch.from_numpy(p)[None, None], 2, eps)[0, 0].numpy()
        assert np.abs(got - want).max() < 1e-4, eps
