"""Rewards: known right and wrong answers, the output shapes the model writes, and fuzzing for
floats-within-a-time-limit on any string."""

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoseek import rewards, tasks
from nanoseek.data.corpus import corpus
from nanoseek.errors import NanoseekError
from nanoseek.rewards import (
    MAX_ANSWER_CHARS,
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
    problem_language,
    readability_reward,
    safe_for_sympy,
)
from nanoseek.tasks import Problem

TIME_LIMIT = 5.0  # wall-clock seconds for any one reward call (a check may spend MATH_VERIFY_SECONDS of CPU)


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
        {
            "accuracy": 1.0,
            "format": 1.0,
            "language": 1.0,
            "readability": 0.0,  # not weighted: not measured
            "overlong": -0.5,
            "total": 1.0 + 0.5 + 0.1 - 0.5,
        }
    )
    assert combined_reward("<answer>8</answer>", p, {"accuracy": 1.0, "format": 1.0})["total"] == 0.0
    with pytest.raises(NanoseekError, match="unknown acuracy"):
        combined_reward(good, p, {"acuracy": 1.0})
    with pytest.raises(NanoseekError, match="num_tokens"):
        combined_reward(good, p, {"overlong": 1.0})


END = "<｜end▁of▁sentence｜>"
CHAT = "a=3,b=-1. 3-1=2\n</think>\n\na+b=2. \\boxed{2}" + END  # what the chat template's model writes


@pytest.mark.parametrize(
    "text, opened, expected, score",
    [
        # the chat format: the prompt opened <think>
        (CHAT, True, True, 1.0),
        ("a=3,b=-1. 3-1=2\n</think>\n\n\\boxed{2}" + END, True, True, 0.0),  # no summary
        ("a=3,b=-1. 3-1=2\n</think>\n\nSo a+b=2." + END, True, True, 0.0),  # no final answer
        ("a=3,b=-1. 3-1=2 a+b=2. \\boxed{2}" + END, True, True, 0.0),  # never closed
        ("\n</think>\n\na+b=2. \\boxed{2}" + END, True, True, 0.0),  # no reasoning
        ("<think>3-1=2</think>\n\na+b=2. \\boxed{2}", True, True, 0.0),  # a second <think>
        ("3-1=2</think> a+b=2 </think> \\boxed{2}", True, True, 0.0),  # a second </think>
        ("3-1=2\n</think>\n\na+b=. \\boxed{}", True, True, 0.0),  # an empty answer
        ("3-1=2\n</think>\n\n\\boxed{1}, so 2. \\boxed{2}", True, True, 1.0),  # the last box is the answer
        ("\n</think>\n\n\\boxed{4}" + END, True, False, 1.0),  # no thinking asked, none done
        ("c=4\n</think>\n\n\\boxed{4}" + END, True, False, 0.0),  # thinking where none was asked
        # R1-Zero's format: the output opens <think>
        (" <think>a=3,b=-1. 3-1=2</think> <answer>2</answer>", False, True, 0.0),  # terse: no summary
        (" <think>a=3,b=-1. 3-1=2</think> a+b=2. <answer>2</answer>", False, True, 1.0),
        (" <think>a=3,b=-1. 3-1=2</think> <answer>a+b=2. \\boxed{2}</answer>", False, True, 1.0),
        (" <think>a=3,b=-1. 3-1=2</think> <answer> . \\boxed{2}</answer>", False, True, 0.0),
        (" <think>a=3,b=-1. 3-1=2 <answer>2</answer>", False, True, 0.0),
        (" <think></think> <answer>4</answer>", False, False, 1.0),
        (" <think>c=4</think> <answer>4</answer>", False, False, 0.0),
        (" <answer>4</answer>", False, False, 0.0),  # no <think> at all
        (" <think></think> <answer>4</answer>", False, True, 0.0),
        (None, False, True, 0.0),
    ],
)
def test_readability_reward(text, opened, expected, score):
    assert readability_reward(text, think_opened=opened, reasoning_expected=expected) == score


