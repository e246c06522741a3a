"""detectron2 config of crm_d2 (needs detectron2): the ``MODEL.CRM`` keys, the options they
build (:class:`CRMOptions`) and YAML loading.

Call :func:`add_crm_config` on a detectron2 config (after the adders of external projects),
then :func:`merge_config_file`. Every crm_d2 key lives under ``cfg.MODEL.CRM``; the wrapped
model keeps its own keys (``cfg.MODEL.*``) untouched. The defaults of the keys are those of
:class:`CRMOptions` (:class:`crm_d2.options.RefineOptions` plus the detectron2-only switches).

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
from dataclasses import dataclass

import yaml
from detectron2.config import CfgNode as CN
from detectron2.utils.file_io import PathManager

from ..inference import DEFAULT_CHUNK
from ..options import RefineOptions
from ..sparse import DEFAULT_AUTOCAST

__all__ = [
    "CRMOptions",
    "add_crm_config",
    "load_yaml_with_bases",
    "merge_config_file",
    "parse_exclusive",
    "parse_void_id",
    "resolve_base",
]

logger = logging.getLogger(__name__)

MODEL_ZOO_PREFIX = "model_zoo://"
_ENV_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")
_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------
def parse_exclusive(value) -> bool | None:
    """``MODEL.CRM.EXCLUSIVE_INSTANCES`` -> True / False / None (auto).

    Accepts None or "auto" (auto), bools, and the strings true/false/yes/no/1/0/on/off.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low == "auto":
            return None
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise ValueError(
        f"MODEL.CRM.EXCLUSIVE_INSTANCES must be 'auto' (or None), True or False; got {value!r}"
    )


def parse_void_id(value) -> int | None:
    """``MODEL.CRM.VOID_ID`` -> 0, -1 or None (auto). Accepts ints, "0", "-1", "auto", None."""
    if value is None:
        return None
    if isinstance(value, str):
        low = value.strip().lower()
        if low == "auto":
            return None
        try:
            value = int(low)
        except ValueError:
            value = low
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, -1):
        return value
    raise ValueError(f"MODEL.CRM.VOID_ID must be 'auto' (or None), 0 or -1; got {value!r}")


