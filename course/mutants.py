"""
The classic mistakes of every lab, as mutants of the reference solution: small textual edits
inside the lab's marked code. tests/test_course.py applies each to a copy of the project and checks
that the lab's grader fails, on the task named here, with a message that contains `expect`.

Instructor-only: these hold pieces of the reference solutions, so make_lab.py leaves this file out
of the student copies.

To try one by hand:  python course/mutants.py LAB INDEX DIR   (writes a mutated copy into DIR, then
grade it with python course/grade.py LAB DIR).
"""

import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course.make_lab import find_regions, lab_regions  # noqa: E402


@dataclass(frozen=True)
class Mutant:
    mistake: str   # what a student got wrong, in a few words
    old: str       # text of the reference solution, found once in the lab's marked code
    new: str       # what the mistake writes instead
    task: str      # the grader's task that must fail
    expect: str    # a piece of the failure message that points at the mistake


MUTANTS: dict[str, tuple[Mutant, ...]] = {
    "kv_cache": (
        Mutant("off-by-one in the cache position: the new keys go one slot too far",
               "        self.k[layer, :, :, self.length:self.length + T] = k\n"
               "        self.v[layer, :, :, self.length:self.length + T] = v",
               "        self.k[layer, :, :, self.length + 1:self.length + 1 + T] = k\n"
               "        self.v[layer, :, :, self.length + 1:self.length + 1 + T] = v",
               "write", "off-by-one in the cache position"),
        Mutant("returns the cached keys without the new ones",
               "return self.k[layer, :, :, :self.length + T], self.v[layer, :, :, :self.length + T]",
               "return self.k[layer, :, :, :self.length], self.v[layer, :, :, :self.length]",
               "write", "the cached tokens and the new ones"),
        Mutant("the keys stored in the value buffer too",
               "self.v[layer, :, :, self.length:self.length + T] = v",
               "self.v[layer, :, :, self.length:self.length + T] = k",
               "write", "keys go to self.k, values to self.v"),
        Mutant("cache.length advanced inside write (GPT.forward advances it)",
               "        return self.k[layer, :, :, :self.length + T], self.v[layer, :, :, :self.length + T]",
               "        self.length += T\n"
               "        return self.k[layer, :, :, :self.length], self.v[layer, :, :, :self.length]",
               "write", "write must not advance it"),
        Mutant("every step written to slot 0",
               "        self.k[layer, :, :, self.length:self.length + T] = k\n"
               "        self.v[layer, :, :, self.length:self.length + T] = v",
               "        self.k[layer, :, :, :T] = k\n"
               "        self.v[layer, :, :, :T] = v",
               "write", "every step was written to slot 0"),
        Mutant("the buffers allocated in float32 whatever the dtype written",
               "            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)\n"
               "            self.v = torch.zeros(shape, dtype=v.dtype, device=v.device)",
               "            self.k = torch.zeros(shape, device=k.device)\n"
               "            self.v = torch.zeros(shape, device=v.device)",
               "write", "dtype of the k and v"),
    ),
    "g_gamma": (
        Mutant("the KL direction swapped: r_t = log q - log pi",
               "r = logp.detach().to(dtype) - logq.detach().to(dtype)",
               "r = logq.detach().to(dtype) - logp.detach().to(dtype)",
               "g_gamma", "the KL direction is swapped"),
        Mutant("the teacher not detached",
               "r = logp.detach().to(dtype) - logq.detach().to(dtype)",
               "r = logp.detach().to(dtype) - logq.to(dtype)",
               "g_gamma", "detach log q"),
        Mutant("the return-to-go leaves out the token's own cost (t' > t instead of t' >= t)",
               "        acc = r[:, t] + gamma * acc\n        out[:, t] = acc",
               "        out[:, t] = gamma * acc\n        acc = r[:, t] + gamma * acc",
               "returns", "r_t itself counts"),
        Mutant("the vOPD baseline applied before the clamp (r_t - b_t clipped)",
               "    if clamp is not None:\n"
               "        r = r.clamp(-clamp, clamp)\n"
               "    if baseline is not None:\n"
               "        r = r - baseline.detach()  # (B, T)",
               "    if baseline is not None:\n"
               "        r = r - baseline.detach()  # (B, T)\n"
               "    if clamp is not None:\n"
               "        r = r.clamp(-clamp, clamp)",
               "sampled", "the baseline was applied before the clamp"),
        Mutant("no ValueError for a clamp <= 0",
               '        raise ValueError(f"clamp must be a positive number (or None for no clamp), got {clamp}")',
               "        pass",
               "sampled", "must raise ValueError: a clamp is None"),
        Mutant("a masked position breaks the discount chain",
               "        acc = r[:, t] + gamma * acc\n        out[:, t] = acc",
               "        acc = (r[:, t] + gamma * acc) * mask[:, t].to(dtype)\n        out[:, t] = acc",
               "returns", "broke the discount chain"),
        Mutant("the baseline's sign flipped (r_t + b_t)",
               "        r = r - baseline.detach()  # (B, T)",
               "        r = r + baseline.detach()  # (B, T)",
               "sampled", "sign is flipped"),
    ),
    "topk": (
        Mutant("the +1 term dropped from the unnormalised form (it became the stop-gradient one)",
               "return (member * logp.exp() * (logp - logq)).sum(-1)",
               "return (member * logp.exp() * (logp.detach() - logq)).sum(-1)",
               "unnormalized", "lost its +1 term"),
        Mutant("the +1 term kept by mistake in the stop-gradient form",
               "return (member * logp.exp() * (logp.detach() - logq)).sum(-1)",
               "return (member * logp.exp() * (logp - logq)).sum(-1)",
               "stopgrad", "still carries the +1 term"),
        Mutant("the renormalised KL in the forward direction, KL(q_hat || pi_hat)",
               "return (member * logp_hat.exp() * (logp_hat - logq_hat)).sum(-1)",
               "return (member * logq_hat.exp() * (logq_hat - logp_hat)).sum(-1)",
               "renorm", "the direction is swapped"),
        Mutant("float64 dropped in the stop-gradient form (.float())",
               "return (member * logp.exp() * (logp.detach() - logq)).sum(-1)",
               "return (member * logp.float().exp() * (logp.float().detach() - logq.float())).sum(-1)",
               "stopgrad", "keep float64 in float64"),
        Mutant("a hand-written -inf mask: NaN over an empty S",
               "    logp_hat = _log_softmax_on(student_logits.gather(-1, index), member)  # (B, T, K')",
               "    logp_hat = torch.log_softmax(student_logits.gather(-1, index).masked_fill(~member, float('-inf')),"
               " -1)",
               "renorm", "NaN"),
    ),
    "masking": (
        Mutant("the mask inverted: only the listed tokens are kept",
               "mask = mask & ~contains(tokens, mask_tokens)",
               "mask = mask & contains(tokens, mask_tokens)",
               "mask", "must remove exactly the 2 positions"),
        Mutant("the token after a hidden one read at the hidden position itself",
               "last_visible = torch.where(seen, position.unsqueeze(1), -1).amax(-1).clamp(min=0)",
               "last_visible = position",
               "hide", "read at the last visible position"),
        Mutant("the prompt's tokens hidden too",
               "visible = valid & ~(contains(tokens, self.ids) & (position >= P))",
               "visible = valid & ~contains(tokens, self.ids)",
               "hide", "prompts are never hidden"),
        Mutant("the left padding made visible",
               "visible = valid & ~(contains(tokens, self.ids) & (position >= P))",
               "visible = ~(contains(tokens, self.ids) & (position >= P))",
               "hide", "the padding became visible"),
        Mutant("the hidden token replaced (by the pad id) instead of hidden",
               "        logits = teacher(tokens, visible)  # (B, L, V)",
               "        logits = teacher(tokens.masked_fill(valid & ~visible, 0), valid)  # (B, L, V)",
               "hide", "not replaced by another id"),
        Mutant("mask_tokens flips the mask (^) instead of removing positions",
               "mask = mask & ~contains(tokens, mask_tokens)",
               "mask = mask ^ contains(tokens, mask_tokens)",
               "mask", "never flip them"),
    ),
    "opsd": (
        Mutant("PI leaked to the student: the student's rollout rewritten in place",
               "    zeros = torch.zeros_like(rollout.logprobs)",
               "    rollout.tokens = torch.cat([tokens, rollout.response], 1)  # reuse the rollout\n"
               "    rollout.valid = torch.cat([valid, rollout.response_mask], 1)\n"
               "    rollout.prompt_len = tokens.shape[1]\n"
               "    zeros = torch.zeros_like(rollout.logprobs)",
               "context", "PI leaked into the student's rollout"),
        Mutant("PI put before <|bos|>",
               "prompts.append(student_prompt[:1] + list(pi) + student_prompt[1:])",
               "prompts.append(list(pi) + student_prompt)",
               "context", "[bos] + PI + the student's prompt"),
        Mutant("the shared rule made instance-specific",
               "body = RULE",
               "body = f\"{RULE} ({problem.answer})\"",
               "pi_text", "must be the same for every problem"),
        Mutant("<|bos|> doubled in the teacher's prompt",
               "prompts.append(student_prompt[:1] + list(pi) + student_prompt[1:])",
               "prompts.append(student_prompt[:1] + list(pi) + student_prompt)",
               "context", "holds <|bos|> 2 times"),
        Mutant("no ValueError for a wrong number of PIs",
               '        raise ValueError(f"need one PI per rollout row: {len(pi_ids)} for {rollout.tokens.shape[0]} rows")',
               "        pass",
               "context", "one PI per rollout row"),
    ),
    "rlvr": (
        Mutant("the loss normalised per sequence instead of per token",
               "return -(advantages[:, None].to(logp.dtype) * logp * mask).sum() / mask.sum().clamp(min=1)",
               "return -((advantages[:, None].to(logp.dtype) * logp * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()",
               "loss", "normalises per sequence"),
        Mutant("no eps: a group of equal rewards gets NaN advantages",
               "return (centred / (std + eps)).float()",
               "return (centred / std).float()",
               "advantages", "not NaN"),
        Mutant("the cold-start SFT trained on the prompt too",
               "y[i, len(p) - 1:len(seq) - 1] = seq[len(p):]",
               "y[i, :len(seq) - 1] = seq[1:]",
               "cold_start", "the prompt is context only"),
        Mutant("the advantages normalised over the whole batch, not per group",
               "    centred = rewards - rewards.mean(1, keepdim=True)  # (n, G)\n"
               "    std = rewards.std(1, unbiased=False, keepdim=True)  # (n, 1)",
               "    centred = rewards - rewards.mean()  # (n, G)\n"
               "    std = rewards.std(unbiased=False)  # (n, 1)",
               "advantages", "normalised over the whole batch"),
    ),
    "audit": (
        Mutant("the per-token mean not undone (the loss not multiplied by N*T)",
               "return torch.autograd.grad(loss * (N * T), theta_rows)[0]",
               "return torch.autograd.grad(loss, theta_rows)[0]",
               "enumerate", "multiply the per-token mean by N*T"),
        Mutant("the expectation unweighted: a plain mean over the sequences",
               "    g = weight @ grads  # (P,)",
               "    g = grads.mean(0)  # (P,)",
               "enumerate", "weighted by pi(y)"),
        Mutant("the forward and reverse KL swapped",
               "a, b = (logq, logp) if forward else (logp, logq)",
               "a, b = (logp, logq) if forward else (logq, logp)",
               "targets", "directions swapped"),
        Mutant("'exactly' decided by the cosine: a scaled gradient passes as exact",
               'verdict = tie + " exactly" if err[best] < EXACT',
               'verdict = tie + " exactly" if cos[nearest] > 1 - EXACT',
               "follows", "decided by the relative error"),
        Mutant("the sign of the per-sample gradients flipped",
               "return torch.autograd.grad(loss * (N * T), theta_rows)[0]",
               "return -torch.autograd.grad(loss * (N * T), theta_rows)[0]",
               "enumerate", "the sign is flipped"),
        Mutant("the tokens shifted by one, as for a language model's next-token targets",
               "loss, _ = objective(student_logits, teacher_logits, pb.seqs, mask, **options)",
               "loss, _ = objective(student_logits, teacher_logits, pb.seqs.roll(-1, 1), mask, **options)",
               "enumerate", "tokens shifted by one"),
        Mutant("the per-token mean undone by N only (the loss multiplied by N, not N*T)",
               "return torch.autograd.grad(loss * (N * T), theta_rows)[0]",
               "return torch.autograd.grad(loss * N, theta_rows)[0]",
               "enumerate", "multiplied by N only"),
        Mutant("'~X' chosen by the smallest relative error instead of the largest cosine",
               '"~" + tie if cos[nearest] >= NEAR',
               '"~" + best if cos[best] >= NEAR',
               "follows", "not of smallest relative error"),
        Mutant("a tie broken: one target named where J and K coincide",
               "tie = \" = \".join(t for t, goal in goals.items() if (goal - goals[x]).norm() < EXACT * goals[x].norm())",
               "tie = x",
               "follows", "a tie, 'J = K exactly'"),
        Mutant("a loss without a graph left to allow_unused=True (autograd.grad raises on it)",
               "    if not loss.requires_grad:  # no graph: the loss never reads the student; autograd.grad would raise\n"
               "        return torch.zeros_like(theta_rows)  # constant in theta\n"
               "    return torch.autograd.grad(loss * (N * T), theta_rows)[0]",
               "    (grads,) = torch.autograd.grad(loss * (N * T), theta_rows, allow_unused=True)\n"
               "    return torch.zeros_like(theta_rows) if grads is None else grads",
               "enumerate", "allow_unused or not"),
        Mutant("a language model's shift: the logits at t scored against tokens[:, t+1]",
               "loss, _ = objective(student_logits, teacher_logits, pb.seqs, mask, **options)",
               "loss, _ = objective(student_logits[:, :-1], teacher_logits[:, :-1], pb.seqs[:, 1:], mask[:, 1:], "
               "**options)",
               "mystery", "per_sample_grads is wrong on the unknown estimator: fix task enumerate first"),
    ),
    "on_policy": (
        Mutant("the attention counted over all T^2 pairs instead of causal T(T+1)/2",
               "2.0 * L * C * tokens * (tokens + 1)",
               "4.0 * L * C * tokens * tokens",
               "count", "every token attends to all T keys"),
        Mutant("the backward's 2x forgotten: training counted as 1 pass instead of 3",
               "compute = pass_flops(student, *student_rows) + 3 * pass_flops(student, *rows)",
               "compute = pass_flops(student, *student_rows) + pass_flops(student, *rows)",
               "step", "training was counted as one pass"),
        Mutant("the teacher's sampling charged in the given column",
               "        self.given += compute\n",
               "        self.given += compute + teacher_sampling\n",
               "step", "the `given` column counted the teacher's sampling"),
        Mutant("the LM head counted at every position instead of the h read",
               "2.0 * head * C * V",
               "2.0 * tokens * C * V",
               "count", "h positions only"),
        Mutant("the student charged for sampling the teacher's rows too",
               "compute = pass_flops(student, *student_rows) + 3 * pass_flops(student, *rows)",
               "compute = pass_flops(student, *rows) + 3 * pass_flops(student, *rows)",
               "step", "the student was charged for sampling the teacher's rows"),
        Mutant("the teacher's sampling returned as compute (in both columns)",
               "    return compute, pass_flops(teacher, *teacher_sampled)",
               "    return compute + pass_flops(teacher, *teacher_sampled), 0.0",
               "step", "the teacher's sampling was counted in compute"),
        Mutant("floor instead of round in student_share",
               "    return round(lmbda * batch)",
               "    return int(lmbda * batch)",
               "share", "round, not a floor"),
        Mutant("halves rounded up (int(x + 0.5)) instead of to even",
               "    return round(lmbda * batch)",
               "    return int(lmbda * batch + 0.5)",
               "share", "int(x + 0.5) takes every half up"),
        Mutant("the prompts padded on the right instead of the left in merge",
               '        return {"tokens": torch.cat([_pad(prompt, dp, 0, pad_id), _pad(resp, 0, dn, pad_id)], 1),  # (b, P+N)\n'
               '                "valid": torch.cat([_pad(p.valid[:, :p.prompt_len], dp, 0, False),',
               '        return {"tokens": torch.cat([_pad(prompt, 0, dp, pad_id), _pad(resp, 0, dn, pad_id)], 1),  # (b, P+N)\n'
               '                "valid": torch.cat([_pad(p.valid[:, :p.prompt_len], 0, dp, False),',
               "merge", "was padded on the right"),
        Mutant("the response mask padded with True: the padding enters the loss",
               '"response_mask": _pad(p.response_mask, 0, dn, False)',
               '"response_mask": _pad(p.response_mask, 0, dn, True)',
               "merge", "True there puts pad tokens into the loss"),
        Mutant("the parts' rows merged in reverse order (the teacher's rows first)",
               "    rows = [one(p) for p in parts]",
               "    rows = [one(p) for p in reversed(parts)]",
               "merge", "the rows came out in the wrong order"),
    ),
    "cross_tokenizer": (
        Mutant("align advances the side that ends later",
               "if j == len(b) or (i < len(a) and ea <= eb):",
               "if j == len(b) or (i < len(a) and ea >= eb):",
               "align", "advance the side whose pieces end first"),
        Mutant("a group closed where either side ends",
               "        if ea == eb:\n            groups.append((i0, i, j0, j))",
               "        if True:\n            groups.append((i0, i, j0, j))",
               "align", "close a group each time both end at the same byte, no sooner"),
        Mutant("the chunk log-ratio's sign swapped: L_T - L_S",
               "    r = L_s - L_t  # (G,)",
               "    r = L_t - L_s  # (G,)",
               "chunk", "the sign is swapped"),
        Mutant("r_c spread over the teacher's pieces of the chunk",
               "sizes = torch.tensor([i1 - i0 for i0, i1, _, _ in groups]",
               "sizes = torch.tensor([j1 - j0 for _, _, j0, j1 in groups]",
               "chunk", "spread evenly over the student's"),
        Mutant("the chunk cost put whole on every token of the chunk",
               "        return r / chunks.size",
               "        return r",
               "costs", "r_c is spread over its n_c tokens"),
        Mutant("r_c placed on its chunk's last token, before the split is settled",
               "    return later + torch.where(last, placed, 0.0)",
               "    return placed",
               "costs", "settles c one token later"),
    ),
}


