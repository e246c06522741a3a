"""detectron2 config of crm_d2 (needs detectron2): the ``MODEL.CRM`` keys and YAML loading.

Call :func:`add_crm_config` on a detectron2 config (after the adders of external projects),
then :func:`merge_config_file`. Every crm_d2 key lives under ``cfg.MODEL.CRM``; the wrapped
model keeps its own keys (``cfg.MODEL.*``) untouched.

crm_d2's YAML files extend detectron2's ``_BASE_`` in three ways (see :func:`resolve_base`):
``model_zoo://<path>`` names a config of detectron2's model zoo (as
``detectron2.model_zoo.get_config_file``), ``$VAR`` / ``${VAR}`` are environment variables
(e.g. ``${PANOPTICFCN_ROOT}``, the user's checkout of an external project), and ``_BASE_`` may
be a list of files merged in order (later ones win, the file's own keys win over all).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping

import yaml
from detectron2.config import CfgNode as CN
from detectron2.utils.file_io import PathManager

__all__ = ["add_crm_config", "load_yaml_with_bases", "merge_config_file", "resolve_base"]

logger = logging.getLogger(__name__)

MODEL_ZOO_PREFIX = "model_zoo://"
_ENV_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def add_crm_config(cfg: CN) -> None:
    """Add the ``MODEL.CRM`` node (refiner, ROI, fusion and evaluation switches) to ``cfg``.

    Only adds keys; call it once, before ``merge_from_file``. ``None`` defaults mean "auto" and
    accept a value of any type (yacs allows replacing ``None``), so ``MODEL.CRM.VOID_ID -1`` and
    ``MODEL.CRM.EXCLUSIVE_INSTANCES False`` work on the command line.
    """
    cfg.MODEL.CRM = CN()
    c = cfg.MODEL.CRM
    # Refiner checkpoint (official model_45705, a state dict or a crm_d2 checkpoint); "" = the
    # weights shipped with crm_d2 (crm_d2.weights.default_weights_path()).
    c.WEIGHTS = ""
    # Refiner: "crm" (Shen et al. 2022), "cascadepsp" (Cheng et al. 2020; WEIGHTS is then the
    # released file 'model', and SCALES / CHUNK_SIZE / EXACT do not apply) or "guided_filter"
    # (He et al. 2010, training-free baseline; WEIGHTS must be "").
    c.REFINER = "crm"
    # META_ARCHITECTURE of the wrapped (inner) model, e.g. "PanopticFPN", "PanopticFCN".
    c.INNER_META_ARCHITECTURE = ""
    # CRM input scales of the coarse-to-fine schedule; [] = the checkpoint's (official 1/8..1).
    c.SCALES = []
    # ROI = mask box grown by this fraction of its size in total (half per side).
    c.EXPAND_RATIO = 0.25
    # Segments / instances with at most this many pixels are not refined.
    c.MIN_AREA = 1024
    # Grow ROIs smaller than this many pixels (per side) around their centre; 0 = never.
    c.MIN_ROI_SIZE = 0
    # Stuff probabilities are multiplied by this before the fusion (panoptic only).
    c.STUFF_FACTOR = 0.51
    # Confidence of the inner model's labels in the fusion ("modified argmax").
    c.INIT_CONFIDENCE = 0.5
    # Refine output["instances"].pred_masks.
    c.REFINE_INSTANCES = True
    # Refine every segment of output["panoptic_seg"] (things and stuff).
    c.REFINE_PANOPTIC = True
    # Refine output["sem_seg"] per connected component of each class (off: CRM's paper doesn't).
    c.REFINE_SEMANTIC = False
    # ROIs of the same size refined in one refiner call.
    c.ROI_BATCH_SIZE = 8
    # Round ROI sizes up to a multiple of this (more ROIs share a size and batch); 1 = exact.
    c.ROI_SIZE_MULTIPLE = 1
    # Queries per CRM decoder call (memory vs. speed).
    c.CHUNK_SIZE = 262144
    # Run the authors' schedule to the letter (every pixel at every scale; much slower). The
    # default decodes a band around the boundary (crm_d2.sparse, see BENCHMARKS.md).
    c.EXACT = False
    # Multiply each refined instance's score by the mean refined probability inside its new
    # mask (Mask Scoring style); off keeps the inner model's scores.
    c.SCORE_REWEIGHT = False
    # Also return the inner model's outputs under "crm_inner" so that one pass of the inner
    # model serves a before/after evaluation (tools/train_net.py reports both and the delta).
    c.EVAL_BOTH = False
    # Panoptic thing segments reuse the probability refined for their instance (instance_id)
    # instead of being refined a second time.
    c.REUSE_INSTANCES = True
    # Instance fusion: None/"auto" = exclusive when an image's inner masks do not overlap
    # (EntitySeg), True = always exclusive (modified argmax), False = replace each mask.
    c.EXCLUSIVE_INSTANCES = None
    # Void id of panoptic_seg: None/"auto" = -1 if some segment has id 0, else 0; or 0 / -1.
    c.VOID_ID = None
    # Evaluation tasks of tools/train_net.py: any of "panoptic_seg", "segm", "entity",
    # "sem_seg"; [] = chosen from the inner meta-architecture and the dataset.
    c.EVALUATORS = []
    # Coarse masks of the SIMULATED inner model CoarseGTSimulator (crm_d2.simulator): the
    # ground truth rendered as crm-eval's --coarse-from-gt KIND (crm_d2.coarse): "stride8_binary"
    # (stride-8 binary masks), "maskrcnn" (Mask R-CNN 28x28 masks pasted into their boxes), ...
    c.SIMULATOR_COARSE = "stride8_binary"


def resolve_base(base: str, including_file: str) -> str:
    """Path of a ``_BASE_`` entry of ``including_file``.

    ``model_zoo://X`` -> detectron2's bundled ``configs/X``; environment variables are
    expanded (an unset one is an error naming it); ``~`` is expanded; other relative paths are
    relative to the folder of ``including_file``.
    """
    if base.startswith(MODEL_ZOO_PREFIX):
        from detectron2 import model_zoo

        return model_zoo.get_config_file(base[len(MODEL_ZOO_PREFIX) :])
    missing = [m for m in _ENV_VAR.findall(base) if m not in os.environ]
    if missing:
        raise ValueError(
            f"{including_file}: _BASE_ {base!r} uses the environment variable(s) "
            f"{', '.join(missing)}, which are not set: set them to the folder they name (see "
            "the comment at the top of that file)"
        )
    path = os.path.expanduser(os.path.expandvars(base))
    if "://" in path or os.path.isabs(path):
        return path
    return os.path.join(os.path.dirname(including_file), path)


def _merge_dicts(src: Mapping, dst: dict) -> dict:
    """Recursively merge ``src`` into ``dst`` (``src`` wins); returns ``dst``."""
    for key, value in src.items():
        if isinstance(value, Mapping) and isinstance(dst.get(key), Mapping):
            dst[key] = _merge_dicts(value, dict(dst[key]))
        else:
            dst[key] = value
    return dst


def load_yaml_with_bases(path: str, skip_base: Callable[[str], bool] | None = None) -> dict:
    """Load a YAML config and its ``_BASE_`` chain into one plain dict.

    Args:
        path: the YAML file.
        skip_base: ``skip_base(base_entry) -> True`` leaves that ``_BASE_`` entry (and its own
            bases) out; used by tests to check crm_d2's part of configs whose bases live in
            projects that are not installed.
    """
    with PathManager.open(path, "r") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    data = dict(data)
    bases = data.pop("_BASE_", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for base in bases:
        if skip_base is not None and skip_base(base):
            continue
        _merge_dicts(load_yaml_with_bases(resolve_base(base, path), skip_base), merged)
    return _merge_dicts(data, merged)


def merge_config_file(cfg: CN, path: str, skip_base: Callable[[str], bool] | None = None) -> None:
    """Merge a YAML file (with crm_d2's ``_BASE_`` extensions) into ``cfg``.

    Like ``cfg.merge_from_file``; every key must already exist in ``cfg`` (call
    :func:`add_crm_config` and the external projects' adders first).
    """
    loaded = CN(load_yaml_with_bases(path, skip_base))
    version = loaded.get("VERSION", cfg.get("VERSION"))
    if version != cfg.get("VERSION"):
        raise ValueError(
            f"{path}: config VERSION {version} differs from detectron2's {cfg.get('VERSION')}; "
            "upgrade the file with detectron2.config.upgrade_config"
        )
    cfg.merge_from_other_cfg(loaded)
