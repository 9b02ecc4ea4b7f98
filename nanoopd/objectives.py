"""
One calling convention for every distillation objective, and the registry that names them.

    loss, stats = OBJECTIVES[name](student_logits, teacher_logits, tokens, mask, **options)

student_logits, teacher_logits: (B, T, V) at the positions that predict tokens (B, T), the
response y sampled from the student pi; mask: (B, T), bool or 0/1, True on response tokens.
Every objective returns a surrogate loss whose gradient is its estimator, averaged per response
token (sum over masked tokens / number of masked tokens; an all-masked batch gives a loss of 0
whose gradients are 0), and stats, a dict of python floats: loss, kl (mean per-token reverse KL
of the full distributions), logratio_max_abs and logratio_pos_share (of r_t on the sampled
tokens), n_tokens, plus a few per objective. The teacher is always a constant (detached), and
log-softmaxes and losses are computed in float32 at least (float64 inputs stay float64).

  name               estimator (DESIGN.md section 3)                options
  sampled_token      A_t = sg(-r_t [+ b(c_t)]) on y_t, vOPD b =      clamp=None, baseline=False,
                     KL(pi||q)(c_t) ("full") or its top-k part      k (for baseline="topk")
  sequence_kl        g_gamma, REINFORCE on sum_t r_t at gamma = 1   gamma=1.0
  full_reverse_kl    sum_v pi (log pi - log q), exact gradient      -
  jsd                generalised JSD(beta), P = teacher, Q = student beta=0.5
  topk_unnormalized  sum_S pi (log pi - log q)       (biased)       k=16, support='teacher',
  topk_stopgrad      sum_S pi (sg(log pi) - log q)                  add_sampled=False
  topk_renorm        KL(pi_hat || q_hat) on S

and what other frameworks ship (field_estimators.py; the audit, toy/audit.py, says what each follows):
  kl_k1              r_t on y_t (expected gradient 0)               -
  kl_k2              r_t^2 / 2 (follows the reverse KL)             -
  kl_k3              exp(-r_t) - 1 + r_t (follows the FORWARD KL)   clamp=None
  topk_forward_kl    sum_S q (log q - max(log pi, m))               k, m=None, support, add_sampled
  topk_tail          KL on S + one tail bucket                      k, support, add_sampled
  topk_bregman       sum_S [pi (log pi - log q) - pi + q]           k, support, add_sampled

(top-K: k defaults to 16, or V if the vocabulary is smaller; support is 'teacher', 'student' or
'intersection'; add_sampled also puts the sampled token y_t in S_t.)

Every estimator assumes the response was sampled from pi itself (temperature 1, no top-k or top-p):
sampled at other settings, sampled_token and sequence_kl estimate the gradient under that sampling
distribution, not grad KL(pi || q), and every objective sees that sampler's prefixes
(sampled_token.py; train_opd prints a note).

Every objective also takes mask_tokens, an iterable of token ids: positions whose sampled token
is one of them are removed from the mask (special-token masking, DESIGN.md section 3), so that a
token the teacher never saw cannot carry a log-ratio of tens of nats into the batch.

The training step's hot path (opd.opd_step) also passes logp=(student_logp, teacher_logp): the
float32 log-softmaxes of the same logits (B, T, V), the student's with its graph, computed once per
step and shared with the diagnostics. Given logp, an objective computes no log-softmax of its own,
does not re-check the token ids and mask values (they come from the sampler; shapes are still
checked), and returns stats whose values are 0-dim tensors (no host sync): loss, n_tokens and its
own extras, without kl / logratio_max_abs / logratio_pos_share, which the caller's diagnostics
report. Without logp (any other caller) nothing changes: stats are python floats, as above.
An objective added to the registry gets this by building its Batch with _prepare (which takes the
logp option) and ending with _finish.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch

from nanoopd.metrics import logratio_stats, masked_average
from nanoopd.sampled_token import g_gamma_surrogate, sampled_token_surrogate
from nanoopd.sequence_kl import jsd_from_logprobs, token_kl
from nanoopd.special_tokens import contains
from nanoopd.topk import (support_mass, topk_renormalized, topk_stopgrad, topk_support,
                          topk_unnormalized)
from nanoopd import field_estimators as field

OBJECTIVES: dict[str, Callable] = {}


def register(name: str):
    """Decorator: add an objective to OBJECTIVES under `name`."""
    def add(fn):
        OBJECTIVES[name] = fn
        return fn
    return add


def get_objective(name: str) -> Callable:
    """OBJECTIVES[name], with an error that lists the valid names."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def check_objective(name: str, options: dict, vocab_size: int) -> None:
    """Run objective `name` once on a dummy batch so that a bad option fails now, with the
    objective's own message, rather than after the first rollout. Raises ValueError."""
    logits = torch.zeros(1, 2, vocab_size)  # (B=1, T=2, V)
    get_objective(name)(logits, logits, torch.zeros(1, 2, dtype=torch.long),
                        torch.ones(1, 2, dtype=torch.bool), **options)


