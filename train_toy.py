"""
train_toy.py: the future-reward-coupling study. How the discount gamma of the OPD gradient
estimator g_gamma trades bias for variance (DESIGN.md sections 3 and 6).

    g_gamma = sum_t ( sum_{t' >= t} gamma^(t'-t) r_t' ) s_t,   r_t = log pi(y_t|c_t) - log q(y_t|c_t)

gamma = 0 is sampled-token OPD, gamma = 1 the unbiased REINFORCE gradient of the sequence KL J.
The script runs two toys and prints what they show:

  1. an exact discrete toy (toy/exact.py): every sequence of a tiny tabular student is enumerated,
     so the bias and variance of g_gamma are exact numbers; then students are trained with each
     gamma from sampled batches, next to the same runs driven by the exact expected gradient;
  2. a continuous-control replica of the published study (toy/continuous.py): two 1-D reaching
     tasks, one REINFORCE teacher each, one student distilled with g_gamma. --preset paper runs it
     at the published settings (T = 20, 2,000 steps, three seeds, five gammas) and reports what the
     paper reports: the drift of the end points, the variance in orders of magnitude, and
     state-visitation heatmaps; --sweep repeats it over optimizers and learning rates.

Commands:

    python train_toy.py                      # everything, about 20-30 s on 2 CPU cores
    python train_toy.py --device cuda        # the same on one GPU (the toy is tiny: CPU is fine)
    python train_toy.py --quick              # a smaller run in a few seconds (used by the tests)
    python train_toy.py --dtype float32      # the Mac (MPS) precision on any device: no float64
    python train_toy.py --parts exact        # only the exact bias/variance tables
    python train_toy.py --preset paper       # the control study at the published settings, about 2 min on CPU
    python train_toy.py --preset paper --control-gammas 0,1 --sweep sgd:1e-6,adam:3e-3,adam:3e-3:10
                                             # the same once per optimizer:lr[:T], one table (docs/toy.md)
    python train_toy.py --help               # every flag

Outputs go to --out (default out/toy): CSV files always, PNG figures when matplotlib is installed.
"""

# -----------------------------------------------------------------------------
# imports

import argparse
import csv
import math
import os
import sys
import time
from dataclasses import dataclass, fields, replace

import torch
from tqdm import tqdm

from nanoopd.device import pick_device
from toy.continuous import (MISS_TOL, OPTIMIZERS, TARGETS, distill_student, drift, final_positions, train_teacher,
                             trajectories, visitation)
from toy.exact import MAX_SEQUENCES, exact_estimator_stats, make_problem, train_student

# -----------------------------------------------------------------------------
# config


@dataclass
class ToyConfig:
    # what to run
    parts: tuple = ("exact", "train", "control")  # stages: exact tables, discrete training, continuous control
    # the exact discrete toy
    vocab: int = 3                                 # V, tokens in the vocabulary
    horizon: int = 6                               # T, sequence length; V^T = 729 sequences enumerated
    couplings: tuple = (0.0, 0.5, 1.0, 2.0)        # coupling strengths c in the table (0 = tokens independent)
    gammas: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)    # discounts of g_gamma in the table and in training
    horizons: tuple = (2, 4, 6, 8)                 # horizons of the variance-vs-T table (at the training coupling)
    problem_seed: int = 0                          # draws the teacher and the student's starting point
    # training students on the discrete toy
    train_coupling: float | None = None            # coupling used for training; None = the largest in couplings
    seeds: tuple = (0, 1, 2, 3)                    # sampling seeds; every gamma is trained once per seed
    steps: int = 300                               # optimisation steps per run
    batch_size: int = 16                           # sequences sampled per step
    optimizer: str = "sgd"                         # plain SGD: the step is the sampled g_gamma itself
    lr: float = 0.3                                # learning rate of the discrete students
    eval_every: int = 10                           # exact KL(student || teacher) every this many steps
    # continuous-control replica
    control_gammas: tuple = (0.0, 0.5, 1.0)        # discounts distilled in the continuous toy
    control_horizon: int = 10                      # moves per episode
    teacher_steps: int = 200                       # REINFORCE steps per teacher
    teacher_lr: float = 0.01                       # Adam learning rate of the teachers
    student_steps: int = 300                       # OPD steps of the student (tasks alternate)
    student_lr: float = 3e-3                       # Adam learning rate of the student
    control_batch: int = 64                        # episodes per OPD step
    micro_batches: int = 8                         # the batch is split into this many for the variance
    hidden: int = 32                               # hidden width of the Gaussian MLP policies
    eval_episodes: int = 256                       # episodes per task for the final positions
    control_seeds: tuple = (0,)                    # each seed s: teachers (s, s+1), student (s+2), evaluation (s+3)
    student_optimizer: str = "adam"                # adam, or sgd (plain: the step is lr * g_gamma itself)
    sweep: tuple = ()                              # (optimizer, lr, horizon or None) points; empty = no sweep
    # run
    out: str = "out/toy"                           # folder for CSV files and figures
    device: str = "auto"                           # auto = cuda -> mps -> cpu
    dtype: str = "auto"                            # exact toy: auto = float64, float32 on MPS (no float64 there)
    threads: int = 1                               # CPU threads; one is fastest for tensors this small
    plots: bool = True                             # write PNG figures when matplotlib is installed
    quick: bool = False                            # smaller sizes, for tests and a first look
    preset: str | None = None                      # None, or "paper": the control study at the published settings


QUICK = dict(horizon=4, horizons=(2, 3, 4), seeds=(0, 1), steps=40, teacher_steps=40, student_steps=20,
             eval_episodes=64)  # what --quick changes
