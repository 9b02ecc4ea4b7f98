"""
Diagnostics to log during on-policy distillation (docs/design.md#diagnostics), as pure tensor functions.

Notation: student pi, teacher q, prefix c_t, response mask over the positions that predict the
response tokens y_t, per-token cost r_t = log pi(y_t|c_t) - log q(y_t|c_t). All averages are over
masked (response) positions; k = 16 by default, clipped to the vocabulary size.

  overlap ratio   |TopK(pi) ∩ TopK(q)| / k         (rises from ~72 % to >91 % in good runs)
  overlap mass    sum_{v in TopK(pi) ∩ TopK(q)} pi(v), and the same for q (kept near 97-99 %)
  entropy gap     |H(q(.|c_t)) - H(pi(.|c_t))|
  reverse KL      KL(pi(.|c_t) || q(.|c_t))
  r_t > 0 share   the share of sampled tokens the student likes more than the teacher does
  |r_t| max       the largest log-ratio, which special-token mismatches blow up
  tail mass       1 - sum_{v in TopK(q)} pi(v): the student's mass outside the teacher's top-K, which
                  the top-K objectives never see (TailMass: an OPD extra_stats hook)
plus the mean response length and the task accuracy (the gradient norm comes from loop.update).

(Teacher-continuation accuracy samples from models, so it lives with the evaluations in evaluate.py.)

Everything runs under torch.no_grad(): the diagnostics never hold on to the autograd graph.
"""

from collections.abc import Iterable

import torch

from nanoopd.logprobs import sampled_logratio
from nanoopd.sequence_kl import token_kl
from nanoopd.topk import in_topk


def masked_average(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, T) over mask (B, T) as a 0-dim tensor, sum(x m) / sum(m): no host sync (no
    boolean indexing, no .item()); 0 when nothing is masked in. Accumulated in float32 at least
    (MPS has no float64; a float64 x stays float64)."""
    mask = mask.bool()
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)  # a NaN at a masked-out place stays out


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """masked_average as a python float (one host sync)."""
    return masked_average(x, mask).item()


def token_entropy(logp: torch.Tensor) -> torch.Tensor:
    """H(p(.|c_t)) = -sum_v p(v) log p(v) from log-probs (B, T, V). Returns (B, T)."""
    return -(logp.exp() * logp).sum(-1)  # (B, T)


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


def tail_mass(student_logp: torch.Tensor, teacher_logits: torch.Tensor, k: int = 16) -> torch.Tensor:
    """1 - sum_{v in TopK(q)} pi(v|c_t), (B, T): the student's mass outside the teacher's top-k
    (teacher logits or log-probs: the same top-k). The stop-gradient top-K gradient pushes these
    tokens up by -pi(u) sum_S pi (log pi - log q), so a growing tail is its failure mechanism."""
    k = min(k, teacher_logits.shape[-1])
    top = teacher_logits.topk(k, dim=-1).indices  # (B, T, k)
    outside = student_logp.scatter(-1, top, float("-inf"))  # (B, T, V)  log pi off S, -inf on S
    return outside.logsumexp(-1).exp()  # (B, T)  sum_{v not in S} pi(v): a tiny tail is not lost to 1 - sum


class TailMass:
    """The student's mean mass outside the teacher's top-k over the response tokens, as an OPD
    extra_stats hook: (student_logits, teacher_logits, rollout) -> {"tail_mass": ...}."""

    def __init__(self, k: int = 16):
        self.k = k

    @torch.no_grad()
    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, rollout) -> dict[str, float]:
        logp = torch.log_softmax(student_logits.float(), dim=-1)  # (B, T, V)
        return {"tail_mass": masked_mean(tail_mass(logp, teacher_logits.float(), self.k), rollout.response_mask)}


@torch.no_grad()
def logratio_stats(student_logp: torch.Tensor, teacher_logp: torch.Tensor,
                   tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The per-step numbers every objective logs: mean reverse KL, max |r_t|, share of r_t > 0."""
    return {k: v.item() for k, v in logratio_tensors(student_logp, teacher_logp, tokens, mask).items()}


@torch.no_grad()
def logratio_tensors(student_logp: torch.Tensor, teacher_logp: torch.Tensor,
                     tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """logratio_stats as 0-dim tensors (no host sync)."""
    mask = mask.bool()
    tokens = tokens.masked_fill(~mask, 0)  # (B, T)  padding ids at masked positions are never read
    r = sampled_logratio(student_logp, teacher_logp, tokens)  # (B, T)
    return {
        "kl": masked_average(token_kl(student_logp, teacher_logp), mask),
        "logratio_max_abs": torch.where(mask, r.abs(), 0.0).amax(),  # 0 when nothing is masked in
        "logratio_pos_share": masked_average(r > 0, mask),
    }


def mean_response_length(mask: torch.Tensor) -> float:
    """Mean number of response tokens per sequence, from the response mask (B, T)."""
    return mask.float().sum(1).mean().item()


def accuracy(rewards: Iterable[float]) -> float:
    """Mean of a list of 0/1 verifier rewards."""
    rewards = [float(x) for x in rewards]
    if not rewards:
        raise ValueError("accuracy() got no rewards: evaluate at least one problem")
    return sum(rewards) / len(rewards)


@torch.no_grad()
def opd_diagnostics(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    tokens: torch.Tensor, mask: torch.Tensor, k: int = 16,
                    logp: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
    """All per-token diagnostics of a rollout batch, as python floats (one host transfer).

    student_logits, teacher_logits: (B, T, V) at the positions that predict tokens (B, T);
    mask: (B, T) response mask (bool or 0/1); logp: their log-softmaxes when already computed.
    """
    stats = opd_diagnostic_tensors(student_logits, teacher_logits, tokens, mask, k, logp)
    return dict(zip(stats, torch.stack(list(stats.values())).tolist()))


@torch.no_grad()
def opd_diagnostic_tensors(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           tokens: torch.Tensor, mask: torch.Tensor, k: int = 16,
                           logp: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """opd_diagnostics as 0-dim float32 tensors: nothing leaves the device (opd_step sends them to
    the host in one transfer with the rest of its record)."""
    if logp is None:
        logp = torch.log_softmax(student_logits.float(), dim=-1), torch.log_softmax(teacher_logits.float(), dim=-1)
    student_logp, teacher_logp = logp[0].detach(), logp[1].detach()  # (B, T, V) each
    mask = mask.bool()
    ratio, mass_pi, mass_q = topk_overlap(student_logp, teacher_logp, k)  # (B, T) each
    h_pi = token_entropy(student_logp)  # (B, T)
    h_q = token_entropy(teacher_logp)  # (B, T)
    stats = {
        **logratio_tensors(student_logp, teacher_logp, tokens, mask),
        "overlap_ratio": masked_average(ratio, mask),
        "overlap_mass_student": masked_average(mass_pi, mask),
        "overlap_mass_teacher": masked_average(mass_q, mask),
        "entropy_student": masked_average(h_pi, mask),
        "entropy_teacher": masked_average(h_q, mask),
        "entropy_gap": masked_average((h_q - h_pi).abs(), mask),
        "response_length": mask.sum(1).float().mean(),
    }
    return {name: v.float() for name, v in stats.items()}
