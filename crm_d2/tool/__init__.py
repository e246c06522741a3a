"""The ``crm-eval`` tool: refine a whole prediction set and report metrics before and after.

No detectron2 needed. The refinement itself is :mod:`crm_d2.pipeline`, with the options of
:class:`crm_d2.options.RefineOptions` (``crm-eval``'s defaults:
:data:`crm_d2.options.CRM_EVAL_DEFAULTS`). Entry points: :func:`run_evaluation` (library) and
:func:`crm_d2.cli.eval.main` (command line).
"""

from .coarse import CoarseSpec
from .runner import DistInfo, EvalConfig, init_distributed, run_evaluation

__all__ = [
    "CoarseSpec",
    "DistInfo",
    "EvalConfig",
    "init_distributed",
    "run_evaluation",
]
