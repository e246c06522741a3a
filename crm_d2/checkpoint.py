"""Loading and saving refiner weights (CRM and CascadePSP).

Three formats are accepted for CRM (:func:`load_crm`):

- the official release ``model_45705`` (a raw ``torch.save`` of an ``nn.DataParallel``
  state dict: every key starts with ``module.``; browsers may save it as ``model_45705.aspx``);
- a plain state dict of :class:`~crm_d2.modeling.crm.CRMNet` (with or without ``module.``);
- the project's format: ``{"format": "crm_d2", "version": 1, "arch": {...}, "state_dict": {...},
  ...metadata}``, written by :func:`save_crm`. It records the architecture (so lighter encoders
  load too), the inference scales and the training information, and may store half precision
  weights and omit the never-run layer4.

CascadePSP (:func:`load_cascadepsp`) reads the same three kinds: the released file ``model``
(``module.``-prefixed state dict, 426 keys), a plain state dict, and the project's format with
``"network": "cascadepsp"`` (:func:`save_cascadepsp`). A CRM file given to the CascadePSP loader,
or the reverse, is named as such.

Everything else is rejected with a :class:`CheckpointError` that names the problem and the fix.
Nothing is ever downloaded.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .io import torch_save
from .modeling.cascadepsp import CASCADEPSP_ARCH, CascadePSPArch, CascadePSPNet
from .modeling.crm import OFFICIAL_ARCH, CRMArch, CRMNet

__all__ = [
    "CASCADEPSP_HINT",
    "CheckpointError",
    "format_key_list",
    "load_cascadepsp",
    "load_crm",
    "load_state_dict_file",
    "save_cascadepsp",
    "save_crm",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "crm_d2"
FORMAT_VERSION = 1
_OFFICIAL_HINT = (
    "The official CRM weights are the file 'model_45705' (about 93 MiB) linked from the "
    "README of dvlab-research/Entity, folder High-Quality-Segmention."
)
CASCADEPSP_HINT = (
    "The released CascadePSP weights are the file 'model' (about 259 MiB, md5 "
    "7478d4a9c42ab52beb6d7e9683402fe0) of release v1.0 of github.com/hkchengrex/CascadePSP; "
    "the pip package segmentation-refinement keeps a copy in ~/.segmentation-refinement/model."
)
CASCADEPSP = "cascadepsp"  # the "network" field of the project format for CascadePSP


class CheckpointError(ValueError):
    """A weights file that cannot be used, with the reason and the fix in the message."""


def _sniff(path: str, hint: str = _OFFICIAL_HINT) -> None:
    """Reject files that are obviously not torch checkpoints, before unpickling them."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist. {hint}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, expected a file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): download it again")
    with open(path, "rb") as f:
        head = f.read(1024)
    text = head.lstrip().lower()
    if text.startswith(b"version https://git-lfs"):
        raise CheckpointError(
            f"{path!r} is a git-LFS pointer file ({size} bytes), not the weights: run "
            "`git lfs pull` in its repository or download the real file"
        )
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")) or b"<html" in text:
        raise CheckpointError(
            f"{path!r} is an HTML page ({size} bytes), not a checkpoint: the download saved a "
            "web page (a login, preview or error page) instead of the file. Download it again "
            f"with the direct-download link. {hint}"
        )


def load_state_dict_file(path: str, hint: str = _OFFICIAL_HINT) -> Any:
    """``torch.load`` a checkpoint on CPU with clear errors for bad files (``hint``: where the
    right file is, appended to the messages about missing files and web pages)."""
    _sniff(path, hint)
    size = os.path.getsize(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError,
            ValueError, io.UnsupportedOperation) as e:
        raise CheckpointError(
            f"cannot read {path!r} ({size / 2**20:.1f} MiB) as a torch checkpoint: it is "
            f"truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Download it again and compare its size with the original."
        ) from e


