"""
On-policy distillation (OPD): one training step, and the loop that repeats it.

Notation (docs/design.md#notation): student pi_theta, frozen teacher q, prompt x, response y sampled
from the student, prefix c_t = (x, y_<t), per-token cost r_t = log pi(y_t|c_t) - log q(y_t|c_t). One step:

    1. x_1..x_B ~ training prompts;   y_i ~ pi_theta(.|x_i)    rollout: temperature, top-p, top-k,
                                                               at most N new tokens, seeded
    2. q(.|c_t) at every response position, no gradient      (the teacher scores the same tokens)
    3. pi_theta(.|c_t) at the same positions, with gradient
    4. loss, stats = OBJECTIVES[name](pi logits, q logits, y, mask, **options)
                     (docs/design.md#the-objectives; mask = the response mask, EOS included)
    5. theta <- AdamW(theta, g / max(1, ||g|| / clip)),   g = grad loss      (loop.update;
       learning rate: linear warm-up, then cosine to 10 %, loop.lr_at)

Sampled-token OPD and g_gamma estimate grad KL(pi || q) only when y ~ pi itself (temperature 1, no
top-p or top-k; other settings follow the gradient under the sampler, and the run says so). A
non-finite loss or gradient stops the run before the update, naming the step (train_opd).

Every step appends one JSON object to <run>.jsonl: its loss, the diagnostics of docs/design.md#diagnostics,
its FLOPs and timings (the keys: nanoopd/step_record.py). GKD's lmbda < 1 has the teacher write a
share of the rows (nanoopd/mixed_batch.py); lmbda = 1 is the loop above, bit for bit.
"""

import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from nanoopd import distributed
from nanoopd.config import ConfigError
from nanoopd.cross_teacher import check_teacher
from nanoopd.device import PhaseClock, autocast
from nanoopd.evaluate import accuracy_by_op, evaluate, without_eos
from nanoopd.flops import FlopCount, check_budget, opd_step_flops
from nanoopd.loop import (JsonlLog, adamw, can_resume, loss_scale, lr_at, resume_run_state, save_run_state,
                          set_lr, update)
from nanoopd.mixed_batch import TEACHER_ROWS, TeacherRows, merge, student_share
from nanoopd.model import GPT
from nanoopd.objectives import OBJECTIVES, SPECS, get_objective, option_flags
from nanoopd.report import format_record, summarize_records
from nanoopd.rollout import Rollout, check_sampling_args, generate, response_logits
from nanoopd.step_record import step_record
from nanoopd.tasks import Problem, encode_example, sample_problems, verify
from nanoopd.tokenizer import Tokenizer


