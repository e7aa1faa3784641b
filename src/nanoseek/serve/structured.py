"""What a chat request asks of its reply beyond sampling: thinking on or off, JSON output, tool
calls; the grammar that holds the answer to them, and the answer read back into `content` and
`tool_calls`.

The reasoning stays free text: a grammar (nanoseek.infer.grammar.answer_grammar) starts after
it, at the answer, and wraps the answer as the model's prompt format does (after "</think>" in
the chat format and a model's own template, inside <answer> </answer> in the R1-Zero format).
- `response_format` json_object / json_schema: the answer is one JSON value of the schema (an
  object for json_object), with or without `strict` (a grammar has no other way).
- `tools`: the calls are written in the template's own syntax (nanoseek.data.tools) and read
  back into OpenAI's `tool_calls`. `tool_choice` "auto" lets the model answer in text or call
  (a call it starts is held to the syntax and to the function's parameter schema), "required"
  makes it call one or more of the tools, a named function makes it call that one, once;
  "none" offers the tools in the prompt and reads no calls. `parallel_tool_calls: false`: one call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from nanoseek.data.tools import ToolCallReader, ToolFormat, tool_format
from nanoseek.errors import NanoseekError
from nanoseek.infer.engine import opens_reasoning
from nanoseek.infer.grammar import answer_grammar, json_rule, text_then, tool_calls_rules
from nanoseek.serve.protocol import ApiError, ChatCompletionRequest


@dataclass
class ChatOutput:
    tools: list[dict] | None  # the functions offered in the prompt
    thinking: bool  # False: the prompt closes the reasoning before the answer
    answer: str | None  # Lark rules defining `answer`; None: the answer is free
    tool_format: ToolFormat | None  # read the answer's tool calls in this format; None: all text
    r1_zero: bool

    def grammar(self, tokenizer, prompt_ids: list[int]) -> str | None:
        """The grammar of the completion of `prompt_ids` (None: unconstrained)."""
        if self.answer is None:
            return None
        if opens_reasoning(prompt_ids, tokenizer.think_id, tokenizer.end_think_id):
            reasoning = "opened"
        elif self.r1_zero:
            reasoning = "tagged" if self.thinking else "none"
        elif tokenizer.prompt_format == "template" and self.thinking:
            reasoning = "optional"  # a template that leaves thinking to the model
        else:
            reasoning = "none"
        return answer_grammar(tokenizer, self.answer, reasoning, self.r1_zero)

    def reader(self) -> AnswerReader:
        return AnswerReader(self.tool_format)


class AnswerReader:
    """One choice's answer, fed in pieces, as `content` deltas and `tool_calls` entries."""

    def __init__(self, fmt: ToolFormat | None):
        self.tools = ToolCallReader(fmt) if fmt is not None else None
        self.calls: list[dict] = []

    def feed(self, answer: str, final: bool = False) -> tuple[str, list[dict]]:
        """(content delta, new OpenAI tool_calls entries, numbered on from the earlier ones)."""
        if self.tools is None:
            return answer, []
        text, calls = self.tools.feed(answer, final)
        new = [
            {
                "index": len(self.calls) + i,
                "id": "call_" + uuid.uuid4().hex[:24],
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            for i, (name, arguments) in enumerate(calls)
        ]
        self.calls += new
        return text, new


def _check_schema(schema, param: str) -> None:
    """A JSON schema llguidance can hold an answer to, or ApiError 400 naming `param`."""
    try:
        import llguidance
    except ImportError:
        raise ApiError(
            501, "JSON output and tool calls need llguidance: pip install 'nanoseek[serve]'", param, "unsupported"
        ) from None
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema if schema is not None else {})
    except ValueError as e:
        raise ApiError(400, f"'{param}' is not a JSON schema: {e}", param, "invalid_value") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise ApiError(400, f"'{param}': {error.splitlines()[0]}", param, "invalid_value")


