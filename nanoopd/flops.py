"""
Compute accounting: the matmul FLOPs of every forward and backward pass a run makes.

One causal forward pass of a GPT (L blocks, width C, vocabulary V) over a sequence of T tokens,
with the LM head read at h positions:

    F(T, h) = 2 T * 12 L C^2          the attention and MLP projections of every token
            + 2 L C * T (T + 1)       q k^T and the weighted sum of v: 4 C per layer and attended
                                      key, token i attending to its i keys (causal: sum_i i)
            + 2 h C V                 the tied LM head, only where its logits are read

A backward pass costs two forwards (gradients of the activations and of the weights), so a training
pass costs 3 F. Only matmuls are counted (layer norms, softmaxes and the GELU are a few percent at
these widths), and only real tokens: padding is the batching's cost, not the method's.

How the project's passes map onto F, for a row with p prompt tokens and n response tokens (the
response's <|eos|> included):

    sampling the row (KV-cached)     F(p + n - 1, n)     the prefill and the n - 1 decoding steps
                                                         compute exactly one causal pass; the head
                                                         is read once per sampled token
    scoring the row (teacher, or     F(p + n - 1, n)     rollout.response_logits: the head on the
      the student's forward)                             response positions only
    training on the row              3 F(p + n - 1, n)   the student's forward and backward
    an SFT example (prompt + target) 3 F(T, T)           T = p + n - 1; sft_loss reads the head
                                                         at every position

Two columns, after the anchors that compare OPD with SFT on teacher traces (docs/m6.md):
`charged` is everything the run computes; `given` leaves out the teacher's sampling of training
sequences, as if the traces had been handed over.
"""

from dataclasses import dataclass

from nanoopd.config import ConfigError
from nanoopd.model import GPTConfig


def forward_flops(c: GPTConfig, tokens: int, head: int) -> float:
    """F(T, h) of the module docstring: one causal forward over `tokens` tokens, head at `head` positions."""
    # lab:on_policy begin
    L, C, V = c.n_layer, c.n_embd, c.vocab_size
    return 2.0 * tokens * 12 * L * C * C + 2.0 * L * C * tokens * (tokens + 1) + 2.0 * head * C * V
    # lab:on_policy end


def row_lengths(rollout) -> tuple[list[int], list[int]]:
    """The real prompt length p and response length n (EOS included) of every row of a rollout."""
    P = rollout.prompt_len
    return rollout.valid[:, :P].sum(1).tolist(), rollout.lengths.tolist()  # one transfer each


def pass_flops(c: GPTConfig, prompt_lens, response_lens) -> float:
    """Sum over rows of F(p + n - 1, n): sampling these rows, or scoring them (one pass of model c)."""
    return sum(forward_flops(c, p + n - 1, n) for p, n in zip(prompt_lens, response_lens) if n > 0)


def sft_flops(c: GPTConfig, examples) -> float:
    """3 F(T, T) summed over (prompt, response) examples, T = p + n - 1: one SFT step's forward and backward."""
    return sum(3 * forward_flops(c, len(p) + len(r) - 1, len(p) + len(r) - 1) for p, r in examples)


@dataclass
class FlopCount:
    """A run's running total in both columns (module docstring)."""
    charged: float = 0.0  # every forward and backward the run computes
    given: float = 0.0    # the same without the teacher's sampling of training sequences

    def add(self, compute: float, teacher_sampling: float = 0.0) -> "FlopCount":
        # lab:on_policy begin
        self.charged += compute + teacher_sampling
        self.given += compute
        return self
        # lab:on_policy end


def opd_step_flops(student: GPTConfig, teacher: GPTConfig, student_rows: tuple, teacher_rows: tuple = ((), ()),
                   teacher_sampled: tuple = ((), ()), scored: bool = True) -> tuple[float, float]:
    """(compute, teacher_sampling) of one OPD step: the student samples its rows, the teacher scores
    every row (when the objective reads it: `scored`), the student trains on every row. Each
    *_rows is (prompt_lens, response_lens); teacher_sampled: the teacher rows whose sampling this
    step pays for (all of them when sampled fresh; a pool's traces at their first use)."""
    # lab:on_policy begin
    rows = (list(student_rows[0]) + list(teacher_rows[0]), list(student_rows[1]) + list(teacher_rows[1]))
    compute = pass_flops(student, *student_rows) + 3 * pass_flops(student, *rows)
    if scored:
        compute += pass_flops(teacher, *rows)
    return compute, pass_flops(teacher, *teacher_sampled)
    # lab:on_policy end


def check_budget(budget: float, flag: str, least: float) -> None:
    """Refuse a FLOP budget (> 0; 0 = none) below `least`, the cheapest a first step can be."""
    if 0 < budget < least:
        raise ConfigError(flag, f"{budget:.3g} is below one step's FLOPs (at least {least:.3g}, even with "
                                f"one-token responses): raise it, or 0 for no budget")
