"""tools/pack_training_set.py on tiny synthetic sources."""

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crm_d2.training.datasets import list_image_mask_pairs, sample_name
from crm_d2.training.sources import build_source

TOOL = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "pack_training_set.py"))


def _folder(root: Path, name: str, n: int, size=(60, 80)) -> str:
    rng = np.random.default_rng(len(name))
    (root / name / "images").mkdir(parents=True)
    (root / name / "masks").mkdir(parents=True)
    for i in range(n):
        img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        mask = np.zeros(size, np.uint8)
        mask[10:40, 20 + i % 10 : 60] = 255
        Image.fromarray(img).save(root / name / "images" / f"{name}{i:03d}.jpg")
        Image.fromarray(mask).save(root / name / "masks" / f"{name}{i:03d}.png")
    return f"folder:{root / name}"


def test_pack_leaves_out_held_out_downscales_and_weighs_repeats(tmp_path):
    a = _folder(tmp_path / "src", "big", 40)
    b = _folder(tmp_path / "src", "small", 20)
    out = tmp_path / "pack"
    manifest = TOOL["pack"]([a, b, b], out, val_fraction=0.2, seed=0, max_side=40,
                            budget_mb=10.0)
    rows = {s["name"]: s for s in manifest["sources"]}
    # everything fits the budget: every training sample is packed, none of the held-out ones
    for spec, name in ((a, "big"), (b, "small")):
        _, train, val = build_source(spec, 0.2, 0)
        packed = list_image_mask_pairs(out / name)
        assert rows[name]["packed"] == len(train) == len(packed) > 0
        held_out = {sample_name(p[0]).split("/")[1] for p in val.pairs}
        stems = {Path(p[0]).stem.split("__")[1] for p in packed}
        assert stems == {sample_name(p[0]).split("/")[1] for p in train}
        assert not held_out & stems
    assert rows["small"]["times"] == 2 and rows["big"]["times"] == 1
    image = np.asarray(Image.open(packed[0][0]))
    mask = np.asarray(Image.open(packed[0][1]))
    assert image.shape == (30, 40, 3) and mask.shape == (30, 40)
    assert manifest["train_data_args"] == [f"folder:{out / 'big'}", f"folder:{out / 'small'}"]
    assert json.loads((out / "manifest.json").read_text())["bytes"] == manifest["bytes"]


def test_pack_stops_at_the_budget_in_proportion(tmp_path):
    a = _folder(tmp_path / "src", "big", 40)
    b = _folder(tmp_path / "src", "small", 20)
    full = TOOL["pack"]([a, b], tmp_path / "full", 0.0, max_side=64, budget_mb=10.0)
    per_sample = full["bytes"] / 60
    budget = 21.5 * per_sample / 2**20
    part = TOOL["pack"]([a, b, b], tmp_path / "part", 0.0, max_side=64, budget_mb=budget)
    rows = {s["name"]: s["packed"] for s in part["sources"]}
    assert part["bytes"] <= budget * 2**20
    assert 18 <= sum(rows.values()) <= 24
    # weights 40 x 1 and 20 x 2: equal shares
    assert abs(rows["big"] - rows["small"]) <= 2


def test_pack_refuses_a_non_empty_output(tmp_path):
    a = _folder(tmp_path / "src", "big", 4)
    out = tmp_path / "pack"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="not empty"):
        TOOL["pack"]([a], out, 0.0)
    assert (out / "keep.txt").read_text() == "user data"


def test_pack_refuses_an_output_inside_the_repository(capsys):
    repo = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit):
        TOOL["main"](["--data", "folder:/nonexistent", "--output", str(repo / "packed")])
    assert "inside the crm_d2 repository" in capsys.readouterr().err
    assert not (repo / "packed").exists()
