"""
M9's tables and verdicts, from the rows of experiments/m9_which_teacher.py (docs/m9.md), and the
overlap mass read back from every OPD run's log under --out_dir.

  gain          a run's held-out accuracy (final_eval_n) at the end minus the student's at the start
  overlap mass  the share of pi's (and of q's) probability on TopK(pi) ∩ TopK(q) at the student's
                states, K = diag_k: the first step's value, and the end's (the mean of the last 10 %
                of steps, report.tail_mean), as each run's <run>.jsonl logged it
  a run's fate  gained: +2 points or more on the in-training held-out set, not degraded;
                failed: degraded, below its start, or under 5 % at the end; flat: the rest
Verdicts: the rule of docs/scorecard.md for "A above B", the equivalence rule (stats.equivalence,
margin EQUAL) for "A and B give the same".
"""

import glob
import json
import os

from experiments.common import cell_text, equivalence, interval, verdict, verdict_text
from nanoopd.report import by_label, mean, pct, tail_mean, write_results

CSV = ["part", "label", "pair", "seed", "params", "teacher_acc", "continuation_acc", "start_acc", "final_acc",
       "first_overlap_ratio", "first_overlap_mass_student", "first_overlap_mass_teacher", "final_overlap_ratio",
       "final_overlap_mass_student", "final_overlap_mass_teacher", "first_kl", "final_kl", "kept_alignment",
       "pool_alignment", "kept_minus_share", "degraded", "seconds"]
EQUAL = 0.02  # the equivalence margin: 2 points, the 95 % half-width of one accuracy on 2,000 problems
PUBLISHED_MASS = 0.97  # "a small shared token set holds 97-99 % of the mass" (Rethinking OPD)
NOT_OPD = ("m3",)  # OPSD's runs: the teacher is the student itself with PI, their accuracy is read without it


