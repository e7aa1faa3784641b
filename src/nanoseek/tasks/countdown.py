"""countdown (as in TinyZero): reach a target with the given numbers, each used once, with + - * / and ( ).

Problems are made backwards: combine random numbers with random operations (divisions
exact, differences positive) and take the result as the target, so each has a solution.
"""

from __future__ import annotations

import random
import re

from nanoseek.errors import NanoseekError
from nanoseek.rewards import countdown_reward
from nanoseek.tasks import GeneratedTask, Problem, Step

_STEP = re.compile(r"(-?\d+)([-+*/])(-?\d+)=(-?\d+)")


class Countdown(GeneratedTask):
    name = "countdown"

    def __init__(
        self,
        min_numbers: int = 3,
        max_numbers: int = 4,
        max_number: int = 99,
        max_target: int = 100,
        test_share: float = 0.1,
    ):
        if not 2 <= min_numbers <= max_numbers <= 6:
            raise NanoseekError(
                f"countdown: need 2 <= min_numbers <= max_numbers <= 6, got {min_numbers} and {max_numbers}"
            )
        if max_number < 1 or max_target < 1:
            raise NanoseekError("countdown: max_number and max_target must be at least 1")
        if not 0 <= test_share < 1:
            raise NanoseekError(f"countdown: test_share {test_share} must be in [0, 1)")
        self.min_numbers, self.max_numbers = min_numbers, max_numbers
        self.max_number, self.max_target, self.test_share = max_number, max_target, test_share

    def _combine(self, rng: random.Random, numbers: list[int]) -> tuple[int, str, list[Step]] | None:
        """Combine all numbers at random into one positive integer; None if a step fails."""
        pool = [(n, str(n), False) for n in numbers]  # (value, expression, is compound)
        steps: list[Step] = []
        while len(pool) > 1:
            (a, ea, ca), (b, eb, cb) = [pool.pop(rng.randrange(len(pool))) for _ in range(2)]
            op = rng.choice("+-*/")
            if op == "-" and a <= b or op == "/" and (b == 0 or a % b):
                return None
            value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
            steps.append(Step(a, op, b, value))
            pool.append((value, f"{f'({ea})' if ca else ea}{op}{f'({eb})' if cb else eb}", True))
        value, expression, _ = pool[0]
        return value, expression, steps

    def generate(self, rng: random.Random) -> Problem:
        for _ in range(10_000):
            k = rng.randint(self.min_numbers, self.max_numbers)
            numbers = [rng.randint(1, self.max_number) for _ in range(k)]
            made = self._combine(rng, numbers)
            if made and 1 <= made[0] <= self.max_target:
                target, expression, steps = made
                shown = ", ".join(map(str, numbers))
                prompt = (
                    f"Using the numbers {shown}, each exactly once, with + - * / and parentheses, "
                    f"make {target}. Answer with the expression."
                )
                return Problem(
                    prompt=prompt,
                    answer=expression,
                    difficulty=k,
                    task=self.name,
                    numbers=tuple(numbers),
                    target=target,
                    solution=", ".join(map(str, steps)),
                )
        raise NanoseekError("countdown: could not make a problem with these options; raise max_target or max_number")

    def key(self, problem: Problem) -> str:
        return f"{sorted(problem.numbers)}->{problem.target}"

    def reward(self, completion: str, problem: Problem) -> float:
        return countdown_reward(completion, problem.numbers, problem.target)

    def steps(self, problem: Problem) -> list[Step]:
        return [Step(int(a), op, int(b), int(c)) for a, op, b, c in _STEP.findall(problem.solution or "")]
