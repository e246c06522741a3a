"""Shared fixtures: the real data in ../shared/data, random CRMs, optional-dependency skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from crm_d2 import CRMArch, CRMNet, save_crm
from crm_d2.modeling.crm import TINY_ARCH

REPO = Path(__file__).resolve().parents[1]


def random_crm(
    arch: CRMArch = TINY_ARCH, seed: int = 0, random_bn: bool = False, calibrate: bool = True
) -> CRMNet:
    """A randomly initialised CRM in eval mode, deterministic in ``seed``.

    Args:
        arch: architecture (default: the tiny test one).
        seed: torch seed of the initialisation.
        random_bn: draw BatchNorm running statistics (mean in [-0.2, 0.2], var in [0.5, 2]) so
            that eval-mode BN is not the identity.
        calibrate: scale the decoder's last layer by 20 so the logits are spread out rather than
            all near 0 (probabilities all about 0.5 would make comparisons meaningless).
    """
    torch.manual_seed(seed)
    net = CRMNet(arch)
    with torch.no_grad():
        if random_bn:
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
        if calibrate:
            net.imnet.layers[-1].weight.mul_(20.0)
    return net.eval()


@pytest.fixture(scope="session")
def make_crm():
    """The :func:`random_crm` factory, for tests that need several or special networks."""
    return random_crm


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> str:
    """Path of a calibrated random tiny CRM saved in the project's checkpoint format (fp32)."""
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    save_crm(random_crm(), str(path))
    return str(path)


def shared_data_root() -> Path | None:
    """``$CRM_D2_DATA`` or ``<repo>/../shared/data``, if it exists."""
    env = os.environ.get("CRM_D2_DATA")
    root = Path(env) if env else REPO.parent / "shared" / "data"
    return root if root.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_root()
    if root is None:
        pytest.skip(
            "real data not found: set CRM_D2_DATA or place the project's shared data at "
            f"{REPO.parent / 'shared' / 'data'}"
        )
    return root


@pytest.fixture(scope="session")
def panoptic_sample(shared_data) -> Path:
    """``coco_panoptic_sample/`` of the shared data (2 COCO val2017 images, panoptic format)."""
    root = shared_data / "coco_panoptic_sample"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    return root


def pytest_report_header(config):
    root = shared_data_root()
    try:
        import detectron2  # noqa: F401

        d2 = f"detectron2 {detectron2.__version__}: detectron2 tests RUN"
    except ImportError:
        d2 = "detectron2 NOT installed: detectron2 tests SKIP"
    data = f"shared data at {root}: real-data tests RUN" if root else (
        "shared data NOT found: real-data tests SKIP")
    import importlib.util

    pq = ("panopticapi installed: detectron2 panoptic-evaluation tests RUN"
          if importlib.util.find_spec("panopticapi") else
          "panopticapi NOT installed: detectron2 panoptic-evaluation tests SKIP")
    return [d2, data, pq]
