"""
The continuous-control replica: on-policy distillation of two 1-D reaching tasks into one student.

A point starts at a position s on a line and makes T moves, s_{t+1} = s_t + delta_t. There are two
mirror tasks:

    task 0: start s_0 = +2, target -3          task 1: start s_0 = -2, target +3

A policy is a small MLP (toy/policy.py) that reads the context c_t = (task sign, s_t / 3, t / T)
and outputs a Gaussian over the move, delta_t ~ N(mu(c_t), sigma(c_t)^2). Each task gets its own
teacher q_task, trained with REINFORCE on the shaped reward -|s_{t+1} - target| (the cost-to-go is
the return). A single student pi, which sees the task only through its input, is then distilled on
alternating tasks: roll out a batch from pi on task k, score every move under q_k, and descend the
g_gamma surrogate with the per-step log-ratio (a cost)

    r_t = log pi(delta_t | c_t) - log q_k(delta_t | c_t).

The moves are sampled (no reparameterisation), so the positions are data and the only path from
theta to the loss is log pi(delta_t | c_t): exactly the setting of docs/design.md#discounted-returns-and-the-sequence-kl, with a
Gaussian density in place of a softmax.

Gradient variance is measured as in the published study: the batch of 64 rollouts is split into 8
micro-batches of 8, the gradient of the output layer ("head") is taken on each, and we record the
trace of the sample covariance of those 8 gradients.

Where the student ends up is measured by `drift` (the share of end points nearer the other task's
target, and the distance to the own target), and where it goes on the way by `visitation` (the
state-visitation frequency over position and time, the heatmaps of the published study).

Every run of a study is trained at once (toy/runs.py): R policies are one PolicyStack, whose weights
carry a leading run axis, and every tensor below is (R, ...). Run r is initialised and sampled from
its own seed, so it ends the same (up to float rounding) alone or with any other runs.
"""

import math

import torch

from nanoopd.sampled_token import returns_to_go
from toy.policy import PolicyStack, gaussian_log_prob
from toy.runs import generators, normals, surrogate_per_run

STARTS = (2.0, -2.0)    # s_0 of task 0 and task 1
TARGETS = (-3.0, 3.0)   # where each task should end
POSITION_SCALE = 3.0    # positions are divided by this before entering the network
MISS_TOL = 1.0          # an end point farther than this from its target has missed it (drift)
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}  # the student's; SGD is plain (no momentum)
OPT_NAMES = {"adam": "Adam", "sgd": "SGD"}  # their names in tables and figures


# -----------------------------------------------------------------------------
# episodes


@torch.no_grad()
def rollout(policy: PolicyStack, task: torch.Tensor, noise: torch.Tensor) -> dict:
    """Sample episodes: run r plays task[r] (R,) with the moves' standard normals noise (R, n, T).

    Returns dict(ctx (R, n, T, 3), delta (R, n, T), pos (R, n, T+1)): the contexts the policies saw,
    the moves they made and the positions s_0..s_T.
    """
    R, n, T = noise.shape
    starts, signs = torch.tensor(STARTS, device=noise.device), torch.tensor([1.0, -1.0], device=noise.device)
    sign = signs[task][:, None].expand(R, n)  # (R, n)
    s = starts[task][:, None].expand(R, n)  # (R, n)
    ctx, deltas, pos, folded = [], [], [s], policy.folded()
    for t in range(T):
        c = torch.stack([sign, s / POSITION_SCALE, torch.full_like(s, t / T)], -1)  # (R, n, 3)
        mu, std = policy(c, folded)  # (R, n), (R, n)
        d = mu + std * noise[:, :, t]  # (R, n)
        s = s + d
        ctx.append(c)
        deltas.append(d)
        pos.append(s)
    return dict(ctx=torch.stack(ctx, 2), delta=torch.stack(deltas, 2), pos=torch.stack(pos, 2))


# -----------------------------------------------------------------------------
# teachers: REINFORCE on the shaped reward


