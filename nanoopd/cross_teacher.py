"""
A teacher that reads with another tokenizer, in the OPD step: the student's rollouts re-read in the
teacher's tokens, scored by the teacher, aligned, and handed to the objectives in the student's terms.

    text       = what the student's prompt and response ids spell
    b_1..b_m   = retokenize(text) for the teacher (special tokens by name)         host, per row
    q(.|b_<j)  = the teacher's forward pass over its own ids, all rows at once      (B, M, V_t)
    groups     = align(student pieces, teacher pieces), for the batch at once        batch_groups
    returned   = (q projected on the student's tokens (B, N, V_s), Chunks)          opd.opd_step

The projected q is the teacher's next-byte distribution (cross_tokenizer.py#projection): exact at
every chunk start, "given that the token goes on" inside a teacher token (with a 1e-6 floor). It is
what the step's diagnostics (kl, top-K overlap) and xt_full's exact part read; the Chunks carry the
rest (cross_objectives.py).

With one tokenizer on both sides nothing is re-read: the teacher scores the rollout itself, every
chunk is its token, and each xt_ objective equals its same-tokenizer counterpart to the bit.

naive=True is the mistake (TRL #4562), kept to be seen: the teacher is handed the student's ids as
if they were its own, and its logits are cut to the student's vocabulary, so any objective runs.
"""

import functools
import time

import torch

from nanoopd.config import ConfigError
from nanoopd.cross_tokenizer import Chunks, prefix_map, project, retokenize, spelled
from nanoopd.mixed_batch import pool_rollout
from nanoopd.objectives import SPECS
from nanoopd.rollout import Rollout, response_logits
from nanoopd.tokenizer import Tokenizer, get_tokenizer

def one_token_chunks(mask: torch.Tensor, teacher_logp: torch.Tensor, tokens: torch.Tensor) -> Chunks:
    """The chunks of one tokenizer on both sides: every response position its own chunk, the
    teacher's positions the student's. mask, tokens: (B, N); teacher_logp: (B, N, V)."""
    B, N = mask.shape
    seg = torch.where(mask, torch.arange(B * N, device=mask.device).view(B, N), B * N)  # (B, N)
    lp = teacher_logp.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, N)
    return Chunks(seg, torch.ones(B, N, dtype=teacher_logp.dtype, device=mask.device), lp, lp, mask.clone(), mask.clone(),
                  torch.arange(N, device=mask.device).expand(B, N), teacher_logp, mask,
                  torch.arange(teacher_logp.shape[-1], device=mask.device), B * N)


