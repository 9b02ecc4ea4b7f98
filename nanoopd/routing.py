"""
Teacher routing: several teachers in one OPD step, each scoring only the rows of its tasks.

    RoutedTeachers({"math": teacher_a, "rev": teacher_b})        opd_step's teacher_score hook
        (teacher, rollout, problems) -> logits (B, N, V)

A row goes to the teacher of its problem's task family (tasks.TASKS, Problem.task). Rows routed to
one teacher are scored together, in one forward pass over just those rows, and the logits are put
back in row order; the model masks padding and counts positions over real tokens, so a row scores
as it would in any batch. One teacher for every task (a generalist) is a single forward pass over
all the rows: plain scoring, to the bit. Teachers of different shapes are allowed; the step's FLOP
count charges the scoring at the size of the `teacher` handed to train_opd.
"""

import torch

from nanoopd.rollout import Rollout, response_logits
from nanoopd.tasks import TASKS


def rows_of(ro: Rollout, index: torch.Tensor) -> Rollout:
    """The rows `index` (b,) of a rollout, with its padded widths (P and N) kept."""
    return Rollout(tokens=ro.tokens[index], valid=ro.valid[index], prompt_len=ro.prompt_len,
                   response=ro.response[index], response_mask=ro.response_mask[index],
                   logprobs=ro.logprobs[index], sampler_logprobs=ro.sampler_logprobs[index])


class RoutedTeachers:
    """A teacher per task family; the same model may serve several (module docstring)."""

    def __init__(self, teachers: dict):
        if not teachers:
            raise ValueError("routing needs at least one teacher: give {task: teacher} for every task in the mixture")
        unknown = sorted(set(teachers) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)} to route; the tasks are {', '.join(TASKS)}")
        vocab = {t.config.vocab_size for t in teachers.values()}
        if len(vocab) > 1:
            raise ValueError(f"the routed teachers read vocabularies of {sorted(vocab)} tokens: they must share the "
                             f"student's tokenizer")
        self.teachers = {task: t.eval().requires_grad_(False) for task, t in teachers.items()}

    def __call__(self, teacher, ro: Rollout, problems) -> torch.Tensor:
        tasks = [p.task for p in problems]
        missing = sorted(set(tasks) - set(self.teachers))
        if missing:
            raise ValueError(f"no teacher is routed for task(s) {', '.join(missing)}: the mixture has them; route "
                             f"one for each (known: {', '.join(sorted(self.teachers))})")
        groups = {}  # id of the model -> (model, its rows)
        for row, task in enumerate(tasks):
            groups.setdefault(id(self.teachers[task]), (self.teachers[task], []))[1].append(row)
        if len(groups) == 1:  # one teacher for every row: plain scoring
            return response_logits(next(iter(groups.values()))[0], ro)
        out = None
        for model, rows in groups.values():
            index = torch.tensor(rows, device=ro.response.device)
            logits = response_logits(model, rows_of(ro, index))  # (b, N, V)
            if out is None:
                out = logits.new_empty(len(tasks), *logits.shape[1:])  # (B, N, V)
            out[index] = logits
        return out
