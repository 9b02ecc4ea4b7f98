"""The static decoding step (rollout.Decoder.step, GPT.decode_step): compiled once for all tokens,
equal to eager decoding, to the growing cache it replaced and to full recomputation; seeded
rollouts unchanged; the sampler safe under any order of additions; no int64 cumsum; the CUDA
attention kernel choice."""

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from nanoopd.model import GPT, GPTConfig, KVCache, deterministic_attention
import nanoopd.sampling as sampling_mod
from nanoopd.rollout import filter_logits, generate, invert_cdf, left_pad, response_logits, sample, start_rollout

V, EOS, PAD = 50, 48, 49
PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=V, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


@torch.no_grad()
def test_the_step_compiles_once_for_all_tokens_with_no_graph_break_and_equals_eager():
    """torch.compile(step, fullgraph=True, dynamic=False) traces it once: one graph for all N - 1
    tokens (torch's own counters), so a CUDA graph or reduce-overhead compile can replay it."""
    model, N = tiny(), 12
    dec = start_rollout(model, PROMPTS, N, -1, PAD, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(dec.step, fullgraph=True, dynamic=False, backend="eager")
    for _ in range(N - 1):
        step()
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    eager = generate(model, PROMPTS, N, -1, PAD, generator=torch.Generator().manual_seed(0))
    P = dec.prompt_len
    assert torch.equal(dec.tokens[:, P:], eager.response)
    assert torch.equal(dec.logprobs[:, P:], eager.logprobs)
    torch._dynamo.reset()


@torch.no_grad()
def test_static_step_logits_equal_the_growing_cache_within_1e6_and_recomputation_within_1e5():
    """The static step attends over the whole preallocated cache (later slots at -inf), the growing
    cache over its first s + 1 keys: the same sum in another order."""
    model = tiny(1)
    tokens, valid = left_pad(PROMPTS, PAD, "cpu")
    B, P = tokens.shape
    N = 10
    follow = torch.randint(0, V, (B, N), generator=torch.Generator().manual_seed(0))
    static, growing = KVCache(model.config, B, P + N, "cpu").allocate(torch.float32), KVCache(model.config, B, P + N, "cpu")
    model(tokens, valid, static, n_last=1)
    model.start_decoding(static)
    model(tokens, valid, growing)
    worst_cache = worst_full = 0.0
    for t in range(N):
        a = model.decode_step(follow[:, t:t + 1], static)[0]  # (B, V)
        b = model(follow[:, t:t + 1], torch.ones(B, 1, dtype=torch.bool), growing)[:, -1]  # (B, V)
        full = model(torch.cat([tokens, follow[:, :t + 1]], 1),
                     torch.cat([valid, torch.ones(B, t + 1, dtype=torch.bool)], 1))[:, -1]  # (B, V)
        worst_cache = max(worst_cache, (a - b).abs().max().item())
        worst_full = max(worst_full, (a - full).abs().max().item())
    assert worst_cache < 1e-6 and worst_full < 1e-5


def reference_rollout(model, prompts, N, generator):
    """The token loop as it was before the static step: a growing cache, one (B, 1) uniform drawn
    per token, the token #{v : F_v < u Z}, a stop check after every token."""
    tokens, valid = left_pad(prompts, PAD, "cpu")
    B, P = tokens.shape
    cache = KVCache(model.config, B, P + N, "cpu")
    logits = model(tokens, valid, cache)[:, -1]
    alive, out, logps = torch.ones(B, dtype=torch.bool), [], []
    for t in range(N):
        logp = torch.log_softmax(logits, -1)
        cdf = logp.exp().cumsum(-1)
        u = 1.0 - torch.rand(B, 1, generator=generator)
        nxt = (cdf < u * cdf[:, -1:]).sum(-1)
        out.append(torch.where(alive, nxt, PAD))
        logps.append(torch.where(alive, logp.gather(1, nxt[:, None]).squeeze(1), 0.0))
        was, alive = alive, alive & (nxt != EOS)
        if not alive.any():
            break
        logits = model(nxt[:, None], was[:, None], cache)[:, -1]
    return torch.stack(out, 1), torch.stack(logps, 1)


@torch.no_grad()
def test_seeded_rollouts_move_no_token_and_leave_the_generator_where_the_old_loop_did():
    moved = total = 0
    for seed in range(2):
        model = tiny(seed)
        prompts = PROMPTS * 4
        g_new, g_old = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(2):  # the second rollout starts where the first left the generator
            ro = generate(model, prompts, 30, EOS, PAD, generator=g_new)
            tokens, logps = reference_rollout(model, prompts, 30, g_old)
            assert ro.response.shape == tokens.shape  # the same stop
            moved += int((ro.response != tokens)[ro.response_mask].sum())
            total += int(ro.response_mask.sum())
            assert (ro.logprobs - logps).abs().max().item() < 1e-5
        assert torch.equal(g_new.get_state(), g_old.get_state())
    assert total > 1000 and moved == 0


def tree_cumsum(p: torch.Tensor) -> torch.Tensor:
    """A cumulative sum that adds in a tree order (Hillis-Steele: x_i += x_{i-d}, d = 1, 2, 4, ...),
    as a GPU scan may: a zero-mass token can end a sliver of rounding above its predecessor."""
    x = p.clone()
    d = 1
    while d < x.shape[-1]:
        x = torch.cat([x[:, :d], x[:, d:] + x[:, :-d]], 1)
        d *= 2
    return x


def test_no_zero_mass_token_is_drawn_whatever_the_order_of_additions():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(64, 261, generator=g)
    probs = torch.log_softmax(filter_logits(logits, 1.0, 0, 0.9), -1).exp()  # top-p 0.9: most tokens at 0
    cdf = tree_cumsum(probs)
    before = torch.cat([torch.zeros(64, 1), cdf[:, :-1]], 1)
    sliver = (probs == 0) & (cdf > before)  # zero mass, yet a step of the CDF
    assert sliver.sum() > 100
    # u Z aimed inside each row's first sliver: the count #{v : F_v < u Z} lands on that zero-mass token
    row = sliver.any(1)
    v = sliver.float().argmax(1)
    z = cdf[:, -1:]
    u = (0.5 * (before.gather(1, v[:, None]) + cdf.gather(1, v[:, None])) / z).clamp(max=1.0)
    u = torch.where(row[:, None], u, 0.5)  # u in (0, 1] on the rows without a sliver
    naive = (cdf < u * z).sum(-1)
    assert (probs.gather(1, naive[:, None]).squeeze(1)[row] == 0).any()  # the sliver is reachable
    y = invert_cdf(probs, cdf, u)
    assert (probs.gather(1, y[:, None]) > 0).all()
    for u in [torch.ones(64, 1), 1.0 - torch.rand(64, 4096, generator=g)]:  # u = 1, and many draws
        y = torch.stack([invert_cdf(probs, cdf, u[:, i:i + 1]) for i in range(u.shape[1])], 1)
        assert (probs.gather(1, y) > 0).all()


def test_with_an_in_order_sum_the_draw_is_the_count_of_cdf_values_below_u_z():
    g = torch.Generator().manual_seed(1)
    probs = torch.log_softmax(filter_logits(torch.randn(256, V, generator=g), 0.7, 10, 0.8), -1).exp()
    cdf = probs.cumsum(-1)
    u = 1.0 - torch.rand(256, 1, generator=g)
    assert torch.equal(invert_cdf(probs, cdf, u), (cdf < u * cdf[:, -1:]).sum(-1))


def test_on_the_cpu_one_binary_search_draws_what_invert_cdf_draws(monkeypatch):
    """The CPU's sampler (torch.searchsorted over its in-order cdf) and the one for any order of
    additions (invert_cdf) give the same token for every u, with most tokens at zero mass, u = 1,
    u at the smallest step, and a row of NaN (a diverged model) kept to a token id."""
    g = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(128, V, generator=g)
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.0, 0, 0.6), (0.3, 0, 0.9)]:
        probs = torch.log_softmax(filter_logits(logits, temperature, top_k, top_p), -1).exp()  # (B, V)
        us = torch.cat([torch.ones(128, 1), torch.full((128, 1), 2.0 ** -24), 1.0 - torch.rand(128, 512, generator=g)], 1)
        for i in range(us.shape[1]):
            u = us[:, i:i + 1]
            assert torch.equal(sample(probs, u=u), invert_cdf(probs, probs.cumsum(-1), u))
    nan = torch.full((2, V), float("nan"))
    y = sample(nan, u=torch.ones(2, 1))
    assert ((0 <= y) & (y < V)).all()
    monkeypatch.setattr(sampling_mod, "IN_ORDER_SCAN", ())  # the GPU's path, here on the CPU
    assert torch.equal(sample(probs, u=us[:, 2:3]), invert_cdf(probs, probs.cumsum(-1), us[:, 2:3]))


