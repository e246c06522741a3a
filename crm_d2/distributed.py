"""Joining a ``torchrun`` process group, shared by training and the evaluation tool.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; without them (or with
``WORLD_SIZE=1``) everything runs in one process and no group is created.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed"]


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
    """
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
