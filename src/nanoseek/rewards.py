"""Rule-based rewards for GRPO (DeepSeek-R1 section 2.2.2): accuracy, format, language, readability, length.

No neural reward model. Every reward takes any string and returns a float: adversarial
outputs (huge powers, division by zero, deep nesting, code, megabytes of text) score 0, and
nothing is ever `eval`-ed. An answer that is not a plain number reaches math-verify only if a
whitelist grammar reads it and bounds the work it asks of sympy (`safe_for_sympy`), and then
only math-verify's LaTeX parser, in a worker process whose checks are limited in CPU time
whichever thread or process asks (`_Pool`: a bound on the work, so a busy machine grades the same).
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import NamedTuple

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


# ---- what math-verify may see: a whitelist grammar with a bound on the work ------------------
# An answer goes to math-verify only if it reads as math under the small grammar below, built
# from known tokens (numbers, letters, a list of LaTeX commands, operators, brackets; no quotes,
# dots outside numbers, unknown commands or code), and if a bound on the work it asks of sympy
# holds: the size of every exact number it can build, the degree of its polynomials, the powers
# of sums (expansions), factorials and the arguments of functions. Sympy does big-integer work in
# C, where no time limit interrupts it short of killing the process; the bound keeps that out.
MAX_BITS = 20_000  # the largest exact number an answer may build: about 6,000 digits (999^999 has 3,000)
MAX_DEGREE = 100  # of any polynomial: x^{100} passes, (x^{999}-1)/(x-1) takes seconds to cancel
MAX_EXPANSION = 20  # largest power of a sum: (x+y+z)^{20} (231 terms) in 0.6 s, (x+1)^{999} in 9 s
MAX_FACTORIAL = 1000
MAX_FUNCTION_BITS = 1000  # \sin of a 300-digit number needs 300 digits of precision
MAX_DEPTH = 20  # atoms inside atoms: brackets, fractions, roots, exponents

_LATEX_TOKEN = re.compile(
    r"(?P<space>\s+|~|\\[,;:! ]|\\\$|\\q?quad(?![A-Za-z])|\\(?:left|right)(?![A-Za-z])(?:\s*\.)?"
    r"|\\[bB]igg?[lr]?(?![A-Za-z])|\\(?:boxed|fbox|displaystyle)(?![A-Za-z]))"
    r"|(?P<text>\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox)\s*\{[A-Za-z0-9 ,.()+-]*\})"
    r"|(?P<const>\\mathbb\s*\{[A-Za-z]\})"
    r"|(?P<num>\d+(?:\.\d+)?|\.\d+)"
    r"|(?P<cmd>\\[A-Za-z]+|\\[{}%])"
    r"|(?P<op>\*\*|[-+*/^_=<>,;!()\[\]{}|%]|[π∞√×·÷−±≤≥≠∪∩°])"
    r"|(?P<sym>[A-Za-z])"
)
_GREEK = "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi rho sigma tau"
_KINDS = {
    **dict.fromkeys((_GREEK + " upsilon phi varphi chi psi omega").split(), "sym"),
    **dict.fromkeys("pi infty emptyset varnothing circ dots ldots cdots π ∞".split(), "const"),
    **dict.fromkeys("cdot times * × ·".split(), "mul"),
    **dict.fromkeys("div / ÷".split(), "div"),
    **dict.fromkeys("pm mp cup cap setminus + - − ± ∪ ∩".split(), "add"),
    **dict.fromkeys("le leq ge geq ne neq lt gt approx in notin subset subseteq mid to = < > ≤ ≥ ≠".split(), "rel"),
    **dict.fromkeys("frac dfrac tfrac".split(), "frac"),
    **dict.fromkeys("sqrt √".split(), "sqrt"),
    **dict.fromkeys("sin cos tan sec csc cot arcsin arccos arctan sinh cosh tanh log ln lg exp".split(), "func"),
    **dict.fromkeys("% \\% ° degree".split(), "post"),
    **dict.fromkeys("( [ { \\{".split(), "open"),
    **dict.fromkeys(") ] } \\}".split(), "close"),
    **{",": "sep", ";": "sep", "^": "pow", "**": "pow", "_": "sub", "!": "fact", "|": "bar"},
}
_CLOSERS = {"(": ")]", "[": ")]", "{": "}", "\\{": "\\}"}  # intervals close either way: (1, 2]
_STARTS = {"num", "sym", "const", "text", "open", "frac", "sqrt", "func", "bar"}  # what may follow implicitly: 2x


class _Work(NamedTuple):
    """Upper bounds for a piece of an answer, as sympy would build it: `bits`, the size of its
    exact value; `value` and `inverse`, log2 of its magnitude and of one over it (for exponents
    and divisions); `degree` as a polynomial in its letters (each letter counts as up to 4); and
    whether a sum is inside (a power of a sum is an expansion)."""

    bits: float
    value: float
    inverse: float
    degree: float
    has_sum: bool


class _TooMuchWork(Exception):
    """An answer that is not in the grammar, or asks for more work than the bounds allow."""


def _work(bits, value, inverse, degree, has_sum) -> _Work:
    if bits > MAX_BITS or degree > MAX_DEGREE + 1e-6:
        raise _TooMuchWork
    return _Work(bits, value, inverse, degree, has_sum)


_LETTER = _Work(2.0, 2.0, 2.0, 1.0, False)
_CONSTANT = _Work(2.0, 2.0, 2.0, 0.0, False)


def _number(text: str) -> _Work:
    whole, _, decimals = text.partition(".")
    if len(whole) + len(decimals) > 40:
        raise _TooMuchWork
    n = int(whole or "0")
    digits = 3.33 * len(decimals)
    value = math.log2(n + 1) if decimals else math.log2(max(n, 1))
    return _work(max(1, n.bit_length()) + digits, value, digits, 0.0, False)


def _text(text: str) -> _Work:
    digits = sum(len(run) for run in re.findall(r"\d+", text))
    return _work(2 + 3.33 * digits, 2 + 3.33 * digits, 2.0, 1.0, False)


def _join(a: _Work, b: _Work) -> _Work:
    """Items of a list, or the sides of a relation."""
    return _work(
        a.bits + b.bits,
        max(a.value, b.value),
        max(a.inverse, b.inverse),
        max(a.degree, b.degree),
        a.has_sum or b.has_sum,
    )


def _add(a: _Work, b: _Work) -> _Work:
    return _work(a.bits + b.bits, max(a.value, b.value) + 1, a.bits + b.bits, max(a.degree, b.degree), True)


def _mul(a: _Work, b: _Work) -> _Work:
    return _work(a.bits + b.bits, a.value + b.value, a.inverse + b.inverse, a.degree + b.degree, a.has_sum or b.has_sum)


def _div(a: _Work, b: _Work) -> _Work:
    return _work(a.bits + b.bits, a.value + b.inverse, a.inverse + b.value, a.degree + b.degree, a.has_sum or b.has_sum)


def _times(exponent: _Work) -> float:
    """How many times over a power multiplies its base: the exponent's magnitude bound."""
    if exponent.value > 60:
        raise _TooMuchWork
    return 2.0**exponent.value


