"""The synthetic pretraining corpus of the default pipeline.

Every problem document is the R1-Zero prompt followed by a completion in the shape RL will
reward, " <think>reasoning</think> <answer>N</answer>", so the base model already writes
that shape. What varies is the reasoning (RL can only amplify a gap
that the base model already has between thinking and guessing):

- worked: every step, "3+4=7, 7-2=5". Single steps are easy, so these are mostly right.
- direct: empty reasoning, the answer at once. Hard for a small model: room for RL.
- terse: two operations a step, "3+4-2=5, ...": shorter reasoning, less reliable.
- plain: no template, lines of single steps ("12-3=9"), so the steps themselves are drilled.
- followup: a worked problem asked second in a conversation, after an earlier problem and its
  answer as a chat sends the history back (the reasoning dropped: "<think></think> <answer>6</answer>"),
  so that a second question is worked with its own values, not the first one's.
- recall: no template, a chain problem's bindings and then each of them again in a random
  order ("a=3,b=-1. b=-1,a=3"): the lookup that chain's worked steps make, drilled.
- search: a worked search (countdown's `search`): tries that fail and are abandoned, then the
  one that reaches the target, answered with its expression. A problem no search solves is
  replaced by the next one.

Default mix: 50% worked, 30% direct, 10% terse, 10% plain; a mix's shares are each in [0, 1]
and add up to 1 (anything else is a NanoseekError naming the kind). Problems come from the task's
train split only, so the test split stays unseen, drawn with repeats so that every difficulty
keeps its share (`Task.sample(distinct=False)`: chain has only 92 train problems of 2 values).
`preamble` < 1 drops the R1-Zero preamble (the sentence before "User:") from that share of the
problem documents, so that more of the token budget goes to problems; a few thousand copies
teach the model the preamble all the same.

`switch` > 0 (a task of two languages: chain's `languages`) makes that share of the worked
solutions (of "worked" documents, and of the second problem of "followup" ones) switch language
mid-solution, at a uniform value j in [1, n-1] of a problem of n >= 2 values
(`Chain.worked(problem, switch_at=j)`): "α=3,b=-1:3-1=2,c=4. 2+4=6", as web text mixes
languages. A model pretrained on it mixes languages in its own reasoning, the readability
problem of R1-Zero that R1's language-consistency reward measures. With `switch` 0 nothing
more is drawn, so a corpus is exactly the one it was before the option existed.

`reflect` > 0 makes that share of the worked solutions (of problems of 2+ values) slip at a
uniform step and correct it in words (`Chain.worked(problem, slip_at=k)`: "3+5=7 wait,
3+5=8"; with `slip="recall"` the recall of the value the step uses slips instead and is
re-read from the prompt, "c=5 wait, c=4:3+4=7"), so that a base model knows the move of
R1-Zero's "aha moment" but rarely makes it; RL rewards only the answer, never the move. With
`reflect` 0 nothing more is drawn.
`reflect_plain` > 0 drills the move on its own: that share of the plain documents' steps slip
and are corrected ("4+5=8 wait, 4+5=9"), outside any worked solution, so that a model can
learn how to correct a step (copy its operands, compute again) and when (only after a wrong
result) while its worked solutions rarely show it. With `reflect_plain` 0 nothing more is drawn.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from nanoseek.data.chat import R1_ZERO_ASSISTANT, R1_ZERO_USER, r1_zero_prompt
from nanoseek.errors import NanoseekError
from nanoseek.tasks import Problem, Step, Task

DEFAULT_MIX = {"worked": 0.5, "direct": 0.3, "terse": 0.1, "plain": 0.1}
KINDS = ("worked", "direct", "terse", "plain", "recall", "followup", "search")
SEARCH_SPARE = 0.1  # extra problems drawn for searches, to replace those no search solves
PLAIN_PROBLEMS = 4  # problems whose steps make one plain document


def completion(reasoning: str, answer: str) -> str:
    """What the model should write after the R1-Zero prompt."""
    return f" <think>{reasoning}</think> <answer>{answer}</answer>"


def terse(steps: list[Step]) -> list[str]:
    """Steps two at a time where the second continues the first ("3+4-2=5")."""
    out, i = [], 0
    while i < len(steps):
        a = steps[i]
        b = steps[i + 1] if i + 1 < len(steps) else None
        if b is None or b.left != a.result:
            out.append(str(a))
            i += 1
            continue
        first = f"{a.left}{a.op}{a.right}"
        if b.op in "*/" and a.op in "+-":  # keep the order of operations right
            first = f"({first})"
        out.append(f"{first}{b.op}{b.right}={b.result}")
        i += 2
    return out


def document(
    kind: str,
    problem: Problem,
    task: Task,
    extra: Sequence[Problem] = (),
    preamble: bool = True,
    rng: random.Random | None = None,
    switch_at: int | None = None,
    slip_at: int | None = None,
    slips: float = 0.0,
    slip: str = "step",
) -> str:
    """One document of a kind; `switch_at`: the worked solution switches language at that value,
    `slip_at`: it slips at that step and corrects it (`Chain.worked`; `slip`: its result or the
    recall of the value it uses), for "worked" and "followup" documents; `slips`: that share of
    a "plain" document's steps slip and are corrected ("4+5=8 wait, 4+5=9"), drawn from `rng`."""
    if kind == "plain":
        steps = [s for p in [problem, *extra] for s in task.steps(p)]
        if slips > 0:
            rng = rng or random.Random(problem.prompt)
            return "\n".join(_slipped(s) if rng.random() < slips else str(s) for s in steps)
        return "\n".join(str(s) for s in steps)
    if kind == "recall":
        return task.recall(problem, rng or random.Random(problem.prompt))
    if kind == "followup":  # extra[0] asked and answered first, as the history of a chat
        first = r1_zero_prompt(extra[0].prompt, preamble) + completion("", extra[0].answer)
        second = f"\n{R1_ZERO_USER}{problem.prompt}\n{R1_ZERO_ASSISTANT}"
        return first + second + completion(_worked(task, problem, switch_at, slip_at, slip), problem.answer)
    prompt = r1_zero_prompt(problem.prompt, preamble)
    if kind == "worked":
        return prompt + completion(_worked(task, problem, switch_at, slip_at, slip), problem.answer)
    if kind == "terse":
        return prompt + completion(", ".join(terse(task.steps(problem))), problem.answer)
    if kind == "direct":
        return prompt + completion("", problem.answer)
    if kind == "search":
        found = task.search(problem, rng or random.Random(problem.prompt))
        if found is None:
            raise NanoseekError(f"corpus: no worked search solves {problem.prompt!r}")
        return prompt + completion(*found)
    raise NanoseekError(f"corpus: unknown document kind {kind!r} (expected {', '.join(KINDS)})")


