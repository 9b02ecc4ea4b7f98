"""
Batched, KV-cached sampling from a GPT: the student's on-policy rollouts.

For a batch of prompts x (of different lengths, left-padded to a common length P) we draw
y_t ~ pi(. | c_t), c_t = (x, y_<t), one token per step for every row at once:

    step 0:  one forward pass over the prompts fills the KV cache     -> logits at c_1
    step t:  one forward pass over the single new token of each row   -> logits at c_{t+1}

The logits are turned into the sampling distribution by temperature (0 = greedy argmax), top-k
(keep the k most likely) and top-p (keep the smallest set of most likely tokens whose mass >= p).
A row stops at its first <|eos|> (included in the response) or after max_new_tokens; later slots
are padding. Returned per token: pi(y_t | c_t) under the model itself (temperature 1, no
truncation: the quantity every OPD objective needs) and the log-prob under the distribution actually
sampled from. A seeded `torch.Generator` makes a rollout repeatable.

Speed: a decoding step is a few dozen small kernels, so the loop keeps its own work per step to a
handful of them. A token is drawn by inverting the CDF (`sample`: one uniform per row, a cumulative
sum and a comparison) rather than by torch.multinomial, which draws one exponential per vocabulary
entry and took a quarter of a CPU rollout. Padding of finished rows in the log-probs is applied once
at the end; the only host sync per step is the check that some row is still generating.
"""

from dataclasses import dataclass

import torch

from nanoopd.config import ConfigError
from nanoopd.device import autocast
from nanoopd.model import GPT, KVCache


