"""
A teacher that reads with another tokenizer: the alignment of two tokenizations of one text, the
chunk log-ratios it allows, and the field's approximations beside them. (The building blocks: no
objective, model or experiment uses them yet.)

Span alignment. The student's pieces a_1..a_n and the teacher's b_1..b_m spell the same bytes. Walk
both, always advancing the side whose last piece ends first; a group closes where both end at the
same byte. The groups partition both sequences into chunks of equal byte spans.

Chunk log-ratios. For a chunk c, L_S(c) = sum of the student's log-probs of its pieces in c and
L_T(c) the teacher's of its own; r_c = L_S(c) - L_T(c). By the chain rule sum_c r_c is the log-ratio
of the two token paths, log pi(a) - log q(b): exact for the paths. A path's probability is not the
text's (other tokenizations of the same text carry mass too), so it is exact about the text only at
boundaries both tokenizers must split at. With one tokenizer on both sides every chunk is one token
and r_c is the token log-ratio r_t, to the bit.

The approximations, as baselines:
  ULD    sum_i |p_(i) - q_(i)|: the L1 distance between the two probability vectors sorted in
         decreasing order (the shorter padded with zeros); positions matched by rank, so it is blind
         to which token is which (unchanged by any permutation of either vocabulary)
  merge  GOLD's "observed" merge of a span of k positions into one distribution over the first
         position's vocabulary: p(v) = P_1(v) * prod_{j >= 2} P_j(y_j), y_j the observed tokens
"""

import torch


def align(a: list[bytes], b: list[bytes]) -> list[tuple[int, int, int, int]]:
    """The groups (i0, i1, j0, j1) of two tokenizations of one text: a[i0:i1] and b[j0:j1] cover the
    same bytes; together the groups partition both. Two texts that differ raise ValueError, naming
    the first byte where they part."""
    ta, tb = b"".join(a), b"".join(b)
    if ta != tb:
        k = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
        raise ValueError(f"the two tokenizations spell different texts: they part at byte {k} "
                         f"({ta[k:k + 8]!r} against {tb[k:k + 8]!r}); no alignment exists")
    if any(len(p) == 0 for p in a + b):
        raise ValueError("an empty piece cannot be aligned: every token must cover at least one byte")
    groups, i, j, i0, j0, ea, eb = [], 0, 0, 0, 0, 0, 0
    while i < len(a) or j < len(b):
        if j == len(b) or (i < len(a) and ea <= eb):
            ea, i = ea + len(a[i]), i + 1
        else:
            eb, j = eb + len(b[j]), j + 1
        if ea == eb:
            groups.append((i0, i, j0, j))
            i0, j0 = i, j
    return groups


def chunk_logratios(groups: list[tuple[int, int, int, int]], logp_s: torch.Tensor,
                    logp_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """r_c = L_S(c) - L_T(c) for every group, from the student's log-probs of its own pieces (n,)
    and the teacher's of its own (m,); and r_c spread evenly over the student's pieces of c (n,),
    so that each chunk's share sums to r_c exactly. Returns (r (G,), per-piece (n,))."""
    G = len(groups)
    seg_s = torch.zeros(logp_s.shape[0], dtype=torch.long, device=logp_s.device)  # (n,) the group of each piece
    seg_t = torch.zeros(logp_t.shape[0], dtype=torch.long, device=logp_t.device)  # (m,)
    for g, (i0, i1, j0, j1) in enumerate(groups):
        seg_s[i0:i1], seg_t[j0:j1] = g, g
    L_s = torch.zeros(G, dtype=logp_s.dtype, device=logp_s.device).index_add(0, seg_s, logp_s)  # (G,)
    L_t = torch.zeros(G, dtype=logp_t.dtype, device=logp_t.device).index_add(0, seg_t, logp_t)  # (G,)
    r = L_s - L_t  # (G,)
    sizes = torch.tensor([i1 - i0 for i0, i1, _, _ in groups], dtype=logp_s.dtype, device=logp_s.device)  # (G,)
    return r, (r / sizes)[seg_s]


def uld(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """ULD's distance between distributions over two vocabularies, p (..., V1) and q (..., V2):
    the L1 distance of their sorted probabilities, the shorter padded with zeros. Returns (...)."""
    V = max(p.shape[-1], q.shape[-1])
    pad = lambda x: torch.nn.functional.pad(x, (0, V - x.shape[-1]))
    ps = pad(p).sort(dim=-1, descending=True).values  # (..., V)
    qs = pad(q).sort(dim=-1, descending=True).values  # (..., V)
    return (ps - qs).abs().sum(-1)


def merge_observed(probs: torch.Tensor, observed: list[int]) -> torch.Tensor:
    """GOLD's observed merge of k positions (probs (k, V)) into one distribution-like vector over
    the first position's vocabulary: probs[0] * prod_{j >= 1} probs[j, observed[j]] (V,)."""
    if len(observed) != probs.shape[0]:
        raise ValueError(f"one observed token per position: {len(observed)} for {probs.shape[0]} positions")
    rest = probs[torch.arange(1, probs.shape[0]), torch.tensor(observed[1:], dtype=torch.long)]  # (k-1,)
    return probs[0] * rest.prod()
