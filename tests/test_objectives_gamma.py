"""Exact checks of the sampled-token / g_gamma estimators by enumeration (no sampling noise).

A tiny autoregressive policy over V = 3 tokens and horizon T = 4 is tabular: the logits of y_t are
a table indexed by (t, y_{t-1}), so all V^T = 81 responses can be listed with their probabilities,
and every expectation below is an exact sum. Computed in float64 (g_gamma_surrogate itself
accumulates returns in float32, hence tolerances of ~1e-5).
"""

import itertools

import pytest
import torch

from nanoopd import OBJECTIVES
from nanoopd.sampled_token import discounted_opd, g_gamma_surrogate, sampled_logprobs
from nanoopd.sequence_kl import sequence_reverse_kl

V, T = 3, 4
BOS = V  # the row of the table used at t = 0
SEQUENCES = torch.tensor(list(itertools.product(range(V), repeat=T)))  # (N, T), N = V^T
PREV = torch.cat([torch.full((len(SEQUENCES), 1), BOS), SEQUENCES[:, :-1]], dim=1)  # (N, T)
MASK = torch.ones(len(SEQUENCES), T)  # (N, T)


def tables(seed, coupled):
    """Student parameters and teacher table, (T, V+1, V) logits of y_t given (t, y_{t-1}).

    coupled=False: one row per t, shared by every previous token, so no next-token
    distribution depends on the prefix (future costs cannot depend on the current token).
    """
    g = torch.Generator().manual_seed(seed)
    rows = V + 1 if coupled else 1
    student = 1.5 * torch.randn(T, rows, V, generator=g, dtype=torch.float64)
    teacher = 1.5 * torch.randn(T, rows, V, generator=g, dtype=torch.float64)
    return student.requires_grad_(), teacher


def logits_of(table):
    """(N, T, V) logits of every enumerated response."""
    rows = PREV if table.shape[1] > 1 else torch.zeros_like(PREV)
    return table[torch.arange(T), rows]  # (N, T, V)


def exact_sequence_kl_gradient(student, teacher):
    """grad_theta of J = sum_y pi(y) (log pi(y) - log q(y)), by autograd of the exact sum."""
    logp, logq = sampled_logprobs(logits_of(student), logits_of(teacher), SEQUENCES)  # (N, T)
    log_pi_y, log_q_y = logp.sum(1), logq.sum(1)  # (N,)
    assert log_pi_y.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    J = (log_pi_y.exp() * (log_pi_y - log_q_y)).sum()
    return torch.autograd.grad(J, student)[0]


def per_sequence_g(student, teacher, gamma):
    """g_gamma(y) for every response y (autograd of its surrogate), and pi(y). (N, ...), (N,)."""
    logp, logq = sampled_logprobs(logits_of(student), logits_of(teacher), SEQUENCES)  # (N, T)
    surrogate = g_gamma_surrogate(logp, logq, MASK, gamma)  # (N,)
    one_hot = torch.eye(len(SEQUENCES), dtype=surrogate.dtype)  # (N, N): row i picks surrogate[i]
    (grads,) = torch.autograd.grad(surrogate, student, one_hot, is_grads_batched=True)
    return grads, logp.sum(1).exp().detach()


def expectation(grads, pi):
    return torch.einsum("n,n...->...", pi, grads)


def test_gamma_1_is_exactly_the_gradient_of_the_sequence_kl():
    student, teacher = tables(seed=0, coupled=True)
    grad_J = exact_sequence_kl_gradient(student, teacher)
    grads, pi = per_sequence_g(student, teacher, gamma=1.0)
    torch.testing.assert_close(expectation(grads, pi), grad_J, rtol=1e-5, atol=1e-6)
    # the logits-level objective (sequence_kl.py) is the same estimator, summed with weights pi(y)
    weighted = (pi * sequence_reverse_kl(logits_of(student), logits_of(teacher), SEQUENCES,
                                         MASK)).sum()
    torch.testing.assert_close(torch.autograd.grad(weighted, student)[0], grad_J,
                               rtol=1e-5, atol=1e-6)


