"""
The cross-tokenizer teacher in the OPD step (nanoopd/cross_teacher.py, cross_objectives.py): texts
re-read exactly, one tokenizer on both sides giving the same-tokenizer objectives to the bit, the
chunk costs summing to the two token paths' log-ratio, the projection exact at chunk starts, and
each mismatch refused with a message that says what to do.
"""

import pytest
import torch

from nanoopd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nanoopd.cross_teacher import CrossTokenizerTeacher, check_teacher, teacher_scorer
from nanoopd.cross_tokenizer import chunk_costs, prefix_map, project, retokenize, spelled
from nanoopd.mixed_batch import pool_rollout
from nanoopd.model import GPT, GPTConfig
from nanoopd.objectives import OBJECTIVES
from nanoopd.rollout import generate
from nanoopd.tasks import encode_example, sample_problems
from nanoopd.tokenizer import get_tokenizer

S, T = get_tokenizer("bytes"), get_tokenizer("digits")


def model(tok, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=tok.n_vocab, tokenizer=tok.name, n_layer=1, n_embd=32, n_head=2)).eval()


def rollout(student, n=6, seed=0):
    prompts = [encode_example(S, p)[0] for p in sample_problems(n, "test", seed, 3, "+-")]
    return generate(student, prompts, 20, S.eos_id, S.pad_id, temperature=1.0,
                    generator=torch.Generator().manual_seed(seed))


def test_retokenize_reads_the_same_text_with_digit_runs_merged():
    ids = S.encode("Q: 3471+25=\nA:3496") + [S.eos_id]
    t_ids = retokenize(ids, S, T)
    assert b"".join(spelled(T, t_ids)) == b"".join(spelled(S, ids))
    assert [w for w in spelled(T, t_ids) if w[:1].isdigit()] == [b"347", b"1", b"25", b"349", b"6"]
    assert t_ids[-1] == T.eos_id and retokenize(t_ids, T, S) == ids  # specials by name, and back
    odd = [0xff, S.encode("12")[0], 0x80, S.eos_id]  # bytes a sampler may write: each still read
    assert retokenize(retokenize(odd, S, T), T, S) == odd


def test_one_tokenizer_gives_the_same_tokenizer_objectives_to_the_bit():
    student, teacher = model(S), model(S, 1)
    ro = rollout(student)
    with torch.no_grad():
        logits_t, inputs = CrossTokenizerTeacher(S, S)(teacher, ro)
    for xt, same in (("xt_chunk", "sampled_token"), ("xt_full", "full_reverse_kl")):
        results = []
        for opts in ({}, {}, inputs):  # the counterpart, then xt without and with the scorer's chunks
            s_logits = student(ro.tokens[:, :-1], ro.valid[:, :-1], n_last=ro.response.shape[1])
            loss = OBJECTIVES[same if not results else xt](s_logits, logits_t, ro.response, ro.response_mask, **opts)[0]
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
            student.zero_grad()
        for loss, grads in results[1:]:
            assert torch.equal(loss, results[0][0]), xt
            assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1])), xt


def test_chunk_costs_sum_to_the_token_paths_logratio():
    student, teacher = model(S), model(T, 1)
    texts = ["347+1=348", "A:3471", "9 88 777 6666", "x", "12-7=5\n"]  # responses with digit runs, and none
    ro = pool_rollout([(encode_example(S, p)[0], S.encode(t) + [S.eos_id])
                       for p, t in zip(sample_problems(5, "test", 0, 3, "+-"), texts)], S.pad_id, "cpu")
    scorer = CrossTokenizerTeacher(S, T)
    with torch.no_grad():
        _, inputs = scorer(teacher, ro)
        logp_s = torch.log_softmax(student(ro.tokens[:, :-1], ro.valid[:, :-1], n_last=ro.response.shape[1]), -1)
    chunks = inputs["chunks"]
    lp = logp_s.gather(-1, ro.response.unsqueeze(-1)).squeeze(-1) * ro.response_mask  # (B, N)
    r = chunk_costs(lp, torch.zeros_like(lp), ro.response_mask, chunks) * ro.response_mask
    # the teacher's path log-prob, by its own tokens
    t_rows = [retokenize(row, S, T) for row in ro.rows()]
    for b, tr in enumerate(t_rows):
        path_q = sum(chunks.teacher_logp[b, j, u].item() for j, u in enumerate(tr))
        assert r[b].sum().item() == pytest.approx(lp[b].sum().item() - path_q, abs=1e-4)
    assert any(len(tr) < len(row) for tr, row in zip(t_rows, ro.rows()))  # some digits were merged


def test_the_projection_at_a_chunk_start_is_the_teachers_next_byte():
    logp = torch.log_softmax(torch.randn(T.n_vocab, dtype=torch.float64), -1)
    proj = project(logp.exp(), prefix_map(S, T, b""), S.n_vocab)  # (V_s,)
    assert proj.sum().item() == pytest.approx(1.0, abs=1e-12)  # every teacher token lands on one student token
    three = [u for u, w in enumerate(spelled(T, range(T.n_vocab))) if w.startswith(b"3") and u not in T.special_ids.values()]
    assert len(three) == 1 + 10 + 100 and proj[S.encode("3")[0]].item() == pytest.approx(logp[three].exp().sum().item())
    assert proj[S.eos_id].item() == pytest.approx(logp[T.eos_id].exp().item())
    inside = project(logp.exp(), prefix_map(S, T, b"34"), S.n_vocab)  # after "34": only "34d" goes on
    assert set(inside.nonzero().flatten().tolist()) == set(S.encode("0123456789"))