def _strip_prefix(sd: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    keys = list(sd)
    n = sum(k.startswith(prefix) for k in keys)
    if n == 0:
        return dict(sd)
    if n != len(keys):
        raise CheckpointError(
            f"{n} of {len(keys)} keys start with {prefix!r} and the others do not: "
            "the state dict mixes two models"
        )
    return {k[len(prefix):]: v for k, v in sd.items()}


_CASCADEPSP_NOT_CRM = (
    "this is a CascadePSP checkpoint (6-channel stem, PSP module), not CRM: "
    "CRM's stem takes 4 channels (RGB + mask). Use the CRM weights 'model_45705', or "
    "load this file with the CascadePSP refiner (crm_d2.CascadePSPRefiner, "
    "--refiner cascadepsp, MODEL.CRM.REFINER cascadepsp)."
)
_CRM_NOT_CASCADEPSP = (
    "this is a CRM checkpoint (4-channel stem, implicit decoder), not CascadePSP: "
    "CascadePSP's stem takes 6 channels. Load it with the CRM refiner "
    "(crm_d2.CRMRefiner, --refiner crm, MODEL.CRM.REFINER crm), or pass the CascadePSP "
    f"weights. {CASCADEPSP_HINT}"
)


def _stem_channels(sd: Mapping[str, Any]) -> int | None:
    w = sd.get("feats.conv1.weight")
    return int(w.shape[1]) if isinstance(w, torch.Tensor) and w.ndim == 4 else None


def _check_not_cascadepsp(sd: Mapping[str, Any]) -> None:
    is_psp = any(k.startswith(("psp.", "up_1.", "final_28")) for k in sd)
    if is_psp or _stem_channels(sd) == 6:
        raise CheckpointError(_CASCADEPSP_NOT_CRM)


def _check_not_crm(sd: Mapping[str, Any]) -> None:
    is_crm = any(k.startswith(("aspp_.", "imnet.")) for k in sd)
    if is_crm or _stem_channels(sd) == 4:
        raise CheckpointError(_CRM_NOT_CASCADEPSP)


def _arch_of(obj: Mapping[str, Any], path: str) -> CRMArch:
    """The architecture recorded in a crm_d2 checkpoint, or a CheckpointError."""
    if not isinstance(obj.get("arch"), Mapping):
        raise CheckpointError(
            f"{path!r} is a crm_d2 checkpoint without its 'arch' record: it was not written by "
            "crm_d2.save_crm or tools/train_crm.py, or it was edited"
        )
    try:
        return CRMArch.from_dict(dict(obj["arch"]))
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(
            f"{path!r} records a bad architecture {dict(obj['arch'])}: {e}"
        ) from e


def _check_finite(sd: Mapping[str, torch.Tensor], path: str) -> None:
    """Refuse weights with NaN or infinite values (they give all-zero masks without an error)."""
    bad = [
        f"{k} ({int((~torch.isfinite(v)).sum())} of {v.numel()})"
        for k, v in sd.items()
        if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise CheckpointError(
            f"{path!r} holds NaN or infinite weights in {len(bad)} tensors: "
            f"{format_key_list(bad, 6)}. The training that wrote it diverged or the file is "
            "corrupt: use an earlier checkpoint or the official 'model_45705'."
        )


def format_key_list(items: list[str], limit: int = 12) -> str:
    """``"a, b, c, ... (N more)"``: a key list short enough for an error message."""
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _load_into(
    model: nn.Module, sd: Mapping[str, torch.Tensor], source: str, name: str = "CRM",
    accepted: str = "the official 'model_45705', a CRMNet state dict, or a file written by "
    "crm_d2.checkpoint.save_crm",
) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        lines = [f"{source} does not match the {name} architecture {model.arch}:"]
        if missing:
            lines.append(f"  {len(missing)} missing keys: {format_key_list(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys: {format_key_list(unexpected)}")
        if shapes:
            lines.append(f"  {len(shapes)} wrong shapes: {format_key_list(shapes, 6)}")
        lines.append(f"  Pass {accepted}.")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True)


def _check_version(obj: Mapping[str, Any], path: str) -> None:
    version = obj.get("version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path!r} is crm_d2 checkpoint version {version}; this crm_d2 reads version "
            f"{FORMAT_VERSION}: upgrade crm_d2"
        )


def _raw_state_dict(obj: Mapping[str, Any], path: str) -> dict[str, Any]:
    """A released / plain / training-dict state dict, ``module.`` stripped."""
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # a training checkpoint {"state_dict": ..., ...}
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path!r} is a dict but not a state dict of tensors (keys: "
            f"{format_key_list(sorted(map(str, obj)), 8)})"
        )
    return _strip_prefix(obj)


