"""countdown's worked searches: tries that fail, then the one that reaches the target, every step right."""

import random
import re

import pytest

from nanoseek import tasks
from nanoseek.data.corpus import corpus
from nanoseek.errors import NanoseekError
from nanoseek.rewards import countdown_reward
from nanoseek.tasks import Problem

OPTIONS = dict(min_numbers=3, max_numbers=4, max_number=6, max_target=30, max_step=30)  # the countdown demo's
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}


def check_try(text: str, numbers, target: int) -> bool:
    """Read one try as a reader would and check every step of it; returns whether it reached the target."""
    body, last = text.split(f">{target}:")  # the target is written again before the last candidates
    head, *steps = body.split(":")
    current = [int(n) for n in head.split(",")]
    assert sorted(current) == sorted(numbers)  # each number once
    for step in steps:  # "5+3=8,2,4": the first two numbers in front, then what is left
        m = re.fullmatch(r"(\d+)([-+*/])(\d+)=([\d,]+)", step)
        a, op, b, rest = int(m[1]), m[2], int(m[3]), [int(x) for x in m[4].split(",")]
        assert [a, b] == current[:2] and rest[1:] == current[2:]
        assert op != "/" or a % b == 0
        assert rest[0] == OPS[op](a, b) and 0 <= rest[0] <= 30
        current = rest
    assert len(current) == 2
    candidates = re.findall(r"([-+*/])(\d+)", last)
    assert "".join(f"{op}{v}" for op, v in candidates) == last
    ops = [op for op, _ in candidates]
    assert ops == sorted(ops, key="+-*/".index)  # in the order + - * /, each at most once
    a, b = current
    for op, v in candidates:
        assert int(v) == OPS[op](a, b) and (op != "-" or a >= b) and (op != "/" or a % b == 0)
    hit = [int(v) == target for _, v in candidates]
    assert not any(hit[:-1])  # a try stops at the target
    return bool(hit) and hit[-1]


def test_the_written_search_of_a_small_problem():
    task = tasks.get("countdown", **OPTIONS)
    p = Problem(prompt="", answer="(5+3)*2", task="countdown", numbers=(3, 5, 2), target=16)
    reasoning, answer = task.search(p, random.Random(1))
    tries = reasoning.split(" no.\n")
    assert tries[-1].endswith(" yes") and all(check_try(t, p.numbers, 16) is False for t in tries[:-1])
    assert check_try(tries[-1].removesuffix(" yes"), p.numbers, 16) is True
    assert countdown_reward(f"<answer>{answer}</answer>", p.numbers, 16) == 1.0
    # the format, pinned: each try's order, its steps with what is left, the last number's candidates
    one = r"\d,\d,\d:\d[-+*/]\d=\d+,\d>16:[-+*/\d]+"
    assert re.fullmatch(rf"({one} no\.\n)*{one} yes", reasoning), reasoning


def test_searches_are_right_step_by_step_and_end_at_the_target():
    task = tasks.get("countdown", **OPTIONS)
    rng = random.Random(0)
    lengths = {3: [], 4: []}
    for p in task.sample(150, "train", seed=2):
        found = task.search(p, rng, max_tries=4)
        if found is None:
            assert not task.tries_solve(p)
            continue
        reasoning, answer = found
        tries = reasoning.split(" no.\n")
        assert 1 <= len(tries) <= 4 and tries[-1].endswith(" yes")
        reached = [check_try(t.removesuffix(" yes"), p.numbers, p.target) for t in tries]
        assert reached == [False] * (len(tries) - 1) + [True]
        assert countdown_reward(f"<answer>{answer}</answer>", p.numbers, p.target) == 1.0
        lengths[len(p.numbers)].append(len(tries))
    # a blind search: most take more than one try, and none more than four
    assert all(1.5 < sum(n) / len(n) < 3 for n in lengths.values()), lengths


def test_max_step_and_prompt_are_checked():
    with pytest.raises(NanoseekError, match="max_step 0 must be at least 1"):
        tasks.get("countdown", max_step=0)
    with pytest.raises(NanoseekError, match="prompt 'short': expected words or terse"):
        tasks.get("countdown", prompt="short")


def test_terse_prompts_are_a_searchs_first_line_and_keep_the_problems():
    words, terse = tasks.get("countdown", **OPTIONS), tasks.get("countdown", **OPTIONS, prompt="terse")
    for a, b in zip(words.sample(50, seed=4), terse.sample(50, seed=4)):
        assert (a.numbers, a.target, a.answer) == (b.numbers, b.target, b.answer)  # the same problems, splits too
        assert b.prompt == f"[{','.join(map(str, b.numbers))}]>{b.target}"
        assert words.key(a) == terse.key(b)


def test_a_problem_no_left_fold_solves_has_no_search():
    task = tasks.get("countdown", **OPTIONS)
    p = Problem(prompt="", answer="", task="countdown", numbers=(1, 1, 1), target=50, solution="1+1=2, 2*1=2")
    assert task.search(p, random.Random(0)) is None and not task.tries_solve(p)
    # the corpus's worked kind then writes the problem's own solution (the search kind skips it)
    assert task.worked(p) == "1+1=2, 2*1=2"


def test_the_search_corpus_kind():
    task = tasks.get("countdown", **OPTIONS)
    docs = list(corpus(task, 300, seed=1, mix={"search": 0.5, "direct": 0.3, "plain": 0.2}))
    assert docs == list(corpus(task, 300, seed=1, mix={"search": 0.5, "direct": 0.3, "plain": 0.2}))
    searches = [text for kind, text in docs if kind == "search"]
    assert len(searches) == 150
    for text in searches:
        numbers = [int(n) for n in re.search(r"Using the numbers ([\d, ]+), each", text)[1].split(", ")]
        target = int(re.search(r"make (\d+)\.", text)[1])
        think = re.search(r" <think>(.*)</think> <answer>(.*)</answer>$", text, re.DOTALL)
        assert think[1].endswith(" yes") and countdown_reward(f"<answer>{think[2]}</answer>", numbers, target) == 1.0
    with pytest.raises(NanoseekError, match="the search kind needs a task that searches"):
        list(corpus(tasks.get("chain"), 10, mix={"search": 1.0}))


def test_whole_number_tokens_make_the_target_the_same_tokens_everywhere():
    from nanoseek.data.chat import R1_ZERO_TEMPLATE
    from nanoseek.data.corpus import completion
    from nanoseek.data.tokenizer import train_tokenizer

    task = tasks.get("countdown", **OPTIONS, prompt="terse")
    texts = [text for _, text in corpus(task, 400, seed=0, mix={"search": 0.8, "plain": 0.2})]
    merged = train_tokenizer(texts, vocab_size=600, split_punctuation=True, split_digits=False)
    split = train_tokenizer(texts, vocab_size=600, split_punctuation=True)
    p = Problem(prompt="[3,5,2]>16", answer="", task="countdown", numbers=(3, 5, 2), target=16)
    reasoning, answer = task.search(p, random.Random(1))
    text = R1_ZERO_TEMPLATE.format(prompt=p.prompt) + completion(reasoning, answer)
    pieces = [merged.decode([i]) for i in merged.encode(text)]
    assert pieces.count("16") == text.count("16") >= 3  # the prompt's, each try's and the hit's: one token
    assert not any(piece.strip().isdigit() and piece != piece.strip() for piece in pieces)  # no " 5" tokens
    assert [split.decode([i]) for i in split.encode("16")] == ["1", "6"]  # the default splits digits
