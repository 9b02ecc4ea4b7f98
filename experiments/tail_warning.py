"""
Does the tail mass warn of a collapse? The stability map's reading of every run's tail mass (the
student's mass outside the teacher's top-K, metrics.TailMass) against its held-out accuracy: when
the tail rose and when accuracy dropped, whether the rise came first in the runs that degraded, and
how often it rose in the runs that did not (false alarms), for a relative rise and for absolute levels.
"""

TAIL_FACTOR = 2.0  # the tail has risen when its trailing mean exceeds this multiple of its start (see lead)
TAIL_WINDOW = 5   # steps in the tail's start value (the first ones, still in the warm-up) and trailing mean
TAIL_LEVELS = (0.003, 0.01, 0.03)  # absolute warning levels of the tail's trailing mean (2x a start of 1e-4 is noise)


def lead(row: dict, recs: list[dict]) -> dict:
    """When the tail rose and when accuracy dropped, all in steps done. The tail is read through its
    trailing mean over TAIL_WINDOW steps, m_n = mean of the tail at steps n - TAIL_WINDOW + 1 .. n
    (one batch's value is too noisy): tail_step is the first n with m_n > TAIL_FACTOR x the mean over
    the first TAIL_WINDOW steps (first_tail_mass), tail_<level>_step the first n with m_n > level
    for each of TAIL_LEVELS, and peak_tail_mass the largest m_n. acc_drop_step is the first
    evaluation at which held-out accuracy was more than 10 points below the start."""
    tails = [r["tail_mass"] for r in recs]
    base = sum(tails[:TAIL_WINDOW]) / len(tails[:TAIL_WINDOW]) if tails else None
    means = [(i + 1, sum(tails[i + 1 - TAIL_WINDOW:i + 1]) / TAIL_WINDOW) for i in range(TAIL_WINDOW - 1, len(tails))]
    first_above = lambda level: next((n for n, m in means if m > level), None)
    drop = next((s for s, a, *_ in row["evals"][1:] if a < row["start_acc_train"] - 0.10), None)  # the same eval_n set
    return {"first_tail_mass": base, "tail_step": first_above(TAIL_FACTOR * base) if tails else None,
            "acc_drop_step": drop, "peak_tail_mass": max((m for _, m in means), default=None),
            **{f"tail_{level:g}_step": first_above(level) for level in TAIL_LEVELS}}


def level_table(rows: list[dict]) -> list[str]:
    """How well an absolute tail level warns: for each of TAIL_LEVELS, the runs whose accuracy dropped
    in which the tail's trailing mean passed the level first (and by how many steps), and the runs
    that did not degrade in which it passed the level all the same."""
    drops = [r for r in rows if r["degraded"] and r["acc_drop_step"] is not None]
    good = [r for r in rows if not r["degraded"]]
    lines = [f"absolute tail levels: the first step its {TAIL_WINDOW}-step trailing mean passed the level, against the "
             f"accuracy drop of the {len(drops)} degraded runs whose accuracy dropped",
             f"{'level':6s} | {'drops it precedes':17s} | {'by (steps)':10s} | runs that did not degrade and pass it"]
    for level in TAIL_LEVELS:
        key = f"tail_{level:g}_step"
        leads = [r["acc_drop_step"] - r[key] for r in drops if r[key] is not None and r[key] < r["acc_drop_step"]]
        passed = sum(r[key] is not None for r in good)
        lines.append(f"{level:<6g} | {f'{len(leads)} of {len(drops)}':17s} | "
                     f"{f'{min(leads)}-{max(leads)}' if leads else '-':10s} | {passed} of {len(good)}")
    peak = max((r["peak_tail_mass"] for r in good if r["peak_tail_mass"] is not None), default=None)
    ends = [r["final_tail_mass"] for r in rows if r["degraded"] and r.get("final_tail_mass") is not None]
    if peak is not None:
        lines.append(f"highest trailing mean of a run that did not degrade: {peak:.4f}"
                     + (f"; final tail of the degraded runs: {min(ends):.4f}-{max(ends):.4f}" if ends else ""))
    return lines


def lead_table(rows: list[dict], eval_every: int) -> list[str]:
    """One line per degraded run: when the tail rose (TAIL_FACTOR x its start) against when accuracy
    dropped, and whether the rise came first; then the false alarms and level_table."""
    lines = [f"degraded runs: the step at which the tail mass ({TAIL_WINDOW}-step trailing mean) first exceeded "
             f"{TAIL_FACTOR:g}x its mean over the first {TAIL_WINDOW} steps vs the first evaluation (every "
             f"{eval_every} steps) with held-out accuracy > 10 points below the start; both in steps done",
             f"{'run':34s} | {'lr':6s} | {'pair':5s} | seed | {'tail start -> end':18s} | tail x{TAIL_FACTOR:g} at | acc drop at | "
             f"{'verdict':15s} | tail leads?"]
    bad = [r for r in rows if r["degraded"]]
    for r in bad:
        t, d = r["tail_step"], r["acc_drop_step"]
        leads = "-" if d is None else ("no tail rise" if t is None else
                                       ("yes" if t < d else "no"))
        lines.append(f"{r['label']:34s} | {r['lr']:<6g} | {r['pair']:5d} | {r['seed']:4d} | "
                     f"{r['first_tail_mass']:.4f} -> {r.get('final_tail_mass', float('nan')):.4f}"
                     f"{'':2s} | {t or '-':>11} | {d or '-':>11} | {r['degraded']:15s} | {leads}")
    good = [r for r in rows if not r["degraded"]]
    alarms = [r for r in good if r["tail_step"] is not None]
    return lines + [f"false alarms: the tail crossed {TAIL_FACTOR:g}x in {len(alarms)} of the {len(good)} runs that did "
                    f"not degrade" + (f" ({', '.join(sorted(set(r['label'] + ' lr ' + format(r['lr'], 'g') for r in alarms)))})"
                                      if alarms else ""),
                    ""] + level_table(rows)
