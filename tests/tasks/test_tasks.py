"""Tasks: seeded problems, difficulty knobs, disjoint splits, rewards on known right and wrong answers."""

import json

import pytest

from nanoseek import tasks
from nanoseek.errors import NanoseekError
from nanoseek.tasks import Problem, split_of
from nanoseek.tasks.arith import parse, solve


def answer(text):
    return f" <think>working</think> <answer>{text}</answer>"


def chain_value(prompt):
    """Independent value of a +/- chain."""
    value, sign, digits = 0, 1, ""
    for c in prompt + "+":
        if c.isdigit():
            digits += c
        else:
            value += sign * int(digits)
            sign, digits = (1 if c == "+" else -1), ""
    return value


def test_names():
    assert set(tasks.names()) == {"arith", "chain", "countdown", "gsm8k", "math"}


def test_bad_options_are_errors():
    with pytest.raises(NanoseekError, match="task 'nope'"):
        tasks.get("nope")
    with pytest.raises(NanoseekError, match="unknown option max_opps"):
        tasks.get("arith", max_opps=3)
    with pytest.raises(NanoseekError, match="min_ops"):
        tasks.get("arith", min_ops=4, max_ops=2)
    with pytest.raises(NanoseekError, match="ops"):
        tasks.get("arith", ops="/")
    with pytest.raises(NanoseekError, match="split"):
        tasks.get("arith").sample(3, split="validation")
    with pytest.raises(NanoseekError, match="min_numbers"):
        tasks.get("countdown", min_numbers=1)


# ---- arith --------------------------------------------------------------------------------
def test_arith_is_seeded():
    task = tasks.get("arith")
    assert task.sample(20, seed=3) == task.sample(20, seed=3)
    assert task.sample(20, seed=3) != task.sample(20, seed=4)


def test_arith_difficulty_knobs():
    task = tasks.get("arith", min_ops=3, max_ops=5, max_operand=9, ops="+-")
    problems = task.sample(300, seed=0)
    assert {p.difficulty for p in problems} == {3, 4, 5}
    for p in problems:
        numbers, ops = parse(p.prompt)
        assert len(ops) == p.difficulty and set(ops) <= set("+-")
        assert all(1 <= n <= 9 for n in numbers)
        assert int(p.answer) == chain_value(p.prompt)
        assert len(task.steps(p)) == p.difficulty and p.solution == ", ".join(map(str, task.steps(p)))


def test_arith_precedence():
    value, steps = solve([3, 4, 2, 1], "+*-")  # 3+4*2-1
    assert value == 10 and [str(s) for s in steps] == ["4*2=8", "3+8=11", "11-1=10"]
    problems = tasks.get("arith", ops="*", max_ops=2).sample(20)
    assert all(str(eval_product(p.prompt)) == p.answer for p in problems)


def eval_product(prompt):
    value = 1
    for n in prompt.split("*"):
        value *= int(n)
    return value


def test_arith_reward():
    task = tasks.get("arith")
    p = Problem(prompt="3+4-2", answer="5", difficulty=2, task="arith")
    assert task.reward(answer("5"), p) == 1.0
    assert task.reward(" <think>3+4=7, 7-2=5</think> <answer>5</answer>", p) == 1.0
    assert task.reward(answer("6"), p) == 0.0
    assert task.reward(answer("3+4-2"), p) == 0.0  # copying the question is not an answer
    assert task.reward(answer("5.5"), p) == 0.0
    assert task.reward("5", p) == 0.0  # no <answer> and no \boxed{}
    assert task.reward(" <think>the answer is 5</think>", p) == 0.0


def test_arith_splits_are_disjoint():
    task = tasks.get("arith", min_ops=2, max_ops=2, max_operand=5, test_share=0.2)  # 5**3 * 4 = 500 problems
    train = {p.prompt for p in task.sample(300, split="train", seed=1)}
    test = {p.prompt for p in task.sample(60, split="test", seed=1)}
    assert len(test) == 60 and not train & test
    assert all(split_of(k, 0.2) == "train" for k in train) and all(split_of(k, 0.2) == "test" for k in test)


