"""Rewards: known right and wrong answers, the output shapes the model writes, and fuzzing for
floats-within-a-time-limit on any string."""

import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoseek import tasks
from nanoseek.data.corpus import corpus
from nanoseek.errors import NanoseekError
from nanoseek.rewards import (
    accuracy_reward,
    answer_reward,
    combined_reward,
    countdown_reward,
    extract_answer,
    format_reward,
    language_reward,
    last_boxed,
    overlong_penalty,
    plain_number,
    safe_for_sympy,
)
from nanoseek.tasks import Problem

TIME_LIMIT = 5.0  # wall-clock seconds for any one reward call (math-verify may spend MATH_VERIFY_SECONDS of CPU)


@pytest.mark.parametrize(
    "text, expected",
    [
        (" <think>x</think> <answer>42</answer>", "42"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("<think>x</think> <answer>7", "7"),  # stopped at the "</answer>" stop string
        ("<think><answer>9</answer></think> no answer after the reasoning", None),
        ("so \\boxed{\\frac{1}{2}} and finally \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}"),
        ("\\boxed{a{b}c}", "a{b}c"),
        ("\\boxed 5 apples", "5"),
        ("<answer>the value is \\boxed{12}</answer>", "12"),
        ("\\boxed{unclosed", None),
        ("plain text 42", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_last_boxed_fbox():
    assert last_boxed("\\fbox{3} \\boxed{4}") == "4" and last_boxed("\\boxed{4} \\fbox{3}") == "3"


@pytest.mark.parametrize(
    "text, value",
    [
        ("42", 42),
        ("-3", -3),
        (" 1,000 ", 1000),
        ("0.5", 0.5),
        ("3/4", 0.75),
        ("\\frac{3}{4}", 0.75),
        ("-\\frac{1}{2}", -0.5),
        ("$5$", 5),
        ("\\boxed{5}", 5),
        ("\\text{18}", 18),
        ("18 dollars", 18),
        ("\\$18", 18),
        ("50%", 50),
        ("5.", 5),
        ("x", None),
        ("3+2", None),
        ("1e5", None),
        ("2x", None),
        ("1/0", None),
    ],
)
def test_plain_number(text, value):
    got = plain_number(text)
    assert (got is None) if value is None else (got == value)


RIGHT = [
    ("5", "5"),
    ("5.0", "5"),
    ("-7", "-7"),
    ("1,234", "1234"),
    ("1/2", "0.5"),
    ("\\frac{1}{2}", "1/2"),
    ("\\dfrac{2}{4}", "\\frac{1}{2}"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("\\frac{\\pi}{2}", "\\pi/2"),
    ("(1, 2]", "(1,2]"),
    ("x^2+1", "1+x^2"),
    ("0.25", "\\frac{1}{4}"),
    ("\\frac{10}{2}", "5"),
]
WRONG = [
    ("6", "5"),
    ("5.0001", "5"),
    ("2+3", "5"),
    ("5+0", "5"),
    ("0.33", "1/3"),
    ("\\sqrt{2}", "2"),
    ("(1,2)", "(1,2]"),
    ("x^2", "x^3"),
    ("", "5"),
    ("five", "5"),
    ("3.14", "\\pi"),
]


@pytest.mark.parametrize("guess, truth", RIGHT)
def test_answer_reward_right(guess, truth):
    assert answer_reward(f"<think>r</think> <answer>{guess}</answer>", truth) == 1.0


@pytest.mark.parametrize("guess, truth", WRONG)
def test_answer_reward_wrong(guess, truth):
    assert answer_reward(f"<think>r</think> <answer>{guess}</answer>", truth) == 0.0


def test_accuracy_reward_dispatch():
    cd = Problem(prompt="", answer="3*4", task="countdown", numbers=(3, 4), target=12)
    assert accuracy_reward("<answer>4*3</answer>", cd) == 1.0
    assert accuracy_reward("<answer>12</answer>", cd) == 0.0
    assert accuracy_reward("<answer>12</answer>", Problem(prompt="", answer="12")) == 1.0
    assert accuracy_reward("<answer>12</answer>", "12") == 1.0


@pytest.mark.parametrize(
    "expr, ok",
    [
        ("(1+2)*3", True),
        ("3*(2+1)", True),
        ("((1+2))*3", True),
        ("1+2*3", False),
        ("(1+2)*3*1", False),
        ("(1+2)/(3-3)", False),
        ("9**9**9", False),
        ("(1+2)*3=9", True),
        ("1+2+3", False),
        ("", False),
        ("__import__('os').system('true')", False),
        ("(" * 100 + "1" + ")" * 100, False),
    ],
)
def test_countdown_expressions(expr, ok):
    assert countdown_reward(f"<answer>{expr}</answer>", [1, 2, 3], 9) == float(ok)


def test_countdown_fractions_are_exact():
    assert countdown_reward("<answer>(1+1/3)*3</answer>", [1, 1, 3, 3], 4) == 1.0
    assert countdown_reward("<answer>8/(3-8/3)</answer>", [8, 3, 8, 3], 24) == 1.0


@pytest.mark.parametrize(
    "text, opened, tags, score",
    [
        (" <think>3+4=7</think> <answer>7</answer>", False, True, 1),
        ("<think></think><answer>7</answer><｜end▁of▁sentence｜>", False, True, 1),
        ("<think>\nlong\nreasoning\n</think>\n<answer> 7 </answer>\n", False, True, 1),
        ("<think>r</think> <answer>7", False, True, 1),  # the stop string "</answer>" cut off
        ("<answer>7</answer>", False, True, 0),
        ("<think>r</think> 7", False, True, 0),
        ("<think>r</think> <answer></answer>", False, True, 0),
        ("<think>r</think> <answer>7</answer> and more", False, True, 0),
        ("<think>r</think> <answer>7</answer><answer>8</answer>", False, True, 0),
        ("<think>a<think>b</think></think> <answer>7</answer>", False, True, 0),
        ("<think>never closed <answer>7</answer>", False, True, 0),
        ("r</think> <answer>7</answer>", True, True, 1),
        ("<think>r</think> <answer>7</answer>", True, True, 0),  # a second <think> after the prompt's
        ("<think>r</think> <answer>7</answer></think>", False, True, 0),
        ("reasoning\n</think>\n\nThe answer is 7.", True, False, 1),
        ("reasoning\n</think>\n\n", True, False, 0),
        ("", False, True, 0),
    ],
)
def test_format_reward(text, opened, tags, score):
    assert format_reward(text, think_opened=opened, answer_tags=tags) == score


@pytest.mark.parametrize(
    "text, language, score",
    [
        ("<think>first add three and four</think>", "en", 1.0),
        ("<think>先加 three</think>", "en", 1 / 3),  # 先 and 加 count one word each
        ("<think>先加 three</think>", "zh", 2 / 3),
        ("<think>сначала add</think>", "ru", 0.5),
        ("<think>3+4=7, 7-2=5</think>", "en", 1.0),  # no letters: nothing in another language
        ("<think></think> <answer>5</answer>", "en", 0.0),  # no reasoning at all
        ("no reasoning tags", "en", 0.0),
    ],
)
def test_language_reward(text, language, score):
    assert language_reward(text, language) == pytest.approx(score)


def test_language_reward_bad_language():
    with pytest.raises(NanoseekError, match="language 'klingon'"):
        language_reward("<think>x</think>", "klingon")


@pytest.mark.parametrize("n, penalty", [(0, 0.0), (80, 0.0), (90, -0.5), (100, -1.0), (101, -1.0), (10**9, -1.0)])
def test_overlong_penalty(n, penalty):
    assert overlong_penalty(n, max_tokens=100, buffer=20) == pytest.approx(penalty)
    assert overlong_penalty(n, max_tokens=100, buffer=0) == (-1.0 if n > 100 else 0.0)


def test_combined_reward():
    p = Problem(prompt="3+4", answer="7", task="arith")
    good = " <think>3+4=7</think> <answer>7</answer>"
    scores = combined_reward(
        good,
        p,
        {"accuracy": 1.0, "format": 0.5, "language": 0.1, "overlong": 1.0},
        num_tokens=95,
        max_tokens=100,
        overlong_buffer=10,
    )
    assert scores == pytest.approx(
        {"accuracy": 1.0, "format": 1.0, "language": 1.0, "overlong": -0.5, "total": 1.0 + 0.5 + 0.1 - 0.5}
    )
    assert combined_reward("<answer>8</answer>", p, {"accuracy": 1.0, "format": 1.0})["total"] == 0.0
    with pytest.raises(NanoseekError, match="unknown acuracy"):
        combined_reward(good, p, {"acuracy": 1.0})
    with pytest.raises(NanoseekError, match="num_tokens"):
        combined_reward(good, p, {"overlong": 1.0})


def test_rewards_on_the_corpus_shapes():
    """The shapes the base model learns from the corpus score as intended (most
    failed R1 reproductions had rewards stricter than what their model wrote)."""
    for name in ("arith", "countdown"):
        task = tasks.get(name)
        by_prompt = {p.prompt: p for p in task.sample(60, seed=1)}  # the corpus's problems
        for kind, text in corpus(task, 60, seed=1, mix={"worked": 1, "direct": 1, "terse": 1}):
            prompt, completion = text.split("\nUser: ", 1)[1].split("\nAssistant:", 1)
            problem = by_prompt[prompt]
            assert task.reward(completion, problem) == 1.0, (kind, completion)
            assert format_reward(completion) == 1.0, completion


# Right answers of each kind that reaches math-verify (plain numbers never do), graded in a fresh
# process: its first check also sets math-verify up, the slowest call of all.
RIGHT_ANSWERS = [
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("x^2+1", "1+x^2"),
    ("\\frac{\\pi}{3}", "\\pi/3"),
    ("(1,2]", "(1,2]"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
]
GRADE = """
import json, sys
import math_verify
from nanoseek.rewards import answer_reward
print("ready", flush=True)
answers = json.loads(sys.stdin.readline())
print(json.dumps([answer_reward(f"<answer>{a}</answer>", t) for a, t in answers]), flush=True)
"""


def test_right_answers_stay_right_on_a_busy_machine():
    """Every core busy with a spinning process, and the grader let run a tenth of the time at
    most (stopped 0.27 s, running 0.03 s), so that a check takes ten times its CPU time and
    more in wall-clock time: the scores are the same, because the time limit counts work, not
    waiting. (With math-verify's wall-clock alarm of 1 s, most of them scored 0.)"""
    import json
    import os
    import signal
    import subprocess
    import sys

    grader = subprocess.Popen(
        [sys.executable, "-c", GRADE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    busy = []
    try:
        assert grader.stdout.readline() == "ready\n"  # math-verify imported on a quiet machine
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count())]
        grader.stdin.write(json.dumps(RIGHT_ANSWERS) + "\n")
        grader.stdin.flush()
        deadline = time.monotonic() + 300
        while grader.poll() is None and time.monotonic() < deadline:
            grader.send_signal(signal.SIGSTOP)
            time.sleep(0.27)
            grader.send_signal(signal.SIGCONT)
            time.sleep(0.03)
        out = grader.stdout.read()
    finally:
        grader.kill()
        for proc in busy:
            proc.kill()
            proc.wait()
    assert json.loads(out) == [1.0] * len(RIGHT_ANSWERS)


def test_time_limit_counts_work_not_waiting():
    from math_verify.errors import TimeoutException

    from nanoseek.rewards import _work_limit

    with _work_limit(0.2):
        time.sleep(0.5)  # waiting: no CPU time spent
    start = time.process_time()
    with pytest.raises(TimeoutException), _work_limit(0.2):
        while time.process_time() - start < 10:
            pass
    assert 0.2 <= time.process_time() - start < 1.0


def test_rewards_work_off_the_main_thread():
    """math-verify's alarm only works in the main thread; the rewards must still answer elsewhere."""
    results = []
    thread = threading.Thread(
        target=lambda: results.append(
            (
                answer_reward("<answer>\\frac{2}{4}</answer>", "\\frac{1}{2}"),
                answer_reward("<answer>9^{9^{9}}</answer>", "\\pi"),
            )
        )
    )
    thread.start()
    thread.join(timeout=30)
    assert results == [(1.0, 0.0)]


# ---- adversarial outputs --------------------------------------------------------------------------
ADVERSARIAL = [
    "9**9**9",
    "9^{9^{9}}",
    "10^{10^{10}}",
    "(2^{999})^{999}",
    "2^{99999999}",
    "99999999!",
    "(9!)!",
    "1/0",
    "0/0",
    "\\frac{1}{0}",
    "(" * 5000 + ")" * 5000,
    "{" * 5000,
    "\\sqrt{" * 500,
    "__import__('os').system('true')",
    "lambda: 0",
    "().__class__.__bases__[0]",
    "exec('1')",
    "import os",
    "\\binom{10^{30}}{10^{15}}",
    "\\sum_{n=1}^{\\infty} n",
    "\\int_0^1 x dx",
    "1e999999999",
    "9" * 100_000,
    "x" * 1000,
    "\x00\x01\ud800",
    "<think>" * 1000,
    "</think>" * 1000,
    "\\boxed{" * 1000,
    "}" * 1000,
    "2**2**2**2**2**2",
]
FRAGMENTS = st.sampled_from(
    [
        "<think>",
        "</think>",
        "<answer>",
        "</answer>",
        "\\boxed{",
        "{",
        "}",
        "(",
        ")",
        "^",
        "**",
        "!",
        "/",
        "0",
        "9",
        "99999",
        "\\frac",
        "\\sqrt",
        "$",
        "=",
        " ",
        "\n",
        "x",
        "+",
        "-",
        "*",
        "<｜end▁of▁sentence｜>",
    ]
    + ADVERSARIAL[:20]
)
TEXT = st.one_of(st.text(max_size=300), st.lists(FRAGMENTS, max_size=30).map("".join))


def all_rewards(text):
    cd = Problem(prompt="", answer="1+2", task="countdown", numbers=(1, 2, 9), target=3)
    return [
        answer_reward(text, "5"),
        answer_reward(text, "\\frac{\\pi}{2}"),
        accuracy_reward(text, cd),
        countdown_reward(text, [9, 9, 9], 9),
        format_reward(text),
        format_reward(text, True, False),
        language_reward(text),
        language_reward(text, "zh", True),
        combined_reward(text, Problem(prompt="", answer="5"), {"accuracy": 1, "format": 1, "language": 1})["total"],
    ]


def check_bounded(text):
    start = time.perf_counter()
    scores = all_rewards(text)
    assert time.perf_counter() - start < TIME_LIMIT * len(scores)
    for s in scores[:-1]:
        assert isinstance(s, float) and 0.0 <= s <= 1.0
    assert isinstance(scores[-1], float) and 0.0 <= scores[-1] <= 3.0


@pytest.mark.parametrize("answer", ADVERSARIAL)
def test_adversarial_answers_score_zero(answer):
    start = time.perf_counter()
    for text in (f"<think>r</think> <answer>{answer}</answer>", f"\\boxed{{{answer}}}", answer):
        assert answer_reward(text, "5") == 0.0
        assert answer_reward(text, "\\pi") == 0.0
        assert countdown_reward(text, [9, 9, 9], 9) == 0.0
        check_bounded(text)
    assert time.perf_counter() - start < 3 * TIME_LIMIT


def test_megabytes_of_text():
    for text in [
        "a" * 5_000_000,
        "<think>" + "3+4=7, " * 500_000 + "</think> <answer>5</answer>",
        "<answer>" + "9" * 3_000_000 + "</answer>",
        "\\boxed{" * 1_000_000,
    ]:
        start = time.perf_counter()
        check_bounded(text)
        assert time.perf_counter() - start < TIME_LIMIT


def test_guard_rejects_what_sympy_cannot_be_interrupted_on():
    for s in ["9**9**9", "9^{9^9}", "2^{99999}", "(2^{9*9})", "12345!", "(5!)!", "__class__", "a.b"]:
        assert not safe_for_sympy(s), s
    for s in ["x^2+1", "2^{10}", "\\frac{\\sqrt{3}}{2}", "(1,2]", "5!", "e^{i\\pi}", "9\\pi", "10^{-3}"]:
        assert safe_for_sympy(s), s


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TEXT)
def test_fuzz_any_string_gives_a_bounded_float(text):
    check_bounded(text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FRAGMENTS, max_size=20).map("".join))
def test_fuzz_inside_answer_tags(inner):
    check_bounded(f"<think>r</think> <answer>{inner}</answer>")
    check_bounded(f"<think>r</think> <answer>\\boxed{{{inner}}}</answer>")
