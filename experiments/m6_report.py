"""
M6's tables, verdicts and figure, from the rows of experiments/m6_on_policy.py (docs/m6.md).

  half gap      the FLOPs at which a run's held-out accuracy (eval_n set) first reaches the start
                plus half of the teacher-student gap, interpolated in log FLOPs between evaluations
  SeqKD match   the FLOPs at which on-policy (reverse KL) reaches SeqKD's accuracy at the budget,
                against SeqKD's own: their ratio, in both accounting columns (Thinking Machines)
  exposure gap  gap(f) = acc(finishing the teacher's prefix) - acc(finishing its own), prefixes cut
                at a fraction f of the sampled response; a run's excess = its gap minus the start
                student's (the same pair), averaged over f: how much more training widened the gap
                between the prefixes it trained on and its own (MiniLLM's exposure bias)
  advantage     adv(f) = acc(the teacher finishing the start student's prefix) - acc(the student
                finishing it), on the same samples (Rethinking OPD)
Every verdict is the rule of docs/scorecard.md (experiments/stats.py) over the pairs.
"""

import math
import os

from experiments.common import cell_text, cells, interval, verdict, verdict_text
from nanoopd.report import by_label, mean, write_results

CSV = ["label", "pair", "seed", "start_acc", "final_acc", "final_acc_train", "flops", "flops_given", "steps",
       "steps_done", "half_gap_flops", "half_gap_flops_given", "to_on_policy_flops", "excess_long", "excess_short",
       "error", "seconds"]
FR = ("0.25", "0.5", "0.75")
REF = "opd_rkl"  # the on-policy arm the ratios are taken to


def reach(evals: list, target: float, column: int = 2) -> float | None:
    """FLOPs (evals column 2: charged, 3: given) at which accuracy first reaches target, or None."""
    for (s0, a0, *f0), (s1, a1, *f1) in zip(evals, evals[1:]):
        if a1 >= target:
            x0, x1 = f0[column - 2], f1[column - 2]
            if a0 >= target or x0 <= 0:
                return x1 if a0 < target else x0
            w = (target - a0) / (a1 - a0)
            return math.exp(math.log(x0) + w * (math.log(x1) - math.log(x0)))
    return evals[0][column] if evals and evals[0][1] >= target else None


def gap(probe: dict, bucket: str, f: str) -> float:
    return probe[bucket]["teacher"][f] - probe[bucket]["own"][f]


def annotate(rows: list[dict], pair_rows: dict) -> None:
    """Add each run's FLOPs to close half of the gap and to reach the on-policy run's final accuracy
    (same pair and seed, eval_n set), and its exposure excess, in place."""
    on = {(r["pair"], r["seed"]): r for r in rows if r["label"] == REF}
    for r in rows:
        pr = pair_rows[r["pair"]]
        target = r["start_acc_train"] + 0.5 * (pr["teacher_acc_train"] - r["start_acc_train"])
        r["half_gap_flops"] = reach(r["evals"], target, 2) if r["evals"] else None
        r["half_gap_flops_given"] = reach(r["evals"], target, 3) if r["evals"] else None
        ref = on.get((r["pair"], r["seed"]))
        r["to_on_policy_flops"] = reach(r["evals"], ref["final_acc_train"], 2) if r["evals"] and ref else None
        for b in ("long", "short"):
            excess = [gap(r["probe"], b, f) - gap(pr["start_probe"], b, f) for f in FR]
            r.update({f"excess_{b}_{f}": e for f, e in zip(FR, excess)}, **{f"excess_{b}": sum(excess) / len(excess)})


def geo(values) -> float | None:
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def flop_cell(rs: list[dict], key: str, ref: float | None) -> str:
    g, n = geo(r[key] for r in rs), sum(r[key] is not None for r in rs)
    if g is None:
        return f"not reached (0/{len(rs)})"
    return f"{g / 1e12:5.2f} T ({n}/{len(rs)}){f' x{g / ref:.2f}' if ref else ''}"


def synthetic(values: dict, a: str, b: str) -> list[dict]:
    """Rows for verdict() from {pair: (value of a, value of b)}: one run per arm and pair."""
    return [r for p, (x, y) in values.items() for r in ({"label": a, "pair": p, "v": x}, {"label": b, "pair": p, "v": y})]


