"""
Sampled-token on-policy distillation and the discounted family g_gamma.

Notation (docs/design.md#notation): the student pi samples y ~ pi(.|x); at every response position
t the per-token log-ratio is a *cost*

    r_t = log pi(y_t | c_t) - log q(y_t | c_t),        s_t = grad log pi(y_t | c_t).

The discounted estimator of the gradient of the sequence reverse KL J = E_y[sum_t r_t] is

    g_gamma = sum_t ( sum_{t' >= t} gamma^(t'-t) r_t' ) s_t = sum_t R_t^gamma s_t .

gamma = 0 is sampled-token OPD (biased: it drops the future-reward coupling), gamma = 1 is the
unbiased REINFORCE estimator of grad J. Everything here works on per-token log-probs alone, so the
same code serves the GPT, the tabular toy and the Gaussian-policy toy.

Sampled-token OPD, the common default in practice, written as an advantage on the sampled token:

    A_t = sg(-r_t) = sg(log q(y_t|c_t) - log pi(y_t|c_t)),      loss = -sum_t A_t log pi(y_t|c_t),

optionally with r_t clamped to [-c, c], and optionally with the vOPD control variate
A_t = sg(-r_t + KL(pi(.|c_t) || q(.|c_t))): the baseline depends on c_t only, so the expected
gradient is unchanged and the variance is lower.

Sampling distribution. All of this assumes y ~ pi itself: rollouts at temperature 1 with no top-k
or top-p truncation. Drawn at T != 1, top_p < 1 or top_k > 0, y comes from another distribution s
while r_t and s_t remain those of pi, so E_{y~s}[g_gamma] is not grad J and E_{y~s}[g_0] is not the
token-level reverse-KL gradient (top-p, say, never samples the tail tokens, so their costs never
push pi's tail down). tests/test_sampling_distribution.py shows both by enumeration; train_opd
prints a note at the start of such a run.
"""

import torch

from nanoopd.logprobs import gather_logprobs


def returns_to_go(r: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """R_t = sum_{t' >= t} gamma^(t'-t) r_t' * mask_t', zero where mask_t == 0.

    r, mask: (B, T). Returns (B, T). Computed by a backward scan in float32 (float64 if given float64; T is small).
    Masked positions neither contribute a cost nor break the discount chain of later tokens
    (the chain runs over time steps, masked ones simply add nothing).
    """
    # lab:g_gamma begin
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    dtype = torch.promote_types(r.dtype, torch.float32)  # float32, or float64 when given float64
    r = r.to(dtype) * mask.to(dtype)  # (B, T)
    if gamma == 0.0:
        return r
    out = torch.empty_like(r)  # (B, T)
    acc = torch.zeros_like(r[:, 0])  # (B,)
    for t in range(r.shape[1] - 1, -1, -1):
        acc = r[:, t] + gamma * acc
        out[:, t] = acc
    return out * mask.to(dtype)
    # lab:g_gamma end


def g_gamma_surrogate(logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor,
                      gamma: float, clamp: float | None = None) -> torch.Tensor:
    """Per-sequence surrogate whose gradient is g_gamma.

        L(y) = sum_t sg(R_t^gamma) * log pi(y_t | c_t)      =>   grad L(y) = g_gamma(y)

    logp: (B, T) student log-probs of the sampled tokens (with grad); logq: (B, T) teacher
    log-probs (treated as constants); mask: (B, T). `clamp` clips every r_t to [-clamp, clamp]
    before the return is formed. Returns (B,).
    """
    # lab:g_gamma begin
    dtype = torch.promote_types(logp.dtype, torch.float32)  # at least float32; float64 stays float64
    r = logp.detach().to(dtype) - logq.detach().to(dtype)  # (B, T) per-token cost
    if clamp is not None:
        r = r.clamp(-clamp, clamp)
    R = returns_to_go(r, mask, gamma)  # (B, T)
    return (R * logp.to(dtype) * mask.to(dtype)).sum(dim=1)  # (B,)
    # lab:g_gamma end


# ----------------------------------------------------------------------------------------------
# The same estimators on logits: what the GPT training loop calls (through objectives.py).


def sampled_logprobs(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y_t|c_t), log q(y_t|c_t)) of the sampled tokens, each (B, T); teacher detached."""
    index = tokens.unsqueeze(-1)  # (B, T, 1)
    logp = gather_logprobs(student_logits, index).squeeze(-1)  # (B, T)
    logq = gather_logprobs(teacher_logits.detach(), index).squeeze(-1)  # (B, T)
    return logp, logq


def sampled_token_surrogate(logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor,
                            clamp: float | None = None,
                            baseline: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence surrogate of sampled-token OPD, (B,).

        A_t = sg(-r_t + b_t),        L(y) = -sum_t A_t log pi(y_t | c_t)

    r_t is first clipped to [-clamp, clamp] when `clamp` is given. `baseline` b_t (B, T) must be
    a function of the prefix c_t only: then E_{y_t ~ pi}[b_t s_t] = b_t grad sum_v pi(v|c_t) = 0
    and the estimator stays unbiased for the token-level objective. vOPD takes
    b_t = KL(pi(.|c_t) || q(.|c_t)) = E_{v ~ pi}[r(v)], the mean cost at c_t, so that A_t is the
    centred cost: same expected gradient, and typically a smaller variance, by a lot when the
    costs r(v) are far from 0 on average (a student far from its teacher).

    Without a baseline this is g_0; with one it is g_0 of the centred cost r_t - b_t, so it is
    handed to g_gamma_surrogate as a teacher log-prob shifted by that amount.
    """
    # lab:g_gamma begin
    if clamp is not None and not clamp > 0:
        raise ValueError(f"clamp must be a positive number (or None for no clamp), got {clamp}")
    r = logp.detach() - logq.detach()  # (B, T) per-token cost
    if clamp is not None:
        r = r.clamp(-clamp, clamp)
    if baseline is not None:
        r = r - baseline.detach()  # (B, T)
    return g_gamma_surrogate(logp, logp.detach() - r, mask, gamma=0.0)  # (B,)
    # lab:g_gamma end


def discounted_opd(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   tokens: torch.Tensor, mask: torch.Tensor, gamma: float,
                   clamp: float | None = None) -> torch.Tensor:
    """The g_gamma family on logits: per-sequence surrogate (B,) whose gradient is g_gamma.

    student_logits, teacher_logits: (B, T, V) at the positions that predict tokens (B, T);
    mask: (B, T). gamma = 0 is sampled-token OPD, gamma = 1 the REINFORCE estimator of the
    gradient of the sequence reverse KL (see sequence_kl.py).
    """
    logp, logq = sampled_logprobs(student_logits, teacher_logits, tokens)  # (B, T) each
    return g_gamma_surrogate(logp, logq, mask, gamma, clamp)  # (B,)
