"""Graders of the course's labs (course/labs.py), next to the project's own exact tests: each check
states what the code must do, so that a wrong solution fails with a message that names the mistake.

The library passes all of them; a student copy (course/make_lab.py) passes them once the lab's code
is written. None samples with the KV cache, so that each lab's grader calls only its own lab's code.
"""

import math

import pytest
import torch

from nanoopd.model import GPT, GPTConfig, KVCache
from nanoopd.objectives import OBJECTIVES
from nanoopd.rlvr import group_advantages, policy_gradient_loss
from nanoopd.rollout import Rollout, left_pad, response_logits
from nanoopd.sampled_token import g_gamma_surrogate, returns_to_go, sampled_token_surrogate
from nanoopd.self_distill import RULE, pi_text, with_privileged_context
from nanoopd.sft import make_batch
from nanoopd.special_tokens import HiddenTokens
from nanoopd.tasks import Problem, encode_example, trace_text
from nanoopd.tokenizer import get_tokenizer
from nanoopd.topk import topk_renormalized, topk_stopgrad, topk_support, topk_unnormalized

TOK = get_tokenizer()


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------------------------
# lab kv_cache: KVCache.write


def small_cache(n_layer=2, batch=2, heads=2, head_dim=4, max_len=8) -> KVCache:
    config = GPTConfig(vocab_size=11, block_size=16, n_layer=n_layer, n_head=heads, n_embd=heads * head_dim)
    return KVCache(config, batch, max_len, "cpu")


def test_kv_cache_allocates_one_buffer_per_tensor_for_every_layer():
    cache = small_cache()
    k, v = randn(2, 2, 3, 4, seed=1), randn(2, 2, 3, 4, seed=2)
    cache.write(0, k, v)
    assert cache.k is not None and cache.v is not None, "KVCache.write must allocate self.k and self.v on the first write"
    assert tuple(cache.k.shape) == (2, 2, 2, 8, 4) and tuple(cache.v.shape) == (2, 2, 2, 8, 4), (
        f"self.k and self.v must be (n_layer, B, n_head, max_len, head_dim) = (2, 2, 2, 8, 4), got "
        f"{tuple(cache.k.shape)} and {tuple(cache.v.shape)}")
    assert cache.k.dtype == torch.float64 and cache.v.dtype == torch.float64, (
        f"the buffers must take the dtype of the k and v written (bf16 under autocast), got {cache.k.dtype}")
    assert cache.k is not cache.v, "keys and values need a buffer each"


def test_kv_cache_write_returns_the_cached_keys_then_the_new_ones():
    cache = small_cache()
    k1, v1 = randn(2, 2, 3, 4, seed=1), randn(2, 2, 3, 4, seed=2)  # a prefill of 3 tokens
    k2, v2 = randn(2, 2, 1, 4, seed=3), randn(2, 2, 1, 4, seed=4)  # then one decoding step
    for new_k, new_v, length in ((k1, v1, 0), (k2, v2, 3)):
        cache.length = length  # GPT.forward advances it after the last layer
        k, v = cache.write(0, new_k, new_v)
        assert cache.length == length, (
            f"KVCache.write moved cache.length from {length} to {cache.length}: write must not advance it, "
            f"GPT.forward does so once after the last layer (every layer of a step writes at the same position)")
        assert k.dtype == new_k.dtype and v.dtype == new_v.dtype, (
            f"write returned {k.dtype} keys for {new_k.dtype} ones written: allocate self.k and self.v in the "
            f"dtype of the k and v of the first write (k.dtype), not torch's default float32")
        T = new_k.shape[2]
        assert tuple(k.shape) == (2, 2, length + T, 4) and tuple(v.shape) == (2, 2, length + T, 4), (
            f"at length {length}, writing T={T} tokens returned keys of shape {tuple(k.shape)}, expected "
            f"(B, H, length + T, hd) = (2, 2, {length + T}, 4): the cached tokens and the new ones")
    expected_k, expected_v = torch.cat([k1, k2], 2), torch.cat([v1, v2], 2)
    assert not torch.equal(k[:, :, 0], k2[:, :, 0]), (
        "the key of the decoding step (written at length 3) came back in slot 0: every step was written to "
        "slot 0, over the cached ones; the new keys go to [self.length, self.length + T)")
    for slot in range(4):
        assert torch.equal(k[:, :, slot], expected_k[:, :, slot]), (
            f"slot {slot} of the returned keys is not the key of token {slot}: token t lives in slot t, "
            f"the new ones go to [length, length + T) (an off-by-one in the cache position?)")
    assert torch.equal(v, expected_v), "the returned values are not the values written: keys go to self.k, values to self.v"


def test_kv_cache_keeps_the_layers_apart():
    cache = small_cache()
    first = [cache.write(layer, randn(2, 2, 3, 4, seed=layer), randn(2, 2, 3, 4, seed=10 + layer))
             for layer in range(2)]  # a prefill of 3 tokens, layer by layer as the GPT does
    first = [(k.clone(), v.clone()) for k, v in first]
    assert not torch.equal(first[0][0], first[1][0]), "layers 0 and 1 returned the same keys: index the buffers by layer"
    cache.length = 3
    for layer in range(2):  # one decoding step: each layer must get back its own 3 cached keys
        k, v = cache.write(layer, randn(2, 2, 1, 4, seed=20 + layer), randn(2, 2, 1, 4, seed=30 + layer))
        assert torch.equal(k[:, :, :3], first[layer][0]) and torch.equal(v[:, :, :3], first[layer][1]), (
            f"at the next step layer {layer} got back other keys or values than it stored: writing one layer must "
            f"not touch another's, index the buffers by layer (self.k[layer])")


# ----------------------------------------------------------------------------------------------
# lab g_gamma: returns_to_go, g_gamma_surrogate (sampled_token_surrogate: the project's exact tests)


def test_returns_to_go_is_the_discounted_sum_of_the_costs_from_t_on():
    r = randn(2, 5, seed=0)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.float64)
    for gamma in (0.0, 0.5, 1.0):
        R = returns_to_go(r, mask, gamma)
        assert tuple(R.shape) == (2, 5), f"returns_to_go must return (B, T) = (2, 5), got {tuple(R.shape)}"
        assert R.dtype == torch.float64, (
            f"returns_to_go returned {R.dtype} for float64 costs: compute in torch.promote_types(r.dtype, "
            f"torch.float32), so that float64 stays float64 (the exact checks need it); do not call .float()")
        broken = mask[0, 0] * (r[0, 0] + gamma * r[0, 1])  # row 0: the chain stopped at the hole at t = 2
        if gamma > 0:
            assert abs(R[0, 0].item() - broken.item()) > 1e-9, (
                f"returns_to_go(gamma={gamma}): the masked position t=2 broke the discount chain (R_0 leaves out "
                f"the costs after it); a masked position adds no cost, but the chain runs over time steps: "
                f"R_0 = r_0 + gamma r_1 + gamma^3 r_3 + gamma^4 r_4")
        for b in range(2):
            for t in range(5):
                expected = mask[b, t] * sum(gamma ** (u - t) * r[b, u] * mask[b, u] for u in range(t, 5))
                assert abs(R[b, t].item() - expected.item()) < 1e-12, (
                    f"returns_to_go(gamma={gamma})[{b}, {t}] = {R[b, t].item():.6f}, expected "
                    f"sum_(t'>=t) gamma^(t'-t) r_t' m_t' = {expected.item():.6f} (r_t itself counts, "
                    f"masked positions add nothing, and R_t = 0 where m_t = 0)")
    try:
        returns_to_go(r, mask, 1.5)
    except ValueError:
        pass
    else:
        raise AssertionError("returns_to_go(gamma=1.5) must raise ValueError: gamma lies in [0, 1]")