def report(cfg, pcfgs: list, rows: list[dict], seconds: float, log) -> dict:
    teach = [r for r in rows if r["part"] == "teachers"]
    prompts = [r for r in rows if r["part"] == "prompts"]
    start = [{**r, "label": "start", "final_acc": r["start_acc"]} for r in teach if r["label"] == "default"]
    checks, lines = {}, [f"M9: which teacher, which prompts | {cfg.pairs} pair(s) x seeds {cfg.seeds} | {cfg.loss}, "
                         f"{cfg.opd_steps} OPD steps x {cfg.opd_batch} rollouts, lr {cfg.opd_lr} | held-out "
                         f"n={cfg.final_eval_n} | wall {seconds / 60:.1f} min"]
    if teach:
        student = [{**r, "label": "student", "teacher_acc": r["start_acc"]} for r in start]
        checks.update(new_capability=verdict(teach, "default", "thin"),
                      thin_teaches_nothing=equivalence(teach + start, "thin", "start", EQUAL),
                      thin_above_student=verdict(teach + student, "thin", "student", key="teacher_acc"),
                      big_same=equivalence(teach, "big", "default", EQUAL),
                      small_same=equivalence(teach, "small", "default", EQUAL))
        s = start[0] if start else {}
        lines += [f"student at start: {pct(r['start_acc'] for r in start)} held-out greedy; by operator "
                  + " | ".join(f"{o} {100 * mean(r['start_acc_by_op'][o] for r in start):.1f}%" for o in s.get("start_acc_by_op", {})),
                  f"{'teacher':8s} | {'params':>9s} | {'teacher acc':11s} | {'+ / -':13s} | {'cont. 50%':9s} | "
                  f"{'top-16 overlap, start':23s} | {'KL start':8s} | {'student after OPD: mean [95% CI]':36s} | {'gain':6s} | {'- after':7s}",
                  f"{'':8s} | {'':9s} | {'':11s} | {'':13s} | {'':9s} | {'ratio / mass pi / q':23s} | {'':8s} | "
                  f"{'(per pair)':36s} | {'':6s} | {'':7s}"]
        for label, rs in by_label(teach).items():
            op = lambda key, o: 100 * mean(r[key].get(o) for r in rs)
            lines.append(f"{label:8s} | {rs[0]['params']:9,d} | {100 * mean(r['teacher_acc'] for r in rs):10.1f}% | "
                         f"{op('teacher_acc_by_op', '+'):5.1f} / {op('teacher_acc_by_op', '-'):5.1f} | "
                         f"{100 * mean(r['continuation_acc'] for r in rs):8.1f}% | "
                         + " / ".join(f"{100 * mean(r[f'first_{k}'] for r in rs):5.1f}" for k in
                                      ("overlap_ratio", "overlap_mass_student", "overlap_mass_teacher"))
                         + f" | {mean(r['first_kl'] for r in rs):8.3f} | {cell_text(rs):36s} | "
                         f"{100 * mean(r['final_acc'] - r['start_acc'] for r in rs):+5.1f} | {op('final_acc_by_op', '-'):6.1f}%")
        lines += ["teacher acc: greedy on the held-out set; cont. 50%: the teacher finishing the student's samples cut "
                  "at half; overlap: first OPD step; gain: points over the start; - after: the student on '-' after OPD",
                  f"new capability (default above thin) {verdict_text(checks['new_capability'])}; thin's gain = 0 "
                  f"(within {100 * EQUAL:.0f} points) {verdict_text(checks['thin_teaches_nothing'])}; thin teacher above the "
                  f"student {verdict_text(checks['thin_above_student'])}",
                  f"sizes: big = default {verdict_text(checks['big_same'])}; small = default {verdict_text(checks['small_same'])}"]
    if prompts:
        checks.update(aligned_scratch=verdict(prompts, "scratch_aligned", "scratch_random"),
                      aligned_cold=verdict(prompts, "cold_aligned", "cold_random"))
        lines += [f"prompt rule: keep {cfg.select_keep:g} of {cfg.select_pool} candidates by the teacher's mass on the "
                  f"shared top-{cfg.diag_k} at the student's states (random: a random subset of the same size)",
                  f"{'student / prompts':17s} | {'alignment kept / pool':21s} | {'- among kept':12s} | "
                  f"{'start':6s} | {'after OPD: mean [95% CI] (per pair)':38s} | {'degraded':8s}"]
        for label, rs in by_label(prompts).items():
            lines.append(f"{label:17s} | {100 * mean(r['kept_alignment'] for r in rs):9.1f} / "
                         f"{100 * mean(r['pool_alignment'] for r in rs):5.1f}%   | "
                         f"{100 * mean(r['kept_minus_share'] for r in rs):11.1f}% | {100 * mean(r['start_acc'] for r in rs):5.1f}% | "
                         f"{cell_text(rs):38s} | {sum(bool(r['degraded']) for r in rs)}/{len(rs)}")
        lines.append(f"aligned above random: random student {verdict_text(checks['aligned_scratch'])}; cold-started "
                     f"{verdict_text(checks['aligned_cold'])}")
    mass_rows = run_masses(cfg.out_dir, cfg.seed)
    checks.update(mass_checks(mass_rows))
    lines += mass_table(mass_rows, checks)
    table = "\n".join(lines)
    log(table)
    folder = os.path.join(cfg.out_dir, "m9")
    os.makedirs(folder, exist_ok=True)
    write_results(folder, "m9", rows, table, {"verdicts": checks, "masses": mass_rows, "seconds": round(seconds, 1)}, CSV)
    return {"m9_verdicts": {k: v["verdict"] for k, v in checks.items()}}

# -----------------------------------------------------------------------------
# the overlap mass, read back from the runs' logs


def fate(summary: dict) -> str:
    start, end = summary.get("start_acc"), summary.get("final_acc")
    if summary.get("degraded") or end is None or end < start or end < 0.05:
        return "failed"
    return "gained" if end - start >= 0.02 else "flat"


