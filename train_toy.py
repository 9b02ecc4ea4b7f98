"""
train_toy.py: the future-reward-coupling study. How the discount gamma of the OPD gradient
estimator g_gamma trades bias for variance (docs/design.md#the-future-reward-coupling-toy).

    g_gamma = sum_t ( sum_{t' >= t} gamma^(t'-t) r_t' ) s_t,   r_t = log pi(y_t|c_t) - log q(y_t|c_t)

gamma = 0 is sampled-token OPD, gamma = 1 the unbiased REINFORCE gradient of the sequence KL J. Two toys:

  1. an exact discrete toy (toy/exact.py): every sequence of a tiny tabular student is enumerated,
     so the bias and variance of g_gamma are exact numbers; then students are trained with each
     gamma from sampled batches, next to the same runs driven by the exact expected gradient;
  2. a continuous-control replica of the published study (toy/continuous.py): two 1-D reaching
     tasks, one REINFORCE teacher each, one student distilled with g_gamma. --preset paper runs it
     at the published settings (T = 20, 2,000 steps, gammas 0 to 1 by 0.25, seeds 42, 43, 2026) and
     reports the paper's way (--drift: drift of the end points, orders of magnitude, heatmaps).

Every run of a study (each gamma x seed, each teacher) is a slice of one batched computation
(toy/runs.py). Commands:

    python train_toy.py                      # everything, about 10 s on 2 CPU cores
    python train_toy.py --quick              # a smaller run in a few seconds (used by the tests)
    python train_toy.py --dtype float32      # the Mac (MPS) precision on any device: no float64
    python train_toy.py --parts exact        # only the exact bias/variance tables
    python train_toy.py --preset paper       # the control study at the published settings, under a minute on CPU
    python train_toy.py --preset paper --control_gammas 0,1 --sweep sgd:1e-6,adam:3e-3,adam:3e-3:10
                                             # the same once per optimizer:lr[:T], one table (docs/toy.md)
    python train_toy.py --help               # every flag and its default; lists are comma-separated

Outputs go to --out (default out/toy): CSV files always, PNG figures when matplotlib is installed.
"""

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from nanoopd.config import ConfigError, parse_config
from nanoopd.device import pick_device
from toy import report
from toy.continuous import OPTIMIZERS, TARGETS, distill_students, train_teachers, trajectories
from toy.exact import MAX_SEQUENCES, exact_estimator_stats, make_problem, train_students

# -----------------------------------------------------------------------------
# config: every field is a flag (nanoopd/config.py), its comment the help; lists are comma-separated


def sweep_points(text: str) -> tuple:
    """ "sgd:1e-4,adam:3e-3:10" -> (("sgd", 1e-4, None), ("adam", 3e-3, 10)): optimizer:lr[:horizon] """
    for p in (points := [item.split(":") for item in text.split(",")]):
        if len(p) not in (2, 3) or p[0] not in OPTIMIZERS:
            raise argparse.ArgumentTypeError(f"sweep point {':'.join(p)!r} is not optimizer:lr or optimizer:lr:horizon, "
                                             f"optimizer sgd or adam (e.g. sgd:1e-4,adam:3e-3:10)")
    try:
        return tuple((p[0], float(p[1]), int(p[2]) if len(p) == 3 else None) for p in points)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sweep {text!r}: every lr must be a number and every horizon an integer")


