"""
On-policy self-distillation with privileged information (OPSD).

The teacher is the same network as the student, given privileged information I in its context:

    student  pi_theta(y_t | x, y_<t)              sees  [bos] x y_<t
    teacher  q(y_t | I, x, y_<t) = pi_theta0(...)  sees  [bos] <|pi|>I<|pi|> x y_<t

with theta0 a frozen copy of the step-0 weights (default) or the live weights theta (never
differentiated through). Both score the *same* response tokens y ~ pi_theta(.|x): the teacher
batch is rebuilt by re-left-padding [bos, PI, prompt] and appending the student's response
unchanged, so position t of the teacher's response logits predicts exactly the token y_t that
position t of the student's predicts.

Two kinds of PI (docs/design.md#self-distillation-with-privileged-information):
  instance-specific  I = the final answer ("answer") or the whole reference solution ("solution")
                     of this very problem;
  shared rule        I = one instruction identical for every problem ("rule"): here
                     "write the answer reversed", so `A:632` must be written `A:236`.

Why the first fails and the second works: the best PI-free student under the OPD objective
E_I KL(pi(.|x) || q(.|x, I)) is the normalised geometric mean

    pi*(y|x) ∝ exp(E_{I|x} log q(y|x, I)).

A per-instance I that the student cannot infer from x is averaged away; a constant I gives
pi* = q(.|x, I): the student internalises the rule.

The `<|pi|>` marker is a special token, and plain user text that spells it is refused by the
tokenizer, so nothing but this module can ever put privileged information in a context.
"""

import copy
import re

import torch

from nanoopd.evaluate import evaluate
from nanoopd.metrics import masked_average
from nanoopd.model import GPT
from nanoopd.opd import freeze
from nanoopd.rollout import Rollout, generate, left_pad, response_logits
from nanoopd.sequence_kl import token_kl
from nanoopd.tasks import Problem, encode_example, trace_text
from nanoopd.tokenizer import Tokenizer

PI_KINDS = ("answer", "solution", "rule")   # what the teacher may be told
SFT_KINDS = ("none",) + PI_KINDS            # the base model's SFT mixture: without PI, or with one
RULE = "rule: write the answer reversed"    # the shared latent rule, identical for every problem
PI_OPEN = PI_CLOSE = "<|pi|>"


def pi_text(problem: Problem, kind: str) -> str:
    """The privileged-information prefix for `problem`, wrapped in <|pi|> markers."""
    # lab:opsd begin
    if kind == "answer":
        body = f"answer: {problem.answer}"
    elif kind == "solution":
        body = f"solution:\n{trace_text(problem)}\n"
    elif kind == "rule":
        body = RULE
    else:
        raise ValueError(f"unknown privileged-information kind {kind!r}; choose from {', '.join(PI_KINDS)}")
    return f"{PI_OPEN}{body}{PI_CLOSE}"
    # lab:opsd end


def rule_trace(problem: Problem) -> str:
    """The gold trace written under the rule: every line as usual, the final answer reversed."""
    lines = trace_text(problem).split("\n")
    lines[-1] = "A:" + str(problem.answer)[::-1]
    return "\n".join(lines)


_ANSWER_DIGITS = re.compile(r"A:(-?\d+)")


def verify_rule(text, problem: Problem) -> int:
    """1 if the last `A:` of the response spells the true answer reversed (digit by digit, leading
    zeros kept: 120 -> `A:021`), else 0. Never raises. A palindrome satisfies both this and
    tasks.verify."""
    try:
        found = _ANSWER_DIGITS.findall(str(text))
        return int(bool(found) and found[-1] == str(problem.answer)[::-1])
    except Exception:  # noqa: BLE001 - the verifier must survive any garbage
        return 0


def pi_example(tok: Tokenizer, problem: Problem, kind: str) -> tuple[list[int], list[int]]:
    """One SFT example of the base model's mixture: kind 'none' is the plain (prompt, gold trace);
    'answer' / 'solution' put that PI before the prompt, same gold trace; 'rule' puts the rule
    before the prompt and the response follows it (the answer reversed)."""
    if kind == "none":
        return encode_example(tok, problem)
    response = rule_trace(problem) if kind == "rule" else None
    return encode_example(tok, problem, pi_text(problem, kind), response, prefix_special=True)


def mixture_kinds(n: int, weights: dict[str, float], generator: torch.Generator) -> list[str]:
    """n kinds drawn i.i.d. from `weights` (kind -> relative weight, kinds from SFT_KINDS)."""
    bad = [k for k in weights if k not in SFT_KINDS]
    if bad or not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"mixture weights must be >= 0 over {SFT_KINDS} with a positive sum, got {weights}")
    kinds = list(weights)
    probs = torch.tensor([float(weights[k]) for k in kinds])
    # inverse CDF on a 53-bit grid: draw k uniform in [0, 2^53) and take the first kind whose CDF
    # edge exceeds k / 2^53. This is what multinomial with replacement draws from probs, bit
    # for bit (the same generator words), without multinomial (wrong on some MPS stacks) or float64.
    edges = torch.tensor([int(c * 2 ** 53) for c in (probs / probs.sum()).cumsum(0).tolist()])  # (K,)
    k = torch.randint(0, 2 ** 53, (n,), generator=generator)  # (n,)
    index = (edges.unsqueeze(0) <= k.unsqueeze(1)).sum(1).clamp(max=len(kinds) - 1)  # (n,)
    return [kinds[i] for i in index.tolist()]


