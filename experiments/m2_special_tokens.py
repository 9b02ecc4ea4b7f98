"""
M2: special-token mismatch (docs/design.md#special-token-masking-and-hiding). A copy of the student is taught to open
every answer with <|fmt|>, a token the teacher never saw, then distilled with and without masking
that token out of the loss (and hiding it from the teacher's contexts), one run per seed.

  python experiments/m2_special_tokens.py
  python experiments/m2_special_tokens.py --help        # every flag, with its default

Writes <out_dir>/student_fmt.pt and <out_dir>/m2/m2.{txt,csv,json}, plus each run's files.
"""

import copy
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch

from experiments.common import (OPD_RUN_FIELDS, OPSD_FIELDS, RLVR_FIELDS, ExperimentConfig, cell_text, cells,
                                final_eval, pairs, parse, role_finished, run_experiment, run_grid)
from nanoopd.checkpoint import load_checkpoint
from nanoopd.config import ConfigError
from nanoopd.evaluate import evaluate
from nanoopd.report import by_label, degraded_cell, header, mean, pct, write_results
from nanoopd.script import cli
from nanoopd.tokenizer import get_tokenizer
from train_math import sft, teacher_traces, test_problems

RUNS = (  # (label, objective, options); token names are resolved with the tokenizer
    ("sampled_token", "sampled_token", {}),
    ("sampled_token+mask", "sampled_token", {"mask_tokens": "<|fmt|>"}),
    ("sampled_token+mask+hide", "sampled_token", {"mask_tokens": "<|fmt|>", "hide_from_teacher": "<|fmt|>"}),
    ("full_reverse_kl", "full_reverse_kl", {}),
    ("full_reverse_kl+mask+hide", "full_reverse_kl", {"mask_tokens": "<|fmt|>", "hide_from_teacher": "<|fmt|>"}),
)
CSV = ["label", "pair", "seed", "start_acc", "final_acc", "step0_fmt_logratio", "step0_fmt_share", "step0_grad_norm",
       "step0_other_kl", "final_track_other_kl", "final_kl", "final_fmt_rate", "final_track_logratio_mean",
       "final_response_length", "max_logratio_abs", "degraded", "error", "steps_done", "seconds"]


@dataclass
class M2Config(ExperimentConfig):
    # --- experiment
    fmt_steps: int = 100             # SFT steps that teach a copy of the student to open every answer with <|fmt|>

    def __post_init__(self):
        super().__post_init__()
        if self.fmt_steps < 1:
            raise ConfigError("fmt_steps", f"must be >= 1, got {self.fmt_steps}")


def make_fmt_student(cfg: M2Config, tok, teacher, student, log):
    """A copy of the student fine-tuned to open every answer with <|fmt|>, a token the teacher was
    never trained on (so log q(<|fmt|> | c_t) is tens of nats below log pi)."""
    traces = [(prompt, [tok.fmt_id] + resp) for prompt, resp in teacher_traces(teacher, tok, cfg)]
    g = torch.Generator().manual_seed(cfg.seed + 3)
    batch = lambda s: [traces[i] for i in torch.randint(len(traces), (cfg.batch_size,), generator=g).tolist()]
    return sft(cfg, copy.deepcopy(student), "student_fmt", batch, cfg.fmt_steps, cfg.s_lr, log, warmup=10)


def fmt_rate(cfg: M2Config, model) -> float:
    """The share of greedy answers to the final held-out problems that open with <|fmt|>."""
    tok = get_tokenizer()
    _, texts = evaluate(model, tok, test_problems(cfg, final=True), 0.0, cfg.max_new_tokens, return_texts=True)
    return sum(t.startswith(tok.decode([tok.fmt_id])) for t in texts) / len(texts)


def fmt_after(pcfg: M2Config, label: str, model) -> dict:
    return {"final_fmt_rate": fmt_rate(pcfg, model)}


