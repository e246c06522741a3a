"""Training batches: the datasets concatenated, sharded per rank and loaded epoch by epoch.

Shape shorthand: B = per-rank batch, S = crop size.

The order of the samples depends only on (seed, epoch, rank), and a loader can start after any
number of batches of its epoch, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler

from ..distributed import DistInfo

__all__ = ["TrainBatches", "check_crop_sizes", "describe_datasets"]


def check_crop_sizes(datasets: Sequence[Dataset], crop_size: int) -> None:
    """Refuse datasets whose ``crop_size`` attribute is not the configured one."""
    for ds in datasets:
        crop = getattr(ds, "crop_size", crop_size)
        if crop != crop_size:
            raise ValueError(
                f"{type(ds).__name__} makes {crop}px crops but cfg.crop_size is {crop_size}"
            )


def describe_datasets(datasets: Sequence[Dataset]) -> list[dict[str, Any]]:
    """The training record of each dataset: type, size and its sampling settings."""
    out = []
    for ds in datasets:
        d: dict[str, Any] = {"type": type(ds).__name__, "samples": len(ds)}
        for attr in ("crop_size", "coarse", "scale_range", "seed"):
            if hasattr(ds, attr):
                value = getattr(ds, attr)
                d[attr] = list(value) if isinstance(value, tuple) else value
        out.append(d)
    return out


class TrainBatches:
    """The training data of one rank: ``batch_size // world_size`` samples per batch.

    Args:
        datasets: datasets whose items are dicts with ``image`` (3, S, S), ``coarse``
            (1, S, S) and ``gt`` (1, S, S) tensors; those with a ``set_epoch`` method get the
            epoch before each pass.
        batch_size: the global batch.
        info: the rank and world size.
        seed: seeds the shuffling and the loader's worker seeds.
        num_workers: DataLoader worker processes.
        pin_memory: pin the batches (CUDA training).
    """

    def __init__(
        self,
        datasets: Sequence[Dataset],
        batch_size: int,
        info: DistInfo,
        seed: int,
        num_workers: int,
        pin_memory: bool,
    ) -> None:
        if batch_size % info.world_size:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by the {info.world_size} ranks"
            )
        self.datasets = list(datasets)
        self.per_rank = batch_size // info.world_size
        self.dataset = ConcatDataset(self.datasets)
        self.sampler = DistributedSampler(
            self.dataset,
            num_replicas=info.world_size,
            rank=info.rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
        self.seed, self.num_workers, self.pin_memory = seed, num_workers, pin_memory
        self.batches_per_epoch = len(self.sampler) // self.per_rank
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{len(self.dataset)} training samples are fewer than one global batch of "
                f"{batch_size}"
            )

    def __len__(self) -> int:
        """The number of training samples (all datasets, all ranks)."""
        return len(self.dataset)

    def epoch_loader(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        """The DataLoader of one epoch, starting after ``skip_batches`` batches (for resuming).

        The loader draws its worker seeds from its own generator, so the global torch RNG
        (dropout) sees the same sequence whether or not the run was interrupted.
        """
        self.sampler.set_epoch(epoch)
        for ds in self.datasets:
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)
        indices = list(self.sampler)[skip_batches * self.per_rank :]
        gen = torch.Generator()
        gen.manual_seed(self.seed * 1_000_003 + epoch)
        return DataLoader(
            self.dataset,
            batch_size=self.per_rank,
            sampler=indices,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=gen,
        )
