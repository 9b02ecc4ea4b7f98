"""
train_math.py: synthetic math, from scratch to a teacher, a cold-start student, and on-policy
distillation (OPD) of the one into the other.

  stage `teacher`: SFT of a GPT on gold step-by-step traces                   -> <out_dir>/teacher.pt
  stage `student`: cold start, a short SFT of a smaller GPT on traces sampled
                   from the teacher (its "thinking pattern")                   -> <out_dir>/student.pt
  stage `eval`:    greedy and sampled accuracy of both on held-out problems    -> <out_dir>/summary.json
  stage `opd`:     the student samples, the teacher scores every token, the
                   student descends the chosen objective (--loss)             -> <out_dir>/opd_<name>.pt
                   (+ opd_<name>.jsonl: one line per step; opd_<name>.json: the run's summary)
  --compare (M1):  the objectives side by side from the same pair, 2 seeds    -> <out_dir>/m1/
  stage `pibase`:  the OPSD base: SFT of a teacher-shaped GPT on a mixture of
                   examples with and without privileged information (PI)      -> <out_dir>/pibase.pt
  stage `rlvr`:    an RLVR-adapted teacher: REINFORCE with group-normalised
                   advantages and the verifier as reward, from the student
                   (--rlvr_init) on its own kind of prefixes                  -> <out_dir>/teacher_rlvr.pt
  --mode opsd:     stage opd as self-distillation: the OPSD base is the
                   student, and itself with PI (--pi) in its context the
                   teacher                                                    -> <out_dir>/opd_opsd_<pi>.*
  --m3 (M3):       OPSD with instance-specific PI vs the shared rule, 2 seeds -> <out_dir>/m3/
  --m4 (M4):       the SFT teacher vs an RLVR-adapted teacher as OPD teacher  -> <out_dir>/m4/
  --m5 (M5):       OPD with vs without the SFT cold start (s_steps 0)         -> <out_dir>/m5/
  --m2 (M2):       a student that emits <|fmt|>, which the teacher never saw,
                   distilled with and without masking that token (and hiding
                   it from the teacher's contexts)                            -> <out_dir>/m2/

Commands
  CPU laptop (default preset, a few minutes on 2 cores):   python train_math.py
  one GPU (wider models, more steps):                      python train_math.py --preset gpu
  several GPUs (every stage data-parallel, DDP):           torchrun --nproc_per_node=4 train_math.py --preset gpu
                                                           torchrun --nproc_per_node=4 train_math.py --preset gpu --stages opd --loss topk_renorm
  resume any stage after an interruption:                  python train_math.py --resume   (same flags as the run)
  only evaluate existing checkpoints:                      python train_math.py --stages eval
  OPD from the existing pair, renormalised top-K:          python train_math.py --stages opd --loss topk_renorm --k 16
  sampled-token OPD, vOPD baseline, r_t clamped to 5:      python train_math.py --stages opd --baseline --clamp 5 --run_name vopd
  M1, objectives side by side (trains the pair if missing): python train_math.py --compare
  M2, special-token mismatch, masked vs not:               python train_math.py --m2
  OPSD with the shared rule as PI (trains the base first):  python train_math.py --stages pibase,opd --mode opsd --pi rule --loss full_reverse_kl --opd_lr 1e-3 --opd_steps 120 --opd_batch 32
  OPD from an RLVR-adapted teacher:                        python train_math.py --stages rlvr,opd --teacher rlvr
  M3, OPSD: instance-specific PI vs the shared rule:       python train_math.py --m3 --loss full_reverse_kl --opd_lr 1e-3 --opd_steps 120 --opd_batch 32
  M4, SFT teacher vs RLVR-adapted teacher:                 python train_math.py --m4
  M5, OPD with vs without the SFT cold start:              python train_math.py --m5
  every flag, explained:                                   python train_math.py --help

Every run writes its checkpoints (weights + config + step, written atomically) and a summary.json
with accuracies and wall times to --out_dir; a later stage loads the checkpoints an earlier run left.
"""

import argparse
import copy
import csv
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch

from nanoopd import distributed
from nanoopd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nanoopd.device import seed_everything, set_compile
from nanoopd.evaluate import evaluate
from nanoopd.model import GPT, GPTConfig
from nanoopd.objectives import get_objective
from nanoopd.opd import OPDConfig, check_objective, train_opd
from nanoopd.metrics import teacher_continuation
from nanoopd.rlvr import RLVRConfig, train_rlvr
from nanoopd.rollout import generate
from nanoopd.self_distill import (PI_KINDS, PrivilegedTeacher, mixture_kinds, pi_example, pi_text, rule_visible,
                                  self_teacher, verify_rule)
from nanoopd.sft import encode_example, train_sft
from nanoopd.tasks import sample_problems
from nanoopd.tokenizer import get_tokenizer

# -----------------------------------------------------------------------------
# config


@dataclass
class TrainConfig:
    # run
    out_dir: str = "out/math"        # checkpoints, logs and summary.json go here
    stages: str = "teacher,student,eval"  # comma-separated stages to run, in this order
    seed: int = 1337                 # seeds data order, init and sampling
    device: str = "auto"             # auto = cuda -> mps -> cpu
    threads: int = 0                 # CPU threads for torch (0 = torch's default)
    compile: bool = False            # torch.compile the training forward passes (for GPUs; slow to start on CPU)
    # task
    digits: int = 3                  # operands have 1..digits digits
    ops: str = "+-"                  # operators drawn uniformly from this set (subset of +-*)
    max_new_tokens: int = 64         # response budget when sampling (a 3-digit trace is about 40)
    # teacher
    t_layer: int = 4                 # teacher depth
    t_embd: int = 128                # teacher width
    t_head: int = 4                  # teacher heads
    t_steps: int = 2000              # teacher SFT steps
    t_lr: float = 3e-3               # teacher peak learning rate (warm-up, then cosine to 10 %)
    # student
    s_layer: int = 2                 # student depth
    s_embd: int = 64                 # student width
    s_head: int = 2                  # student heads
    s_steps: int = 800               # cold-start SFT steps (0 = no cold start: random init)
    s_lr: float = 3e-3               # student peak learning rate
    s_pool: int = 4096               # teacher traces sampled once for the student's cold start
    # shared
    batch_size: int = 64             # sequences per optimizer step
    eval_n: int = 500                # held-out problems per accuracy
    log_every: int = 100             # print a log line every this many SFT steps
    save_every: int = 250            # write the stage's checkpoint (optimizer and RNG state too) every N steps
    resume: bool = False             # continue each stage from its checkpoint's step (not the experiments)
    # on-policy distillation (stage opd; --compare and --m2 use the optimisation/rollout fields)
    loss: str = "sampled_token"      # objective: a name in nanoopd.objectives.OBJECTIVES
    k: int | None = None             # top-K support size (None: the objective's default, 16)
    support: str | None = None       # top-K support: teacher | student | intersection (None: teacher)
    add_sampled: bool | None = None  # top-K: also put the sampled token in the support
    gamma: float | None = None       # sequence_kl: discount of the return-to-go (None: 1)
    mask_tokens: str = ""            # comma-separated token names (<|fmt|>) or ids left out of the loss
    hide_from_teacher: str = ""      # comma-separated token names or ids removed from the teacher's contexts
    clamp: float | None = None       # sampled_token: clip r_t to [-clamp, clamp] (None: no clip)
    baseline: bool | None = None     # sampled_token: vOPD control variate KL(pi || q)(c_t)
    opd_steps: int = 200             # OPD optimizer steps
    opd_lr: float = 3e-4             # OPD AdamW peak learning rate
    opd_warmup: int = 10             # OPD linear warm-up steps, then cosine decay to 10 % of opd_lr
    opd_batch: int = 64              # rollouts per OPD step
    temperature: float = 1.0         # rollout temperature (> 0)
    top_p: float = 1.0               # rollout nucleus mass (1 = off)
    top_k: int = 0                   # rollout top-k (0 = off)
    opd_eval_every: int = 50         # held-out greedy accuracy (and a checkpoint) every N OPD steps
    run_name: str = ""               # OPD outputs are opd_<run_name>.*; empty: the loss name
    # experiments
    compare: bool = False            # M1: the objectives side by side (instead of --stages)
    m2: bool = False                 # M2: special-token mismatch, masked vs unmasked
    seeds: str = "1,2"               # OPD seeds of --compare and --m2 (prompt order and sampling)
    fmt_steps: int = 100             # M2: SFT steps teaching a copy of the student to open with <|fmt|>
    m3: bool = False                 # M3: OPSD with each kind of PI, no-PI accuracy and rule-following
    m4: bool = False                 # M4: the SFT teacher vs an RLVR-adapted teacher as the OPD teacher
    m5: bool = False                 # M5: OPD from the cold-started student vs from a random init
    # self-distillation with privileged information (OPSD) and the RLVR teacher
    mode: str = "opd"                # stage opd: opd (the teacher model scores) | opsd (the model with PI)
    pi: str = "rule"                 # OPSD: the teacher's PI: answer | solution (of this problem) | rule
    live_teacher: bool = False       # OPSD: the teacher uses the live weights, not a frozen step-0 copy
    pi_steps: int = 1000             # SFT steps of the OPSD base on the PI mixture (PI_MIX)
    teacher: str = "sft"             # stage opd: the teacher: sft (teacher.pt) | rlvr (teacher_rlvr.pt)
    rlvr_init: str = "student"       # the RLVR teacher starts from the student or the SFT teacher
    rlvr_steps: int = 60             # RLVR optimizer steps
    rlvr_lr: float = 1e-4            # RLVR AdamW peak learning rate (10 warm-up steps, then cosine)
    rlvr_prompts: int = 16           # RLVR problems per step
    rlvr_group: int = 8              # RLVR samples per problem (advantages normalised per group)
    rlvr_cut: float = 0.0            # RLVR contexts: 0 = prompts; c > 0 = student samples cut at U[0, c]
    cont_frac: float = 0.5           # teacher-continuation: student samples are cut at this fraction


