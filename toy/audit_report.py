"""
What the estimator audit shows: the printed table, audit.csv and the figure of bias against
variance (toy/audit.py computes every number; nothing here differentiates). A cell the audit
leaves undefined (None: the cosines, errors and verdict of a g_L at rounding level) reads n/a.
"""

import csv
import os

COLUMNS = ["objective", "options", "claims", "follows", "cos_J", "err_J", "cos_K", "err_K", "cos_F",
           "err_F", "g_norm", "g_norm_at_q", "trace_cov", "mass_slope_at_q", "dJ_step", "flags"]
NA = "n/a"  # an undefined cell


def cell(x, spec: str) -> str:
    """x in the format spec ('7.3f'), or n/a in the same width where x is None."""
    return f"{NA:>{int(spec.split('.')[0])}}" if x is None else format(x, spec)


def print_table(rows: list[dict], info: dict, cfg) -> None:
    """The table, after the problem's own numbers; cfg: the run's AuditConfig."""
    print(f"exact toy: V={cfg.vocab}, T={cfg.horizon}, coupling {cfg.coupling}, seed {cfg.seed}: "
          f"{info['n_sequences']} sequences, {info['n_params']} student parameters, float64, no sampling")
    print(f"J = {info['J']:.4f}, ||grad J|| = {info['grad_J_norm']:.4f}; cos(grad K_tok, grad J) = "
          f"{info['cos_K_J']:.3f}, cos(grad F_tok, grad J) = {info['cos_F_J']:.3f}; top-K variants K = {cfg.k}")
    w = max([9] + [len(r["follows"] or NA) for r in rows])  # wider for a tie, "J = K exactly"
    head = (f"{'objective':<18} {'options':<18} {'claims':>6} {'follows':>{w}} {'cos J':>7} {'err J':>8} "
            f"{'cos K':>7} {'err K':>8} {'cos F':>7} {'err F':>8} {'|g| pi=q':>9} {'tr Cov':>9} "
            f"{'dJ step':>9}  flags")
    print(head)
    print("-" * len(head))
    for r in rows:
        targets = " ".join(f"{cell(r[f'cos_{t}'], '7.3f')} {cell(r[f'err_{t}'], '8.2e')}" for t in "JKF")
        print(f"{r['objective']:<18} {r['options']:<18} {r['claims']:>6} {r['follows'] or NA:>{w}} {targets} "
              f"{r['g_norm_at_q']:9.2e} {r['trace_cov']:9.3g} {r['dJ_step']:9.2e}  {r['flags']}")
    if info.get("not_audited"):
        print(f"not audited: {', '.join(info['not_audited'])} (reads no teacher: no divergence to the teacher "
              f"to follow)")


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({c: NA if r[c] is None else r[c] for c in COLUMNS} for r in rows)


def plot(rows: list[dict], path: str) -> bool:
    """Bias ||g_L - grad J|| / ||grad J|| against tr Cov, one numbered point per row (rows that land
    on the same point share it), the key beside. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("figure skipped: matplotlib is not installed (pip install matplotlib)")
        return False
    floor = 1e-3  # a row without variance (a constant loss) is drawn at the left edge
    points: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows, 1):  # a g_L at rounding level (err n/a) misses grad J by all of it: 1
        bias = 1.0 if r["err_J"] is None else r["err_J"]
        points.setdefault((round(max(r["trace_cov"], floor), 3), round(bias, 3)), []).append(i)
    fig, (ax, key) = plt.subplots(1, 2, figsize=(13, 6), gridspec_kw=dict(width_ratios=[3, 2]))
    for (x, y), ids in points.items():
        bad = any(rows[i - 1]["flags"] != "-" for i in ids)
        ax.scatter(x, y, color="tab:red" if bad else "tab:blue", s=30, zorder=3)
        ax.annotate(",".join(map(str, ids)), (x, y), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("tr Cov[grad L(y)], y ~ pi  (variance of one sample)")
    ax.set_ylabel("||E[grad L] - grad J|| / ||grad J||  (bias against the sequence KL)")
    ax.set_title("The estimator audit, exact (red: flagged)")
    ax.grid(alpha=0.3)
    lines = [f"{i:>2} {r['objective']} {'' if r['options'] == '-' else r['options']}"
             + ("" if r["flags"] == "-" else f"  [{r['flags']}]") for i, r in enumerate(rows, 1)]
    key.axis("off")
    key.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=6.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def save(rows: list[dict], out: str, plots: bool) -> list[str]:
    """Write out/audit.csv and, with plots, out/audit.png; returns the paths written (OSError when
    out cannot be written)."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, "audit.csv"), os.path.join(out, "audit.png")]
    write_csv(rows, paths[0])
    return paths if plots and plot(rows, paths[1]) else paths[:1]
