"""
M1: every OPD objective side by side, from the same teacher and cold-start student
(docs/design.md#the-math-experiments), one run per pair and seed. Trains the pairs first
where <out_dir> has none.

  python experiments/m1_objectives.py                   # one pair, two seeds: a first look
  python experiments/m1_objectives.py --pairs 3 --jobs 2   # 3 pairs x 2 seeds, two runs at a time
  python experiments/m1_objectives.py --opd_lr 1e-3 --seeds 1,2,3
  python experiments/m1_objectives.py --help            # every flag, with its default

Writes <out_dir>/m1/m1.{txt,csv,json} (a cell: mean over all runs, 95 % t-interval over the pairs'
means, per-pair means; see experiments/common.py), m1.png when matplotlib is installed (each
objective's mean with its interval, and its per-pair means as dots), and one opd run per row in its pair's folder
(<pair dir>/m1/<label>_s<seed>.{pt,jsonl,json,row.json}). Started again with the same flags, it
reads the finished runs back and runs only the others.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from experiments.common import (OPD_RUN_FIELDS, OPSD_FIELDS, RLVR_FIELDS, ExperimentConfig, cell_text, cells,
                                final_eval, interval, pairs, parse, run_experiment, run_grid)
from nanoopd.checkpoint import load_checkpoint
from nanoopd.report import by_label, degraded_cell, header, mean, write_results
from nanoopd.script import cli

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
CSV = ["label", "pair", "seed", "start_acc", "final_acc", "first_kl", "final_kl", "final_response_length",
       "final_budget_share", "final_overlap_ratio", "final_overlap_mass_student", "max_logratio_abs",
       "final_grad_norm", "degraded", "error", "steps_done", "seconds"]


def m1(cfg: ExperimentConfig, tok, device, log) -> dict:
    t0 = time.time()
    pcfgs = pairs(cfg, log)
    rows = run_grid(cfg, pcfgs, RUNS, "m1", log)
    teacher_acc = [final_eval(p, load_checkpoint(os.path.join(p.out_dir, "teacher.pt"), device, tok.n_vocab)[0], tok)
                   for p in pcfgs]
    start_acc = [next(r["start_acc"] for r in rows if r["pair"] == p.seed) for p in pcfgs]  # each pair's student
    lines = [header(cfg, f"M1: objectives side by side | {cfg.pairs} pair(s), pipeline seeds {', '.join(str(p.seed) for p in pcfgs)}",
                    mean(teacher_acc), mean(start_acc), time.time() - t0),
             f"{'objective':21s} | {'held-out acc: mean [95% CI] (per pair or seed)':47s} | {'rev. KL start -> end':20s} | "
             f"{'length':6s} | {'overlap':7s} | {'max|r_t|':8s} | degraded"]
    for label, rs in by_label(rows).items():
        lines.append(f"{label:21s} | {cell_text(rs):47s} | "
                     f"{mean(r['first_kl'] for r in rs):8.3f} -> {mean(r.get('final_kl') for r in rs):7.3f} | "
                     f"{mean(r.get('final_response_length') for r in rs):6.1f} | "
                     f"{100 * mean(r.get('final_overlap_ratio') for r in rs):6.1f}% | "
                     f"{mean(r.get('max_logratio_abs') for r in rs):8.1f} | {degraded_cell(rs)}")
    lines.append(f"held-out accuracy: greedy, final_eval_n={cfg.final_eval_n} problems per pair, mean over all runs; "
                 "95% CI: t-interval over the pairs' means (one pair: over its seeds); teacher and start: means "
                 "over pairs; length, overlap (top-16, teacher vs student) and KL: means over the last 10 % of steps "
                 "of the rollouts; degraded: non-finite, length (>= 50 % of rollouts hit the budget) or collapse "
                 "(held-out accuracy > 10 points below the start)")
    table = "\n".join(lines)
    log(table)
    folder = os.path.join(cfg.out_dir, "m1")
    os.makedirs(folder, exist_ok=True)
    write_results(folder, "m1", rows, table, {"teacher_acc": dict(zip((p.seed for p in pcfgs), teacher_acc)),
                                              "cells": cells(rows, ("final_acc", "final_kl")),
                                              "seconds": round(time.time() - t0, 1)}, CSV)
    figure(os.path.join(folder, "m1.png"), rows, mean(start_acc), mean(teacher_acc), log)
    return {"m1_teacher_acc": mean(teacher_acc)}


def figure(path: str, rows: list[dict], start_acc: float, teacher_acc: float, log) -> None:
    """One row per objective: the mean held-out accuracy with its 95 % interval (a bar), each pair's
    mean (dots), and the student's start and the teacher as lines."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("m1: no figure: matplotlib is missing (pip install matplotlib)")
        return
    groups = list(by_label(rows).items())
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(groups) + 1.5))
    clip = lambda x: min(100.0, max(0.0, 100 * x))  # a t-interval over 3 pairs can reach past 0 or 100 %
    for i, (label, rs) in enumerate(groups):
        c = interval(rs, "final_acc")
        if c["mean"] is None:
            continue
        if c["low"] is not None:
            ax.plot([clip(c["low"]), clip(c["high"])], [i, i], color="tab:blue", lw=3, alpha=0.5)
        ax.plot(100 * c["mean"], i, "o", color="tab:blue", ms=7)
        ax.plot([100 * v for v in c["per_pair"].values()], [i] * len(c["per_pair"]), "k.", alpha=0.6, ms=5)
    for x, name, style in ((start_acc, "student at start", ":"), (teacher_acc, "teacher", "--")):
        ax.axvline(100 * x, color="gray", ls=style, lw=1, label=name)
    ax.set_yticks(range(len(groups)), [label for label, _ in groups])
    ax.invert_yaxis()
    ax.set_xlim(right=100)
    ax.set_xlabel("held-out accuracy after OPD (%, greedy)")
    ax.set_title("M1: mean (circle), 95 % t-interval over pairs (bar, cut at 0 and 100 %), each pair's mean (dots)",
                 fontsize=8)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"m1: figure {path}")


def main(argv=None) -> dict:
    cfg = parse(ExperimentConfig, argv, __doc__, exclude=OPD_RUN_FIELDS + OPSD_FIELDS + RLVR_FIELDS)
    return run_experiment("m1", cfg, m1)


if __name__ == "__main__":
    cli(main)
