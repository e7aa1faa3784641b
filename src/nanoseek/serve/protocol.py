"""The OpenAI protocol as this server speaks it: request bodies as pydantic models, and errors.

Every parameter OpenAI defines for an endpoint is declared here, once. Those the engine does
not implement are refused with a 400 naming them ("'response_format' is not supported by this
server") unless they are left at their neutral value (`presence_penalty: 0` asks for nothing);
a key OpenAI does not define is refused too, as OpenAI refuses it. Nothing is silently ignored.
Two extensions: `top_k` and `max_reasoning_tokens` (a budget for the thinking part).
Log-probabilities are the engine's (nanoseek.serve.logprobs writes them): chat's `logprobs` /
`top_logprobs`, and the completions API's `logprobs` (top-n per token) with `echo`, where
`max_tokens: 0` scores the prompt without generating, as evaluation harnesses ask.

Every error is an OpenAI-style body, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from nanoseek.errors import dotted_location

MAX_N = 16
MAX_LOGPROBS = 20  # top-n log-probs per token: OpenAI's bound for chat, and vLLM's default for both
MAX_STOP = 4
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# OpenAI parameters the engine does not have, with the values that ask for nothing.
UNSUPPORTED: dict[str, tuple] = {
    # both endpoints
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logit_bias": ({},),
    "user": (),
    "service_tier": (),
    # chat completions
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "parallel_tool_calls": (),
    "response_format": ({"type": "text"},),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "reasoning_effort": (),
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


class ChatMessage(ApiModel):
    role: Literal[tuple(ROLES)]
    content: str | None = None  # a string, or OpenAI's list of {"type": "text", "text": ...} parts
    reasoning_content: Any = None  # refused, as DeepSeek's API refuses it

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
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # with logprobs: the likeliest per token
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    metadata: Any = None
    store: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None

    def chat(self) -> list[dict]:
        """The messages as the chat template takes them (developer is system)."""
        return [{"role": ROLES[m.role], "content": m.content} for m in self.messages]


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