class NoInt64Cumsum(TorchDispatchMode):
    """What MPS before macOS 13.3 refuses: an int64 cumulative sum (and cummax, multinomial)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if name in ("aten::cummax", "aten::multinomial") or (name == "aten::cumsum" and out.dtype == torch.int64):
            raise RuntimeError(f"{name} -> {out.dtype}")
        return out


@torch.no_grad()
def test_rollout_and_scoring_take_no_int64_cumsum():
    model = tiny()
    with NoInt64Cumsum():
        ro = generate(model, PROMPTS, 12, EOS, PAD, generator=torch.Generator().manual_seed(0))
        logits = response_logits(model, ro)
    assert logits.shape == (len(PROMPTS), ro.response.shape[1], V)


@pytest.mark.parametrize("device_type, masked, grad, expected", [
    ("cuda", True, True, True),     # masked scoring with a backward: the math kernel, deterministic
    ("cuda", True, False, False),   # no backward (sampling, the teacher): the fast kernels
    ("cuda", False, True, False),   # plain causal training: its kernels are deterministic
    ("cpu", True, True, False),
    ("mps", True, True, False),
])
def test_masked_attention_takes_the_math_kernel_on_cuda_when_a_backward_follows(device_type, masked, grad, expected):
    assert deterministic_attention(device_type, masked, grad) is expected
