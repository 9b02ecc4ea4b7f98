"""
What the toy studies show: the summaries, printed tables, plain-language reading and CSV files of
train_toy.py, and its figures through toy/figures.py. Nothing here trains; every number is computed
from what the studies return.

The runs of a continuous-control point are laid out gamma-major: run r = gamma index * S + seed index,
so a (..., R) tensor reshapes to (..., G, S). The drift report of --preset paper and --sweep adds, per
gamma, how many seed-task runs drifted (more than half of a run's end points farther than MISS_TOL
from its target) and how many seeds (either task), with the Wilson 95% interval of the seeds' share:

    p = k / n,   (p + z^2/2n -+ z sqrt(p (1 - p) / n + z^2 / 4n^2)) / (1 + z^2 / n),   z = 1.96

Seeds are independent runs; the two tasks of one seed share a student, hence the interval over seeds.
"""

import csv
import math
import os

import torch

from toy.continuous import MISS_TOL, OPT_NAMES, TARGETS, drift
from toy.figures import plot_figures


# -----------------------------------------------------------------------------
# summaries


def training_summary(cfg, sampled: dict, noise_free: dict) -> tuple[list[dict], list[dict]]:
    """(curves, summary) of the discrete students: curves rows (gamma, run, step, kl), run = seed or
    "exact"; summary rows per gamma with the final KL over seeds, the noise-free final KL and stability."""
    S, curves, summary = len(cfg.seeds), [], []
    for i, gamma in enumerate(cfg.gammas):
        runs = [(seed, sampled["kl"][:, i * S + j]) for j, seed in enumerate(cfg.seeds)] + [("exact", noise_free["kl"][:, i])]
        curves += [dict(gamma=gamma, run=run, step=s, kl=k) for run, kl in runs for s, k in zip(sampled["steps"], kl.tolist())]
        kls = sampled["final_kl"][i * S:(i + 1) * S]  # (S,)
        summary.append(dict(gamma=gamma, start_kl=noise_free["kl"][0, i].item(), mean_kl=kls.mean().item(),
                            min_kl=kls.min().item(), max_kl=kls.max().item(), noise_free_kl=noise_free["final_kl"][i].item(),
                            n_runs=S, n_unstable=int(sampled["unstable"][i * S:(i + 1) * S].sum())))
    return curves, summary