def load_crm(path: str) -> tuple[CRMNet, dict[str, Any]]:
    """Build a :class:`CRMNet` from any accepted checkpoint file.

    Returns:
        The model (float32, CPU, eval mode) and the metadata dict (``format``: "official" for a
        raw state dict, else the project's stored fields without the weights).

    Raises:
        CheckpointError: on a missing, HTML, git-LFS, truncated, CascadePSP or mismatching file,
            or on NaN / infinite weights.
    """
    obj = load_state_dict_file(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
    if obj.get("format") == FORMAT_NAME:
        _check_version(obj, path)
        if obj.get("network", "crm") != "crm":
            raise CheckpointError(f"{path!r}: {_CASCADEPSP_NOT_CRM}")
        arch = _arch_of(obj, path)
        if not isinstance(obj.get("state_dict"), Mapping):
            raise CheckpointError(f"{path!r} is a crm_d2 checkpoint without a 'state_dict'")
        sd = _strip_prefix(obj["state_dict"])
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
    else:
        sd = _raw_state_dict(obj, path)
        arch = OFFICIAL_ARCH
        meta = {"format": "official", "arch": arch.to_dict()}
    _check_not_cascadepsp(sd)
    _check_finite(sd, path)
    try:
        model = CRMNet(arch)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path!r} records an unusable architecture {arch}: {e}") from e
    _load_into(model, sd, repr(path))
    model.eval()
    logger.info("Loaded CRM weights from %s (%s format)", path, meta.get("format"))
    return model, meta


def save_crm(
    model: CRMNet,
    path: str,
    *,
    half: bool = False,
    drop_layer4: bool = True,
    **metadata: Any,
) -> None:
    """Write ``model`` in the project's checkpoint format.

    Args:
        model: the network.
        path: output file.
        half: store floating-point weights as float16 (loaded back as float32).
        drop_layer4: leave out the never-run layer4 (the architecture is recorded without it).
        metadata: extra JSON-like fields (``scales``, ``training``, ``model_card`` ...).
    """
    arch = model.arch
    sd = model.state_dict()
    if drop_layer4 and arch.with_layer4:
        sd = {k: v for k, v in sd.items() if not k.startswith("feats.layer4.")}
        arch = CRMArch.from_dict({**arch.to_dict(), "with_layer4": False})
    if half:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    obj = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "arch": arch.to_dict(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in sd.items()},
        **metadata,
    }
    torch_save(obj, path)


def load_cascadepsp(path: str) -> tuple[CascadePSPNet, dict[str, Any]]:
    """Build a :class:`~crm_d2.modeling.cascadepsp.CascadePSPNet` from a checkpoint file.

    Accepts the released file ``model`` (a ``module.``-prefixed state dict), a plain state dict
    and the project's format written by :func:`save_cascadepsp`.

    Returns:
        The model (float32, CPU, eval mode) and the metadata dict (``format``: "official" for a
        raw state dict, else the project's stored fields without the weights).

    Raises:
        CheckpointError: on a missing, HTML, git-LFS, truncated, CRM or mismatching file.
    """
    obj = load_state_dict_file(path, CASCADEPSP_HINT)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
    if obj.get("format") == FORMAT_NAME:
        _check_version(obj, path)
        if obj.get("network", "crm") != CASCADEPSP:
            raise CheckpointError(f"{path!r}: {_CRM_NOT_CASCADEPSP}")
        arch = CascadePSPArch.from_dict(obj["arch"])
        sd = _strip_prefix(obj["state_dict"])
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
    else:
        sd = _raw_state_dict(obj, path)
        arch = CASCADEPSP_ARCH
        meta = {"format": "official", "network": CASCADEPSP, "arch": arch.to_dict()}
    _check_not_crm(sd)
    _check_finite(sd, path)
    model = CascadePSPNet(arch)
    _load_into(
        model, sd, repr(path), "CascadePSP",
        "the released CascadePSP file 'model', a CascadePSPNet state dict, or a file written "
        "by crm_d2.checkpoint.save_cascadepsp",
    )
    model.eval()
    logger.info("Loaded CascadePSP weights from %s (%s format)", path, meta.get("format"))
    return model, meta


def save_cascadepsp(
    model: CascadePSPNet, path: str, *, half: bool = False, **metadata: Any
) -> None:
    """Write a CascadePSP network in the project's checkpoint format.

    Args:
        model: the network.
        path: output file.
        half: store floating-point weights as float16 (loaded back as float32).
        metadata: extra JSON-like fields (``L``, ``training``, ``model_card`` ...).
    """
    sd = model.state_dict()
    if half:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    obj = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "network": CASCADEPSP,
        "arch": model.arch.to_dict(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in sd.items()},
        **metadata,
    }
    torch_save(obj, path)
