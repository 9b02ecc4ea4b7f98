"""
M8's tables, verdicts and figure, from the rows of experiments/m8_multi_task.py (docs/m8.md).

  accuracy   greedy, on final_eval_n held-out problems of each task; a run's final_acc is the mean of
             its two tasks' (both tasks count alike, whatever the training mix)
  stages     the models before any M8 run: the multi-task student, the pair's student S0 and S1
             (S0 after SFT on reversal)
Verdicts: the rule of docs/scorecard.md for "A above B", the equivalence rule (EQUAL) for "A and B
give the same".
"""

import os

from experiments.common import cell_text, equivalence, verdict, verdict_text
from nanoopd.report import by_label, mean, write_results

CSV = ["part", "label", "pair", "seed", "start_acc_math", "start_acc_rev", "acc_math", "acc_rev", "final_acc",
       "first_kl", "final_kl", "degraded", "seconds"]
EQUAL = 0.02  # the equivalence margin: 2 points, as in M7 and M9
NAMES = {"pair_teacher": "the pair's teacher (arithmetic)", "generalist": "generalist teacher (both)",
         "rev": "reversal specialist teacher", "student": "multi-task student", "pair_student": "S0: the pair's student", "forgot": "S1: S0 after SFT on reversal",
         "st_generalist": "sampled-token, generalist", "renorm_generalist": "renormalised top-K, generalist",
         "st_routed": "sampled-token, routed specialists", "recover_opd": "OPD, routed to S0 and S1",
         "recover_sft": "SFT on S0's and S1's samples"}


def report(cfg, rows: list[dict], stages: list[dict], seconds: float, log) -> dict:
    runs = rows + stages
    checks = {}
    at = lambda rs, label, key: [{**r, "final_acc": r[key]} for r in rs if r["label"] == label]  # noqa: E731
    if any(r["part"] == "objectives" for r in rows):
        checks["renorm_above_sampled"] = verdict(rows, "renorm_generalist", "st_generalist")
    if any(r["part"] == "routing" for r in rows):
        checks["routed_above_generalist"] = verdict(rows, "st_routed", "st_generalist")
        checks["routed_same_as_generalist"] = equivalence(rows, "st_routed", "st_generalist", EQUAL)
    if any(r["part"] == "forgetting" for r in rows):
        math = at(runs, "pair_student", "acc_math") + at(runs, "forgot", "acc_math")
        checks["sft_forgets"] = verdict(math, "pair_student", "forgot")
        math = at(runs, "recover_opd", "acc_math") + at(runs, "recover_sft", "acc_math") + at(runs, "forgot", "acc_math")
        checks["opd_recovers"] = verdict(math, "recover_opd", "forgot")
        checks["opd_above_sft"] = verdict(math, "recover_opd", "recover_sft")
        rev = at(runs, "recover_opd", "acc_rev") + at(runs, "forgot", "acc_rev")
        checks["opd_keeps_reversal"] = equivalence(rev, "recover_opd", "forgot", EQUAL)
    lines = [f"M8: two tasks (arithmetic '+-', reversal '~'), mix {cfg.mt_ops}, forgetting {cfg.forget_steps} SFT steps | {cfg.pairs} pair(s) x seeds {cfg.seeds} | "
             f"{cfg.opd_steps} OPD steps x {cfg.opd_batch} rollouts, lr {cfg.opd_lr} | held-out n={cfg.final_eval_n} per task | "
             f"wall {seconds / 60:.1f} min",
             f"{'model or run':34s} | {'arithmetic':8s} | {'reversal':8s} | {'mean of both: mean [95% CI] (per pair)':40s} | degraded"]
    for label, rs in by_label(runs).items():
        bad = sum(bool(r.get("degraded")) for r in rs)
        lines.append(f"{NAMES.get(label, label):34s} | {100 * mean(r['acc_math'] for r in rs):7.1f}% | "
                     f"{100 * mean(r['acc_rev'] for r in rs):7.1f}% | {cell_text(rs):40s} | "
                     f"{'-' if r0_stage(rs) else f'{bad}/{len(rs)}'}")
    text = {"renorm_above_sampled": "renormalised top-K above sampled-token (multi-task, mean of both tasks)",
            "routed_above_generalist": "routed specialists above one generalist",
            "routed_same_as_generalist": f"routed = generalist (within {100 * EQUAL:.0f} points)",
            "sft_forgets": "SFT on reversal forgets arithmetic (S0 above S1 on arithmetic)",
            "opd_recovers": "OPD recovers arithmetic (above S1)", "opd_above_sft": "OPD above SFT on own samples (arithmetic)",
            "opd_keeps_reversal": f"OPD keeps reversal (= S1 within {100 * EQUAL:.0f} points)"}
    lines += [f"{text[k]}: {verdict_text(v)}" for k, v in checks.items()]
    table = "\n".join(lines)
    log(table)
    out = os.path.join(cfg.out_dir, "m8")
    os.makedirs(out, exist_ok=True)
    write_results(out, "m8", runs, table, {"verdicts": checks, "seconds": round(seconds, 1)}, CSV)
    figure(runs, os.path.join(out, f"m8_f{cfg.forget_steps}.png"), log)
    return {"m8_verdicts": {k: v["verdict"] for k, v in checks.items()}}


def r0_stage(rs: list[dict]) -> bool:
    return rs[0]["part"] == "stages"


def figure(runs: list[dict], path: str, log) -> None:
    """Both tasks' accuracy through forgetting and recovery: S0, S1, then the OPD run's evaluations
    (eval_n per task, mean over runs) and SFT's end. Skipped without matplotlib."""
    opd = [r for r in runs if r["label"] == "recover_opd" and r.get("evals_by_task")]
    if not opd:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("m8: figure skipped: matplotlib is not installed (pip install matplotlib)")
        return
    stage = lambda label, key: 100 * mean(r[key] for r in runs if r["label"] == label)  # noqa: E731
    steps = [s for s, _ in opd[0]["evals_by_task"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for task, key, color in (("math", "acc_math", "C0"), ("rev", "acc_rev", "C1")):
        curve = [100 * mean(r["evals_by_task"][i][1][task] for r in opd) for i in range(len(steps))]
        x = [-2, -1] + [s / max(steps) for s in steps]
        y = [stage("pair_student", key), stage("forgot", key)] + curve
        ax.plot(x, y, "o-", color=color, label=f"{'arithmetic' if task == 'math' else 'reversal'}: S0, S1, OPD")
        ax.plot([1], [stage("recover_sft", key)], "s", color=color, mfc="none", ms=9, label="SFT on own samples, end")
    ax.set_xticks([-2, -1, 0, 1], ["S0", "S1 (SFT on\nreversal)", "OPD start", "OPD end"])
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.set_title("M8: forgetting arithmetic, and getting it back (mean over pairs and seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
