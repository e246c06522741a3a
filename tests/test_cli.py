"""crm-refine end to end: synthetic files, error messages, and the 3492x2328 demo photo."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
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


def test_autocast_flag_sets_the_precision(files, weights, monkeypatch):
    from crm_d2 import CRMRefiner

    seen = []
    real = CRMRefiner.refine

    def spy(self, *a, **k):
        seen.append(self.fast_options())
        return real(self, *a, **k)

    monkeypatch.setattr(CRMRefiner, "refine", spy)
    base = [str(files / "im.jpg"), str(files / "mask.png"), "-o", str(files / "o.png"),
            "--weights", weights, "--quiet"]
    assert cli.main(base) == 0
    assert cli.main(base + ["--autocast", "none"]) == 0
    assert [o.autocast for o in seen] == ["auto", None]


def test_flip_flag_turns_on_test_time_augmentation(files, weights, monkeypatch):
    from crm_d2 import CRMRefiner

    seen = []
    real = CRMRefiner.refine
    monkeypatch.setattr(CRMRefiner, "refine",
                        lambda self, *a, **k: seen.append(self.flip) or real(self, *a, **k))
    base = [str(files / "im.jpg"), str(files / "mask.png"), "-o", str(files / "o.png"),
            "--weights", weights, "--quiet", "--scales", "1"]
    assert cli.main(base) == 0 and cli.main(base + ["--flip"]) == 0
    assert seen == [False, True]


def test_guided_blend_flag_overrides_the_checkpoint(files, weights, monkeypatch):
    from crm_d2 import CRMRefiner

    seen = []
    real = CRMRefiner.refine
    monkeypatch.setattr(CRMRefiner, "refine",
                        lambda self, *a, **k: seen.append(self.guided_blend) or real(self, *a, **k))
    base = [str(files / "im.jpg"), str(files / "mask.png"), "-o", str(files / "o.png"),
            "--weights", weights, "--quiet", "--scales", "1"]
    assert cli.main(base) == 0 and cli.main(base + ["--guided-blend", "0.5"]) == 0
    assert seen == [0.0, 0.5]
    for bad in ("1.5", "x"):
        with pytest.raises(SystemExit):
            cli.main(base + ["--guided-blend", bad])
    with pytest.raises(SystemExit, match="--guided-blend do"):
        cli.main(base[:4] + ["--refiner", "guided_filter", "--guided-blend", "0"])


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


@pytest.mark.slow
def test_highres_demo_end_to_end(shared_data, weights, tmp_path):
    """CascadePSP's 3492x2328 demo photo and its coarse mask through the CLI (~1-2 min)."""
    demo = shared_data / "highres_demo"
    out, ov = tmp_path / "aeroplane_refined.png", tmp_path / "aeroplane_overlay.png"
    assert cli.main([str(demo / "aeroplane.jpg"), str(demo / "aeroplane.png"), "-o", str(out),
                     "--weights", weights, "--overlay", str(ov), "--quiet",
                     "--chunk-size", "400000"]) == 0
    assert Image.open(out).size == (3492, 2328)
    assert max(Image.open(ov).size) == 1600  # the overview, with the zoom below it


# --------------------------------------------------------------------------------------------
# Hostile inputs: every bad path or value stops before any refinement, with a message
# --------------------------------------------------------------------------------------------
def _args(files, weights, *extra):
    return [str(files / "im.jpg"), str(files / "mask.png"), "--weights", weights, "--quiet",
            "--scales", "0.5", "1", *extra]


@pytest.fixture()
def no_refine(monkeypatch):
    """Fail the test if CRM runs: the errors must come before any refinement."""
    def refine(*a, **k):
        raise AssertionError("refinement started before the error")
    monkeypatch.setattr("crm_d2.CRMRefiner.refine", refine)


@pytest.mark.parametrize("which", ["image", "mask"])
def test_refuses_to_overwrite_an_input(files, weights, which, no_refine):
    target = files / ("im.jpg" if which == "image" else "mask.png")
    before = target.read_bytes()
    for flag in ("-o", "--overlay"):
        extra = ["-o", str(target)] if flag == "-o" else ["-o", str(files / "x.png"),
                                                          "--overlay", str(target)]
        with pytest.raises(SystemExit, match="is also an input"):
            cli.main(_args(files, weights, *extra))
    assert target.read_bytes() == before
    with pytest.raises(SystemExit, match="is also an input"):
        cli.main(_args(files, weights, "-o", str(files / "o.png"), "--overlay",
                       str(files / "o.png")))


@pytest.mark.parametrize("output, message", [
    ("noext", "has no extension"),
    ("out.txt", "not an image format"),
    ("bin.jpg", "lossy"),
    ("folder/", "is a folder"),
    ("im.jpg/o.png", "is a file"),
])
def test_bad_output_paths_fail_before_refining(files, weights, output, message, no_refine):
    (files / "folder").mkdir()
    with pytest.raises(SystemExit, match=message):
        cli.main(_args(files, weights, "-o", str(files / output), "--threshold", "0.5"))


