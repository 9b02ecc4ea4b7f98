"""
RLVR: REINFORCE with group-normalised advantages (GRPO-style) and a verifiable reward.

For every context c_i (a prompt x_i, or a prompt plus a cut student prefix) the policy pi_theta
samples a group of G responses y_i1..y_iG; the task verifier gives rewards R_ij in {0, 1}.

    A_ij = (R_ij - mean_j R_ij) / (std_j R_ij + eps)        (population std over the group)
    L(theta) = - (1 / sum_ij |y_ij|) * sum_ij sum_t A_ij * log pi_theta(y_ij,t | c_i, y_ij,<t)

so grad L is the REINFORCE estimator of -grad E[R] with the group mean as a baseline, averaged
per response token. A group whose rewards are all equal carries no signal: its advantages are
exactly 0 (numerator 0, denominator eps > 0), never NaN; a step in which every group is like
that is skipped. Used here to adapt a teacher on the student's kind of prefixes
(docs/design.md#rlvr-group-normalised-reinforce): with `cut` > 0 the contexts are the student's own
sampled responses cut at a random fraction (uniform in [0, cut]) of their length, and the reward
judges the cut prefix plus the continuation.
"""

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from nanoopd import distributed
from nanoopd.config import ConfigError
from nanoopd.device import autocast
from nanoopd.evaluate import evaluate, student_prefixes
from nanoopd.flops import check_budget, pass_flops
from nanoopd.loop import (JsonlLog, adamw, can_resume, loss_scale, lr_at, resume_run_state, save_run_state,
                          set_lr, update)
from nanoopd.model import GPT
from nanoopd.rollout import check_sampling_args, generate, response_logits
from nanoopd.tasks import Problem, encode_example, sample_problems, verify
from nanoopd.tokenizer import Tokenizer


