"""The objectives registry: calling convention, masking, exact full-KL / JSD values, errors.

Exact checks run in float64 (the objectives keep float64 inputs in float64).
"""

import math

import pytest
import torch

from nanoopd import OBJECTIVES
from nanoopd.objectives import get_objective

B, T, V = 3, 5, 7

# every objective with a few option settings, so that the generic checks below cover each path
CONFIGS = [
    ("sampled_token", {}),
    ("sampled_token", {"clamp": 0.5, "baseline": True}),
    ("sequence_kl", {}),
    ("sequence_kl", {"gamma": 0.5}),
    ("full_reverse_kl", {}),
    ("jsd", {"beta": 0.3}),
    ("jsd", {"beta": 0.0}),
    ("topk_unnormalized", {"k": 3}),
    ("topk_stopgrad", {"k": 3, "support": "intersection", "add_sampled": True}),
    ("topk_renorm", {}),
    ("topk_renorm", {"k": 2, "support": "student", "add_sampled": True}),
    ("topk_renorm", {"k": 3, "support": "intersection"}),
    ("sampled_token", {"baseline": "topk", "k": 3}),
    ("kl_k1", {}),
    ("kl_k2", {}),
    ("kl_k3", {"clamp": 1.0}),
    ("topk_forward_kl", {"k": 3, "m": -3.0}),
    ("topk_tail", {"k": 3, "add_sampled": True}),
    ("topk_bregman", {"k": 3, "support": "student"}),
]
IDS = [f"{name}-{options}" for name, options in CONFIGS]