def test_g_gamma_cost_is_student_minus_teacher():
    logp = torch.tensor([[-0.2, -1.5, -0.7]], dtype=torch.float64, requires_grad=True)
    logq = torch.tensor([[-1.0, -0.3, -0.7]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.float64)
    r = (logp - logq).detach()  # the cost: > 0 where the student likes y_t more than the teacher
    for gamma in (0.0, 0.5, 1.0):
        L = g_gamma_surrogate(logp, logq, mask, gamma)
        assert tuple(L.shape) == (1,), f"g_gamma_surrogate must return one number per sequence, (B,), got {tuple(L.shape)}"
        (grad,) = torch.autograd.grad(L.sum(), logp)
        R = torch.stack([sum(gamma ** (u - t) * r[0, u] for u in range(t, 3)) for t in range(3)])
        assert not torch.allclose(grad[0], -R, atol=1e-9), (
            "g_gamma_surrogate uses r_t = log q - log pi: the KL direction is swapped; the cost is "
            "r_t = log pi(y_t|c_t) - log q(y_t|c_t), student minus teacher")
        assert torch.allclose(grad[0], R, atol=1e-9), (
            f"at gamma={gamma}, dL/dlog pi(y_t) = {grad[0].tolist()}, expected R_t = {R.tolist()}: "
            f"L = sum_t sg(R_t) log pi(y_t), with R_t held constant")


def test_g_gamma_treats_the_teacher_as_a_constant():
    logp = randn(2, 4, seed=0).requires_grad_()
    logq = randn(2, 4, seed=1).requires_grad_()
    g_gamma_surrogate(logp, logq, torch.ones(2, 4), 1.0).sum().backward()
    assert logq.grad is None or not logq.grad.any(), (
        "g_gamma_surrogate sent a gradient into the teacher's log-probs: the teacher is a constant, detach log q")
    assert logp.grad is not None and logp.grad.any(), "g_gamma_surrogate gave the student no gradient"


def test_sampled_token_clamps_the_cost_before_the_baseline():
    logp = torch.tensor([[-0.1, -3.0, -0.5]], dtype=torch.float64, requires_grad=True)
    logq = torch.tensor([[-2.5, -0.2, -0.6]], dtype=torch.float64)  # r = 2.4, -2.8, 0.1
    baseline = torch.tensor([[0.7, 0.7, -0.4]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.float64)
    r = (logp - logq).detach()
    L = sampled_token_surrogate(logp, logq, mask, clamp=1.0, baseline=baseline)
    assert L.dtype == torch.float64, (
        f"sampled_token_surrogate returned {L.dtype} for float64 inputs: keep float64 in float64 (do not call .float())")
    (grad,) = torch.autograd.grad(L.sum(), logp)  # dL/dlog pi(y_t) = -A_t = r_t - b_t, r_t clipped first
    right = r.clamp(-1, 1) - baseline
    assert not torch.allclose(grad, (r - baseline).clamp(-1, 1), atol=1e-9), (
        "sampled_token_surrogate clips r_t - b_t: the baseline was applied before the clamp; clip r_t to "
        "[-clamp, clamp] first, then subtract b_t (A_t = sg(-clip(r_t) + b_t))")
    assert not torch.allclose(grad, r.clamp(-1, 1) + baseline, atol=1e-9), (
        "the baseline's sign is flipped: A_t = sg(-r_t + b_t), so dL/dlog pi(y_t) = r_t - b_t, not r_t + b_t")
    assert torch.allclose(grad, right, atol=1e-9), (
        f"with clamp=1 and a baseline, dL/dlog pi(y_t) = {grad[0].tolist()}, expected clip(r_t, -1, 1) - b_t = "
        f"{right[0].tolist()}")
    for clamp in (0.0, -1.0):
        try:
            sampled_token_surrogate(logp, logq, mask, clamp=clamp)
        except ValueError:
            continue
        raise AssertionError(f"sampled_token_surrogate(clamp={clamp}) must raise ValueError: a clamp is None "
                             f"(no clamp) or a positive number")


# ----------------------------------------------------------------------------------------------
# lab topk: topk_unnormalized, topk_stopgrad, topk_renormalized


def topk_batch(seed=0, k=2, equal=False):
    student = 2 * randn(2, 3, 6, seed=seed)
    teacher = student.clone() if equal else 2 * randn(2, 3, 6, seed=seed + 100)
    index, member = topk_support(student, teacher, torch.zeros(2, 3, dtype=torch.long), k)
    return student, teacher, index, member


def grad_of(form, student, teacher, index, member):
    x = student.clone().requires_grad_()
    return torch.autograd.grad(form(x, teacher, index, member).sum(), x)[0]


def test_topk_unnormalized_gradient_is_the_truncated_one_plus_the_mass_term():
    student, teacher, index, member = topk_batch(k=3)
    got = topk_unnormalized(student, teacher, index, member)
    assert got.dtype == torch.float64, (
        f"topk_unnormalized returned {got.dtype} for float64 logits: keep float64 in float64 (no .float())")
    grad = grad_of(topk_unnormalized, student, teacher, index, member)
    assert torch.isfinite(grad).all(), "topk_unnormalized gives NaN/inf gradients"
    pi = torch.softmax(student, -1)
    r = torch.log_softmax(student, -1) - torch.log_softmax(teacher, -1)
    in_s = torch.zeros_like(pi).scatter(-1, index, member.double())  # (B, T, V) 1 on S
    weights = in_s * pi * (r + 1)  # sum_S pi (r + 1) grad log pi, grad_z log pi(v) = e_v - pi
    expected = weights - pi * weights.sum(-1, keepdim=True)
    assert torch.allclose(grad, expected, atol=1e-10), (
        "the gradient of topk_unnormalized must be sum_S pi (log pi - log q + 1) grad log pi: both log pi "
        "factors differentiable, log q a constant")


def test_topk_unnormalized_keeps_its_plus_one_term():
    student, teacher, index, member = topk_batch(equal=True)  # pi = q: every r(v) = 0
    grad = grad_of(topk_unnormalized, student, teacher, index, member)
    x = student.clone().requires_grad_()
    mass = (torch.softmax(x, -1).gather(-1, index) * member).sum()  # sum over positions of sum_S pi
    (grad_mass,) = torch.autograd.grad(mass, x)
    assert grad.abs().max() > 1e-6, (
        "topk_unnormalized lost its +1 term: at pi = q its gradient must be grad sum_S pi (the mass term), "
        "not 0; keep log pi differentiable inside the bracket, this form is biased on purpose")
    assert torch.allclose(grad, grad_mass, atol=1e-12), (
        "at pi = q the gradient of topk_unnormalized must be exactly grad sum_S pi")


def test_topk_unnormalized_step_drains_mass_out_of_the_support():
    student, teacher, index, member = topk_batch(equal=True)  # pi = q: the full KL is at its minimum
    grad = grad_of(topk_unnormalized, student, teacher, index, member)
    mass = lambda z: (torch.softmax(z, -1).gather(-1, index) * member).sum(-1)  # noqa: E731  (B, T) sum_S pi
    assert (mass(student - 1.0 * grad) < mass(student)).all(), (
        "one descent step of topk_unnormalized at pi = q must lower the student's mass on S at every position "
        "(its gradient there is grad sum_S pi, the +1 term)")


def test_topk_stopgrad_has_no_plus_one_term():
    student, teacher, index, member = topk_batch(equal=True)
    got = topk_stopgrad(student, teacher, index, member)
    assert got.dtype == torch.float64, (
        f"topk_stopgrad returned {got.dtype} for float64 logits: keep float64 in float64 (no .float())")
    grad = grad_of(topk_stopgrad, student, teacher, index, member)
    assert torch.isfinite(grad).all(), "topk_stopgrad gives NaN/inf gradients"
    assert grad.abs().max() < 1e-12, (
        "topk_stopgrad still carries the +1 term (grad sum_S pi): at pi = q its gradient must be 0; "
        "stop the gradient of log pi inside the bracket, sum_S pi (sg(log pi) - log q)")


def test_topk_renormalized_is_the_reverse_kl_of_the_renormalised_pair():
    student, teacher, index, member = topk_batch(k=3)
    got = topk_renormalized(student, teacher, index, member)
    assert tuple(got.shape) == (2, 3), f"topk_renormalized must return one value per position, (B, T), got {tuple(got.shape)}"
    assert got.dtype == torch.float64, (
        f"topk_renormalized returned {got.dtype} for float64 logits: keep float64 in float64 (no .float())")
    empty = member.clone()
    empty[0, 0] = False  # S_t empty at one position: its value and gradient must be 0, not NaN
    x = student.clone().requires_grad_()
    value = topk_renormalized(x, teacher, index, empty)
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all(), (
        "NaN with an empty support S_t: a -inf mask over every column of a row makes log_softmax NaN; "
        "give an empty row finite logits (e.g. 0) and zero its terms, as _log_softmax_on does")
    assert value[0, 0] == 0 and not grad[0, 0].any(), "an empty S_t must give the value 0 and no gradient"
    p_hat = torch.softmax(student.gather(-1, index), -1)  # every column is a member here
    q_hat = torch.softmax(teacher.gather(-1, index), -1)
    reverse = (p_hat * (p_hat.log() - q_hat.log())).sum(-1)
    forward = (q_hat * (q_hat.log() - p_hat.log())).sum(-1)
    assert not torch.allclose(got, forward, atol=1e-10), (
        "topk_renormalized computes KL(q_hat || pi_hat): the direction is swapped; it must be the reverse "
        "KL(pi_hat || q_hat), weighted by the student")
    assert torch.allclose(got, reverse, atol=1e-10), (
        "topk_renormalized must be KL(pi_hat || q_hat), pi_hat = pi / sum_S pi and q_hat = q / sum_S q on S")


@pytest.mark.parametrize("form", [topk_unnormalized, topk_stopgrad, topk_renormalized],
                         ids=["unnormalized", "stopgrad", "renormalized"])
def test_topk_forms_treat_the_teacher_as_a_constant(form):
    student, teacher, index, member = topk_batch()
    x, q = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    form(x, q, index, member).sum().backward()
    assert q.grad is None or not q.grad.any(), (
        f"{form.__name__} sent a gradient into the teacher's logits: the teacher is a constant, detach it")


# ----------------------------------------------------------------------------------------------
# lab masking: mask_tokens in objectives._prepare, special_tokens.HiddenTokens


def test_mask_tokens_tames_a_token_the_teacher_never_saw():
    student, teacher = 2 * randn(3, 5, 7, seed=0), 2 * randn(3, 5, 7, seed=1)
    tokens = torch.randint(0, 6, (3, 5), generator=torch.Generator().manual_seed(2))
    special = 6  # the teacher gives it ~e^-40, the student emits it confidently
    teacher[..., special], student[..., special] = -40.0, 8.0
    tokens[1, 0] = tokens[2, 3] = special
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 4] = False
    tokens[0, 4] = special  # padding that happens to hold the listed id: it must stay masked out
    kept = mask.clone()
    _, plain = OBJECTIVES["full_reverse_kl"](student, teacher, tokens, mask)
    _, masked = OBJECTIVES["full_reverse_kl"](student, teacher, tokens, mask, mask_tokens=[special])
    assert torch.equal(mask, kept), "mask_tokens changed the caller's mask in place: build a new mask"
    assert plain["logratio_max_abs"] > 40, "without mask_tokens the special token must still be in the loss"
    n = int(mask.sum()) - 2
    assert masked["n_tokens"] != n + 1, (
        "a position that was already masked out (padding holding a listed id) came back into the loss: "
        "mask_tokens may only remove positions, mask & ~contains(tokens, ids), never flip them (not ^)")
    assert masked["n_tokens"] == n, (
        f"mask_tokens=[{special}] must remove exactly the 2 positions whose sampled token is {special} from the "
        f"mask: the loss saw {masked['n_tokens']:.0f} tokens, expected {n} (mask & not special)")
    r = (torch.log_softmax(student, -1) - torch.log_softmax(teacher, -1)).gather(-1, tokens[..., None])[..., 0]
    others = r[mask & (tokens != special)].abs().max().item()  # below 40: the special token's cost is ~48
    assert masked["logratio_max_abs"] == pytest.approx(others), (
        "a token the teacher never saw still reaches the loss after masking: the largest |r_t| left must be "
        "that of the other tokens")


def hidden_rollout(prompts, responses):
    """A Rollout built by hand: left-padded prompts, responses of equal length, all real."""
    tokens, valid = left_pad(prompts, TOK.pad_id, "cpu")
    response = torch.tensor(responses)
    ones = torch.ones_like(response, dtype=torch.bool)
    return Rollout(torch.cat([tokens, response], 1), torch.cat([valid, ones], 1), tokens.shape[1], response,
                   ones, response * 0.0, response * 0.0)


def small_teacher():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=TOK.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()


X = TOK.fmt_id


def test_hidden_tokens_leave_the_prompt_alone():
    teacher = small_teacher()
    prompt = [TOK.bos_id, X] + TOK.encode("12+7=\n")  # a hidden id in the prompt: prompts are never hidden
    ro = hidden_rollout([prompt], [TOK.encode("2+7+0=9")])
    with torch.no_grad():
        hidden = HiddenTokens((X,))(teacher, ro)
        plain = response_logits(teacher, ro)
    assert hidden.shape == plain.shape, f"HiddenTokens must return (B, N, V) = {tuple(plain.shape)}, got {tuple(hidden.shape)}"
    assert torch.allclose(hidden, plain, atol=1e-5), (
        "HiddenTokens changed the teacher's scores of a response without hidden tokens: the hidden id sits in "
        "the prompt here, and prompts are never hidden (only response positions >= P)")


def test_hidden_tokens_in_a_ragged_batch_are_as_if_they_were_not_there():
    teacher = small_teacher()
    prompts = [[TOK.bos_id] + TOK.encode("347+285=\n"), [TOK.bos_id] + TOK.encode("3+4=\n")]
    responses = [TOK.encode("7+5+") + [X, X] + TOK.encode("0=12"), [X] + TOK.encode("13+4+0=7") + [X]]
    with torch.no_grad():
        hidden = HiddenTokens((X,))(teacher, hidden_rollout(prompts, responses))  # (B, N, V)
        alone = HiddenTokens((X,))(teacher, hidden_rollout(prompts[1:], responses[1:]))[0]  # row 1, no padding
        assert torch.allclose(hidden[1], alone, atol=1e-5), (
            "row 1 gets other scores in a batch, where its short prompt is left-padded, than alone: the padding "
            "became visible; a position is visible only if it is valid and not a hidden response token")
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            shown = [t for t in response if t != X]
            plain = response_logits(teacher, hidden_rollout([prompt], [shown]))[0]  # (N', V)
            seen = 0
            for j, token in enumerate(response):
                if token == X:
                    continue
                after_hidden = X in response[:j]
                assert torch.allclose(hidden[i, j], plain[seen], atol=1e-5), (
                    f"row {i}, response token {j}: HiddenTokens must give the teacher's logits of the same context "
                    f"with the hidden tokens left out (read at the last visible position before it)" + (
                        "; this token comes after a hidden one: the hidden token must be left out of the context "
                        "(valid=False at its position, not replaced by another id), and the flags must sit on the "
                        "hidden token's own position in rollout.tokens[:, :-1], not one off" if after_hidden else
                        "; no hidden token precedes it yet: the context before the first hidden token must be "
                        "scored exactly as without hiding (prompt and padding untouched)"))
                seen += 1


# ----------------------------------------------------------------------------------------------
# lab opsd: pi_text, with_privileged_context


PROBLEMS = [Problem(347, "+", 285), Problem(12, "-", 7), Problem(46, "*", 3)]


def test_pi_text_instance_specific_vs_shared():
    for p in PROBLEMS:
        assert pi_text(p, "answer") == f"<|pi|>answer: {p.answer}<|pi|>", (
            f"pi_text(p, 'answer') must be '<|pi|>answer: {p.answer}<|pi|>', got {pi_text(p, 'answer')!r}")
        assert pi_text(p, "solution") == f"<|pi|>solution:\n{trace_text(p)}\n<|pi|>", (
            "pi_text(p, 'solution') must be '<|pi|>solution:\\n' + the gold trace + '\\n<|pi|>'")
    rules = {pi_text(p, "rule") for p in PROBLEMS}
    assert len(rules) == 1, (
        f"pi_text(p, 'rule') must be the same for every problem (a shared rule carries nothing about the "
        f"instance), got {sorted(rules)}")
    assert rules == {f"<|pi|>{RULE}<|pi|>"}, f"pi_text(p, 'rule') must be '<|pi|>{RULE}<|pi|>'"
    try:
        pi_text(PROBLEMS[0], "hint")
    except ValueError:
        pass
    else:
        raise AssertionError("pi_text(p, 'hint') must raise ValueError: an unknown kind of privileged information")


def student_side():
    """The student's rollout, built by hand: left-padded prompts and ragged responses."""
    prompts = [encode_example(TOK, p)[0] for p in PROBLEMS]
    answers = [TOK.encode(f"A:{p.answer}") + [TOK.eos_id] for p in PROBLEMS]
    N = max(len(a) for a in answers)
    response = torch.tensor([a + [TOK.pad_id] * (N - len(a)) for a in answers])
    response_mask = torch.tensor([[True] * len(a) + [False] * (N - len(a)) for a in answers])
    tokens, valid = left_pad(prompts, TOK.pad_id, "cpu")
    zeros = torch.zeros(response.shape)
    return prompts, Rollout(torch.cat([tokens, response], 1), torch.cat([valid, response_mask], 1),
                            tokens.shape[1], response, response_mask, zeros, zeros)


PI_TEXTS = {  # written out, so that the context task's tests do not call the student's pi_text
    "answer": [f"<|pi|>answer: {p.answer}<|pi|>" for p in PROBLEMS],
    "rule": [f"<|pi|>{RULE}<|pi|>"] * len(PROBLEMS),
}


def pi_ids(kind="answer"):
    return [TOK.encode(text, allow_special=True) for text in PI_TEXTS[kind]]


def test_privileged_context_is_bos_pi_prompt_then_the_same_response():
    prompts, ro = student_side()
    ctx = with_privileged_context(ro, pi_ids(), TOK.pad_id)
    P = ctx.prompt_len
    for row in range(len(PROBLEMS)):
        got = [t for t, keep in zip(ctx.tokens[row, :P].tolist(), ctx.valid[row, :P].tolist()) if keep]
        assert got.count(TOK.bos_id) == 1, (
            f"row {row}: the teacher's prompt holds <|bos|> {got.count(TOK.bos_id)} times: the student's prompt "
            f"already starts with it, so it is [bos] + PI + prompt[1:], not [bos] + PI + prompt")
    assert P == max(len(p) + len(i) for p, i in zip(prompts, pi_ids())), (
        f"the teacher's prompts must be left-padded to the longest [bos] + PI + prompt, got prompt_len {P}")
    for row, (prompt, pi) in enumerate(zip(prompts, pi_ids())):
        got = [t for t, keep in zip(ctx.tokens[row, :P].tolist(), ctx.valid[row, :P].tolist()) if keep]
        assert got == prompt[:1] + pi + prompt[1:], (
            f"row {row}: the teacher's prompt must be [bos] + PI + the student's prompt without its bos, "
            f"got {TOK.decode(got)!r}")
    assert torch.equal(ctx.tokens[:, P:], ro.response) and torch.equal(ctx.valid[:, P:], ro.response_mask), (
        "the student's response tokens and mask must follow the teacher's prompts unchanged")
    assert torch.equal(ctx.response, ro.response) and torch.equal(ctx.response_mask, ro.response_mask), (
        "the teacher's Rollout must keep the student's response and response_mask")
    try:
        with_privileged_context(ro, pi_ids()[:2], TOK.pad_id)
    except ValueError:
        pass
    except Exception as e:
        raise AssertionError(f"with_privileged_context with 2 PIs for {len(PROBLEMS)} rows must raise ValueError "
                             f"(one PI per rollout row), got {type(e).__name__}: {e}")
    else:
        raise AssertionError(f"with_privileged_context with 2 PIs for {len(PROBLEMS)} rows must raise ValueError: "
                             f"one PI per rollout row")


def test_privileged_teacher_scores_equal_a_manual_pass_on_the_concatenation():
    model = small_teacher()
    prompts, ro = student_side()
    with torch.no_grad():
        ctx = with_privileged_context(ro, pi_ids(), TOK.pad_id)  # pi_ids written out: no call to pi_text
        logits = response_logits(model, ctx)  # (B, N, V), as PrivilegedTeacher scores
        assert logits.shape[:2] == ro.response.shape, "the teacher's logits must be (B, N, V) on the response positions"
        logq = torch.log_softmax(logits.float(), -1).gather(-1, ro.response.unsqueeze(-1)).squeeze(-1)
        for row, (prompt, pi) in enumerate(zip(prompts, pi_ids())):
            n = int(ro.response_mask[row].sum())
            seq = torch.tensor([prompt[:1] + pi + prompt[1:] + ro.response[row, :n].tolist()])
            manual = torch.log_softmax(model(seq[:, :-1]), -1).gather(-1, seq[:, 1:, None])[0, -n:, 0]
            assert torch.allclose(logq[row, :n], manual, atol=1e-5), (
                f"row {row}: log q(y_t | I, x, y_<t) differs from a forward pass over [bos] PI x y: position t of "
                f"the teacher's response logits must predict the student's y_t")


def test_privileged_information_never_reaches_the_students_rollout():
    prompts, ro = student_side()
    before = (ro.tokens.clone(), ro.valid.clone(), ro.prompt_len)
    with_privileged_context(ro, pi_ids("rule"), TOK.pad_id)
    assert ro.prompt_len == before[2] and torch.equal(ro.tokens, before[0]) and torch.equal(ro.valid, before[1]), (
        "PI leaked into the student's rollout: with_privileged_context must build a new Rollout and leave the "
        "student's tokens, valid and prompt_len as they were")
    assert not (ro.tokens == TOK.pi_id).any(), "PI leaked into the student's rollout: it holds a <|pi|> token"


# ----------------------------------------------------------------------------------------------
# lab rlvr: group_advantages, policy_gradient_loss, sft.make_batch (the cold start)


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    adv = group_advantages(rewards, eps=1e-6)
    assert tuple(adv.shape) == (3, 4) and adv.dtype == torch.float32, (
        f"group_advantages must return (n_groups, G) = (3, 4) in float32, got {tuple(adv.shape)} {adv.dtype}")
    assert torch.isfinite(adv).all(), (
        f"a group of equal rewards must get advantage exactly 0, not NaN: divide by std + eps, got {adv[1].tolist()}")
    centred_on_batch = rewards - rewards.mean()
    assert not torch.allclose(adv[1], centred_on_batch[1] / (rewards.std(unbiased=False) + 1e-6), atol=1e-4), (
        "the advantages are normalised over the whole batch: the mean and std are per group (one row of rewards "
        "per prompt), rewards.mean(1, keepdim=True) and rewards.std(1, unbiased=False, keepdim=True)")
    assert (adv[1] == 0).all(), (
        f"a group of equal rewards must get advantage exactly 0: (R - mean of its group) / (std + eps), "
        f"got {adv[1].tolist()}")
    std = math.sqrt(3) / 4  # group 0: mean 1/4, population std sqrt(3)/4
    expected = [(1 - 0.25) / (std + 1e-6)] + [-0.25 / (std + 1e-6)] * 3
    assert torch.allclose(adv[0], torch.tensor(expected), rtol=1e-5), (
        f"group [1, 0, 0, 0] must get (R - mean) / (std + eps) with the population std sqrt(3)/4 "
        f"(unbiased=False), i.e. {[round(e, 4) for e in expected]}, got {[round(a, 4) for a in adv[0].tolist()]}")


def test_policy_gradient_loss_is_per_token():
    logp = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, 0.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    adv = torch.tensor([1.0, 2.0])
    loss = policy_gradient_loss(logp, adv, mask)
    per_token = -(1.0 * (-10.0) + 2.0 * (-0.5)) / 5
    per_sequence = -((1.0 * (-10.0)) / 4 + (2.0 * (-0.5)) / 1) / 2
    assert loss.item() != pytest.approx(per_sequence), (
        "policy_gradient_loss normalises per sequence: it must be one mean over all response tokens of the batch, "
        "-sum A_i log pi / (number of response tokens)")
    assert loss.item() != pytest.approx(-per_token), (
        "policy_gradient_loss has the wrong sign: it is -A log pi, so that descending it raises log pi where A > 0")
    assert loss.item() == pytest.approx(per_token), (
        f"policy_gradient_loss = {loss.item():.4f}, expected -sum_i sum_t A_i log pi_it m_it / sum m = {per_token:.4f}")
    (grad,) = torch.autograd.grad(loss, logp)
    assert (grad[~mask] == 0).all(), "padding positions must get no gradient"
    empty = policy_gradient_loss(logp, adv, torch.zeros_like(mask))
    assert empty.item() == 0.0, "an all-masked batch must give a loss of 0, not NaN (the token count is at least 1)"


def test_sft_batch_targets_are_the_next_response_tokens():
    examples = [([1, 2, 3], [4, 5, 6]), ([7], [8, 9])]
    x, y = make_batch(examples, 0, "cpu")
    assert tuple(x.shape) == (2, 5) and tuple(y.shape) == (2, 5), (
        f"make_batch must return x, y of (B, L) = (2, 5), L = the longest prompt + response minus one, got "
        f"{tuple(x.shape)}, {tuple(y.shape)}")
    assert x.tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0]], (
        f"x must hold prompt + response without its last token, right-padded with pad_id, got {x.tolist()}")
    assert y[0, :2].tolist() == [-1, -1] and y[1, 2:].tolist() == [-1, -1, -1], (
        f"the prompt is context only and padding is nothing: their targets must be -1, got {y.tolist()}")
    assert y.tolist() == [[-1, -1, 4, 5, 6], [8, 9, -1, -1, -1]], (
        f"the target at position t must be the token after x[t], on response tokens only: expected "
        f"[[-1, -1, 4, 5, 6], [8, 9, -1, -1, -1]], got {y.tolist()} (an off-by-one shift?)")