def test_small_problem_space_repeats():
    task = tasks.get("arith", min_ops=1, max_ops=1, max_operand=2, ops="+", test_share=0.0)
    problems = task.sample(10)
    assert len(problems) == 10 and len({p.prompt for p in problems}) == 4
    with pytest.raises(NanoseekError, match="no test problems"):
        task.sample(3, split="test")


# ---- countdown -------------------------------------------------------------------------------
def test_countdown_problems_have_solutions():
    task = tasks.get("countdown")
    problems = task.sample(100, seed=0)
    assert problems == task.sample(100, seed=0)
    for p in problems:
        assert 3 <= len(p.numbers) <= 4 and 1 <= p.target <= 100 and p.difficulty == len(p.numbers)
        assert str(p.target) in p.prompt and all(str(n) in p.prompt for n in p.numbers)
        assert task.reward(answer(p.answer), p) == 1.0  # the generating expression is a solution
        assert task.steps(p)[-1].result == p.target and len(task.steps(p)) == len(p.numbers) - 1


def test_countdown_reward():
    task = tasks.get("countdown")
    p = Problem(prompt="", answer="(3+5)*7-2", task="countdown", numbers=(3, 5, 7, 2), target=54)
    assert task.reward(answer("(3+5)*7-2"), p) == 1.0
    assert task.reward(answer("7*(5+3)-2 = 54"), p) == 1.0
    assert task.reward(answer("(3 + 5) \\times 7 - 2"), p) == 1.0
    assert task.reward(answer("3+5*7-2"), p) == 0.0  # precedence: 36
    assert task.reward(answer("(3+5)*7"), p) == 0.0  # 2 not used
    assert task.reward(answer("(3+5)*7-2+2-2"), p) == 0.0  # 2 used three times
    assert task.reward(answer("54"), p) == 0.0
    assert task.reward(answer("(3+5)*7-2*1"), p) == 0.0  # a number that was not given
    assert task.reward(answer("-(3+5)*7-2"), p) == 0.0  # no unary minus
    assert task.reward(answer("(3+5)*7-2)"), p) == 0.0
    assert task.reward("(3+5)*7-2", p) == 0.0  # no answer tag


def test_countdown_splits_are_disjoint():
    task = tasks.get("countdown", min_numbers=3, max_numbers=3, max_number=9, max_target=20, test_share=0.3)
    train = {task.key(p) for p in task.sample(200, split="train")}
    test = {task.key(p) for p in task.sample(50, split="test")}
    assert train and test and not train & test


# ---- GSM8K and MATH files ---------------------------------------------------------------------
def test_gsm8k_sample_file():
    task = tasks.get("gsm8k")
    problems = task.sample(None, "train") + task.sample(None, "test")
    assert len(problems) == 12 and all(p.task == "gsm8k" for p in problems)
    bins = next(p for p in problems if "recycling" in p.prompt)
    assert bins.answer == "7350" and "<<" not in bins.solution and bins.difficulty == 1
    assert task.reward(answer("7350"), bins) == 1.0
    assert task.reward(answer("7,350"), bins) == 1.0
    assert task.reward("so the answer is \\boxed{7350}.", bins) == 1.0
    assert task.reward(answer("7351"), bins) == 0.0


def test_file_splits_and_sampling():
    task = tasks.get("gsm8k", test_share=0.5)
    train, test = task.sample(None, "train"), task.sample(None, "test")
    assert train and test and not {p.prompt for p in train} & {p.prompt for p in test}
    many = task.sample(3 * len(train) + 1, "train", seed=2)
    assert len(many) == 3 * len(train) + 1 and set(many) == set(train)
    assert task.sample(5, seed=2) == task.sample(5, seed=2)