def _power(base: _Work, exponent: _Work) -> _Work:
    times = _times(exponent)
    if base.has_sum and times > MAX_EXPANSION + 1e-6:
        raise _TooMuchWork
    size = max(base.value, base.inverse) * times
    return _work(base.bits * times + exponent.bits, size, size, base.degree * times, base.has_sum or exponent.has_sum)


def _factorial(a: _Work) -> _Work:
    n = 2.0**a.value
    if n > MAX_FACTORIAL:
        raise _TooMuchWork
    size = n * math.log2(n + 1)
    return _work(size + a.bits, size, 0.0, a.degree, a.has_sum)


def _function(name: str, a: _Work) -> _Work:
    if a.bits > MAX_FUNCTION_BITS:
        raise _TooMuchWork
    if name == "exp":
        return _power(_CONSTANT, a)
    return _work(a.bits, a.value, a.bits, a.degree, a.has_sum)


def _tokens(s: str) -> list[tuple[str, str]]:
    """(kind, text) for each token of an answer; anything outside the whitelist is refused."""
    tokens, i = [], 0
    while i < len(s):
        m = _LATEX_TOKEN.match(s, i)
        if m is None:
            raise _TooMuchWork
        i, group, text = m.end(), m.lastgroup, m.group(0)
        if group == "space":
            continue
        if group in ("num", "sym", "text", "const"):
            tokens.append((group, text))
        else:
            kind = _KINDS.get(text.removeprefix("\\") if group == "cmd" and len(text) > 2 else text)
            if kind is None:
                raise _TooMuchWork
            tokens.append((kind, text))
    return tokens


