"""GKD's lmbda (nanoopd/mixed_batch.py): lmbda = 1 is the on-policy step bit for bit, a merged batch
scores every row as it scores alone, the teacher writes exactly the last rows, the figures are
reported per source, a pool's traces come in order and are charged once, a FLOP budget ends a run,
and the settings that leave no teacher to sample from are refused."""

import copy

import pytest
import torch

from nanoopd.config import ConfigError
from nanoopd.flops import opd_step_flops, pass_flops
from nanoopd.loop import adamw, update
from nanoopd.mixed_batch import TeacherRows, merge, pool_rollout, student_share
from nanoopd.model import GPT, GPTConfig
from nanoopd.objectives import get_objective
from nanoopd.opd import OPDConfig, freeze, opd_step, train_opd
from nanoopd.rollout import generate, response_logits
from nanoopd.tasks import encode_example, sample_problems
from nanoopd.tokenizer import get_tokenizer

TOK = get_tokenizer()


def tiny(seed: int, n_embd: int = 32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=TOK.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=n_embd))


def config(**kw) -> OPDConfig:
    base = dict(opd_steps=3, opd_batch=8, max_new_tokens=12, digits=2, opd_eval_every=0, seed=0, opd_lr=1e-3)
    return OPDConfig(**{**base, **kw})


PROBLEMS = sample_problems(8, "train", 0, 2)
PROMPTS = [encode_example(TOK, p)[0] for p in PROBLEMS]


def test_student_share_rounds_lmbda_times_the_batch():
    assert [student_share(x, 8) for x in (0.0, 0.25, 0.5, 0.9, 1.0)] == [0, 2, 4, 7, 8]


def test_student_share_rounds_to_the_nearest_row_halves_to_even():
    """lmbda * B below and above a half, and on halves: Python's round, whose halves go to the even number."""
    for lmbda, expected in ((0.95, 8), (0.0625, 0), (0.1875, 2), (0.3125, 2), (0.5625, 4)):  # x8: 7.6, .5, 1.5, 2.5, 4.5
        S = student_share(lmbda, 8)
        assert type(S) is int, f"student_share must return a Python int (a row count for slicing), got {type(S)}"
        how = ("on a half, round goes to the even number (round(2.5) = 2, round(1.5) = 2), as Python's round does; "
               "int(x + 0.5) takes every half up" if (lmbda * 8) % 1 == 0.5 else
               "S is the nearest whole row: round, not a floor (int() and math.floor cut 7.6 down to 7)")
        assert S == expected, f"student_share({lmbda}, 8) = {S}, expected {expected}: lmbda * B = {lmbda * 8}; {how}"


def test_merge_left_pads_the_prompts_and_right_pads_the_responses():
    """Two rollouts of other paddings (P 2 and 4, N 3 and 2) merged: every field by hand, then every row
    scored as it is scored alone (no sampling here: the rollouts are built from token lists)."""
    from dataclasses import replace
    pad = 9
    a_pairs, b_pairs = [([1, 2], [3, 4, 5]), ([1], [6])], [([1, 2, 3, 4], [7]), ([1, 8, 2], [5, 6])]
    a, b = pool_rollout(a_pairs, pad, "cpu"), pool_rollout(b_pairs, pad, "cpu")
    a = replace(a, logprobs=torch.where(a.response_mask, -0.5, 0.0))  # log-probs to pad with 0 where masked
    b = replace(b, sampler_logprobs=torch.where(b.response_mask, -0.25, 0.0))
    m = merge([a, b], pad)
    ref = pool_rollout(a_pairs + b_pairs, pad, "cpu")  # P = 4, N = 3: the layout merge must give
    assert m.prompt_len == 4 and tuple(m.tokens.shape) == (4, 7), (
        f"merge gave prompt_len {m.prompt_len} and tokens {tuple(m.tokens.shape)}: expected P = 4 (the longest "
        f"padded prompt) and (4 rows, P + N = 4 + 3) (N = 3, the longest response budget)")
    for i, (p, _) in enumerate(a_pairs + b_pairs):
        got = m.tokens[i].tolist()
        if got[:4] == p + [pad] * (4 - len(p)) and got != ref.tokens[i].tolist():
            raise AssertionError(f"row {i}: the prompt {p} was padded on the right ({got[:4]}): prompts are left-padded, "
                                 f"the pads before the prompt, so that every prompt ends at column P - 1 and its response "
                                 f"starts at column P (response_logits reads the logits there)")
    blocks = torch.cat([ref.tokens[2:], ref.tokens[:2]])
    assert not torch.equal(m.tokens, blocks), (
        "the rows came out in the wrong order: the rows of parts[0] first, then those of parts[1] (in opd_step the "
        "student's rows are 0 .. S-1 and the teacher's the last)")
    assert torch.equal(m.tokens, ref.tokens), (
        f"merge's tokens are {m.tokens.tolist()}, expected {ref.tokens.tolist()}: prompts left-padded to P, "
        f"responses right-padded to N, with pad_id")
    assert torch.equal(m.valid, ref.valid), (
        f"merge's valid is {m.valid.int().tolist()}, expected {ref.valid.int().tolist()}: False on every pad "
        f"(left of the prompt, right of the response), True on the real tokens")
    assert torch.equal(m.response, ref.response), (
        f"merge's response is {m.response.tolist()}, expected {ref.response.tolist()}: right-padded with pad_id")
    assert torch.equal(m.response_mask, ref.response_mask), (
        f"merge's response_mask is {m.response_mask.int().tolist()}, expected {ref.response_mask.int().tolist()}: "
        f"it must be False on the padding, where the objectives' loss never looks (True there puts pad tokens into "
        f"the loss)")
    logprobs, sampler_logprobs = torch.zeros(4, 3), torch.zeros(4, 3)
    logprobs[:2] = a.logprobs  # a's budget is already N = 3
    sampler_logprobs[2:, :2] = b.sampler_logprobs
    for name, want in (("logprobs", logprobs), ("sampler_logprobs", sampler_logprobs)):
        assert torch.equal(getattr(m, name), want), (
            f"merge's {name} is {getattr(m, name).tolist()}, expected {want.tolist()}: each part's values, "
            f"right-padded with 0.0")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=8))
    with torch.no_grad():
        whole = response_logits(model, m)  # (4, 3, V)
        for part, rows in ((a, slice(0, 2)), (b, slice(2, 4))):
            n, mask = part.response.shape[1], part.response_mask
            torch.testing.assert_close(whole[rows, :n][mask], response_logits(model, part)[mask], atol=1e-5, rtol=1e-5)
    assert merge([None, b], pad) is b and merge([a, None], pad) is a