def apply(root: Path, lab_name: str, mutant: Mutant) -> str:
    """Edit the project at `root` in place: `mutant.old` -> `mutant.new` inside the lab's marked code.
    Returns the file changed; ValueError unless `old` occurs exactly once in that code."""
    from course.labs import get_lab
    hits = []
    for path in lab_regions(root, get_lab(lab_name)):
        text = (root / path).read_text()
        lines = text.split("\n")
        for r in find_regions(text, path):
            if r.lab == lab_name:
                body = "\n".join(lines[r.begin + 1:r.end])
                hits += [(path, r)] * body.count(mutant.old)
    if len(hits) != 1:
        raise ValueError(f"lab {lab_name}: mutant {mutant.mistake!r}: its text occurs {len(hits)} times in the lab's "
                         f"marked code, not once")
    path, r = hits[0]
    lines = (root / path).read_text().split("\n")
    body = "\n".join(lines[r.begin + 1:r.end]).replace(mutant.old, mutant.new)
    lines[r.begin + 1:r.end] = body.split("\n")
    (root / path).write_text("\n".join(lines))
    return path


def main(argv=None) -> int:
    import argparse
    import shutil
    from course.make_lab import project_files
    p = argparse.ArgumentParser(description="Write a copy of the project with one mutant of a lab applied.")
    p.add_argument("lab")
    p.add_argument("index", type=int, help="which mutant of the lab, from 0")
    p.add_argument("dir", help="a new or empty folder")
    args = p.parse_args(argv)
    dest = Path(args.dir)
    if args.lab not in MUTANTS or not 0 <= args.index < len(MUTANTS[args.lab]):
        print(f"mutants.py: error: no mutant {args.index} of lab {args.lab!r}; labs: {', '.join(MUTANTS)}", file=sys.stderr)
        return 2
    if dest.exists() and any(dest.iterdir()):
        print(f"mutants.py: error: {dest} exists and is not empty", file=sys.stderr)
        return 2
    for path in project_files(ROOT):
        (dest / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / path, dest / path)
    mutant = MUTANTS[args.lab][args.index]
    path = apply(dest, args.lab, mutant)
    print(f"{dest}: {mutant.mistake} ({path}); grade it: python course/grade.py {args.lab} {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
