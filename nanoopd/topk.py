"""
Top-K support matching: the token-level reverse KL restricted to a small support S_t.

Notation (docs/design.md#top-k-support-matching): student pi, teacher q, prefix c_t, support S_t of K tokens.
S_t is the teacher's top-K at c_t (default), the student's top-K, or their intersection, and
optionally also the sampled token y_t. The full reverse KL needs all V columns; these forms read
only the K gathered columns (torch.gather), plus one logsumexp per row for the normaliser of
pi and q.

  unnormalised   sum_{v in S} pi(v) (log pi(v) - log q(v))
                 gradient: sum_S pi (log pi - log q + 1) grad log pi. The `+1` term is
                 grad sum_S pi, which only cancels when S is the whole vocabulary. Descending it
                 drains probability mass out of S (a token in S is pushed up only if
                 q > e * pi), which ends in degenerate outputs. BIASED: kept on purpose, to
                 demonstrate that failure.

  stop-gradient  sum_{v in S} pi(v) (sg(log pi(v)) - log q(v))
                 gradient: sum_S pi (log pi - log q) grad log pi, exactly the full-vocabulary
                 reverse-KL gradient with its sum over v truncated to S.

  renormalised   pi_hat = pi / sum_S pi,  q_hat = q / sum_S q  (a log-softmax over the K
                 gathered logits), loss KL(pi_hat || q_hat) with full autograd ("local support
                 matching"). Typical K = 16..32.

With K = V (and any support rule) the stop-gradient and renormalised forms equal the full
reverse KL, in value and gradient.
"""

import torch

from nanoopd.logprobs import gather_logprobs

SUPPORTS = ("teacher", "student", "intersection")


def in_topk(index: torch.Tensor, other_index: torch.Tensor) -> torch.Tensor:
    """Boolean membership: is index[..., i] one of other_index[..., :]?  (..., K) x (..., K') -> (..., K)."""
    return (index.unsqueeze(-1) == other_index.unsqueeze(-2)).any(-1)  # (..., K)


def topk_support(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 tokens: torch.Tensor, k: int, support: str = "teacher",
                 add_sampled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The support S_t as K' gathered columns and a membership mask over them.

    Returns index (B, T, K') int64 and member (B, T, K') bool, K' = k (+1 with add_sampled):
    S_t = { index[b, t, i] : member[b, t, i] }. 'teacher' / 'student': that model's top-k, all
    members. 'intersection': the teacher's top-k columns, members where the student also ranks
    them in its top-k (S_t may be empty). add_sampled appends y_t as one more column, a member only
    if it is not already in S_t, so that no token is counted twice.
    """
    if support not in SUPPORTS:
        raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
    vocab = teacher_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k (the support size) must be an integer in [1, V={vocab}], got {k!r}")
    if support == "student":
        index = student_logits.detach().topk(k, dim=-1).indices  # (B, T, k)
    else:
        index = teacher_logits.detach().topk(k, dim=-1).indices  # (B, T, k)
    member = torch.ones_like(index, dtype=torch.bool)  # (B, T, k)
    if support == "intersection":
        student_index = student_logits.detach().topk(k, dim=-1).indices  # (B, T, k)
        member = in_topk(index, student_index)  # (B, T, k)
    if add_sampled:
        sampled = tokens.unsqueeze(-1)  # (B, T, 1)
        already = ((index == sampled) & member).any(-1, keepdim=True)  # (B, T, 1)
        index = torch.cat([index, sampled], dim=-1)  # (B, T, k+1)
        member = torch.cat([member, ~already], dim=-1)  # (B, T, k+1)
    return index, member


def support_logprobs(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi, log q) of the full distributions read on the support columns, (B, T, K') each."""
    return gather_logprobs(student_logits, index), gather_logprobs(teacher_logits.detach(), index)


def topk_unnormalized(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      index: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """sum_{v in S} pi(v) (log pi(v) - log q(v)) per position, (B, T). Biased (drains mass)."""
    # lab:topk begin
    logp, logq = support_logprobs(student_logits, teacher_logits, index)  # (B, T, K')
    return (member * logp.exp() * (logp - logq)).sum(-1)  # (B, T)
    # lab:topk end


def topk_stopgrad(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  index: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """sum_{v in S} pi(v) (sg(log pi(v)) - log q(v)) per position, (B, T)."""
    # lab:topk begin
    logp, logq = support_logprobs(student_logits, teacher_logits, index)  # (B, T, K')
    return (member * logp.exp() * (logp.detach() - logq)).sum(-1)  # (B, T)
    # lab:topk end


def _log_softmax_on(logits_s: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """log-softmax over the member columns only; 0 at the other columns (B, T, K')."""
    x = logits_s.masked_fill(~member, float("-inf"))  # (B, T, K')
    x = x.masked_fill(~member.any(-1, keepdim=True), 0.0)  # an empty S_t: finite, zeroed below
    return torch.log_softmax(x, dim=-1).masked_fill(~member, 0.0)  # (B, T, K')


def topk_renormalized(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      index: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """KL(pi_hat || q_hat) with pi_hat, q_hat renormalised on S_t, per position, (B, T)."""
    # lab:topk begin
    logp_hat = _log_softmax_on(student_logits.gather(-1, index), member)  # (B, T, K')
    logq_hat = _log_softmax_on(teacher_logits.detach().gather(-1, index), member)  # (B, T, K')
    return (member * logp_hat.exp() * (logp_hat - logq_hat)).sum(-1)  # (B, T)
    # lab:topk end


def support_mass(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 index: torch.Tensor, member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_S pi, sum_S q) per position, (B, T) each: how much of each distribution S_t covers."""
    with torch.no_grad():
        logp, logq = support_logprobs(student_logits, teacher_logits, index)  # (B, T, K')
        return (member * logp.exp()).sum(-1), (member * logq.exp()).sum(-1)  # (B, T) each