def report(cfg, pcfgs, pair_rows: list[dict], rows: list[dict], seconds: float, log) -> dict:
    prs = {pr["pair"]: pr for pr in pair_rows}
    annotate(rows, prs)
    arms = by_label(rows)
    teacher, start = mean(pr["teacher_acc"] for pr in pair_rows), mean(r["start_acc"] for r in rows)
    ref = {k: geo(r[k] for r in arms[REF]) for k in ("half_gap_flops", "half_gap_flops_given", "to_on_policy_flops")}
    lines = [f"M6: the distillation spectrum at equal compute | {cfg.pairs} pair(s) | seeds {cfg.seeds} | budget "
             f"{mean(pr['budget'] for pr in pair_rows) / 1e12:.2f} TFLOP per run (teacher sampling charged) | "
             f"batch {cfg.opd_batch} | lr {cfg.opd_lr} (RLVR {cfg.rlvr_lr}, {cfg.rlvr_prompts} x {cfg.rlvr_group}) | "
             f"teacher {teacher:.1%}, student at start {start:.1%} (greedy, n={cfg.final_eval_n}) | wall {seconds / 60:.1f} min (this invocation: runs read back "
             f"from an earlier one are not timed again)",
             f"{'arm':12s} | {'held-out acc at the budget: mean [95% CI] (per pair)':52s} | {'TFLOP chg/given':15s} | "
             f"{'steps':5s} | {'half gap, charged (runs) x on-policy':36s} | {'half gap, traces given':36s} | "
             f"on-policy's accuracy, charged"]
    for label, rs in arms.items():
        lines.append(f"{label:12s} | {cell_text(rs):52s} | {mean(r['flops'] for r in rs) / 1e12:6.2f} / "
                     f"{mean(r['flops_given'] for r in rs) / 1e12:5.2f} | {mean(r['steps_done'] for r in rs):5.0f} | "
                     f"{flop_cell(rs, 'half_gap_flops', ref['half_gap_flops']):36s} | "
                     f"{flop_cell(rs, 'half_gap_flops_given', ref['half_gap_flops_given']):36s} | "
                     f"{flop_cell(rs, 'to_on_policy_flops', ref['to_on_policy_flops'])}")
    # --- exposure bias
    lines.append(f"exposure gap = acc(finishing the teacher's prefix) - acc(finishing its own), prefixes at f = "
                 f"{', '.join(FR)} of the response; start: the student before; each arm: its gap minus the start's "
                 f"(excess), by f, and its mean over f: mean [95% CI] (per pair), in points")
    lines.append(f"{'start':12s} | " + " | ".join(
        f"{b}: " + " ".join(f"{100 * mean(gap(pr['start_probe'], b, f) for pr in pair_rows):+5.1f}" for f in FR)
        for b in ("long", "short")))
    for label, rs in arms.items():
        lines.append(f"{label:12s} | " + " | ".join(
            f"{b}: " + " ".join(f"{100 * mean(r[f'excess_{b}_{f}'] for r in rs):+5.1f}" for f in FR)
            + f" mean {cell_text(rs, f'excess_{b}').replace('%', '')}" for b in ("long", "short")))
    # --- the teacher's advantage from the start student's prefixes
    adv = {p: {b: {f: pr["teacher_from_student_prefix"][b][f] - pr["start_probe"][b]["own"][f] for f in FR}
               for b in ("long", "short")} for p, pr in prs.items()}
    lines.append("teacher's advantage from the start student's prefixes (teacher - student finishing the same samples), "
                 "by f: " + " | ".join(f"{b}: " + " ".join(f"{100 * mean(a[b][f] for a in adv.values()):+5.1f}" for f in FR)
                                       for b in ("long", "short")))
    # --- the verdicts
    tm, reached = {}, []
    for p in prs:
        for col, key in ((2, "flops"), (3, "flops_given")):
            ratios = []
            for s in cfg.seed_list():
                sk = next((r for r in arms.get("seqkd", []) if r["pair"] == p and r["seed"] == s), None)
                on = next((r for r in arms.get(REF, []) if r["pair"] == p and r["seed"] == s), None)
                if sk and on and sk["final_acc_train"] is not None:
                    at = reach(on["evals"], sk["final_acc_train"], col)
                    reached += [at is not None] if col == 2 else []
                    # not reached: on-policy needs more than its whole budget, so the ratio is below sk / on
                    ratios.append(math.log(sk[key] / at) if at else min(math.log(sk[key] / on[key]), 0.0) - 1e-9)
            tm.setdefault(key, {})[p] = (sum(ratios) / len(ratios), 0.0) if ratios else None
    have = lambda *labels: all(label in arms for label in labels)
    checks = {}
    for key, a, b in (("gkd_rkl", REF, "kd_rkl"), ("gkd_fkl", "opd_fkl", "kd_fkl"), ("gkd_seqkd", REF, "seqkd"),
                      ("dense_vs_sparse", REF, "rlvr")):
        if have(a, b):
            checks[key] = verdict(rows, a, b)
    if have("seqkd"):
        for key, col in (("tm_charged", "flops"), ("tm_given", "flops_given")):
            checks[key] = verdict(synthetic({p: v for p, v in tm[col].items() if v}, "opd", "seqkd"), "opd", "seqkd", "v")
    for off in ("seqkd", "kd_rkl"):  # an off-policy arm widens the gap more than on-policy (the long problems)
        if have(off):
            checks[f"exposure_{off}"] = verdict(rows, off, REF, "excess_long")
    if have("seqkd"):  # and more on the long problems than on the short ones
        checks["exposure_length"] = verdict([{**r, "label": b, "v": r[f"excess_{b}"]} for r in arms["seqkd"]
                                             for b in ("long", "short")], "long", "short", "v")
    checks["advantage_falls"] = verdict(synthetic({p: (sum(a[b][FR[0]] for b in a) / 2, sum(a[b][FR[-1]] for b in a) / 2)
                                                   for p, a in adv.items()}, "early", "late"), "early", "late", "v")
    ratio = {k: math.exp(mean(v[0] for v in tm[k].values() if v)) for k in tm if any(tm[k].values())}
    said = lambda key: verdict_text(checks[key]) if key in checks else "not run"
    lines.append(f"verdicts (rule of docs/scorecard.md, d in points): on-policy vs supervised KD, reverse KL "
                 f"{said('gkd_rkl')}; forward KL {said('gkd_fkl')}; on-policy vs SeqKD {said('gkd_seqkd')}; "
                 f"on-policy vs RLVR {said('dense_vs_sparse')}")
    if "tm_charged" in checks:
        lines.append(f"on-policy reaches SeqKD's accuracy at the budget with x{ratio['flops']:.2f} fewer FLOPs charged "
                     f"({checks['tm_charged']['verdict']}), x{ratio['flops_given']:.2f} traces given "
                     f"({checks['tm_given']['verdict']}); reached in {sum(reached)}/{len(reached)} runs (ratio < 1: more FLOPs, "
                     f"or not reached within the budget, counted as the whole budget)")
    lines.append(f"exposure excess on long problems, off-policy minus on-policy: SeqKD {said('exposure_seqkd')}, "
                 f"supervised KD {said('exposure_kd_rkl')}; SeqKD's excess, long minus short {said('exposure_length')}; "
                 f"teacher's advantage at f=1/4 minus at f=3/4 {said('advantage_falls')}")
    table = "\n".join(lines)
    log(table)
    folder = os.path.join(cfg.out_dir, "m6")
    os.makedirs(folder, exist_ok=True)
    write_results(folder, "m6", rows, table, {"pairs": pair_rows, "verdicts": checks, "seqkd_ratio": ratio,
                                              "advantage": adv, "cells": cells(rows, ("final_acc", "flops")),
                                              "seconds": round(seconds, 1)}, CSV)
    figure(os.path.join(folder, "m6.png"), arms, start, teacher, log)
    return {"m6_verdicts": {k: v["verdict"] for k, v in checks.items()}}


