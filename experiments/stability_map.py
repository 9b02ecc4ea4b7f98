"""
Stability map: held-out accuracy and the degradation verdict of the OPD objectives on math, over the
learning rate (and K at one learning rate), from the same teacher and cold-start student as M1
(issue 14, item 2). Every run logs the student's mass outside the teacher's top-K (tail_mass,
metrics.TailMass; K of the run, 16 for the objectives without one): the mechanism the README gives
for the stop-gradient top-K's collapse; whether its rise warns of one: experiments/tail_warning.py.
Trains the pair first if <out_dir> has none.

  python experiments/stability_map.py --out_dir out/pair --threads 2     # the docs' map (about 30 min on 2 cores)
  python experiments/stability_map.py --out_dir out/pair --seeds 1       # one seed: half the time
  python experiments/stability_map.py --out_dir out/pair --lrs 1e-4,1e-3 --ks 4 --k_lr 1e-3
  python experiments/stability_map.py --pairs 3 --seeds 1 --lrs 1e-4,2e-4,3e-4 --ks 16 --jobs 2 --objectives
      'topk_stopgrad(teacher),topk_stopgrad(intersection),sampled_token'   # the boundary, on 3 pairs
  python experiments/stability_map.py --help                             # every flag, with its default

Runs, seed by seed (all of seed 1 first, so that a stopped map is a complete one-seed map): for
each learning rate of --lrs the six objectives of OBJECTIVES (K = 16), then at --k_lr the three
top-K forms (teacher support) at every K of --ks other than 16 (K = 16 is the main grid's run).

With --pairs N every cell runs on N pairs (experiments/common.py: pipeline seeds, the 95 % interval,
--jobs, resume). Writes <out_dir>/stability/stability.{txt,csv,json}, one opd run per row in its
pair's folder (<pair dir>/stability/lr<lr>/<label>_s<seed>.{pt,jsonl,json,row.json}) and, with
matplotlib, stability_map.png (objective x learning rate, coloured by held-out accuracy) and
m1_curves.png (the runs at lr 3e-4, first pair, first seed: M1's settings).
"""

import json
import os
import sys
import time
from dataclasses import dataclass, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from experiments.common import (OPD_RUN_FIELDS, OPSD_FIELDS, RLVR_FIELDS, ExperimentConfig, cell_text, cells,
                                final_eval, grid_calls, pairs, parse, run_cells, run_experiment, opd_cell,
                                start_accs, verdict, verdict_text)
from experiments.tail_warning import TAIL_LEVELS, TAIL_WINDOW, lead, lead_table
from nanoopd.checkpoint import load_checkpoint
from nanoopd.config import ConfigError
from nanoopd.metrics import TailMass
from nanoopd.report import degraded_cell, mean, write_results
from nanoopd.script import cli

K = 16  # the main grid's support size, and the tail mass's K for the objectives without one
# (label, objective, options): the rows of the map
OBJECTIVES = (
    ("topk_unnormalized", "topk_unnormalized", {"k": K}),
    ("topk_stopgrad(teacher)", "topk_stopgrad", {"k": K, "support": "teacher"}),
    ("topk_stopgrad(intersection)", "topk_stopgrad", {"k": K, "support": "intersection"}),
    ("topk_renorm", "topk_renorm", {"k": K}),
    ("full_reverse_kl", "full_reverse_kl", {}),
    ("sampled_token", "sampled_token", {}),
)
K_SWEEP = ("topk_unnormalized", "topk_stopgrad(teacher)", "topk_renorm")  # the K sweep's rows (teacher support)
CSV = ["label", "objective", "k", "lr", "pair", "seed", "start_acc", "final_acc", "first_kl", "final_kl", "first_tail_mass",
       "final_tail_mass", "final_response_length", "final_budget_share", "max_logratio_abs", "degraded", "error",
       "tail_step", "acc_drop_step", "peak_tail_mass"] + [f"tail_{level:g}_step" for level in TAIL_LEVELS] + [
       "steps_done", "seconds"]


