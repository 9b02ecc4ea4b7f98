"""
One calling convention for every distillation objective, and the registry that names them.

    loss, stats = OBJECTIVES[name](student_logits, teacher_logits, tokens, mask, **options)

student_logits, teacher_logits: (B, T, V) at the positions that predict tokens (B, T), the
response y, sampled from pi (on_policy below); mask: (B, T), bool or 0/1, True on response tokens.
Every objective returns a surrogate loss whose gradient is its estimator, averaged per response
token (sum over masked tokens / number of masked tokens; an all-masked batch gives a loss of 0
whose gradients are 0), and stats, a dict of python floats: loss, kl (mean per-token reverse KL
of the full distributions), logratio_max_abs and logratio_pos_share (of r_t on the sampled
tokens), n_tokens, plus a few per objective. The teacher is always a constant (detached), and
log-softmaxes and losses are computed in float32 at least (float64 inputs stay float64).

  name               estimator (docs/design.md#the-objectives)      options
  sampled_token*     A_t = sg(-r_t [+ b(c_t)]) on y_t, vOPD b =      clamp=None, baseline=False,
                     KL(pi||q)(c_t) ("full") or its top-k part      k (for baseline="topk")
  sequence_kl*       g_gamma, REINFORCE on sum_t r_t at gamma = 1   gamma=1.0
  full_reverse_kl    sum_v pi (log pi - log q), exact gradient      -
  forward_kl         sum_v q (log q - log pi), exact gradient       -
  jsd                generalised JSD(beta), P = teacher, Q = student beta=0.5
  topk_unnormalized  sum_S pi (log pi - log q)       (biased)       k=16, support='teacher',
  topk_stopgrad      sum_S pi (sg(log pi) - log q)                  add_sampled=False
  topk_renorm        KL(pi_hat || q_hat) on S
  sft (no teacher)   -log pi(y_t|c_t), SeqKD on teacher samples     -

and what other frameworks ship (registered in field_estimators.py; toy/audit.py says what each follows):
  kl_k1*, kl_k2*, kl_k3* (r_t, r_t^2 / 2, exp(-r_t) - 1 + r_t), topk_forward_kl, topk_tail, topk_bregman;
  for a teacher of another tokenizer (cross_objectives.py; SPECS[name].cross): xt_chunk*, xt_full, xt_uld, xt_gold.

(top-K: k defaults to 16, or V if the vocabulary is smaller; support is 'teacher', 'student' or
'intersection'; add_sampled also puts the sampled token y_t in S_t.)

SPECS[name].on_policy, True for the names marked *: the estimator is right only for y ~ pi itself
(temperature 1, no top-k or top-p), for it reads the sampled token's r_t; sampled otherwise, it
estimates the gradient under that sampling distribution, not grad KL(pi || q) (sampled_token.py;
train_opd prints a note). The others are forms over the full distributions (or S_t) at each
prefix, exact at whatever prefixes the rows hold, teacher samples too; every objective sees the
sampler's prefixes. SPECS[name].uses_teacher is False where the teacher is never read (sft).

Every objective also takes mask_tokens, an iterable of token ids: positions whose sampled token
is one of them are removed from the mask (special-token masking, docs/design.md#special-tokens), so
that a token the teacher never saw cannot carry a log-ratio of tens of nats into the batch.

The training step's hot path (opd.opd_step) also passes logp=(student_logp, teacher_logp): the
float32 log-softmaxes of the same logits (B, T, V), the student's with its graph, computed once per
step and shared with the diagnostics. Given logp, an objective computes no log-softmax of its own,
does not re-check the token ids and mask values (they come from the sampler; shapes are still
checked), and returns stats whose values are 0-dim tensors (no host sync): loss, n_tokens and its
own extras, without kl / logratio_max_abs / logratio_pos_share, which the caller's diagnostics
report. Without logp (any other caller) nothing changes: stats are python floats, as above.

Adding an objective (docs/extending.md walks through one): register it with its options and the
divergence it claims to follow; build its inputs with resolve_options and prepare, end with finish.

    @register("my_objective", claim="F", floor=Option(None, "lower clamp of log pi", float))
    def my_objective(student_logits, teacher_logits, tokens, mask, **options):
        opt = resolve_options("my_objective", options)              # defaults filled, unknown names refused
        b = prepare(student_logits, teacher_logits, tokens, mask, opt)  # checks, masking, log-softmaxes
        per_token = ...                                                # (B, T) from b.student_logp, b.teacher_logp
        return finish(token_sum(per_token, b), b)

An option is declared once, in register: it becomes the objective's default, its flag in train_math.py
(--floor, help from Option.help), its row in --help; prepare takes the hot path's logp unasked.
"""

