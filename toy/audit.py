"""
toy/audit.py: the estimator audit. Every registered objective that reads the teacher (not sft), with
its defaults and the variants that matter, through one exact test on the tabular toy (toy/exact.py):
which divergence does it follow, the one it claims (SPECS[name].claim)? The reading: docs/audit.md.
    python -m toy.audit                   # the table, out/audit/audit.csv and audit.png, a few seconds
    python -m toy.audit --out docs        # the CSV and figure that docs/audit.md shows
    python -m toy.audit --coupling 0      # no coupling: J and K_tok have the same gradient, a tie; --help: every flag

Every sequence y in {0..V-1}^T is enumerated, so every expectation below is a weighted sum, in
float64, with no sampling. Each objective is called as the registry calls it, loss, stats =
objective(student_logits, teacher_logits, tokens, mask, **options), tokens unshifted (the logits at
t predict tokens[:, t]), on all V^T sequences at once with one private copy of theta per sequence:
one backward pass gives every per-sample gradient grad L(y) (L(y): the loss summed over y's T
positions; the sampling distribution pi(y) held fixed, as a sampled estimator sees it):

    g_L        = sum_y pi(y) grad L(y)                                   the expected gradient
    tr Cov     = sum_y pi(y) || grad L(y) - g_L ||^2                     its per-sample variance
    grad J     = grad KL(pi || q), the sequence-level reverse KL (autograd of the enumerated J)
    grad K_tok = sum_y sg(pi(y)) sum_t grad KL(pi(.|c_t) || q(.|c_t))   token-level reverse KL
    grad F_tok = sum_y sg(pi(y)) sum_t grad KL(q(.|c_t) || pi(.|c_t))   token-level forward KL

Per objective: the cosine and relative error ||g_L - g*|| / ||g*|| to each target g*, and which
target it follows (error < 1e-6: "K exactly"; else cosine >= 0.99: "~K"; else "none"; coinciding
targets are a tie, "J = K exactly"), all undefined (n/a) where g_L is at rounding level; ||g_L|| at
pi = q (the teacher replaced by the student: 0 for a proper objective), tr Cov, and the change of J
after a step of --step along -g_L. Flags: constant in theta (every grad L(y) is 0), zero expected
gradient, wrong divergence (it follows targets other than the one it claims), points away from its
claimed target (cosine <= 0), drains S / fills S (at pi = q its step lowers / raises the student's mass
on the teacher's top-K), not stationary at pi = q, raises J (toy/audit_report.py prints them).
"""

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from nanoopd import OBJECTIVES
from nanoopd.config import ConfigError, parse_config
from nanoopd.objectives import SPECS, load_objectives
from toy.audit_report import print_table, save
from toy.exact import TabularAR, all_sequences, make_problem, sequence_kl

# -----------------------------------------------------------------------------
# config


@dataclass
class AuditConfig:
    # --- the exact toy
    vocab: int = 6             # V, tokens; the top-K supports are a real subset of them
    horizon: int = 4           # T, sequence length; V^T = 1,296 sequences enumerated
    coupling: float = 1.0      # how strongly each token depends on the previous ones (0 = independent)
    seed: int = 0              # draws the teacher and the student (toy.exact.make_problem)
    k: int = 2                 # K of the top-K variants (the teacher's top-K unless stated)
    # --- the audit
    step: float = 1e-3         # length of the probe step along -g_L / ||g_L|| (does J go down?)
    objectives: str = ""       # a Python file of your own objectives (docs/extending.md), audited with the rest
    # --- output
    out: str = "out/audit"     # folder for audit.csv and audit.png
    plots: bool = True         # write the figure (needs matplotlib)
    threads: int = 1           # CPU threads; one is fastest for tensors this small

    def __post_init__(self):
        if self.vocab < 3:
            raise ConfigError("vocab", f"must be at least 3 (a top-K support needs K < V), got {self.vocab}")
        if self.horizon < 2:
            raise ConfigError("horizon", f"must be at least 2 (no coupling with one token), got {self.horizon}")
        if self.vocab ** self.horizon > 20_000:
            raise ConfigError("horizon", f"gives V^T = {self.vocab ** self.horizon} sequences; keep V^T <= "
                                         f"20,000 so the audit stays a matter of seconds (e.g. V=6, T=4)")
        if not 1 <= self.k < self.vocab:
            raise ConfigError("k", f"must lie in [1, V-1] = [1, {self.vocab - 1}] so that S is a real subset, "
                                   f"got {self.k}")
        if not self.step > 0:
            raise ConfigError("step", f"must be positive, got {self.step}")


