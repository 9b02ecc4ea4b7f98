"""
M2: special-token mismatch (DESIGN.md sections 3 and 7). A copy of the student is taught to open
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

from experiments.common import (OPD_RUN_FIELDS, OPSD_FIELDS, RLVR_FIELDS, ExperimentConfig, pair, parse,
                                run_experiment, run_grid)
from nanoopd.config import ConfigError
from nanoopd.evaluate import evaluate
from nanoopd.report import by_label, degraded_cell, header, mean, pct, write_results
from nanoopd.script import cli
from train_math import sft, teacher_traces, test_problems

RUNS = (  # (label, objective, options); token names are resolved with the tokenizer
    ("sampled_token", "sampled_token", {}),
    ("sampled_token+mask", "sampled_token", {"mask_tokens": "<|fmt|>"}),
    ("sampled_token+mask+hide", "sampled_token", {"mask_tokens": "<|fmt|>", "hide_from_teacher": "<|fmt|>"}),
    ("full_reverse_kl", "full_reverse_kl", {}),
    ("full_reverse_kl+mask+hide", "full_reverse_kl", {"mask_tokens": "<|fmt|>", "hide_from_teacher": "<|fmt|>"}),
)
CSV = ["label", "seed", "start_acc", "final_acc", "step0_fmt_logratio", "step0_fmt_share", "step0_grad_norm",
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
    pairs = [(prompt, [tok.fmt_id] + resp) for prompt, resp in teacher_traces(teacher, tok, cfg)]
    g = torch.Generator().manual_seed(cfg.seed + 3)
    batch = lambda s: [pairs[i] for i in torch.randint(len(pairs), (cfg.batch_size,), generator=g).tolist()]
    return sft(cfg, copy.deepcopy(student), "student_fmt", batch, cfg.fmt_steps, cfg.s_lr, log, warmup=10)


def m2(cfg: M2Config, tok, device, log) -> dict:
    t0 = time.time()
    teacher, student = pair(cfg, tok, device, log)
    fmt_student = make_fmt_student(cfg, tok, teacher, student, log)
    test = test_problems(cfg)
    fmt_text = tok.decode([tok.fmt_id])

    def fmt_rate(model) -> float:
        _, texts = evaluate(model, tok, test, 0.0, cfg.max_new_tokens, return_texts=True)
        return sum(t.startswith(fmt_text) for t in texts) / len(texts)

    start_rate = fmt_rate(fmt_student)
    folder = os.path.join(cfg.out_dir, "m2")
    rows = run_grid(cfg, tok, teacher, fmt_student, RUNS, folder, log, track=(tok.fmt_id,),
                    after=lambda label, model: {"final_fmt_rate": fmt_rate(model)})
    for r in rows:
        first = r.get("first_step") or {}
        r.update(step0_fmt_logratio=first.get("track_logratio_mean"), step0_fmt_share=first.get("track_share"),
                 step0_grad_norm=first.get("grad_norm"), step0_other_kl=first.get("track_other_kl"))
    teacher_acc = evaluate(teacher, tok, test, 0.0, cfg.max_new_tokens)
    lines = [header(cfg, "M2: special-token mismatch (<|fmt|>)", teacher_acc, rows[0]["start_acc"], time.time() - t0),
             f"the <|fmt|> student opens {start_rate:.1%} of its greedy answers with <|fmt|> before OPD",
             f"{'run':25s} | {'r_t on <|fmt|>':14s} | {'its share':9s} | {'grad norm':9s} | {'KL elsewhere':14s} | "
             f"{'held-out acc, mean (per seed)':29s} | {'<|fmt|> kept':20s} | degraded",
             f"{'':25s} | {'step 0':14s} | {'step 0':9s} | {'step 0':9s} | {'step 0 -> end':14s} | "
             f"{'end':29s} | {'end':20s} |"]
    for label, rs in by_label(rows).items():
        lines.append(f"{label:25s} | {mean(r['step0_fmt_logratio'] for r in rs):+14.1f} | "
                     f"{100 * mean(r['step0_fmt_share'] for r in rs):8.1f}% | "
                     f"{mean(r['step0_grad_norm'] for r in rs):9.2f} | "
                     f"{mean(r['step0_other_kl'] for r in rs):5.2f} -> {mean(r.get('final_track_other_kl') for r in rs):5.2f} | "
                     f"{pct(r['final_acc'] for r in rs):29s} | {pct(r['final_fmt_rate'] for r in rs):20s} | "
                     f"{degraded_cell(rs)}")
    lines.append("r_t = log pi - log q on the sampled <|fmt|> tokens (mean) and its share of the batch's sum_t |r_t|; "
                 "KL elsewhere: reverse KL at every other response position (step 0, and the last 10 % of steps); "
                 "<|fmt|> kept: share of greedy held-out answers that still open with it; mask: <|fmt|> left out of "
                 "the loss; hide: <|fmt|> removed from the teacher's contexts")
    table = "\n".join(lines)
    log(table)
    write_results(folder, "m2", rows, table, {"teacher_acc": teacher_acc, "start_fmt_rate": start_rate,
                                              "seconds": round(time.time() - t0, 1)}, CSV)
    return {}


def main(argv=None) -> dict:
    cfg = parse(M2Config, argv, __doc__, exclude=OPD_RUN_FIELDS + OPSD_FIELDS + RLVR_FIELDS)
    return run_experiment("m2", cfg, m2)


if __name__ == "__main__":
    cli(main)
