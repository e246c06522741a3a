"""Weights shipped with crm_d2 (trained by the project; see MODEL_CARD.md here)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_WEIGHTS_NAME = "crm_d2_lite.pth"


def default_weights_path() -> str | None:
    """Path of the shipped default CRM weights, or None if this install has none."""
    path = Path(__file__).with_name(DEFAULT_WEIGHTS_NAME)
    return str(path) if path.is_file() else None
