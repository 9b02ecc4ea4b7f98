"""
Diagnostics to log during on-policy distillation (DESIGN.md section 5), as pure tensor functions.

Notation: student pi, teacher q, prefix c_t, response mask over the positions that predict the
response tokens y_t, per-token cost r_t = log pi(y_t|c_t) - log q(y_t|c_t). All averages are over
masked (response) positions; k = 16 by default, clipped to the vocabulary size.

  overlap ratio   |TopK(pi) ∩ TopK(q)| / k         (rises from ~72 % to >91 % in good runs)
  overlap mass    sum_{v in TopK(pi) ∩ TopK(q)} pi(v), and the same for q (kept near 97-99 %)
  entropy gap     |H(q(.|c_t)) - H(pi(.|c_t))|
  reverse KL      KL(pi(.|c_t) || q(.|c_t))
  r_t > 0 share   the share of sampled tokens the student likes more than the teacher does
  |r_t| max       the largest log-ratio, which special-token mismatches blow up
plus the mean response length, the total gradient norm and the task accuracy.

  teacher-continuation accuracy   cut the student's sampled responses at a fraction f of their
                  length, let the teacher finish them greedily, verify prefix + continuation;
                  compared with the teacher's own from-scratch greedy accuracy on the same problems
                  (a teacher can be far worse from student prefixes than from its own)

Everything runs under torch.no_grad(): the diagnostics never hold on to the autograd graph.
"""

import math
from collections.abc import Iterable

import torch

from nanoopd.rollout import generate
from nanoopd.sequence_kl import token_kl
from nanoopd.sft import encode_example
from nanoopd.tasks import Problem, verify
from nanoopd.topk import in_topk


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of x (B, T) over mask (B, T); 0.0 when nothing is masked in. Accumulated in float32 at
    least (MPS has no float64; a float64 x stays float64)."""
    mask = mask.bool()
    return x[mask].to(torch.promote_types(x.dtype, torch.float32)).mean().item() if mask.any() else 0.0


def token_entropy(logp: torch.Tensor) -> torch.Tensor:
    """H(p(.|c_t)) = -sum_v p(v) log p(v) from log-probs (B, T, V). Returns (B, T)."""
    return -(logp.exp() * logp).sum(-1)  # (B, T)


def sampled_logratio(student_logp: torch.Tensor, teacher_logp: torch.Tensor,
                     tokens: torch.Tensor) -> torch.Tensor:
    """r_t = log pi(y_t|c_t) - log q(y_t|c_t) from full log-probs (B, T, V). Returns (B, T)."""
    index = tokens.unsqueeze(-1)  # (B, T, 1)
    return (student_logp.gather(-1, index) - teacher_logp.gather(-1, index)).squeeze(-1)  # (B, T)


def topk_overlap(student_logp: torch.Tensor, teacher_logp: torch.Tensor,
                 k: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Overlap ratio, student mass and teacher mass on TopK(pi) ∩ TopK(q), each (B, T)."""
    k = min(k, student_logp.shape[-1])
    student_top = student_logp.topk(k, dim=-1).indices  # (B, T, k)
    teacher_top = teacher_logp.topk(k, dim=-1).indices  # (B, T, k)
    shared = in_topk(teacher_top, student_top)  # (B, T, k)  teacher's top-k also in the student's
    ratio = shared.sum(-1) / k  # (B, T)
    mass_pi = (shared * student_logp.gather(-1, teacher_top).exp()).sum(-1)  # (B, T)
    mass_q = (shared * teacher_logp.gather(-1, teacher_top).exp()).sum(-1)  # (B, T)
    return ratio, mass_pi, mass_q