def run_masses(out_dir: str, seed: int) -> list[dict]:
    """One row per on-policy OPD run found under out_dir (<run>.json beside its <run>.jsonl; not
    OPSD's): its experiment (the folder), pair, fate, and overlap ratio and masses at the first
    step and at the end."""
    out = []
    for path in sorted(glob.glob(os.path.join(out_dir, "**", "*.json"), recursive=True)):
        if path.endswith(".row.json") or not os.path.exists(path[:-5] + ".jsonl"):
            continue
        with open(path) as f:
            s = json.load(f)
        first = s.get("first_step") if isinstance(s, dict) else None
        if not first or "overlap_mass_teacher" not in first or s.get("config", {}).get("lmbda", 1.0) < 1:
            continue
        with open(path[:-5] + ".jsonl") as f:
            records = [json.loads(line) for line in f if line.strip()]
        parts = os.path.relpath(path, out_dir).split(os.sep)
        if len(parts) < 2 or parts[-2] in NOT_OPD:
            continue
        pair = int(parts[0][4:]) if parts[0].startswith("pair") and parts[0][4:].isdigit() else seed
        row = {"experiment": parts[-2], "run": parts[-1][:-5], "pair": pair, "fate": fate(s)}
        for key, short in (("overlap_ratio", "ratio"), ("overlap_mass_student", "mass_pi"), ("overlap_mass_teacher", "mass_q")):
            row[f"start_{short}"], row[f"end_{short}"] = first[key], tail_mean(records, key)
        out.append(row)
    return out


def mass_checks(rows: list[dict]) -> dict:
    """In runs that gained: does the shared mass rise from start to end (the rule of "A above B"),
    and does it reach the published 97 % at the end (the interval over pairs at or above it:
    reproduced; the mean: partly; not even the mean: not reproduced), for q and for pi."""
    gained = [r for r in rows if r["fate"] == "gained"]
    out = {}
    for m in ("mass_q", "mass_pi"):
        pts = [{"pair": r["pair"], "label": when, "v": r[f"{when}_{m}"]} for r in gained for when in ("end", "start")]
        out[f"{m}_rises"] = verdict(pts, "end", "start", key="v")
        c = interval([{"pair": r["pair"], "v": r[f"end_{m}"]} for r in gained], "v")
        word = ("pending" if len(c["per_pair"]) < 3 else "reproduced" if c["low"] >= PUBLISHED_MASS
                else "partly" if c["mean"] >= PUBLISHED_MASS else "not reproduced")
        out[f"{m}_level"] = {"claim": f"end {m} >= {PUBLISHED_MASS}", **c, "verdict": word}
    return out


def mass_table(rows: list[dict], checks: dict) -> list[str]:
    ci = lambda rs, k: cell_text([{"pair": r["pair"], k: r[k]} for r in rs], k)
    lines = [f"overlap mass of every on-policy OPD run under out_dir ({len(rows)} runs): mean [95% CI over pairs] (per pair)",
             f"{'experiment':14s} | {'fate':6s} | {'runs':4s} | {'mass of q on the shared top-K: start':40s} | "
             f"{'end':40s} | {'mass of pi: start -> end':24s} | {'ratio: start -> end':18s}"]
    for exp in sorted({r["experiment"] for r in rows}):
        for f in ("gained", "flat", "failed"):
            rs = [r for r in rows if r["experiment"] == exp and r["fate"] == f]
            if rs:
                lines.append(f"{exp:14s} | {f:6s} | {len(rs):4d} | {ci(rs, 'start_mass_q'):40s} | {ci(rs, 'end_mass_q'):40s} | "
                             f"{100 * mean(r['start_mass_pi'] for r in rs):5.1f} -> {100 * mean(r['end_mass_pi'] for r in rs):5.1f}% "
                             f"      | {100 * mean(r['start_ratio'] for r in rs):5.1f} -> {100 * mean(r['end_ratio'] for r in rs):5.1f}%")
    if "mass_q_level" in checks:
        lv = lambda m: checks[f"{m}_level"]
        lines.append(f"runs that gained: q's mass rises {verdict_text(checks['mass_q_rises'])}, pi's "
                     f"{verdict_text(checks['mass_pi_rises'])}; at the end q's mass {100 * (lv('mass_q')['mean'] or 0):.1f}% "
                     f"(>= 97 %: {lv('mass_q')['verdict']}), pi's {100 * (lv('mass_pi')['mean'] or 0):.1f}% "
                     f"({lv('mass_pi')['verdict']})")
    return lines
