"""Rule-based rewards for GRPO (DeepSeek-R1 section 2.2.2): accuracy, format, language, length.

No neural reward model. Every reward takes any string and returns a float: adversarial
outputs (huge powers, division by zero, deep nesting, code, megabytes of text) score 0, and
nothing is ever `eval`-ed. Guards keep sympy from work a signal cannot interrupt (huge
integer powers and factorials run in C), and a CPU-time limit bounds the rest when called
from the main thread (`_work_limit`: a bound on the work, so a busy machine grades the same).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction

from nanoseek.data.chat import ANSWER, END_ANSWER, END_THINK, THINK, strip_end_tokens
from nanoseek.data.reasoning import parse_reasoning, split_reasoning
from nanoseek.errors import NanoseekError

MAX_ANSWER_CHARS = 300  # longer extracted answers are not answers; they score 0
MAX_GOLD_CHARS = 2000
MAX_SCAN_CHARS = 200_000  # language share is measured on this much reasoning
# CPU seconds that one math-verify check (parse both sides, compare) may spend. A right answer
# takes under 0.2 s once math-verify is warmed up; the guards keep out what would take longer,
# so the limit is a last resort against a runaway, with a tenfold margin.
MATH_VERIFY_SECONDS = 2.0


def _never_raises(fn):
    """Any failure inside a reward is a 0, never an exception in the training loop."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> float:
        try:
            return float(fn(*args, **kwargs))
        except NanoseekError:  # a bad setting, not a bad completion
            raise
        except Exception:
            return 0.0
        except BaseException as e:  # math-verify's TimeoutException derives from BaseException
            if type(e).__name__ == "TimeoutException":
                return 0.0
            raise

    return wrapper


