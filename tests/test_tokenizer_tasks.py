"""Tokenizer round-trip and special-token refusal, and the second tokenizer ("digits") of the same
texts; task splits and the verifier."""

import pytest

from nanoopd.tasks import Problem, extract_answer, sample_problems, split_of, trace_text, verify
from nanoopd.tokenizer import SPECIAL_TOKENS, get_tokenizer


def test_round_trip_on_text_and_bytes():
    tok = get_tokenizer()
    for text in ["347+285=\n7+5+0=12\nA:632", "héllo wörld ✓ 12 345", "", " \n\t"]:
        assert tok.decode(tok.encode(text)) == text


def test_digits_are_single_tokens():
    tok = get_tokenizer()
    ids = tok.encode("1234567890")
    assert len(ids) == 10


def test_the_digits_tokenizer_reads_numbers_in_pieces_of_up_to_three():
    from nanoopd.cross_tokenizer import align
    from nanoopd.tokenizer import Tokenizer
    b, d = get_tokenizer(), get_tokenizer("digits")
    assert (b.n_vocab, b.eos_id) == (261, 257)  # the project's tokenizer is what it was
    assert d.n_vocab == 256 + 100 + 1000 + len(SPECIAL_TOKENS) and d.special_ids["<|eos|>"] == d.eos_id == 1357
    assert [d.encode(str(n).zfill(3)) for n in (0, 347, 999)] == [[356], [356 + 347], [356 + 999]]
    assert [d.encode(str(n).zfill(2)) for n in (0, 47)] == [[256], [256 + 47]]
    piece = lambda tok, text: [tok.enc.decode_single_token_bytes(i) for i in tok.encode(text)]
    assert piece(d, "3471+28=") == [b"347", b"1", b"+", b"28", b"="]
    for text in ["347+285=\n7+5+0=12\nA:632", "héllo wörld ✓ 12 345", "", "0000001"]:
        assert d.decode(d.encode(text)) == text
    assert d.encode("<|eos|>", allow_special=True) == [d.eos_id]
    with pytest.raises(ValueError, match="unknown tokenizer 'wordpiece'; the known ones: bytes, digits"):
        Tokenizer("wordpiece")
    # the two read one trace alike but for its numbers: the groups are the numbers' digit runs
    text = "347+285=\n7+5+0=12\nA:632"
    groups = align(piece(b, text), piece(d, text))
    assert [b"".join(piece(b, text)[i0:i1]) for i0, i1, j0, j1 in groups if i1 - i0 > 1] == [b"347", b"285", b"12", b"632"]


def test_special_tokens_are_refused_in_plain_text_unless_allowed():
    tok = get_tokenizer()
    for s in SPECIAL_TOKENS:
        with pytest.raises(ValueError):
            tok.encode(f"12+3 {s}")
        assert tok.encode(s, allow_special=True) == [tok.special_ids[s]]
    assert tok.n_vocab == 256 + len(SPECIAL_TOKENS)
    assert len({tok.bos_id, tok.eos_id, tok.pad_id, tok.pi_id, tok.fmt_id}) == 5


def test_traces_are_correct_and_verified():
    for p in sample_problems(300, "train", 0, digits=4, ops="+-*"):
        text = trace_text(p)
        assert verify(text, p) == 1
        assert text.endswith(f"A:{p.answer}")
    assert trace_text(Problem(347, "+", 285)) == "7+5+0=12\n4+8+1=13\n3+2+1=6\nA:632"
    assert trace_text(Problem(503, "-", 28)) == "13-8-0=5\n10-2-1=7\n5-0-1=4\nA:475"
    assert trace_text(Problem(47, "*", 6)) == "7*6+0=42\n4*6+4=28\nA:282"


