"""The future-reward-coupling toys: exact quantities, their expected shape, the teachers, the script."""

import math

import pytest
import torch

from toy.continuous import TARGETS, PolicyStack, train_teachers, trajectories
from toy.exact import all_sequences, exact_estimator_stats, make_problem, sequence_kl, train_student
from nanoopd.sampled_token import g_gamma_surrogate

GAMMAS = [0.0, 0.25, 0.5, 0.75, 1.0]
EXACT_TOL = 1e-10  # the enumeration runs in float64: "zero" means double-precision rounding


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_exact_quantities_match_monte_carlo():
    """E[g_gamma], tr Var[g_gamma] and J by enumeration agree with a seeded Monte Carlo estimate.

    For the sample mean of n i.i.d. gradients, E||mean - E[g]||^2 = tr Cov / n, so a distance of
    4 * sqrt(tr Cov / n) is a generous but meaningful tolerance.
    """
    student, theta, teacher, phi = make_problem(3, 4, 1.0, seed=0)
    exact = exact_estimator_stats(student, theta, teacher, phi, [0.0, 0.5, 1.0])
    n = 20_000
    y = student.sample(theta, n, torch.Generator().manual_seed(1))  # (n, T)
    rows = theta.detach().expand(n, -1).clone().requires_grad_(True)  # (n, P)
    logp = student.token_logprobs(rows, y)  # (n, T)
    logq = teacher.token_logprobs(phi, y)  # (n, T)

    # the sequence KL J = E[log pi(y) - log q(y)]
    seqs = all_sequences(3, 4)
    J = sequence_kl(student, theta, teacher, phi, seqs).item()
    per_seq = (logp - logq).sum(-1).detach()  # (n,)
    assert abs(per_seq.mean().item() - J) < 4 * per_seq.std().item() / math.sqrt(n)

    for r in exact:
        g, = torch.autograd.grad(g_gamma_surrogate(logp, logq, torch.ones_like(logp), r["gamma"]).sum(),
                                 rows, retain_graph=True)  # (n, P) per-sample g_gamma
        mc_mean = g.mean(0)  # (P,)
        mc_var = g.var(0).sum().item()
        assert (mc_mean - r["mean_g"]).norm().item() < 4 * math.sqrt(r["variance"] / n), r["gamma"]
        assert abs(mc_var - r["variance"]) < 0.1 * r["variance"], (r["gamma"], mc_var, r["variance"])


@pytest.mark.parametrize("coupling", [0.0, 0.5, 2.0])
def test_bias_vanishes_at_gamma_one_and_at_zero_coupling(coupling):
    student, theta, teacher, phi = make_problem(3, 5, coupling, seed=3)
    stats = exact_estimator_stats(student, theta, teacher, phi, GAMMAS)
    assert stats[-1]["rel_bias"] < EXACT_TOL  # gamma = 1 is the unbiased REINFORCE gradient of J
    for r in stats[:-1]:
        if coupling == 0.0:
            assert r["rel_bias"] < EXACT_TOL  # no prefix dependence: no future-reward coupling
        else:
            assert r["rel_bias"] > 0.01  # a coupled toy really is biased below gamma = 1


def test_bias_and_variance_shape():
    """Bias falls and variance rises with gamma; variance rises with T; bias at gamma=0 rises with c."""
    student, theta, teacher, phi = make_problem(3, 4, 1.0, seed=0)
    short = exact_estimator_stats(student, theta, teacher, phi, GAMMAS)
    bias = [r["rel_bias"] for r in short]
    var = [r["variance"] for r in short]
    assert all(a > b for a, b in zip(bias, bias[1:])), bias
    assert all(a < b for a, b in zip(var, var[1:])), var

    student, theta, teacher, phi = make_problem(3, 6, 1.0, seed=0)  # same first 4 positions, 2 more
    long = exact_estimator_stats(student, theta, teacher, phi, GAMMAS)
    assert all(lo["variance"] > sh["variance"] for lo, sh in zip(long, short))

    bias0 = [exact_estimator_stats(*make_problem(3, 4, c, seed=0), [0.0])[0]["rel_bias"] for c in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(bias0, bias0[1:])), bias0


def test_noise_free_training_descends_the_sequence_kl():
    """With the exact expected gradient, gamma = 1 is gradient descent on J: J must go down at every check."""
    student, theta, teacher, phi = make_problem(3, 4, 1.0, seed=0)
    res = train_student(student, theta, teacher, phi, gamma=1.0, steps=40, batch_size=None, lr=0.05,
                        seed=0, optimizer="sgd", eval_every=5)
    assert all(a > b for a, b in zip(res["kl"], res["kl"][1:])), res["kl"]
    assert not res["unstable"]


def test_gaussian_log_prob_matches_torch_distributions():
    policy = PolicyStack.init([0, 1], hidden=8, device="cpu")
    ctx, delta = torch.randn(2, 4, 5, 3), torch.randn(2, 4, 5)  # (R, B, T, 3), (R, B, T)
    mu, std = policy(ctx.view(2, 20, 3))  # (R, B*T)
    expected = torch.distributions.Normal(mu.view(2, 4, 5), std.view(2, 4, 5)).log_prob(delta)  # (R, B, T)
    assert torch.allclose(policy.log_prob(ctx, delta), expected, atol=1e-5)


def test_each_teacher_reaches_its_target():
    teachers = train_teachers([0, 1], [0, 1], horizon=10, steps=80, batch_size=64, lr=0.01)  # both tasks at once
    ends = trajectories(teachers, horizon=10, n=256, seeds=[0, 0])[..., -1]  # (R, 2, n)
    for task in (0, 1):
        assert (ends[task, task] - TARGETS[task]).abs().mean().item() < 0.25, ends[task, task].mean().item()


def test_quick_run_writes_its_csvs(tmp_path):
    import train_toy

    out = train_toy.main(["--quick", "--no-plots", "--out", str(tmp_path)])
    for name in ("exact_table", "exact_by_horizon", "discrete_training", "discrete_summary",
                 "control_variance", "control_final_positions", "control_summary"):
        lines = (tmp_path / f"{name}.csv").read_text().splitlines()
        assert len(lines) > 1, name
    cfg = out["config"]
    assert len(out["table"]) == len(cfg.couplings) * len(cfg.gammas)
    assert all(math.isfinite(r["mean_kl"]) for r in out["train_summary"])


@pytest.mark.parametrize("flags, message", [(["--gammas", "0,1.5"], "[0, 1]"),
                                            (["--vocab", "4", "--horizon", "12"], "cannot be enumerated"),
                                            (["--control_batch", "60"], "micro-batches")])
def test_bad_flags_are_refused_with_a_reason(flags, message, capsys):
    import train_toy

    with pytest.raises(SystemExit):
        train_toy.main(flags + ["--no-plots"])
    assert message in capsys.readouterr().err
