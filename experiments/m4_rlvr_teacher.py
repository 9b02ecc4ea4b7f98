"""
M4: the SFT teacher vs RLVR-adapted teachers as the OPD teacher of the cold-started student
(docs/design.md#rlvr-group-normalised-reinforce). The teachers (TEACHERS, --m4_teachers): the SFT
teacher; the student after a short RLVR (--rlvr_*: the weak control); the SFT teacher adapted by
RLVR on the student's prefixes (--prefix_*: it finishes the student's cut samples and the verifier
rewards it); the student after a long RLVR (--long_*). One RLVR teacher per pair and seed; for each
teacher its from-scratch accuracy, its teacher-continuation accuracy from the student's prefixes,
and the OPD run it teaches. Trains the pairs first where <out_dir> has none.

  python experiments/m4_rlvr_teacher.py
  python experiments/m4_rlvr_teacher.py --pairs 3 --jobs 2   # 3 pairs x 2 seeds, two runs at a time
  python experiments/m4_rlvr_teacher.py --m4_teachers sft,rlvr   # the SFT teacher and the weak control only
  python experiments/m4_rlvr_teacher.py --help          # every flag, with its default

Writes <out_dir>/m4/m4.{txt,csv,json} (per cell: mean, 95 % t-interval over the pairs' means,
per-pair means; experiments/common.py) and, in each pair's folder, <pair dir>/m4/
teacher_<label>_s<seed>.{pt,jsonl} and each run's files.
"""

import os
import sys
import time
from dataclasses import dataclass, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from experiments.common import (OPSD_FIELDS, ExperimentConfig, cell_text, cells, final_eval, pairs, parse, run_cells,
                                run_experiment, start_accs, verdict, verdict_text)
from nanoopd.checkpoint import load_checkpoint
from nanoopd.config import ConfigError, sub_config
from nanoopd.device import pick_device
from nanoopd.evaluate import teacher_continuation
from nanoopd.opd import train_opd
from nanoopd.rlvr import RLVRConfig
from nanoopd.report import by_label, header, mean, pct, write_results
from nanoopd.script import cli
from nanoopd.tokenizer import get_tokenizer
from train_math import objective_options, opd_config, test_problems, train_rlvr_teacher

CSV = ["label", "pair", "seed", "teacher_acc", "continuation_acc", "student_acc", "frac", "start_acc", "final_acc",
       "first_overlap_ratio", "final_overlap_ratio", "first_kl", "final_kl", "degraded", "seconds"]
# (label, the model RLVR starts from (None: --rlvr_init's), {RLVR field: the M4 flag that sets it});
# sft: the SFT teacher as it is; rlvr: the --rlvr_* flags as given
TEACHERS = (
    ("sft", None, {}),
    ("rlvr", None, {}),
    ("rlvr_prefix", "teacher", {"rlvr_steps": "prefix_steps", "rlvr_lr": "prefix_lr", "rlvr_cut": "prefix_cut"}),
    ("rlvr_long", "student", {"rlvr_steps": "long_steps", "rlvr_lr": "long_lr"}),
)


@dataclass
class M4Config(ExperimentConfig):
    # --- experiment
    cont_frac: float = 0.5           # teacher-continuation accuracy: cut the student's samples at this fraction, in [0, 1]
    m4_teachers: str = "sft,rlvr,rlvr_prefix,rlvr_long"  # comma-separated teachers of TEACHERS to run (sft among them)
    prefix_steps: int = 200          # rlvr_prefix: RLVR steps of the SFT teacher on the student's prefixes
    prefix_lr: float = 1e-4          # rlvr_prefix: its peak learning rate
    prefix_cut: float = 0.9          # rlvr_prefix: its contexts are student samples cut at a fraction drawn from U[0, prefix_cut]
    long_steps: int = 1000           # rlvr_long: RLVR steps of the student from its prompts
    long_lr: float = 1e-3            # rlvr_long: its peak learning rate

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.cont_frac <= 1:
            raise ConfigError("cont_frac", f"must lie in [0, 1], got {self.cont_frac}")
        self.teacher_list()
        for _, _, flags in TEACHERS:  # RLVRConfig's checks of each teacher's settings, named by M4's flags
            try:
                sub_config(RLVRConfig, self, **self.overrides(flags))
            except ConfigError as e:
                raise ConfigError(flags.get(e.field, e.field), e.message) from None

    def teacher_list(self) -> list[tuple]:
        labels = [t for t in self.m4_teachers.split(",") if t]
        known = [t[0] for t in TEACHERS]
        if any(t not in known for t in labels) or "sft" not in labels:
            raise ConfigError("m4_teachers", f"must be names of {', '.join(known)}, sft among them; got {self.m4_teachers!r}")
        return [t for t in TEACHERS if t[0] in labels]

    def overrides(self, flags: dict) -> dict:
        return {field: getattr(self, flag) for field, flag in flags.items()}

    def rlvr_of(self, label: str) -> "M4Config":
        """This config with the RLVR settings of teacher `label`: where it starts, its steps, lr and cut."""
        _, init, flags = next(t for t in TEACHERS if t[0] == label)
        return replace(self, rlvr_init=init or self.rlvr_init, **self.overrides(flags))


