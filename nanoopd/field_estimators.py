"""
The OPD and KL estimators that other frameworks ship, written in nanoopd's notation so that the
estimator audit (toy/audit.py, docs/audit.md) can hold each one against the divergence it claims.

Notation (docs/design.md#what-the-field-ships): student pi, teacher q (frozen), prefix c_t, sampled token
y_t ~ pi(.|c_t), cost r = log pi(y_t|c_t) - log q(y_t|c_t), score s = grad log pi(y_t|c_t), support
S_t (the teacher's top-K at c_t by default). Token-level reverse KL K(c) = KL(pi(.|c) || q(.|c)),
forward KL F(c) = KL(q(.|c) || pi(.|c)). Expected gradients are over y_t ~ pi(.|c_t), with the
sampling distribution held fixed, as a sampled estimator sees it:

  name              per-position loss                              expected gradient
  kl_k1             r                                              E[s] = 0: no signal at all
  kl_k2             r^2 / 2                                        E[r s] = grad K
  kl_k3             exp(-r) - 1 + r   (clipped to [-c, c])         E[(1 - q/pi) s] = grad F: FORWARD KL
  topk_forward_kl   sum_S q (log q - max(log pi, m))               -sum_S q [log pi > m] grad log pi
  topk_tail         KL(pi~ || q~) on S + one tail bucket           grad of that coarsened KL
  topk_bregman      sum_S [pi (log pi - log q) - pi + q]           sum_S pi (log pi - log q) grad log pi

The vOPD baseline read on the top-K only, b(c) = sum_S pi (log pi - log q) (the part of
K(c) = E_{v~pi}[r(v)] that S covers), is sampled_token's baseline="topk" (objectives.py): like any
b(c) it leaves the expected gradient grad K unchanged and only moves the variance.

Every function returns a per-position loss (B, T) whose gradient is the estimator; each is
registered at the end of this file, with the divergence it claims (the audit checks the claim) and,
for k1/k2/k3, on_policy (they read the sampled token's r: right only for y ~ pi), so
that the registry (objectives.py) masks, averages per token and logs it like the project's own.
Inputs are float32 (float64 stays float64).
"""

import torch

from nanoopd.objectives import (CLAMP, SPECS, TOPK_OPTIONS, Option, finish, prepare, register, resolve_options,
                                sampled, token_sum, topk_objective)
from nanoopd.topk import support_logprobs, topk_unnormalized


# ----------------------------------------------------------------------------------------------
# k1 / k2 / k3 on the sampled token (the KL-loss options of RL frameworks)


