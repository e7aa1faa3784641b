"""The corpus's `reflect_plain` share: the slip-and-correct move drilled in plain documents."""

import re

import pytest

from nanoseek import tasks
from nanoseek.data.corpus import corpus
from nanoseek.errors import NanoseekError

OPTIONS = dict(min_values=2, max_values=7, min_value=1, max_value=9, signed=True)
MIX = {"worked": 0.4, "direct": 0.4, "plain": 0.2}


def test_plain_steps_slip_by_one_and_are_corrected_and_nothing_else_changes():
    task = tasks.get("chain", **OPTIONS)
    plain = list(corpus(task, 1000, seed=2, mix=MIX))
    drilled = list(corpus(task, 1000, seed=2, mix=MIX, reflect_plain=0.3))
    assert [k for k, _ in plain] == [k for k, _ in drilled]
    lines = [line for kind, text in drilled if kind == "plain" for line in text.splitlines()]
    slipped = [line for line in lines if " wait, " in line]
    assert 0.25 < len(slipped) / len(lines) < 0.35
    for line in slipped:  # "7-2=6 wait, 7-2=5": the same operands, one off, then right
        m = re.fullmatch(r"(-?\d+)([-+])(\d+)=(-?\d+) wait, \1\2\3=(-?\d+)", line)
        left, op, right, wrong, right_value = int(m[1]), m[2], int(m[3]), int(m[4]), int(m[5])
        assert right_value == (left + right if op == "+" else left - right) and abs(wrong - right_value) == 1
    unslipped = [line.split(" wait, ")[-1] for line in lines]
    assert unslipped == [line for kind, text in plain if kind == "plain" for line in text.splitlines()]
    assert not any(" wait" in text for kind, text in drilled if kind != "plain")  # worked solutions do not slip


def test_bad_reflect_plain_share_is_one_line():
    with pytest.raises(NanoseekError, match=r"reflect_plain share 2 must be in \[0, 1\]"):
        list(corpus(tasks.get("chain", **OPTIONS), 10, reflect_plain=2))
