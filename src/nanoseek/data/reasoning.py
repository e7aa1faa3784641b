"""The reasoning splitter: the one reading of "<think> reasoning </think> <answer> answer </answer>".

DeepSeek-R1 writes its reasoning inside <think> </think> and then its answer; R1-Zero's
template (section 2.2.1) also wraps the answer in <answer> </answer>. The engine's streaming,
the server, the format reward, GRPO's metrics and the evaluation all read an output through
`ReasoningSplitter`, so they agree on what the reasoning is, what the answer is and how long
the thinking was. The rule reads left to right, so that a stream can be split as it arrives:

- The output has reasoning when the prompt already ended inside "<think>" (`think_opened`,
  as the chat generation prompt does) or when the output starts with "<think>" (after
  whitespace). A leading "<think>" is never part of the reasoning.
- The reasoning runs to the first "</think>", or to the end when it is never closed (the
  answer is then empty).
- The answer is what follows (the whole output when there is no reasoning). When it starts
  with "<answer>", the answer is inside that tag, up to the first "</answer>" or to the end
  when the tag is left open (a generation stopped at the stop string "</answer>" never shows
  it); what follows "</answer>" is kept apart, in `extra`.
- Both parts are stripped of surrounding whitespace.

Fed piece by piece, the splitter holds back what could still be the start of a tag ("</thi")
and trailing whitespace, so that nothing it has given out is ever taken back: the deltas add
up to exactly the final split (`split_reasoning`), whatever the pieces.
"""

from __future__ import annotations

from collections.abc import Sequence

from nanoseek.data.chat import ANSWER, END_ANSWER, END_THINK, THINK, strip_end_tokens