def test_lmbda_1_is_the_plain_on_policy_step_bit_for_bit():
    """opd_step at lmbda = 1 against the five steps written out by hand: the same weights, exactly."""
    teacher = freeze(tiny(0, 48))
    ours, ref = tiny(1), tiny(1)
    cfg = config(loss="full_reverse_kl")
    opd_step(ours, teacher, adamw(ours, 1e-3), TOK, PROBLEMS, cfg, torch.Generator().manual_seed(3), 0)
    ro = generate(ref, PROMPTS, cfg.max_new_tokens, TOK.eos_id, TOK.pad_id, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        t_logits = response_logits(teacher, ro).float()
    ref.train()
    s_logits = response_logits(ref, ro).float()
    loss, _ = get_objective("full_reverse_kl")(s_logits, t_logits, ro.response, ro.response_mask)
    update(ref, adamw(ref, 1e-3), loss, cfg.grad_clip, "reference")
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_a_merged_batch_scores_every_row_as_it_scores_alone():
    model = tiny(2)
    a = generate(tiny(3), PROMPTS[:3], 12, TOK.eos_id, TOK.pad_id, generator=torch.Generator().manual_seed(0))
    b = pool_rollout([([TOK.bos_id] + list(range(5, 15)), [20, 21, TOK.eos_id]), ([TOK.bos_id, 7], [22, TOK.eos_id])],
                     TOK.pad_id, "cpu")
    m = merge([a, b], TOK.pad_id)
    assert m.tokens.shape == (5, max(a.prompt_len, b.prompt_len) + max(a.response.shape[1], b.response.shape[1]))
    with torch.no_grad():
        whole = response_logits(model, m)  # (5, N, V)
        for part, rows in ((a, slice(0, 3)), (b, slice(3, 5))):
            alone = response_logits(model, part)  # (b, N_i, V)
            n = part.response.shape[1]
            mask = part.response_mask
            assert torch.equal(m.response[rows, :n], part.response) and torch.equal(m.response_mask[rows, :n], mask)
            assert not m.response_mask[rows, n:].any()
            torch.testing.assert_close(whole[rows, :n][mask], alone[mask], atol=1e-5, rtol=1e-5)
    assert merge([None, a], TOK.pad_id) is a


def test_the_teacher_writes_the_last_rows_with_the_generator_after_the_students_draw():
    teacher, student = freeze(tiny(0, 48)), tiny(1)
    cfg = config(loss="forward_kl", lmbda=0.5)
    gen = torch.Generator().manual_seed(5)
    rec = opd_step(student, teacher, adamw(student, 1e-3), TOK, PROBLEMS, cfg, gen, 0)
    ref_gen = torch.Generator().manual_seed(5)
    s_ro = generate(tiny(1), PROMPTS[:4], 12, TOK.eos_id, TOK.pad_id, generator=ref_gen)
    t_ro = generate(teacher, PROMPTS[4:], 12, TOK.eos_id, TOK.pad_id, generator=ref_gen)
    assert torch.equal(gen.get_state(), ref_gen.get_state())
    # per source: the student's rows unsuffixed, the teacher's with _teacher_rows
    assert {"acc", "kl", "response_length", "acc_teacher_rows", "kl_teacher_rows",
            "response_length_teacher_rows"} <= set(rec)
    assert rec["response_length"] == s_ro.lengths.float().mean().item()
    assert rec["response_length_teacher_rows"] == t_ro.lengths.float().mean().item()
    lens = lambda ro: ([len(p) for p in PROMPTS[:4]] if ro is s_ro else [len(p) for p in PROMPTS[4:]], ro.lengths.tolist())
    compute, sampling = opd_step_flops(student.config, teacher.config, lens(s_ro), lens(t_ro), lens(t_ro))
    assert rec["flops"] == pytest.approx(compute + sampling) and rec["flops_given"] == pytest.approx(compute)
    assert sampling == pass_flops(teacher.config, *lens(t_ro)) > 0


def test_lmbda_0_reports_only_teacher_rows_and_trains(tmp_path):
    teacher, student = freeze(tiny(0, 48)), tiny(1)
    before = copy.deepcopy(student)
    s = train_opd(student, teacher, TOK, config(loss="sft", lmbda=0.0), str(tmp_path / "kd"),
                  sample_problems(4, "test", 0, 2), log=lambda _: None, start_acc=0.0)
    assert s["figures_of"] == "teacher rows" and s["final_kl"] >= 0
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), student.parameters()))
    # sft never reads the teacher: its scoring is not charged, its sampling is
    assert s["flops"] > s["flops_given"] > 0


