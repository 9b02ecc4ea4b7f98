"""Teacher routing (nanoopd/routing.py): each teacher scores exactly the rows of its tasks, one
teacher for every task is plain scoring to the bit, a task without a teacher is refused by name,
and an OPD step runs through the router."""

import pytest
import torch

from nanoopd.model import GPT, GPTConfig
from nanoopd.opd import OPDConfig, opd_step
from nanoopd.rollout import generate, response_logits
from nanoopd.routing import RoutedTeachers, rows_of
from nanoopd.tasks import encode_example, sample_problems
from nanoopd.tokenizer import get_tokenizer

TOK = get_tokenizer()


def tiny(seed: int, n_embd: int = 32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=TOK.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=n_embd)).eval()


def mixed_rollout(n: int = 8):
    problems = sample_problems(n, "train", 0, 2, "+~")  # both task families
    ro = generate(tiny(0), [encode_example(TOK, p)[0] for p in problems], 8, TOK.eos_id, TOK.pad_id,
                  temperature=1.0, generator=torch.Generator().manual_seed(0))
    return problems, ro


@torch.no_grad()
def test_each_teacher_scores_exactly_the_rows_of_its_task():
    problems, ro = mixed_rollout()
    math, rev = tiny(1), tiny(2, 48)  # two shapes: routing does not need them alike
    logits = RoutedTeachers({"math": math, "rev": rev})(math, ro, problems)
    for task, model in (("math", math), ("rev", rev)):
        rows = torch.tensor([i for i, p in enumerate(problems) if p.task == task])
        assert len(rows) and torch.equal(logits[rows], response_logits(model, rows_of(ro, rows)))
        whole = response_logits(model, ro)[rows]  # the same rows scored within the whole batch
        assert torch.allclose(logits[rows], whole, atol=1e-5)


@torch.no_grad()
def test_one_teacher_for_every_task_is_plain_scoring_to_the_bit():
    problems, ro = mixed_rollout()
    teacher = tiny(1)
    assert torch.equal(RoutedTeachers({"math": teacher, "rev": teacher})(teacher, ro, problems),
                       response_logits(teacher, ro))


def test_a_task_without_a_teacher_is_refused_by_name():
    problems, ro = mixed_rollout()
    with pytest.raises(ValueError, match="no teacher is routed for task.s. rev.*known: math"):
        RoutedTeachers({"math": tiny(1)})(None, ro, problems)
    with pytest.raises(ValueError, match="at least one teacher"):
        RoutedTeachers({})
    with pytest.raises(ValueError, match="unknown task.s. words to route; the tasks are math, rev"):
        RoutedTeachers({"math": tiny(1), "words": tiny(2)})
    other = GPT(GPTConfig(vocab_size=get_tokenizer("digits").n_vocab, tokenizer="digits", n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="share the student's tokenizer"):
        RoutedTeachers({"math": tiny(1), "rev": other})


def test_an_opd_step_runs_through_the_router():
    problems = sample_problems(8, "train", 1, 2, "+~")
    student, math, rev = tiny(3, 16).train(), tiny(1), tiny(2)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    rec = opd_step(student, math, opt, TOK, problems, OPDConfig(loss="full_reverse_kl", opd_batch=8, max_new_tokens=8),
                   torch.Generator().manual_seed(0), 0, teacher_score=RoutedTeachers({"math": math, "rev": rev}))
    assert torch.isfinite(torch.tensor(rec["loss"])) and rec["grad_norm"] > 0


def test_train_opd_reports_the_held_out_accuracy_of_every_task(tmp_path):
    """With held-out problems of both families, summary["evals_by_task"] has each task's accuracy at
    every evaluation, and their mean weighted by the problems is the overall accuracy."""
    from nanoopd.opd import train_opd
    evals = sample_problems(12, "test", 0, 2, "+-~")
    student, teacher = tiny(3, 16).train(), tiny(1)
    s = train_opd(student, teacher, TOK, OPDConfig(opd_steps=2, opd_batch=4, max_new_tokens=8, opd_eval_every=1,
                                                   ops="+~"), str(tmp_path / "run"), evals, log=lambda m: None,
                  teacher_score=RoutedTeachers({"math": teacher, "rev": tiny(2)}))
    assert [e[0] for e in s["evals_by_task"]] == [0, 1, 2] and all(set(e[1]) == {"math", "rev"} for e in s["evals_by_task"])
    n = {t: sum(p.task == t for p in evals) for t in ("math", "rev")}
    for (step, by_task), (_, acc, _, _) in zip(s["evals_by_task"], s["evals"]):
        assert sum(by_task[t] * n[t] for t in n) / len(evals) == pytest.approx(acc)
