"""Teacher-aligned prompt selection (nanoopd/prompt_select.py): the alignment is the teacher's mass on
the shared top-K, averaged over each student sample's tokens, checked position by position against
sets; the rule keeps the highest scores in their original order; a run's prompts are whole seeded
passes over the kept set; a rule that keeps nothing, and a short prompt list, are refused clearly."""

import pytest
import torch

from nanoopd.model import GPT, GPTConfig
from nanoopd.opd import OPDConfig, train_opd
from nanoopd.prompt_select import alignment, prompt_stream, select
from nanoopd.rollout import generate, response_logits
from nanoopd.tasks import encode_example, sample_problems
from nanoopd.tokenizer import get_tokenizer

TOK = get_tokenizer()


def tiny(seed: int, n_embd: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=TOK.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=n_embd)).eval()


def test_alignment_is_the_teachers_mass_on_the_shared_topk_per_sample():
    student, teacher, k = tiny(0, 16), tiny(1, 32), 4
    problems = sample_problems(6, "train", 0, 2)
    got = alignment(teacher, student, TOK, problems, 10, seed=3, k=k)
    # the same samples: one generator of the same seed over the whole (single) batch
    prompts = [encode_example(TOK, p)[0] for p in problems]
    ro = generate(student, prompts, 10, TOK.eos_id, TOK.pad_id, temperature=1.0, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        pi = torch.softmax(response_logits(student, ro), -1)
        q = torch.softmax(response_logits(teacher, ro), -1)
    for i in range(len(problems)):
        masses = []
        for t in range(int(ro.response_mask[i].sum())):
            shared = set(pi[i, t].topk(k).indices.tolist()) & set(q[i, t].topk(k).indices.tolist())
            masses.append(sum(q[i, t, v].item() for v in shared))
        assert got[i] == pytest.approx(sum(masses) / len(masses), abs=1e-6)
    assert got == alignment(teacher, student, TOK, problems, 10, seed=3, k=k)  # seeded: the same again
    same = alignment(student, student, TOK, problems, 10, seed=3, k=TOK.n_vocab)
    assert same == pytest.approx([1.0] * len(problems), abs=1e-5)  # a teacher that is the student, K = V: all its mass


def test_select_keeps_the_highest_scores_in_their_original_order():
    problems = sample_problems(6, "train", 0, 2)
    scores = [0.2, 0.9, 0.5, 0.9, 0.1, 0.7]
    assert select(problems, scores, 0.5) == [problems[i] for i in (1, 3, 5)]
    assert select(problems, scores, 1 / 3) == [problems[1], problems[3]]
    assert select(problems, [0.5] * 6, 0.5) == problems[:3]  # ties: the earlier candidates
    assert select(problems, scores, 1.0) == problems


def test_prompt_stream_is_whole_seeded_passes_over_the_kept_set():
    pool = sample_problems(5, "train", 0, 2)
    s = prompt_stream(pool, 12, seed=7)
    assert len(s) == 12 and sorted(map(str, s[:5])) == sorted(map(str, pool)) == sorted(map(str, s[5:10]))
    assert s == prompt_stream(pool, 12, seed=7) and s != prompt_stream(pool, 12, seed=8)


def test_a_rule_that_keeps_nothing_or_a_short_prompt_list_is_refused():
    problems = sample_problems(3, "train", 0, 2)
    with pytest.raises(ValueError, match="leaves none"):
        select(problems, [1.0, 2.0, 3.0], 0.1)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        select(problems, [1.0, 2.0, 3.0], 0.0)
    with pytest.raises(ValueError, match="one score per problem"):
        select(problems, [1.0], 0.5)
    with pytest.raises(ValueError, match="kept none"):
        prompt_stream([], 4, 0)
    cfg = OPDConfig(opd_steps=2, opd_batch=4, max_new_tokens=6, digits=2, opd_eval_every=0)
    with pytest.raises(ValueError, match="3 training prompts for 2 steps x 4"):
        train_opd(tiny(0, 16), tiny(1, 32), TOK, cfg, "/nonexistent/run", problems, train_problems=problems)


def test_train_opd_trains_on_the_prompts_it_is_given(tmp_path):
    """train_problems replaces the fresh draw: the rewards of the step's rows are those of its prompts."""
    cfg = OPDConfig(opd_steps=2, opd_batch=4, max_new_tokens=6, digits=2, opd_eval_every=0, seed=0)
    fresh = sample_problems(8, "train", 0, 2)
    a, b = tiny(0, 16), tiny(0, 16)
    s1 = train_opd(a, tiny(1, 32), TOK, cfg, str(tmp_path / "a"), fresh[:2], start_acc=0.0)
    s2 = train_opd(b, tiny(1, 32), TOK, cfg, str(tmp_path / "b"), fresh[:2], start_acc=0.0, train_problems=fresh)
    assert s1["first_step"]["loss"] == s2["first_step"]["loss"]  # the same prompts as the fresh draw: the same run
    c = tiny(0, 16)
    s3 = train_opd(c, tiny(1, 32), TOK, cfg, str(tmp_path / "c"), fresh[:2], start_acc=0.0,
                   train_problems=list(reversed(fresh)))
    assert s3["first_step"]["loss"] != s1["first_step"]["loss"]
