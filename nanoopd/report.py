"""
Reporting: what a run's records become in a log line, a summary, a table and its files.

  tail_mean     the mean of a logged figure over the last 10 % of steps: an end-of-run value that
                one noisy batch cannot decide
  degradation   why a run counts as degraded: non-finite, length, collapse (or '')
  tables        the experiments' cells (mean and per-seed values) and their header line
  files         <name>.txt (the printed table), .csv (one row per run), .json (everything)
"""

import csv
import json
import os


# -----------------------------------------------------------------------------
# one run


def format_record(name: str, rec: dict) -> str:
    """`step | loss | kl | acc | tok/s | overlap | length | GFLOP` (+ held-out accuracy when
    evaluated); the figures of the student's rows, or of the teacher's (marked) when it has none."""
    s = "" if "kl" in rec else "_teacher_rows"  # lmbda = 0: only teacher rows (nanoopd/step_record.py)
    line = (f"opd {name} step {rec['step']:4d} | loss {rec['loss']:+.4f} | kl{s and '(t)'} {rec['kl' + s]:.4f} | "
            f"acc{s and '(t)'} {rec['acc' + s]:6.1%} | tok/s {rec['tok_s']:7,.0f} | overlap {rec['overlap_ratio' + s]:6.1%} | "
            f"len {rec['response_length' + s]:5.1f} | {rec.get('flops', 0) / 1e9:6.1f} GFLOP")
    return line + (f" | held-out {rec['eval_acc']:.1%}" if "eval_acc" in rec else "")


def tail_mean(records: list[dict], key: str, frac: float = 0.1) -> float:
    """Mean of `key` over the last 10 % of the records (at least one): an end-of-run value that
    one noisy batch cannot decide."""
    tail = records[-max(1, int(len(records) * frac)):]
    return sum(r[key] for r in tail) / len(tail)


def degradation(summary: dict, budget_share_limit: float = 0.5, collapse_drop: float = 0.10) -> str:
    """Why a run counts as degraded, '' if it does not:
      'non-finite'   the loss or gradient became NaN/inf;
      'length'       responses blew up to the budget: over the last 10 % of steps at least half
                     of the rollouts (and 25 points more than at step 0) hit max_new_tokens
                     without an EOS;
      'collapse'     final held-out greedy accuracy more than 10 points below the start."""
    reasons = []
    if summary.get("error"):
        reasons.append("non-finite")
    final_hits = summary.get("final_budget_share", 0.0)
    if final_hits >= max(budget_share_limit, summary.get("first_budget_share", 0.0) + 0.25):
        reasons.append("length")
    if summary.get("final_acc") is not None and summary["final_acc"] < summary["start_acc"] - collapse_drop:
        reasons.append("collapse")
    return "+".join(reasons)


def summarize_records(summary: dict, records: list[dict]) -> dict:
    """Add a run's end-of-run figures (final_*: tail means), its first step and its degradation
    verdict to `summary` (which holds start_acc, final_acc and error), in place."""
    if records and "kl" not in records[0]:  # lmbda = 0: no student rows; the teacher rows' figures stand in
        records = [{**r, **{k[:-len("_teacher_rows")]: v for k, v in r.items() if k.endswith("_teacher_rows")}}
                   for r in records]
        summary["figures_of"] = "teacher rows"
    if records:
        for key in ("kl", "response_length", "overlap_ratio", "overlap_mass_student", "overlap_mass_teacher",
                    "budget_share", "grad_norm", "logratio_max_abs", "track_logratio_mean", "track_rows",
                    "track_other_kl", "tail_mass"):
            if key in records[-1]:
                summary[f"final_{key}"] = tail_mean(records, key)
        summary["final_rollout_acc"] = tail_mean(records, "acc")  # final_acc is the held-out one
        summary["first_kl"], summary["first_budget_share"] = records[0]["kl"], records[0]["budget_share"]
        summary["first_step"] = records[0]
        summary["max_logratio_abs"] = max(r["logratio_max_abs"] for r in records)
    summary["degraded"] = degradation(summary)
    return summary


# -----------------------------------------------------------------------------
# tables of many runs


def by_label(rows: list[dict]) -> dict[str, list[dict]]:
    out = {}
    for r in rows:
        out.setdefault(r["label"], []).append(r)
    return out


def pct(values, none="-") -> str:
    """'61.2% (60.4 62.0)': the mean and each seed's value, in percent."""
    values = [v for v in values if v is not None]
    if not values:
        return none
    each = " ".join(f"{100 * v:.1f}" for v in values)
    return f"{100 * sum(values) / len(values):.1f}% ({each})"


def degraded_cell(rows: list[dict]) -> str:
    """'1/2 collapse': how many of the seeds degraded, and why."""
    bad = [r["degraded"] for r in rows if r["degraded"]]
    return f"{len(bad)}/{len(rows)} {' '.join(sorted(set(bad)))}".rstrip()


def mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def write_results(folder: str, name: str, rows: list[dict], table: str, meta: dict, csv_keys) -> None:
    """<folder>/<name>.txt (the printed table), .csv (one row per run) and .json (everything)."""
    with open(os.path.join(folder, f"{name}.txt"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(folder, f"{name}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=csv_keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump({**meta, "runs": [{k: v for k, v in r.items() if k != "config"} for r in rows]}, f, indent=2)


def header(cfg, what: str, teacher_acc: float, student_acc: float, seconds: float) -> str:
    return (f"{what} | seeds {cfg.seeds} | {cfg.opd_steps} OPD steps x {cfg.opd_batch} rollouts | lr {cfg.opd_lr} | "
            f"T={cfg.temperature} top_p={cfg.top_p} top_k={cfg.top_k} | held-out n={cfg.eval_n} | "
            f"teacher {teacher_acc:.1%}, student at start {student_acc:.1%} (greedy) | wall {seconds / 60:.1f} min")