TARGETS = ("J", "K", "F")  # grad J, grad K_tok, grad F_tok
EXACT = 1e-6  # relative error under which an objective follows a target exactly
NEAR = 0.99  # cosine above which it follows the nearest target in direction only ("~K")
ZERO = 1e-9  # gradient norms under ZERO * ||grad J|| count as 0
# rows 1-13 of docs/audit.md, cited there by number; objectives registered since follow the variants
FIRST = ("full_reverse_kl", "jsd", "kl_k1", "kl_k2", "kl_k3", "sampled_token", "sequence_kl", "topk_bregman",
         "topk_forward_kl", "topk_renorm", "topk_stopgrad", "topk_tail", "topk_unnormalized")


def variants(k: int) -> list[tuple[str, dict, str | None]]:
    """(objective, options, the target it claims): every objective that reads the teacher with its defaults
    (FIRST), the variants that matter (top-K supports, K = 1, clamps, gamma, baselines), the others by name.
    Each claims its SPECS[name].claim, but g_gamma at gamma < 1, between J and K_tok by design."""
    rows = [(name, {}) for name in FIRST] + [
        ("sampled_token", {"clamp": 0.5}), ("sampled_token", {"baseline": True}),
        ("sampled_token", {"baseline": "topk", "k": k}), ("sequence_kl", {"gamma": 0.5}),
        ("kl_k3", {"clamp": 1.0}), ("topk_unnormalized", {"k": k}), ("topk_stopgrad", {"k": k}),
        ("topk_renorm", {"k": k}), ("topk_renorm", {"k": 1}), ("topk_forward_kl", {"k": k}),
        ("topk_forward_kl", {"k": k, "m": math.log(0.1)}), ("topk_tail", {"k": k}), ("topk_tail", {"k": 1}),
        ("topk_bregman", {"k": k}),
    ] + [(name, {}) for name in sorted(OBJECTIVES) if name not in FIRST]
    return [(name, options, None if "gamma" in options else SPECS[name].claim) for name, options in rows
            if SPECS[name].uses_teacher]


# -----------------------------------------------------------------------------
# exact quantities by enumeration


@dataclass
class Problem:
    student: TabularAR
    theta: torch.Tensor  # (P,) student parameters
    teacher: TabularAR
    phi: torch.Tensor  # (Pq,) teacher parameters
    seqs: torch.Tensor  # (N, T) every sequence
    weight: torch.Tensor  # (N,) pi(y), sums to 1


def problem(cfg: AuditConfig, at_teacher: bool = False) -> Problem:
    """The toy of --seed; at_teacher: the teacher replaced by the student itself (pi = q)."""
    student, theta, teacher, phi = make_problem(cfg.vocab, cfg.horizon, cfg.coupling, cfg.seed)
    if at_teacher:
        teacher, phi = student, theta.clone()
    seqs = all_sequences(cfg.vocab, cfg.horizon)  # (N, T)
    with torch.no_grad():
        weight = student.token_logprobs(theta, seqs).sum(-1).exp()  # (N,)
    return Problem(student, theta, teacher, phi, seqs, weight)


def per_sample_grads(pb: Problem, objective: Callable, options: dict) -> torch.Tensor:
    """grad L(y) for every sequence y, (N, P): the loss of `objective` (registry calling
    convention, a per-token mean) summed over y's T positions, differentiated in theta.

    One private copy of theta per sequence, theta_rows (N, P): row n is used for sequence n only,
    so one backward pass of the batch loss gives every per-sample gradient at once."""
    # lab:audit begin
    N, T = pb.seqs.shape
    theta_rows = pb.theta.detach().expand(N, -1).clone().requires_grad_(True)  # (N, P)
    student_logits = pb.student.logits(theta_rows, pb.seqs)  # (N, T, V)
    with torch.no_grad():
        teacher_logits = pb.teacher.logits(pb.phi, pb.seqs)  # (N, T, V)
    mask = torch.ones(N, T, dtype=torch.bool)  # every position is a response token
    loss, _ = objective(student_logits, teacher_logits, pb.seqs, mask, **options)
    if not loss.requires_grad:  # no graph: the loss never reads the student; autograd.grad would raise
        return torch.zeros_like(theta_rows)  # constant in theta
    return torch.autograd.grad(loss * (N * T), theta_rows)[0]  # (N, P); * N*T undoes the per-token mean
    # lab:audit end


