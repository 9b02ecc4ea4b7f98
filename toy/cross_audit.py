"""
toy/cross_audit.py: the cross-tokenizer objectives through one exact test (docs/audit.md#two-tokenizers).
    python -m toy.cross_audit             # the table and out/audit/audit_cross.csv, a second or two
    python -m toy.cross_audit --out docs  # the CSV that docs/audit.md shows;  --help: every flag

One alphabet {0, 1, 2} and every text of L = 4 characters (81), read two ways. The student reads one
character a token (a tabular model, toy/exact.py). The teacher also has the tokens "00", "01", "11"
and splits a text greedily from the left (as 'digits' splits numbers): b(y), the canonical tokens of
y. It is a tabular model over its own tokens, conditioned on the characters read so far and its last
token; tokens that would run past L characters get no mass. Two teachers of the same table:
  free       every token path that spells L characters has mass, "0","0" as well as "00"
  canonical  only the canonical paths (a single character never precedes the one it would merge with)

Every text is enumerated, every expectation a weighted sum in float64, as in toy/audit.py, whose
per-sample gradients, verdicts and thresholds this reuses. The targets:
  P  the path KL  sum_y pi(y) (log pi(y) - log q(b(y)))                   what chunk log-ratios sum to
  X  the text KL  KL(pi || q_text), q_text(y) = sum of q over every path that spells y
  C  the token KL against the teacher's exact next character:
                  sum_y sg(pi(y)) sum_t KL(pi(.|c_t) || q_text(.|c_t)),  q_text(b|w) = Q(wb) / Q(w),
                  Q(w) = sum of q_text over the texts that start with w
With the canonical teacher q_text(y) = q(b(y)): P and X coincide. Rows: each xt_ objective with the
alignment cross_teacher.py builds (chunks, the projection), and the naive ids: the student's
character ids read by the teacher as its own tokens (a path it may never have seen), its logits cut
to the student's three, under sampled_token. Flag: raises X (a small step along -g_L raises the text KL).
"""

import sys
from dataclasses import dataclass

import torch

from nanoopd import OBJECTIVES
from nanoopd.config import ConfigError, parse_config
from nanoopd.cross_tokenizer import Chunks, align, project
from toy.audit import cosine, expectation, follows, grad_of, per_sample_grads
from toy.exact import all_sequences, make_problem

CHARS, L = "012", 4
TOKENS = ("0", "1", "2", "00", "01", "11")  # the teacher's; the first three are the student's
MERGED = {t for t in TOKENS if len(t) == 2}
MASKED = -40.0  # the logit of a token a teacher may not emit (mass e^-40: exact for the verdicts)
TARGETS = ("P", "X", "C")
ROWS = (("xt_chunk", {}, None), ("xt_chunk", {"gamma": 1.0}, "P"), ("xt_full", {}, None), ("xt_uld", {}, None),
        ("xt_gold", {}, None), ("naive ids", {}, None))
COLUMNS = ["teacher", "objective", "options", "claims", "follows", "cos_P", "err_P", "cos_X", "err_X", "cos_C",
           "err_C", "g_norm", "trace_cov", "dX_step", "flags"]


@dataclass
class CrossAuditConfig:
    seed: int = 0              # draws the student (toy.exact.make_problem) and the teacher's table
    coupling: float = 1.0      # how strongly the student's characters depend on the previous one
    step: float = 1e-3         # length of the probe step along -g_L / ||g_L|| (does X go down?)
    out: str = "out/audit"     # folder for audit_cross.csv
    threads: int = 1           # CPU threads; one is fastest for tensors this small

    def __post_init__(self):
        if not self.step > 0:
            raise ConfigError("step", f"must be positive, got {self.step}")


def canonical(text: str) -> list[str]:
    """b(y): the teacher's tokens of a text, greedily from the left."""
    out, i = [], 0
    while i < len(text):
        out.append(text[i:i + 2] if text[i:i + 2] in MERGED else text[i])
        i += len(out[-1])
    return out