PRESETS = {
    "cpu": {},  # the defaults above: a few minutes on a 2-core laptop
    "gpu": dict(t_layer=6, t_embd=256, t_head=8, t_steps=4000, s_layer=4, s_embd=128, s_head=4,
                s_steps=800, batch_size=128, digits=4, ops="+-*", max_new_tokens=96, eval_n=2000),
}
STAGES = ("teacher", "student", "eval", "opd", "pibase", "rlvr")
# the OPSD base's SFT mixture (kind -> weight): without PI, with each kind of PI
PI_MIX = {"none": 0.3, "answer": 0.3, "solution": 0.1, "rule": 0.3}
# flags an experiment M3-M5 fixes itself
M_FIXED_FLAGS = ("stages", "run_name", "mode", "teacher", "pi")
# OPDConfig field -> its flag (the other fields share the flag's name)
OPD_FLAG_OF_FIELD = {"steps": "opd_steps", "lr": "opd_lr", "warmup": "opd_warmup", "batch_size": "opd_batch",
                     "eval_every": "opd_eval_every"}
# the flags that configure the single run of stage opd; --compare and --m2 fix their own
OPD_RUN_FLAGS = ("stages", "loss", "k", "support", "add_sampled", "gamma", "mask_tokens", "hide_from_teacher",
                 "clamp", "baseline", "run_name")

# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="bundle of defaults: cpu (laptop) or gpu (bigger)")
    g.add_argument("--out_dir", help="folder for checkpoints, logs, summary.json (default out/math)")
    g.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)} (default all)")
    g.add_argument("--seed", type=int, help="seed for data, init and sampling (default 1337)")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (default auto: cuda -> mps -> cpu)")
    g.add_argument("--threads", type=int, help="torch CPU threads, 0 = torch default")
    g.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the training forward passes of every stage (sampling stays eager); "
                        "pays off on a GPU for long runs, costs tens of seconds of compiling on a CPU")
    g = p.add_argument_group("task")
    g.add_argument("--digits", type=int, help="operands have 1..digits digits (default 3)")
    g.add_argument("--ops", help="operators to draw from, a subset of '+-*' (default '+-')")
    g.add_argument("--max_new_tokens", type=int, help="response budget when sampling (default 64)")
    g = p.add_argument_group("teacher")
    g.add_argument("--t_layer", type=int, help="teacher layers (default 4)")
    g.add_argument("--t_embd", type=int, help="teacher width (default 128)")
    g.add_argument("--t_head", type=int, help="teacher attention heads (default 4)")
    g.add_argument("--t_steps", type=int, help="teacher SFT steps (default 2000)")
    g.add_argument("--t_lr", type=float, help="teacher peak learning rate (default 3e-3)")
    g = p.add_argument_group("student")
    g.add_argument("--s_layer", type=int, help="student layers (default 2)")
    g.add_argument("--s_embd", type=int, help="student width (default 64)")
    g.add_argument("--s_head", type=int, help="student attention heads (default 2)")
    g.add_argument("--s_steps", type=int, help="cold-start SFT steps on teacher traces; 0 = none (default 800)")
    g.add_argument("--s_lr", type=float, help="student peak learning rate (default 3e-3)")
    g.add_argument("--s_pool", type=int, help="number of teacher traces sampled for the cold start (default 4096)")
    g = p.add_argument_group("optimisation and evaluation")
    g.add_argument("--batch_size", type=int, help="sequences per step (default 64)")
    g.add_argument("--eval_n", type=int, help="held-out problems per accuracy (default 500)")
    g.add_argument("--log_every", type=int, help="SFT log line every N steps (default 100)")
    g.add_argument("--save_every", type=int, help="checkpoint (weights + optimizer + step, and the samplers' RNG "
                   "states for opd/rlvr) every N steps of a stage; OPD also saves at every evaluation (default 250)")
    g.add_argument("--resume", action="store_true", default=None,
                   help="every stage continues from its checkpoint in out_dir (teacher.pt, student.pt, pibase.pt, "
                        "teacher_rlvr.pt, opd_<run_name>.pt) at its saved step and ends where an uninterrupted run "
                        "ends; a finished stage is not retrained; the experiments (--compare, --m2..--m5) do not "
                        "resume")
    g = p.add_argument_group("on-policy distillation (stage opd)")
    g.add_argument("--loss", help="objective: sampled_token | sequence_kl | full_reverse_kl | jsd | "
                   "topk_unnormalized | topk_stopgrad | topk_renorm (default sampled_token)")
    g.add_argument("--k", type=int, help="top-K objectives: support size (default 16)")
    g.add_argument("--support", help="top-K objectives: whose top-K is the support: teacher | student | "
                   "intersection (default teacher)")
    g.add_argument("--add_sampled", action="store_true", default=None,
                   help="top-K objectives: also put the sampled token in the support")
    g.add_argument("--gamma", type=float, help="sequence_kl: discount in [0, 1] of the return-to-go (default 1)")
    g.add_argument("--mask_tokens", help="comma-separated tokens left out of the loss, names or ids, "
                   "e.g. '<|fmt|>' or '<|fmt|>,7' (default none)")
    g.add_argument("--hide_from_teacher", help="comma-separated tokens (names or ids) removed from the "
                   "teacher's contexts when it scores a rollout, e.g. '<|fmt|>' (default none)")
    g.add_argument("--clamp", type=float, help="sampled_token: clip r_t to [-clamp, clamp] (default off)")
    g.add_argument("--baseline", action="store_true", default=None,
                   help="sampled_token: subtract the vOPD baseline KL(pi || q)(c_t) from r_t")
    g.add_argument("--opd_steps", type=int, help="OPD optimizer steps (default 200)")
    g.add_argument("--opd_lr", type=float, help="OPD AdamW peak learning rate (default 3e-4)")
    g.add_argument("--opd_warmup", type=int, help="OPD linear warm-up steps, then cosine decay to 10 %% (default 10)")
    g.add_argument("--opd_batch", type=int, help="student rollouts per OPD step (default 64)")
    g.add_argument("--temperature", type=float, help="rollout temperature, > 0 (default 1)")
    g.add_argument("--top_p", type=float, help="rollout nucleus mass in (0, 1], 1 = off (default 1)")
    g.add_argument("--top_k", type=int, help="rollout top-k, 0 = off (default 0)")
    g.add_argument("--opd_eval_every", type=int, help="held-out greedy accuracy and a checkpoint every N "
                   "OPD steps, 0 = only at the start and the end (default 50)")
    g.add_argument("--run_name", help="OPD outputs are <out_dir>/opd_<run_name>.{pt,jsonl,json} "
                   "(default: the loss name)")
    g = p.add_argument_group("experiments (instead of --stages; train the pair first if it is missing)")
    g.add_argument("--compare", action="store_true", default=None,
                   help="M1: every objective from the same teacher and student, one run per seed")
    g.add_argument("--m2", action="store_true", default=None,
                   help="M2: a student that emits <|fmt|>, distilled with and without masking it")
    g.add_argument("--seeds", help="comma-separated OPD seeds of --compare and --m2 (default 1,2)")
    g.add_argument("--fmt_steps", type=int, help="M2: SFT steps that teach a copy of the student to open "
                   "every answer with <|fmt|> (default 100)")
    g.add_argument("--m3", action="store_true", default=None,
                   help="M3: OPSD of the OPSD base with each kind of PI (answer, solution, rule), one run per "
                   "seed; uses --loss/--opd_* (trains pibase.pt first if it is missing)")
    g.add_argument("--m4", action="store_true", default=None,
                   help="M4: OPD of the student from the SFT teacher and from an RLVR-adapted teacher (one per "
                   "seed, --rlvr_*); teacher-continuation accuracy and top-16 overlap of each")
    g.add_argument("--m5", action="store_true", default=None,
                   help="M5: OPD from the cold-started student and from a random init (--s_steps 0)")
    g = p.add_argument_group("self-distillation with privileged information (OPSD) and the RLVR teacher")
    g.add_argument("--mode", choices=("opd", "opsd"),
                   help="stage opd: opd = the teacher model scores the student's samples; opsd = the OPSD base "
                   "(pibase.pt) is the student and, with PI in its context, its own teacher (default opd)")
    g.add_argument("--pi", choices=("answer", "solution", "rule"),
                   help="OPSD: privileged information given to the teacher: the answer or the reference solution "
                   "of the very problem, or the shared rule 'write the answer reversed' (default rule)")
    g.add_argument("--live_teacher", action="store_true", default=None,
                   help="OPSD: the teacher is the live (current) weights instead of a frozen copy of the "
                   "step-0 weights; it never receives gradients either way")
    g.add_argument("--pi_steps", type=int, help="stage pibase: SFT steps of the OPSD base (teacher shape) on a "
                   "mixture with and without PI (default 1000)")
    g.add_argument("--teacher", choices=("sft", "rlvr"),
                   help="stage opd: the OPD teacher: sft = teacher.pt, rlvr = teacher_rlvr.pt (stage rlvr) "
                   "(default sft)")
    g.add_argument("--rlvr_init", choices=("student", "teacher"),
                   help="stage rlvr and --m4: the RLVR teacher starts from the cold-started student (it then "
                   "samples exactly the student's kind of prefixes) or from the SFT teacher (default student)")
    g.add_argument("--rlvr_steps", type=int, help="RLVR optimizer steps (default 60)")
    g.add_argument("--rlvr_lr", type=float, help="RLVR AdamW peak learning rate, 10 warm-up steps then cosine (default 1e-4)")
    g.add_argument("--rlvr_prompts", type=int, help="RLVR problems per step (default 16)")
    g.add_argument("--rlvr_group", type=int, help="RLVR samples per problem, >= 2; advantages are normalised "
                   "within each group (default 8)")
    g.add_argument("--rlvr_cut", type=float, help="RLVR contexts: 0 = bare prompts; c in (0, 1) = the "
                   "student's samples cut at a fraction drawn from U[0, c] (default 0)")
    g.add_argument("--cont_frac", type=float, help="teacher-continuation accuracy: cut the student's samples at "
                   "this fraction of their length, in [0, 1] (default 0.5)")
    args = p.parse_args(argv)
    experiments = [f"--{n}" for n in ("compare", "m2", "m3", "m4", "m5") if getattr(args, n)]
    if len(experiments) > 1:
        p.error(f"{' and '.join(experiments)}: run one experiment per command")
    if args.m3 or args.m4 or args.m5:
        fixed = [f"--{n}" for n in M_FIXED_FLAGS if getattr(args, n) is not None]
        if fixed:
            p.error(f"{experiments[0]} sets its own stages, run name, mode, teacher and PI: drop {', '.join(fixed)}")
    if (args.pi is not None or args.live_teacher) and args.mode != "opsd" and not args.m3:
        p.error("--pi and --live_teacher configure self-distillation: add --mode opsd (or run --m3)")
    if args.mode == "opsd" and args.teacher is not None:
        p.error("--teacher picks the OPD teacher model; with --mode opsd the teacher is the model itself with PI")
    if args.compare or args.m2:
        fixed = [f"--{n}" for n in OPD_RUN_FLAGS if getattr(args, n) is not None]
        if fixed:
            p.error(f"{', '.join(fixed)}: these flags configure the single run of --stages opd; --compare and --m2 "
                    f"run their own fixed list of objectives: drop them")

    cfg = TrainConfig(**PRESETS[args.preset])
    for f in fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            setattr(cfg, f.name, v)
    try:
        validate(cfg)
    except ValueError as e:
        p.error(str(e))
    return cfg


