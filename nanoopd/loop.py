"""
The training-loop scaffolding that SFT (sft.py), OPD (opd.py) and RLVR (rlvr.py) share, so that each
of them reads as its own algorithm:

    optimizer     AdamW, betas (0.9, 0.98), no weight decay
    schedule      lr(step) = linear warm-up over `warmup` steps, then cosine decay to 10 % of the peak
    update        g = grad loss;  theta <- AdamW(theta, g / max(1, ||g|| / clip)); a non-finite ||g||
                  stops the run before the optimizer touches the weights
    resume        a checkpoint (checkpoint.py's format) that also holds the optimizer state and,
                  for OPD and RLVR, every rank's RNG states, the run's records and settings
                  (extra["resume"], extra[<kind>]): a resumed run ends where an uninterrupted one ends
    JSONL         one JSON object per step, written by rank 0 only
"""

import json
import math
import os
from dataclasses import asdict

import torch

from nanoopd import distributed
from nanoopd.checkpoint import CheckpointError, load_weights, read_checkpoint, save_checkpoint
from nanoopd.device import rng_restore, rng_snapshot


def adamw(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimizer of every training loop here."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of lr. Without the warm-up, Adam's first sign-like
    steps move every weight by the full lr and can undo a model that SFT has just trained."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def loss_scale(loss: torch.Tensor, n_tokens: float, what: str) -> float:
    """The factor by which this rank scales its per-token loss before backward (1.0 in one process;
    distributed.global_token_scale). A non-finite loss on any rank raises FloatingPointError on
    every rank (its message starts with `what`) before anything is differentiated."""
    scale = distributed.global_token_scale(loss, n_tokens)
    if scale is None:
        value = "on some rank" if distributed.active() else f"({loss.item()})"
        raise FloatingPointError(f"{what}: non-finite loss {value}; weights left as they were before this step: "
                                 f"lower the learning rate")
    return scale


def update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float,
           what: str) -> float:
    """One optimizer step on `loss`: backward, clip the total gradient norm to grad_clip, step.
    Returns the norm before clipping. A non-finite norm raises FloatingPointError (its message
    starts with `what`, e.g. 'OPD step 7') with the weights left as they were."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"{what}: non-finite gradient norm ({norm}); weights left as they were before "
                                 f"this step: lower the learning rate")
    optimizer.step()
    return norm


class JsonlLog:
    """<path>: one JSON object per line, flushed at every step, written on rank 0 only (a no-op on
    the other ranks and without a path). `kept` records, those of a resumed run's first steps,
    are written again first, so the file always holds the run from step 0."""

    def __init__(self, path: str | None, kept: list[dict] = ()):
        if path and distributed.is_main():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # the run may be the first in its folder
        self.file = open(path, "w") if path and distributed.is_main() else None
        for record in kept:
            self.write(record)

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file:
            self.file.close()


# -----------------------------------------------------------------------------
# resume


def restore_training_state(path: str, model, optimizer) -> dict:
    """Load weights and optimizer state from a checkpoint into model/optimizer (in place) and
    return its payload (step, extra). The checkpoint's model config must equal the model's, and it
    must hold an optimizer state (else a CheckpointError says so)."""
    payload = read_checkpoint(path)
    raw = distributed.bare(model)
    if payload["config"] != asdict(raw.config):
        raise CheckpointError(f"cannot resume from '{path}': it holds a model with config {payload['config']}, "
                              f"this run builds {asdict(raw.config)}; use the same flags or another --out_dir")
    if "optimizer" not in payload:
        raise CheckpointError(f"cannot resume from '{path}': it holds no optimizer state (a final export?)")
    load_weights(raw, payload, path)
    try:
        optimizer.load_state_dict(payload["optimizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot resume from '{path}': its optimizer state does not fit this run ({e}); "
                              f"the file is damaged or was edited: start again without --resume") from e
    return payload


def can_resume(resume: bool, path: str | None) -> bool:
    """True when --resume is asked and a checkpoint exists at `path`. Decided on rank 0, which
    writes the checkpoints, and handed to every rank, so that all ranks take the same branch."""
    return bool(resume and path) and distributed.from_main(lambda: os.path.exists(path))


def save_run_state(path: str, model, step: int, optimizer, generator: torch.Generator, extra: dict,
                   state: dict) -> None:
    """Checkpoint a resumable run: weights, optimizer, step, `extra` (the run's settings), and in
    extra["resume"] the dict `state` plus every rank's RNG states. Under torchrun every rank must
    call it (the RNG states are gathered); rank 0 writes."""
    rngs = distributed.gather_objects(rng_snapshot(generator))
    if distributed.is_main():
        save_checkpoint(path, model, step, optimizer=optimizer, extra={**extra, "resume": {**state, "rng": rngs}})


def resume_run_state(path: str, model, optimizer, generator: torch.Generator, kind: str,
                     settings: dict) -> tuple[int, dict]:
    """Undo save_run_state: weights and optimizer state into model/optimizer, this rank's RNG states
    into `generator` and torch; returns (step, the saved state). The checkpoint must hold a `kind`
    run ('opd', 'rlvr') with these settings, written by as many processes as this run has."""
    payload = restore_training_state(path, model, optimizer)
    extra = payload.get("extra", {})
    state = extra.get("resume")
    if state is None or kind not in extra:
        raise CheckpointError(f"cannot resume from '{path}': it holds no {kind} run state (another kind of "
                              f"checkpoint, or one from an older version); start again without --resume")
    if extra[kind] != settings:
        diff = ", ".join(f"{k}: {extra[kind].get(k)!r} -> {v!r}" for k, v in settings.items() if extra[kind].get(k) != v)
        raise CheckpointError(f"cannot resume from '{path}': it was written by a run with other {kind} settings "
                              f"({diff}); use the same flags, or another output name for a new run")
    rank, world = distributed.rank_and_world()
    if len(state["rng"]) != world:
        raise CheckpointError(f"cannot resume from '{path}': it was written by {len(state['rng'])} process(es), "
                              f"this run has {world}; resume with the same number of processes")
    try:
        rng_restore(state["rng"][rank], generator)
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot resume from '{path}': its random-generator states do not fit this run's "
                              f"device ({e}); resume on the kind of device (cpu, cuda, mps) it was written on") from e
    return int(payload["step"]), state
