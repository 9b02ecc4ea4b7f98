"""
The training-loop scaffolding that SFT (sft.py), OPD (opd.py) and RLVR (rlvr.py) share, so that each
of them reads as its own algorithm:

    optimizer     AdamW, betas (0.9, 0.98), no weight decay
    schedule      lr(step) = linear warm-up over `warmup` steps, then cosine decay to 10 % of the peak
    update        g = grad loss;  theta <- AdamW(theta, g / max(1, ||g|| / clip)); a non-finite ||g||
                  stops the run before the optimizer touches the weights
    JSONL         one JSON object per step, written by rank 0 only

Checkpoints and resume live in checkpoint.py (save_checkpoint, save_run_state, resume_run_state).
"""

import json
import math

import torch

from nanoopd import distributed


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
