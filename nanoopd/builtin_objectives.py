"""
The project's own objectives, registered by name (the calling convention, the registry and the
shared plumbing are objectives.py's; the formulas live with their concepts: sampled_token.py,
sequence_kl.py, topk.py). Each wrapper resolves its options, prepares the batch, applies its
formula at every response position and finishes with the per-token average and the stats.

  sampled_token      sg(-(r_t - b(c_t))) log pi(y_t|c_t): the token-level reverse KL K's REINFORCE form
  sequence_kl        g_gamma (gamma = 1: REINFORCE on the sequence KL J)
  full_reverse_kl    sum_v pi (log pi - log q) at every prefix: grad K exactly
  forward_kl         sum_v q (log q - log pi) at every prefix: grad F exactly, d/dlogits = pi - q
  jsd                generalised JSD(beta), P = teacher, Q = student
  topk_unnormalized, topk_stopgrad, topk_renorm: the reverse KL on the top-K support S_t
  sft                -log pi(y_t|c_t), the next-token cross-entropy of the rows' own tokens (no teacher)

sampled_token and sequence_kl are registered on_policy (right only for y ~ pi); the others are
exact at whatever prefixes the rows hold (objectives.py).

docs/design.md#the-objectives gives each one's expected gradient and bias.
"""

import torch

from nanoopd.objectives import (CLAMP, K, TOPK_OPTIONS, Option, finish, prepare, register, resolve_options,
                                sampled, token_sum, topk_objective)
from nanoopd.sampled_token import g_gamma_surrogate, sampled_token_surrogate
from nanoopd.sequence_kl import jsd_from_logprobs, token_kl
from nanoopd.topk import topk_renormalized, topk_stopgrad, topk_support, topk_unnormalized

BASELINES = (False, True, "full", "topk")  # sampled_token's baseline option (True = "full")


@register("sampled_token", on_policy=True, clamp=CLAMP, k=K,
          baseline=Option(False, "vOPD: subtract b(c_t) = KL(pi || q)(c_t) from r_t (True or 'full'; "
                                 "'topk': its part on the top-K, from Python)", bool))
def sampled_token_loss(student_logits, teacher_logits, tokens, mask, **options):
    """Sampled-token OPD. clamp: clip r_t to [-clamp, clamp]; baseline: vOPD, subtract a b(c_t)
    from r_t (unbiased, lower variance): True or "full" b = KL(pi(.|c_t) || q(.|c_t)), "topk" its
    part on the teacher's top-k, b = sum_S pi (log pi - log q) (k columns read, option k). Unbiased
    for the token-level reverse KL only when y ~ pi (T = 1, no top-k/top-p)."""
    opt = resolve_options("sampled_token", options)
    if not any(opt["baseline"] is b or (isinstance(b, str) and opt["baseline"] == b) for b in BASELINES):
        raise ValueError(f"option baseline must be True or False, or 'full' (= True) or 'topk', "
                         f"got {opt['baseline']!r}")
    if opt["k"] is not None and opt["baseline"] != "topk":
        raise ValueError(f"option k sets the support of baseline='topk'; got k={opt['k']!r} with "
                         f"baseline={opt['baseline']!r}")
    batch = prepare(student_logits, teacher_logits, tokens, mask, opt)
    logp, logq = sampled(batch)  # (B, T) each
    baseline = None
    if opt["baseline"] is True or opt["baseline"] == "full":
        with torch.no_grad():
            baseline = token_kl(batch.student_logp, batch.teacher_logp)  # (B, T)
    elif opt["baseline"] == "topk":
        k = min(16, batch.student.shape[-1]) if opt["k"] is None else opt["k"]
        index, member = topk_support(batch.student, batch.teacher, batch.tokens, k)  # (B, T, k)
        with torch.no_grad():
            baseline = topk_unnormalized(batch.student, batch.teacher, index, member)  # (B, T)
    per_seq = sampled_token_surrogate(logp, logq, batch.mask, opt["clamp"], baseline)  # (B,)
    return finish(per_seq.sum(), batch)


@register("sequence_kl", claim="J", on_policy=True,
          gamma=Option(1.0, "discount in [0, 1] of the return-to-go (0: sampled-token OPD, 1: sequence KL)"))
