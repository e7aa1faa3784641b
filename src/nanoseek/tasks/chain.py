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

Two options make the world of R1 (`nanoseek r1`) out of it, and leave the default stream of
problems exactly as it was (nothing more is drawn from the generator while they are off):

- `languages`: each problem draws its language from the list, and its names are that
  language's first letters (`LANGUAGE_NAMES`: "en" Latin a-z, "el" Greek α-ω), so
  "α=3,β=-1. α+β" is the Greek twin of "a=3,b=-1. a+b". The split key maps names back to the
  Latin ones, so twins always fall in the same split. `worked(problem, switch_at=j)` writes
  the recalls from the j-th value on with the other language's names, as web text switches
  language mid-solution: the corpus then teaches a model to mix languages in its reasoning,
  which R1's language-consistency reward (`rewards.language_reward`) measures.
- `lookup`: that share of problems asks for one value, "a=3,b=-1,c=4. c" (answer 4), a
  question to answer without thinking (difficulty 1, `meta["reasoning"]` False); its worked
  solution is the recall alone, "c=4".

Every problem's `meta` holds its "language" and whether it asks for "reasoning".
"""

from __future__ import annotations

import dataclasses
import random
import string

from nanoseek.errors import NanoseekError
from nanoseek.tasks import GeneratedTask, Problem, Step

NAMES = string.ascii_lowercase
# The names of each language: single characters, so that a name is one token. Greek lowercase
# without the final sigma (24 letters).
LANGUAGE_NAMES = {"en": string.ascii_lowercase, "el": "αβγδεζηθικλμνξοπρστυφχψω"}
# Every language's names mapped to the Latin ones at the same place: the split key.
_TO_LATIN = str.maketrans(
    {c: NAMES[i] for code, letters in LANGUAGE_NAMES.items() if code != "en" for i, c in enumerate(letters)}
)
REFLECTION = "wait"  # the word a solution that slips writes before it corrects the step: "3-1=3 wait, 3-1=2"
SLIPS = ("step", "recall")  # what a slip gets wrong: a step's result, or the recall of the value it uses
LAST = ". "  # what ends the last binding of a prompt ("a=3,b=-1. a+b") and the last recall of a worked solution


def parse(prompt: str) -> tuple[dict[str, int], list[str], str]:
    """(values by name, names in order, the operator before each name but the first). A lookup
    ("a=3,b=-1,c=4. c") reads as one name and no operators."""
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


def slipped(step: Step, off: int) -> str:
    """A step that comes out `off` from its result, then is written right: "4+5=8 wait, 4+5=9"."""
    return f"{step.left}{step.op}{step.right}={step.result + off} {REFLECTION}, {step}"


def binding(name: str, value: int) -> str:
    """How a prompt binds a value, and how a worked step recalls it: "c=-4"."""
    return f"{name}={value}"


def solve(values: dict[str, int], names: list[str], ops: str) -> tuple[int, list[Step]]:
    """The value and its steps; subtracting -2 or adding -2 is written as the step "6+2" or "6-2".
    One name (a lookup) is its value and no steps."""
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
        languages: tuple | list = ("en",),
        lookup: float = 0.0,
    ):
        if isinstance(languages, str) or not isinstance(languages, (tuple, list)) or not languages:
            raise NanoseekError(
                f"chain: languages must be a non-empty list of codes like ['en', 'el'], got {languages!r}"
            )
        unknown = [code for code in languages if code not in LANGUAGE_NAMES]
        if unknown:
            raise NanoseekError(
                f"chain: unknown language {unknown[0]!r} in languages (expected {', '.join(LANGUAGE_NAMES)})"
            )
        if len(set(languages)) != len(languages):
            raise NanoseekError(f"chain: languages {list(languages)} name a language twice")
        if isinstance(lookup, bool) or not isinstance(lookup, (int, float)) or not 0 <= lookup <= 1:
            raise NanoseekError(f"chain: lookup share {lookup!r} must be in [0, 1]")
        most = min(len(LANGUAGE_NAMES[code]) for code in languages)
        if not 2 <= min_values <= max_values <= most:
            raise NanoseekError(
                f"chain: need 2 <= min_values <= max_values <= {most} (names of {', '.join(languages)}), "
                f"got {min_values} and {max_values}"
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
        self.languages, self.lookup = tuple(languages), float(lookup)

    def generate(self, rng: random.Random) -> Problem:
        # one language or no lookups draw nothing: the default stream is the one before they existed
        language = rng.choice(self.languages) if len(self.languages) > 1 else self.languages[0]
        n = rng.randint(self.min_values, self.max_values)
        names = list(LANGUAGE_NAMES[language][:n])
        sign = (lambda: rng.choice((1, -1))) if self.signed else (lambda: 1)
        values = {name: sign() * rng.randint(self.min_value, self.max_value) for name in names}
        bindings = ",".join(binding(name, values[name]) for name in names) + LAST
        if self.lookup > 0 and rng.random() < self.lookup:
            name = rng.choice(names)
            meta = {"language": language, "reasoning": False}
            problem = Problem(bindings + name, str(values[name]), difficulty=1, task=self.name, meta=meta)
            return dataclasses.replace(problem, solution=self.worked(problem))
        ops = "+" * (n - 1) if self.signed else "".join(rng.choice("+-") for _ in range(n - 1))
        expression = names[0] + "".join(op + name for op, name in zip(ops, names[1:]))
        value, _ = solve(values, names, ops)
        meta = {"language": language, "reasoning": True}
        problem = Problem(bindings + expression, str(value), difficulty=n, task=self.name, meta=meta)
        return dataclasses.replace(problem, solution=self.worked(problem))

    def key(self, problem: Problem) -> str:
        """The prompt with its names in Latin letters: a problem and its twins in other languages
        share a split, and count as one problem for distinct samples."""
        return problem.prompt.translate(_TO_LATIN)

    def language(self, problem: Problem) -> str:
        """The problem's language code: its meta's "language", else read from its names (a
        Problem rebuilt from a prompt string)."""
        if problem.meta.get("language"):
            return problem.meta["language"]
        _, names, _ = parse(problem.prompt)
        for code, letters in LANGUAGE_NAMES.items():
            if all(name in letters for name in names):
                return code
        raise NanoseekError(
            f"chain: the names of {problem.prompt!r} are of no one language ({', '.join(LANGUAGE_NAMES)})"
        )

    def steps(self, problem: Problem) -> list[Step]:
        return solve(*parse(problem.prompt))[1]

    def recall(self, problem: Problem, rng: random.Random) -> str:
        """The bindings, then each of them again in a random order: "a=3,b=-1,c=4. c=4,a=3,b=-1"
        (all of them for a lookup too, whose expression names one)."""
        values, _, _ = parse(problem.prompt)
        items = [binding(name, value) for name, value in values.items()]
        stated = ",".join(items)
        rng.shuffle(items)
        return f"{stated}. {','.join(items)}"

    def worked(
        self, problem: Problem, switch_at: int | None = None, slip_at: int | None = None, slip: str = "step"
    ) -> str:
        """Each step recalls a value exactly as the prompt binds it, then computes:
        "a=3,b=-1:3-1=2,c=4. 2+4=6" (signed values) or "a=3,b=1:3+1=4,c=4. 4-4=0" (positive
        values under + and -). The recall "c=4" repeats the prompt's tokens, so finding it is
        one copy of what follows "c=" there; the last recall ends as the prompt's last binding
        does, with ". " instead of ":", so that where the chain stops is part of that copy.

        A lookup ("a=3,b=-1,c=4. c") has no steps: its worked solution is the recall "c=4".

        `switch_at=j` (1 <= j < number of values): the recalls of the values from the j-th on
        (counted from 0) carry the names of the next language of the task's `languages`
        (cyclically), as web text switches language mid-solution: "α=3,β=-1,γ=4. α+β+γ" with
        switch_at=1 is "α=3,b=-1:3-1=2,c=4. 2+4=6". Values and steps are unchanged.

        `slip_at=k` (0 <= k < number of steps): step k first comes out one off, then the solution
        stops, re-checks and writes it right ("wait", R1-Zero's aha moment in miniature):
        "a=3,b=-1:3-1=3 wait, 3-1=2,c=4. 2+4=6" (slip_at=0). The steps after it use the right value.
        `slip="recall"`: the recall of the value step k uses comes out one off instead, and is
        re-read from the prompt: "a=3,b=0 wait, b=-1:3-1=2,c=4. 2+4=6" (slip_at=0)."""
        values, names, ops = parse(problem.prompt)
        _, steps = solve(values, names, ops)
        shown = list(names)
        if switch_at is not None:
            shown = self._switched(problem, names, switch_at)
        if slip_at is not None:
            if isinstance(slip_at, bool) or not isinstance(slip_at, int) or not 0 <= slip_at < len(steps):
                raise NanoseekError(
                    f"chain: slip_at {slip_at!r} must be in [0, {len(steps) - 1}] for {problem.prompt!r}"
                )
            if slip not in SLIPS:
                raise NanoseekError(f"chain: slip {slip!r} must be one of {', '.join(SLIPS)}")
            off = 1 if len(problem.prompt) % 2 else -1  # one off, either way
            texts = [str(step) for step in steps]
            if slip == "step":
                texts[slip_at] = slipped(steps[slip_at], off)
            steps = texts
        if not steps:
            return binding(shown[0], values[names[0]])
        recalls = [binding(s, values[n]) for n, s in zip(names, shown)]
        if slip_at is not None and slip == "recall":
            k = slip_at + 1
            recalls[k] = f"{binding(shown[k], values[names[k]] + off)} {REFLECTION}, {recalls[k]}"
        out = [recalls[0]]
        out += [f"{recall}:{step}" for step, recall in zip(steps[:-1], recalls[1:-1])]
        return ",".join([*out, f"{recalls[-1]}{LAST}{steps[-1]}"])

    def _switched(self, problem: Problem, names: list[str], switch_at: int) -> list[str]:
        """The names as a solution that switches language at value `switch_at` writes them."""
        if len(self.languages) < 2:
            raise NanoseekError(f"chain: switch_at needs two languages, the task has {list(self.languages)}")
        if isinstance(switch_at, bool) or not isinstance(switch_at, int) or not 1 <= switch_at < len(names):
            raise NanoseekError(
                f"chain: switch_at {switch_at!r} must be in [1, {len(names) - 1}] for {problem.prompt!r}"
            )
        language = self.language(problem)
        at = self.languages.index(language) if language in self.languages else -1
        mine, other = LANGUAGE_NAMES[language], LANGUAGE_NAMES[self.languages[(at + 1) % len(self.languages)]]
        return [name if i < switch_at else other[mine.index(name)] for i, name in enumerate(names)]
