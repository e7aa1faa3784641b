"""The tool-call parser (nanoseek.data.tools): an answer's text and calls in DeepSeek-V3's tokens
and in <tool_call> JSON, the same fed whole or in any pieces, and text that is not a call kept."""

import random

import pytest

from nanoseek.data.chat import TOOL_CALLS_BEGIN, tool_calls_text
from nanoseek.data.tools import DEEPSEEK, HERMES, ToolCallReader, parse_tool_calls

CALLS = [("get_weather", '{"city": "Paris"}'), ("now", "{}")]
DEEPSEEK_ANSWER = "Let me check.\n\n" + tool_calls_text([{"function": {"name": n, "arguments": a}} for n, a in CALLS])
HERMES_ANSWER = (
    'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
)


@pytest.mark.parametrize(
    "fmt, answer, text", [(DEEPSEEK, DEEPSEEK_ANSWER, "Let me check."), (HERMES, HERMES_ANSWER, "Sure.")]
)
def test_text_and_calls_alike_whole_or_in_pieces(fmt, answer, text):
    assert parse_tool_calls(answer, fmt) == (text, CALLS)
    for seed in range(100):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(answer)), rng.randint(1, 12)))
        reader, got, calls = ToolCallReader(fmt), "", []
        for a, b in zip([0, *cuts], [*cuts, len(answer)]):
            piece, new = reader.feed(answer[a:b])
            got, calls = got + piece, calls + new
        piece, new = reader.feed("", final=True)
        assert (got + piece, calls + new) == (text, CALLS), cuts


def test_what_is_not_a_call_stays_text():
    assert parse_tool_calls("no calls here  ", DEEPSEEK) == ("no calls here", [])
    cut = DEEPSEEK_ANSWER[: DEEPSEEK_ANSWER.index("Paris")]  # max_tokens ran out inside the first call
    assert parse_tool_calls(cut, DEEPSEEK) == ("Let me check.\n" + cut[cut.index(TOOL_CALLS_BEGIN) :].rstrip(), [])
    assert parse_tool_calls("<tool_call>\n{not json}\n</tool_call>", HERMES) == (
        "<tool_call>\n{not json}\n</tool_call>",
        [],
    )
    # a half-written marker at the end of a piece is held back, then given out as text
    reader = ToolCallReader(DEEPSEEK)
    assert reader.feed("a <｜tool") == ("a", []) and reader.feed("!", final=True) == (" <｜tool!", [])