@dataclass
class RLVRConfig:
    # --- the RLVR teacher (stage rlvr)
    rlvr_steps: int = 60             # RLVR optimizer steps
    rlvr_prompts: int = 16           # RLVR problems (contexts) per step
    rlvr_group: int = 8              # RLVR samples per problem, G >= 2 (advantages normalised within each group)
    rlvr_lr: float = 1e-4            # RLVR AdamW peak learning rate
    rlvr_warmup: int = 10            # RLVR linear warm-up steps, then cosine decay to 10 % of rlvr_lr
    rlvr_eps: float = 1e-6           # RLVR advantage denominator: std of the group + eps
    rlvr_flops: float = 0.0          # stop RLVR at the first step whose running FLOPs reach this (0 = off: rlvr_steps steps)
    rlvr_eval_every: int = 0         # held-out greedy accuracy every N RLVR steps and at the end, given held-out problems (0 = never)
    rlvr_cut: float = 0.0            # RLVR contexts: 0 = prompts; c in (0, 1) = student samples cut at a fraction drawn from U[0, c]
    temperature: float = 1.0         # sampling temperature of the group (> 0)
    max_new_tokens: int = 64         # response budget per sample
    grad_clip: float = 1.0           # clip the total gradient norm to this
    seed: int = 0                    # seeds the problems and the samplers
    digits: int = 3                  # training problems: operands of 1..digits digits
    ops: str = "+-"                  # training problems: operators

    def __post_init__(self):
        """Each message starts with the field's name, so that a command line can name its flag."""
        check_sampling_args(self.temperature, 0, 1.0, self.max_new_tokens)
        if self.temperature == 0:
            raise ConfigError("temperature", "must be > 0: RLVR samples a group per prompt")
        for name in ("rlvr_steps", "rlvr_prompts"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("rlvr_warmup", "rlvr_eval_every", "rlvr_flops"):
            if not getattr(self, name) >= 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.rlvr_group < 2:
            raise ConfigError("rlvr_group", f"must be >= 2 (a group of one always has zero advantage), got {self.rlvr_group}")
        if not 0.0 <= self.rlvr_cut < 1.0:
            raise ConfigError("rlvr_cut", f"must lie in [0, 1) (0 = from prompts), got {self.rlvr_cut}")
        for name in ("rlvr_lr", "grad_clip", "rlvr_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A = (R - mean_group) / (std_group + eps) for rewards (n_groups, G); population std.
    A group of identical rewards gives exactly zero advantage."""
    # lab:rlvr begin
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))  # (n, G) MPS has no float64
    centred = rewards - rewards.mean(1, keepdim=True)  # (n, G)
    std = rewards.std(1, unbiased=False, keepdim=True)  # (n, 1)
    return (centred / (std + eps)).float()  # (n, G)
    # lab:rlvr end


def policy_gradient_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-(1/#tokens) sum_i sum_t A_i log pi(y_it | .) for logp (B, N), advantages (B,), mask (B, N)."""
    # lab:rlvr begin
    mask = mask.to(logp.dtype)  # (B, N)
    return -(advantages[:, None].to(logp.dtype) * logp * mask).sum() / mask.sum().clamp(min=1)
    # lab:rlvr end


def rlvr_step(model: GPT, optimizer: torch.optim.Optimizer, contexts: list[list[int]],
              reward_fn: Callable[[int, list[int]], float], cfg: RLVRConfig, eos_id: int, pad_id: int,
              generator: torch.Generator) -> dict:
    """One RLVR step: G samples per context, rewards reward_fn(context index, response ids without
    padding), group advantages, one AdamW step on the policy-gradient loss. Returns the stats.

    Under torchrun `model` is the DDP-wrapped policy and `contexts` this rank's share (whole
    groups stay on one rank, so advantages need nothing from the others). As in OPD (opd_step),
    rank r differentiates loss_r * world * n_r / n, n_r its response tokens and n = sum_r n_r, so
    that DDP's average is the gradient of the loss over the whole global batch
    (distributed.global_token_scale); the step is skipped on every rank when no group on any rank
    carries signal."""
    t0 = time.perf_counter()
    G = cfg.rlvr_group
    policy = distributed.bare(model)  # the GPT itself for sampling
    ro = generate(policy, [c for c in contexts for _ in range(G)], cfg.max_new_tokens, eos_id, pad_id,
                  temperature=cfg.temperature, generator=generator)
    rows = ro.rows()  # one transfer: the rewards' ids and the FLOPs' lengths
    rewards = torch.tensor([reward_fn(i // G, ids) for i, ids in enumerate(rows)],
                           dtype=torch.float32).view(len(contexts), G)  # (n, G) verifier rewards, 0/1
    adv = group_advantages(rewards, cfg.rlvr_eps).flatten().to(ro.tokens.device)  # (n*G,)
    zero_var = (rewards.std(1, unbiased=False) == 0).float().mean().item()
    model.train()
    with autocast(next(policy.parameters()).device):  # the same precision policy as the OPD step
        logits = response_logits(model, ro).float()  # (n*G, N, V)
    logp = torch.log_softmax(logits, -1).gather(-1, ro.response.unsqueeze(-1)).squeeze(-1)  # (n*G, N)
    loss = policy_gradient_loss(logp, adv, ro.response_mask)
    n_local = float(ro.response_mask.sum())
    scale = loss_scale(loss, n_local, "RLVR")  # 1.0 in one process
    gnorm, updated = 0.0, distributed.any_rank(zero_var < 1.0)  # at least one group carries signal
    if updated:
        gnorm = update(model, optimizer, loss * scale, cfg.grad_clip, "RLVR")
    one_pass = pass_flops(policy.config, [len(c) for c in contexts for _ in range(G)], [len(r) for r in rows])
    record = {"loss": loss.item(), "reward": rewards.mean().item(), "zero_var_groups": zero_var,
              "grad_norm": gnorm, "response_length": ro.lengths.float().mean().item(),
              "flops": one_pass * (4 if updated else 2),  # sampling, then the forward (and the backward: 2 forwards)
              "seconds": time.perf_counter() - t0}
    if distributed.active():  # the record of the global batch: token- or row-weighted means
        n_rows = float(len(contexts) * G)
        record = distributed.reduce_record(record, {"loss": n_local, "reward": n_rows, "zero_var_groups": n_rows,
                                                    "response_length": n_rows}, sum_keys=("flops",),
                                           max_keys=("seconds",))
    return record


def math_reward(tok: Tokenizer, problems: list[Problem], done: list[str]) -> Callable[[int, list[int]], float]:
    """Verifier reward of context i: verify(done[i] + decoded continuation, problems[i]), where
    done[i] is the part of the response already in the context ('' for a bare prompt)."""
    def reward(i: int, response: list[int]) -> float:
        return float(verify(done[i] + tok.decode([t for t in response if t != tok.eos_id]), problems[i]))
    return reward


def train_rlvr(model: GPT, tok: Tokenizer, cfg: RLVRConfig, student: GPT | None = None, log=print,
               jsonl_path: str | None = None, name: str = "rlvr", ckpt_path: str | None = None,
               save_every: int = 0, resume: bool = False, extra: dict | None = None,
               settings: dict | None = None, compile: bool = False,
               eval_problems: list[Problem] | None = None) -> list[dict]:
    """cfg.rlvr_steps RLVR steps on `model` (in place) with the math verifier as reward. With cfg.rlvr_cut > 0
    each step's contexts are `student`'s sampled responses cut at fractions uniform in [0, cut]
    (the student's kind of prefixes). Returns the per-step records (also written to jsonl_path when given),
    each with its matmul FLOPs (`flops`: the group's sampling, forward and backward; the student's
    sampling of cut prefixes is not counted) and, every cfg.rlvr_eval_every steps and at the end
    when eval_problems are given, the held-out greedy accuracy `eval_acc`. With cfg.rlvr_flops > 0
    the run ends after the step whose running FLOPs reach that budget.

    With ckpt_path, a checkpoint (weights, optimizer, every rank's RNG states, the records; plus
    `extra`) is written atomically every save_every steps and at the end; with resume=True and a
    checkpoint there from a run with the same RLVRConfig and `settings` (what else defines the run
    for the caller), training continues from its step.
    Under torchrun each rank takes its share of every step's problems (and their groups) and
    samples with its own generator; rank 0 logs and writes. compile=True runs the training forward
    passes through torch.compile."""
    if cfg.rlvr_cut > 0 and student is None:
        raise ValueError("RLVR from student prefixes (cut > 0) needs the student model")
    rank, world = distributed.rank_and_world()
    distributed.check_shardable(cfg.rlvr_prompts, world, "an RLVR step", "problems", "--rlvr_prompts")
    device = next(model.parameters()).device
    optimizer = adamw(model, cfg.rlvr_lr)
    problems = sample_problems(cfg.rlvr_steps * cfg.rlvr_prompts, "train", cfg.seed, cfg.digits, cfg.ops)
    gen = torch.Generator(device=device).manual_seed(distributed.rank_seed(cfg.seed))
    run_settings = {**asdict(cfg), **(settings or {})}  # what a resume must match
    records, first, saved = [], 0, None  # saved: the step of the last checkpoint of this run
    prompt_lens = [len(encode_example(tok, p)[0]) for p in problems[:cfg.rlvr_prompts]]
    check_budget(cfg.rlvr_flops, "rlvr_flops", 2 * pass_flops(model.config, prompt_lens * cfg.rlvr_group,
                                                              [1] * len(prompt_lens) * cfg.rlvr_group))
    if can_resume(resume, ckpt_path):
        first, state = resume_run_state(ckpt_path, model, optimizer, gen, "rlvr", run_settings)
        records, saved = state["records"], first
        log(f"{name}: resuming from '{ckpt_path}' at step {first}/{cfg.rlvr_steps}")
    ddp_model = distributed.wrap(model, device, compile)  # the model itself in one process, uncompiled
    spent = sum(r["flops"] for r in records)  # the running FLOPs (a resumed run's earlier steps included)
    with JsonlLog(jsonl_path, kept=records) as jsonl:  # a resumed run rewrites the steps it keeps
        for step in range(first, cfg.rlvr_steps):
            if 0 < cfg.rlvr_flops <= spent:  # a resumed run that had spent its budget
                break
            set_lr(optimizer, lr_at(step, cfg.rlvr_steps, cfg.rlvr_lr, cfg.rlvr_warmup))
            batch = distributed.shard(problems[step * cfg.rlvr_prompts:(step + 1) * cfg.rlvr_prompts])
            if cfg.rlvr_cut > 0:
                fracs = (torch.rand(len(batch), generator=gen, device=device) * cfg.rlvr_cut).tolist()
                contexts, done = student_prefixes(student, tok, batch, fracs, cfg.max_new_tokens, gen)
            else:
                contexts, done = [encode_example(tok, p)[0] for p in batch], [""] * len(batch)
            try:
                rec = {"step": step, **rlvr_step(ddp_model, optimizer, contexts, math_reward(tok, batch, done), cfg,
                                                 tok.eos_id, tok.pad_id, gen)}
            except FloatingPointError as e:
                kept = (f"the checkpoint of step {saved} ('{ckpt_path}') is intact" if saved is not None
                        else "no checkpoint of this run was written yet")
                raise FloatingPointError(f"{name} step {step}: {e}; {kept}") from None
            spent += rec["flops"]
            last = step == cfg.rlvr_steps - 1 or 0 < cfg.rlvr_flops <= spent
            if eval_problems and (last or (cfg.rlvr_eval_every and (step + 1) % cfg.rlvr_eval_every == 0)):
                rec["eval_acc"] = distributed.from_main(lambda: evaluate(model, tok, eval_problems, 0.0, cfg.max_new_tokens))
            records.append(rec)
            jsonl.write(rec)
            if ckpt_path and (last or (save_every and (step + 1) % save_every == 0)):
                save_run_state(ckpt_path, model, step + 1, optimizer, gen,
                               {**(extra or {}), "rlvr": run_settings}, {"records": records})
                saved = step + 1
            if step % 10 == 0 or last:
                log(f"{name} step {step:4d} | reward {rec['reward']:6.1%} | zero-variance groups "
                    f"{rec['zero_var_groups']:5.1%} | loss {rec['loss']:+.4f} | len {rec['response_length']:5.1f} | "
                    f"{spent / 1e9:.1f} GFLOP | {rec['seconds']:.2f}s"
                    + (f" | held-out {rec['eval_acc']:.1%}" if "eval_acc" in rec else ""))
            if last:
                break
    return records