def test_language_of_a_problem_and_of_mixed_names():
    greek = Problem(prompt="α=3,β=-1,γ=4. α+β+γ", answer="6", task="chain", meta={"language": "el"})
    assert problem_language(greek) == "el"
    assert problem_language(Problem(prompt="3+4", answer="7")) == "en" and problem_language("7") == "en"
    switched = " <think>α=3,b=-1:3-1=2,c=4. 2+4=6</think> <answer>6</answer>"  # switched at value 1
    assert language_reward(switched, problem_language(greek)) == pytest.approx(1 / 3)
    assert language_reward(switched, "en") == pytest.approx(2 / 3)
    assert language_reward(" <think>α=3,β=-1:3-1=2,γ=4. 2+4=6</think>", "el") == 1.0
    assert language_reward("α=3,β=-1:3-1=2,γ=4. 2+4=6\n</think>\n\nα+β+γ=6. \\boxed{6}", "el", True) == 1.0
    # combined: the problem's own language wins over the `language` fallback
    weights = {"accuracy": 1.0, "language": 1.0, "readability": 1.0}
    scores = combined_reward(switched, greek, weights, language="en")
    assert scores["language"] == pytest.approx(1 / 3) and scores["readability"] == 0.0
    assert scores["total"] == pytest.approx(1 + 1 / 3)
    latin = Problem(prompt="a=3,b=-1,c=4. a+b+c", answer="6")  # no language: the fallback
    assert combined_reward(switched, latin, weights, language="el")["language"] == pytest.approx(1 / 3)
    assert combined_reward(switched, latin, weights)["language"] == pytest.approx(2 / 3)
    lookup = Problem(prompt="a=3,b=-1,c=4. c", answer="4", meta={"language": "en", "reasoning": False})
    direct = " <think></think> <answer>4</answer>"
    assert combined_reward(direct, lookup, {"readability": 1.0})["readability"] == 1.0
    assert combined_reward(direct, latin, {"readability": 1.0})["readability"] == 0.0  # reasoning expected
    chat = combined_reward(CHAT, "2", {"format": 1.0, "readability": 1.0}, think_opened=True, answer_tags=False)
    assert chat["format"] == 1.0 and chat["readability"] == 1.0 and chat["total"] == 2.0
    with pytest.raises(NanoseekError, match="readabilty"):
        combined_reward(CHAT, "2", {"readabilty": 1.0})


def test_rewards_on_the_corpus_shapes():
    """The shapes the base model learns from the corpus score as intended (most
    failed R1 reproductions had rewards stricter than what their model wrote)."""
    for name in ("arith", "countdown"):
        task = tasks.get(name)
        by_prompt = {p.prompt: p for p in task.sample(60, seed=1)}  # the corpus's problems
        for kind, text in corpus(task, 60, seed=1, mix={"worked": 1 / 3, "direct": 1 / 3, "terse": 1 / 3}):
            prompt, completion = text.split("\nUser: ", 1)[1].split("\nAssistant:", 1)
            problem = by_prompt[prompt]
            assert task.reward(completion, problem) == 1.0, (kind, completion)
            assert format_reward(completion) == 1.0, completion


