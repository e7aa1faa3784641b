"""The corpus's `reflect` share: worked solutions that slip and correct themselves."""

import pytest

from nanoseek import tasks
from nanoseek.data.corpus import corpus
from nanoseek.errors import NanoseekError
from nanoseek.eval import reflects

OPTIONS = dict(min_values=2, max_values=7, min_value=1, max_value=5, signed=True)


def test_reflect_share_of_worked_solutions_and_nothing_else_changes():
    task = tasks.get("chain", **OPTIONS)
    plain = list(corpus(task, 2000, seed=3))
    mixed = list(corpus(task, 2000, seed=3, reflect=0.1))
    assert [k for k, _ in plain] == [k for k, _ in mixed]
    assert not any(reflects(text) for _, text in plain)
    worked = [(a, b) for (kind, a), (_, b) in zip(plain, mixed) if kind in ("worked", "followup")]
    slipped = [b for a, b in worked if a != b]
    assert 0.07 < len(slipped) / len(worked) < 0.13, len(slipped) / len(worked)
    assert all(reflects(b) for b in slipped)
    others = [(a, b) for (kind, a), (_, b) in zip(plain, mixed) if kind not in ("worked", "followup")]
    assert all(not reflects(b) for _, b in others)


def test_recall_slips_are_the_same_documents_with_a_value_reread_instead_of_a_step_redone():
    task = tasks.get("chain", **OPTIONS)
    steps = list(corpus(task, 1000, seed=3, reflect=0.2))
    recalls = list(corpus(task, 1000, seed=3, reflect=0.2, slip="recall"))
    assert [k for k, _ in steps] == [k for k, _ in recalls]
    changed = [(a, b) for (_, a), (_, b) in zip(steps, recalls) if a != b]
    assert changed and len(changed) == sum(" wait, " in a for _, a in steps)  # the same documents slip
    for a, b in changed:
        step_slip = a.split(" wait, ")[0].rsplit("=", 1)[0][-1]  # "...:4+2=5 wait": ends in an operand, a digit
        recall_slip = b.split(" wait, ")[0].rsplit("=", 1)[0][-1]  # "...,c=5 wait": ends in a name
        assert step_slip.isdigit() and recall_slip.isalpha()
        assert a.replace(" wait, ", "").count("=") == b.replace(" wait, ", "").count("=")


@pytest.mark.parametrize(
    "task, reflect, message",
    [
        ("chain", 1.5, "reflect share 1.5 must be in [0, 1]"),
        ("arith", 0.1, "reflect share 0.1 needs the chain task"),
    ],
)
def test_bad_reflect_share_is_one_line(task, reflect, message):
    t = tasks.get(task, **(OPTIONS if task == "chain" else {}))
    with pytest.raises(NanoseekError, match=message.replace("[", r"\[").replace("]", r"\]")):
        list(corpus(t, 10, reflect=reflect))


def test_unknown_slip_is_one_line():
    with pytest.raises(NanoseekError, match="slip 'answer' must be one of step, recall"):
        list(corpus(tasks.get("chain", **OPTIONS), 10, reflect=0.1, slip="answer"))
