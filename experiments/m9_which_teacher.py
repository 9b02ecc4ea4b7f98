"""
M9: which teacher, which prompts (docs/m9.md). Two halves (--m9_parts), each one run per pair and
OPD seed, the student always the pair's cold-started one unless said otherwise:

  teachers  four teachers of the same student: the pair's own (default); one trained as it was but
            only on what the student saw, the cold-start pool (thin: strong on '+', thin on '-');
            a larger and a smaller one trained as the default was (--big, --small: same problems,
            steps and learning rate). For each: its accuracy, its continuation accuracy from the
            student's prefixes, its top-K overlap and shared mass with the student at the start,
            and the student's gain from OPD. Extra teachers are trained once per pair and reused
            (<pair dir>/m9/<label>/teacher.pt).
  prompts   teacher-aligned prompt selection (nanoopd/prompt_select.py): the rule's prompts against
            a random subset of the same size, for the cold-started student and for a random one
            (the failing run of M5).
Then the overlap mass of every OPD run under --out_dir (M1, M5, M6 and M9 where they ran): the share
of pi's and q's mass on the shared top-K at the start and at the end, successful runs and failed.

  python experiments/m9_which_teacher.py                      # one pair, two seeds: a first look
  python experiments/m9_which_teacher.py --pairs 3 --jobs 2   # 3 pairs x 2 seeds, two runs at a time
  python experiments/m9_which_teacher.py --m9_parts prompts   # only the prompt half
  python experiments/m9_which_teacher.py --help               # every flag, with its default

Writes <out_dir>/m9/m9.{txt,csv,json} and each run's files (<pair dir>/m9/<label>_s<seed>.*).
Started again with the same flags, it reads the finished runs back and runs only the others.
"""

import os
import sys
import time
from dataclasses import dataclass, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from experiments.common import (OPSD_FIELDS, RLVR_FIELDS, TASK_FIELDS, ExperimentConfig, check_trained, pairs, parse,
                                role_finished, run_cells, run_experiment, run_jobs, start_accs)
from experiments.m9_report import report
from nanoopd.checkpoint import load_checkpoint
from nanoopd.config import ConfigError
from nanoopd.device import pick_device, seed_everything
from nanoopd.evaluate import accuracy_by_op, continuation_acc, evaluate
from nanoopd.opd import train_opd
from nanoopd.prompt_select import alignment, prompt_stream, select_indices
from nanoopd.script import cli
from nanoopd.tasks import sample_problems
from nanoopd.tokenizer import get_tokenizer
from train_math import (load_role, new_model, objective_options, opd_config, sft, teacher_traces, test_problems,
                        train_teacher)

TEACHERS = ("default", "thin", "big", "small")
PARTS = ("teachers", "prompts")
SHAPE = ("t_layer", "t_embd", "t_head")
CONT_FRAC = 0.5  # teacher continuation: the student's samples cut at half (as in M4)


def shape(spec: str, name: str) -> tuple[int, int, int]:
    """'layers,width,heads' as three integers, the width a multiple of the heads."""
    try:
        L, C, H = (int(x) for x in spec.split(","))
    except ValueError:
        L = C = H = 0
    if min(L, C, H) < 1 or C % H:
        raise ConfigError(name, f"must be layers,width,heads: three integers >= 1, the width a multiple of the "
                                f"heads (each head gets width/heads channels), e.g. 6,160,4; got {spec!r}")
    return L, C, H


@dataclass
class M9Config(ExperimentConfig):
    # --- M9
    m9_parts: str = "teachers,prompts"  # comma-separated halves to run: teachers (four teachers), prompts (the prompt rule against random prompts)
    big: str = "6,160,4"             # the larger teacher: layers,width,heads (trained as the default teacher: same problems, steps, lr)
    small: str = "2,96,4"            # the smaller teacher: layers,width,heads
    select_pool: int = 2048          # candidate training prompts the prompt rule scores, per run
    select_keep: float = 0.25        # the share of the candidates the rule keeps (and the random control draws)

    def __post_init__(self):
        super().__post_init__()
        self.part_list()
        shape(self.big, "big")
        shape(self.small, "small")
        if self.select_pool < 1:
            raise ConfigError("select_pool", f"must be >= 1, got {self.select_pool}")
        if not 0 < self.select_keep <= 1:
            raise ConfigError("select_keep", f"is a share of the candidates, in (0, 1]; got {self.select_keep}")
        if round(self.select_keep * self.select_pool) < 1:
            raise ConfigError("select_keep", f"{self.select_keep} of --select_pool {self.select_pool} candidates leaves "
                                             f"no prompt to train on: raise either")

    def part_list(self) -> list[str]:
        parts = [p for p in self.m9_parts.split(",") if p]
        if not parts or any(p not in PARTS for p in parts):
            raise ConfigError("m9_parts", f"must be comma-separated names of {', '.join(PARTS)}; got {self.m9_parts!r}")
        return parts