class _Reader:
    """Recursive descent over the tokens of an answer, returning the bound on its work:
    items (, ;) > relations (= < \\le ...) > sums (+ - \\pm \\cup) > products (* / \\cdot, or
    implicit: 2x) > powers (^ _ ! %) > atoms (numbers, letters, brackets, \\frac, \\sqrt,
    functions, |x|). The grammar is looser than LaTeX's, so that whatever math-verify might
    read is bounded; it is not a parser of meaning, and math-verify's LaTeX parser does that."""

    def __init__(self, tokens: list[tuple[str, str]]):
        self.tokens, self.pos, self.depth, self.bars = tokens, 0, 0, 0

    def peek(self) -> str:
        return self.tokens[self.pos][0] if self.pos < len(self.tokens) else "end"

    def take(self) -> tuple[str, str]:
        if self.pos >= len(self.tokens):
            raise _TooMuchWork
        self.pos += 1
        return self.tokens[self.pos - 1]

    def answer(self) -> _Work:
        work = self.items()
        if self.pos != len(self.tokens):
            raise _TooMuchWork
        return work

    def items(self) -> _Work:
        work = self.relation()
        while self.peek() == "sep":
            self.take()
            work = _join(work, self.relation())
        return work

    def relation(self) -> _Work:
        work = self.sum()
        while self.peek() == "rel":
            self.take()
            work = _join(work, self.sum())
        return work

    def sum(self) -> _Work:
        work = self.signed()
        while self.peek() == "add":
            self.take()
            work = _add(work, self.signed())
        return work

    def signed(self) -> _Work:
        while self.peek() == "add":  # -x, \pm 2, 2 \cdot -3
            self.take()
        return self.product()

    def product(self) -> _Work:
        work = self.power()
        while True:
            kind = self.peek()
            if kind in ("mul", "div"):
                self.take()
                while self.peek() == "add":
                    self.take()
                work = (_mul if kind == "mul" else _div)(work, self.power())
            elif kind in _STARTS and not (kind == "bar" and self.bars):
                work = _mul(work, self.power())
            else:
                return work

    def power(self) -> _Work:
        work = self.atom()
        while True:
            kind = self.peek()
            if kind == "sub":  # x_1, a_{n+1}: a name, bounded like any other piece
                self.take()
                self.atom()
            elif kind == "fact":
                self.take()
                work = _factorial(work)
            elif kind == "post":
                self.take()
            elif kind == "pow":
                self.take()
                work = _power(work, self.exponent())
            else:
                return work

    def exponent(self) -> _Work:
        """The exponent of a ^, read to the right: 9^9^9 is 9^(9^9)."""
        self.enter()
        try:
            while self.peek() == "add":
                self.take()
            work = self.atom()
            if self.peek() == "pow":
                self.take()
                work = _power(work, self.exponent())
            return work
        finally:
            self.depth -= 1

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _TooMuchWork

    def atom(self) -> _Work:
        self.enter()
        try:
            kind, text = self.take()
            if kind == "num":
                return _number(text)
            if kind == "sym":
                return _LETTER
            if kind == "const":
                return _CONSTANT
            if kind == "text":
                return _text(text)
            if kind == "open":
                work = self.items()
                closer = self.take()
                if closer[0] != "close" or closer[1] not in _CLOSERS[text]:
                    raise _TooMuchWork
                return work
            if kind == "bar" and not self.bars:
                self.bars += 1
                work = self.sum()
                self.bars -= 1
                if self.take()[0] != "bar":
                    raise _TooMuchWork
                return work
            if kind == "frac":
                return _div(self.atom(), self.atom())
            if kind == "sqrt":
                if self.peek() == "open" and self.tokens[self.pos][1] == "[":  # \sqrt[3]{x}
                    self.take()
                    index = self.items()
                    if self.take()[1] != "]" or _times(index) > MAX_FACTORIAL:
                        raise _TooMuchWork
                return self.atom()
            if kind == "func":
                name = text.removeprefix("\\")
                if self.peek() == "sub":  # \log_2 8
                    self.take()
                    self.atom()
                exponent = None
                if self.peek() == "pow":  # \sin^2 x
                    self.take()
                    exponent = self.exponent()
                work = _function(name, self.power())
                return work if exponent is None else _power(work, exponent)
            raise _TooMuchWork
        finally:
            self.depth -= 1