def validate(cfg: TrainConfig) -> None:
    stages = [s for s in cfg.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f"--stages: unknown stage(s) {bad}; choose from {','.join(STAGES)}")
    for name in ("digits", "max_new_tokens", "t_steps", "batch_size", "eval_n", "s_pool"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("s_steps", "save_every"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if not cfg.ops or any(o not in "+-*" for o in cfg.ops):
        raise ValueError(f"--ops must be a non-empty subset of '+-*', got {cfg.ops!r}")
    for name in ("t_lr", "s_lr"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"--{name} must be > 0")
    for who in ("t", "s"):
        GPTConfig(n_layer=getattr(cfg, f"{who}_layer"), n_embd=getattr(cfg, f"{who}_embd"),
                  n_head=getattr(cfg, f"{who}_head"))  # raises a clear error on a bad shape
    validate_opd(cfg)
    validate_opsd_rlvr(cfg)


def validate_opsd_rlvr(cfg: TrainConfig) -> None:
    if cfg.pi_steps < 1:
        raise ValueError(f"--pi_steps must be >= 1, got {cfg.pi_steps}")
    try:
        rlvr_config(cfg, cfg.seed)
    except ValueError as e:  # RLVRConfig names the field first: steps, prompts, group, lr, cut
        raise ValueError(f"--rlvr_{e}") from None
    if not 0 <= cfg.cont_frac <= 1:
        raise ValueError(f"--cont_frac must lie in [0, 1], got {cfg.cont_frac}")
    for name, allowed in (("mode", ("opd", "opsd")), ("pi", PI_KINDS), ("teacher", ("sft", "rlvr")),
                          ("rlvr_init", ("student", "teacher"))):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")


def validate_opd(cfg: TrainConfig) -> None:
    if cfg.fmt_steps < 1:
        raise ValueError(f"--fmt_steps must be >= 1, got {cfg.fmt_steps}")
    if any(c in cfg.run_name for c in "/\\ ") or cfg.run_name.startswith("."):
        raise ValueError(f"--run_name becomes a file name: no '/', '\\', spaces or leading '.', got {cfg.run_name!r}")
    seeds(cfg)
    tok = get_tokenizer()
    options = objective_options(cfg, tok)
    parse_token_list(cfg.hide_from_teacher, tok, "--hide_from_teacher")
    try:
        get_objective(cfg.loss)
    except ValueError as e:
        raise ValueError(f"--loss: {e}") from None
    try:
        opd_config(cfg, cfg.loss, options, cfg.seed)
    except ValueError as e:  # OPDConfig names the field first
        field, rest = str(e).split(" ", 1)
        raise ValueError(f"--{OPD_FLAG_OF_FIELD.get(field, field)} {rest}") from None
    try:
        check_objective(cfg.loss, options, tok.n_vocab)
    except ValueError as e:
        raise ValueError(f"--loss {cfg.loss}: {e}") from None


def seeds(cfg: TrainConfig) -> list[int]:
    try:
        out = [int(s) for s in cfg.seeds.split(",") if s.strip()]
    except ValueError:
        out = []
    if not out:
        raise ValueError(f"--seeds must be comma-separated integers, e.g. 1,2; got {cfg.seeds!r}")
    return out


def parse_token_list(text: str, tok, flag: str = "--mask_tokens") -> list[int]:
    """'<|fmt|>,7' -> [260, 7]: comma-separated special-token names or integer token ids."""
    ids = []
    for item in (x.strip() for x in text.split(",")):
        if item in tok.special_ids:
            ids.append(tok.special_ids[item])
        elif item.isdigit() and int(item) < tok.n_vocab:
            ids.append(int(item))
        elif item:
            raise ValueError(f"{flag}: {item!r} is neither a special token "
                             f"({', '.join(tok.special_ids)}) nor a token id in [0, {tok.n_vocab})")
    return ids


def objective_options(cfg: TrainConfig, tok) -> dict:
    """The objective options set by flags; the ones left unset keep the objective's defaults."""
    opts = {n: getattr(cfg, n) for n in ("k", "support", "add_sampled", "gamma", "clamp", "baseline")
            if getattr(cfg, n) is not None}
    if cfg.mask_tokens:
        opts["mask_tokens"] = parse_token_list(cfg.mask_tokens, tok)
    return opts


# -----------------------------------------------------------------------------
# the stages


def train_teacher(cfg: TrainConfig, tok, device, log) -> GPT:
    """SFT on gold traces of fresh training problems every step."""
    seed_everything(cfg.seed)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, n_layer=cfg.t_layer, n_embd=cfg.t_embd, n_head=cfg.t_head)).to(device)
    log(f"teacher: {model.num_params():,} parameters, {cfg.t_steps} SFT steps on gold traces")
    problems = sample_problems(cfg.t_steps * cfg.batch_size, "train", cfg.seed, cfg.digits, cfg.ops)
    batch = lambda s: [encode_example(tok, p) for p in problems[s * cfg.batch_size:(s + 1) * cfg.batch_size]]
    path, extra = os.path.join(cfg.out_dir, "teacher.pt"), {"role": "teacher", "train": asdict(cfg)}
    train_sft(model, batch, cfg.t_steps, cfg.t_lr, tok.pad_id, log_every=cfg.log_every, desc="teacher", log=log,
              ckpt_path=path, save_every=cfg.save_every, resume=cfg.resume, extra=extra)
    return model


@torch.no_grad()
def teacher_traces(teacher: GPT, tok, cfg: TrainConfig) -> list[tuple[list[int], list[int]]]:
    """(prompt, response) pairs: the teacher's greedy answers to s_pool training prompts.
    Responses that hit the token budget without <|eos|> are dropped."""
    problems = sample_problems(cfg.s_pool, "train", cfg.seed + 1, cfg.digits, cfg.ops)
    prompts = [encode_example(tok, p)[0] for p in problems]
    pairs = []
    for i in range(0, len(prompts), 256):
        ro = generate(teacher, prompts[i:i + 256], cfg.max_new_tokens, tok.eos_id, tok.pad_id, temperature=0.0)
        for prompt, resp, m in zip(prompts[i:i + 256], ro.response.tolist(), ro.response_mask.tolist()):
            resp = [t for t, k in zip(resp, m) if k]
            if resp and resp[-1] == tok.eos_id:
                pairs.append((prompt, resp))
    return pairs


def train_student(cfg: TrainConfig, tok, device, teacher: GPT, log) -> GPT:
    """Cold start: a short SFT of the smaller model on the teacher's own traces."""
    seed_everything(cfg.seed + 1)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, n_layer=cfg.s_layer, n_embd=cfg.s_embd, n_head=cfg.s_head)).to(device)
    log(f"student: {model.num_params():,} parameters, {cfg.s_steps} cold-start SFT steps on teacher traces")
    if cfg.s_steps > 0:
        pairs = teacher_traces(teacher, tok, cfg)
        log(f"student: {len(pairs)} teacher traces in the cold-start pool")
        if not pairs:
            raise ValueError(f"the teacher finished none of its {cfg.s_pool} cold-start traces with <|eos|> within "
                             f"--max_new_tokens {cfg.max_new_tokens}: it is undertrained (more --t_steps) or the "
                             f"budget is too small")
        g = torch.Generator().manual_seed(cfg.seed + 2)
        order = torch.randint(len(pairs), (cfg.s_steps, cfg.batch_size), generator=g)  # (steps, B): batches by step
        batch = lambda s: [pairs[i] for i in order[s].tolist()]
    path, extra = os.path.join(cfg.out_dir, "student.pt"), {"role": "student", "train": asdict(cfg)}
    if cfg.s_steps > 0:
        train_sft(model, batch, cfg.s_steps, cfg.s_lr, tok.pad_id, log_every=cfg.log_every, desc="student", log=log,
                  ckpt_path=path, save_every=cfg.save_every, resume=cfg.resume, extra=extra)
    elif distributed.is_main():
        save_checkpoint(path, model, 0, extra=extra)
    return model


def load_role(cfg: TrainConfig, role: str, tok, device) -> GPT:
    path = os.path.join(cfg.out_dir, f"{role}.pt")
    model, _ = load_checkpoint(path, device, expect_vocab=tok.n_vocab)
    return model