class CrossTokenizerTeacher:
    """opd_step's teacher_score hook for a teacher that reads `teacher_tok` (module docstring)."""

    def __init__(self, student_tok: Tokenizer, teacher_tok: Tokenizer, naive: bool = False):
        self.s, self.t, self.naive = student_tok, teacher_tok, naive
        self.seconds = (0.0, 0.0)  # the last call's re-reading + alignment, and projection (bench.py; on a GPU: host time)

    def __call__(self, teacher, ro: Rollout, problems=None):
        V = self.s.n_vocab
        if self.naive:
            return response_logits(teacher, ro)[..., :V]  # (B, N, V): the student's ids read as the teacher's own
        if self.s is self.t:
            logits = response_logits(teacher, ro)  # (B, N, V)
            return logits, {"chunks": one_token_chunks(ro.response_mask, torch.log_softmax(logits.float(), -1),
                                                       ro.response)}
        device, (B, N), P, t0 = ro.response.device, ro.response.shape, ro.prompt_len, time.perf_counter()
        prompts = [[i for i in row if i >= 0] for row in torch.where(ro.valid[:, :P], ro.tokens[:, :P], -1).tolist()]
        rows = ro.rows()
        t_rows = [retokenize(r, self.s, self.t) for r in rows]
        t_ro = pool_rollout([(retokenize(p, self.s, self.t), r) for p, r in zip(prompts, t_rows)], self.t.pad_id, device)
        t1 = time.perf_counter()
        t_logp = torch.log_softmax(response_logits(teacher, t_ro).float(), -1)  # (B, M, V_t)
        t2 = time.perf_counter()
        t_lp = t_logp.gather(-1, t_ro.response.unsqueeze(-1)).squeeze(-1) * t_ro.response_mask  # (B, M)
        # the alignment, the whole batch at once
        mask, t_mask = ro.response_mask, t_ro.response_mask
        seg, t_seg, G = batch_groups(ro.response, mask, t_ro.response, t_mask, piece_lengths(self.s).to(device),
                                     piece_lengths(self.t).to(device))  # (B, N), (B, M)
        count = lambda ids: torch.zeros(G + 1, device=device).index_add(0, ids.flatten(), torch.ones_like(ids.flatten(),
                                                                                                      dtype=torch.float))
        n_s, n_t = count(seg), count(t_seg)  # (G + 1,) the student's and the teacher's tokens of each chunk (portable ops:
        # no bincount, isin or scatter_reduce, which older MPS stacks lack)
        opens = lambda ids: torch.cat([torch.ones_like(ids[:, :1], dtype=torch.bool), ids[:, 1:] != ids[:, :-1]], 1)
        start, t_start = mask & opens(seg), t_mask & opens(t_seg)  # (B, N), (B, M): a chunk's first token
        first = lambda ids, first_of: torch.zeros(G + 1, dtype=torch.long, device=device).index_put_(
            (ids[first_of],), first_of.nonzero()[:, 1])  # (G + 1,) each chunk's first position
        first_i, at = first(seg, start), torch.where(mask, first(t_seg, t_start)[seg], 0)  # (G + 1,), (B, N)
        L_t = torch.zeros(G + 1, device=device).index_add(0, t_seg.flatten(), t_lp.flatten())  # (G + 1,) L_T(c)
        prefix = {}  # inside a teacher token: projected given the bytes read so far ("3", "34", ...)
        for b, i, i0 in torch.stack([*(mask & ~start).nonzero().T, first_i[seg[mask & ~start]]], 1).tolist():
            prefix.setdefault(b"".join(spelled(self.s, rows[b][i0:i])), []).append(b * N + i)
        t3 = time.perf_counter()
        t_prob = t_logp.exp()  # (B, M, V_t)
        first = project(t_prob, prefix_map(self.s, self.t, b""), V)  # (B, M, V) each teacher position's next byte
        proj = first.gather(1, at.unsqueeze(-1).expand(-1, -1, V)).flatten(0, 1)  # (B*N, V) its chunk start's
        for pre, idx in prefix.items():  # a few distinct prefixes inside teacher tokens ("3", "34", ...)
            idx = torch.tensor(idx, device=device)
            q_rows = t_prob[idx // N, at.flatten()[idx]]  # (n, V_t) the teacher at those chunks' starts
            proj[idx] = project(q_rows, prefix_map(self.s, self.t, pre), V, within=True)  # (n, V)
        chunks = Chunks(seg, torch.where(mask, n_s[seg], 1).float(), L_t[seg], t_lp.gather(1, at), start,
                        mask & (n_s[seg] == 1) & (n_t[seg] == 1), at, t_logp, t_mask, matched_ids(self.s, self.t).to(device), G)
        proj = proj.clamp(min=1e-30).log().view(B, N, V)  # (B, N, V)
        self.seconds = (t1 - t0 + t3 - t2, time.perf_counter() - t3)
        return proj, {"chunks": chunks}


@functools.lru_cache(maxsize=None)
def piece_lengths(tok: Tokenizer) -> torch.Tensor:
    """(V,) long: how many bytes each id spells (a special token: its name's, as spelled() has it)."""
    return torch.tensor([len(w) for w in spelled(tok, range(tok.n_vocab))])


def batch_groups(s_ids, s_mask, t_ids, t_mask, s_len, t_len) -> tuple[torch.Tensor, torch.Tensor, int]:
    """cross_tokenizer.align for a whole batch, from the byte ends of both sides' pieces: a chunk
    closes at every byte where a student piece and a teacher piece of the row both end. s_ids,
    s_mask (B, N) and t_ids, t_mask (B, M), real tokens first; s_len, t_len: piece_lengths. Returns
    the chunk of every position, seg (B, N) and t_seg (B, M), numbered row after row (padding:
    the spare id G), and G, the number of chunks. Rows that spell different texts raise ValueError."""
    es = torch.where(s_mask, s_len[s_ids], 0).cumsum(1, dtype=torch.int32)  # (B, N) the byte where each student piece ends
    et = torch.where(t_mask, t_len[t_ids], 0).cumsum(1, dtype=torch.int32)  # (B, M) (int32 cumsums: older MPS has no int64)
    if not torch.equal(es[:, -1], et[:, -1]):
        b = int((es[:, -1] != et[:, -1]).nonzero()[0])
        raise ValueError(f"row {b}: the student's tokens spell {int(es[b, -1])} bytes and the teacher's {int(et[b, -1])}: "
                         f"they read different texts, and no alignment exists")
    both = (es[:, :, None] == et[:, None, :]) & s_mask[:, :, None] & t_mask[:, None, :]  # (B, N, M) end at one byte
    close_s, close_t = both.any(2), both.any(1)  # (B, N), (B, M): a chunk ends with this piece
    count = lambda close: close.int().cumsum(1, dtype=torch.int32) - close.int()  # chunks closed before each piece
    per_row = close_s.sum(1, dtype=torch.int32)  # (B,) chunks of each row
    offset, G = (per_row.cumsum(0, dtype=torch.int32) - per_row)[:, None], int(per_row.sum())  # (B, 1)
    seg = torch.where(s_mask, count(close_s) + offset, G).long()  # (B, N)
    return seg, torch.where(t_mask, count(close_t) + offset, G).long(), G


@functools.lru_cache(maxsize=None)
def matched_ids(student: Tokenizer, teacher: Tokenizer) -> torch.Tensor:
    """(V_t,) long: the student token that spells what each teacher token spells, -1 where none."""
    own = {w: i for i, w in enumerate(spelled(student, range(student.n_vocab)))}
    return torch.tensor([own.get(w, -1) for w in spelled(teacher, range(teacher.n_vocab))])


def check_teacher(student, teacher, teacher_score, loss: str) -> None:
    """train_opd's check of a pair: the teacher reads the student's tokenizer, or is scored through
    a CrossTokenizerTeacher with an objective that reads the alignment (cross=True, the xt_ ones)
    or naively. Raises ValueError, saying what to do."""
    s, t = student.config.tokenizer, teacher.config.tokenizer
    cross = isinstance(teacher_score, CrossTokenizerTeacher)
    xt = sorted(n for n, spec in SPECS.items() if spec.cross)
    if s != t and not cross:
        raise ValueError(f"the teacher reads the tokenizer {t!r} and the student {s!r}: OPD compares their "
                         f"distributions token by token, so score the teacher through "
                         f"cross_teacher.CrossTokenizerTeacher with one of {', '.join(xt)}")
    if cross and s != t and not teacher_score.naive and not SPECS[loss].cross:
        raise ValueError(f"objective {loss!r} compares the two models over one vocabulary, but the teacher reads "
                         f"{t!r} and the student {s!r}: choose one of {', '.join(xt)}, which read the alignment "
                         f"(or --naive_ids, to see what the shared-vocabulary mistake does)")
    if s == t and student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"teacher and student vocabularies differ (teacher {teacher.config.vocab_size}, "
                         f"student {student.config.vocab_size} tokens) though both read {s!r}: retrain one")
    if cross and (teacher_score.s.name, teacher_score.t.name) != (s, t):
        raise ValueError(f"the cross-tokenizer scorer reads {teacher_score.s.name!r} -> {teacher_score.t.name!r}, "
                         f"but the student reads {s!r} and the teacher {t!r}")


