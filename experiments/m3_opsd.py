"""
M3: on-policy self-distillation (OPSD) with instance-specific privileged information (the answer,
the solution of this very problem) vs a shared rule ("write the answer reversed"), DESIGN.md
sections 4 and 7. The OPSD base is the student and, with PI in its context, its own teacher; one
run per kind of PI and seed. Trains the OPSD base (pibase.pt) first if <out_dir> has none.

  python experiments/m3_opsd.py --loss full_reverse_kl --opd_lr 1e-3 --opd_steps 120 --opd_batch 32
  python experiments/m3_opsd.py --live_teacher          # the teacher is the live weights
  python experiments/m3_opsd.py --help                  # every flag, with its default

Writes <out_dir>/m3/m3.{txt,csv,json} and each run's files (<pi>_s<seed>.*).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from experiments.common import RLVR_FIELDS, STUDENT_FIELDS, ExperimentConfig, parse, run_experiment
from nanoopd.report import mean, pct, write_results
from nanoopd.script import cli
from nanoopd.self_distill import PI_KINDS, pi_scores
from train_math import load_role, opsd_run, rule_problems, train_pi_base

CSV = ["pi", "seed", "start_acc", "final_acc", "start_rule", "final_rule", "first_kl", "final_kl",
       "final_response_length", "final_overlap_ratio", "degraded", "steps_done", "seconds"]


def m3(cfg: ExperimentConfig, tok, device, log) -> dict:
    t0 = time.time()
    base = load_role(cfg, "pibase", tok, device, log, lambda: train_pi_base(cfg, tok, device, log))
    problems = rule_problems(cfg)
    start = pi_scores(base, tok, problems, cfg.max_new_tokens)
    with_pi = {kind: pi_scores(base, tok, problems, cfg.max_new_tokens, kind) for kind in PI_KINDS}
    folder = os.path.join(cfg.out_dir, "m3")
    rows = [opsd_run(cfg, tok, base, kind, seed, os.path.join(folder, f"{kind}_s{seed}"), log,
                     f"opsd {kind} s{seed}", start, print_every=20)
            for seed in cfg.seed_list() for kind in PI_KINDS]
    lines = [f"M3: OPSD, instance-specific PI vs the shared rule | seeds {cfg.seeds} | {cfg.loss}, {cfg.opd_steps} "
             f"steps x {cfg.opd_batch} rollouts, lr {cfg.opd_lr} | teacher: {'live' if cfg.live_teacher else 'frozen step-0'} "
             f"weights + PI | held-out n={len(problems)} (answers that are not palindromes) | "
             f"wall {(time.time() - t0) / 60:.1f} min",
             f"the base without PI: accuracy {start[0]:.1%}, rule-following {start[1]:.1%}",
             f"{'PI':8s} | {'base with PI':21s} | {'student without PI: accuracy':36s} | "
             f"{'student without PI: rule-following':36s} | {'rev. KL to teacher':18s}",
             f"{'':8s} | {'acc / rule':21s} | {'end, mean (per seed)':36s} | {'end, mean (per seed)':36s} | "
             f"{'start -> end':18s}"]
    for kind in PI_KINDS:
        rs = [r for r in rows if r["pi"] == kind]
        lines.append(f"{kind:8s} | {100 * with_pi[kind][0]:8.1f}% / {100 * with_pi[kind][1]:5.1f}%    | "
                     f"{pct(r['final_acc'] for r in rs):36s} | {pct(r['final_rule'] for r in rs):36s} | "
                     f"{mean(r['first_kl'] for r in rs):6.3f} -> {mean(r.get('final_kl') for r in rs):6.3f}")
    lines.append("accuracy: the true answer written plainly; rule-following: the true answer written reversed "
                 "(what the rule asks); the student never sees PI; KL: mean over the first step and the last 10 % "
                 "of steps")
    table = "\n".join(lines)
    log(table)
    write_results(folder, "m3", rows, table, {"base_acc": start[0], "base_rule": start[1], "base_with_pi": with_pi,
                                              "seconds": round(time.time() - t0, 1)}, CSV)
    return {}


def main(argv=None) -> dict:
    cfg = parse(ExperimentConfig, argv, __doc__, exclude=("run_name", "hide_from_teacher") + RLVR_FIELDS + STUDENT_FIELDS,
                mode="opsd", pi="rule")
    return run_experiment("m3", cfg, m3)


if __name__ == "__main__":
    cli(main)
