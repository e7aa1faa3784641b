"""countdown (as in TinyZero): reach a target with the given numbers, each used once, with + - * / and ( ).

Problems are made backwards: combine random numbers with random operations (divisions
exact, differences positive) and take the result as the target, so each has a solution.

`search(problem, rng)` writes a worked search, the reasoning of the countdown corpus (the
corpus's "search" kind): tries that fail, each abandoned for the next, and the one that
reaches the target. A try puts the numbers in an order, folds them from the left, writing
each step with what is left ("5+3=8,2,4:", so that the next step's operands are the first two
numbers in front of it), and at the last number writes the target again (">16") and tries
+ - * / in turn, each written as its operator and value ("+17" is 15+2=17):

    3,5,2:3*5=15,2>16:+17-13*30 no.
    5,3,2:5+3=8,2>16:+10-6*16 yes

then answers with the try's expression, "(5+3)*2". A search draws its tries at random
without repeats, as a searcher that knows nothing better would, so a base model pretrained
on it searches blindly, within a few tries: which tries pay is what RL can teach it. Left folds reach the target
of nearly every problem (98% of 3- and 4-number problems of numbers up to 9, measured while
the countdown demo was built); a problem they cannot solve gets no search (`search` returns
None).
"""

from __future__ import annotations

import itertools
import random
import re

from nanoseek.errors import NanoseekError
from nanoseek.rewards import countdown_reward
from nanoseek.tasks import GeneratedTask, Problem, Step

# "words" is TinyZero's kind of question; "terse" is "[3,5,2]>16", a search's own first line (the countdown
# demo's: a fifth of the tokens, what a try starts by copying, and no number after a space, so that with
# whole numbers as tokens "16" is the same token in the prompt, before a try's candidates and in them)
PROMPTS = {
    "words": "Using the numbers {numbers}, each exactly once, with + - * / and parentheses, make {target}. "
    "Answer with the expression.",
    "terse": "[{numbers}]>{target}",
}
TARGET = ">"  # what comes before the target in a try: "15,2>16:"
SEARCH_OPS = "+-*/"
REDRAWS = 20  # orders of tries drawn for a search before its last try is made one that succeeds
_STEP = re.compile(r"(-?\d+)([-+*/])(-?\d+)=(-?\d+)")


class Countdown(GeneratedTask):
    name = "countdown"

    def __init__(
        self,
        min_numbers: int = 3,
        max_numbers: int = 4,
        max_number: int = 99,
        max_target: int = 100,
        max_step: int = 99,
        prompt: str = "words",
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
        if prompt not in PROMPTS:
            raise NanoseekError(f"countdown: prompt {prompt!r}: expected {' or '.join(PROMPTS)}")
        if max_step < 1:
            raise NanoseekError(f"countdown: max_step {max_step} must be at least 1")
        self.max_number, self.max_target, self.test_share = max_number, max_target, test_share
        self.max_step = max_step  # a search's running value stays in 0..max_step (its steps stay learnable)
        self.prompt = prompt

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
                prompt = PROMPTS[self.prompt].format(numbers=", ".join(map(str, numbers)), target=target)
                if self.prompt == "terse":
                    prompt = prompt.replace(", ", ",")
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

    # ---- worked searches ----------------------------------------------------------------------
    def tries(self, problem: Problem) -> list[tuple[tuple[int, ...], str, bool]]:
        """Every try of a left-fold search: (the numbers in order, the operators of the steps
        before the last number, whether some operator at the last number reaches the target).
        Steps keep the running value in 0..max_step, divisions exact."""
        out = []
        for order in sorted(set(itertools.permutations(problem.numbers))):
            for ops in itertools.product(SEARCH_OPS, repeat=len(order) - 2):
                value = _fold(order[:-1], ops, self.max_step)
                if value is not None:
                    hits = any(v == problem.target for _, v in _last(value, order[-1]))
                    out.append((order, "".join(ops), hits))
        return out

    def tries_solve(self, problem: Problem) -> bool:
        """Whether some left-fold try reaches the target (`search` has something to find)."""
        return any(hits for _, _, hits in self.tries(problem))

    def search(self, problem: Problem, rng: random.Random, max_tries: int = 4) -> tuple[str, str] | None:
        """(reasoning, answer) of a worked search, or None when no left fold reaches the target.
        Tries are drawn at random without repeats until one reaches the target; an order of
        tries that finds none in `max_tries` is drawn again (up to REDRAWS times, then the last
        try is one that does), so every search succeeds within `max_tries`, as often early as a
        blind searcher that got there in time."""
        tries = self.tries(problem)
        good = [t for t in tries if t[2]]
        if not good:
            return None
        for _ in range(REDRAWS):
            rng.shuffle(tries)
            first = next(i for i, t in enumerate(tries) if t[2])
            if first < max_tries:
                break
        failed = [t for t in tries[: min(first, max_tries - 1)]]
        win = tries[first] if first < max_tries else rng.choice(good)
        text = [_written(order, ops, problem.target) + " no." for order, ops, _ in failed]
        text.append(_written(*win[:2], problem.target) + " yes")
        return "\n".join(text), _expression(*win[:2], problem.target)  # a try a line: no space before a number

    def worked(self, problem: Problem) -> str:
        """A worked search, drawn from a seed of the problem's own (the corpus draws a new one per
        document); a problem no left fold within max_step solves gets its own solution's steps."""
        found = self.search(problem, random.Random(self.key(problem)))
        return super().worked(problem) if found is None else found[0]


def _apply(a: int, op: str, b: int) -> int | None:
    """a op b as a search step writes it: None for an inexact division or a negative difference."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a >= b else None
    if op == "*":
        return a * b
    return a // b if b and a % b == 0 else None


def _fold(numbers, ops, max_step: int) -> int | None:
    value = numbers[0]
    for op, n in zip(ops, numbers[1:]):
        value = _apply(value, op, n)
        if value is None or value > max_step:
            return None
    return value


def _last(value: int, n: int) -> list[tuple[str, int]]:
    """The last number's candidates, in the order + - * /."""
    return [(op, v) for op in SEARCH_OPS if (v := _apply(value, op, n)) is not None]


def _written(order, ops: str, target: int) -> str:
    """One try: "5,3,2,4:5+3=8,2,4:8*2=16,4>12:+20-12", stopping at the target. At the last
    number the target is written again, next to the candidates that are compared with it, and
    each candidate is its operator and its value: "+20" is 16+4=20."""
    text = ",".join(map(str, order)) + ":"
    value, rest = order[0], list(order[1:])
    for op in ops:
        n = rest.pop(0)
        new = _apply(value, op, n)
        text += f"{value}{op}{n}={','.join(map(str, [new, *rest]))}"
        text += ":" if len(rest) > 1 else ""
        value = new
    if not ops:
        text = text[:-1]  # two numbers: the list is the last step's
    text += f"{TARGET}{target}:"
    for op, v in _last(value, rest[0]):
        text += f"{op}{v}"
        if v == target:
            break
    return text


def _expression(order, ops: str, target: int) -> str:
    """The left fold that reaches the target: "((5+3)*2)-4"."""
    value, expr = order[0], str(order[0])
    for op, n in zip(ops, order[1:]):
        value, expr = _apply(value, op, n), f"({expr}{op}{n})"
    last = next(op for op, v in _last(value, order[-1]) if v == target)
    return f"{expr}{last}{order[-1]}"
