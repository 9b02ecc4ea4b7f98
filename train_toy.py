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
     tasks, one REINFORCE teacher each, one student distilled with g_gamma.

Commands:

    python train_toy.py                      # everything, about 20-30 s on 2 CPU cores
    python train_toy.py --device cuda        # the same on one GPU (the toy is tiny: CPU is fine)
    python train_toy.py --quick              # a smaller run in a few seconds (used by the tests)
    python train_toy.py --dtype float32      # the Mac (MPS) precision on any device: no float64
    python train_toy.py --parts exact        # only the exact bias/variance tables
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
from toy.continuous import TARGETS, distill_student, final_positions, train_teacher
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
    control_seed: int = 0                          # seeds teachers (seed, seed+1) and student (seed+2)
    # run
    out: str = "out/toy"                           # folder for CSV files and figures
    device: str = "auto"                           # auto = cuda -> mps -> cpu
    dtype: str = "auto"                            # exact toy: auto = float64, float32 on MPS (no float64 there)
    threads: int = 1                               # CPU threads; one is fastest for tensors this small
    plots: bool = True                             # write PNG figures when matplotlib is installed
    quick: bool = False                            # smaller sizes, for tests and a first look


QUICK = dict(horizon=4, horizons=(2, 3, 4), seeds=(0, 1), steps=40, teacher_steps=40, student_steps=20,
             eval_episodes=64)  # what --quick changes

# -----------------------------------------------------------------------------
# command line


def float_list(text: str) -> tuple:
    """ "0,0.5,1" -> (0.0, 0.5, 1.0) """
    return tuple(float(x) for x in text.split(","))


def int_list(text: str) -> tuple:
    """ "0,1,2" -> (0, 1, 2) """
    return tuple(int(x) for x in text.split(","))


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
    g.add_argument("--student-lr", type=float, default=d.student_lr, help="Adam learning rate of the student (default %(default)s)")
    g.add_argument("--control-batch", type=int, default=d.control_batch, help="episodes per OPD step (default %(default)s)")
    g.add_argument("--micro-batches", type=int, default=d.micro_batches,
                   help="micro-batches the batch is split into to measure gradient variance (default %(default)s)")
    g.add_argument("--hidden", type=int, default=d.hidden, help="hidden width of the policy MLPs (default %(default)s)")
    g.add_argument("--eval-episodes", type=int, default=d.eval_episodes,
                   help="episodes per task for the final positions (default %(default)s)")
    g.add_argument("--control-seed", type=int, default=d.control_seed, help="seed of teachers and student (default %(default)s)")

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
    if cfg.quick:  # --quick sets the sizes it names unless the same flag was also given explicitly
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])}
        cfg = replace(cfg, **{k: v for k, v in QUICK.items() if k not in given})
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
    if not cfg.seeds:
        raise ValueError("--seeds needs at least one seed")
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


def control(cfg: ToyConfig, device) -> tuple[list[dict], list[dict], list[float]]:
    """Teachers, then one student per gamma. Returns (variance log rows, final-position rows, teacher errors)."""
    total = 2 * cfg.teacher_steps + len(cfg.control_gammas) * cfg.student_steps
    with tqdm(total=total, desc="continuous control", leave=False) as bar:
        teachers = [train_teacher(task, cfg.control_horizon, cfg.teacher_steps, cfg.control_batch, cfg.teacher_lr,
                                  cfg.control_seed + task, cfg.hidden, device, bar) for task in (0, 1)]
        teacher_err = [(final_positions(teachers[k], cfg.control_horizon, cfg.eval_episodes, cfg.control_seed)[k]
                        - TARGETS[k]).abs().mean().item() for k in (0, 1)]
        log, finals = [], []
        for gamma in cfg.control_gammas:
            student, steps = distill_student(teachers, gamma, cfg.control_horizon, cfg.student_steps, cfg.control_batch,
                                             cfg.micro_batches, cfg.student_lr, cfg.control_seed + 2, cfg.hidden,
                                             device, bar)
            log += [dict(gamma=gamma, **row) for row in steps]
            pos = final_positions(student, cfg.control_horizon, cfg.eval_episodes, cfg.control_seed + 3)
            finals += [dict(gamma=gamma, task=k, episode=i, final_pos=p.item()) for k in (0, 1) for i, p in enumerate(pos[k])]
    return log, finals, teacher_err


