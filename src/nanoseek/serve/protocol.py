"""The OpenAI protocol as this server speaks it: request bodies as pydantic models, and errors.

Every parameter OpenAI defines for an endpoint is declared here, once. Those the engine does
not implement are refused with a 400 naming them ("'logit_bias' is not supported by this
server") unless they are left at their neutral value (`presence_penalty: 0` asks for nothing);
a key OpenAI does not define is refused too, as OpenAI refuses it. Nothing is silently ignored.
Extensions: `top_k`, `max_reasoning_tokens` (a budget for the thinking part) and DeepSeek's
`thinking: {"type": "enabled" | "disabled"}`; `reasoning_effort` maps to a thinking budget
(REASONING_EFFORT). JSON output (`response_format`) and tool calls (`tools`, `tool_choice`,
`parallel_tool_calls`) are held to their syntax by constrained decoding (nanoseek.serve.structured).
Log-probabilities are the engine's (nanoseek.serve.logprobs writes them): chat's `logprobs` /
`top_logprobs`, and the completions API's `logprobs` (top-n per token) with `echo`, where
`max_tokens: 0` scores the prompt without generating, as evaluation harnesses ask.

Every error is an OpenAI-style body, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from nanoseek.errors import dotted_location

MAX_N = 16
MAX_LOGPROBS = 20  # top-n log-probs per token: OpenAI's bound for chat, and vLLM's default for both
MAX_STOP = 4
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# reasoning_effort as a thinking budget, in reasoning tokens (the default, without it: no budget).
REASONING_EFFORT = {"low": 256, "medium": 1024, "high": 4096}
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names

# OpenAI parameters the engine does not have, with the values that ask for nothing.
UNSUPPORTED: dict[str, tuple] = {
    # both endpoints
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logit_bias": ({},),
    "user": (),
    "service_tier": (),
    # chat completions (`functions` and `function_call`: OpenAI's older names of tools)
    "functions": ([],),
    "function_call": ("none",),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "metadata": ({},),
    "store": (False,),
    "web_search_options": (),
    "verbosity": (),
    "prompt_cache_key": (),
    "safety_identifier": (),
    # completions
    "suffix": ("",),
    "best_of": (1,),
}


class ApiError(Exception):
    """An error response: the status, an OpenAI-style body, and headers (Retry-After)."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = (
            "rate_limit_error"
            if self.status == 429
            else "server_error"
            if self.status >= 500
            else "invalid_request_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ApiModel(BaseModel):
    # JSON types as they are: 1 is not true, "1" is not 1; NaN is not a number.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _not_implemented(cls, value, info):
        neutral = UNSUPPORTED.get(info.field_name)
        if (
            neutral is not None
            and value is not None
            and not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral)
        ):  # false is not 0
            raise PydanticCustomError(
                "unsupported_parameter", "'{name}' is not supported by this server", {"name": info.field_name}
            )
        return value


class StreamOptions(ApiModel):
    include_usage: bool | None = None


class FunctionCall(ApiModel):
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str  # JSON, as the model wrote it


