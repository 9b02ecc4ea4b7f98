"""
Objectives for a teacher that reads with another tokenizer (registered cross=True: the only ones
such a teacher takes). Each reads option `chunks` (cross_tokenizer.Chunks, from
cross_teacher.CrossTokenizerTeacher); teacher_logits are q projected on the student's tokens.
Without chunks (one tokenizer) every chunk is its token.

  xt_chunk*  A_t = sg(-r_c / n_c) on each student token t of chunk c, r_c = L_S(c) - L_T(c): the
             sampled-token form on chunks; a chunk's advantages sum to -r_c, and by the chain rule
             sum_c r_c = log pi(a) - log q(b), the two token paths' log-ratio. One tokenizer:
             sampled_token, to the bit. gamma > 0: each r_c on the token after its chunk (where the
             teacher's split of c is settled) and the discounted return of those; gamma = 1 is
             REINFORCE on the path log-ratio: the gradient of the path KL (toy/cross_audit.py).
  xt_full    at chunks that are one token on both sides, the full reverse KL(pi || q_proj) with q
             projected by first byte (exact there: both split at the chunk's start); elsewhere the
             xt_chunk term. One tokenizer: full_reverse_kl, to the bit.
  xt_uld     ULD (arXiv 2402.12030): sum_i |sorted pi - sorted q| with positions matched by index,
             the student's i-th response token against the teacher's i-th, as the paper does;
             blind to which token is which.
  xt_gold    GOLD's hybrid at every chunk start: each side's chunk merged into one distribution
             over its first position's vocabulary (merge_observed), then a JSD(0.5) on the tokens
             spelled alike on both sides (each part renormalised) plus ULD on the rest.

docs/m7.md says what each follows and what it costs.
"""

import torch

from nanoopd.cross_tokenizer import chunk_costs, uld
from nanoopd.objectives import Option, finish, prepare, register, resolve_options, sampled, token_sum
from nanoopd.sampled_token import g_gamma_surrogate
from nanoopd.sequence_kl import token_kl


def chunk_surrogate(b, chunks, mask: torch.Tensor, gamma: float = 0.0) -> torch.Tensor:
    """sum over the `mask`ed positions of sg(-R_t) log pi(y_t|c_t), one number: at gamma = 0 R_t is
    the token's share r_c / n_c; at gamma > 0 the gamma-discounted return of the chunk costs, each
    r_c placed after its chunk (nanoopd/sampled_token.py, cross_tokenizer.chunk_costs)."""
    logp, logq = sampled(b)  # (B, N) each
    r = chunk_costs(logp, logq, b.mask, chunks, at_end=gamma > 0)  # (B, N)
    return g_gamma_surrogate(logp, logp.detach() - r, mask, gamma=gamma).sum()


@register("xt_chunk", on_policy=True, cross=True,
          gamma=Option(0.0, "xt_chunk: the discount of the chunk costs' return (0: each token its chunk's share; "
                            "1: REINFORCE on the path log-ratio)", float))
def xt_chunk_loss(student_logits, teacher_logits, tokens, mask, **options):
    """Chunk-level sampled-token OPD (module docstring); gamma = 1 follows the path KL's gradient."""
    opt = resolve_options("xt_chunk", options)
    if not 0.0 <= opt["gamma"] <= 1.0:
        raise ValueError(f"option gamma must lie in [0, 1], got {opt['gamma']}")
    b = prepare(student_logits, teacher_logits, tokens, mask, opt)
    return finish(chunk_surrogate(b, opt["chunks"], b.mask, opt["gamma"]), b)


@register("xt_full", cross=True)
def xt_full_loss(student_logits, teacher_logits, tokens, mask, **options):
    """The full reverse KL where a chunk is one token on both sides, the chunk form elsewhere."""
    opt = resolve_options("xt_full", options)
    b = prepare(student_logits, teacher_logits, tokens, mask, opt)
    one = b.mask if opt["chunks"] is None else opt["chunks"].one & b.mask  # (B, N)
    kl = torch.where(one, token_kl(b.student_logp, b.teacher_logp), 0.0)  # (B, N)
    return finish(token_sum(kl, b) + chunk_surrogate(b, opt["chunks"], b.mask & ~one), b,
                  one_token_share=one.sum() / b.mask.sum().clamp(min=1))