def _worked(task: Task, problem: Problem, switch_at: int | None, slip_at: int | None = None, slip: str = "step") -> str:
    options = {k: v for k, v in (("switch_at", switch_at), ("slip_at", slip_at)) if v is not None}
    if slip_at is not None:
        options["slip"] = slip
    return task.worked(problem, **options)


def _slipped(step: Step) -> str:
    """A step that comes out one off and is corrected: "4+5=8 wait, 4+5=9" (the move of
    Chain.worked's slip_at, drilled on its own)."""
    from nanoseek.tasks.chain import slipped

    return slipped(step, 1 if step.left % 2 else -1)


def _slip_at(task: Task, problem: Problem, reflect: float, rng: random.Random) -> int | None:
    """Where a worked solution slips and corrects itself: in that share of problems with steps,
    a uniform step k in [0, steps-1]; None for the others."""
    steps = len(task.steps(problem))
    if steps < 1 or rng.random() >= reflect:
        return None
    return rng.randint(0, steps - 1)


def _switch_at(task: Task, problem: Problem, switch: float, rng: random.Random) -> int | None:
    """Where a worked solution switches language: in that share of problems of 2+ values, a
    uniform value j in [1, n-1]; None for the others."""
    n = len(task.steps(problem)) + 1
    if n < 2 or rng.random() >= switch:
        return None
    return rng.randint(1, n - 1)


def check_mix(mix: dict[str, float]) -> None:
    """Each share is a finite number in [0, 1] and the shares add up to 1 (within 1e-6): a mix
    of 1.3 is a typo, not a request to renormalise."""
    for kind, share in mix.items():
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise NanoseekError(f"corpus mix: share of {kind!r} must be in [0, 1], got {share!r}")
    total = sum(mix.values())
    if abs(total - 1) > 1e-6:
        raise NanoseekError(f"corpus mix: shares add up to {total:g}, not 1")