@dataclass
class ToyConfig:
    # --- what to run
    parts: tuple[str, ...] = ("exact", "train", "control")  # stages, any of exact,train,control: exact tables, discrete training, continuous control
    quick: bool = False              # a smaller, shorter run in a few seconds: horizon=4, horizons=2,3,4, seeds=0,1, steps=40, teacher_steps=40, student_steps=20, eval_episodes=64
    # --- exact discrete toy
    vocab: int = 3                   # V, tokens in the vocabulary
    horizon: int = 6                 # T, sequence length; all V^T sequences are enumerated (3^6 = 729; at most 200000)
    couplings: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)  # coupling strengths c >= 0, rows of the table; 0 = no dependence on the prefix
    gammas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # discounts in [0, 1] for the table and for training
    horizons: tuple[int, ...] = (2, 4, 6, 8)    # horizons of the variance-vs-T table, at the training coupling
    problem_seed: int = 0            # seed of the teacher and of the student's starting point
    # --- training students on the discrete toy
    train_coupling: float | None = None  # coupling c used for training (None: the largest of --couplings)
    seeds: tuple[int, ...] = (0, 1, 2, 3)       # sampling seeds; every gamma is trained once per seed, all runs in one batch
    steps: int = 300                 # optimisation steps per run
    batch_size: int = 16             # sequences sampled per step
    optimizer: str = field(default="sgd", metadata={"choices": ("sgd", "adam")})  # sgd (plain; its step is the sampled gradient) or adam
    lr: float = 0.3                  # learning rate of the discrete students
    eval_every: int = 10             # compute the exact KL(student || teacher) every this many steps
    # --- continuous-control replica
    control_gammas: tuple[float, ...] = (0.0, 0.5, 1.0)  # discounts in [0, 1] distilled in the continuous toy
    control_horizon: int = 10        # moves per episode
    teacher_steps: int = 200         # REINFORCE steps per teacher
    teacher_lr: float = 0.01         # Adam learning rate of the teachers
    student_steps: int = 300         # OPD steps of the students, tasks alternating
    student_optimizer: str = field(default="adam", metadata={"choices": tuple(OPTIMIZERS)})  # adam, or sgd (plain, no momentum: the step is lr * g_gamma, so its variance reaches the weights unnormalised)
    student_lr: float = 3e-3         # learning rate of the students' optimizer
    control_batch: int = 64          # episodes per OPD step
    micro_batches: int = 8           # micro-batches the batch is split into to measure the gradient variance
    hidden: int = 32                 # hidden width of the Gaussian MLP policies
    eval_episodes: int = 256         # episodes per task and run for the end points
    control_seeds: tuple[int, ...] = (0,)       # each seed s trains its own teachers (seeds s, s+1) and students (s+2), evaluated with s+3
    drift: bool = False              # report as the paper does: drift of the end points (with 95% intervals over seeds), variance in orders of magnitude, state-visitation heatmaps
    sweep: sweep_points = ()         # run the control study once per point optimizer:lr[:T] (e.g. sgd:1e-4,adam:3e-3:10; T defaults to --control_horizon), one table of variance and drift
    # --- run
    out: str = "out/toy"             # output folder for CSV files and figures
    device: str = "auto"             # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    dtype: str = field(default="auto", metadata={"choices": ("auto", "float32", "float64")})  # precision of the exact toy: auto = float64, except float32 on MPS (no float64 there); float32 runs the MPS path on any device
    threads: int = 1                 # CPU threads for torch; more can be faster on an idle machine, several times slower on a busy one
    plots: bool = True               # write PNG figures when matplotlib is installed

    def __post_init__(self):
        """Every setting is checked before anything runs; an error names its flag and what to do."""
        if not self.parts or set(self.parts) - {"exact", "train", "control"}:
            raise ConfigError("parts", f"takes exact, train and/or control, got {','.join(self.parts)}")
        for name in ("gammas", "control_gammas"):
            if not getattr(self, name) or any(not 0.0 <= x <= 1.0 for x in getattr(self, name)):
                raise ConfigError(name, f": every gamma must lie in [0, 1], got {list(getattr(self, name))}")
        self.train_coupling = max(self.couplings, default=0.0) if self.train_coupling is None else self.train_coupling
        for name, values in (("couplings", self.couplings), ("train_coupling", (self.train_coupling,))):
            if not values or any(not (c >= 0 and math.isfinite(c)) for c in values):
                raise ConfigError(name, f"must be finite and >= 0, got {list(values)}")
        for T in (self.horizon, *self.horizons):
            if T < 1 or self.vocab ** T > MAX_SEQUENCES:
                raise ConfigError("horizon", f"{T}: V^T = {self.vocab}^{T} sequences cannot be enumerated (need T >= 1 "
                                  f"and at most {MAX_SEQUENCES}); lower --vocab, --horizon or --horizons")
        for name in ("vocab", "micro_batches", "steps", "batch_size", "eval_every", "control_horizon", "teacher_steps",
                     "student_steps", "control_batch", "hidden", "eval_episodes", "threads"):
            if getattr(self, name) < (least := 2 if name in ("vocab", "micro_batches") else 1):
                raise ConfigError(name, f"must be at least {least}, got {getattr(self, name)}")
        if not self.seeds or not self.control_seeds:
            raise ConfigError("seeds" if not self.seeds else "control_seeds", "needs at least one seed")
        for opt, lr, T in self.sweep:
            if not (lr > 0 and math.isfinite(lr)) or (T is not None and T < 1):
                raise ConfigError("sweep", f"{opt}:{lr:g}{'' if T is None else f':{T}'}: lr must be > 0 and horizon >= 1")
        if self.sweep and "control" not in self.parts:
            raise ConfigError("sweep", "runs the control study: add control to --parts (or use --preset paper)")
        if self.control_batch % self.micro_batches:
            raise ConfigError("control_batch", f"{self.control_batch} must split into --micro_batches "
                              f"{self.micro_batches} equal micro-batches, e.g. 64 and 8")