# -----------------------------------------------------------------------------
# the extra teachers, trained once per pair


def teacher_config(pcfg: M9Config, label: str) -> M9Config:
    """The config teacher `label` is trained with: its folder, and its shape for big and small."""
    folder = os.path.join(pcfg.out_dir, "m9", label)
    if label in ("big", "small"):
        return replace(pcfg, out_dir=folder, resume=True, **dict(zip(SHAPE, shape(getattr(pcfg, label), label))))
    return replace(pcfg, out_dir=folder, resume=True)


def teacher_path(pcfg: M9Config, label: str) -> str:
    return os.path.join(pcfg.out_dir if label == "default" else teacher_config(pcfg, label).out_dir, "teacher.pt")


def train_extra(pcfg: M9Config, label: str) -> dict:
    """Teacher `label` of the pair, trained (or resumed) unless finished: thin by the teacher's
    recipe (shape, steps, lr) on the student's cold-start pool, big and small as the teacher."""
    tok, device, tcfg = get_tokenizer(), pick_device(pcfg.device), teacher_config(pcfg, label)
    log = lambda msg: print(f"[pair {pcfg.seed} {label}] {msg}", flush=True)
    t0 = time.time()
    if not role_finished(teacher_path(pcfg, label), tcfg.t_steps):
        os.makedirs(tcfg.out_dir, exist_ok=True)
        if label == "thin":
            pool = teacher_traces(load_role(pcfg, "teacher", tok, device), tok, pcfg)  # what the student saw
            seed_everything(pcfg.seed)
            model = new_model(tcfg, "t", tok, device)
            order = torch.randint(len(pool), (tcfg.t_steps, tcfg.batch_size), generator=torch.Generator().manual_seed(pcfg.seed + 2))
            log(f"{model.num_params():,} parameters, {tcfg.t_steps} SFT steps on the student's pool of {len(pool)} traces")
            sft(tcfg, model, "teacher", lambda s: [pool[i] for i in order[s].tolist()], tcfg.t_steps, tcfg.t_lr, log)
        else:
            train_teacher(tcfg, tok, device, log)
    return {"pair": pcfg.seed, "label": label, "seconds": round(time.time() - t0, 1)}


def extra_teachers(cfg: M9Config, pcfgs: list[M9Config], log) -> None:
    """Every extra teacher of every pair trained, cfg.jobs at a time; one trained with other flags
    (another task, shape or recipe) is refused by name."""
    todo = []
    for p in pcfgs:
        for label in TEACHERS[1:]:
            check_trained(teacher_path(p, label), TASK_FIELDS + SHAPE + ("t_steps", "t_lr"), teacher_config(p, label))
            if not role_finished(teacher_path(p, label), p.t_steps):
                todo.append((p, label))
    if todo:
        log(f"m9: training {len(todo)} teacher(s): " + ", ".join(f"{label} of pair {p.seed}" for p, label in todo))
        for r in run_jobs(cfg, train_extra, todo):
            log(f"m9: teacher {r['label']} of pair {r['pair']} trained in {r['seconds']:.0f}s")

# -----------------------------------------------------------------------------
# one run of each half


def held_out(pcfg: M9Config, model, tok) -> tuple[float, dict]:
    """Greedy accuracy on the final held-out set, overall and by operator."""
    test = test_problems(pcfg, final=True)
    acc, texts = evaluate(model, tok, test, 0.0, pcfg.max_new_tokens, return_texts=True)
    return acc, accuracy_by_op(test, texts)


def opd_run(pcfg: M9Config, cell: dict, teacher, student, tok, **kw) -> dict:
    """One OPD run of `student` (in place) by `teacher`: its summary's figures and the held-out ones."""
    s = train_opd(student, teacher, tok, opd_config(pcfg, pcfg.loss, objective_options(pcfg, tok), cell["seed"]),
                  cell["prefix"], test_problems(pcfg), lambda m: print(m, flush=True),
                  f"{cell['label']} s{cell['seed']} pair {pcfg.seed}", start_acc=kw.pop("start_acc_train"),
                  print_every=50, compile=pcfg.compile, **kw)
    acc, by_op = held_out(pcfg, student, tok)
    first = s["first_step"]
    return {"final_acc": acc, "final_acc_by_op": by_op, "final_acc_train": s["final_acc"], "first_kl": s["first_kl"],
            "final_kl": s.get("final_kl"), "degraded": s["degraded"], "seconds": s["seconds"],
            **{f"first_{k}": first[k] for k in ("overlap_ratio", "overlap_mass_student", "overlap_mass_teacher")},
            **{f"final_{k}": s.get(f"final_{k}") for k in ("overlap_ratio", "overlap_mass_student", "overlap_mass_teacher")}}


