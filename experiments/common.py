"""
What the experiment scripts share: their config (the pipeline's, plus seeds, pairs and jobs), the
pairs, the grid of OPD runs on every pair, and the start and end of a script. The workers that run
a grid and its resume are in experiments/jobs.py, the per-cell statistics and the verdict rule in
experiments/stats.py (imported here: a script takes all it shares from this module).

Pairs (--pairs N): pair i is the teacher and cold-start student of pipeline seed
seed + PAIR_STRIDE * i (the seeds of train_math.py --seed S), trained in <out_dir> for i = 0 (the
pair `python train_math.py --out_dir <out_dir>` writes) and in <out_dir>/pair<S> for the others;
a pair already there is reused. Every experiment runs its grid on every pair x OPD seed (--seeds)
and writes each pair's runs under that pair's folder (<pair dir>/<mN>/), and the tables of all
runs in <out_dir>/<mN>/: <mN>.txt (the printed table), <mN>.csv (one row per run, with its pair),
<mN>.json (every run, and per cell: the mean, the 95 % interval, the per-pair means).
"""

import json
import os
import time
from dataclasses import dataclass, replace

import torch

from experiments.jobs import job_threads, run_cells, run_jobs
from experiments.stats import cell_text, cells, equivalence, interval, verdict, verdict_text  # noqa: F401 (the scripts')
from nanoopd.checkpoint import load_checkpoint, read_checkpoint
from nanoopd.config import ConfigError, parse_config
from nanoopd.cross_teacher import teacher_scorer
from nanoopd.device import pick_device
from nanoopd.evaluate import evaluate
from nanoopd.opd import train_opd
from nanoopd.script import finish, start
from nanoopd.special_tokens import HiddenTokens, TrackedTokens, token_ids
from nanoopd.tokenizer import get_tokenizer
from train_math import PRESETS, TrainConfig, opd_config, test_problems, train_student, train_teacher

PAIR_STRIDE = 1000  # pair i's pipeline seed is seed + PAIR_STRIDE * i: the seeds train_math derives (S .. S+4) never overlap

# the flags that configure the single run of stage opd: M1 and M2 run their own list of objectives
OPD_RUN_FIELDS = ("loss", "options", "objectives", "mask_tokens", "hide_from_teacher", "run_name")
# what no experiment takes: its stages are its own, it does not resume, and its pairs read one tokenizer (M7 adds its own)
PIPELINE_FIELDS = ("stages", "resume", "teacher_tokenizer", "naive_ids")
OPSD_FIELDS = ("mode", "pi", "live_teacher", "pi_steps")
STUDENT_FIELDS = ("s_layer", "s_embd", "s_head", "s_steps", "s_lr", "s_pool")
# what a pair's checkpoints must have been trained with to be reused (the task, then each role's own flags)
TASK_FIELDS = ("seed", "digits", "ops", "batch_size")
PAIR_FIELDS = {"teacher": TASK_FIELDS + ("t_layer", "t_embd", "t_head", "t_steps", "t_lr"),
               "student": TASK_FIELDS + STUDENT_FIELDS + ("s_digits", "s_ops", "max_new_tokens")}  # the budget of its pool's traces
RLVR_FIELDS = ("teacher", "rlvr_init", "rlvr_steps", "rlvr_lr", "rlvr_prompts", "rlvr_group", "rlvr_cut", "rlvr_warmup",
               "rlvr_eps")