@dataclass
class Rollout:
    tokens: torch.Tensor            # (B, P+N) left-padded prompts followed by the responses
    valid: torch.Tensor             # (B, P+N) bool: real tokens (prompt, and response up to EOS)
    prompt_len: int                 # P, the padded prompt length
    response: torch.Tensor          # (B, N) generated ids, pad after the first EOS
    response_mask: torch.Tensor     # (B, N) bool: generated tokens up to and including EOS
    logprobs: torch.Tensor          # (B, N) log pi(y_t | c_t) of the model, 0 where masked
    sampler_logprobs: torch.Tensor  # (B, N) log-prob under the sampling distribution, 0 where masked

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)  # (B,)

    def rows(self) -> list[list[int]]:
        """The generated ids of every row, without padding (<|eos|> kept where it was sampled)."""
        return [[t for t, k in zip(row, keep) if k]
                for row, keep in zip(self.response.tolist(), self.response_mask.tolist())]


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged prompts -> tokens (B, P) and valid (B, P), padding on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start it with <|bos|>)")
    P = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[i, P - len(p):] = True
    return tokens.to(device), valid.to(device)


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """Logits (B, V) of the sampling distribution: scaled by 1/temperature, then tokens outside
    the top-k and outside the top-p nucleus set to -inf. temperature must be > 0 here."""
    logits = logits.float() / temperature  # (B, V)
    V = logits.shape[-1]
    if top_k and top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)  # (B, V)
        mass_before = probs.cumsum(-1) - probs  # (B, V) mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p  # keep the smallest prefix whose mass reaches p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (B, V)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs (B, V) (non-negative, each row with positive total mass Z; it need
    not be exactly 1) by inverting the CDF: with u ~ U(0, 1] and F_v = sum_{w <= v} p_w,

        y = min {v : F_v >= u Z} = #{v : F_v < u Z},    so P(y = v) = (F_v - F_{v-1}) / Z = p_v / Z.

    A token of zero mass is never drawn (F_v = F_{v-1} < u Z means v - 1 is not yet reached, and
    F_0 = 0 < u Z), and u = 1 draws the last token of positive mass. One uniform per row.

    Exact up to float32: u lies on a grid of 2^-24, so a token of mass below about 6e-8 Z is drawn
    with a quantised probability, and the zero-mass guarantee needs a cumulative sum that adds in
    order (the CPU's does; a GPU scan may group the additions and leave a zero-mass token a sliver
    of rounding, about 1e-7 of the mass)."""
    cdf = probs.cumsum(-1)  # (B, V)
    u = 1.0 - torch.rand(probs.shape[0], 1, device=probs.device, generator=generator)  # (B, 1) in (0, 1]
    return (cdf < u * cdf[:, -1:]).sum(-1)  # (B,)


def check_sampling_args(temperature: float, top_k: int, top_p: float, max_new_tokens: int):
    if temperature < 0:
        raise ConfigError("temperature", f"must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ConfigError("top_k", f"must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError("top_p", f"must lie in (0, 1] (1 = off), got {top_p}")
    if max_new_tokens < 1:
        raise ConfigError("max_new_tokens", f"must be >= 1, got {max_new_tokens}")


@torch.no_grad()
def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None, use_cache: bool = True) -> Rollout:
    """Sample a response for every prompt (token id lists). use_cache=False recomputes the whole
    prefix at every step (same result, far slower; kept for tests and the benchmark)."""
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tokens, valid = left_pad(prompts, pad_id, device)  # (B, P), (B, P)
    B, P = tokens.shape
    if P + max_new_tokens > model.config.block_size:
        raise ValueError(
            f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"block_size={model.config.block_size}; lower max_new_tokens")
    N = max_new_tokens
    cache = KVCache(model.config, B, P + N, device) if use_cache else None
    # preallocated: prompts, then the responses written one column per step
    tokens = torch.cat([tokens, torch.full((B, N), pad_id, dtype=torch.long, device=device)], 1)  # (B, P+N)
    valid = torch.cat([valid, torch.zeros(B, N, dtype=torch.bool, device=device)], 1)  # (B, P+N)
    logprobs = torch.zeros(B, N, device=device)  # (B, N)
    sampler_logprobs = torch.zeros(B, N, device=device)  # (B, N)
    alive = torch.ones(B, dtype=torch.bool, device=device)  # (B,) rows still generating
    # temperature 1 without truncation samples from pi itself: its log-probs need no second pass
    plain = temperature == 1.0 and not (top_k and top_k < model.config.vocab_size) and top_p == 1.0
    with autocast(device):
        logits = model(tokens[:, :P], valid[:, :P], cache)[:, -1]  # (B, V)
    for t in range(N):
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
        if temperature == 0:
            nxt = logp.argmax(-1)  # (B,)
        else:
            slogp = logp if plain else torch.log_softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
            nxt = sample(slogp.exp(), generator)  # (B,)
        logprobs[:, t] = logp.gather(1, nxt[:, None]).squeeze(1)
        if temperature != 0 and not plain:  # greedy: a point mass, 0; plain: the same as logprobs
            sampler_logprobs[:, t] = slogp.gather(1, nxt[:, None]).squeeze(1)
        tokens[:, P + t] = torch.where(alive, nxt, pad_id)
        valid[:, P + t] = alive
        alive &= nxt != eos_id
        if t == N - 1 or not bool(alive.any()):
            break
        with autocast(device):
            if use_cache:
                logits = model(tokens[:, P + t:P + t + 1], valid[:, P + t:P + t + 1], cache)[:, -1]  # (B, V)
            else:
                logits = model(tokens[:, :P + t + 1], valid[:, :P + t + 1])[:, -1]  # (B, V)
    model.train(was_training)
    n = t + 1  # response columns generated
    if not torch.isfinite(logprobs[:, :n]).all():
        raise FloatingPointError("the model's log-probs became non-finite (NaN/inf) while sampling: its weights "
                                 "have diverged; lower the learning rate or resume from an earlier checkpoint")
    done = ~valid[:, P:P + n]  # (B, n) slots after a row's EOS: their log-probs are defined as 0
    logprobs = logprobs[:, :n].masked_fill(done, 0.0)  # (B, n)
    sampler_logprobs = logprobs.clone() if plain else sampler_logprobs[:, :n].masked_fill(done, 0.0)  # (B, n)
    return Rollout(tokens=tokens[:, :P + n].contiguous(), valid=valid[:, :P + n].contiguous(), prompt_len=P,
                   response=tokens[:, P:P + n].contiguous(), response_mask=valid[:, P:P + n].contiguous(),
                   logprobs=logprobs, sampler_logprobs=sampler_logprobs)


def response_logits(model: GPT, rollout: Rollout) -> torch.Tensor:
    """Logits (B, N, V) of `model` at the positions that predict each response token, in one
    full forward pass over prompt + response (used to score rollouts: teacher and student)."""
    P = rollout.prompt_len
    logits = model(rollout.tokens[:, :-1], rollout.valid[:, :-1])  # (B, P+N-1, V)
    return logits[:, P - 1:]  # (B, N, V)
