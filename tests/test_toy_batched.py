"""Every run of a toy study is one slice of one batched computation (toy/runs.py): a run batched with
others equals the same run alone, the batched shortcuts equal the per-run definitions, and the
toy samples without torch's multinomial kernel."""

import pathlib

import pytest
import torch

from nanoopd.sampled_token import g_gamma_surrogate
from toy.continuous import distill_students, train_teachers, trajectories
from toy.exact import make_problem, train_student, train_students
from toy.policy import GaussianPolicy, PolicyStack
from toy.report import wilson
from toy.runs import inverse_cdf, surrogate_per_run


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------------------------
# the exact toy


@pytest.mark.parametrize("batch_size", [8, None])  # sampled, and noise-free (the exact expected gradient)
def test_exact_toy_batched_runs_equal_the_same_runs_alone(batch_size):
    problem = make_problem(3, 4, 2.0, seed=0)
    gammas, seeds = [0.0, 1.0, 0.5, 1.0], [3, 3, 4, 5]
    batched = train_students(*problem, gammas, seeds, steps=12, batch_size=batch_size, lr=0.3, eval_every=4)
    for r, (gamma, seed) in enumerate(zip(gammas, seeds)):
        alone = train_student(*problem, gamma, 12, batch_size, 0.3, seed, eval_every=4)
        assert torch.allclose(batched["kl"][:, r], torch.tensor(alone["kl"], dtype=torch.float64), rtol=1e-10, atol=0)
    assert batched["steps"] == [0, 4, 8, 12]
    # the two gamma = 1 runs differ only by their seed: sampled, they differ; noise-free, they are one run
    assert torch.equal(batched["kl"][:, 1], batched["kl"][:, 3]) == (batch_size is None)


def test_tabular_sampler_draws_each_token_with_its_probability():
    """Inverse-CDF draws of one position: frequencies within 4 standard errors of the probabilities, and
    a zero-mass token is never drawn."""
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2]]).expand(40_000, -1)  # (n, V)
    u = 1.0 - torch.rand(40_000, generator=torch.Generator().manual_seed(0))  # (n,) in (0, 1]
    y = inverse_cdf(probs, u)
    freq = torch.bincount(y, minlength=4).double() / len(y)
    p = probs[0].double()
    assert freq[1] == 0
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / len(y)).sqrt() + 1e-12).all(), freq
    assert inverse_cdf(probs[:1], torch.ones(1)).item() == 3  # u = 1: the last token of positive mass


def test_toy_never_uses_multinomial_or_cummax():
    """torch.multinomial can return out-of-range ids on MPS; the toy samples by inverting the CDF."""
    for path in (pathlib.Path(__file__).parent.parent / "toy").glob("*.py"):
        text = path.read_text()
        assert "torch.multinomial" not in text and ".cummax(" not in text, path.name


def test_surrogate_per_run_is_the_library_surrogate_run_by_run():
    logp = torch.randn(5, 3, 6, requires_grad=True)  # (R, B, T)
    logq = torch.randn(5, 3, 6)
    gammas = [0.0, 1.0, 0.5, 0.0, 1.0]
    L = surrogate_per_run(logp, logq, gammas)  # (R, B)
    for r, gamma in enumerate(gammas):
        expected = g_gamma_surrogate(logp[r], logq[r], torch.ones(3, 6), gamma)  # (B,)
        assert torch.allclose(L[r], expected, atol=1e-6)
    g, = torch.autograd.grad(L.sum(), logp)
    for r, gamma in enumerate(gammas):  # each run's gradient comes from its own loss only
        g_r, = torch.autograd.grad(g_gamma_surrogate(logp[r], logq[r], torch.ones(3, 6), gamma).sum(), logp)
        assert torch.allclose(g[r], g_r[r], atol=1e-6) and not g_r[torch.arange(5) != r].any()


# ----------------------------------------------------------------------------------------------
# the continuous replica