@dataclass
class OPDConfig:
    # --- on-policy distillation (stage opd)
    loss: str = field(default="sampled_token", metadata={"choices": lambda: sorted(OBJECTIVES)})  # the objective (nanoopd/objectives.py)
    options: dict = field(default_factory=dict, metadata={"flags": option_flags})  # the objective's options (a flag each below, generated from the registry; mask_tokens as ids)
    opd_steps: int = 200             # OPD optimizer steps
    opd_lr: float = 3e-4             # OPD AdamW peak learning rate
    opd_warmup: int = 10             # OPD linear warm-up steps, then cosine decay to 10 % of opd_lr
    opd_batch: int = 64              # student rollouts (prompts) per OPD step (global under torchrun)
    temperature: float = 1.0         # rollout temperature (> 0); OPD estimates grad KL(pi || q) only at 1
    top_p: float = 1.0               # rollout nucleus mass in (0, 1] (1 = off)
    top_k: int = 0                   # rollout top-k (0 = off)
    max_new_tokens: int = 64         # response budget N
    grad_clip: float = 1.0           # clip the total gradient norm to this (OPD and RLVR)
    opd_eval_every: int = 50         # held-out greedy accuracy and a checkpoint every N OPD steps (0 = start and end only)
    seed: int = 0                    # seeds the prompts and the rollout sampler
    digits: int = 3                  # training prompts: operands of 1..digits digits
    ops: str = "+-"                  # training prompts: operators
    diag_k: int = 16                 # k of the top-K overlap diagnostics in the OPD log
    cuda_graph: bool = True          # on CUDA, replay the rollout's decoding step as a CUDA graph (False: eager)
    lmbda: float = 1.0               # GKD's lambda: the share of each step's rows the student samples (1 = on-policy; 0 = teacher sequences only)
    teacher_rows: str = field(default="fresh", metadata={"choices": TEACHER_ROWS})  # lmbda < 1: the teacher's rows are sampled now for the step's prompts (fresh) or taken from the cold-start pool of teacher traces (pool)
    opd_flops: float = 0.0           # stop OPD at the first step whose running FLOPs (teacher sampling charged) reach this (0 = off: opd_steps steps)

    def __post_init__(self):
        """Each message starts with the field's name, so that a command line can name its flag."""
        get_objective(self.loss)  # unknown names fail here, with the list of valid ones
        check_sampling_args(self.temperature, self.top_k, self.top_p, self.max_new_tokens)
        if self.temperature == 0:
            raise ConfigError("temperature", "must be > 0: OPD trains on the student's samples")
        for names, bad, need in ((("opd_steps", "opd_batch", "diag_k"), lambda v: v < 1, ">= 1"),
                                 (("opd_eval_every", "opd_warmup"), lambda v: v < 0, ">= 0"),
                                 (("opd_lr", "grad_clip"), lambda v: not v > 0, "> 0")):
            for name in (n for n in names if bad(getattr(self, n))):
                raise ConfigError(name, f"must be {need}, got {getattr(self, name)}")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ConfigError("lmbda", f"must lie in [0, 1] (the student's share of each batch), got {self.lmbda}")
        if self.teacher_rows not in TEACHER_ROWS:
            raise ConfigError("teacher_rows", f"must be one of {', '.join(TEACHER_ROWS)}, got {self.teacher_rows!r}")
        if not self.opd_flops >= 0:
            raise ConfigError("opd_flops", f"must be >= 0 (0 = off), got {self.opd_flops}")


def freeze(model: GPT) -> GPT:
    """The teacher: eval mode, no parameter ever requires a gradient."""
    return model.eval().requires_grad_(False)


def plain_scores(teacher: GPT, rollout: Rollout, problems=None) -> torch.Tensor:
    """The teacher's logits (B, N, V) at the positions that predict each response token."""
    return response_logits(teacher, rollout)


