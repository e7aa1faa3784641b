"""The data of the R1 pipeline (DeepSeek-R1 section 2.3): the cold start, rejection sampling,
and the non-reasoning chats that go with them.

- Cold start: a few hundred long, readable worked solutions in the chat format, reasoning in
  the prompt's language inside <think>, then a summary and the answer:

      <think>\\na=3,b=-1:3-1=2,c=4. 2+4=6\\n</think>\\n\\na+b+c=6. \\boxed{6}

- Rejection sampling: n samples per training prompt from a model; a sample is kept when it is
  right (the task's reward), well formed (one closed <think>), readable (a summary before the
  answer, `readability_reward`) and in one language (`language_reward` = 1 against the
  problem's language); duplicates (same prompt, same completion text) are dropped. `verdict`
  names the first test a sample fails; the counts by reason are written next to the data set.
- Non-reasoning chats: questions a glance answers (chain's one-value lookups, "a=3,b=-1. b")
  answered without thinking, as R1 mixed writing and factual QA into its SFT data: the
  reasoning is empty and the answer is the answer alone.

Rows are `nanoseek sft` conversations: {"messages": [user, assistant with
`reasoning_content`], ...}, with the problem's prompt, answer and difficulty alongside.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from nanoseek.data.reasoning import parse_reasoning
from nanoseek.rewards import format_reward, language_reward, problem_language, readability_reward
from nanoseek.tasks import Problem, Task

REASONS = ("wrong", "malformed", "unreadable", "mixed_language", "duplicate")


def summary(problem: Problem) -> str:
    """A one-line summary of the solution: the result, then for chain the expression it is the
    value of ("6 = a+b+c."), for other tasks a sentence. The result comes first, right after
    the reasoning that ends in it: written after the expression ("a+b+c=6."), the 4-layer models
    copied the expression right and then lost the value (26 of 34 wrong cold-start samples)."""
    if problem.task == "chain" and ". " in problem.prompt:
        return f"{problem.answer} = {problem.prompt.rsplit('. ', 1)[1]}."
    return f"The result is {problem.answer}."


def readable_answer(problem: Problem) -> str:
    """What follows </think> in a readable solution: the summary, then the boxed answer."""
    return f"{summary(problem)} \\boxed{{{problem.answer}}}"


def direct_answer(problem: Problem) -> str:
    """The answer of a question answered without thinking."""
    return f"\\boxed{{{problem.answer}}}"


def conversation(problem: Problem, reasoning: str, answer: str, **extra) -> dict:
    row = {
        "messages": [
            {"role": "user", "content": problem.prompt},
            {"role": "assistant", "content": answer, "reasoning_content": reasoning},
        ],
        "prompt": problem.prompt,
        "answer": problem.answer,
        "difficulty": problem.difficulty,
    }
    row.update(extra)
    return row


def reasons_problem(problem: Problem) -> bool:
    """Whether a problem asks for reasoning (chain's lookups do not)."""
    return bool(problem.meta.get("reasoning", True))


def cold_start_conversations(task: Task, n: int, seed: int = 0) -> Iterator[dict]:
    """n readable worked solutions of reasoning problems from the task's train split, each in
    its prompt's language (never switching), with a summary before the answer."""
    problems = [p for p in task.sample(2 * n + 10, "train", seed, distinct=False) if reasons_problem(p)]
    for problem in problems[:n]:
        reasoning = problem.solution or task.worked(problem)
        yield conversation(problem, reasoning, readable_answer(problem), kind="cold_start")


def non_reasoning_conversations(problems: Iterable[Problem]) -> Iterator[dict]:
    """Each question answered at once: empty reasoning, the answer alone."""
    for problem in problems:
        yield conversation(problem, "", direct_answer(problem), kind="non_reasoning")


def verdict(completion: str, problem: Problem, task: Task, think_opened: bool) -> str | None:
    """None when a sample is kept, else the first reason it is not: wrong, malformed
    (not one closed <think> before an answer), unreadable (no summary before the answer, a
    summary that does not restate the problem and its result, or reasoning where none was asked
    for) or mixed_language (reasoning not all in the problem's language)."""
    if task.reward(completion, problem) <= 0.5:
        return "wrong"
    if format_reward(completion, think_opened, answer_tags=False) < 1:
        return "malformed"
    reasoning = reasons_problem(problem)
    if readability_reward(completion, think_opened, reasoning_expected=reasoning) < 1:
        return "unreadable"
    if reasoning and not parse_reasoning(completion, think_opened)[1].strip().startswith(summary(problem)):
        return "unreadable"  # a summary of some other problem ("a+b+c=6." under "a+b")
    if reasoning and language_reward(completion, problem_language(problem), think_opened) < 1:
        return "mixed_language"
    return None


def sample_verified(
    engine,
    task: Task,
    problems: list[Problem],
    template: str,
    n: int,
    max_tokens: int,
    temperature: float = 0.6,
    top_p: float = 0.95,
    seed: int = 0,
    top_logprobs: int | None = None,
) -> tuple[list[dict], Counter]:
    """Rejection sampling: n samples per problem from `engine` with `template` (a {prompt}
    field; a chat template opens <think>), the verified ones as SFT rows, and the counts
    (sampled, kept, and rejected by reason). `top_logprobs`: also keep the teacher's top-k
    log-probs per completion token (row["teacher"]), for logit distillation."""
    from nanoseek.data.reasoning import prompt_opens_reasoning
    from nanoseek.infer import SamplingParams

    think_opened = prompt_opens_reasoning(template)
    params = SamplingParams(
        n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed, logprobs=top_logprobs
    )
    results = engine.generate([template.format(prompt=p.prompt) for p in problems], params)
    counts: Counter = Counter({"sampled": 0, "kept": 0, **{r: 0 for r in REASONS}})
    rows, seen = [], set()
    for problem, result in zip(problems, results):
        for o in result.outputs:
            counts["sampled"] += 1
            reason = verdict(o.text, problem, task, think_opened)
            key = (problem.prompt, o.text.strip())
            if reason is None and key in seen:
                reason = "duplicate"
            if reason is not None:
                counts[reason] += 1
                continue
            seen.add(key)
            counts["kept"] += 1
            extra = {"kind": "rejection_sampled"}
            if top_logprobs is not None:
                extra["teacher"] = {
                    "token_ids": list(o.token_ids),
                    "top_logprobs": [[[int(t), float(lp)] for t, lp in pairs] for pairs in o.top_logprobs],
                }
            rows.append(conversation(problem, o.reasoning, o.answer, **extra))
    return rows, counts


def mix_in_non_reasoning(rows: list[dict], lookups: list[Problem], share: float, seed: int = 0) -> list[dict]:
    """The rows plus non-reasoning chats making up `share` of the result, shuffled by `seed`."""
    want = round(share * len(rows) / (1 - share)) if 0 < share < 1 else 0
    mixed = rows + list(non_reasoning_conversations(lookups[:want]))
    random.Random(f"mix:{seed}").shuffle(mixed)
    return mixed


def write_dataset(path: str | Path, rows: list[dict], counts: dict) -> Path:
    """rows as jsonl at `path` and the counts as json next to it (PATH.counts.json), each
    written to a temporary file first so that an interrupted write leaves no half data set."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    counts_file = counts_path(path)
    counts_file.write_text(json.dumps(dict(counts), indent=1) + "\n", encoding="utf-8")
    return path


def counts_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".counts.json")