def safe_for_sympy(s: str) -> bool:
    """Whether math-verify may look at an answer: short, in the whitelist grammar, and within
    the bounds on the work (big numbers, degrees, expansions, factorials, nesting)."""
    if len(s) > MAX_ANSWER_CHARS:
        return False
    try:
        _Reader(_tokens(s)).answer()
    except (_TooMuchWork, RecursionError, ValueError, OverflowError):
        return False
    return True


# ---- math-verify in a worker process, time-limited on any thread ---------------------------------
# Every check runs in a small pool of worker processes, one check at a time each, so that the limit
# holds whichever thread or process asks: a signal can only interrupt the main thread of the process
# it is sent to, and the worker's checks run there. Two limits, both on CPU time (a busy machine
# grades the same): a timer (ITIMER_PROF) stops a check after MATH_VERIFY_SECONDS in Python code and
# the worker goes on; the kernel's CPU limit (RLIMIT_CPU) kills a worker stuck in C code a second or
# two later, and a new one takes its place. The text reaches only math-verify's LaTeX parser (never
# its plain-expression parser, which is sympy's parse_expr, an eval).
MAX_WORKERS = min(8, os.cpu_count() or 1)
WORKER_START_SECONDS = 120.0  # wall-clock: importing sympy on a loaded machine
WORKER_WAIT_SECONDS = 300.0  # wall-clock, a last resort: a worker that neither answers nor spends CPU
_WORKER = r"""
import json, logging, math, resource, signal, sys
from functools import lru_cache
import math_verify
from math_verify import LatexExtractionConfig
from math_verify.errors import TimeoutException

logging.getLogger("math_verify").setLevel(logging.ERROR)  # its own (signal) timeouts are off, and it warns
LATEX = [LatexExtractionConfig()]  # not ExprExtractionConfig: that is sympy's parse_expr, an eval


def parse(text):
    return math_verify.parse(f"${text}$", LATEX, parsing_timeout=None)


@lru_cache(maxsize=4096)
def gold(truth):  # a failure raises, which lru_cache does not keep: a parse cut short is tried again
    parsed = parse(truth)
    if not parsed:
        raise ValueError(truth)
    return parsed


def stop(signum, frame):
    raise TimeoutException("over the CPU-time limit")


def check(pred, truth, seconds):
    used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    soft = math.ceil(used + seconds) + 1  # SIGXCPU, whose default is to end the process, even in C
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        guess = parse(pred)
        return bool(guess) and bool(math_verify.verify(gold(truth), guess, timeout_seconds=None))
    except (Exception, TimeoutException):
        return False
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)


signal.signal(signal.SIGPROF, stop)
signal.signal(signal.SIGXCPU, signal.SIG_DFL)
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C is for the parent, which ends the worker
check("\\sqrt{2}/2", "x^2+1", 600)  # builds the LaTeX parser and sympy's caches before any limit counts
print("ready", flush=True)
for line in sys.stdin:
    try:
        equal = check(*json.loads(line))
    except (Exception, TimeoutException):
        equal = False
    print(json.dumps(equal), flush=True)
"""


