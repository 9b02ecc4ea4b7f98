"""
Data parallelism with PyTorch's own DDP, launched by torchrun:

    torchrun --nproc_per_node=N train_math.py ...

Each of the N processes (ranks) holds a full copy of the model and takes its own 1/N share of every
global batch. During backward, DDP all-reduces (averages) the gradients, so every rank applies the
same update and the weights stay identical. Losses are normalised by the *global* number of loss
tokens, so N ranks compute exactly the gradient one process would on the whole batch:

    grad = (1/N) sum_r grad( N * sum_{tokens of r} l / n_global ) = grad( sum_{all tokens} l / n_global )

Logging, evaluation and checkpoints happen on rank 0 only. Without torchrun (no RANK in the
environment) nothing here does anything and the code runs as one plain process. Backend: NCCL on
CUDA, gloo on the CPU (which is how the tests run it, with two processes).
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanoopd.device import pick_device


@dataclass
class DistInfo:
    rank: int = 0        # this process's index among all processes
    world_size: int = 1  # number of processes
    local_rank: int = 0  # index on this machine (picks the GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group if launched by torchrun; return (info, this rank's device)."""
    device = pick_device(device_name)
    if "RANK" not in os.environ:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {info.local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                             f"lower --nproc_per_node")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                rank=info.rank, world_size=info.world_size)
    return info, device


def is_main() -> bool:
    """True on rank 0, and in a plain single process."""
    return not active() or dist.get_rank() == 0


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: list, rank: int | None = None, world_size: int | None = None) -> list:
    """This rank's share of a global batch: items rank, rank + N, rank + 2N, ..."""
    if rank is None:
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)
    return items[rank::world_size]


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over ranks (x itself when not distributed)."""
    if active():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP(model) when distributed, else the model unchanged."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def barrier() -> None:
    if active():
        dist.barrier()