def thirds(values: list[float]) -> list[float]:
    """Mean of the first, middle and last third of a series."""
    n = len(values)
    cuts = [0, n // 3, 2 * n // 3, n]
    return [sum(values[a:b]) / max(b - a, 1) for a, b in zip(cuts, cuts[1:])]


def control_summary(cfg: ToyConfig, log: list[dict], finals: list[dict]) -> list[dict]:
    out = []
    for gamma in cfg.control_gammas:
        early, mid, late = thirds([r["variance"] for r in log if r["gamma"] == gamma])
        row = dict(gamma=gamma, var_early=early, var_mid=mid, var_late=late)
        for k in (0, 1):
            pos = [r["final_pos"] for r in finals if r["gamma"] == gamma and r["task"] == k]
            row[f"mean_pos_{k}"] = sum(pos) / len(pos)
            row[f"dist_{k}"] = sum(abs(p - TARGETS[k]) for p in pos) / len(pos)
        out.append(row)
    return out


def print_control(cfg: ToyConfig, summary: list[dict], teacher_err: list[float]):
    print(f"Continuous control: T={cfg.control_horizon} moves, OPD batch {cfg.control_batch} = {cfg.micro_batches} "
          f"micro-batches, {cfg.student_steps} steps (tasks alternate), Adam lr {cfg.student_lr:g}, seed {cfg.control_seed}")
    print(f"  teachers after {cfg.teacher_steps} REINFORCE steps: mean |s_T - target| = "
          f"{teacher_err[0]:.3f} (task 0), {teacher_err[1]:.3f} (task 1)")
    print("  head-gradient variance (trace over 8 micro-batches), mean over thirds of training; student end point")
    print(f"  {'gamma':>5}  {'var early':>9}  {'var mid':>9}  {'var late':>9}   "
          f"{'task0 s_T':>9}  {'|s_T+3|':>7}   {'task1 s_T':>9}  {'|s_T-3|':>7}")
    for r in summary:
        print(f"  {r['gamma']:5.2f}  {r['var_early']:9.3g}  {r['var_mid']:9.3g}  {r['var_late']:9.3g}   "
              f"{r['mean_pos_0']:9.3f}  {r['dist_0']:7.3f}   {r['mean_pos_1']:9.3f}  {r['dist_1']:7.3f}")


# -----------------------------------------------------------------------------
# reading the numbers


def reading(cfg: ToyConfig, table, by_horizon, train_summary, ctrl_summary) -> list[str]:
    """Two plain-language lines, each claim computed from the numbers above."""
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


# -----------------------------------------------------------------------------
# output: CSV files and figures


def write_csv(path: str, rows: list[dict]):
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot_figures(cfg: ToyConfig, table, curves, log, finals) -> list[str]:
    """PNG figures; matplotlib is optional and imported only here. Returns the files written."""
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
    if log:
        fig, ax = plt.subplots(figsize=(6, 4))
        for gamma in cfg.control_gammas:
            ax.plot([r["step"] for r in log if r["gamma"] == gamma],
                    [r["variance"] for r in log if r["gamma"] == gamma], lw=0.8, label=f"gamma={gamma:g}")
        ax.set(xlabel="OPD step", ylabel="head-gradient variance", yscale="log", title="continuous control")
        ax.legend()
        save(fig, "control_variance.png")
    if finals:
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
    if "control" in cfg.parts:
        t0 = time.time()
        log, finals, teacher_err = control(cfg, device)
        ctrl_summary = control_summary(cfg, log, finals)
        print()
        print_control(cfg, ctrl_summary, teacher_err)
        print(f"  ({time.time() - t0:.1f} s)")
        write_csv(os.path.join(cfg.out, "control_variance.csv"), log)
        write_csv(os.path.join(cfg.out, "control_final_positions.csv"), finals)
        write_csv(os.path.join(cfg.out, "control_summary.csv"), ctrl_summary)

    print("\nReading:")
    for line in reading(cfg, table, by_horizon, train_summary, ctrl_summary):
        print("  " + line)
    if cfg.plots:
        figures = plot_figures(cfg, table, curves, log, finals)
        if figures:
            print("figures: " + ", ".join(figures))
        else:
            print("figures: matplotlib is not installed; `pip install matplotlib` and rerun to get the PNGs")
    print(f"total {time.time() - t_start:.1f} s")
    return dict(config=cfg, table=table, by_horizon=by_horizon, train_summary=train_summary, control_summary=ctrl_summary)


if __name__ == "__main__":
    main()
