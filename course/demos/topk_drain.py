"""
Lab topk: why unnormalised top-K drains mass (the mechanism behind M1's collapse), on your code.

    python course/demos/topk_drain.py

A student (one row of logits per position, T = 16 positions, V = 32 tokens) starts near a fixed
teacher and descends each objective with plain SGD; S_t is the teacher's top-4 at every position.
Printed: the true full-vocabulary reverse KL(pi || q), and the student's mass on S (the teacher
keeps 0.87 of its own there), at a few steps. The unnormalised form first lowers the KL, then
drains pi's mass out of S (towards q / e on S) while the true KL climbs; the others do not.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from nanoopd.sequence_kl import full_reverse_kl  # noqa: E402
from nanoopd.topk import topk_renormalized, topk_stopgrad, topk_support, topk_unnormalized  # noqa: E402

FORMS = {"topk_unnormalized": topk_unnormalized, "topk_stopgrad": topk_stopgrad, "topk_renorm": topk_renormalized,
         "full_reverse_kl": lambda s, t, index, member: full_reverse_kl(s, t)}


def main(steps=(0, 50, 200, 500), lr: float = 3.0) -> dict:
    g = torch.Generator().manual_seed(0)
    teacher = 3 * torch.randn(1, 16, 32, generator=g)  # (B, T, V)
    start = teacher + torch.randn(1, 16, 32, generator=g)
    index, member = topk_support(start, teacher, torch.zeros(1, 16, dtype=torch.long), k=4)
    kl = lambda x: full_reverse_kl(x, teacher).mean().item()
    mass = lambda x: (torch.softmax(x, -1).gather(-1, index) * member).sum(-1).mean().item()
    q_mass = mass(teacher)
    print(f"teacher's mass on S: {q_mass:.3f}; each cell: reverse KL(pi || q) / student's mass on S")
    print(f"{'objective':<18}" + "".join(f"{f'step {s}':>16}" for s in steps))
    table = {}
    for name, form in FORMS.items():
        x = start.clone().requires_grad_()
        opt = torch.optim.SGD([x], lr=lr)
        row = []
        for step in range(steps[-1] + 1):
            if step in steps:
                row.append((kl(x.detach()), mass(x.detach())))
            if step < steps[-1]:
                opt.zero_grad()
                form(x, teacher, index, member).mean().backward()
                opt.step()
        table[name] = row
        print(f"{name:<18}" + "".join(f"{f'{k:.3f} / {m:.3f}':>16}" for k, m in row))
    return {"table": table, "q_mass": q_mass}


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: one thread is the fastest, and a busy laptop stays fast
    main()
