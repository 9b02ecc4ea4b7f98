"""
Lab masking: one token the teacher never saw dominates a sampled-token OPD batch (M2), on your code.

    python course/demos/special_token.py

A batch of 8 responses of 12 tokens over V = 20 tokens; every response opens with <fmt> (id 19),
a token the student emits and the teacher gives e^-40 (it never saw it). Sampled-token OPD with and
without mask_tokens=[19]: the largest |r_t|, the share of the batch's sum |r_t| and of the squared
gradient norm that sits on the <fmt> positions.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from nanoopd.objectives import OBJECTIVES  # noqa: E402

B, T, V, FMT = 8, 12, 20, 19


def main() -> dict:
    g = torch.Generator().manual_seed(0)
    teacher = 2 * torch.randn(B, T, V, generator=g)
    student = teacher + 0.5 * torch.randn(B, T, V, generator=g)  # a student close to its teacher ...
    teacher[..., FMT], student[..., FMT] = -40.0, 2.0  # ... but for the token only it emits
    tokens = torch.randint(0, FMT, (B, T), generator=g)
    tokens[:, 0] = FMT
    mask = torch.ones(B, T, dtype=torch.bool)
    r = (torch.log_softmax(student, -1) - torch.log_softmax(teacher, -1)).gather(-1, tokens[..., None])[..., 0]
    print(f"r_t on <fmt>: {r[:, 0].mean():+.1f} nats on average; on the other tokens |r_t| <= {r[:, 1:].abs().max():.1f}")
    out = {}
    for masked in (False, True):
        x = student.clone().requires_grad_()
        options = {"mask_tokens": [FMT]} if masked else {}
        loss, stats = OBJECTIVES["sampled_token"](x, teacher, tokens, mask, **options)
        (grad,) = torch.autograd.grad(loss, x)
        in_loss = mask & (tokens != FMT) if masked else mask  # what mask_tokens should leave
        fmt_r = (r.abs() * (tokens == FMT) * in_loss).sum() / (r.abs() * in_loss).sum()
        fmt_grad = grad[:, 0].pow(2).sum() / grad.pow(2).sum()
        out[masked] = {"max_abs": stats["logratio_max_abs"], "share_r": fmt_r.item(), "share_grad": fmt_grad.item()}
        print(f"{'masked  ' if masked else 'unmasked'}  loss {loss.item():+8.3f} | max |r_t| in the loss "
              f"{stats['logratio_max_abs']:5.1f} | <fmt>'s share of sum |r_t| {fmt_r:6.1%} | "
              f"of |grad|^2 {fmt_grad:6.1%} | tokens in the loss {stats['n_tokens']:.0f}")
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: one thread is the fastest, and a busy laptop stays fast
    main()