QUICK = dict(horizon=4, horizons=(2, 3, 4), seeds=(0, 1), steps=40, teacher_steps=40, student_steps=20,
             eval_episodes=64)  # what --quick changes (flags given explicitly still win)
PRESETS = {
    "replica": {},  # the defaults above: both toys, the replica at T = 10 and 300 steps
    # the published study: horizon ~20, ~2,000 alternating-task iterations, batch 64 in 8 micro-batches, five gammas;
    # no optimizer or lr is published: the replica's Adam at 3e-3. Three seeds (docs/toy.md: ten, for the drift shares)
    "paper": dict(parts=("control",), control_gammas=(0.0, 0.25, 0.5, 0.75, 1.0), control_horizon=20,
                  student_steps=2000, control_seeds=(42, 43, 2026), drift=True),
}


def parse_args(argv=None) -> ToyConfig:
    argv = sys.argv[1:] if argv is None else list(argv)  # --quick applies QUICK on top of the chosen preset
    presets = {name: {**p, **QUICK} for name, p in PRESETS.items()} if "--quick" in argv else PRESETS
    return parse_config(ToyConfig, argv, description=__doc__, presets=presets)


def control_points(cfg: ToyConfig) -> list[tuple]:
    """The (optimizer, lr, horizon) settings of the students: the --sweep points, or the one set by the flags."""
    return [(opt, lr, T or cfg.control_horizon) for opt, lr, T in cfg.sweep] or \
        [(cfg.student_optimizer, cfg.student_lr, cfg.control_horizon)]


# -----------------------------------------------------------------------------
# the studies


def exact_tables(cfg: ToyConfig, device, dtype) -> tuple[list[dict], list[dict]]:
    """Rows (coupling, gamma, rel_bias, variance, grad_norm) and (horizon, gamma, rel_bias, variance)."""
    stats = lambda c, T: exact_estimator_stats(*make_problem(cfg.vocab, T, c, cfg.problem_seed, dtype=dtype, device=device),
                                               list(cfg.gammas))  # one dict per gamma
    return ([dict(coupling=c, gamma=r["gamma"], rel_bias=r["rel_bias"], variance=r["variance"], grad_norm=r["grad_norm"])
             for c in cfg.couplings for r in stats(c, cfg.horizon)],
            [dict(horizon=T, gamma=r["gamma"], rel_bias=r["rel_bias"], variance=r["variance"])
             for T in cfg.horizons for r in stats(cfg.train_coupling, T)])


def discrete_training(cfg: ToyConfig, device, dtype) -> tuple[dict, dict]:
    """Every gamma x seed from sampled batches in one batch (run r = gamma index * S + seed index), and one
    noise-free run per gamma in another: the two results of toy.exact.train_students."""
    problem = make_problem(cfg.vocab, cfg.horizon, cfg.train_coupling, cfg.problem_seed, dtype=dtype, device=device)
    sampled = train_students(*problem, [g for g in cfg.gammas for _ in cfg.seeds], list(cfg.seeds) * len(cfg.gammas),
                             cfg.steps, cfg.batch_size, cfg.lr, cfg.optimizer, cfg.eval_every)
    noise_free = train_students(*problem, list(cfg.gammas), [0] * len(cfg.gammas), cfg.steps, None, cfg.lr,
                                cfg.optimizer, cfg.eval_every)
    return sampled, noise_free