@torch.no_grad()
def logratio_stats(student_logp: torch.Tensor, teacher_logp: torch.Tensor,
                   tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The per-step numbers every objective logs: mean reverse KL, max |r_t|, share of r_t > 0."""
    mask = mask.bool()
    tokens = tokens.masked_fill(~mask, 0)  # (B, T)  padding ids at masked positions are never read
    r = sampled_logratio(student_logp, teacher_logp, tokens)  # (B, T)
    return {
        "kl": masked_mean(token_kl(student_logp, teacher_logp), mask),
        "logratio_max_abs": r[mask].abs().max().item() if mask.any() else 0.0,
        "logratio_pos_share": masked_mean((r > 0).float(), mask),
    }


def mean_response_length(mask: torch.Tensor) -> float:
    """Mean number of response tokens per sequence, from the response mask (B, T)."""
    return mask.float().sum(1).mean().item()


def grad_norm(params: Iterable[torch.Tensor]) -> float:
    """Total L2 norm of the .grad of `params` (parameters without a gradient are skipped)."""
    total = sum(p.grad.detach().float().pow(2).sum().item() for p in params if p.grad is not None)
    return math.sqrt(total)


def accuracy(rewards: Iterable[float]) -> float:
    """Mean of a list of 0/1 verifier rewards."""
    rewards = [float(x) for x in rewards]
    if not rewards:
        raise ValueError("accuracy() got no rewards: evaluate at least one problem")
    return sum(rewards) / len(rewards)


@torch.no_grad()
def opd_diagnostics(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    tokens: torch.Tensor, mask: torch.Tensor, k: int = 16) -> dict[str, float]:
    """All per-token diagnostics of a rollout batch, as python floats.

    student_logits, teacher_logits: (B, T, V) at the positions that predict tokens (B, T);
    mask: (B, T) response mask (bool or 0/1).
    """
    student_logp = torch.log_softmax(student_logits.float(), dim=-1)  # (B, T, V)
    teacher_logp = torch.log_softmax(teacher_logits.float(), dim=-1)  # (B, T, V)
    ratio, mass_pi, mass_q = topk_overlap(student_logp, teacher_logp, k)  # (B, T) each
    h_pi = token_entropy(student_logp)  # (B, T)
    h_q = token_entropy(teacher_logp)  # (B, T)
    return {
        **logratio_stats(student_logp, teacher_logp, tokens, mask),
        "overlap_ratio": masked_mean(ratio, mask),
        "overlap_mass_student": masked_mean(mass_pi, mask),
        "overlap_mass_teacher": masked_mean(mass_q, mask),
        "entropy_student": masked_mean(h_pi, mask),
        "entropy_teacher": masked_mean(h_q, mask),
        "entropy_gap": masked_mean((h_q - h_pi).abs(), mask),
        "response_length": mean_response_length(mask),
    }


def _response_ids(row: list[int], keep: list[bool], eos_id: int) -> list[int]:
    """The generated ids of one rollout row, without padding and without the final <|eos|>."""
    ids = [t for t, k in zip(row, keep) if k]
    return ids[:-1] if ids and ids[-1] == eos_id else ids


@torch.no_grad()
def student_prefixes(student, tok, problems: list[Problem], frac: float | list[float], max_new_tokens: int,
                     generator: torch.Generator | None = None,
                     temperature: float = 1.0) -> tuple[list[list[int]], list[str]]:
    """Sample one response y per problem from the student and cut it after floor(frac * |y|)
    tokens (|y| without <|eos|>; frac: one for all, or one per problem). Returns the contexts
    [bos] x y_<cut (token ids) and the cut prefixes as text."""
    prompts = [encode_example(tok, p)[0] for p in problems]
    fracs = frac if isinstance(frac, (list, tuple)) else [frac] * len(problems)
    ro = generate(student, prompts, max_new_tokens, tok.eos_id, tok.pad_id, temperature=temperature,
                  generator=generator)
    contexts, done = [], []
    for prompt, f, row, keep in zip(prompts, fracs, ro.response.tolist(), ro.response_mask.tolist()):
        ids = _response_ids(row, keep, tok.eos_id)
        cut = ids[:int(f * len(ids))]
        contexts.append(prompt + cut)
        done.append(tok.decode(cut))
    return contexts, done


@torch.no_grad()
def teacher_continuation(teacher, student, tok, problems: list[Problem], frac: float = 0.5,
                         max_new_tokens: int = 64, seed: int = 0, temperature: float = 1.0,
                         batch_size: int = 256) -> dict[str, float]:
    """Teacher-continuation accuracy (DESIGN.md section 5).

      continuation_acc  (1/n) sum_i verify(y_i,<cut + argmax-decode q(.| x_i, y_i,<cut), problem_i),
                        y_i ~ pi(.|x_i) at `temperature`, cut = floor(frac * |y_i|); the teacher
                        writes at most max_new_tokens - cut tokens (the prefix uses the rest)
      teacher_acc       the teacher's greedy from-scratch accuracy on the same problems
      student_acc       the accuracy of the student's uncut samples y_i
    """
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"frac must lie in [0, 1], got {frac}")
    device = next(student.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    cont, own, stud = [], [], []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        full_ctx, full_text = student_prefixes(student, tok, chunk, 1.0, max_new_tokens, gen, temperature)
        stud += [verify(t, p) for t, p in zip(full_text, chunk)]
        prompts = [encode_example(tok, p)[0] for p in chunk]
        contexts, done, room = [], [], []
        for prompt, ctx in zip(prompts, full_ctx):  # the same samples, cut at frac
            keep = int(frac * (len(ctx) - len(prompt)))
            contexts.append(ctx[:len(prompt) + keep])
            done.append(tok.decode(ctx[len(prompt):len(prompt) + keep]))
            room.append(max_new_tokens - keep)  # prefix + continuation share the response budget
        for ctxs, prefix_texts, budget, out in ((contexts, done, room, cont),
                                                (prompts, [""] * len(chunk), [max_new_tokens] * len(chunk), own)):
            ro = generate(teacher, ctxs, max_new_tokens, tok.eos_id, tok.pad_id, temperature=0.0)
            for p, d, n, row, keep in zip(chunk, prefix_texts, budget, ro.response.tolist(),
                                          ro.response_mask.tolist()):
                out.append(verify(d + tok.decode(_response_ids(row[:n], keep[:n], tok.eos_id)), p))
    return {"continuation_acc": accuracy(cont), "teacher_acc": accuracy(own),
            "student_acc": accuracy(stud), "frac": frac}
