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
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoopd.sampled_token import g_gamma_surrogate, returns_to_go

STARTS = (2.0, -2.0)    # s_0 of task 0 and task 1
TARGETS = (-3.0, 3.0)   # where each task should end
POSITION_SCALE = 3.0    # positions are divided by this before entering the network


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
                    device="cpu", progress=None) -> tuple[GaussianPolicy, list[dict]]:
    """OPD of one student from both teachers, task = step mod 2.

    Each step: rollout of batch_size episodes from the student, loss = mean of g_gamma_surrogate
    (gradient g_gamma), Adam step. Before the step, the head-gradient variance over `micro_batches`
    equal micro-batches is recorded. Returns (student, log) with one dict per step:
    step, task, variance, kl_per_step (mean r_t over the batch, a single-sample estimate of the
    per-step KL), final_pos (mean s_T).
    """
    if batch_size % micro_batches:
        raise ValueError(f"batch size {batch_size} is not divisible into {micro_batches} micro-batches")
    torch.manual_seed(seed)
    student = GaussianPolicy(hidden).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
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


def final_positions(policy: GaussianPolicy, horizon: int, n: int, seed: int) -> list[torch.Tensor]:
    """s_T of n sampled episodes per task: [ (n,) for task 0, (n,) for task 1 ], on the CPU."""
    device = next(policy.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    return [rollout(policy, task, n, horizon, gen)["pos"][:, -1].cpu() for task in (0, 1)]