import importlib.util
import os
from collections.abc import Callable
from typing import NamedTuple

import torch

from nanoopd.metrics import logratio_stats, masked_average
from nanoopd.special_tokens import contains
from nanoopd.topk import SUPPORTS, support_mass, topk_support

CLAIMS = ("J", "K", "F")  # the sequence KL, the token-level reverse KL, the token-level forward KL


class Option(NamedTuple):
    """One option of an objective: its default, the help of its flag, the type its flag reads
    (int, float, str or bool: a switch) and, if given, the values it may take."""
    default: object
    help: str
    kind: type = float
    choices: tuple | None = None


class Spec(NamedTuple):
    claim: str | None  # the divergence whose gradient it claims to follow, one of CLAIMS (None: none)
    options: dict  # its own options, {name: Option}
    on_policy: bool = False  # right only for y ~ pi: it reads the sampled token's log-ratio (register)
    uses_teacher: bool = True  # it reads the teacher's logits at all
    cross: bool = False  # it reads the alignment of a teacher of another tokenizer (option chunks; cross_objectives.py)


OBJECTIVES: dict[str, Callable] = {}  # name -> the objective
SPECS: dict[str, Spec] = {}  # name -> what it claims and which options it takes
COMMON_OPTIONS = ("mask_tokens", "logp", "chunks")  # options of every objective (module docstring; chunks: cross_teacher.py)


def register(name: str, claim: str | None = "K", on_policy=False, uses_teacher=True, cross=False, **options: Option):
    """Decorator: add an objective to OBJECTIVES under `name` with the divergence it claims to follow
    (checked by toy/audit.py), its options (each an Option) and two flags (module docstring): on_policy,
    right only for y ~ pi (it reads r_t of the sampled token); uses_teacher, it reads the teacher; cross (Spec)."""
    if claim not in CLAIMS + (None,):
        raise ValueError(f"objective {name!r}: claim must be one of {CLAIMS} or None, got {claim!r}")
    if not all(isinstance(flag, bool) for flag in (on_policy, uses_teacher, cross)):
        raise ValueError(f"objective {name!r}: on_policy, uses_teacher and cross must be True or False")
    for option, spec in options.items():
        if not isinstance(spec, Option) or option in COMMON_OPTIONS:
            raise ValueError(f"objective {name!r}: option {option!r} must be an Option(default, help, kind) "
                             f"and not one of {COMMON_OPTIONS}")

    def add(fn):
        OBJECTIVES[name], SPECS[name] = fn, Spec(claim, options, on_policy, uses_teacher, cross)
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


def option_flags() -> dict[str, Option]:
    """Every registered option, once per name, as a command line offers it (train_math.py): the
    first objective's Option, its help naming every objective that takes it."""
    flags, takers = {}, {}
    for name in sorted(SPECS):
        for option, spec in SPECS[name].options.items():
            if option in flags and flags[option].kind is not spec.kind:
                raise ValueError(f"option {option!r} of objective {name!r} reads {spec.kind.__name__}, but "
                                 f"{takers[option][0]!r} reads {flags[option].kind.__name__}: give them one type")
            flags.setdefault(option, spec)
            takers.setdefault(option, []).append(name)
    return {o: s._replace(default=None, help=f"{s.help} [{', '.join(takers[o])}]") for o, s in flags.items()}