def test_problems(cfg: TrainConfig) -> list:
    """The held-out problems every accuracy of a run is measured on."""
    return sample_problems(cfg.eval_n, "test", cfg.seed, cfg.digits, cfg.ops)


def opd_config(cfg: TrainConfig, loss: str, options: dict, seed: int, track_tokens=(), hide_tokens=()) -> OPDConfig:
    return OPDConfig(loss=loss, options=options, steps=cfg.opd_steps, lr=cfg.opd_lr, warmup=cfg.opd_warmup,
                     batch_size=cfg.opd_batch, temperature=cfg.temperature, top_p=cfg.top_p,
                     top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens, eval_every=cfg.opd_eval_every,
                     seed=seed, digits=cfg.digits, ops=cfg.ops, track_tokens=tuple(track_tokens),
                     hide_tokens=tuple(hide_tokens))


def run_opd(cfg: TrainConfig, tok, teacher: GPT, student: GPT, log) -> dict:
    """Stage opd: one OPD run of the student (in place) with the objective the flags chose."""
    name = cfg.run_name or cfg.loss
    options = objective_options(cfg, tok)
    hide = parse_token_list(cfg.hide_from_teacher, tok, "--hide_from_teacher")
    ocfg = opd_config(cfg, cfg.loss, options, cfg.seed, track_tokens=options.get("mask_tokens", hide), hide_tokens=hide)
    s = train_opd(student, teacher, tok, ocfg, os.path.join(cfg.out_dir, f"opd_{name}"), test_problems(cfg),
                  log, name, save_every=cfg.save_every, resume=cfg.resume,
                  settings={"mode": "opd", "teacher": cfg.teacher, "eval_n": cfg.eval_n})
    log(f"opd {name}: held-out greedy accuracy {s['start_acc']:.1%} -> {s['final_acc']:.1%} | reverse KL "
        f"{s['first_kl']:.3f} -> {s['final_kl']:.3f} | degraded: {s['degraded'] or 'no'}")
    return {k: s[k] for k in ("start_acc", "final_acc", "first_kl", "final_kl", "final_response_length",
                              "final_overlap_ratio", "degraded", "seconds")}


# -----------------------------------------------------------------------------
# experiments: M1 (objectives side by side) and M2 (special-token mismatch)

# (label, objective, options); mask_tokens and hide_from_teacher (not an objective option: the
# teacher's contexts) hold token names, resolved with the tokenizer
M1_RUNS = (
    ("sampled_token", "sampled_token", {}),
    # every special token that never belongs in an answer (EOS does, so it stays in the loss)
    ("sampled_token+mask", "sampled_token", {"mask_tokens": "<|bos|>,<|pad|>,<|pi|>,<|fmt|>"}),
    ("full_reverse_kl", "full_reverse_kl", {}),
    ("topk_unnormalized", "topk_unnormalized", {"k": 16}),
    ("topk_stopgrad", "topk_stopgrad", {"k": 16}),
    ("topk_renorm", "topk_renorm", {"k": 16}),
    ("sequence_kl(gamma=1)", "sequence_kl", {"gamma": 1.0}),
)
M2_RUNS = (
    ("sampled_token", "sampled_token", {}),
    ("sampled_token+mask", "sampled_token", {"mask_tokens": "<|fmt|>"}),
    ("sampled_token+mask+hide", "sampled_token", {"mask_tokens": "<|fmt|>", "hide_from_teacher": "<|fmt|>"}),
    ("full_reverse_kl", "full_reverse_kl", {}),
    ("full_reverse_kl+mask+hide", "full_reverse_kl", {"mask_tokens": "<|fmt|>", "hide_from_teacher": "<|fmt|>"}),
)


def ensure_pair(cfg: TrainConfig, tok, device, log) -> tuple[GPT, GPT]:
    """The teacher and cold-start student of out_dir; the missing ones are trained first."""
    have = lambda role: os.path.exists(os.path.join(cfg.out_dir, f"{role}.pt"))
    if have("teacher"):
        teacher = load_role(cfg, "teacher", tok, device)
    else:
        log("no teacher.pt in out_dir: training the teacher first")
        teacher = train_teacher(cfg, tok, device, log)
    if have("student"):
        student = load_role(cfg, "student", tok, device)
    else:
        log("no student.pt in out_dir: training the cold-start student first")
        student = train_student(cfg, tok, device, teacher, log)
    return teacher, student


def run_grid(cfg: TrainConfig, tok, teacher: GPT, student: GPT, runs, folder: str, log,
             track_tokens=(), after=None) -> list[dict]:
    """One OPD run per (seed, run), each from a fresh copy of `student`. A run that hits a
    non-finite loss is kept (as degraded), not fatal. after(label, model) adds per-run numbers."""
    test = test_problems(cfg)
    start = evaluate(student, tok, test, 0.0, cfg.max_new_tokens)
    rows = []
    for seed in seeds(cfg):
        for label, loss, options in runs:
            options = dict(options)
            if "mask_tokens" in options:
                options["mask_tokens"] = parse_token_list(options["mask_tokens"], tok)
            hide = parse_token_list(options.pop("hide_from_teacher", ""), tok, "--hide_from_teacher")
            prefix = os.path.join(folder, "".join(c if c.isalnum() else "_" for c in label) + f"_s{seed}")
            model = copy.deepcopy(student)
            try:
                s = train_opd(model, teacher, tok, opd_config(cfg, loss, options, seed, track_tokens, hide), prefix,
                              test, log, f"{label} s{seed}", start_acc=start, print_every=10)
            except FloatingPointError:
                with open(prefix + ".json") as f:
                    s = json.load(f)
            rows.append({"label": label, "seed": seed, **s, **(after(label, model) if after else {})})
    return rows


def by_label(rows: list[dict]) -> dict[str, list[dict]]:
    out = {}
    for r in rows:
        out.setdefault(r["label"], []).append(r)
    return out


def pct(values, none="-") -> str:
    """'61.2% (60.4 62.0)': the mean and each seed's value, in percent."""
    values = [v for v in values if v is not None]
    if not values:
        return none
    each = " ".join(f"{100 * v:.1f}" for v in values)
    return f"{100 * sum(values) / len(values):.1f}% ({each})"


def degraded_cell(rows: list[dict]) -> str:
    """'1/2 collapse': how many of the seeds degraded, and why."""
    bad = [r["degraded"] for r in rows if r["degraded"]]
    return f"{len(bad)}/{len(rows)} {' '.join(sorted(set(bad)))}".rstrip()


def mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def write_results(folder: str, name: str, rows: list[dict], table: str, meta: dict, csv_keys) -> None:
    """<folder>/<name>.txt (the printed table), .csv (one row per run) and .json (everything)."""
    with open(os.path.join(folder, f"{name}.txt"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(folder, f"{name}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=csv_keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump({**meta, "runs": [{k: v for k, v in r.items() if k != "config"} for r in rows]}, f, indent=2)


def header(cfg: TrainConfig, what: str, teacher_acc: float, student_acc: float, seconds: float) -> str:
    return (f"{what} | seeds {cfg.seeds} | {cfg.opd_steps} OPD steps x {cfg.opd_batch} rollouts | lr {cfg.opd_lr} | "
            f"T={cfg.temperature} top_p={cfg.top_p} top_k={cfg.top_k} | held-out n={cfg.eval_n} | "
            f"teacher {teacher_acc:.1%}, student at start {student_acc:.1%} (greedy) | wall {seconds / 60:.1f} min")


def run_compare(cfg: TrainConfig, tok, device, log) -> dict:
    """M1: every objective from the same teacher and cold-start student, one run per seed."""
    t0 = time.time()
    teacher, student = ensure_pair(cfg, tok, device, log)
    folder = os.path.join(cfg.out_dir, "m1")
    rows = run_grid(cfg, tok, teacher, student, M1_RUNS, folder, log)
    teacher_acc = evaluate(teacher, tok, test_problems(cfg), 0.0, cfg.max_new_tokens)
    lines = [header(cfg, "M1: objectives side by side", teacher_acc, rows[0]["start_acc"], time.time() - t0),
             f"{'objective':21s} | {'held-out acc, mean (per seed)':29s} | {'rev. KL start -> end':20s} | "
             f"{'length':6s} | {'overlap':7s} | {'max|r_t|':8s} | degraded"]
    for label, rs in by_label(rows).items():
        lines.append(f"{label:21s} | {pct(r['final_acc'] for r in rs):29s} | "
                     f"{mean(r['first_kl'] for r in rs):8.3f} -> {mean(r.get('final_kl') for r in rs):7.3f} | "
                     f"{mean(r.get('final_response_length') for r in rs):6.1f} | "
                     f"{100 * mean(r.get('final_overlap_ratio') for r in rs):6.1f}% | "
                     f"{mean(r.get('max_logratio_abs') for r in rs):8.1f} | "
                     f"{degraded_cell(rs)}")
    lines.append("length, overlap (top-16, teacher vs student) and KL: means over the last 10 % of steps of the "
                 "rollouts; degraded: non-finite, length (>= 50 % of rollouts hit the budget) or collapse "
                 "(held-out accuracy > 10 points below the start)")
    table = "\n".join(lines)
    log(table)
    write_results(folder, "m1", rows, table, {"teacher_acc": teacher_acc, "seconds": round(time.time() - t0, 1)},
                  ["label", "seed", "start_acc", "final_acc", "first_kl", "final_kl", "final_response_length",
                   "final_budget_share", "final_overlap_ratio", "final_overlap_mass_student", "max_logratio_abs",
                   "final_grad_norm", "degraded", "error", "steps_done", "seconds"])
    return {"m1_seconds": round(time.time() - t0, 1), "m1_teacher_acc": teacher_acc}


def make_fmt_student(cfg: TrainConfig, tok, device, teacher: GPT, student: GPT, log) -> GPT:
    """A copy of the student fine-tuned to open every answer with <|fmt|>, a token the teacher was
    never trained on (so log q(<|fmt|> | c_t) is tens of nats below log pi)."""
    pairs = [(prompt, [tok.fmt_id] + resp) for prompt, resp in teacher_traces(teacher, tok, cfg)]
    if not pairs:
        raise ValueError(f"none of the teacher's {cfg.s_pool} greedy answers ended with <|eos|> within "
                         f"--max_new_tokens {cfg.max_new_tokens}: train the teacher longer (or raise the budget)")
    model = copy.deepcopy(student)
    g = torch.Generator().manual_seed(cfg.seed + 3)
    batch = lambda s: [pairs[i] for i in torch.randint(len(pairs), (cfg.batch_size,), generator=g).tolist()]
    train_sft(model, batch, cfg.fmt_steps, cfg.s_lr, tok.pad_id, warmup=10, log_every=cfg.log_every,
              desc="fmt-student", log=log)
    save_checkpoint(os.path.join(cfg.out_dir, "student_fmt.pt"), model, cfg.fmt_steps,
                    extra={"role": "student_fmt", "train": asdict(cfg)})
    return model


def run_m2(cfg: TrainConfig, tok, device, log) -> dict:
    """M2: OPD of a student that emits <|fmt|> (unknown to the teacher), with and without masking it."""
    t0 = time.time()
    teacher, student = ensure_pair(cfg, tok, device, log)
    fmt_student = make_fmt_student(cfg, tok, device, teacher, student, log)
    test = test_problems(cfg)
    fmt_text = tok.decode([tok.fmt_id])

    def fmt_rate(model) -> float:
        _, texts = evaluate(model, tok, test, 0.0, cfg.max_new_tokens, return_texts=True)
        return sum(t.startswith(fmt_text) for t in texts) / len(texts)

    start_rate = fmt_rate(fmt_student)
    folder = os.path.join(cfg.out_dir, "m2")
    rows = run_grid(cfg, tok, teacher, fmt_student, M2_RUNS, folder, log, track_tokens=(tok.fmt_id,),
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
                                              "seconds": round(time.time() - t0, 1)},
                  ["label", "seed", "start_acc", "final_acc", "step0_fmt_logratio", "step0_fmt_share",
                   "step0_grad_norm", "step0_other_kl", "final_track_other_kl", "final_kl", "final_fmt_rate",
                   "final_track_logratio_mean", "final_response_length", "max_logratio_abs", "degraded", "error",
                   "steps_done", "seconds"])
    return {"m2_seconds": round(time.time() - t0, 1)}


# -----------------------------------------------------------------------------
# self-distillation with privileged information (OPSD, M3), the RLVR teacher (M4), cold start (M5)


def train_pi_base(cfg: TrainConfig, tok, device, log) -> GPT:
    """The OPSD base: a teacher-shaped GPT trained by SFT on a mixture (PI_MIX) of plain examples
    and examples with PI before the prompt (the answer, the solution, or the rule, whose examples
    write the answer reversed), so that the model uses PI when it has it."""
    seed_everything(cfg.seed + 4)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, n_layer=cfg.t_layer, n_embd=cfg.t_embd, n_head=cfg.t_head)).to(device)
    log(f"pi-base: {model.num_params():,} parameters, {cfg.pi_steps} SFT steps on the mixture {PI_MIX}")
    problems = sample_problems(cfg.pi_steps * cfg.batch_size, "train", cfg.seed + 4, cfg.digits, cfg.ops)
    kinds = mixture_kinds(len(problems), PI_MIX, torch.Generator().manual_seed(cfg.seed + 4))
    B = cfg.batch_size
    batch = lambda s: [pi_example(tok, p, k) for p, k in zip(problems[s * B:(s + 1) * B], kinds[s * B:(s + 1) * B])]
    train_sft(model, batch, cfg.pi_steps, cfg.t_lr, tok.pad_id, log_every=cfg.log_every, desc="pi-base", log=log,
              ckpt_path=os.path.join(cfg.out_dir, "pibase.pt"), save_every=cfg.save_every, resume=cfg.resume,
              extra={"role": "pibase", "train": asdict(cfg)})
    return model


def ensure_role(cfg: TrainConfig, role: str, tok, device, log, train) -> GPT:
    """<out_dir>/<role>.pt, or train() it first when it is missing."""
    if os.path.exists(os.path.join(cfg.out_dir, f"{role}.pt")):
        return load_role(cfg, role, tok, device)
    log(f"no {role}.pt in out_dir: training it first")
    return train()


def rule_test_problems(cfg: TrainConfig) -> list:
    """The held-out problems whose answer is not a palindrome (there the rule is visible)."""
    return [p for p in test_problems(cfg) if rule_visible(p)]


def pi_scores(model: GPT, tok, problems, cfg: TrainConfig, kind: str | None = None) -> tuple[float, float]:
    """(accuracy, rule-following) of the greedy answers, with PI `kind` before each prompt (None:
    without PI). Rule-following = the share of answers that spell the true answer reversed."""
    prefix = "" if kind is None else (lambda p: pi_text(p, kind))
    acc, texts = evaluate(model, tok, problems, 0.0, cfg.max_new_tokens, prefix=prefix, return_texts=True)
    return acc, sum(verify_rule(t, p) for t, p in zip(texts, problems)) / len(problems)


