"""
Teacher-aligned prompt selection: which training prompts an OPD run distils on (docs/m9.md).

The rule. For each candidate prompt x_i the student samples one response y_i ~ pi(.|x_i) (T = 1,
one seeded generator over all candidates), and the pair's alignment on it is the teacher's mass on
the tokens that both models rank in their top K, at the student's own states c_t = (x_i, y_i,<t):

    a_i = (1/|y_i|) sum_t sum_{v in TopK(pi(.|c_t)) ∩ TopK(q(.|c_t))} q(v|c_t)      (|y_i| with <|eos|>)

the per-row form of the log's overlap_mass_teacher (metrics.topk_overlap). `select` keeps the
round(keep * n) candidates of highest a_i (a tie goes to the earlier candidate), in their
original order; `prompt_stream` lays them out as a run's prompts, pass after pass over the kept set,
each pass in a fresh seeded order. A run on a random subset of the same size is its control.
"""

import torch

from nanoopd.metrics import topk_overlap
from nanoopd.rollout import generate, response_logits
from nanoopd.tasks import Problem, encode_example


@torch.no_grad()
def alignment(teacher, student, tok, problems: list[Problem], max_new_tokens: int, seed: int, k: int = 16,
              batch_size: int = 256) -> list[float]:
    """a_i of the module docstring for every problem, in order."""
    device = next(student.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i in range(0, len(problems), batch_size):
        prompts = [encode_example(tok, p)[0] for p in problems[i:i + batch_size]]
        ro = generate(student, prompts, max_new_tokens, tok.eos_id, tok.pad_id, temperature=1.0, generator=gen)
        logp = [torch.log_softmax(response_logits(m, ro).float(), dim=-1) for m in (student, teacher)]  # (b, N, V) each
        mass_q = topk_overlap(logp[0], logp[1], k)[2]  # (b, N)
        mask = ro.response_mask.float()  # (b, N)
        out += ((mass_q * mask).sum(1) / mask.sum(1)).tolist()
    return out


def select(problems: list[Problem], scores: list[float], keep: float) -> list[Problem]:
    """The round(keep * n) problems of highest score, in their original order."""
    return [problems[i] for i in select_indices(problems, scores, keep)]


def select_indices(problems: list[Problem], scores: list[float], keep: float) -> list[int]:
    """The indices `select` keeps, in increasing order (a problem drawn twice is two candidates)."""
    if len(scores) != len(problems):
        raise ValueError(f"one score per problem: {len(scores)} scores for {len(problems)} problems")
    if not 0 < keep <= 1:
        raise ValueError(f"keep is the share of candidates kept, in (0, 1]; got {keep}")
    n = round(keep * len(problems))
    if n < 1:
        raise ValueError(f"keeping {keep} of {len(problems)} candidate prompts leaves none: score more candidates "
                         f"or keep a larger share")
    return sorted(sorted(range(len(problems)), key=lambda i: (-scores[i], i))[:n])


def prompt_stream(pool: list[Problem], n: int, seed: int) -> list[Problem]:
    """n prompts from `pool`: whole passes over it, each in a fresh order of one seeded generator."""
    if not pool:
        raise ValueError("no prompts to draw from: the selection kept none")
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < n:
        out += [pool[i] for i in torch.randperm(len(pool), generator=g).tolist()]
    return out[:n]