def load_objectives(path: str) -> None:
    """Import the Python file `path`, so that the objectives it registers join OBJECTIVES (a file
    of your own: it runs as code, like any script you start)."""
    if not os.path.isfile(path):
        raise ValueError(f"no objectives file at {path!r}: give the path of a .py file that calls @register")
    spec = importlib.util.spec_from_file_location(f"user_objectives_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a user's file: say which one failed and why, without a traceback
        raise ValueError(f"importing the objectives file {path!r} failed: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------------------------
# what every objective shares: options, input checks, masking, normalisation, stats


def resolve_options(name: str, given: dict) -> dict:
    """The options of objective `name`: its registered defaults overridden by `given`; unknown
    names are an error. mask_tokens and logp (the hot path's shared log-softmaxes) are options of
    every objective."""
    defaults = {**{o: spec.default for o, spec in SPECS[name].options.items()}, **dict.fromkeys(COMMON_OPTIONS)}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"objective {name!r} got unknown option(s) {unknown}; "
                         f"its options are {sorted(defaults)}")
    return {**defaults, **given}


def check_bool(option: str, value) -> None:
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


def prepare(student_logits, teacher_logits, tokens, mask, opt: dict) -> Batch:
    """Check that the inputs line up, apply opt["mask_tokens"], cast, detach the teacher, take each
    model's log-softmax (or opt["logp"] = (student_logp, teacher_logp), trusted: no value check).
    opt: the objective's options, as resolve_options returns them."""
    mask_tokens, logp = opt["mask_tokens"], opt["logp"]
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


def finish(total: torch.Tensor, batch: Batch, **extra: torch.Tensor) -> tuple[torch.Tensor, dict]:
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


def sampled(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y_t|c_t), log q(y_t|c_t)) of the sampled tokens, (B, T) each, read off the shared
    log-softmaxes (sampled_token.sampled_logprobs computes the same from logits)."""
    index = batch.tokens.unsqueeze(-1)  # (B, T, 1)
    return batch.student_logp.gather(-1, index).squeeze(-1), batch.teacher_logp.gather(-1, index).squeeze(-1)


def token_sum(per_token: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Sum of a per-position loss (B, T) over the masked positions."""
    return (per_token * batch.mask).sum()


# ----------------------------------------------------------------------------------------------
# options that several objectives take, declared once

K = Option(None, "support size K of the top-K forms (and of sampled_token's baseline='topk'); "
                 "None: 16, or V if the vocabulary is smaller", int)
SUPPORT = Option("teacher", "whose top-K is the support S_t", str, SUPPORTS)
ADD_SAMPLED = Option(False, "also put the sampled token y_t in the support", bool)
CLAMP = Option(None, "clip r_t (sampled_token) or k3 (kl_k3) to [-clamp, clamp]; None: no clip", float)
TOPK_OPTIONS = dict(k=K, support=SUPPORT, add_sampled=ADD_SAMPLED)


def topk_objective(name: str, form: Callable, student_logits, teacher_logits, tokens, mask, options):
    """The top-K forms share everything but the per-position formula `form`, which is given the
    objective's own options beyond TOPK_OPTIONS (the field's forms have some)."""
    opt = resolve_options(name, options)
    check_bool("add_sampled", opt["add_sampled"])
    batch = prepare(student_logits, teacher_logits, tokens, mask, opt)
    k = min(16, batch.student.shape[-1]) if opt["k"] is None else opt["k"]
    index, member = topk_support(batch.student, batch.teacher, batch.tokens, k,
                                 opt["support"], opt["add_sampled"])  # (B, T, K') each
    own = {key: opt[key] for key in SPECS[name].options if key not in TOPK_OPTIONS}
    per_token = form(batch.student, batch.teacher, index, member, **own)  # (B, T)
    mass_pi, mass_q = support_mass(batch.student, batch.teacher, index, member)  # (B, T) each
    return finish(token_sum(per_token, batch), batch,
                  support_mass_student=masked_average(mass_pi, batch.mask),
                  support_mass_teacher=masked_average(mass_q, batch.mask))


# the objectives themselves register on import (they import this module for the plumbing above)
from nanoopd import builtin_objectives, cross_objectives, field_estimators  # noqa: E402,F401