def opsd_run(cfg: TrainConfig, tok, base: GPT, kind: str, seed: int, prefix: str, problems, log, name: str,
             start: tuple[float, float], print_every: int = 1, save_every: int = 0, resume: bool = False) -> dict:
    """One OPSD run from a copy of `base`: the OPD loop, with the teacher = the same network
    (frozen step-0 copy, or live) scoring the student's samples under PI `kind`. save_every and
    resume go to train_opd (stage opd uses them; the M3 grid does not)."""
    student = copy.deepcopy(base)
    teacher = self_teacher(student, live=cfg.live_teacher)
    ocfg = opd_config(cfg, cfg.loss, objective_options(cfg, tok), seed)
    s = train_opd(student, teacher, tok, ocfg, prefix, problems, log, name, start_acc=start[0],
                  print_every=print_every, teacher_score=PrivilegedTeacher(tok, kind), save_every=save_every,
                  resume=resume,
                  settings={"mode": "opsd", "pi": kind, "live_teacher": cfg.live_teacher, "eval_n": cfg.eval_n})
    acc, rule = distributed.from_main(lambda: pi_scores(student, tok, problems, cfg))
    log(f"{name}: without PI, held-out accuracy {start[0]:.1%} -> {acc:.1%} | rule-following {start[1]:.1%} -> "
        f"{rule:.1%} | reverse KL to the PI teacher {s['first_kl']:.3f} -> {s['final_kl']:.3f}")
    return {"pi": kind, "seed": seed, **s, "final_acc": acc, "start_rule": start[1], "final_rule": rule}


def run_opsd(cfg: TrainConfig, tok, base: GPT, log) -> dict:
    """Stage opd with --mode opsd: one OPSD run of the OPSD base with PI --pi."""
    name = cfg.run_name or f"opsd_{cfg.pi}"
    problems = rule_test_problems(cfg)
    r = opsd_run(cfg, tok, base, cfg.pi, cfg.seed, os.path.join(cfg.out_dir, f"opd_{name}"), problems, log, name,
                 distributed.from_main(lambda: pi_scores(base, tok, problems, cfg)),
                 save_every=cfg.save_every, resume=cfg.resume)
    return {k: r[k] for k in ("start_acc", "final_acc", "start_rule", "final_rule", "first_kl", "final_kl", "seconds")}


def run_m3(cfg: TrainConfig, tok, device, log) -> dict:
    """M3: OPSD with instance-specific PI (answer, solution) vs the shared rule, one run per seed."""
    t0 = time.time()
    base = ensure_role(cfg, "pibase", tok, device, log, lambda: train_pi_base(cfg, tok, device, log))
    problems = rule_test_problems(cfg)
    start = pi_scores(base, tok, problems, cfg)
    with_pi = {kind: pi_scores(base, tok, problems, cfg, kind) for kind in PI_KINDS}
    folder = os.path.join(cfg.out_dir, "m3")
    rows = [opsd_run(cfg, tok, base, kind, seed, os.path.join(folder, f"{kind}_s{seed}"), problems, log,
                     f"opsd {kind} s{seed}", start, print_every=20)
            for seed in seeds(cfg) for kind in PI_KINDS]
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
    write_results(folder, "m3", rows, table,
                  {"base_acc": start[0], "base_rule": start[1], "base_with_pi": with_pi,
                   "seconds": round(time.time() - t0, 1)},
                  ["pi", "seed", "start_acc", "final_acc", "start_rule", "final_rule", "first_kl", "final_kl",
                   "final_response_length", "final_overlap_ratio", "degraded", "steps_done", "seconds"])
    return {"m3_seconds": round(time.time() - t0, 1)}


def rlvr_config(cfg: TrainConfig, seed: int) -> RLVRConfig:
    return RLVRConfig(steps=cfg.rlvr_steps, prompts=cfg.rlvr_prompts, group=cfg.rlvr_group, lr=cfg.rlvr_lr,
                      temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, cut=cfg.rlvr_cut, seed=seed,
                      digits=cfg.digits, ops=cfg.ops)


def train_rlvr_teacher(cfg: TrainConfig, tok, teacher: GPT, student: GPT, seed: int, path: str, log,
                       resume: bool = False) -> GPT:
    """An RLVR-adapted teacher: a copy of the student (or of the SFT teacher, --rlvr_init) trained
    with group-normalised REINFORCE and the verifier as reward; with --rlvr_cut > 0 its contexts
    are the student's samples cut at random fractions. Checkpointed to `path` every --save_every
    steps and at the end; resume=True continues from there (stage rlvr --resume)."""
    model = copy.deepcopy(student if cfg.rlvr_init == "student" else teacher).train().requires_grad_(True)
    rcfg = rlvr_config(cfg, seed)
    log(f"rlvr: from the {cfg.rlvr_init}, {rcfg.steps} steps x {rcfg.prompts} problems x {rcfg.group} samples, "
        f"lr {rcfg.lr}, contexts {'prompts' if rcfg.cut == 0 else f'student samples cut at U[0, {rcfg.cut}]'}")
    train_rlvr(model, tok, rcfg, student=student, log=log, jsonl_path=path[:-3] + ".jsonl", ckpt_path=path,
               save_every=cfg.save_every, resume=resume, extra={"role": "teacher_rlvr", "train": asdict(cfg)},
               settings={"init": cfg.rlvr_init})
    return model


def run_m4(cfg: TrainConfig, tok, device, log) -> dict:
    """M4: OPD of the cold-started student from the SFT teacher and from an RLVR-adapted teacher."""
    t0 = time.time()
    teacher, student = ensure_pair(cfg, tok, device, log)
    test = test_problems(cfg)
    folder = os.path.join(cfg.out_dir, "m4")
    os.makedirs(folder, exist_ok=True)
    start = evaluate(student, tok, test, 0.0, cfg.max_new_tokens)
    rows = []
    for seed in seeds(cfg):
        teachers = {"sft": teacher,
                    "rlvr": train_rlvr_teacher(cfg, tok, teacher, student, seed,
                                               os.path.join(folder, f"teacher_rlvr_s{seed}.pt"), log)}
        for label, t in teachers.items():
            cont = teacher_continuation(t, student, tok, test, cfg.cont_frac, cfg.max_new_tokens, seed=seed)
            log(f"m4 {label} s{seed}: teacher greedy accuracy {cont['teacher_acc']:.1%}, from student prefixes cut "
                f"at {cfg.cont_frac:.0%}: {cont['continuation_acc']:.1%}")
            s = train_opd(copy.deepcopy(student), t, tok, opd_config(cfg, cfg.loss, objective_options(cfg, tok), seed),
                          os.path.join(folder, f"{label}_s{seed}"), test, log, f"{label} s{seed}", start_acc=start,
                          print_every=20)
            rows.append({"label": label, "seed": seed, **cont, **s,
                         "first_overlap_ratio": s["first_step"]["overlap_ratio"]})
    lines = [header(cfg, "M4: SFT teacher vs RLVR-adapted teacher", teacher_acc=mean(
                 r["teacher_acc"] for r in rows if r["label"] == "sft"), student_acc=start, seconds=time.time() - t0),
             f"RLVR teacher: from the {cfg.rlvr_init}, {cfg.rlvr_steps} steps x {cfg.rlvr_prompts} problems x "
             f"{cfg.rlvr_group} samples, lr {cfg.rlvr_lr}, cut {cfg.rlvr_cut} (one per seed)",
             f"{'teacher':7s} | {'teacher acc':22s} | {'teacher continuation':22s} | {'top-16 overlap':16s} | "
             f"{'student held-out acc':29s} | {'rev. KL':15s}",
             f"{'':7s} | {'greedy, from scratch':22s} | {f'from {cfg.cont_frac:.0%} of student':22s} | "
             f"{'start -> end':16s} | {'end, mean (per seed)':29s} | {'start -> end':15s}"]
    for label, rs in by_label(rows).items():
        lines.append(f"{label:7s} | {pct(r['teacher_acc'] for r in rs):22s} | {pct(r['continuation_acc'] for r in rs):22s} | "
                     f"{100 * mean(r['first_overlap_ratio'] for r in rs):5.1f}% -> {100 * mean(r.get('final_overlap_ratio') for r in rs):5.1f}% | "
                     f"{pct(r['final_acc'] for r in rs):29s} | "
                     f"{mean(r['first_kl'] for r in rs):5.3f} -> {mean(r.get('final_kl') for r in rs):5.3f}")
    lines.append("teacher continuation: the student samples (T=1) a held-out answer, it is cut at the fraction, the "
                 "teacher finishes it greedily; overlap |TopK(pi) ∩ TopK(q)|/16 on the student's samples, first "
                 "step and last 10 % of steps")
    table = "\n".join(lines)
    log(table)
    write_results(folder, "m4", rows, table, {"student_start_acc": start, "seconds": round(time.time() - t0, 1)},
                  ["label", "seed", "teacher_acc", "continuation_acc", "student_acc", "frac", "start_acc", "final_acc",
                   "first_overlap_ratio", "final_overlap_ratio", "first_kl", "final_kl", "degraded", "seconds"])
    return {"m4_seconds": round(time.time() - t0, 1)}