def teacher_side(b, chunks, at: torch.Tensor):
    """The teacher's log-probs (B, N, V_t) at teacher positions `at` (B, N), and where they exist."""
    if chunks is None:
        return b.teacher_logp, b.mask
    logp = chunks.teacher_logp.gather(1, at.clamp(max=chunks.teacher_logp.shape[1] - 1).unsqueeze(-1).expand(
        -1, -1, chunks.teacher_logp.shape[-1]))  # (B, N, V_t)
    return logp, chunks.teacher_mask.gather(1, at.clamp(max=chunks.teacher_mask.shape[1] - 1)) & (
        at < chunks.teacher_mask.shape[1])


@register("xt_uld", claim=None, cross=True)
def xt_uld_loss(student_logits, teacher_logits, tokens, mask, **options):
    """ULD, positions matched by index (module docstring)."""
    opt = resolve_options("xt_uld", options)
    b = prepare(student_logits, teacher_logits, tokens, mask, opt)
    index = torch.arange(b.mask.shape[1], device=b.mask.device).expand_as(b.mask)  # (B, N) the i-th against the i-th
    q_logp, there = teacher_side(b, opt["chunks"], index)
    per = torch.where(there, uld(b.student_logp.exp(), q_logp.exp()), 0.0)  # (B, N)
    return finish(token_sum(per, b), b)


def jsd_half(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """JSD(0.5) of two distributions (..., V), each renormalised first: (...)."""
    p, q = p / p.sum(-1, keepdim=True).clamp(min=1e-30), q / q.sum(-1, keepdim=True).clamp(min=1e-30)
    m = (p + q) / 2
    kl = lambda a: (a * (a.clamp(min=1e-30).log() - m.clamp(min=1e-30).log())).sum(-1)
    return (kl(p) + kl(q)) / 2


@register("xt_gold", claim=None, cross=True)
def xt_gold_loss(student_logits, teacher_logits, tokens, mask, **options):
    """GOLD's hybrid at chunk starts (module docstring)."""
    opt = resolve_options("xt_gold", options)
    b, chunks = prepare(student_logits, teacher_logits, tokens, mask, opt), opt["chunks"]
    logp = b.student_logp.gather(-1, b.tokens.unsqueeze(-1)).squeeze(-1)  # (B, N) with grad
    if chunks is None:  # one tokenizer: every chunk is its token, every token matched
        p, (q_logp, _) = b.student_logp.exp(), teacher_side(b, None, None)
        q, starts, matched = q_logp.exp(), b.mask, torch.arange(p.shape[-1], device=p.device)
    else:
        L_s = torch.zeros(chunks.n_groups + 1, dtype=logp.dtype, device=logp.device).index_add(
            0, chunks.seg.flatten(), (logp * b.mask).flatten())[chunks.seg]  # (B, N) L_S(c), with grad
        q_logp, there = teacher_side(b, chunks, chunks.at)  # (B, N, V_t) the teacher at each chunk's start
        p = b.student_logp.exp() * (L_s - logp).exp().unsqueeze(-1)  # (B, N, V_s) merge_observed, on the student
        q = q_logp.exp() * (chunks.teacher_lp - chunks.teacher_first).exp().unsqueeze(-1)  # (B, N, V_t) and on the teacher
        starts, matched = chunks.start & b.mask & there, chunks.matched
    hit = matched >= 0  # (V_t,)
    p_m, q_m = p[..., matched[hit]], q[..., hit]  # (B, N, |matched|) each, pairs in one order
    rest = torch.ones(p.shape[-1], dtype=torch.bool, device=p.device)
    rest[matched[hit]] = False  # the student's tokens no teacher token spells
    per = jsd_half(p_m, q_m) + uld(p[..., rest], q[..., ~hit])  # (B, N)
    return finish(token_sum(torch.where(starts, per, 0.0), b), b,
                  matched_mass=(q_m.sum(-1) * starts).sum() / starts.sum().clamp(min=1))
