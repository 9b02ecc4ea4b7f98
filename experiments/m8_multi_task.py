"""
M8: several tasks, several teachers (docs/m8.md). Two task families in one format: arithmetic
('+-', the pairs' task) and digit reversal ('~', nanoopd/tasks.py). Three parts (--m8_parts), each
one run per pair and OPD seed:

  objectives  multi-task OPD of a student cold-started on both tasks, from one generalist teacher
              (trained on both): sampled-token against renormalised top-K (k 16); prompts --mt_ops
  routing     the same student and prompts, each row's teacher routed by its task
              (nanoopd/routing.py): the pair's own teacher on arithmetic, a reversal specialist on
              reversal; against the generalist (the objectives part's sampled-token run)
  forgetting  the pair's student S0 (arithmetic), then --forget_steps of SFT on reversal: S1. From
              S1, OPD on both tasks' prompts with the teachers routed (S0 on arithmetic, S1 frozen
              on reversal), against SFT on those two models' own greedy answers to the same prompts
Each run's held-out accuracy is measured on each task (final_eval_n problems each); models are
trained once per pair and reused (<pair dir>/m8/: generalist/ and rev/teacher.pt, student.pt, and S1 as
forgot_<forget_steps>.pt: each level of forgetting keeps its own S1 and runs).

  python experiments/m8_multi_task.py                      # one pair, two seeds: a first look
  python experiments/m8_multi_task.py --pairs 3 --jobs 2   # 3 pairs x 2 seeds, two runs at a time
  python experiments/m8_multi_task.py --help               # every flag, with its default

Writes <out_dir>/m8/m8.{txt,csv,json}, m8.png (with matplotlib) and each run's files
(<pair dir>/m8/<label>_s<seed>.*). Started again with the same flags, it reads finished runs back.
"""

import os
import sys
import time
from dataclasses import dataclass, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from experiments.common import (OPD_RUN_FIELDS, OPSD_FIELDS, RLVR_FIELDS, TASK_FIELDS, ExperimentConfig, check_trained,
                                pairs, parse, role_finished, run_cells, run_experiment, run_jobs)
from experiments.m8_report import report
from nanoopd.checkpoint import load_checkpoint
from nanoopd.config import ConfigError
from nanoopd.device import pick_device, seed_everything
from nanoopd.evaluate import accuracy_by_op, evaluate
from nanoopd.opd import train_opd
from nanoopd.routing import RoutedTeachers
from nanoopd.script import cli
from nanoopd.sft import train_sft
from nanoopd.tasks import encode_example, sample_problems, weighted_ops
from nanoopd.tokenizer import get_tokenizer
from train_math import load_role, opd_config, sft, train_student, train_teacher

PARTS = ("objectives", "routing", "forgetting")
TEACHER_FIELDS = TASK_FIELDS + ("t_layer", "t_embd", "t_head", "t_steps", "t_lr", "ops")


@dataclass
class M8Config(ExperimentConfig):
    # --- M8
    m8_parts: str = "objectives,routing,forgetting"  # comma-separated parts to run: objectives, routing, forgetting
    mt_ops: str = "+-~2"             # the multi-task mix: operators, each optionally followed by its weight ('+-~2': half the prompts reversal)
    forget_steps: int = 1000         # SFT steps of the pair's student on reversal (forgetting arithmetic), at --s_lr

    def __post_init__(self):
        super().__post_init__()
        self.part_list()
        try:
            mix = weighted_ops(self.mt_ops)
        except ValueError:
            mix = ""
        if not mix or any(o not in "+-~" for o in mix) or "~" not in mix or not set(mix) & set("+-"):
            raise ConfigError("mt_ops", f"must mix '~' with '+' or '-', each optionally followed by a weight >= 1 "
                                        f"(e.g. '+-~2'), got {self.mt_ops!r}")
        if self.forget_steps < 1:
            raise ConfigError("forget_steps", f"must be >= 1, got {self.forget_steps}")

    def part_list(self) -> list[str]:
        parts = [p for p in self.m8_parts.split(",") if p]
        if not parts or any(p not in PARTS for p in parts):
            raise ConfigError("m8_parts", f"must be comma-separated names of {', '.join(PARTS)}; got {self.m8_parts!r}")
        return parts

# -----------------------------------------------------------------------------
# the models, trained once per pair


def folder(pcfg: M8Config, *name: str) -> str:
    return os.path.join(pcfg.out_dir, "m8", *name)


def teacher_config(pcfg: M8Config, label: str) -> M8Config:
    """The generalist (both tasks, --mt_ops) or the reversal specialist, trained as the pair's teacher."""
    ops = weighted_ops(pcfg.mt_ops) if label == "generalist" else "~"
    return replace(pcfg, out_dir=folder(pcfg, label), ops=ops, s_ops="", resume=True)


