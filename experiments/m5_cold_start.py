"""
M5: OPD with and without the SFT cold start (docs/design.md#cold-start): the same OPD run from
the cold-started student and from a random initialisation of the student's shape (s_steps 0, one
per seed). Trains the pairs first where <out_dir> has none.

  python experiments/m5_cold_start.py
  python experiments/m5_cold_start.py --pairs 3 --jobs 2   # 3 pairs x 2 seeds, two runs at a time
  python experiments/m5_cold_start.py --help            # every flag, with its default

Writes <out_dir>/m5/m5.{txt,csv,json} (per cell: mean, 95 % t-interval over the pairs' means,
per-pair means; experiments/common.py) and each run's files in its pair's folder
(<pair dir>/m5/cold_s<seed>.*, scratch_s<seed>.*).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from experiments.common import (OPSD_FIELDS, RLVR_FIELDS, ExperimentConfig, cell_text, cells, final_eval, pairs, parse,
                                run_cells, run_experiment, start_accs)
from nanoopd.checkpoint import load_checkpoint
from nanoopd.device import pick_device, seed_everything
from nanoopd.evaluate import evaluate
from nanoopd.opd import train_opd
from nanoopd.report import by_label, header, mean, write_results
from nanoopd.script import cli
from nanoopd.tokenizer import get_tokenizer
from train_math import new_model, objective_options, opd_config, test_problems

CSV = ["label", "pair", "seed", "start_acc", "final_acc", "first_kl", "final_kl", "first_overlap_ratio",
       "final_overlap_ratio", "first_response_length", "final_response_length", "final_budget_share",
       "degraded", "seconds"]


def m5_cell(pcfg: ExperimentConfig, cell: dict) -> dict:
    """One OPD run from the pair's cold-started student or from a random init (seeded by the OPD seed)."""
    tok, device = get_tokenizer(), pick_device(pcfg.device)
    teacher = load_checkpoint(os.path.join(pcfg.out_dir, "teacher.pt"), device, tok.n_vocab)[0]
    if cell["cold"]:
        model, start = load_checkpoint(os.path.join(pcfg.out_dir, "student.pt"), device, tok.n_vocab)[0], cell["start"]
    else:
        seed_everything(cell["seed"])
        model = new_model(pcfg, "s", tok, device)
        start = {"start_acc": final_eval(pcfg, model, tok),
                 "start_acc_train": evaluate(model, tok, test_problems(pcfg), 0.0, pcfg.max_new_tokens)}
    s = train_opd(model, teacher, tok, opd_config(pcfg, pcfg.loss, objective_options(pcfg, tok), cell["seed"]),
                  cell["prefix"], test_problems(pcfg), lambda m: print(m, flush=True),
                  f"{cell['label']} s{cell['seed']} pair {pcfg.seed}", start_acc=start["start_acc_train"],
                  print_every=20, compile=pcfg.compile)
    s = {k: v for k, v in s.items() if k != "config"}
    return {"label": cell["label"], "pair": pcfg.seed, "seed": cell["seed"], **s,
            "start_acc_train": s["start_acc"], "final_acc_train": s["final_acc"], "start_acc": start["start_acc"],
            "final_acc": final_eval(pcfg, model, tok), "first_overlap_ratio": s["first_step"]["overlap_ratio"],
            "first_response_length": s["first_step"]["response_length"]}


def m5(cfg: ExperimentConfig, tok, device, log) -> dict:
    t0 = time.time()
    pcfgs = pairs(cfg, log)
    calls = [(p, {"prefix": os.path.join(p.out_dir, "m5", f"{'cold' if cold else 'scratch'}_s{seed}"), "seed": seed,
                  "cold": cold, "start": start_accs(p, "student"),
                  "label": f"cold start ({cfg.s_steps} SFT steps)" if cold else "no cold start (s_steps 0)"})
             for p in pcfgs for seed in cfg.seed_list() for cold in (True, False)]
    rows = run_cells(cfg, m5_cell, calls, log)
    teacher_acc = mean(final_eval(p, load_checkpoint(os.path.join(p.out_dir, "teacher.pt"), device, tok.n_vocab)[0],
                                  tok) for p in pcfgs)
    lines = [header(cfg, f"M5: OPD with vs without the SFT cold start | {cfg.pairs} pair(s)", teacher_acc=teacher_acc,
                    student_acc=mean(start_accs(p, "student")["start_acc"] for p in pcfgs), seconds=time.time() - t0),
             f"{'student':28s} | {'held-out acc':16s} | {'held-out acc, end: mean [95% CI]':40s} | {'rev. KL':15s} | "
             f"{'top-16 overlap':16s} | {'length':12s} | {'hit budget':10s}",
             f"{'':28s} | {'start -> end':16s} | {'(per pair or seed)':40s} | {'start -> end':15s} | {'start -> end':16s} | "
             f"{'start -> end':12s} | {'end':10s}"]
    for label, rs in by_label(rows).items():
        lines.append(f"{label:28s} | {100 * mean(r['start_acc'] for r in rs):5.1f}% -> {100 * mean(r['final_acc'] for r in rs):5.1f}% | "
                     f"{cell_text(rs):40s} | "
                     f"{mean(r['first_kl'] for r in rs):5.3f} -> {mean(r.get('final_kl') for r in rs):5.3f} | "
                     f"{100 * mean(r['first_overlap_ratio'] for r in rs):5.1f}% -> {100 * mean(r.get('final_overlap_ratio') for r in rs):5.1f}% | "
                     f"{mean(r['first_response_length'] for r in rs):4.1f} -> {mean(r.get('final_response_length') for r in rs):4.1f} | "
                     f"{100 * mean(r.get('final_budget_share') for r in rs):9.1f}%")
    lines.append(f"means over all runs; end = last 10 % of steps (held-out accuracy: greedy on final_eval_n="
                 f"{cfg.final_eval_n} problems per pair after the last step); 95% CI: t-interval over the pairs' means "
                 "(one pair: over its seeds); per-run values in m5.csv")
    table = "\n".join(lines)
    log(table)
    folder = os.path.join(cfg.out_dir, "m5")
    os.makedirs(folder, exist_ok=True)
    write_results(folder, "m5", rows, table, {"cells": cells(rows, ("final_acc", "final_kl")),
                                              "seconds": round(time.time() - t0, 1)}, CSV)
    return {}


def main(argv=None) -> dict:
    cfg = parse(ExperimentConfig, argv, __doc__, exclude=("run_name", "hide_from_teacher", "objectives") + OPSD_FIELDS + RLVR_FIELDS)
    return run_experiment("m5", cfg, m5)


if __name__ == "__main__":
    cli(main)