# ---- answer extraction ---------------------------------------------------------------
def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}, or "\\boxed x"), braces matched; None if absent or unclosed."""
    boxed, fbox = text.rfind("\\boxed"), text.rfind("\\fbox")
    start, name = (boxed, "\\boxed") if boxed >= fbox else (fbox, "\\fbox")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0 or text[start + len(name) : i].strip():
        rest = text[start + len(name) :]  # "\boxed 5": the next word
        m = re.match(r"\s+([^\s$]+)", rest)
        return m.group(1) if m else None
    depth = 0
    for j in range(i, min(len(text), i + 10 * MAX_ANSWER_CHARS)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def _last_answer_tag(text: str) -> str | None:
    """Inside of the last <answer>: up to its </answer>, or to the end when the tag was left open
    (a generation stopped at the stop string "</answer>" never shows it)."""
    start = text.rfind(ANSWER)
    if start < 0:
        return None
    body = text[start + len(ANSWER) :]
    end = body.find(END_ANSWER)
    return (body if end < 0 else body[:end]).strip()


def extract_answer(completion: str) -> str | None:
    """The final answer: inside the last <answer> tag, else the last \\boxed{}, searched after
    the reasoning's "</think>" when there is one. None when there is no answer.

    Grading is lenient where the format reward is strict: an answer is found wherever the
    model put it (a prompt that opened <think> leaves no tag to split on), and whether the
    output has R1's shape is the format reward's business (`format_reward`)."""
    if not isinstance(completion, str):
        return None
    text = strip_end_tokens(completion)
    close = text.rfind(END_THINK)
    if close >= 0:
        text = text[close + len(END_THINK) :]
    answer = _last_answer_tag(text)
    if answer is None:
        answer = last_boxed(text)
    elif "\\boxed" in answer or "\\fbox" in answer:
        answer = last_boxed(answer) or answer
    return answer


# ---- numbers: the exact path ---------------------------------------------------------
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRAC = re.compile(r"([+-]?)\\[dt]?frac\{\s*([+-]?\d+)\s*\}\{\s*(\d+)\s*\}")
_SLASH = re.compile(r"([+-]?\d+)\s*/\s*(\d+)")
_WRAPPERS = re.compile(r"^\\(?:text|textbf|mathrm|mathbf|boxed)\{(.*)\}$")


def plain_number(text: str) -> Fraction | None:
    """The value of an answer that is just a number: 42, -3, 1,000, 0.5, 3/4, \\frac{3}{4},
    $5$, \\boxed{5}, "18 dollars". None for anything else."""
    s = text.strip()
    if len(s) > 64:
        return None
    for _ in range(3):
        s = s.strip().strip("$").strip()
        s = s.removeprefix("\\(").removesuffix("\\)").removeprefix("\\[").removesuffix("\\]")
        m = _WRAPPERS.match(s)
        if m:
            s = m.group(1)
    s = s.replace("\\$", "").replace("\\!", "").replace("\\%", "%").strip()
    s = re.sub(r"(?<=\d)(?:\s*%|\s+[A-Za-z][A-Za-z ]{0,20})$", "", s)  # "12 %", "18 dollars"
    s = s.rstrip(".").strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _NUMBER.fullmatch(s):
        return Fraction(s)
    m = _FRAC.fullmatch(s) or _SLASH.fullmatch(s)
    if m is None:
        return None
    sign, num, den = m.groups() if len(m.groups()) == 3 else ("", *m.groups())
    if int(den) == 0:
        return None
    value = Fraction(int(num), int(den))
    return -value if sign == "-" else value


# ---- math-verify, behind guards ------------------------------------------------------
_NOT_MATH = re.compile(r"[^\x20-\x7e°±·×÷π√∞−≤≥≠∪∩]")
_FORBIDDEN = re.compile(
    r"__|lambda|import|exec|eval|open|system|getattr|globals|subprocess|compile|"
    r"binom|choose|\\sum|\\prod|\\int|\\lim|factorial|gamma|summation|product|integral|"
    r"[A-Za-z_)\]]\.[A-Za-z_]",
    re.IGNORECASE,
)
_POWER = re.compile(r"\^|\*\*")


def _exponent_ok(s: str, i: int) -> bool:
    """Is the exponent starting at s[i] a short literal or a symbol, and not itself raised to a power?"""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return True
    if s[i] in "{(":
        j = s.find("}" if s[i] == "{" else ")", i)
        if j < 0 or j - i > 16:
            return False
        body, end = s[i + 1 : j], j + 1
    else:
        m = re.match(r"[+-]?\d+|\\?[A-Za-z]+", s[i:])
        if m is None:
            return False
        body, end = m.group(0), i + m.end()
    if _POWER.search(body) or "!" in body or len(re.findall(r"\d+", body)) > 1 or re.search(r"\d{4,}", body):
        return False
    return not _POWER.match(s[end:].lstrip(" "))


def safe_for_sympy(s: str) -> bool:
    """Whether math-verify may look at an answer: short, math characters only, no code, no
    chained or large powers, no large factorials, limited nesting."""
    if len(s) > MAX_ANSWER_CHARS or _NOT_MATH.search(s) or _FORBIDDEN.search(s):
        return False
    if re.search(r"\d{41,}", s) or re.search(r"(?<!\d)\d{4,}\s*!|[^\d\sA-Za-z]\s*!|!!", s):
        return False
    depth = deepest = 0
    for c in s:
        depth += c in "([{"
        depth -= c in ")]}"
        deepest = max(deepest, depth)
    if deepest > 20:
        return False
    powers = [m.end() for m in _POWER.finditer(s)]
    return len(powers) <= 8 and all(_exponent_ok(s, i) for i in powers)


@functools.lru_cache(maxsize=1)
def _math_verify():
    import math_verify

    # math-verify's own timeouts are off (its wall-clock alarm is what `_work_limit` replaces),
    # and it warns about that.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # The first check in a process builds the LaTeX parser and sympy's caches (about 0.5 s of
    # CPU): done here, before any limit runs, so that it never counts against an answer.
    math_verify.verify(
        math_verify.parse("$\\sqrt{2}/2$", parsing_timeout=None),
        math_verify.parse("$x^2+1$", parsing_timeout=None),
        timeout_seconds=None,
    )
    return math_verify


@contextlib.contextmanager
def _work_limit(seconds: float):
    """Raise math-verify's TimeoutException once the process has spent `seconds` of CPU time
    in the block. math-verify's own limit is a wall-clock alarm, which a busy machine lets run
    out before a right answer is parsed; CPU time is the same however loaded the machine is.
    A signal, so only in the main thread; elsewhere the guards are the only bound."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from math_verify.errors import TimeoutException

    def stop(signum, frame):
        raise TimeoutException(f"math-verify: over {seconds} s of CPU time")

    previous = signal.signal(signal.SIGPROF, stop)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


class _NoGold(Exception):
    """A ground truth that math-verify could not parse (or not in time)."""


@functools.lru_cache(maxsize=4096)
def _parse_gold(truth: str):
    """The parsed ground truth. A failure raises, which lru_cache does not keep, so that a
    parse cut short is tried again next time instead of failing every later answer."""
    gold = _math_verify().parse(f"${truth}$", parsing_timeout=None)
    if not gold:
        raise _NoGold(truth)
    return gold


