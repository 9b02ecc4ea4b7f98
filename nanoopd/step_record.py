"""
What one OPD step reports: the object opd.opd_step returns and train_opd appends to <run>.jsonl.

  step                 0-based step index
  loss                 the objective's surrogate loss (per loss token, over all rows)
  kl                   mean token-level reverse KL(pi(.|c_t) || q(.|c_t)) over response tokens
  acc                  verifier accuracy of this step's rollouts (train prompts)
  tok_s                response tokens of this step / wall time of the whole step
  overlap_ratio        |TopK(pi) ∩ TopK(q)| / k, k = 16 (metrics.opd_diagnostics)
  overlap_mass_student, overlap_mass_teacher   pi and q mass on that intersection
  entropy_student, entropy_teacher, entropy_gap   H(pi), H(q), |H(q) - H(pi)|
  logratio_max_abs     max |r_t| over response tokens;  logratio_pos_share  share of r_t > 0
  response_length      mean response length (tokens, EOS included)
  budget_share         share of responses that hit the budget N without an EOS
  grad_norm            total gradient norm before clipping
  n_loss_tokens        response tokens the loss saw (after mask_tokens)
  flops, flops_given   this step's matmul FLOPs, teacher sampling charged / traces given (nanoopd/flops.py)
  t_rollout, t_teacher, t_student   seconds in sampling, teacher scoring, student fwd+bwd+step
  eval_acc             held-out greedy accuracy (only on steps where it was evaluated; train_opd)
plus the objective's own extra stats (e.g. support_mass_student for the top-K forms) and those of
an extra_stats hook (e.g. special_tokens.TrackedTokens: track_logratio_mean, track_share, ...).

Per source (GKD's lmbda < 1, nanoopd/mixed_batch.py): the per-row figures (kl to response_length,
budget_share, acc) are those of the student's own rows, as at lmbda = 1; the same figures over the
teacher's rows carry the suffix `_teacher_rows`. A source with no rows in the batch has no keys
(at lmbda = 0: only the `_teacher_rows` ones), so that a teacher row never passes for the student's.
"""

import torch

from nanoopd import distributed
from nanoopd.metrics import opd_diagnostic_tensors

# the per-objective stats that opd_diagnostics already reports (over the full response mask)
COMMON_STATS = ("loss", "kl", "logratio_max_abs", "logratio_pos_share", "n_tokens")
TEACHER_ROWS = "_teacher_rows"  # the suffix of the teacher rows' figures


def step_record(step: int, S: int, ro, logits: tuple, logp: tuple, stats: dict, rewards: list[int], cfg, tok,
                gnorm: float, seconds: tuple, flops: tuple, extra: dict) -> dict:
    """The record of one step (module docstring): rows [0, S) are the student's, the rest the
    teacher's; logits, logp: (student, teacher), each (B, N, V); stats: the objective's (tensors or
    floats); rewards: the verifier's, one per row; seconds: (rollout, teacher, student); flops:
    (compute, teacher sampling). Every device figure reaches the host in one transfer."""
    device = ro.response.device
    B = ro.response.shape[0]
    lengths = ro.lengths  # (B,)
    last = ro.response.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)  # (B,)
    hit_budget = (lengths == cfg.max_new_tokens) & (last != tok.eos_id)  # (B,)
    as_tensor = lambda v: v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v), device=device)
    figures, diag_keys = {}, set()
    for rows, suffix in ((slice(0, S), ""), (slice(S, B), TEACHER_ROWS)):
        if rows.stop <= rows.start:
            continue
        part = lambda x: x if S in (0, B) else x[rows]  # (b, ...) the source's rows (the whole batch when alone)
        diag = opd_diagnostic_tensors(part(logits[0]), part(logits[1]), part(ro.response), part(ro.response_mask),
                                      cfg.diag_k, logp=(part(logp[0]), part(logp[1])))
        diag["budget_share"] = part(hit_budget).float().mean()
        figures.update({k + suffix: v for k, v in diag.items()})
        diag_keys |= {k + suffix for k in diag}
    figures.update(n_new=lengths.sum().float(), **{k: as_tensor(v) for k, v in stats.items()})  # stats may be floats
    values = dict(zip(figures, torch.stack(list(figures.values())).tolist()))  # the one transfer of the step's figures
    n_new = int(values.pop("n_new"))
    accs = {"acc": rewards[:S], "acc" + TEACHER_ROWS: rewards[S:]}
    record = {
        "step": step, "loss": values["loss"], **{k: v for k, v in values.items() if k in ("kl", "kl" + TEACHER_ROWS)},
        **{k: sum(r) / len(r) for k, r in accs.items() if r}, "tok_s": n_new / sum(seconds),
        **{k: values[k] for k in figures if k in diag_keys and not k.startswith("kl")},
        "grad_norm": gnorm, "n_loss_tokens": values["n_tokens"], **extra,
        "flops": flops[0] + flops[1], "flops_given": flops[0],
        "t_rollout": seconds[0], "t_teacher": seconds[1], "t_student": seconds[2],
        **{k: v for k, v in values.items() if k not in COMMON_STATS and k not in diag_keys},
    }
    if distributed.active():
        weights = {k: float(n_new) for k in record}
        weights.update({k: float(len(rewards)) for k in ("acc", "response_length", "budget_share", "track_rows")})
        weights.update(loss=values["n_tokens"])
        record = distributed.reduce_record(record, weights, sum_keys=("tok_s", "n_loss_tokens", "flops", "flops_given"),
                                           max_keys=("logratio_max_abs", "t_rollout", "t_teacher", "t_student"))
    return record