class ToolCall(ApiModel):
    """A call of an earlier assistant turn, sent back in the conversation."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(ApiModel):
    role: Literal[tuple(ROLES)]
    content: str | None = None  # a string, or OpenAI's list of {"type": "text", "text": ...} parts
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool result: the call it answers
    reasoning_content: Any = None  # refused, as DeepSeek's API refuses it

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("'tool_calls' is only allowed in an assistant message")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs 'tool_call_id' (the id of the call it answers)")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("'tool_call_id' is only allowed in a tool message")
        return self

    @field_validator("reasoning_content", mode="before")
    @classmethod
    def _no_reasoning(cls, reasoning):
        # DeepSeek's API answers 400 to it: an earlier turn's reasoning is not part of the next
        # prompt (this server used to paste it in, making prompts that API never makes).
        if reasoning is not None:
            raise ValueError("must not be sent back: send an assistant turn's 'content' only")
        return reasoning

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, content):
        if content is None or isinstance(content, str):
            return content
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.keys() == {"type", "text"} and p["type"] == "text" and isinstance(p["text"], str)
            for p in content
        ):
            return "".join(p["text"] for p in content)
        raise ValueError("must be a string or a list of text parts")


class FunctionDefinition(ApiModel):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object (None: no arguments)
    strict: bool | None = None  # the arguments always match `parameters` here, strict or not


class Tool(ApiModel):
    type: Literal["function"]
    function: FunctionDefinition


class JsonSchemaFormat(ApiModel):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    json_schema: dict | bool | None = Field(None, alias="schema")  # None: any JSON value
    strict: bool | None = None  # the answer always matches the schema here, strict or not


class ResponseFormat(ApiModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("'json_schema' is required with type 'json_schema', and only with it")
        return self


class Thinking(ApiModel):
    type: Literal["enabled", "disabled"]


class SamplingRequest(ApiModel):
    """What both endpoints take; null means the default, as in OpenAI's API."""

    model: str
    n: int | None = Field(None, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=2**63 - 1)  # nanoseek's: 0 or -1 for all tokens (int64, as the engine)
    max_tokens: int | None = Field(None, ge=1)  # None: up to the context
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: list[str] | None = None  # a string or at most MAX_STOP of them
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_reasoning_tokens: int | None = Field(None, ge=0)  # nanoseek's: the thinking budget
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    user: Any = None
    service_tier: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, stop):
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and (
            not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP
        ):
            raise ValueError(f"must be a non-empty string or a list of at most {MAX_STOP} of them")
        return stop


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    tools: list[Tool] | None = None
    tool_choice: Any = None  # "none", "auto", "required", or {"type": "function", "function": {"name": NAME}}
    parallel_tool_calls: bool | None = None  # more than one call in a turn (default true)
    response_format: ResponseFormat | None = None
    thinking: Thinking | None = None  # DeepSeek's: "disabled" opens the answer with an empty <think></think>
    reasoning_effort: Literal["low", "medium", "high"] | None = None  # a thinking budget (REASONING_EFFORT)
    functions: Any = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # with logprobs: the likeliest per token
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    metadata: Any = None
    store: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, choice):
        if choice is None or choice in ("none", "auto", "required"):
            return choice
        fn = choice.get("function") if isinstance(choice, dict) else None
        if isinstance(fn, dict) and choice.keys() == {"type", "function"} and choice["type"] == "function":
            if fn.keys() == {"name"} and isinstance(fn["name"], str):
                return choice
        raise ValueError('must be \'none\', \'auto\', \'required\' or {"type": "function", "function": {"name": ...}}')

    def chat(self) -> list[dict]:
        """The messages as the chat template takes them (developer is system; tool calls as OpenAI's dicts)."""
        out = []
        for m in self.messages:
            message = {"role": ROLES[m.role], "content": m.content}
            if m.tool_calls is not None:
                message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            out.append(message)
        return out


class CompletionRequest(SamplingRequest):
    # A string, a list of strings, a list of token ids or a list of token-id lists (a batch):
    # read by the server, which checks the ids against the vocabulary.
    prompt: Any = None
    max_tokens: int | None = Field(None, ge=0)  # 0, with echo: score the prompt only
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # the likeliest per token, and the chosen one
    echo: bool | None = None  # the prompt before the completion, in the text and in the logprobs
    suffix: Any = None
    best_of: Any = None


# ---------------------------------------------------------------------------------------
# pydantic's errors as OpenAI's: the first one, naming its parameter.
# ---------------------------------------------------------------------------------------
TYPES = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "dict_type": "an object",
}
BOUNDS = {
    "greater_than_equal": ("ge", ">="),
    "greater_than": ("gt", ">"),
    "less_than_equal": ("le", "<="),
    "less_than": ("lt", "<"),
}


def parse(schema: type[ApiModel], body: dict) -> ApiModel:
    """The request `body` as `schema`, or ApiError 400 naming the first bad parameter."""
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        raise ApiError(400, *explain(error)) from None


def explain(error: dict) -> tuple[str, str, str]:
    """(message, param, code) of one pydantic error."""
    param, kind, ctx = dotted_location(tuple(error["loc"])), error["type"], error.get("ctx") or {}
    shown = json.dumps(error.get("input"), default=str)[:40]
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: '{param}'", param, "unknown_parameter"
    if kind == "unsupported_parameter":
        return error["msg"], param, "unsupported_parameter"
    if kind == "missing":
        return f"'{param}' is required", param, "missing_required_parameter"
    if kind in TYPES:
        return f"'{param}' must be {TYPES[kind]}, got {shown}", param, "invalid_type"
    if kind in BOUNDS:
        name, sign = BOUNDS[kind]
        return f"'{param}' = {shown} is out of range: expected {sign} {ctx[name]}", param, "invalid_value"
    if kind == "literal_error":
        return f"'{param}' must be one of {ctx['expected'].replace(' or ', ', ')}, got {shown}", param, "invalid_value"
    if kind == "too_short":
        return f"'{param}' must not be empty", param, "invalid_value"
    if kind == "value_error":
        return f"'{param}' {ctx['error']}", param, "invalid_value"
    return f"'{param}': {error['msg']}", param, "invalid_value"
