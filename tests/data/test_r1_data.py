"""The R1 pipeline's data: readable cold-start solutions, the rejection-sampling verdicts on
outputs shaped like the models' own, the non-reasoning share, and the data set on disk."""

import json

import pytest

from nanoseek import tasks
from nanoseek.data.chat import END_THINK, EOS, format_chat
from nanoseek.data.r1 import (
    cold_start_conversations,
    counts_path,
    mix_in_non_reasoning,
    non_reasoning_conversations,
    readable_answer,
    sample_verified,
    summary,
    verdict,
    write_dataset,
)
from nanoseek.rewards import language_reward, readability_reward

OPTIONS = dict(min_values=2, max_values=5, min_value=1, max_value=5, signed=True, languages=["en", "el"])


@pytest.fixture(scope="module")
def task():
    return tasks.get("chain", **OPTIONS)


def chat_completion(reasoning: str, answer: str) -> str:
    """What a chat-format model writes after the generation prompt "<think>\\n"."""
    return f"{reasoning}\n{END_THINK}\n\n{answer}{EOS}"


def test_cold_start_solutions_are_readable_right_and_in_the_prompts_language(task):
    rows = list(cold_start_conversations(task, 40, seed=0))
    assert len(rows) == 40
    languages = set()
    for row in rows:
        problem = next(p for p in task.sample(200, "train", 0, distinct=False) if p.prompt == row["prompt"])
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": problem.prompt}
        text = chat_completion(assistant["reasoning_content"], assistant["content"])
        assert verdict(text, problem, task, think_opened=True) is None, text
        assert readability_reward(text, think_opened=True) == 1.0
        assert language_reward(text, task.language(problem), think_opened=True) == 1.0
        languages.add(task.language(problem))
        # the chat format renders the assistant turn with the reasoning inside <think>
        rendered = format_chat(row["messages"], add_generation_prompt=False)
        assert f"<think>\n{assistant['reasoning_content']}\n</think>\n\n{assistant['content']}" in rendered
    assert languages == {"en", "el"}


def test_summary_and_answer_of_a_chain_problem(task):
    problem = task.sample(1, "train", 3)[0]
    expression = problem.prompt.rsplit(". ", 1)[1]
    assert summary(problem) == f"{problem.answer} = {expression}."
    assert readable_answer(problem).endswith(f"\\boxed{{{problem.answer}}}")


def test_verdict_names_the_first_failed_test(task):
    problem = next(p for p in task.sample(50, "train", 1) if task.language(p) == "el" and p.difficulty >= 3)
    worked = task.worked(problem)
    right = readable_answer(problem)
    assert verdict(chat_completion(worked, right), problem, task, True) is None
    wrong = str(int(problem.answer) + 1)
    assert verdict(chat_completion(worked, f"x. \\boxed{{{wrong}}}"), problem, task, True) == "wrong"
    # right answer, but never closed the reasoning: the answer sits inside <think>
    assert verdict(f"{worked} \\boxed{{{problem.answer}}}", problem, task, True) == "malformed"
    # R1-Zero's terse shape: the answer with no summary before it
    assert verdict(chat_completion(worked, f"\\boxed{{{problem.answer}}}"), problem, task, True) == "unreadable"
    # a summary of another problem: the question restated with one more name
    expression = problem.prompt.rsplit(". ", 1)[1]
    other = f"{problem.answer} = {expression}+x. \\boxed{{{problem.answer}}}"
    assert verdict(chat_completion(worked, other), problem, task, True) == "unreadable"
    shorter = f"{problem.answer} = {expression.split('+', 1)[1]}. \\boxed{{{problem.answer}}}"
    assert verdict(chat_completion(worked, shorter), problem, task, True) == "unreadable"
    # switched to Latin names midway: right and readable, but two languages
    mixed = task.worked(problem, switch_at=1)
    assert mixed != worked
    assert verdict(chat_completion(mixed, right), problem, task, True) == "mixed_language"


def test_non_reasoning_rows_answer_without_thinking(task):
    lookups = tasks.get("chain", **OPTIONS, lookup=1.0).sample(5, "train", 0)
    rows = list(non_reasoning_conversations(lookups))
    for row, problem in zip(rows, lookups):
        assistant = row["messages"][1]
        assert assistant["reasoning_content"] == "" and assistant["content"] == f"\\boxed{{{problem.answer}}}"
        text = chat_completion("", assistant["content"])
        assert verdict(text, problem, task, True) is None
        assert readability_reward(text, True, reasoning_expected=False) == 1.0
    mixed = mix_in_non_reasoning([{"kind": "r"}] * 8, lookups * 2, share=0.2)
    assert len(mixed) == 10 and sum(r.get("kind") == "non_reasoning" for r in mixed) == 2


class FakeEngine:
    """Gives each prompt the completions it was told to: (text, token ids)."""

    def __init__(self, outputs):
        self.outputs = outputs

    def generate(self, prompts, params):
        from types import SimpleNamespace

        from nanoseek.data.reasoning import parse_reasoning

        results = []
        for prompt in prompts:
            outs = []
            for text in self.outputs[prompt][: params.n]:
                reasoning, answer = parse_reasoning(text, think_opened=True)
                outs.append(
                    SimpleNamespace(
                        text=text,
                        reasoning=reasoning,
                        answer=answer,
                        token_ids=[5, 6, 1],
                        top_logprobs=[[(5, -0.1), (7, -2.5)]] * 3 if params.logprobs else None,
                    )
                )
            results.append(SimpleNamespace(outputs=outs))
        return results


def test_sample_verified_keeps_only_verified_unique_samples_and_counts_the_rest(task, tmp_path):
    from nanoseek.r1 import CHAT_TEMPLATE

    problems = [p for p in task.sample(30, "train", 2) if p.difficulty >= 3][:2]
    outputs = {}
    for p in problems:
        good = chat_completion(task.worked(p), readable_answer(p))
        outputs[CHAT_TEMPLATE.format(prompt=p.prompt)] = [
            good,
            good,  # a duplicate
            chat_completion(task.worked(p), "\\boxed{99}"),  # wrong
            chat_completion(task.worked(p), f"\\boxed{{{p.answer}}}"),  # no summary
        ]
    rows, counts = sample_verified(FakeEngine(outputs), task, problems, CHAT_TEMPLATE, 4, 64, top_logprobs=2)
    assert counts["sampled"] == 8 and counts["kept"] == 2
    assert counts["duplicate"] == 2 and counts["wrong"] == 2 and counts["unreadable"] == 2
    assert [r["prompt"] for r in rows] == [p.prompt for p in problems]
    assert rows[0]["teacher"] == {"token_ids": [5, 6, 1], "top_logprobs": [[[5, -0.1], [7, -2.5]]] * 3}
    path = write_dataset(tmp_path / "rs.jsonl", rows, counts)
    back = [json.loads(line) for line in path.read_text().splitlines()]
    assert back == rows
    assert json.loads(counts_path(path).read_text())["kept"] == 2
    assert not (tmp_path / "rs.jsonl.tmp").exists()