@dataclass
class StabilityConfig(ExperimentConfig):
    # --- stability map
    lrs: str = "1e-5,1e-4,2e-4,3e-4,1e-3"  # comma-separated OPD peak learning rates: the map's columns
    ks: str = "4,16,64"              # comma-separated support sizes of the K sweep (16 reuses the main grid's runs)
    k_lr: float = 3e-4               # the learning rate of the K sweep (must be one of --lrs)
    objectives: str = ""             # comma-separated rows to run, labels of OBJECTIVES, e.g. 'topk_stopgrad(teacher),sampled_token' (empty: all six)
    opd_eval_every: int = 25         # held-out greedy accuracy every N OPD steps: when accuracy drops, vs the tail

    def __post_init__(self):
        super().__post_init__()
        for name in ("lrs", "ks"):
            try:
                values = self.lr_list() if name == "lrs" else self.k_list()
            except ValueError:
                values = []
            if not values or min(values) <= 0:
                raise ConfigError(name, f"must be comma-separated positive numbers; got {getattr(self, name)!r}")
        if self.k_lr not in self.lr_list():
            raise ConfigError("k_lr", f"must be one of --lrs {self.lrs}, got {self.k_lr}")
        unknown = set(self.chosen()) - {o[0] for o in OBJECTIVES}
        if unknown:
            raise ConfigError("objectives", f"unknown row(s) {', '.join(sorted(unknown))}; choose from "
                              f"{','.join(o[0] for o in OBJECTIVES)}")

    def chosen(self) -> list[str]:
        return [s.strip() for s in self.objectives.split(",") if s.strip()]

    def labels(self) -> list[str]:
        """The map's rows, in OBJECTIVES' order (all of them when --objectives is empty)."""
        return [o[0] for o in OBJECTIVES if not self.chosen() or o[0] in self.chosen()]

    def rows(self) -> tuple:
        """(label, objective, options) of the map's rows."""
        return tuple(o for o in OBJECTIVES if o[0] in self.labels())

    def lr_list(self) -> list[float]:
        return [float(s) for s in self.lrs.split(",") if s.strip()]

    def k_list(self) -> list[int]:
        return [int(s) for s in self.ks.split(",") if s.strip()]


def k_runs(cfg: StabilityConfig) -> list[tuple]:
    """The K sweep's runs beyond the main grid: K_SWEEP at every K of --ks but 16."""
    by_label = {label: (loss, opts) for label, loss, opts in OBJECTIVES}
    return [(f"{label} k{k}", by_label[label][0], {**by_label[label][1], "k": k})
            for k in cfg.k_list() if k != K for label in K_SWEEP if label in cfg.labels()]


def lr_folder(lr: float) -> str:
    """A learning rate's runs, under each pair's folder."""
    return os.path.join("stability", f"lr{lr:g}")


