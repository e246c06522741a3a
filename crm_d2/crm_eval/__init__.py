"""The ``crm-eval`` tool: refine a whole prediction set and report metrics before and after.

No detectron2 needed. The refinement itself is :mod:`crm_d2.pipeline`, with the options of
:class:`crm_d2.options.RefineOptions` (``crm-eval``'s defaults:
:data:`crm_d2.options.CRM_EVAL_DEFAULTS`). Entry points: :func:`run_evaluation` with an
:class:`EvalConfig` whose ``inputs`` is one of the formats of :mod:`.formats` (library), and
:func:`crm_d2.cli.eval.main` (command line).
"""

from .coarse import CoarseSpec
from .formats import BigFormat, EvalFormat, InstancesFormat, PanopticFormat
from .runner import DistInfo, EvalConfig, init_distributed, run_evaluation

__all__ = [
    "BigFormat",
    "CoarseSpec",
    "DistInfo",
    "EvalConfig",
    "EvalFormat",
    "InstancesFormat",
    "PanopticFormat",
    "init_distributed",
    "run_evaluation",
]