def test_a_pool_gives_its_traces_in_a_seeded_order_charged_in_the_first_pass_only():
    pool = [(PROBLEMS[i], PROMPTS[i], [30 + i, TOK.eos_id]) for i in range(3)]
    rows = TeacherRows("pool", pool, seed=0)
    teacher = tiny(0)
    _, prompts, problems, charged = rows(teacher, [None] * 2, [None] * 2, 2, config(), TOK, None)
    assert problems == [PROBLEMS[rows.order[2]], PROBLEMS[rows.order[0]]] and charged == [True, False]
    assert prompts == [PROMPTS[rows.order[2]], PROMPTS[rows.order[0]]]
    with pytest.raises(ValueError, match="pool"):
        TeacherRows("pool", [])


def test_a_flop_budget_ends_the_run_after_the_step_that_reaches_it(tmp_path):
    teacher, student = freeze(tiny(0, 48)), tiny(1)
    one = train_opd(tiny(1), teacher, TOK, config(opd_steps=1), str(tmp_path / "one"), sample_problems(4, "test", 0, 2),
                    log=lambda _: None, start_acc=0.0)["flops"]
    s = train_opd(student, teacher, TOK, config(opd_steps=10, opd_flops=1.5 * one), str(tmp_path / "b"),
                  sample_problems(4, "test", 0, 2), log=lambda _: None, start_acc=0.0)
    assert s["steps_done"] == 2 and s["flops"] >= 1.5 * one and s["evals"][-1][0] == 2
    with pytest.raises(ConfigError, match="opd_flops"):
        train_opd(tiny(1), teacher, TOK, config(opd_flops=1.0), str(tmp_path / "c"), [], log=lambda _: None,
                  start_acc=0.0)
    assert not (tmp_path / "c.jsonl").exists()


def test_no_teacher_to_sample_from_is_refused():
    student = tiny(1)
    with pytest.raises(ConfigError, match="lmbda"):
        train_opd(student, student, TOK, config(lmbda=0.5), "unused", [], log=lambda _: None, start_acc=0.0)
    with pytest.raises(ConfigError, match="lmbda"):
        train_opd(student, tiny(0), TOK, config(lmbda=0.5), "unused", [], log=lambda _: None, start_acc=0.0,
                  teacher_score=lambda t, ro, p: response_logits(t, ro))
    with pytest.raises(ConfigError, match="lmbda"):
        config(lmbda=2.0)


def test_a_sampled_form_off_policy_says_what_it_estimates(tmp_path):
    lines = []
    train_opd(tiny(1), freeze(tiny(0, 48)), TOK, config(opd_steps=1, lmbda=0.5), str(tmp_path / "r"), [],
              log=lines.append, start_acc=0.0)
    assert any("assumes y ~ pi" in line for line in lines)
