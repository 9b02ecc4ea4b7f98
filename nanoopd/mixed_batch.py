"""
GKD's lmbda: the share of each OPD step's rows that the student samples (docs/design.md#lmbda).

    rows 0 .. S-1    y ~ pi(.|x)    the student's own samples, S = round(lmbda * B)
    rows S .. B-1    y ~ q(.|x)     teacher sequences: sampled now by the teacher for the step's
                                    prompts at the rollout's settings (teacher_rows='fresh'), or
                                    greedy traces from a fixed pool with their own prompts
                                    ('pool': the cold-start pool of train_math.py)

lmbda = 1 is on-policy distillation as before (the same calls, the same bits); lmbda = 0 is
supervised KD on teacher sequences, and with the objective `sft` it is SeqKD (SFT on teacher
samples). Every objective is evaluated at the positions of whichever sequence a row holds: the
full-distribution forms (full_reverse_kl, forward_kl, jsd, the top-K forms) are exactly what they are
on the student's rows, at other prefixes; the sampled-token and sequence forms assume y ~ pi and
estimate another gradient on the teacher's rows (SPECS[name].on_policy; train_opd says so).

Two rollouts pad differently (each left-pads its prompts to its own P and trims its responses to
its own N), so `merge` re-pads both to one P and one N: the one place a mixed batch is built.
"""

import torch

from nanoopd.rollout import Rollout, generate

TEACHER_ROWS = ("fresh", "pool")


def student_share(lmbda: float, batch: int) -> int:
    """S, the rows the student samples: round(lmbda * batch), halves rounded to even (Python's round)."""
    # lab:on_policy begin
    return round(lmbda * batch)
    # lab:on_policy end


def _pad(x: torch.Tensor, before: int, after: int, value) -> torch.Tensor:
    """x (B, T) with `before` columns of `value` on the left and `after` on the right."""
    B = x.shape[0]
    return torch.cat([x.new_full((B, before), value), x, x.new_full((B, after), value)], dim=1)


def merge(parts: list[Rollout], pad_id: int) -> Rollout:
    """The rows of every rollout in `parts`, in order, as one Rollout: prompts left-padded to the
    longest padded prompt P, responses right-padded to the longest budget N. Each row computes
    what it computed alone (the model masks padding and counts positions over real tokens)."""
    parts = [p for p in parts if p is not None and p.tokens.shape[0] > 0]
    if len(parts) == 1:
        return parts[0]
    # lab:on_policy begin
    P = max(p.prompt_len for p in parts)
    N = max(p.response.shape[1] for p in parts)

    def one(p: Rollout) -> dict:
        dp, dn = P - p.prompt_len, N - p.response.shape[1]
        prompt, resp = p.tokens[:, :p.prompt_len], p.tokens[:, p.prompt_len:]  # (b, P_i), (b, N_i)
        return {"tokens": torch.cat([_pad(prompt, dp, 0, pad_id), _pad(resp, 0, dn, pad_id)], 1),  # (b, P+N)
                "valid": torch.cat([_pad(p.valid[:, :p.prompt_len], dp, 0, False),
                                    _pad(p.valid[:, p.prompt_len:], 0, dn, False)], 1),
                "response": _pad(p.response, 0, dn, pad_id), "response_mask": _pad(p.response_mask, 0, dn, False),
                "logprobs": _pad(p.logprobs, 0, dn, 0.0), "sampler_logprobs": _pad(p.sampler_logprobs, 0, dn, 0.0)}
    rows = [one(p) for p in parts]
    return Rollout(prompt_len=P, **{k: torch.cat([r[k] for r in rows]) for k in rows[0]})
    # lab:on_policy end


def pool_rollout(pairs: list[tuple[list[int], list[int]]], pad_id: int, device) -> Rollout:
    """(prompt ids, response ids) traces as a Rollout: prompts left-padded, responses right-padded;
    log-probs 0 (no model sampled them here)."""
    P, N = max(len(p) for p, _ in pairs), max(len(r) for _, r in pairs)
    tokens = torch.tensor([[pad_id] * (P - len(p)) + p + r + [pad_id] * (N - len(r)) for p, r in pairs])
    valid = torch.tensor([[False] * (P - len(p)) + [True] * (len(p) + len(r)) + [False] * (N - len(r))
                          for p, r in pairs])
    zeros = torch.zeros(len(pairs), N, device=device)
    return Rollout(tokens=tokens.to(device), valid=valid.to(device), prompt_len=P, response=tokens[:, P:].to(device),
                   response_mask=valid[:, P:].to(device), logprobs=zeros, sampler_logprobs=zeros)


class TeacherRows:
    """The teacher's rows of a step. fresh: the teacher samples responses to the given prompts with
    the rollout's settings and generator. pool: (problem, prompt ids, response ids) traces, taken
    in the order of a permutation seeded by `seed`, one pass after another; a trace's sampling is
    charged (FLOP accounting) in the first pass only."""

    def __init__(self, source: str, pool: list | None = None, seed: int = 0):
        if source not in TEACHER_ROWS:
            raise ValueError(f"teacher_rows must be one of {TEACHER_ROWS}, got {source!r}")
        if source == "pool" and not pool:
            raise ValueError("teacher_rows='pool' needs a non-empty pool of teacher traces")
        self.source, self.pool = source, pool
        self.order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist() if pool else None

    def __call__(self, teacher, prompts: list[list[int]], problems: list, first: int, cfg, tok, generator):
        """(rollout, prompts, problems, charged) of len(prompts) teacher rows: `first` is the index
        of the first of them over the run (the pool's order); charged: a bool per row, whether this
        step pays for its sampling."""
        if self.source == "fresh":
            ro = generate(teacher, prompts, cfg.max_new_tokens, tok.eos_id, tok.pad_id, temperature=cfg.temperature,
                          top_k=cfg.top_k, top_p=cfg.top_p, generator=generator, cuda_graph_replay=cfg.cuda_graph)
            return ro, prompts, problems, [True] * len(prompts)
        index = [first + i for i in range(len(prompts))]
        picked = [self.pool[self.order[j % len(self.pool)]] for j in index]
        device = next(teacher.parameters()).device
        return (pool_rollout([(p, r) for _, p, r in picked], tok.pad_id, device), [p for _, p, _ in picked],
                [q for q, _, _ in picked], [j < len(self.pool) for j in index])
