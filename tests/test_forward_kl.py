"""forward_kl and sft, the two objectives that also serve rows sampled from the teacher, against their
exact gradients (float64), and every objective's Spec flags (on_policy, uses_teacher).

forward_kl: F = sum_v q (log q - log pi) at every response position; d/dlogits = pi - q.
sft: -log pi(y_t|c_t) of the rows' own tokens; d/dlogits = pi - onehot(y_t), whatever the teacher.
Both are averaged per response token, so the logit gradient is the above * mask / n_tokens.
"""

import pytest
import torch

from nanoopd import OBJECTIVES
from nanoopd.objectives import SPECS, register

B, T, V = 3, 5, 7

# (claim, on_policy, uses_teacher) of every objective the project ships: on_policy where the estimator
# reads the sampled token's log-ratio r_t (right only for y ~ pi), not for the forms over the full
# distributions (or a top-K support) at each prefix, nor for sft (a likelihood of whatever rows it is given)
FLAGS = {
    "sampled_token": ("K", True, True),
    "sequence_kl": ("J", True, True),
    "full_reverse_kl": ("K", False, True),
    "forward_kl": ("F", False, True),
    "jsd": (None, False, True),
    "topk_unnormalized": ("K", False, True),
    "topk_stopgrad": ("K", False, True),
    "topk_renorm": ("K", False, True),
    "sft": (None, False, False),
    "kl_k1": ("K", True, True),
    "kl_k2": ("K", True, True),
    "kl_k3": ("K", True, True),
    "topk_forward_kl": ("F", False, True),
    "topk_tail": ("K", False, True),
    "topk_bregman": ("K", False, True),
    "xt_chunk": ("K", True, True, True),  # a teacher of another tokenizer (cross=True); one tokenizer: sampled_token
    "xt_full": ("K", False, True, True),
    "xt_uld": (None, False, True, True),
    "xt_gold": (None, False, True, True),
}


def make_batch(seed=0):
    """float64 student (with grad) and teacher logits (B, T, V), tokens and a mask with a short row
    and a hole."""
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).requires_grad_()
    teacher = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1] = False
    return student, teacher, tokens, mask


def loss_and_grad(name, student, teacher, tokens, mask, **options):
    student = student.detach().requires_grad_()
    loss, stats = OBJECTIVES[name](student, teacher, tokens, mask, **options)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad, stats


def hot(student, teacher):
    """The hot path's logp option: both log-softmaxes, the student's with its graph."""
    return student.log_softmax(-1), teacher.log_softmax(-1)


def test_forward_kl_gradient_is_pi_minus_q_per_response_token():
    student, teacher, tokens, mask = make_batch()
    loss, grad, stats = loss_and_grad("forward_kl", student, teacher, tokens, mask)
    pi, q = student.detach().softmax(-1), teacher.softmax(-1)
    n = mask.sum()
    torch.testing.assert_close(grad, (pi - q) * mask[..., None] / n, rtol=0, atol=1e-12)
    F = (q * (q.log() - pi.log())).sum(-1)  # (B, T)  KL(q || pi), by hand
    torch.testing.assert_close(loss, (F * mask).sum() / n, rtol=1e-12, atol=0)
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-12) and stats["n_tokens"] == n.item()
    assert set(stats) >= {"kl", "logratio_max_abs", "logratio_pos_share"}  # the stats every objective logs


def test_forward_kl_is_jsd_at_beta_0_and_reads_the_teacher_as_a_constant():
    student, teacher, tokens, mask = make_batch(1)
    loss, grad, _ = loss_and_grad("forward_kl", student, teacher, tokens, mask)
    loss_jsd, grad_jsd, _ = loss_and_grad("jsd", student, teacher, tokens, mask, beta=0.0)
    torch.testing.assert_close((loss, grad), (loss_jsd, grad_jsd), rtol=1e-12, atol=1e-15)
    teacher = teacher.clone().requires_grad_()
    loss, _ = OBJECTIVES["forward_kl"](student, teacher, tokens, mask)
    loss.backward()
    assert teacher.grad is None  # no gradient reaches the teacher


@pytest.mark.parametrize("name", ["forward_kl", "sft"])
def test_the_hot_path_gives_the_same_loss_and_gradient(name):
    student, teacher, tokens, mask = make_batch(2)
    cold, cold_grad, _ = loss_and_grad(name, student, teacher, tokens, mask)
    student = student.detach().requires_grad_()
    warm, stats = OBJECTIVES[name](student, teacher, tokens, mask, logp=hot(student, teacher))
    (warm_grad,) = torch.autograd.grad(warm, student)
    assert torch.equal(cold, warm.detach()) and torch.equal(cold_grad, warm_grad)
    assert torch.is_tensor(stats["loss"]) and "kl" not in stats  # the caller's diagnostics report kl


