"""
M4: the SFT teacher vs an RLVR-adapted teacher as the OPD teacher of the cold-started student
(DESIGN.md sections 5 and 7). One RLVR teacher per seed (--rlvr_*); for each teacher its
from-scratch accuracy, its teacher-continuation accuracy from the student's prefixes, and the OPD
run it teaches. Trains the pair first if <out_dir> has none.

  python experiments/m4_rlvr_teacher.py
  python experiments/m4_rlvr_teacher.py --rlvr_cut 0.5  # RLVR on the student's own prefixes
  python experiments/m4_rlvr_teacher.py --help          # every flag, with its default

Writes <out_dir>/m4/m4.{txt,csv,json}, teacher_rlvr_s<seed>.{pt,jsonl} and each run's files.
"""

import copy
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from experiments.common import OPSD_FIELDS, ExperimentConfig, pair, parse, run_experiment
from nanoopd.config import ConfigError
from nanoopd.evaluate import evaluate, teacher_continuation
from nanoopd.opd import train_opd
from nanoopd.report import by_label, header, mean, pct, write_results
from nanoopd.script import cli
from train_math import objective_options, opd_config, test_problems, train_rlvr_teacher

CSV = ["label", "seed", "teacher_acc", "continuation_acc", "student_acc", "frac", "start_acc", "final_acc",
       "first_overlap_ratio", "final_overlap_ratio", "first_kl", "final_kl", "degraded", "seconds"]


@dataclass
class M4Config(ExperimentConfig):
    # --- experiment
    cont_frac: float = 0.5           # teacher-continuation accuracy: cut the student's samples at this fraction, in [0, 1]

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.cont_frac <= 1:
            raise ConfigError("cont_frac", f"must lie in [0, 1], got {self.cont_frac}")


def m4(cfg: M4Config, tok, device, log) -> dict:
    t0 = time.time()
    teacher, student = pair(cfg, tok, device, log)
    test = test_problems(cfg)
    folder = os.path.join(cfg.out_dir, "m4")
    os.makedirs(folder, exist_ok=True)
    start = evaluate(student, tok, test, 0.0, cfg.max_new_tokens)
    rows = []
    for seed in cfg.seed_list():
        teachers = {"sft": teacher,
                    "rlvr": train_rlvr_teacher(cfg, tok, teacher, student, seed,
                                               os.path.join(folder, f"teacher_rlvr_s{seed}.pt"), log)}
        for label, t in teachers.items():
            cont = teacher_continuation(t, student, tok, test, cfg.cont_frac, cfg.max_new_tokens, seed=seed)
            log(f"m4 {label} s{seed}: teacher greedy accuracy {cont['teacher_acc']:.1%}, from student prefixes cut "
                f"at {cfg.cont_frac:.0%}: {cont['continuation_acc']:.1%}")
            s = train_opd(copy.deepcopy(student), t, tok, opd_config(cfg, cfg.loss, objective_options(cfg, tok), seed),
                          os.path.join(folder, f"{label}_s{seed}"), test, log, f"{label} s{seed}", start_acc=start,
                          print_every=20, compile=cfg.compile)
            rows.append({"label": label, "seed": seed, **cont, **s,
                         "first_overlap_ratio": s["first_step"]["overlap_ratio"]})
    lines = [header(cfg, "M4: SFT teacher vs RLVR-adapted teacher", teacher_acc=mean(
                 r["teacher_acc"] for r in rows if r["label"] == "sft"), student_acc=start, seconds=time.time() - t0),
             f"RLVR teacher: from the {cfg.rlvr_init}, {cfg.rlvr_steps} steps x {cfg.rlvr_prompts} problems x "
             f"{cfg.rlvr_group} samples, lr {cfg.rlvr_lr}, cut {cfg.rlvr_cut} (one per seed)",
             f"{'teacher':7s} | {'teacher acc':22s} | {'teacher continuation':22s} | {'top-16 overlap':16s} | "
             f"{'student held-out acc':29s} | {'rev. KL':15s}",
             f"{'':7s} | {'greedy, from scratch':22s} | {f'from {cfg.cont_frac:.0%} of student':22s} | "
             f"{'start -> end':16s} | {'end, mean (per seed)':29s} | {'start -> end':15s}"]
    for label, rs in by_label(rows).items():
        lines.append(f"{label:7s} | {pct(r['teacher_acc'] for r in rs):22s} | {pct(r['continuation_acc'] for r in rs):22s} | "
                     f"{100 * mean(r['first_overlap_ratio'] for r in rs):5.1f}% -> {100 * mean(r.get('final_overlap_ratio') for r in rs):5.1f}% | "
                     f"{pct(r['final_acc'] for r in rs):29s} | "
                     f"{mean(r['first_kl'] for r in rs):5.3f} -> {mean(r.get('final_kl') for r in rs):5.3f}")
    lines.append("teacher continuation: the student samples (T=1) a held-out answer, it is cut at the fraction, the "
                 "teacher finishes it greedily; overlap |TopK(pi) ∩ TopK(q)|/16 on the student's samples, first "
                 "step and last 10 % of steps")
    table = "\n".join(lines)
    log(table)
    write_results(folder, "m4", rows, table, {"student_start_acc": start, "seconds": round(time.time() - t0, 1)}, CSV)
    return {}


def main(argv=None) -> dict:
    cfg = parse(M4Config, argv, __doc__, exclude=("run_name", "hide_from_teacher") + OPSD_FIELDS + ("teacher",))
    return run_experiment("m4", cfg, m4)


if __name__ == "__main__":
    cli(main)
