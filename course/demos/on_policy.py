"""
Lab on_policy: one OPD step's FLOPs in both columns at lmbda 1, 0.5 and 0, on your code.

    python course/demos/on_policy.py

A 1-layer student (C = 32) and a 2-layer teacher (C = 64), both untrained, 8 math prompts, at most
12 new tokens, the objective forward_kl (exact on either source's rows). One step of the library's
opd_step per line, each from the same student and the same seed: your student_share splits the
batch, your merge builds it, your opd_step_flops (through your F) and FlopCount.add count it. The
last two lines take the teacher's rows from a pool of 8 traces: the first pass pays for their
sampling, the second (the same traces again) does not. Then which objectives stay exact on the
teacher's rows.
"""

import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from nanoopd.flops import FlopCount  # noqa: E402
from nanoopd.loop import adamw  # noqa: E402
from nanoopd.mixed_batch import TeacherRows, student_share  # noqa: E402
from nanoopd.model import GPT, GPTConfig  # noqa: E402
from nanoopd.objectives import SPECS  # noqa: E402
from nanoopd.opd import OPDConfig, freeze, opd_step  # noqa: E402
from nanoopd.tasks import encode_example, sample_problems  # noqa: E402
from nanoopd.tokenizer import get_tokenizer  # noqa: E402

TOK = get_tokenizer()


def tiny(seed: int, n_layer: int, n_embd: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=TOK.n_vocab, block_size=64, n_layer=n_layer, n_head=2, n_embd=n_embd))


def main() -> dict:
    teacher = freeze(tiny(0, 2, 64))
    problems = sample_problems(8, "train", 0, 2)
    pool = [(p, *encode_example(TOK, p)) for p in problems]  # (problem, prompt ids, response ids): 8 traces
    runs = [(1.0, "fresh", 0), (0.5, "fresh", 0), (0.0, "fresh", 0), (0.0, "pool", 0), (0.0, "pool", 1)]
    print("lmbda  teacher rows   S  B-S | MFLOP charged   given   teacher's sampling")
    out = {}
    for lmbda, source, step in runs:
        student = tiny(1, 1, 32)
        cfg = OPDConfig(loss="forward_kl", lmbda=lmbda, teacher_rows=source, opd_batch=8, max_new_tokens=12,
                        digits=2, opd_eval_every=0, seed=0)
        rec = opd_step(student, teacher, adamw(student, 1e-3), TOK, problems, cfg, torch.Generator().manual_seed(0),
                       step, teacher_rows=TeacherRows(source, pool if source == "pool" else None))
        count = FlopCount().add(rec["flops_given"], rec["flops"] - rec["flops_given"])
        S = student_share(lmbda, len(problems))
        label = f"{source} (pass {step + 1})" if source == "pool" else source if lmbda < 1 else "-"
        out[(lmbda, source, step)] = (count.charged, count.given)
        print(f"{lmbda:5.1f}  {label:<13} {S:2d}  {8 - S:3d} | {count.charged / 1e6:13.2f} {count.given / 1e6:7.2f}"
              f" {(count.charged - count.given) / 1e6:9.2f}")
    same = {n: s for n, s in SPECS.items() if not s.cross}  # lmbda < 1 needs a teacher of the student's tokenizer
    exact = [n for n, s in same.items() if s.uses_teacher and not s.on_policy]
    assume = [n for n, s in same.items() if s.on_policy]
    print(textwrap.fill("exact on the teacher's rows (full distributions at each prefix): " + ", ".join(exact),
                        100, subsequent_indent="    "))
    print(textwrap.fill("assume y ~ pi (the sampled token's log-ratio): " + ", ".join(assume), 100,
                        subsequent_indent="    "))
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: one thread is the fastest, and a busy laptop stays fast
    main()
