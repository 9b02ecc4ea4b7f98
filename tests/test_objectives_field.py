"""The field's estimators (field_estimators.py): exact expected gradients against closed forms.

For a sampled-token loss the expectation over y_t ~ pi(.|c_t) is taken by enumeration: every
position is scored once with each token v, and the per-position gradients are summed with the
weights pi_t(v). Closed forms are written on the logits z: grad_z log pi(v) = e_v - pi. Float64.
"""

import pytest
import torch

from nanoopd import OBJECTIVES
from tests.test_objectives_topk import make_batch as topk_batch

B, T, V, K = 2, 3, 6, 3


def make_batch(seed=0):
    return topk_batch(seed, (B, T, V), drop_last=False)  # every position in the loss


def loss_and_grad(name, student, teacher, tokens, mask, **options):
    x = student.detach().clone().requires_grad_()
    loss, _ = OBJECTIVES[name](x, teacher, tokens, mask, **options)
    return loss.detach(), torch.autograd.grad(loss, x)[0]


def per_token_grads(name, student, teacher, **options):
    """grads[v] (B, T, V): gradient of the per-position loss (summed, not averaged) when every
    position samples token v."""
    mask = torch.ones(B, T, dtype=torch.bool)
    return torch.stack([loss_and_grad(name, student, teacher, torch.full((B, T), v), mask,
                                      **options)[1] * (B * T) for v in range(V)])  # (V, B, T, V)


def expected_grad(name, student, teacher, **options):
    """E_{y_t ~ pi(.|c_t)}[grad loss_t] per position, (B, T, V), by enumeration of y_t."""
    pi = torch.softmax(student, -1)  # (B, T, V)
    grads = per_token_grads(name, student, teacher, **options)  # (V, B, T, V)
    return torch.einsum("btv,vbtw->btw", pi, grads)


def score_sum(weights, pi):
    """sum_v w_v grad_z log pi(v) = w - pi sum_v w_v, per position (B, T, V)."""
    return weights - pi * weights.sum(-1, keepdim=True)


def pi_q_r(student, teacher):
    logp, logq = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    return logp.exp(), logq.exp(), logp - logq


def teacher_topk(teacher, k):
    """in_S (B, T, V) bool: the teacher's top-k, from argsort."""
    top = teacher.argsort(-1, descending=True)[..., :k]
    return torch.zeros(B, T, V, dtype=torch.bool).scatter(-1, top, True)


def grad_reverse(student, teacher):
    pi, _, r = pi_q_r(student, teacher)
    return score_sum(pi * r, pi)  # grad K per position


def grad_forward(student, teacher):
    pi, q, _ = pi_q_r(student, teacher)
    return -score_sum(q, pi)  # grad F = -sum_v q grad log pi = pi - q


# ----------------------------------------------------------------------------------------------
# k1 / k2 / k3


def test_k1_has_zero_expected_gradient_but_noisy_samples():
    student, teacher, _, _ = make_batch()
    g = expected_grad("kl_k1", student, teacher)
    torch.testing.assert_close(g, torch.zeros_like(g), atol=1e-14, rtol=0)
    assert per_token_grads("kl_k1", student, teacher).abs().max() > 0.1  # each sample is not 0


def test_k2_follows_the_reverse_kl():
    student, teacher, _, _ = make_batch()
    torch.testing.assert_close(expected_grad("kl_k2", student, teacher),
                               grad_reverse(student, teacher), rtol=1e-10, atol=1e-12)


def test_k3_follows_the_forward_kl_not_the_reverse():
    student, teacher, _, _ = make_batch()
    g = expected_grad("kl_k3", student, teacher)
    torch.testing.assert_close(g, grad_forward(student, teacher), rtol=1e-10, atol=1e-12)
    assert (g - grad_reverse(student, teacher)).abs().max() > 0.05  # and that is a different thing


