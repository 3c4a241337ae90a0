"""Process group set-up for ``torchrun`` (gloo on CPU, nccl on GPU) and small collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> Distributed:
    """Read torchrun's environment; start the process group when WORLD_SIZE > 1 (once: a later call
    finds it started and uses it).

    Each process uses GPU ``LOCAL_RANK`` when CUDA is available (backend nccl),
    else the CPU (backend gloo). A single process needs no process group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank, device)


def shutdown(finished: bool = True) -> None:
    """End the process group, if one was started (once, after the last stage of the process).

    ``finished``: the process ran to its end, as every other one does; all then meet at a barrier before
    any closes its connections (a gloo process whose peer hangs up inside a collective aborts).  After an
    error there is no barrier: the others may never reach it.
    """
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, state: Distributed) -> torch.Tensor:
    """Sum of ``values`` over processes (identity for one process)."""
    if not state.enabled:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values


def barrier(state: Distributed) -> None:
    if state.enabled:
        dist.barrier()


def broadcast_flag(flag: bool, state: Distributed) -> bool:
    """True on every process when ``flag`` is true on any one."""
    if not state.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=state.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)
