"""Process-group set-up for DistributedDataParallel under ``torchrun`` (one process per device).

Launched by ``torchrun`` (env ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``): NCCL with one GPU per
process on CUDA, gloo on CPU. Launched plainly: one process, no process group.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from model.device import choose_device


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, logs and TensorBoard events."""
        return self.rank == 0


def _device_for(requested: str, local_rank: int) -> torch.device:
    device = choose_device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


@contextlib.contextmanager
def distributed_context(requested_device: str = "auto") -> Iterator[DistContext]:
    """Join the process group when launched by torchrun; leave it on exit."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        yield DistContext(0, 1, 0, choose_device(requested_device))
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = _device_for(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield DistContext(rank, world_size, local_rank, device)
    finally:
        dist.destroy_process_group()


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when ``flag`` is true on any rank (so all ranks stop at the same step)."""
    if not ctx.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def gather_to_main(obj: Any, ctx: DistContext) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere); a plain list of one when alone."""
    if not ctx.distributed:
        return [obj]
    gathered: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def mean_over_ranks(value: torch.Tensor, ctx: DistContext) -> float:
    """The mean of a scalar over all ranks (the loss every rank logs and checks)."""
    if not ctx.distributed:
        return float(value)
    total = value.detach().reshape(1).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total) / ctx.world_size