class _Worker:
    """One worker process: a JSON line [answer, truth, seconds] in, a JSON line true/false out."""

    def __init__(self):
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
        except OSError as e:
            raise NanoseekError(f"math-verify worker: cannot start {sys.executable}: {e}") from e
        self.buffer = b""
        if self.read_line(WORKER_START_SECONDS) != b"ready":
            self.close()
            raise NanoseekError(
                f"math-verify worker did not start (exit code {self.proc.returncode}; its stderr above)"
            )

    def read_line(self, seconds: float) -> bytes | None:
        """The next line, or None once the worker has ended or `seconds` have passed."""
        deadline = time.monotonic() + seconds
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def check(self, pred: str, truth: str, seconds: float) -> bool | None:
        """math-verify's verdict, or None when the worker is gone (killed over its CPU limit)."""
        try:
            self.proc.stdin.write(json.dumps([pred, truth, seconds]).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            return None
        line = self.read_line(WORKER_WAIT_SECONDS)
        return None if line is None else json.loads(line) is True

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


class _Pool:
    """Idle workers, started on demand up to MAX_WORKERS; a worker that is gone is replaced by
    the next check that needs one. Belongs to the process that made it (see `_after_fork`)."""

    def __init__(self):
        self.ready = threading.Condition()
        self.idle: list[_Worker] = []
        self.count = 0
        self.pid = os.getpid()

    def check(self, pred: str, truth: str, seconds: float) -> bool:
        worker, verdict = self.take(), None
        try:
            verdict = worker.check(pred, truth, seconds)
        finally:  # an interrupted check leaves a reply in the pipe: that worker is not reused
            self.give(worker, alive=verdict is not None)
        return bool(verdict)

    def take(self) -> _Worker:
        with self.ready:
            while not self.idle and self.count >= MAX_WORKERS:
                self.ready.wait()
            if self.idle:
                return self.idle.pop()
            self.count += 1
        try:
            return _Worker()  # outside the lock: a start takes a second
        except BaseException:
            self.give(None, alive=False)
            raise

    def give(self, worker: _Worker | None, alive: bool) -> None:
        if worker is not None and not alive:
            worker.close()
        with self.ready:
            if alive:
                self.idle.append(worker)
            else:
                self.count -= 1
            self.ready.notify()

    def close(self) -> None:
        with self.ready:
            idle, self.idle = self.idle, []
            self.count -= len(idle)
        if os.getpid() == self.pid:
            for worker in idle:
                worker.close()

    def pids(self) -> list[int]:
        with self.ready:
            return [w.proc.pid for w in self.idle]


_POOL = _Pool()


def _after_fork() -> None:
    """A forked child gets its own workers: the parent's pipes are the parent's."""
    global _POOL
    for worker in _POOL.idle:
        worker.proc.stdin.close()
        worker.proc.stdout.close()
        worker.proc.returncode = 0  # not our child: nothing to wait for
    _POOL = _Pool()


os.register_at_fork(after_in_child=_after_fork)
atexit.register(lambda: _POOL.close())


def math_equal(pred: str, truth: str) -> bool:
    """Mathematical equivalence of an answer and the ground truth. Plain numbers compare
    exactly (an integer truth accepts only a plain number); the rest goes to math-verify."""
    p, t = plain_number(pred), plain_number(truth)
    if p is not None and t is not None:
        return p == t
    if t is not None and t.denominator == 1:
        return False
    if len(truth) > MAX_GOLD_CHARS or not re.search(r"[0-9A-Za-z\\π∞√]", pred) or not safe_for_sympy(pred):
        return False
    return _POOL.check(pred, truth, MATH_VERIFY_SECONDS)


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


def problem_language(problem) -> str:
    """The language a problem is asked in: its `meta["language"]` (chain's `languages`), else
    "en"; a plain ground-truth string is "en"."""
    meta = getattr(problem, "meta", None)
    return (meta.get("language") if isinstance(meta, Mapping) else None) or "en"


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


# ---- readability (R1 section 2.3.1: "a readable pattern ... a summary at the end") ------------
_ALNUM = re.compile(r"[^\W_]")


@_never_raises
def readability_reward(completion: str, think_opened: bool = False, reasoning_expected: bool = True) -> float:
    """1.0 for an output in R1's readable format, else 0.0. The output must have one closed
    <think>...</think> (the prompt's or its own, as `format_reward` reads it) and an answer that
    `extract_answer` finds. Then, with `reasoning_expected`:

    - the reasoning is not empty, and
    - the answer part (the text after </think>) is a summary followed by the final answer,
      marked by the last \\boxed{...} or, when there is none, by the last <answer>: the text
      before that marker, <answer> tags and whitespace dropped, has a letter or a digit.

    "a=3,b=-1. 3-1=2\\n</think>\\n\\na+b=2. \\boxed{2}" (chat) and
    " <think>3-1=2</think> a+b=2. <answer>2</answer>" are readable; R1-Zero's terse
    " <think>3-1=2</think> <answer>2</answer>" has no summary and is not.

    Without `reasoning_expected` (a question to answer without thinking): the reasoning is
    empty, " <think></think> <answer>4</answer>", and no summary is needed."""
    text = strip_end_tokens(completion)
    split = split_reasoning(text, think_opened)
    if split.think_tag == think_opened or not split.think_closed:
        return 0.0
    if THINK in split.reasoning or END_THINK in split.answer + split.extra:
        return 0.0
    if not extract_answer(completion):
        return 0.0
    if not reasoning_expected:
        return float(not split.reasoning)
    if not split.reasoning:
        return 0.0
    part = text[text.rfind(END_THINK) + len(END_THINK) :]
    marker = part.rfind("\\boxed")
    if marker < 0:
        marker = part.rfind(ANSWER)
    if marker < 0:
        return 0.0
    summary = part[:marker].replace(ANSWER, "").replace(END_ANSWER, "")
    return float(bool(_ALNUM.search(summary)))


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
REWARD_NAMES = ("accuracy", "format", "language", "readability", "overlong")


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
    name (accuracy, format, language, readability, overlong); the overlong term is a penalty in
    [-1, 0]. `accuracy(completion, problem)`: the task's reward (`task.reward`, what the
    evaluation scores with); by default `accuracy_reward`. The language term is measured
    against the problem's own language when it has one (`meta["language"]`), else against
    `language`; readability expects reasoning unless the problem's `meta["reasoning"]` is
    False (a question to answer without thinking), where an empty reasoning also scores 1 on
    language. Unweighted language and readability are 0."""
    unknown = set(weights) - set(REWARD_NAMES)
    if unknown:
        raise NanoseekError(
            f"reward weights: unknown {', '.join(sorted(unknown))} (expected {', '.join(REWARD_NAMES)})"
        )
    meta = getattr(problem, "meta", None)
    meta = meta if isinstance(meta, Mapping) else {}
    target = problem_language(problem) if meta.get("language") else language
    language_score = 0.0
    if weights.get("language"):
        language_score = language_reward(completion, target, think_opened)
        if meta.get("reasoning") is False and not parse_reasoning(completion, think_opened)[0]:
            language_score = 1.0  # answered without thinking, as asked: no reasoning in another language
    scores = {
        "accuracy": accuracy(completion, problem),
        "format": format_reward(completion, think_opened, answer_tags),
        "language": language_score,
        "readability": 0.0,
        "overlong": 0.0,
    }
    if weights.get("readability"):
        scores["readability"] = readability_reward(completion, think_opened, bool(meta.get("reasoning", True)))
    if weights.get("overlong"):
        if num_tokens is None or max_tokens is None:
            raise NanoseekError("reward weights: 'overlong' needs num_tokens and max_tokens")
        scores["overlong"] = overlong_penalty(num_tokens, max_tokens, overlong_buffer)
    scores["total"] = sum(weights.get(name, 0.0) * scores[name] for name in REWARD_NAMES)
    return scores
