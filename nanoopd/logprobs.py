"""
Per-token log-probabilities, the arithmetic every objective (objectives.py and the files of its
forms) and every diagnostic (metrics.py) shares.

    log p(v | c_t) = logit(v) - logsumexp_v' logit(v')          (gather_logprobs: K columns only)
    r_t = log pi(y_t | c_t) - log q(y_t | c_t)                   (sampled_logratio: the per-token cost)
"""

import torch


def gather_logprobs(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) read at the columns `index`, without a full (B, T, V) log-softmax.

    logits: (B, T, V) float; index: (B, T, K) int64. Returns (B, T, K):
    log p(v) = logit(v) - logsumexp_v' logit(v'). Gradients flow into every logit through the
    normaliser, exactly as for the full log-softmax.
    """
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)  # (B, T, 1)
    return logits.gather(-1, index) - log_z  # (B, T, K)


def sampled_logratio(student_logp: torch.Tensor, teacher_logp: torch.Tensor,
                     tokens: torch.Tensor) -> torch.Tensor:
    """r_t = log pi(y_t|c_t) - log q(y_t|c_t) from full log-probs (B, T, V). Returns (B, T)."""
    index = tokens.unsqueeze(-1)  # (B, T, 1)
    return (student_logp.gather(-1, index) - teacher_logp.gather(-1, index)).squeeze(-1)  # (B, T)