def make_batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(B, T, V, generator=g, dtype=dtype)).requires_grad_()
    teacher = 2 * torch.randn(B, T, V, generator=g, dtype=dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False  # a short response
    mask[2, 1] = False  # a hole in the middle
    return student, teacher, tokens, mask


def loss_and_grad(name, options, student, teacher, tokens, mask):
    student = student.detach().requires_grad_()
    loss, stats = OBJECTIVES[name](student, teacher, tokens, mask, **options)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad, stats


def explicit_reverse_kl(student, teacher):
    """sum_v pi (log pi - log q) per position, written from probabilities."""
    pi, q = torch.softmax(student, -1), torch.softmax(teacher, -1)
    return (pi * (torch.log(pi) - torch.log(q))).sum(-1)


# ----------------------------------------------------------------------------------------------
# registry and calling convention


def test_registry_holds_the_listed_names():
    assert set(OBJECTIVES) >= {"sampled_token", "sequence_kl", "full_reverse_kl", "jsd",
                               "topk_unnormalized", "topk_stopgrad", "topk_renorm",
                               "kl_k1", "kl_k2", "kl_k3", "topk_forward_kl", "topk_tail",
                               "topk_bregman"}
    assert get_objective("jsd") is OBJECTIVES["jsd"]


def test_unknown_objective_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown objective 'kl'.*full_reverse_kl"):
        get_objective("kl")


@pytest.mark.parametrize("name,options", CONFIGS, ids=IDS)
def test_stats_are_floats_with_kl_and_logratio(name, options):
    student, teacher, tokens, mask = make_batch()
    loss, grad, stats = loss_and_grad(name, options, student, teacher, tokens, mask)
    assert loss.dim() == 0 and torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(type(v) is float for v in stats.values())
    expected_kl = explicit_reverse_kl(student.detach(), teacher)[mask].mean()
    assert stats["kl"] == pytest.approx(expected_kl.item(), rel=1e-12)
    r = (torch.log_softmax(student.detach(), -1) - torch.log_softmax(teacher, -1)).gather(
        -1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
    assert stats["logratio_max_abs"] == pytest.approx(r[mask].abs().max().item(), rel=1e-12)
    assert stats["n_tokens"] == mask.sum().item()


@pytest.mark.parametrize("name,options", CONFIGS, ids=IDS)
def test_teacher_is_a_constant(name, options):
    student, teacher, tokens, mask = make_batch()
    teacher = teacher.clone().requires_grad_()
    loss, _ = OBJECTIVES[name](student, teacher, tokens, mask, **options)
    loss.backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("name,options", CONFIGS, ids=IDS)
def test_low_precision_logits_are_computed_in_float32(name, options):
    student, teacher, tokens, mask = make_batch(dtype=torch.bfloat16)
    loss, _ = OBJECTIVES[name](student, teacher, tokens, mask, **options)
    assert loss.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# masking


@pytest.mark.parametrize("name,options", CONFIGS, ids=IDS)
def test_masked_positions_contribute_nothing(name, options):
    student, teacher, tokens, mask = make_batch()
    loss, grad, _ = loss_and_grad(name, options, student, teacher, tokens, mask)
    # rewrite everything at the masked positions: logits of both models and the sampled ids
    g = torch.Generator().manual_seed(1)
    off = ~mask
    student2, teacher2, tokens2 = student.detach().clone(), teacher.clone(), tokens.clone()
    student2[off] = 5 * torch.randn(int(off.sum()), V, generator=g, dtype=student.dtype)
    teacher2[off] = 5 * torch.randn(int(off.sum()), V, generator=g, dtype=teacher.dtype)
    tokens2[off] = (tokens[off] + 1) % V
    loss2, grad2, _ = loss_and_grad(name, options, student2, teacher2, tokens2, mask)
    torch.testing.assert_close(loss2, loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad2, grad, rtol=1e-12, atol=1e-12)
    assert (grad[off] == 0).all()


@pytest.mark.parametrize("name,options", CONFIGS, ids=IDS)
def test_mask_tokens_removes_those_positions(name, options):
    student, teacher, tokens, mask = make_batch()
    special = 4
    tokens = tokens.clone()
    tokens[1, 2] = tokens[0, 0] = special
    by_hand = mask & (tokens != special)
    loss, grad, stats = loss_and_grad(name, {**options, "mask_tokens": [special]},
                                      student, teacher, tokens, mask)
    loss_ref, grad_ref, stats_ref = loss_and_grad(name, options, student, teacher, tokens, by_hand)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)
    assert stats == stats_ref and stats["n_tokens"] == by_hand.sum().item()


def test_mask_tokens_tames_a_special_token_the_teacher_never_saw():
    student, teacher, tokens, mask = make_batch()
    special = 6
    teacher = teacher.clone()
    teacher[..., special] = -40.0  # the teacher gives the format token ~e^-40
    student = student.detach().clone()
    student[..., special] = 8.0  # the student emits it confidently
    tokens = tokens.clone()
    tokens[1, 0] = special
    _, _, unmasked = loss_and_grad("sampled_token", {}, student, teacher, tokens, mask)
    _, _, masked = loss_and_grad("sampled_token", {"mask_tokens": {special}},
                                 student, teacher, tokens, mask)
    assert unmasked["logratio_max_abs"] > 40 > 10 > masked["logratio_max_abs"]


@pytest.mark.parametrize("name,options", CONFIGS, ids=IDS)
def test_all_masked_batch_gives_zero_loss_and_finite_grads(name, options):
    student, teacher, tokens, _ = make_batch()
    mask = torch.zeros(B, T)
    loss, grad, stats = loss_and_grad(name, options, student, teacher, tokens, mask)
    assert loss.item() == 0.0
    assert torch.isfinite(grad).all() and (grad == 0).all()
    assert all(math.isfinite(v) for v in stats.values())


def test_loss_is_the_mean_over_masked_tokens():
    student, teacher, tokens, mask = make_batch()
    loss, _ = OBJECTIVES["full_reverse_kl"](student, teacher, tokens, mask.long())
    per_token = explicit_reverse_kl(student.detach(), teacher)
    assert loss.item() == pytest.approx((per_token[mask].sum() / mask.sum()).item(), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# full-vocabulary reverse KL and the generalised JSD


def test_full_reverse_kl_gradient_equals_autograd_of_the_formula_and_the_closed_form():
    student, teacher, tokens, mask = make_batch()
    loss, grad, _ = loss_and_grad("full_reverse_kl", {}, student, teacher, tokens, mask)
    x = student.detach().requires_grad_()
    explicit = explicit_reverse_kl(x, teacher)[mask].sum() / mask.sum()
    (grad_ref,) = torch.autograd.grad(explicit, x)
    torch.testing.assert_close(loss, explicit.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)
    # d KL / d logit_j = pi_j (r_j - KL): the +1 of d(pi log pi) cancels over the vocabulary
    pi = torch.softmax(student.detach(), -1)
    r = torch.log_softmax(student.detach(), -1) - torch.log_softmax(teacher, -1)
    kl = (pi * r).sum(-1, keepdim=True)
    closed_form = pi * (r - kl) * mask.unsqueeze(-1) / mask.sum()
    torch.testing.assert_close(grad, closed_form, rtol=1e-10, atol=1e-12)


def explicit_js(p, q, beta):
    m = beta * p + (1 - beta) * q
    return (beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1))


def test_jsd_at_one_half_is_the_symmetric_js_divergence():
    student, teacher, tokens, mask = make_batch()
    loss, _ = OBJECTIVES["jsd"](student, teacher, tokens, mask, beta=0.5)
    p, q = torch.softmax(teacher, -1), torch.softmax(student.detach(), -1)
    m = (p + q) / 2
    js = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)  # (B, T)
    assert loss.item() == pytest.approx(js[mask].mean().item(), rel=1e-12)
    swapped, _ = OBJECTIVES["jsd"](teacher, student.detach(), tokens, mask, beta=0.5)
    assert swapped.item() == pytest.approx(loss.item(), rel=1e-12)


