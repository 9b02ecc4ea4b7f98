"""
Synthetic math with step-by-step traces, and a verifier (the "reward").

A problem is `a op b` with op in {+, -, *}. The response works one column at a time, least
significant digit first, one line per column with the carry (or borrow) made explicit, then gives
the answer:

    347+285=            prompt
    7+5+0=12            ones:     7 + 5 + carry 0 = 12  -> digit 2, carry 1
    4+8+1=13            tens
    3+2+1=6             hundreds
    A:632               final answer, then <|eos|>

Subtraction (a >= b) writes a borrowed column as `13-8-1=4`; multiplication takes a one-digit
multiplier, `7*6+4=46`. The difficulty knob is the number of digits and the set of operators.

A second task family, unlike arithmetic but in the same format (so that one verifier, one
tokenizer and one pipeline serve both, and a mixture of the two is a mix of operators): `a~`, the
digits of `a` reversed, written one more digit a line. No column is computed; the skill is to copy
by position. TASKS names the families by their operators.

    3470~=              prompt
    0                   the last digit
    07                  ... and the one before it
    074
    0743
    A:0743              the answer, read as the integer 743

Train and test splits are a pure function of the problem (a CRC32 of its text), so no problem can
ever be in both, whatever the seeds. `encode_example` turns a problem into token ids:
`<|bos|> prompt` and `response <|eos|>`. `verify` reads the last `A:<int>` and returns 1 or 0; it never
raises, whatever the text.
"""

import random
import re
import zlib
from dataclasses import dataclass

from nanoopd.tokenizer import Tokenizer

OPS = "+-*~"
UNARY = "~"  # operators of one operand: the prompt has no b (it is 0)
TASKS = {"math": "+-*", "rev": "~"}  # task family -> its operators
TEST_FRACTION_PER_MILLE = 100  # 10 % of all problems belong to the held-out split


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        if self.op == "~":
            return int(str(self.a)[::-1])
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]

    @property
    def text(self) -> str:
        return f"{self.a}{self.op}" if self.op in UNARY else f"{self.a}{self.op}{self.b}"

    @property
    def task(self) -> str:
        """The task family of its operator (TASKS)."""
        return next(name for name, ops in TASKS.items() if self.op in ops)


def split_of(problem: Problem) -> str:
    """'test' or 'train', decided by the problem alone (stable across runs and machines)."""
    h = zlib.crc32(problem.text.encode()) % 1000
    return "test" if h < TEST_FRACTION_PER_MILLE else "train"


def _random_number(rng: random.Random, max_digits: int) -> int:
    n = rng.randint(1, max_digits)
    return rng.randint(0 if n == 1 else 10 ** (n - 1), 10 ** n - 1)


def weighted_ops(spec: str) -> str:
    """Expand an operator mix: each operator, optionally followed by its count (1 if none).

    '+99-' -> 99 '+' then one '-'; '+-' and '+++-' are their own expansions. `sample_problems` draws
    uniformly from the expanded string, so the counts are the operators' weights: P(op) = n_op / sum n.
    """
    parts = re.findall(r"(\D)(\d*)", spec)
    if "".join(o + n for o, n in parts) != spec or any(n and int(n) < 1 for _, n in parts):
        raise ValueError(f"an operator mix is operators, each optionally followed by a count >= 1 "
                         f"(e.g. '+99-'), got {spec!r}")
    return "".join(o * int(n or 1) for o, n in parts)


def sample_problems(n: int, split: str, seed: int, digits: int = 3, ops: str = "+-") -> list[Problem]:
    """n problems of `split` ('train' or 'test'), operands of 1..digits digits, ops drawn uniformly.

    Deterministic for a given seed. Repeats are allowed (the space is large); every returned
    problem satisfies split_of(p) == split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if digits < 1 or not ops or any(o not in OPS for o in ops):
        raise ValueError(f"need digits >= 1 and ops drawn from {OPS!r}, got digits={digits}, ops={ops!r}")
    rng = random.Random(f"{seed}-{split}-{digits}-{ops}")
    out = []
    while len(out) < n:
        op = rng.choice(ops)
        a = _random_number(rng, digits)
        b = 0 if op in UNARY else rng.randint(0, 9) if op == "*" else _random_number(rng, digits)
        if op == "-" and b > a:
            a, b = b, a
        p = Problem(a, op, b)
        if split_of(p) == split:
            out.append(p)
    return out


def prompt_text(problem: Problem, prefix: str = "") -> str:
    """The text the model is conditioned on; `prefix` (privileged info, a system rule) goes first."""
    return f"{prefix}{problem.text}=\n"


def trace_text(problem: Problem) -> str:
    """The gold step-by-step response (without <|eos|>)."""
    if problem.op == "~":
        digits = str(problem.a)[::-1]
        return "\n".join([digits[:k] for k in range(1, len(digits) + 1)] + [f"A:{digits}"])
    da = [int(c) for c in reversed(str(problem.a))]
    db = [int(c) for c in reversed(str(problem.b))]
    lines = []
    if problem.op == "*":
        carry = 0
        for x in da:
            v = x * problem.b + carry
            lines.append(f"{x}*{problem.b}+{carry}={v}")
            carry = v // 10
    else:
        width = max(len(da), len(db))
        da += [0] * (width - len(da))
        db += [0] * (width - len(db))
        carry = 0
        for x, y in zip(da, db):
            if problem.op == "+":
                v = x + y + carry
                lines.append(f"{x}+{y}+{carry}={v}")
                carry = v // 10
            else:
                need = y + carry
                if x < need:
                    lines.append(f"1{x}-{y}-{carry}={10 + x - need}")
                    carry = 1
                else:
                    lines.append(f"{x}-{y}-{carry}={x - need}")
                    carry = 0
    lines.append(f"A:{problem.answer}")
    return "\n".join(lines)


def encode_example(tok: Tokenizer, problem: Problem, prefix: str = "", response: str | None = None,
                   prefix_special: bool = False) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): <|bos|> prefix+prompt | response <|eos|>. response defaults to
    the gold trace. prefix_special lets the prefix contain special tokens (e.g. <|pi|>)."""
    prompt = [tok.bos_id] + tok.encode(prompt_text(problem, prefix), allow_special=prefix_special)
    resp = tok.encode(trace_text(problem) if response is None else response) + [tok.eos_id]
    return prompt, resp


_ANSWER = re.compile(r"A:(-?\d+)")


def extract_answer(text) -> int | None:
    """The integer after the last 'A:' in text, or None (never raises)."""
    try:
        found = _ANSWER.findall(str(text))
        return int(found[-1]) if found else None
    except Exception:  # noqa: BLE001 - the verifier must survive any garbage
        return None


def verify(text, problem: Problem) -> int:
    """1 if the response's final answer equals the true answer, else 0. Never raises."""
    ans = extract_answer(text)
    return int(ans is not None and ans == problem.answer)