def test_unwritable_output_folder_fails_before_refining(files, weights, no_refine, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("tempfile.mkstemp", refuse)  # a read-only folder, also for root
    with pytest.raises(SystemExit, match="cannot write into .*Permission denied"):
        cli.main(_args(files, weights, "-o", str(files / "ro" / "o.png")))


def test_full_disk_keeps_the_previous_output(files, weights, monkeypatch):
    out = files / "o.png"
    out.write_bytes(b"previous good output")

    def full(self, fp, *a, **k):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(SystemExit, match="No space left.*unchanged"):
        cli.main(_args(files, weights, "-o", str(out)))
    assert out.read_bytes() == b"previous good output"
    assert sorted(p.name for p in files.iterdir()) == ["im.jpg", "mask.png", "o.png"]


@pytest.mark.parametrize("flags", [
    ["--scales", "0"], ["--scales", "0.5", "-1"], ["--chunk-size", "0"],
    ["--overlay-max-side", "-5"], ["--threshold", "1.5"], ["--scales", "nan"],
])
def test_bad_option_values_are_argparse_errors(files, weights, flags, capsys, no_refine):
    with pytest.raises(SystemExit) as e:
        cli.main(_args(files, weights, "-o", str(files / "o.png"), *flags))
    assert e.value.code == 2
    assert f"argument {flags[0]}" in capsys.readouterr().err


def test_cuda_without_cuda_is_an_argparse_error(files, weights, capsys, no_refine):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as e:
        cli.main(_args(files, weights, "-o", str(files / "o.png"), "--device", "cuda"))
    assert e.value.code == 2
    assert "--device" in capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [
    (lambda obj: obj.pop("arch"), "without its 'arch'"),
    (lambda obj: obj["arch"].update(block="triangle"), "architecture"),
    (lambda obj: obj["arch"].update(colour=1), "architecture"),
    (lambda obj: obj.update(scales=[0.0, 1.0]), "unusable inference scales"),
])
def test_bad_checkpoint_contents_are_messages(files, weights, tmp_path, edit, message):
    obj = torch.load(weights, weights_only=True)
    edit(obj)
    torch.save(obj, tmp_path / "edited.pth")
    with pytest.raises(SystemExit, match=message) as e:
        cli.main([str(files / "im.jpg"), str(files / "mask.png"), "-o", str(files / "o.png"),
                  "--weights", str(tmp_path / "edited.pth"), "--quiet"])
    assert str(e.value.code).startswith("crm-refine: ")


def test_memory_estimate_refuses_up_front_and_names_the_options(files, weights, monkeypatch):
    monkeypatch.setattr("crm_d2.memory.available_bytes", lambda device: 2**20)
    with pytest.raises(SystemExit, match=r"needs about .* GiB .*--scales .*--no-memory-check"):
        cli.main(_args(files, weights, "-o", str(files / "o.png")))
    assert not (files / "o.png").exists()
    assert cli.main(_args(files, weights, "-o", str(files / "o.png"), "--no-memory-check")) == 0


def test_logs_each_step_before_the_progress_bar(files, weights, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("crm_d2"), "propagate", True)  # after detectron2
    caplog.set_level("INFO")
    cli.main(_args(files, weights, "-o", str(files / "o.png")))
    text = caplog.text
    steps = ["reading", "loading CRM weights", "reflect-padded to 125x109",
             "scale 0.5 (1/2): encoding", "scale 1 (2/2): encoding", "wrote"]
    positions = [text.find(s) for s in steps]
    assert -1 not in positions and positions == sorted(positions)


def test_overlay_adds_a_full_resolution_zoom_of_the_most_changed_region(files, weights):
    from crm_d2.visualize import changed_window

    coarse = np.zeros((300, 400), bool)
    refined = coarse.copy()
    refined[200:230, 310:350] = True
    assert changed_window(coarse, refined, 64) == (298, 183, 362, 247)  # covers the change
    out, ov = files / "o.png", files / "ov.png"
    assert cli.main(_args(files, weights, "-o", str(out), "--overlay", str(ov),
                          "--overlay-max-side", "60", "--overlay-zoom", "20")) == 0
    pic = np.asarray(Image.open(ov))
    # overview (2 panels 26x19 px + gap: 60 px wide) above a gap and the 2 x 20x20 px zoom
    assert pic.shape[:2] == (19 + 8 + 20, 60)
    zoom = pic[19 + 8:, : 2 * 20 + 8]
    assert not (zoom == 255).all()  # the zoom holds picture, not padding
    assert cli.main(_args(files, weights, "-o", str(out), "--overlay", str(ov),
                          "--overlay-max-side", "0")) == 0
    assert np.asarray(Image.open(ov)).shape[:2] == (45, 2 * 61 + 8)  # full resolution


def test_one_missing_weights_rule_for_every_front_end(monkeypatch):
    """crm-refine, crm-eval, the API and MODEL.CRM.WEIGHTS share one lookup and one message."""
    from crm_d2.inference import CRMRefiner
    from crm_d2.weights import MissingWeightsError, resolve_weights

    assert resolve_weights("given.pth", "--weights PATH") == "given.pth"
    monkeypatch.setattr("crm_d2.weights.default_weights_path", lambda: None)
    with pytest.raises(MissingWeightsError, match=r"MODEL\.CRM\.WEIGHTS is not set.*model_45705"):
        resolve_weights("", "MODEL.CRM.WEIGHTS")
    with pytest.raises(MissingWeightsError, match="tools/train_crm.py"):
        CRMRefiner.from_checkpoint(None)
