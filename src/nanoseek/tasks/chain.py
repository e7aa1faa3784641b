"""chain: the sum of named signed values, e.g. "a=3, b=-1, c=4, d=-2, e=5. a+b+c+d+e".

The task of the default R1-Zero run. It is arith with the operands behind names, because a
tiny model learns to look a value up by its name (an induction head: find "c=", copy what
follows) within minutes of pretraining, while finding "the k-th number" of an arith prompt by
its position, or the operator before a name, takes it far longer than a laptop run allows
(measured in issue 6's note). Written out, each step is easy:

    a+b=3-1=2, 2+c=2+4=6, 6+d=6-2=4, 4+e=4+5=9

while the answer at a glance needs every value at once: the gap RL turns into pass@1.
Difficulty is the number of values.
"""

from __future__ import annotations

import random
import string

from nanoseek.errors import NanoseekError
from nanoseek.tasks import GeneratedTask, Problem, Step

NAMES = string.ascii_lowercase


def parse(prompt: str) -> tuple[dict[str, int], list[str]]:
    """(values by name, names in the order they are added) of a chain prompt."""
    try:
        bindings, expression = prompt.rsplit(". ", 1)
        values = {}
        for item in bindings.split(", "):
            name, value = item.split("=")
            values[name.strip()] = int(value)
        names = expression.split("+")
        if any(n not in values for n in names):
            raise ValueError
    except ValueError:
        raise NanoseekError(f"chain: cannot read {prompt!r}") from None
    return values, names


def solve(values: dict[str, int], names: list[str]) -> tuple[int, list[Step]]:
    """The sum and its steps; a negative value is subtracted: 6 + (-2) is the step 6-2=4."""
    steps, total = [], values[names[0]]
    for name in names[1:]:
        v = values[name]
        steps.append(Step(total, "+" if v >= 0 else "-", abs(v), total + v))
        total += v
    return total, steps


class Chain(GeneratedTask):
    name = "chain"

    def __init__(self, min_values: int = 5, max_values: int = 7, min_value: int = 1, max_value: int = 5,
                 test_share: float = 0.1):
        if not 2 <= min_values <= max_values <= len(NAMES):
            raise NanoseekError(f"chain: need 2 <= min_values <= max_values <= {len(NAMES)}, "
                                f"got {min_values} and {max_values}")
        if not 0 <= min_value <= max_value:
            raise NanoseekError(f"chain: need 0 <= min_value <= max_value (the size of the values; each "
                                f"gets a random sign), got {min_value} and {max_value}")
        if not 0 <= test_share < 1:
            raise NanoseekError(f"chain: test_share {test_share} must be in [0, 1)")
        self.min_values, self.max_values = min_values, max_values
        self.min_value, self.max_value, self.test_share = min_value, max_value, test_share

    def generate(self, rng: random.Random) -> Problem:
        n = rng.randint(self.min_values, self.max_values)
        names = list(NAMES[:n])
        values = {name: rng.choice((1, -1)) * rng.randint(self.min_value, self.max_value) for name in names}
        prompt = ", ".join(f"{name}={values[name]}" for name in names) + ". " + "+".join(names)
        value, _ = solve(values, names)
        problem = Problem(prompt=prompt, answer=str(value), difficulty=n, task=self.name)
        return Problem(prompt=prompt, answer=str(value), difficulty=n, task=self.name,
                       solution=self.worked(problem))

    def steps(self, problem: Problem) -> list[Step]:
        return solve(*parse(problem.prompt))[1]

    def worked(self, problem: Problem) -> str:
        """Each step names its value, then computes: "a+b=3-1=2, 2+c=2+4=6"."""
        values, names = parse(problem.prompt)
        _, steps = solve(values, names)
        out = []
        for i, (step, name) in enumerate(zip(steps, names[1:])):
            left = names[0] if i == 0 else str(step.left)
            out.append(f"{left}+{name}={step}")
        return ", ".join(out)
