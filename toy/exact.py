"""
The exact discrete toy: a tabular autoregressive student and teacher small enough to enumerate.

Both models generate y = (y_1..y_T) over a vocabulary of V tokens (no prompt). The next-token
logits at position t are a per-position base plus a *coupling* term that looks back at the last
`order` tokens:

    logits_t(v | y_<t) = base[t, v] + c * sum_{j=1..order, t-j >= 1} table[j, y_{t-j}, v]

The coupling strength c is shared by student and teacher. At c = 0 every token is independent of
its prefix, so no future cost r_t' (t' > t) can depend on y_t and the bias of token-level OPD,
E[ sum_t sum_{t'>t} r_t' s_t ], vanishes. As c grows, the current token steers the whole future.
The teacher looks back further than the student (order 2 vs 1 by default), so for c > 0 the
student cannot match the teacher exactly: the point where the gamma = 0 gradient vanishes then
differs from the minimiser of the sequence KL J, and the two can be told apart by their final J.

With V^T sequences in total (3^6 = 729 by default) every expectation over y ~ pi is a weighted
sum, computed exactly (float64):

    J        = sum_y pi(y) sum_t r_t(y)                                  (autograd -> grad J)
    E[g]     = sum_y pi(y) g_gamma(y)
    Var[g]   = sum_y pi(y) || g_gamma(y) - E[g] ||^2                     (trace of the covariance)
    bias_rel = || E[g] - grad J || / || grad J ||

g_gamma(y) is the gradient of nanoopd.sampled_token.g_gamma_surrogate for that one sequence, which
keeps float64 inputs in float64: "exact" means exact up to double-precision rounding, with no
sampling noise (on MPS, which has no float64, up to float32 rounding).

A model's parameters are one flat vector theta (P,) = [base (T*V), tables (order*V*V)], so that
gradients are plain vectors. Every function also accepts a per-sequence copy theta (N, P): row n
is used for sequence n only, so one backward pass yields every per-sequence gradient at once.
Training stacks the students of many runs as thetas (R, P), run r with its own sequences
y (R, n, T) (toy/runs.py); train_student is one run of train_students.
"""

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoopd.sampled_token import g_gamma_surrogate
from toy.runs import generators, inverse_cdf, surrogate_per_run, uniforms

MAX_SEQUENCES = 200_000  # V^T above this is too many sequences to enumerate in a few seconds


# -----------------------------------------------------------------------------
# the tabular autoregressive model