# Where the splitter is in the output.
START = "start"  # before the first visible character: a "<think>" may still come
REASONING = "reasoning"  # inside the reasoning, up to "</think>"
ANSWER_START = "answer_start"  # right after the reasoning: an "<answer>" may still come
ANSWER_TEXT = "answer"  # a plain answer, to the end
TAGGED = "tagged"  # inside "<answer>", up to "</answer>"
AFTER = "after"  # past "</answer>": `extra`


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningSplitter:
    """Splits an output, fed in pieces, into reasoning and answer deltas.

        splitter = ReasoningSplitter(think_opened=True)
        for piece in pieces:
            reasoning_delta, answer_delta = splitter.feed(piece)
        splitter.feed("", final=True)  # gives out what was held back for a tag that never came

    After the final piece, `reasoning` and `answer` hold the whole split; `think_tag`,
    `think_closed`, `answer_tagged`, `answer_closed` and `extra` describe its shape (the
    format reward reads them) and `span` locates the reasoning in the text (GRPO's metrics and
    the evaluation count its tokens).
    """

    def __init__(self, think_opened: bool = False):
        self.think_opened = think_opened
        self.state = START
        self.reasoning = ""  # given out so far
        self.answer = ""
        self.extra = ""  # raw text after "</answer>"
        self.think_tag = False  # the output opened its reasoning with "<think>"
        self.think_closed = False  # "</think>" was seen
        self.answer_tagged = False  # the answer opened with "<answer>"
        self.answer_closed = False  # "</answer>" was seen
        self.finished = False
        # Character offsets in the fed text of the reasoning between its tags: (start, end);
        # end is None while the reasoning is open, and the end of the text if it never closes.
        self.span: tuple[int, int | None] | None = None
        self._buf = ""  # fed but not yet read: what could be the start of a tag
        self._pos = 0  # offset of _buf in the fed text
        self._held = ""  # trailing whitespace of the current part, given out when text follows it

    @property
    def thinking(self) -> bool:
        """Whether the output is (so far) inside its reasoning."""
        return self.state == REASONING or (self.state == START and self.think_opened)

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """The (reasoning, answer) deltas that `text` adds; `final` on the last piece."""
        if self.finished:
            raise ValueError("ReasoningSplitter: fed after its final piece")
        self._buf += text
        out = {"reasoning": "", "answer": ""}
        while self._step(final, out):
            pass
        if final:
            self.finished = True
            self._held = ""  # a part's trailing whitespace is not part of it
            if self.span is not None and self.span[1] is None:
                self.span = (self.span[0], self._pos)
        return out["reasoning"], out["answer"]

    # ---- the rule, one state at a time ------------------------------------------------
    def _step(self, final: bool, out: dict) -> bool:
        """Read what the state allows; True when it moved on to another state."""
        buf = self._buf
        if self.state == START:
            rest = buf.lstrip()
            if rest.startswith(THINK):
                self._take(len(buf) - len(rest) + len(THINK))
                self.think_tag = True
                return self._open_reasoning()
            if not final and THINK.startswith(rest):  # nothing yet, or "<thi" still growing
                return False
            if self.think_opened:
                return self._open_reasoning()
            return self._to(ANSWER_START)
        if self.state == REASONING:
            close = buf.find(END_THINK)
            if close >= 0:
                self._give("reasoning", buf[:close], out)
                self.span = (self.span[0], self._pos + close)
                self._take(close + len(END_THINK))
                self.think_closed = True
                return self._to(ANSWER_START)
            self._give_all_but_tag("reasoning", END_THINK, final, out)
            return False
        if self.state == ANSWER_START:
            rest = buf.lstrip()
            if rest.startswith(ANSWER):
                self._take(len(buf) - len(rest) + len(ANSWER))
                self.answer_tagged = True
                return self._to(TAGGED)
            if not final and ANSWER.startswith(rest):
                return False
            return self._to(ANSWER_TEXT)
        if self.state == ANSWER_TEXT:
            self._give("answer", buf, out)
            self._take(len(buf))
            return False
        if self.state == TAGGED:
            close = buf.find(END_ANSWER)
            if close >= 0:
                self._give("answer", buf[:close], out)
                self._take(close + len(END_ANSWER))
                self.answer_closed = True
                return self._to(AFTER)
            self._give_all_but_tag("answer", END_ANSWER, final, out)
            return False
        self.extra += buf  # AFTER
        self._take(len(buf))
        return False

    def _open_reasoning(self) -> bool:
        self.span = (self._pos, None)
        return self._to(REASONING)

    def _to(self, state: str) -> bool:
        self.state, self._held = state, ""  # whitespace held at the end of a part is dropped
        return True

    def _take(self, n: int) -> None:
        self._buf = self._buf[n:]
        self._pos += n

    def _give_all_but_tag(self, part: str, tag: str, final: bool, out: dict) -> None:
        """Give out the buffer except an end that could be the start of `tag`."""
        keep = 0 if final else _partial_tag(self._buf, tag)
        n = len(self._buf) - keep
        self._give(part, self._buf[:n], out)
        self._take(n)

    def _give(self, part: str, piece: str, out: dict) -> None:
        """Append to a part, trimmed as the whole part is: no whitespace at its start, and
        trailing whitespace waits until text follows it."""
        piece = self._held + piece
        if not getattr(self, part):
            piece = piece.lstrip()
        kept = piece.rstrip()
        self._held = piece[len(kept) :]
        if kept:
            setattr(self, part, getattr(self, part) + kept)
            out[part] += kept


def split_reasoning(text: str, think_opened: bool = False) -> ReasoningSplitter:
    """The final split of a whole output: a splitter fed it in one piece."""
    splitter = ReasoningSplitter(think_opened)
    splitter.feed(text, final=True)
    return splitter


def parse_reasoning(text: str, think_opened: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a decoded output, by the rule above, after the end-of-sequence
    and padding tokens that a decode with special tokens leaves at its end. Never raises."""
    if not isinstance(text, str):
        return "", ""
    split = split_reasoning(strip_end_tokens(text), think_opened)
    return split.reasoning, split.answer


def span_tokens(token_ends: Sequence[int], span: tuple[int, int | None] | None) -> int:
    """How many tokens overlap a character span of the text, given where each token's text
    ends (`token_ends[i]`: the text's length after token i). This is the thinking length:
    the tokens of the reasoning, its tags not counted. A token that ends inside a character
    (byte-level BPE) shows no text yet; it counts with the character it begins."""
    if span is None:
        return 0
    start, end = span
    end = (token_ends[-1] if token_ends else 0) if end is None else end
    count, prev = 0, 0
    for e in token_ends:
        if prev < end and max(e, prev + 1) > start:
            count += 1
        prev = e
    return count


def prompt_opens_reasoning(prompt: str) -> bool:
    """Whether a prompt's text ends inside <think> (its last tag is an open <think>), as the
    chat generation prompt does: the completion then starts in its reasoning. The engine reads
    the same from the prompt's token ids."""
    return prompt.rfind(THINK) > prompt.rfind(END_THINK)