def _optional_int(value, key: str) -> int | None:
    """``None`` / 0 / "none" -> None, else a positive int (``MODEL.CRM.MAX_SIDE`` style)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"MODEL.CRM.{key} must be None or an integer, got {value!r}")
    return None if value == 0 else value


@dataclass(frozen=True)
class CRMOptions(RefineOptions):
    """What :class:`~crm_d2.d2.meta_arch.CRMRefinedModel` refines and how (mirrors
    ``cfg.MODEL.CRM``): the :class:`~crm_d2.options.RefineOptions` of the pipeline plus the
    detectron2-only switches.

    Attributes:
        refine_instances / refine_panoptic / refine_semantic: which outputs to refine.
        eval_both: also return the inner output under ``"crm_inner"``.
        mask_chunk: None (all masks of an image in one refiner call), the detectron2 layer's
            behaviour before the pipeline was shared; ``crm-eval`` uses RefineOptions' 32.
    """

    mask_chunk: int | None = None
    refine_instances: bool = True
    refine_panoptic: bool = True
    refine_semantic: bool = False
    eval_both: bool = False

    @classmethod
    def from_config(cls, crm_cfg) -> CRMOptions:
        """Build from the ``cfg.MODEL.CRM`` node."""
        c = crm_cfg
        return cls(
            expand_ratio=float(c.EXPAND_RATIO),
            min_area=int(c.MIN_AREA),
            batch_size=int(c.ROI_BATCH_SIZE),
            size_multiple=int(c.ROI_SIZE_MULTIPLE),
            min_roi_size=int(c.MIN_ROI_SIZE),
            scales=tuple(float(s) for s in c.SCALES) or None,
            exact=bool(c.EXACT),
            max_side=_optional_int(c.get("MAX_SIDE", None), "MAX_SIDE"),
            mask_chunk=_optional_int(c.get("MASK_CHUNK", None), "MASK_CHUNK"),
            stuff_factor=float(c.STUFF_FACTOR),
            init_confidence=float(c.INIT_CONFIDENCE),
            exclusive=parse_exclusive(c.EXCLUSIVE_INSTANCES),
            void_id=parse_void_id(c.VOID_ID),
            score_reweight=bool(c.SCORE_REWEIGHT),
            reuse_instances=bool(c.get("REUSE_INSTANCES", True)),
            refine_instances=bool(c.REFINE_INSTANCES),
            refine_panoptic=bool(c.REFINE_PANOPTIC),
            refine_semantic=bool(c.REFINE_SEMANTIC),
            eval_both=bool(c.EVAL_BOTH),
        )


# --------------------------------------------------------------------------------------------
# MODEL.CRM
# --------------------------------------------------------------------------------------------


def add_crm_config(cfg: CN) -> None:
    """Add the ``MODEL.CRM`` node (refiner, ROI, fusion and evaluation switches) to ``cfg``.

    Only adds keys; call it once, before ``merge_from_file``. ``None`` defaults mean "auto" and
    accept a value of any type (yacs allows replacing ``None``), so ``MODEL.CRM.VOID_ID -1`` and
    ``MODEL.CRM.EXCLUSIVE_INSTANCES False`` work on the command line.
    """
    cfg.MODEL.CRM = CN()
    c = cfg.MODEL.CRM
    d = CRMOptions()
    # Refiner checkpoint (official model_45705, a state dict or a crm_d2 checkpoint); "" = the
    # weights shipped with crm_d2 (crm_d2.weights.default_weights_path()).
    c.WEIGHTS = ""
    # Refiner: "crm" (Shen et al. 2022), "cascadepsp" (Cheng et al. 2020; WEIGHTS is then the
    # released file 'model', and SCALES / CHUNK_SIZE / AUTOCAST / FLIP / GUIDED_BLEND / EXACT
    # do not apply) or "guided_filter" (He et al. 2010, training-free baseline; WEIGHTS must
    # be "").
    c.REFINER = "crm"
    # META_ARCHITECTURE of the wrapped (inner) model, e.g. "PanopticFPN", "PanopticFCN".
    c.INNER_META_ARCHITECTURE = ""
    # CRM input scales of the coarse-to-fine schedule; [] = the checkpoint's (official 1/8..1).
    c.SCALES = list(d.scales or ())
    # ROI = mask box grown by this fraction of its size in total (half per side).
    c.EXPAND_RATIO = d.expand_ratio
    # Segments / instances with at most this many pixels are not refined.
    c.MIN_AREA = d.min_area
    # Grow ROIs smaller than this many pixels (per side) around their centre; 0 = never.
    c.MIN_ROI_SIZE = d.min_roi_size
    # Stuff probabilities are multiplied by this before the fusion (panoptic only).
    c.STUFF_FACTOR = d.stuff_factor
    # Confidence of the inner model's labels in the fusion ("modified argmax").
    c.INIT_CONFIDENCE = d.init_confidence
    # Refine output["instances"].pred_masks.
    c.REFINE_INSTANCES = d.refine_instances
    # Refine every segment of output["panoptic_seg"] (things and stuff).
    c.REFINE_PANOPTIC = d.refine_panoptic
    # Refine output["sem_seg"] per connected component of each class (off: CRM's paper doesn't).
    c.REFINE_SEMANTIC = d.refine_semantic
    # ROIs of the same size refined in one refiner call.
    c.ROI_BATCH_SIZE = d.batch_size
    # Round ROI sizes up to a multiple of this (more ROIs share a size and batch); 1 = exact.
    c.ROI_SIZE_MULTIPLE = d.size_multiple
    # Refine images whose longer side exceeds this many pixels at a reduced size (as crm-eval's
    # --max-side; masks and outputs stay at full resolution); None = never.
    c.MAX_SIDE = d.max_side
    # Masks of one image per refiner call (bounds memory); None = all at once.
    c.MASK_CHUNK = d.mask_chunk
    # Queries per CRM decoder call (memory vs. speed; cache-sized blocks are fastest on CPU).
    c.CHUNK_SIZE = DEFAULT_CHUNK
    # Precision of CRM's fast path: "auto" = the encoder's fusion in bf16 on inputs of >= 2^19
    # pixels where the device computes bf16 natively (CUDA, CPUs with AVX512-BF16 / AMX),
    # float32 elsewhere (COCO-sized ROIs were no faster in bf16); "none" =
    # float32 everywhere (a string, not null); "bf16" / "fp16" force it. Measured within 0.1
    # IoU / mBA points of float32 on held-out images (BENCHMARKS.md). Ignored by EXACT.
    c.AUTOCAST = DEFAULT_AUTOCAST
    # CRM test-time augmentation: also refine the left-right mirrored ROI and average the two
    # probability maps (twice the refinement time; fewer objects made worse on held-out binary
    # masks, crm_d2/weights/MODEL_CARD.md).
    c.FLIP = False
    # CRM: weight W of the guided filter of the coarse mask (He et al. 2010, radius 4, eps 1e-2)
    # in the refined probabilities, (1 - W) CRM + W guided (after FLIP); -1.0 = the checkpoint's
    # (the shipped file's: crm_d2/weights/MODEL_CARD.md; 0.0, CRM alone, for official weights).
    # A float: write 0.0 / 1.0, not 0 / 1 (yacs keeps the type).
    c.GUIDED_BLEND = -1.0
    # Run the authors' schedule to the letter (their upsampling and every-pixel decoding;
    # GUIDED_BLEND still applies after it). The
    # default (off) follows the schedule (crm_d2.sparse.FastOptions.default_for): the dense grid
    # decoder over several scales, equal to it within 1e-5 in float32 (see AUTOCAST); band
    # decoding at one scale, measured against dense on held-out images (BENCHMARKS.md).
    c.EXACT = d.exact
    # Multiply each refined instance's score by the mean refined probability inside its new
    # mask (Mask Scoring style); off keeps the inner model's scores.
    c.SCORE_REWEIGHT = d.score_reweight
    # Also return the inner model's outputs under "crm_inner" so that one pass of the inner
    # model serves a before/after evaluation (tools/train_net.py reports both and the delta).
    c.EVAL_BOTH = d.eval_both
    # Panoptic thing segments reuse the probability refined for their instance (instance_id)
    # instead of being refined a second time.
    c.REUSE_INSTANCES = d.reuse_instances
    # Instance fusion: None/"auto" = exclusive when an image's inner masks do not overlap
    # (EntitySeg), True = always exclusive (modified argmax), False = replace each mask.
    c.EXCLUSIVE_INSTANCES = d.exclusive
    # Void id of panoptic_seg: None/"auto" = -1 if some segment has id 0, else 0; or 0 / -1.
    c.VOID_ID = d.void_id
    # Evaluation tasks of tools/train_net.py: any of "panoptic_seg", "segm", "entity",
    # "sem_seg"; [] = chosen from the inner meta-architecture and the dataset.
    c.EVALUATORS = []
    # Coarse masks of the SIMULATED inner model CoarseGTSimulator (crm_d2.d2.simulator): the
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