def test_gamma_0_is_biased_on_a_coupled_policy():
    student, teacher = tables(seed=0, coupled=True)
    grad_J = exact_sequence_kl_gradient(student, teacher)
    grads, pi = per_sequence_g(student, teacher, gamma=0.0)
    bias = expectation(grads, pi) - grad_J
    # the bias is the future-reward coupling E[sum_t sum_{t'>t} r_t' s_t], here sizeable
    assert bias.norm() > 0.1 * grad_J.norm()
    # and it is exactly g_1 - g_0 in expectation: the coupling terms, nothing else
    grads_1, _ = per_sequence_g(student, teacher, gamma=1.0)
    torch.testing.assert_close(expectation(grads_1 - grads, pi), -bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_every_gamma_is_unbiased_when_future_costs_do_not_depend_on_the_current_token(gamma):
    student, teacher = tables(seed=1, coupled=False)
    grad_J = exact_sequence_kl_gradient(student, teacher)
    grads, pi = per_sequence_g(student, teacher, gamma)
    torch.testing.assert_close(expectation(grads, pi), grad_J, rtol=1e-5, atol=1e-6)


def test_gamma_0_on_logits_is_sampled_token_opd():
    student, teacher = tables(seed=2, coupled=True)
    q = logits_of(teacher)
    loss_0, _ = OBJECTIVES["sequence_kl"](logits_of(student), q, SEQUENCES, MASK, gamma=0.0)
    loss_opd, _ = OBJECTIVES["sampled_token"](logits_of(student), q, SEQUENCES, MASK)
    grad_0, = torch.autograd.grad(loss_0, student)
    grad_opd, = torch.autograd.grad(loss_opd, student)
    torch.testing.assert_close(grad_0, grad_opd, rtol=1e-6, atol=1e-7)
    surrogate = discounted_opd(logits_of(student), q, SEQUENCES, MASK, gamma=0.0).sum() / MASK.sum()
    torch.testing.assert_close(torch.autograd.grad(surrogate, student)[0], grad_opd,
                               rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# one step, every token v enumerated with weight pi(v): sampled-token OPD, clamp and vOPD


def single_step_gradients(student_logits, teacher_logits, **options):
    """The sampled-token gradient for every possible sampled token v at one position, (V, V)."""
    vocab = student_logits.shape[-1]
    x = student_logits.detach().clone().requires_grad_()  # (V,)
    grads = []
    for v in range(vocab):
        loss, _ = OBJECTIVES["sampled_token"](x.view(1, 1, -1), teacher_logits.view(1, 1, -1),
                                              torch.tensor([[v]]), torch.ones(1, 1), **options)
        grads.append(torch.autograd.grad(loss, x)[0])
    return torch.stack(grads)  # (V, V): row v = gradient when y_t = v


def mean_and_variance(grads, pi):
    mean = pi @ grads  # (V,)
    variance = (pi * (grads - mean).pow(2).sum(-1)).sum()  # E ||g - E g||^2
    return mean, variance


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_token_with_and_without_baseline_is_unbiased_for_the_token_kl(seed):
    g = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(5, generator=g, dtype=torch.float64)
    teacher = 2 * torch.randn(5, generator=g, dtype=torch.float64)
    pi = torch.softmax(student, -1)
    x = student.clone().requires_grad_()
    full, _ = OBJECTIVES["full_reverse_kl"](x.view(1, 1, -1), teacher.view(1, 1, -1),
                                            torch.tensor([[0]]), torch.ones(1, 1))
    (grad_full,) = torch.autograd.grad(full, x)
    mean_plain, _ = mean_and_variance(single_step_gradients(student, teacher), pi)
    mean_vopd, _ = mean_and_variance(single_step_gradients(student, teacher, baseline=True), pi)
    torch.testing.assert_close(mean_plain, grad_full, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mean_vopd, grad_full, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mean_vopd, mean_plain, rtol=1e-5, atol=1e-7)


def test_vopd_baseline_lowers_the_variance():
    # the student spreads over 4 tokens the teacher almost never uses: every cost r_t is large
    # and positive, so the raw advantage is far from 0 and the centred one is not
    student = torch.zeros(4, dtype=torch.float64)
    teacher = torch.tensor([0.97, 0.01, 0.01, 0.01], dtype=torch.float64).log()
    pi = torch.softmax(student, -1)
    mean_plain, var_plain = mean_and_variance(single_step_gradients(student, teacher), pi)
    mean_vopd, var_vopd = mean_and_variance(
        single_step_gradients(student, teacher, baseline=True), pi)
    torch.testing.assert_close(mean_vopd, mean_plain, rtol=1e-5, atol=1e-7)
    assert var_vopd < 0.5 * var_plain


def test_clamp_clips_the_cost_on_the_sampled_token():
    student = torch.tensor([3.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    teacher = torch.tensor([-6.0, 0.0, 2.0, 0.5], dtype=torch.float64)
    pi = torch.softmax(student, -1)
    r = torch.log_softmax(student, -1) - torch.log_softmax(teacher, -1)
    grads = single_step_gradients(student, teacher, clamp=1.0)
    for v in range(4):
        # loss = -A log pi(v) with A = -clip(r_v): gradient clip(r_v) (e_v - pi)
        expected = r[v].clamp(-1.0, 1.0) * (torch.nn.functional.one_hot(torch.tensor(v), 4) - pi)
        torch.testing.assert_close(grads[v], expected, rtol=1e-5, atol=1e-7)
    assert r.abs().max() > 1.0  # the clamp was active
