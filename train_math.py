"""
train_math.py: synthetic math, from scratch to a teacher, a cold-start student, and on-policy
distillation (OPD) of the one into the other. The pipeline, stage by stage (--stages):

  teacher   SFT of a GPT on gold step-by-step traces                              -> teacher.pt
  student   cold start: a short SFT of a smaller GPT on the teacher's own traces   -> student.pt
  eval      greedy and sampled held-out accuracy of both (final_eval_n problems;
            greedy also by operator when --ops has several)                      -> summary.json
  opd       the student samples, the teacher scores every token, the student descends
            the objective (--loss); --mode opsd: the OPSD base is the student and, with
            privileged information (--pi) in its context, its own teacher          -> opd_<name>.{pt,jsonl,json}
  pibase    the OPSD base: SFT on a mix of examples with and without PI            -> pibase.pt
  rlvr      an RLVR-adapted teacher: REINFORCE with group-normalised advantages
            and the verifier as reward, from the student (--rlvr_init)             -> teacher_rlvr.pt
All outputs go to --out_dir (default out/math); a later stage loads what an earlier run left there.

Commands
  CPU laptop (about 9 min on 2 cores):               python train_math.py
  one GPU (wider models, more steps):                 python train_math.py --preset gpu
  several GPUs (every stage data-parallel, DDP):      torchrun --nproc_per_node=4 train_math.py --preset gpu
  resume any stage after an interruption:             python train_math.py --resume   (same flags)
  only evaluate existing checkpoints:                 python train_math.py --stages eval
  OPD from the existing pair, renormalised top-K:     python train_math.py --stages opd --loss topk_renorm --k 16
  sampled-token OPD, vOPD baseline, r_t clamped:      python train_math.py --stages opd --baseline --clamp 5 --run_name vopd
  OPSD with the shared rule as PI:                    python train_math.py --stages pibase,opd --mode opsd --pi rule --loss full_reverse_kl --opd_lr 1e-3 --opd_steps 120 --opd_batch 32
  OPD from an RLVR-adapted teacher:                   python train_math.py --stages rlvr,opd --teacher rlvr
  GKD's mix, half of each batch the teacher's:        python train_math.py --stages opd --lmbda 0.5 --loss forward_kl
  a teacher reading 3-digit tokens, chunk-level OPD:  python train_math.py --teacher_tokenizer digits --stages teacher,student,eval,opd --loss xt_chunk --out_dir out/digits
  every flag, explained, with its default:            python train_math.py --help
The experiments M1-M9 are their own scripts in experiments/ (python experiments/m1_objectives.py, ...).
"""

import copy
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from nanoopd import distributed
from nanoopd.checkpoint import load_checkpoint, save_checkpoint
from nanoopd.cross_teacher import check_cross_flags, teacher_scorer
from nanoopd.cross_tokenizer import retokenize
from nanoopd.config import ConfigError, parse_config, sub_config
from nanoopd.device import seed_everything
from nanoopd.evaluate import accuracy_by_op, evaluate
from nanoopd.flops import FlopCount, pass_flops
from nanoopd.model import GPT, GPTConfig
from nanoopd.objectives import check_objective, load_objectives
from nanoopd.opd import OPDConfig, train_opd
from nanoopd.rlvr import RLVRConfig, train_rlvr
from nanoopd.rollout import generate
from nanoopd.script import cli, finish, start
from nanoopd.self_distill import PI_KINDS, PrivilegedTeacher, mixture_kinds, pi_example, pi_scores, rule_visible, self_teacher
from nanoopd.sft import train_sft
from nanoopd.special_tokens import HiddenTokens, TrackedTokens, token_ids
from nanoopd.tasks import OPS, encode_example, sample_problems, weighted_ops
from nanoopd.tokenizer import TOKENIZERS, get_tokenizer

STAGES = ("teacher", "student", "eval", "opd", "pibase", "rlvr")
PI_MIX = {"none": 0.3, "answer": 0.3, "solution": 0.1, "rule": 0.3}  # the OPSD base's SFT mixture (kind -> weight)

# -----------------------------------------------------------------------------
# config: every field is a flag (nanoopd/config.py), its comment the help; the OPD and RLVR
# settings are the library's own (OPDConfig, RLVRConfig), declared once there and inherited here