def test_policy_stack_is_the_gaussian_policy_of_each_seed():
    stack = PolicyStack.init([7, 8], hidden=8, device="cpu")
    ctx = torch.randn(2, 5, 3)  # (R, N, 3)
    mu, std = stack(ctx)  # (R, N)
    for r, seed in enumerate([7, 8]):
        torch.manual_seed(seed)
        m_mu, m_std = GaussianPolicy(hidden=8)(ctx[r])
        assert torch.allclose(mu[r], m_mu, atol=1e-6) and torch.allclose(std[r], m_std, atol=1e-6)


def test_continuous_batched_runs_equal_the_same_runs_alone():
    """Teachers and students trained four at once equal each trained alone (float32 rounding)."""
    kw = dict(horizon=5, batch_size=16, hidden=8)
    teachers = train_teachers([0, 1, 0, 1], [1, 2, 3, 4], steps=6, lr=0.01, **kw)
    for r, (task, seed) in enumerate([(0, 1), (1, 2), (0, 3), (1, 4)]):
        alone = train_teachers([task], [seed], steps=6, lr=0.01, **kw)
        assert all(torch.allclose(w[r], a[0], atol=1e-5) for w, a in zip(teachers.weights, alone.weights))
    gammas, seeds = [0.0, 1.0, 0.5, 1.0], [5, 5, 6, 7]
    pick = lambda rows: (teachers.select(rows), teachers.select([x + 1 for x in rows]))
    students, log = distill_students(pick([0, 0, 2, 2]), gammas, seeds, steps=6, micro_batches=4, lr=3e-3, **kw)
    ends = trajectories(students, 5, 32, [9, 9, 9, 9])  # (R, 2, n, T+1)
    for r, row in enumerate([0, 0, 2, 2]):
        one, one_log = distill_students(pick([row]), [gammas[r]], [seeds[r]], steps=6, micro_batches=4, lr=3e-3, **kw)
        for name in ("variance", "kl_per_step", "final_pos"):
            assert torch.allclose(log[name][:, r], one_log[name][:, 0], rtol=1e-4, atol=1e-5), name
        assert torch.allclose(ends[r], trajectories(one, 5, 32, [9])[0], atol=1e-4)


def test_head_gradient_variance_equals_micro_batch_autograd():
    """The one-backward shortcut of distill_students against M explicit autograd gradients of the head."""
    kw = dict(horizon=4, batch_size=8, hidden=6)
    teachers = train_teachers([0, 1], [1, 2], steps=1, lr=0.01, **kw)
    _, log = distill_students((teachers.select([0]), teachers.select([1])), [1.0], [3], steps=1, micro_batches=4,
                              lr=0.0, optimizer="sgd", **kw)
    # the same first step by hand: same init and samples (seed 3), per-micro-batch gradients by autograd
    from toy.continuous import rollout
    from toy.runs import generators, normals
    student = PolicyStack.init([3], 6, "cpu")
    for w in student.weights:
        w.requires_grad_(True)
    ep = rollout(student, torch.zeros(1, dtype=torch.long), normals(generators([3], "cpu"), 8, 4, "cpu"))
    logp = student.log_prob(ep["ctx"], ep["delta"])  # (1, B, T)
    logq = teachers.select([0]).log_prob(ep["ctx"], ep["delta"])
    L = g_gamma_surrogate(logp[0], logq[0], torch.ones(8, 4), 1.0)  # (B,)
    grads = [torch.cat([g.flatten() for g in torch.autograd.grad(m, student.weights[4:], retain_graph=True)])
             for m in L.view(4, -1).mean(1)]  # M head gradients
    expected = torch.stack(grads).var(0, unbiased=True).sum()
    assert torch.allclose(log["variance"][0, 0], expected, rtol=1e-4)


def test_wilson_interval():
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-3)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-3)
    assert wilson(10, 10)[1] == 1.0
