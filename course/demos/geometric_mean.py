"""
Lab opsd: what a PI-free student can learn from a teacher that sees privileged information I.

    python course/demos/geometric_mean.py

One prompt x, 6 possible answers. The student pi(.|x) never sees I and descends
E_I KL(pi(.|x) || q(.|x, I)); docs/design.md#self-distillation-with-privileged-information says it
ends at the normalised geometric mean
pi*(y|x) ∝ exp(E_I log q(y|x, I)). Two kinds of I:
  instance-specific  I = this problem's answer, a in {0, 1, 2} with p(a|x) = 0.5, 0.3, 0.2 (the
                     student cannot tell which): q(.|x, I=a) puts 0.9 on a
  shared rule        I = the same rule for every problem: q(.|x, rule) puts 0.8 on answer 4
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from nanoopd.sequence_kl import token_kl  # noqa: E402


def teacher(peak: int, mass: float, n: int = 6) -> torch.Tensor:
    q = torch.full((n,), (1 - mass) / (n - 1))
    q[peak] = mass
    return q.log()


def descend(logq: torch.Tensor, weights: torch.Tensor, steps: int = 400, lr: float = 1.0) -> torch.Tensor:
    """argmin_pi sum_I w_I KL(pi || q_I) by gradient descent on the student's logits."""
    x = torch.zeros(logq.shape[-1], requires_grad=True)
    opt = torch.optim.SGD([x], lr=lr)
    for _ in range(steps):
        logp = torch.log_softmax(x, -1).expand_as(logq)
        loss = (weights * token_kl(logp, logq)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.softmax(x.detach(), -1)


def main() -> dict:
    cases = {"instance-specific (answer)": (torch.stack([teacher(a, 0.9) for a in range(3)]), torch.tensor([0.5, 0.3, 0.2])),
             "shared rule": (teacher(4, 0.8)[None], torch.tensor([1.0]))}
    out = {}
    fmt = lambda p: " ".join(f"{v:.3f}" for v in p.tolist())
    for name, (logq, w) in cases.items():
        learned = descend(logq, w)
        geometric = torch.softmax((w[:, None] * logq).sum(0), -1)  # pi* ∝ exp(E_I log q)
        arithmetic = (w[:, None] * logq.exp()).sum(0)  # E_I q: what SFT on the teacher's samples would fit
        print(f"{name}")
        print(f"  student after descent      {fmt(learned)}")
        print(f"  geometric mean pi*         {fmt(geometric)}")
        print(f"  arithmetic mean E_I q      {fmt(arithmetic)}")
        out[name] = {"learned": learned, "geometric": geometric, "arithmetic": arithmetic}
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: one thread is the fastest, and a busy laptop stays fast
    main()
