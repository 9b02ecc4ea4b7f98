"""
The figures of train_toy.py (PNG, matplotlib optional and imported only here): the exact toy's bias
and variance, the discrete students' KL curves, the control replica's gradient variance and end
points, and the state-visitation heatmaps of --drift and --sweep. Every number comes from what the
studies return; runs are laid out gamma-major, as in toy/report.py.
"""

import os

import torch

from toy.continuous import OPT_NAMES, TARGETS, visitation

HEATMAP_RANGE = (-6.0, 6.0, 48)  # position bins of the heatmaps: lo, hi, count (targets at -3 and +3)


def plot_figures(cfg, points, table, curves, results) -> list[str] | None:
    """PNG figures; matplotlib is optional and imported only here. Returns the files written, None without
    matplotlib. With --sweep only the heatmaps are drawn (one row per point); they need --drift or --sweep."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    written, G, S = [], len(cfg.control_gammas), len(cfg.control_seeds)

    def save_fig(fig, name, **kw):
        path = os.path.join(cfg.out, name)
        fig.savefig(path, **kw)
        plt.close(fig)
        written.append(path)

    if table:
        fig, (ax_b, ax_v) = plt.subplots(1, 2, figsize=(10, 4))
        for c in cfg.couplings:
            rows = [r for r in table if r["coupling"] == c]
            ax_b.plot([r["gamma"] for r in rows], [r["rel_bias"] for r in rows], "o-", label=f"c={c:g}")
            ax_v.plot([r["gamma"] for r in rows], [r["variance"] for r in rows], "o-", label=f"c={c:g}")
        ax_b.set(xlabel="gamma", ylabel="||E[g] - grad J|| / ||grad J||", title="relative bias (exact)")
        ax_v.set(xlabel="gamma", ylabel="tr Cov[g]", title="variance (exact)", yscale="log")
        ax_b.legend()
        fig.tight_layout()
        save_fig(fig, "bias_variance.png", dpi=120)
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, gamma in enumerate(cfg.gammas):
            for run in (*cfg.seeds, "exact"):
                rows = [r for r in curves if r["gamma"] == gamma and r["run"] == run]
                ax.plot([r["step"] for r in rows], [r["kl"] for r in rows], color=f"C{i}", lw=2 if run == "exact" else 0.7,
                        ls="--" if run == "exact" else "-", label=f"gamma={gamma:g}" if run == "exact" else None)
        ax.set(xlabel="step", ylabel="KL(student || teacher)", yscale="log",
               title="discrete students (dashed: exact expected gradient)")
        ax.legend()
        fig.tight_layout()
        save_fig(fig, "discrete_training.png", dpi=120)
    if results and not cfg.sweep:
        res = results[0]
        fig, ax = plt.subplots(figsize=(6, 4))
        per_gamma = res["log"]["variance"].view(-1, G, S).mean(2)  # (steps, G) mean over seeds
        for i, gamma in enumerate(cfg.control_gammas):
            ax.plot(per_gamma[:, i].tolist(), lw=0.8, label=f"gamma={gamma:g}")
        ax.set(xlabel="OPD step", ylabel="head-gradient variance", yscale="log", title="continuous control")
        ax.legend()
        fig.tight_layout()
        save_fig(fig, "control_variance.png", dpi=120)
        ends = res["ends"].view(G, S, 2, -1)  # (G, S, 2, n)
        fig, axes = plt.subplots(1, G, figsize=(4 * G, 3.5), sharey=True, squeeze=False)
        finite = ends[torch.isfinite(ends)]
        bins = torch.linspace(finite.min().item(), finite.max().item(), 101).tolist()  # the same bins in every panel
        for ax, i in zip(axes[0], range(G)):
            for k in (0, 1):
                ax.hist(ends[i, :, k].flatten().tolist(), bins=bins, alpha=0.6, label=f"task {k}")
                ax.axvline(TARGETS[k], color="k", ls="--", lw=1)
            ax.set(title=f"gamma={cfg.control_gammas[i]:g}", xlabel="final position s_T")
        axes[0, 0].legend()
        fig.tight_layout()
        save_fig(fig, "final_positions.png", dpi=120)
    if results and (cfg.drift or cfg.sweep):  # heatmaps: one row per point, one column per gamma
        from matplotlib.colors import LogNorm
        lo, hi, nbins = HEATMAP_RANGE
        fig, axes = plt.subplots(len(points), G, figsize=(2.6 * G + 1.2, 2.4 * len(points) + 0.6), sharey=True,
                                 squeeze=False)  # own x range per row: T varies
        floor = 1 / (2 * S * cfg.eval_episodes)  # one visit of one episode
        cmap = plt.get_cmap("magma").copy()
        cmap.set_bad(cmap(0.0))  # never visited (0, masked by the log scale): the darkest colour
        for j, (row, (opt, lr, T), res) in enumerate(zip(axes, points, results)):
            for i, ax in enumerate(row):
                freq = visitation(res["paths"][i], lo, hi, nbins).numpy()  # (bins, T+1) every episode of this gamma
                im = ax.imshow(freq, origin="lower", aspect="auto", cmap=cmap, norm=LogNorm(floor, 1),
                               extent=(-0.5, T + 0.5, lo, hi), interpolation="nearest")
                for z in TARGETS:
                    ax.axhline(z, color="c", ls="--", lw=0.8)
                if j == 0:
                    ax.set_title(f"gamma={cfg.control_gammas[i]:g}", fontsize=10)
            row[0].set_ylabel((f"{OPT_NAMES[opt]} lr {lr:g}, T={T}\n" if cfg.sweep else "") + "position s_t")
        for ax in axes[-1]:
            ax.set_xlabel("time step t")
        height = 2.4 * len(points) + 0.6
        fig.suptitle(f"state visitation over {S} seed{'s' if S > 1 else ''} x 2 tasks x {cfg.eval_episodes} episodes "
                     f"(targets dashed; positions beyond +-{hi:g} in the edge rows)", fontsize=10, y=1 + 0.3 / height)
        fig.colorbar(im, ax=axes, shrink=0.8 if len(points) == 1 else 0.25, label="share of episodes")
        save_fig(fig, "control_heatmaps.png", dpi=100, bbox_inches="tight")  # a colorbar over all axes: no tight_layout
    return written
