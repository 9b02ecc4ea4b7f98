"""The OPD diagnostics on hand-built distributions whose values are known."""


import pytest
import torch

from nanoopd.metrics import accuracy, opd_diagnostics, topk_overlap

# one response of 3 positions, the last one is padding; V = 5
STUDENT = torch.tensor([[[4.0, 3.0, 0.0, -1.0, -2.0],    # top-2 {0, 1}
                         [1.0, 2.0, 3.0, 0.0, 0.0],      # top-2 {1, 2}
                         [9.0, 0.0, 0.0, 0.0, 0.0]]])    # masked out
TEACHER = torch.tensor([[[0.0, 3.0, 4.0, -1.0, -2.0],    # top-2 {1, 2}: shares token 1
                         [0.0, 2.5, 1.0, -1.0, 0.0],     # top-2 {1, 2}: shares both
                         [0.0, 0.0, 0.0, 0.0, 9.0]]])
TOKENS = torch.tensor([[0, 1, 4]])
MASK = torch.tensor([[True, True, False]])


def test_overlap_ratio_and_mass_on_a_hand_built_case():
    pi, q = torch.softmax(STUDENT, -1), torch.softmax(TEACHER, -1)
    d = opd_diagnostics(STUDENT, TEACHER, TOKENS, MASK, k=2)
    assert d["overlap_ratio"] == pytest.approx((0.5 + 1.0) / 2)
    assert d["overlap_mass_student"] == pytest.approx(
        ((pi[0, 0, 1] + pi[0, 1, 1] + pi[0, 1, 2]) / 2).item(), rel=1e-6)
    assert d["overlap_mass_teacher"] == pytest.approx(
        ((q[0, 0, 1] + q[0, 1, 1] + q[0, 1, 2]) / 2).item(), rel=1e-6)


def test_overlap_k_is_clipped_to_the_vocabulary():
    d = opd_diagnostics(STUDENT, TEACHER, TOKENS, MASK)  # k = 16 > V = 5
    assert d["overlap_ratio"] == 1.0
    assert d["overlap_mass_student"] == pytest.approx(1.0, rel=1e-6)
    assert d["overlap_mass_teacher"] == pytest.approx(1.0, rel=1e-6)
    ratio, _, _ = topk_overlap(torch.log_softmax(STUDENT, -1), torch.log_softmax(TEACHER, -1), 1)
    assert ratio.tolist() == [[0.0, 0.0, 0.0]]  # top-1s: 0 vs 2, 2 vs 1, 0 vs 4


def test_entropy_kl_logratio_and_length_match_the_formulas():
    d = opd_diagnostics(STUDENT, TEACHER, TOKENS, MASK, k=2)
    logp, logq = torch.log_softmax(STUDENT, -1)[MASK], torch.log_softmax(TEACHER, -1)[MASK]
    h_pi, h_q = -(logp.exp() * logp).sum(-1), -(logq.exp() * logq).sum(-1)  # (2,)
    assert d["entropy_student"] == pytest.approx(h_pi.mean().item(), rel=1e-6)
    assert d["entropy_teacher"] == pytest.approx(h_q.mean().item(), rel=1e-6)
    assert d["entropy_gap"] == pytest.approx((h_q - h_pi).abs().mean().item(), rel=1e-6)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    assert d["kl"] == pytest.approx(kl.mean().item(), rel=1e-6)
    r = logp[[0, 1], [0, 1]] - logq[[0, 1], [0, 1]]  # the sampled tokens 0 and 1
    assert r[0] > 0 > r[1]  # the student likes token 0 more than the teacher does, token 1 less
    assert d["logratio_pos_share"] == 0.5
    assert d["logratio_max_abs"] == pytest.approx(r.abs().max().item(), rel=1e-6)
    assert d["response_length"] == 2.0
    assert all(type(v) is float for v in d.values())


def test_diagnostics_ignore_masked_positions_and_build_no_graph():
    student = STUDENT.clone().requires_grad_()
    changed = STUDENT.detach().clone()
    changed[0, 2] = torch.tensor([0.0, 0.0, 0.0, 0.0, -9.0])
    assert opd_diagnostics(student, TEACHER, TOKENS, MASK) == opd_diagnostics(
        changed, TEACHER, torch.tensor([[0, 1, -1]]), MASK.long())  # padding id -1 is never read
    assert opd_diagnostics(student, TEACHER, TOKENS, torch.zeros(1, 3))["kl"] == 0.0


def test_accuracy_is_the_mean_reward():
    assert accuracy([1, 0, 1, 1]) == 0.75
    assert accuracy(torch.tensor([1.0, 0.0])) == 0.5
    with pytest.raises(ValueError, match="no rewards"):
        accuracy([])
