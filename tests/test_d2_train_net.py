"""tools/train_net.py: flags, external modules and config adders, tasks, and an end-to-end
before/after evaluation of Panoptic FPN R50 (random weights) on the COCO panoptic sample."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

detectron2 = pytest.importorskip(
    "detectron2",
    reason="detectron2 is not installed: install it from its GitHub repository (see README) "
    "to run the detectron2-layer tests",
)
pytestmark = pytest.mark.detectron2

import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402

from crm_d2 import CRMNet, save_crm  # noqa: E402
from crm_d2.d2.config import add_crm_config  # noqa: E402
from crm_d2.d2.data import register_coco_panoptic_folder  # noqa: E402
from crm_d2.modeling.crm import TINY_ARCH  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL = TINY_ARCH


@pytest.fixture(scope="module")
def train_net():
    spec = importlib.util.spec_from_file_location("crm_train_net", REPO / "tools" / "train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parser_keeps_trailing_opts(train_net):
    args = train_net.build_parser().parse_args(
        [
            "--config-file",
            "c.yaml",
            "--eval-only",
            "--panoptic-dataset",
            "n",
            "imgs",
            "pngs",
            "pan.json",
            "--instance-dataset",
            "m",
            "imgs",
            "inst.json",
            "--extra-module",
            "a",
            "--extra-module",
            "b",
            "--config-adder",
            "x:y",
            "MODEL.DEVICE",
            "cpu",
        ]
    )
    assert args.eval_only and args.config_file == "c.yaml"
    assert args.panoptic_dataset == [["n", "imgs", "pngs", "pan.json"]]
    assert args.instance_dataset == [["m", "imgs", "inst.json"]]
    assert args.extra_module == ["a", "b"] and args.config_adder == ["x:y"]
    assert args.opts == ["MODEL.DEVICE", "cpu"]


def test_setup_imports_module_and_calls_adder_before_yaml(train_net, tmp_path, monkeypatch):
    mod = f"crm_ext_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{mod}.py").write_text(
        "from detectron2.config import CfgNode\n"
        "def add_ext_config(cfg):\n"
        "    cfg.MODEL.EXT = CfgNode()\n"
        "    cfg.MODEL.EXT.FLAG = 1\n"
        "    cfg.MODEL.EXT.OTHER = 'a'\n"
    )
    yaml_path = tmp_path / "ext.yaml"
    yaml_path.write_text(
        f"_BASE_: {REPO / 'configs' / 'Base-CRM.yaml'}\n"
        "MODEL:\n  EXT:\n    FLAG: 2\n  CRM:\n    INNER_META_ARCHITECTURE: PanopticFPN\n"
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    for adder in ("add_ext_config", f"{mod}:add_ext_config"):
        args = train_net.build_parser().parse_args(
            [
                "--config-file",
                str(yaml_path),
                "--extra-path",
                str(tmp_path),
                "--extra-module",
                mod,
                "--config-adder",
                adder,
                "MODEL.EXT.OTHER",
                "b",
                "OUTPUT_DIR",
                str(tmp_path / "out"),
            ]
        )
        cfg = train_net.setup(args)
        assert (cfg.MODEL.EXT.FLAG, cfg.MODEL.EXT.OTHER) == (2, "b")
        assert cfg.MODEL.META_ARCHITECTURE == "CRMRefinedModel"
    args.config_adder = ["no_such_adder"]
    with pytest.raises(ValueError, match="no_such_adder"):
        train_net.setup(args)


def test_evaluation_tasks(train_net, panoptic_sample, tmp_path):
    name = f"crm_tasks_{uuid.uuid4().hex[:8]}"
    register_coco_panoptic_folder(
        name,
        str(panoptic_sample / "input_images"),
        str(panoptic_sample / "panoptic_examples"),
        str(panoptic_sample / "panoptic_examples.json"),
        cache_dir=str(tmp_path),
    )
    cfg = get_cfg()
    add_crm_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "CRMRefinedModel"
    for inner, want in (
        ("PanopticFPN", ["panoptic_seg", "segm"]),
        ("EntityFPN", ["entity"]),
        ("GeneralizedRCNN", ["segm"]),
        ("SomethingNew", ["panoptic_seg", "segm"]),
    ):
        cfg.MODEL.CRM.INNER_META_ARCHITECTURE = inner
        assert train_net.evaluation_tasks(cfg, name) == want
    cfg.MODEL.CRM.EVALUATORS = ["entity", "sem_seg"]
    assert train_net.evaluation_tasks(cfg, name) == ["entity", "sem_seg"]
    cfg.MODEL.CRM.EVALUATORS = ["bogus"]
    with pytest.raises(ValueError, match="bogus"):
        train_net.evaluation_tasks(cfg, name)


def _table(log: str, task: str) -> dict[str, list[float]]:
    """Rows of the 'CRM before/after: <task>' table: metric -> [inner, refined, delta]."""
    start = log.index(f"CRM before/after: {task}")
    rows = {}
    for line in log[start:].splitlines()[3:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


def require_panopticapi() -> None:
    """Skip unless panopticapi (detectron2's COCOPanopticEvaluator needs it) is installed."""
    if importlib.util.find_spec("panopticapi") is None:
        pytest.skip("panopticapi is not installed (detectron2's COCOPanopticEvaluator needs it): "
                    "pip install --no-deps panopticapi-lite")


def run_train_net(args: list[str], cwd: Path) -> str:
    """Run tools/train_net.py of this checkout in a subprocess; return its log (rc 0 asserted)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    return log


def test_missing_panopticapi_fails_before_inference(train_net, panoptic_sample, tmp_path,
                                                    monkeypatch):
    name = f"crm_nopq_{uuid.uuid4().hex[:8]}"
    register_coco_panoptic_folder(
        name,
        str(panoptic_sample / "input_images"),
        str(panoptic_sample / "panoptic_examples"),
        str(panoptic_sample / "panoptic_examples.json"),
        cache_dir=str(tmp_path),
    )
    cfg = get_cfg()
    add_crm_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "CRMRefinedModel"
    cfg.MODEL.CRM.INNER_META_ARCHITECTURE = "PanopticFPN"
    cfg.DATASETS.TEST = (name,)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "panopticapi" else real(n, *a))
    with pytest.raises(SystemExit, match="pip install --no-deps panopticapi-lite"):
        train_net.require_evaluator_packages(cfg)
    cfg.MODEL.CRM.EVALUATORS = ["segm"]  # no PQ: nothing needed
    train_net.require_evaluator_packages(cfg)


@pytest.mark.slow
def test_eval_only_end_to_end_before_after(panoptic_sample, tmp_path):
    """Panoptic FPN R50 (random weights, MODEL.WEIGHTS "") + a random tiny CRM on CPU."""
    require_panopticapi()
    crm = tmp_path / "crm.pth"
    torch.manual_seed(0)
    save_crm(CRMNet(SMALL), str(crm))
    out_dir = tmp_path / "out"
    log = run_train_net([
        "--config-file",
        str(REPO / "configs" / "panoptic_fpn_R_50_1x_crm.yaml"),
        "--eval-only",
        "--panoptic-dataset",
        "crm_e2e_sample",
        str(panoptic_sample / "input_images"),
        str(panoptic_sample / "panoptic_examples"),
        str(panoptic_sample / "panoptic_examples.json"),
        "MODEL.WEIGHTS",
        "",
        "MODEL.DEVICE",
        "cpu",
        "MODEL.CRM.WEIGHTS",
        str(crm),
        "MODEL.CRM.SCALES",
        "(0.5, 1.0)",
        "INPUT.MIN_SIZE_TEST",
        "320",
        "INPUT.MAX_SIZE_TEST",
        "480",
        # random weights give low scores: keep detections so that there is something to refine
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        "0.0",
        "TEST.DETECTIONS_PER_IMAGE",
        "10",
        "MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH",
        "0.0",
        "DATALOADER.NUM_WORKERS",
        "0",
        "SEED",
        "1",
        "OUTPUT_DIR",
        str(out_dir),
    ], tmp_path)
    # both evaluations ran on one inference pass and the before/after tables were printed
    assert log.count("Total inference time") == 1
    for task, metrics in (
        ("panoptic_seg", ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")),
        ("segm", ("AP", "AP50")),
    ):
        rows = _table(log, task)
        for metric in metrics:
            inner, refined, delta = rows[metric]
            assert 0 <= inner <= 100 and 0 <= refined <= 100
            assert delta == pytest.approx(refined - inner, abs=2e-3)
    assert re.search(
        r"CRM timing over 2 images: inner model [\d.]+ s/img, CRM refinement "
        r"[\d.]+ s/img",
        log,
    )
    assert re.search(r"refined [1-9]\d* of \d+ segments", log)
    # the inner and the refined predictions were written separately and differ
    inference = out_dir / "inference" / "crm_e2e_sample"
    inner = json.loads((inference / "inner" / "coco_instances_results.json").read_text())
    refined = json.loads((inference / "refined" / "coco_instances_results.json").read_text())
    assert len(inner) == len(refined) > 0
    assert [r["segmentation"] for r in inner] != [r["segmentation"] for r in refined]
    assert (inference / "refined" / "predictions.json").is_file()
