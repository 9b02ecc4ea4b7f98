"""
Many independent training runs as one computation: the run axis R.

A study trains one model per (gamma, seed). Each run's parameters are one slice of a stacked tensor
with a leading run axis, (R, ...), and every step works on all R slices at once: a few large kernels
instead of R loops of tiny ones. The runs stay independent because

- each run's loss is its own: the step descends sum_r L_r, whose gradient in run r's slice is grad L_r;
- SGD and Adam act element by element, so one optimizer over the stacked tensors is R optimizers;
- each run draws its randomness from its own seeded torch.Generator, in the order a run alone would.

So a run gives the same result (up to float rounding of the batched kernels) whichever runs share its
batch, and alone (tests/test_toy_batched.py). Gamma differs between runs: the library's
g_gamma_surrogate takes one gamma, so it is called once per distinct gamma, on that gamma's runs.
"""

import torch

from nanoopd.sampled_token import g_gamma_surrogate


def generators(seeds: list[int], device) -> list[torch.Generator]:
    """One seeded generator per run."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def uniforms(gens: list[torch.Generator], n: int, T: int, device) -> torch.Tensor:
    """(R, n, T) uniforms in (0, 1], run r's from gens[r] (the draws of nanoopd.sampling.sample)."""
    return torch.stack([1.0 - torch.rand(n, T, generator=g, device=device) for g in gens])  # (R, n, T)


def normals(gens: list[torch.Generator], n: int, T: int, device) -> torch.Tensor:
    """(R, n, T) standard normals, run r's from gens[r]. Drawn as (T, n): column t holds the t-th
    block of n, the same numbers as T successive draws of n (one per move) when n is a multiple of 16."""
    return torch.stack([torch.randn(T, n, generator=g, device=device).T for g in gens])  # (R, n, T)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """y = #{v : F_v < u Z} for probs (N, V) and u (N,) in (0, 1]: P(y = v) = p_v / Z, as in
    nanoopd.sampling.sample; torch's multinomial kernel can return out-of-range ids on MPS)."""
    cdf = probs.cumsum(-1)  # (N, V)
    return (cdf < u[:, None] * cdf[:, -1:]).sum(-1)  # (N,)


def surrogate_per_run(logp: torch.Tensor, logq: torch.Tensor, gammas: list[float]) -> torch.Tensor:
    """g_gamma_surrogate of every sequence of every run, run r with its own gammas[r].

    logp, logq: (R, B, T) per-token log-probs of student (with grad) and teacher. Returns (R, B)."""
    R, B, T = logp.shape
    groups = {g: [r for r in range(R) if gammas[r] == g] for g in dict.fromkeys(gammas)}  # each distinct gamma once
    out = None
    for gamma, runs in groups.items():
        n = len(runs)
        idx = torch.tensor(runs, device=logp.device)  # (R_g,) the runs of this gamma
        mask = torch.ones(n * B, T, dtype=logp.dtype, device=logp.device)  # (R_g * B, T) every position counts
        L = g_gamma_surrogate(logp[idx].reshape(n * B, T), logq[idx].reshape(n * B, T), mask, float(gamma))
        if n == R:
            return L.view(R, B)  # one gamma for all runs
        out = L.new_zeros(R, B) if out is None else out  # (R, B)
        out = out.index_copy(0, idx, L.view(n, B))
    return out
