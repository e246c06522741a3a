"""What a training run records about itself: ``metrics.jsonl`` events and the hardware record."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from typing import Any

import torch

__all__ = ["MetricsWriter", "fmt_time", "hardware"]


def hardware(device: torch.device, world_size: int) -> dict[str, Any]:
    """The hardware record of a run: device, ranks, torch version and threads, CPU, GPU."""
    info: dict[str, Any] = {
        "device": str(device),
        "world_size": world_size,
        "torch": str(torch.__version__),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record``; non-finite floats become null (JSON has no NaN)."""
        if self.path is None:
            return
        record = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def fmt_time(seconds: float) -> str:
    """``H:MM:SS`` of a duration in seconds (negative -> 0)."""
    seconds = int(max(0, seconds))
    return str(datetime.timedelta(seconds=seconds))
