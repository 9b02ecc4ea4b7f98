"""
M3: on-policy self-distillation (OPSD) with instance-specific privileged information (the answer,
the solution of this very problem) vs a shared rule ("write the answer reversed"),
docs/design.md#self-distillation-with-privileged-information. The OPSD base is the student and, with
PI in its context, its own teacher; one run per kind of PI, seed and pair. The aggregation measure:
the held-out token-level KL of the PI-free student to the base with each kind of PI, before and
after (self_distill.pi_kl): instance-specific PI is averaged away, so its KL cannot fall as the
rule's does. Trains the OPSD bases
(pibase.pt) first where <out_dir> has none:
with --pairs N, one per pipeline seed (experiments/common.py), in <out_dir> and <out_dir>/pair<seed>.

  python experiments/m3_opsd.py --loss full_reverse_kl --opd_lr 1e-3 --opd_steps 120 --opd_batch 32
  python experiments/m3_opsd.py --pairs 3 --jobs 2     # 3 bases x 2 seeds, two runs at a time
  python experiments/m3_opsd.py --live_teacher          # the teacher is the live weights
  python experiments/m3_opsd.py --help                  # every flag, with its default

Writes <out_dir>/m3/m3.{txt,csv,json} (per cell: mean, 95 % t-interval over the bases' means,
per-base means) and each run's files (<pair dir>/m3/<pi>_s<seed>.*). Its accuracies are on the
held-out problems of eval_n whose answer is not a palindrome (where the rule is visible).
"""

import os
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from experiments.common import (RLVR_FIELDS, STUDENT_FIELDS, ExperimentConfig, cell_text, cells, pair_configs, parse,
                                role_finished, run_cells, run_experiment, run_jobs, verdict, verdict_text)
from nanoopd.checkpoint import load_checkpoint
from nanoopd.device import pick_device
from nanoopd.report import mean, write_results
from nanoopd.script import cli
from nanoopd.self_distill import PI_KINDS, pi_kl, pi_scores
from nanoopd.tokenizer import get_tokenizer
from train_math import opsd_run, rule_problems, train_pi_base

CSV = ["pi", "pair", "seed", "start_acc", "final_acc", "start_rule", "final_rule", "first_kl", "final_kl",
       "start_pi_kl", "end_pi_kl", "pi_kl_left", "final_response_length", "final_overlap_ratio", "degraded", "steps_done",
       "seconds"]


def load_base(pcfg: ExperimentConfig):
    tok = get_tokenizer()
    return load_checkpoint(os.path.join(pcfg.out_dir, "pibase.pt"), pick_device(pcfg.device), tok.n_vocab)[0]


def base_cell(pcfg: ExperimentConfig, _cell=None) -> dict:
    """The pair's OPSD base, trained (or resumed) unless finished, and its scores with and without PI."""
    tok = get_tokenizer()
    if not role_finished(os.path.join(pcfg.out_dir, "pibase.pt"), pcfg.pi_steps):
        os.makedirs(pcfg.out_dir, exist_ok=True)
        train_pi_base(replace(pcfg, resume=True), tok, pick_device(pcfg.device), lambda m: print(m, flush=True))
    base, problems = load_base(pcfg), rule_problems(pcfg)
    return {"start": pi_scores(base, tok, problems, pcfg.max_new_tokens),
            "with_pi": {kind: pi_scores(base, tok, problems, pcfg.max_new_tokens, kind) for kind in PI_KINDS},
            "pi_kl": {kind: pi_kl(base, base, tok, problems, kind, pcfg.max_new_tokens, pcfg.seed) for kind in PI_KINDS}}


def m3_cell(pcfg: ExperimentConfig, cell: dict) -> dict:
    """One OPSD run from a copy of the pair's base, and the aggregation measure: the held-out KL of
    the trained PI-free student to the base with each kind of PI (self_distill.pi_kl)."""
    kind, seed, tok = cell["pi"], cell["seed"], get_tokenizer()
    base = load_base(pcfg)
    r = opsd_run(pcfg, tok, base, kind, seed, cell["prefix"], lambda m: print(m, flush=True),
                 f"opsd {kind} s{seed} pair {pcfg.seed}", tuple(cell["start"]), print_every=20)
    after = load_checkpoint(cell["prefix"] + ".pt", pick_device(pcfg.device), tok.n_vocab)[0]
    kl = {k: pi_kl(after, base, tok, rule_problems(pcfg), k, pcfg.max_new_tokens, pcfg.seed) for k in PI_KINDS}
    return {**{k: v for k, v in r.items() if k != "config"}, "pair": pcfg.seed, "start_pi_kl": cell["pi_kl"][kind],
            "end_pi_kl": kl[kind], "pi_kl_left": kl[kind] / cell["pi_kl"][kind], "end_pi_kl_all": kl}