def test_math_sample_file():
    task = tasks.get("math", test_share=0.0)
    by_answer = {p.answer: p for p in task.sample(None)}
    assert set(by_answer) >= {"\\frac{11}{12}", "6", "5\\sqrt{2}", "(2,3)", "9\\pi", "0.1", "\\frac{1}{6}", "(4, 2)"}
    assert by_answer["(2,3)"].difficulty == 3 and by_answer["6"].meta["type"] == "Algebra"
    right = {
        "\\frac{11}{12}": "\\frac{22}{24}",
        "5\\sqrt{2}": "\\sqrt{50}",
        "(2,3)": "(2, 3)",
        "9\\pi": "9 \\pi",
        "0.1": "\\frac{1}{10}",
        "\\frac{1}{6}": "1/6",
        "(4, 2)": "(4,2)",
        "6": "6",
        "720": "720",
    }
    wrong = {
        "\\frac{11}{12}": "0.91",
        "5\\sqrt{2}": "7.07",
        "(2,3)": "[2,3]",
        "9\\pi": "9",
        "0.1": "0.01",
        "\\frac{1}{6}": "1/7",
        "(4, 2)": "(2,4)",
        "6": "x=7",
        "720": "360",
    }
    for truth, guess in right.items():
        assert task.reward(answer(guess), by_answer[truth]) == 1.0, (truth, guess)
    for truth, guess in wrong.items():
        assert task.reward(answer(guess), by_answer[truth]) == 0.0, (truth, guess)


def test_parquet_and_bad_files(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    from nanoseek.tasks.files import asset

    rows = [json.loads(line) for line in asset("math_sample.jsonl").read_text(encoding="utf-8").splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "math.parquet")
    from_parquet = tasks.get("math", path=tmp_path / "math.parquet", test_share=0.0).sample(None)
    assert [p.answer for p in from_parquet] == [p.answer for p in tasks.get("math", test_share=0.0).sample(None)]

    with pytest.raises(NanoseekError, match="no such file"):
        tasks.get("gsm8k", path=tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "solution": "s"}) + "\n")
    with pytest.raises(NanoseekError, match="lacks string field answer"):
        tasks.get("gsm8k", path=tmp_path / "bad.jsonl")
    (tmp_path / "nohash.jsonl").write_text(json.dumps({"question": "q", "answer": "42"}) + "\n")
    with pytest.raises(NanoseekError, match="####"):
        tasks.get("gsm8k", path=tmp_path / "nohash.jsonl")
    with pytest.raises(NanoseekError, match=".jsonl or .parquet"):
        tasks.get("math", path=tmp_path / "data.csv")


def test_chain_problems_answers_and_worked_solutions():
    import re

    task = tasks.get("chain", signed=True)
    problems = task.sample(200, "train", seed=1)
    assert {p.difficulty for p in problems} == {2, 3, 4, 5, 6, 7}  # the default: 2 to 7 values
    assert {p.difficulty for p in task.sample(100, "test", seed=1)} == {2, 3, 4, 5, 6, 7}
    assert next(p for p in problems if p.difficulty == 2).prompt.endswith(". a+b")
    assert any(v.startswith("-") for p in problems for v in re.findall(r"=(-?\d)", p.prompt))
    for p in problems[:50]:
        bindings, expression = p.prompt.split(". ")
        values = {name: int(v) for name, v in (item.split("=") for item in bindings.split(","))}
        assert expression == "+".join(values) and int(p.answer) == sum(values.values())
        first, *steps = p.solution.split(",")
        assert first == f"a={values['a']}" and len(steps) == p.difficulty - 1
        total = values["a"]
        for i, (step, name) in enumerate(zip(steps, list(values)[1:])):
            recall, arithmetic = step.split(". " if i == len(steps) - 1 else ":")  # the last ends as the prompt's
            assert recall == f"{name}={values[name]}"  # the binding, token for token
            numbers, result = arithmetic.split("=")
            assert numbers == f"{total}{values[name]:+d}"  # 6-2 adds d=-2
            total += values[name]
            assert int(result) == total
        assert steps[-1].endswith(f"={p.answer}")
        assert task.reward(answer(p.answer), p) == 1.0 and task.reward(answer(int(p.answer) + 1), p) == 0.0
        assert [str(s) for s in task.steps(p)] == [re.split(r":|\. ", step)[1] for step in steps]
    assert re.fullmatch(r"a=-?\d,b=-?\d(:|\. )-?\d[+-]\d=-?\d+", ",".join(problems[0].solution.split(",")[:2]))


