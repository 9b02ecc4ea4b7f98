"""
A small GPT written from scratch: teacher and student are this same class with different configs.

    x_0 = wte[tokens] + wpe[positions]
    x_l = x_{l-1} + Attn(LN(x_{l-1}));  x_l = x_l + MLP(LN(x_l))        (pre-LayerNorm blocks)
    logits = LN(x_L) @ wte^T                                             (tied embeddings)

Attention is causal and uses `F.scaled_dot_product_attention`. Ragged batches are left-padded:
`valid` (B, T) marks real tokens; padded keys are never attended to and position ids count only
real tokens, so a left-padded row computes exactly what the same row would compute alone.

A `KVCache` stores every layer's keys and values so that decoding one new token costs one token's
forward pass instead of a pass over the whole prefix (rollout.py uses it). `GPT.decode_step` is that
one-token pass in a static form, the same shapes and no Python state at every token, so that a GPU
can replay it as a CUDA graph: it attends over the whole preallocated cache under an additive mask
(0 on real keys, -inf on padding and on slots not written yet). Its write position lives on the
device and moves on in place; the position embedding and mask row of every slot are laid out once
per rollout, so that a token fetches both with one gather.

Positions count real tokens with an int32 cumulative sum (MPS before macOS 13.3 has no int64 one).
On CUDA, masked attention takes the math kernel whenever a backward will follow (the
memory-efficient kernel's backward is not deterministic there), so that seeded CUDA runs repeat.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoopd.device import fp32_region


def deterministic_attention(device_type: str, masked: bool, grad: bool) -> bool:
    """Whether attention must take the math kernel: on CUDA, with a mask, when a backward follows.
    There the memory-efficient kernel would run, whose backward adds in a non-deterministic order.
    The math kernel's cost at these lengths is not measured (no GPU here)."""
    return device_type == "cuda" and masked and grad


def attention(q, k, v, mask, dropout_p: float):
    """scaled_dot_product_attention (B, H, T, hd), causal when mask is None, with the math kernel
    where deterministic_attention says so."""
    if deterministic_attention(q.device.type, mask is not None, torch.is_grad_enabled()):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p)


@dataclass
class GPTConfig:
    vocab_size: int = 261   # token ids the model can read and emit (the tokenizer's n_vocab)
    block_size: int = 256   # longest sequence (prompt + response) the model accepts
    n_layer: int = 4        # transformer blocks
    n_head: int = 4         # attention heads per block; n_embd must be divisible by it
    n_embd: int = 128       # width of the residual stream
    dropout: float = 0.0    # dropout on attention and residual branches (0 = off, right for tiny data)
    tokenizer: str = "bytes"  # the tokenizer it reads (nanoopd/tokenizer.py), so that no one pairs it with another

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"pick a width that is a multiple of the number of heads")
        if not isinstance(self.tokenizer, str):
            raise ValueError(f"GPTConfig.tokenizer must be a tokenizer's name, got {self.tokenizer!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must lie in [0, 1), got {self.dropout}")


