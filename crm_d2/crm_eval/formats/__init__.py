"""The input formats of ``crm-eval``: one class per layout (:class:`.base.EvalFormat`).

* :class:`InstancesFormat`: COCO instances (mask AP, Boundary AP);
* :class:`PanopticFormat`: COCO panoptic, or COCO instances seen as panoptic (PQ, Boundary PQ);
* :class:`BigFormat`: the BIG / CascadePSP folder layout (IoU, mBA, Boundary IoU).
"""

from .base import EvalFormat, FormatMetrics, InputPath
from .big import BigFormat
from .instances import InstancesFormat
from .panoptic import PanopticFormat

__all__ = [
    "BigFormat",
    "EvalFormat",
    "FormatMetrics",
    "InputPath",
    "InstancesFormat",
    "PanopticFormat",
]