def with_privileged_context(rollout: Rollout, pi_ids: list[list[int]], pad_id: int) -> Rollout:
    """The same responses behind the teacher's context [bos] + PI + (student prompt without bos).

    The student prompts are read back from the rollout (its valid tokens), the PI tokens are
    inserted after each <|bos|>, the new prompts are left-padded to a common length P', and the
    response tokens and mask are appended unchanged. response_logits() of the result therefore
    gives the teacher's logits (B, N, V) at the very positions that predict the student's y_t.
    """
    # lab:opsd begin
    P = rollout.prompt_len
    if len(pi_ids) != rollout.tokens.shape[0]:
        raise ValueError(f"need one PI per rollout row: {len(pi_ids)} for {rollout.tokens.shape[0]} rows")
    prompts = []
    for row, keep, pi in zip(rollout.tokens[:, :P].tolist(), rollout.valid[:, :P].tolist(), pi_ids):
        student_prompt = [t for t, k in zip(row, keep) if k]
        prompts.append(student_prompt[:1] + list(pi) + student_prompt[1:])
    tokens, valid = left_pad(prompts, pad_id, rollout.tokens.device)  # (B, P'), (B, P')
    zeros = torch.zeros_like(rollout.logprobs)  # (B, N): the teacher is not a sampler
    return Rollout(tokens=torch.cat([tokens, rollout.response], 1),  # (B, P'+N)
                   valid=torch.cat([valid, rollout.response_mask], 1),  # (B, P'+N)
                   prompt_len=tokens.shape[1], response=rollout.response,
                   response_mask=rollout.response_mask, logprobs=zeros, sampler_logprobs=zeros)
    # lab:opsd end


class PrivilegedTeacher:
    """Teacher scoring under privileged information: called as (teacher, rollout, problems) ->
    logits (B, N, V) of q(.|I, x, y_<t) at the student's response positions (no gradient).
    It plugs into the OPD step in place of plain scoring, so OPSD reuses the OPD loop as is."""

    def __init__(self, tok: Tokenizer, kind: str):
        pi_text(Problem(1, "+", 1), kind)  # an unknown kind fails here
        self.tok, self.kind = tok, kind

    def pi_ids(self, problems: list[Problem]) -> list[list[int]]:
        return [self.tok.encode(pi_text(p, self.kind), allow_special=True) for p in problems]

    @torch.no_grad()
    def __call__(self, teacher: GPT, rollout: Rollout, problems: list[Problem]) -> torch.Tensor:
        ctx = with_privileged_context(rollout, self.pi_ids(problems), self.tok.pad_id)
        return response_logits(teacher, ctx)  # (B, N, V)


def self_teacher(model: GPT, live: bool = False) -> GPT:
    """The OPSD teacher's weights: a frozen copy of `model` as it is now (step 0, default), or with
    live=True the model itself (its current weights at every step; it is only ever run under
    torch.no_grad(), so no gradient flows through the teacher's side either way)."""
    return model if live else freeze(copy.deepcopy(model))


def pi_scores(model: GPT, tok: Tokenizer, problems: list[Problem], max_new_tokens: int,
              kind: str | None = None) -> tuple[float, float]:
    """(accuracy, rule-following) of the greedy answers, with PI `kind` before each prompt (None:
    without PI). Rule-following = the share of answers that spell the true answer reversed."""
    prefix = "" if kind is None else (lambda p: pi_text(p, kind))
    acc, texts = evaluate(model, tok, problems, 0.0, max_new_tokens, prefix=prefix, return_texts=True)
    return acc, sum(verify_rule(t, p) for t, p in zip(texts, problems)) / len(problems)


@torch.no_grad()
def pi_kl(student: GPT, teacher: GPT, tok: Tokenizer, problems: list[Problem], kind: str, max_new_tokens: int,
          seed: int) -> float:
    """How far the PI-free student is from the teacher with PI `kind`, at the student's own states:
    mean over response tokens of KL(pi(.|x, y_<t) || q(.|I, x, y_<t)), y ~ pi(.|x) at T = 1 (seeded),
    on `problems`. The floor the student can reach is the KL to the aggregate of the module docstring."""
    prompts = [encode_example(tok, p)[0] for p in problems]
    ro = generate(student, prompts, max_new_tokens, tok.eos_id, tok.pad_id, temperature=1.0,
                  generator=torch.Generator(device=next(student.parameters()).device).manual_seed(seed))
    logp = torch.log_softmax(response_logits(student, ro).float(), dim=-1)  # (B, N, V)
    logq = torch.log_softmax(PrivilegedTeacher(tok, kind)(teacher, ro, problems).float(), dim=-1)  # (B, N, V)
    return masked_average(token_kl(logp, logq), ro.response_mask).item()


def rule_visible(problem: Problem) -> bool:
    """False when the answer reads the same reversed (7, 44, 121): there the rule cannot be told
    apart from the plain format, so rule-following is measured on the other problems."""
    return str(problem.answer) != str(problem.answer)[::-1]