def student_config(pcfg: M8Config) -> M8Config:
    """The multi-task student: cold-started as the pair's (its arithmetic mix, --s_ops), on the
    generalist's traces, with reversal added at its --mt_ops share of the pool."""
    mix, arith = weighted_ops(pcfg.mt_ops), pcfg.s_ops or "".join(sorted(set(pcfg.ops)))
    share = mix.count("~") / len(mix)
    rev = max(1, round(len(weighted_ops(arith)) * share / (1 - share)))
    return replace(pcfg, out_dir=folder(pcfg), ops=mix, s_ops=f"{arith}~{rev}", resume=True)


def train_model(pcfg: M8Config, label: str) -> dict:
    """One model of the pair, trained (or resumed) unless finished: a teacher (generalist, rev), the
    multi-task student (after the generalist), or S1 (forgot: the pair's student, SFT on reversal)."""
    tok, device, t0 = get_tokenizer(), pick_device(pcfg.device), time.time()
    log = lambda msg: print(f"[pair {pcfg.seed} {label}] {msg}", flush=True)
    os.makedirs(folder(pcfg), exist_ok=True)
    if label in ("generalist", "rev"):
        os.makedirs(folder(pcfg, label), exist_ok=True)
        train_teacher(teacher_config(pcfg, label), tok, device, log)
    elif label == "student":
        scfg = student_config(pcfg)
        train_student(scfg, tok, device, load_checkpoint(os.path.join(folder(pcfg, "generalist"), "teacher.pt"), device)[0], log)
    else:
        seed_everything(pcfg.seed + 8)
        model = load_role(pcfg, "student", tok, device)
        problems = sample_problems(pcfg.forget_steps * pcfg.batch_size, "train", pcfg.seed + 8, pcfg.digits, "~")
        B, fcfg = pcfg.batch_size, replace(pcfg, out_dir=folder(pcfg), resume=True)
        log(f"S1: the pair's student, {pcfg.forget_steps} SFT steps on reversal at lr {pcfg.s_lr}")
        sft(fcfg, model, f"forgot_{pcfg.forget_steps}", lambda s: [encode_example(tok, p) for p in problems[s * B:(s + 1) * B]],
            pcfg.forget_steps, pcfg.s_lr, log)
    return {"pair": pcfg.seed, "label": label, "seconds": round(time.time() - t0, 1)}


def models(cfg: M8Config, pcfgs: list[M8Config], log) -> None:
    """Every model M8 needs, cfg.jobs at a time: the teachers and S1, then the multi-task students."""
    steps = {"generalist": "t_steps", "rev": "t_steps", "student": "s_steps", "forgot": "forget_steps"}
    for labels in (("generalist", "rev", "forgot"), ("student",)):
        todo = []
        for p in pcfgs:
            for label in labels:
                if label in ("generalist", "rev"):
                    check_trained(model_path(p, label), TEACHER_FIELDS, teacher_config(p, label))
                if label == "forgot":
                    check_trained(model_path(p, label), TASK_FIELDS + ("forget_steps", "s_lr"), p)
                if not role_finished(model_path(p, label), getattr(p, steps[label])):
                    todo.append((p, label))
        if todo:
            log(f"m8: training {len(todo)} model(s): " + ", ".join(f"{label} of pair {p.seed}" for p, label in todo))
            for r in run_jobs(cfg, train_model, todo):
                log(f"m8: {r['label']} of pair {r['pair']} trained in {r['seconds']:.0f}s")

# -----------------------------------------------------------------------------
# one run


def held_out(pcfg: M8Config, final: bool = True) -> list:
    """Both tasks' held-out problems: final_eval_n (or eval_n) of each."""
    n = pcfg.final_eval_n if final else pcfg.eval_n
    return (sample_problems(n, "test", pcfg.seed, pcfg.digits, "+-") + sample_problems(n, "test", pcfg.seed, pcfg.digits, "~"))


def task_accs(pcfg: M8Config, model, tok) -> dict:
    """Greedy accuracy on each task's held-out set, and their mean."""
    test = held_out(pcfg)
    _, texts = evaluate(model, tok, test, 0.0, pcfg.max_new_tokens, return_texts=True)
    by = accuracy_by_op(test, texts, by="task")
    return {"acc_math": by["math"], "acc_rev": by["rev"], "final_acc": (by["math"] + by["rev"]) / 2}


def model_path(pcfg: M8Config, name: str) -> str:
    """Where each model of a pair lives (S1, "forgot", by its level of forgetting)."""
    return {"generalist": folder(pcfg, "generalist", "teacher.pt"), "rev": folder(pcfg, "rev", "teacher.pt"),
            "student": folder(pcfg, "student.pt"), "forgot": folder(pcfg, f"forgot_{pcfg.forget_steps}.pt"),
            "pair_teacher": os.path.join(pcfg.out_dir, "teacher.pt"),
            "pair_student": os.path.join(pcfg.out_dir, "student.pt")}[name]