# Right answers of each kind that reaches math-verify (plain numbers never do), graded in a fresh
# process whose math-verify worker is started first, on a quiet machine.
RIGHT_ANSWERS = [
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("x^2+1", "1+x^2"),
    ("\\frac{\\pi}{3}", "\\pi/3"),
    ("(1,2]", "(1,2]"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
]
GRADE = """
import json, sys
from nanoseek import rewards
from nanoseek.rewards import answer_reward
assert answer_reward("<answer>x^2</answer>", "x^2") == 1.0  # starts the worker
print(json.dumps(rewards._POOL.pids()), flush=True)
answers = json.loads(sys.stdin.readline())
print(json.dumps([answer_reward(f"<answer>{a}</answer>", t) for a, t in answers]), flush=True)
"""


def signal_all(pids, signum):
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # the worker ends with the grader
            os.kill(pid, signum)


def test_right_answers_stay_right_on_a_busy_machine():
    """Every core busy with a spinning process, and the grader and its math-verify worker let run
    a tenth of the time at most (stopped 0.27 s, running 0.03 s), so that a check takes ten times
    its CPU time and more in wall-clock time: the scores are the same, because the time limit
    counts work, not waiting. (With math-verify's wall-clock alarm of 1 s, most of them scored 0.)"""
    grader = subprocess.Popen(
        [sys.executable, "-c", GRADE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    busy = []
    try:
        workers = json.loads(grader.stdout.readline())  # started on a quiet machine
        assert len(workers) == 1
        stopped = [grader.pid, *workers]
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count())]
        grader.stdin.write(json.dumps(RIGHT_ANSWERS) + "\n")
        grader.stdin.flush()
        deadline = time.monotonic() + 300
        while grader.poll() is None and time.monotonic() < deadline:
            signal_all(stopped, signal.SIGSTOP)
            time.sleep(0.27)
            signal_all(stopped, signal.SIGCONT)
            time.sleep(0.03)
        out = grader.stdout.read()
    finally:
        grader.kill()
        for proc in busy:
            proc.kill()
            proc.wait()
    assert json.loads(out) == [1.0] * len(RIGHT_ANSWERS)


@pytest.fixture
def worker_ready():
    """The pool has a worker started (a first start takes a second or more, counted by no test)."""
    assert rewards.math_equal("x^2", "x^2")
    return rewards._POOL


@pytest.fixture
def unguarded(monkeypatch, worker_ready):
    """Answers reach math-verify without the grammar's bound on the work, each check limited to
    0.5 s of CPU time: what the worker's own limits do when the guard misses something."""
    monkeypatch.setattr(rewards, "safe_for_sympy", lambda s: True)
    monkeypatch.setattr(rewards, "MATH_VERIFY_SECONDS", 0.5)


def in_thread(fn, *args):
    """fn(*args) on another thread: its result and the wall-clock seconds it took."""
    results = []
    start = time.perf_counter()
    thread = threading.Thread(target=lambda: results.append(fn(*args)))
    thread.start()
    thread.join(timeout=60)
    assert results, "the call did not return within 60 s"
    return results[0], time.perf_counter() - start


def test_the_timer_stops_a_runaway_check_off_the_main_thread(unguarded):
    """(x+y+z)^{99} against pi: 17 s of sympy when nothing stops it (over 40 s seen on a busy
    machine). From a thread, the worker's CPU-time timer ends it at 0.5 s; the worker stays."""
    pids = rewards._POOL.pids()
    score, seconds = in_thread(answer_reward, "<answer>(x+y+z)^{99}</answer>", "\\pi")
    assert score == 0.0 and seconds < 3.0
    assert rewards._POOL.pids() == pids
    assert answer_reward("<answer>x^2+1</answer>", "1+x^2") == 1.0


def test_a_worker_that_ignores_the_timer_is_killed_and_replaced(unguarded, monkeypatch):
    """Work the timer cannot stop (C code, or here a timer that does nothing): the kernel's CPU
    limit kills the worker one or two CPU seconds later, the answer scores 0 and the next check
    gets a new worker."""
    deaf = rewards._WORKER.replace('raise TimeoutException("over the CPU-time limit")', "pass")
    assert deaf != rewards._WORKER
    monkeypatch.setattr(rewards, "_WORKER", deaf)
    pool = rewards._Pool()
    monkeypatch.setattr(rewards, "_POOL", pool)
    try:
        assert rewards.math_equal("x^2", "x^2")
        (first,) = pool.pids()
        score, seconds = in_thread(answer_reward, "<answer>(x+y+z)^{99}</answer>", "\\pi")
        assert score == 0.0 and seconds < 8.0
        assert pool.pids() == [] and pool.count == 0
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)  # reaped
        assert answer_reward("<answer>x^2+1</answer>", "1+x^2") == 1.0
        assert len(pool.pids()) == 1 and pool.pids() != [first]
    finally:
        pool.close()