def records(pcfgs, row: dict) -> list[dict]:
    """A run's step records, from its JSONL in its pair's folder."""
    label = "".join(c if c.isalnum() else "_" for c in row["label"])
    out_dir = next(p.out_dir for p in pcfgs if p.seed == row["pair"])
    with open(os.path.join(out_dir, lr_folder(row["lr"]), f"{label}_s{row['seed']}.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def tail_hook(options: dict):
    """Every run logs the student's mass outside the teacher's top-K (K of the run, else 16)."""
    return TailMass(options.get("k", K))


def stability(cfg: StabilityConfig, tok, device, log) -> dict:
    t0 = time.time()
    pcfgs = pairs(cfg, log)
    start_acc = mean(start_accs(p, "student")["start_acc"] for p in pcfgs)
    teacher_acc = mean(final_eval(p, load_checkpoint(os.path.join(p.out_dir, "teacher.pt"), device, tok.n_vocab)[0],
                                  tok) for p in pcfgs)
    calls, meta = [], []
    for seed in cfg.seed_list():  # seed by seed: a stopped map (with --jobs 1) is a complete map of its first seeds
        for lr in cfg.lr_list():
            runs = list(cfg.rows()) + (k_runs(cfg) if lr == cfg.k_lr else [])
            at_lr = [replace(p, seeds=str(seed), opd_lr=lr) for p in pcfgs]
            new = grid_calls(replace(cfg, seeds=str(seed)), at_lr, runs, lr_folder(lr), extra_stats=tail_hook)
            calls += new
            meta += [(lr, next(x for x in runs if x[0] == c["label"])) for _, c in new]
    rows = []
    for r, (lr, (label, loss, options)) in zip(run_cells(cfg, opd_cell, calls, log), meta):
        rows.append({**r, "objective": loss, "k": options.get("k"), "lr": lr})
        rows[-1].update(lead(rows[-1], records(pcfgs, rows[-1])))
    seconds = time.time() - t0
    table = tables(cfg, rows, teacher_acc, start_acc, seconds)
    log(table)
    folder = os.path.join(cfg.out_dir, "stability")
    os.makedirs(folder, exist_ok=True)
    write_results(folder, "stability", rows, table,
                  {"teacher_acc": teacher_acc, "start_acc": start_acc, "seconds": round(seconds, 1),
                   "cells": cells([{**r, "cell": f"{r['label']} lr {r['lr']:g}"} for r in rows], ("final_acc",),
                                  group="cell")}, CSV)
    figures(cfg, pcfgs, rows, folder, log)
    return {"stability_teacher_acc": teacher_acc}


def tables(cfg, rows, teacher_acc, start_acc, seconds) -> str:
    lrs = cfg.lr_list()
    main = [r for r in rows if r["label"] in cfg.labels()]
    cell = lambda rs: f"{cell_text(rs)} {degraded_cell(rs) if rs else ''}"
    width = 44
    lines = [f"Stability map | {cfg.pairs} pair(s) x seeds {cfg.seeds} | {cfg.opd_steps} OPD steps x {cfg.opd_batch} rollouts | lrs {cfg.lrs} "
             f"| T={cfg.temperature} top_p={cfg.top_p} top_k={cfg.top_k} | held-out n={cfg.eval_n} every "
             f"{cfg.opd_eval_every} steps | teacher {teacher_acc:.1%}, student at start {start_acc:.1%} (greedy) | "
             f"wall {seconds / 60:.1f} min",
             "",
             f"held-out accuracy (final_eval_n={cfg.final_eval_n}): mean [95% t-interval over pairs' means, or over "
             f"the seeds of one pair] (per pair or seed), and degraded runs; K = {K}",
             f"{'objective':27s} | " + " | ".join(f"{'lr ' + format(lr, 'g'):{width}s}" for lr in lrs)]
    for label in cfg.labels():
        lines.append(f"{label:27s} | " + " | ".join(
            f"{cell([r for r in main if r['label'] == label and r['lr'] == lr]):{width}s}" for lr in lrs))
    base = "sampled_token"  # the verdicts' reference arm: each objective above it, and its own end above its start
    if base in cfg.labels():
        at = lambda lr: [r for r in main if r["lr"] == lr]
        ends = lambda lr: [r for r in at(lr) if r["label"] == base]  # the base's runs, read at their end and start
        gain = lambda rs: [{**r, "label": "end"} for r in rs] + [{**r, "label": "start", "final_acc": r["start_acc"]} for r in rs]
        lines += ["", f"the verdict rule (docs/scorecard.md) against {base}: d in points [95% t-interval over pairs] "
                  f"(per pair) verdict; the last row: {base}'s end against its start",
                  f"{'objective':27s} | " + " | ".join(f"{'lr ' + format(lr, 'g'):{width}s}" for lr in lrs)]
        for label in (x for x in cfg.labels() if x != base):
            lines.append(f"{label:27s} | " + " | ".join(
                f"{verdict_text(verdict(at(lr), label, base)):{width}s}" for lr in lrs))
        lines.append(f"{'end > start (' + base + ')':27s} | " + " | ".join(
            f"{verdict_text(verdict(gain(ends(lr)), 'end', 'start')):{width}s}" for lr in lrs))
    lines += ["", f"tail mass: start (first {TAIL_WINDOW} steps) -> end (last 10 % of steps), mean over seeds",
              f"{'objective':27s} | " + " | ".join(f"{'lr ' + format(lr, 'g'):17s}" for lr in lrs)]
    for label in cfg.labels():
        cells = []
        for lr in lrs:
            rs = [r for r in main if r["label"] == label and r["lr"] == lr]
            cells.append(f"{sum(r['first_tail_mass'] for r in rs) / len(rs):.4f} -> "
                         f"{sum(r.get('final_tail_mass', float('nan')) for r in rs) / len(rs):.4f}" if rs else "-")
        lines.append(f"{label:27s} | " + " | ".join(f"{c:17s}" for c in cells))
    lines += ["", f"K sweep at lr {cfg.k_lr:g} (teacher support): held-out accuracy, degraded seeds, final tail mass",
              f"{'objective':27s} | " + " | ".join(f"{'K ' + str(k):44s}" for k in cfg.k_list())]
    for label in (x for x in K_SWEEP if x in cfg.labels()):
        cells = []
        for k in cfg.k_list():
            rs = [r for r in rows if r["lr"] == cfg.k_lr and r["label"] == (label if k == K else f"{label} k{k}")]
            tail = sum(r.get("final_tail_mass", float("nan")) for r in rs) / len(rs) if rs else float("nan")
            cells.append(f"{cell(rs)} tail {tail:.4f}")
        lines.append(f"{label:27s} | " + " | ".join(f"{c:44s}" for c in cells))
    lines += [""] + lead_table(rows, cfg.opd_eval_every) + [
              "tail mass: the student's mass outside the teacher's top-K (K of the run, 16 for the others), mean over "
              "response tokens; start = mean over the first steps, end = over the last 10 %. degraded: non-finite, length "
              "(>= 50 % of rollouts hit the budget) or collapse (held-out accuracy > 10 points below the start)"]
    return "\n".join(lines)


def figures(cfg, pcfgs, rows, folder: str, log) -> None:
    """stability_map.png and m1_curves.png, when matplotlib is there."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("stability: no figures: matplotlib is missing (pip install matplotlib)")
        return
    lrs, labels = cfg.lr_list(), cfg.labels()
    fig, ax = plt.subplots(figsize=(1.6 * len(lrs) + 3.2, 0.55 * len(labels) + 1.4))
    grid = [[float("nan")] * len(lrs) for _ in labels]
    for i, label in enumerate(labels):
        for j, lr in enumerate(lrs):
            rs = [r for r in rows if r["label"] == label and r["lr"] == lr and r["final_acc"] is not None]
            if rs:
                grid[i][j] = 100 * sum(r["final_acc"] for r in rs) / len(rs)
                bad = sum(bool(r["degraded"]) for r in rs)
                ax.text(j, i, f"{grid[i][j]:.1f}" + (f" x{bad}/{len(rs)}" if bad else ""), ha="center", va="center",
                        fontsize=8, color="white" if grid[i][j] < 50 else "black")
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("OPD peak learning rate")
    ax.set_title(f"held-out accuracy (%), seeds {cfg.seeds}; xN/M: degraded seeds", fontsize=9)
    fig.colorbar(im, ax=ax, label="held-out accuracy (%)")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "stability_map.png"), dpi=90)
    plt.close(fig)

    m1 = [r for r in rows if r["lr"] == 3e-4 and r["seed"] == cfg.seed_list()[0] and r["label"] in labels
          and r["pair"] == pcfgs[0].seed]
    if not m1:
        return
    keys = (("kl", "reverse KL"), ("response_length", "response length"), ("acc", "rollout accuracy"),
            ("tail_mass", f"tail mass (outside teacher top-{K})"))
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    for r in m1:
        recs = records(pcfgs, r)
        for ax, (key, _) in zip(axes.flat, keys):
            ax.plot([x["step"] for x in recs], [x[key] for x in recs], label=r["label"], lw=1)
    for ax, (key, name) in zip(axes.flat, keys):
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("OPD step")
        if key in ("kl", "tail_mass"):
            ax.set_yscale("log")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"M1's settings: lr 3e-4, pair {pcfgs[0].seed}, seed {cfg.seed_list()[0]}, {cfg.opd_batch} rollouts "
                 f"per step", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "m1_curves.png"), dpi=80)
    plt.close(fig)
    log(f"stability: figures in {folder}: stability_map.png, m1_curves.png")


def main(argv=None) -> dict:
    cfg = parse(StabilityConfig, argv, __doc__, exclude=OPD_RUN_FIELDS + OPSD_FIELDS + RLVR_FIELDS + ("opd_lr",))
    return run_experiment("stability", cfg, stability)


if __name__ == "__main__":
    cli(main)