def train_teachers(tasks: list[int], seeds: list[int], horizon: int, steps: int, batch_size: int, lr: float,
                   hidden: int = 32, device="cpu", progress=None) -> PolicyStack:
    """One teacher per run r: task tasks[r], initialised and sampled with seeds[r]. REINFORCE with a
    per-step baseline.

    Cost per move k_t = |s_{t+1} - target|; cost-to-go K_t = sum_{t' >= t} k_t' (returns_to_go with
    gamma = 1); loss = mean_b sum_t (K_t - mean_b K_t) log pi(delta_t | c_t), whose gradient is the
    REINFORCE estimate of grad E[sum_t k_t].
    """
    R, B, T = len(tasks), batch_size, horizon
    policy = PolicyStack.init(seeds, hidden, device)
    for w in policy.weights:
        w.requires_grad_(True)
    gens = generators(seeds, device)
    opt = torch.optim.Adam(policy.weights, lr=lr)  # element-wise: one Adam per run
    task = torch.tensor(tasks, device=device)  # (R,)
    target = torch.tensor(TARGETS, device=device)[task].view(R, 1, 1)  # (R, 1, 1)
    mask = torch.ones(R * B, T, device=device)  # (R*B, T)
    for _ in range(steps):
        ep = rollout(policy, task, normals(gens, B, T, device))
        cost = (ep["pos"][..., 1:] - target).abs()  # (R, B, T)
        K = returns_to_go(cost.view(R * B, T), mask, 1.0).view(R, B, T)  # (R, B, T)
        adv = K - K.mean(1, keepdim=True)  # (R, B, T)
        loss = (adv * policy.log_prob(ep["ctx"], ep["delta"])).sum(2).mean(1).sum()  # sum over runs
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress.update(R)
    for w in policy.weights:
        w.requires_grad_(False)
    return policy


# -----------------------------------------------------------------------------
# the students: alternating-task OPD with g_gamma


def distill_students(teachers: tuple[PolicyStack, PolicyStack], gammas: list[float], seeds: list[int], horizon: int,
                     steps: int, batch_size: int, micro_batches: int, lr: float, hidden: int = 32, device="cpu",
                     progress=None, optimizer: str = "adam") -> tuple[PolicyStack, dict]:
    """OPD of R = len(gammas) students at once, task = step mod 2: student r follows g_gamma with
    gammas[r], is initialised and sampled with seeds[r], and is scored by teachers[task] row r.

    Each step: rollout of batch_size episodes from every student, loss = mean of g_gamma_surrogate
    (gradient g_gamma), then an optimizer step: "adam" (each parameter's step is normalised by a
    running estimate of its gradient's scale) or "sgd" (plain SGD, no momentum: the step is lr times
    the sampled g_gamma itself, so its variance reaches the parameters unnormalised).

    Head-gradient variance: the batch is split into M = micro_batches equal micro-batches; for micro-
    batch m the head gradient is G_m = grad of mean_{b in m} L_b w.r.t. (W3, b3), and we record
    sum over entries of the unbiased variance of G_1..G_M. The head is linear, out = h W3 + b3, so
    with e = dL/d out per episode and time step, G_m = (M/B) sum_{b in m, t} (e_bt^T h_bt, e_bt): one
    backward pass gives every G_m of every run.
    Returns (students, log) with log of (steps, R) tensors: variance, kl_per_step (mean r_t over the
    batch, a single-sample estimate of the per-step KL), final_pos (mean s_T); task (steps,).
    """
    if batch_size % micro_batches:
        raise ValueError(f"batch size {batch_size} is not divisible into {micro_batches} micro-batches")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    R, B, T, M = len(gammas), batch_size, horizon, micro_batches
    student = PolicyStack.init(seeds, hidden, device)
    for w in student.weights:
        w.requires_grad_(True)
    gens = generators(seeds, device)
    opt = OPTIMIZERS[optimizer](student.weights, lr=lr)  # element-wise: one optimizer per run
    log = dict(variance=[], kl_per_step=[], final_pos=[])
    for step in range(steps):
        task = step % 2
        ep = rollout(student, torch.full((R,), task, device=device), normals(gens, B, T, device))
        s, out = student.features(ep["ctx"].view(R, B * T, 3))  # (R, B*T, H) with h = 2 s - 1, (R, B*T, 2)
        out.retain_grad()
        mu, std = student.gaussian(out)  # (R, B*T) each
        logp = gaussian_log_prob(ep["delta"], mu.view(R, B, T), std.view(R, B, T))  # (R, B, T)
        logq = teachers[task].log_prob(ep["ctx"], ep["delta"])  # (R, B, T), frozen
        L = surrogate_per_run(logp, logq, gammas)  # (R, B)
        opt.zero_grad(set_to_none=True)
        L.mean(1).sum().backward()  # sum over runs of each run's batch mean
        with torch.no_grad():
            e = M * out.grad.view(R * M, -1, 2)  # (R*M, B/M*T, 2): grad of each micro-batch mean per row
            Gw = torch.baddbmm(-e.sum(1)[:, :, None], e.transpose(1, 2), s.view(R * M, -1, hidden), alpha=2)  # e^T h
            G = torch.cat([Gw.flatten(1), e.sum(1)], -1).view(R, M, -1)  # (R, M, 2*H + 2) head gradients
            log["variance"].append(G.var(dim=1, unbiased=True).sum(-1))  # (R,)
            log["kl_per_step"].append((logp - logq).mean((1, 2)))  # (R,)
            log["final_pos"].append(ep["pos"][..., -1].mean(1))  # (R,)
        opt.step()
        if progress is not None:
            progress.update(R)
    for w in student.weights:
        w.requires_grad_(False)
    return student, {k: torch.stack(v).cpu() for k, v in log.items()} | dict(task=torch.arange(steps) % 2)