def _counts(n: int, mix: dict[str, float]) -> dict[str, int]:
    """Exact document counts for the shares (largest remainder)."""
    check_mix(mix)
    total = sum(mix.values())
    raw = {k: n * v / total for k, v in mix.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def corpus(
    task: Task,
    n_docs: int,
    seed: int = 0,
    mix: dict[str, float] | None = None,
    preamble: float = 1.0,
    switch: float = 0.0,
    reflect: float = 0.0,
    reflect_plain: float = 0.0,
    slip: str = "step",
) -> Iterator[tuple[str, str]]:
    """(kind, text) for n_docs documents in a seeded order. `preamble` is the share of chat
    documents that carry the R1-Zero preamble; the others start at "User:" (the preamble is a
    fifth of a document's tokens, learnt after a few hundred copies). `mix` maps kinds to
    shares in [0, 1] that add up to 1. `switch`: the share of worked solutions (of problems of
    2+ values) that switch language mid-solution, for a task of two or more languages. `reflect`:
    the share that slip at one step and correct it ("wait"), for chain; `slip`: what they get
    wrong, the step's result ("step") or the recall of the value it uses ("recall")."""
    if not 0 <= preamble <= 1:
        raise NanoseekError(f"corpus: preamble share {preamble} must be in [0, 1]")
    if isinstance(switch, bool) or not isinstance(switch, (int, float)) or not 0 <= switch <= 1:
        raise NanoseekError(f"corpus: switch share {switch!r} must be in [0, 1]")
    if switch > 0 and len(getattr(task, "languages", ())) < 2:
        raise NanoseekError(
            f"corpus: switch share {switch} needs a task of two languages (chain's languages option), "
            f"task {task.name!r} has {list(getattr(task, 'languages', ()))}"
        )
    if isinstance(reflect, bool) or not isinstance(reflect, (int, float)) or not 0 <= reflect <= 1:
        raise NanoseekError(f"corpus: reflect share {reflect!r} must be in [0, 1]")
    if isinstance(reflect_plain, bool) or not isinstance(reflect_plain, (int, float)) or not 0 <= reflect_plain <= 1:
        raise NanoseekError(f"corpus: reflect_plain share {reflect_plain!r} must be in [0, 1]")
    from nanoseek.tasks.chain import SLIPS

    if slip not in SLIPS:
        raise NanoseekError(f"corpus: slip {slip!r} must be one of {', '.join(SLIPS)}")
    if reflect > 0 and task.name != "chain":
        raise NanoseekError(
            f"corpus: reflect share {reflect} needs the chain task (its solutions can slip), not {task.name!r}"
        )
    mix = dict(mix or DEFAULT_MIX)
    unknown = sorted(set(mix) - set(KINDS))
    if unknown:
        raise NanoseekError(f"corpus: unknown document kind {unknown[0]!r} (expected {', '.join(KINDS)})")
    counts = _counts(n_docs, mix)
    kinds = [k for k, c in counts.items() for _ in range(c)]
    rng = random.Random(f"corpus:{seed}")
    rng.shuffle(kinds)
    if counts.get("search") and not hasattr(task, "search"):
        raise NanoseekError(f"corpus: the search kind needs a task that searches (countdown), not {task.name!r}")
    n_problems = n_docs + counts.get("plain", 0) * (PLAIN_PROBLEMS - 1) + counts.get("followup", 0)
    n_problems += math.ceil(counts.get("search", 0) * SEARCH_SPARE)
    problems = iter(task.sample(n_problems, "train", seed, distinct=False)) if n_problems else iter(())
    for kind in kinds:
        problem = next(problems)
        while kind == "search" and not task.tries_solve(problem):
            problem = next(problems)
        extra = [next(problems) for _ in range({"plain": PLAIN_PROBLEMS - 1, "followup": 1}.get(kind, 0))]
        with_preamble = rng.random() < preamble
        switch_at = None  # drawn only when asked for: a default corpus is the one it always was
        if switch > 0 and kind in ("worked", "followup"):
            switch_at = _switch_at(task, problem, switch, rng)
        slip_at = None
        if reflect > 0 and kind in ("worked", "followup"):
            slip_at = _slip_at(task, problem, reflect, rng)
        yield (
            kind,
            document(
                kind,
                problem,
                task,
                extra,
                preamble=with_preamble,
                rng=rng,
                switch_at=switch_at,
                slip_at=slip_at,
                slip=slip,
                slips=reflect_plain if kind == "plain" else 0.0,
            ),
        )


def write_corpus(path: str | Path, docs: Iterator[tuple[str, str]]) -> Counter:
    """Write documents as .jsonl ({"text", "kind"}) or .txt (separated by blank lines); returns counts by kind."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".txt"):
        raise NanoseekError(f"{path}: the corpus is written as .jsonl or .txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    with open(path, "w", encoding="utf-8") as f:
        for kind, text in docs:
            counts[kind] += 1
            if path.suffix == ".jsonl":
                f.write(json.dumps({"text": text, "kind": kind}, ensure_ascii=False) + "\n")
            else:
                f.write(text.strip("\n") + "\n\n")
    return counts


def worked_conversations(task: Task, n: int, seed: int = 0) -> Iterator[dict]:
    """SFT rows for `nanoseek sft`: {"messages": [question, answer with its worked solution as
    `reasoning_content`]}, from the task's train split. SFTDataset renders them in the model's
    prompt format; in the R1-Zero format a row is exactly a worked corpus document."""
    for problem in task.sample(n, "train", seed, distinct=False):
        yield {
            "messages": [
                {"role": "user", "content": problem.prompt},
                {"role": "assistant", "content": problem.answer, "reasoning_content": task.worked(problem)},
            ]
        }
