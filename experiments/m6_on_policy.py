"""
M6: why on-policy. The distillation spectrum at equal compute, from teacher sequences to the
student's own samples to a sparse reward (docs/m6.md), every arm from the same cold-start student
and teacher of each pair, one run per pair and seed. Trains the pairs first where <out_dir> has none.

  python experiments/m6_on_policy.py                       # one pair, two seeds: a first look
  python experiments/m6_on_policy.py --pairs 3 --jobs 2    # 3 pairs x 2 seeds, two runs at a time
  python experiments/m6_on_policy.py --m6_flops 3e12       # another common budget
  python experiments/m6_on_policy.py --help                # every flag, with its default

The arms (ARMS): SeqKD (SFT on teacher samples, lmbda 0); supervised KD (lmbda 0) with the forward
and the reverse KL; GKD's lmbda 0.5 (reverse KL); on-policy (lmbda 1) with the forward KL, the
reverse KL and JSD(0.5); RLVR from the student (the verifier's reward only). Each runs until its
FLOPs, teacher sampling charged (nanoopd/flops.py), reach one common budget, evaluated on the
held-out set along the way. Then every trained student, and the student before, finishes
responses begun by the teacher and by itself (evaluate.continuation_acc) at three prefix lengths,
on short and long problems: the exposure-bias probe. The teacher's advantage from the student's
prefixes is measured on the start student.

Writes <out_dir>/m6/m6.{txt,csv,json}, m6.png (held-out accuracy against FLOPs, both accounting
columns) when matplotlib is installed, and one run per row in its pair's folder
(<pair dir>/m6/<label>_s<seed>.*). Started again with the same flags, it reads the finished runs
back and runs only the others.
"""

import math
import os
import sys
import time
from dataclasses import dataclass, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from experiments.common import (OPD_RUN_FIELDS, OPSD_FIELDS, ExperimentConfig, final_eval, pairs,
                                parse, run_experiment, start_accs)
from experiments.jobs import run_cells
from experiments.m6_report import report
from nanoopd.config import ConfigError, sub_config
from nanoopd.device import pick_device
from nanoopd.evaluate import continuation_acc, evaluate
from nanoopd.flops import opd_step_flops, pass_flops
from nanoopd.objectives import SPECS
from nanoopd.opd import train_opd
from nanoopd.report import mean
from nanoopd.rlvr import RLVRConfig, train_rlvr
from nanoopd.rollout import generate
from nanoopd.script import cli
from nanoopd.tasks import encode_example, sample_problems
from nanoopd.tokenizer import get_tokenizer
from train_math import load_role, opd_config, test_problems

# (label, objective or "rlvr", its options, lmbda: the student's share of each batch)
ARMS = (
    ("seqkd", "sft", {}, 0.0),
    ("kd_fkl", "forward_kl", {}, 0.0),
    ("kd_rkl", "full_reverse_kl", {}, 0.0),
    ("gkd_rkl_0.5", "full_reverse_kl", {}, 0.5),
    ("opd_fkl", "forward_kl", {}, 1.0),
    ("opd_rkl", "full_reverse_kl", {}, 1.0),
    ("opd_jsd", "jsd", {"beta": 0.5}, 1.0),
    ("rlvr", "rlvr", {}, 1.0),
)
FRACS = (0.25, 0.5, 0.75)  # the prefix lengths of the probes, as fractions of the sampled response
# what every arm sets itself: the teacher is the pair's, RLVR starts from the student's prompts, each arm its own lmbda and budget
M6_FIXED = ("teacher", "rlvr_init", "rlvr_steps", "rlvr_cut", "lmbda", "teacher_rows", "opd_flops", "rlvr_flops",
            "rlvr_eval_every")


