"""Compute accounting (nanoopd/flops.py): the count against a hand count on a tiny config, against
torch's own FLOP counter for the projections, and the OPD, SFT and RLVR steps' records against it."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nanoopd.config import ConfigError
from nanoopd.flops import FlopCount, forward_flops, opd_step_flops, pass_flops, sft_flops
from nanoopd.model import GPT, GPTConfig
from nanoopd.rollout import response_logits
from nanoopd.sft import train_sft

TINY = GPTConfig(vocab_size=5, block_size=16, n_layer=1, n_head=1, n_embd=2)


def test_forward_flops_equals_a_hand_count_on_a_tiny_config():
    # L = 1, C = 2, V = 5; T = 3 tokens, head read at 2 positions:
    #   projections: per token q, k, v (3 * 2 * 2 * 2 = 24), out (2 * 2 * 2 = 8), MLP (2 * 2 * 8 * 2 = 64): 96;
    #                3 tokens: 288
    #   attention:   token i attends to i keys, 4 C = 8 FLOPs a key: 8 * (1 + 2 + 3) = 48
    #   head:        2 positions x 2 * C * V = 20: 40
    assert forward_flops(TINY, 3, 2) == 288 + 48 + 40
    assert forward_flops(TINY, 1, 0) == 96 + 8


def attention(c: GPTConfig, T: int) -> int:
    """Our count's attention term, 4 L C per attended key, causal: the part torch's counter leaves
    out on the CPU (it counts the matmuls of the projections and the head, not the fused kernel's)."""
    return 2 * c.n_layer * c.n_embd * T * (T + 1)


def test_the_projections_and_the_head_match_torchs_flop_counter():
    c = GPTConfig(vocab_size=11, block_size=32, n_layer=2, n_head=2, n_embd=8)
    model, T = GPT(c), 7
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, T, dtype=torch.long))
    assert counter.get_total_flops() == forward_flops(c, T, T) - attention(c, T)


def test_scoring_a_rollout_counts_the_head_only_where_it_is_read():
    c = GPTConfig(vocab_size=11, block_size=32, n_layer=1, n_head=1, n_embd=4)
    model = GPT(c)
    from nanoopd.mixed_batch import pool_rollout
    ro = pool_rollout([([1, 2, 3], [4, 5]), ([1, 2, 3], [6, 7])], 0, "cpu")
    with FlopCounterMode(display=False) as counter:
        response_logits(model, ro)
    # rows of equal lengths (no padding): T = 3 + 2 - 1 tokens, the head at the 2 response positions
    assert counter.get_total_flops() == pass_flops(c, [3, 3], [2, 2]) - 2 * attention(c, 3 + 2 - 1)


def test_an_opd_step_is_sampling_scoring_and_three_student_passes():
    s, t = GPTConfig(n_layer=1, n_embd=8, n_head=1), GPTConfig(n_layer=2, n_embd=16, n_head=2)
    rows = ([5, 6], [3, 4])
    compute, sampling = opd_step_flops(s, t, rows)
    assert sampling == 0
    assert compute == pass_flops(s, *rows) + pass_flops(t, *rows) + 3 * pass_flops(s, *rows)
    # a teacher row: the teacher samples it (charged), the student does not
    compute, sampling = opd_step_flops(s, t, ([5], [3]), ([6], [4]), ([6], [4]))
    assert sampling == pass_flops(t, [6], [4])
    assert compute == pass_flops(s, [5], [3]) + pass_flops(t, *rows) + 3 * pass_flops(s, *rows)
    # an objective that never reads the teacher (sft) does not pay for its scoring
    assert opd_step_flops(s, t, rows, scored=False)[0] == 4 * pass_flops(s, *rows)


def test_flop_count_keeps_both_columns():
    c = FlopCount().add(10.0, 5.0).add(1.0)
    assert (c.charged, c.given) == (16.0, 11.0)


def test_sft_counts_every_step_and_a_resumed_run_counts_the_earlier_ones(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=32, n_layer=1, n_head=1, n_embd=8))
    batches = lambda step: [([1, 2], [3, 4, 5]), ([1, 2, 3], [4])]
    count = FlopCount()
    train_sft(model, batches, 4, 1e-3, 0, warmup=1, log_every=0, count=count)
    assert count.charged == 4 * sft_flops(model.config, batches(0)) == 4 * 3 * (forward_flops(model.config, 4, 4)
                                                                                + forward_flops(model.config, 3, 3))
    path = str(tmp_path / "m.pt")
    train_sft(model, batches, 2, 1e-3, 0, warmup=1, log_every=0, ckpt_path=path)
    resumed = FlopCount()
    train_sft(model, batches, 4, 1e-3, 0, warmup=1, log_every=0, ckpt_path=path, resume=True, count=resumed)
    assert resumed.charged == count.charged


def test_a_flop_budget_below_one_step_is_refused_naming_the_flag():
    from nanoopd.flops import check_budget
    with pytest.raises(ConfigError, match="opd_flops"):
        check_budget(10.0, "opd_flops", 100.0)
    check_budget(0.0, "opd_flops", 100.0)  # 0: no budget
    check_budget(100.0, "opd_flops", 100.0)