def test_jsd_general_beta_matches_the_formula_with_p_the_teacher():
    student, teacher, tokens, mask = make_batch()
    loss, _ = OBJECTIVES["jsd"](student, teacher, tokens, mask, beta=0.3)
    js = explicit_js(torch.softmax(teacher, -1), torch.softmax(student.detach(), -1), 0.3)
    assert loss.item() == pytest.approx(js[mask].mean().item(), rel=1e-12)


def test_jsd_beta_limits_are_forward_kl_at_0_and_reverse_kl_at_1():
    student, teacher, tokens, mask = make_batch()
    x = student.detach().requires_grad_()
    forward = (torch.softmax(teacher, -1) * (torch.log_softmax(teacher, -1)
                                             - torch.log_softmax(x, -1))).sum(-1)
    (grad_forward,) = torch.autograd.grad(forward[mask].mean(), x)
    _, grad_reverse, _ = loss_and_grad("full_reverse_kl", {}, student, teacher, tokens, mask)
    eps = 1e-5
    _, grad_small, _ = loss_and_grad("jsd", {"beta": eps}, student, teacher, tokens, mask)
    _, grad_large, _ = loss_and_grad("jsd", {"beta": 1 - eps}, student, teacher, tokens, mask)
    torch.testing.assert_close(grad_small / eps, grad_forward, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(grad_large / eps, grad_reverse, rtol=1e-3, atol=1e-4)
    # and far from the limits the direction is genuinely different
    assert not torch.allclose(grad_forward, grad_reverse, atol=1e-2)
    # exactly at the ends, the limits' directions themselves
    loss0, grad0, _ = loss_and_grad("jsd", {"beta": 0.0}, student, teacher, tokens, mask)
    loss1, grad1, _ = loss_and_grad("jsd", {"beta": 1.0}, student, teacher, tokens, mask)
    assert loss0.item() == pytest.approx(forward[mask].mean().item(), rel=1e-12)
    torch.testing.assert_close(grad0, grad_forward, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad1, grad_reverse, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# clear errors


def call(name, student=None, teacher=None, tokens=None, mask=None, **options):
    s, t, tok, m = make_batch()
    return OBJECTIVES[name](s if student is None else student, t if teacher is None else teacher,
                            tok if tokens is None else tokens, m if mask is None else mask,
                            **options)


@pytest.mark.parametrize("name,options,message", [
    ("jsd", {"gamma": 0.5}, "unknown option.*'gamma'.*beta"),
    ("sampled_token", {"clip": 1.0}, "unknown option.*'clip'"),
    ("full_reverse_kl", {"k": 4}, "unknown option"),
    ("topk_renorm", {"k": 0}, "k .*integer in \\[1, V=7\\]"),
    ("topk_stopgrad", {"k": V + 1}, "k .*integer in \\[1, V=7\\]"),
    ("topk_unnormalized", {"k": 2.5}, "k .*integer"),
    ("topk_renorm", {"support": "union"}, "support must be one of"),
    ("topk_renorm", {"add_sampled": "yes"}, "add_sampled must be True or False"),
    ("sequence_kl", {"gamma": -0.1}, "gamma must lie in \\[0, 1\\]"),
    ("sequence_kl", {"gamma": 1.5}, "gamma must lie in \\[0, 1\\]"),
    ("jsd", {"beta": -0.5}, "beta must lie in \\[0, 1\\]"),
    ("jsd", {"beta": 1.01}, "beta must lie in \\[0, 1\\]"),
    ("sampled_token", {"clamp": 0.0}, "clamp must be a positive number"),
    ("sampled_token", {"baseline": "kl"}, "baseline must be True or False"),
])
def test_invalid_options_raise_clear_errors(name, options, message):
    with pytest.raises(ValueError, match=message):
        call(name, **options)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_mismatched_inputs_raise_clear_errors(name):
    student, teacher, tokens, mask = make_batch()
    with pytest.raises(ValueError, match="vocabulary sizes differ.*student V=7, teacher V=9"):
        call(name, teacher=torch.randn(B, T, 9))
    with pytest.raises(ValueError, match="must be \\(B, T, V\\)"):
        call(name, student=student[0])
    with pytest.raises(ValueError, match="same \\(B, T\\) positions"):
        call(name, teacher=teacher[:, :-1])
    with pytest.raises(ValueError, match="tokens and mask must be \\(B, T\\)"):
        call(name, tokens=tokens[:, :-1])
    with pytest.raises(ValueError, match="tokens and mask must be \\(B, T\\)"):
        call(name, mask=mask.T)
    with pytest.raises(ValueError, match="integer token ids"):
        call(name, tokens=tokens.double())
    with pytest.raises(ValueError, match="only 0/1"):
        call(name, mask=mask * 2)
    with pytest.raises(ValueError, match="must lie in \\[0, 7\\)"):
        call(name, tokens=tokens + V)
