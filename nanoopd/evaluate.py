"""
Evaluations that sample from the models and ask the verifier.

  accuracy                        acc = (1/N) sum_i verify(y_i, problem_i),  y_i ~ pi(. | x_i)
                                  (greedy: y_i = argmax decoding)
  student prefixes                the student's own sampled responses cut at a fraction of their
                                  length (the contexts an RLVR-adapted teacher trains on)
  teacher-continuation accuracy   cut the student's sampled responses at a fraction f of their
                                  length, let the teacher finish them greedily, verify prefix +
                                  continuation; compared with the teacher's own from-scratch greedy
                                  accuracy on the same problems (a teacher can be far worse from
                                  student prefixes than from its own; docs/design.md#teacher-continuation-accuracy)
"""

from collections.abc import Callable

import torch

from nanoopd.metrics import accuracy
from nanoopd.rollout import generate
from nanoopd.tasks import Problem, encode_example, verify
from nanoopd.tokenizer import Tokenizer


def response_texts(tok: Tokenizer, rollout) -> list[str]:
    """The decoded response of every rollout row, without padding and <|eos|>."""
    return [tok.decode(without_eos(ids, tok.eos_id)) for ids in rollout.rows()]


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
        for p, text in zip(chunk, response_texts(tok, ro)):
            rewards.append(verify(text, p))
            texts.append(text)
    acc = sum(rewards) / max(1, len(rewards))
    return (acc, texts) if return_texts else acc


def accuracy_by_op(problems: list[Problem], texts: list[str], by: str = "op") -> dict[str, float]:
    """The accuracy of the responses `texts` to `problems`, split by the problems' operator (or,
    by="task", their task family, tasks.TASKS); evaluate(..., return_texts=True) gives the texts."""
    split = {}
    for p, text in zip(problems, texts):
        split.setdefault(getattr(p, by), []).append(verify(text, p))
    return {key: accuracy(r) for key, r in sorted(split.items())}


def without_eos(ids: list[int], eos_id: int) -> list[int]:
    """The ids of one response without its final <|eos|> (the only place one can be)."""
    return ids[:-1] if ids and ids[-1] == eos_id else ids


@torch.no_grad()
def student_prefixes(student, tok, problems: list[Problem], frac: float | list[float], max_new_tokens: int,
                     generator: torch.Generator | None = None,
                     temperature: float = 1.0) -> tuple[list[list[int]], list[str]]:
    """Sample one response y per problem from the student and cut it after floor(frac * |y|)
    tokens (|y| without <|eos|>; frac: one for all, or one per problem). Returns the contexts
    [bos] x y_<cut (token ids) and the cut prefixes as text."""
    prompts = [encode_example(tok, p)[0] for p in problems]
    fracs = frac if isinstance(frac, (list, tuple)) else [frac] * len(problems)
    ro = generate(student, prompts, max_new_tokens, tok.eos_id, tok.pad_id, temperature=temperature,
                  generator=generator)
    contexts, done = [], []
    for prompt, f, ids in zip(prompts, fracs, ro.rows()):
        ids = without_eos(ids, tok.eos_id)
        cut = ids[:int(f * len(ids))]
        contexts.append(prompt + cut)
        done.append(tok.decode(cut))
    return contexts, done


@torch.no_grad()
def continuation_acc(writer, source, tok, problems: list[Problem], fracs: list[float], max_new_tokens: int = 64,
                     seed: int = 0, temperature: float = 1.0, batch_size: int = 256) -> dict:
    """The accuracy of `writer` finishing, greedily, responses that `source` began (source may be
    writer itself: finishing its own prefixes):

      acc(f)      (1/n) sum_i verify(y_i,<cut + argmax-decode writer(.| x_i, y_i,<cut), problem_i),
                  y_i ~ source(.|x_i) at `temperature`, cut = floor(f * |y_i|) (|y_i| without
                  <|eos|>), for every f in fracs; the writer has max_new_tokens - cut tokens left
      source_acc  the accuracy of the uncut samples y_i

    The same samples y_i serve every f (one seeded generator, `seed`), so that two calls with the
    same source and seed cut the same responses. Returns {"source_acc": ..., f: acc(f), ...}."""
    if any(not 0.0 <= f <= 1.0 for f in fracs):
        raise ValueError(f"every frac must lie in [0, 1], got {fracs}")
    device = next(source.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    wins, src = {f: [] for f in fracs}, []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        full_ctx, full_text = student_prefixes(source, tok, chunk, 1.0, max_new_tokens, gen, temperature)
        src += [verify(t, p) for t, p in zip(full_text, chunk)]
        prompts = [encode_example(tok, p)[0] for p in chunk]
        for f in fracs:
            contexts, done, room = [], [], []
            for prompt, ctx in zip(prompts, full_ctx):  # the same samples, cut at f
                keep = int(f * (len(ctx) - len(prompt)))
                contexts.append(ctx[:len(prompt) + keep])
                done.append(tok.decode(ctx[len(prompt):len(prompt) + keep]))
                room.append(max_new_tokens - keep)  # prefix + continuation share the response budget
            ro = generate(writer, contexts, max_new_tokens, tok.eos_id, tok.pad_id, temperature=0.0)
            for p, d, n, ids in zip(chunk, done, room, ro.rows()):
                wins[f].append(verify(d + tok.decode(without_eos(ids[:n], tok.eos_id)), p))
    return {"source_acc": accuracy(src), **{f: accuracy(w) for f, w in wins.items()}}


@torch.no_grad()
def teacher_continuation(teacher, student, tok, problems: list[Problem], frac: float = 0.5,
                         max_new_tokens: int = 64, seed: int = 0, temperature: float = 1.0,
                         batch_size: int = 256) -> dict[str, float]:
    """Teacher-continuation accuracy (docs/design.md#teacher-continuation-accuracy): continuation_acc
    with the teacher as writer and the student as source, at one frac.

      continuation_acc  the teacher finishing the student's samples cut at frac (continuation_acc's acc(frac))
      teacher_acc       the teacher's greedy from-scratch accuracy on the same problems
      student_acc       the accuracy of the student's uncut samples y_i
    """
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"frac must lie in [0, 1], got {frac}")
    c = continuation_acc(teacher, student, tok, problems, [frac], max_new_tokens, seed, temperature, batch_size)
    own = []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        ro = generate(teacher, [encode_example(tok, p)[0] for p in chunk], max_new_tokens, tok.eos_id, tok.pad_id,
                      temperature=0.0)
        own += [verify(tok.decode(without_eos(ids, tok.eos_id)), p) for p, ids in zip(chunk, ro.rows())]
    return {"continuation_acc": c[frac], "teacher_acc": accuracy(own), "student_acc": c["source_acc"], "frac": frac}
