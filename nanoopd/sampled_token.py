"""
Sampled-token on-policy distillation and the discounted family g_gamma.

Notation (DESIGN.md section 2): the student pi samples y ~ pi(.|x); at every response position
t the per-token log-ratio is a *cost*

    r_t = log pi(y_t | c_t) - log q(y_t | c_t),        s_t = grad log pi(y_t | c_t).

The discounted estimator of the gradient of the sequence reverse KL J = E_y[sum_t r_t] is

    g_gamma = sum_t ( sum_{t' >= t} gamma^(t'-t) r_t' ) s_t = sum_t R_t^gamma s_t .

gamma = 0 is sampled-token OPD (biased: it drops the future-reward coupling), gamma = 1 is the
unbiased REINFORCE estimator of grad J. Everything here works on per-token log-probs alone, so the
same code serves the GPT, the tabular toy and the Gaussian-policy toy.
"""

import torch


def returns_to_go(r: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """R_t = sum_{t' >= t} gamma^(t'-t) r_t' * mask_t', zero where mask_t == 0.

    r, mask: (B, T). Returns (B, T). Computed by a backward scan in float32 (T is small).
    Masked positions neither contribute a cost nor break the discount chain of later tokens
    (the chain runs over time steps, masked ones simply add nothing).
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    r = r.float() * mask.float()  # (B, T)
    if gamma == 0.0:
        return r
    out = torch.empty_like(r)  # (B, T)
    acc = torch.zeros_like(r[:, 0])  # (B,)
    for t in range(r.shape[1] - 1, -1, -1):
        acc = r[:, t] + gamma * acc
        out[:, t] = acc
    return out * mask.float()


def g_gamma_surrogate(logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor,
                      gamma: float, clamp: float | None = None) -> torch.Tensor:
    """Per-sequence surrogate whose gradient is g_gamma.

        L(y) = sum_t sg(R_t^gamma) * log pi(y_t | c_t)      =>   grad L(y) = g_gamma(y)

    logp: (B, T) student log-probs of the sampled tokens (with grad); logq: (B, T) teacher
    log-probs (treated as constants); mask: (B, T). `clamp` clips every r_t to [-clamp, clamp]
    before the return is formed. Returns (B,).
    """
    r = (logp.detach().float() - logq.detach().float())  # (B, T) per-token cost
    if clamp is not None:
        r = r.clamp(-clamp, clamp)
    R = returns_to_go(r, mask, gamma)  # (B, T)
    return (R * logp.float() * mask.float()).sum(dim=1)  # (B,)