def thirds(series: torch.Tensor) -> torch.Tensor:
    """Mean of the first, middle and last third of a series along dim 0: (steps, ...) -> (3, ...)."""
    n = series.shape[0]
    cuts = [0, n // 3, 2 * n // 3, n]
    return torch.stack([series[a:max(b, a + 1)].mean(0) for a, b in zip(cuts, cuts[1:])])


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a share k / n (95% for z = 1.96)."""
    p, d = k / n, 1 + z * z / n
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (p + z * z / (2 * n) - half) / d), min(1.0, (p + z * z / (2 * n) + half) / d)


def control_summary(cfg, points, results: list[dict]) -> list[dict]:
    """One row per point and gamma: variance by thirds of training (each seed's, then the mean over seeds),
    and where the students end: the replica's mean end point per task, or (--drift, --sweep) the drift.

    orders = log10(mean variance / that of the smallest gamma at the same point). The drift (toy.continuous.drift)
    is taken per seed and task and then pooled: other, missed, dist and diverged over all episodes,
    sd_seeds the standard deviation over seeds of each seed's mean distance, sd_episodes the mean over
    runs of the standard deviation over episodes.
    """
    S, G, out = len(cfg.control_seeds), len(cfg.control_gammas), []
    for (opt, lr, T), res in zip(points, results):
        var = thirds(res["log"]["variance"]).view(3, G, S).mean(2)  # (3, G)
        ends = res["ends"].view(G, S, 2, -1)  # (G, S, 2, n)
        for i, gamma in enumerate(cfg.control_gammas):
            row = dict(optimizer=opt, lr=lr, horizon=T, gamma=gamma, var_early=var[0, i].item(),
                       var_mid=var[1, i].item(), var_late=var[2, i].item())
            if not (cfg.drift or cfg.sweep):
                for k in (0, 1):
                    row[f"mean_pos_{k}"] = ends[i, :, k].mean().item()
                    row[f"dist_{k}"] = (ends[i, :, k] - TARGETS[k]).abs().mean().item()
                out.append(row)
                continue
            mean_var, base = var[:, i].mean().item(), var[:, 0].mean().item()
            runs = [[drift(ends[i, s, k], k) for k in (0, 1)] for s in range(S)]
            flat = [d for seed in runs for d in seed]
            mean = lambda name: sum(d[name] for d in flat) / len(flat)
            per_seed = torch.tensor([(a["dist"] + b["dist"]) / 2 for a, b in runs])  # (S,)
            drifted = [[d["missed"] > 0.5 for d in seed] for seed in runs]
            seeds_drifted = sum(any(seed) for seed in drifted)
            lo, hi = wilson(seeds_drifted, S)
            row.update(var_mean=mean_var, orders=math.log10(mean_var / base) if mean_var > 0 and base > 0 else math.nan,
                       other=mean("other"), missed=mean("missed"), dist=mean("dist"), diverged=mean("diverged"),
                       sd_seeds=per_seed.std().item() if S > 1 else 0.0, sd_episodes=mean("dist_sd"),
                       runs_drifted=sum(map(sum, drifted)), n_runs=2 * S, seeds_drifted=seeds_drifted, n_seeds=S,
                       seeds_lo=lo, seeds_hi=hi)
            out.append(row)
    return out


# -----------------------------------------------------------------------------
# printed tables


def print_grid(title: str, rows: list[dict], row_key: str, value: str, fmt: str, gammas):
    """One line per value of row_key, one column per gamma."""
    print(title)
    print(f"  {row_key:>9} " + "".join(f"  {'g=' + format(g, '.2f'):>8}" for g in gammas))
    for key in dict.fromkeys(r[row_key] for r in rows):
        vals = {r["gamma"]: r[value] for r in rows if r[row_key] == key}
        print(f"  {key:>9g} " + "".join(f"  {format(vals[g], fmt):>8}" for g in gammas))


def print_exact(cfg, table, by_horizon, seconds: float):
    print(f"\nExact bias and variance of g_gamma: V={cfg.vocab}, T={cfg.horizon}, {cfg.vocab ** cfg.horizon} sequences "
          f"enumerated, problem seed {cfg.problem_seed} ({seconds:.1f} s)")
    print_grid("relative bias ||E[g_gamma] - grad J|| / ||grad J||", table, "coupling", "rel_bias", ".4f", cfg.gammas)
    print_grid("variance tr Cov[g_gamma]", table, "coupling", "variance", ".4g", cfg.gammas)
    print_grid(f"variance tr Cov[g_gamma] by horizon T (coupling {cfg.train_coupling:g})", by_horizon,
               "horizon", "variance", ".4g", cfg.gammas)


def print_training(cfg, summary: list[dict], seconds: float):
    print(f"\nTraining students on the discrete toy: V={cfg.vocab}, T={cfg.horizon}, coupling {cfg.train_coupling:g}, "
          f"{cfg.optimizer} lr {cfg.lr:g}, batch {cfg.batch_size}, {cfg.steps} steps, seeds "
          f"{','.join(map(str, cfg.seeds))}; KL at start {summary[0]['start_kl']:.3f}")
    print("  exact KL(student || teacher) after training; 'noise-free' = the same run with the exact E[g_gamma]")
    print(f"  {'gamma':>5}  {'mean KL':>8}  {'min':>7}  {'max':>7}  {'noise-free':>10}  unstable")
    for r in summary:
        print(f"  {r['gamma']:5.2f}  {r['mean_kl']:8.4f}  {r['min_kl']:7.4f}  {r['max_kl']:7.4f}  "
              f"{r['noise_free_kl']:10.4f}  {'yes' if r['n_unstable'] else 'no'} ({r['n_unstable']}/{r['n_runs']})")
    print(f"  ({seconds:.1f} s)")


def print_teachers(cfg, teacher_err: dict):
    """One line per horizon: every seed's teacher errors."""
    for T, err in teacher_err.items():
        print(f"  teachers after {cfg.teacher_steps} REINFORCE steps{f' at T={T}' if len(teacher_err) > 1 else ''}, "
              f"mean |s_T - target| of task 0 / task 1: " +
              "; ".join(f"seed {s} {e[0]:.3f} / {e[1]:.3f}" for s, e in zip(cfg.control_seeds, err.tolist())))


def print_control(cfg, points, summary: list[dict], teacher_err: dict, seconds: float):
    """The replica's table, or the drift table of --preset paper (one row per gamma) and --sweep (per point and gamma)."""
    opt, lr, T = points[0]
    n = len(cfg.control_seeds)
    seeds = f"seed{'s' if n > 1 else ''} {','.join(map(str, cfg.control_seeds))}"
    drift_report = cfg.drift or cfg.sweep
    what = (f"Sweep of the continuous-control study over {len(cfg.sweep)} points optimizer:lr:T" if cfg.sweep else
            f"Continuous control{' (--drift)' if drift_report else ''}: T={T} moves, {OPT_NAMES[opt]} lr {lr:g}")
    print(f"\n{what}, OPD batch {cfg.control_batch} = {cfg.micro_batches} micro-batches, {cfg.student_steps} steps "
          f"(tasks alternate), {seeds}")
    print_teachers(cfg, teacher_err)
    print(f"  head-gradient variance (trace over {cfg.micro_batches} micro-batches), mean over thirds of training"
          f"{' and over seeds' if n > 1 else ''}")
    if not drift_report:
        print(f"  {'gamma':>5}  {'var early':>9}  {'var mid':>9}  {'var late':>9}   "
              f"{'task0 s_T':>9}  {'|s_T+3|':>7}   {'task1 s_T':>9}  {'|s_T-3|':>7}")
        for r in summary:
            print(f"  {r['gamma']:5.2f}  {r['var_early']:9.3g}  {r['var_mid']:9.3g}  {r['var_late']:9.3g}   "
                  f"{r['mean_pos_0']:9.3f}  {r['dist_0']:7.3f}   {r['mean_pos_1']:9.3f}  {r['dist_1']:7.3f}")
        print(f"  ({seconds:.1f} s)")
        return
    print(f"  orders = log10(variance / variance at gamma={cfg.control_gammas[0]:g}"
          f"{' of the same point' if cfg.sweep else ''}), both means over the whole run")
    print(f"  drift of the end points s_T over {2 * n * cfg.eval_episodes} episodes ({n} seed{'s' if n > 1 else ''} x "
          f"2 tasks x {cfg.eval_episodes}): other = share nearer the other\n  task's target, missed = share farther than "
          f"{MISS_TOL:g} from the own target z, |s_T-z| = mean distance to z, its sd\n  over seeds and over the episodes "
          f"of a run (mean over runs), diverged = share of non-finite s_T;\n  drifted: seed-task runs with most end points "
          f"missed, and seeds with a drifted task [Wilson 95% interval of their share]")
    head = f"{'opt':>4}  {'lr':>7}  {'T':>3}  " if cfg.sweep else ""  # the sweep's rows start with their point
    point = lambda r: f"{r['optimizer']:>4}  {r['lr']:7.0e}  {r['horizon']:3d}  " if cfg.sweep else ""
    print(f"  {head}{'gamma':>5}  {'var early':>9}  {'var mid':>9}  {'var late':>9}  {'orders':>6}   {'other':>6}  "
          f"{'missed':>6}  {'|s_T-z|':>7}  {'sd seeds':>8}  {'sd eps':>7}  {'diverged':>8}  {'runs':>5}  seeds drifted")
    for r in summary:
        print(f"  {point(r)}{r['gamma']:5.2f}  {r['var_early']:9.3g}  {r['var_mid']:9.3g}  {r['var_late']:9.3g}  "
              f"{r['orders']:6.2f}   {r['other']:6.3f}  {r['missed']:6.3f}  {r['dist']:7.3g}  {r['sd_seeds']:8.3g}  "
              f"{r['sd_episodes']:7.3g}  {r['diverged']:8.3f}  {r['runs_drifted']:>2}/{r['n_runs']:<2}  "
              f"{r['seeds_drifted']}/{r['n_seeds']} [{r['seeds_lo']:.2f}, {r['seeds_hi']:.2f}]")
    print(f"  ({seconds:.1f} s)")


# -----------------------------------------------------------------------------
# reading the numbers


def reading(cfg, table, by_horizon, train_summary, ctrl_summary) -> list[str]:
    """Plain-language lines, each claim computed from the numbers above (one per point with --drift/--sweep)."""
    lines = []
    if table:
        g0, g1, cmax = min(cfg.gammas), max(cfg.gammas), max(cfg.couplings)
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
            line += f"; at gamma={g1:g} the variance grows {hv[-1] / hv[0]:.0f}x from T={cfg.horizons[0]} to T={cfg.horizons[-1]}"
        lines.append(line + ".")
    if ctrl_summary and (cfg.drift or cfg.sweep):
        return lines + reading_drift(ctrl_summary)
    parts = []
    if train_summary:
        best = min(train_summary, key=lambda r: r["mean_kl"])
        nf = min(train_summary, key=lambda r: r["noise_free_kl"])
        wide = max(train_summary, key=lambda r: r["max_kl"] - r["min_kl"])
        parts.append(f"Trained from samples, the lowest mean final KL is with gamma={best['gamma']:g} "
                     f"({best['mean_kl']:.3f}; noise-free: gamma={nf['gamma']:g}, {nf['noise_free_kl']:.3f}), the widest "
                     f"spread over seeds with gamma={wide['gamma']:g} ({wide['min_kl']:.3f} to {wide['max_kl']:.3f}), "
                     f"{sum(r['n_unstable'] for r in train_summary)} of {sum(r['n_runs'] for r in train_summary)} runs unstable")
    if ctrl_summary:
        lo, hi = ctrl_summary[0], ctrl_summary[-1]
        mean_var = lambda r: (r["var_early"] + r["var_mid"] + r["var_late"]) / 3
        dist = lambda r: (r["dist_0"] + r["dist_1"]) / 2
        ratio = mean_var(hi) / mean_var(lo)
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
                f"magnitude); drifted seed-task runs {hi['runs_drifted']} of {hi['n_runs']} vs {lo['runs_drifted']}, seeds "
                f"{hi['seeds_drifted']} of {hi['n_seeds']} (95% interval {hi['seeds_lo']:.0%} to {hi['seeds_hi']:.0%}) vs "
                f"{lo['seeds_drifted']} ({lo['seeds_lo']:.0%} to {lo['seeds_hi']:.0%}); end points nearer the other task's "
                f"target {hi['other']:.1%} vs {lo['other']:.1%}, farther than {MISS_TOL:g} from their own {hi['missed']:.1%} "
                f"vs {lo['missed']:.1%}, mean distance to the own target {hi['dist']:.3g} vs {lo['dist']:.3g}")
        if hi["diverged"] or lo["diverged"]:
            line += f", diverged {hi['diverged']:.1%} vs {lo['diverged']:.1%}"
        lines.append(line + ".")
    return lines


# -----------------------------------------------------------------------------
# output: CSV files, and the figures (toy/figures.py)


def write_csv(path: str, rows: list[dict]):
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def save(cfg, points, table, by_horizon, curves, train_summary, results, ctrl_summary):
    """Every CSV file of the run; the control log and end points with one row per run and step / episode."""
    write_csv(os.path.join(cfg.out, "exact_table.csv"), table)
    write_csv(os.path.join(cfg.out, "exact_by_horizon.csv"), by_horizon)
    write_csv(os.path.join(cfg.out, "discrete_training.csv"), curves)
    write_csv(os.path.join(cfg.out, "discrete_summary.csv"), train_summary)
    runs = [(gamma, seed) for gamma in cfg.control_gammas for seed in cfg.control_seeds]  # run r
    log, finals = [], []
    for (opt, lr, T), res in zip(points, results):
        L = {k: v.tolist() for k, v in res["log"].items()}  # (steps, R) lists, task (steps,)
        for r, (gamma, seed) in enumerate(runs):
            keys = dict(gamma=gamma, seed=seed, optimizer=opt, lr=lr, horizon=T)
            log += [dict(keys, step=t, task=L["task"][t], variance=L["variance"][t][r],
                         kl_per_step=L["kl_per_step"][t][r], final_pos=L["final_pos"][t][r]) for t in range(len(L["task"]))]
            finals += [dict(keys, task=k, episode=i, final_pos=p) for k in (0, 1) for i, p in enumerate(res["ends"][r, k].tolist())]
    write_csv(os.path.join(cfg.out, "control_variance.csv"), log)
    write_csv(os.path.join(cfg.out, "control_final_positions.csv"), finals)
    write_csv(os.path.join(cfg.out, "control_summary.csv"), ctrl_summary)


def conclude(cfg, points, table, by_horizon, curves, train_summary, results, ctrl_summary):
    """The end of a run: the reading, every CSV file, and the figures when wanted."""
    print("\nReading:")
    for line in reading(cfg, table, by_horizon, train_summary, ctrl_summary):
        print("  " + line)
    save(cfg, points, table, by_horizon, curves, train_summary, results, ctrl_summary)
    if cfg.plots:
        figures = plot_figures(cfg, points, table, curves, results)
        print("figures: " + (", ".join(figures) if figures is not None else
                             "matplotlib is not installed; `pip install matplotlib` and rerun to get the PNGs"))
