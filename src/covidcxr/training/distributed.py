"""Data-parallel training (DDP) under ``torchrun``: one process per device, rank 0 writes the run.

``torchrun --nproc-per-node=N -m covidcxr train CONFIG --out RUN`` starts N copies of the ordinary
``covidcxr train``; torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``)
is what makes :func:`join_process_group` turn the run into a DDP job (see docs/training.md):

* **Batches.** The configured sampler (:mod:`covidcxr.training.sampling`) still draws the *global*
  batch from ``(seed, epoch)``; :class:`ShardedBatchSampler` hands rank ``r`` the items
  ``r, r + N, ...`` of it. The union of the shards is exactly the single-process batch, with the
  same per-item augmentation seeds, so ``train.batch_size`` keeps meaning the global batch and a
  resumed job draws the batches the uninterrupted one would. (torch's ``DistributedSampler`` is not
  used because it shuffles the whole dataset itself and would replace source-balanced batches;
  ``set_epoch`` works the same way.)
* **Gradients.** ``DistributedDataParallel`` averages the ranks' gradients: the gradient of the
  global batch's mean loss (class-weighted losses are averaged per shard, a small difference).
  BatchNorm is synchronised (``SyncBatchNorm``) on CUDA; on CPU torch has no SyncBatchNorm, so
  each rank normalises over its own shard.
* **Files.** Only rank 0 validates, selects checkpoints and writes anything in the run directory;
  it broadcasts each epoch's record so every rank takes the same early-stopping decision. At the
  end the ranks compare a checksum of their weights (``run.json`` ``info.distributed``).

Backends: ``nccl`` when CUDA is available, else ``gloo`` (``COVIDCXR_DIST_BACKEND`` overrides).
Not supported in a DDP job (a clear ConfigError): k-fold ensembles, group DRO (its group weights
are per-process state) and the source adversary (its own optimiser outside DDP).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from covidcxr.errors import ConfigError

BACKEND_ENV = "COVIDCXR_DIST_BACKEND"


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a DDP job; the default (world size 1) is a plain run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False  # this process initialised the process group (and destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """One CUDA device per process (``LOCAL_RANK``); CPU stays CPU."""
        if not self.enabled or device.type != "cuda":
            return device
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module to train: ``model`` itself, or a DDP wrapper around it (weights shared)."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def combine_epoch(self, stats: dict) -> dict:
        """Epoch statistics over all ranks: loss averaged over every image, images summed, the slowest rank's time."""
        if not self.enabled:
            return stats
        import torch.distributed as dist

        every: list = [None] * self.world_size
        dist.all_gather_object(every, stats)
        images = sum(s["train_images"] for s in every)
        seconds = max(s["train_seconds"] for s in every)
        return {"train_loss": sum(s["train_loss"] * s["train_images"] for s in every) / max(1, images),
                "train_images": images, "train_seconds": seconds,
                "images_per_s": images / seconds if seconds > 0 else float("nan"),
                "processes": self.world_size}

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def summary(self, model: nn.Module) -> dict | None:
        """For the run record: the job's shape and whether every rank ended with the same weights."""
        if not self.enabled:
            return None
        import torch.distributed as dist

        with torch.no_grad():
            checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
        every: list = [None] * self.world_size
        dist.all_gather_object(every, checksum)
        return {"world_size": self.world_size, "backend": self.backend, "launcher": "torchrun",
                "ranks_in_sync": max(every) - min(every) <= 1e-6 * max(1.0, abs(every[0]))}

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def torchrun_world_size() -> int:
    """How many processes the torchrun job this process belongs to has (1: not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def join_process_group() -> DistributedContext:
    """The context of this process: joins the torchrun job its environment describes (else a plain run)."""
    world = torchrun_world_size()
    if world <= 1:
        return DistributedContext()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if owns:
        backend = os.environ.get(BACKEND_ENV) or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return DistributedContext(rank=rank, world_size=world, local_rank=local_rank, backend=dist.get_backend(),
                              owns_group=owns)


def check_distributed_config(config, ctx: DistributedContext) -> None:
    """Refuse what a DDP job cannot do the same way as one process (see module docstring)."""
    if not ctx.enabled:
        return
    t = config.train
    problems = []
    if t.batch_size % ctx.world_size:
        problems.append(f"train.batch_size={t.batch_size} (the global batch) must be divisible by the "
                        f"{ctx.world_size} processes")
    if t.objective == "group_dro":
        problems.append("train.objective=group_dro keeps group weights per process")
    if t.source_adversarial_weight > 0:
        problems.append("train.source_adversarial_weight > 0 trains an adversary outside DDP")
    if config.ensemble.folds:
        problems.append("k-fold ensembles (ensemble.folds / --folds): train the members one job each")
    if problems:
        raise ConfigError("a torchrun (DDP) job cannot use: " + "; ".join(problems))


def sync_batchnorm(model: nn.Module, ctx: DistributedContext, device: torch.device) -> nn.Module:
    """BatchNorm statistics over the global batch where torch can (CUDA); unchanged elsewhere."""
    if ctx.enabled and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


class ShardedBatchSampler:
    """Rank ``rank``'s share (items ``rank::world_size``) of every global batch of ``sampler``."""

    def __init__(self, sampler, rank: int, world_size: int):
        if sampler.batch_size % world_size:
            raise ConfigError(f"train.batch_size={sampler.batch_size} must be divisible by the {world_size} processes")
        self.sampler, self.rank, self.world_size = sampler, int(rank), int(world_size)
        self.batch_size = sampler.batch_size // world_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.sampler:
            yield batch[self.rank :: self.world_size]


def shard_sampler(sampler, ctx: DistributedContext):
    """``sampler`` itself in a plain run, its rank's shard in a DDP job."""
    return ShardedBatchSampler(sampler, ctx.rank, ctx.world_size) if ctx.enabled else sampler
