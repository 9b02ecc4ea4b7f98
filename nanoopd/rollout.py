"""
Batched, KV-cached sampling from a GPT: the student's on-policy rollouts.

For a batch of prompts x (of different lengths, left-padded to a common length P) we draw
y_t ~ pi(. | c_t), c_t = (x, y_<t), one token per step for every row at once:

    step 0:  one forward pass over the prompts fills the KV cache     -> logits at c_1
    step t:  one forward pass over the single new token of each row   -> logits at c_{t+1}

The logits are turned into the sampling distribution by temperature (0 = greedy argmax), top-k
and top-p, and a token is drawn from it by inverting its CDF (nanoopd/sampling.py). A row stops at
its first <|eos|> (included in the response) or after max_new_tokens; later slots are padding.
Returned per token: pi(y_t | c_t) under the model itself (temperature 1, no truncation: the
quantity every OPD objective needs) and the log-prob under the distribution actually sampled from.
A seeded `torch.Generator` makes a rollout repeatable.

Speed: a decoding step is a few dozen small kernels, so the loop keeps its own work per step to a
handful of them (a token: one uniform per row, a cumulative sum and a comparison). After the
prompt's prefill every token is one static step (`Decoder.step`: fixed shapes, its state on the
device, no Python state read), which CUDA replays as a graph; padding of finished rows is applied
once at the end; the only host sync per token is the check that some row is still generating
(every CUDA_STOP_EVERY tokens on CUDA).
"""

import contextlib
from dataclasses import dataclass

import torch

from nanoopd.config import ConfigError
from nanoopd.device import autocast
from nanoopd.model import GPT, KVCache
from nanoopd.sampling import filter_logits, invert_cdf, sample  # noqa: F401 (invert_cdf: rollout's name in the docs)


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
        kept = torch.where(self.response_mask, self.response, -1).tolist()  # one transfer; ids are >= 0
        return [[t for t in row if t >= 0] for row in kept]


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged prompts -> tokens (B, P) and valid (B, P), padding on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start it with <|bos|>)")
    P = max(len(p) for p in prompts)
    tokens = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], dtype=torch.long)  # (B, P)
    valid = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts])  # (B, P)
    return tokens.to(device), valid.to(device)


