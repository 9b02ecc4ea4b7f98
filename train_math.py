"""
train_math.py: synthetic math, from scratch to a teacher and a cold-start student.

  stage `teacher`: SFT of a GPT on gold step-by-step traces                   -> <out_dir>/teacher.pt
  stage `student`: cold start, a short SFT of a smaller GPT on traces sampled
                   from the teacher (its "thinking pattern")                   -> <out_dir>/student.pt
  stage `eval`:    greedy and sampled accuracy of both on held-out problems    -> <out_dir>/summary.json

Commands
  CPU laptop (default preset, a few minutes on 2 cores):   python train_math.py
  one GPU (wider models, more steps):                      python train_math.py --preset gpu
  only evaluate existing checkpoints:                      python train_math.py --stages eval
  every flag, explained:                                   python train_math.py --help

Every run writes its checkpoints (weights + config + step, written atomically) and a summary.json
with accuracies and wall times to --out_dir; a later stage loads the checkpoints an earlier run left.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch

from nanoopd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nanoopd.device import pick_device, seed_everything
from nanoopd.evaluate import evaluate
from nanoopd.model import GPT, GPTConfig
from nanoopd.rollout import generate
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
    # task
    digits: int = 3                  # operands have 1..digits digits
    ops: str = "+-"                  # operators drawn uniformly from this set (subset of +-*)
    max_new_tokens: int = 64         # response budget when sampling (a 3-digit trace is about 40)
    # teacher
    t_layer: int = 4                 # teacher depth
    t_embd: int = 128                # teacher width
    t_head: int = 4                  # teacher heads
    t_steps: int = 1500              # teacher SFT steps
    t_lr: float = 3e-3               # teacher peak learning rate (warm-up, then cosine to 10 %)
    # student
    s_layer: int = 2                 # student depth
    s_embd: int = 64                 # student width
    s_head: int = 2                  # student heads
    s_steps: int = 300               # cold-start SFT steps (0 = no cold start: random init)
    s_lr: float = 3e-3               # student peak learning rate
    s_pool: int = 4096               # teacher traces sampled once for the student's cold start
    # shared
    batch_size: int = 64             # sequences per optimizer step
    eval_n: int = 500                # held-out problems per accuracy
    log_every: int = 100             # print a log line every this many SFT steps


PRESETS = {
    "cpu": {},  # the defaults above: a few minutes on a 2-core laptop
    "gpu": dict(t_layer=6, t_embd=256, t_head=8, t_steps=4000, s_layer=4, s_embd=128, s_head=4,
                s_steps=800, batch_size=128, digits=4, ops="+-*", max_new_tokens=96, eval_n=2000),
}
STAGES = ("teacher", "student", "eval")

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
    g = p.add_argument_group("task")
    g.add_argument("--digits", type=int, help="operands have 1..digits digits (default 3)")
    g.add_argument("--ops", help="operators to draw from, a subset of '+-*' (default '+-')")
    g.add_argument("--max_new_tokens", type=int, help="response budget when sampling (default 64)")
    g = p.add_argument_group("teacher")
    g.add_argument("--t_layer", type=int, help="teacher layers (default 4)")
    g.add_argument("--t_embd", type=int, help="teacher width (default 128)")
    g.add_argument("--t_head", type=int, help="teacher attention heads (default 4)")
    g.add_argument("--t_steps", type=int, help="teacher SFT steps (default 1500)")
    g.add_argument("--t_lr", type=float, help="teacher peak learning rate (default 3e-3)")
    g = p.add_argument_group("student")
    g.add_argument("--s_layer", type=int, help="student layers (default 2)")
    g.add_argument("--s_embd", type=int, help="student width (default 64)")
    g.add_argument("--s_head", type=int, help="student attention heads (default 2)")
    g.add_argument("--s_steps", type=int, help="cold-start SFT steps on teacher traces; 0 = none (default 300)")
    g.add_argument("--s_lr", type=float, help="student peak learning rate (default 3e-3)")
    g.add_argument("--s_pool", type=int, help="number of teacher traces sampled for the cold start (default 4096)")
    g = p.add_argument_group("optimisation and evaluation")
    g.add_argument("--batch_size", type=int, help="sequences per step (default 64)")
    g.add_argument("--eval_n", type=int, help="held-out problems per accuracy (default 500)")
    g.add_argument("--log_every", type=int, help="SFT log line every N steps (default 100)")
    args = p.parse_args(argv)

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
    if cfg.s_steps < 0:
        raise ValueError(f"--s_steps must be >= 0, got {cfg.s_steps}")
    if not cfg.ops or any(o not in "+-*" for o in cfg.ops):
        raise ValueError(f"--ops must be a non-empty subset of '+-*', got {cfg.ops!r}")
    for name in ("t_lr", "s_lr"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"--{name} must be > 0")
    for who in ("t", "s"):
        GPTConfig(n_layer=getattr(cfg, f"{who}_layer"), n_embd=getattr(cfg, f"{who}_embd"),
                  n_head=getattr(cfg, f"{who}_head"))  # raises a clear error on a bad shape


# -----------------------------------------------------------------------------
# the stages


def train_teacher(cfg: TrainConfig, tok, device, log) -> GPT:
    """SFT on gold traces of fresh training problems every step."""
    seed_everything(cfg.seed)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, n_layer=cfg.t_layer, n_embd=cfg.t_embd, n_head=cfg.t_head)).to(device)
    log(f"teacher: {model.num_params():,} parameters, {cfg.t_steps} SFT steps on gold traces")
    problems = sample_problems(cfg.t_steps * cfg.batch_size, "train", cfg.seed, cfg.digits, cfg.ops)
    batch = lambda s: [encode_example(tok, p) for p in problems[s * cfg.batch_size:(s + 1) * cfg.batch_size]]
    train_sft(model, batch, cfg.t_steps, cfg.t_lr, tok.pad_id, log_every=cfg.log_every, desc="teacher", log=log)
    save_checkpoint(os.path.join(cfg.out_dir, "teacher.pt"), model, cfg.t_steps, extra={"role": "teacher", "train": asdict(cfg)})
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
        g = torch.Generator().manual_seed(cfg.seed + 2)
        batch = lambda s: [pairs[i] for i in torch.randint(len(pairs), (cfg.batch_size,), generator=g).tolist()]
        train_sft(model, batch, cfg.s_steps, cfg.s_lr, tok.pad_id, log_every=cfg.log_every, desc="student", log=log)
    save_checkpoint(os.path.join(cfg.out_dir, "student.pt"), model, cfg.s_steps, extra={"role": "student", "train": asdict(cfg)})
    return model


def load_role(cfg: TrainConfig, role: str, tok, device) -> GPT:
    path = os.path.join(cfg.out_dir, f"{role}.pt")
    model, _ = load_checkpoint(path, device, expect_vocab=tok.n_vocab)
    return model


# -----------------------------------------------------------------------------
# main


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    tok = get_tokenizer()
    os.makedirs(cfg.out_dir, exist_ok=True)
    summary_path = os.path.join(cfg.out_dir, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    log_file = open(os.path.join(cfg.out_dir, "log.txt"), "a")

    def log(msg: str):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    log(f"device {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | config {json.dumps(asdict(cfg))}")
    models = {}
    for stage in cfg.stages.split(","):
        t0 = time.time()
        if stage == "teacher":
            models["teacher"] = train_teacher(cfg, tok, device, log)
        elif stage == "student":
            teacher = models.get("teacher") or load_role(cfg, "teacher", tok, device)
            models["student"] = train_student(cfg, tok, device, teacher, log)
        elif stage == "eval":
            test = sample_problems(cfg.eval_n, "test", cfg.seed, cfg.digits, cfg.ops)
            for role in ("teacher", "student"):
                model = models.get(role) or load_role(cfg, role, tok, device)
                greedy = evaluate(model, tok, test, 0.0, cfg.max_new_tokens)
                sampled = evaluate(model, tok, test, 1.0, cfg.max_new_tokens, seed=cfg.seed)
                summary[f"{role}_acc_greedy"], summary[f"{role}_acc_sampled"] = greedy, sampled
                log(f"eval {role}: held-out accuracy greedy {greedy:.1%} | sampled (T=1) {sampled:.1%} | n={len(test)}")
        summary[f"{stage}_seconds"] = round(time.time() - t0, 1)
        log(f"stage {stage} done in {summary[f'{stage}_seconds']:.1f}s")
    summary["device"], summary["config"] = str(device), asdict(cfg)
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
    log(f"summary written to {summary_path}")
    return summary


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, FloatingPointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