def kl_k1(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """k1 = r = log pi(y) - log q(y), differentiated through log pi: gradient s, whose expectation
    over y ~ pi is sum_v pi grad log pi = grad sum_v pi = 0. An unbiased estimate of the KL's
    *value*, and, used as a loss, a gradient of pure noise. logp, logq: (B, T). Returns (B, T)."""
    return logp - logq.detach()  # (B, T)


def kl_k2(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """k2 = r^2 / 2: gradient r s, whose expectation is sum_v pi r grad log pi = grad K, the
    token-level reverse KL (the same expected gradient as sampled-token OPD). Returns (B, T)."""
    return 0.5 * (logp - logq.detach()).pow(2)  # (B, T)


def kl_k3(logp: torch.Tensor, logq: torch.Tensor, clamp: float | None = None) -> torch.Tensor:
    """k3 = exp(-r) - 1 + r = q/pi - 1 - log(q/pi) >= 0, the "low-variance KL", optionally clipped
    to [-clamp, clamp] as shipped (verl's low_var_kl clips at 10). Gradient (1 - q/pi) s, whose
    expectation is sum_v (pi - q) grad log pi = -sum_v q grad log pi = grad F: the FORWARD KL
    KL(q || pi), not the reverse KL its value estimates. Where the clip is active the token gives
    no gradient at all. Returns (B, T)."""
    r = logp - logq.detach()  # (B, T)
    k3 = torch.expm1(-r) + r  # (B, T)  exp(-r) - 1 + r
    return k3 if clamp is None else k3.clamp(-clamp, clamp)


# ----------------------------------------------------------------------------------------------
# top-K forms of the field (S = gathered columns `index` with membership `member`, topk.py)


def topk_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    index: torch.Tensor, member: torch.Tensor, m: float | None = None) -> torch.Tensor:
    """sum_{v in S} q(v) (log q(v) - max(log pi(v), m)) per position, (B, T): the forward KL on
    the teacher's top-K as verl ships it, log-probs clamped from below at m (None: no clamp).
    Gradient -sum_S q [log pi > m] grad log pi: a truncated forward KL (its minimiser over the
    simplex is pi = q / sum_S q on S, 0 elsewhere: it pulls mass INTO S), and where the clamp is
    active, exactly at the tokens the student underweights most, no gradient at all."""
    logp, logq = support_logprobs(student_logits, teacher_logits, index)  # (B, T, K')
    if m is not None:
        logp = logp.clamp(min=m)  # (B, T, K')
    return (member * logq.exp() * (logq - logp)).sum(-1)  # (B, T)


def _in_support(index: torch.Tensor, member: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, T, V) bool: is v in S_t? Duplicate columns (add_sampled) are counted once."""
    hits = torch.zeros(*index.shape[:-1], vocab, device=index.device)  # (B, T, V)
    return hits.scatter_add(-1, index, member.float()) > 0  # (B, T, V)


def _tail_logprob(logits: torch.Tensor, in_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log of the mass outside S, has_tail) per position, (B, T) each, computed as a logsumexp
    over the tail's own logits (exact even when the tail holds 1e-30 of the mass). Where S is the
    whole vocabulary the tail is empty: its log-mass is returned as 0 and has_tail is False."""
    has_tail = ~in_s.all(-1)  # (B, T)
    tail = logits.masked_fill(in_s, float("-inf")).masked_fill(~has_tail.unsqueeze(-1), 0.0)  # (B, T, V)
    return torch.logsumexp(tail, -1) - torch.logsumexp(logits, -1), has_tail  # (B, T) each


def topk_tail(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              index: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """KL(pi~ || q~) per position, (B, T), with pi~, q~ the two distributions coarsened to the
    tokens of S plus one tail bucket holding the rest of the mass (1 - sum_S):

        sum_{v in S} pi(v) (log pi(v) - log q(v)) + pi(tail) (log pi(tail) - log q(tail))

    with full autograd (TRL's server-side distillation: top-1 + tail). A proper divergence of the
    coarsened distributions: >= 0, 0 iff pi~ = q~, so unlike the unnormalised form it cannot
    drain mass out of S (the tail bucket pays for it). With S = all V tokens it is the full
    reverse KL."""
    logp, logq = support_logprobs(student_logits, teacher_logits, index)  # (B, T, K')
    inside = (member * logp.exp() * (logp - logq)).sum(-1)  # (B, T)
    in_s = _in_support(index, member, student_logits.shape[-1])  # (B, T, V)
    tail_p, has_tail = _tail_logprob(student_logits, in_s)  # (B, T)
    tail_q, _ = _tail_logprob(teacher_logits.detach(), in_s)  # (B, T)
    return inside + has_tail * tail_p.exp() * (tail_p - tail_q)  # (B, T)


def topk_bregman(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 index: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """sum_{v in S} [pi (log pi - log q) - pi + q] per position, (B, T): the unnormalised top-K
    with the Bregman correction (the generalised KL of unnormalised measures, >= 0 and 0 iff
    pi = q on S; multi-teacher OPD). The `- pi` cancels the `+1` of the unnormalised form's
    gradient, leaving sum_S pi (log pi - log q) grad log pi: the stop-gradient form's gradient."""
    logp, logq = support_logprobs(student_logits, teacher_logits, index)  # (B, T, K')
    correction = (member * (logq.exp() - logp.exp())).sum(-1)  # (B, T)  sum_S (q - pi)
    return topk_unnormalized(student_logits, teacher_logits, index, member) + correction



# ----------------------------------------------------------------------------------------------
# registered under their names, so that the audit (toy/audit.py) and --loss can use them


def _sampled_field(name: str, form, student_logits, teacher_logits, tokens, mask, options):
    """k1/k2/k3: a per-position formula of (log pi(y_t), log q(y_t)) on the sampled token."""
    opt = resolve_options(name, options)
    extra = {key: opt[key] for key in SPECS[name].options}
    if extra.get("clamp") is not None and not extra["clamp"] > 0:
        raise ValueError(f"clamp must be a positive number (or None for no clamp), got {extra['clamp']}")
    batch = prepare(student_logits, teacher_logits, tokens, mask, opt)
    logp, logq = sampled(batch)  # (B, T) each
    return finish(token_sum(form(logp, logq, **extra), batch), batch)


@register("kl_k1", on_policy=True)
def kl_k1_loss(student_logits, teacher_logits, tokens, mask, **options):
    """k1 = r_t as a loss (RL frameworks' KL-loss option 'kl'): expected gradient 0."""
    return _sampled_field("kl_k1", kl_k1, student_logits, teacher_logits, tokens, mask, options)


@register("kl_k2", on_policy=True)
def kl_k2_loss(student_logits, teacher_logits, tokens, mask, **options):
    """k2 = r_t^2 / 2 as a loss ('mse'): expected gradient grad of the token-level reverse KL."""
    return _sampled_field("kl_k2", kl_k2, student_logits, teacher_logits, tokens, mask, options)


@register("kl_k3", on_policy=True, clamp=CLAMP)
def kl_k3_loss(student_logits, teacher_logits, tokens, mask, **options):
    """k3 = exp(-r_t) - 1 + r_t as a loss ('low_var_kl'), clipped to [-clamp, clamp] when clamp
    is given: expected gradient grad of the token-level FORWARD KL(q || pi)."""
    return _sampled_field("kl_k3", kl_k3, student_logits, teacher_logits, tokens, mask, options)


@register("topk_forward_kl", claim="F", **TOPK_OPTIONS,
          m=Option(None, "lower clamp m of log pi, a negative number; None: no clamp"))
def topk_forward_kl_loss(student_logits, teacher_logits, tokens, mask, **options):
    """Forward KL on the teacher's top-K, log pi clamped from below at m (off by default)."""
    m = options.get("m")
    if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not m < 0):
        raise ValueError(f"m (the lower clamp of log pi) must be a negative number or None, got {m!r}")
    return topk_objective("topk_forward_kl", topk_forward_kl, student_logits, teacher_logits, tokens, mask,
                          options)


@register("topk_tail", **TOPK_OPTIONS)
def topk_tail_loss(student_logits, teacher_logits, tokens, mask, **options):
    """Reverse KL of the distributions coarsened to the top-K plus one tail bucket."""
    return topk_objective("topk_tail", topk_tail, student_logits, teacher_logits, tokens, mask, options)


@register("topk_bregman", **TOPK_OPTIONS)
def topk_bregman_loss(student_logits, teacher_logits, tokens, mask, **options):
    """Unnormalised top-K with the Bregman correction - pi + q: the stop-gradient gradient."""
    return topk_objective("topk_bregman", topk_bregman, student_logits, teacher_logits, tokens, mask, options)
