"""Verifiable tasks: problems with a ground truth, drawn from a seed, and an accuracy reward.

    task = nanoseek.tasks.get("arith", max_ops=4)
    problems = task.sample(16, split="train", seed=step)
    task.reward(completion, problems[0])  # in [0, 1]

Train and test never share a problem: a problem's split is fixed by a hash of its key.
"""

from __future__ import annotations

import hashlib
import inspect
import random
from dataclasses import dataclass, field
from typing import NamedTuple

from nanoseek.errors import NanoseekError
from nanoseek.rewards import accuracy_reward

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Problem:
    prompt: str  # the question alone; wrap it with data.chat.r1_zero_prompt or a chat message
    answer: str  # the ground truth
    difficulty: float = 0.0
    task: str = ""
    numbers: tuple[int, ...] | None = None  # countdown: the numbers to use
    target: int | None = None  # countdown: the value to reach
    solution: str | None = None  # a worked solution when the task knows one
    meta: dict = field(default_factory=dict, compare=False)


class Step(NamedTuple):
    """One operation of a worked solution: left op right = result."""

    left: int
    op: str
    right: int
    result: int

    def __str__(self) -> str:
        return f"{self.left}{self.op}{self.right}={self.result}"


def split_of(key: str, test_share: float) -> str:
    """ "test" for a fixed share of keys, by hash, so a problem is in one split only."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "test" if h / 2**64 < test_share else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise NanoseekError(f"split {split!r}: expected 'train' or 'test'")


class Task:
    name = ""

    def sample(self, n: int, split: str = "train", seed: int = 0, distinct: bool = True) -> list[Problem]:
        """n problems of one split, in an order fixed by the seed. distinct=True: no problem twice
        while the split has new ones (a held-out evaluation). distinct=False: drawn as they come,
        repeats and all, so that each difficulty keeps its share (a corpus, RL prompts): a task
        with few short problems would otherwise run out of them and leave them out."""
        raise NotImplementedError

    def reward(self, completion: str, problem: Problem) -> float:
        """Accuracy reward in [0, 1]; never raises."""
        return accuracy_reward(completion, problem)

    def steps(self, problem: Problem) -> list[Step]:
        """The worked solution as steps, for tasks that can write one (used by the corpus)."""
        raise NanoseekError(f"task {self.name!r} has no step-by-step solutions")

    def recall(self, problem: Problem, rng: random.Random) -> str:
        """A drill document that states the problem's named values and recalls them in a random
        order (the "recall" corpus kind), for tasks whose steps look values up by name."""
        raise NanoseekError(f"task {self.name!r} has no named values to recall (the 'recall' corpus kind is for chain)")

    def worked(self, problem: Problem) -> str:
        """The worked solution as the corpus writes it inside <think>: "3+4=7, 7-2=5"."""
        return ", ".join(map(str, self.steps(problem)))


class GeneratedTask(Task):
    """A task whose problems come from a random generator; the split filters them by hash."""

    test_share = 0.1

    def generate(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def key(self, problem: Problem) -> str:
        return problem.prompt

    def sample(self, n: int, split: str = "train", seed: int = 0, distinct: bool = True) -> list[Problem]:
        """n problems of one split (Task.sample), distinct where the problem space allows it
        unless distinct=False. chain's 2-value problems are 100 of billions: 92 of 40,000
        distinct train problems, where the generator draws 6,700."""
        check_split(split)
        rng = random.Random(f"{self.name}:{split}:{seed}")
        out: list[Problem] = []
        seen: set[str] = set()
        for _ in range(200 * n + 1000):
            if len(out) == n:
                break
            p = self.generate(rng)
            key = self.key(p)
            if (not distinct or key not in seen) and split_of(key, self.test_share) == split:
                seen.add(key)
                out.append(p)
        if n > 0 and not out:
            raise NanoseekError(
                f"task {self.name!r}: no {split} problems with these options; allow more problems or change test_share"
            )
        unique = len(out)
        while len(out) < n:  # a small problem space: repeat
            out.append(out[len(out) % unique])
        return out


def _registry() -> dict[str, type[Task]]:
    from nanoseek.tasks.arith import Arith
    from nanoseek.tasks.chain import Chain
    from nanoseek.tasks.countdown import Countdown
    from nanoseek.tasks.files import GSM8K, MATH

    return {"arith": Arith, "chain": Chain, "countdown": Countdown, "gsm8k": GSM8K, "math": MATH}


def names() -> list[str]:
    return list(_registry())


def get(name: str, **options) -> Task:
    """The task called `name`, with its options (see each task's constructor)."""
    tasks = _registry()
    if name not in tasks:
        raise NanoseekError(f"task {name!r}: expected one of {', '.join(tasks)}")
    cls = tasks[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise NanoseekError(f"task {name!r}: unknown option {', '.join(unknown)} (options: {', '.join(allowed)})")
    return cls(**options)


__all__ = ["Problem", "Step", "Task", "GeneratedTask", "get", "names", "split_of"]
