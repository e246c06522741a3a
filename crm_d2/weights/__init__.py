"""Weights shipped with crm_d2 (trained by the project; see MODEL_CARD.md here)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_WEIGHTS_NAME = "crm_d2_effl0.pth"  # crm_d2_lite.pth: the previous default

#: Where users get CRM weights when none are shipped (one wording for every front-end).
WEIGHTS_HINT = (
    "the official CRM checkpoint 'model_45705' (download it yourself from the link in "
    "dvlab-research/Entity, folder High-Quality-Segmention) or a checkpoint written by "
    "tools/train_crm.py"
)


class MissingWeightsError(ValueError):
    """No CRM weights were given and this install ships none."""


def default_weights_path() -> str | None:
    """Path of the shipped default CRM weights, or None if this install has none."""
    path = Path(__file__).with_name(DEFAULT_WEIGHTS_NAME)
    return str(path) if path.is_file() else None


def resolve_weights(path: str | None, option: str) -> str:
    """``path`` if given, else the shipped weights; the one "no weights" lookup and message.

    Args:
        path: the user's weights path (None or "" = the shipped default).
        option: how the user passes weights in this front-end, named in the error
            (e.g. ``"--weights PATH"``, ``"MODEL.CRM.WEIGHTS"``).

    Raises:
        MissingWeightsError: no path given and no shipped file.
    """
    if path:
        return path
    shipped = default_weights_path()
    if shipped is None:
        raise MissingWeightsError(
            f"no CRM weights: {option} is not set and this crm_d2 install ships no default "
            f"(crm_d2/weights/{DEFAULT_WEIGHTS_NAME} is missing). Set {option} to {WEIGHTS_HINT}."
        )
    return shipped
