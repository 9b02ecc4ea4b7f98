"""The GPT: config validation, the KV cache against full recomputation, padding invariance."""

import pytest
import torch

from nanoopd.model import GPT, GPTConfig, KVCache


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def test_invalid_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="not divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="positive integer"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.5)


def test_sequence_longer_than_block_size_is_refused():
    model = tiny(block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_cached_logits_equal_full_recomputation_over_a_generation():
    model = tiny()
    torch.manual_seed(1)
    seq = torch.randint(0, 50, (3, 40))
    full = model(seq)  # (B, T, V)
    cache = KVCache(model.config, 3, 40, "cpu")
    pieces = [model(seq[:, :5], None, cache)]  # prefill 5 tokens
    for t in range(5, 40):  # then one token at a time
        pieces.append(model(seq[:, t:t + 1], None, cache))
    cached = torch.cat(pieces, 1)
    assert torch.allclose(cached, full, atol=1e-5, rtol=0)


def test_left_padding_does_not_change_a_row():
    model = tiny()
    torch.manual_seed(2)
    row = torch.randint(0, 50, (1, 7))
    alone = model(row)  # (1, 7, V)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), row], 1)  # (1, 11)
    valid = torch.tensor([[False] * 4 + [True] * 7])
    out = model(padded, valid)[:, 4:]
    assert torch.allclose(out, alone, atol=1e-5, rtol=0)


def test_the_lm_head_is_the_tied_embedding_and_gives_log_probs():
    model = tiny()
    seq = torch.randint(0, 50, (2, 10))
    final = {}
    model.ln_f.register_forward_hook(lambda module, inputs, output: final.setdefault("x", output))
    logits = model(seq[:, :-1])  # (2, 9, 50)
    assert logits.shape == (2, 9, 50)
    assert torch.allclose(logits, final["x"] @ model.wte.weight.T, atol=1e-6)  # logits = LN(x_L) @ wte^T
    logp = torch.log_softmax(logits.float(), -1).gather(-1, seq[:, 1:, None]).squeeze(-1)  # (2, 9)
    assert logp.shape == (2, 9) and (logp <= 0).all()
