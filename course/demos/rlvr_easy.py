"""
Lab rlvr: a cold start and a few RLVR steps on tiny models, on your code.

    python course/demos/rlvr_easy.py

1. cold start: 40 SFT steps of a 1-layer model on the math traces, through your sft.make_batch
   (the loss on the first batch, before and after);
2. RLVR: 15 steps of nanoopd.rlvr.rlvr_step, through your group_advantages and
   policy_gradient_loss, on an easy task (8 tokens; reward 1 when the first response token is 3):
   the batch's reward and the policy's probability of answering 3 first (mean over the
   one-token contexts) at a few steps.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from nanoopd.model import GPT, GPTConfig  # noqa: E402
from nanoopd.rlvr import RLVRConfig, rlvr_step  # noqa: E402
from nanoopd.sft import make_batch, sft_loss, train_sft  # noqa: E402
from nanoopd.tasks import encode_example, sample_problems  # noqa: E402
from nanoopd.tokenizer import get_tokenizer  # noqa: E402

EOS, PAD, GOOD = 6, 7, 3


def cold_start() -> tuple[float, float]:
    tok = get_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=32, block_size=96))
    problems = sample_problems(16 * 40, "train", 0, digits=2)
    batches = lambda s: [encode_example(tok, p) for p in problems[s * 16:(s + 1) * 16]]
    x, y = make_batch(batches(0), tok.pad_id, "cpu")
    before = sft_loss(model, x, y).item()
    train_sft(model, batches, 40, 3e-3, tok.pad_id, warmup=5, log_every=0)
    after = sft_loss(model, x, y).item()
    print(f"cold start: SFT loss on the first batch {before:.3f} -> {after:.3f} after 40 steps")
    return before, after


def rlvr() -> list[tuple[int, float, float]]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8, block_size=16, n_layer=1, n_head=2, n_embd=16))
    contexts = [[0], [1], [2], [0, 1], [1, 2], [2, 0], [0, 2], [1, 1]]
    reward = lambda i, response: float(bool(response) and response[0] == GOOD)
    cfg = RLVRConfig(rlvr_steps=1, rlvr_prompts=len(contexts), rlvr_group=8, rlvr_lr=3e-2, max_new_tokens=2, digits=1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.rlvr_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)

    def p_good():
        x = torch.tensor(contexts[:3])  # the one-token contexts
        with torch.no_grad():
            return torch.softmax(model(x)[:, -1].float(), -1)[:, GOOD].mean().item()

    rows = []
    print("RLVR step | batch reward | P(first token = 3)")
    for step in range(15):
        stats = rlvr_step(model, opt, contexts, reward, cfg, EOS, PAD, gen)
        if step in (0, 4, 9, 14):
            rows.append((step, stats["reward"], p_good()))
            print(f"{step:9d} | {stats['reward']:12.1%} | {rows[-1][2]:.3f}")
    return rows


def main() -> dict:
    before, after = cold_start()
    return {"sft": (before, after), "rlvr": rlvr()}


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: one thread is the fastest, and a busy laptop stays fast
    main()
