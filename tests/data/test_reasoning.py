"""The reasoning splitter: the final split on known outputs, and any chunking of a stream adding
up to it (a property test against an independent reading of the rule)."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.data.chat import EOS, PAD
from nanoseek.data.reasoning import ReasoningSplitter, parse_reasoning, span_tokens, split_reasoning

TAGS = ("<think>", "</think>", "<answer>", "</answer>")


@pytest.mark.parametrize(
    "text, opened, expected",
    [
        (" <think>3+4=7, 7-2=5</think> <answer>5</answer>", False, ("3+4=7, 7-2=5", "5")),
        ("<think></think> <answer>5</answer>" + EOS, False, ("", "5")),
        ("<think>r</think>5" + EOS + PAD + EOS + " ", False, ("r", "5")),
        ("reasoning here\n</think>\n\nThe answer is 4.", True, ("reasoning here", "The answer is 4.")),
        ("<think>\nopened twice</think>4", True, ("opened twice", "4")),  # a leading <think> is a tag, not reasoning
        ("still thinking", True, ("still thinking", "")),
        ("just an answer", False, ("", "just an answer")),
        ("<think>unclosed reasoning", False, ("unclosed reasoning", "")),
        ("<think>a<think>b</think>c</think>d", False, ("a<think>b", "c</think>d")),  # the first </think> closes
        ("<think>x</think><answer>unclosed answer", False, ("x", "unclosed answer")),
        ("<answer>1</answer><answer>2</answer>", False, ("", "1")),  # the answer is the first tag's
        ("The answer is <answer>3</answer>", False, ("", "The answer is <answer>3</answer>")),  # tags only at the start
        ("x</think>y", False, ("", "x</think>y")),  # no <think> and no opened prompt: no reasoning
        ("", False, ("", "")),
        ("", True, ("", "")),
    ],
)
def test_parse_reasoning(text, opened, expected):
    assert parse_reasoning(text, think_opened=opened) == expected


def test_parse_reasoning_never_raises():
    for text in [None, 3, "<think>" * 1000, "</think>" * 1000, "<answer>" * 10, "\x00\ud800", "a" * 2_000_000]:
        reasoning, answer = parse_reasoning(text)
        assert isinstance(reasoning, str) and isinstance(answer, str)


def test_shape_of_the_split():
    s = split_reasoning(" <think> a b </think> <answer>42</answer> tail")
    assert (s.think_tag, s.think_closed, s.answer_tagged, s.answer_closed) == (True, True, True, True)
    assert (s.reasoning, s.answer, s.extra) == ("a b", "42", " tail")
    assert s.span == (8, 13)  # " a b " between the tags
    s = split_reasoning("open", think_opened=True)
    assert (s.think_tag, s.think_closed, s.span) == (False, False, (0, 4))
    assert split_reasoning("no reasoning").span is None


def test_stream_gives_out_text_as_soon_as_it_cannot_be_a_tag():
    s = ReasoningSplitter()
    assert s.feed("<thi") == ("", "")  # could be <think>
    assert s.thinking is False
    assert s.feed("nk>ab") == ("ab", "") and s.thinking
    assert s.feed(" c </th") == (" c", "")  # the space waits for text after it; "</th" for the tag
    assert s.feed("ink> <ans") == ("", "")
    assert s.feed("wer>4") == ("", "4")
    assert s.feed("2</answer> tail") == ("", "2")
    assert s.feed("", final=True) == ("", "")
    assert (s.reasoning, s.answer, s.extra) == ("ab c", "42", " tail")
    s = ReasoningSplitter(think_opened=True)
    assert s.thinking and s.feed("a < b") == ("a < b", "")  # "<" then a space: no tag
    assert s.feed(" </thi") == ("", "")
    assert s.feed("", final=True) == (" </thi", "")  # the tag never came: it was reasoning
    with pytest.raises(ValueError, match="final"):
        s.feed("more")


def test_span_tokens_counts_the_tokens_between_the_tags():
    # tokens: " " "<think>" "3+4" "=7" "</think>" " <answer>7</answer>"
    pieces = [" ", "<think>", "3+4", "=7", "</think>", " <answer>7</answer>"]
    ends = [sum(map(len, pieces[: i + 1])) for i in range(len(pieces))]
    text = "".join(pieces)
    assert span_tokens(ends, split_reasoning(text).span) == 2
    assert span_tokens(ends, split_reasoning("".join(pieces[:4])).span) == 2  # never closed: to the end
    assert span_tokens([7, 15], split_reasoning("<think></think>").span) == 0
    assert span_tokens([3, 5, 13], split_reasoning("3+4=7</think>", think_opened=True).span) == 2
    assert span_tokens([3, 13], split_reasoning("3+4=7</think>", think_opened=True).span) == 2  # "=7</think>" is one
    # byte-level tokens that end inside a character show no text yet: they count with it
    assert span_tokens([0, 1, 1, 3, 11], split_reasoning("abé</think>", think_opened=True).span) == 4
    assert span_tokens(ends, None) == 0 and span_tokens([], (0, 5)) == 0


# ---- the property: any chunking of a stream adds up to the final split ----------------------
def reference_split(text: str, opened: bool) -> tuple[str, str]:
    """The rule of nanoseek.data.reasoning, read with regular expressions over the whole text."""
    m = re.match(r"\s*<think>", text)
    reasoning = ""
    if m or opened:
        rest = text[m.end() :] if m else text
        reasoning, closed, rest = rest.partition("</think>")
        if not closed:
            return reasoning.strip(), ""
        text = rest
    m = re.match(r"\s*<answer>(.*?)(?:</answer>|$)", text, re.S)
    return reasoning.strip(), (m.group(1) if m else text).strip()


FRAGMENTS = st.sampled_from(
    [
        *TAGS,
        "<",
        "</",
        "<th",
        "<thi",
        "think>",
        "</ans",
        "answer>",
        ">",
        " ",
        "\n",
        "  ",
        "a",
        "42",
        "x y",
        "3+4=7",
        "é",
        "<a",
        "</b>",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(FRAGMENTS, max_size=14), st.booleans(), st.lists(st.integers(0, 200), max_size=8))
def test_any_chunking_adds_up_to_the_final_split(fragments, opened, cuts):
    text = "".join(fragments)
    want = reference_split(text, opened)
    final = split_reasoning(text, opened)
    assert (final.reasoning, final.answer) == want
    if final.span is not None:
        assert text[final.span[0] : final.span[1]].strip() == final.reasoning
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    s = ReasoningSplitter(opened)
    reasoning = answer = ""
    for lo, hi in zip(bounds, bounds[1:]):
        r, a = s.feed(text[lo:hi])
        reasoning, answer = reasoning + r, answer + a
        assert (s.reasoning, s.answer) == (reasoning, answer)  # what was given out stays given out
        assert want[0].startswith(reasoning) and want[1].startswith(answer)
    r, a = s.feed("", final=True)
    # At the end only what could still have been a tag (and the whitespace before it) was held back.
    for held in (r, a):
        assert not held.strip() or any(tag.startswith(held.strip()) for tag in TAGS), (r, a)
    assert (reasoning + r, answer + a) == want
    assert s.span == final.span and s.extra == final.extra
