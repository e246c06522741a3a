"""Shared fixtures: the real data in ../shared/data and optional-dependency skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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


def pytest_report_header(config):
    root = shared_data_root()
    try:
        import detectron2  # noqa: F401

        d2 = f"detectron2 {detectron2.__version__}: detectron2 tests RUN"
    except ImportError:
        d2 = "detectron2 NOT installed: detectron2 tests SKIP"
    data = f"shared data at {root}: real-data tests RUN" if root else (
        "shared data NOT found: real-data tests SKIP")
    return [d2, data]
