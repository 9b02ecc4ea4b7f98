"""
Special-token mismatch (docs/design.md#special-token-masking-and-hiding, experiment M2): a token the student emits but the
teacher never saw, such as a format token. At such a token log q(y_t|c_t) is tens of nats below
log pi, so its cost r_t = log pi - log q dominates the batch. Two remedies, and the instrument
that shows the problem:

  mask     leave those tokens out of the loss: every objective's `mask_tokens` option
           (objectives.py); token_ids() turns '<|fmt|>,7' into ids
  hide     remove them from the teacher's contexts as well: the teacher scores y_t under c_t minus
           the hidden tokens, q(y_t | x, y_<t without them) (HiddenTokens, an OPD teacher_score)
  track    the cost on those tokens, reported on its own (TrackedTokens, an OPD extra_stats):

    track_logratio_mean   mean r_t on the tracked tokens
    track_share           their share of sum_t |r_t| over the response
    track_rows            share of responses that contain one
    track_other_kl        mean reverse KL at the other response positions
"""

import torch

from nanoopd.logprobs import sampled_logratio
from nanoopd.metrics import masked_mean
from nanoopd.model import GPT
from nanoopd.rollout import Rollout
from nanoopd.sequence_kl import token_kl
from nanoopd.tokenizer import Tokenizer


def contains(tokens: torch.Tensor, ids) -> torch.Tensor:
    """tokens (...) -> bool (...): is each token one of `ids`? (torch.isin, which older torch
    releases lack on MPS; the id lists here are a few tokens long.)"""
    ids = torch.as_tensor(list(ids), dtype=tokens.dtype, device=tokens.device)  # (K,)
    return (tokens.unsqueeze(-1) == ids).any(-1)


def token_ids(text: str, tok: Tokenizer) -> list[int]:
    """'<|fmt|>,7' -> [260, 7]: comma-separated special-token names or integer token ids."""
    ids = []
    for item in (x.strip() for x in text.split(",")):
        if item in tok.special_ids:
            ids.append(tok.special_ids[item])
        elif item.isdigit() and int(item) < tok.n_vocab:
            ids.append(int(item))
        elif item:
            raise ValueError(f"{item!r} is neither a special token "
                             f"({', '.join(tok.special_ids)}) nor a token id in [0, {tok.n_vocab})")
    return ids


class HiddenTokens:
    """Teacher scoring with some response tokens removed from the teacher's contexts; called as
    (teacher, rollout, problems) -> logits (B, N, V) at the positions that predict each response
    token (the OPD step's teacher_score hook).

    The hidden tokens are marked not-valid, so no query attends to them and position ids skip them
    (model.py), and the prediction of the token after a hidden one is read at the last visible
    position before it. Prompts are never hidden.
    """

    def __init__(self, ids):
        self.ids = tuple(ids)

    def __call__(self, teacher: GPT, rollout: Rollout, problems=None) -> torch.Tensor:
        # lab:masking begin
        P = rollout.prompt_len
        tokens, valid = rollout.tokens[:, :-1], rollout.valid[:, :-1]  # (B, L) each, L = P+N-1
        B, L = tokens.shape
        position = torch.arange(L, device=tokens.device).expand(B, L)  # (B, L)
        visible = valid & ~(contains(tokens, self.ids) & (position >= P))  # (B, L)
        logits = teacher(tokens, visible)  # (B, L, V)
        seen = visible.unsqueeze(1) & (position.unsqueeze(1) <= position.unsqueeze(2))  # (B, L, L): s <= t, visible
        last_visible = torch.where(seen, position.unsqueeze(1), -1).amax(-1).clamp(min=0)  # (B, L): max such s
        logits = logits.gather(1, last_visible.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # (B, L, V)
        return logits[:, P - 1:]  # (B, N, V)
        # lab:masking end


class TrackedTokens:
    """The cost r_t on the tracked token ids, as extra step statistics (the OPD step's extra_stats
    hook): called as (student_logits, teacher_logits, rollout) -> the four track_* numbers."""

    def __init__(self, ids):
        self.ids = tuple(ids)

    @torch.no_grad()
    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 rollout: Rollout) -> dict[str, float]:
        mask = rollout.response_mask  # (B, N)
        tokens = rollout.response.masked_fill(~mask, 0)  # (B, N)
        on = contains(tokens, self.ids) & mask  # (B, N)
        logp = torch.log_softmax(student_logits.float(), -1)  # (B, N, V)
        logq = torch.log_softmax(teacher_logits.float(), -1)  # (B, N, V)
        r = sampled_logratio(logp, logq, tokens)  # (B, N)
        return {
            "track_logratio_mean": masked_mean(r, on),
            "track_share": (r.abs() * on).sum().item() / max((r.abs() * mask).sum().item(), 1e-12),
            "track_rows": on.any(1).float().mean().item(),
            "track_other_kl": masked_mean(token_kl(logp, logq), mask & ~on),
        }