PRESETS = {  # what --preset NAME changes
    # the published continuous-control study: horizon about 20, about 2,000 alternating-task iterations,
    # batch 64 in 8 micro-batches, five discounts; three seeds. The paper names no optimizer or learning
    # rate, so the student keeps the replica's Adam at lr 3e-3 (--student-optimizer, --student-lr).
    "paper": dict(parts=("control",), control_gammas=(0.0, 0.25, 0.5, 0.75, 1.0), control_horizon=20,
                  student_steps=2000, control_batch=64, micro_batches=8, control_seeds=(42, 43, 2026)),
}
OPT_NAMES = {"adam": "Adam", "sgd": "SGD"}
HEATMAP_RANGE = (-6.0, 6.0, 48)  # position bins of the heatmaps: lo, hi, count (targets at -3 and +3)

# -----------------------------------------------------------------------------
# command line


def float_list(text: str) -> tuple:
    """ "0,0.5,1" -> (0.0, 0.5, 1.0) """
    return tuple(float(x) for x in text.split(","))


def int_list(text: str) -> tuple:
    """ "0,1,2" -> (0, 1, 2) """
    return tuple(int(x) for x in text.split(","))


def sweep_points(text: str) -> tuple:
    """ "sgd:1e-4,adam:3e-3:10" -> (("sgd", 1e-4, None), ("adam", 3e-3, 10)): optimizer:lr[:horizon] """
    points = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) not in (2, 3) or parts[0] not in OPTIMIZERS:
            raise argparse.ArgumentTypeError(f"sweep point {item!r} is not optimizer:lr or optimizer:lr:horizon, "
                                             f"optimizer sgd or adam (e.g. sgd:1e-4,adam:3e-3:10)")
        try:
            points.append((parts[0], float(parts[1]), int(parts[2]) if len(parts) == 3 else None))
        except ValueError:
            raise argparse.ArgumentTypeError(f"sweep point {item!r}: lr must be a number and horizon an integer")
    return tuple(points)


def parse_args(argv=None) -> ToyConfig:
    d = ToyConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Lists are comma-separated, e.g. --gammas 0,0.5,1.")
    p.add_argument("--parts", type=lambda s: tuple(s.split(",")), default=d.parts,
                   help="stages to run, any of exact,train,control (default: all three)")

    g = p.add_argument_group("exact discrete toy")
    g.add_argument("--vocab", type=int, default=d.vocab, help="V, tokens in the vocabulary (default %(default)s)")
    g.add_argument("--horizon", type=int, default=d.horizon,
                   help=f"T, sequence length; V^T sequences are enumerated, at most {MAX_SEQUENCES} (default %(default)s)")
    g.add_argument("--couplings", type=float_list, default=d.couplings,
                   help="coupling strengths c >= 0, rows of the table; 0 = no dependence on the prefix (default 0,0.5,1,2)")
    g.add_argument("--gammas", type=float_list, default=d.gammas,
                   help="discounts in [0, 1] for the table and for training (default 0,0.25,0.5,0.75,1)")
    g.add_argument("--horizons", type=int_list, default=d.horizons,
                   help="horizons of the variance-vs-T table, at the training coupling (default 2,4,6,8)")
    g.add_argument("--problem-seed", type=int, default=d.problem_seed,
                   help="seed of the teacher and of the student's starting point (default %(default)s)")

    g = p.add_argument_group("training students on the discrete toy")
    g.add_argument("--train-coupling", type=float, default=d.train_coupling,
                   help="coupling c used for training (default: the largest of --couplings)")
    g.add_argument("--seeds", type=int_list, default=d.seeds, help="sampling seeds, one run per gamma and seed (default 0,1,2,3)")
    g.add_argument("--steps", type=int, default=d.steps, help="optimisation steps per run (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences sampled per step (default %(default)s)")
    g.add_argument("--optimizer", choices=("sgd", "adam"), default=d.optimizer,
                   help="sgd (plain; its step is the sampled gradient) or adam (default %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="learning rate (default %(default)s)")
    g.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="compute the exact KL(student || teacher) every this many steps (default %(default)s)")

    g = p.add_argument_group("continuous-control replica")
    g.add_argument("--control-gammas", type=float_list, default=d.control_gammas,
                   help="discounts in [0, 1] distilled in the continuous toy (default 0,0.5,1)")
    g.add_argument("--control-horizon", type=int, default=d.control_horizon, help="moves per episode (default %(default)s)")
    g.add_argument("--teacher-steps", type=int, default=d.teacher_steps, help="REINFORCE steps per teacher (default %(default)s)")
    g.add_argument("--teacher-lr", type=float, default=d.teacher_lr, help="Adam learning rate of the teachers (default %(default)s)")
    g.add_argument("--student-steps", type=int, default=d.student_steps,
                   help="OPD steps of the student, tasks alternating (default %(default)s)")
    g.add_argument("--student-lr", type=float, default=d.student_lr,
                   help="learning rate of the student's optimizer, see --student-optimizer (default %(default)s)")
    g.add_argument("--control-batch", type=int, default=d.control_batch, help="episodes per OPD step (default %(default)s)")
    g.add_argument("--micro-batches", type=int, default=d.micro_batches,
                   help="micro-batches the batch is split into to measure gradient variance (default %(default)s)")
    g.add_argument("--hidden", type=int, default=d.hidden, help="hidden width of the policy MLPs (default %(default)s)")
    g.add_argument("--eval-episodes", type=int, default=d.eval_episodes,
                   help="episodes per task for the final positions (default %(default)s)")
    g.add_argument("--control-seeds", type=int_list, default=d.control_seeds,
                   help="seeds; each seed s trains its own teachers (seeds s, s+1) and students (s+2), "
                        "evaluated with s+3 (default 0)")
    g.add_argument("--student-optimizer", choices=tuple(OPTIMIZERS), default=d.student_optimizer,
                   help="optimizer of the student: adam, or sgd (plain, no momentum: the step is lr * g_gamma, "
                        "so the variance of g_gamma reaches the weights unnormalised) (default %(default)s)")
    g.add_argument("--preset", choices=tuple(PRESETS), default=d.preset,
                   help="paper: the continuous-control study at the published settings, " +
                        ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
                                  for k, v in PRESETS["paper"].items()) +
                        "; it prints the drift of the end points and the variance in orders of magnitude, and "
                        "draws state-visitation heatmaps. Flags given explicitly override the preset")
    g.add_argument("--sweep", type=sweep_points, default=d.sweep,
                   help="run the control study once per point optimizer:lr[:horizon] (e.g. sgd:1e-4,adam:3e-3:10; "
                        "horizon defaults to --control-horizon) with the other settings unchanged, and print "
                        "one table of variance and drift for all points (default: no sweep)")

    g = p.add_argument_group("run")
    g.add_argument("--out", default=d.out, help="output folder for CSV files and figures (default %(default)s)")
    g.add_argument("--device", default=d.device,
                   help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default %(default)s)")
    g.add_argument("--dtype", choices=("auto", "float32", "float64"), default=d.dtype,
                   help="precision of the exact toy: auto = float64, except float32 on MPS, which has no float64; "
                        "float32 runs the MPS path on any device (default %(default)s)")
    g.add_argument("--threads", type=int, default=d.threads, help="CPU threads for torch (default %(default)s)")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="do not write PNG figures")
    g.add_argument("--quick", action="store_true",
                   help="smaller and shorter run in a few seconds: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))

    args = p.parse_args(argv)
    cfg = ToyConfig(**{f.name: getattr(args, f.name) for f in fields(ToyConfig)})
    # --preset and --quick set the values they name unless the same flag was also given explicitly
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])}
    for changes in (PRESETS.get(cfg.preset, {}), QUICK if cfg.quick else {}):
        cfg = replace(cfg, **{k: v for k, v in changes.items() if k not in given})
    try:
        check_config(cfg)
    except ValueError as e:
        p.error(str(e))
    return cfg


