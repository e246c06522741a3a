"""``MODEL.CRM.REFINER``: the detectron2 wrapper with the CascadePSP and guided-filter refiners."""

from __future__ import annotations

import pytest

detectron2 = pytest.importorskip(
    "detectron2",
    reason="detectron2 is not installed: install it from its GitHub repository (see README) "
    "to run the detectron2-layer tests",
)
pytestmark = pytest.mark.detectron2

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from test_d2_meta_arch import H, W, d2_cfg, inputs_for  # noqa: E402  (and the dummy models)

from crm_d2 import CascadePSPRefiner, save_cascadepsp  # noqa: E402
from crm_d2.modeling.cascadepsp import CASCADEPSP_TINY_ARCH, CascadePSPNet  # noqa: E402


@pytest.fixture(scope="module")
def psp_checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("psp") / "psp_tiny.pth"
    torch.manual_seed(0)
    save_cascadepsp(CascadePSPNet(CASCADEPSP_TINY_ARCH), str(path), L=96)
    return str(path)


def test_refiner_key_switches_to_cascadepsp(psp_checkpoint):
    cfg = d2_cfg("CRMTestPanopticFPN", psp_checkpoint)
    assert cfg.MODEL.CRM.REFINER == "crm"  # the default
    cfg.MODEL.CRM.REFINER = "cascadepsp"
    model = build_model(cfg)
    assert isinstance(model.refiner, CascadePSPRefiner) and model.refiner.L == 96
    assert not any(k.startswith("refiner") for k in model.state_dict())
    (out,) = model.eval()(inputs_for())
    assert out["panoptic_seg"][0].shape == (H, W)
    masks = out["instances"].pred_masks
    assert masks.shape == (2, H, W) and masks.dtype == torch.bool


def test_refiner_key_errors(psp_checkpoint):
    cfg = d2_cfg("CRMTestPanopticFPN", psp_checkpoint)
    with pytest.raises(Exception, match="CascadePSP checkpoint .*MODEL.CRM.REFINER cascadepsp"):
        build_model(cfg)  # REFINER still "crm"
    cfg.MODEL.CRM.REFINER = "cascadepsp"
    cfg.MODEL.CRM.SCALES = [0.5, 1.0]
    with pytest.raises(ValueError, match="scales do not apply to the cascadepsp refiner"):
        build_model(cfg)
    cfg = d2_cfg("CRMTestPanopticFPN", "")
    cfg.MODEL.CRM.REFINER = "cascadepsp"
    with pytest.raises(ValueError, match="MODEL.CRM.WEIGHTS is empty"):
        build_model(cfg)
    cfg.MODEL.CRM.REFINER = "psp"
    with pytest.raises(ValueError, match="unknown refiner 'psp'"):
        build_model(cfg)


def test_refiner_key_switches_to_the_guided_filter(psp_checkpoint):
    from crm_d2 import GuidedFilterRefiner

    cfg = d2_cfg("CRMTestPanopticFPN", "")
    cfg.MODEL.CRM.REFINER = "guided_filter"
    model = build_model(cfg)
    assert isinstance(model.refiner, GuidedFilterRefiner)
    (out,) = model.eval()(inputs_for())
    assert out["panoptic_seg"][0].shape == (H, W)
    cfg = d2_cfg("CRMTestPanopticFPN", psp_checkpoint)
    cfg.MODEL.CRM.REFINER = "guided_filter"
    with pytest.raises(ValueError, match="takes no weights"):
        build_model(cfg)
