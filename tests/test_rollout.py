"""Sampling: greedy = argmax, ragged batches = one at a time, top-k / top-p sets, seeds, EOS masks,
the inverse-CDF draw against its probabilities."""

import pytest
import torch

from nanoopd.model import GPT, GPTConfig
from nanoopd.rollout import filter_logits, generate, response_logits, sample

EOS, PAD = 48, 49


def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10], [11, 12]]


def test_greedy_is_argmax_of_recomputed_logits():
    model = tiny()
    ro = generate(model, PROMPTS, 12, EOS, PAD, temperature=0.0)
    logits = response_logits(model, ro)  # (B, N, V)
    m = ro.response_mask
    assert torch.equal(logits.argmax(-1)[m], ro.response[m])


def test_greedy_batched_ragged_equals_one_prompt_at_a_time():
    model = tiny()
    batched = generate(model, PROMPTS, 16, EOS, PAD, temperature=0.0)
    for i, p in enumerate(PROMPTS):
        single = generate(model, [p], 16, EOS, PAD, temperature=0.0)
        n = int(single.response_mask[0].sum())
        assert torch.equal(single.response[0, :n], batched.response[i, :n])
        assert int(batched.response_mask[i].sum()) == n


def test_cache_and_recompute_give_the_same_rollout():
    model = tiny()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = generate(model, PROMPTS, 16, EOS, PAD, temperature=1.0, generator=g1, use_cache=True)
    b = generate(model, PROMPTS, 16, EOS, PAD, temperature=1.0, generator=g2, use_cache=False)
    assert torch.equal(a.response, b.response)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_sampler_logprobs_equal_model_recomputation():
    model = tiny()
    ro = generate(model, PROMPTS, 16, EOS, PAD, temperature=1.0, generator=torch.Generator().manual_seed(0))
    logp = torch.log_softmax(response_logits(model, ro).float(), -1).gather(-1, ro.response[..., None]).squeeze(-1)
    m = ro.response_mask
    assert torch.allclose(ro.logprobs[m], logp[m], atol=1e-5)
    # at temperature 1 with no truncation the sampling distribution is the model itself
    assert torch.allclose(ro.sampler_logprobs[m], ro.logprobs[m], atol=1e-5)
    assert (ro.logprobs[~m] == 0).all()


def test_same_seed_repeats_different_seed_differs():
    model = tiny()
    run = lambda s: generate(model, PROMPTS * 4, 20, EOS, PAD, temperature=1.0,
                             generator=torch.Generator().manual_seed(s)).response
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_top_p_keeps_the_smallest_set_with_mass_at_least_p():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs.log()
    for p, kept in [(0.5, 1), (0.6, 2), (0.7, 2), (0.85, 3), (0.9, 4), (0.96, 5), (1.0, 5)]:
        out = filter_logits(logits, 1.0, 0, p)
        assert int(torch.isfinite(out).sum()) == kept, (p, kept)
        assert torch.isfinite(out[0, :kept]).all()  # and they are the most likely ones
    # shuffled order: the kept set is still the most likely tokens
    perm = torch.tensor([3, 0, 4, 1, 2])
    out = filter_logits(logits[:, perm], 1.0, 0, 0.7)
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == {1, 3}


def test_top_k_keeps_exactly_k_and_renormalises():
    logits = torch.tensor([[0.1, 2.0, -1.0, 3.0, 0.5]])
    out = filter_logits(logits, 1.0, 2, 1.0)
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == {1, 3}
    p = torch.softmax(out, -1)
    ref = torch.softmax(logits[0, [1, 3]], -1)
    assert torch.allclose(p[0, [1, 3]], ref)


def constant_model(eos_prob: float):
    """A model whose next-token distribution ignores the context and gives EOS about eos_prob:
    the final LayerNorm outputs a constant vector b, so logits = wte @ b at every position."""
    model = tiny()
    with torch.no_grad():
        model.ln_f.weight.zero_()
        e = model.wte.weight[EOS]
        for s in torch.linspace(0, 2000, 20001):  # smallest scale reaching the wanted EOS mass
            if torch.softmax(model.wte.weight @ (s * e), -1)[EOS] >= eos_prob:
                break
        model.ln_f.bias.copy_(s * e)
    return model


def test_response_mask_stops_after_first_eos():
    model = constant_model(0.15)  # a row misses EOS in all 10 steps with p = 0.85^10 = 0.2: both cases occur
    ro = generate(model, PROMPTS * 8, 10, EOS, PAD, temperature=1.0, generator=torch.Generator().manual_seed(1))
    stopped = 0
    for row, m in zip(ro.response.tolist(), ro.response_mask.tolist()):
        n = sum(m)
        assert m == [True] * n + [False] * (len(m) - n)  # the mask is a prefix
        if EOS in row[:n]:
            stopped += 1
            assert row.index(EOS) == n - 1  # it ends on the first EOS, inclusive
            assert all(t == PAD for t in row[n:])  # and nothing real follows
        else:
            assert n == 10  # no EOS: the full budget
    assert 0 < stopped < len(ro.response)  # both cases occurred


def test_certain_eos_stops_generation_after_one_token():
    model = constant_model(0.999)
    ro = generate(model, PROMPTS, 10, EOS, PAD, temperature=0.0)
    assert ro.response.shape[1] == 1 and (ro.response[:, 0] == EOS).all()
    assert ro.response_mask.all()


def test_bad_sampling_arguments_are_refused():
    model = tiny()
    with pytest.raises(ValueError, match="temperature"):
        generate(model, PROMPTS, 4, EOS, PAD, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, PROMPTS, 4, EOS, PAD, top_p=0.0)
    with pytest.raises(ValueError, match="block_size"):
        generate(model, PROMPTS, 100, EOS, PAD)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 4, EOS, PAD)


def test_inverse_cdf_draws_follow_the_probabilities():
    """200,000 draws per row: every frequency within 5 standard errors of p_v / Z, zero mass never
    drawn (at either end and in the middle), rows need not sum to 1."""
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3, 0.0],
                          [0.5, 0.0, 0.25, 0.0, 0.0, 0.25],
                          [2e-3, 1e-3, 0.0, 0.0, 0.0, 1e-3]])  # (3, 6), the last row sums to 4e-3
    n = 200_000
    g = torch.Generator().manual_seed(0)
    draws = sample(probs.repeat(n, 1), g).view(n, 3)  # (n, 3): n independent draws of every row
    for row in range(3):
        p = probs[row] / probs[row].sum()
        freq = torch.bincount(draws[:, row], minlength=6).double() / n
        assert (freq[p == 0] == 0).all()
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (row, freq, p)


def test_inverse_cdf_ends_of_the_uniform(monkeypatch):
    """u = 1 draws the last token of positive mass (not a zero-mass token after it); a u just above
    0 draws the first token of positive mass."""
    probs = torch.tensor([[0.0, 0.3, 0.7, 0.0, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.zeros(shape))  # u = 1 - 0 = 1
    assert sample(probs).item() == 2
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.full(shape, 1 - 2 ** -24))  # u = 2^-24
    assert sample(probs).item() == 1


def test_a_diverged_model_stops_the_rollout_with_a_clear_error():
    model = tiny()
    with torch.no_grad():
        model.ln_f.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        generate(model, PROMPTS, 4, EOS, PAD, temperature=1.0, generator=torch.Generator().manual_seed(0))
