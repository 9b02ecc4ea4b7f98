"""
The sampling distribution of a decoding step and one draw from it, for every row of a batch at once.

Logits (B, V) become the distribution sampled from by temperature (0 = greedy argmax, done by the
caller), top-k (keep the k most likely) and top-p (keep the smallest set of most likely tokens
whose mass >= p): `filter_logits`. A token is then drawn by inverting the CDF (`sample`: one
uniform per row, a cumulative sum and a comparison) rather than by torch.multinomial, which draws
one exponential per vocabulary entry and took a quarter of a CPU rollout. The token loop that
calls them is nanoopd/rollout.py's.
"""

import torch


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



# devices whose cumulative sum adds in order along the row (the CPU: in a float64 accumulator)
IN_ORDER_SCAN = ("cpu",)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None,
           u: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of probs (B, V) (non-negative, each row with positive total mass; it need
    not be exactly 1) by inverting the CDF with one uniform u ~ U(0, 1] per row (drawn from
    `generator`, or given as u (B, 1)): with F_v = sum_{w <= v} p_w and Z = F_V,

        y = min {v : p_v > 0 and F_v >= u Z},    so P(y = v) = (F_v - F_{v-1}) / Z = p_v / Z.

    On the CPU the cumulative sum adds in order, so F never decreases and F_v = F_{v-1} exactly
    where p_v = 0: y is then #{v : F_v < u Z}, one binary search per row (torch.searchsorted). A GPU
    scan groups the additions, which can leave a zero-mass token a sliver of rounding above its
    predecessor (F_v > F_{v-1} = F_v - 0); there invert_cdf states the condition p_v > 0 outright.
    Both give the same token wherever the sum is in order (tests/test_static_decode.py).

    Exact up to float32: u lies on a grid of 2^-24, so a token of mass below about 6e-8 Z is drawn
    with a quantised probability. out: an optional (B, 1) int64 buffer the tokens are written to."""
    if u is None:
        u = 1.0 - torch.rand(probs.shape[0], 1, device=probs.device, generator=generator)  # (B, 1) in (0, 1]
    cdf = probs.cumsum(-1)  # (B, V)
    if probs.device.type in IN_ORDER_SCAN:
        y = torch.searchsorted(cdf, u * cdf[:, -1:], out=out)  # (B, 1) #{v : F_v < u Z} <= V - 1
        return y.clamp_(max=probs.shape[-1] - 1).view(-1)  # (B,) (a NaN row, from a diverged model, gives V)
    return invert_cdf(probs, cdf, u, out)  # (B,)


def invert_cdf(probs: torch.Tensor, cdf: torch.Tensor, u: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """y = min {v : p_v > 0 and F_v >= u Z} per row, Z = max {F_v : p_v > 0}, whatever order the
    cdf's additions took: probs, cdf (B, V), u (B, 1). A zero-mass token is never drawn, and some
    token of positive mass always qualifies. Returns (B,) int64 (written to out (B, 1) if given)."""
    cdf = cdf * (probs > 0)  # (B, V) zero-mass tokens at F = 0 < u Z: never reached
    hit = cdf >= u * cdf.amax(-1, keepdim=True)  # (B, V)
    return torch.argmax(hit.view(torch.uint8), -1, keepdim=True, out=out).view(-1)  # (B,) the first hit