@dataclass(frozen=True)
class TabularAR:
    """Shape of a tabular autoregressive model; the parameters live in a separate vector theta."""
    vocab: int       # V, number of tokens
    horizon: int     # T, sequence length
    order: int       # how many previous tokens the coupling tables look at
    coupling: float  # c, strength of the dependence on the prefix (0 = independent tokens)

    @property
    def n_params(self) -> int:
        return self.horizon * self.vocab + self.order * self.vocab * self.vocab

    def logits(self, theta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Next-token logits at every position. theta: (P,) or (N, P); y: (N, T) -> (N, T, V).
        With a run axis, theta (R, P) and y (R, n, T) -> (R, n, T, V): run r's model on its sequences.

        The logits at position t read only y_<t, so y may hold anything at positions >= t.
        """
        if y.dim() == 3:
            return self.run_logits(theta, y)
        N, T, V = y.shape[0], self.horizon, self.vocab
        if theta.dim() == 1:
            theta = theta.expand(N, -1)  # (N, P) one shared copy
        base = theta[:, :T * V].view(N, T, V)  # (N, T, V)
        tables = theta[:, T * V:].view(N, self.order, V, V)  # (N, order, V, V)
        if self.coupling == 0.0:
            return base
        rows = torch.arange(N, device=y.device)[:, None]  # (N, 1)
        out = base.clone()  # (N, T, V)
        for j in range(1, min(self.order, T - 1) + 1):
            # position t >= j looks back at token y_{t-j} through table j
            out[:, j:] = out[:, j:] + self.coupling * tables[rows, j - 1, y[:, :T - j]]  # (N, T-j, V)
        return out

    def run_logits(self, thetas: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """logits() with a run axis: thetas (R, P), y (R, n, T) -> (R, n, T, V). Each run's tables are
        indexed by its own sequences, so the gradient lands on (R, P) directly."""
        (R, n, T), V = y.shape, self.vocab
        out = thetas[:, :T * V].view(R, 1, T, V).expand(R, n, T, V)  # (R, n, T, V) the base
        if self.coupling == 0.0:
            return out
        tables = thetas[:, T * V:].view(R, self.order, V, V)  # (R, order, V, V)
        runs = torch.arange(R, device=y.device)[:, None, None]  # (R, 1, 1)
        out = out.clone()
        for j in range(1, min(self.order, T - 1) + 1):
            out[:, :, j:] = out[:, :, j:] + self.coupling * tables[runs, j - 1, y[:, :, :T - j]]  # (R, n, T-j, V)
        return out

    def token_logprobs(self, theta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log p(y_t | y_<t) at every position. y: (N, T) -> (N, T), or with a run axis (R, n, T) -> (R, n, T)."""
        logp_all = F.log_softmax(self.logits(theta, y), dim=-1)  # (N, T, V)
        return logp_all.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (N, T)

    @torch.no_grad()
    def sample(self, theta: torch.Tensor, n: int, generator: torch.Generator | None = None,
               u: torch.Tensor | None = None) -> torch.Tensor:
        """Ancestral sampling of n sequences, one position at a time. Returns (n, T) token ids.

        Each token inverts its position's CDF with one uniform (toy.runs.inverse_cdf, the draw of
        nanoopd.sampling.sample): u (n, T) in (0, 1], drawn from `generator` when not given. With a
        run axis, theta (R, P) and u (R, n, T) give (R, n, T): run r's n sequences.
        """
        if u is None:
            u = 1.0 - torch.rand(n, self.horizon, generator=generator, device=theta.device)  # (n, T)
        y = torch.zeros(u.shape, dtype=torch.long, device=theta.device)  # (n, T) or (R, n, T)
        for t in range(self.horizon):
            probs = F.softmax(self.logits(theta, y)[..., t, :].float(), dim=-1)  # (..., V)
            y[..., t] = inverse_cdf(probs.reshape(-1, self.vocab), u[..., t].flatten()).view(u.shape[:-1])
        return y


def all_sequences(vocab: int, horizon: int, device="cpu") -> torch.Tensor:
    """Every sequence in {0..V-1}^T, as a (V^T, T) tensor of token ids."""
    n = vocab ** horizon
    if n > MAX_SEQUENCES:
        raise ValueError(
            f"V^T = {vocab}^{horizon} = {n} sequences is above the enumeration limit of {MAX_SEQUENCES}; "
            f"use a smaller vocabulary or horizon (e.g. V=3, T<=10 or V=4, T<=8)")
    seqs = list(itertools.product(range(vocab), repeat=horizon))
    return torch.tensor(seqs, dtype=torch.long, device=device)  # (V^T, T)


# -----------------------------------------------------------------------------
# exact quantities by enumeration


def sequence_kl(student: TabularAR, theta: torch.Tensor, teacher: TabularAR, phi: torch.Tensor,
                seqs: torch.Tensor) -> torch.Tensor:
    """J(theta) = KL(pi || q) = sum_y pi(y) (log pi(y) - log q(y)), differentiable in theta. Scalar."""
    logp = student.token_logprobs(theta, seqs).sum(-1)  # (N,) log pi(y)
    logq = teacher.token_logprobs(phi, seqs).sum(-1)  # (N,) log q(y)
    return (logp.exp() * (logp - logq)).sum()


def exact_estimator_stats(student: TabularAR, theta: torch.Tensor, teacher: TabularAR, phi: torch.Tensor,
                          gammas: list[float], seqs: torch.Tensor | None = None) -> list[dict]:
    """For each gamma: exact E[g_gamma], trace Var[g_gamma], grad J and the relative bias.

    Returns one dict per gamma with keys gamma, rel_bias, variance, grad_norm, mean_g (P,), grad_J (P,).
    """
    if seqs is None:
        seqs = all_sequences(student.vocab, student.horizon, device=theta.device)  # (N, T)
    N = seqs.shape[0]

    theta_J = theta.detach().clone().requires_grad_(True)  # (P,)
    grad_J, = torch.autograd.grad(sequence_kl(student, theta_J, teacher, phi, seqs), theta_J)  # (P,)

    # one private copy of theta per sequence: the gradient of sum_y L(y) w.r.t. row n is g_gamma(y_n)
    theta_rows = theta.detach().expand(N, -1).clone().requires_grad_(True)  # (N, P)
    logp = student.token_logprobs(theta_rows, seqs)  # (N, T)
    with torch.no_grad():
        logq = teacher.token_logprobs(phi, seqs)  # (N, T)
        weight = logp.detach().sum(-1).exp()  # (N,) pi(y), sums to 1
    mask = torch.ones_like(logp)  # (N, T) every position is a response token

    results = []
    for gamma in gammas:
        L = g_gamma_surrogate(logp, logq, mask, gamma)  # (N,)
        g, = torch.autograd.grad(L.sum(), theta_rows, retain_graph=True)  # (N, P) per-sequence g_gamma
        mean_g = weight @ g  # (P,)
        variance = (weight * (g - mean_g).pow(2).sum(-1)).sum()
        grad_norm = grad_J.norm()
        results.append(dict(gamma=gamma, rel_bias=((mean_g - grad_J).norm() / grad_norm).item(),
                            variance=variance.item(), grad_norm=grad_norm.item(),
                            mean_g=mean_g, grad_J=grad_J))
    return results


def make_problem(vocab: int, horizon: int, coupling: float, seed: int, student_order: int = 1,
                 teacher_order: int = 2, scale: float = 1.0, dtype=torch.float64, device="cpu"):
    """A (student, theta, teacher, phi) pair. The seed fixes the teacher and the student's start point.

    Parameters are drawn table by table and position by position from two seeded streams, so the
    same seed at another coupling gives the same tables (only scaled differently), and at a longer
    horizon the same first positions (the shorter problem is a prefix of the longer one). They are
    drawn in `dtype` itself, so that float32 (MPS) never touches float64: a float32 problem is of
    the same kind as the float64 one of its seed, not always the same numbers rounded.
    """
    def draw(model: TabularAR, gen: torch.Generator) -> torch.Tensor:
        V = model.vocab
        tables = [torch.randn(V * V, generator=gen, dtype=dtype) for _ in range(model.order)]
        base = [torch.randn(V, generator=gen, dtype=dtype) for _ in range(model.horizon)]
        return (torch.cat(base + tables) * scale).to(device=device, dtype=dtype)  # (P,)

    teacher = TabularAR(vocab, horizon, teacher_order, coupling)
    student = TabularAR(vocab, horizon, student_order, coupling)
    phi = draw(teacher, torch.Generator().manual_seed(2 * seed))  # (Pq,)
    theta = draw(student, torch.Generator().manual_seed(2 * seed + 1))  # (P,)
    return student, theta, teacher, phi


# -----------------------------------------------------------------------------
# training a student from sampled batches


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """'sgd' (plain, no momentum) or 'adam'."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}: use 'sgd' or 'adam'")


def sequence_kls(student: TabularAR, thetas: torch.Tensor, teacher: TabularAR, phi: torch.Tensor,
                 seqs: torch.Tensor) -> torch.Tensor:
    """J of every run at once: thetas (R, P) -> (R,), run r's KL(pi_r || q) by enumeration."""
    logp = student.token_logprobs(thetas, seqs.expand(thetas.shape[0], -1, -1)).sum(-1)  # (R, N)
    logq = teacher.token_logprobs(phi, seqs).sum(-1)  # (N,)
    return (logp.exp() * (logp - logq)).sum(-1)  # (R,)


def train_students(student: TabularAR, theta0: torch.Tensor, teacher: TabularAR, phi: torch.Tensor,
                   gammas: list[float], seeds: list[int], steps: int, batch_size: int | None, lr: float,
                   optimizer: str = "sgd", eval_every: int = 10) -> dict:
    """R = len(gammas) runs at once (toy/runs.py), run r descending the batch mean of
    g_gamma_surrogate with gammas[r], its rollouts sampled from its own current student with seeds[r].

    batch_size=None replaces the sampled batch by every sequence weighted by sg(pi(y)), so the step
    is the exact expected gradient E[g_gamma]: the same run without sampling noise (seeds unused).
    Comparing the two separates what gamma costs through bias (the noise-free run) from what it costs
    through variance (the gap between the sampled run and the noise-free one).

    With plain SGD the step is proportional to the sampled g_gamma, so its variance shows up
    directly in the trajectory; Adam rescales every coordinate and hides part of it.
    The exact sequence KL J of every run is evaluated by enumeration every `eval_every` steps. A run
    is unstable when J becomes non-finite or when it ends above where it started.
    Returns dict(steps [S], kl (S, R), final_kl (R,), unstable (R,) bool), S the evaluations.
    """
    R, B, T = len(gammas), batch_size, student.horizon
    seqs = all_sequences(student.vocab, T, device=theta0.device)  # (N, T)
    gens = generators(seeds, theta0.device) if batch_size is not None else []
    thetas = theta0.detach().expand(R, -1).clone().requires_grad_(True)  # (R, P) one student per run
    opt = make_optimizer(optimizer, [thetas], lr)  # element-wise: R independent optimizers
    logged_steps, kls = [], []
    with torch.no_grad():
        logq_all = teacher.token_logprobs(phi, seqs)  # (N, T) the teacher on every sequence, once

    def log(step):
        with torch.no_grad():
            logged_steps.append(step)
            kls.append(sequence_kls(student, thetas, teacher, phi, seqs))  # (R,)

    log(0)
    for step in range(1, steps + 1):
        if batch_size is None:
            y = seqs.expand(R, -1, -1)  # (R, N, T) every sequence for every run
        else:
            y = student.sample(thetas.detach(), B, u=uniforms(gens, B, T, theta0.device))  # (R, B, T)
        n = y.shape[1]  # sequences per run
        logp = student.token_logprobs(thetas, y)  # (R, n, T)
        with torch.no_grad():
            if batch_size is None:  # the same sequences at every step
                logq = logq_all.expand(R, -1, -1)  # (R, N, T)
            else:
                logq = teacher.token_logprobs(phi, y.reshape(R * n, T)).view(R, n, T)  # (R, n, T)
            # weight of each row in the estimate: pi(y) over all sequences, or 1/B over a sample
            weight = logp.sum(-1).exp() if batch_size is None else torch.full_like(logp[..., 0], 1 / B)  # (R, n)
        loss = (weight * surrogate_per_run(logp, logq, gammas)).sum()  # sum over runs of each run's estimate
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            log(step)
    kl = torch.stack(kls).cpu()  # (S, R)
    unstable = ~torch.isfinite(kl).all(0) | ~(kl[-1] <= kl[0])  # (R,) non-finite, or ends above its start
    return dict(steps=logged_steps, kl=kl, final_kl=kl[-1], unstable=unstable)


def train_student(student: TabularAR, theta0: torch.Tensor, teacher: TabularAR, phi: torch.Tensor,
                  gamma: float, steps: int, batch_size: int | None, lr: float, seed: int,
                  optimizer: str = "sgd", eval_every: int = 10) -> dict:
    """One run of train_students. Returns dict(steps, kl, final_kl, unstable) as plain Python numbers."""
    res = train_students(student, theta0, teacher, phi, [gamma], [seed], steps, batch_size, lr, optimizer, eval_every)
    return dict(steps=res["steps"], kl=res["kl"][:, 0].tolist(), final_kl=res["final_kl"][0].item(),
                unstable=bool(res["unstable"][0]))
