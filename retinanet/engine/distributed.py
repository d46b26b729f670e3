"""torch.distributed plumbing for `torchrun`: process-group set-up, the model's DDP wrapper and
the few collectives the trainer and evaluator need. A plain `python tools/train.py` is world
size 1 and every helper here is then a no-op.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import ConfigError
from .elastic import attempt_store


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> DistInfo:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    in the environment): NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK), gloo on CPU. The
    timeout bounds every collective, so a rank that died or hangs ends the job with an error
    instead of blocking the others forever."""
    if not launched_by_torchrun():
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            # NCCL needs a GPU of its own per rank; cuda:N past the last GPU would fail in
            # set_device with "invalid device ordinal", which names neither cause nor remedy
            raise ConfigError(
                f"torchrun started local rank {local_rank} on a node with "
                f"{torch.cuda.device_count()} visible CUDA device(s); CUDA training runs one "
                "process per GPU: lower --nproc_per_node (NPROC= for make train-ddp) to the "
                "number of GPUs, or train on CPU processes with train.device=cpu (gloo)")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        store = attempt_store()  # this attempt's own keys in torchrun's job store (see elastic.py)
        rendezvous = {} if store is None else {"store": store, "rank": int(os.environ["RANK"]),
                                               "world_size": int(os.environ["WORLD_SIZE"])}
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s), **rendezvous)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def process_device(device: torch.device, info: DistInfo) -> torch.device:
    """This process's own GPU (cuda:LOCAL_RANK) in a distributed CUDA job, else `device`."""
    return torch.device("cuda", info.local_rank) if device.type == "cuda" and info.world_size > 1 else device


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm statistics over every rank's batch (train.sync_bn); the model as is in one process."""
    if not is_distributed():
        return model
    if device.type != "cuda":
        raise ConfigError("train.sync_bn needs CUDA (SyncBatchNorm has no CPU kernel): set "
                          "train.sync_bn=false for CPU processes")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """What the training step runs: DistributedDataParallel (gradients averaged over ranks) around
    `model`, or `model` itself in one process."""
    if not is_distributed():
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_mean(value: Tensor) -> Tensor:
    """Mean of `value` over ranks (a new tensor; differentiable inputs are detached)."""
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def all_reduce_max(value: Tensor) -> Tensor:
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj` (picklable) on rank 0, in rank order; None on the other ranks."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank. DDP broadcasts them at the start of
    each forward, but each rank's training forward then updates its own copy from its own batch:
    before evaluating or saving, every rank must hold what rank 0 saves."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