def run_m5(cfg: TrainConfig, tok, device, log) -> dict:
    """M5: OPD from the cold-started student vs from a random init (no cold start, s_steps = 0)."""
    t0 = time.time()
    teacher, student = ensure_pair(cfg, tok, device, log)
    test = test_problems(cfg)
    folder = os.path.join(cfg.out_dir, "m5")
    rows = []
    for seed in seeds(cfg):
        seed_everything(seed)
        scratch = GPT(GPTConfig(vocab_size=tok.n_vocab, n_layer=cfg.s_layer, n_embd=cfg.s_embd, n_head=cfg.s_head)).to(device)
        for label, init in ((f"cold start ({cfg.s_steps} SFT steps)", student), ("no cold start (s_steps 0)", scratch)):
            s = train_opd(copy.deepcopy(init), teacher, tok, opd_config(cfg, cfg.loss, objective_options(cfg, tok), seed),
                          os.path.join(folder, f"{'cold' if init is student else 'scratch'}_s{seed}"), test, log,
                          f"{label} s{seed}", print_every=20)
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
    write_results(folder, "m5", rows, table, {"seconds": round(time.time() - t0, 1)},
                  ["label", "seed", "start_acc", "final_acc", "first_kl", "final_kl", "first_overlap_ratio",
                   "final_overlap_ratio", "first_response_length", "final_response_length", "final_budget_share",
                   "degraded", "seconds"])
    return {"m5_seconds": round(time.time() - t0, 1)}


# -----------------------------------------------------------------------------
# main


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_compile(cfg.compile)
    dist_info, device = distributed.setup(cfg.device)  # one process, or one rank of torchrun
    if dist_info.enabled and (cfg.compare or cfg.m2 or cfg.m3 or cfg.m4 or cfg.m5):
        raise ValueError("under torchrun every stage runs data-parallel, but the experiments (--compare, --m2..--m5) "
                         "are grids of small runs: start them as a single process (python train_math.py ...)")
    tok = get_tokenizer()
    os.makedirs(cfg.out_dir, exist_ok=True)
    summary_path = os.path.join(cfg.out_dir, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    log_file = open(os.path.join(cfg.out_dir, "log.txt"), "a") if dist_info.is_main else None

    def log(msg: str):
        if log_file is None:  # ranks > 0 stay quiet
            return
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    log(f"device {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | config {json.dumps(asdict(cfg))}")
    models = {}
    if cfg.compare or cfg.m2 or cfg.m3 or cfg.m4 or cfg.m5:
        for flag, run in (("m3", run_m3), ("m4", run_m4), ("m5", run_m5)):
            if getattr(cfg, flag):
                summary.update(run(cfg, tok, device, log))
        if cfg.compare:
            summary.update(run_compare(cfg, tok, device, log))
        if cfg.m2:
            summary.update(run_m2(cfg, tok, device, log))
        summary["device"], summary["config"] = str(device), asdict(cfg)
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
        return summary
    for stage in cfg.stages.split(","):
        t0 = time.time()
        if stage == "teacher":
            models["teacher"] = train_teacher(cfg, tok, device, log)
        elif stage == "student":
            teacher = models.get("teacher") or load_role(cfg, "teacher", tok, device)
            models["student"] = train_student(cfg, tok, device, teacher, log)
        elif stage == "eval" and not dist_info.is_main:
            pass  # rank 0 evaluates; the others wait at the barrier below
        elif stage == "eval":
            test = test_problems(cfg)
            for role in ("teacher", "student"):
                model = models.get(role) or load_role(cfg, role, tok, device)
                greedy = evaluate(model, tok, test, 0.0, cfg.max_new_tokens)
                sampled = evaluate(model, tok, test, 1.0, cfg.max_new_tokens, seed=cfg.seed)
                summary[f"{role}_acc_greedy"], summary[f"{role}_acc_sampled"] = greedy, sampled
                log(f"eval {role}: held-out accuracy greedy {greedy:.1%} | sampled (T=1) {sampled:.1%} | n={len(test)}")
        elif stage == "pibase":
            models["pibase"] = train_pi_base(cfg, tok, device, log)
        elif stage == "rlvr":
            teacher = models.get("teacher") or load_role(cfg, "teacher", tok, device)
            student = models.get("student") or load_role(cfg, "student", tok, device)
            models["teacher_rlvr"] = train_rlvr_teacher(cfg, tok, teacher, student, cfg.seed,
                                                        os.path.join(cfg.out_dir, "teacher_rlvr.pt"), log, cfg.resume)
        elif stage == "opd" and cfg.mode == "opsd":
            base = models.get("pibase") or load_role(cfg, "pibase", tok, device)
            summary[f"opd_{cfg.run_name or 'opsd_' + cfg.pi}"] = run_opsd(cfg, tok, base, log)
        elif stage == "opd":
            role = {"sft": "teacher", "rlvr": "teacher_rlvr"}[cfg.teacher]
            teacher = models.get(role) or load_role(cfg, role, tok, device)
            student = copy.deepcopy(models["student"]) if "student" in models else load_role(cfg, "student", tok, device)
            summary[f"opd_{cfg.run_name or cfg.loss}"] = run_opd(cfg, tok, teacher, student, log)
        distributed.barrier()  # ranks start the next stage together (rank 0 may still be saving)
        summary[f"{stage}_seconds"] = round(time.time() - t0, 1)
        log(f"stage {stage} done in {summary[f'{stage}_seconds']:.1f}s")
    summary["device"], summary["config"] = str(device), asdict(cfg)
    summary["world_size"] = dist_info.world_size
    if dist_info.is_main:
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
    log(f"summary written to {summary_path}")
    distributed.cleanup()
    return summary


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, FloatingPointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
