"""Top-K support matching: exact gradients of the three forms against hand-written formulas.

The support S_t is rebuilt here independently (argsort + python sets) and every expected
gradient is written in closed form on the logits z: grad_z log pi(v) = e_v - pi. Float64.
"""

import math

import pytest
import torch

from nanoopd import OBJECTIVES
from nanoopd.topk import topk_support, topk_unnormalized

B, T, V, K = 2, 4, 6, 3
SUPPORTS = [(support, add_sampled) for support in ("teacher", "student", "intersection")
            for add_sampled in (False, True)]
SUPPORT_IDS = [f"{support}{'+sampled' if add else ''}" for support, add in SUPPORTS]


def make_batch(seed=0, shape=(B, T, V), drop_last=True):
    """Seeded float64 logits (b, t, v) of student and teacher, tokens and a mask (the last position
    of row 1 masked out when drop_last). Shared with test_objectives_field.py."""
    b, t, v = shape
    g = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(b, t, v, generator=g, dtype=torch.float64)
    teacher = 2 * torch.randn(b, t, v, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    if drop_last:
        mask[1, -1] = False
    return student, teacher, tokens, mask


def support_sets(student, teacher, tokens, k, support, add_sampled):
    """in_S (B, T, V) bool, from python sets of argsort indices."""
    teacher_top = teacher.argsort(-1, descending=True)[..., :k].tolist()
    student_top = student.argsort(-1, descending=True)[..., :k].tolist()
    in_s = torch.zeros(B, T, V, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            s = {"teacher": set(teacher_top[b][t]), "student": set(student_top[b][t]),
                 "intersection": set(teacher_top[b][t]) & set(student_top[b][t])}[support]
            if add_sampled:
                s.add(tokens[b, t].item())
            in_s[b, t, list(s)] = True
    return in_s


def loss_and_grad(name, student, teacher, tokens, mask, **options):
    x = student.detach().clone().requires_grad_()
    loss, stats = OBJECTIVES[name](x, teacher, tokens, mask, **options)
    return loss.detach(), torch.autograd.grad(loss, x)[0], stats


def pi_and_cost(student, teacher):
    logp, logq = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    return logp.exp(), logp - logq  # pi, r(v) for every v: (B, T, V) each


def score_sum(weights, pi):
    """sum_v w_v grad_z log pi(v) = w - pi sum_v w_v, per position (B, T, V)."""
    return weights - pi * weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("support,add_sampled", SUPPORTS, ids=SUPPORT_IDS)
def test_topk_support_membership_matches_the_sets(support, add_sampled):
    student, teacher, tokens, _ = make_batch()
    index, member = topk_support(student, teacher, tokens, K, support, add_sampled)
    rebuilt = torch.zeros(B, T, V, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            chosen = index[b, t][member[b, t]].tolist()
            assert len(chosen) == len(set(chosen))  # no token is counted twice
            rebuilt[b, t, chosen] = True
    assert torch.equal(rebuilt, support_sets(student, teacher, tokens, K, support, add_sampled))


@pytest.mark.parametrize("support,add_sampled", SUPPORTS, ids=SUPPORT_IDS)
def test_stopgrad_gradient_is_the_full_gradient_restricted_to_the_support(support, add_sampled):
    student, teacher, tokens, mask = make_batch()
    in_s = support_sets(student, teacher, tokens, K, support, add_sampled)
    loss, grad, _ = loss_and_grad("topk_stopgrad", student, teacher, tokens, mask, k=K,
                                  support=support, add_sampled=add_sampled)
    pi, r = pi_and_cost(student, teacher)
    n = mask.sum()
    # the full reverse-KL gradient is sum_v pi(v) r(v) grad log pi(v); keep only v in S
    weights = pi * r * in_s * mask.unsqueeze(-1)  # (B, T, V)
    torch.testing.assert_close(grad, score_sum(weights, pi) / n, rtol=1e-10, atol=1e-13)
    assert loss.item() == pytest.approx((weights.sum() / n).item(), rel=1e-12)
    # and with S = the whole vocabulary the same formula is the full reverse-KL gradient
    _, grad_full, _ = loss_and_grad("full_reverse_kl", student, teacher, tokens, mask)
    torch.testing.assert_close(grad_full, score_sum(pi * r * mask.unsqueeze(-1), pi) / n,
                               rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("support,add_sampled", SUPPORTS, ids=SUPPORT_IDS)
def test_unnormalized_gradient_carries_the_extra_grad_of_the_support_mass(support, add_sampled):
    student, teacher, tokens, mask = make_batch()
    in_s = support_sets(student, teacher, tokens, K, support, add_sampled)
    options = dict(k=K, support=support, add_sampled=add_sampled)
    _, grad_unnorm, _ = loss_and_grad("topk_unnormalized", student, teacher, tokens, mask,
                                      **options)
    _, grad_stop, _ = loss_and_grad("topk_stopgrad", student, teacher, tokens, mask, **options)
    x = student.clone().requires_grad_()
    mass = (torch.softmax(x, -1) * in_s).sum(-1)  # (B, T)  sum_S pi
    (grad_mass,) = torch.autograd.grad(mass[mask].sum() / mask.sum(), x)
    torch.testing.assert_close(grad_unnorm, grad_stop + grad_mass, rtol=1e-10, atol=1e-13)
    assert grad_mass.abs().max() > 1e-3  # the extra term is really there


def explicit_renormalized_kl(student, teacher, in_s):
    """KL(pi_hat || q_hat) with pi_hat = pi 1_S / sum_S pi (0 where S is empty), (B, T)."""
    def renormalize(logits):
        p = torch.softmax(logits, -1) * in_s
        total = p.sum(-1, keepdim=True)
        return p / torch.where(total > 0, total, torch.ones_like(total))
    p_hat, q_hat = renormalize(student), renormalize(teacher)
    log_ratio = (torch.where(in_s, p_hat, torch.ones_like(p_hat)).log()
                 - torch.where(in_s, q_hat, torch.ones_like(q_hat)).log())
    return (p_hat * log_ratio).sum(-1)


@pytest.mark.parametrize("support,add_sampled", SUPPORTS, ids=SUPPORT_IDS)
@pytest.mark.parametrize("k", [1, K])
def test_renormalized_is_the_kl_of_the_renormalized_distributions(support, add_sampled, k):
    student, teacher, tokens, mask = make_batch()
    in_s = support_sets(student, teacher, tokens, k, support, add_sampled)
    loss, grad, _ = loss_and_grad("topk_renorm", student, teacher, tokens, mask, k=k,
                                  support=support, add_sampled=add_sampled)
    x = student.clone().requires_grad_()
    explicit = explicit_renormalized_kl(x, teacher, in_s)[mask].sum() / mask.sum()
    (grad_ref,) = torch.autograd.grad(explicit, x)
    assert loss.item() == pytest.approx(explicit.item(), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-13)
    if support == "intersection" and k == 1 and not add_sampled:
        assert not in_s.any(-1).all()  # some S_t are empty: they must contribute 0, not NaN


@pytest.mark.parametrize("name", ["topk_unnormalized", "topk_stopgrad", "topk_renorm"])
@pytest.mark.parametrize("support,add_sampled", SUPPORTS, ids=SUPPORT_IDS)
def test_k_equal_to_vocabulary_is_the_full_reverse_kl(name, support, add_sampled):
    student, teacher, tokens, mask = make_batch()
    loss_full, grad_full, _ = loss_and_grad("full_reverse_kl", student, teacher, tokens, mask)
    loss, grad, stats = loss_and_grad(name, student, teacher, tokens, mask, k=V,
                                      support=support, add_sampled=add_sampled)
    assert loss.item() == pytest.approx(loss_full.item(), rel=1e-12)
    torch.testing.assert_close(grad, grad_full, rtol=1e-10, atol=1e-13)
    assert stats["support_mass_student"] == pytest.approx(1.0, rel=1e-12)


def test_unnormalized_drains_mass_out_of_the_support():
    # the student already equals the teacher: every r(v) = 0, the full reverse KL is at its
    # minimum, and stop-gradient and renormalised top-K rightly leave the student alone
    student, teacher, tokens, mask = make_batch(seed=3)
    student = teacher.clone()
    in_s = support_sets(student, teacher, tokens, 2, "teacher", False)
    for name in ("topk_stopgrad", "topk_renorm", "full_reverse_kl"):
        options = {} if name == "full_reverse_kl" else {"k": 2}
        _, grad, _ = loss_and_grad(name, student, teacher, tokens, mask, **options)
        assert grad.abs().max() < 1e-15
    # the unnormalised form still has the gradient of sum_S pi: one descent step lowers the
    # student's mass on S at every position
    def mass_on_support(logits):
        return (torch.softmax(logits, -1) * in_s).sum(-1)[mask]  # (N,)

    _, grad, _ = loss_and_grad("topk_unnormalized", student, teacher, tokens, mask, k=2)
    assert (mass_on_support(student - 1.0 * grad) < mass_on_support(student)).all()


def test_unnormalized_settles_with_a_third_of_the_teachers_mass_on_the_support():
    # descend the unnormalised loss at one position, starting from the teacher itself
    g = torch.Generator().manual_seed(0)
    teacher = 2 * torch.randn(1, 1, 5, generator=g, dtype=torch.float64)
    index, member = topk_support(teacher, teacher, torch.zeros(1, 1, dtype=torch.long), k=2)
    x = teacher.clone()
    for _ in range(100):
        x.requires_grad_()
        (grad,) = torch.autograd.grad(topk_unnormalized(x, teacher, index, member).sum(), x)
        x = (x - 5.0 * grad).detach()
    # every token v of S ends at pi(v) = q(v) / e (it is pushed up only while q > e pi): the
    # student keeps 1/e of the teacher's mass on S and puts the rest on tokens outside S
    pi_s = torch.softmax(x, -1).gather(-1, index)  # (1, 1, 2)
    q_s = torch.softmax(teacher, -1).gather(-1, index)  # (1, 1, 2)
    assert q_s.sum() > 0.9  # the teacher's top-2 holds nearly all of its mass ...
    torch.testing.assert_close(pi_s, q_s / math.e, rtol=1e-7, atol=0)  # ... the student 1/e of it


def test_stopgrad_pushes_up_every_token_outside_the_support():
    # for u outside S the stop-gradient loss has dL/dz_u = -pi(u) A, A = sum_S pi (log pi - log q):
    # with A > 0 (the student sharper than the teacher on S) descent raises every logit outside S
    # and nothing pushes them back down (the full KL's pi(u) (log pi(u) - log q(u)) is truncated)
    teacher = torch.tensor([[[3.0, 2.0, -1.0, -2.0, -2.0]]], dtype=torch.float64)
    student = torch.tensor([[[5.0, 1.0, -1.0, -2.0, -2.0]]], dtype=torch.float64)
    tokens, mask = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)
    _, grad, _ = loss_and_grad("topk_stopgrad", student, teacher, tokens, mask, k=2)  # S = {0, 1}
    pi, q = torch.softmax(student, -1)[0, 0], torch.softmax(teacher, -1)[0, 0]
    A = (pi[:2] * (pi[:2].log() - q[:2].log())).sum()
    assert A > 0
    torch.testing.assert_close(grad[0, 0, 2:], -pi[2:] * A, rtol=1e-10, atol=1e-15)
    outside = lambda z: torch.softmax(z, -1)[0, 0, 2:].sum()
    assert outside(student - 1.0 * grad) > outside(student)
