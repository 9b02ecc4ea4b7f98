"""The student's mass outside the teacher's top-K (metrics.tail_mass, metrics.TailMass) on hand-made
logits: all mass inside -> 0, a known distribution -> its exact value, masked positions ignored."""

import math
from types import SimpleNamespace

import torch

from experiments.common import merged_stats
from nanoopd.metrics import TailMass, tail_mass
from nanoopd.report import summarize_records

NEG = -1e9  # a logit whose probability underflows to exactly 0


def logits_of(probs) -> torch.Tensor:
    """Logits (1, T, V) whose softmax is `probs` (T rows of V probabilities; 0 -> NEG)."""
    p = torch.tensor(probs, dtype=torch.float64)
    return torch.where(p > 0, p.clamp(min=1e-300).log(), torch.full_like(p, NEG))[None]


def test_all_mass_inside_the_teachers_topk_is_zero():
    student = logits_of([[0.5, 0.3, 0.2, 0.0, 0.0, 0.0]])
    teacher = torch.tensor([[[3.0, 1.0, 2.0, 0.0, -1.0, -2.0]]])  # top-3: tokens 0, 2, 1
    logp = torch.log_softmax(student, -1)
    assert tail_mass(logp, teacher, k=3).item() == 0.0
    assert tail_mass(logp, teacher, k=6).item() == 0.0  # K = V: nothing is outside


def test_known_distribution_gives_its_exact_tail():
    # student: 0.1 0.2 0.3 0.4 on 4 tokens; teacher's top-2: tokens 0 and 1 -> tail = 0.3 + 0.4
    student = logits_of([[0.1, 0.2, 0.3, 0.4]])
    teacher = torch.tensor([[[5.0, 4.0, 1.0, 0.0]]])
    logp = torch.log_softmax(student, -1)
    assert math.isclose(tail_mass(logp, teacher, k=2).item(), 0.7, rel_tol=1e-12)
    assert math.isclose(tail_mass(logp, teacher, k=1).item(), 0.9, rel_tol=1e-12)
    # k above the vocabulary is clipped to it
    assert tail_mass(logp, teacher, k=99).abs().item() < 1e-12
    # a tiny tail stays exact (1 - sum would lose it to rounding in float32)
    tiny = torch.log_softmax(torch.tensor([[[0.0, 0.0, -30.0]]]), -1)  # tail = e^-30 / (2 + e^-30)
    assert math.isclose(tail_mass(tiny, torch.tensor([[[1.0, 1.0, 0.0]]]), k=2).item(),
                        math.exp(-30) / (2 + math.exp(-30)), rel_tol=1e-4)


def test_hook_averages_over_response_tokens_only():
    # position 0: tail 0.7; position 1: tail 0.0; position 2 (masked out): tail 1.0
    student = logits_of([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]).float()
    teacher = torch.tensor([[[5.0, 4.0, 1.0, 0.0]] * 3])
    rollout = SimpleNamespace(response_mask=torch.tensor([[True, True, False]]))
    out = TailMass(k=2)(student, teacher, rollout)
    assert set(out) == {"tail_mass"} and math.isclose(out["tail_mass"], 0.35, rel_tol=1e-6)
    rollout.response_mask = torch.tensor([[False, False, True]])
    assert math.isclose(TailMass(k=2)(student, teacher, rollout)["tail_mass"], 1.0, rel_tol=1e-6)


def test_merged_hooks_and_the_summary_carry_the_tail():
    student = logits_of([[0.1, 0.2, 0.3, 0.4]]).float()
    teacher = torch.tensor([[[5.0, 4.0, 1.0, 0.0]]])
    rollout = SimpleNamespace(response_mask=torch.tensor([[True]]))
    hook = merged_stats(None, TailMass(k=2), lambda s, t, ro: {"other": 1.0})
    out = hook(student, teacher, rollout)
    assert out["other"] == 1.0 and math.isclose(out["tail_mass"], 0.7, rel_tol=1e-6)
    assert merged_stats(None, None) is None
    recs = [{"step": i, "kl": 0.1, "budget_share": 0.0, "acc": 0.5, "logratio_max_abs": 1.0, "tail_mass": t}
            for i, t in enumerate([0.0] * 9 + [0.4])]
    s = summarize_records({"start_acc": 0.5, "final_acc": 0.5, "error": None}, recs)
    assert s["final_tail_mass"] == 0.4  # the mean over the last 10 % of steps
