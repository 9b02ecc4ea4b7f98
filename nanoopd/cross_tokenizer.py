"""
A teacher that reads with another tokenizer: the alignment of two tokenizations of one text, the
chunk log-ratios it allows, and the field's approximations beside them (the maths; the teacher
that uses it in OPD is nanoopd/cross_teacher.py, the objectives nanoopd/cross_objectives.py).

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

Projection. At a chunk's start both tokenizers split, and the teacher's next *byte* has the exact
distribution sum_{u spells b...} q(u|c): its tokens summed by their first byte (prefix_map(b"")).
Inside a teacher token ("4" after "3" of "347") one forward pass gives no exact next byte (the
token could end there and another begin): the projection there sums the tokens that go on past the
bytes so far, a distribution given that the token goes on.
"""

import functools
import re
from typing import NamedTuple

import torch

WITHIN_FLOOR = 1e-6  # inside a teacher token: the share of uniform mass mixed into the projection


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
    # lab:cross_tokenizer begin
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
    # lab:cross_tokenizer end


def chunk_logratios(groups: list[tuple[int, int, int, int]], logp_s: torch.Tensor,
                    logp_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """r_c = L_S(c) - L_T(c) for every group, from the student's log-probs of its own pieces (n,)
    and the teacher's of its own (m,); and r_c spread evenly over the student's pieces of c (n,),
    so that each chunk's share sums to r_c exactly. Returns (r (G,), per-piece (n,))."""
    # lab:cross_tokenizer begin
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
    # lab:cross_tokenizer end


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


# ----------------------------------------------------------------------------------------------
# two tokenizers' ids of one text


def spelled(tok, ids) -> list[bytes]:
    """The bytes each id spells; a special token spells its name (b"<|eos|>"), the same in every
    tokenizer here, so that the alignment pairs specials by name."""
    names = {i: name.encode() for name, i in tok.special_ids.items()}
    return [names[i] if i in names else tok.enc.decode_single_token_bytes(i) for i in ids]


def retokenize(ids, src, dst) -> list[int]:
    """dst's ids for the text that src's `ids` spell: special tokens by name, the bytes between them
    by dst's own split and merges (ASCII runs as text; any other byte a token of its own, so that
    whatever a sampler wrote is read). A special token dst lacks raises ValueError."""
    names = {i: name for name, i in src.special_ids.items()}
    out, run = [], []

    def flush():
        for part in re.split(rb"([\x80-\xff])", src.enc.decode_bytes(run)):
            if part:
                out.extend([dst.enc.encode_single_token(part)] if part[0] >= 0x80 else
                           dst.enc.encode_ordinary(part.decode("ascii")))
        run.clear()
    for i in ids:
        if i not in names:
            run.append(i)
            continue
        flush()
        if names[i] not in dst.special_ids:
            raise ValueError(f"the tokenizer {dst.name!r} has no special token {names[i]}: the text cannot be re-read")
        out.append(dst.special_ids[names[i]])
    flush()
    return out


@functools.lru_cache(maxsize=None)
def prefix_map(student, teacher, prefix: bytes) -> torch.Tensor:
    """(V_t,) long: for each teacher token that spells `prefix` and goes on past it, the student's
    token of its next byte; -1 for every other. prefix b"" maps each token to its first byte, a
    special token to the student's of the same name. The student must read every byte as a token
    (both tokenizers here do)."""
    byte_id = [student.enc.encode_single_token(bytes([x])) for x in range(256)]
    out = torch.full((teacher.n_vocab,), -1, dtype=torch.long)
    for u, word in enumerate(spelled(teacher, range(teacher.n_vocab))):
        if u in teacher.special_ids.values():
            name = next(n for n, i in teacher.special_ids.items() if i == u)
            out[u] = student.special_ids.get(name, -1) if not prefix else -1
        elif len(word) > len(prefix) and word.startswith(prefix):
            out[u] = byte_id[word[len(prefix)]]
    return out


def project(q: torch.Tensor, index: torch.Tensor, n_vocab: int, within: bool = False) -> torch.Tensor:
    """The teacher's probabilities q (..., V_t) summed into the student's tokens by `index` (V_t,)
    (-1: left out): (..., n_vocab). At a chunk start (within=False) as they are; inside a teacher
    token renormalised (given that it goes on) and mixed with WITHIN_FLOOR of uniform mass."""
    spare = torch.where(index < 0, n_vocab, index).to(q.device)  # (V_t,) the left-out ones -> a spare column
    out = torch.zeros(*q.shape[:-1], n_vocab + 1, dtype=q.dtype, device=q.device)
    p = out.index_add_(-1, spare, q)[..., :n_vocab]  # (..., n_vocab)
    return (1 - WITHIN_FLOOR) * p / p.sum(-1, keepdim=True) + WITHIN_FLOOR / n_vocab if within else p


# ----------------------------------------------------------------------------------------------
# the chunks of a batch, as the objectives read them


class Chunks(NamedTuple):
    """The alignment of a batch of B responses, N student positions and M teacher ones."""
    seg: torch.Tensor           # (B, N) long: the chunk of each student position (masked ones: n_groups, a spare)
    size: torch.Tensor          # (B, N) float: n_c, the student tokens of that chunk
    teacher_lp: torch.Tensor    # (B, N) float: L_T(c), the teacher's log-prob of its own tokens of that chunk
    teacher_first: torch.Tensor  # (B, N) float: log q of the chunk's first teacher token (GOLD's merge)
    start: torch.Tensor         # (B, N) bool: the chunk's first student token (a boundary both tokenizers share)
    one: torch.Tensor           # (B, N) bool: the chunk is one token on both sides
    at: torch.Tensor            # (B, N) long: the teacher position of the chunk's first teacher token
    teacher_logp: torch.Tensor  # (B, M, V_t) log q at the teacher's own response positions
    teacher_mask: torch.Tensor  # (B, M) bool
    matched: torch.Tensor       # (V_t,) long: the student token of the same spelling, -1 where none
    n_groups: int


def chunk_costs(logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor, chunks: Chunks | None,
                at_end: bool = False) -> torch.Tensor:
    """The cost of every student token, so that the costs sum to sum_c r_c, r_c = L_S(c) - L_T(c)
    (detached): r_c / n_c on each token of c; or (at_end) all of r_c on the token after c (c's last
    token when none follows): a tokenizer that looks ahead ('34' ends a token only when no digit
    follows) fixes c only then, and a return-to-go stays unbiased only if no cost depends on later tokens.
    logp, logq: (B, N) of the sampled tokens; chunks None (one tokenizer): every chunk is its
    token, and the cost is r_t = logp - logq. Returns (B, N)."""
    if chunks is None:
        return logp.detach() - logq.detach()
    # lab:cross_tokenizer begin
    L_s = torch.zeros(chunks.n_groups + 1, dtype=logp.dtype, device=logp.device).index_add(
        0, chunks.seg.flatten(), (logp.detach() * mask).flatten())  # (G + 1,)
    r = L_s[chunks.seg] - chunks.teacher_lp  # (B, N) r_c at each of its tokens
    if not at_end:
        return r / chunks.size
    end = chunks.seg != torch.cat([chunks.seg[:, 1:], torch.full_like(chunks.seg[:, :1], -1)], 1)  # (B, N) a chunk's last
    placed = torch.where(end, r, 0.0)  # (B, N)
    # one token later: the token that closes the chunk in the teacher's split (its last if none follows)
    later = torch.cat([torch.zeros_like(placed[:, :1]), placed[:, :-1]], 1) * mask  # (B, N)
    last = mask & ~torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)  # (B, N) each row's last token
    return later + torch.where(last, placed, 0.0)
    # lab:cross_tokenizer end
