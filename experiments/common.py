"""
What the experiment scripts share: their config (the pipeline's, plus seeds, pairs and jobs), the
pairs, the grid of OPD runs on every pair, the workers that run it, the per-cell statistics, and
the start and end of a script.

Pairs (--pairs N): pair i is the teacher and cold-start student of pipeline seed
seed + PAIR_STRIDE * i (the seeds of train_math.py --seed S), trained in <out_dir> for i = 0 (the
pair `python train_math.py --out_dir <out_dir>` writes) and in <out_dir>/pair<S> for the others;
a pair already there is reused. Every experiment runs its grid on every pair x OPD seed (--seeds)
and writes each pair's runs under that pair's folder (<pair dir>/<mN>/), and the tables of all
runs in <out_dir>/<mN>/: <mN>.txt (the printed table), <mN>.csv (one row per run, with its pair),
<mN>.json (every run, and per cell: the mean, the 95 % interval, the per-pair means).

The 95 % interval of a cell is a Student-t interval over the per-pair means,
  mean_p +- t_{0.975, P-1} * sd(mean_1 .. mean_P) / sqrt(P),
the pair being the unit a reader redraws (a new machine gives a new pair); with one pair, the
same interval over that pair's runs (the OPD seeds) instead, and with one run none.

Workers (--jobs J): the runs of a grid, and the pairs, are independent; J spawned processes take
them in turn, each with an even share of the threads, max(1, T // J) (T: --threads, or torch's
default), and the parent uses the same share. A run's result depends on the thread count alone,
never on J or on which worker ran it, so `--jobs 2` gives the bits of `--jobs 1 --threads T//2`
(tests/test_experiment_grid.py). A finished run leaves <prefix>.row.json; a grid started again
with the same flags reads those back instead of redoing the runs (resume after an interruption).
"""

import concurrent.futures
import json
import math
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, replace

import torch

from nanoopd.checkpoint import load_checkpoint, read_checkpoint
from nanoopd.config import ConfigError, parse_config
from nanoopd.device import pick_device
from nanoopd.evaluate import evaluate
from nanoopd.opd import train_opd
from nanoopd.script import finish, start
from nanoopd.special_tokens import HiddenTokens, TrackedTokens, token_ids
from nanoopd.tokenizer import get_tokenizer
from train_math import PRESETS, TrainConfig, opd_config, test_problems, train_student, train_teacher

PAIR_STRIDE = 1000  # pair i's pipeline seed is seed + PAIR_STRIDE * i: the seeds train_math derives (S .. S+4) never overlap
# t_{0.975, df}: the 95 % two-sided Student-t quantile for df = 1 .. 30 (above 30: 1.96 is within 4 %)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

# the flags that configure the single run of stage opd: M1 and M2 run their own list of objectives
OPD_RUN_FIELDS = ("loss", "options", "objectives", "mask_tokens", "hide_from_teacher", "run_name")
# what no experiment takes: its stages are its own, and it does not resume
PIPELINE_FIELDS = ("stages", "resume")
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
    process runs with the workers' share of the threads (see the module's docstring)."""
    t0 = time.time()
    total = cfg.threads or torch.get_num_threads()
    _, device, tok, log, summary = start(cfg, experiment=name)
    torch.set_num_threads(job_threads(cfg, total))
    log(f"{name}: {cfg.pairs} pair(s) x seeds {cfg.seeds} | {cfg.jobs} job(s) x {torch.get_num_threads()} thread(s)")
    summary.update(body(cfg, tok, device, log) or {}, **{f"{name}_seconds": round(time.time() - t0, 1)})
    return finish(cfg, summary, device, log)


def job_threads(cfg: ExperimentConfig, total: int) -> int:
    """The even share of `total` threads of each of the cfg.jobs workers (and of the parent)."""
    return max(1, total // cfg.jobs)

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
    """Refuse to reuse a pair trained with other flags: each checkpoint train_math.py wrote records
    its config, and the PAIR_FIELDS of its role must equal this run's (a checkpoint without that
    record, saved by other code, is taken as it is)."""
    for role, fields in PAIR_FIELDS.items():
        path = os.path.join(pcfg.out_dir, f"{role}.pt")
        trained = read_checkpoint(path).get("extra", {}).get("train") if os.path.exists(path) else None
        diff = [f"--{f} {trained[f]} (asked: {getattr(pcfg, f)})" for f in fields
                if trained and f in trained and trained[f] != getattr(pcfg, f)]
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
# workers


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_jobs(cfg: ExperimentConfig, work, calls: list[tuple]) -> list:
    """[work(pcfg, cell) for (pcfg, cell) in calls], in that order: here (jobs = 1) or in cfg.jobs
    spawned processes with this process's thread count. `work` must be a module-level function."""
    if cfg.jobs == 1 or len(calls) <= 1:
        return [work(p, c) for p, c in calls]
    ctx = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools mid-use
    with concurrent.futures.ProcessPoolExecutor(min(cfg.jobs, len(calls)), mp_context=ctx, initializer=_init_worker,
                                                initargs=(torch.get_num_threads(),)) as pool:
        return list(pool.map(work, *zip(*calls)))