class KVCache:
    """Keys and values of every layer for a batch of B sequences, pre-allocated to max_len.

    k, v: (n_layer, B, n_head, max_len, head_dim); valid: (B, max_len) real-token flags;
    next_pos: (B,) the position id the next real token of each row will get; length: tokens so far.

    The static decoding step (GPT.decode_step, after GPT.start_decoding) keeps its state on the
    device instead: slot (1,) the slot it writes next; step_inputs (max_len, B, C + max_len + E),
    per slot s the position embedding and the additive attention mask of the token written there
    (and E values of the caller's, see GPT.start_decoding); and k, v as the two halves of one
    buffer kv (n_layer, 2, B, n_head, max_len, head_dim), so that one copy stores both.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device):
        if max_len > config.block_size:
            raise ValueError(f"KVCache: max_len={max_len} exceeds block_size={config.block_size}")
        self.config, self.batch_size, self.max_len, self.device = config, batch_size, max_len, device
        self.k = self.v = None  # allocated on first write, in the dtype the forward pass produces
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, L)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.length = 0
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # (1,) static step: the slot it writes next
        self.kv = self.step_inputs = None  # set by allocate() / GPT.start_decoding()

    def allocate(self, dtype: torch.dtype):
        """Allocate k and v as views of one buffer kv, in `dtype` (what the forward pass produces)."""
        c = self.config
        self.kv = torch.zeros(c.n_layer, 2, self.batch_size, c.n_head, self.max_len, c.n_embd // c.n_head,
                              dtype=dtype, device=self.device)  # (n_layer, 2, B, H, L, hd)
        self.k, self.v = self.kv[:, 0], self.kv[:, 1]  # (n_layer, B, H, L, hd) each, views
        return self

    def write_slot(self, layer: int, kv: torch.Tensor):
        """Store kv (2, B, H, 1, hd) at `slot` of layer `layer`; return all keys and values (B, H, L, hd)."""
        self.kv[layer].index_copy_(3, self.slot, kv)
        return self.kv[layer, 0], self.kv[layer, 1]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H, T, hd) at [length, length+T) and return all keys/values so far."""
        # lab:kv_cache begin
        if self.k is None:
            c = self.config
            shape = (c.n_layer, self.batch_size, c.n_head, self.max_len, c.n_embd // c.n_head)
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(shape, dtype=v.dtype, device=v.device)
        T = k.shape[2]
        self.k[layer, :, :, self.length:self.length + T] = k
        self.v[layer, :, :, self.length:self.length + T] = v
        return self.k[layer, :, :, :self.length + T], self.v[layer, :, :, :self.length + T]  # (B, H, Tk, hd)
        # lab:kv_cache end


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x, mask=None, cache=None, layer=0, static=False):
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, H, hd)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd), a view (no copy)
        q, k, v = qkv.unbind(0)  # 3 x (B, H, T, hd)
        if static:
            k, v = cache.write_slot(layer, qkv[1:])  # (B, H, L, hd): the whole cache, under the slot's mask
        elif cache is not None:
            k, v = cache.write(layer, k, v)  # (B, H, Tk, hd)
        y = attention(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, H, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, cache=None, layer=0, static=False):
        x = x + self.attn(self.ln_1(x), mask, cache, layer, static)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of the residual projections (GPT-2)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / (2 * config.n_layer) ** 0.5)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, valid: torch.Tensor | None = None,
                cache: KVCache | None = None, n_last: int | None = None) -> torch.Tensor:
        """Logits (B, T, V) for every position of idx (B, T), or (B, n_last, V) for its last n_last
        positions only (the LM head runs only where logits are used).

        valid: (B, T) bool, False on left padding (None = all real). With a cache, idx holds only
        the new tokens; they are appended after the cached ones and attend to all of them.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}; "
                f"shorten the prompt / max_new_tokens or train a model with a larger block_size")
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KVCache holds {cache.max_len} tokens, asked to hold {start + T}")
        if valid is None and cache is None:
            pos = torch.arange(T, device=idx.device).unsqueeze(0)  # (1, T)
            mask = None  # plain causal attention: the fast path used in training
        else:
            if valid is None:
                valid = torch.ones(B, T, dtype=torch.bool, device=idx.device)
            valid = valid.bool()
            prev = cache.next_pos if cache is not None else torch.zeros(B, dtype=torch.long, device=idx.device)
            counted = valid.to(torch.int32).cumsum(1, dtype=torch.int32)  # (B, T) real tokens so far, int32
            pos = (prev.unsqueeze(1) + counted - 1).clamp(min=0)  # (B, T) int64 (prev is)
            if cache is not None:
                cache.valid[:, start:start + T] = valid
                cache.next_pos = prev + valid.sum(1)
                keys_valid = cache.valid[:, :start + T]  # (B, Tk)
            else:
                keys_valid = valid  # (B, Tk=T)
            if T == 1 and start > 0:
                # one decoding step: every cached key is in the past, and each row already holds
                # a real prompt token, so the key-validity row is the whole mask
                mask = keys_valid[:, None, None, :]  # (B, 1, 1, Tk)
            else:
                q_idx = torch.arange(start, start + T, device=idx.device)  # (T,)
                k_idx = torch.arange(start + T, device=idx.device)  # (Tk,)
                causal = k_idx.unsqueeze(0) <= q_idx.unsqueeze(1)  # (T, Tk)
                mask = causal.unsqueeze(0) & keys_valid.unsqueeze(1)  # (B, T, Tk)
                # a padded query attends to itself only, so no row of the softmax is empty
                mask = mask | (k_idx.unsqueeze(0) == q_idx.unsqueeze(1)).unsqueeze(0)  # (B, T, Tk)
                mask = mask.unsqueeze(1)  # (B, 1, T, Tk)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block(x, mask, cache, layer)  # (B, T, C)
        if cache is not None:
            cache.length = start + T
        if n_last is not None:
            x = x[:, T - n_last:]  # (B, n_last, C)
        return self.head(x)  # (B, T or n_last, V)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm and the tied LM head, in float32 even under autocast (bf16 logits are too
        coarse for r_t). x: (B, T, C) -> logits (B, T, V) float32."""
        with fp32_region(x.device):
            x = self.ln_f(x.float())  # (B, T, C)  (.float() is a no-op on float32)
            return F.linear(x, self.wte.weight.float())  # (B, T, V), tied embeddings, float32

    def start_decoding(self, cache: KVCache, extra: torch.Tensor | None = None) -> None:
        """After the prefill: the state decode_step reads, one row per slot s of cache.step_inputs
        (L, B, C + L + E): the position embedding of a token written at slot s (C), its attention
        mask over the L slots (0 on the prompt's real keys and on slots n..s, -inf elsewhere;
        n = cache.length), and the caller's own values for that step, extra (L, B, E) float32 (the
        rollout's uniforms; none by default). A row that is still generating puts its next token at
        slot s with position next_pos + (s - n). One gather per token then fetches all of it."""
        L, n = cache.max_len, cache.length
        slots = torch.arange(L, device=cache.device)  # (L,)
        positions = (cache.next_pos[:, None] + (slots - n)).clamp(min=0, max=self.config.block_size - 1)  # (B, L)
        prompt_keys = cache.valid & (slots < n)  # (B, L)
        written = (slots >= n) & (slots[None, :] <= slots[:, None])  # (L_s, L) slots n..s, by query slot s
        bias = torch.where(prompt_keys[None] | written[:, None], 0.0, float("-inf"))  # (L_s, B, L)
        parts = [self.wpe(positions).float().transpose(0, 1), bias] + ([extra] if extra is not None else [])
        cache.step_inputs = torch.cat(parts, -1)  # (L_s, B, C + L + E)
        cache.slot.fill_(n)

    def decode_step(self, idx: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The static decoding step: logits (B, V) after one new token per row, idx (B, 1), stored
        at slot s = cache.slot, which then moves on by one; also the slot's row of the extra values
        given to start_decoding, (B, E). Shapes are the same at every token and nothing but tensors
        is read, so torch.compile traces it once and a CUDA graph can replay it.

        It attends over all max_len slots of the cache under row s of the mask (0 on real keys and
        on every slot written so far, -inf on padding and later slots): a row that has stopped
        attends to its own padding, which changes nothing that is kept. Over the whole cache the
        attention adds in another order than over its first s + 1 keys (GPT.forward with a cache):
        the logits agree within 1e-6 (tests/test_static_decode.py)."""
        C, L = self.config.n_embd, cache.max_len
        inputs = cache.step_inputs.index_select(0, cache.slot)[0]  # (B, C + L + E): slot s's row
        x = self.wte(idx) + inputs[:, None, :C]  # (B, 1, C) token + position embedding
        mask = inputs[:, None, None, C:C + L].to(cache.kv.dtype)  # (B, 1, 1, L) (a copy only under autocast)
        for layer, block in enumerate(self.blocks):
            x = block(x, mask, cache, layer, static=True)  # (B, 1, C)
        cache.slot.add_(1)
        return self.head(x)[:, -1], inputs[:, C + L:]  # (B, V), (B, E)
