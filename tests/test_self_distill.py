"""OPSD: the teacher's scores under privileged information equal a manual forward pass on the
concatenated sequence, PI never reaches the student's context, the frozen teacher never moves,
the rule and its verifier."""

import pytest
import torch

from nanoopd.model import GPT, GPTConfig
from nanoopd.rollout import generate
from nanoopd.self_distill import (PI_KINDS, RULE, PrivilegedTeacher, mixture_kinds, pi_example, pi_text,
                                  rule_trace, self_teacher, verify_rule, with_privileged_context)
from nanoopd.tasks import encode_example
from nanoopd.tasks import Problem, sample_problems, trace_text, verify
from nanoopd.tokenizer import get_tokenizer

TOK = get_tokenizer()


def tiny(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=TOK.n_vocab, block_size=128, n_layer=1, n_head=2, n_embd=32)).eval()


def student_rollout(model, problems, n=10, seed=0):
    prompts = [encode_example(TOK, p)[0] for p in problems]
    return generate(model, prompts, n, TOK.eos_id, TOK.pad_id, temperature=1.0,
                    generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", PI_KINDS)
def test_teacher_logprobs_under_pi_equal_a_manual_pass_on_the_concatenation(kind):
    model = tiny()
    problems = sample_problems(5, "train", 0, digits=3)  # ragged prompts and PI lengths
    ro = student_rollout(model, problems)
    logits = PrivilegedTeacher(TOK, kind)(model, ro, problems)  # (B, N, V)
    assert logits.shape[:2] == ro.response.shape
    logq = torch.log_softmax(logits.float(), -1).gather(-1, ro.response.unsqueeze(-1)).squeeze(-1)  # (B, N)
    for i, p in enumerate(problems):
        n = int(ro.response_mask[i].sum())
        seq = ([TOK.bos_id] + TOK.encode(pi_text(p, kind), allow_special=True)
               + TOK.encode(f"{p.text}=\n") + ro.response[i, :n].tolist())
        seq = torch.tensor([seq])  # (1, L)
        manual = torch.log_softmax(model(seq[:, :-1]), -1).gather(-1, seq[:, 1:, None])[0, -n:, 0]  # (n,) no padding
        assert torch.allclose(logq[i, :n], manual, atol=1e-5), (kind, i)


def test_teacher_context_is_pi_then_the_students_prompt_then_the_same_response():
    model = tiny()
    problems = sample_problems(4, "train", 1, digits=2)
    ro = student_rollout(model, problems)
    teacher = PrivilegedTeacher(TOK, "answer")
    ctx = with_privileged_context(ro, teacher.pi_ids(problems), TOK.pad_id)
    P = ctx.prompt_len
    assert torch.equal(ctx.tokens[:, P:], ro.response) and torch.equal(ctx.valid[:, P:], ro.response_mask)
    for i, p in enumerate(problems):
        prompt = [t for t, v in zip(ctx.tokens[i, :P].tolist(), ctx.valid[i, :P].tolist()) if v]
        assert prompt == encode_example(TOK, p, pi_text(p, "answer"), prefix_special=True)[0]
        assert prompt.count(TOK.pi_id) == 2


def test_pi_never_appears_in_the_students_context_and_user_text_cannot_inject_it():
    model = tiny()
    problems = sample_problems(8, "train", 2)
    ro = student_rollout(model, problems, n=20)
    for kind in PI_KINDS:
        ctx = with_privileged_context(ro, PrivilegedTeacher(TOK, kind).pi_ids(problems), TOK.pad_id)
        P = ctx.prompt_len
        assert (ctx.tokens[:, :P][ctx.valid[:, :P]] == TOK.pi_id).sum() == 2 * len(problems)
    # the student's own prompts, as built for the rollout, hold no <|pi|>
    assert not (ro.tokens[:, :ro.prompt_len][ro.valid[:, :ro.prompt_len]] == TOK.pi_id).any()
    with pytest.raises(ValueError):
        TOK.encode(f"<|pi|>{RULE}<|pi|>1+1=\n")  # plain text spelling the marker is refused
    with pytest.raises(ValueError):
        encode_example(TOK, problems[0], "<|pi|>")  # nor can a prefix unless allowed explicitly


def test_the_frozen_teacher_is_a_detached_copy_and_the_live_one_is_the_model():
    model = tiny()
    frozen = self_teacher(model)
    assert frozen is not model and not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert self_teacher(model, live=True) is model


def test_rule_trace_and_its_verifier():
    p = Problem(347, "+", 285)
    assert rule_trace(p).endswith("\nA:236")
    assert rule_trace(p).split("\n")[:-1] == trace_text(p).split("\n")[:-1]
    assert verify_rule("A:236", p) == 1 and verify(rule_trace(p), p) == 0
    assert verify_rule("A:632", p) == 0 and verify_rule("A:236\nA:632", p) == 0
    assert verify_rule("A:021", Problem(100, "+", 20)) == 1 and verify_rule("A:21", Problem(100, "+", 20)) == 0
    assert verify_rule("A:121", Problem(100, "+", 21)) == 1 == verify("A:121", Problem(100, "+", 21))
    for junk in (None, "", "A:", b"\xff", 3.5):
        assert verify_rule(junk, p) == 0


def test_sft_mixture_examples():
    p = Problem(12, "-", 7)
    prompt, resp = pi_example(TOK, p, "rule")
    assert TOK.decode(prompt) == f"<|bos|><|pi|>{RULE}<|pi|>12-7=\n"
    assert TOK.decode(resp) == rule_trace(p) + "<|eos|>"
    assert pi_example(TOK, p, "none") == encode_example(TOK, p)
    assert pi_example(TOK, p, "answer")[1] == encode_example(TOK, p)[1]
    kinds = mixture_kinds(4000, {"none": 1, "rule": 3}, torch.Generator().manual_seed(0))
    assert set(kinds) == {"none", "rule"} and 0.7 < kinds.count("rule") / 4000 < 0.8
    with pytest.raises(ValueError, match="mixture"):
        mixture_kinds(3, {"hint": 1.0}, torch.Generator())
    with pytest.raises(ValueError, match="privileged"):
        pi_text(p, "hint")


@pytest.mark.parametrize("weights", [{"none": 0.3, "answer": 0.3, "solution": 0.1, "rule": 0.3},
                                     {"none": 1, "rule": 3}, {"answer": 2, "none": 0, "rule": 5}])
def test_mixture_draws_exactly_what_multinomial_drew(weights):
    """The OPSD base's SFT mixture is drawn without torch.multinomial (broken on some MPS stacks),
    yet kind for kind as it was drawn with it, so its data and the runs from it are unchanged."""
    for seed in range(3):
        kinds = list(weights)
        probs = torch.tensor([float(w) for w in weights.values()])
        old = torch.multinomial(probs, 2000, replacement=True, generator=torch.Generator().manual_seed(seed))
        assert mixture_kinds(2000, weights, torch.Generator().manual_seed(seed)) == [kinds[i] for i in old.tolist()]


def opsd_config(**kw):
    from nanoopd.opd import OPDConfig
    base = dict(loss="full_reverse_kl", opd_steps=2, opd_batch=4, max_new_tokens=10, digits=1, opd_eval_every=0,
                seed=0, opd_lr=1e-2, opd_warmup=0)
    return OPDConfig(**{**base, **kw})


def rows_contain(idx: torch.Tensor, pattern: list[int]) -> list[bool]:
    n = len(pattern)
    return [any(row[i:i + n] == pattern for i in range(len(row) - n + 1)) for row in idx.tolist()]


def test_an_opsd_run_shows_pi_to_the_teacher_only_and_never_moves_the_frozen_teacher(tmp_path):
    from nanoopd.opd import train_opd
    student = tiny(1)
    teacher = self_teacher(student)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = {"student": [], "teacher": []}
    student.register_forward_pre_hook(lambda m, args: seen["student"].append(args))
    teacher.register_forward_pre_hook(lambda m, args: seen["teacher"].append(args))
    problems = sample_problems(3, "test", 0, digits=1)
    train_opd(student, teacher, TOK, opsd_config(), str(tmp_path / "opsd"), problems, log=lambda _: None,
              start_acc=0.0, teacher_score=PrivilegedTeacher(TOK, "rule"))
    rule = TOK.encode(RULE)
    # the teacher scored every rollout, each behind the rule; the student never saw it
    assert seen["teacher"] and all(all(rows_contain(a[0], rule)) for a in seen["teacher"])
    assert all(not any(rows_contain(a[0], rule)) for a in seen["student"])
    prompts = [a for a in seen["student"] if len(a) == 3 and a[2] is not None and a[0].shape[1] > 1]
    assert prompts and all(not (a[0] == TOK.pi_id).any() for a in prompts)  # the rollout prompts
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # bit-identical
    assert not all(torch.equal(v, teacher.state_dict()[k]) for k, v in student.state_dict().items())
    assert all(p.requires_grad for p in student.parameters()) and all(p.grad is None for p in teacher.parameters())


def test_opsd_with_live_weights_trains_the_student_without_freezing_it(tmp_path):
    from nanoopd.opd import train_opd
    student = tiny(1)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    s = train_opd(student, self_teacher(student, live=True), TOK, opsd_config(), str(tmp_path / "live"),
                  sample_problems(3, "test", 0, digits=1), log=lambda _: None, start_acc=0.0,
                  teacher_score=PrivilegedTeacher(TOK, "answer"))
    assert s["steps_done"] == 2 and s["first_kl"] > 0
    assert all(p.requires_grad for p in student.parameters())
    assert not all(torch.equal(v, start[k]) for k, v in student.state_dict().items())


@pytest.mark.parametrize("kind", PI_KINDS)
def test_pi_kl_is_the_token_kl_to_the_pi_teacher_at_the_students_own_states(kind):
    """The aggregation measure by hand: each sample scored alone, the student on [bos] x y_<t, the
    teacher on [bos] PI x y_<t, the KL summed over the real response tokens of every row."""
    from nanoopd.self_distill import pi_kl
    student, teacher = tiny(0), tiny(1)
    problems = sample_problems(5, "test", 0, 2)
    got = pi_kl(student, teacher, TOK, problems, kind, 10, seed=4)
    ro = student_rollout(student, problems, n=10, seed=4)
    total, count = 0.0, 0
    with torch.no_grad():
        for i, p in enumerate(problems):
            prompt = encode_example(TOK, p)[0]
            y = ro.response[i][ro.response_mask[i]].tolist()
            pi = TOK.encode(pi_text(p, kind), allow_special=True)
            s = torch.log_softmax(student(torch.tensor([prompt + y]))[0, len(prompt) - 1:-1], -1)  # (n, V)
            q = torch.log_softmax(teacher(torch.tensor([prompt[:1] + pi + prompt[1:] + y]))[0, len(pi) + len(prompt) - 1:-1], -1)
            total += (s.exp() * (s - q)).sum().item()
            count += len(y)
    assert got == pytest.approx(total / count, rel=1e-5)
    assert pi_kl(student, student, TOK, problems, kind, 10, seed=4) > 0  # PI moves the teacher, even on its own weights
