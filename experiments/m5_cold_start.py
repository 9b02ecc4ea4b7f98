"""
M5: OPD with and without the SFT cold start (DESIGN.md sections 5 and 7): the same OPD run from
the cold-started student and from a random initialisation of the student's shape (s_steps 0, one
per seed). Trains the pair first if <out_dir> has none.

  python experiments/m5_cold_start.py
  python experiments/m5_cold_start.py --help            # every flag, with its default

Writes <out_dir>/m5/m5.{txt,csv,json} and each run's files (cold_s<seed>.*, scratch_s<seed>.*).
"""

import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from experiments.common import OPSD_FIELDS, RLVR_FIELDS, ExperimentConfig, pair, parse, run_experiment
from nanoopd.device import seed_everything
from nanoopd.evaluate import evaluate
from nanoopd.opd import train_opd
from nanoopd.report import by_label, header, mean, write_results
from nanoopd.script import cli
from train_math import new_model, objective_options, opd_config, test_problems

CSV = ["label", "seed", "start_acc", "final_acc", "first_kl", "final_kl", "first_overlap_ratio",
       "final_overlap_ratio", "first_response_length", "final_response_length", "final_budget_share",
       "degraded", "seconds"]


def m5(cfg: ExperimentConfig, tok, device, log) -> dict:
    t0 = time.time()
    teacher, student = pair(cfg, tok, device, log)
    test = test_problems(cfg)
    folder = os.path.join(cfg.out_dir, "m5")
    rows = []
    for seed in cfg.seed_list():
        seed_everything(seed)
        scratch = new_model(cfg, "s", tok, device)
        for label, init in ((f"cold start ({cfg.s_steps} SFT steps)", student), ("no cold start (s_steps 0)", scratch)):
            s = train_opd(copy.deepcopy(init), teacher, tok, opd_config(cfg, cfg.loss, objective_options(cfg, tok), seed),
                          os.path.join(folder, f"{'cold' if init is student else 'scratch'}_s{seed}"), test, log,
                          f"{label} s{seed}", print_every=20, compile=cfg.compile)
            rows.append({"label": label, "seed": seed, **s, "first_overlap_ratio": s["first_step"]["overlap_ratio"],
                         "first_response_length": s["first_step"]["response_length"]})
    lines = [header(cfg, "M5: OPD with vs without the SFT cold start", teacher_acc=evaluate(
                 teacher, tok, test, 0.0, cfg.max_new_tokens), student_acc=rows[0]["start_acc"], seconds=time.time() - t0),
             f"{'student':28s} | {'held-out acc':16s} | {'rev. KL':15s} | {'top-16 overlap':16s} | "
             f"{'length':12s} | {'hit budget':10s}",
             f"{'':28s} | {'start -> end':16s} | {'start -> end':15s} | {'start -> end':16s} | "
             f"{'start -> end':12s} | {'end':10s}"]
    for label, rs in by_label(rows).items():
        lines.append(f"{label:28s} | {100 * mean(r['start_acc'] for r in rs):5.1f}% -> {100 * mean(r['final_acc'] for r in rs):5.1f}% | "
                     f"{mean(r['first_kl'] for r in rs):5.3f} -> {mean(r.get('final_kl') for r in rs):5.3f} | "
                     f"{100 * mean(r['first_overlap_ratio'] for r in rs):5.1f}% -> {100 * mean(r.get('final_overlap_ratio') for r in rs):5.1f}% | "
                     f"{mean(r['first_response_length'] for r in rs):4.1f} -> {mean(r.get('final_response_length') for r in rs):4.1f} | "
                     f"{100 * mean(r.get('final_budget_share') for r in rs):9.1f}%")
    lines.append("means over the seeds; end = last 10 % of steps (held-out accuracy: the final evaluation); "
                 "per-seed values in m5.csv")
    table = "\n".join(lines)
    log(table)
    write_results(folder, "m5", rows, table, {"seconds": round(time.time() - t0, 1)}, CSV)
    return {}


def main(argv=None) -> dict:
    cfg = parse(ExperimentConfig, argv, __doc__, exclude=("run_name", "hide_from_teacher") + OPSD_FIELDS + RLVR_FIELDS)
    return run_experiment("m5", cfg, m5)


if __name__ == "__main__":
    cli(main)