def check_sampling_args(temperature: float, top_k: int, top_p: float, max_new_tokens: int):
    if temperature < 0:
        raise ConfigError("temperature", f"must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ConfigError("top_k", f"must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError("top_p", f"must lie in (0, 1] (1 = off), got {top_p}")
    if max_new_tokens < 1:
        raise ConfigError("max_new_tokens", f"must be >= 1, got {max_new_tokens}")


class Decoder:
    """The token loop of one rollout, with all its state in fixed-shape tensors on the device.

    Buffers over the L = P + N slots of prompt and response: tokens (B, L), valid (B, L) (the
    prompt's padding; True on every response slot, read only when recomputing), logprobs and
    sampler_logprobs (B, L), the pre-drawn uniforms u (L, B), alive (B,) (no EOS drawn yet), last
    (B, 1) (the token drawn last), and the KV cache, whose slot (1,) says where the next token goes.
    draw(logits) draws the token of slot s = cache.slot from logits (B, V) straight into last and
    writes it to tokens; step() is GPT.decode_step over last (slot s), then draw at slot s + 1.
    step reads no Python state and keeps every shape, so that `torch.compile(step, fullgraph=True,
    dynamic=False)` traces it once for all N tokens and a CUDA graph can replay it
    (tests/test_static_decode.py).

    A row keeps decoding after its EOS (its later tokens are thrown away at the end): masking it
    would cost a few operators a token and change nothing kept.
    """

    def __init__(self, model: GPT, cache: KVCache | None, tokens: torch.Tensor, valid: torch.Tensor, prompt_len: int,
                 u: torch.Tensor | None, eos_id: int, temperature: float, top_k: int, top_p: float,
                 generator_state: torch.Tensor | None = None):
        B, L = tokens.shape
        self.model, self.cache, self.tokens, self.valid, self.prompt_len = model, cache, tokens, valid, prompt_len
        self.u, self.generator_state = u, generator_state  # the generator's state before u was drawn
        self.eos_id, self.temperature, self.top_k, self.top_p = eos_id, temperature, top_k, top_p
        # temperature 1 without truncation samples from pi itself: its log-probs need no second pass
        self.plain = temperature == 1.0 and not (top_k and top_k < model.config.vocab_size) and top_p == 1.0
        self.slot = cache.slot if cache is not None else torch.zeros(1, dtype=torch.long, device=tokens.device)
        self.logprobs = torch.zeros(B, L, device=tokens.device)  # (B, L) log pi(y|c), at the response slots
        self.sampler_logprobs = torch.zeros(B, L, device=tokens.device)  # (B, L) under the sampling distribution
        self.alive = torch.ones(B, dtype=torch.bool, device=tokens.device)  # (B,) no EOS drawn yet
        self.last = tokens[:, prompt_len - 1:prompt_len].clone()  # (B, 1) the token drawn last, the step's input

    def draw(self, logits: torch.Tensor, u: torch.Tensor | None = None) -> None:
        """Draw the token of slot s = self.slot from logits (B, V) with the uniforms u (B, 1) of that
        slot (None: read from self.u); record it and its log-probs."""
        s, y = self.slot, self.last  # (1,), (B, 1)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
        if self.temperature == 0:
            torch.argmax(logp, -1, keepdim=True, out=y)  # (B, 1)
        else:
            slogp = logp if self.plain else torch.log_softmax(
                filter_logits(logits, self.temperature, self.top_k, self.top_p), dim=-1)  # (B, V)
            u = self.u.index_select(0, s).view(-1, 1) if u is None else u  # (B, 1)
            sample(slogp.exp(), u=u, out=y)  # (B, 1)
            if not self.plain:
                self.sampler_logprobs.index_copy_(1, s, slogp.gather(1, y))
        self.logprobs.index_copy_(1, s, logp.gather(1, y))
        self.tokens.index_copy_(1, s, y)
        self.alive.logical_and_(y.view(-1) != self.eos_id)

    def step(self) -> None:
        """The static decoding step: the token of slot s through the model, then draw slot s + 1 with
        the uniforms that the step's gather fetched along with the slot's inputs (start_rollout
        hands u[s + 1] to the model as slot s's extra value)."""
        logits, u_next = self.model.decode_step(self.last, self.cache)  # (B, V), (B, 1) or (B, 0)
        self.draw(logits, u_next if self.u is not None else None)


def cuda_graph(step, amp: torch.dtype | None):
    """Capture `step` (a function of device tensors only) as a CUDA graph; returns its replay.
    The capture runs one real step first, on a side stream (the warm-up CUDA graphs need), then
    records one step without running it. Under autocast the weight casts are recorded as well
    (cache_enabled=False: autocast's cache of cast weights and a graph's memory do not mix). A
    graph lives for one rollout; the next rollout, after the optimizer step, captures its own."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # a real step: the warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    cast = torch.autocast("cuda", dtype=amp, cache_enabled=False) if amp else contextlib.nullcontext()
    with cast, torch.cuda.graph(graph):
        step()  # recorded, not run
    return graph.replay


# a stop check every this many tokens on CUDA (a host sync each); every token elsewhere
CUDA_STOP_EVERY = 8


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in here and now (None when it is off): that of the cached keys."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def start_rollout(model: GPT, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None, use_cache: bool = True) -> "Decoder":
    """Everything before the token loop: left-pad the prompts into the (B, P + N) token buffer, draw
    the N uniforms of every row, run the prompt's prefill (eagerly) and draw the first token.
    Returns the Decoder whose step() draws each next token (call it under autocast, model in eval)."""
    device = next(model.parameters()).device
    prompt, prompt_valid = left_pad(prompts, pad_id, device)  # (B, P), (B, P)
    B, P = prompt.shape
    if P + max_new_tokens > model.config.block_size:
        raise ValueError(
            f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"block_size={model.config.block_size}; lower max_new_tokens")
    N, L = max_new_tokens, P + max_new_tokens
    tokens = torch.cat([prompt, torch.full((B, N), pad_id, dtype=torch.long, device=device)], 1)  # (B, L)
    valid = torch.cat([prompt_valid, torch.ones(B, N, dtype=torch.bool, device=device)], 1)  # (B, L)
    u, state = None, None
    if temperature != 0:
        if generator is not None:
            state = generator.get_state()
        u = torch.zeros(L, B, device=device)  # (L, B) one uniform per row and response slot
        u[P:] = 1.0 - torch.rand(N, B, device=device, generator=generator)  # in (0, 1]
    cache = None
    if use_cache:
        cache = KVCache(model.config, B, L, device).allocate(autocast_dtype(device) or torch.float32)
        logits = model(prompt, prompt_valid, cache, n_last=1)[:, -1]  # (B, V)
        # the step at slot s draws the token of slot s + 1: it fetches u[s + 1] with slot s's inputs
        u_next = None if u is None else torch.cat([u[1:], u[:1]])[:, :, None]  # (L, B, 1) (the last row is never read)
        model.start_decoding(cache, u_next)
    else:
        logits = model(prompt, prompt_valid, n_last=1)[:, -1]  # (B, V)
    dec = Decoder(model, cache, tokens, valid, P, u, eos_id, temperature, top_k, top_p, state)
    dec.slot.fill_(P)
    dec.draw(logits)
    return dec


@torch.no_grad()
def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None, use_cache: bool = True,
             cuda_graph_replay: bool = True) -> Rollout:
    """Sample a response for every prompt (token id lists). use_cache=False recomputes the whole
    prefix at every step (same result, far slower; kept for tests and the benchmark).

    The prompt's prefill runs eagerly, then every token is Decoder.step. On CUDA (with
    cuda_graph_replay, the default) the step is captured once per rollout and replayed as a CUDA
    graph, and the stop check (has every row drawn its EOS?) runs every CUDA_STOP_EVERY tokens
    instead of every token: the extra tokens are thrown away, so the rollout is the same.

    Randomness: the N uniforms of every row are drawn up front from `generator`, in the order the
    token loop uses them; when the rollout stops after n < N tokens the generator is put back and
    advanced by the n x B uniforms used, so that it ends where drawing one (B, 1) batch per token
    would leave it (on the CPU the draws are the same numbers)."""
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with autocast(device):  # entered once: its cache of cast weights lives for the whole rollout
        dec = start_rollout(model, prompts, max_new_tokens, eos_id, pad_id, temperature, top_k, top_p,
                            generator, use_cache)
        P, N, B = dec.prompt_len, max_new_tokens, dec.tokens.shape[0]
        step = dec.step
        graph = use_cache and cuda_graph_replay and device.type == "cuda" and N > 2
        every = CUDA_STOP_EVERY if device.type == "cuda" else 1
        for t in range(1, N):
            if t % every == 1 % every and not bool(dec.alive.any()):
                break
            if not use_cache:
                logits = model(dec.tokens[:, :P + t], dec.valid[:, :P + t], n_last=1)[:, -1]  # (B, V)
                dec.slot.add_(1)
                dec.draw(logits)
            elif graph and t == 2:  # t = 1 ran eagerly; it warms up the kernels before the capture
                step = cuda_graph(dec.step, autocast_dtype(device))  # the capture's warm-up is step t = 2 itself
            else:
                step()
    model.train(was_training)

    prompt, prompt_valid, state = dec.tokens[:, :P], dec.valid[:, :P], dec.generator_state
    response = dec.tokens[:, P:]  # (B, N)
    drawn_eos = (response == eos_id).to(torch.int32)  # (B, N)
    response_mask = drawn_eos.cumsum(1, dtype=torch.int32) == drawn_eos  # (B, N) no EOS before this slot
    logprobs = dec.logprobs[:, P:].masked_fill(~response_mask, 0.0)  # (B, N) slots after a row's EOS: 0
    n, bad = torch.stack([response_mask.any(0).sum(), (~torch.isfinite(logprobs)).any()]).tolist()  # one sync
    if bad:
        raise FloatingPointError("the model's log-probs became non-finite (NaN/inf) while sampling: its weights "
                                 "have diverged; lower the learning rate or resume from an earlier checkpoint")
    if state is not None and n < N:  # put the generator where n per-token draws would leave it
        generator.set_state(state)
        torch.rand(n, B, device=device, generator=generator)
    response_mask = response_mask[:, :n]  # (B, n)
    response = response[:, :n].masked_fill(~response_mask, pad_id)  # (B, n)
    logprobs = logprobs[:, :n]  # (B, n)
    if dec.plain:
        sampler_logprobs = logprobs.clone()
    else:
        sampler_logprobs = dec.sampler_logprobs[:, P:P + n].masked_fill(~response_mask, 0.0)  # (B, n)
    return Rollout(tokens=torch.cat([prompt, response], 1), valid=torch.cat([prompt_valid, response_mask], 1),
                   prompt_len=P, response=response, response_mask=response_mask,
                   logprobs=logprobs, sampler_logprobs=sampler_logprobs)


def response_logits(model: GPT, rollout: Rollout) -> torch.Tensor:
    """Logits (B, N, V) of `model` at the positions that predict each response token, in one
    full forward pass over prompt + response (used to score rollouts: teacher and student)."""
    N = rollout.response.shape[1]
    return model(rollout.tokens[:, :-1], rollout.valid[:, :-1], n_last=N)  # (B, N, V): the head on those only
