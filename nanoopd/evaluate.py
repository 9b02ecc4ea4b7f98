"""
Task accuracy: sample a response for every held-out problem and ask the verifier.

    acc = (1/N) sum_i verify(y_i, problem_i),   y_i ~ pi(. | x_i)  (greedy: y_i = argmax decoding)
"""

from collections.abc import Callable

import torch

from nanoopd.rollout import generate
from nanoopd.sft import encode_example
from nanoopd.tasks import Problem, verify
from nanoopd.tokenizer import Tokenizer


@torch.no_grad()
def evaluate(model, tok: Tokenizer, problems: list[Problem], temperature: float = 0.0,
             max_new_tokens: int = 96, batch_size: int = 256,
             prefix: str | Callable[[Problem], str] = "", seed: int = 0, return_texts: bool = False):
    """Accuracy of `model` on `problems` (greedy when temperature == 0). `prefix` goes before every
    prompt (special tokens allowed): one string for all, or a function of the problem (per-problem
    privileged information)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    rewards, texts = [], []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        prompts = [encode_example(tok, p, prefix(p) if callable(prefix) else prefix, prefix_special=True)[0]
                   for p in chunk]
        ro = generate(model, prompts, max_new_tokens, tok.eos_id, tok.pad_id,
                      temperature=temperature, generator=gen)
        for p, resp, m in zip(chunk, ro.response.tolist(), ro.response_mask.tolist()):
            text = tok.decode([t for t, k in zip(resp, m) if k and t != tok.eos_id])
            rewards.append(verify(text, p))
            texts.append(text)
    acc = sum(rewards) / max(1, len(rewards))
    return (acc, texts) if return_texts else acc