class Teacher:
    """q(u | k characters read, last token), a table phi (L, 1 + |TOKENS|, |TOKENS|)."""

    def __init__(self, seed: int, free: bool):
        self.phi = torch.randn(L, 1 + len(TOKENS), len(TOKENS), generator=torch.Generator().manual_seed(seed),
                               dtype=torch.float64)
        self.free = free

    def logp(self, k: int, last: str | None) -> torch.Tensor:
        """log q(. | k characters read, last token) over TOKENS: (|TOKENS|,)."""
        logits = self.phi[k, 0 if last is None else 1 + TOKENS.index(last)].clone()
        for u, tok in enumerate(TOKENS):
            if k + len(tok) > L or (not self.free and last is not None and last + tok[0] in MERGED):
                logits[u] = MASKED
        return torch.log_softmax(logits, -1)

    def paths(self):
        """Every token path that spells L characters, with its log-prob."""
        def walk(k, last, path, lp):
            if k == L:
                yield path, lp
                return
            logp = self.logp(k, last)
            for u, tok in enumerate(TOKENS):
                if k + len(tok) <= L:
                    yield from walk(k + len(tok), tok, path + [tok], lp + logp[u].item())
        yield from walk(0, None, [], 0.0)


def teacher_side(teacher: Teacher, texts: list[str]):
    """For every text: the teacher's log-distributions at its canonical positions (N, L, 6), the
    log-prob of the canonical path and of the text, and q_text(.|prefix) at every character (N, L, 3)."""
    q_text = {}
    for path, lp in teacher.paths():
        q_text["".join(path)] = q_text.get("".join(path), 0.0) + torch.tensor(lp).exp().item()
    Q = lambda w: sum(v for t, v in q_text.items() if t.startswith(w))  # noqa: E731
    logp = torch.full((len(texts), L, len(TOKENS)), -torch.log(torch.tensor(float(len(TOKENS)))).item(),
                      dtype=torch.float64)  # (N, L, 6) padding rows: uniform
    path_lp, text_lp = torch.zeros(len(texts), dtype=torch.float64), torch.zeros(len(texts), dtype=torch.float64)
    next_char = torch.zeros(len(texts), L, len(CHARS), dtype=torch.float64)  # (N, L, 3)
    for n, text in enumerate(texts):
        k, last = 0, None
        for j, tok in enumerate(canonical(text)):
            logp[n, j] = teacher.logp(k, last)
            path_lp[n] += logp[n, j, TOKENS.index(tok)]
            k, last = k + len(tok), tok
        text_lp[n] = torch.tensor(q_text[text]).log()
        for t in range(L):
            next_char[n, t] = torch.tensor([Q(text[:t] + c) for c in CHARS]) / Q(text[:t])
    return logp, path_lp, text_lp, next_char


def chunks_of(texts: list[str], logp: torch.Tensor) -> tuple[Chunks, torch.Tensor]:
    """The Chunks of every text (one character a student token), and q projected on the student's
    characters (N, L, 3) as cross_teacher.py projects it: by first character at a chunk start, by the
    character after the one read inside "00", "01", "11"."""
    N = len(texts)
    seg, size, start, one, at = (torch.zeros(N, L, dtype=d) for d in (torch.long, torch.float64, torch.bool,
                                                                         torch.bool, torch.long))
    lp, proj, g = torch.zeros(N, L, dtype=torch.float64), torch.zeros(N, L, len(CHARS), dtype=torch.float64), 0
    first = torch.tensor([CHARS.index(t[0]) for t in TOKENS])
    for n, text in enumerate(texts):
        toks = canonical(text)
        for i0, i1, j0, j1 in align([c.encode() for c in text], [t.encode() for t in toks]):
            for i in range(i0, i1):
                seg[n, i], size[n, i], start[n, i], one[n, i], at[n, i] = g, i1 - i0, i == i0, i1 - i0 == 1, j0
                lp[n, i] = logp[n, j0, TOKENS.index(toks[j0])]
                index = first if i == i0 else torch.tensor([CHARS.index(t[1]) if len(t) == 2 and t[0] == text[i0]
                                                            else -1 for t in TOKENS])
                proj[n, i] = project(logp[n, j0].exp(), index, len(CHARS), within=i > i0)
            g += 1
    mask = torch.tensor([[j < len(canonical(t)) for j in range(L)] for t in texts])  # (N, L)
    matched = torch.tensor([CHARS.index(t) if t in CHARS else -1 for t in TOKENS])
    return Chunks(seg, size, lp, lp, start, one, at, logp, mask, matched, g), proj.log()


class Fixed:
    """A teacher whose logits are given (toy.audit.per_sample_grads reads teacher.logits(phi, seqs))."""

    def __init__(self, logits: torch.Tensor):
        self.t = logits

    def logits(self, phi, seqs) -> torch.Tensor:
        return self.t


@dataclass
class Problem:  # what toy.audit.per_sample_grads reads
    student: object
    theta: torch.Tensor
    teacher: Fixed
    phi: None
    seqs: torch.Tensor
    weight: torch.Tensor