def test_forward_kl_is_zero_with_zero_gradient_at_pi_equal_q():
    student, teacher, tokens, mask = make_batch(3)
    loss, grad, stats = loss_and_grad("forward_kl", teacher, teacher, tokens, mask)
    assert abs(loss.item()) < 1e-15 and grad.abs().max().item() < 1e-15 and abs(stats["kl"]) < 1e-15


@pytest.mark.parametrize("name", ["forward_kl", "sft"])
def test_an_unknown_option_is_refused_by_name(name):
    student, teacher, tokens, mask = make_batch()
    with pytest.raises(ValueError, match=f"objective '{name}' got unknown option.*'beta'"):
        OBJECTIVES[name](student, teacher, tokens, mask, beta=0.5)
    loss, _ = OBJECTIVES[name](student, teacher, tokens, mask, mask_tokens=[int(tokens[1, 0])])  # common: taken
    assert torch.isfinite(loss)


def test_sft_gradient_is_pi_minus_onehot_and_the_teacher_does_not_enter():
    student, teacher, tokens, mask = make_batch(4)
    loss, grad, stats = loss_and_grad("sft", student, teacher, tokens, mask)
    pi = student.detach().softmax(-1)
    onehot = torch.nn.functional.one_hot(tokens, V).double()
    n = mask.sum()
    torch.testing.assert_close(grad, (pi - onehot) * mask[..., None] / n, rtol=0, atol=1e-12)
    nll = -pi.log().gather(-1, tokens[..., None]).squeeze(-1)  # (B, T)
    torch.testing.assert_close(loss, (nll * mask).sum() / n, rtol=1e-12, atol=0)
    other = torch.randn(B, T, V, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    loss_other, grad_other, stats_other = loss_and_grad("sft", student, other, tokens, mask)
    assert torch.equal(loss, loss_other) and torch.equal(grad, grad_other)
    assert stats["kl"] != stats_other["kl"]  # the teacher is still read for the stats, like every objective's


def test_sft_on_teacher_samples_follows_the_forward_kl_in_expectation():
    """At one prefix, y ~ q enumerated: E_q[pi - onehot(y)] = pi - q, forward_kl's gradient (SeqKD);
    on the student's own samples, E_pi[pi - onehot(y)] = 0."""
    g = torch.Generator().manual_seed(5)
    z, w = torch.randn(V, generator=g, dtype=torch.float64), torch.randn(V, generator=g, dtype=torch.float64)
    student, teacher = z.expand(V, 1, V), w.expand(V, 1, V)  # row v: the prefix, with y = v
    tokens, mask = torch.arange(V)[:, None], torch.ones(V, 1, dtype=torch.bool)
    _, per_row, _ = loss_and_grad("sft", student, teacher, tokens, mask)  # (V, 1, V), each / V
    per_row = per_row[:, 0] * V  # (V, V): the gradient of each sample y = v
    pi, q = z.softmax(-1), w.softmax(-1)
    torch.testing.assert_close(q @ per_row, pi - q, rtol=0, atol=1e-14)
    torch.testing.assert_close(pi @ per_row, torch.zeros(V, dtype=torch.float64), rtol=0, atol=1e-14)


def test_every_objective_has_the_flags_of_the_table():
    assert set(FLAGS) == set(OBJECTIVES), "classify a new objective in FLAGS"
    for name, (claim, on_policy, uses_teacher, *cross) in FLAGS.items():
        spec = SPECS[name]
        assert (spec.claim, spec.on_policy, spec.uses_teacher, spec.cross) == (claim, on_policy, uses_teacher,
                                                                               bool(cross)), name


@pytest.mark.parametrize("name", sorted(name for name, flags in FLAGS.items() if flags[2]))  # sft: its targets
def test_on_policy_means_the_loss_reads_the_sampled_tokens(name):
    """With its default options (K = 3 for the top-K forms), an objective that reads the teacher changes its gradient with the
    sampled tokens exactly when it is on_policy: the others are functions of the prefixes alone, so
    rows drawn from any sampler (the teacher's included) give them their exact value there."""
    student, teacher, tokens, mask = make_batch(6)
    options = {"k": 3} if name.startswith("topk") else {}  # S a real subset of the vocabulary
    _, grad, _ = loss_and_grad(name, student, teacher, tokens, mask, **options)
    _, grad_other, _ = loss_and_grad(name, student, teacher, (tokens + 1) % V, mask, **options)
    assert torch.equal(grad, grad_other) != SPECS[name].on_policy


def test_register_refuses_flags_that_are_not_booleans():
    for flags in ({"on_policy": "yes"}, {"uses_teacher": 1}, {"cross": "digits"}):
        with pytest.raises(ValueError, match="on_policy, uses_teacher and cross must be True or False"):
            register("x", **flags)
    assert "x" not in OBJECTIVES