def m2(cfg: M2Config, tok, device, log) -> dict:
    t0 = time.time()
    pcfgs = pairs(cfg, log)
    teacher_acc, start_rate = [], {}
    for p in pcfgs:  # each pair's <|fmt|> student, <pair dir>/student_fmt.pt (made once, then reused)
        teacher = load_checkpoint(os.path.join(p.out_dir, "teacher.pt"), device, tok.n_vocab)[0]
        path = os.path.join(p.out_dir, "student_fmt.pt")
        fmt_student = load_checkpoint(path, device, tok.n_vocab)[0] if role_finished(path, p.fmt_steps) else make_fmt_student(
            p, tok, teacher, load_checkpoint(os.path.join(p.out_dir, "student.pt"), device, tok.n_vocab)[0], log)
        start_rate[p.seed] = fmt_rate(p, fmt_student)
        teacher_acc.append(final_eval(p, teacher, tok))
    rows = run_grid(cfg, pcfgs, RUNS, "m2", log, track=(tok.fmt_id,), after=fmt_after, student_role="student_fmt")
    for r in rows:
        first = r.get("first_step") or {}
        r.update(step0_fmt_logratio=first.get("track_logratio_mean"), step0_fmt_share=first.get("track_share"),
                 step0_grad_norm=first.get("grad_norm"), step0_other_kl=first.get("track_other_kl"))
    lines = [header(cfg, f"M2: special-token mismatch (<|fmt|>) | {cfg.pairs} pair(s)", mean(teacher_acc),
                    mean(r["start_acc"] for r in rows), time.time() - t0),
             f"the <|fmt|> student opens {100 * mean(start_rate.values()):.1f}% of its greedy answers with <|fmt|> "
             f"before OPD (mean over pairs)",
             f"{'run':25s} | {'r_t on <|fmt|>':14s} | {'its share':9s} | {'grad norm':9s} | {'KL elsewhere':14s} | "
             f"{'held-out acc: mean [95% CI] (per pair/seed)':45s} | {'<|fmt|> kept':20s} | degraded",
             f"{'':25s} | {'step 0':14s} | {'step 0':9s} | {'step 0':9s} | {'step 0 -> end':14s} | "
             f"{'end':45s} | {'end':20s} |"]
    for label, rs in by_label(rows).items():
        lines.append(f"{label:25s} | {mean(r['step0_fmt_logratio'] for r in rs):+14.1f} | "
                     f"{100 * mean(r['step0_fmt_share'] for r in rs):8.1f}% | "
                     f"{mean(r['step0_grad_norm'] for r in rs):9.2f} | "
                     f"{mean(r['step0_other_kl'] for r in rs):5.2f} -> {mean(r.get('final_track_other_kl') for r in rs):5.2f} | "
                     f"{cell_text(rs):45s} | {pct(r['final_fmt_rate'] for r in rs):20s} | "
                     f"{degraded_cell(rs)}")
    lines.append("r_t = log pi - log q on the sampled <|fmt|> tokens (mean) and its share of the batch's sum_t |r_t|; "
                 "KL elsewhere: reverse KL at every other response position (step 0, and the last 10 % of steps); "
                 "<|fmt|> kept: share of greedy held-out answers that still open with it; mask: <|fmt|> left out of "
                 f"the loss; hide: <|fmt|> removed from the teacher's contexts; held-out: final_eval_n={cfg.final_eval_n} "
                 "per pair, 95% CI: t-interval over the pairs' means (one pair: over its seeds)")
    table = "\n".join(lines)
    log(table)
    folder = os.path.join(cfg.out_dir, "m2")
    os.makedirs(folder, exist_ok=True)
    write_results(folder, "m2", rows, table, {"teacher_acc": mean(teacher_acc), "start_fmt_rate": start_rate,
                                              "cells": cells(rows, ("final_acc", "final_fmt_rate")),
                                              "seconds": round(time.time() - t0, 1)}, CSV)
    return {}


def main(argv=None) -> dict:
    cfg = parse(M2Config, argv, __doc__, exclude=OPD_RUN_FIELDS + OPSD_FIELDS + RLVR_FIELDS)
    return run_experiment("m2", cfg, m2)


if __name__ == "__main__":
    cli(main)