# ----------------------------------------------------------------------------------------------
# lab audit: per_sample_grads, expectation, token_divergence, follows (toy/audit.py)
# (only objectives that no other lab writes: full_reverse_kl and the field's k1/k2/k3)


def audit_problem(coupling=1.0):
    from toy.audit import AuditConfig, problem
    return problem(AuditConfig(vocab=4, horizon=3, k=2, coupling=coupling, plots=False))


def sequence_grad(pb, objective, n: int, shifted: str | None = None) -> torch.Tensor:
    """grad L(y_n) of sequence n alone, one shared theta: the loss summed over its positions, (P,).
    shifted, a language model's shift that the registry does not make: "roll" (the objective told
    that tokens[:, t+1] was sampled at t) or "cut" (the logits at t scored against tokens[:, t+1])."""
    theta = pb.theta.detach().clone().requires_grad_()
    y = pb.seqs[n:n + 1]
    student, teacher, tokens = pb.student.logits(theta, y), pb.teacher.logits(pb.phi, y), y
    if shifted == "roll":
        tokens = y.roll(-1, 1)
    elif shifted == "cut":
        student, teacher, tokens = student[:, :-1], teacher[:, :-1], y[:, 1:]
    loss, _ = objective(student, teacher, tokens, torch.ones_like(tokens, dtype=torch.bool))
    return torch.autograd.grad(loss * tokens.shape[1], theta)[0]


