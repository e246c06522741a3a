"""Tests of the CRM training loop (crm_d2.training.trainer and tools/train_crm.py).

Everything runs on CPU with the "tiny" preset on 32 px crops of a synthetic folder of bright
discs on a dark background (the mask is visible in the image, so the task is learnable in a
few dozen steps).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import runpy
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from crm_d2.checkpoint import load_crm, save_crm
from crm_d2.coarse import CoarseKind
from crm_d2.evaluation.binary import boundary_accuracy
from crm_d2.inference import CRMRefiner
from crm_d2.modeling.crm import CRMNet
from crm_d2.training.datasets import CRMTrainDataset, ImageMaskPairs, list_image_mask_pairs
from crm_d2.training.trainer import (
    PRESETS,
    TrainConfig,
    ValSample,
    load_init_weights,
    make_val_samples,
    train,
    validate,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CROP = 32


def _disc_folder(root: Path, n: int, size: int = 40, seed: int = 0) -> Path:
    """``root/images/NNN.png`` + ``root/masks/NNN.png``: noisy bright discs on dark noise."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        centre = tuple(int(v) for v in rng.integers(size // 3, 2 * size // 3, 2))
        cv2.circle(mask, centre, int(rng.integers(size // 6, size // 3)), 255, -1)
        image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        fg = mask > 0
        image[fg] = rng.integers(180, 256, (int(fg.sum()), 3)).astype(np.uint8)
        cv2.imwrite(str(root / "images" / f"{i:03d}.png"), image)
        cv2.imwrite(str(root / "masks" / f"{i:03d}.png"), mask)
    return root


@pytest.fixture(scope="module")
def disc_pairs(tmp_path_factory) -> list[tuple[str, str]]:
    root = _disc_folder(tmp_path_factory.mktemp("discs"), 8)
    return list_image_mask_pairs(root)


def _config(out: Path, **kw) -> TrainConfig:
    base = dict(
        arch="tiny",
        crop_size=CROP,
        batch_size=2,
        iterations=6,
        milestones=(2, 4),
        num_workers=0,
        log_every=1,
        val_every=0,
        ckpt_every=3,
        output_dir=str(out),
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def _dataset(pairs, seed: int = 0) -> CRMTrainDataset:
    return CRMTrainDataset(pairs, crop_size=CROP, coarse="perturb+stride8", seed=seed)


def _events(out: Path, kind: str) -> list[dict]:
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["event"] == kind]


# ============================================================================ config


def test_config_defaults_are_the_paper_recipe():
    cfg = TrainConfig()
    assert (cfg.crop_size, cfg.batch_size, cfg.iterations) == (224, 12, 45_000)
    assert (cfg.lr, cfg.weight_decay, cfg.gamma) == (2.25e-4, 1e-4, 0.1)
    assert cfg.lr_milestones == (22_500, 37_500)
    assert cfg.loss_weights == {"ce": 1.0, "l1": 0.5, "l2": 0.5, "grad": 2.0, "boundary": 0.0}
    # Shorter schedules keep the paper's proportions (1/2 and 5/6 of the run).
    assert TrainConfig(iterations=4_500).lr_milestones == (2_250, 3_750)
    assert TrainConfig(iterations=100, milestones=(10, 20)).lr_milestones == (10, 20)
    # layer4 never runs, so it is never trained.
    assert TrainConfig(arch="official").training_arch.with_layer4 is False
    assert TrainConfig(arch="official").training_arch.layers == (3, 4, 6, 3)
    assert PRESETS["lite"].block == "basic" and PRESETS["tiny"].width == 32


@pytest.mark.parametrize(
    "kw",
    [
        {"arch": "huge"},
        {"batch_size": 0},
        {"amp": "int8"},
        {"loss_weights": {"dice": 1.0}},
        {"milestones": (5, 2)},
        {"lr": 0.0},
    ],
)
def test_config_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        TrainConfig(**kw)


# ============================================================================ training


def test_loss_decreases_and_outputs(tmp_path, disc_pairs):
    """30 steps at lr 3e-3 cut the loss by more than half; every output file is usable."""
    val_pairs = list_image_mask_pairs(_disc_folder(tmp_path / "val", 2, size=48, seed=5))
    val = make_val_samples([ImageMaskPairs(val_pairs)], seed=0)
    out = tmp_path / "run"
    cfg = _config(
        out,
        iterations=30,
        lr=3e-3,
        milestones=(1000,),
        batch_size=4,
        val_every=15,
        ckpt_every=10,
        val_scales=(0.5, 1.0),
    )
    final = train(cfg, [_dataset(disc_pairs)], val)

    losses = [r["loss"] for r in _events(out, "train")]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    for rec in _events(out, "train"):
        assert {"ce", "l1", "l2", "grad", "lr", "s_per_iter", "eta_s"} <= set(rec)
    vals = _events(out, "val")
    assert [v["iter"] for v in vals] == [15, 30]
    assert all(0 <= v["iou_after"] <= 1 and "mba_after" in v for v in vals)
    assert [c["iter"] for c in _events(out, "checkpoint")] == [10, 20, 30]
    listed = json.loads((out / "val_samples.json").read_text())
    assert [v["coarse"] for v in listed] == ["perturb", "stride8"]

    # Final export: half precision, no layer4, the validated scales, a training record.
    assert final == str(out / "model_final.pth")
    refiner = CRMRefiner.from_checkpoint(final)
    assert refiner.scales == (0.5, 1.0)  # cfg.val_scales: the file refines as it was measured
    meta = refiner.metadata["training"]
    assert meta["iterations"] == 30 and meta["train_samples"] == 8
    assert meta["hardware"]["device"] == "cpu" and meta["val"]["iou_after"] == vals[-1]["iou_after"]
    raw = torch.load(final, map_location="cpu", weights_only=True)
    assert raw["state_dict"]["aspp_.last_conv.0.weight"].dtype == torch.float16
    # last.pth is a loadable project checkpoint too; the export is its weights in float16.
    last_model, last_meta = load_crm(str(out / "last.pth"))
    assert last_meta["train_state"]["iteration"] == 30
    for key, value in last_model.state_dict().items():
        expected = value.half().float() if value.is_floating_point() else value
        assert torch.equal(refiner.model.state_dict()[key], expected), key

    image = cv2.imread(val_pairs[0][0])[:, :, ::-1].copy()
    prob = refiner.refine(image, val[0].coarse)
    assert prob.shape == image.shape[:2] and 0 <= prob.min() <= prob.max() <= 1

    best_model, best_meta = load_crm(str(out / "best.pth"))
    best_iter = max(vals, key=lambda v: v["iou_gain"])["iter"]
    assert best_meta["training"]["iteration"] == best_iter


def _lr_after(iterations: int) -> float:
    """lr after ``iterations`` scheduler steps with milestones (2, 4) and gamma 0.1."""
    lr = TrainConfig().lr
    return lr * 0.1 ** sum(iterations >= m for m in (2, 4))


def test_resume_matches_uninterrupted_run(tmp_path, disc_pairs):
    """3 + 3 resumed iterations give bit-identical weights and optimizer state to 6 in a row.

    The interruption falls mid-epoch (8 samples / batch 2 = 4 batches) and between the two lr
    milestones (2 and 4), so the sampler offset, the scheduler and the dropout RNG all matter.
    """
    full = tmp_path / "full"
    train(_config(full), [_dataset(disc_pairs)])

    split = tmp_path / "split"
    train(_config(split, iterations=3), [_dataset(disc_pairs)])
    # Resume from the layout the first release wrote by hand (plain torch.save of this dict).
    _rewrite_in_old_layout(split / "last.pth")
    train(_config(split, resume="auto"), [_dataset(disc_pairs)])
    assert [r["iter"] for r in _events(split, "train")] == [1, 2, 3, 4, 5, 6]

    a = torch.load(full / "last.pth", map_location="cpu", weights_only=True)
    b = torch.load(split / "last.pth", map_location="cpu", weights_only=True)
    assert a["train_state"]["iteration"] == b["train_state"]["iteration"] == 6
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    opt_a, opt_b = a["train_state"]["optimizer"], b["train_state"]["optimizer"]
    for pid, st in opt_a["state"].items():
        for name, value in st.items():
            assert torch.equal(value, opt_b["state"][pid][name]), (pid, name)
    assert opt_a["param_groups"][0]["lr"] == opt_b["param_groups"][0]["lr"]
    assert opt_a["param_groups"][0]["lr"] == pytest.approx(_lr_after(6))
    losses_a = [r["loss"] for r in _events(full, "train")]
    losses_b = [r["loss"] for r in _events(split, "train")]
    assert losses_a == losses_b

    # A different seed really changes the run (the comparison above can fail).
    other = tmp_path / "other"
    train(_config(other, seed=1), [_dataset(disc_pairs, seed=1)])
    c = torch.load(other / "last.pth", map_location="cpu", weights_only=True)
    assert not torch.equal(
        c["state_dict"]["imnet.layers.0.weight"], a["state_dict"]["imnet.layers.0.weight"]
    )


# The layout of last.pth since the first release; runs in progress resume from such files.
OLD_TOP_KEYS = ["format", "version", "arch", "state_dict", "scales", "train_state"]
OLD_TRAIN_STATE_KEYS = [
    "iteration",
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "world_size",
    "wall_time_s",
    "best",
    "config",
]


def _rewrite_in_old_layout(path: Path) -> None:
    """Check ``path`` has the old layout, then rewrite it as the old hand-written writer did."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    assert list(obj) == OLD_TOP_KEYS
    assert list(obj["train_state"]) == OLD_TRAIN_STATE_KEYS
    assert (obj["format"], obj["version"]) == ("crm_d2", 1)
    assert all(
        v.dtype == torch.float32 for v in obj["state_dict"].values() if v.is_floating_point()
    )
    state = obj["train_state"]
    old = {
        "format": "crm_d2",
        "version": 1,
        "arch": dict(obj["arch"]),
        "state_dict": {k: v.clone() for k, v in obj["state_dict"].items()},
        "scales": list(obj["scales"]),
        "train_state": {k: state[k] for k in OLD_TRAIN_STATE_KEYS},
    }
    path.unlink()
    torch.save(old, path)


def test_resume_from_hand_built_old_layout(tmp_path, disc_pairs):
    """A last.pth built key by key in the old layout (not by train()) resumes where it says."""
    torch.manual_seed(0)
    model = CRMNet(PRESETS["tiny"])
    optimizer = torch.optim.Adam(model.parameters(), lr=2.25e-4, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2, 4], gamma=0.1)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    sched = scheduler.state_dict()
    sched["milestones"] = dict(sched["milestones"])
    name, keys, pos, has_gauss, cached = np.random.get_state()
    rng = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    out = tmp_path / "run"
    out.mkdir()
    torch.save(
        {
            "format": "crm_d2",
            "version": 1,
            "arch": PRESETS["tiny"].to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "scales": [1.0],
            "train_state": {
                "iteration": 3,
                "optimizer": optimizer.state_dict(),
                "scheduler": sched,
                "scaler": None,
                "rng": [rng],
                "world_size": 1,
                "wall_time_s": 1e6,
                "best": None,
                "config": {"crop_size": CROP, "batch_size": 2, "seed": 0},
            },
        },
        out / "last.pth",
    )
    train(_config(out, iterations=4, resume="auto"), [_dataset(disc_pairs)])
    assert [r["iter"] for r in _events(out, "train")] == [4]
    done = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert done["train_state"]["iteration"] == 4
    assert done["train_state"]["wall_time_s"] >= 1e6  # carried over, not restarted
    assert done["train_state"]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(_lr_after(4))


def test_resume_rejects_plain_weights(tmp_path, disc_pairs):
    weights = tmp_path / "plain.pth"
    save_crm(CRMNet(PRESETS["tiny"]), str(weights))
    with pytest.raises(ValueError, match="not a training checkpoint"):
        train(_config(tmp_path / "r", resume=str(weights)), [_dataset(disc_pairs)])


def test_time_limit_stops_cleanly_and_resume_finishes_the_run(tmp_path, disc_pairs):
    """A run past its time limit stops after the iteration in progress, writes last.pth and
    the final weights, and a resume without the limit ends where an unlimited run ends."""
    full = tmp_path / "full"
    train(_config(full), [_dataset(disc_pairs)])
    cut = tmp_path / "cut"
    train(_config(cut, time_limit_min=1e-9), [_dataset(disc_pairs)])
    assert [r["iter"] for r in _events(cut, "train")] == [1]
    assert [r["iter"] for r in _events(cut, "end")] == [1]
    state = torch.load(cut / "last.pth", map_location="cpu", weights_only=True)
    assert state["train_state"]["iteration"] == 1
    assert (cut / "model_final.pth").is_file()
    train(_config(cut, resume="auto"), [_dataset(disc_pairs)])
    assert [r["iter"] for r in _events(cut, "train")] == [1, 2, 3, 4, 5, 6]
    a = torch.load(full / "last.pth", map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(cut / "last.pth", map_location="cpu", weights_only=True)["state_dict"]
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
    with pytest.raises(ValueError, match="time_limit_min"):
        _config(cut, time_limit_min=0.0)


def test_resume_rejects_other_lr_multipliers(tmp_path, disc_pairs):
    """Adam's groups come back from the state, so a changed --lr-mult would be ignored."""
    arch = dataclasses.replace(PRESETS["tiny"], pixel_skip=True)
    out = tmp_path / "run"
    train(_config(out, arch=arch, iterations=1, lr_mult={"pixel_skip": 10}),
          [_dataset(disc_pairs)])
    with pytest.raises(ValueError, match="lr_mult"):
        train(_config(out, arch=arch, iterations=2, lr_mult={"pixel_skip": 5}, resume="auto"),
              [_dataset(disc_pairs)])


def test_guided_skip_trains_from_a_pixel_skip_file(tmp_path, disc_pairs):
    """``--pixel-skip --guided-skip --init <pixel-skip file>``: the guide's zero column learns
    and the run's checkpoint builds a guided-skip refiner."""
    skip = dataclasses.replace(PRESETS["tiny"], pixel_skip=True)
    src = CRMNet(skip)
    with torch.no_grad():
        src.pixel_skip.weight.normal_(0, 0.1)
    init = tmp_path / "skip.pth"
    save_crm(src, str(init))
    out = tmp_path / "run"
    arch = dataclasses.replace(skip, guided_skip=True)
    train(_config(out, arch=arch, iterations=4, init=str(init), lr=1e-3,
                  lr_mult={"pixel_skip": 10}), [_dataset(disc_pairs)])
    net, _ = load_crm(str(out / "model_final.pth"))
    assert net.arch.guided_skip and net.pixel_skip.weight.shape[1] == 5
    assert torch.count_nonzero(net.pixel_skip.weight[:, 4]) > 0
    prob = CRMRefiner(net).refine(np.zeros((CROP, CROP, 3), np.uint8),
                                  np.pad(np.ones((16, 16), np.uint8) * 255, 8), scales=(1.0,))
    assert prob.shape == (CROP, CROP)


def test_crop_size_mismatch_and_too_few_samples(tmp_path, disc_pairs):
    with pytest.raises(ValueError, match="crop"):
        train(_config(tmp_path / "a", crop_size=48), [_dataset(disc_pairs)])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(_config(tmp_path / "b", batch_size=16), [_dataset(disc_pairs)])


def test_init_loads_matching_tensors_only(tmp_path):
    torch.manual_seed(0)
    src = CRMNet(PRESETS["tiny"])
    path = tmp_path / "src.pth"
    save_crm(src, str(path))
    dst = CRMNet(dataclasses.replace(PRESETS["tiny"], mlp_hidden=(16, 16)))
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    report = load_init_weights(dst, str(path))
    sd = dst.state_dict()
    assert torch.equal(sd["feats.conv1.weight"], src.state_dict()["feats.conv1.weight"])
    assert torch.equal(
        sd["aspp_.last_conv.1.running_var"], src.state_dict()["aspp_.last_conv.1.running_var"]
    )
    assert torch.equal(sd["imnet.layers.0.weight"], before["imnet.layers.0.weight"])
    n_imnet_src = sum(k.startswith("imnet.") for k in src.state_dict())
    n_imnet_dst = sum(k.startswith("imnet.") for k in sd)
    assert report["loaded"] == len(sd) - n_imnet_dst  # no decoder layer has the same shape
    assert report["unused"] == n_imnet_src - n_imnet_dst
    assert report["total"] == len(sd)

    # Wider trunk and a different decoder: only BatchNorm step counters share name and shape.
    other = CRMNet(dataclasses.replace(PRESETS["lite"], mlp_hidden=(8,)))
    with pytest.raises(ValueError, match="no tensor"):
        load_init_weights(other, str(path))


# ============================================================================ validation


def test_val_samples_rotate_coarse_kinds(disc_pairs):
    source = ImageMaskPairs(disc_pairs)
    a = make_val_samples([source], seed=3, max_per_source=5)
    b = make_val_samples([source], seed=3, max_per_source=5)
    assert [s.perturb for s in a] == ["perturb", "stride8", "stride8_binary", "maskrcnn", "perturb"]
    assert all(np.array_equal(x.coarse, y.coarse) for x, y in zip(a, b))
    for s in a:
        fg = np.where(s.gt >= 128, 255, 0).astype(np.uint8)
        if s.perturb == "perturb":
            assert not np.array_equal(s.coarse, fg) and set(np.unique(s.coarse)) <= {0, 255}
        else:
            assert np.array_equal(s.coarse, CoarseKind.parse(s.perturb).render(fg))
    two = make_val_samples([source], seed=3, max_per_source=4, kinds=("perturb", "stride8"))
    assert [s.perturb for s in two] == ["perturb", "stride8"] * 2
    with pytest.raises(ValueError, match="blur"):
        make_val_samples([source], kinds=("perturb", "blur"))


def test_validate_scores_against_hand_computation():
    """iou_before / mba_before equal a direct computation; iou_after matches the refiner."""
    rng = np.random.default_rng(0)
    samples = []
    for i, kind in enumerate(("perturb", "stride8", "perturb")):
        gt = np.zeros((30, 36), np.uint8)
        gt[5 + i : 20, 8 : 25 + i] = 255
        coarse = np.zeros_like(gt)
        coarse[7:22, 6 + i : 24] = 255
        image = rng.integers(0, 256, (30, 36, 3)).astype(np.uint8)
        samples.append(ValSample(image, gt, coarse, f"s{i}", kind))
    torch.manual_seed(0)
    model = CRMNet(PRESETS["tiny"]).eval()
    res = validate(model, samples, "cpu", scales=(1.0,))

    g = [s.gt > 128 for s in samples]
    c = [s.coarse > 128 for s in samples]
    inter = sum(int((a & b).sum()) for a, b in zip(c, g))
    union = sum(int((a | b).sum()) for a, b in zip(c, g))
    assert res["iou_before"] == pytest.approx(inter / union)
    assert res["mba_before"] == pytest.approx(
        np.mean([boundary_accuracy(a, b) for a, b in zip(c, g)])
    )
    refiner = CRMRefiner(CRMNet(PRESETS["tiny"]), "cpu", scales=(1.0,))
    refiner.model.load_state_dict(model.state_dict())
    preds = [refiner.refine(s.image, s.coarse) > 0.5 for s in samples]
    inter = sum(int((p & b).sum()) for p, b in zip(preds, g))
    union = sum(int((p | b).sum()) for p, b in zip(preds, g))
    assert res["iou_after"] == pytest.approx(1.0 if union == 0 else inter / union)
    assert res["num_samples_perturb"] == 2 and res["num_samples_stride8"] == 1
    assert res["iou_gain"] == pytest.approx(res["iou_after"] - res["iou_before"])
    # The model given to validate() is not frozen or moved by it.
    assert all(p.requires_grad for p in model.parameters())


# ============================================================================ CLI and DDP


def test_cli_help_runs_without_detectron2():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    code = (
        "import sys, runpy; sys.modules['detectron2'] = None; sys.modules['torchvision'] = None;"
        "import crm_d2.training.trainer;"
        "sys.argv = ['train_crm.py', '--help'];"
        f"runpy.run_path({str(REPO_ROOT / 'tools' / 'train_crm.py')!r}, run_name='__main__')"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert "--data KIND:PATH" in res.stdout and "--resume" in res.stdout


def test_cli_rejects_bad_coarse_and_scale_range():
    tool = runpy.run_path(str(REPO_ROOT / "tools" / "train_crm.py"), run_name="train_crm")
    parser = tool["build_parser"]()
    args = parser.parse_args(
        ["--data", "folder:/x", "--coarse", "perturb+stride8_binary*2", "--scale-range", "0.25,1"]
    )
    assert args.coarse == "perturb+stride8_binary*2" and args.scale_range == (0.25, 1.0)
    with pytest.raises(SystemExit, match="--pixel-skip"):
        tool["main"](["--data", "folder:/x", "--guided-skip"])
    for bad in (
        ["--coarse", "blur"],
        ["--coarse", "contour"],
        ["--scale-range", "1,0.5"],
        ["--scale-range", "0.5"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(["--data", "folder:/x", *bad])


def test_cli_data_spec_parsing():
    from crm_d2.training.sources import parse_data_spec as parse

    assert parse("folder:/a/b") == ("folder", ["/a/b"])
    assert parse("coco:/x.json:/imgs") == ("coco", ["/x.json", "/imgs"])
    for bad in ("/a/b", "coco:/x.json", "lmdb:/a"):
        with pytest.raises(ValueError):
            parse(bad)


def test_ddp_two_process_gloo_smoke(tmp_path):
    """torchrun with 2 CPU processes: gloo, DistributedSampler, DDP, rank-0-only outputs."""
    data = _disc_folder(tmp_path / "data", 12)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO_ROOT / "tools" / "train_crm.py"),
        "--data",
        f"folder:{data}",
        "--preset",
        "tiny",
        "--crop",
        str(CROP),
        "--batch-size",
        "4",
        "--iters",
        "3",
        "--val-fraction",
        "0.25",
        "--val-scales",
        "1",
        "--coarse",
        "perturb+stride8_binary",
        "--scale-range",
        "0.5,1",
        "--num-workers",
        "0",
        "--threads",
        "1",
        "--log-every",
        "1",
        "--ckpt-every",
        "2",
        "--device",
        "cpu",
        "--output",
        str(out),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    start = _events(out, "start")
    assert start[0]["world_size"] == 2 and start[0]["per_rank_batch"] == 2
    assert [r["iter"] for r in _events(out, "train")] == [1, 2, 3]
    assert len(_events(out, "val")) == 1
    model, meta = load_crm(str(out / "model_final.pth"))
    assert meta["training"]["hardware"]["world_size"] == 2
    described = meta["training"]["datasets"][0]
    assert described["coarse"] == "perturb+stride8_binary"
    assert described["scale_range"] == [0.5, 1.0]
    ckpt = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert len(ckpt["train_state"]["rng"]) == 2
    # The two ranks drew different dropout streams.
    assert not torch.equal(
        ckpt["train_state"]["rng"][0]["torch"], ckpt["train_state"]["rng"][1]["torch"]
    )
