"""What every input format of ``crm-eval`` provides (:class:`EvalFormat`), and what it returns.

An input format (COCO instances, COCO panoptic, the BIG layout) owns everything that depends on
the layout of the input: its files, reading them, processing one image, the metrics before and
after, the report rows, the masks of an overlay and the collected output files. The runner
(:mod:`..runner`) only asks the format; it holds no per-format branch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic

import numpy as np

from ..coarse import CoarseSpec
from ..datasets import ImageItem
from ..process import ProcessContext
from ..records import ImageRecord, ObjectRecord, OutputLayout, P
from ..report import Row

__all__ = ["AFTER", "BEFORE", "EvalFormat", "FormatMetrics", "InputPath"]

BEFORE, AFTER = "before (coarse input)", "after (refined by CRM)"  # names in the logs
KNOWN_PAIRING = "known: coarse made from that ground truth"


@dataclass(frozen=True)
class InputPath:
    """One input file or folder of a format.

    Attributes:
        name: its settings key (``"coco_instances"``, ``"images"``, ...), also the option's
            name without the dashes.
        path: as given (None: not given).
        folder: a folder (its listing is stamped) rather than a file (its content is hashed).
    """

    name: str
    path: str | None
    folder: bool = False


@dataclass
class FormatMetrics:
    """A format's part of the report.

    Attributes:
        before, after: the format's metrics of the coarse / refined predictions, in percent.
        rows: (label, before, after) table rows, in percent.
        pairing: how predictions were paired with ground truths (for the per-object rows).
        outputs: collected output files written, name -> path.
        notes: remarks for the report.
    """

    before: dict[str, float]
    after: dict[str, float]
    rows: list[Row]
    pairing: str
    outputs: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class EvalFormat(ABC, Generic[P]):
    """One input format. Made from paths only (no I/O); :meth:`open` reads the input.

    Class attributes:
        kind: the report's ``mode`` (``"instances"``, ``"panoptic"``, ``"big"``).
    """

    kind: ClassVar[str]

    @property
    def settings_name(self) -> str:
        """The ``mode`` stored in ``settings.json`` (cached records of another mode are not
        reused)."""
        return self.kind

    @property
    @abstractmethod
    def main_input(self) -> str:
        """The input named in the report (the ground-truth file or the BIG folder)."""

    @abstractmethod
    def inputs(self) -> list[InputPath]:
        """Every input file and folder (for the settings and their content stamps)."""

    def check(self, coarse: CoarseSpec | None) -> None:
        """Refuse options this format cannot use together.

        Raises:
            ValueError: naming the options.
        """

    @abstractmethod
    def open(self) -> list[ImageItem]:
        """Read the input (ground truth, predictions, file listing); returns its images."""

    def validate(self, items: Sequence[ImageItem]) -> None:
        """Check the predictions of ``items`` before anything is refined (default: nothing).

        Raises:
            ValueError: naming the first bad prediction.
        """

    @abstractmethod
    def payload(self, d: Mapping[str, Any]) -> P:
        """Read this format's fields of a stored record (:meth:`.ImageRecord.from_json`)."""

    @abstractmethod
    def process(self, ctx: ProcessContext, item: ImageItem) -> ImageRecord[P]:
        """Refine and score one image, write its output files; returns its record."""

    @abstractmethod
    def metrics(
        self,
        records: Sequence[ImageRecord[P]],
        layout: OutputLayout,
        coarse: CoarseSpec | None,
        summary: dict[str, Any],
    ) -> FormatMetrics:
        """Write the collected outputs and compute the metrics before and after.

        Args:
            records: the records of every evaluated image, in dataset order.
            layout: the output folder.
            coarse: the coarse masks made from the ground truth (None: given predictions).
            summary: :func:`..report.object_summary` of every record's objects.
        """

    @abstractmethod
    def masks(self, record: ImageRecord[P], obj: ObjectRecord) -> tuple[np.ndarray, np.ndarray]:
        """(coarse, refined) (H, W) bool masks of one object, for its overlay."""

    def _opened(self, dataset: Any) -> Any:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call open() before using the input")
        return dataset