@dataclass
class M6Config(ExperimentConfig):
    # --- M6
    m6_flops: float = 0.0            # the common FLOP budget of every arm, teacher sampling charged (0 = what opd_steps on-policy steps cost at the pair's mean lengths)
    m6_evals: int = 8                # held-out evaluations of each arm along its budget (eval_n problems each)
    probe_n: int = 600               # held-out problems of the exposure-bias and teacher-advantage probes (about half long)
    arms: str = ""                   # comma-separated labels of the arms to run (empty = every arm of ARMS; the report needs opd_rkl)

    def __post_init__(self):
        super().__post_init__()
        for name in ("m6_evals", "probe_n"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        self.arm_list()
        if self.digits < 2:
            raise ConfigError("digits", f"must be >= 2: the probes compare short and long problems, got {self.digits}")
        if not self.m6_flops >= 0:
            raise ConfigError("m6_flops", f"must be >= 0 (0 = the cost of opd_steps on-policy steps), got {self.m6_flops}")

    def arm_list(self) -> list[tuple]:
        labels = [a for a in self.arms.split(",") if a] or [a[0] for a in ARMS]
        known = [a[0] for a in ARMS]
        if any(a not in known for a in labels) or "opd_rkl" not in labels:
            raise ConfigError("arms", f"must be labels of {', '.join(known)}, opd_rkl among them; got {self.arms!r}")
        return [a for a in ARMS if a[0] in labels]


# -----------------------------------------------------------------------------
# the budget: one step's FLOPs at the pair's mean trace, per arm


def mean_lengths(pcfg: M6Config, student, teacher, tok) -> tuple[int, int, int]:
    """The mean prompt length, and the mean response length (tokens, EOS included) of the student's
    samples (T = 1, seeded) and of the teacher's, on the held-out set: a step's rows, on average."""
    prompts = [encode_example(tok, p)[0] for p in test_problems(pcfg)]
    n = [generate(model, prompts, pcfg.max_new_tokens, tok.eos_id, tok.pad_id, temperature=pcfg.temperature,
                  generator=torch.Generator().manual_seed(pcfg.seed)).lengths.float().mean().item()
         for model in (student, teacher)]
    return round(sum(map(len, prompts)) / len(prompts)), round(n[0]), round(n[1])


def step_cost(pcfg: M6Config, arm: tuple, student, teacher, lengths: tuple[int, int, int]) -> float:
    """The FLOPs (teacher sampling charged) of one step of `arm` on rows of the mean lengths (p, n_student, n_teacher)."""
    label, loss, _, lmbda = arm
    p, ns, nt = lengths
    if loss == "rlvr":  # sampling, forward and backward of every row of the groups
        rows = pcfg.rlvr_prompts * pcfg.rlvr_group
        return 4 * pass_flops(student.config, [p] * rows, [ns] * rows)
    S = round(lmbda * pcfg.opd_batch)
    T = pcfg.opd_batch - S
    return sum(opd_step_flops(student.config, teacher.config, ([p] * S, [ns] * S), ([p] * T, [nt] * T), ([p] * T, [nt] * T),
                              scored=SPECS[loss].uses_teacher))


# -----------------------------------------------------------------------------
# one run, and the probes


def probe(writer, teacher, tok, problems, seed: int, pcfg) -> dict:
    """{bucket: {"teacher": acc by frac, "own": acc by frac}}: the writer finishing the teacher's and
    its own sampled prefixes, on the short and the long probe problems."""
    out = {}
    for bucket, subset in buckets(problems, pcfg.digits).items():
        out[bucket] = {src: {str(f): v for f, v in continuation_acc(writer, model, tok, subset, list(FRACS), pcfg.max_new_tokens,
                                                                     seed).items()}
                       for src, model in (("teacher", teacher), ("own", writer))}
    return out


def buckets(problems, digits: int) -> dict:
    """The probe problems split by horizon: long when an operand has all `digits` digits (the
    longest traces), short otherwise."""
    long = [q for q in problems if max(q.a, q.b) >= 10 ** (digits - 1)]
    return {"short": [q for q in problems if q not in long], "long": long}


def probe_problems(pcfg: M6Config) -> list:
    return sample_problems(pcfg.probe_n, "test", pcfg.seed + 7, pcfg.digits, pcfg.ops)


def m6_cell(pcfg: M6Config, cell: dict) -> dict:
    """One arm's run from a fresh copy of the pair's student, then its probes."""
    tok, device = get_tokenizer(), pick_device(pcfg.device)
    teacher, model = (load_role(pcfg, role, tok, device) for role in ("teacher", "student"))
    label, loss, options, lmbda = cell["arm"]
    seed, steps, evals = cell["seed"], cell["steps"], max(1, cell["steps"] // pcfg.m6_evals)
    name = f"{label} s{seed} pair {pcfg.seed}"
    log = lambda msg: print(msg, flush=True)
    t0 = time.time()
    if loss == "rlvr":
        rcfg = sub_config(RLVRConfig, pcfg, seed=seed, rlvr_steps=steps, rlvr_flops=cell["budget"], rlvr_eval_every=evals)
        records = train_rlvr(model.train().requires_grad_(True), tok, rcfg, log=log, name=name,
                             jsonl_path=cell["prefix"] + ".jsonl", eval_problems=test_problems(pcfg))
        spent, curve = 0.0, [[0, cell["start_acc_train"], 0.0, 0.0]]
        for r in records:
            spent += r["flops"]
            if "eval_acc" in r:
                curve.append([r["step"] + 1, r["eval_acc"], spent, spent])
        s = {"flops": spent, "flops_given": spent, "evals": curve, "steps_done": len(records), "error": None}
    else:
        ocfg = replace(opd_config(pcfg, loss, dict(options), seed), lmbda=lmbda, opd_steps=steps, opd_flops=cell["budget"],
                       opd_eval_every=evals)
        try:
            s = train_opd(model, teacher, tok, ocfg, cell["prefix"], test_problems(pcfg), log, name,
                          start_acc=cell["start_acc_train"], print_every=max(1, steps // 4))
        except FloatingPointError as e:
            s = {"flops": None, "flops_given": None, "evals": [], "steps_done": None, "error": str(e)}
    model.eval()
    return {"label": label, "pair": pcfg.seed, "seed": seed, "start_acc": cell["start_acc"],
            "start_acc_train": cell["start_acc_train"], "final_acc": final_eval(pcfg, model, tok),
            "final_acc_train": s["evals"][-1][1] if s["evals"] else None,
            **{k: s[k] for k in ("flops", "flops_given", "evals", "steps_done", "error")}, "steps": steps,
            "budget": cell["budget"], "seconds": round(time.time() - t0, 1),
            "probe": probe(model, teacher, tok, probe_problems(pcfg), seed, pcfg)}


def pair_cell(pcfg: M6Config, cell: dict) -> dict:
    """The pair's own figures: its budget, the teacher's accuracy, the start student's probes, and
    the teacher's advantage from the student's prefixes (the teacher and the student finishing the
    same student samples)."""
    tok, device = get_tokenizer(), pick_device(pcfg.device)
    teacher, student = (load_role(pcfg, role, tok, device) for role in ("teacher", "student"))
    lengths = mean_lengths(pcfg, student, teacher, tok)
    on_policy = next(a for a in ARMS if a[0] == "opd_rkl")
    budget = pcfg.m6_flops or pcfg.opd_steps * step_cost(pcfg, on_policy, student, teacher, lengths)
    problems = probe_problems(pcfg)
    advantage = {b: {str(f): v for f, v in continuation_acc(teacher, student, tok, subset, list(FRACS), pcfg.max_new_tokens,
                                                            cell["seed"]).items()}
                 for b, subset in buckets(problems, pcfg.digits).items()}
    return {"label": "pair", "pair": pcfg.seed, "seed": cell["seed"], "mean_lengths": lengths, "budget": budget,
            "steps": {a[0]: math.ceil(budget / step_cost(pcfg, a, student, teacher, lengths)) for a in ARMS},
            "teacher_acc_train": evaluate(teacher, tok, test_problems(pcfg), 0.0, pcfg.max_new_tokens),
            "teacher_acc": final_eval(pcfg, teacher, tok), "teacher_from_student_prefix": advantage,
            "start_probe": probe(student, teacher, tok, problems, cell["seed"], pcfg)}


def m6(cfg: M6Config, tok, device, log) -> dict:
    t0 = time.time()
    pcfgs = pairs(cfg, log)
    seeds = cfg.seed_list()
    pair_rows = run_cells(cfg, pair_cell, [(p, {"prefix": os.path.join(p.out_dir, "m6", f"pair_s{seeds[0]}"),
                                                "seed": seeds[0]}) for p in pcfgs], log)
    calls = []
    for pcfg, pr in zip(pcfgs, pair_rows):
        start = start_accs(pcfg, "student")
        for seed in seeds:
            for arm in cfg.arm_list():
                calls.append((pcfg, {"prefix": os.path.join(pcfg.out_dir, "m6", f"{arm[0]}_s{seed}"), "seed": seed,
                                     "arm": arm, "steps": pr["steps"][arm[0]], "budget": pr["budget"], **start}))
    log(f"m6: {len(calls)} runs, budget {mean(pr['budget'] for pr in pair_rows) / 1e12:.2f} TFLOP per run "
        f"(teacher sampling charged)")
    rows = run_cells(cfg, m6_cell, calls, log)
    return report(cfg, pcfgs, pair_rows, rows, time.time() - t0, log)


def main(argv=None) -> dict:
    cfg = parse(M6Config, argv, __doc__, exclude=OPD_RUN_FIELDS + OPSD_FIELDS + M6_FIXED)
    return run_experiment("m6", cfg, m6)


if __name__ == "__main__":
    cli(main)
