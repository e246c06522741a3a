"""crm_d2: CRM mask refinement for detectron2 models.

The core (network, inference, fusion, metrics, standalone tools) imports without detectron2.
The detectron2 layer is the package :mod:`crm_d2.d2` (config, meta-architecture, simulator, data
and evaluators; importing :mod:`crm_d2.d2.meta_arch` registers ``CRMRefinedModel``); it needs
detectron2.
"""

from .cascadepsp import CascadePSPRefiner
from .checkpoint import CheckpointError, load_cascadepsp, load_crm, save_cascadepsp, save_crm
from .guided_filter import GuidedFilterRefiner
from .inference import DEFAULT_SCALES, CRMRefiner
from .modeling import CRMArch, CRMNet
from .refiners import load_refiner

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SCALES",
    "CRMArch",
    "CRMNet",
    "CRMRefiner",
    "CascadePSPRefiner",
    "CheckpointError",
    "GuidedFilterRefiner",
    "load_cascadepsp",
    "load_crm",
    "load_refiner",
    "save_cascadepsp",
    "save_crm",
]
