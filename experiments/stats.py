"""
The statistics of the experiments' cells over pairs and seeds, and the verdict rule.

The 95 % interval of a cell is a Student-t interval over the per-pair means,
  mean_p +- t_{0.975, P-1} * sd(mean_1 .. mean_P) / sqrt(P),
the pair being the unit a reader redraws (a new machine gives a new pair); with one pair, the
same interval over that pair's runs (the OPD seeds) instead, and with one run none. The verdict
rule (docs/scorecard.md) reads the same interval over the pairs' differences of two arms; a claim
that two arms are the same is read by the equivalence rule, the same interval against a margin.
"""

import math

# t_{0.975, df}: the 95 % two-sided Student-t quantile for df = 1 .. 30 (above 30: 1.96 is within 4 %)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


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


def equivalence(rows: list[dict], a: str, b: str, margin: float, key: str = "final_acc", group: str = "label") -> dict:
    """The equivalence rule of docs/scorecard.md for the claim "a and b give the same": the interval
    of verdict(), d +- t_{0.975, P-1} sd(d_p) / sqrt(P), against the margin m (a fraction):
      reproduced      the interval lies within [-m, +m],
      partly          it includes 0 but reaches past the margin,
      not reproduced  it excludes 0.
    With fewer than 3 pairs the verdict is 'pending'."""
    v = verdict(rows, a, b, key, group)
    if v["pairs"] >= 3:
        inside = -margin <= v["low"] and v["high"] <= margin
        v["verdict"] = "reproduced" if inside else "partly" if v["low"] <= 0 <= v["high"] else "not reproduced"
    return {**v, "claim": f"{a} = {b} on {key} within +-{margin:g}", "margin": margin}


def verdict_text(v: dict, scale: float = 100) -> str:
    """'+5.5 [+2.5, +8.4] (+4.8 +4.8 +6.9) reproduced': one verdict's d, its interval and the per-pair
    d_p, in points (scale 100 for accuracies kept as fractions)."""
    if v["mean"] is None:
        return "-"
    ci = f" [{scale * v['low']:+.1f}, {scale * v['high']:+.1f}]" if v["low"] is not None else ""
    return f"{scale * v['mean']:+.1f}{ci} ({' '.join(f'{scale * x:+.1f}' for x in v['per_pair'].values())}) {v['verdict']}"
