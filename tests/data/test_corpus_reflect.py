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