def sequence_kl_loss(student_logits, teacher_logits, tokens, mask, **options):
    """The g_gamma family: gamma = 1 (default) is REINFORCE on the sequence reverse KL, unbiased
    only when y ~ pi (T = 1, no top-k/top-p)."""
    opt = resolve_options("sequence_kl", options)
    if not 0.0 <= opt["gamma"] <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1] (0: sampled-token OPD, 1: sequence KL), "
                         f"got {opt['gamma']}")
    batch = prepare(student_logits, teacher_logits, tokens, mask, opt)
    logp, logq = sampled(batch)  # (B, T) each
    per_seq = g_gamma_surrogate(logp, logq, batch.mask, opt["gamma"])  # (B,)  (sequence_kl.sequence_reverse_kl)
    return finish(per_seq.sum(), batch)


@register("full_reverse_kl")
def full_reverse_kl_loss(student_logits, teacher_logits, tokens, mask, **options):
    """Full-vocabulary token-level reverse KL, differentiated directly."""
    batch = prepare(student_logits, teacher_logits, tokens, mask, resolve_options("full_reverse_kl", options))
    return finish(token_sum(token_kl(batch.student_logp, batch.teacher_logp), batch), batch)


@register("forward_kl", claim="F")
def forward_kl_loss(student_logits, teacher_logits, tokens, mask, **options):
    """Full-vocabulary token-level forward KL(q || pi), differentiated directly: the teacher is a
    constant, so the gradient is -sum_v q grad log pi, pi - q in the student's logits."""
    batch = prepare(student_logits, teacher_logits, tokens, mask, resolve_options("forward_kl", options))
    return finish(token_sum(token_kl(batch.teacher_logp, batch.student_logp), batch), batch)  # KL(q || pi)


@register("jsd", claim=None,
          beta=Option(0.5, "JSD mix in [0, 1]: -> 0 the forward KL, -> 1 the reverse KL"))
def jsd_loss(student_logits, teacher_logits, tokens, mask, **options):
    """Generalised JSD(beta) with P = teacher, Q = student: beta -> 0 forward KL, -> 1 reverse."""
    opt = resolve_options("jsd", options)
    batch = prepare(student_logits, teacher_logits, tokens, mask, opt)
    per_token = jsd_from_logprobs(batch.student_logp, batch.teacher_logp, opt["beta"])  # (B, T)
    return finish(token_sum(per_token, batch), batch)


@register("topk_unnormalized", **TOPK_OPTIONS)
def topk_unnormalized_loss(student_logits, teacher_logits, tokens, mask, **options):
    """Unnormalised top-K reverse KL: biased, drains mass out of S (kept to show the failure)."""
    return topk_objective("topk_unnormalized", topk_unnormalized, student_logits, teacher_logits, tokens,
                          mask, options)


@register("topk_stopgrad", **TOPK_OPTIONS)
def topk_stopgrad_loss(student_logits, teacher_logits, tokens, mask, **options):
    """Stop-gradient top-K reverse KL: the full-vocabulary gradient truncated to S."""
    return topk_objective("topk_stopgrad", topk_stopgrad, student_logits, teacher_logits, tokens, mask,
                          options)


@register("topk_renorm", **TOPK_OPTIONS)
def topk_renorm_loss(student_logits, teacher_logits, tokens, mask, **options):
    """Renormalised top-K reverse KL(pi_hat || q_hat) on S (local support matching)."""
    return topk_objective("topk_renorm", topk_renormalized, student_logits, teacher_logits, tokens, mask,
                          options)


@register("sft", claim=None, uses_teacher=False)
def sft_loss(student_logits, teacher_logits, tokens, mask, **options):
    """Next-token cross-entropy -log pi(y_t|c_t) of the rows' own tokens; the teacher's logits are
    only checked and logged (stats), never part of the loss. Its gradient, pi - onehot(y_t) in the
    logits, averages to 0 over y_t ~ pi: on the student's own samples it has no expected signal;
    on teacher samples it is SeqKD, -grad log pi(y|x) with y ~ q (nanoopd/sft.py trains the same
    loss on the teacher's traces)."""
    batch = prepare(student_logits, teacher_logits, tokens, mask, resolve_options("sft", options))
    logp, _ = sampled(batch)  # (B, T)
    return finish(token_sum(-logp, batch), batch)
