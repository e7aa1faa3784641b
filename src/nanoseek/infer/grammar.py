"""Grammar-constrained decoding: a completion that must follow a grammar, token by token.

The grammar is llguidance's (a Lark-like syntax with JSON schemas inline as `%json {...}` and
tokens by id as `<[5]>`; guidance-ai/llguidance, also behind vLLM's and SGLang's structured
output). Before each token the matcher gives the set of tokens that keep the text inside the
grammar; the others get -inf logits, so greedy decoding, sampling and the thinking budget all
choose among allowed tokens only. Once the grammar is complete, end-of-sequence is the only
token left. llguidance is chosen over xgrammar (which pulls in triton and pins torch) and
outlines-core (regex DFAs: no special tokens, no context-free grammar for nested calls): a 3 MB
wheel with no Python dependencies, masks computed on the CPU in microseconds, and it reads a
`tokenizers` tokenizer.json as it is (byte-level BPE, added tokens).

The grammars the server asks for (JSON output, tool calls) are built by `answer_grammar`:
the reasoning stays free text up to "</think>" and only what follows is constrained.
"""

from __future__ import annotations

import json
import logging

import torch

from nanoseek.errors import NanoseekError

log = logging.getLogger("nanoseek.infer")

# Free text: any characters, none of them the given strings (so that a reasoning spelt out in
# ordinary tokens cannot write "</think>" as text, which the reasoning splitter would read as
# the end of the reasoning while the grammar still sees reasoning).
ANY = "/(?s:.*)/"


