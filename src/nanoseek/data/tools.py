"""The tool-call parser: the one reading of an answer's tool calls, in its chat template's format.

A model writes its calls after its answer's text, in the syntax its chat template renders
them in (so that a model trained on such conversations writes them back the same way):
- "deepseek", DeepSeek-V3's tool-call tokens (nanoseek's chat format, and R1-Distill's template):
  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGUMENTS\\n```
  <｜tool▁call▁end｜> ... <｜tool▁calls▁end｜>, calls joined by "\\n";
- "hermes", Qwen2.5's (and others'): <tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>,
  calls joined by "\\n".
`ToolCallReader` reads an answer piece by piece (a stream) into its text and its calls;
fed the whole answer at once it gives the same, so a streamed reply adds up to the other.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from nanoseek.data.chat import (
    TOOL_ARGS_BEGIN,
    TOOL_ARGS_END,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_SEP,
)

HERMES_BEGIN, HERMES_END = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolFormat:
    name: str
    begin: str  # where the calls start: the answer's text is what comes before it
    end: str  # "wraps": what closes the list of calls; else each call's own end
    wraps: bool  # True: begin and end enclose the list of calls; False: each call starts with begin

    def calls(self, text: str) -> tuple[list[tuple[str, str]], int, bool]:
        """The complete calls at the start of `text` (after the list's `begin` when it `wraps`):
        [(name, arguments)], how many characters they took, and whether no more can follow."""
        calls, pos = [], 0
        while True:
            rest = text[pos:]
            gap = len(rest) - len(rest.lstrip())
            if self.wraps and rest[gap:].startswith(self.end):
                return calls, pos + gap + len(self.end), True
            call = self._call(rest[gap:])
            if call is None:
                # unwrapped calls end at text that cannot begin another
                head = rest.strip()
                done = not self.wraps and head and not (head.startswith(self.begin) or self.begin.startswith(head))
                return calls, pos, bool(done)
            (name, arguments), n = call
            calls.append((name, arguments))
            pos += gap + n

    def _call(self, text: str) -> tuple[tuple[str, str], int] | None:
        if self.name == "deepseek":
            m = _DEEPSEEK_CALL.match(text)
            return ((m.group(1), m.group(2)), m.end()) if m else None
        if not text.startswith(HERMES_BEGIN):
            return None
        close = text.find(HERMES_END)
        if close < 0:
            return None
        try:
            call = json.loads(text[len(HERMES_BEGIN) : close])
        except ValueError:
            return None
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and "arguments" in call):
            return None
        arguments = call["arguments"]
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        return (call["name"], arguments), close + len(HERMES_END)


_DEEPSEEK_CALL = re.compile(
    re.escape(TOOL_CALL_BEGIN + "function" + TOOL_SEP)
    + r"([^\n]*?)"
    + re.escape(TOOL_ARGS_BEGIN)
    + r"(.*?)"
    + re.escape(TOOL_ARGS_END + TOOL_CALL_END),
    re.S,
)
DEEPSEEK = ToolFormat("deepseek", TOOL_CALLS_BEGIN, TOOL_CALLS_END, wraps=True)
HERMES = ToolFormat("hermes", HERMES_BEGIN, HERMES_END, wraps=False)
TOOL_FORMATS = {f.name: f for f in (DEEPSEEK, HERMES)}


def tool_format(tokenizer) -> ToolFormat | None:
    """The tool-call format of a tokenizer's prompt format: DeepSeek's in the chat format; a Jinja
    template's own by the markers it writes; None for the R1-Zero format and templates without."""
    if tokenizer.prompt_format == "chat":
        return DEEPSEEK
    template = tokenizer.chat_template or ""
    if TOOL_CALLS_BEGIN in template:
        return DEEPSEEK
    if HERMES_BEGIN in template:
        return HERMES
    return None


def _partial(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolCallReader:
    """An answer, fed in pieces, read into text deltas and calls as each call completes.

        reader = ToolCallReader(DEEPSEEK)
        text, calls = reader.feed(piece)           # calls: [(name, arguments)] completed by it
        text, calls = reader.feed("", final=True)  # what was held back

    Whitespace before the calls is not part of the text. Text that does not read as calls (an
    answer cut by max_tokens in the middle of one, or a model that writes them wrong) is given
    back as text at the end, so nothing the model wrote is lost."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.in_calls = False
        self.closed = False
        self.calls: list[tuple[str, str]] = []
        self._buf = ""  # not yet read
        self._held = ""  # whitespace at the end of the text, given out when text follows it

    def feed(self, piece: str, final: bool = False) -> tuple[str, list[tuple[str, str]]]:
        fmt = self.fmt
        self._buf += piece
        text, new = "", []
        if not self.in_calls:
            at = self._buf.find(fmt.begin)
            if at < 0:
                cut = len(self._buf) - (0 if final else _partial(self._buf, fmt.begin))
                text = self._text(self._buf[:cut], end=final)
                self._buf = self._buf[cut:]
            else:
                text = self._text(self._buf[:at], end=True)  # whitespace before the calls is dropped
                self._buf = self._buf[at + (len(fmt.begin) if fmt.wraps else 0) :]
                self.in_calls = True
        if self.in_calls and not self.closed:
            new, used, self.closed = fmt.calls(self._buf)
            self._buf = self._buf[used:]
            self.calls += new
        if final:
            rest = self._buf.strip()
            if rest and self.in_calls and not self.calls and fmt.wraps:
                rest = fmt.begin + self._buf.rstrip()  # no call read: the text as the model wrote it
            if rest:
                text += ("\n" if text or self.calls else "") + rest
            self._buf = ""
        return text, new

    def _text(self, piece: str, end: bool) -> str:
        piece = self._held + piece
        kept = piece.rstrip()
        self._held = "" if end else piece[len(kept) :]
        return kept


def parse_tool_calls(answer: str, fmt: ToolFormat) -> tuple[str, list[tuple[str, str]]]:
    """(text, calls) of a whole answer: what `ToolCallReader` gives fed it at once."""
    return ToolCallReader(fmt).feed(answer, final=True)
