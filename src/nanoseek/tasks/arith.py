"""arith: chains of small integer operations, e.g. "3+4-2+5-1".

Built for the tiny R1-Zero run: one step is easy for a small model,
the whole chain at a glance is not, so writing the steps out pays and RL can find that.
Difficulty is the number of operations; the operand range and the operators are options.
"""

from __future__ import annotations

import random

from nanoseek.errors import NanoseekError
from nanoseek.tasks import GeneratedTask, Problem, Step

OPERATORS = "+-*"


def solve(numbers: list[int], ops: str) -> tuple[int, list[Step]]:
    """Value and worked steps: products first, then + and - from left to right."""
    steps: list[Step] = []
    terms, signs = [numbers[0]], []
    for op, b in zip(ops, numbers[1:]):
        if op == "*":
            steps.append(Step(terms[-1], "*", b, terms[-1] * b))
            terms[-1] *= b
        else:
            signs.append(op)
            terms.append(b)
    value = terms[0]
    for op, b in zip(signs, terms[1:]):
        result = value + b if op == "+" else value - b
        steps.append(Step(value, op, b, result))
        value = result
    return value, steps


def parse(expression: str) -> tuple[list[int], str]:
    """Operands and operators of an arith prompt such as "3+4*2"."""
    numbers, ops, digits = [], "", ""
    for c in expression.replace(" ", ""):
        if c.isdigit():
            digits += c
        elif c in OPERATORS and digits:
            numbers.append(int(digits))
            ops += c
            digits = ""
        else:
            raise NanoseekError(f"arith: cannot read {expression!r}")
    if not digits:
        raise NanoseekError(f"arith: cannot read {expression!r}")
    return numbers + [int(digits)], ops


class Arith(GeneratedTask):
    name = "arith"

    def __init__(
        self,
        min_ops: int = 2,
        max_ops: int = 6,
        min_operand: int = 1,
        max_operand: int = 5,
        ops: str = "+-",
        test_share: float = 0.1,
    ):
        if not 1 <= min_ops <= max_ops:
            raise NanoseekError(f"arith: need 1 <= min_ops <= max_ops, got {min_ops} and {max_ops}")
        if not 0 <= min_operand <= max_operand:
            raise NanoseekError(f"arith: need 0 <= min_operand <= max_operand, got {min_operand} and {max_operand}")
        if not ops or set(ops) - set(OPERATORS):
            raise NanoseekError(f"arith: ops {ops!r} must be made of {OPERATORS!r}")
        if not 0 <= test_share < 1:
            raise NanoseekError(f"arith: test_share {test_share} must be in [0, 1)")
        self.min_ops, self.max_ops = min_ops, max_ops
        self.min_operand, self.max_operand = min_operand, max_operand
        self.ops, self.test_share = "".join(dict.fromkeys(ops)), test_share

    def generate(self, rng: random.Random) -> Problem:
        n_ops = rng.randint(self.min_ops, self.max_ops)
        numbers = [rng.randint(self.min_operand, self.max_operand) for _ in range(n_ops + 1)]
        ops = "".join(rng.choice(self.ops) for _ in range(n_ops))
        prompt = str(numbers[0]) + "".join(op + str(b) for op, b in zip(ops, numbers[1:]))
        value, steps = solve(numbers, ops)
        return Problem(
            prompt=prompt, answer=str(value), difficulty=n_ops, task=self.name, solution=", ".join(map(str, steps))
        )

    def steps(self, problem: Problem) -> list[Step]:
        return solve(*parse(problem.prompt))[1]