def math_equal(pred: str, truth: str) -> bool:
    """Mathematical equivalence of an answer and the ground truth. Plain numbers compare
    exactly (an integer truth accepts only a plain number); the rest goes to math-verify."""
    p, t = plain_number(pred), plain_number(truth)
    if p is not None and t is not None:
        return p == t
    if t is not None and t.denominator == 1:
        return False
    if len(truth) > MAX_GOLD_CHARS or not safe_for_sympy(pred) or not re.search(r"[0-9A-Za-z\\π∞√]", pred):
        return False
    mv = _math_verify()
    from math_verify.errors import TimeoutException

    try:
        with _work_limit(MATH_VERIFY_SECONDS):
            gold = _parse_gold(truth)
            guess = mv.parse(f"${pred}$", parsing_timeout=None)
            return bool(guess) and bool(mv.verify(gold, guess, timeout_seconds=None))
    except (_NoGold, TimeoutException):
        return False


@_never_raises
def answer_reward(completion: str, truth: str) -> float:
    """1.0 when the extracted answer equals the ground truth mathematically, else 0.0."""
    answer = extract_answer(completion)
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return 0.0
    return float(math_equal(answer, str(truth)))


# ---- countdown: a small parser, never eval ---------------------------------------------
_CD_TOKEN = re.compile(r"\s*(\d{1,6}|[-+*/()])")


def _countdown_tokens(expr: str) -> list[str] | None:
    tokens, i = [], 0
    expr = expr.rstrip()
    while i < len(expr):
        m = _CD_TOKEN.match(expr, i)
        if m is None:
            return None
        tokens.append(m.group(1))
        i = m.end()
    return tokens


def _countdown_value(tokens: list[str]) -> Fraction | None:
    """Value of + - * / ( ) over integers, by recursive descent; None on a syntax error or a division by zero."""
    pos = 0

    def expr(depth: int) -> Fraction:
        value = term(depth)
        while pos < len(tokens) and tokens[pos] in "+-":
            op = take()
            right = term(depth)
            value = value + right if op == "+" else value - right
        return value

    def term(depth: int) -> Fraction:
        value = factor(depth)
        while pos < len(tokens) and tokens[pos] in "*/":
            op = take()
            right = factor(depth)
            if op == "/" and right == 0:
                raise ZeroDivisionError
            value = value * right if op == "*" else value / right
        return value

    def factor(depth: int) -> Fraction:
        if depth > 32:
            raise ValueError("too deep")
        tok = take()
        if tok == "(":
            value = expr(depth + 1)
            if take() != ")":
                raise ValueError("unclosed (")
            return value
        if tok.isdigit():
            return Fraction(int(tok))
        raise ValueError(f"unexpected {tok!r}")

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError("unexpected end")
        pos += 1
        return tokens[pos - 1]

    try:
        value = expr(0)
    except (ValueError, ZeroDivisionError):
        return None
    return value if pos == len(tokens) else None


@_never_raises
def countdown_reward(completion: str, numbers: Sequence[int], target: int) -> float:
    """1.0 when the answer is an expression over + - * / ( ) that uses each given number
    exactly once and equals the target. An "= target" after the expression is allowed."""
    answer = extract_answer(completion)
    if not answer or len(answer) > 200:
        return 0.0
    for a, b in (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("×", "*"), ("÷", "/"), ("−", "-"), ("$", "")):
        answer = answer.replace(a, b)
    expr = answer.split("=")[0]
    tokens = _countdown_tokens(expr)
    if not tokens:
        return 0.0
    used = sorted(int(t) for t in tokens if t.isdigit())
    if used != sorted(int(n) for n in numbers):
        return 0.0
    value = _countdown_value(tokens)
    return float(value is not None and value == target)


@_never_raises
def accuracy_reward(completion: str, problem) -> float:
    """The task's accuracy reward for a Problem (or a ground-truth string)."""
    if isinstance(problem, str):
        return answer_reward(completion, problem)
    if getattr(problem, "task", None) == "countdown":
        return countdown_reward(completion, problem.numbers, problem.target)
    return answer_reward(completion, problem.answer)


# ---- format ----------------------------------------------------------------------------
@_never_raises
def format_reward(completion: str, think_opened: bool = False, answer_tags: bool = True) -> float:
    """1.0 for "<think> reasoning </think> <answer> answer </answer>" and nothing else, read by
    the reasoning splitter (nanoseek.data.reasoning) as the engine and the evaluation read it.

    `think_opened`: the prompt already ended with <think> (the chat generation prompt).
    `answer_tags=False`: the chat format, where any non-empty text after </think> is the answer.
    A missing final </answer> is accepted: engines that stop at that string drop it.
    """
    split = split_reasoning(strip_end_tokens(completion), think_opened)
    if split.think_tag == think_opened or not split.think_closed:  # one <think>: the prompt's or the output's
        return 0.0
    if THINK in split.reasoning or END_THINK in split.answer + split.extra:  # and one </think>
        return 0.0
    if ANSWER in split.answer:
        return 0.0
    if not answer_tags:
        return float(bool(split.answer) and not split.answer_tagged)
    return float(split.answer_tagged and bool(split.answer) and not split.extra.strip())