def test_verifier_on_right_wrong_truncated_and_garbage():
    p = Problem(12, "+", 30)
    assert verify("2+0+0=2\n1+3+0=4\nA:42", p) == 1
    assert verify("A:41", p) == 0
    assert verify("2+0+0=2\n1+3+0=4\nA:", p) == 0  # truncated before the answer
    assert verify("2+0+0=2\n1+3", p) == 0
    assert verify("A:7 A:42", p) == 1  # the last answer counts
    for garbage in ["", "\x00\xff", "A:" + "9" * 5000, None, 12345, b"A:42", "A:-"]:
        assert verify(garbage, p) in (0, 1)
    assert extract_answer("A:-5") == -5


def test_splits_are_deterministic_disjoint_and_respected():
    train = sample_problems(3000, "train", 1, digits=2, ops="+-*")
    test = sample_problems(500, "test", 1, digits=2, ops="+-*")
    assert train == sample_problems(3000, "train", 1, digits=2, ops="+-*")
    assert all(split_of(p) == "train" for p in train) and all(split_of(p) == "test" for p in test)
    assert not set(train) & set(test)
    # other seeds draw other problems but can never cross the split
    assert not set(sample_problems(3000, "train", 2, digits=2, ops="+-*")) & set(test)


def test_prompt_prefix_and_bad_arguments():
    from nanoopd.tasks import prompt_text
    assert prompt_text(Problem(1, "+", 2), "RULE ") == "RULE 1+2=\n"
    with pytest.raises(ValueError):
        sample_problems(1, "valid", 0)
    with pytest.raises(ValueError):
        sample_problems(1, "train", 0, ops="/")


def test_accuracy_by_op_splits_the_verifier_by_operator():
    from nanoopd.evaluate import accuracy_by_op
    problems = [Problem(12, "+", 30), Problem(50, "-", 8), Problem(7, "+", 1), Problem(9, "-", 9)]
    texts = [trace_text(problems[0]), trace_text(problems[1]), "A:9", "no answer at all"]
    assert accuracy_by_op(problems, texts) == {"+": 0.5, "-": 0.5}
    assert accuracy_by_op(problems[:2], texts[:2]) == {"+": 1.0, "-": 1.0}


def test_weighted_ops_expands_counts_and_rejects_what_is_not_a_mix():
    """'+99-' is 99 '+' and one '-' (the weights sample_problems draws with); no count means 1."""
    from nanoopd.tasks import weighted_ops
    assert weighted_ops("+99-") == "+" * 99 + "-"
    assert weighted_ops("+-") == "+-" and weighted_ops("+++-") == "+++-" and weighted_ops("") == ""
    assert weighted_ops("-2*12") == "--" + "*" * 12
    for bad in ("9+", "+0-", "+-0"):
        with pytest.raises(ValueError, match="count >= 1"):
            weighted_ops(bad)


def test_the_reversal_task_traces_verifies_and_splits_like_arithmetic():
    """The second task family, '~': the digits of a reversed, one more a line; the verifier reads
    the integer (leading zeros and all); the splits are disjoint; each operator has one task."""
    from nanoopd.tasks import OPS, TASKS, Problem, split_of, trace_text, verify
    p = Problem(3470, "~", 0)
    assert (p.text, p.answer, p.task) == ("3470~", 743, "rev")
    assert trace_text(p) == "0\n07\n074\n0743\nA:0743" and verify(trace_text(p), p) == 1
    assert verify("A:743", p) == 1 and verify("A:3470", p) == 0 and verify("0743", p) == 0
    assert sorted("".join(TASKS.values())) == sorted(OPS) and Problem(1, "-", 0).task == "math"
    train = sample_problems(2000, "train", 3, digits=3, ops="+~")
    test = sample_problems(300, "test", 3, digits=3, ops="+~")
    assert {q.op for q in train} == {"+", "~"} and all(q.b == 0 for q in train if q.op == "~")
    assert not set(train) & set(test) and all(split_of(q) == "test" for q in test)
    assert all(verify(trace_text(q), q) for q in train[:300])
