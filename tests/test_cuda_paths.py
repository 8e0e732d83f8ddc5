"""The CUDA / NCCL branches of DDP training, exercised without a GPU (this machine has none).

What can run on CPU does: SyncBatchNorm conversion for CUDA devices, NCCL chosen when CUDA is
available, one device per LOCAL_RANK. Process-group start-up and CUDA calls are replaced by
recorders, so these tests check the decisions, not NCCL itself.
"""

from __future__ import annotations

import torch
from torch import nn

from covidcxr.training import distributed
from covidcxr.training.distributed import DistributedContext, join_process_group, sync_batchnorm


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def test_cuda_ddp_job_synchronises_batchnorm_and_cpu_does_not():
    ctx = DistributedContext(rank=1, world_size=2, local_rank=1, backend="nccl")
    converted = sync_batchnorm(_net(), ctx, torch.device("cuda", 1))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    kept = sync_batchnorm(_net(), ctx, torch.device("cpu"))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in kept.modules())
    single = sync_batchnorm(_net(), DistributedContext(), torch.device("cuda"))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in single.modules())


def test_torchrun_environment_with_cuda_picks_nccl_and_the_local_device(monkeypatch):
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv(distributed.BACKEND_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("device", i))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.setdefault("backend", backend))
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: calls["backend"])
    ctx = join_process_group()
    assert calls == {"backend": "nccl", "device": 1}
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend, ctx.is_main) == (1, 2, 1, "nccl", False)
    assert ctx.device(torch.device("cuda")) == torch.device("cuda", 1)
    assert ctx.device(torch.device("cpu")) == torch.device("cpu")


def test_plain_run_without_torchrun_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = join_process_group()
    assert not ctx.enabled and ctx.is_main
    model = _net()
    assert ctx.wrap(model, torch.device("cpu")) is model
    assert ctx.combine_epoch({"train_loss": 1.0}) == {"train_loss": 1.0}
