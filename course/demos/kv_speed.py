"""
Lab kv_cache: the KV cache against recomputing every prefix, on your KVCache.write.

    python course/demos/kv_speed.py

Samples the same 64 tokens for 16 prompts twice with one seed, with the cache and without, on the
default shape of train_math.py's teacher (random weights: the speed does not depend on them), and
prints both throughputs and whether the two rollouts are the same tokens.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from nanoopd.model import GPT, GPTConfig  # noqa: E402
from nanoopd.rollout import generate  # noqa: E402


def main(batch: int = 16, new_tokens: int = 64) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig()).eval()  # 4 layers x 128, vocabulary 261
    prompts = [[256] + [48 + (i * 7 + j) % 10 for j in range(8)] for i in range(batch)]
    for use_cache in (True, False):  # warm-up: the first calls allocate and pick kernels
        generate(model, prompts, 2, eos_id=-1, pad_id=258, use_cache=use_cache)
    out = {}
    for use_cache in (True, False):
        start = time.perf_counter()
        ro = generate(model, prompts, new_tokens, eos_id=-1, pad_id=258, temperature=1.0,  # no EOS: full budget
                      generator=torch.Generator().manual_seed(1), use_cache=use_cache)
        seconds = time.perf_counter() - start
        out[use_cache] = (ro, batch * new_tokens / seconds)
    (cached, fast), (recomputed, slow) = out[True], out[False]
    same = torch.equal(cached.response, recomputed.response)
    gap = (cached.logprobs - recomputed.logprobs).abs().max().item()
    print(f"{batch} prompts x {new_tokens} new tokens, {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"with the KV cache     {fast:8,.0f} new tokens/s")
    print(f"recomputing prefixes  {slow:8,.0f} new tokens/s")
    print(f"speed-up {fast / slow:.1f}x; same tokens: {same}; largest log-prob gap {gap:.1e}")
    return {"speedup": fast / slow, "same": same, "gap": gap}


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: one thread is the fastest, and a busy laptop stays fast
    main()