def m4_cell(pcfg: M4Config, cell: dict) -> dict:
    """One teacher (the SFT one, or an RLVR teacher trained here with the OPD seed, resumable): its
    accuracies from scratch and from the student's prefixes, and the OPD run it teaches."""
    tok, device, seed = get_tokenizer(), pick_device(pcfg.device), cell["seed"]
    log = lambda m: print(m, flush=True)
    load = lambda role: load_checkpoint(os.path.join(pcfg.out_dir, f"{role}.pt"), device, tok.n_vocab)[0]
    teacher, student = load("teacher"), load("student")
    if cell["label"] != "sft":
        rcfg = pcfg.rlvr_of(cell["label"])
        teacher = train_rlvr_teacher(rcfg, tok, teacher, student, seed,
                                     os.path.join(pcfg.out_dir, "m4", f"teacher_{cell['label']}_s{seed}.pt"), log,
                                     resume=True)
    test = test_problems(pcfg, final=True)
    cont = teacher_continuation(teacher, student, tok, test, pcfg.cont_frac, pcfg.max_new_tokens, seed=seed)
    log(f"m4 {cell['label']} s{seed} pair {pcfg.seed}: teacher greedy accuracy {cont['teacher_acc']:.1%}, from "
        f"student prefixes cut at {pcfg.cont_frac:.0%}: {cont['continuation_acc']:.1%}")
    s = train_opd(student, teacher, tok, opd_config(pcfg, pcfg.loss, objective_options(pcfg, tok), seed),
                  cell["prefix"], test_problems(pcfg), log, f"{cell['label']} s{seed} pair {pcfg.seed}",
                  start_acc=cell["start"]["start_acc_train"], print_every=20, compile=pcfg.compile)
    s = {k: v for k, v in s.items() if k != "config"}
    return {"label": cell["label"], "pair": pcfg.seed, "seed": seed, **cont, **s, "start_acc_train": s["start_acc"],
            "final_acc_train": s["final_acc"], "start_acc": cell["start"]["start_acc"],
            "final_acc": final_eval(pcfg, student, tok), "first_overlap_ratio": s["first_step"]["overlap_ratio"]}


def m4(cfg: M4Config, tok, device, log) -> dict:
    t0 = time.time()
    pcfgs = pairs(cfg, log)
    calls = [(p, {"prefix": os.path.join(p.out_dir, "m4", f"{label}_s{seed}"), "seed": seed, "label": label,
                  "start": start_accs(p, "student")})
             for p in pcfgs for seed in cfg.seed_list() for label, _, _ in cfg.teacher_list()]
    rows = run_cells(cfg, m4_cell, calls, log)
    start = mean(start_accs(p, "student")["start_acc"] for p in pcfgs)
    lines = [header(cfg, f"M4: SFT teacher vs RLVR-adapted teacher | {cfg.pairs} pair(s)", teacher_acc=mean(
                 r["teacher_acc"] for r in rows if r["label"] == "sft"), student_acc=start, seconds=time.time() - t0),
             *[f"{label}: from the {r.rlvr_init}, {r.rlvr_steps} RLVR steps x {r.rlvr_prompts} problems x {r.rlvr_group} "
               f"samples, lr {r.rlvr_lr}, contexts {'prompts' if r.rlvr_cut == 0 else f'student samples cut at U[0, {r.rlvr_cut}]'}"
               for label, r in ((t[0], cfg.rlvr_of(t[0])) for t in cfg.teacher_list() if t[0] != "sft")],
             f"{'teacher':11s} | {'teacher acc':22s} | {'teacher continuation':22s} | {'top-16 overlap':16s} | "
             f"{'student held-out acc: mean [95% CI]':40s} | {'rev. KL':15s}",
             f"{'':11s} | {'greedy, from scratch':22s} | {f'from {cfg.cont_frac:.0%} of student':22s} | "
             f"{'start -> end':16s} | {'end (per pair or seed)':40s} | {'start -> end':15s}"]
    for label, rs in by_label(rows).items():
        lines.append(f"{label:11s} | {pct(r['teacher_acc'] for r in rs):22s} | {pct(r['continuation_acc'] for r in rs):22s} | "
                     f"{100 * mean(r['first_overlap_ratio'] for r in rs):5.1f}% -> {100 * mean(r.get('final_overlap_ratio') for r in rs):5.1f}% | "
                     f"{cell_text(rs):40s} | "
                     f"{mean(r['first_kl'] for r in rs):5.3f} -> {mean(r.get('final_kl') for r in rs):5.3f}")
    lines.append("teacher continuation: the student samples (T=1) a held-out answer, it is cut at the fraction, the "
                 "teacher finishes it greedily; overlap |TopK(pi) ∩ TopK(q)|/16 on the student's samples, first "
                 f"step and last 10 % of steps; held-out: final_eval_n={cfg.final_eval_n} per pair; 95% CI: t-interval "
                 "over the pairs' means (one pair: over its seeds)")
    checks = {}
    for label in (t[0] for t in cfg.teacher_list() if t[0] != "sft"):
        checks[label] = verdict(rows, label, "sft")
        checks[f"{label}_continues"] = verdict(rows, label, "sft", key="continuation_acc")
        lines.append(f"{label} above sft: distils {verdict_text(checks[label])}; continues "
                     f"{verdict_text(checks[f'{label}_continues'])}")
    table = "\n".join(lines)
    log(table)
    folder = os.path.join(cfg.out_dir, "m4")
    os.makedirs(folder, exist_ok=True)
    write_results(folder, "m4", rows, table, {"student_start_acc": start, "seconds": round(time.time() - t0, 1),
                                              "verdicts": checks,
                                              "cells": cells(rows, ("final_acc", "teacher_acc", "continuation_acc"))},
                  CSV)
    return {}


def main(argv=None) -> dict:
    cfg = parse(M4Config, argv, __doc__, exclude=("run_name", "hide_from_teacher", "objectives") + OPSD_FIELDS + ("teacher",))
    return run_experiment("m4", cfg, m4)


if __name__ == "__main__":
    cli(main)
