"""crm-refine end to end: synthetic files, error messages, and the 3492x2328 demo photo."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from crm_d2 import save_crm
from crm_d2.cli import refine as cli
from crm_d2.io import read_mask
from crm_d2.modeling.crm import TINY_ARCH

TINY = TINY_ARCH


@pytest.fixture(scope="module")
def weights(tmp_path_factory, make_crm) -> str:
    path = tmp_path_factory.mktemp("w") / "tiny_fp16.pth"
    save_crm(make_crm(TINY), str(path), half=True)
    return str(path)


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)
    mask = np.zeros((45, 61), np.uint8)
    mask[10:35, 15:50] = 255
    Image.fromarray(img).save(tmp_path / "im.jpg")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path


def test_refine_writes_probabilities_and_overlay(files, weights):
    out, ov = files / "out.png", files / "sub" / "ov.png"
    assert cli.main([str(files / "im.jpg"), str(files / "mask.png"), "-o", str(out),
                     "--weights", weights, "--overlay", str(ov), "--quiet"]) == 0
    prob = np.asarray(Image.open(out))
    assert prob.shape == (45, 61) and prob.dtype == np.uint8
    assert len(np.unique(prob)) > 2  # probabilities, not a binary mask
    pic = np.asarray(Image.open(ov))
    assert pic.ndim == 3 and pic.shape[0] == 45 and pic.shape[1] == 2 * 61 + 8


def test_threshold_gives_binary(files, weights):
    out = files / "bin.png"
    cli.main([str(files / "im.jpg"), str(files / "mask.png"), "-o", str(out), "--weights",
              weights, "--threshold", "0.5", "--quiet", "--scales", "0.5", "1.0"])
    assert set(np.unique(np.asarray(Image.open(out)))) <= {0, 255}


def test_missing_weights_says_what_to_pass(files, monkeypatch):
    monkeypatch.setattr("crm_d2.weights.default_weights_path", lambda: None)
    with pytest.raises(SystemExit, match="--weights PATH.*model_45705"):
        cli.main([str(files / "im.jpg"), str(files / "mask.png"), "-o", str(files / "o.png")])


def test_bad_checkpoint_and_size_mismatch(files, weights):
    html = files / "model_45705.aspx"
    html.write_text("<html><body>Sign in</body></html>")
    with pytest.raises(SystemExit, match="HTML page"):
        cli.main([str(files / "im.jpg"), str(files / "mask.png"), "-o", str(files / "o.png"),
                  "--weights", str(html)])
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(files / "small.png")
    with pytest.raises(SystemExit, match="61x45 .* mask is 10x10"):
        cli.main([str(files / "im.jpg"), str(files / "small.png"), "-o", str(files / "o.png"),
                  "--weights", weights])
    with pytest.raises(SystemExit, match="no such file"):
        cli.main([str(files / "nope.jpg"), str(files / "mask.png"), "-o", "x.png"])


def test_read_mask_conventions(tmp_path):
    m01 = np.zeros((4, 5), np.uint8)
    m01[1:3, 1:4] = 1
    Image.fromarray(m01).save(tmp_path / "m01.png")
    assert read_mask(str(tmp_path / "m01.png")).max() == 255
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 3] = m01 * 200
    Image.fromarray(rgba).save(tmp_path / "cut.png")
    assert np.array_equal(read_mask(str(tmp_path / "cut.png")), m01 * 200)


def test_highres_demo_end_to_end(shared_data, weights, tmp_path):
    """CascadePSP's 3492x2328 demo photo and its coarse mask through the CLI (~1-2 min)."""
    demo = shared_data / "highres_demo"
    out, ov = tmp_path / "aeroplane_refined.png", tmp_path / "aeroplane_overlay.png"
    assert cli.main([str(demo / "aeroplane.jpg"), str(demo / "aeroplane.png"), "-o", str(out),
                     "--weights", weights, "--overlay", str(ov), "--quiet",
                     "--chunk-size", "400000"]) == 0
    assert Image.open(out).size == (3492, 2328)
    assert max(Image.open(ov).size) == 1600
