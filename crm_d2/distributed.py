"""Devices and process groups: checking a requested torch device, and joining a ``torchrun``
process group (shared by the refiner, training and the evaluation tool).

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; without them (or with
``WORLD_SIZE=1``) everything runs in one process and no group is created.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "check_device", "init_distributed"]


def check_device(device: str | torch.device) -> torch.device:
    """The torch device ``device`` names, if this machine and this torch build can use it.

    Raises:
        ValueError: for an unknown device name, CUDA on a CPU-only build or without a visible
            GPU, a CUDA index beyond the visible GPUs, or MPS where it is not available.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch is a CPU-only build"
                if torch.version.cuda is None
                else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES)"
            )
            raise ValueError(f"device {str(device)!r} asked for, but {why}: use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"device {str(device)!r} asked for, but only {count} GPU(s) are visible"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but MPS is not available here")
    return dev


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a (possibly single-process) run.

    Attributes:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this machine (the CUDA device index).
        owns_group: True when :func:`init_distributed` created the process group (the caller
            then destroys it when done).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.distributed:
            dist.barrier()


def init_distributed(device: str, timeout: datetime.timedelta) -> tuple[DistInfo, str]:
    """Join the process group set up by ``torchrun`` (if any) and pick this process's device.

    Uses NCCL for CUDA devices and gloo otherwise. In a distributed run, a CUDA device without
    an index (``"cuda"``) becomes ``"cuda:LOCAL_RANK"``. A group that already exists is joined
    as it is.

    Args:
        device: the requested device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` ...
        timeout: collective-operation timeout of a newly created group.

    Returns:
        The :class:`DistInfo` and the device string for this process.

    Raises:
        ValueError: when the device cannot be used (:func:`check_device`).
    """
    check_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda and ":" not in device:
        device = f"cuda:{local_rank}"
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, False), device
    if cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, True), device