# ----------------------------------------------------------------------------------------------
# shared plumbing: options, input checks, masking, normalisation, stats


def _options(name: str, given: dict, **defaults) -> dict:
    """The objective's options: defaults overridden by `given`; unknown names are an error.
    mask_tokens and logp (the hot path's shared log-softmaxes) are options of every objective."""
    defaults["mask_tokens"] = None
    defaults["logp"] = None
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"objective {name!r} got unknown option(s) {unknown}; "
                         f"its options are {sorted(defaults)}")
    return {**defaults, **given}


def _check_bool(option: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"option {option} must be True or False, got {value!r}")


class Batch(NamedTuple):
    student: torch.Tensor  # (B, T, V) float32/float64 logits, with grad
    teacher: torch.Tensor  # (B, T, V) float32/float64 logits, detached
    tokens: torch.Tensor  # (B, T) int64, 0 at masked positions
    mask: torch.Tensor  # (B, T) bool
    student_logp: torch.Tensor  # (B, T, V) log pi = log_softmax(student), with grad: computed once
    teacher_logp: torch.Tensor  # (B, T, V) log q = log_softmax(teacher), detached: computed once
    hot: bool  # True when the caller passed logp: stats stay tensors (see the module docstring)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _prepare(student_logits, teacher_logits, tokens, mask, mask_tokens, logp=None) -> Batch:
    """Check that the inputs line up, apply mask_tokens, cast, detach the teacher, take each
    model's log-softmax (or the given logp = (student_logp, teacher_logp), trusted: no value check)."""
    if student_logits.dim() != 3 or teacher_logits.dim() != 3:
        raise ValueError(f"student_logits and teacher_logits must be (B, T, V), got shapes "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"teacher and student vocabulary sizes differ (student V="
                         f"{student_logits.shape[-1]}, teacher V={teacher_logits.shape[-1]}): "
                         f"both must score the same tokenizer's ids; if one model pads its "
                         f"vocabulary, slice both logits to the real vocabulary size first")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits must cover the same (B, T) positions, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if tokens.shape != student_logits.shape[:2] or mask.shape != student_logits.shape[:2]:
        raise ValueError(f"tokens and mask must be (B, T) = {tuple(student_logits.shape[:2])} like "
                         f"the logits (logits at t predict tokens[:, t]), got tokens "
                         f"{tuple(tokens.shape)} and mask {tuple(mask.shape)}")
    if tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
    if logp is None and mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must be bool or hold only 0/1 values (1 = response token)")
    mask = mask.bool()  # (B, T)
    if mask_tokens is not None:
        # lab:masking begin
        mask = mask & ~contains(tokens, mask_tokens)  # (B, T)
        # lab:masking end
    vocab = student_logits.shape[-1]
    if logp is None:
        kept = tokens[mask]
        if kept.numel() and (kept.min() < 0 or kept.max() >= vocab):
            raise ValueError(f"tokens at masked-in positions must lie in [0, {vocab}), got "
                             f"[{kept.min().item()}, {kept.max().item()}]")
    tokens = tokens.long().masked_fill(~mask, 0)  # (B, T)  ids at masked positions are never read
    student, teacher = _at_least_float32(student_logits), _at_least_float32(teacher_logits.detach())
    if logp is None:
        student_logp, teacher_logp = torch.log_softmax(student, dim=-1), torch.log_softmax(teacher, dim=-1)
    else:
        student_logp, teacher_logp = logp
        if student_logp.shape != student.shape or teacher_logp.shape != teacher.shape:
            raise ValueError(f"logp must be the log-softmaxes of the logits, shapes {tuple(student.shape)}, got "
                             f"{tuple(student_logp.shape)} and {tuple(teacher_logp.shape)}")
    return Batch(student, teacher, tokens, mask, student_logp, teacher_logp.detach(), logp is not None)