PATHOLOGICAL = [
    "(x+y+z)^{99}",
    "(x+1)^{999}",
    "\\frac{x^{999}-1}{x-1}",
    "((9^{999})^{999})^{999}",
    "9^{9^{9}}",
    "2^2^2^2^2^2",
    "\\sin(999^{999})",
    "(9!)!",
]


@pytest.mark.parametrize("answer", PATHOLOGICAL)
def test_pathological_answers_from_a_thread(answer, worker_ready):
    score, seconds = in_thread(answer_reward, f"<answer>{answer}</answer>", "\\pi")
    assert score == 0.0 and seconds < 1.0


def test_rewards_from_a_thread_pool(worker_ready):
    """Right answers, wrong ones and pathological ones at once from eight threads, sharing the
    workers (at most MAX_WORKERS of them): each gets its own verdict, within the bound."""
    cases = [(f"<answer>{a}</answer>", t, 1.0) for a, t in RIGHT_ANSWERS]
    cases += [(f"<answer>{a}</answer>", "\\pi", 0.0) for a in PATHOLOGICAL]
    cases += [("<answer>\\sqrt{3}</answer>", "\\sqrt{2}", 0.0), ("<answer>x^3</answer>", "x^2", 0.0)]

    def grade(case):
        start = time.perf_counter()
        return answer_reward(case[0], case[1]), time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(grade, cases * 2))
    assert [score for score, _ in results] == [expected for _, _, expected in cases] * 2
    assert max(seconds for _, seconds in results) < 5.0
    assert 1 <= len(rewards._POOL.pids()) <= rewards.MAX_WORKERS


def test_rewards_work_off_the_main_thread(worker_ready):
    assert in_thread(answer_reward, "<answer>\\frac{2}{4}</answer>", "\\frac{1}{2}")[0] == 1.0
    assert in_thread(answer_reward, "<answer>\\frac{\\sqrt{2}}{2}</answer>", "1/\\sqrt{2}")[0] == 1.0
    assert in_thread(answer_reward, "<answer>9^{9^{9}}</answer>", "\\pi")[0] == 0.0


def test_a_forked_child_gets_its_own_worker(worker_ready):
    """The parent's workers answer on the parent's pipes: a forked child starts its own."""
    parent = rewards._POOL.pids()
    pid = os.fork()
    if pid == 0:
        ok = rewards._POOL.pids() == [] and rewards.math_equal("x^2+1", "1+x^2") and rewards._POOL.pids() != parent
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert rewards._POOL.pids() == parent and rewards.math_equal("x^2+1", "1+x^2")


# Model text that would run code, or make sympy run for ever, if anything evaluated it.
HOSTILE = [
    "__import__('os').system('touch {flag}')",
    "'__imp'+'ort__'",
    "('_'+'_imp'+'ort_'+'_')('os').system('touch {flag}')",
    "getattr(__builtins__, 'ev'+'al')('1')",
    "lambda: open('{flag}', 'w')",
    "(lambda: 0)()",
    "x.__class__.__mro__",
    "().__class__.__bases__[0].__subclasses__()",
    "x.func",
    "Symbol('x')",
    "9**9**9**9",
    "9^{9^{9^{9}}}",
    "(" * 100_000 + "1" + ")" * 100_000,
    "(" * 21 + "1" + ")" * 21,
    "\\frac{" * 15 + "1" + "}{2}" * 15,
    "x^" * 40 + "2",
    "1+" * 200_000 + "1",
    "x" * 300,
    "\\binom{10^{30}}{10^{15}}",
    "\\operatorname{eval}(x)",
    "\\text{__import__}",
    "\\\\x41",
]


