"""Evaluation as R1 reports it (DeepSeek-R1 section 3): pass@1 averaged over k samples at
temperature 0.6 / top-p 0.95, pass@k, majority vote (cons@k) and response length.

Following SYSTEM.md section 6, samples that reason (non-empty <think>) and samples that
answer directly are also scored apart: the gap between them is what R1-Zero turns into pass@1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from nanoseek.data.chat import parse_reasoning


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


@dataclass
class EvalResult:
    problems: int
    samples_per_problem: int
    pass_at_1: float
    pass_at_k: float
    cons_at_k: float
    response_len: float  # tokens
    thinking_len: float  # tokens inside <think>
    thinking_share: float  # samples with non-empty reasoning
    thinking_accuracy: float | None
    direct_accuracy: float | None
    format_rate: float

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(engine, task, problems, template: str, k: int = 4, max_tokens: int = 96, temperature: float = 0.6,
             top_p: float = 0.95, seed: int = 0, samples_out: list | None = None) -> EvalResult:
    """Sample k completions per problem and score them with the task's accuracy reward."""
    from nanoseek.infer import SamplingParams, majority_vote
    from nanoseek.rewards import format_reward

    params = SamplingParams(n=k, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    results = engine.generate([template.format(prompt=p.prompt) for p in problems], params)
    correct = total_len = think_len = thinking = think_right = direct_right = formatted = 0
    pass_k = cons = 0.0
    for problem, res in zip(problems, results):
        c, answers = 0, []
        for o in res.outputs:
            right = task.reward(o.text, problem) > 0.5
            reasoning, answer = parse_reasoning(o.text)
            answers.append(answer)
            c += right
            total_len += len(o.token_ids)
            think_len += len(engine.tokenizer.encode(reasoning)) if reasoning else 0
            formatted += format_reward(o.text) > 0.5
            if reasoning:
                thinking += 1
                think_right += right
            else:
                direct_right += right
            if samples_out is not None:
                samples_out.append({"prompt": problem.prompt, "answer": problem.answer, "completion": o.text,
                                    "correct": bool(right)})
        correct += c
        pass_k += pass_at_k(k, c, k)
        vote = majority_vote(answers)
        cons += vote is not None and task.reward(f"<answer>{vote}</answer>", problem) > 0.5
    n = len(problems) * k
    direct = n - thinking
    return EvalResult(
        problems=len(problems), samples_per_problem=k, pass_at_1=correct / n, pass_at_k=pass_k / len(problems),
        cons_at_k=cons / len(problems), response_len=total_len / n, thinking_len=think_len / n,
        thinking_share=thinking / n, thinking_accuracy=think_right / thinking if thinking else None,
        direct_accuracy=direct_right / direct if direct else None, format_rate=formatted / n)

