"""Chain's worked solutions that slip and correct themselves: the move of R1-Zero's aha moment."""

import pytest

from nanoseek import tasks
from nanoseek.errors import NanoseekError
from nanoseek.eval import corrects_a_slip, reflects

OPTIONS = dict(min_values=2, max_values=7, min_value=1, max_value=5, signed=True)


@pytest.fixture(scope="module")
def task():
    return tasks.get("chain", **OPTIONS)


def test_a_slip_is_one_off_then_corrected_and_the_rest_unchanged(task):
    problem = next(p for p in task.sample(40, "train", 0) if p.difficulty == 4)
    plain = task.worked(problem)
    steps = [str(s) for s in task.steps(problem)]
    for k, step in enumerate(steps):
        slipped = task.worked(problem, slip_at=k)
        lhs, right = step.rsplit("=", 1)
        first = slipped.index(f"{lhs}=")
        wrong = int(slipped[first + len(lhs) + 1 :].split(" ", 1)[0])
        assert abs(wrong - int(right)) == 1
        assert f"={wrong} wait, {step}" in slipped
        assert slipped.replace(f"{lhs}={wrong} wait, ", "", 1) == plain  # only the slip is added
        assert reflects(slipped) and not reflects(plain)
        # the answer it reaches is still the right one: the task's reward grades it right
        assert task.reward(f"<think>{slipped}</think> <answer>{problem.answer}</answer>", problem) == 1.0


def test_slip_at_out_of_range_is_one_line(task):
    problem = next(p for p in task.sample(40, "train", 0) if p.difficulty == 3)
    with pytest.raises(NanoseekError, match=r"slip_at 2 must be in \[0, 1\]"):
        task.worked(problem, slip_at=2)
    with pytest.raises(NanoseekError, match="slip_at True"):
        task.worked(problem, slip_at=True)


def test_a_recall_slip_rereads_the_value_from_the_prompt_and_the_rest_is_unchanged(task):
    problem = next(p for p in task.sample(40, "train", 0) if p.difficulty == 4)
    plain = task.worked(problem)
    bound = dict(b.split("=") for b in problem.prompt.split(". ")[0].split(","))
    names = list(bound)
    for k in range(len(task.steps(problem))):
        slipped = task.worked(problem, slip_at=k, slip="recall")
        name, right = names[k + 1], int(bound[names[k + 1]])
        wrong = int(slipped.split(f"{name}=", 1)[1].split(" ", 1)[0])
        assert abs(wrong - right) == 1
        assert slipped.replace(f"{name}={wrong} wait, ", "", 1) == plain  # only the slip is added
        assert reflects(slipped) and corrects_a_slip(slipped, problem.prompt)
        assert task.reward(f"<think>{slipped}</think> <answer>{problem.answer}</answer>", problem) == 1.0


def test_an_unknown_slip_is_one_line(task):
    problem = next(p for p in task.sample(40, "train", 0) if p.difficulty == 3)
    with pytest.raises(NanoseekError, match="slip 'answer' must be one of step, recall"):
        task.worked(problem, slip_at=0, slip="answer")