def trajectories(policy: PolicyStack, horizon: int, n: int, seeds: list[int]) -> torch.Tensor:
    """Positions s_0..s_T of n sampled episodes per task and run, (R, 2, n, T+1) on the CPU: run r
    samples task 0, then task 1, from a generator seeded with seeds[r]."""
    R, device = len(seeds), policy.weights[0].device
    gens = generators(seeds, device)
    paths = [rollout(policy, torch.full((R,), task, device=device), normals(gens, n, horizon, device))["pos"]
             for task in (0, 1)]  # [(R, n, T+1)] * 2; every run's draws for task 0 come before its task 1's
    return torch.stack(paths, 1).cpu()  # (R, 2, n, T+1)


# -----------------------------------------------------------------------------
# where the student ends up, and where it goes


def drift(final_positions: torch.Tensor, task: int, tol: float = MISS_TOL) -> dict:
    """How far end points s_T of task k drift from the task's target. final_positions: (n,).

    With the own target z_k = TARGETS[k] and the other task's target z_{1-k}:

        other     = (1/n) #{ i : |s_T^i - z_{1-k}| < |s_T^i - z_k| }   share nearer the other target
        missed    = (1/n) #{ i : |s_T^i - z_k| > tol }                 share farther than tol from the own target
        dist      = (1/n) sum_i |s_T^i - z_k|                          mean distance to the own target
        dist_sd   = standard deviation of |s_T^i - z_k| over the n end points (0 when n = 1)
        diverged  = (1/n) #{ i : s_T^i not finite }

    `other` counts the end points on the wrong side (here s_T^i on the other side of 0), `missed`
    also those that overshoot on the own side. A tie (equally near both targets) is not nearer the
    other target. A non-finite end point has distance inf: it counts in `missed` and `diverged`,
    not in `other`, and makes `dist` inf. Returns dict(other, missed, dist, dist_sd, diverged, n).
    """
    s = final_positions.detach().float().flatten()  # (n,); float32: no float64 on the MPS path
    if s.numel() == 0:
        raise ValueError("drift needs at least one end point")
    finite = torch.isfinite(s)
    d_own = torch.where(finite, (s - TARGETS[task]).abs(), torch.full_like(s, math.inf))  # (n,)
    d_other = (s - TARGETS[1 - task]).abs()  # (n,), nan where s is nan: compares False
    n = s.numel()
    return dict(other=((d_other < d_own) & finite).sum().item() / n, missed=(d_own > tol).sum().item() / n,
                dist=d_own.mean().item(), dist_sd=d_own.std(unbiased=True).item() if n > 1 else 0.0,
                diverged=(~finite).sum().item() / n, n=n)


def visitation(positions: torch.Tensor, lo: float, hi: float, bins: int) -> torch.Tensor:
    """State-visitation frequency: share of episodes in each position bin at each time step.

    positions: (n, T+1), s_0..s_T of n episodes -> (bins, T+1); column t is the histogram of s_t over
    `bins` equal bins of [lo, hi], divided by n, so every column sums to 1. Positions outside [lo, hi]
    are counted in the edge bins; non-finite ones in none (such a column sums to less than 1).
    """
    s = positions.detach().float()  # (n, T+1); float32: no float64 on the MPS path
    n, steps = s.shape
    finite = torch.isfinite(s)
    idx = ((s.clamp(lo, hi) - lo) / (hi - lo) * bins).floor().clamp(0, bins - 1)  # (n, T+1)
    idx = torch.where(finite, idx, torch.zeros_like(idx)).long()
    freq = torch.zeros(bins, steps)
    freq.scatter_add_(0, idx, finite.float())
    return freq / n