def teacher_cell(pcfg: M9Config, cell: dict) -> dict:
    """One teacher: its accuracy (and by operator), its continuation of the student's samples, and
    the OPD run it teaches."""
    tok, device, seed = get_tokenizer(), pick_device(pcfg.device), cell["seed"]
    teacher = load_checkpoint(teacher_path(pcfg, cell["label"]), device, tok.n_vocab)[0]
    student = load_role(pcfg, "student", tok, device)
    acc, by_op = held_out(pcfg, teacher, tok)
    cont = continuation_acc(teacher, student, tok, test_problems(pcfg, final=True), [CONT_FRAC], pcfg.max_new_tokens, seed)
    return {"part": "teachers", "label": cell["label"], "pair": pcfg.seed, "seed": seed, "params": teacher.num_params(),
            "teacher_acc": acc, "teacher_acc_by_op": by_op, "continuation_acc": cont[CONT_FRAC],
            "start_acc": cell["start_acc"], "start_acc_by_op": cell["start_acc_by_op"],
            **opd_run(pcfg, cell, teacher, student, tok, start_acc_train=cell["start_acc_train"])}


def prompt_cell(pcfg: M9Config, cell: dict) -> dict:
    """One OPD run on the rule's prompts (aligned) or on a random subset of the same size, from
    the cold-started student or a random init of its shape (seeded by the OPD seed, as in M5)."""
    tok, device, seed = get_tokenizer(), pick_device(pcfg.device), cell["seed"]
    teacher = load_role(pcfg, "teacher", tok, device)
    if cell["cold"]:
        student, start = load_role(pcfg, "student", tok, device), cell["start"]
    else:
        seed_everything(seed)
        student = new_model(pcfg, "s", tok, device)
        start = {"start_acc": held_out(pcfg, student, tok)[0],
                 "start_acc_train": evaluate(student, tok, test_problems(pcfg), 0.0, pcfg.max_new_tokens)}
    candidates = sample_problems(pcfg.select_pool, "train", pcfg.seed + 9 + seed, pcfg.digits, pcfg.ops)
    scores = alignment(teacher, student, tok, candidates, pcfg.max_new_tokens, seed, pcfg.diag_k)
    ranks = scores if cell["rule"] == "aligned" else torch.rand(len(candidates), generator=torch.Generator().manual_seed(seed)).tolist()
    index = select_indices(candidates, ranks, pcfg.select_keep)
    kept, keep_score = [candidates[i] for i in index], [scores[i] for i in index]
    run = opd_run(pcfg, cell, teacher, student, tok, start_acc_train=start["start_acc_train"],
                  train_problems=prompt_stream(kept, pcfg.opd_steps * pcfg.opd_batch, seed))
    return {"part": "prompts", "label": cell["label"], "pair": pcfg.seed, "seed": seed, "start_acc": start["start_acc"],
            "kept": len(kept), "kept_alignment": sum(keep_score) / len(keep_score),
            "pool_alignment": sum(scores) / len(scores), "kept_minus_share": sum(q.op == "-" for q in kept) / len(kept),
            **run}

# -----------------------------------------------------------------------------
# main


def m9(cfg: M9Config, tok, device, log) -> dict:
    t0 = time.time()
    pcfgs = pairs(cfg, log)
    parts = cfg.part_list()
    if "teachers" in parts:
        extra_teachers(cfg, pcfgs, log)
    calls = []
    for p in pcfgs:
        start = start_accs(p, "student")
        start_by_op = held_out(p, load_role(p, "student", tok, device), tok)[1] if "teachers" in parts else None
        for seed in cfg.seed_list():
            base = lambda label: {"prefix": os.path.join(p.out_dir, "m9", f"{label}_s{seed}"), "seed": seed, "label": label}
            if "teachers" in parts:
                calls += [(p, (teacher_cell, {**base(t), **start, "start_acc_by_op": start_by_op})) for t in TEACHERS]
            if "prompts" in parts:
                calls += [(p, (prompt_cell, {**base(f"{who}_{rule}"), "cold": who == "cold", "rule": rule, "start": start}))
                          for who in ("cold", "scratch") for rule in ("random", "aligned")]
    log(f"m9: {len(calls)} runs ({', '.join(parts)})")
    rows = run_cells(cfg, dispatch, [(p, {**c, "work": w}) for p, (w, c) in calls], log)
    return report(cfg, pcfgs, rows, time.time() - t0, log)


def dispatch(pcfg: M9Config, cell: dict) -> dict:
    """A run of either half (run_cells takes one function): the cell names its own."""
    return cell["work"](pcfg, {k: v for k, v in cell.items() if k != "work"})


def main(argv=None) -> dict:
    cfg = parse(M9Config, argv, __doc__, exclude=("run_name", "hide_from_teacher", "objectives", "teacher")
                + OPSD_FIELDS + RLVR_FIELDS)
    return run_experiment("m9", cfg, m9)


if __name__ == "__main__":
    cli(main)
