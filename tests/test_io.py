"""crm_d2.io: the one image / mask reading rule (EXIF, palette, colour, 16-bit, 0/1) in every
reader, and atomic writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from crm_d2 import CRMRefiner
from crm_d2.cli import eval as eval_cli
from crm_d2.cli import refine as refine_cli
from crm_d2.io import atomic_path, mask_to_prob, read_image, read_mask, save_image, write_text
from crm_d2.training.datasets import load_image, load_mask

H, W = 40, 56


def _object() -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[8:30, 10:44] = True
    m[12:20, 40:50] = True
    return m


def _palette_png(path, mask: np.ndarray, index: int = 1) -> None:
    """A VOC / DAVIS style palette mask: index 0 black, ``index`` dark red (luminance ~38)."""
    im = Image.fromarray(mask.astype(np.uint8) * index, mode="P")
    pal = [0, 0, 0] + [128, 0, 0] * 255
    im.putpalette(pal)
    im.save(path)


def _twins(tmp_path) -> dict[str, str]:
    """The same object as a 0/255 gray PNG and in five other encodings."""
    m = _object()
    paths = {k: str(tmp_path / f"{k}.png") for k in ("gray", "pal", "red", "m01", "bits")}
    Image.fromarray(m.astype(np.uint8) * 255).save(paths["gray"])
    _palette_png(paths["pal"], m)
    red = np.zeros((H, W, 3), np.uint8)
    red[m] = (255, 0, 0)
    Image.fromarray(red).save(paths["red"])
    Image.fromarray(m.astype(np.uint8)).save(paths["m01"])
    Image.fromarray(m).save(paths["bits"])  # mode "1"
    return paths


def test_mask_rule_palette_colour_01_and_bilevel_equal_the_gray_twin(tmp_path):
    paths = _twins(tmp_path)
    want = _object().astype(np.uint8) * 255
    for kind, path in paths.items():
        got = read_mask(path)
        assert got.dtype == np.uint8 and np.array_equal(got, want), kind
        assert np.array_equal(load_mask(path), want), kind  # the training reader


def test_every_mask_reader_reads_a_palette_mask_like_its_gray_twin(tmp_path):
    """A DAVIS-style index-1 palette mask (luminance ~38) equals its 0/255 twin in every reader:
    crm_d2.io, the training pairs and samples, crm-eval's overlay reader and the benchmark demo
    (crm-refine and crm-eval's BIG reader: the two end-to-end tests below)."""
    import runpy
    from pathlib import Path
    from types import SimpleNamespace

    from crm_d2.crm_eval.formats.big import BigFormat, BigPayload
    from crm_d2.training.datasets import CRMTrainDataset, ImageMaskPairs

    m = _object()
    image = np.random.default_rng(3).integers(0, 256, (H, W, 3), dtype=np.uint8)
    paths = {}
    for kind in ("gray", "pal"):
        folder = tmp_path / kind
        (folder / "highres_demo").mkdir(parents=True)
        Image.fromarray(image).save(folder / "highres_demo" / "aeroplane.jpg", quality=100)
        mask_path = folder / "highres_demo" / "aeroplane.png"
        if kind == "gray":
            Image.fromarray(m.astype(np.uint8) * 255).save(mask_path)
        else:
            _palette_png(mask_path, m)
        paths[kind] = (str(folder / "highres_demo" / "aeroplane.jpg"), str(mask_path))
    with Image.open(paths["pal"][1]) as im:
        assert im.mode == "P" and np.asarray(im.convert("L")).max() < 128  # the trap
    bench = runpy.run_path(
        str(Path(__file__).resolve().parents[1] / "tools" / "benchmark.py"), run_name="bench"
    )

    def readers(kind: str) -> dict[str, np.ndarray]:
        image_path, mask_path = paths[kind]
        sample = CRMTrainDataset([paths[kind]], crop_size=32, coarse="stride8", seed=0)[0]
        return {
            "read_mask": read_mask(mask_path),
            "training load_mask": load_mask(mask_path),
            "training pairs": ImageMaskPairs([paths[kind]]).load(0)[1],
            "training sample gt": sample["gt"].numpy(),
            "training sample coarse": sample["coarse"].numpy(),
            "crm-eval overlays": np.stack(
                BigFormat(str(tmp_path)).masks(
                    SimpleNamespace(payload=BigPayload(mask_path, mask_path, False)), None
                )
            ),
            "benchmark demo": bench["_demo"](str(tmp_path / kind), (W // 2, H // 2))[1],
        }

    gray, pal = readers("gray"), readers("pal")
    assert gray["read_mask"].max() == 255 and gray["benchmark demo"].max() > 128
    for name, want in gray.items():
        assert np.array_equal(pal[name], want), name


def test_mask_rule_16bit_soft_masks_keep_their_values(tmp_path):
    soft = np.full((H, W), round(0.3 * 65535), np.uint16)
    soft[:5] = 65535
    Image.fromarray(soft).save(tmp_path / "soft16.png")
    assert Image.open(tmp_path / "soft16.png").mode.startswith("I")
    got = read_mask(tmp_path / "soft16.png")
    assert got[10, 10] == round(0.3 * 255) and got[0, 0] == 255


def test_mask_rule_gray_stored_as_rgb_stays_soft_and_cutout_alpha_is_used(tmp_path):
    soft = np.tile(np.linspace(0, 255, W).astype(np.uint8), (H, 1))
    Image.fromarray(np.stack([soft] * 3, -1)).save(tmp_path / "rgb_gray.png")
    assert np.array_equal(read_mask(tmp_path / "rgb_gray.png"), soft)
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., :3] = 77
    rgba[..., 3] = soft
    Image.fromarray(rgba).save(tmp_path / "cut.png")
    assert np.array_equal(read_mask(tmp_path / "cut.png"), soft)


def test_mask_to_prob_reads_uint8_01_as_binary():
    m = _object()
    assert np.array_equal(mask_to_prob(m.astype(np.uint8)), m.astype(np.float32))
    assert np.array_equal(mask_to_prob(m.astype(np.uint8) * 255), m.astype(np.float32))
    assert mask_to_prob(np.full((2, 2), 65535, np.uint16)).max() == 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_to_prob(np.full((2, 2), 2.0, np.float32))


def test_api_uint8_01_mask_equals_its_0_255_twin(make_crm):
    refiner = CRMRefiner(make_crm(), scales=(0.5, 1.0))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    m = _object().astype(np.uint8)
    np.testing.assert_array_equal(refiner.refine(image, m), refiner.refine(image, m * 255))


def _exif_jpeg(path, pixels: np.ndarray, orientation: int) -> None:
    im = Image.fromarray(pixels)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif.tobytes(), quality=100, subsampling=0)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_read_image_applies_exif_orientation(tmp_path, orientation):
    pixels = np.zeros((30, 50, 3), np.uint8)
    pixels[:10, :10] = 255  # a white top-left corner
    path = tmp_path / f"o{orientation}.jpg"
    _exif_jpeg(path, pixels, orientation)
    got = read_image(path)
    turn = {3: 2, 6: 3, 8: 1}[orientation]  # counter-clockwise quarter turns
    want = np.rot90(read_image_no_exif(path), turn)
    assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 2
    assert np.array_equal(load_image(path), got)
    d2 = pytest.importorskip("detectron2.data.detection_utils", reason="detectron2 not installed")
    assert np.array_equal(got, d2.read_image(str(path), format="RGB"))


def read_image_no_exif(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_crm_refine_reads_exif_photos_and_palette_masks(tmp_path, tiny_weights):
    """An Orientation-6 photo with a mask drawn on the upright picture, and a palette mask: the
    same output as the upright photo and the 0/255 mask."""
    rng = np.random.default_rng(1)
    upright = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(upright).save(tmp_path / "upright.png")
    # stored rotated by 90 degrees clockwise, displayed upright through Orientation 6
    stored = Image.fromarray(np.rot90(upright, 1))
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.png", exif=exif.tobytes())
    np.testing.assert_array_equal(read_image(tmp_path / "phone.png"), upright)
    paths = _twins(tmp_path)
    outs = {}
    for name, image, mask in (
        ("ref", "upright.png", paths["gray"]),
        ("phone", "phone.png", paths["pal"]),
    ):
        out = tmp_path / f"{name}_out.png"
        assert (
            refine_cli.main(
                [
                    str(tmp_path / image),
                    mask,
                    "-o",
                    str(out),
                    "--weights",
                    tiny_weights,
                    "--scales",
                    "0.5",
                    "1",
                    "--quiet",
                ]
            )
            == 0
        )
        outs[name] = np.asarray(Image.open(out))
    np.testing.assert_array_equal(outs["phone"], outs["ref"])


def test_crm_eval_big_reads_palette_masks_like_their_gray_twins(tmp_path, tiny_weights):
    image = np.random.default_rng(2).integers(0, 256, (H, W, 3), dtype=np.uint8)
    gt = _object()
    coarse = np.roll(gt, 3, axis=0)
    reports = {}
    for kind in ("gray", "palette"):
        folder = tmp_path / kind
        folder.mkdir()
        Image.fromarray(image).save(folder / "x_im.png")
        for name, mask in (("gt", gt), ("seg", coarse)):
            if kind == "gray":
                Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"x_{name}.png")
            else:
                _palette_png(folder / f"x_{name}.png", mask, index=3)
        eval_cli.main(
            [
                "--weights",
                tiny_weights,
                "--big",
                str(folder),
                "--output",
                str(tmp_path / f"out_{kind}"),
                "--min-area",
                "0",
                "--overlays",
                "0",
                "--scales",
                "0.5",
                "1",
                "--quiet",
            ]
        )
        with open(tmp_path / f"out_{kind}" / "report.json", encoding="utf-8") as f:
            reports[kind] = json.load(f)
    assert reports["palette"]["before"] == reports["gray"]["before"]
    assert reports["palette"]["after"] == reports["gray"]["after"]
    assert reports["gray"]["before"]["iou"] > 50  # the object did not vanish


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------
def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "mask.png"
    save_image(target, np.full((4, 4), 255, np.uint8))
    good = target.read_bytes()
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"\x89PNG truncat")
        raise KeyboardInterrupt
    assert target.read_bytes() == good
    assert os.listdir(tmp_path) == ["mask.png"]
    with pytest.raises(TypeError):
        save_image(target, np.zeros((4, 4), object))  # Pillow refuses: nothing written
    assert target.read_bytes() == good and os.listdir(tmp_path) == ["mask.png"]


def test_atomic_writes_keep_the_extension_and_usual_permissions(tmp_path):
    write_text(tmp_path / "r.md", "# hi\n")
    save_image(tmp_path / "a.jpg", np.zeros((4, 4, 3), np.uint8), quality=90)
    assert Image.open(tmp_path / "a.jpg").format == "JPEG"
    umask = os.umask(0o022)
    os.umask(umask)
    assert (os.stat(tmp_path / "r.md").st_mode & 0o777) == 0o666 & ~umask