def run_cells(cfg: ExperimentConfig, work, calls: list[tuple], log) -> list[dict]:
    """run_jobs for runs whose cell (a dict) names its files by cell["prefix"]: a run whose
    <prefix>.row.json was written by a run of the same settings is read back, not redone; every
    other run writes its row there when it ends."""
    rows, todo = [None] * len(calls), []
    for i, (pcfg, cell) in enumerate(calls):
        path = cell["prefix"] + ".row.json"
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("key") == run_key(pcfg, cell):
                rows[i] = saved["row"]
                continue
            log(f"resume: {path} was written with other settings: running it again")
        todo.append(i)
    if len(todo) < len(calls):
        log(f"resume: {len(calls) - len(todo)} of {len(calls)} runs finished earlier, read back")
    for i, row in zip(todo, run_jobs(cfg, _finished_row, [(calls[i][0], (work, calls[i][1])) for i in todo])):
        rows[i] = row
    return rows


def run_key(pcfg: ExperimentConfig, cell: dict) -> str:
    """What defines a run's result: the pair's config but for how the grid is run (jobs, pairs,
    seeds; the thread count is kept: it changes the bits), and the cell (functions by name)."""
    settings = {k: v for k, v in asdict(pcfg).items() if k not in ("jobs", "pairs", "seeds")}
    # a script's own functions live in __main__ in the parent and in __mp_main__ in a spawned worker
    module = lambda v: "__main__" if v.__module__ == "__mp_main__" else v.__module__
    name = lambda v: f"{module(v)}.{v.__qualname__}" if callable(v) else v
    return json.dumps({"config": settings, "threads": torch.get_num_threads(),
                       "cell": {k: name(v) for k, v in cell.items()}}, sort_keys=True, default=str)


