"""The CRM training loop (Shen et al., CVPR 2022, §3): Adam + MultiStepLR on full-grid queries.

Shape shorthand: B = per-rank batch, S = crop size, Q = S * S queries per crop, H, W = size of a
full validation image.

One iteration: encode the (B, 3, S, S) crop and its (B, 1, S, S) coarse mask, decode ALL S x S
pixel centres of the crop (cell 2 / S) with :meth:`CRMNet.decode_grid`, and apply
:func:`~crm_d2.training.losses.crm_loss` to the (B, 1, S, S) logits against the soft ground
truth. The paper's recipe is the default of :class:`TrainConfig`: crop 224, batch 12, 45,000
iterations, Adam (lr 2.25e-4, weight decay 1e-4), lr x0.1 at 22,500 and 37,500.

Files written to ``TrainConfig.output_dir`` (rank 0 only):

* ``last.pth``: the training state (weights, optimizer, scheduler, iteration, every rank's RNG
  states, best validation so far), written atomically every ``ckpt_every`` iterations and at the
  end; ``resume`` continues from it exactly. It is also a valid project checkpoint
  (:func:`~crm_d2.checkpoint.load_crm` reads it; the training state comes back as metadata).
* ``best.pth``: project-format weights with the highest validation IoU gain so far.
* ``model_final.pth``: the final weights for release, float16, without layer4, with the
  inference scales and a ``training`` record (data, iterations, wall time, hardware). The
  stored scales are ``val_scales``, the schedule the run was validated with (``best.pth`` and
  ``last.pth`` store them too), so the file refines as it was measured.
* ``metrics.jsonl``: one JSON dict per training log, validation and checkpoint event.
* ``config.json``: the configuration of the latest start; ``val_samples.json``: the validation
  images and how each one's coarse mask was made.

The package, by concern: :mod:`~crm_d2.training.config` (:class:`TrainConfig`, presets),
:mod:`~crm_d2.training.data` (datasets -> per-rank batches), :mod:`~crm_d2.training.model`
(initial weights, training forward, optimizer), :mod:`~crm_d2.training.validation` (validation
samples, scores, ``best.pth``), :mod:`~crm_d2.training.state` (``last.pth``: save and exact
resume) and this module, the loop. The names importable from here before the split still are.

Distributed data parallel: launched with ``torchrun`` (``WORLD_SIZE`` > 1 in the environment),
:func:`train` initialises the process group (NCCL on CUDA, gloo on CPU), shards the data with a
:class:`~torch.utils.data.DistributedSampler` and wraps the model in DDP; each rank gets
``batch_size // world_size`` samples; only rank 0 logs, validates and writes files.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import logging
import os
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from ..checkpoint import save_crm
from ..distributed import DistInfo, init_distributed
from ..io import write_json
from .config import PRESETS, TrainConfig, resolve_arch
from .data import TrainBatches, check_crop_sizes, describe_datasets
from .losses import crm_loss
from .model import GridForward, build_training_objects, load_imagenet_init, load_init_weights
from .records import MetricsWriter, fmt_time, hardware
from .state import (
    LAST_NAME,
    gather_rng_states,
    load_training_state,
    plain,
    save_training_state,
)
from .validation import BEST_NAME, VAL_KINDS, Validator, ValSample, make_val_samples, validate

__all__ = [
    "BEST_NAME",
    "FINAL_NAME",
    "LAST_NAME",
    "METRICS_NAME",
    "PRESETS",
    "VAL_KINDS",
    "VAL_LIST_NAME",
    "TrainConfig",
    "ValSample",
    "load_imagenet_init",
    "load_init_weights",
    "make_val_samples",
    "resolve_arch",
    "train",
    "validate",
]

logger = logging.getLogger(__name__)

FINAL_NAME = "model_final.pth"
METRICS_NAME = "metrics.jsonl"
VAL_LIST_NAME = "val_samples.json"


def _device_type(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name).type


def _resolve_device(name: str, info: DistInfo) -> torch.device:
    kind = _device_type(name)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available; use 'cpu'")
        if info.distributed or name in ("auto", "cuda"):
            return torch.device("cuda", info.local_rank if info.distributed else 0)
    return torch.device(name if name != "auto" else kind)


def train(
    cfg: TrainConfig,
    train_datasets: Dataset | Sequence[Dataset],
    val_samples: Sequence[ValSample] = (),
) -> str:
    """Train a CRM network and return the path of the final exported checkpoint.

    Args:
        cfg: the configuration.
        train_datasets: one or several datasets whose items are dicts with ``image``
            (3, S, S) normalised float, ``coarse`` (1, S, S) in [-1, 1] and ``gt`` (1, S, S) in
            [0, 1] (e.g. :class:`~crm_d2.training.datasets.CRMTrainDataset`), S = ``crop_size``.
            Datasets with a ``set_epoch`` method get the epoch before each pass.
        val_samples: full images for validation (see :func:`make_val_samples`); empty = no
            validation (and no ``best.pth``).

    Returns:
        the path of ``model_final.pth`` (the same on every rank).
    """
    if isinstance(train_datasets, Dataset):
        train_datasets = [train_datasets]
    train_datasets = list(train_datasets)
    if not train_datasets:
        raise ValueError("train() needs at least one training dataset")
    check_crop_sizes(train_datasets, cfg.crop_size)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)

    info, _ = init_distributed(
        _device_type(cfg.device), datetime.timedelta(minutes=cfg.dist_timeout_min)
    )
    try:
        return _Run(cfg, train_datasets, list(val_samples), info).run()
    finally:
        if info.owns_group and dist.is_initialized():
            dist.destroy_process_group()


class _Run:
    """One start of a training run (fresh or resumed) on one rank."""

    def __init__(
        self,
        cfg: TrainConfig,
        datasets: list[Dataset],
        val_samples: list[ValSample],
        info: DistInfo,
    ) -> None:
        self.cfg, self.info, self.val_samples = cfg, info, val_samples
        self.device = device = _resolve_device(cfg.device, info)
        self.main = info.is_main
        out_dir = cfg.output_dir
        if self.main:
            os.makedirs(out_dir, exist_ok=True)
        self.last_path = os.path.join(out_dir, LAST_NAME)
        self.final_path = os.path.join(out_dir, FINAL_NAME)
        self.metrics = MetricsWriter(os.path.join(out_dir, METRICS_NAME) if self.main else None)
        self.batches = TrainBatches(
            datasets, cfg.batch_size, info, cfg.seed, cfg.num_workers, device.type == "cuda"
        )
        self.amp = cfg.amp
        if self.amp != "none" and device.type != "cuda":
            if self.main:
                logger.warning("amp=%s needs CUDA; training in float32 on %s", self.amp, device)
            self.amp = "none"
        objs = build_training_objects(cfg, device, self.amp, info.rank, self.main)
        self.net = objs.model
        self.optimizer = objs.optimizer
        self.scheduler = objs.scheduler
        self.scaler = objs.scaler
        self.init_report = objs.init_report

        self.start_iter, self.wall_before, best = 0, 0.0, None
        resume_path = cfg.resume
        if resume_path == "auto":
            resume_path = self.last_path if os.path.exists(self.last_path) else None
            if resume_path is None and self.main:
                logger.info("resume=auto: no %s yet, starting from iteration 0", self.last_path)
        if resume_path is not None:
            resumed = load_training_state(
                resume_path,
                self.net,
                self.optimizer,
                self.scheduler,
                self.scaler,
                cfg,
                info,
                device,
            )
            self.start_iter = resumed.iteration
            self.wall_before = resumed.wall_time_s
            best = resumed.best
        self.validator = Validator(
            val_samples,
            device,
            cfg.val_scales,
            os.path.join(out_dir, BEST_NAME),
            cfg.to_dict(),
            enabled=self.main,
            best=best,
        )
        self.forward: nn.Module = GridForward(self.net)
        if info.distributed:
            ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
            self.forward = nn.parallel.DistributedDataParallel(self.forward, **ddp_kwargs)
        self.t_start = time.perf_counter()
        self.stopped_early = False

    def out_of_time(self, it: int) -> bool:
        """Whether ``cfg.time_limit_min`` has passed in this start (the same answer on every
        rank: rank 0's clock decides); sets :attr:`stopped_early`."""
        limit = self.cfg.time_limit_min
        if limit is None:
            return False
        over = time.perf_counter() - self.t_start > 60.0 * limit
        if self.info.distributed:
            flag = torch.tensor([float(over)], device=self.device)
            dist.broadcast(flag, src=0)
            over = bool(flag.item())
        if over and it < self.cfg.iterations:
            self.stopped_early = True
            if self.main:
                logger.warning(
                    "time limit of %g min reached at iteration %d of %d: stopping (validation, "
                    "last.pth and the final weights as at the end; --resume continues)",
                    limit, it, self.cfg.iterations,
                )
        return self.stopped_early

    def wall(self) -> float:
        """Training wall time in seconds, over every start of the run."""
        return self.wall_before + time.perf_counter() - self.t_start

    def _write_start(self) -> None:
        cfg, info = self.cfg, self.info
        out_dir = cfg.output_dir
        write_json(os.path.join(out_dir, "config.json"), cfg.to_dict(), indent=2)
        # Which coarse kind each validation image got.
        write_json(
            os.path.join(out_dir, VAL_LIST_NAME),
            [
                {"name": v.name, "coarse": v.perturb, "size": list(v.gt.shape)}
                for v in self.val_samples
            ],
            indent=1,
        )
        n_params = sum(p.numel() for p in self.net.parameters())
        logger.info(
            "CRM training: arch %s (%.2f M params), %d training samples, %d validation images, "
            "crop %d, batch %d (%d rank(s) x %d), %d iterations from %d, lr %g, milestones %s, "
            "device %s, %d thread(s), amp %s",
            cfg.training_arch,
            n_params / 1e6,
            len(self.batches),
            len(self.val_samples),
            cfg.crop_size,
            cfg.batch_size,
            info.world_size,
            self.batches.per_rank,
            cfg.iterations,
            self.start_iter,
            cfg.lr,
            list(cfg.lr_milestones),
            self.device,
            torch.get_num_threads(),
            self.amp,
        )
        self.metrics.write(
            {
                "event": "start",
                "iter": self.start_iter,
                "time": time.time(),
                "train_samples": len(self.batches),
                "val_samples": len(self.val_samples),
                "world_size": info.world_size,
                "per_rank_batch": self.batches.per_rank,
            }
        )

    def save_last(self, it: int) -> None:
        """Write ``last.pth`` at iteration ``it`` (a collective: every rank sends its RNGs)."""
        rng = gather_rng_states(self.device, self.info)
        if not self.main:
            return
        save_training_state(
            self.last_path,
            self.net,
            self.optimizer,
            self.scheduler,
            self.scaler,
            iteration=it,
            rng=rng,
            world_size=self.info.world_size,
            wall_time_s=self.wall(),
            best=self.validator.best,
            config=self.cfg,
        )
        self.metrics.write(
            {"event": "checkpoint", "iter": it, "path": self.last_path, "time": time.time()}
        )

    def validate(self, it: int) -> None:
        """Validate at iteration ``it`` (rank 0) and record the result."""
        res = self.validator(self.net, it)
        if res is not None:
            self.metrics.write({"event": "val", "iter": it, "time": time.time(), **res})

    def step(self, batch: dict[str, torch.Tensor], it: int, autocast) -> tuple[torch.Tensor, dict]:
        """One optimizer step on ``batch`` (iteration ``it`` + 1); returns the loss and terms."""
        device = self.device
        image = batch["image"].to(device, non_blocking=True)
        coarse = batch["coarse"].to(device, non_blocking=True)
        gt = batch["gt"].to(device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = self.forward(image, coarse)
        loss, terms = crm_loss(logits.float(), gt, **self.cfg.loss_weights)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at iteration {it} (terms "
                f"{ {k: v.item() for k, v in terms.items()} }); lower the lr or disable amp"
            )
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return loss, terms

    def log(
        self,
        it: int,
        window: dict[str, float],
        keys: tuple[str, ...],
        lr: float,
        win_iters: int,
        win_time: float,
        win_data: float,
    ) -> None:
        """Average the window over the ranks and log / record it (rank 0)."""
        cfg = self.cfg
        means = torch.tensor([window[k] / win_iters for k in keys], dtype=torch.float64)
        if self.info.distributed:
            dist.all_reduce(means)
            means /= self.info.world_size
        if not self.main:
            return
        s_iter = win_time / win_iters
        rec = dict(zip(keys, means.tolist()))
        eta = s_iter * (cfg.iterations - it)
        logger.info(
            "iter %d/%d  loss %.4f (%s)  lr %.3g  %.3f s/iter (data %.3f)  ETA %s",
            it,
            cfg.iterations,
            rec["loss"],
            " ".join(f"{k} {rec[k]:.4f}" for k in keys[1:]),
            lr,
            s_iter,
            win_data / win_iters,
            fmt_time(eta),
        )
        self.metrics.write(
            {
                "event": "train",
                "iter": it,
                **rec,
                "lr": lr,
                "s_per_iter": s_iter,
                "data_s_per_iter": win_data / win_iters,
                "eta_s": eta,
                "wall_s": self.wall(),
                "time": time.time(),
            }
        )

    def run(self) -> str:
        """Train to ``cfg.iterations``, validate and checkpoint on schedule, export; -> path."""
        cfg = self.cfg
        if self.main:
            self._write_start()
        amp = self.amp
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
            if amp != "none"
            else contextlib.nullcontext()
        )
        self.t_start = time.perf_counter()
        it = self.start_iter
        epoch, skip = divmod(it, self.batches.batches_per_epoch)
        window: dict[str, float] = collections.defaultdict(float)
        win_iters, win_time, win_data = 0, 0.0, 0.0
        self.forward.train()
        while it < cfg.iterations:
            loader = self.batches.epoch_loader(epoch, skip)
            t_prev = time.perf_counter()
            for batch in loader:
                t_data = time.perf_counter()
                loss, terms = self.step(batch, it, autocast)
                lr = self.optimizer.param_groups[0]["lr"]
                self.scheduler.step()
                it += 1

                window["loss"] += loss.item()
                for k, v in terms.items():
                    window[k] += v.item()
                win_iters += 1
                t_now = time.perf_counter()
                win_time += t_now - t_prev
                win_data += t_data - t_prev

                if it % cfg.log_every == 0 or it == cfg.iterations:
                    self.log(it, window, ("loss", *terms), lr, win_iters, win_time, win_data)
                    window.clear()
                    win_iters, win_time, win_data = 0, 0.0, 0.0

                if cfg.val_every and it % cfg.val_every == 0 and it < cfg.iterations:
                    self.validate(it)
                    self.forward.train()
                if it % cfg.ckpt_every == 0 and it < cfg.iterations:
                    self.save_last(it)
                t_prev = time.perf_counter()
                if it >= cfg.iterations or self.out_of_time(it):
                    break
            if self.stopped_early:
                break
            epoch, skip = epoch + 1, 0

        if self.validator.last_iter != it:
            self.validate(it)
        self.save_last(it)
        if self.main:
            self._export_final(it)
        if self.info.distributed:
            dist.barrier()
        return self.final_path

    def _export_final(self, it: int) -> None:
        """Write ``model_final.pth``: float16 weights, the validation scales, the record."""
        cfg, total = self.cfg, self.wall()
        training = {
            "recipe": "CRM (Shen et al., CVPR 2022) section 3 loss and schedule",
            "data": list(cfg.data),
            "datasets": describe_datasets(self.batches.datasets),
            "train_samples": len(self.batches),
            "val_samples": len(self.val_samples),
            "iterations": it,
            "batch_size": cfg.batch_size,
            "crop_size": cfg.crop_size,
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "milestones": list(cfg.lr_milestones),
            "gamma": cfg.gamma,
            "loss_weights": dict(cfg.loss_weights),
            "amp": self.amp,
            "seed": cfg.seed,
            "init": self.init_report,
            "wall_time_s": total,
            "hardware": hardware(self.device, self.info.world_size),
            "val": self.validator.last,
            "best": self.validator.best,
        }
        save_crm(
            self.net,
            self.final_path,
            half=True,
            drop_layer4=True,
            scales=cfg.val_scales,
            training=plain(training),
        )
        self.metrics.write(
            {
                "event": "end",
                "iter": it,
                "path": self.final_path,
                "wall_s": total,
                "time": time.time(),
            }
        )
        logger.info(
            "training done: %d iterations in %s; final weights %s",
            it,
            fmt_time(total),
            self.final_path,
        )