def teacher_scorer(student_tok: Tokenizer, teacher, naive: bool = False):
    """The teacher_score hook a teacher model needs: None when it reads the student's tokenizer
    (plain scoring), else a CrossTokenizerTeacher."""
    if teacher.config.tokenizer == student_tok.name and not naive:
        return None
    return CrossTokenizerTeacher(student_tok, get_tokenizer(teacher.config.tokenizer), naive)


def check_cross_flags(cfg) -> None:
    """train_math.py's flags against the teacher's tokenizer (--teacher_tokenizer): OPD from a
    teacher of another tokenizer takes an xt_ objective (or --naive_ids, the mistake shown), and
    the features that have the teacher write or read the student's ids are refused. Raises ConfigError."""
    if cfg.teacher_tokenizer == "bytes":
        if cfg.naive_ids:
            raise ConfigError("naive_ids", "shows a teacher of another tokenizer misread: add --teacher_tokenizer digits")
        return
    if cfg.hide_from_teacher or cfg.lmbda < 1 or cfg.rlvr_init == "teacher":
        raise ConfigError("teacher_tokenizer", f"{cfg.teacher_tokenizer!r}: --hide_from_teacher, --lmbda < 1 and "
                          f"--rlvr_init teacher need a teacher that reads the student's tokens ('bytes')")
    if "opd" in cfg.stages.split(",") and cfg.mode == "opd" and not cfg.naive_ids and not SPECS[cfg.loss].cross:
        xt = ", ".join(sorted(n for n, spec in SPECS.items() if spec.cross))
        raise ConfigError("loss", f"{cfg.loss} compares the two models over one vocabulary, but --teacher_tokenizer "
                                  f"{cfg.teacher_tokenizer} reads other tokens: choose one of {xt} (or add --naive_ids "
                                  f"to see what the shared-vocabulary mistake does)")