@pytest.mark.parametrize("answer", HOSTILE)
def test_hostile_answers_score_zero_fast_and_run_nothing(answer, tmp_path, worker_ready):
    flag = tmp_path / "ran"
    answer = answer.replace("{flag}", str(flag))
    start = time.perf_counter()
    assert not safe_for_sympy(answer)
    for truth in ("5", "\\pi", "x"):
        assert answer_reward(f"<answer>{answer}</answer>", truth) == 0.0
    assert time.perf_counter() - start < 1.0
    # and straight to the worker, past the guard: math-verify's LaTeX parser reads it as text, if at all
    if len(answer) <= MAX_ANSWER_CHARS:
        assert rewards._POOL.check(answer, "0", 0.5) is False
    assert not flag.exists()


def test_math_verify_sees_only_latex():
    """The worker parses with math-verify's LaTeX parser alone: its plain-expression parser is
    sympy's parse_expr, which evaluates Python."""
    assert "LATEX = [LatexExtractionConfig()]" in rewards._WORKER
    assert "ExprExtractionConfig()]" not in rewards._WORKER.split("LATEX =")[1]
    assert not answer_reward("<answer>x**2</answer>", "x^2")  # Python syntax is not LaTeX


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
        readability_reward(text),
        readability_reward(text, True, False),
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
    for s in [
        "9**9**9",
        "9^{9^9}",
        "2^{99999}",
        "(2^{999})^{999}",
        "2^{9 \\cdot 9^{9}}",
        "12345!",
        "(9!)!",
        "(x+1)^{999}",
        "(x+y+z)^{99}",
        "x^{999}",
        "\\sin(999^{999})",
        "e^{10^{9}}",
        "\\sqrt[10^{9}]{2}",
        "__class__",
        "a.b",
        "x'",
        "\\sum_{n=1}^{9} n",
        "\\int_0^1 x dx",
        "\\lim_{x} x",
        "(" * 21 + "1" + ")" * 21,
    ]:
        assert not safe_for_sympy(s), s
    for s in [
        "x^2+1",
        "2^{10}",
        "\\frac{\\sqrt{3}}{2}",
        "(1,2]",
        "5!",
        "e^{i\\pi}",
        "9\\pi",
        "10^{-3}",
        "x^{2n-1}",
        "999^{999}",
        "(x+1)^{20}",
        "x^{100}",
        "2^{2^{10}}",
        "\\left[0, \\infty\\right)",
        "\\{1, 2\\}",
        "x \\le 3",
        "3 \\pm \\sqrt{5}",
        "\\log_2 8",
        "\\sin^2 x + \\cos^2 x",
        "30^\\circ",
        "50\\%",
        "|x-1|",
        "a_{n+1}",
        "\\sqrt[3]{2}",
        "\\text{(A)}",
        "18 \\text{ dollars}",
        "\\mathbb{R}",
        "(-\\infty, 0) \\cup (1, \\infty)",
        "2 \\times 10^{5}",
        "f(x) = 2x+1",
        "\\dfrac{-b \\pm \\sqrt{b^2-4ac}}{2a}",
        "\\theta",
        "\\emptyset",
    ]:
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


def test_language_term_does_not_punish_a_question_answered_without_thinking():
    from nanoseek import tasks

    lookup = tasks.get("chain", languages=["en", "el"], lookup=1.0).sample(1, "train", 0)[0]
    assert lookup.meta["reasoning"] is False
    direct = "\n</think>\n\n\\boxed{" + lookup.answer + "}"
    scores = combined_reward(direct, lookup, {"accuracy": 1.0, "language": 0.2}, think_opened=True)
    assert scores["language"] == 1.0 and scores["total"] == pytest.approx(1.2)
    # a reasoning problem with no reasoning still scores 0 on language
    problem = tasks.get("chain", languages=["en", "el"]).sample(1, "train", 0)[0]
    empty = "\n</think>\n\n\\boxed{" + problem.answer + "}"
    assert combined_reward(empty, problem, {"language": 1.0}, think_opened=True)["language"] == 0.0