@dataclass
class TrainConfig(OPDConfig, RLVRConfig):
    # --- run
    out_dir: str = "out/math"        # checkpoints, logs and summary.json go here
    stages: str = "teacher,student,eval"  # comma-separated stages, run in the order given: teacher, student, eval, opd, pibase, rlvr
    seed: int = 1337                 # seeds data order, init and sampling
    device: str = "auto"             # auto (cuda -> mps -> cpu) | cpu | cuda | cuda:N | mps
    threads: int = 0                 # torch CPU threads (0 = torch's default)
    compile: bool = False            # torch.compile the training forward passes (sampling stays eager); pays off on a GPU, costs tens of seconds on a CPU
    save_every: int = 250            # checkpoint a stage (weights, optimizer, samplers' RNG states) every N steps; OPD also at every evaluation
    resume: bool = False             # continue every stage from its checkpoint in out_dir; a finished stage is not retrained
    dist_timeout: float = 300        # torchrun: seconds a process waits for the others in a collective before every process stops
    # --- task
    digits: int = 3                  # operands have 1..digits digits
    ops: str = "+-"                  # operators drawn uniformly from this subset of '+-*~' (~: the digits reversed, a second task)
    max_new_tokens: int = 64         # response budget when sampling (a 3-digit trace is about 40)
    # --- teacher
    t_layer: int = 4                 # teacher depth
    t_embd: int = 128                # teacher width
    t_head: int = 4                  # teacher heads
    t_steps: int = 2000              # teacher SFT steps
    t_lr: float = 3e-3               # teacher peak learning rate (warm-up, then cosine to 10 %)
    teacher_tokenizer: str = field(default="bytes", metadata={"choices": tuple(TOKENIZERS)})  # the teacher's tokenizer (recorded in teacher.pt): 'digits' reads 2- and 3-digit numbers as one token, and OPD then takes an xt_ objective
    naive_ids: bool = False          # stage opd with a teacher of another tokenizer: hand it the student's ids as its own (the mistake, to see it; never for real use)
    # --- student
    s_layer: int = 2                 # student depth
    s_embd: int = 64                 # student width
    s_head: int = 2                  # student heads
    s_steps: int = 4800              # cold-start SFT steps on teacher traces (0 = no cold start: random init)
    s_lr: float = 3e-3               # student peak learning rate
    s_pool: int = 3072               # teacher traces sampled once for the student's cold start (the student learns them all)
    s_digits: int = 0                # operands of the cold-start pool's problems have 1..s_digits digits (0 = digits)
    s_ops: str = "+99-"              # operators of the cold-start pool's problems, from --ops, each optionally followed by its weight: '+99-' draws 99 '+' for one '-' ('' = ops, equal weights)
    # --- optimisation and evaluation
    batch_size: int = 64             # sequences per SFT step (global under torchrun)
    eval_n: int = 500                # held-out problems per accuracy measured during training (OPD's evaluations every opd_eval_every steps)
    final_eval_n: int = 2000         # held-out problems per final accuracy (stage eval, the experiments' tables): +-1 point (one s.e.) at 80 %
    log_every: int = 100             # print a log line every this many SFT steps (0 = never)
    # --- on-policy distillation (stage opd)
    objectives: str = ""             # a Python file of your own objectives (@register, docs/extending.md), imported before --loss is read
    mask_tokens: str = ""            # comma-separated tokens left out of the loss, names or ids, e.g. '<|fmt|>,7'
    hide_from_teacher: str = ""      # comma-separated tokens (names or ids) removed from the teacher's contexts
    run_name: str = ""               # OPD outputs are opd_<run_name>.{pt,jsonl,json} (empty: the loss name)
    # --- self-distillation with privileged information (OPSD)
    mode: str = field(default="opd", metadata={"choices": ("opd", "opsd")})  # stage opd: opd (the teacher model scores) | opsd (the OPSD base with PI is its own teacher)
    pi: str = field(default="rule", metadata={"choices": PI_KINDS})  # OPSD: the teacher's PI: the answer or solution of this problem, or the shared rule
    live_teacher: bool = False       # OPSD: the teacher is the live weights, not a frozen step-0 copy (never differentiated)
    pi_steps: int = 1000             # stage pibase: SFT steps of the OPSD base on the PI mixture
    # --- the RLVR teacher (stage rlvr)
    teacher: str = field(default="sft", metadata={"choices": ("sft", "rlvr")})  # stage opd: the OPD teacher: teacher.pt (sft) or teacher_rlvr.pt (rlvr)
    rlvr_init: str = field(default="student", metadata={"choices": ("student", "teacher")})  # the RLVR teacher starts from the cold-started student or the SFT teacher

    def __post_init__(self):
        """Every setting is checked here, before anything runs; errors name the field."""
        stages = [s for s in self.stages.split(",") if s]
        if not stages or any(s not in STAGES for s in stages):
            raise ConfigError("stages", f"unknown stage(s) in {self.stages!r}; choose from {','.join(STAGES)}")
        for name in ("digits", "max_new_tokens", "t_steps", "batch_size", "eval_n", "final_eval_n", "s_pool", "pi_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("s_steps", "save_every", "threads", "log_every"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.s_digits <= self.digits:
            raise ConfigError("s_digits", f"must lie in 0..digits ({self.digits}; 0 = digits), got {self.s_digits}")
        if not self.ops or any(o not in OPS for o in self.ops):
            raise ConfigError("ops", f"must be a non-empty subset of {OPS!r}, got {self.ops!r}")
        try:
            pool_ops = weighted_ops(self.s_ops)
        except ValueError:
            pool_ops = None
        if pool_ops is None or any(o not in self.ops for o in pool_ops):
            raise ConfigError("s_ops", f"must be operators of --ops {self.ops!r}, each optionally followed by a count >= 1 "
                                       f"(e.g. '+99-'; '' = ops), got {self.s_ops!r}")
        for name in ("t_lr", "s_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, "must be > 0")
        for who in ("t", "s"):
            for part in ("layer", "embd", "head"):
                if getattr(self, f"{who}_{part}") < 1:
                    raise ConfigError(f"{who}_{part}", f"must be >= 1, got {getattr(self, f'{who}_{part}')}")
            if getattr(self, f"{who}_embd") % getattr(self, f"{who}_head"):
                raise ConfigError(f"{who}_embd", f"{getattr(self, f'{who}_embd')} is not divisible by --{who}_head "
                                  f"{getattr(self, f'{who}_head')}: pick a width that is a multiple of the heads")
        if self.max_new_tokens + 2 * self.digits + 4 > GPTConfig().block_size:  # <|bos|> a op b = \n, then the answer
            raise ConfigError("max_new_tokens", f"{self.max_new_tokens} and a {self.digits}-digit prompt do not fit "
                              f"the models' {GPTConfig().block_size} positions")
        if not self.dist_timeout > 0:
            raise ConfigError("dist_timeout", f"must be > 0 seconds, got {self.dist_timeout}")
        if any(c in self.run_name for c in "/\\ ") or self.run_name.startswith("."):
            raise ConfigError("run_name", f"becomes a file name: no '/', '\\', spaces or leading '.', got {self.run_name!r}")
        if (self.pi != "rule" or self.live_teacher) and self.mode != "opsd":
            raise ConfigError("pi" if self.pi != "rule" else "live_teacher", "configures self-distillation: add --mode opsd")
        if self.mode == "opsd" and self.teacher != "sft":
            raise ConfigError("teacher", "picks the OPD teacher model; with --mode opsd the teacher is the model itself with PI")
        check_cross_flags(self)  # the teacher's tokenizer against the other flags
        if self.mode == "opsd" and self.hide_from_teacher:
            raise ConfigError("hide_from_teacher", "works with --mode opd; with --mode opsd the teacher's context is the PI")
        if self.lmbda < 1 and (self.mode == "opsd" or self.hide_from_teacher):
            raise ConfigError("lmbda", "< 1 has the teacher sample rows; " + ("with --mode opsd the teacher is the student "
                              "with PI, and" if self.mode == "opsd" else "--hide_from_teacher changes how the teacher "
                              "scores, not how it would sample:") + " there is no teacher to sample from; use --lmbda 1")
        tok = get_tokenizer()
        options = objective_options(self, tok)
        token_list(self, "hide_from_teacher", tok)
        for name, value in options.items():  # each option alone first, so that the message names its flag
            try:
                check_objective(self.loss, {name: value}, tok.n_vocab)
            except ValueError as e:
                raise ConfigError(name, f"(with --loss {self.loss}): {e}") from None
        try:
            check_objective(self.loss, options, tok.n_vocab)
        except ValueError as e:
            raise ConfigError("loss", f"{self.loss}: {e}") from None
        OPDConfig.__post_init__(self)  # the library's checks of its own settings, named by their flags
        RLVRConfig.__post_init__(self)


PRESETS = {
    "cpu": {},  # the defaults above: about 9 min on a 2-core laptop (docs/experiments.md)
    "gpu": dict(t_layer=6, t_embd=256, t_head=8, t_steps=4000, s_layer=4, s_embd=128, s_head=4,
                s_steps=800, s_pool=4096, s_ops="", batch_size=128, digits=4, ops="+-*", max_new_tokens=96, eval_n=2000),
}


def parse_args(argv=None) -> TrainConfig:
    return parse_config(TrainConfig, argv, description=__doc__, presets=PRESETS,
                        preload={"objectives": load_objectives})


def token_list(cfg: TrainConfig, name: str, tok) -> list[int]:
    """The ids of a comma-separated token field (mask_tokens, hide_from_teacher)."""
    try:
        return token_ids(getattr(cfg, name), tok)
    except ValueError as e:
        raise ConfigError(name, str(e)) from None


def objective_options(cfg: TrainConfig, tok) -> dict:
    """The objective options set by flags, mask_tokens as ids; unset ones keep the objective's defaults."""
    return {**cfg.options, **({"mask_tokens": token_list(cfg, "mask_tokens", tok)} if cfg.mask_tokens else {})}


def opd_config(cfg: TrainConfig, loss: str, options: dict, seed: int) -> OPDConfig:
    return sub_config(OPDConfig, cfg, loss=loss, options=options, seed=seed)


def test_problems(cfg: TrainConfig, final: bool = False) -> list:
    """The held-out problems: eval_n during training, final_eval_n for final accuracies (final=True; its start is the other)."""
    return sample_problems(cfg.final_eval_n if final else cfg.eval_n, "test", cfg.seed, cfg.digits, cfg.ops)


def new_model(cfg: TrainConfig, who: str, tok, device) -> GPT:
    """A fresh GPT of the teacher's (who='t') or the student's ('s') shape."""
    return GPT(GPTConfig(vocab_size=tok.n_vocab, tokenizer=tok.name, n_layer=getattr(cfg, f"{who}_layer"),
                         n_embd=getattr(cfg, f"{who}_embd"), n_head=getattr(cfg, f"{who}_head"))).to(device)


def load_role(cfg: TrainConfig, role: str, tok, device, log=None, train=None) -> GPT:
    """<out_dir>/<role>.pt; when it is missing and train() is given, trained first. The teacher
    reads --teacher_tokenizer, every other role the tokenizer `tok`."""
    path, name = os.path.join(cfg.out_dir, f"{role}.pt"), cfg.teacher_tokenizer if role == "teacher" else tok.name
    if train is not None and not os.path.exists(path):
        log(f"no {role}.pt in out_dir: training it first")
        return train()
    return load_checkpoint(path, device, get_tokenizer(name).n_vocab, expect_tokenizer=name)[0]

# -----------------------------------------------------------------------------
# the stages


FLOPS = {}  # role -> the FlopCount of its stage (summary.json: <stage>_flops, <stage>_flops_given)


def sft(cfg: TrainConfig, model: GPT, role: str, batch, steps: int, lr: float, log, **kw) -> GPT:
    """SFT of `model` on batch(step), checkpointed to <out_dir>/<role>.pt (resumable), FLOPs counted in FLOPS[role]."""
    FLOPS[role] = FlopCount()
    train_sft(model, batch, steps, lr, get_tokenizer(model.config.tokenizer).pad_id, log_every=cfg.log_every, desc=role, log=log,
              ckpt_path=os.path.join(cfg.out_dir, f"{role}.pt"), save_every=cfg.save_every, resume=cfg.resume,
              extra={"role": role, "train": asdict(cfg)}, compile=cfg.compile, count=FLOPS[role], **kw)
    return model


def train_teacher(cfg: TrainConfig, tok, device, log) -> GPT:
    """SFT on gold traces of fresh training problems every step, read with --teacher_tokenizer."""
    seed_everything(cfg.seed)
    tok = get_tokenizer(cfg.teacher_tokenizer)
    model = new_model(cfg, "t", tok, device)
    log(f"teacher: {model.num_params():,} parameters, {cfg.t_steps} SFT steps on gold traces")
    problems = sample_problems(cfg.t_steps * cfg.batch_size, "train", cfg.seed, cfg.digits, cfg.ops)
    B = cfg.batch_size
    return sft(cfg, model, "teacher", lambda s: [encode_example(tok, p) for p in problems[s * B:(s + 1) * B]],
               cfg.t_steps, cfg.t_lr, log)


def teacher_traces(teacher: GPT, tok, cfg: TrainConfig) -> list[tuple[list[int], list[int]]]:
    """(prompt, response) pairs: the teacher's greedy answers to s_pool training prompts (the pool)."""
    return [(prompt, resp) for _, prompt, resp in teacher_pool(teacher, tok, cfg)]


@torch.no_grad()
def teacher_pool(teacher: GPT, tok, cfg: TrainConfig) -> list[tuple]:
    """(problem, prompt, response) triples in `tok`'s ids: the teacher's greedy answers to s_pool training
    prompts (re-read from its own tokenizer). Responses that hit the budget without <|eos|> are dropped."""
    problems = sample_problems(cfg.s_pool, "train", cfg.seed + 1, cfg.s_digits or cfg.digits,
                               weighted_ops(cfg.s_ops) or cfg.ops)
    ttok, pairs = get_tokenizer(teacher.config.tokenizer), []
    for i in range(0, len(problems), 256):
        ro = generate(teacher, [encode_example(ttok, p)[0] for p in problems[i:i + 256]], cfg.max_new_tokens,
                      ttok.eos_id, ttok.pad_id, temperature=0.0)
        for problem, resp in zip(problems[i:i + 256], ro.rows()):
            if resp and resp[-1] == ttok.eos_id:
                pairs.append((problem, encode_example(tok, problem)[0], retokenize(resp, ttok, tok)))
    if not pairs:
        raise ValueError(f"the teacher finished none of its {cfg.s_pool} cold-start traces with <|eos|> within "
                         f"--max_new_tokens {cfg.max_new_tokens}: it is undertrained (more --t_steps) or the "
                         f"budget is too small")
    return pairs


def train_student(cfg: TrainConfig, tok, device, teacher: GPT, log) -> GPT:
    """Cold start: a short SFT of the smaller model on the teacher's own traces."""
    seed_everything(cfg.seed + 1)
    model = new_model(cfg, "s", tok, device)
    log(f"student: {model.num_params():,} parameters, {cfg.s_steps} cold-start SFT steps on teacher traces")
    if cfg.s_steps == 0:
        if distributed.is_main():
            save_checkpoint(os.path.join(cfg.out_dir, "student.pt"), model, 0,
                            extra={"role": "student", "train": asdict(cfg)})
        return model
    pairs = teacher_traces(teacher, tok, cfg)
    log(f"student: {len(pairs)} teacher traces in the cold-start pool")
    g = torch.Generator().manual_seed(cfg.seed + 2)
    order = torch.randint(len(pairs), (cfg.s_steps, cfg.batch_size), generator=g)  # (steps, B): batches by step
    sft(cfg, model, "student", lambda s: [pairs[i] for i in order[s].tolist()], cfg.s_steps, cfg.s_lr, log)
    FLOPS["student"].add(0.0, pass_flops(teacher.config, *zip(*[(len(p), len(r)) for p, r in pairs])))  # the pool's sampling
    return model


def train_pi_base(cfg: TrainConfig, tok, device, log) -> GPT:
    """The OPSD base: a teacher-shaped GPT trained by SFT on a mixture (PI_MIX) of plain examples
    and examples with PI before the prompt (the answer, the solution, or the rule, whose examples
    write the answer reversed), so that the model uses PI when it has it."""
    seed_everything(cfg.seed + 4)
    model = new_model(cfg, "t", tok, device)
    log(f"pi-base: {model.num_params():,} parameters, {cfg.pi_steps} SFT steps on the mixture {PI_MIX}")
    problems = sample_problems(cfg.pi_steps * cfg.batch_size, "train", cfg.seed + 4, cfg.digits, cfg.ops)
    kinds = mixture_kinds(len(problems), PI_MIX, torch.Generator().manual_seed(cfg.seed + 4))
    B = cfg.batch_size
    batch = lambda s: [pi_example(tok, p, k) for p, k in zip(problems[s * B:(s + 1) * B], kinds[s * B:(s + 1) * B])]
    return sft(cfg, model, "pibase", batch, cfg.pi_steps, cfg.t_lr, log)


def run_opd(cfg: TrainConfig, tok, teacher: GPT, student: GPT, log) -> tuple[str, dict]:
    """Stage opd: one OPD run of the student (in place) with the objective the flags chose.
    Returns the run's name and its summary's main figures."""
    name = cfg.run_name or cfg.loss
    options = objective_options(cfg, tok)
    hide = token_list(cfg, "hide_from_teacher", tok)
    track = options.get("mask_tokens", hide)
    final = test_problems(cfg, final=True)
    start_acc = evaluate(student, tok, final, 0.0, cfg.max_new_tokens)
    xt = {"teacher_tokenizer": cfg.teacher_tokenizer, "naive_ids": cfg.naive_ids} if cfg.teacher_tokenizer != tok.name else {}
    s = train_opd(student, teacher, tok, opd_config(cfg, cfg.loss, options, cfg.seed),
                  os.path.join(cfg.out_dir, f"opd_{name}"), test_problems(cfg), log, name,
                  teacher_score=HiddenTokens(hide) if hide else teacher_scorer(tok, teacher, cfg.naive_ids),
                  extra_stats=TrackedTokens(track) if track else None,
                  save_every=cfg.save_every, resume=cfg.resume, compile=cfg.compile,
                  settings={"mode": "opd", "teacher": cfg.teacher, "eval_n": cfg.eval_n, "hide": hide, **xt},
                  teacher_pool=teacher_pool(teacher, tok, cfg) if cfg.lmbda < 1 and cfg.teacher_rows == "pool" else None)
    s.update(start_acc_train=s["start_acc"], final_acc_train=s["final_acc"], start_acc=start_acc,
             final_acc=evaluate(student, tok, final, 0.0, cfg.max_new_tokens))  # the final ones on final_eval_n
    log(f"opd {name}: held-out greedy accuracy {s['start_acc']:.1%} -> {s['final_acc']:.1%} (n={len(final)}) | "
        f"reverse KL {s['first_kl']:.3f} -> {s['final_kl']:.3f} | degraded: {s['degraded'] or 'no'}")
    return name, {k: s[k] for k in ("start_acc", "final_acc", "start_acc_train", "final_acc_train", "first_kl",
                                    "final_kl", "final_response_length", "final_overlap_ratio", "degraded", "seconds",
                                    "flops", "flops_given")}


def rule_problems(cfg: TrainConfig) -> list:
    """The held-out problems whose answer is not a palindrome (there the rule is visible)."""
    return [p for p in test_problems(cfg) if rule_visible(p)]


def opsd_run(cfg: TrainConfig, tok, base: GPT, kind: str, seed: int, prefix: str, log, name: str,
             start: tuple[float, float] | None = None, print_every: int = 1, save_every: int = 0,
             resume: bool = False) -> dict:
    """One OPSD run from a copy of `base`: the OPD loop, with the teacher = the same network (frozen
    step-0 copy, or live) scoring the student's samples under PI `kind`, evaluated on rule_problems."""
    problems = rule_problems(cfg)
    start = start or distributed.from_main(lambda: pi_scores(base, tok, problems, cfg.max_new_tokens))
    student = copy.deepcopy(base)
    teacher = self_teacher(student, live=cfg.live_teacher)
    s = train_opd(student, teacher, tok, opd_config(cfg, cfg.loss, objective_options(cfg, tok), seed), prefix,
                  problems, log, name, start_acc=start[0], print_every=print_every,
                  teacher_score=PrivilegedTeacher(tok, kind), save_every=save_every,
                  resume=resume, compile=cfg.compile,
                  settings={"mode": "opsd", "pi": kind, "live_teacher": cfg.live_teacher, "eval_n": cfg.eval_n})
    acc, rule = distributed.from_main(lambda: pi_scores(student, tok, problems, cfg.max_new_tokens))
    log(f"{name}: without PI, held-out accuracy {start[0]:.1%} -> {acc:.1%} | rule-following {start[1]:.1%} -> "
        f"{rule:.1%} | reverse KL to the PI teacher {s['first_kl']:.3f} -> {s['final_kl']:.3f}")
    return {"pi": kind, "seed": seed, **s, "final_acc": acc, "start_rule": start[1], "final_rule": rule}


def train_rlvr_teacher(cfg: TrainConfig, tok, teacher: GPT, student: GPT, seed: int, path: str, log,
                       resume: bool = False) -> GPT:
    """An RLVR-adapted teacher: a copy of the student (or of the SFT teacher, --rlvr_init) trained
    with group-normalised REINFORCE and the verifier as reward; with --rlvr_cut > 0 its contexts
    are the student's samples cut at random fractions. Checkpointed to `path` (resumable)."""
    model = copy.deepcopy(student if cfg.rlvr_init == "student" else teacher).train().requires_grad_(True)
    rcfg = sub_config(RLVRConfig, cfg, seed=seed)
    log(f"rlvr: from the {cfg.rlvr_init}, {rcfg.rlvr_steps} steps x {rcfg.rlvr_prompts} problems x {rcfg.rlvr_group} "
        f"samples, lr {rcfg.rlvr_lr}, contexts "
        f"{'prompts' if rcfg.rlvr_cut == 0 else f'student samples cut at U[0, {rcfg.rlvr_cut}]'}")
    records = train_rlvr(model, tok, rcfg, student=student, log=log, jsonl_path=path[:-3] + ".jsonl", ckpt_path=path,
                         save_every=cfg.save_every, resume=resume, extra={"role": "teacher_rlvr", "train": asdict(cfg)},
                         settings={"init": cfg.rlvr_init}, compile=cfg.compile)
    FLOPS["rlvr"] = FlopCount().add(sum(r["flops"] for r in records))
    return model

# -----------------------------------------------------------------------------
# main


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    dist_info, device, tok, log, summary = start(cfg)
    models = {}
    get = lambda role: models.get(role) or load_role(cfg, role, tok, device)
    for stage in cfg.stages.split(","):
        t0 = time.time()
        if stage == "teacher":
            models["teacher"] = train_teacher(cfg, tok, device, log)
        elif stage == "student":
            models["student"] = train_student(cfg, tok, device, get("teacher"), log)
        elif stage == "eval" and dist_info.is_main:  # rank 0 evaluates; the others wait at the barrier below
            test = test_problems(cfg, final=True)
            for role in ("teacher", "student"):
                model = get(role)
                mtok = get_tokenizer(model.config.tokenizer)  # the teacher may read another tokenizer
                greedy, texts = evaluate(model, mtok, test, 0.0, cfg.max_new_tokens, return_texts=True)
                sampled = evaluate(model, mtok, test, 1.0, cfg.max_new_tokens, seed=cfg.seed)
                summary[f"{role}_acc_greedy"], summary[f"{role}_acc_sampled"] = greedy, sampled
                log(f"eval {role}: held-out accuracy greedy {greedy:.1%} | sampled (T=1) {sampled:.1%} | n={len(test)}")
                if len(cfg.ops) > 1:
                    summary[f"{role}_acc_greedy_by_op"] = by_op = accuracy_by_op(test, texts)
                    log(f"eval {role}: greedy by operator " + " | ".join(f"{o} {a:.1%}" for o, a in by_op.items()))
        elif stage == "pibase":
            models["pibase"] = train_pi_base(cfg, tok, device, log)
        elif stage == "rlvr":
            models["teacher_rlvr"] = train_rlvr_teacher(cfg, tok, get("teacher"), get("student"), cfg.seed,
                                                        os.path.join(cfg.out_dir, "teacher_rlvr.pt"), log, cfg.resume)
        elif stage == "opd" and cfg.mode == "opsd":
            name = cfg.run_name or f"opsd_{cfg.pi}"
            r = opsd_run(cfg, tok, get("pibase"), cfg.pi, cfg.seed, os.path.join(cfg.out_dir, f"opd_{name}"), log,
                         name, save_every=cfg.save_every, resume=cfg.resume)
            summary[f"opd_{name}"] = {k: r[k] for k in ("start_acc", "final_acc", "start_rule", "final_rule",
                                                        "first_kl", "final_kl", "seconds")}
        elif stage == "opd":
            teacher = get({"sft": "teacher", "rlvr": "teacher_rlvr"}[cfg.teacher])
            student = copy.deepcopy(models["student"]) if "student" in models else get("student")
            name, result = run_opd(cfg, tok, teacher, student, log)
            summary[f"opd_{name}"] = result
        if stage in FLOPS:
            summary[f"{stage}_flops"], summary[f"{stage}_flops_given"] = FLOPS[stage].charged, FLOPS[stage].given
        distributed.barrier()  # ranks start the next stage together (rank 0 may still be saving)
        summary[f"{stage}_seconds"] = round(time.time() - t0, 1)
        log(f"stage {stage} done in {summary[f'{stage}_seconds']:.1f}s")
    return finish(cfg, summary, device, log)


if __name__ == "__main__":
    cli(main)