def opd_step(student: GPT, teacher: GPT, optimizer: torch.optim.Optimizer, tok: Tokenizer,
             problems: list[Problem], cfg: OPDConfig, generator: torch.Generator,
             step: int, teacher_score=None, extra_stats=None, teacher_rows: TeacherRows | None = None) -> dict:
    """One on-policy distillation step on `problems` (one rollout each): the five steps of the
    module docstring. Returns the step record (nanoopd/step_record.py, without eval_acc). The
    teacher must be frozen (or be the student itself, scored without gradient). At cfg.lmbda < 1
    the last rows are the teacher's (teacher_rows: fresh samples, or a pool; nanoopd/mixed_batch.py).

    Hooks: teacher_score(teacher, rollout, problems) -> logits (B, N, V) replaces plain_scores, to
    give the teacher another context for the same tokens (self_distill.PrivilegedTeacher,
    special_tokens.HiddenTokens), or (logits, the objective's extra inputs) for a teacher of
    another tokenizer (cross_teacher.CrossTokenizerTeacher); extra_stats(student_logits, teacher_logits, rollout) -> dict adds
    figures to the record (special_tokens.TrackedTokens).

    Under torchrun `student` is the DDP-wrapped model and `problems` this rank's share of the
    global batch. The loss each rank differentiates is scaled so that DDP's gradient average is
    exactly the gradient of the per-token loss over the whole global batch
    (distributed.global_token_scale; the factor is 1 in one process). The record is then that
    of the global batch (distributed.reduce_record): summed token counts, FLOPs and throughput, the
    max of maxima and timings, and means weighted by each rank's rows (per-response figures) or
    response tokens (the loss: loss tokens; every other per-token figure)."""
    model = distributed.bare(student)  # the GPT itself: sampling needs no gradient sync
    device = next(model.parameters()).device
    objective = get_objective(cfg.loss)
    clock = PhaseClock(device)
    # 1. the student samples its own responses (at lmbda < 1, the teacher writes the last B - S rows)
    S = student_share(cfg.lmbda, len(problems))
    prompts = [encode_example(tok, p)[0] for p in problems]
    ro = generate(model, prompts[:S], cfg.max_new_tokens, tok.eos_id, tok.pad_id, temperature=cfg.temperature,
                  top_k=cfg.top_k, top_p=cfg.top_p, generator=generator, cuda_graph_replay=cfg.cuda_graph) if S else None
    charged = []
    if S < len(problems):
        rank, world = distributed.rank_and_world()
        t_ro, t_prompts, t_problems, charged = (teacher_rows or TeacherRows("fresh"))(
            teacher, prompts[S:], problems[S:], (step * world + rank) * (len(problems) - S), cfg, tok, generator)
        prompts, problems = prompts[:S] + t_prompts, problems[:S] + t_problems
        ro = merge([ro, t_ro], tok.pad_id)
    clock.mark()
    # 2. the teacher scores every response token, without gradient
    with torch.no_grad(), autocast(device):
        scores = (teacher_score or plain_scores)(teacher, ro, problems)  # (B, N, V), or with the objective's inputs
        teacher_logits, inputs = (scores[0].float(), scores[1]) if isinstance(scores, tuple) else (scores.float(), {})
        teacher_logp = torch.log_softmax(teacher_logits, dim=-1)  # (B, N, V) the step's one log-softmax of q
    clock.mark()
    # 3. the student scores the same positions, with gradient
    student.train()
    with autocast(device):
        student_logits = response_logits(student, ro).float()  # (B, N, V)
    student_logp = torch.log_softmax(student_logits, dim=-1)  # (B, N, V) the step's one log-softmax of pi
    # 4. the objective, on the shared log-softmaxes (its stats stay on the device)
    loss, stats = objective(student_logits, teacher_logits, ro.response, ro.response_mask,
                            logp=(student_logp, teacher_logp), **cfg.options, **inputs)
    scale = loss_scale(loss, stats["n_tokens"], f"OPD step {step} ({cfg.loss!r})")  # 1.0 in one process
    # 5. the update
    gnorm = update(student, optimizer, loss * scale, cfg.grad_clip, f"OPD step {step} ({cfg.loss!r})")
    clock.mark()
    rows = ro.rows()  # one transfer: the verifier's texts and the FLOPs' lengths
    rewards = [verify(tok.decode(without_eos(ids, tok.eos_id)), p) for ids, p in zip(rows, problems)]
    p_len, n_len = [len(p) for p in prompts], [len(r) for r in rows]
    flops = opd_step_flops(model.config, teacher.config, (p_len[:S], n_len[:S]), (p_len[S:], n_len[S:]),
                           ([p for p, c in zip(p_len[S:], charged) if c], [n for n, c in zip(n_len[S:], charged) if c]),
                           scored=SPECS[cfg.loss].uses_teacher)
    return step_record(step, S, ro, (student_logits, teacher_logits), (student_logp, teacher_logp), stats, rewards,
                       cfg, tok, gnorm, clock.seconds(), flops,
                       extra_stats(student_logits, teacher_logits, ro) if extra_stats else {})


