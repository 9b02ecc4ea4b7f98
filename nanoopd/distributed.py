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

When one rank fails, all stop, and every rank says which one failed and why (stop_all, called by
script.cli): the failing rank writes its error into the process group's key-value store before it
exits; a rank whose collective then breaks (gloo: the peer is gone; NCCL: the group's timeout,
--dist_timeout), or that torchrun terminates, reads it there. A rank that hangs without failing
is caught by the same timeout: no collective waits longer than it.
"""

import datetime
import gc
import os
import sys
import traceback
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


DEFAULT_TIMEOUT_S = 300  # how long a collective waits for the other ranks (train_math.py --dist_timeout)
FAILED_KEY = "nanoopd/failed"  # the store key under which the first failing rank leaves its error
_timeout_s = DEFAULT_TIMEOUT_S  # this run's, set by setup()


def setup(device_name: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[DistInfo, torch.device]:
    """Join the process group if launched by torchrun; return (info, this rank's device). Every
    collective of the group gives up after timeout_s seconds (then stop_all ends every rank)."""
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
        global _timeout_s
        _timeout_s = timeout_s
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=info.rank,
                                world_size=info.world_size, timeout=datetime.timedelta(seconds=timeout_s))
    return info, device


def stop_all(error: BaseException, expected: bool) -> None:
    """End this rank after `error`, in a run under torchrun, so that no rank is left waiting: say
    which rank failed first and why, then exit with code 1 at once (os._exit: a process group torn
    down by a broken collective can hang a normal exit). The first rank to fail records
    'rank r: error' in the group's store; the others, whose collectives break when it exits (or
    time out), or whom torchrun terminates, read it there and name it. An unexpected error (a bug,
    not a bad input or a diverged run: expected=False) also prints its traceback on the rank that
    raised it."""
    rank = int(os.environ.get("RANK", 0))
    mine = f"rank {rank}: {type(error).__name__}: {error}".strip()
    if "timed out" in str(error).lower():  # a collective waited the group's whole timeout
        mine = (f"rank {rank}: the other processes did not answer within --dist_timeout {_timeout_s:g} s: one of them "
                f"hung or died without a word ({error})")
        expected = True
    first = mine
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=5))
        first = store.compare_set(FAILED_KEY, "", mine).decode()  # the stored value: ours, or an earlier rank's
    except Exception:  # noqa: BLE001 - no group or no store left (the rank that hosted it is gone)
        pass
    if first == mine:
        if not expected:
            traceback.print_exception(error, file=sys.stderr)
        print(f"error: {mine}\nevery process of this run stops", file=sys.stderr)
    else:
        print(f"error: {first}\n(rank {rank} stopped with it)", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def is_main() -> bool:
    """True on rank 0, and in a plain single process."""
    return not active() or dist.get_rank() == 0


def cleanup() -> None:
    """Leave the process group. The DDP wrappers of the finished loops (whose gloo work holds
    tensors) are collected first and every rank waits for the others, so that no rank tears the
    group down while another still uses it: gloo can abort a process that exits otherwise."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) when not distributed."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def rank_seed(seed: int) -> int:
    """The seed of this rank's own sampler: seed itself on rank 0 (and in one process), so that
    ranks draw different samples and one process draws what it always did."""
    return seed + 1_000_003 * rank_and_world()[0]


def shard(items: list, rank: int | None = None, world_size: int | None = None) -> list:
    """This rank's share of a global batch: items rank, rank + N, rank + 2N, ..."""
    if rank is None:
        rank, world_size = rank_and_world()
    return items[rank::world_size]