def test_chain_splits_options_and_bad_prompts():
    task = tasks.get("chain")
    train = {p.prompt for p in task.sample(300, "train", seed=0)}
    test = {p.prompt for p in task.sample(100, "test", seed=0)}
    assert not train & test
    with pytest.raises(NanoseekError, match="min_values"):
        tasks.get("chain", min_values=1)
    with pytest.raises(NanoseekError, match="cannot read"):
        task.steps(Problem(prompt="a=1,b=2. a+c", answer="2"))
    # the default: positive values under + and -, the worked steps follow the operators
    p = Problem(prompt="a=3,b=1,c=4,d=2,e=5. a+b-c+d-e", answer="-3")
    assert task.worked(p) == "a=3,b=1:3+1=4,c=4:4-4=0,d=2:0+2=2,e=5. 2-5=-3"
    # the last recall ends with the prompt's ". ": a 2-value chain echoes its prompt, then adds
    signed = tasks.get("chain", signed=True)
    assert signed.worked(Problem(prompt="a=3,b=-1. a+b", answer="2")) == "a=3,b=-1. 3-1=2"
    assert signed.worked(Problem(prompt="a=-2,b=4,c=-5. a+b+c", answer="-3")) == "a=-2,b=4:-2+4=2,c=-5. 2-5=-3"
    assert all("=-" not in q.prompt for q in task.sample(50, "train", seed=2))
    with pytest.raises(NanoseekError, match="cannot read"):
        task.steps(Problem(prompt="1+2", answer="3"))


def test_sample_with_repeats_keeps_each_difficulty_share():
    """chain has about 90 train problems of 2 values (of 100): distinct samples run out of them, repeats do not."""
    from collections import Counter

    task = tasks.get("chain", signed=True)
    distinct = task.sample(6000, "train", seed=0)
    assert len({p.prompt for p in distinct}) == 6000
    assert Counter(p.difficulty for p in distinct)[2] <= 100  # the few short problems are used up
    drawn = Counter(p.difficulty for p in task.sample(6000, "train", seed=0, distinct=False))
    assert all(850 <= drawn[d] <= 1150 for d in range(2, 8)), drawn  # 1,000 each expected
    test = {p.prompt for p in task.sample(500, "test", seed=0, distinct=False)}
    assert not test & {p.prompt for p in task.sample(6000, "train", seed=0, distinct=False)}
    gsm8k = tasks.get("gsm8k")
    pool = gsm8k.sample(None, "train")
    again = gsm8k.sample(3 * len(pool), "train", seed=1, distinct=False)
    assert len(again) == 3 * len(pool) and {p.prompt for p in again} <= {p.prompt for p in pool}


@pytest.mark.parametrize("glob", [False, True])
def test_a_task_file_that_is_not_utf8_names_the_file_and_line(tmp_path, glob):
    """pyarrow reads the bytes as they are; the rows used to fail later as a bare UnicodeDecodeError."""
    good = json.dumps({"question": "What is 1+1?", "answer": "2\n#### 2"}) + "\n"
    (tmp_path / "a.jsonl").write_text(good * 3)
    (tmp_path / "b.jsonl").write_bytes(good.encode() * 2 + good.encode().replace(b"1+1", b"1\xff+1"))
    path = str(tmp_path / "*.jsonl") if glob else tmp_path / "b.jsonl"
    with pytest.raises(NanoseekError) as e:
        tasks.get("gsm8k", path=path)
    assert str(e.value) == f"{tmp_path / 'b.jsonl'}:3: not UTF-8 text (byte 0xff at column 24)"


