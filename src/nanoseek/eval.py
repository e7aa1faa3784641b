"""Evaluation as R1 reports it (DeepSeek-R1 section 3): pass@1 averaged over k samples at
temperature 0.6 / top-p 0.95, pass@k, majority vote (cons@k) and response length.

Samples that reason (non-empty reasoning) and samples that answer directly are also scored
apart: RL can only turn into pass@1 a gap that is already there, reasoning that is right more
often than a direct guess.

What RL trains on is what evaluation scores: a sample is right when the task's own reward
(`task.reward`, the accuracy term of GRPO's reward) says so, and its thinking length is the
engine's `reasoning_tokens` (the tokens between <think> and </think>, the rule of
nanoseek.data.reasoning), which GRPO's metrics read too.

R1's two readability measures (section 2.3) are functions of the text too: language
consistency, the share of a sample's reasoning written in the problem's language
(`rewards.language_reward`), averaged over the samples that have reasoning (None when no
sample does: a model that never thinks has no reasoning to mix languages in); and
readability, the share of samples in the readable format with a summary
(`rewards.readability_reward`, which expects no reasoning for a question asked without
thinking, `meta["reasoning"]` False). The format rate reads the template's answer format:
<answer> tags when the template asks for them (R1-Zero's), any answer after </think> otherwise.

The engine is nanoseek.infer.Engine or anything shaped like its `generate`: one result per prompt
whose `outputs` have `text`, `reasoning`, `answer`, `reasoning_tokens` and the tokens, as
`token_ids` or, for an OpenAI-compatible endpoint whose replies count tokens without giving
them, `num_tokens` (`nanoseek eval --base-url`, nanoseek.eval_cli.ClientEngine).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from nanoseek.data.reasoning import prompt_opens_reasoning


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority_vote(answers: Iterable[str | None], key=None) -> str | None:
    """The most common answer (cons@k), ties to the one seen first; empty and None answers do
    not vote. `key` maps an answer to what counts as equal (default: stripped text)."""
    key = key or (lambda a: a.strip())
    counts: dict = {}
    first: dict = {}
    for a in answers:
        if a is None or not a.strip():
            continue
        k = key(a)
        if k is None:
            continue
        counts[k] = counts.get(k, 0) + 1
        first.setdefault(k, a)
    if not counts:
        return None
    best = max(counts.values())
    return next(first[k] for k in first if counts[k] == best)


def consensus(engine, prompts: list, k: int, sampling_params=None, key=None) -> list[str | None]:
    """cons@k: sample k completions per prompt and take the majority answer of each."""
    from nanoseek.infer import SamplingParams

    params = dataclasses.replace(sampling_params or SamplingParams(temperature=0.6, top_p=0.95, max_tokens=256), n=k)
    return [majority_vote([o.answer for o in r.outputs], key) for r in engine.generate(prompts, params)]


# R1-Zero's "aha moment" (R1 paper, Table 3): the model stops, re-checks and corrects itself.
# A sample reflects when its reasoning has one of these words or phrases, whole, in any case.
REFLECTION = re.compile(r"\b(wait|re-?check|re-?evaluate|let me (?:check|verify))\b", re.IGNORECASE)


def reflects(reasoning: str) -> bool:
    """Does this reasoning stop to re-check itself? "3+5=7 wait, 3+5=8" and "Wait, let me
    re-evaluate" do; "await" and "a=3,b=5:3+5=8" do not."""
    return bool(reasoning) and REFLECTION.search(reasoning) is not None


_STEP = re.compile(r"(-?\d+)([-+*/])(-?\d+)=(-?\d+)")


def _step_right(left: str, op: str, right: str, value: str) -> bool:
    a, b, v = int(left), int(right), int(value)
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op] == v


_RECALL = re.compile(r"(?<![\w=])([^\W\d_])=(-?\d+)")  # a name's value, as a prompt binds it: "c=-4"


