"""
Lab cross_tokenizer: one answer read by two tokenizers, its chunks and their log-ratios, and what the
chunk costs follow on the exact toy, on your code.

    python course/demos/cross_tokenizer.py

First the alignment of a math answer read by 'bytes' (the student's) and 'digits' (a teacher's that
reads up to three digits a token): your align's groups. Then the exact toy of toy/cross_audit.py
(81 texts of 4 characters, a teacher that also reads "00", "01", "11"): one text's chunks with
L_S(c), L_T(c) and r_c from your chunk_logratios, their sum against the two token paths' log-ratio,
and which divergence xt_chunk follows at gamma = 0 and gamma = 1 (your chunk_costs), for a teacher
that gives every token path mass (free) and one that gives only its canonical paths mass.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nanoopd.cross_tokenizer import align, chunk_logratios, spelled  # noqa: E402
from nanoopd.tokenizer import get_tokenizer  # noqa: E402
from toy.cross_audit import CHARS, TOKENS, CrossAuditConfig, Teacher, audit_teacher, canonical  # noqa: E402
from toy.exact import all_sequences, make_problem  # noqa: E402


def main() -> dict:
    s, t = get_tokenizer("bytes"), get_tokenizer("digits")
    text = "A:3471+25=3496"
    a, b = spelled(s, s.encode(text)), spelled(t, t.encode(text))
    groups = align(a, b)
    print(f"{text!r}: {len(a)} student tokens, {len(b)} teacher tokens, {len(groups)} chunks")
    print("  " + " | ".join(f"{'+'.join(p.decode() for p in a[i0:i1])} = {'+'.join(p.decode() for p in b[j0:j1])}"
                            for i0, i1, j0, j1 in groups if i1 - i0 > 1 or j1 - j0 > 1) + "  (the others: one token each)")
    # one text of the exact toy: the student's and the free teacher's log-probs of their own tokens
    student, theta, _, _ = make_problem(len(CHARS), 4, 1.0, 0)
    seqs = all_sequences(len(CHARS), 4)
    n = 27 + 3 + 1  # the text "1011" (its index in base 3)
    y = "".join(CHARS[i] for i in seqs[n].tolist())
    logp_s = student.token_logprobs(theta, seqs[n:n + 1])[0].detach()  # (4,)
    teacher, k, last, logp_t = Teacher(1, free=True), 0, None, []
    for tok in canonical(y):
        logp_t.append(teacher.logp(k, last)[TOKENS.index(tok)].item())
        k, last = k + len(tok), tok
    groups = align([c.encode() for c in y], [tok.encode() for tok in canonical(y)])
    r, per = chunk_logratios(groups, logp_s, logp_s.new_tensor(logp_t))
    print(f"text {y!r}, teacher tokens {canonical(y)}: r_c = " + ", ".join(f"{v:+.4f}" for v in r.tolist())
          + f"; sum {r.sum().item():+.6f} = log pi(a) - log q(b) = {logp_s.sum().item() - sum(logp_t):+.6f}")
    print("  per student token (r_c / n_c): " + ", ".join(f"{v:+.4f}" for v in per.tolist()))
    out = {"sum": r.sum().item(), "path": logp_s.sum().item() - sum(logp_t)}
    cfg = CrossAuditConfig()
    for free in (True, False):
        rows = [row for row in audit_teacher(cfg, free) if row["objective"] == "xt_chunk"]
        err = lambda x: f"{x:.1e}" if x >= 1e-6 else "< 1e-6"  # noqa: E731  (rounding-level errors vary by machine)
        for row in rows:
            print(f"{row['teacher']:9s} teacher, xt_chunk {row['options']:7s}: follows {row['follows']:13s} "
                  f"(cos P {row['cos_P']:.3f}, err P {err(row['err_P'])}; cos X {row['cos_X']:.3f}, err X {err(row['err_X'])})")
            out[(row["teacher"], row["options"])] = row["follows"]
    return out


if __name__ == "__main__":
    main()
