"""
Supervised fine-tuning (SFT) on step-by-step traces: next-token cross-entropy on response tokens.

    L(theta) = - (1 / #response tokens) * sum_{t in response} log pi(y_t | c_t)

Prompt tokens and padding are context only (target -1, ignored). Sequences are right-padded, so
the plain causal fast path of the model applies: padding sits after every real token and is never
seen by them. Under torchrun each rank trains on its share of every global batch and the loss is
normalised by the global token count (nanoopd/distributed.py), so N ranks take the same steps as
one process would on the whole batch.
"""

import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanoopd import distributed
from nanoopd.distributed import check_shardable
from nanoopd.checkpoint import save_checkpoint
from nanoopd.device import autocast, synchronize
from nanoopd.flops import FlopCount, sft_flops
from nanoopd.loop import adamw, can_resume, lr_at, restore_training_state, set_lr, update


def make_batch(examples: list[tuple[list[int], list[int]]], pad_id: int, device):
    """Right-padded inputs x (B, L) and targets y (B, L) with -1 on prompt and padding."""
    # lab:rlvr begin
    L = max(len(p) + len(r) for p, r in examples) - 1
    x = torch.full((len(examples), L), pad_id, dtype=torch.long)
    y = torch.full((len(examples), L), -1, dtype=torch.long)
    for i, (p, r) in enumerate(examples):
        seq = torch.tensor(p + r, dtype=torch.long)
        x[i, :len(seq) - 1] = seq[:-1]
        y[i, len(p) - 1:len(seq) - 1] = seq[len(p):]
    return x.to(device), y.to(device)
    # lab:rlvr end


def sft_loss(model, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over target positions (y != -1), in float32: their mean, or with
    reduction='sum' their sum."""
    with autocast(x.device):
        logits = model(x)  # (B, L, V)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction=reduction)


def train_sft(model, next_examples, steps: int, lr: float, pad_id: int, warmup: int = 50, log_every: int = 50,
              desc: str = "sft", log=print, grad_clip: float = 1.0, ckpt_path: str | None = None,
              save_every: int = 0, resume: bool = False, extra: dict | None = None, compile: bool = False,
              count: FlopCount | None = None):
    """Run `steps` AdamW steps on batches from next_examples(step) -> list of (prompt, response).

    next_examples must be a pure function of the step index, so that a resumed run sees exactly the
    batches an uninterrupted one would. With ckpt_path, a checkpoint (weights, optimizer, step) is
    written atomically every save_every steps and at the end; with resume=True and a checkpoint
    there, training continues from its step. Under torchrun every rank calls this with the same
    next_examples; each trains on its shard of the global batch. Returns the per-step (global)
    losses of the steps run here. A non-finite loss stops with an error naming the step; the last
    checkpoint written stays the good one. compile=True runs the training forward passes through
    torch.compile. count: a FlopCount that the matmul FLOPs of every step are added to (all
    `steps`, those of a resumed run's earlier steps included; nanoopd/flops.py); the log lines
    show the running total.
    """
    device = next(model.parameters()).device
    opt = adamw(model, lr)
    start = 0
    if can_resume(resume, ckpt_path):
        start = int(restore_training_state(ckpt_path, model, opt)["step"])
        log(f"{desc}: resuming from '{ckpt_path}' at step {start}/{steps}")
    counting = count is not None or bool(log_every)  # the FLOPs are read by the caller or the log lines only
    count = FlopCount() if count is None else count
    for step in range(start if counting else 0):  # the steps an earlier process ran (pure functions of the step)
        count.add(sft_flops(model.config, next_examples(step)))
    ddp_model = distributed.wrap(model, device, compile)  # the model itself unless distributed or compiled
    world = distributed.rank_and_world()[1]
    is_main = distributed.is_main()  # logs, progress and checkpoints on rank 0 only
    model.train()
    losses, t0, ntok = [], time.time(), 0
    bar = tqdm(range(start, steps), desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0,
               disable=None if is_main else True)  # off when not a terminal, and off on ranks > 0
    for step in bar:
        set_lr(opt, lr_at(step, steps, lr, warmup))
        examples = next_examples(step)
        if counting:
            count.add(sft_flops(model.config, examples))  # the global batch's
        check_shardable(len(examples), world, f"{desc}: a batch")  # on every rank alike, before any collective
        x, y = make_batch(distributed.shard(examples), pad_id, device)
        n_global = distributed.all_reduce_sum((y != -1).sum().float())  # loss tokens on all ranks
        loss_sum = sft_loss(ddp_model, x, y, reduction="sum")
        loss = loss_sum * world / n_global.clamp(min=1)  # DDP's gradient average undoes the * world
        global_loss = distributed.all_reduce_sum(loss_sum.detach()) / n_global.clamp(min=1)
        if not torch.isfinite(global_loss):
            raise FloatingPointError(f"{desc}: non-finite loss at step {step}; lower the learning rate "
                                     f"(the last checkpoint written, if any, is intact)")
        update(model, opt, loss, grad_clip, f"{desc} step {step}")
        losses.append(global_loss.item())
        ntok += int((y != -1).sum()) + int((x != pad_id).sum())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if log_every and (step % log_every == 0 or step == steps - 1) and is_main:
            synchronize(device)
            log(f"{desc} step {step:5d} | loss {losses[-1]:.4f} | lr {opt.param_groups[0]['lr']:.2e} | "
                f"tok/s {ntok / (time.time() - t0):,.0f} | {count.charged / 1e12:.3f} TFLOP")
        if ckpt_path and is_main and (step + 1 == steps or (save_every and (step + 1) % save_every == 0)):
            save_checkpoint(ckpt_path, model, step + 1, optimizer=opt, extra=extra)
    return losses