def corrects_a_slip(reasoning: str, prompt: str | None = None) -> bool:
    """The aha moment in a text: a step comes out wrong ("3+5=7"), a reflection follows it
    (`reflects`), and after it the same step is written right ("wait, 3+5=8"); or a value is
    recalled wrong and re-read right ("c=5 wait, c=4"), right meaning as `prompt` binds it
    (without a prompt: any other value)."""
    reasoning = reasoning or ""
    bound = dict(_RECALL.findall(prompt or ""))
    for m in REFLECTION.finditer(reasoning):
        head, tail = reasoning[: m.start()], reasoning[m.end() :]
        recalled = list(_RECALL.finditer(head))
        again = _RECALL.match(tail.lstrip(" ,:"))
        if recalled and again and not head[recalled[-1].end() :].strip():
            (name, first), (same, second) = recalled[-1].groups(), again.groups()
            right = bound.get(name, second)  # without a prompt (or a binding of the name): any other value
            if name == same and first != second == right:
                return True
        before = _STEP.findall(head)
        if not before or _step_right(*before[-1]):
            continue
        left, op, right, _ = before[-1]
        after = _STEP.findall(tail)
        if any(s[:3] == (left, op, right) and _step_right(*s) for s in after[:1]):
            return True
    return False


def aha_samples(samples: list[dict]) -> list[dict]:
    """The samples (as `evaluate`'s `samples_out` writes them) that slip, notice it and reach the
    right answer (`corrects_a_slip` and correct), hardest problems first."""
    found = [s for s in samples if s["correct"] and corrects_a_slip(s.get("reasoning") or "", s.get("prompt"))]
    return sorted(found, key=lambda s: -float(s.get("difficulty") or 0))


def task_language(task, problem) -> str:
    """The problem's language: its meta's, else what the task reads from its prompt (chain's
    names), else "en"."""
    from nanoseek.errors import NanoseekError
    from nanoseek.rewards import problem_language as meta_language

    if problem.meta.get("language") or not hasattr(task, "language"):
        return meta_language(problem)
    try:
        return task.language(problem)
    except NanoseekError:
        return "en"


