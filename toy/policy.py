"""
The policy of the continuous-control replica (toy/continuous.py): a small MLP that reads the context
c_t = (task sign, s_t / 3, t / T) and outputs a Gaussian over the move, delta_t ~ N(mu(c_t), sigma(c_t)^2).
GaussianPolicy is one run; PolicyStack evaluates R runs at once, every weight with a leading run axis.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class GaussianPolicy(nn.Module):
    """c_t = (task sign, s_t / 3, t / T) -> N(mu, sigma^2) over the move delta_t. One run: it fixes
    the architecture and the initialisation that PolicyStack stacks."""

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


def gaussian_log_prob(delta: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(delta; mu, std^2), element-wise."""
    return -0.5 * ((delta - mu) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)


class PolicyStack:
    """R Gaussian MLP policies evaluated at once: each weight has a leading run axis R.

        h1 = tanh(ctx W1 + b1),  h = tanh(h1 W2 + b2),  out = h W3 + b3       (R, N, .) batched matmuls
        mu = out[..., 0],  sigma = min_std + softplus(out[..., 1])

    W3, b3 form the output layer, the "head" whose gradient variance the study measures. Run r starts
    from the weights of GaussianPolicy(hidden) under torch.manual_seed(seeds[r]).
    """

    def __init__(self, weights: list[torch.Tensor], min_std: float = 0.05):
        self.weights, self.min_std = weights, min_std  # [W1 (R,3,H), b1 (R,1,H), W2 (R,H,H), b2, W3 (R,H,2), b3 (R,1,2)]

    @classmethod
    def init(cls, seeds: list[int], hidden: int, device) -> "PolicyStack":
        per_run = []
        for seed in seeds:
            torch.manual_seed(seed)
            m = GaussianPolicy(hidden)
            per_run.append([p.detach().T if p.dim() == 2 else p.detach()[None]  # W: (in, out); b: (1, out)
                            for layer in (m.body[0], m.body[2], m.head) for p in (layer.weight, layer.bias)])
        return cls([torch.stack(w).to(device) for w in zip(*per_run)], m.min_std)

    def select(self, runs: list[int]) -> "PolicyStack":
        """The policies of the given runs, in that order (a copy)."""
        idx = torch.tensor(runs, device=self.weights[0].device)
        return PolicyStack([w[idx] for w in self.weights], self.min_std)

    def folded(self) -> list[torch.Tensor]:
        """The weights as features() applies them (see there); differentiable in self.weights."""
        W1, b1, W2, b2, W3, b3 = self.weights
        return [2 * W1, 2 * b1, 4 * W2, 2 * (b2 - W2.sum(1, keepdim=True)), 2 * W3, b3 - W3.sum(1, keepdim=True)]

    def features(self, ctx: torch.Tensor, folded: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ctx (R, N, 3) -> s (R, N, H), the last hidden layer as h = 2 s - 1, and the head's output (R, N, 2).

        tanh(z) = 2 sigmoid(2z) - 1, and the factors and the -1 fold into the next layer's weights:
        with h1 = 2 s1 - 1, 2 (h1 W2 + b2) = s1 (4 W2) + 2 (b2 - 1 W2), and h W3 + b3 = s (2 W3) + b3 - 1 W3,
        1 W the sums of W's rows. The same function with two passes over the large (R, N, H)
        activations per layer instead of five: torch's CPU tanh is several times slower than its
        sigmoid, and these passes were most of a step. `folded` (from folded()) saves refolding
        the weights at every move of a rollout.
        """
        A1, c1, A2, c2, A3, c3 = folded or self.folded()
        s1 = torch.baddbmm(c1, ctx, A1).sigmoid()  # (R, N, H), h1 = tanh(ctx W1 + b1) = 2 s1 - 1
        s = torch.baddbmm(c2, s1, A2).sigmoid()  # (R, N, H), h = 2 s - 1
        return s, torch.baddbmm(c3, s, A3)  # (R, N, H), (R, N, 2)

    def gaussian(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head output (..., 2) -> mu (...), sigma (...)."""
        return out[..., 0], self.min_std + F.softplus(out[..., 1])

    def __call__(self, ctx: torch.Tensor, folded: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ctx (R, N, 3) -> mu, sigma (R, N)."""
        return self.gaussian(self.features(ctx, folded)[1])

    def log_prob(self, ctx: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """log N(delta; mu(ctx), sigma(ctx)^2). ctx (R, B, T, 3), delta (R, B, T) -> (R, B, T)."""
        R, B, T = delta.shape
        mu, std = self(ctx.view(R, B * T, 3))  # (R, B*T) each
        return gaussian_log_prob(delta, mu.view(R, B, T), std.view(R, B, T))