def audit_teacher(cfg: CrossAuditConfig, free: bool) -> list[dict]:
    student, theta, _, _ = make_problem(len(CHARS), L, cfg.coupling, cfg.seed)
    seqs = all_sequences(len(CHARS), L)  # (81, 4)
    texts = ["".join(CHARS[i] for i in row) for row in seqs.tolist()]
    teacher = Teacher(cfg.seed + 1, free)
    logp, path_lp, text_lp, next_char = teacher_side(teacher, texts)
    chunks, proj = chunks_of(texts, logp)
    naive = torch.stack([torch.stack([teacher.logp(t, None if t == 0 else CHARS[row[t - 1]])[:len(CHARS)]
                                      for t in range(L)]) for row in seqs.tolist()])  # (81, 4, 3) ids read as its own
    log_pi = lambda x: student.token_logprobs(x, seqs).sum(-1)  # noqa: E731  (N,) log pi(y)
    kl = lambda x, lq: (log_pi(x).exp() * (log_pi(x) - lq)).sum()  # noqa: E731
    goals = {"P": grad_of(lambda x: kl(x, path_lp), theta), "X": grad_of(lambda x: kl(x, text_lp), theta),
             "C": grad_of(lambda x: log_pi(theta).exp().detach() @ (
                 torch.log_softmax(student.logits(x, seqs), -1).exp() * (torch.log_softmax(student.logits(x, seqs), -1)
                                                                         - next_char.log())).sum((-1, -2)), theta)}
    with torch.no_grad():
        weight = log_pi(theta).exp()  # (N,) pi(y)
    rows = []
    for name, options, claims in ROWS:
        objective = OBJECTIVES["sampled_token" if name == "naive ids" else name]
        pb = Problem(student, theta, Fixed(naive if name == "naive ids" else proj), None, seqs, weight)
        grads = per_sample_grads(pb, objective, options if name == "naive ids" else {**options, "chunks": chunks})
        g, trace_cov = expectation(grads, weight)  # (P,), tr Cov
        verdict, cos, err = follows(g, goals)
        with torch.no_grad():
            dX = (kl(theta - cfg.step * g / g.norm(), text_lp) - kl(theta, text_lp)).item()
        flags = ([f"wrong divergence (claims {claims})"] if claims and claims not in verdict else []) + \
            (["raises X"] if dX > 0 else [])
        rows.append(dict(teacher="free" if free else "canonical", objective=name,
                         options=" ".join(f"{k}={v:g}" for k, v in options.items()) or "-", claims=claims or "-",
                         follows=verdict, **{f"cos_{t}": cos[t] for t in TARGETS}, **{f"err_{t}": err[t] for t in TARGETS},
                         g_norm=g.norm().item(), trace_cov=trace_cov, dX_step=dX, flags="; ".join(flags) or "-",
                         cos_PX=cosine(goals["P"], goals["X"])))
    return rows


def main(argv=None) -> list[dict]:
    cfg = parse_config(CrossAuditConfig, argv, description=__doc__)
    torch.set_num_threads(cfg.threads)
    rows = audit_teacher(cfg, free=True) + audit_teacher(cfg, free=False)
    print(f"exact toy, two tokenizations: {len(CHARS) ** L} texts of {L} characters over {CHARS!r}; the teacher "
          f"also reads {', '.join(sorted(MERGED))}; float64, no sampling")
    head = (f"{'teacher':9} {'objective':10} {'options':9} {'claims':>6} {'follows':>17} {'cos P':>7} {'err P':>8} "
            f"{'cos X':>7} {'err X':>8} {'cos C':>7} {'err C':>8} {'tr Cov':>9} {'dX step':>9}  flags")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['teacher']:9} {r['objective']:10} {r['options']:9} {r['claims']:>6} {r['follows']:>17} "
              + " ".join(f"{r[f'cos_{t}']:7.3f} {r[f'err_{t}']:8.2e}" for t in TARGETS)
              + f" {r['trace_cov']:9.3g} {r['dX_step']:9.2e}  {r['flags']}")
    print(f"cos(grad P, grad X): free teacher {rows[0]['cos_PX']:.4f}, canonical {rows[-1]['cos_PX']:.4f}")
    try:
        import csv
        import os
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "audit_cross.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    except OSError as e:
        print(f"error: cannot write to --out {cfg.out!r}: {e}", file=sys.stderr)
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
