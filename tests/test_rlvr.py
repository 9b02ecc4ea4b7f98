"""RLVR: group-normalised advantages, zero advantage for a zero-variance group, a finite loss, and
a few steps that raise the reward on an easy task; teacher-continuation accuracy."""

import json
import math

import pytest
import torch

from nanoopd.evaluate import student_prefixes, teacher_continuation
from nanoopd.model import GPT, GPTConfig
from nanoopd.rlvr import (RLVRConfig, group_advantages, math_reward, policy_gradient_loss, rlvr_step,
                          train_rlvr)
from nanoopd.rollout import generate
from nanoopd.tasks import encode_example
from nanoopd.tasks import sample_problems
from nanoopd.tokenizer import get_tokenizer

TOK = get_tokenizer()
EOS, PAD, GOOD = 6, 7, 3  # a vocabulary of 8: the easy task rewards answering GOOD first


def test_advantages_are_normalised_per_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    adv = group_advantages(rewards, eps=0.0)
    assert torch.allclose(adv.mean(1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(adv.std(1, unbiased=False), torch.ones(3), atol=1e-6)
    # by hand: group 0 has mean 1/4 and std sqrt(3)/4
    assert adv[0, 0].item() == pytest.approx((1 - 0.25) / (math.sqrt(3) / 4), rel=1e-6)
    # each group on its own gives the same advantages as inside the batch
    for i in range(3):
        assert torch.allclose(group_advantages(rewards[i:i + 1], eps=0.0), adv[i:i + 1])


def test_identical_rewards_give_exactly_zero_advantage_never_nan():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    adv = group_advantages(rewards)
    assert torch.isfinite(adv).all()
    assert (adv[:2] == 0).all()  # exactly zero
    assert (adv[2] != 0).all()


def test_policy_gradient_loss_is_the_token_mean_of_minus_a_logp():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([2.0, -1.0])
    expected = -(2.0 * (-1 - 2) + (-1.0) * (-0.5 - 0.5 - 9.0)) / 5
    assert policy_gradient_loss(logp, adv, mask).item() == pytest.approx(expected)


def easy_task():
    """A tiny policy over 8 tokens; reward 1 when the first response token is GOOD."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8, block_size=16, n_layer=1, n_head=2, n_embd=16))
    contexts = [[0], [1], [2], [0, 1], [1, 2], [2, 0], [0, 2], [1, 1]]
    reward = lambda i, response: float(bool(response) and response[0] == GOOD)
    return model, contexts, reward


def test_a_few_rlvr_steps_raise_the_reward_on_an_easy_task():
    model, contexts, reward = easy_task()
    cfg = RLVRConfig(rlvr_steps=1, rlvr_prompts=len(contexts), rlvr_group=8, rlvr_lr=3e-2, max_new_tokens=2, digits=1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.rlvr_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)

    def mean_reward():  # exact: probability of GOOD as the first token, averaged over contexts
        ro = generate(model, contexts, 1, EOS, PAD, temperature=0.0)
        logits = model(ro.tokens[:, :-1], ro.valid[:, :-1])[:, -1]  # (B, V)
        return torch.softmax(logits.float(), -1)[:, GOOD].mean().item()

    before = mean_reward()
    stats = [rlvr_step(model, opt, contexts, reward, cfg, EOS, PAD, gen) for _ in range(15)]
    assert all(math.isfinite(s["loss"]) and 0 <= s["zero_var_groups"] <= 1 for s in stats)
    assert before < 0.2  # near uniform over 8 tokens at init
    assert mean_reward() > 0.8
    assert sum(s["reward"] for s in stats[-3:]) / 3 > 0.5


def test_a_step_with_only_zero_variance_groups_leaves_the_weights_alone():
    model, contexts, _ = easy_task()
    cfg = RLVRConfig(rlvr_steps=1, rlvr_prompts=len(contexts), rlvr_group=4, rlvr_lr=3e-2, max_new_tokens=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.rlvr_lr, weight_decay=0.0)
    stats = rlvr_step(model, opt, contexts, lambda i, r: 1.0, cfg, EOS, PAD, torch.Generator().manual_seed(0))
    assert stats["zero_var_groups"] == 1.0 and stats["loss"] == 0.0 and stats["grad_norm"] == 0.0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_rlvr_config_is_refused():
    for kw, msg in [(dict(rlvr_group=1), "^rlvr_group"), (dict(rlvr_cut=1.0), "^rlvr_cut"),
                    (dict(temperature=0.0), "^temperature"), (dict(rlvr_lr=0.0), "^rlvr_lr"),
                    (dict(rlvr_steps=0), "^rlvr_steps")]:
        with pytest.raises(ValueError, match=msg):
            RLVRConfig(**kw)


def tiny_lm(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=TOK.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=32))


def test_math_reward_judges_the_cut_prefix_plus_the_continuation():
    p = sample_problems(1, "train", 0, digits=2)[0]
    reward = math_reward(TOK, [p], [f"A:{p.answer}"[:3]])
    rest = TOK.encode(f"A:{p.answer}"[3:]) + [TOK.eos_id]
    assert reward(0, rest) == 1.0 and reward(0, TOK.encode("9x")) == 0.0


def test_student_prefixes_are_cuts_of_the_students_own_samples():
    student = tiny_lm(1)
    problems = sample_problems(6, "test", 0, digits=1)
    full, full_text = student_prefixes(student, TOK, problems, 1.0, 12, torch.Generator().manual_seed(0))
    half, half_text = student_prefixes(student, TOK, problems, 0.5, 12, torch.Generator().manual_seed(0))
    for p, f, ft, h, ht in zip(problems, full, full_text, half, half_text):
        prompt = encode_example(TOK, p)[0]
        assert f[:len(prompt)] == prompt and h == f[:len(h)]  # the same sample, cut
        assert len(h) - len(prompt) == int(0.5 * (len(f) - len(prompt)))
        assert ft.startswith(ht) and TOK.eos_id not in f


def test_teacher_continuing_its_own_greedy_prefix_rewrites_the_same_answer(monkeypatch):
    """student = teacher, greedy: the cut prefix + the teacher's greedy continuation is the
    teacher's own from-scratch response, whatever the cut, so every text the verifier sees
    for a problem is the same."""
    import nanoopd.evaluate as evaluate
    model = tiny_lm(0)
    problems = sample_problems(6, "test", 0, digits=1)
    for frac in (0.0, 0.3, 0.7, 1.0):
        seen = {}
        monkeypatch.setattr(evaluate, "verify", lambda text, p: seen.setdefault(p.text, set()).add(text) or 0)
        out = teacher_continuation(model, model, TOK, problems, frac=frac, max_new_tokens=10, temperature=0.0)
        assert set(seen) == {p.text for p in problems}
        assert all(len(texts) == 1 for texts in seen.values()), frac
        assert out["continuation_acc"] == out["teacher_acc"] == out["student_acc"] == 0.0
    with pytest.raises(ValueError, match="frac"):
        teacher_continuation(model, model, TOK, problems, frac=1.5)


def test_train_rlvr_from_student_prefixes_logs_every_step(tmp_path):
    cfg = RLVRConfig(rlvr_steps=2, rlvr_prompts=3, rlvr_group=2, max_new_tokens=6, rlvr_cut=0.5, digits=1)
    path = tmp_path / "rlvr.jsonl"
    records = train_rlvr(tiny_lm(0), TOK, cfg, student=tiny_lm(1), log=lambda _: None, jsonl_path=str(path))
    assert [r["step"] for r in records] == [0, 1]
    assert [json.loads(line) for line in path.read_text().splitlines()] == records
    assert all(math.isfinite(r["loss"]) and 0 <= r["reward"] <= 1 for r in records)
    with pytest.raises(ValueError, match="student"):
        train_rlvr(tiny_lm(0), TOK, cfg)


def test_interrupted_then_resumed_rlvr_equals_uninterrupted(tmp_path, monkeypatch):
    import nanoopd.rlvr as rlvr
    # a reward the tiny random model earns about half of the time, so every step updates it
    monkeypatch.setattr(rlvr, "math_reward", lambda tok, batch, done: lambda i, resp: float(bool(resp) and resp[0] % 2 == 0))
    cfg = RLVRConfig(rlvr_steps=5, rlvr_prompts=3, rlvr_group=4, max_new_tokens=6, rlvr_cut=0.5, digits=1, rlvr_warmup=1, rlvr_lr=3e-3)
    student = tiny_lm(1)
    run = lambda model, name, **kw: train_rlvr(model, TOK, cfg, student=student, log=lambda _: None,
                                               jsonl_path=str(tmp_path / f"{name}.jsonl"),
                                               ckpt_path=str(tmp_path / f"{name}.pt"), save_every=2, **kw)
    full = tiny_lm(0)
    full_records = run(full, "full")
    assert all(r["grad_norm"] > 0 for r in full_records)

    real_step = rlvr.rlvr_step

    def killed_at_step_3(*args):
        if len(killed) == 3:
            raise KeyboardInterrupt
        killed.append(1)
        return real_step(*args)
    killed = []
    monkeypatch.setattr(rlvr, "rlvr_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_lm(0), "part")
    assert torch.load(tmp_path / "part.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(rlvr, "rlvr_step", real_step)
    torch.manual_seed(99)
    resumed = tiny_lm(5)  # weights, optimizer and sampler state all come from the checkpoint
    records = run(resumed, "part", resume=True)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    drop = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert drop(records) == drop(full_records)
    assert drop(json.loads(line) for line in (tmp_path / "part.jsonl").read_text().splitlines()) == drop(full_records)
    assert torch.load(tmp_path / "part.pt", weights_only=True)["step"] == 5


def test_a_non_finite_rlvr_loss_names_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import nanoopd.rlvr as rlvr
    monkeypatch.setattr(rlvr, "math_reward", lambda tok, batch, done: lambda i, resp: float(bool(resp) and resp[0] % 2 == 0))
    model, calls = tiny_lm(0), []

    def poison(module, inputs, output):  # NaN logits from the 3rd training forward pass on
        if module.training:
            calls.append(1)
        return output * float("nan") if len(calls) >= 3 else output
    model.register_forward_hook(poison)
    path = str(tmp_path / "rlvr.pt")
    cfg = RLVRConfig(rlvr_steps=4, rlvr_prompts=2, rlvr_group=4, max_new_tokens=6, digits=1)
    with pytest.raises(FloatingPointError, match=r"rlvr step 2: RLVR: non-finite loss .* checkpoint of step 2 .* is intact"):
        train_rlvr(model, TOK, cfg, log=lambda _: None, ckpt_path=path, save_every=1)
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 2 and all(torch.isfinite(v).all() for v in saved["model"].values())


def test_rlvr_counts_its_flops_evaluates_along_the_way_and_stops_at_its_budget(monkeypatch):
    import nanoopd.rlvr as rlvr
    from nanoopd.config import ConfigError
    from nanoopd.flops import pass_flops
    # every sample is rewarded by parity of its first token: the groups carry signal, every step updates
    monkeypatch.setattr(rlvr, "math_reward", lambda tok, batch, done: lambda i, resp: float(bool(resp) and resp[0] % 2 == 0))
    cfg = RLVRConfig(rlvr_steps=6, rlvr_prompts=2, rlvr_group=4, max_new_tokens=6, digits=1, rlvr_eval_every=2)
    seen = []
    real = rlvr.rlvr_step
    monkeypatch.setattr(rlvr, "rlvr_step", lambda model, opt, contexts, *a: seen.append(contexts) or real(model, opt, contexts, *a))
    model = tiny_lm(0)
    records = train_rlvr(model, TOK, cfg, log=lambda _: None, eval_problems=sample_problems(4, "test", 0, 1))
    assert [r["step"] for r in records if "eval_acc" in r] == [1, 3, 5]
    first = records[0]
    lengths = [len(c) for c in seen[0] for _ in range(cfg.rlvr_group)]
    assert first["flops"] > 4 * pass_flops(model.config, lengths, [1] * len(lengths))  # sampled, forward, backward
    budget = records[0]["flops"] + records[1]["flops"] / 2
    stopped = train_rlvr(tiny_lm(0), TOK, RLVRConfig(**{**cfg.__dict__, "rlvr_flops": budget}), log=lambda _: None)
    assert len(stopped) == 2 and [r["flops"] for r in stopped] == [r["flops"] for r in records[:2]]
    with pytest.raises(ConfigError, match="rlvr_flops"):
        train_rlvr(tiny_lm(0), TOK, RLVRConfig(**{**cfg.__dict__, "rlvr_flops": 1.0}), log=lambda _: None)