def test_every_cross_objective_runs_and_trains_from_a_teacher_of_another_tokenizer():
    student, teacher = model(S), model(T, 1)
    ro = rollout(student)
    with torch.no_grad():
        logits_t, inputs = CrossTokenizerTeacher(S, T)(teacher, ro)
    assert logits_t.shape == (*ro.response.shape, S.n_vocab) and torch.isfinite(logits_t).all()
    for name in ("xt_chunk", "xt_full", "xt_uld", "xt_gold"):
        s_logits = student(ro.tokens[:, :-1], ro.valid[:, :-1], n_last=ro.response.shape[1])
        loss, stats = OBJECTIVES[name](s_logits, logits_t, ro.response, ro.response_mask, **inputs)
        loss.backward()
        assert torch.isfinite(loss) and any(p.grad.abs().sum() > 0 for p in student.parameters()), name
        student.zero_grad()
    naive = CrossTokenizerTeacher(S, T, naive=True)(teacher, ro)
    assert naive.shape == logits_t.shape  # the student's ids read as the teacher's: any objective runs


def test_mismatches_are_refused_with_what_to_do(tmp_path):
    student, teacher = model(S), model(T, 1)
    with pytest.raises(ValueError, match="CrossTokenizerTeacher"):
        check_teacher(student, teacher, None, "sampled_token")
    with pytest.raises(ValueError, match="xt_chunk"):
        check_teacher(student, teacher, teacher_scorer(S, teacher), "forward_kl")
    check_teacher(student, teacher, teacher_scorer(S, teacher), "xt_chunk")
    check_teacher(student, teacher, teacher_scorer(S, teacher, naive=True), "forward_kl")  # the mistake, on purpose
    assert teacher_scorer(S, model(S)) is None
    path = str(tmp_path / "teacher.pt")
    save_checkpoint(path, teacher, 0)
    with pytest.raises(CheckpointError, match="--teacher_tokenizer digits"):
        load_checkpoint(path, expect_tokenizer="bytes")
    assert load_checkpoint(path, expect_tokenizer="digits")[0].config.tokenizer == "digits"


def test_train_math_runs_the_whole_pipeline_with_a_teacher_of_another_tokenizer(tmp_path, monkeypatch):
    """--teacher_tokenizer digits: the teacher is trained reading 'digits' (and says so in its
    checkpoint), the student's cold-start pool is its traces re-read as bytes, both are evaluated
    with their own tokenizer, and OPD runs through the alignment. (A 2-step teacher finishes no
    trace: its greedy answers are replaced by one fixed answer written in its own tokens.)"""
    import train_math
    answer = "12+345=\nA:357"
    monkeypatch.setattr(train_math, "generate", lambda teacher, prompts, n, eos_id, pad_id, **kw: pool_rollout(
        [(p, T.encode(answer) + [T.eos_id]) for p in prompts], pad_id, "cpu"))
    cfg = train_math.TrainConfig(s_pool=3)
    pool = train_math.teacher_traces(model(T), S, cfg)
    assert [r for _, r in pool] == [S.encode(answer) + [S.eos_id]] * 3  # the teacher's '12', '345', '357' re-read
    tiny = ["--t_layer", "1", "--t_embd", "16", "--t_head", "2", "--s_layer", "1", "--s_embd", "16", "--s_head", "2",
            "--batch_size", "4", "--digits", "1", "--log_every", "0", "--eval_n", "2", "--final_eval_n", "4",
            "--max_new_tokens", "8", "--opd_steps", "2", "--opd_batch", "2", "--device", "cpu", "--t_steps", "2",
            "--s_steps", "2", "--s_pool", "8"]
    summary = train_math.main(["--out_dir", str(tmp_path), "--teacher_tokenizer", "digits", "--loss", "xt_chunk",
                               "--stages", "teacher,student,eval,opd"] + tiny)
    assert load_checkpoint(str(tmp_path / "teacher.pt"))[0].config.tokenizer == "digits"
    assert load_checkpoint(str(tmp_path / "student.pt"))[0].config.tokenizer == "bytes"
    assert summary["opd_xt_chunk"]["first_kl"] >= 0 and "teacher_acc_greedy" in summary


def test_the_batch_alignment_is_align_row_by_row():
    """cross_teacher.batch_groups (the OPD step's, the whole batch at once) gives every row the groups
    of cross_tokenizer.align, on texts with digit runs of every length and special tokens."""
    import random

    from nanoopd.cross_teacher import batch_groups, piece_lengths
    from nanoopd.cross_tokenizer import align
    rng = random.Random(0)
    texts = ["".join(rng.choice("0123456789+-=\nA: ") for _ in range(rng.randint(1, 30))) for _ in range(40)]
    rows = [S.encode(t) + [S.eos_id] * rng.randint(0, 1) for t in texts]
    t_rows = [retokenize(r, S, T) for r in rows]
    pad = lambda rs: torch.tensor([r + [0] * (max(map(len, rs)) - len(r)) for r in rs])  # noqa: E731
    mask = lambda rs: torch.tensor([[True] * len(r) + [False] * (max(map(len, rs)) - len(r)) for r in rs])  # noqa: E731
    seg, t_seg, G = batch_groups(pad(rows), mask(rows), pad(t_rows), mask(t_rows), piece_lengths(S), piece_lengths(T))
    g = 0
    for b, (r, tr) in enumerate(zip(rows, t_rows)):
        for i0, i1, j0, j1 in align(spelled(S, r), spelled(T, tr)):
            assert seg[b, i0:i1].tolist() == [g] * (i1 - i0) and t_seg[b, j0:j1].tolist() == [g] * (j1 - j0)
            g += 1
    assert g == G and (seg[~mask(rows)] == G).all() and (t_seg[~mask(t_rows)] == G).all()