@dataclass
class EvalResult:
    problems: int
    samples_per_problem: int
    pass_at_1: float
    pass_at_k: float
    cons_at_k: float
    response_len: float  # tokens
    thinking_len: float  # tokens between <think> and </think> (CompletionOutput.reasoning_tokens)
    thinking_share: float  # samples with non-empty reasoning
    thinking_accuracy: float | None
    direct_accuracy: float | None
    format_rate: float
    # share of the reasoning in the problem's language, over samples with reasoning (None: none had any)
    language_consistency: float | None = None
    readability: float = 0.0  # samples in the readable format: reasoning, then a summary and the answer
    reflection_share: float = 0.0  # samples whose reasoning re-checks itself (`reflects`)
    reflection_accuracy: float | None = None  # accuracy of those samples (None: no sample reflects)
    no_reflection_accuracy: float | None = None  # accuracy of the other samples (None: every sample reflects)
    # {difficulty: {"problems", "pass_at_1", "thinking_len", "reflection_share", "reflection_accuracy",
    # "no_reflection_accuracy"}}: longer thinking, and more re-checking, on harder problems?
    by_difficulty: dict = dataclasses.field(default_factory=dict)
    tokens: int = 0  # completion tokens of all samples
    seconds: float = 0.0  # wall time of the evaluation: sampling and scoring

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(
    engine,
    task,
    problems,
    template: str,
    k: int = 4,
    max_tokens: int = 96,
    temperature: float = 0.6,
    top_p: float = 0.95,
    seed: int = 0,
    samples_out: list | None = None,
    answer_tags: bool | None = None,
) -> EvalResult:
    """Sample k completions per problem from `template` (with a {prompt} field) and score them
    with the task's reward. `answer_tags`: whether the format rate requires <answer> tags (None:
    when the template asks for them). `samples_out` gets one dict per sample."""
    from nanoseek.infer import SamplingParams
    from nanoseek.rewards import format_reward, language_reward, readability_reward

    start = time.perf_counter()
    params = SamplingParams(n=k, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    think_opened = prompt_opens_reasoning(template)
    if answer_tags is None:
        answer_tags = "</answer>" in template
    results = engine.generate([template.format(prompt=p.prompt) for p in problems], params)
    correct = total_len = think_len = thinking = think_right = direct_right = formatted = 0
    reflecting = reflect_right = 0
    pass_k = cons = consistency = readable = 0.0
    by: dict = {}
    for problem, res in zip(problems, results):
        c = 0
        level = by.setdefault(
            problem.difficulty, {"problems": 0, "right": 0, "thinking": 0, "reflecting": 0, "reflect_right": 0}
        )
        level["problems"] += 1
        level["thinking"] += sum(o.reasoning_tokens for o in res.outputs)
        language = task_language(task, problem)
        reasoning_expected = bool(problem.meta.get("reasoning", True))
        for o in res.outputs:
            right = task.reward(o.text, problem) > 0.5
            c += right
            tokens = completion_tokens(o)
            total_len += tokens
            think_len += o.reasoning_tokens
            formatted += format_reward(o.text, think_opened, answer_tags) > 0.5
            readable += readability_reward(o.text, think_opened, reasoning_expected)
            if reflects(o.reasoning):
                reflecting += 1
                reflect_right += right
                level["reflecting"] += 1
                level["reflect_right"] += right
            if o.reasoning:
                thinking += 1
                think_right += right
                consistency += language_reward(o.text, language, think_opened)
            else:
                direct_right += right
            if samples_out is not None:
                samples_out.append(
                    {
                        "prompt": problem.prompt,
                        "answer": problem.answer,
                        "completion": o.text,
                        "reasoning": o.reasoning,
                        "correct": bool(right),
                        "tokens": tokens,
                        "reasoning_tokens": o.reasoning_tokens,
                        "difficulty": problem.difficulty,
                    }
                )
        correct += c
        level["right"] += c
        pass_k += pass_at_k(k, c, k)
        vote = majority_vote([o.answer for o in res.outputs])
        cons += vote is not None and task.reward(f"<answer>{vote}</answer>", problem) > 0.5
    n = len(problems) * k
    direct = n - thinking
    return EvalResult(
        problems=len(problems),
        samples_per_problem=k,
        pass_at_1=correct / n,
        pass_at_k=pass_k / len(problems),
        cons_at_k=cons / len(problems),
        response_len=total_len / n,
        thinking_len=think_len / n,
        thinking_share=thinking / n,
        thinking_accuracy=think_right / thinking if thinking else None,
        direct_accuracy=direct_right / direct if direct else None,
        format_rate=formatted / n,
        language_consistency=consistency / thinking if thinking else None,
        readability=readable / n,
        reflection_share=reflecting / n,
        reflection_accuracy=reflect_right / reflecting if reflecting else None,
        no_reflection_accuracy=(correct - reflect_right) / (n - reflecting) if n > reflecting else None,
        by_difficulty={
            d: {
                "problems": v["problems"],
                "pass_at_1": v["right"] / (v["problems"] * k),
                "thinking_len": v["thinking"] / (v["problems"] * k),
                "reflection_share": v["reflecting"] / (v["problems"] * k),
                "reflection_accuracy": v["reflect_right"] / v["reflecting"] if v["reflecting"] else None,
                "no_reflection_accuracy": (
                    (v["right"] - v["reflect_right"]) / (v["problems"] * k - v["reflecting"])
                    if v["problems"] * k > v["reflecting"]
                    else None
                ),
            }
            for d, v in sorted(by.items())
        },
        tokens=total_len,
        seconds=time.perf_counter() - start,
    )


def completion_tokens(output) -> int:
    """A sample's completion tokens: its `num_tokens` when it has them (an endpoint's reply),
    else the length of its `token_ids`."""
    n = getattr(output, "num_tokens", None)
    return len(output.token_ids) if n is None else n