def _finished_row(pcfg, work_cell) -> dict:
    work, cell = work_cell
    row = work(pcfg, cell)
    os.makedirs(os.path.dirname(os.path.abspath(cell["prefix"])), exist_ok=True)
    tmp = cell["prefix"] + ".row.json.tmp"
    with open(tmp, "w") as f:
        json.dump({"key": run_key(pcfg, cell), "row": row}, f)
    os.replace(tmp, cell["prefix"] + ".row.json")  # atomic: a killed run leaves no row
    return row

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
    hide_from_teacher (the teacher's contexts) hold token names. A run that hits a non-finite loss
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
    teacher = load_checkpoint(os.path.join(pcfg.out_dir, "teacher.pt"), device, tok.n_vocab)[0]
    model = load_checkpoint(os.path.join(pcfg.out_dir, f"{cell['student_role']}.pt"), device, tok.n_vocab)[0]
    options = dict(cell["options"])
    if "mask_tokens" in options:
        options["mask_tokens"] = token_ids(options["mask_tokens"], tok)
    hide = token_ids(options.pop("hide_from_teacher", ""), tok)
    track, extra = cell["track"], cell["extra_stats"]
    log = lambda msg: print(msg, flush=True)
    try:
        s = train_opd(model, teacher, tok, opd_config(pcfg, cell["loss"], options, cell["seed"]), cell["prefix"],
                      test_problems(pcfg), log, f"{cell['label']} s{cell['seed']} pair {pcfg.seed}",
                      start_acc=cell["start_acc_train"], print_every=10,
                      teacher_score=HiddenTokens(hide) if hide else None,
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

# -----------------------------------------------------------------------------
# statistics of a cell over pairs and seeds


def interval(rows: list[dict], key: str) -> dict:
    """The cell's figures for `key` over its runs: mean over all runs, the per-pair means, and the
    95 % t-interval over the per-pair means (over the runs when there is one pair; none for one run)."""
    values = [(r["pair"], r[key]) for r in rows if r.get(key) is not None]
    if not values:
        return {"mean": None, "low": None, "high": None, "per_pair": {}, "interval": "none", "n_runs": 0}
    per_pair = {}
    for p, v in values:
        per_pair.setdefault(p, []).append(v)
    per_pair = {p: sum(v) / len(v) for p, v in per_pair.items()}
    units, kind = (list(per_pair.values()), "t over pair means") if len(per_pair) > 1 else \
                  ([v for _, v in values], "t over the runs of one pair")
    mean_all = sum(v for _, v in values) / len(values)
    center = sum(units) / len(units)
    if len(units) < 2:
        return {"mean": mean_all, "low": None, "high": None, "per_pair": per_pair, "interval": "none (one run)",
                "n_runs": len(values)}
    sd = math.sqrt(sum((u - center) ** 2 for u in units) / (len(units) - 1))
    half = T975[min(len(units) - 1, len(T975)) - 1] * sd / math.sqrt(len(units))
    return {"mean": mean_all, "low": center - half, "high": center + half, "per_pair": per_pair, "interval": kind,
            "n_runs": len(values)}


def cell_text(rows: list[dict], key: str = "final_acc") -> str:
    """'61.2% [58.1, 64.3] (60.4 62.0 61.1)': the mean over runs, the 95 % interval and the
    per-pair means, in percent (with one pair: the per-run values)."""
    c = interval(rows, key)
    if c["mean"] is None:
        return "-"
    each = c["per_pair"].values() if len(c["per_pair"]) > 1 else [r[key] for r in rows if r.get(key) is not None]
    ci = f" [{100 * c['low']:.1f}, {100 * c['high']:.1f}]" if c["low"] is not None else ""
    return f"{100 * c['mean']:.1f}%{ci} ({' '.join(f'{100 * v:.1f}' for v in each)})"


def cells(rows: list[dict], keys=("final_acc",), group: str = "label") -> dict:
    """{group value: {key: interval(...)}} for the JSON: every cell's mean, interval and per-pair means."""
    out = {}
    for r in rows:
        out.setdefault(str(r[group]), []).append(r)
    return {g: {k: interval(rs, k) for k in keys} for g, rs in out.items()}


def verdict(rows: list[dict], a: str, b: str, key: str = "final_acc", group: str = "label") -> dict:
    """The verdict rule of docs/scorecard.md for the claim "a is above b" on `key`: per pair, the
    difference d_p of the two arms' means over that pair's runs (OPD seeds); the 95 % t-interval of
    the mean difference over the pairs, d +- t_{0.975, P-1} sd(d_p) / sqrt(P); then
      reproduced      d_p > 0 on every pair and the interval excludes 0 (lies above it),
      partly          d_p > 0 on some pairs, or on all with an interval that includes 0,
      not reproduced  d_p > 0 on no pair.
    With fewer than 3 pairs the verdict is 'pending' (the rule needs >= 3 pairs)."""
    arm = lambda lab: {p: v["mean"] for p, v in [(p, interval([r for r in rows if r["pair"] == p and r[group] == lab],
                                                                key)) for p in sorted({r["pair"] for r in rows})]}
    A, B = arm(a), arm(b)
    d = {p: A[p] - B[p] for p in A if A[p] is not None and B.get(p) is not None}
    c = interval([{"pair": p, key: v} for p, v in d.items()], key)
    holds = sum(v > 0 for v in d.values())
    if len(d) < 3:
        word = "pending"
    elif holds == len(d) and c["low"] > 0:
        word = "reproduced"
    elif holds:
        word = "partly"
    else:
        word = "not reproduced"
    return {"claim": f"{a} > {b} on {key}", "per_pair": d, "mean": c["mean"], "low": c["low"], "high": c["high"],
            "pairs_in_direction": holds, "pairs": len(d), "verdict": word}


def verdict_text(v: dict, scale: float = 100) -> str:
    """'+5.5 [+2.5, +8.4] (+4.8 +4.8 +6.9) reproduced': one verdict's d, its interval and the per-pair
    d_p, in points (scale 100 for accuracies kept as fractions)."""
    if v["mean"] is None:
        return "-"
    ci = f" [{scale * v['low']:+.1f}, {scale * v['high']:+.1f}]" if v["low"] is not None else ""
    return f"{scale * v['mean']:+.1f}{ci} ({' '.join(f'{scale * x:+.1f}' for x in v['per_pair'].values())}) {v['verdict']}"