def chat_output(body: ChatCompletionRequest, tokenizer) -> ChatOutput:
    """What `body` asks of its reply; ApiError 400 naming the parameter for what cannot go together."""
    thinking = body.thinking is None or body.thinking.type == "enabled"
    if not thinking:
        for name in ("max_reasoning_tokens", "reasoning_effort"):
            if getattr(body, name) is not None:
                raise ApiError(
                    400, f"'{name}' sets a thinking budget, but 'thinking' is disabled", name, "invalid_value"
                )
    if body.reasoning_effort is not None and body.max_reasoning_tokens is not None:
        raise ApiError(
            400,
            "'reasoning_effort' and 'max_reasoning_tokens' both set the thinking budget: send one",
            "reasoning_effort",
            "invalid_value",
        )
    r1_zero = tokenizer.prompt_format == "r1-zero"
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    choice = body.tool_choice
    if choice is not None and choice != "none" and not tools:
        raise ApiError(400, "'tool_choice' needs 'tools' to choose from", "tool_choice", "invalid_value")
    fmt = None
    if tools:
        names = [t["function"]["name"] for t in tools]
        if len(set(names)) < len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ApiError(400, f"'tools' names the function '{dup}' twice", "tools", "invalid_value")
        fmt = tool_format(tokenizer)
        if fmt is None:
            where = "the r1-zero prompt format" if r1_zero else "this model's chat template"
            raise ApiError(
                400,
                f"'tools': {where} has no tool-call syntax (DeepSeek's tool-call tokens or <tool_call>)",
                "tools",
                "invalid_value",
            )
        for i, t in enumerate(tools):
            _check_schema(t["function"].get("parameters"), f"tools[{i}].function.parameters")
    choice = choice or ("auto" if tools else "none")
    called = None
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        called = [t for t in tools if t["function"]["name"] == name]
        if not called:
            raise ApiError(
                400, f"'tool_choice' names '{name}', which is not in 'tools'", "tool_choice", "invalid_value"
            )
    elif choice in ("auto", "required"):
        called = tools

    json_body = None
    fmt_in = body.response_format
    if fmt_in is not None and fmt_in.type == "json_object":
        json_body = json_rule("json_body", {"type": "object"})
    elif fmt_in is not None and fmt_in.type == "json_schema":
        schema = fmt_in.json_schema.json_schema
        _check_schema(schema, "response_format.json_schema.schema")
        try:
            json_body = json_rule("json_body", schema if schema is not None else {})
        except NanoseekError as e:
            raise ApiError(
                400, f"'response_format.json_schema.schema': {e}", "response_format", "invalid_value"
            ) from None

    answer = None
    if called:
        parallel = body.parallel_tool_calls is not False and not isinstance(choice, dict)
        rules = tool_calls_rules(tokenizer, fmt, called, parallel)
        if choice != "auto":
            answer = "answer: tool_calls\n" + rules
        elif json_body is not None:
            answer = "answer: json_body | tool_calls\n" + json_body + "\n" + rules
        else:
            answer = "answer: TEXT | head calls_after_begin\n" + text_then(tokenizer, fmt.begin) + rules
    elif json_body is not None:
        answer = "answer: json_body\n" + json_body
    return ChatOutput(tools, thinking, answer, fmt if called else None, r1_zero)


def prompt_messages(body: ChatCompletionRequest, tokenizer) -> list[dict]:
    """The messages for the chat template. A template that writes calls as <tool_call> JSON (Qwen2.5's)
    reads each call's arguments as an object, as transformers' callers pass them; DeepSeek's
    concatenates them as the JSON text OpenAI sends."""
    messages = body.chat()
    fmt = tool_format(tokenizer) if tokenizer.prompt_format == "template" else None
    if fmt is None or fmt.name != "hermes":
        return messages
    for i, m in enumerate(messages):
        for j, call in enumerate(m.get("tool_calls") or []):
            try:
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
            except ValueError:
                param = f"messages[{i}].tool_calls[{j}].function.arguments"
                raise ApiError(400, f"'{param}' is not JSON", param, "invalid_value") from None
    return messages