def check_config(cfg: ToyConfig):
    """Raise ValueError with a message that says what is wrong and what to do."""
    unknown = set(cfg.parts) - {"exact", "train", "control"}
    if unknown or not cfg.parts:
        raise ValueError(f"--parts takes exact, train and/or control, got {','.join(cfg.parts)}")
    for name in ("gammas", "control_gammas"):
        bad = [x for x in getattr(cfg, name) if not 0.0 <= x <= 1.0]
        if bad:
            raise ValueError(f"--{name.replace('_', '-')}: every gamma must lie in [0, 1], got {bad}")
    if any(c < 0 or not math.isfinite(c) for c in cfg.couplings):
        raise ValueError(f"--couplings must be finite and >= 0, got {list(cfg.couplings)}")
    if cfg.train_coupling is not None and not (cfg.train_coupling >= 0 and math.isfinite(cfg.train_coupling)):
        raise ValueError(f"--train-coupling must be finite and >= 0, got {cfg.train_coupling}")
    if cfg.vocab < 2:
        raise ValueError(f"--vocab must be at least 2, got {cfg.vocab}")
    for T in (cfg.horizon, *cfg.horizons):
        if T < 1:
            raise ValueError(f"horizons must be at least 1, got {T}")
        if cfg.vocab ** T > MAX_SEQUENCES:
            raise ValueError(f"V^T = {cfg.vocab}^{T} = {cfg.vocab ** T} sequences cannot be enumerated (limit "
                             f"{MAX_SEQUENCES}); lower --vocab, --horizon or --horizons (e.g. V=3 with T<=10)")
    for name in ("steps", "batch_size", "eval_every", "control_horizon", "teacher_steps", "student_steps",
                 "control_batch", "micro_batches", "hidden", "eval_episodes", "threads"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if not cfg.seeds or not cfg.control_seeds:
        raise ValueError("--seeds and --control-seeds need at least one seed")
    for opt, lr, T in cfg.sweep:
        if not (lr > 0 and math.isfinite(lr)) or (T is not None and T < 1):
            raise ValueError(f"--sweep {opt}:{lr:g}{'' if T is None else f':{T}'}: lr must be > 0 and horizon >= 1")
    if cfg.sweep and "control" not in cfg.parts:
        raise ValueError("--sweep runs the control study: add control to --parts (or use --preset paper)")
    if cfg.micro_batches < 2 or cfg.control_batch % cfg.micro_batches:
        raise ValueError(f"--control-batch {cfg.control_batch} must split into --micro-batches {cfg.micro_batches} "
                         f"(at least 2) equal parts, e.g. 64 and 8")


# -----------------------------------------------------------------------------
# part 1a: the exact bias / variance tables


def exact_tables(cfg: ToyConfig, device, dtype) -> tuple[list[dict], list[dict]]:
    """Rows (coupling, gamma, rel_bias, variance, grad_norm) and (horizon, gamma, variance)."""
    table = []
    for c in cfg.couplings:
        student, theta, teacher, phi = make_problem(cfg.vocab, cfg.horizon, c, cfg.problem_seed, dtype=dtype, device=device)
        for r in exact_estimator_stats(student, theta, teacher, phi, list(cfg.gammas)):
            table.append(dict(coupling=c, gamma=r["gamma"], rel_bias=r["rel_bias"], variance=r["variance"],
                              grad_norm=r["grad_norm"]))
    by_horizon = []
    for T in cfg.horizons:
        student, theta, teacher, phi = make_problem(cfg.vocab, T, cfg.train_coupling, cfg.problem_seed, dtype=dtype, device=device)
        for r in exact_estimator_stats(student, theta, teacher, phi, list(cfg.gammas)):
            by_horizon.append(dict(horizon=T, gamma=r["gamma"], rel_bias=r["rel_bias"], variance=r["variance"]))
    return table, by_horizon


def print_grid(title: str, rows: list[dict], row_key: str, value: str, fmt: str, gammas):
    """One line per value of row_key, one column per gamma."""
    print(title)
    print(f"  {row_key:>9} " + "".join(f"  {'g=' + format(g, '.2f'):>8}" for g in gammas))
    for key in dict.fromkeys(r[row_key] for r in rows):
        vals = {r["gamma"]: r[value] for r in rows if r[row_key] == key}
        print(f"  {key:>9g} " + "".join(f"  {format(vals[g], fmt):>8}" for g in gammas))


# -----------------------------------------------------------------------------
# part 1a (continued): training students on the discrete toy


def discrete_training(cfg: ToyConfig, device, dtype) -> tuple[list[dict], list[dict]]:
    """Every gamma x seed from sampled batches, plus one noise-free run per gamma.

    Returns (curves, summary): curves rows (gamma, run, step, kl), run = seed or "exact";
    summary rows per gamma with the final KL over seeds, the noise-free final KL and stability.
    """
    student, theta0, teacher, phi = make_problem(cfg.vocab, cfg.horizon, cfg.train_coupling, cfg.problem_seed,
                                                 dtype=dtype, device=device)
    curves, summary = [], []
    with tqdm(total=len(cfg.gammas) * (len(cfg.seeds) + 1), desc="discrete training", leave=False) as bar:
        for gamma in cfg.gammas:
            results = {}
            for seed in (*cfg.seeds, "exact"):
                noise_free = seed == "exact"
                results[seed] = res = train_student(student, theta0, teacher, phi, gamma, cfg.steps,
                                                    None if noise_free else cfg.batch_size, cfg.lr,
                                                    0 if noise_free else seed, cfg.optimizer, cfg.eval_every)
                curves += [dict(gamma=gamma, run=seed, step=s, kl=k) for s, k in zip(res["steps"], res["kl"])]
                bar.update(1)
            kls = [results[s]["final_kl"] for s in cfg.seeds]
            summary.append(dict(gamma=gamma, start_kl=results["exact"]["kl"][0], mean_kl=sum(kls) / len(kls),
                                min_kl=min(kls), max_kl=max(kls), noise_free_kl=results["exact"]["final_kl"],
                                n_runs=len(kls), n_unstable=sum(results[s]["unstable"] for s in cfg.seeds)))
    return curves, summary


def print_training(cfg: ToyConfig, summary: list[dict]):
    print(f"Training students on the discrete toy: V={cfg.vocab}, T={cfg.horizon}, coupling {cfg.train_coupling:g}, "
          f"{cfg.optimizer} lr {cfg.lr:g}, batch {cfg.batch_size}, {cfg.steps} steps, seeds "
          f"{','.join(map(str, cfg.seeds))}; KL at start {summary[0]['start_kl']:.3f}")
    print("  exact KL(student || teacher) after training; 'noise-free' = the same run with the exact E[g_gamma]")
    print(f"  {'gamma':>5}  {'mean KL':>8}  {'min':>7}  {'max':>7}  {'noise-free':>10}  unstable")
    for r in summary:
        print(f"  {r['gamma']:5.2f}  {r['mean_kl']:8.4f}  {r['min_kl']:7.4f}  {r['max_kl']:7.4f}  "
              f"{r['noise_free_kl']:10.4f}  {'yes' if r['n_unstable'] else 'no'} ({r['n_unstable']}/{r['n_runs']})")


# -----------------------------------------------------------------------------
# part 1b: the continuous-control replica


def control_points(cfg: ToyConfig) -> list[tuple]:
    """The (optimizer, lr, horizon) settings of the student to run: the --sweep points, or the one set by the flags."""
    return [(opt, lr, T or cfg.control_horizon) for opt, lr, T in cfg.sweep] or \
        [(cfg.student_optimizer, cfg.student_lr, cfg.control_horizon)]


def control(cfg: ToyConfig, device) -> tuple[list[dict], list[dict], dict, dict]:
    """Per seed and horizon two teachers, then one student per point, seed and gamma.

    Returns (variance log rows, final-position rows, visits, teacher errors): visits maps
    (optimizer, lr, horizon, gamma) to the state-visitation frequency (bins, T+1) of the evaluation
    episodes, pooled over tasks and seeds; teacher errors map (seed, horizon) to [err task 0, err task 1].
    """
    points = control_points(cfg)
    horizons = list(dict.fromkeys(T for _, _, T in points))
    total = len(cfg.control_seeds) * (2 * cfg.teacher_steps * len(horizons)
                                      + len(points) * len(cfg.control_gammas) * cfg.student_steps)
    lo, hi, bins = HEATMAP_RANGE
    log, finals, visits, teachers, teacher_err = [], [], {}, {}, {}
    with tqdm(total=total, desc="continuous control", leave=False) as bar:
        for opt, lr, T in points:
            for seed in cfg.control_seeds:
                if (seed, T) not in teachers:  # the teachers depend on the seed and the horizon only
                    teachers[seed, T] = [train_teacher(task, T, cfg.teacher_steps, cfg.control_batch, cfg.teacher_lr,
                                                       seed + task, cfg.hidden, device, bar) for task in (0, 1)]
                    teacher_err[seed, T] = [(final_positions(teachers[seed, T][k], T, cfg.eval_episodes, seed)[k]
                                             - TARGETS[k]).abs().mean().item() for k in (0, 1)]
                for gamma in cfg.control_gammas:
                    student, steps = distill_student(teachers[seed, T], gamma, T, cfg.student_steps, cfg.control_batch,
                                                     cfg.micro_batches, lr, seed + 2, cfg.hidden, device, bar, opt)
                    keys = dict(gamma=gamma, seed=seed, optimizer=opt, lr=lr, horizon=T)
                    log += [dict(keys, **row) for row in steps]
                    paths = trajectories(student, T, cfg.eval_episodes, seed + 3)  # [(n, T+1) per task]
                    finals += [dict(keys, task=k, episode=i, final_pos=p.item())
                               for k in (0, 1) for i, p in enumerate(paths[k][:, -1])]
                    share = 1 / (2 * len(cfg.control_seeds))  # every task and seed weighs the same
                    visits[opt, lr, T, gamma] = visits.get((opt, lr, T, gamma), 0) + \
                        share * sum(visitation(path, lo, hi, bins) for path in paths)
    return log, finals, visits, teacher_err


def thirds(values: list[float]) -> list[float]:
    """Mean of the first, middle and last third of a series."""
    n = len(values)
    cuts = [0, n // 3, 2 * n // 3, n]
    return [sum(values[a:b]) / max(b - a, 1) for a, b in zip(cuts, cuts[1:])]


def seed_thirds(cfg: ToyConfig, log: list[dict], select) -> list[float]:
    """Variance by thirds of training (early, mid, late) for the log rows `select` picks, mean over seeds."""
    per_seed = [thirds([r["variance"] for r in log if select(r) and r["seed"] == seed]) for seed in cfg.control_seeds]
    return [sum(v) / len(v) for v in zip(*per_seed)]


def control_summary(cfg: ToyConfig, log: list[dict], finals: list[dict]) -> list[dict]:
    """The replica's table: per gamma of the first point, variance by thirds and the mean end point per task."""
    opt, lr, T = control_points(cfg)[0]
    same = lambda r, gamma: r["gamma"] == gamma and (r["optimizer"], r["lr"], r["horizon"]) == (opt, lr, T)
    out = []
    for gamma in cfg.control_gammas:
        early, mid, late = seed_thirds(cfg, log, lambda r: same(r, gamma))
        row = dict(gamma=gamma, var_early=early, var_mid=mid, var_late=late)
        for k in (0, 1):
            pos = [r["final_pos"] for r in finals if same(r, gamma) and r["task"] == k]
            row[f"mean_pos_{k}"] = sum(pos) / len(pos)
            row[f"dist_{k}"] = sum(abs(p - TARGETS[k]) for p in pos) / len(pos)
        out.append(row)
    return out


def drift_summary(cfg: ToyConfig, log: list[dict], finals: list[dict]) -> list[dict]:
    """The paper's report: per point and gamma, variance by thirds and in orders of magnitude, and the drift.

    orders = log10(mean variance / mean variance of the smallest gamma at the same point), both the
    mean over the thirds of training and over seeds. The drift (toy.continuous.drift) is taken per
    seed and task and then pooled: `other`, `missed`, `dist` and `diverged` over all episodes, `sd_seeds` the
    standard deviation over seeds of each seed's mean distance, `sd_episodes` the mean over seeds and
    tasks of the standard deviation over episodes.
    """
    out = []
    for opt, lr, T in control_points(cfg):
        base = None
        for gamma in cfg.control_gammas:
            keys = dict(optimizer=opt, lr=lr, horizon=T, gamma=gamma)
            same = lambda r: all(r[k] == v for k, v in keys.items())
            early, mid, late = seed_thirds(cfg, log, same)
            var = (early + mid + late) / 3
            base = var if base is None else base
            runs = {(seed, k): drift(torch.tensor([r["final_pos"] for r in finals
                                                   if same(r) and r["seed"] == seed and r["task"] == k]), k)
                    for seed in cfg.control_seeds for k in (0, 1)}
            per_seed = [(runs[seed, 0]["dist"] + runs[seed, 1]["dist"]) / 2 for seed in cfg.control_seeds]
            mean = lambda name: sum(d[name] for d in runs.values()) / len(runs)
            out.append(dict(keys, var_early=early, var_mid=mid, var_late=late, var_mean=var,
                            orders=math.log10(var / base) if var > 0 and base > 0 else math.nan,
                            other=mean("other"), missed=mean("missed"), dist=mean("dist"), diverged=mean("diverged"),
                            sd_seeds=torch.tensor(per_seed).std().item() if len(per_seed) > 1 else 0.0,
                            sd_episodes=mean("dist_sd")))
    return out


def print_control(cfg: ToyConfig, summary: list[dict], teacher_err: dict):
    opt, lr, T = control_points(cfg)[0]
    seeds = f"seed{'s' if len(cfg.control_seeds) > 1 else ''} {','.join(map(str, cfg.control_seeds))}"
    print(f"Continuous control: T={T} moves, OPD batch {cfg.control_batch} = {cfg.micro_batches} "
          f"micro-batches, {cfg.student_steps} steps (tasks alternate), {OPT_NAMES[opt]} lr {lr:g}, {seeds}")
    if len(cfg.control_seeds) == 1:
        err = teacher_err[cfg.control_seeds[0], T]
        print(f"  teachers after {cfg.teacher_steps} REINFORCE steps: mean |s_T - target| = "
              f"{err[0]:.3f} (task 0), {err[1]:.3f} (task 1)")
    else:
        print_teachers(cfg, teacher_err)
    print("  head-gradient variance (trace over 8 micro-batches), mean over thirds of training; student end point")
    print(f"  {'gamma':>5}  {'var early':>9}  {'var mid':>9}  {'var late':>9}   "
          f"{'task0 s_T':>9}  {'|s_T+3|':>7}   {'task1 s_T':>9}  {'|s_T-3|':>7}")
    for r in summary:
        print(f"  {r['gamma']:5.2f}  {r['var_early']:9.3g}  {r['var_mid']:9.3g}  {r['var_late']:9.3g}   "
              f"{r['mean_pos_0']:9.3f}  {r['dist_0']:7.3f}   {r['mean_pos_1']:9.3f}  {r['dist_1']:7.3f}")


def print_teachers(cfg: ToyConfig, teacher_err: dict):
    """One line per horizon: every seed's teacher errors."""
    horizons = list(dict.fromkeys(T for _, T in teacher_err))
    for T in horizons:
        print(f"  teachers after {cfg.teacher_steps} REINFORCE steps{f' at T={T}' if len(horizons) > 1 else ''}, "
              f"mean |s_T - target| of task 0 / task 1: " +
              "; ".join(f"seed {seed} {e[0]:.3f} / {e[1]:.3f}" for (seed, t), e in teacher_err.items() if t == T))


def print_drift(cfg: ToyConfig, summary: list[dict], teacher_err: dict):
    """The table of --preset paper (one row per gamma) and of --sweep (one row per point and gamma)."""
    opt, lr, T = control_points(cfg)[0]
    n = len(cfg.control_seeds)
    seeds = f"seed{'s' if n > 1 else ''} {','.join(map(str, cfg.control_seeds))}"
    what = (f"Sweep of the continuous-control study over {len(cfg.sweep)} points optimizer:lr:T" if cfg.sweep else
            f"Continuous control (--preset paper): T={T} moves, {OPT_NAMES[opt]} lr {lr:g}")
    print(f"{what}, OPD batch {cfg.control_batch} = {cfg.micro_batches} micro-batches, {cfg.student_steps} steps "
          f"(tasks alternate), {seeds}")
    print_teachers(cfg, teacher_err)
    print(f"  head-gradient variance (trace over {cfg.micro_batches} micro-batches), mean over thirds of training and "
          f"over seeds;\n  orders = log10(variance / variance at gamma={cfg.control_gammas[0]:g}"
          f"{' of the same point' if cfg.sweep else ''}), both means over the whole run")
    print(f"  drift of the end points s_T over {2 * n * cfg.eval_episodes} episodes ({n} seed{'s' if n > 1 else ''} x "
          f"2 tasks x {cfg.eval_episodes}): other = share nearer the other\n  task's target, missed = share farther than "
          f"{MISS_TOL:g} from the own target z, |s_T-z| = mean distance to z, its sd\n  over seeds and over the episodes "
          f"of a run (mean over runs), diverged = share of non-finite s_T")
    head = f"{'opt':>4}  {'lr':>7}  {'T':>3}  " if cfg.sweep else ""  # the sweep's rows start with their point
    point = lambda r: f"{r['optimizer']:>4}  {r['lr']:7.0e}  {r['horizon']:3d}  " if cfg.sweep else ""
    print(f"  {head}{'gamma':>5}  "
          f"{'var early':>9}  {'var mid':>9}  {'var late':>9}  {'orders':>6}   "
          f"{'other':>6}  {'missed':>6}  {'|s_T-z|':>7}  {'sd seeds':>8}  {'sd eps':>7}  {'diverged':>8}")
    for r in summary:
        print(f"  {point(r)}{r['gamma']:5.2f}  {r['var_early']:9.3g}  {r['var_mid']:9.3g}  {r['var_late']:9.3g}  "
              f"{r['orders']:6.2f}   {r['other']:6.3f}  {r['missed']:6.3f}  {r['dist']:7.3g}  {r['sd_seeds']:8.3g}  "
              f"{r['sd_episodes']:7.3g}  {r['diverged']:8.3f}")


# -----------------------------------------------------------------------------
# reading the numbers


def reading(cfg: ToyConfig, table, by_horizon, train_summary, ctrl_summary) -> list[str]:
    """Two plain-language lines, each claim computed from the numbers above (one per point for --preset/--sweep)."""
    if ctrl_summary and "other" in ctrl_summary[0]:  # the drift report of --preset paper and --sweep
        return reading(cfg, table, by_horizon, train_summary, []) + reading_drift(ctrl_summary)
    lines = []
    if table:
        g0, g1 = min(cfg.gammas), max(cfg.gammas)
        cmax = max(cfg.couplings)
        bias = [r["rel_bias"] for r in table if r["coupling"] == cmax]
        var = [r["variance"] for r in table if r["coupling"] == cmax]
        falls = all(a >= b for a, b in zip(bias, bias[1:]))
        rises = all(a <= b for a, b in zip(var, var[1:]))
        zero_c = max((r["rel_bias"] for r in table if r["coupling"] == 0), default=None)
        line = (f"Exact toy: at coupling {cmax:g} the relative bias {'falls steadily' if falls else 'goes'} from "
                f"{bias[0]:.2f} (gamma={g0:g}) to {bias[-1]:.0e} (gamma={g1:g}) while the variance "
                f"{'rises' if rises else 'changes'} {var[-1] / var[0]:.0f}x")
        if zero_c is not None:
            line += f"; at coupling 0 the bias is at most {zero_c:.0e} for every gamma"
        hv = [r["variance"] for r in by_horizon if r["gamma"] == g1]
        if len(hv) > 1:
            line += (f"; at gamma={g1:g} the variance grows {hv[-1] / hv[0]:.0f}x from T={cfg.horizons[0]} "
                     f"to T={cfg.horizons[-1]}")
        lines.append(line + ".")
    parts = []
    if train_summary:
        best = min(train_summary, key=lambda r: r["mean_kl"])
        nf = min(train_summary, key=lambda r: r["noise_free_kl"])
        unstable = sum(r["n_unstable"] for r in train_summary)
        wide = max(train_summary, key=lambda r: r["max_kl"] - r["min_kl"])
        parts.append(f"Trained from samples, the lowest mean final KL is with gamma={best['gamma']:g} "
                     f"({best['mean_kl']:.3f}; noise-free: gamma={nf['gamma']:g}, {nf['noise_free_kl']:.3f}), the widest "
                     f"spread over seeds with gamma={wide['gamma']:g} ({wide['min_kl']:.3f} to {wide['max_kl']:.3f}), "
                     f"{unstable} of {sum(r['n_runs'] for r in train_summary)} runs unstable")
    if ctrl_summary:
        lo, hi = ctrl_summary[0], ctrl_summary[-1]
        mean_var = lambda r: (r["var_early"] + r["var_mid"] + r["var_late"]) / 3
        ratio = mean_var(hi) / mean_var(lo)
        dist = lambda r: (r["dist_0"] + r["dist_1"]) / 2
        parts.append(f"in the control replica gamma={hi['gamma']:g} has {ratio:.0f}x the gradient variance of "
                     f"gamma={lo['gamma']:g} ({math.log10(ratio):.1f} orders of magnitude) and ends "
                     f"{dist(hi):.3f} from the targets on average vs {dist(lo):.3f}")
    if parts:
        lines.append("; ".join(parts) + ".")
    return lines


def reading_drift(summary: list[dict]) -> list[str]:
    """One line per point: the largest gamma against the smallest, variance and drift."""
    lines = []
    for point in dict.fromkeys((r["optimizer"], r["lr"], r["horizon"]) for r in summary):
        rows = [r for r in summary if (r["optimizer"], r["lr"], r["horizon"]) == point]
        lo, hi = rows[0], rows[-1]
        line = (f"{OPT_NAMES[point[0]]} lr {point[1]:g}, T={point[2]}: gamma={hi['gamma']:g} has "
                f"{10 ** hi['orders']:.3g}x the gradient variance of gamma={lo['gamma']:g} ({hi['orders']:.1f} orders of "
                f"magnitude); end points nearer the other task's target {hi['other']:.1%} vs {lo['other']:.1%}, "
                f"farther than {MISS_TOL:g} from their own {hi['missed']:.1%} vs {lo['missed']:.1%}, mean distance to "
                f"the own target {hi['dist']:.3g} vs {lo['dist']:.3g}")
        if hi["diverged"] or lo["diverged"]:
            line += f", diverged {hi['diverged']:.1%} vs {lo['diverged']:.1%}"
        lines.append(line + ".")
    return lines


# -----------------------------------------------------------------------------
# output: CSV files and figures


def write_csv(path: str, rows: list[dict]):
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot_figures(cfg: ToyConfig, table, curves, log, finals, visits) -> list[str]:
    """PNG figures; matplotlib is optional and imported only here. Returns the files written.

    With --sweep only the heatmaps are drawn (one row per point); visits is {} when no heatmap is wanted.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []

    def save(fig, name):
        path = os.path.join(cfg.out, name)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    if table:
        fig, (ax_b, ax_v) = plt.subplots(1, 2, figsize=(10, 4))
        for c in cfg.couplings:
            rows = [r for r in table if r["coupling"] == c]
            ax_b.plot([r["gamma"] for r in rows], [r["rel_bias"] for r in rows], "o-", label=f"c={c:g}")
            ax_v.plot([r["gamma"] for r in rows], [r["variance"] for r in rows], "o-", label=f"c={c:g}")
        ax_b.set(xlabel="gamma", ylabel="||E[g] - grad J|| / ||grad J||", title="relative bias (exact)")
        ax_v.set(xlabel="gamma", ylabel="tr Cov[g]", title="variance (exact)", yscale="log")
        ax_b.legend()
        save(fig, "bias_variance.png")
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, gamma in enumerate(cfg.gammas):
            for run in (*cfg.seeds, "exact"):
                rows = [r for r in curves if r["gamma"] == gamma and r["run"] == run]
                ax.plot([r["step"] for r in rows], [r["kl"] for r in rows], color=f"C{i}",
                        lw=2 if run == "exact" else 0.7, ls="--" if run == "exact" else "-",
                        label=f"gamma={gamma:g}" if run == "exact" else None)
        ax.set(xlabel="step", ylabel="KL(student || teacher)", yscale="log",
               title="discrete students (dashed: exact expected gradient)")
        ax.legend()
        save(fig, "discrete_training.png")
    if log and not cfg.sweep:
        fig, ax = plt.subplots(figsize=(6, 4))
        for gamma in cfg.control_gammas:  # the mean over seeds at each step
            rows = [r for r in log if r["gamma"] == gamma]
            steps = list(dict.fromkeys(r["step"] for r in rows))
            per_step = {}
            for r in rows:
                per_step.setdefault(r["step"], []).append(r["variance"])
            ax.plot(steps, [sum(per_step[t]) / len(per_step[t]) for t in steps], lw=0.8, label=f"gamma={gamma:g}")
        ax.set(xlabel="OPD step", ylabel="head-gradient variance", yscale="log", title="continuous control")
        ax.legend()
        save(fig, "control_variance.png")
    if finals and not cfg.sweep:
        fig, axes = plt.subplots(1, len(cfg.control_gammas), figsize=(4 * len(cfg.control_gammas), 3.5),
                                 sharey=True, squeeze=False)
        lo, hi = min(r["final_pos"] for r in finals), max(r["final_pos"] for r in finals)
        bins = [lo + (hi - lo) * i / 100 for i in range(101)]  # the same bins in every panel
        for ax, gamma in zip(axes[0], cfg.control_gammas):
            for k in (0, 1):
                ax.hist([r["final_pos"] for r in finals if r["gamma"] == gamma and r["task"] == k], bins=bins,
                        alpha=0.6, label=f"task {k}")
                ax.axvline(TARGETS[k], color="k", ls="--", lw=1)
            ax.set(title=f"gamma={gamma:g}", xlabel="final position s_T")
        axes[0, 0].legend()
        save(fig, "final_positions.png")
    if visits:  # one row per point (one row without --sweep), one column per gamma
        from matplotlib.colors import LogNorm
        lo, hi, bins = HEATMAP_RANGE
        points = control_points(cfg)
        fig, axes = plt.subplots(len(points), len(cfg.control_gammas), figsize=(2.6 * len(cfg.control_gammas) + 1.2,
                                 2.4 * len(points) + 0.6), sharey=True, squeeze=False)  # own x range per row: T varies
        floor = 1 / (2 * len(cfg.control_seeds) * cfg.eval_episodes)  # one visit of one episode
        cmap = plt.get_cmap("magma").copy()
        cmap.set_bad(cmap(0.0))  # never visited (0, masked by the log scale): the darkest colour
        for i, (row, (opt, lr, T)) in enumerate(zip(axes, points)):
            for ax, gamma in zip(row, cfg.control_gammas):
                freq = visits[opt, lr, T, gamma].numpy()  # (bins, T+1)
                im = ax.imshow(freq, origin="lower", aspect="auto", cmap=cmap, norm=LogNorm(floor, 1),
                               extent=(-0.5, T + 0.5, lo, hi), interpolation="nearest")
                for z in TARGETS:
                    ax.axhline(z, color="c", ls="--", lw=0.8)
                if i == 0:
                    ax.set_title(f"gamma={gamma:g}", fontsize=10)
            row[0].set_ylabel((f"{OPT_NAMES[opt]} lr {lr:g}, T={T}\n" if cfg.sweep else "") + "position s_t")
        for ax in axes[-1]:
            ax.set_xlabel("time step t")
        n = len(cfg.control_seeds)
        height = 2.4 * len(points) + 0.6
        fig.suptitle(f"state visitation over {n} seed{'s' if n > 1 else ''} x 2 tasks x {cfg.eval_episodes} episodes "
                     f"(targets dashed; positions beyond +-{hi:g} in the edge rows)", fontsize=10, y=1 + 0.3 / height)
        fig.colorbar(im, ax=axes, shrink=0.8 if len(points) == 1 else 0.25, label="share of episodes")
        path = os.path.join(cfg.out, "control_heatmaps.png")  # a colorbar over all axes: no tight_layout
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


# -----------------------------------------------------------------------------
# main


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    try:
        device = pick_device(cfg.device)  # auto: cuda -> mps -> cpu
    except ValueError as e:
        sys.exit(f"error: {e}")
    if cfg.dtype == "float64" and device.type == "mps":
        sys.exit("error: --dtype float64: MPS has no float64; use --dtype auto or float32 (or --device cpu)")
    dtype = torch.float32 if cfg.dtype == "float32" or (cfg.dtype == "auto" and device.type == "mps") else torch.float64
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    if cfg.train_coupling is None:
        cfg.train_coupling = max(cfg.couplings)
    os.makedirs(cfg.out, exist_ok=True)
    t_start = time.time()
    print(f"device {device}, {'float64' if dtype == torch.float64 else 'float32'}"
          f"{' (--quick)' if cfg.quick else ''}; outputs in {cfg.out}")

    table, by_horizon, curves, train_summary, log, finals, ctrl_summary = [], [], [], [], [], [], []
    if "exact" in cfg.parts:
        t0 = time.time()
        table, by_horizon = exact_tables(cfg, device, dtype)
        print(f"\nExact bias and variance of g_gamma: V={cfg.vocab}, T={cfg.horizon}, "
              f"{cfg.vocab ** cfg.horizon} sequences enumerated, problem seed {cfg.problem_seed} ({time.time() - t0:.1f} s)")
        print_grid("relative bias ||E[g_gamma] - grad J|| / ||grad J||", table, "coupling", "rel_bias", ".4f", cfg.gammas)
        print_grid("variance tr Cov[g_gamma]", table, "coupling", "variance", ".4g", cfg.gammas)
        print_grid(f"variance tr Cov[g_gamma] by horizon T (coupling {cfg.train_coupling:g})", by_horizon,
                   "horizon", "variance", ".4g", cfg.gammas)
        write_csv(os.path.join(cfg.out, "exact_table.csv"), table)
        write_csv(os.path.join(cfg.out, "exact_by_horizon.csv"), by_horizon)
    if "train" in cfg.parts:
        t0 = time.time()
        curves, train_summary = discrete_training(cfg, device, dtype)
        print()
        print_training(cfg, train_summary)
        print(f"  ({time.time() - t0:.1f} s)")
        write_csv(os.path.join(cfg.out, "discrete_training.csv"), curves)
        write_csv(os.path.join(cfg.out, "discrete_summary.csv"), train_summary)
    visits = {}
    if "control" in cfg.parts:
        t0 = time.time()
        log, finals, visits, teacher_err = control(cfg, device)
        print()
        if cfg.sweep or cfg.preset == "paper":  # the paper's report: drift, orders of magnitude, heatmaps
            ctrl_summary = drift_summary(cfg, log, finals)
            print_drift(cfg, ctrl_summary, teacher_err)
        else:
            ctrl_summary, visits = control_summary(cfg, log, finals), {}
            print_control(cfg, ctrl_summary, teacher_err)
        print(f"  ({time.time() - t0:.1f} s)")
        write_csv(os.path.join(cfg.out, "control_variance.csv"), log)
        write_csv(os.path.join(cfg.out, "control_final_positions.csv"), finals)
        write_csv(os.path.join(cfg.out, "control_summary.csv"), ctrl_summary)

    print("\nReading:")
    for line in reading(cfg, table, by_horizon, train_summary, ctrl_summary):
        print("  " + line)
    if cfg.plots:
        figures = plot_figures(cfg, table, curves, log, finals, visits)
        if figures:
            print("figures: " + ", ".join(figures))
        else:
            print("figures: matplotlib is not installed; `pip install matplotlib` and rerun to get the PNGs")
    print(f"total {time.time() - t_start:.1f} s")
    return dict(config=cfg, table=table, by_horizon=by_horizon, train_summary=train_summary, control_summary=ctrl_summary)


if __name__ == "__main__":
    main()