def load(pcfg: M8Config, name: str, device):
    return load_checkpoint(model_path(pcfg, name), device)[0]


def run_cell(pcfg: M8Config, cell: dict) -> dict:
    """One run: OPD (objectives, routing, recover_opd) or SFT on the models' own samples (recover_sft)."""
    tok, device, label, seed = get_tokenizer(), pick_device(pcfg.device), cell["label"], cell["seed"]
    student = load(pcfg, "forgot" if label.startswith("recover") else "student", device)
    if label.startswith("recover"):
        teachers = {"math": load(pcfg, "pair_student", device), "rev": load(pcfg, "forgot", device)}
    elif label == "st_routed":
        teachers = {"math": load(pcfg, "pair_teacher", device), "rev": load(pcfg, "rev", device)}
    else:
        generalist = load(pcfg, "generalist", device)
        teachers = {"math": generalist, "rev": generalist}
    ocfg = opd_config(replace(pcfg, ops=weighted_ops(pcfg.mt_ops)), "topk_renorm" if label == "renorm_generalist"
                      else "sampled_token", {"k": 16} if label == "renorm_generalist" else {}, seed)
    log = lambda msg: print(msg, flush=True)
    if label == "recover_sft":  # the same prompts, answered greedily by S0 (arithmetic) and S1 (reversal)
        prompts = sample_problems(ocfg.opd_steps * ocfg.opd_batch, "train", seed, pcfg.digits, ocfg.ops)
        pool = []
        for i in range(0, len(prompts), 256):
            chunk = prompts[i:i + 256]
            for task in ("math", "rev"):
                rows = [p for p in chunk if p.task == task]
                _, texts = evaluate(teachers[task], tok, rows, 0.0, pcfg.max_new_tokens, return_texts=True)
                pool += [encode_example(tok, p, response=t) for p, t in zip(rows, texts)]
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
        B = ocfg.opd_batch
        t0 = time.time()
        train_sft(student, lambda s: [pool[i] for i in order[s * B:(s + 1) * B]], ocfg.opd_steps, ocfg.opd_lr, tok.pad_id,
                  warmup=ocfg.opd_warmup, log_every=0, desc=label, log=log, ckpt_path=cell["prefix"] + ".pt")
        s = {"seconds": round(time.time() - t0, 1), "degraded": ""}
    else:
        s = train_opd(student, teachers["math"], tok, ocfg, cell["prefix"], held_out(pcfg, final=False), log,
                      f"{label} s{seed} pair {pcfg.seed}", print_every=50, compile=pcfg.compile,
                      teacher_score=RoutedTeachers(teachers))
        s = {"seconds": s["seconds"], "degraded": s["degraded"], "evals_by_task": s["evals_by_task"],
             "first_kl": s["first_kl"], "final_kl": s.get("final_kl")}
    return {"part": cell["part"], "label": label, "pair": pcfg.seed, "seed": seed, **cell["start"], **s,
            **task_accs(pcfg, student, tok)}

# -----------------------------------------------------------------------------
# main


def m8(cfg: M8Config, tok, device, log) -> dict:
    t0 = time.time()
    pcfgs = pairs(cfg, log)
    parts = cfg.part_list()
    models(cfg, pcfgs, log)
    calls, stages = [], []
    for p in pcfgs:
        needs = {"objectives": ("student", "generalist"), "routing": ("student", "generalist", "rev", "pair_teacher"),
                 "forgetting": ("pair_student", "forgot")}
        accs = {name: task_accs(p, load(p, name, device), tok) for name in dict.fromkeys(n for part in parts
                                                                                         for n in needs[part])}
        stages += [{"part": "stages", "label": name, "pair": p.seed, **a} for name, a in accs.items()]
        for seed in cfg.seed_list():
            for part, label in (("objectives", "st_generalist"), ("objectives", "renorm_generalist"),
                                ("routing", "st_routed"), ("forgetting", "recover_opd"), ("forgetting", "recover_sft")):
                if part in parts or (label == "st_generalist" and "routing" in parts):
                    start = accs["forgot" if part == "forgetting" else "student"]
                    level = f"_f{cfg.forget_steps}" if part == "forgetting" else ""
                    calls.append((p, {"prefix": folder(p, f"{label}{level}_s{seed}"), "seed": seed, "label": label,
                                      "part": part, "start": {f"start_{k}": v for k, v in start.items()}}))
    log(f"m8: {len(calls)} runs ({', '.join(parts)})")
    rows = run_cells(cfg, run_cell, calls, log)
    return report(cfg, rows, stages, time.time() - t0, log)


def main(argv=None) -> dict:
    cfg = parse(M8Config, argv, __doc__, exclude=OPD_RUN_FIELDS + OPSD_FIELDS + RLVR_FIELDS + ("teacher",))
    return run_experiment("m8", cfg, m8)


if __name__ == "__main__":
    cli(main)