def m3(cfg: ExperimentConfig, tok, device, log) -> dict:
    t0 = time.time()
    pcfgs = pair_configs(cfg)
    bases = run_jobs(cfg, base_cell, [(p, None) for p in pcfgs])
    calls = [(p, {"prefix": os.path.join(p.out_dir, "m3", f"{kind}_s{seed}"), "pi": kind, "seed": seed,
                  "start": b["start"], "pi_kl": b["pi_kl"]})
             for p, b in zip(pcfgs, bases) for seed in cfg.seed_list() for kind in PI_KINDS]
    rows = run_cells(cfg, m3_cell, calls, log)
    start = [mean(b["start"][i] for b in bases) for i in (0, 1)]
    with_pi = {kind: [mean(b["with_pi"][kind][i] for b in bases) for i in (0, 1)] for kind in PI_KINDS}
    lines = [f"M3: OPSD, instance-specific PI vs the shared rule | {cfg.pairs} base(s) x seeds {cfg.seeds} | {cfg.loss}, "
             f"{cfg.opd_steps} steps x {cfg.opd_batch} rollouts, lr {cfg.opd_lr} | teacher: "
             f"{'live' if cfg.live_teacher else 'frozen step-0'} weights + PI | held-out n={len(rule_problems(cfg))} "
             f"(answers that are not palindromes) | wall {(time.time() - t0) / 60:.1f} min",
             f"the base without PI: accuracy {start[0]:.1%}, rule-following {start[1]:.1%} (mean over bases)",
             f"{'PI':8s} | {'base with PI':21s} | {'student without PI: accuracy':40s} | "
             f"{'student without PI: rule-following':40s} | {'rev. KL to teacher':18s} | {'held-out KL to the PI teacher':30s}",
             f"{'':8s} | {'acc / rule':21s} | {'end: mean [95% CI] (per base or seed)':40s} | "
             f"{'end: mean [95% CI] (per base or seed)':40s} | {'start -> end':18s} | {'start -> end (share left)':30s}"]
    for kind in PI_KINDS:
        rs = [r for r in rows if r["pi"] == kind]
        lines.append(f"{kind:8s} | {100 * with_pi[kind][0]:8.1f}% / {100 * with_pi[kind][1]:5.1f}%    | "
                     f"{cell_text(rs, 'final_acc'):40s} | {cell_text(rs, 'final_rule'):40s} | "
                     f"{mean(r['first_kl'] for r in rs):6.3f} -> {mean(r.get('final_kl') for r in rs):6.3f}     | "
                     f"{mean(r['start_pi_kl'] for r in rs):6.3f} -> {mean(r['end_pi_kl'] for r in rs):6.3f} "
                     f"({100 * mean(r['pi_kl_left'] for r in rs):.0f} %)")
    aggregation = {k: verdict(rows, k, "rule", key="pi_kl_left", group="pi") for k in PI_KINDS if k != "rule"}
    lines.append("accuracy: the true answer written plainly; rule-following: the true answer written reversed "
                 "(what the rule asks); the student never sees PI; KL: mean over the first step and the last 10 % "
                 "of steps; 95% CI: t-interval over the bases' means (one base: over its seeds); held-out KL: "
                 "KL(pi(.|x) || q(.|I, x)) per token at the student's samples of the held-out problems, q the base with PI")
    lines.append("aggregation, the share of the held-out KL left above the rule's: " + "; ".join(
        f"{k} {verdict_text(v)}" for k, v in aggregation.items()))
    table = "\n".join(lines)
    log(table)
    folder = os.path.join(cfg.out_dir, "m3")
    os.makedirs(folder, exist_ok=True)
    write_results(folder, "m3", rows, table, {"base_acc": start[0], "base_rule": start[1], "base_with_pi": with_pi,
                                              "cells": cells(rows, ("final_acc", "final_rule", "pi_kl_left"), group="pi"),
                                              "aggregation": aggregation,
                                              "seconds": round(time.time() - t0, 1)}, CSV)
    return {}


def main(argv=None) -> dict:
    cfg = parse(ExperimentConfig, argv, __doc__, exclude=("run_name", "hide_from_teacher", "objectives") + RLVR_FIELDS + STUDENT_FIELDS,
                mode="opsd", pi="rule")
    return run_experiment("m3", cfg, m3)


if __name__ == "__main__":
    cli(main)
