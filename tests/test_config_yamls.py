"""Every YAML under configs/ merges; crm_d2's _BASE_ extensions (list, model_zoo://, $VAR)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

detectron2 = pytest.importorskip(
    "detectron2",
    reason="detectron2 is not installed: install it from its GitHub repository (see README) "
    "to run the detectron2-layer tests",
)
pytestmark = pytest.mark.detectron2

from detectron2.config import get_cfg  # noqa: E402

from crm_d2.d2.config import (  # noqa: E402
    add_crm_config,
    load_yaml_with_bases,
    merge_config_file,
    resolve_base,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# YAMLs whose first _BASE_ lives in an external project: module, config adder, root variable,
# and the root relative to the module's package folder.
EXTERNAL = {
    "panopticfcn_R50_400_3x_crm.yaml": (
        "panopticfcn",
        "add_panopticfcn_config",
        "PANOPTICFCN_ROOT",
    ),
    "entityseg_R50_1x_crm.yaml": ("entityseg", "add_entity_config", "ENTITYSEG_ROOT"),
}
INNER = {
    "panoptic_fpn_R_50_1x_crm.yaml": "PanopticFPN",
    "mask_rcnn_R_50_FPN_1x_crm.yaml": "GeneralizedRCNN",
    "panopticfcn_R50_400_3x_crm.yaml": "PanopticFCN",
    "entityseg_R50_1x_crm.yaml": "EntityFPN",
    "coarse_gt_simulator_crm.yaml": "CoarseGTSimulator",
}


def crm_cfg():
    cfg = get_cfg()
    add_crm_config(cfg)
    return cfg


def test_every_config_is_covered():
    names = {p.name for p in CONFIGS}
    assert names == set(INNER) | {"Base-CRM.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_yaml_merges(path):
    """Full merge, except for the external projects' bases (checked below when installed)."""
    cfg = crm_cfg()
    skip = (lambda base: "$" in base) if path.name in EXTERNAL else None
    merge_config_file(cfg, str(path), skip_base=skip)
    assert cfg.MODEL.META_ARCHITECTURE == "CRMRefinedModel"
    assert cfg.MODEL.CRM.EVAL_BOTH is True
    assert cfg.MODEL.CRM.WEIGHTS == ""
    assert cfg.MODEL.CRM.INNER_META_ARCHITECTURE == INNER.get(path.name, "")
    if path.name.startswith(("panoptic_fpn", "mask_rcnn")):
        assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.MASK_ON
        assert cfg.MODEL.WEIGHTS.startswith("detectron2://COCO-")
    if path.name.startswith("panopticfcn"):
        assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (400, 666)


def _external_module(module_name: str, env: str, monkeypatch):
    root = os.environ.get(env)
    if root:
        monkeypatch.syspath_prepend(root)
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        pytest.skip(
            f"{module_name} is not importable ({e}); set {env} to its checkout to run "
            "the full merge"
        )


@pytest.mark.parametrize("name", sorted(EXTERNAL))
def test_external_yaml_full_merge(name, monkeypatch):
    module_name, adder, env = EXTERNAL[name]
    module = _external_module(module_name, env, monkeypatch)
    if not os.environ.get(env):
        monkeypatch.setenv(env, str(Path(module.__file__).resolve().parents[1]))
    cfg = get_cfg()
    getattr(module, adder)(cfg)
    add_crm_config(cfg)
    merge_config_file(cfg, str(REPO / "configs" / name))
    assert cfg.MODEL.META_ARCHITECTURE == "CRMRefinedModel"
    assert cfg.MODEL.CRM.INNER_META_ARCHITECTURE == INNER[name]
    plain = get_cfg()
    getattr(module, adder)(plain)
    plain.merge_from_file(resolve_base(load_base(name), str(REPO / "configs" / name)))
    assert cfg.MODEL.RESNETS.DEPTH == plain.MODEL.RESNETS.DEPTH == 50
    assert plain.MODEL.META_ARCHITECTURE == INNER[name]


def load_base(name: str) -> str:
    import yaml

    return yaml.safe_load((REPO / "configs" / name).read_text())["_BASE_"][0]


# --------------------------------------------------------------------------------------------
# _BASE_ resolution
# --------------------------------------------------------------------------------------------
def test_list_bases_merge_in_order(tmp_path):
    (tmp_path / "a.yaml").write_text("MODEL:\n  CRM:\n    MIN_AREA: 1\n    EXPAND_RATIO: 0.5\n")
    (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\nMODEL:\n  CRM:\n    MIN_AREA: 2\n")
    (tmp_path / "c.yaml").write_text("MODEL:\n  CRM:\n    MIN_AREA: 3\n    STUFF_FACTOR: 0.7\n")
    (tmp_path / "top.yaml").write_text(
        "_BASE_: [b.yaml, c.yaml]\nMODEL:\n  CRM:\n    STUFF_FACTOR: 0.9\n"
    )
    merged = load_yaml_with_bases(str(tmp_path / "top.yaml"))
    assert merged["MODEL"]["CRM"] == {"MIN_AREA": 3, "EXPAND_RATIO": 0.5, "STUFF_FACTOR": 0.9}
    cfg = crm_cfg()
    merge_config_file(cfg, str(tmp_path / "top.yaml"))
    assert (cfg.MODEL.CRM.MIN_AREA, cfg.MODEL.CRM.EXPAND_RATIO, cfg.MODEL.CRM.STUFF_FACTOR) == (
        3,
        0.5,
        0.9,
    )


def test_env_and_model_zoo_bases(tmp_path, monkeypatch):
    monkeypatch.delenv("CRM_TEST_ROOT", raising=False)
    with pytest.raises(ValueError, match="CRM_TEST_ROOT"):
        resolve_base("${CRM_TEST_ROOT}/x.yaml", str(tmp_path / "top.yaml"))
    monkeypatch.setenv("CRM_TEST_ROOT", str(tmp_path / "ext"))
    assert resolve_base("${CRM_TEST_ROOT}/x.yaml", "top.yaml") == str(tmp_path / "ext" / "x.yaml")
    assert resolve_base("sub/x.yaml", str(tmp_path / "top.yaml")) == str(
        tmp_path / "sub" / "x.yaml"
    )
    zoo = resolve_base("model_zoo://COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml", "t")
    assert os.path.isfile(zoo)
    with pytest.raises(RuntimeError):
        resolve_base("model_zoo://No/such.yaml", "t")


def test_unknown_key_is_an_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("MODEL:\n  CRM:\n    NO_SUCH_KEY: 1\n")
    with pytest.raises(KeyError):
        merge_config_file(crm_cfg(), str(tmp_path / "bad.yaml"))


def test_auto_keys_accept_any_type():
    cfg = crm_cfg()
    cfg.merge_from_list(["MODEL.CRM.VOID_ID", "-1", "MODEL.CRM.EXCLUSIVE_INSTANCES", "False"])
    assert cfg.MODEL.CRM.VOID_ID == -1 and cfg.MODEL.CRM.EXCLUSIVE_INSTANCES is False
    cfg = crm_cfg()
    cfg.merge_from_list(["MODEL.CRM.VOID_ID", "auto"])
    assert cfg.MODEL.CRM.VOID_ID == "auto"