def test_chain_default_problems_are_pinned():
    """The default chain (one language, no lookups) draws exactly what it drew before languages
    and lookups existed: the demo's corpus and held-out problems depend on that stream."""
    import hashlib

    task = tasks.get("chain")
    assert [p.prompt for p in task.sample(3, "train", seed=0)] == [
        "a=4,b=2,c=1,d=2,e=2. a+b+c-d+e",
        "a=3,b=3,c=2,d=1. a-b+c+d",
        "a=4,b=1,c=2,d=5,e=1,f=1. a+b-c+d-e+f",
    ]
    signed = tasks.get("chain", signed=True)
    assert [(p.prompt, p.answer) for p in signed.sample(3, "test", seed=1)] == [
        ("a=2,b=5,c=-5,d=1. a+b+c+d", "3"),
        ("a=-4,b=3,c=-4,d=-2. a+b+c+d", "-7"),
        ("a=-1,b=4. a+b", "3"),
    ]
    assert signed.sample(1, "train", seed=2)[0].solution == "a=1,b=-1:1-1=0,c=2:0+2=2,d=-4. 2-4=-2"
    for t, digest in ((task, "3807ac097934f0c7"), (signed, "0a50661745b0a73c")):
        ps = t.sample(400, "train", seed=0) + t.sample(100, "test", seed=3, distinct=False)
        text = "\n".join(p.prompt + "|" + p.answer + "|" + p.solution for p in ps)
        assert hashlib.sha256(text.encode()).hexdigest()[:16] == digest


def test_chain_languages_twins_share_a_split_and_switch_mid_solution():
    from collections import Counter

    from nanoseek.tasks.chain import LANGUAGE_NAMES

    assert len(LANGUAGE_NAMES["el"]) == 24 and "ς" not in LANGUAGE_NAMES["el"]
    task = tasks.get("chain", signed=True, languages=["en", "el"])
    problems = task.sample(400, "train", seed=0, distinct=False)
    languages = Counter(p.meta["language"] for p in problems)
    assert set(languages) == {"en", "el"} and 150 <= languages["el"] <= 250, languages
    for p in problems[:40]:
        names = LANGUAGE_NAMES[p.meta["language"]][: p.difficulty]
        assert p.prompt.endswith(". " + "+".join(names)) and p.meta["reasoning"] is True
        assert task.language(p) == p.meta["language"] == task.language(Problem(prompt=p.prompt, answer=p.answer))
        assert int(p.answer) == sum(int(item.split("=")[1]) for item in p.prompt.split(". ")[0].split(","))
    # a Greek problem and its Latin twin: the same split, the same key
    greek = Problem(prompt="α=3,β=-1,γ=4. α+β+γ", answer="6")
    latin = Problem(prompt="a=3,b=-1,c=4. a+b+c", answer="6")
    assert task.key(greek) == task.key(latin) == latin.prompt
    test = {task.key(p) for p in task.sample(200, "test", seed=0)}
    assert test and not test & {task.key(p) for p in problems}
    # the worked solution, and one that switches language at value j
    assert task.worked(greek) == "α=3,β=-1:3-1=2,γ=4. 2+4=6"
    assert task.worked(greek, switch_at=1) == "α=3,b=-1:3-1=2,c=4. 2+4=6"
    assert task.worked(greek, switch_at=2) == "α=3,β=-1:3-1=2,c=4. 2+4=6"
    assert task.worked(latin, switch_at=1) == "a=3,β=-1:3-1=2,γ=4. 2+4=6"
    assert task.steps(greek) == task.steps(latin)
    with pytest.raises(NanoseekError, match=r"switch_at 3 must be in \[1, 2\]"):
        task.worked(greek, switch_at=3)
    with pytest.raises(NanoseekError, match="switch_at 0"):
        task.worked(greek, switch_at=0)
    with pytest.raises(NanoseekError, match="switch_at needs two languages"):
        tasks.get("chain").worked(latin, switch_at=1)
    assert task.language(Problem(prompt="a=1,b=2. a+b", answer="3")) == "en"
    with pytest.raises(NanoseekError, match="no one language"):
        task.language(Problem(prompt="a=1,β=2. a+β", answer="3"))
    only_greek = tasks.get("chain", languages=("el",))
    assert all(p.prompt.startswith("α=") and p.meta["language"] == "el" for p in only_greek.sample(20, "train"))