def expectation(grads: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(g_L, tr Cov) from the per-sample gradients grads (N, P) and the weights pi(y) (N,):

        g_L = sum_y pi(y) grad L(y)   (P,)        tr Cov = sum_y pi(y) || grad L(y) - g_L ||^2"""
    # lab:audit begin
    g = weight @ grads  # (P,)
    return g, (weight @ (grads - g).pow(2).sum(-1)).item()
    # lab:audit end


def token_divergence(pb: Problem, theta: torch.Tensor, forward: bool) -> torch.Tensor:
    """sum_y sg(pi(y)) sum_t KL at c_t (reverse KL(pi||q), or forward KL(q||pi)). Scalar.

    Differentiable in theta through the per-prefix distributions pi(.|c_t) only: the weights pi(y)
    (the distribution of the prefixes) are held fixed, so its gradient is grad K_tok (grad F_tok)."""
    # lab:audit begin
    logp = torch.log_softmax(pb.student.logits(theta, pb.seqs), -1)  # (N, T, V)
    with torch.no_grad():
        logq = torch.log_softmax(pb.teacher.logits(pb.phi, pb.seqs), -1)  # (N, T, V)
    a, b = (logq, logp) if forward else (logp, logq)
    kl = (a.exp() * (a - b)).sum(-1)  # (N, T)
    return pb.weight @ kl.sum(-1)
    # lab:audit end


def support_mass(pb: Problem, theta: torch.Tensor, k: int) -> torch.Tensor:
    """sum_y sg(pi(y)) sum_t sum_{v in S_t} pi(v|c_t), S_t the teacher's top-k at c_t. Scalar."""
    probs = torch.softmax(pb.student.logits(theta, pb.seqs), -1)  # (N, T, V)
    with torch.no_grad():
        top = pb.teacher.logits(pb.phi, pb.seqs).topk(k, -1).indices  # (N, T, k)
    return pb.weight @ probs.gather(-1, top).sum((-1, -2))


def grad_of(fn, theta: torch.Tensor) -> torch.Tensor:
    """The gradient of the scalar fn(theta) at theta, (P,)."""
    x = theta.detach().clone().requires_grad_(True)
    return torch.autograd.grad(fn(x), x)[0]


def targets(pb: Problem) -> dict[str, torch.Tensor]:
    """grad J, grad K_tok, grad F_tok, each (P,)."""
    return {"J": grad_of(lambda x: sequence_kl(pb.student, x, pb.teacher, pb.phi, pb.seqs), pb.theta),
            "K": grad_of(lambda x: token_divergence(pb, x, forward=False), pb.theta),
            "F": grad_of(lambda x: token_divergence(pb, x, forward=True), pb.theta)}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    denominator = a.norm() * b.norm()
    return (a @ b / denominator).item() if denominator > 0 else 0.0


def follows(g: torch.Tensor, goals: dict[str, torch.Tensor]) -> tuple[str, dict[str, float], dict[str, float]]:
    """Which target g follows: (verdict, cosines, relative errors), the last two by target name.

    err_X = ||g - grad X|| / ||grad X||. Verdict: "X exactly" for the target of smallest error when
    it is below EXACT; else "~X" for the target of largest cosine when it is at least NEAR; else
    "none". Targets that coincide with X (gradients equal to EXACT: J and K_tok at coupling 0) are
    a tie, named together ("J = K exactly", "~J = K"): rounding noise must not pick one of them."""
    # lab:audit begin
    cos = {t: cosine(g, goal) for t, goal in goals.items()}
    err = {t: ((g - goal).norm() / goal.norm()).item() for t, goal in goals.items()}
    best, nearest = min(err, key=err.get), max(cos, key=cos.get)
    x = best if err[best] < EXACT else nearest
    tie = " = ".join(t for t, goal in goals.items() if (goal - goals[x]).norm() < EXACT * goals[x].norm())
    verdict = tie + " exactly" if err[best] < EXACT else "~" + tie if cos[nearest] >= NEAR else "none"
    return verdict, cos, err
    # lab:audit end


# -----------------------------------------------------------------------------
# the audit


def audit_one(cfg, pb, pb_eq, goals, name, options, claims) -> dict:
    """Every number and flag of one (objective, options) row. A g_L at rounding level (||g_L|| under
    ZERO * ||grad J||) has no direction: its cosines, errors and verdict are None (printed n/a)."""
    zero = ZERO * goals["J"].norm().item()  # gradient norms and slopes under it count as 0
    grads = per_sample_grads(pb, OBJECTIVES[name], options)  # (N, P)
    g, trace_cov = expectation(grads, pb.weight)  # (P,) g_L, and tr Cov
    moves = g.norm().item() > zero
    verdict, cos, err = follows(g, goals) if moves else (None, dict.fromkeys(TARGETS), dict.fromkeys(TARGETS))
    row = dict(objective=name, options=" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in options.items()) or "-",
               claims=claims or "-", follows=verdict, g_norm=g.norm().item(), trace_cov=trace_cov,
               **{f"cos_{t}": cos[t] for t in TARGETS}, **{f"err_{t}": err[t] for t in TARGETS})
    # at pi = q: the gradient, and what a step along -g_L does to the mass on the teacher's top-K
    g_eq, _ = expectation(per_sample_grads(pb_eq, OBJECTIVES[name], options), pb_eq.weight)  # (P,)
    row["g_norm_at_q"] = g_eq.norm().item()
    mass_grad = grad_of(lambda x: support_mass(pb_eq, x, cfg.k), pb_eq.theta)  # (P,)
    row["mass_slope_at_q"] = -(mass_grad @ g_eq).item()  # d(mass)/d(step) along -g_L
    # a small step along -g_L (none along a zero gradient): does the sequence KL J go down?
    J = lambda x: sequence_kl(pb.student, x, pb.teacher, pb.phi, pb.seqs).item()  # noqa: E731
    with torch.no_grad():
        row["dJ_step"] = (J(pb.theta - cfg.step * g / g.norm()) - J(pb.theta)) if moves else 0.0
    flags = []
    if grads.norm(dim=-1).max() <= zero:
        flags.append("constant in theta")
    elif not moves:
        flags.append("zero expected gradient")
    followed = verdict.strip("~").removesuffix(" exactly").split(" = ") if verdict not in (None, "none") else [claims]
    if claims and claims not in followed:  # a tie that holds the claimed target is no wrong divergence
        flags.append(f"wrong divergence (claims {claims}, follows {' = '.join(followed)})")
    elif claims and moves and cos[claims] <= 0:
        flags.append(f"points away from {claims}")
    if abs(row["mass_slope_at_q"]) > zero:
        flags.append("drains S" if row["mass_slope_at_q"] < 0 else "fills S")
    if row["g_norm_at_q"] > zero:
        flags.append("not stationary at pi=q")
    if row["dJ_step"] > 0:
        flags.append("raises J")
    row["flags"] = "; ".join(flags) or "-"
    return row


def audit(cfg: AuditConfig) -> tuple[list[dict], dict]:
    """Every row of the table, and the problem's own numbers (J, ||grad J||, cos(K_tok, J), ..., not_audited)."""
    pb, pb_eq = problem(cfg), problem(cfg, at_teacher=True)
    goals = targets(pb)
    rows = [audit_one(cfg, pb, pb_eq, goals, name, options, claims)
            for name, options, claims in variants(cfg.k)]
    with torch.no_grad():
        info = dict(J=sequence_kl(pb.student, pb.theta, pb.teacher, pb.phi, pb.seqs).item(),
                    grad_J_norm=goals["J"].norm().item(), n_sequences=pb.seqs.shape[0],
                    n_params=pb.theta.numel(), cos_K_J=cosine(goals["K"], goals["J"]),
                    cos_F_J=cosine(goals["F"], goals["J"]),
                    not_audited=sorted(name for name in OBJECTIVES if not SPECS[name].uses_teacher))
    return rows, info


# -----------------------------------------------------------------------------
# main


def main(argv=None) -> list[dict]:
    cfg = parse_config(AuditConfig, argv, description=__doc__, preload={"objectives": load_objectives})
    torch.set_num_threads(cfg.threads)
    start = time.time()
    rows, info = audit(cfg)
    print_table(rows, info, cfg)
    try:
        wrote = save(rows, cfg.out, cfg.plots)
    except OSError as e:
        print(f"error: cannot write to --out {cfg.out!r}: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {', '.join(wrote)} in {time.time() - start:.1f} s | config {asdict(cfg)}")
    return rows


if __name__ == "__main__":
    main()