def train_opd(student: GPT, teacher: GPT, tok: Tokenizer, cfg: OPDConfig, run_prefix: str,
              eval_problems: list[Problem], log=print, name: str | None = None,
              start_acc: float | None = None, print_every: int = 1, teacher_score=None, extra_stats=None,
              save_every: int = 0, resume: bool = False, settings: dict | None = None,
              compile: bool = False, teacher_pool: list | None = None, train_problems: list | None = None) -> dict:
    """Distil `teacher` into `student` (in place) for cfg.opd_steps steps. teacher may be `student`
    itself (live self-distillation: it scores without gradient, unfrozen); teacher_score and
    extra_stats go to opd_step; compile=True compiles the student's training forward passes;
    teacher_pool: the (problem, prompt ids, response ids) traces of cfg.teacher_rows = 'pool';
    train_problems: the steps' prompts in order, opd_steps x opd_batch (default: fresh, drawn with cfg.seed).

    Writes <run_prefix>.jsonl (one record per step), <run_prefix>.pt and <run_prefix>.json (the
    summary, also returned). Held-out greedy accuracy is measured on `eval_problems` at the start
    (unless `start_acc` is given: the same student was already evaluated), every cfg.opd_eval_every
    steps, and at the end: summary["evals"] holds [step, accuracy, FLOPs charged, FLOPs given] and
    summary["evals_by_task"] [step, {task: accuracy}] (tasks.TASKS; not at the start if given). With
    cfg.opd_flops > 0 the run ends after the step whose FLOPs reach that budget. A non-finite loss
    or gradient writes the summary with its `error` and re-raises the FloatingPointError.

    The checkpoint <run_prefix>.pt holds the weights, the optimizer state, every rank's RNG states
    and the records so far; it is written atomically at every evaluation, every `save_every` steps
    (0: only at evaluations) and at the end. With resume=True and a checkpoint there, written by a
    run with the same OPDConfig, the same `settings` (what else defines the run for the caller:
    the teacher, the evaluation set, ...) and the same number of processes, training continues from
    its step and ends where an uninterrupted run ends (prompts and learning rates are functions of
    the step; the sampler's state is restored).

    Under torchrun every rank calls this with the same arguments: each samples and scores its
    share of every global batch of cfg.opd_batch prompts with its own generator
    (distributed.rank_seed), gradients are averaged by DDP (see opd_step), rank 0 evaluates, logs
    and writes files.
    """
    check_teacher(student, teacher, teacher_score, cfg.loss)  # one tokenizer, or a cross-tokenizer scorer
    if student.config.vocab_size != tok.n_vocab:
        raise ValueError(f"the models have {student.config.vocab_size} tokens, the tokenizer "
                         f"{tok.n_vocab}: retrain them with this tokenizer")
    if cfg.lmbda < 1 and (teacher is student or teacher_score is not None):
        raise ConfigError("lmbda", "< 1 has the teacher sample rows, but this run's teacher "
                          + ("is the student itself" if teacher is student else "scores through a hook (privileged "
                             "information or hidden tokens) that changes how it scores, not how it would sample")
                          + ": there is no teacher to sample from; use --lmbda 1")
    rank, world = distributed.rank_and_world()
    distributed.check_shardable(cfg.opd_batch, world, "an OPD batch", "prompts", "--opd_batch")
    rows = TeacherRows(cfg.teacher_rows, teacher_pool, cfg.seed) if cfg.lmbda < 1 else None
    name, device = name or cfg.loss, next(student.parameters()).device
    if teacher is not student:
        freeze(teacher)
    optimizer = adamw(student, cfg.opd_lr)
    problems = train_problems or sample_problems(cfg.opd_steps * cfg.opd_batch, "train", cfg.seed, cfg.digits, cfg.ops)
    if len(problems) < cfg.opd_steps * cfg.opd_batch:
        raise ValueError(f"{len(problems)} training prompts for {cfg.opd_steps} steps x {cfg.opd_batch}: pass them all")
    S, p = student_share(cfg.lmbda, cfg.opd_batch), [len(encode_example(tok, q)[0]) for q in problems[:cfg.opd_batch]]
    check_budget(cfg.opd_flops, "opd_flops", sum(opd_step_flops(  # the first step, were every response one token
        student.config, teacher.config, (p[:S], [1] * S), (p[S:], [1] * (len(p) - S)), scored=SPECS[cfg.loss].uses_teacher)))
    generator = torch.Generator(device=device).manual_seed(distributed.rank_seed(cfg.seed))
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(run_prefix)), exist_ok=True)
    ckpt_path = run_prefix + ".pt"
    run_settings = {**asdict(cfg), **(settings or {})}  # what a resume must match
    def held_out(step: int) -> float:  # the accuracy; by task family in summary["evals_by_task"]
        acc, texts = distributed.from_main(lambda: evaluate(student, tok, eval_problems, 0, cfg.max_new_tokens,
                                                            return_texts=True))
        summary.setdefault("evals_by_task", []).append([step, accuracy_by_op(eval_problems, texts, by="task")])
        return acc
    records, first, elapsed = [], 0, 0.0
    if can_resume(resume, ckpt_path):
        first, state = resume_run_state(ckpt_path, student, optimizer, generator, "opd", run_settings)
        records, summary, elapsed = state["records"], dict(state["summary"], error=None), state["elapsed"]
        count = FlopCount(sum(r["flops"] for r in records), sum(r["flops_given"] for r in records))
        log(f"opd {name}: resuming from '{ckpt_path}' at step {first}/{cfg.opd_steps}")
    else:
        summary = {"name": name, "config": asdict(cfg), "error": None, "last_good_checkpoint": None}
        start_acc = held_out(0) if start_acc is None else start_acc
        summary.update(start_acc=start_acc, evals=[[0, start_acc, 0.0, 0.0]])
        count = FlopCount()
    log(f"opd {name}: {cfg.opd_steps} steps of {cfg.loss} {cfg.options or ''} | lr {cfg.opd_lr} | "
        f"batch {cfg.opd_batch}{f' over {world} processes' if world > 1 else ''} | T={cfg.temperature} "
        f"top_p={cfg.top_p} top_k={cfg.top_k} | held-out greedy accuracy at start {summary['start_acc']:.1%} "
        f"(n={len(eval_problems)})")
    if cfg.temperature != 1.0 or cfg.top_p < 1.0 or 0 < cfg.top_k < student.config.vocab_size:
        log(f"opd {name}: note: rollouts are sampled at T={cfg.temperature} top_p={cfg.top_p} top_k={cfg.top_k}, not from "
            f"pi itself: sampled-token OPD and g_gamma follow the gradient under that sampler, not grad KL(pi || q)")
    if cfg.lmbda < 1 and SPECS[cfg.loss].on_policy:
        log(f"opd {name}: note: {cfg.loss} assumes y ~ pi; on the teacher's rows ({1 - cfg.lmbda:g} of each batch) it "
            f"estimates another gradient; the full-distribution objectives are exact there")
    ddp_student = distributed.wrap(student, device, compile)  # the student itself in one process, uncompiled
    t_start = time.time()

    def save(step: int) -> None:  # every rank takes part: their RNG states are gathered
        summary["last_good_checkpoint"] = ckpt_path
        save_run_state(ckpt_path, student, step, optimizer, generator, {"role": "opd", "name": name, "opd": run_settings},
                       {"records": records, "summary": summary, "elapsed": elapsed + time.time() - t_start})

    with JsonlLog(run_prefix + ".jsonl", kept=records) as jsonl:  # a resumed run rewrites the steps it keeps
        for step in range(first, cfg.opd_steps if not 0 < cfg.opd_flops <= count.charged else first):
            batch = distributed.shard(problems[step * cfg.opd_batch:(step + 1) * cfg.opd_batch])
            set_lr(optimizer, lr_at(step, cfg.opd_steps, cfg.opd_lr, cfg.opd_warmup))
            try:
                rec = opd_step(ddp_student, teacher, optimizer, tok, batch, cfg, generator, step, teacher_score,
                               extra_stats, rows)
            except FloatingPointError as e:
                summary["error"] = str(e)
                log(f"opd {name}: stopped: {e}; last good checkpoint: {summary['last_good_checkpoint']}")
                break
            count.add(rec["flops_given"], rec["flops"] - rec["flops_given"])
            last = step == cfg.opd_steps - 1 or 0 < cfg.opd_flops <= count.charged
            evaluate_now = last or (cfg.opd_eval_every and (step + 1) % cfg.opd_eval_every == 0)
            if evaluate_now:
                rec["eval_acc"] = held_out(step + 1)
                summary["evals"].append([step + 1, rec["eval_acc"], count.charged, count.given])
            records.append(rec)
            jsonl.write(rec)
            if evaluate_now or (save_every and (step + 1) % save_every == 0):
                save(step + 1)
            if print_every and (step % print_every == 0 or last or "eval_acc" in rec):
                log(format_record(name, rec))
            if last:
                break

    summary.update(steps_done=len(records), seconds=round(elapsed + time.time() - t_start, 1),
                   flops=count.charged, flops_given=count.given,
                   final_acc=summary["evals"][-1][1] if len(summary["evals"]) > 1 else None)
    summarize_records(summary, records)
    if rank == 0:
        with open(run_prefix + ".json", "w") as out:
            json.dump(summary, out, indent=2)
    if summary["error"]:
        raise FloatingPointError(summary["error"])
    return summary