def check_shardable(n: int, world: int, what: str = "a batch", unit: str = "examples",
                    flag: str = "--batch_size") -> None:
    """Every one of `world` ranks needs at least one of the n items of a global batch: a rank with
    an empty share would fail on its own and leave the others waiting in the next all-reduce."""
    if n < world:
        raise ValueError(f"{what} of {n} {unit} cannot be shared by {world} processes: raise {flag} to at least "
                         f"{world} or lower --nproc_per_node")


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over ranks (x itself when not distributed)."""
    if active():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _comm_device() -> torch.device:
    """Where small tensors must live for a collective: the GPU under NCCL, else the CPU.

    The collectives below use float64 on purpose (token counts and weighted sums stay exact past
    2^24): these tensors live on the CPU (gloo) or a CUDA GPU (NCCL), which both have float64; MPS,
    which has none, never holds them (torch has no MPS backend for collectives)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True if `flag` is True on any rank: every rank takes the same branch (a rank that raised
    alone would leave the others waiting in the next all-reduce)."""
    if not active():
        return flag
    t = torch.tensor(float(flag), device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def global_token_scale(loss: torch.Tensor, n_local: float) -> float | None:
    """The factor by which rank r scales its per-token loss before backward, world * n_r / n
    (n_r: its loss tokens, n: those of all ranks), so that DDP's gradient average is the gradient
    of the per-token loss over the whole global batch:

        (1/world) sum_r grad(loss_r * world * n_r / n) = grad( sum_{all tokens} l / n )

    Exactly 1.0 in one process. None, on every rank, if the loss is not finite on any rank (so
    that all ranks stop together; one collective for both)."""
    finite = bool(torch.isfinite(loss))
    if not active():
        return 1.0 if finite else None
    t = torch.tensor([float(not finite), float(n_local)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    bad, n = t.tolist()
    return None if bad > 0 else dist.get_world_size() * float(n_local) / max(n, 1.0)


def reduce_record(record: dict, weights: dict | None = None, sum_keys=(), max_keys=()) -> dict:
    """A per-rank record of numbers -> the record of the whole global batch: for every key but
    'step' the mean over ranks weighted by weights[key] (the rows or tokens behind this rank's
    value; 1 when not given), the sum for sum_keys, the max for max_keys. Every value becomes a
    float. The record itself when not distributed."""
    if not active():
        return record
    keys = sorted(k for k in record if k != "step")  # the same order on every rank
    w = [1.0 if k in sum_keys else float((weights or {}).get(k, 1.0)) for k in keys]
    v = [float(record[k]) for k in keys]
    x = torch.tensor([a * b for a, b in zip(v, w)] + w, dtype=torch.float64, device=_comm_device())  # (2n,)
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    totals = x.tolist()
    out = dict(record)
    for i, k in enumerate(keys):
        out[k] = totals[i] if k in sum_keys else totals[i] / max(totals[len(keys) + i], 1e-12)
    tops = [k for k in keys if k in max_keys]
    if tops:
        m = torch.tensor([v[keys.index(k)] for k in tops], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        out.update(zip(tops, m.tolist()))
    return out


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] when not distributed)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_main(fn):
    """fn() computed on rank 0 only (an evaluation, say), its value handed to every rank."""
    return gather_objects(fn() if is_main() else None)[0]


def wrap(model: torch.nn.Module, device: torch.device, compile: bool = False) -> torch.nn.Module:
    """The module a training forward pass goes through: DDP(model) when distributed (gradients
    are averaged over ranks in backward), then torch.compile'd when compile=True (--compile: worth
    it on GPUs for long runs; on a CPU the first steps take tens of seconds to compile and small
    models gain nothing), the model itself otherwise. Sampling stays eager (its shapes change at
    every token), and sampling and checkpoints use bare(wrapped)."""
    if active():
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if compile else model


def bare(model: torch.nn.Module) -> torch.nn.Module:
    """The GPT inside any DDP and torch.compile wrappers (the model itself if there are none)."""
    while "_orig_mod" in model._modules or "module" in model._modules:
        model = model._modules.get("_orig_mod") or model._modules["module"]
    return model


def barrier() -> None:
    if active():
        dist.barrier()
