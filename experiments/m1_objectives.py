"""
M1: every OPD objective side by side, from the same teacher and cold-start student (DESIGN.md
section 7), one run per seed. Trains the pair first if <out_dir> has none.

  python experiments/m1_objectives.py                   # the table of the docs (about 17 min on 2 cores)
  python experiments/m1_objectives.py --opd_lr 1e-3 --seeds 1,2,3
  python experiments/m1_objectives.py --help            # every flag, with its default

Writes <out_dir>/m1/m1.{txt,csv,json} and one opd run per row (<label>_s<seed>.{pt,jsonl,json}).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from experiments.common import (OPD_RUN_FIELDS, OPSD_FIELDS, RLVR_FIELDS, ExperimentConfig, pair, parse,
                                run_experiment, run_grid)
from nanoopd.evaluate import evaluate
from nanoopd.report import by_label, degraded_cell, header, mean, pct, write_results
from nanoopd.script import cli
from train_math import test_problems

# (label, objective, options); mask_tokens holds token names, resolved with the tokenizer
RUNS = (
    ("sampled_token", "sampled_token", {}),
    # every special token that never belongs in an answer (EOS does, so it stays in the loss)
    ("sampled_token+mask", "sampled_token", {"mask_tokens": "<|bos|>,<|pad|>,<|pi|>,<|fmt|>"}),
    ("full_reverse_kl", "full_reverse_kl", {}),
    ("topk_unnormalized", "topk_unnormalized", {"k": 16}),
    ("topk_stopgrad", "topk_stopgrad", {"k": 16}),
    ("topk_renorm", "topk_renorm", {"k": 16}),
    ("sequence_kl(gamma=1)", "sequence_kl", {"gamma": 1.0}),
)
CSV = ["label", "seed", "start_acc", "final_acc", "first_kl", "final_kl", "final_response_length",
       "final_budget_share", "final_overlap_ratio", "final_overlap_mass_student", "max_logratio_abs",
       "final_grad_norm", "degraded", "error", "steps_done", "seconds"]


def m1(cfg: ExperimentConfig, tok, device, log) -> dict:
    t0 = time.time()
    teacher, student = pair(cfg, tok, device, log)
    folder = os.path.join(cfg.out_dir, "m1")
    rows = run_grid(cfg, tok, teacher, student, RUNS, folder, log)
    teacher_acc = evaluate(teacher, tok, test_problems(cfg), 0.0, cfg.max_new_tokens)
    lines = [header(cfg, "M1: objectives side by side", teacher_acc, rows[0]["start_acc"], time.time() - t0),
             f"{'objective':21s} | {'held-out acc, mean (per seed)':29s} | {'rev. KL start -> end':20s} | "
             f"{'length':6s} | {'overlap':7s} | {'max|r_t|':8s} | degraded"]
    for label, rs in by_label(rows).items():
        lines.append(f"{label:21s} | {pct(r['final_acc'] for r in rs):29s} | "
                     f"{mean(r['first_kl'] for r in rs):8.3f} -> {mean(r.get('final_kl') for r in rs):7.3f} | "
                     f"{mean(r.get('final_response_length') for r in rs):6.1f} | "
                     f"{100 * mean(r.get('final_overlap_ratio') for r in rs):6.1f}% | "
                     f"{mean(r.get('max_logratio_abs') for r in rs):8.1f} | {degraded_cell(rs)}")
    lines.append("length, overlap (top-16, teacher vs student) and KL: means over the last 10 % of steps of the "
                 "rollouts; degraded: non-finite, length (>= 50 % of rollouts hit the budget) or collapse "
                 "(held-out accuracy > 10 points below the start)")
    table = "\n".join(lines)
    log(table)
    write_results(folder, "m1", rows, table, {"teacher_acc": teacher_acc, "seconds": round(time.time() - t0, 1)},
                  CSV)
    return {"m1_teacher_acc": teacher_acc}


def main(argv=None) -> dict:
    cfg = parse(ExperimentConfig, argv, __doc__, exclude=OPD_RUN_FIELDS + OPSD_FIELDS + RLVR_FIELDS)
    return run_experiment("m1", cfg, m1)


if __name__ == "__main__":
    cli(main)