def _finish(total: torch.Tensor, batch: Batch, **extra: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Per-token loss = total / number of masked tokens, and the stats every objective logs
    (extra: 0-dim tensors; python floats unless batch.hot)."""
    n_tokens = batch.mask.sum()
    loss = total / n_tokens.clamp(min=1)  # () ; 0 with zero gradients when all is masked out
    if batch.hot:
        return loss, {"loss": loss.detach(), "n_tokens": n_tokens.float(), **extra}
    with torch.no_grad():
        stats = logratio_stats(batch.student_logp.detach(), batch.teacher_logp, batch.tokens, batch.mask)
    return loss, {"loss": loss.item(), **stats, "n_tokens": float(n_tokens),
                  **{k: float(v) for k, v in extra.items()}}


def _sampled(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y_t|c_t), log q(y_t|c_t)) of the sampled tokens, (B, T) each, read off the shared
    log-softmaxes (sampled_token.sampled_logprobs computes the same from logits)."""
    index = batch.tokens.unsqueeze(-1)  # (B, T, 1)
    return batch.student_logp.gather(-1, index).squeeze(-1), batch.teacher_logp.gather(-1, index).squeeze(-1)


def _token_sum(per_token: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Sum of a per-position loss (B, T) over the masked positions."""
    return (per_token * batch.mask).sum()


# ----------------------------------------------------------------------------------------------
# the objectives


BASELINES = (False, True, "full", "topk")  # sampled_token's baseline option (True = "full")


@register("sampled_token")
def sampled_token_loss(student_logits, teacher_logits, tokens, mask, **options):
    """Sampled-token OPD. clamp: clip r_t to [-clamp, clamp]; baseline: vOPD, subtract a b(c_t)
    from r_t (unbiased, lower variance): True or "full" b = KL(pi(.|c_t) || q(.|c_t)), "topk" its
    part on the teacher's top-k, b = sum_S pi (log pi - log q) (k columns read, option k). Unbiased
    for the token-level reverse KL only when y ~ pi (T = 1, no top-k/top-p)."""
    opt = _options("sampled_token", options, clamp=None, baseline=False, k=None)
    if not any(opt["baseline"] is b or (isinstance(b, str) and opt["baseline"] == b) for b in BASELINES):
        raise ValueError(f"option baseline must be True or False, or 'full' (= True) or 'topk', "
                         f"got {opt['baseline']!r}")
    if opt["k"] is not None and opt["baseline"] != "topk":
        raise ValueError(f"option k sets the support of baseline='topk'; got k={opt['k']!r} with "
                         f"baseline={opt['baseline']!r}")
    batch = _prepare(student_logits, teacher_logits, tokens, mask, opt["mask_tokens"], opt["logp"])
    logp, logq = _sampled(batch)  # (B, T) each
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
    return _finish(per_seq.sum(), batch)


@register("sequence_kl")
def sequence_kl_loss(student_logits, teacher_logits, tokens, mask, **options):
    """The g_gamma family: gamma = 1 (default) is REINFORCE on the sequence reverse KL, unbiased
    only when y ~ pi (T = 1, no top-k/top-p)."""
    opt = _options("sequence_kl", options, gamma=1.0)
    if not 0.0 <= opt["gamma"] <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1] (0: sampled-token OPD, 1: sequence KL), "
                         f"got {opt['gamma']}")
    batch = _prepare(student_logits, teacher_logits, tokens, mask, opt["mask_tokens"], opt["logp"])
    logp, logq = _sampled(batch)  # (B, T) each
    per_seq = g_gamma_surrogate(logp, logq, batch.mask, opt["gamma"])  # (B,)  (sequence_kl.sequence_reverse_kl)
    return _finish(per_seq.sum(), batch)


@register("full_reverse_kl")
def full_reverse_kl_loss(student_logits, teacher_logits, tokens, mask, **options):
    """Full-vocabulary token-level reverse KL, differentiated directly."""
    opt = _options("full_reverse_kl", options)
    batch = _prepare(student_logits, teacher_logits, tokens, mask, opt["mask_tokens"], opt["logp"])
    return _finish(_token_sum(token_kl(batch.student_logp, batch.teacher_logp), batch), batch)


@register("jsd")
def jsd_loss(student_logits, teacher_logits, tokens, mask, **options):
    """Generalised JSD(beta) with P = teacher, Q = student: beta -> 0 forward KL, -> 1 reverse."""
    opt = _options("jsd", options, beta=0.5)
    batch = _prepare(student_logits, teacher_logits, tokens, mask, opt["mask_tokens"], opt["logp"])
    per_token = jsd_from_logprobs(batch.student_logp, batch.teacher_logp, opt["beta"])  # (B, T)
    return _finish(_token_sum(per_token, batch), batch)


def _topk(name: str, form: Callable, student_logits, teacher_logits, tokens, mask, options, **defaults):
    """The top-K forms share everything but the per-position formula `form` (and its own options,
    `defaults`: the field's forms have some)."""
    opt = _options(name, options, k=None, support="teacher", add_sampled=False, **defaults)
    _check_bool("add_sampled", opt["add_sampled"])
    batch = _prepare(student_logits, teacher_logits, tokens, mask, opt["mask_tokens"], opt["logp"])
    k = min(16, batch.student.shape[-1]) if opt["k"] is None else opt["k"]
    index, member = topk_support(batch.student, batch.teacher, batch.tokens, k,
                                 opt["support"], opt["add_sampled"])  # (B, T, K') each
    per_token = form(batch.student, batch.teacher, index, member,
                     **{key: opt[key] for key in defaults})  # (B, T)
    mass_pi, mass_q = support_mass(batch.student, batch.teacher, index, member)  # (B, T) each
    return _finish(_token_sum(per_token, batch), batch,
                   support_mass_student=masked_average(mass_pi, batch.mask),
                   support_mass_teacher=masked_average(mass_q, batch.mask))


@register("topk_unnormalized")
def topk_unnormalized_loss(student_logits, teacher_logits, tokens, mask, **options):
    """Unnormalised top-K reverse KL: biased, drains mass out of S (kept to show the failure)."""
    return _topk("topk_unnormalized", topk_unnormalized, student_logits, teacher_logits, tokens,
                 mask, options)


@register("topk_stopgrad")
def topk_stopgrad_loss(student_logits, teacher_logits, tokens, mask, **options):
    """Stop-gradient top-K reverse KL: the full-vocabulary gradient truncated to S."""
    return _topk("topk_stopgrad", topk_stopgrad, student_logits, teacher_logits, tokens, mask,
                 options)


@register("topk_renorm")
def topk_renorm_loss(student_logits, teacher_logits, tokens, mask, **options):
    """Renormalised top-K reverse KL(pi_hat || q_hat) on S (local support matching)."""
    return _topk("topk_renorm", topk_renormalized, student_logits, teacher_logits, tokens, mask,
                 options)


# ----------------------------------------------------------------------------------------------
# what other frameworks ship (field_estimators.py): registered so that the audit can test them


def _sampled_field(name: str, form: Callable, student_logits, teacher_logits, tokens, mask,
                   options, **defaults):
    """k1/k2/k3: a per-position formula of (log pi(y_t), log q(y_t)) on the sampled token."""
    opt = _options(name, options, **defaults)
    extra = {key: opt[key] for key in defaults}
    if extra.get("clamp") is not None and not extra["clamp"] > 0:
        raise ValueError(f"clamp must be a positive number (or None for no clamp), got {extra['clamp']}")
    batch = _prepare(student_logits, teacher_logits, tokens, mask, opt["mask_tokens"], opt["logp"])
    logp, logq = _sampled(batch)  # (B, T) each
    return _finish(_token_sum(form(logp, logq, **extra), batch), batch)


@register("kl_k1")
def kl_k1_loss(student_logits, teacher_logits, tokens, mask, **options):
    """k1 = r_t as a loss (RL frameworks' KL-loss option 'kl'): expected gradient 0."""
    return _sampled_field("kl_k1", field.kl_k1, student_logits, teacher_logits, tokens, mask, options)


@register("kl_k2")
def kl_k2_loss(student_logits, teacher_logits, tokens, mask, **options):
    """k2 = r_t^2 / 2 as a loss ('mse'): expected gradient grad of the token-level reverse KL."""
    return _sampled_field("kl_k2", field.kl_k2, student_logits, teacher_logits, tokens, mask, options)


@register("kl_k3")
def kl_k3_loss(student_logits, teacher_logits, tokens, mask, **options):
    """k3 = exp(-r_t) - 1 + r_t as a loss ('low_var_kl'), clipped to [-clamp, clamp] when clamp
    is given: expected gradient grad of the token-level FORWARD KL(q || pi)."""
    return _sampled_field("kl_k3", field.kl_k3, student_logits, teacher_logits, tokens, mask, options,
                          clamp=None)


@register("topk_forward_kl")
def topk_forward_kl_loss(student_logits, teacher_logits, tokens, mask, **options):
    """Forward KL on the teacher's top-K, log pi clamped from below at m (off by default)."""
    m = options.get("m")
    if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not m < 0):
        raise ValueError(f"m (the lower clamp of log pi) must be a negative number or None, got {m!r}")
    return _topk("topk_forward_kl", field.topk_forward_kl, student_logits, teacher_logits,
                 tokens, mask, options, m=None)


@register("topk_tail")
def topk_tail_loss(student_logits, teacher_logits, tokens, mask, **options):
    """Reverse KL of the distributions coarsened to the top-K plus one tail bucket."""
    return _topk("topk_tail", field.topk_tail, student_logits, teacher_logits, tokens, mask,
                 options)


@register("topk_bregman")
def topk_bregman_loss(student_logits, teacher_logits, tokens, mask, **options):
    """Unnormalised top-K with the Bregman correction - pi + q: the stop-gradient gradient."""
    return _topk("topk_bregman", field.topk_bregman, student_logits, teacher_logits, tokens,
                 mask, options)
