"""chain: a +/- chain over named values, e.g. "a=3,b=1,c=4,d=2,e=5. a+b-c+d-e".

The task of the default R1-Zero run. It is arith with the operands behind names, because a
tiny model learns to look a value up by its name (an induction head: find "c=", copy what
follows) in an 11-minute pretraining run, while finding "the k-th number" of an arith prompt by
its position, or the operator before a name, takes it far longer than a laptop run allows
(measured while the demo was built). It learns the lookup only when the documents packed into a row
cannot see each other (`document_mask`: every document binds "a", "b", ... again) and when
"c=-4" and "c=4" share their first tokens (`split_punctuation`). Written out, each step
recalls a value and adds it, and the last recall ends as the prompt's last binding does:

    a=3,b=1:3+1=4,c=4:4-4=0,d=2:0+2=2,e=5. 2-5=-3

while the answer at a glance needs every value at once: the gap RL turns into pass@1. That
". " is where the chain stops, copied with the value: with ":" after every recall, the tiny
model could not tell where a short chain ends (2 values: 4% right before RL, 6% after; 5-7
values: 54% and 86-100%), and went on with values the prompt does not have. Names have no
spaces, so that "b" is the same token in the bindings, in "a+b" and in the worked steps
(byte-level BPE gives " b" another id); digits are one token each, with or without a space
before. `signed=True` instead adds up signed values ("a=3,b=-1. a+b"): then the expression
holds no information and a worked step needs nothing but the recall, which is what the default
run uses. Difficulty is the number of values: 2 to 7 by default, from "a=3,b=-1. a+b", what a
user types first, to chains whose worked solution (103 tokens with the demo's tokenizer) still
fits the demo's 128-token budget.
"""

from __future__ import annotations

import dataclasses
import random
import string

from nanoseek.errors import NanoseekError
from nanoseek.tasks import GeneratedTask, Problem, Step

NAMES = string.ascii_lowercase
LAST = ". "  # what ends the last binding of a prompt ("a=3,b=-1. a+b") and the last recall of a worked solution


def parse(prompt: str) -> tuple[dict[str, int], list[str], str]:
    """(values by name, names in order, the operator before each name but the first)."""
    try:
        bindings, expression = prompt.rsplit(LAST, 1)
        values = {}
        for item in bindings.split(","):
            name, value = item.split("=")
            values[name.strip()] = int(value)
        names, ops = expression[0::2], expression[1::2]
        if any(n not in values for n in names) or set(ops) - set("+-") or not names:
            raise ValueError
    except ValueError:
        raise NanoseekError(f"chain: cannot read {prompt!r}") from None
    return values, list(names), ops


def binding(name: str, value: int) -> str:
    """How a prompt binds a value, and how a worked step recalls it: "c=-4"."""
    return f"{name}={value}"


def solve(values: dict[str, int], names: list[str], ops: str) -> tuple[int, list[Step]]:
    """The value and its steps; subtracting -2 or adding -2 is written as the step "6+2" or "6-2"."""
    steps, total = [], values[names[0]]
    for op, name in zip(ops, names[1:]):
        term = values[name] if op == "+" else -values[name]
        steps.append(Step(total, "+" if term >= 0 else "-", abs(term), total + term))
        total += term
    return total, steps


class Chain(GeneratedTask):
    name = "chain"

    def __init__(
        self,
        min_values: int = 2,
        max_values: int = 7,
        min_value: int = 1,
        max_value: int = 5,
        signed: bool = False,
        test_share: float = 0.1,
    ):
        if not 2 <= min_values <= max_values <= len(NAMES):
            raise NanoseekError(
                f"chain: need 2 <= min_values <= max_values <= {len(NAMES)}, got {min_values} and {max_values}"
            )
        if not 0 <= min_value <= max_value:
            raise NanoseekError(
                f"chain: need 0 <= min_value <= max_value (the size of the values; each "
                f"gets a random sign), got {min_value} and {max_value}"
            )
        if not 0 <= test_share < 1:
            raise NanoseekError(f"chain: test_share {test_share} must be in [0, 1)")
        self.min_values, self.max_values = min_values, max_values
        self.min_value, self.max_value, self.test_share = min_value, max_value, test_share
        self.signed = signed  # signed values added up, or positive values under + and - operators

    def generate(self, rng: random.Random) -> Problem:
        n = rng.randint(self.min_values, self.max_values)
        names = list(NAMES[:n])
        sign = (lambda: rng.choice((1, -1))) if self.signed else (lambda: 1)
        values = {name: sign() * rng.randint(self.min_value, self.max_value) for name in names}
        ops = "+" * (n - 1) if self.signed else "".join(rng.choice("+-") for _ in range(n - 1))
        expression = names[0] + "".join(op + name for op, name in zip(ops, names[1:]))
        prompt = ",".join(binding(name, values[name]) for name in names) + LAST + expression
        value, _ = solve(values, names, ops)
        problem = Problem(prompt=prompt, answer=str(value), difficulty=n, task=self.name)
        return dataclasses.replace(problem, solution=self.worked(problem))

    def steps(self, problem: Problem) -> list[Step]:
        return solve(*parse(problem.prompt))[1]

    def recall(self, problem: Problem, rng: random.Random) -> str:
        """The bindings, then each of them again in a random order: "a=3,b=-1,c=4. c=4,a=3,b=-1"."""
        values, names, _ = parse(problem.prompt)
        items = [binding(name, values[name]) for name in names]
        stated = ",".join(items)
        rng.shuffle(items)
        return f"{stated}. {','.join(items)}"

    def worked(self, problem: Problem) -> str:
        """Each step recalls a value exactly as the prompt binds it, then computes:
        "a=3,b=-1:3-1=2,c=4. 2+4=6" (signed values) or "a=3,b=1:3+1=4,c=4. 4-4=0" (positive
        values under + and -). The recall "c=4" repeats the prompt's tokens, so finding it is
        one copy of what follows "c=" there; the last recall ends as the prompt's last binding
        does, with ". " instead of ":", so that where the chain stops is part of that copy."""
        values, names, ops = parse(problem.prompt)
        _, steps = solve(values, names, ops)
        out = [binding(names[0], values[names[0]])]
        out += [f"{binding(name, values[name])}:{step}" for step, name in zip(steps[:-1], names[1:-1])]
        last = f"{binding(names[-1], values[names[-1]])}{LAST}{steps[-1]}"
        return ",".join([*out, last])
