"""The hot path's launch and sync budgets, counted on the CPU (tests/launches.py), at the defaults:
student 2 x 64, teacher 4 x 128, batch 64, 64 new tokens, EOS suppressed (every row generates the
whole budget). A GPU spends a decoding step of these models launching kernels, so the number of
operators per token stands for its time there, and every host sync stalls its queue.

Figures this counter gave (torch 2.13.0, CPU), the code before the static decoding step in
brackets: a decoding token 40 operators in float32 (56) and 45 under CPU bf16 autocast (76); an OPD
step (sampled_token) 2,924 operators (4,039), 2,629 of them in the rollout (3,740), with
AdamW(foreach=True), what CUDA runs by default; host syncs outside the rollout 4 (49). A GPU draws
with the sampler that is safe under any order of additions (rollout.invert_cdf): 3 operators a
token more than the CPU's binary search, 43 a token in float32, counted here as well.
"""

import copy

import pytest
import torch

import nanoopd.opd as opd_mod
import nanoopd.rollout as rollout_mod
import nanoopd.sampling as sampling_mod
from nanoopd.model import GPT, GPTConfig
from nanoopd.opd import OPDConfig, freeze, opd_step
from nanoopd.tasks import sample_problems
from nanoopd.tokenizer import get_tokenizer
from tests.launches import Launches

TOK = get_tokenizer()
NO_EOS = copy.copy(TOK)
NO_EOS.eos_id = -1  # never drawn: every row generates the whole budget
B, N = 64, 64


def student() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=TOK.n_vocab, n_layer=2, n_embd=64, n_head=2))


def teacher() -> GPT:
    torch.manual_seed(1)
    return freeze(GPT(GPTConfig(vocab_size=TOK.n_vocab, n_layer=4, n_embd=128, n_head=4)))


PROMPTS = [[TOK.bos_id] + list(range(5, 16)) for _ in range(B)]


def ops_per_token(model: GPT) -> float:
    """Operators of a rollout of 12 tokens minus those of one of 2: 10 decoding tokens' worth."""
    def count(n):
        with Launches() as c:
            rollout_mod.generate(model, PROMPTS, n, -1, TOK.pad_id, generator=torch.Generator().manual_seed(0))
        return c.total(c.ops)
    return (count(12) - count(2)) / 10


def test_a_decoding_token_launches_at_most_40_operators_in_float32():
    assert ops_per_token(student()) <= 40


def test_a_decoding_token_launches_at_most_50_operators_under_bf16_autocast(monkeypatch):
    # autocast entered once around the loop: the weights are cast once per rollout, not per token
    monkeypatch.setattr(rollout_mod, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    assert ops_per_token(student()) <= 45


def test_with_the_gpus_sampler_a_token_launches_at_most_43_operators(monkeypatch):
    """What a CUDA or MPS step runs: the zero-mass-safe inversion instead of the binary search. (On
    CUDA the stop check, one of these, runs only every rollout.CUDA_STOP_EVERY tokens.)"""
    monkeypatch.setattr(sampling_mod, "IN_ORDER_SCAN", ())
    assert ops_per_token(student()) <= 43


@pytest.fixture(scope="module")
def counted_step():
    """One OPD step (sampled_token) at the defaults under Launches, after a warm-up step."""
    s, t = student(), teacher()
    opt = torch.optim.AdamW(s.parameters(), lr=1e-4, foreach=True)  # CUDA's default: one launch per op for all weights
    cfg = OPDConfig(loss="sampled_token", opd_batch=B, max_new_tokens=N, opd_lr=1e-4)
    problems = sample_problems(2 * B, "train", 0, 3, "+-")
    opd_step(s, t, opt, NO_EOS, problems[:B], cfg, torch.Generator().manual_seed(0), 0)
    c = Launches()
    generate, step = opd_mod.generate, opt.step
    opd_mod.generate, opt.step = c.during("rollout", generate), c.during("optimizer", step)
    try:
        with c:
            record = opd_step(s, t, opt, NO_EOS, problems[B:], cfg, torch.Generator().manual_seed(0), 1)
    finally:
        opd_mod.generate = generate
    return c, record


def test_an_opd_step_launches_at_most_3000_operators(counted_step):
    c, record = counted_step
    assert record["response_length"] == N  # EOS suppressed: the whole budget was generated
    assert c.total(c.ops) <= 3000


def test_an_opd_step_syncs_at_most_8_times_outside_the_rollout(counted_step):
    """The loss's finiteness check, the gradient norm's, the rollout's rows for the verifier and the
    one transfer of the step's figures. AdamW's .item() reads its step counter, which torch keeps
    on the host (not capturable): no device sync, so the optimizer is left out."""
    c, _ = counted_step
    assert c.total(c.syncs, "rest") <= 8, dict(c.syncs)
    assert c.total(c.syncs, "rollout") <= N + 1  # one stop check per token on the CPU, one transfer at the end


def test_one_log_softmax_per_model_per_step_shared_by_objective_and_diagnostics(counted_step):
    c, _ = counted_step
    assert c.ops[("rest", "_log_softmax.default")] == 2  # the student's and the teacher's


def test_the_lm_head_runs_only_on_the_positions_whose_logits_are_used(counted_step):
    c, _ = counted_step
    rows = [shape[0] * shape[1] if len(shape) == 3 else shape[0] for phase, name, shape in c.shapes
            if phase == "rest" and name in ("mm.default", "addmm.default", "matmul.default")
            and shape[-1] == TOK.n_vocab]
    assert rows and max(rows) == B * N  # the response positions only, not the prompt's