def figure(path: str, arms: dict, start: float, teacher: float, log) -> None:
    """Held-out accuracy gained over the start against FLOPs (log axis), one curve per arm: the mean
    over runs at each evaluation, and the 95 % interval over the pairs' means as a band (the gain
    removes each pair's own level); charged (left) and traces given (right)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("m6: no figure: matplotlib is missing (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, col, title in ((axes[0], 2, "teacher sampling charged"), (axes[1], 3, "teacher traces given")):
        for i, (label, rs) in enumerate(arms.items()):
            rs = [r for r in rs if r["evals"]]
            n = min(len(r["evals"]) for r in rs)
            xs = [mean(r["evals"][j][col] for r in rs) for j in range(1, n)]
            stats = [interval([{"pair": r["pair"], "a": r["evals"][j][1] - r["evals"][0][1]} for r in rs], "a")
                     for j in range(1, n)]
            color = f"C{i}"
            ax.plot(xs, [100 * s["mean"] for s in stats], marker="o", ms=3, color=color, label=label,
                    ls="--" if label in ("seqkd", "kd_fkl", "kd_rkl") else "-")
            if all(s["low"] is not None for s in stats):
                ax.fill_between(xs, [100 * s["low"] for s in stats], [100 * s["high"] for s in stats], color=color, alpha=0.08)
        ax.axhline(0, color="gray", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(f"matmul FLOPs ({title})")
        ax.set_title(f"M6: held-out accuracy gained against compute, {title}", fontsize=9)
    axes[0].set_ylabel(f"points over the start ({100 * start:.1f} %; teacher {100 * teacher:.1f} %), eval_n")
    axes[1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"m6: figure {path}")
