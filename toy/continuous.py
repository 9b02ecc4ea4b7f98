"""
The continuous-control replica: on-policy distillation of two 1-D reaching tasks into one student.

A point starts at a position s on a line and makes T moves, s_{t+1} = s_t + delta_t. There are two
mirror tasks:

    task 0: start s_0 = +2, target -3          task 1: start s_0 = -2, target +3

A policy is a small MLP that reads the context c_t = (task sign, s_t / 3, t / T) and outputs a
Gaussian over the move, delta_t ~ N(mu(c_t), sigma(c_t)^2). Each task gets its own teacher q_task,
trained with REINFORCE on the shaped reward -|s_{t+1} - target| (the cost-to-go is the return).
A single student pi, which sees the task only through its input, is then distilled on alternating
tasks: roll out a batch from pi on task k, score every move under q_k, and descend the g_gamma
surrogate with the per-step log-ratio (a cost)

    r_t = log pi(delta_t | c_t) - log q_k(delta_t | c_t).

The moves are sampled (no reparameterisation), so the positions are data and the only path from
theta to the loss is log pi(delta_t | c_t): exactly the setting of DESIGN.md section 3, with a
Gaussian density in place of a softmax.

Gradient variance is measured as in the published study: the batch of 64 rollouts is split into 8
micro-batches of 8, the gradient of the output layer ("head") is taken on each, and we record the
trace of the sample covariance of those 8 gradients.

Where the student ends up is measured by `drift` (the share of end points nearer the other task's
target, and the distance to the own target), and where it goes on the way by `visitation` (the
state-visitation frequency over position and time, the heatmaps of the published study).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoopd.sampled_token import g_gamma_surrogate, returns_to_go

STARTS = (2.0, -2.0)    # s_0 of task 0 and task 1
TARGETS = (-3.0, 3.0)   # where each task should end
POSITION_SCALE = 3.0    # positions are divided by this before entering the network
MISS_TOL = 1.0          # an end point farther than this from its target has missed it (drift)
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}  # the student's; SGD is plain (no momentum)


# -----------------------------------------------------------------------------
# the Gaussian policy


class GaussianPolicy(nn.Module):
    """c_t = (task sign, s_t / 3, t / T) -> N(mu, sigma^2) over the move delta_t."""

    def __init__(self, hidden: int = 32, min_std: float = 0.05, init_std: float = 0.5):
        super().__init__()
        self.min_std = min_std
        self.body = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, 2)  # the output layer: (mu, pre-softplus std)
        with torch.no_grad():  # start with sigma = init_std everywhere
            self.head.bias[1] = math.log(math.expm1(init_std - min_std))

    def forward(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ctx: (..., 3) -> mu (...), sigma (...)."""
        out = self.head(self.body(ctx))  # (..., 2)
        return out[..., 0], self.min_std + F.softplus(out[..., 1])

    def log_prob(self, ctx: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """log N(delta; mu(ctx), sigma(ctx)^2). ctx: (B, T, 3), delta: (B, T) -> (B, T)."""
        mu, std = self(ctx)  # (B, T), (B, T)
        return -0.5 * ((delta - mu) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)


@torch.no_grad()
def rollout(policy: GaussianPolicy, task: int, n: int, horizon: int,
            generator: torch.Generator | None = None) -> dict:
    """Sample n episodes of task `task`.

    Returns dict(ctx (n, T, 3), delta (n, T), pos (n, T+1)): the contexts the policy saw, the moves
    it made and the positions s_0..s_T.
    """
    device = next(policy.parameters()).device
    sign = 1.0 if task == 0 else -1.0
    s = torch.full((n,), STARTS[task], device=device)  # (n,)
    ctx, deltas, pos = [], [], [s]
    for t in range(horizon):
        c = torch.stack([torch.full_like(s, sign), s / POSITION_SCALE, torch.full_like(s, t / horizon)], -1)  # (n, 3)
        mu, std = policy(c)  # (n,), (n,)
        d = mu + std * torch.randn(n, generator=generator, device=device)  # (n,)
        s = s + d
        ctx.append(c)
        deltas.append(d)
        pos.append(s)
    return dict(ctx=torch.stack(ctx, 1), delta=torch.stack(deltas, 1), pos=torch.stack(pos, 1))


# -----------------------------------------------------------------------------
# teachers: REINFORCE on the shaped reward


def train_teacher(task: int, horizon: int, steps: int, batch_size: int, lr: float, seed: int,
                  hidden: int = 32, device="cpu", progress=None) -> GaussianPolicy:
    """REINFORCE with a per-step baseline.

    Cost per move k_t = |s_{t+1} - target|; cost-to-go K_t = sum_{t' >= t} k_t' (returns_to_go with
    gamma = 1); loss = mean_b sum_t (K_t - mean_b K_t) log pi(delta_t | c_t), whose gradient is the
    REINFORCE estimate of grad E[sum_t k_t].
    """
    torch.manual_seed(seed)
    policy = GaussianPolicy(hidden).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    mask = torch.ones(batch_size, horizon, device=device)  # (B, T)
    for _ in range(steps):
        ep = rollout(policy, task, batch_size, horizon, gen)
        cost = (ep["pos"][:, 1:] - TARGETS[task]).abs()  # (B, T)
        K = returns_to_go(cost, mask, 1.0)  # (B, T)
        adv = K - K.mean(0, keepdim=True)  # (B, T)
        loss = (adv * policy.log_prob(ep["ctx"], ep["delta"])).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress.update(1)
    policy.requires_grad_(False)
    return policy


# -----------------------------------------------------------------------------
# the student: alternating-task OPD with g_gamma


def head_grad_variance(micro_losses: torch.Tensor, head: nn.Linear) -> float:
    """Trace of the sample covariance of the head's gradients over micro-batches. micro_losses: (M,)."""
    grads = []
    for loss in micro_losses:
        gw, gb = torch.autograd.grad(loss, [head.weight, head.bias], retain_graph=True)
        grads.append(torch.cat([gw.flatten(), gb]))  # (P_head,)
    G = torch.stack(grads)  # (M, P_head)
    return G.var(dim=0, unbiased=True).sum().item()


def distill_student(teachers: list[GaussianPolicy], gamma: float, horizon: int, steps: int,
                    batch_size: int, micro_batches: int, lr: float, seed: int, hidden: int = 32,
                    device="cpu", progress=None, optimizer: str = "adam") -> tuple[GaussianPolicy, list[dict]]:
    """OPD of one student from both teachers, task = step mod 2.

    Each step: rollout of batch_size episodes from the student, loss = mean of g_gamma_surrogate
    (gradient g_gamma), then an optimizer step: "adam" (each parameter's step is normalised by a
    running estimate of its gradient's scale) or "sgd" (plain SGD, no momentum: the step is lr
    times the sampled g_gamma itself, so its variance reaches the parameters unnormalised). Before
    the step, the head-gradient variance over `micro_batches` equal micro-batches is recorded. Returns (student, log) with one dict per step:
    step, task, variance, kl_per_step (mean r_t over the batch, a single-sample estimate of the
    per-step KL), final_pos (mean s_T).
    """
    if batch_size % micro_batches:
        raise ValueError(f"batch size {batch_size} is not divisible into {micro_batches} micro-batches")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    torch.manual_seed(seed)
    student = GaussianPolicy(hidden).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    opt = OPTIMIZERS[optimizer](student.parameters(), lr=lr)
    mask = torch.ones(batch_size, horizon, device=device)  # (B, T)
    log = []
    for step in range(steps):
        task = step % 2
        ep = rollout(student, task, batch_size, horizon, gen)
        logp = student.log_prob(ep["ctx"], ep["delta"])  # (B, T)
        logq = teachers[task].log_prob(ep["ctx"], ep["delta"])  # (B, T), no grad (frozen)
        L = g_gamma_surrogate(logp, logq, mask, gamma)  # (B,)
        micro = L.view(micro_batches, -1).mean(1)  # (M,)
        variance = head_grad_variance(micro, student.head)
        opt.zero_grad(set_to_none=True)
        L.mean().backward()
        opt.step()
        log.append(dict(step=step, task=task, variance=variance,
                        kl_per_step=(logp - logq).mean().item(), final_pos=ep["pos"][:, -1].mean().item()))
        if progress is not None:
            progress.update(1)
    return student, log


def trajectories(policy: GaussianPolicy, horizon: int, n: int, seed: int) -> list[torch.Tensor]:
    """Positions s_0..s_T of n sampled episodes per task: [ (n, T+1) for task 0, (n, T+1) for task 1 ], on the CPU."""
    device = next(policy.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    return [rollout(policy, task, n, horizon, gen)["pos"].cpu() for task in (0, 1)]


def final_positions(policy: GaussianPolicy, horizon: int, n: int, seed: int) -> list[torch.Tensor]:
    """s_T of n sampled episodes per task: [ (n,) for task 0, (n,) for task 1 ], on the CPU."""
    return [pos[:, -1] for pos in trajectories(policy, horizon, n, seed)]


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