@dataclass
class ExperimentConfig(TrainConfig):
    # --- experiment
    seeds: str = "1,2"               # comma-separated OPD seeds (prompt order and sampling): one run per seed and pair
    pairs: int = 1                   # teacher/student pairs, pipeline seeds seed, seed+1000, ...; 1 = the fast first look
    jobs: int = 1                    # worker processes for the independent runs and pairs, each with threads // jobs threads

    def __post_init__(self):
        super().__post_init__()
        self.seed_list()
        for name in ("pairs", "jobs"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")

    def seed_list(self) -> list[int]:
        try:
            out = [int(s) for s in self.seeds.split(",") if s.strip()]
        except ValueError:
            out = []
        if not out:
            raise ConfigError("seeds", f"must be comma-separated integers, e.g. 1,2; got {self.seeds!r}")
        return out


def parse(cls, argv, doc: str, exclude=(), **fixed):
    """The experiment's config from its command line: no flags for `exclude` (their defaults hold)
    nor for `fixed` (the values given here)."""
    return parse_config(cls, argv, description=doc, presets=PRESETS, exclude=PIPELINE_FIELDS + tuple(exclude),
                        **fixed)


def run_experiment(name: str, cfg: ExperimentConfig, body) -> dict:
    """body(cfg, tok, device, log) -> the table's numbers; wall time and the summary around it. The
    process runs with the workers' share of the threads (see experiments/jobs.py)."""
    t0 = time.time()
    total = cfg.threads or torch.get_num_threads()
    _, device, tok, log, summary = start(cfg, experiment=name)
    torch.set_num_threads(job_threads(cfg, total))
    log(f"{name}: {cfg.pairs} pair(s) x seeds {cfg.seeds} | {cfg.jobs} job(s) x {torch.get_num_threads()} thread(s)")
    summary.update(body(cfg, tok, device, log) or {}, **{f"{name}_seconds": round(time.time() - t0, 1)})
    return finish(cfg, summary, device, log)


# -----------------------------------------------------------------------------
# pairs


def pair_configs(cfg: ExperimentConfig) -> list[ExperimentConfig]:
    """One config per pair: pipeline seed seed + PAIR_STRIDE * i, out_dir <out_dir> (i = 0) or
    <out_dir>/pair<seed>; everything else as given."""
    out = []
    for i in range(cfg.pairs):
        seed = cfg.seed + PAIR_STRIDE * i
        out.append(replace(cfg, seed=seed, out_dir=cfg.out_dir if i == 0 else os.path.join(cfg.out_dir, f"pair{seed}")))
    return out


def role_finished(path: str, steps: int) -> bool:
    """A checkpoint that a finished stage left: one without optimizer state (saved as a finished
    model), or one at its last step (train_sft's periodic checkpoints are resumed, not used)."""
    if not os.path.exists(path):
        return False
    payload = read_checkpoint(path)
    return "optimizer" not in payload or payload["step"] >= steps


def check_pair(pcfg: ExperimentConfig) -> None:
    """Refuse to reuse a pair trained with other flags (check_trained, for each role)."""
    for role, fields in PAIR_FIELDS.items():
        check_trained(os.path.join(pcfg.out_dir, f"{role}.pt"), fields, pcfg)


def check_trained(path: str, fields, cfg: ExperimentConfig) -> None:
    """Refuse to reuse a checkpoint trained with other flags: each checkpoint train_math.py wrote
    records its config, and `fields` of it must equal cfg's (a checkpoint without that record,
    saved by other code, is taken as it is)."""
    trained = read_checkpoint(path).get("extra", {}).get("train") if os.path.exists(path) else None
    diff = [f"--{f} {trained[f]} (asked: {getattr(cfg, f)})" for f in fields
            if trained and f in trained and trained[f] != getattr(cfg, f)]
    if diff:
        raise ConfigError("out_dir", f"{path} was trained with {', '.join(diff)}: pass those flags to reuse "
                                     f"it, or give another --out_dir to train new pairs there")


def train_pair(pcfg: ExperimentConfig, _cell=None) -> dict:
    """The teacher and cold-start student of pcfg.out_dir, trained (or resumed) where not finished."""
    tok, device = get_tokenizer(), pick_device(pcfg.device)
    pcfg = replace(pcfg, resume=True)
    os.makedirs(pcfg.out_dir, exist_ok=True)
    log = lambda msg: print(f"[pair {pcfg.seed}] {msg}", flush=True)
    path = lambda role: os.path.join(pcfg.out_dir, f"{role}.pt")
    t0 = time.time()
    teacher = None
    if not role_finished(path("teacher"), pcfg.t_steps):
        teacher = train_teacher(pcfg, tok, device, log)
    if not role_finished(path("student"), pcfg.s_steps):
        teacher = teacher or load_checkpoint(path("teacher"), device, tok.n_vocab)[0]
        train_student(pcfg, tok, device, teacher, log)
    return {"seed": pcfg.seed, "seconds": round(time.time() - t0, 1)}


def pairs(cfg: ExperimentConfig, log) -> list[ExperimentConfig]:
    """Every pair of cfg trained (the missing ones, cfg.jobs at a time); their configs."""
    pcfgs = pair_configs(cfg)
    for p in pcfgs:
        check_pair(p)
    todo = [p for p in pcfgs if not (role_finished(os.path.join(p.out_dir, "teacher.pt"), p.t_steps)
                                     and role_finished(os.path.join(p.out_dir, "student.pt"), p.s_steps))]
    if todo:
        log(f"training {len(todo)} pair(s): seeds {', '.join(str(p.seed) for p in todo)}")
        for r in run_jobs(cfg, train_pair, [(p, None) for p in todo]):
            log(f"pair {r['seed']} trained in {r['seconds']:.0f}s")
    return pcfgs


def final_eval(cfg: TrainConfig, model, tok) -> float:
    """Greedy accuracy on the final held-out set (final_eval_n problems)."""
    return evaluate(model, tok, test_problems(cfg, final=True), 0.0, cfg.max_new_tokens)

# -----------------------------------------------------------------------------
# the OPD grid


def merged_stats(*hooks):
    """One OPD extra_stats hook that returns the figures of every given hook (None: no hook)."""
    hooks = [h for h in hooks if h]
    if not hooks:
        return None
    return lambda student_logits, teacher_logits, rollout: {
        k: v for h in hooks for k, v in h(student_logits, teacher_logits, rollout).items()}


def run_grid(cfg: ExperimentConfig, pcfgs: list[ExperimentConfig], runs, name: str, log, **kw) -> list[dict]:
    """The rows of grid_calls(...) (every pair x seed x run), run by cfg.jobs workers, resumable."""
    return run_cells(cfg, opd_cell, grid_calls(cfg, pcfgs, runs, name, **kw), log)


def grid_calls(cfg: ExperimentConfig, pcfgs: list[ExperimentConfig], runs, folder: str, track=(), after=None,
               extra_stats=None, student_role: str = "student") -> list[tuple]:
    """One OPD run per (pair, seed, run), each from a fresh copy of the pair's student (its
    <student_role>.pt); runs = (label, objective, options), where the options mask_tokens and
    hide_from_teacher (the teacher's contexts) hold token names, teacher_dir names the teacher's
    folder under the pair's (default: the pair's own), naive_ids hands a teacher of another
    tokenizer the student's ids (cross_teacher.py). A run that hits a non-finite loss
    is kept (as degraded), not fatal. `track`: token ids whose log-ratios are logged
    (special_tokens.TrackedTokens); after(pcfg, label, model) adds numbers; extra_stats(options) ->
    an extra_stats hook for that run, logged besides `track`'s (e.g. TailMass(options.get("k", 16))).
    after and extra_stats must be module-level functions (workers import them). Runs go to
    <pair dir>/<folder>/<label>_s<seed>.*; every row gets pair (its seed), start_acc and final_acc
    on the final held-out set (final_eval_n), and the training-time ones (eval_n) as start_acc_train
    and final_acc_train."""
    calls = []
    for pcfg in pcfgs:
        start = start_accs(pcfg, student_role)
        for seed in cfg.seed_list():
            for label, loss, options in runs:
                prefix = os.path.join(pcfg.out_dir, folder, "".join(c if c.isalnum() else "_" for c in label) + f"_s{seed}")
                calls.append((pcfg, {"prefix": prefix, "seed": seed, "label": label, "loss": loss, "options": options,
                                     "track": tuple(track), "after": after, "extra_stats": extra_stats,
                                     "student_role": student_role, **start}))
    return calls


_START = {}  # (checkpoint, its mtime, problem sets) -> the student's accuracies before OPD, measured once


def start_accs(pcfg: ExperimentConfig, role: str) -> dict:
    """The greedy accuracies of <pair dir>/<role>.pt on the final and the in-training held-out sets."""
    path = os.path.join(pcfg.out_dir, f"{role}.pt")
    key = (os.path.abspath(path), os.path.getmtime(path), pcfg.seed, pcfg.eval_n, pcfg.final_eval_n, pcfg.digits, pcfg.ops)
    if key not in _START:
        tok = get_tokenizer()
        student = load_checkpoint(path, pick_device(pcfg.device), tok.n_vocab)[0]
        _START[key] = {"start_acc": final_eval(pcfg, student, tok),
                       "start_acc_train": evaluate(student, tok, test_problems(pcfg), 0.0, pcfg.max_new_tokens)}
    return _START[key]


def opd_cell(pcfg: ExperimentConfig, cell: dict) -> dict:
    """One OPD run of run_grid (in this process or a worker)."""
    tok, device = get_tokenizer(), pick_device(pcfg.device)
    options = dict(cell["options"])
    teacher = load_checkpoint(os.path.join(pcfg.out_dir, options.pop("teacher_dir", ""), "teacher.pt"), device)[0]
    model = load_checkpoint(os.path.join(pcfg.out_dir, f"{cell['student_role']}.pt"), device, tok.n_vocab)[0]
    naive = options.pop("naive_ids", False)
    if "mask_tokens" in options:
        options["mask_tokens"] = token_ids(options["mask_tokens"], tok)
    hide = token_ids(options.pop("hide_from_teacher", ""), tok)
    track, extra = cell["track"], cell["extra_stats"]
    log = lambda msg: print(msg, flush=True)
    try:
        s = train_opd(model, teacher, tok, opd_config(pcfg, cell["loss"], options, cell["seed"]), cell["prefix"],
                      test_problems(pcfg), log, f"{cell['label']} s{cell['seed']} pair {pcfg.seed}",
                      start_acc=cell["start_acc_train"], print_every=10,
                      teacher_score=HiddenTokens(hide) if hide else teacher_scorer(tok, teacher, naive),
                      extra_stats=merged_stats(TrackedTokens(track) if track else None,
                                               extra(options) if extra else None),
                      compile=pcfg.compile)
    except FloatingPointError:
        with open(cell["prefix"] + ".json") as f:
            s = json.load(f)
    s = {k: v for k, v in s.items() if k != "config"}
    s.update(start_acc_train=s["start_acc"], final_acc_train=s.get("final_acc"), start_acc=cell["start_acc"],
             final_acc=final_eval(pcfg, model, tok) if s.get("final_acc") is not None else None)
    return {"label": cell["label"], "pair": pcfg.seed, "seed": cell["seed"], **s,
            **(cell["after"](pcfg, cell["label"], model) if cell["after"] else {})}