def multiple_of(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """c where a = c b (to rounding), else None."""
    c = (a @ b / (b @ b)).item()
    return c if torch.allclose(a, c * b, rtol=1e-9, atol=1e-12) else None


def audit_per_sample_grads(pb, objective) -> torch.Tensor:
    """The student's per_sample_grads(pb, objective, {}), autograd's 'not used in the graph' explained."""
    from toy.audit import per_sample_grads
    try:
        return per_sample_grads(pb, objective, {})
    except RuntimeError as e:
        if "not have been used in the graph" not in str(e):
            raise
        pytest.fail("per_sample_grads differentiated a tensor the loss was not computed from (autograd: not used in "
                    "the graph): compute student_logits = pb.student.logits(theta_rows, pb.seqs) from theta_rows, "
                    "the one private copy of theta per sequence that you differentiate")


def test_audit_per_sample_grads_are_the_gradients_of_each_sequence_alone():
    pb = audit_problem()
    N, T = pb.seqs.shape
    grads = audit_per_sample_grads(pb, OBJECTIVES["kl_k2"])
    assert tuple(grads.shape) == (N, pb.theta.numel()), (
        f"per_sample_grads must return (N, P) = ({N}, {pb.theta.numel()}), one gradient per sequence, got "
        f"{tuple(grads.shape)}")
    assert grads.dtype == torch.float64, f"per_sample_grads returned {grads.dtype}: the exact toy stays in float64"
    assert not torch.allclose(grads, grads[:1].expand(N, -1)), (
        "every row of per_sample_grads is the same vector, the gradient of the whole batch through one shared "
        "theta: use one private copy of theta per sequence (theta_rows (N, P)), so that row n only sees sequence n")
    slips = {-1.0: "the sign is flipped: row n is grad L(y_n), the gradient of the loss itself (not of -loss)",
             1 / (N * T): "per_sample_grads returned grad L(y) / (N T): the objective's loss is a per-token mean over "
                          "the whole batch; multiply the per-token mean by N*T to get each sequence's sum over its "
                          "positions",
             1 / T: "per_sample_grads returned grad L(y) / T: the per-token mean was multiplied by N only; it is a "
                    "mean over the N*T positions (N sequences of T tokens): multiply by N*T",
             1 / N: "per_sample_grads returned grad L(y) / N: the per-token mean was multiplied by T only; it is a "
                    "mean over the N*T positions (N sequences of T tokens): multiply by N*T"}
    for n in (0, 17, N - 1):  # sequence n alone, with one shared theta: the loss summed over its T positions
        alone = sequence_grad(pb, OBJECTIVES["kl_k2"], n)
        if torch.allclose(grads[n], alone, atol=1e-12):
            continue
        c = multiple_of(grads[n], alone)  # what went wrong: the likely slips first
        slip = next((why for k, why in slips.items() if c is not None and math.isclose(c, k, rel_tol=1e-6)), None)
        assert slip is None, slip
        assert c is None, (f"row {n} of per_sample_grads is {c:.6g} times grad L(y_{n}): multiply the per-token mean "
                           f"by N*T = {N * T}, and by nothing else")
        for shift in ("roll", "cut"):
            assert multiple_of(grads[n], sequence_grad(pb, OBJECTIVES["kl_k2"], n, shift)) is None, (
                "the objective was given the tokens shifted by one: the registry's tokens are unshifted, the logits "
                "at position t score tokens[:, t] (the toy's logits(theta, seqs) are already aligned): pass pb.seqs "
                "and the logits as they are")
        raise AssertionError(
            f"row {n} of per_sample_grads is not the gradient of L(y_{n}) computed on that sequence alone, nor a sign, "
            f"scale or shift slip of it: call objective(student_logits, teacher_logits, pb.seqs, mask) as the registry "
            f"does, student_logits from theta_rows, one private copy of theta per sequence")


def constant_objective(student_logits, teacher_logits, tokens, mask, **options):
    """A loss that never reads the student: it has no graph at all."""
    return ((student_logits.detach() - teacher_logits).pow(2).sum(-1) * mask).mean(), {}


def test_audit_per_sample_grads_of_a_loss_without_a_graph_are_zero():
    from toy.audit import per_sample_grads
    pb = audit_problem()
    try:
        grads = per_sample_grads(pb, constant_objective, {})
    except NotImplementedError:
        raise
    except RuntimeError as e:
        pytest.fail(f"per_sample_grads raised on a loss that does not depend on theta ({str(e).splitlines()[0]}): such a "
                    f"loss has no graph (loss.requires_grad is False) and torch.autograd.grad raises on it, allow_unused "
                    f"or not; check loss.requires_grad first and return zeros (N, P)")
    assert tuple(grads.shape) == (pb.seqs.shape[0], pb.theta.numel()) and not grads.any(), (
        "a loss that does not depend on theta has per-sample gradients of zeros (N, P): the audit flags it constant "
        "in theta")


def test_audit_expectation_is_the_pi_weighted_mean_and_trace_covariance():
    from toy.audit import expectation
    grads, weight = randn(5, 3, seed=0), torch.softmax(randn(5, seed=1), 0)
    g, trace_cov = expectation(grads, weight)
    expected = sum(weight[n] * grads[n] for n in range(5))
    assert not torch.allclose(g, grads.mean(0), atol=1e-9), (
        "expectation gave the plain mean over sequences: g_L = sum_y pi(y) grad L(y), weighted by pi(y)")
    assert torch.allclose(g, expected, atol=1e-12), "g_L must be sum_y pi(y) grad L(y)"
    variance = sum(weight[n] * (grads[n] - expected).pow(2).sum() for n in range(5)).item()
    uncentred = sum(weight[n] * grads[n].pow(2).sum() for n in range(5)).item()
    assert trace_cov != pytest.approx(uncentred, rel=1e-10), (
        f"tr Cov = {trace_cov:.6f} is sum_y pi(y) ||grad L(y)||^2, not centred: subtract g_L first, "
        f"sum_y pi(y) ||grad L(y) - g_L||^2 = {variance:.6f}")
    assert isinstance(trace_cov, float) and trace_cov == pytest.approx(variance, rel=1e-10), (
        f"tr Cov must be sum_y pi(y) ||grad L(y) - g_L||^2 = {variance:.6f} (a python float), got {trace_cov!r}")


def token_kl(pb, theta: torch.Tensor, forward: bool) -> torch.Tensor:
    """sum_y pi(y) sum_t KL at c_t, pi(y) held fixed: what token_divergence must give. Scalar."""
    logp = torch.log_softmax(pb.student.logits(theta, pb.seqs), -1)  # (N, T, V)
    logq = torch.log_softmax(pb.teacher.logits(pb.phi, pb.seqs), -1).detach()
    a, b = (logq, logp) if forward else (logp, logq)
    return pb.weight.detach() @ (a.exp() * (a - b)).sum(-1).sum(-1)


def token_kl_grad(pb, forward: bool) -> torch.Tensor:
    x = pb.theta.detach().clone().requires_grad_()
    return torch.autograd.grad(token_kl(pb, x, forward), x)[0]


def test_audit_token_divergences_are_the_reverse_and_forward_kl_at_visited_prefixes():
    from toy.audit import token_divergence
    pb = audit_problem()
    reverse, forward = token_kl(pb, pb.theta, False).item(), token_kl(pb, pb.theta, True).item()
    got_reverse = token_divergence(pb, pb.theta, forward=False).item()
    got_forward = token_divergence(pb, pb.theta, forward=True).item()
    assert not (got_reverse == pytest.approx(forward) and got_forward == pytest.approx(reverse)), (
        "token_divergence has the directions swapped: forward=False is the reverse KL(pi || q) = sum_v pi "
        "(log pi - log q), forward=True the forward KL(q || pi) = sum_v q (log q - log pi)")
    assert got_reverse == pytest.approx(reverse, rel=1e-10) and got_forward == pytest.approx(forward, rel=1e-10), (
        f"token_divergence must be sum_y pi(y) sum_t KL at c_t: reverse {reverse:.6f}, forward {forward:.6f}; got "
        f"{got_reverse:.6f} and {got_forward:.6f}")
    theta = pb.theta.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(token_divergence(pb, theta, forward=False), theta)
    assert torch.allclose(grad, token_kl_grad(pb, False), atol=1e-12), (
        "the gradient of token_divergence must hold the weights pi(y) fixed (the prefixes' distribution) and "
        "differentiate only the per-prefix distributions pi(.|c_t)")


def test_audit_follows_names_the_target_an_estimator_follows():
    from toy.audit import follows
    goals = {"J": randn(6, seed=0), "K": randn(6, seed=1), "F": randn(6, seed=2)}
    verdict, cos, err = follows(goals["F"].clone(), goals)
    assert verdict == "F exactly", f"follows(grad F) must say 'F exactly', got {verdict!r}"
    assert cos["F"] == pytest.approx(1.0) and err["F"] == pytest.approx(0.0, abs=1e-12)
    assert err["K"] == pytest.approx(((goals["F"] - goals["K"]).norm() / goals["K"].norm()).item(), rel=1e-10), (
        "err[X] must be the relative error ||g - grad X|| / ||grad X||")
    verdict, _, _ = follows(2.0 * goals["K"], goals)
    assert verdict != "K exactly", (
        "follows(2 grad K) said 'K exactly': twice the gradient has the right direction (cosine 1, '~K') but a "
        "relative error of 1, so it is not 'K exactly'; 'exactly' is decided by the relative error")
    e = torch.eye(6, dtype=torch.float64)  # g = 3 grad K: cosine 1 to K, but nearer to grad J in relative error
    verdict, cos, err = follows(3.0 * e[0], {"J": 3.0 * e[0] + 1.5 * e[1], "K": e[0], "F": e[2]})
    assert verdict == "~K", (
        f"follows(3 grad K) said {verdict!r}, expected '~K': its cosine to grad K is 1, the largest (to grad J "
        f"{cos['J']:.2f}), though its relative error to grad J is the smaller ({err['J']:.2f} vs {err['K']:.2f}); "
        f"'~X' names the target of largest cosine, not of smallest relative error")
    orthogonal = torch.linalg.svd(torch.stack(list(goals.values()))).Vh[-1]  # orthogonal to all three
    verdict, cos, _ = follows(orthogonal, goals)
    assert verdict == "none" and max(abs(c) for c in cos.values()) < 1e-10, (
        f"a gradient orthogonal to every target follows none of them, got {verdict!r}")
    tied = {"J": goals["J"], "K": goals["J"] * (1 + 1e-12), "F": goals["F"]}  # grad J = grad K, as at coupling 0
    for g, expected in ((goals["J"].clone(), "J = K exactly"), (2.0 * goals["J"], "~J = K")):
        verdict, _, _ = follows(g, tied)
        assert verdict == expected, (
            f"follows said {verdict!r} where grad J and grad K are the same vector (to rounding, as at coupling 0): "
            f"a tie, {expected!r} (the coinciding targets in the order of goals, joined by ' = '); naming one of "
            f"them lets rounding decide")


def mystery_estimator(student_logits, teacher_logits, tokens, mask, **options):
    """An estimator handed over without its maths: importance-weighted cross-entropy on y_t."""
    logp = torch.log_softmax(student_logits, -1).gather(-1, tokens[..., None])[..., 0]  # (B, T)
    logq = torch.log_softmax(teacher_logits, -1).gather(-1, tokens[..., None])[..., 0]
    per_token = -(logq - logp).detach().exp() * logp  # -sg(q/pi) log pi
    return (per_token * mask).sum() / mask.sum(), {}


def test_audit_finds_what_an_unknown_estimator_follows():
    """The three pieces together; where the verdict is wrong, the piece that made it so is named."""
    from toy.audit import expectation, follows, per_sample_grads, targets
    pb = audit_problem()
    grads = audit_per_sample_grads(pb, mystery_estimator)
    reference = torch.stack([sequence_grad(pb, mystery_estimator, n) for n in range(pb.seqs.shape[0])])  # (N, P)
    assert grads.shape == reference.shape and torch.allclose(grads, reference, atol=1e-12), (
        "per_sample_grads is wrong on the unknown estimator: fix task enumerate first (its failure names the mistake)")
    g, trace_cov = expectation(grads, pb.weight)
    assert torch.allclose(g, pb.weight @ reference, atol=1e-12) and trace_cov > 0, (
        "expectation is wrong: fix task enumerate first (its failure names the mistake)")
    goals = targets(pb)
    for t, forward in (("K", False), ("F", True)):
        assert torch.allclose(goals[t], token_kl_grad(pb, forward), atol=1e-12), (
            f"targets(pb)['{t}'] is not grad {t}_tok: token_divergence is wrong; fix task targets first")
    verdict, _, err = follows(g, goals)
    assert verdict == "F exactly", (
        f"the unknown estimator -sg(q/pi) log pi follows the forward KL exactly (E_pi[(q/pi) s] = sum_v q grad "
        f"log pi; relative error {err['F']:.1e} here), but follows says {verdict!r}: fix task follows first")
    g3, _ = expectation(per_sample_grads(pb, OBJECTIVES["kl_k3"], {}), pb.weight)
    assert follows(g3, goals)[0] == "F exactly", "kl_k3 follows the forward KL exactly: your audit says otherwise"
    g2, _ = expectation(per_sample_grads(pb, OBJECTIVES["kl_k2"], {}), pb.weight)
    assert follows(g2, goals)[0] == "K exactly", "kl_k2 follows the token-level reverse KL exactly"


# ----------------------------------------------------------------------------------------------
# lab on_policy: flops.forward_flops, FlopCount.add, opd_step_flops (mixed_batch: tests/test_mixed_batch.py)


def test_forward_flops_counts_each_term():
    """F(T, h) term by term on L = 2, C = 4, V = 7: the head from h, the attention as F's part
    quadratic in T, the projections as the rest."""
    from nanoopd.flops import forward_flops
    c = GPTConfig(vocab_size=7, block_size=16, n_layer=2, n_head=1, n_embd=4)
    L, C, V = 2, 4, 7
    F = lambda T, h: forward_flops(c, T, h)
    head = F(5, 2) - F(5, 0)
    assert head == 2 * 2 * C * V, (
        f"F(5, 2) - F(5, 0) = {head}, expected 2 positions x 2 C V = {4 * C * V}: the tied LM head costs 2 C V "
        f"per position where its logits are read, h positions only (the response's), not every token")
    quadratic = (F(3, 0) - 2 * F(2, 0) + F(1, 0)) / 2  # the coefficient of T^2
    assert quadratic != 4 * L * C, (
        f"the attention grows as {quadratic:g} T^2 = 4 L C T^2: every token attends to all T keys; attention is "
        f"causal, token i attends to its i keys, sum_i i = T (T + 1) / 2 pairs, 4 C FLOPs a layer and pair: 2 L C T (T + 1)")
    assert quadratic == 2 * L * C, (
        f"the attention's T^2 coefficient is {quadratic:g}, expected 2 L C = {2 * L * C}: 4 C FLOPs per layer and "
        f"attended key (q.k and the weighted sum of v, 2 C each), token i attending to its i keys: 2 L C T (T + 1)")
    linear = F(1, 0) - quadratic  # the coefficient of T: the projections and the attention's own 2 L C
    assert linear == 24 * L * C * C + 2 * L * C, (
        f"F(1, 0) = {F(1, 0)}, expected 24 L C^2 + 4 L C = {24 * L * C * C + 4 * L * C}: per token and layer the "
        f"projections q, k, v, out (4 C^2 multiply-adds) and the MLP (8 C^2), 2 FLOPs a multiply-add, and a token "
        f"attending to itself")
    assert F(0, 0) == 0 and F(6, 3) == 6 * 24 * L * C * C + 2 * L * C * 6 * 7 + 3 * 2 * C * V


def test_opd_step_flops_charges_every_pass_once(monkeypatch):
    """The step's passes, each F replaced by a stand-in that tells the passes apart: this task's verdict
    does not hang on task count's F."""
    from nanoopd import flops
    from nanoopd.flops import opd_step_flops, pass_flops
    monkeypatch.setattr(flops, "forward_flops", lambda c, T, h: 1000.0 * c.n_embd + 10.0 * T + h)
    s = GPTConfig(vocab_size=7, block_size=32, n_layer=1, n_head=1, n_embd=4)
    t = GPTConfig(vocab_size=7, block_size=32, n_layer=2, n_head=1, n_embd=8)
    own, theirs = ([3, 4], [2, 5]), ([4], [3])  # (prompt lengths, response lengths) of the student's and teacher's rows
    every = ([3, 4, 4], [2, 5, 3])
    sample, score, train = pass_flops(s, *own), pass_flops(t, *every), 3 * pass_flops(s, *every)
    teacher_sampling = pass_flops(t, *theirs)
    compute, sampling = opd_step_flops(s, t, own, theirs, theirs)
    assert compute != sample + score + pass_flops(s, *every), (
        "training was counted as one pass: the backward costs two forwards (the gradients of the activations and "
        "of the weights), so training on a row is 3 F, a forward and a backward")
    assert compute != pass_flops(s, *every) + score + train, (
        "the student was charged for sampling the teacher's rows: it samples its own rows only (student_rows); "
        "the teacher's rows were sampled by the teacher, the step's second value")
    assert compute != sample + score + train + teacher_sampling, (
        "the teacher's sampling was counted in compute: it is the second value, teacher_sampling, so that the "
        "`given` column can leave it out (traces handed over)")
    assert compute == sample + score + train, (
        f"compute = {compute:g}, expected {sample + score + train:g}: the student samples its rows "
        f"({sample:g}), the teacher scores every row ({score:g}), the student trains on every row (3 F: {train:g})")
    assert sampling == teacher_sampling, (
        f"teacher_sampling = {sampling:g}, expected the teacher's pass over teacher_sampled ({teacher_sampling:g})")
    assert opd_step_flops(s, t, own, theirs, ((), ())) == (compute, 0.0), (
        "a pool's trace used again (teacher_sampled empty) costs no sampling, and the step's compute stays the same")
    assert opd_step_flops(s, t, own, theirs, theirs, scored=False) == (compute - score, sampling), (
        "scored=False (an objective that never reads the teacher, like sft): no teacher scoring, all else the same")
    assert opd_step_flops(s, t, every) == (pass_flops(s, *every) + score + train, 0.0), (
        "lmbda = 1: every row is the student's (teacher_rows and teacher_sampled empty by default)")


def test_flop_count_given_leaves_out_the_teachers_sampling():
    from nanoopd.flops import FlopCount
    count = FlopCount()
    assert count.add(10.0, 5.0) is count, "FlopCount.add returns the count itself (count.add(a).add(b))"
    count.add(1.0)
    assert count.given != count.charged, (
        f"given = charged = {count.given:g}: the `given` column counted the teacher's sampling; it leaves it out "
        f"(as if the teacher's traces had been handed over), `charged` counts it")
    assert (count.charged, count.given) == (16.0, 11.0), (
        f"after add(10, 5) and add(1): charged {count.charged:g}, given {count.given:g}; expected 16 (compute and "
        f"the teacher's sampling) and 11 (compute only)")

# ----------------------------------------------------------------------------------------------
# lab cross_tokenizer: cross_tokenizer.align, chunk_logratios, chunk_costs


def test_align_closes_a_group_only_where_both_tokenizations_end():
    from nanoopd.cross_tokenizer import align
    a, b = [b"3", b"4", b"7", b"1", b"+"], [b"347", b"1", b"+"]  # one digit a token; up to three
    groups = align(a, b)
    assert groups[-1][1:4:2] == (len(a), len(b)), (
        f"align({a}, {b}) = {groups}: the last group must end at both ends, ({len(a)}, {len(b)}); the groups "
        f"partition both sequences")
    assert groups == [(0, 3, 0, 1), (3, 4, 1, 2), (4, 5, 2, 3)], (
        f"align({a}, {b}) = {groups}, expected [(0, 3, 0, 1), (3, 4, 1, 2), (4, 5, 2, 3)]: advance the side whose "
        f"pieces end first (the student's 3, 4, 7 before the teacher's 347) and close a group each time both end at "
        f"the same byte, no sooner")
    a, b = [b"ab", b"c", b"de"], [b"a", b"bcd", b"e"]  # ends 2, 3, 5 against 1, 4, 5: only 5 is shared
    assert align(a, b) == [(0, 3, 0, 3)], (
        f"align({a}, {b}) = {align(a, b)}, expected one group [(0, 3, 0, 3)]: the two sides end together only at "
        f"byte 5; a group closes where both end at the same byte, not where either ends")


def test_chunk_logratios_are_the_students_minus_the_teachers_spread_over_the_students_pieces():
    from nanoopd.cross_tokenizer import chunk_logratios
    groups = [(0, 3, 0, 1), (3, 4, 1, 2)]  # "347" | "1": three student pieces, then one; one teacher piece each
    logp_s = torch.tensor([-1.0, -2.0, -3.0, -0.5], dtype=torch.float64)
    logp_t = torch.tensor([-4.0, -0.25], dtype=torch.float64)
    r, per = chunk_logratios(groups, logp_s, logp_t)
    assert r.tolist() != [2.0, 0.25], (
        "r = [2, 0.25]: the sign is swapped; r_c = L_S(c) - L_T(c), the student's chunk log-prob minus the "
        "teacher's, a cost like r_t = log pi - log q")
    assert r.tolist() == [-2.0, -0.25], (
        f"r = {r.tolist()}, expected [-2, -0.25]: L_S = -1 - 2 - 3 = -6 and L_T = -4 on the first chunk, "
        f"-0.5 and -0.25 on the second; r_c = L_S(c) - L_T(c)")
    assert per.tolist() == pytest.approx([-2 / 3] * 3 + [-0.25]), (
        f"per-piece = {per.tolist()}, expected [-2/3, -2/3, -2/3, -0.25]: r_c spread evenly over the student's "
        f"n_c pieces of the chunk (r_c / n_c each), so that they sum to r_c")


def test_chunk_costs_spread_a_chunk_or_place_it_after_the_chunk():
    from nanoopd.cross_tokenizer import Chunks, chunk_costs
    seg = torch.tensor([[0, 0, 1, 2]])  # chunks "34" (two student tokens), "+", "5"
    size = torch.tensor([[2.0, 2.0, 1.0, 1.0]], dtype=torch.float64)
    teacher_lp = torch.tensor([[-1.5, -1.5, -1.0, -0.1]], dtype=torch.float64)  # L_T(c) at each token of c
    chunks = Chunks(seg, size, teacher_lp, teacher_lp, None, None, None, None, None, None, 3)
    logp = torch.tensor([[-1.0, -2.0, -0.5, -0.25]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    spread = chunk_costs(logp, torch.zeros_like(logp), mask, chunks)  # r_c = -1.5, 0.5, -0.15
    assert spread.tolist()[0][:2] != [-1.5, -1.5], (
        "the first chunk's tokens cost -1.5 each: r_c is spread over its n_c tokens, r_c / n_c each, so that the "
        "chunk's costs sum to r_c")
    assert spread.tolist()[0] == pytest.approx([-0.75, -0.75, 0.5, -0.15]), (
        f"spread costs {spread.tolist()[0]}, expected [-0.75, -0.75, 0.5, -0.15]: r_c = L_S(c) - L_T(c) "
        f"(-3 + 1.5, -0.5 + 1, -0.25 + 0.1), over the n_c tokens of c")
    placed = chunk_costs(logp, torch.zeros_like(logp), mask, chunks, at_end=True)
    assert placed.tolist()[0] != pytest.approx([0.0, -1.5, 0.5, -0.15]), (
        "at_end placed each r_c on its chunk's last token: a split that looks ahead ('34' ends a token only "
        "when no digit follows) settles c one token later, so r_c goes on the token after c")
    assert placed.tolist()[0] == pytest.approx([0.0, 0.0, -1.5, 0.35]), (
        f"at_end costs {placed.tolist()[0]}, expected [0, 0, -1.5, 0.35]: each r_c on the token after its chunk, "
        f"the last chunk's on the last token (0.5 - 0.15)")