def control(cfg: ToyConfig, device) -> tuple[list[dict], dict]:
    """Per horizon the teachers of every task and seed in one batch, per point the students of every gamma and seed
    (run r = gamma index * S + seed index). Returns per point its log ((steps, R) tensors), end points ends (R, 2, n)
    and evaluation paths (G, S*2*n, T+1); per horizon each seed's two teachers' mean |s_T - target| (S, 2)."""
    S, G, n = len(cfg.control_seeds), len(cfg.control_gammas), cfg.eval_episodes
    points = control_points(cfg)
    horizons = list(dict.fromkeys(T for _, _, T in points))
    total = 2 * S * cfg.teacher_steps * len(horizons) + len(points) * G * S * cfg.student_steps
    teachers, teacher_err, results = {}, {}, []
    with tqdm(total=total, desc="continuous control", leave=False) as bar:
        for T in horizons:  # run 2i + k: the teacher of task k for seed i, trained with seed s_i + k
            teachers[T] = train_teachers([0, 1] * S, [s + k for s in cfg.control_seeds for k in (0, 1)], T,
                                         cfg.teacher_steps, cfg.control_batch, cfg.teacher_lr, cfg.hidden, device, bar)
            ends = trajectories(teachers[T], T, n, [s for s in cfg.control_seeds for _ in (0, 1)])[..., -1]  # (2S, 2, n)
            teacher_err[T] = (ends.view(S, 2, 2, n).diagonal(0, 1, 2) - torch.tensor(TARGETS)).abs().mean(1)  # (S, 2)
        for opt, lr, T in points:
            pair = [2 * i for i in range(S)] * G  # the teachers of each student's seed
            students, log = distill_students((teachers[T].select(pair), teachers[T].select([p + 1 for p in pair])),
                                             [g for g in cfg.control_gammas for _ in range(S)],
                                             [s + 2 for s in cfg.control_seeds] * G, T,
                                             cfg.student_steps, cfg.control_batch, cfg.micro_batches, lr, cfg.hidden,
                                             device, bar, opt)
            paths = trajectories(students, T, n, [s + 3 for s in cfg.control_seeds] * G)  # (R, 2, n, T+1)
            results.append(dict(point=(opt, lr, T), log=log, ends=paths[..., -1], paths=paths.view(G, S * 2 * n, T + 1)))
    return results, teacher_err


# -----------------------------------------------------------------------------
# main: run the studies, then print, save and draw what they show (toy/report.py)


def main(argv=None) -> dict:
    cfg, t_start = parse_args(argv), time.time()
    try:
        device = pick_device(cfg.device)  # auto: cuda -> mps -> cpu
    except ValueError as e:
        sys.exit(f"error: {e}")
    if cfg.dtype == "float64" and device.type == "mps":
        sys.exit("error: --dtype float64: MPS has no float64; use --dtype auto or float32 (or --device cpu)")
    dtype = torch.float32 if cfg.dtype == "float32" or (cfg.dtype == "auto" and device.type == "mps") else torch.float64
    torch.set_num_threads(cfg.threads)  # the CPU's threads (on a GPU the few host-side ops)
    os.makedirs(cfg.out, exist_ok=True)
    print(f"device {device}, {'float64' if dtype == torch.float64 else 'float32'}"
          f"{' (--quick)' if cfg.quick else ''}; outputs in {cfg.out}")

    points, table, by_horizon, curves, train_summary, results, ctrl_summary = control_points(cfg), [], [], [], [], [], []
    if "exact" in cfg.parts:
        t0 = time.time()
        table, by_horizon = exact_tables(cfg, device, dtype)
        report.print_exact(cfg, table, by_horizon, time.time() - t0)
    if "train" in cfg.parts:
        t0 = time.time()
        curves, train_summary = report.training_summary(cfg, *discrete_training(cfg, device, dtype))
        report.print_training(cfg, train_summary, time.time() - t0)
    if "control" in cfg.parts:
        t0 = time.time()
        results, teacher_err = control(cfg, device)
        ctrl_summary = report.control_summary(cfg, points, results)
        report.print_control(cfg, points, ctrl_summary, teacher_err, time.time() - t0)
    report.conclude(cfg, points, table, by_horizon, curves, train_summary, results, ctrl_summary)  # reading, CSVs, PNGs
    print(f"total {time.time() - t_start:.1f} s")
    return dict(config=cfg, table=table, by_horizon=by_horizon, train_summary=train_summary, control_summary=ctrl_summary)


if __name__ == "__main__":
    main()