# ---- language consistency (R1 section 2.3.2) ---------------------------------------------
SCRIPTS = {
    "latin": "A-Za-z\u00c0-\u024f\u1e00-\u1eff",
    "cyrillic": "\u0400-\u04ff",
    "greek": "\u0370-\u03ff",
    "arabic": "\u0600-\u06ff",
    "hebrew": "\u0590-\u05ff",
    "devanagari": "\u0900-\u097f",
    "han": "\u3400-\u4dbf\u4e00-\u9fff",
    "kana": "\u3040-\u30ff",
    "hangul": "\u1100-\u11ff\uac00-\ud7af",
}
LANGUAGES = {
    "en": ("latin",),
    "fr": ("latin",),
    "de": ("latin",),
    "es": ("latin",),
    "it": ("latin",),
    "pt": ("latin",),
    "zh": ("han",),
    "ja": ("han", "kana"),
    "ko": ("hangul", "han"),
    "ru": ("cyrillic",),
    "uk": ("cyrillic",),
    "el": ("greek",),
    "ar": ("arabic",),
    "he": ("hebrew",),
    "hi": ("devanagari",),
}
# A word is a run of letters of one script; Han and kana characters count one word each.
_WORD = re.compile(
    "|".join(f"(?P<{name}>[{chars}]{'' if name in ('han', 'kana') else '+'})" for name, chars in SCRIPTS.items())
    + r"|(?P<other>[^\W\d_])"
)


@_never_raises
def language_reward(completion: str, language: str = "en", think_opened: bool = False) -> float:
    """Share of the reasoning's words written in the target language's script (R1's language
    consistency reward). Reasoning without letters (all arithmetic) scores 1; no reasoning scores 0."""
    scripts = LANGUAGES.get(language, (language,))
    if any(s not in SCRIPTS for s in scripts):
        raise NanoseekError(f"language {language!r}: expected one of {', '.join(sorted(LANGUAGES) + sorted(SCRIPTS))}")
    reasoning, _ = parse_reasoning(completion, think_opened)
    reasoning = reasoning[:MAX_SCAN_CHARS]
    if not reasoning.strip():
        return 0.0
    total = target = 0
    for m in _WORD.finditer(reasoning):
        total += 1
        target += m.lastgroup in scripts
    return target / total if total else 1.0


# ---- length shaping (DAPO section 3.4) ------------------------------------------------------
def overlong_penalty(num_tokens: int, max_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong punishment, in [-1, 0]: 0 up to max_tokens - buffer, then falling
    linearly to -1 at max_tokens, and -1 beyond."""
    if num_tokens > max_tokens:
        return -1.0
    start = max_tokens - max(buffer, 0)
    if num_tokens <= start:
        return 0.0
    return (start - num_tokens) / buffer


# ---- all together -----------------------------------------------------------------------------
REWARD_NAMES = ("accuracy", "format", "language", "overlong")


def combined_reward(
    completion: str,
    problem,
    weights: Mapping[str, float],
    *,
    num_tokens: int | None = None,
    max_tokens: int | None = None,
    overlong_buffer: int = 0,
    language: str = "en",
    think_opened: bool = False,
    answer_tags: bool = True,
    accuracy: Callable[[str, object], float] = accuracy_reward,
) -> dict[str, float]:
    """Each reward and their weighted sum under "total". Weights come from the config, by
    name (accuracy, format, language, overlong); the overlong term is a penalty in [-1, 0].
    `accuracy(completion, problem)`: the task's reward (`task.reward`, what the evaluation
    scores with); by default `accuracy_reward`."""
    unknown = set(weights) - set(REWARD_NAMES)
    if unknown:
        raise NanoseekError(
            f"reward weights: unknown {', '.join(sorted(unknown))} (expected {', '.join(REWARD_NAMES)})"
        )
    scores = {
        "accuracy": accuracy(completion, problem),
        "format": format_reward(completion, think_opened, answer_tags),
        "language": language_reward(completion, language, think_opened) if weights.get("language") else 0.0,
        "overlong": 0.0,
    }
    if weights.get("overlong"):
        if num_tokens is None or max_tokens is None:
            raise NanoseekError("reward weights: 'overlong' needs num_tokens and max_tokens")
        scores["overlong"] = overlong_penalty(num_tokens, max_tokens, overlong_buffer)
    scores["total"] = sum(weights.get(name, 0.0) * scores[name] for name in REWARD_NAMES)
    return scores