def lark_string(text: str) -> str:
    """`text` as a Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def text_without(*strings: str) -> str:
    """A Lark terminal body: any text that contains none of `strings`."""
    parts = [ANY]
    for s in strings:
        parts.append("~/(?s:.*)" + _regex_escape(s) + "(?s:.*)/")
    return " & ".join(parts)


def _regex_escape(text: str) -> str:
    out = []
    for c in text:
        out.append("\\" + c if c in r"\/.^$*+?()[]{}|-" else c)
    return "".join(out)


class Grammars:
    """llguidance's view of one tokenizer, and the matchers of the grammars given to it.

    `vocab_size`: the model's output size (at least the tokenizer's): ids past the tokenizer's
    are never allowed."""

    def __init__(self, tokenizer, vocab_size: int, eos_id: int | None):
        try:
            import llguidance
        except ImportError:
            raise NanoseekError(
                "constrained decoding (JSON output, tool calls) needs llguidance: pip install 'nanoseek[serve]'"
            ) from None

        self._llg = llguidance
        n_vocab = max(vocab_size, tokenizer.vocab_size)
        eos = eos_id if eos_id is not None else tokenizer.eos_id
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=n_vocab, eos_token=eos)
        self.vocab_size = vocab_size
        self._bits = torch.arange(32, dtype=torch.int32)

    def matcher(self, grammar: str):
        """A fresh matcher of `grammar` (Lark syntax); a NanoseekError saying what is wrong with it."""
        llg = self._llg
        compiled = llg.LLMatcher.grammar_from_lark(grammar)
        error = llg.LLMatcher.validate_grammar(compiled, self.tokenizer)
        if error and not error.startswith("WARNING"):
            raise NanoseekError(f"grammar: {error.splitlines()[0]}")
        matcher = llg.LLMatcher(self.tokenizer, compiled, log_level=0)
        if matcher.is_error():
            raise NanoseekError(f"grammar: {matcher.get_error().splitlines()[0]}")
        return matcher

    def allowed(self, matcher) -> torch.Tensor:
        """The tokens the matcher allows next, as a bool tensor [vocab_size] on the CPU."""
        words = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
        bits = ((words[:, None] >> self._bits) & 1).bool().flatten()
        if bits.numel() < self.vocab_size:
            bits = torch.cat([bits, bits.new_zeros(self.vocab_size - bits.numel())])
        return bits[: self.vocab_size]

    def mask(self, logits: torch.Tensor, rows: list[int], matchers: list) -> torch.Tensor:
        """`logits` [B, V] with the tokens each matcher (of row rows[i]) does not allow set to -inf.
        A matcher in an error state (a token was forced past it) constrains nothing more."""
        live = [(r, m) for r, m in zip(rows, matchers) if not m.is_error()]
        if not live:
            return logits
        allowed = torch.ones(logits.shape, dtype=torch.bool)
        for r, m in live:
            allowed[r] = self.allowed(m)
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    @staticmethod
    def advance(matcher, token: int) -> None:
        if not matcher.is_error() and not matcher.consume_token(token):
            log.warning(
                "grammar: token %d is outside the grammar (%s): no longer constrained", token, matcher.get_error()
            )


# ---------------------------------------------------------------------------------------
# The grammars of an answer after the reasoning.
# ---------------------------------------------------------------------------------------
# Whitespace inside JSON: newlines and spaces, as a model writes indented JSON, but bounded, so
# that a weak model cannot spend its tokens on blanks.
JSON_WHITESPACE = r"( |\n {0,16})?"
# Between "</think>" and the answer (the chat format writes "\n\n").
GAP = r"/[ \n]{0,4}/"


def token_literal(tokenizer, text: str) -> str:
    """`text` in a grammar: its control token, by id, where the tokenizer has one (a model
    writes "</think>" as that token), else the text itself (spelt in ordinary tokens)."""
    i = tokenizer.control_tokens.get(text)
    return f"<[{i}]>" if i is not None else lark_string(text)


def json_rule(name: str, schema: dict | bool) -> str:
    """A rule `name` that is one JSON value matching `schema` (llguidance's JSON schema support:
    types, properties, required, enums, consts, anyOf, items, lengths and bounds, $ref)."""
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise NanoseekError(f"a JSON schema must be an object, got {type(schema).__name__}")
    options = {"whitespace_pattern": JSON_WHITESPACE, **(schema.get("x-guidance") or {})}
    return f"{name}: %json {json.dumps({**schema, 'x-guidance': options}, ensure_ascii=False)}"


def answer_grammar(tokenizer, answer: str, reasoning: str, r1_zero: bool = False) -> str:
    """A grammar whose text is the reasoning, free, and then the rule `answer` (defined in the
    Lark text `answer`), the way the model's prompt format wraps an answer:
    - `reasoning`: "opened" when the prompt ends inside <think> (the chat format, R1-Distill's
      template): free text up to the </think> token; "tagged" when the output opens it itself
      (the R1-Zero format: " <think>...</think>"); "optional" when it may (a template whose
      model thinks on its own); "none" when thinking is off (the prompt closed it) or the
      tokenizer has no </think>.
    - `r1_zero`: the answer sits inside " <answer> ... </answer>", as the R1-Zero template asks.
    Text that spells "</think>" in ordinary tokens is kept out of the reasoning: the reasoning
    splitter reads text, and would end the reasoning there."""
    think, end_think = tokenizer.think_id, tokenizer.end_think_id
    if end_think is None or (reasoning in ("tagged", "optional") and think is None):
        reasoning = "none"
    lines = []
    if reasoning != "none":
        lines.append(f"REASONING: {text_without('</think>')}")
    close = f"REASONING <[{end_think}]>"
    head = {
        "opened": close,
        "tagged": f'" "? <[{think}]> {close}',
        "optional": f"(<[{think}]> {close})?",
        "none": "",
    }[reasoning]
    if r1_zero:
        body = f'" " {token_literal(tokenizer, "<answer>")} answer {token_literal(tokenizer, "</answer>")}'
    else:
        body = f"{GAP} answer"
    lines.insert(0, f"start: {head} {body}".replace("  ", " "))
    return "\n".join(lines) + "\n" + answer.strip() + "\n"


# ---------------------------------------------------------------------------------------
# Tool calls (nanoseek.data.tools' formats).
# ---------------------------------------------------------------------------------------
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def text_then(tokenizer, marker: str) -> str:
    """Rules `TEXT` (free text without `marker`) and `head` (free text, then `marker`). A marker
    the tokenizer has as a control token follows the text as that token; one spelt in ordinary
    tokens ends a lazy lexeme (the text's lexeme alone would run over it)."""
    rules = f"TEXT: {text_without(marker)}\n"
    if marker in tokenizer.control_tokens:
        return rules + f"head: TEXT? {token_literal(tokenizer, marker)}\n"
    return rules + f"head[lazy]: /(?s:.*){_regex_escape(marker)}/\n"


def tool_calls_rules(tokenizer, fmt, tools: list[dict], parallel: bool = True) -> str:
    """Rules `tool_calls` (the calls as `fmt` writes them, `fmt.begin` first) and `calls_after_begin`
    (the same after `fmt.begin`): one call, or with `parallel` one or more, each of a function of
    `tools` (OpenAI's {"type": "function", "function": {"name", "parameters"}}) with arguments
    that match its parameters' JSON schema ("{}" for a function without parameters, as OpenAI
    reads one: an empty parameter list)."""
    from nanoseek.data import chat

    lit = lambda text: token_literal(tokenizer, text)  # noqa: E731
    lines, names = [], []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        params = fn.get("parameters") or NO_PARAMETERS
        names.append(f"fn_{i}")
        if fmt.name == "deepseek":
            lines.append(
                f"fn_{i}: {lark_string(fn['name'] + chat.TOOL_ARGS_BEGIN)} args_{i} "
                f"{lark_string(chat.TOOL_ARGS_END)} {lit(chat.TOOL_CALL_END)}"
            )
            lines.append(json_rule(f"args_{i}", params))
        else:
            call = {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            lines.append(json_rule(f"fn_{i}", call))
    lines.append("fn: " + " | ".join(names))
    more = ' ("\\n" call)*' if parallel else ""
    if fmt.name == "deepseek":
        lines.append(f'call: {lit(chat.TOOL_CALL_BEGIN)} "function" {lit(chat.TOOL_SEP)} fn')
        lines.append(f"calls_after_begin: call{more} {lit(chat.TOOL_CALLS_END)}")
        lines.append(f"tool_calls: {lit(chat.TOOL_CALLS_BEGIN)} calls_after_begin")
    else:
        lines.append(f'call_rest: "\\n" fn "\\n" {lit(fmt.end)}')
        lines.append(f"call: {lit(fmt.begin)} call_rest")
        lines.append(f"calls_after_begin: call_rest{more}")
        lines.append(f"tool_calls: call{more}")
    return "\n".join(lines) + "\n"
