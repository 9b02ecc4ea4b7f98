"""
Sequence-level reverse KL, full-vocabulary token-level reverse KL, and the generalised JSD.

Notation (docs/design.md#notation): student pi, teacher q (frozen), prefix c_t = (x, y_<t), cost
r_t = log pi(y_t|c_t) - log q(y_t|c_t), score s_t = grad log pi(y_t|c_t).

1. Sequence-level reverse KL. The quantity OPD wants to minimise is

       J(theta) = KL(pi(.|x) || q(.|x)) = E_{y ~ pi} [ sum_t r_t ].

   Its gradient is E[ sum_t r_t * sum_t' s_t' ] (the `+1` from differentiating log pi inside the
   expectation vanishes, E[s_t] = 0), and terms with t' < t also vanish in expectation, so

       grad J = E[ sum_t ( sum_{t' >= t} r_t' ) s_t ] = E[ g_1 ],

   the REINFORCE estimator: the g_gamma family of sampled_token.py at gamma = 1. It is unbiased
   but its variance grows like T^4 against T^2 for gamma = 0.

2. Full-vocabulary token-level reverse KL, at every visited prefix c_t,

       sum_t KL(pi(.|c_t) || q(.|c_t)) = sum_t sum_v pi(v|c_t) (log pi(v|c_t) - log q(v|c_t)),

   differentiated directly: the exact gradient of the token-level objective at the visited
   prefixes, i.e. the expectation of sampled-token OPD over y_t with zero sampling noise (it still
   ignores the future-reward coupling, like gamma = 0).

3. Generalised Jensen-Shannon divergence JSD(beta) (GKD). Here P = q is the TEACHER and
   Q = pi is the STUDENT:

       JSD(beta) = beta KL(P || M) + (1 - beta) KL(Q || M),     M = beta P + (1 - beta) Q.

   Direction of beta (libraries disagree; this is the convention here, the same as GKD's):
     beta -> 0:  JSD(beta) = beta KL(P || Q) + O(beta^2): its gradient is beta times the gradient
                 of the FORWARD KL(teacher || student) (mode-covering, as in SFT on teacher data);
     beta -> 1:  JSD(beta) = (1 - beta) KL(Q || P) + O((1 - beta)^2): its gradient is (1 - beta)
                 times the gradient of the REVERSE KL(student || teacher) (mode-seeking, as OPD);
     beta = 0.5: the symmetric Jensen-Shannon divergence.
   At exactly beta = 0 or 1 the formula is identically 0, so those two values are taken to mean
   their limits' directions: beta = 0 is the forward KL(P || Q), beta = 1 the reverse KL(Q || P).
"""

import math

import torch

from nanoopd.sampled_token import discounted_opd


def token_kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_v a(v) (log a(v) - log b(v)) at every position, from full log-probs
    (B, T, V). token_kl(log pi, log q) is the per-token reverse KL. Returns (B, T)."""
    return (logp_a.exp() * (logp_a - logp_b)).sum(-1)  # (B, T)


def sequence_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                        tokens: torch.Tensor, mask: torch.Tensor,
                        gamma: float = 1.0) -> torch.Tensor:
    """Per-sequence surrogate (B,) whose gradient is the REINFORCE estimate g_1 of grad J.

    gamma < 1 discounts the return-to-go (the g_gamma family, biased towards sampled-token OPD).
    """
    return discounted_opd(student_logits, teacher_logits, tokens, mask, gamma)  # (B,)


def full_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """sum_v pi(v|c_t) (log pi(v|c_t) - log q(v|c_t)) at every position, (B, T), full autograd."""
    student_logp = torch.log_softmax(student_logits, dim=-1)  # (B, T, V)
    teacher_logp = torch.log_softmax(teacher_logits.detach(), dim=-1)  # (B, T, V)
    return token_kl(student_logp, teacher_logp)  # (B, T)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    beta: float) -> torch.Tensor:
    """JSD(beta) between P = teacher and Q = student at every position, (B, T).

    beta near 0 behaves like the forward KL(teacher || student), beta near 1 like the reverse
    KL(student || teacher); beta = 0 and beta = 1 exactly are those two KLs (module docstring).
    """
    student_logp = torch.log_softmax(student_logits, dim=-1)  # (B, T, V)  log Q
    teacher_logp = torch.log_softmax(teacher_logits.detach(), dim=-1)  # (B, T, V)  log P
    return jsd_from_logprobs(student_logp, teacher_logp, beta)  # (B, T)


def jsd_from_logprobs(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """generalized_jsd from the log-softmaxes (B, T, V) of student (log Q) and teacher (log P)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] (0: forward KL, 1: reverse KL), got {beta}")
    teacher_logp = teacher_logp.detach()
    if beta == 0.0:
        return token_kl(teacher_logp, student_logp)  # (B, T)  KL(P || Q)
    if beta == 1.0:
        return token_kl(student_logp, teacher_logp)  # (B, T)  KL(Q || P)
    mixture_logp = torch.logsumexp(torch.stack([teacher_logp + math.log(beta),
                                                student_logp + math.log(1.0 - beta)]),
                                   dim=0)  # (B, T, V)  log M
    return (beta * token_kl(teacher_logp, mixture_logp)
            + (1.0 - beta) * token_kl(student_logp, mixture_logp))  # (B, T)