def test_chain_lookups_ask_for_one_value_without_reasoning():
    task = tasks.get("chain", signed=True, lookup=0.3)
    problems = task.sample(300, "train", seed=0, distinct=False)
    lookups = [p for p in problems if not p.meta["reasoning"]]
    assert 60 <= len(lookups) <= 120, len(lookups)
    for p in lookups[:30]:
        bindings, name = p.prompt.split(". ")
        values = dict(item.split("=") for item in bindings.split(","))
        assert name in values and p.answer == values[name] and p.difficulty == 1
        assert p.solution == f"{name}={p.answer}" == task.worked(p)  # the recall alone
        assert task.steps(p) == [] and task.reward(answer(p.answer), p) == 1.0
    assert all(p.meta["reasoning"] and p.difficulty >= 2 for p in problems if p not in lookups)
    p = Problem(prompt="a=3,b=-1,c=4. c", answer="4")
    assert task.worked(p) == "c=4" and task.steps(p) == []
    with pytest.raises(NanoseekError, match="switch_at"):
        tasks.get("chain", languages=["en", "el"]).worked(p, switch_at=1)  # one value: nothing to switch
    assert all(p.meta["reasoning"] for p in tasks.get("chain", lookup=0.0).sample(50, "train"))
    assert not any(p.meta["reasoning"] for p in tasks.get("chain", lookup=1).sample(20, "train"))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"languages": ["en", "fr"]}, "unknown language 'fr' in languages"),
        ({"languages": ["en", "en"]}, "languages \\['en', 'en'\\] name a language twice"),
        ({"languages": []}, "languages must be a non-empty list"),
        ({"languages": "en"}, "languages must be a non-empty list"),
        ({"lookup": 1.5}, "lookup share 1.5 must be in \\[0, 1\\]"),
        ({"lookup": -0.1}, "lookup share -0.1"),
        ({"languages": ["el"], "max_values": 25}, "max_values <= 24"),
        ({"languages": ["en", "el"], "max_values": 26}, "max_values <= 24"),
    ],
)
def test_chain_bad_language_and_lookup_options(options, message):
    with pytest.raises(NanoseekError, match=message) as e:
        tasks.get("chain", **options)
    assert "\n" not in str(e.value)
    tasks.get("chain", max_values=26)  # Latin alone has 26 names


def test_chain_recall_states_every_binding_of_a_lookup():
    import random

    task = tasks.get("chain", lookup=1.0)
    drill = task.recall(Problem(prompt="a=3,b=-1,c=4. c", answer="4"), random.Random(0))
    stated, again = drill.split(". ")
    assert stated == "a=3,b=-1,c=4" and sorted(again.split(",")) == ["a=3", "b=-1", "c=4"]
    greek = task.recall(Problem(prompt="α=3,β=-1. α+β", answer="2"), random.Random(0))
    assert greek.split(". ")[0] == "α=3,β=-1" and sorted(greek.split(". ")[1].split(",")) == ["α=3", "β=-1"]