def test_k3_clamp_removes_the_gradient_of_the_clipped_tokens():
    student, teacher, _, _ = make_batch()
    pi, q, r = pi_q_r(student, teacher)
    k3 = torch.expm1(-r) + r  # (B, T, V)
    middle = k3.flatten().sort().values[k3.numel() // 2 - 1: k3.numel() // 2 + 1]
    clamp = middle.mean().item()  # between two values: active on half the tokens, none on the edge
    g = expected_grad("kl_k3", student, teacher, clamp=clamp)
    kept = (k3 <= clamp).double()
    torch.testing.assert_close(g, score_sum(pi * kept * (1 - q / pi), pi), rtol=1e-10, atol=1e-12)
    assert (g - grad_forward(student, teacher)).abs().max() > 0.05
    loss, _ = loss_and_grad("kl_k3", student, teacher, torch.zeros(B, T, dtype=torch.long),
                            torch.ones(B, T, dtype=torch.bool), clamp=clamp)
    assert loss <= clamp  # the value is clipped too


# ----------------------------------------------------------------------------------------------
# vOPD with a top-K baseline


def test_topk_baseline_keeps_the_expected_gradient_and_shifts_each_sample():
    student, teacher, _, _ = make_batch()
    g = expected_grad("sampled_token", student, teacher, baseline="topk", k=K)
    torch.testing.assert_close(g, grad_reverse(student, teacher), rtol=1e-10, atol=1e-12)
    pi, _, r = pi_q_r(student, teacher)
    b = (pi * r * teacher_topk(teacher, K)).sum(-1)  # (B, T) sum_S pi r
    grads = per_token_grads("sampled_token", student, teacher, baseline="topk", k=K)
    for v in range(V):  # each sample is (r(v) - b) grad log pi(v)
        onehot = torch.zeros(B, T, V, dtype=torch.float64)
        onehot[..., v] = 1.0
        torch.testing.assert_close(grads[v], (r[..., v] - b)[..., None] * (onehot - pi),
                                   rtol=1e-10, atol=1e-12)
    # with k = V it is the full-vocabulary baseline, True and "full" being the same
    full = per_token_grads("sampled_token", student, teacher, baseline=True)
    torch.testing.assert_close(per_token_grads("sampled_token", student, teacher, baseline="topk", k=V),
                               full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(per_token_grads("sampled_token", student, teacher, baseline="full"),
                               full, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# top-K forms


def test_topk_forward_kl_is_the_truncated_forward_kl_and_the_clamp_silences_tokens():
    student, teacher, tokens, mask = make_batch()
    pi, q, _ = pi_q_r(student, teacher)
    in_s = teacher_topk(teacher, K)
    n = mask.sum()
    loss, grad = loss_and_grad("topk_forward_kl", student, teacher, tokens, mask, k=K)
    torch.testing.assert_close(grad, -score_sum(q * in_s, pi) / n, rtol=1e-10, atol=1e-13)
    explicit = (q * in_s * (q.log() - pi.log())).sum() / n
    assert loss.item() == pytest.approx(explicit.item(), rel=1e-12)
    # with the clamp at m only the tokens with log pi > m keep a gradient
    middle = pi.log()[in_s].sort().values[in_s.sum() // 2 - 1: in_s.sum() // 2 + 1]
    m = middle.mean().item()  # between two log-probs of S: no token on the edge
    _, grad_m = loss_and_grad("topk_forward_kl", student, teacher, tokens, mask, k=K, m=m)
    alive = in_s & (pi.log() > m)
    assert 0 < alive.sum() < in_s.sum()
    torch.testing.assert_close(grad_m, -score_sum(q * alive, pi) / n, rtol=1e-10, atol=1e-13)
    # and with K = V, no clamp, it is the forward KL
    _, grad_v = loss_and_grad("topk_forward_kl", student, teacher, tokens, mask, k=V)
    torch.testing.assert_close(grad_v, grad_forward(student, teacher) / n, rtol=1e-10, atol=1e-13)


def explicit_tail_kl(student, teacher, in_s):
    """KL(pi~ || q~) over S + tail, from probabilities, (B, T)."""
    pi, q = torch.softmax(student, -1), torch.softmax(teacher, -1)
    inside = (in_s * pi * (pi.log() - q.log())).sum(-1)
    pi_t, q_t = 1 - (pi * in_s).sum(-1), 1 - (q * in_s).sum(-1)
    return inside + pi_t * (pi_t.log() - q_t.log())


@pytest.mark.parametrize("k", [1, K])
def test_topk_tail_is_the_kl_of_the_coarsened_distributions(k):
    student, teacher, tokens, mask = make_batch()
    in_s = teacher_topk(teacher, k)
    x = student.clone().requires_grad_()
    expected = explicit_tail_kl(x, teacher, in_s).sum() / mask.sum()
    (expected_grad_,) = torch.autograd.grad(expected, x)
    loss, grad = loss_and_grad("topk_tail", student, teacher, tokens, mask, k=k)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    torch.testing.assert_close(grad, expected_grad_, rtol=1e-8, atol=1e-12)
    assert grad.abs().max() > 1e-3


def test_topk_tail_is_zero_when_the_coarsened_distributions_agree_and_full_at_k_equal_v():
    student, teacher, tokens, mask = make_batch()
    # a student that matches the teacher on S and in total tail mass, not inside the tail
    in_s = teacher_topk(teacher, K)
    q = torch.softmax(teacher, -1)
    tail_total = (q * ~in_s).sum(-1, keepdim=True)  # (B, T, 1)
    spread = (~in_s).double() / (~in_s).sum(-1, keepdim=True)  # uniform over the tail
    pi = torch.where(in_s, q, 0.0) + tail_total * spread  # q on S, q's tail mass spread evenly
    assert (pi - q).abs().max() > 1e-3  # pi != q, yet pi~ = q~
    loss, grad = loss_and_grad("topk_tail", pi.log(), teacher, tokens, mask, k=K)
    assert abs(loss.item()) < 1e-12 and grad.abs().max() < 1e-12
    loss_v, grad_v = loss_and_grad("topk_tail", student, teacher, tokens, mask, k=V)
    loss_f, grad_f = loss_and_grad("full_reverse_kl", student, teacher, tokens, mask)
    assert loss_v.item() == pytest.approx(loss_f.item(), rel=1e-12)
    torch.testing.assert_close(grad_v, grad_f, rtol=1e-10, atol=1e-13)


def test_topk_bregman_has_the_stopgrad_gradient_and_a_nonnegative_value():
    student, teacher, tokens, mask = make_batch()
    in_s = teacher_topk(teacher, K)
    pi, q, r = pi_q_r(student, teacher)
    loss, grad = loss_and_grad("topk_bregman", student, teacher, tokens, mask, k=K)
    _, grad_stop = loss_and_grad("topk_stopgrad", student, teacher, tokens, mask, k=K)
    n = mask.sum()
    torch.testing.assert_close(grad, grad_stop, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grad, score_sum(pi * r * in_s, pi) / n, rtol=1e-10, atol=1e-13)
    explicit = (in_s * (pi * r - pi + q)).sum() / n
    assert loss.item() == pytest.approx(explicit.item(), rel=1e-12) and loss > 0
    same, _ = loss_and_grad("topk_bregman", teacher, teacher, tokens, mask, k=K)
    assert abs(same.item()) < 1e-14


# ----------------------------------------------------------------------------------------------
# options and precision


@pytest.mark.parametrize("name,options,message", [
    ("kl_k3", {"clamp": 0}, "clamp must be a positive number"),
    ("kl_k1", {"clamp": 1.0}, "unknown option"),
    ("topk_forward_kl", {"m": 0.5}, "negative number"),
    ("topk_tail", {"k": 0}, r"k \(the support size\)"),
    ("topk_bregman", {"gamma": 1.0}, "unknown option"),
    ("sampled_token", {"baseline": "tok"}, "baseline must be True or False, or 'full'"),
    ("sampled_token", {"k": 3}, "support of baseline='topk'"),
])
def test_bad_options_are_named(name, options, message):
    student, teacher, tokens, mask = make_batch()
    with pytest.raises(ValueError, match=message):
        OBJECTIVES[name](student, teacher, tokens, mask, **options)


@pytest.mark.parametrize("name", ["kl_k1", "kl_k2", "kl_k3", "topk_forward_kl", "topk_tail",
                                  "topk_bregman"])
def test_half_precision_logits_are_computed_in_float32(name):
    student, teacher, tokens, mask = make_batch()
    x = student.to(torch.bfloat16).requires_grad_()
    loss, _ = OBJECTIVES[name](x, teacher.to(torch.bfloat16), tokens, mask, k=K) if "topk" in name \
        else OBJECTIVES[name](x, teacher.to(torch.bfloat16), tokens, mask)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad.float()).all()
