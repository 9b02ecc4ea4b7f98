"""Sampling distribution vs estimator, exactly: sampled-token OPD (g_0) and the g_gamma family
estimate grad KL(pi || q) only when the rollouts are drawn from pi itself.

The same tabular policy as test_objectives_gamma.py: V = 3 tokens, horizon T = 4, the logits of y_t
a table indexed by (t, y_{t-1}), so all 81 responses are listed with their probabilities. Each
response y gets its per-sequence gradient g_gamma(y) from the estimator the objectives use
(sampled_token.discounted_opd: gamma = 0 is sampled-token OPD, gamma = 1 is sequence_kl), and the
expectation is weighted by the probability of y under the SAMPLER: the rollout's own distribution,
built with rollout.filter_logits exactly as generate() builds it at every step,

    E_s[g] = sum_y s(y) g(y),    s(y) = prod_t softmax(filter_logits(logits_t, T, top_k, top_p))[y_t].

Targets, exact sums with pi(y) weights:
  gamma = 1:  grad J,  J = sum_y pi(y) (log pi(y) - log q(y))             (the sequence reverse KL)
  gamma = 0:  sum_y sg(pi(y)) sum_t grad KL(pi(.|c_t) || q(.|c_t))        (token level, prefixes fixed)

At T = 1 without truncation s = pi and both match; under top-p, top-k or T != 1 they do not, by a
wide margin. Float64 tables; filter_logits works in float32, hence rtol 1e-5.

Last, where a user meets it: train_opd says so in one line at the start of such a run.
"""

import itertools

import pytest
import torch

from nanoopd.model import GPT, GPTConfig
from nanoopd.opd import OPDConfig, train_opd
from nanoopd.rollout import filter_logits
from nanoopd.sampled_token import discounted_opd, sampled_logprobs
from nanoopd.sequence_kl import full_reverse_kl
from nanoopd.tasks import sample_problems
from nanoopd.tokenizer import get_tokenizer

V, T = 3, 4
BOS = V  # the row of the table used at t = 0
SEQUENCES = torch.tensor(list(itertools.product(range(V), repeat=T)))  # (N, T), N = V^T
PREV = torch.cat([torch.full((len(SEQUENCES), 1), BOS), SEQUENCES[:, :-1]], dim=1)  # (N, T)
MASK = torch.ones(len(SEQUENCES), T)  # (N, T)


def tables(seed):
    """Student parameters and teacher table, (T, V+1, V): logits of y_t given (t, y_{t-1})."""
    g = torch.Generator().manual_seed(seed)
    student = 1.5 * torch.randn(T, V + 1, V, generator=g, dtype=torch.float64)
    teacher = 1.5 * torch.randn(T, V + 1, V, generator=g, dtype=torch.float64)
    return student.requires_grad_(), teacher


def logits_of(table):
    return table[torch.arange(T), PREV]  # (N, T, V)


def sampler_probs(student, temperature=1.0, top_k=0, top_p=1.0):
    """s(y) (N,) of every response under the rollout's sampling distribution (no gradient)."""
    logits = logits_of(student).detach()  # (N, T, V)
    filtered = filter_logits(logits.reshape(-1, V), temperature, top_k, top_p).view(len(SEQUENCES), T, V)
    logp = torch.log_softmax(filtered.double(), -1).gather(-1, SEQUENCES.unsqueeze(-1)).squeeze(-1)  # (N, T)
    return logp.sum(1).exp()  # (N,) 0 for responses the sampler can never draw


def per_sequence_g(student, teacher, gamma):
    """g_gamma(y) (N, T, V+1, V) of every response: the gradient of its own surrogate."""
    surrogate = discounted_opd(logits_of(student), logits_of(teacher), SEQUENCES, MASK, gamma)  # (N,)
    one_hot = torch.eye(len(SEQUENCES), dtype=surrogate.dtype)  # row i picks surrogate[i]
    (grads,) = torch.autograd.grad(surrogate, student, one_hot, is_grads_batched=True)
    return grads


def targets(student, teacher):
    """{0: the token-level reverse-KL gradient along pi, 1: grad J}, both exact."""
    logp, logq = sampled_logprobs(logits_of(student), logits_of(teacher), SEQUENCES)  # (N, T)
    pi = logp.sum(1).exp()  # (N,)
    J = (pi * (logp.sum(1) - logq.sum(1))).sum()
    token_kl = (pi.detach() * full_reverse_kl(logits_of(student), logits_of(teacher)).sum(1)).sum()
    return {0.0: torch.autograd.grad(token_kl, student)[0], 1.0: torch.autograd.grad(J, student)[0]}


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_from_pi_the_estimators_expect_the_reverse_kl_gradients(seed):
    student, teacher = tables(seed)
    s = sampler_probs(student)  # T = 1, no truncation: the sampler is pi
    assert s.sum().item() == pytest.approx(1.0, abs=1e-6)
    exact = targets(student, teacher)
    for gamma in (0.0, 1.0):
        mean = torch.einsum("n,n...->...", s, per_sequence_g(student, teacher, gamma))
        torch.testing.assert_close(mean, exact[gamma], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampling", [dict(top_p=0.8), dict(top_k=2), dict(temperature=0.7)],
                         ids=["top_p=0.8", "top_k=2", "T=0.7"])
def test_sampled_otherwise_they_estimate_another_gradient(sampling):
    student, teacher = tables(0)
    s = sampler_probs(student, **sampling)
    assert s.sum().item() == pytest.approx(1.0, abs=1e-6)  # a distribution, just not pi
    if "temperature" not in sampling:
        assert (s == 0).any()  # truncation: some responses are never drawn
    exact = targets(student, teacher)
    for gamma in (0.0, 1.0):
        mean = torch.einsum("n,n...->...", s, per_sequence_g(student, teacher, gamma))
        gap = (mean - exact[gamma]).norm() / exact[gamma].norm()
        assert gap > 0.1, (gamma, gap.item())  # float32 rounding of the sampler is ~1e-7



# ----------------------------------------------------------------------------------------------
# where a user meets it: one line at the start of such an OPD run


def tiny(seed: int, n_embd: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=get_tokenizer().n_vocab, block_size=32, n_layer=1, n_head=2, n_embd=n_embd))


@pytest.mark.parametrize("sampling, noted", [(dict(temperature=0.7, top_p=0.9), True), (dict(top_k=5), True),
                                             ({}, False)])
def test_an_opd_run_not_sampling_from_pi_says_so_once_at_its_start(sampling, noted, tmp_path):
    lines = []
    cfg = OPDConfig(opd_steps=1, opd_batch=2, max_new_tokens=4, digits=1, opd_eval_every=0, opd_lr=1e-4, **sampling)
    train_opd(tiny(1, 16), tiny(0, 16), get_tokenizer(), cfg, str(tmp_path / "run"), sample_problems(2, "test", 0, 1),
              log=lines.append, start_acc=0.0)
    notes = [line for line in lines if "not from pi itself" in line]
    assert len(notes) == (1 if noted else 0)
    if noted:
        assert lines.index(notes[0]) == 1  # right after the run's first line
        assert f"T={cfg.temperature} top_p={cfg.top_p} top_k={cfg.top_k}" in notes[0]
        assert "not grad KL(pi || q)" in notes[0]
