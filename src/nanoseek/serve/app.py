"""The HTTP API: OpenAI's endpoints, with DeepSeek's `reasoning_content` beside `content`.

One thread runs the engine, which is not thread-safe (`EngineLoop`): between steps it takes
the new requests and the aborts, then `Engine.step` decodes one token for every running
completion at once (continuous batching) and each request's tokens go to that request's
asyncio queue. The event loop only parses, validates and writes responses, so a slow client
never holds up the batch, and a client that goes away is aborted before the next step: its
cache row goes to the next waiting request.

Every error is an OpenAI-style body, `{"error": {"message", "type", "param", "code"}}`. No request
makes a 500 or stalls the others: the body is strict JSON (no NaN, no lone surrogate, at most 200
deep), a prompt whose size alone says it cannot fit is refused before it is tokenized, and prompts
are tokenized in worker threads that let go of the interpreter lock.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from pydantic_core import from_json
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from tokenizers import pre_tokenizers

from nanoseek.data.chat import BOS
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.infer.engine import CompletionOutput, Engine, PromptLogprobs, StreamEvent, opens_reasoning
from nanoseek.infer.sampling import SamplingParams
from nanoseek.serve.logprobs import (
    ReasoningTokens,
    TextOffsets,
    TokenStrings,
    chat_entry,
    chat_logprobs,
    completion_logprobs,
    join_logprobs,
)
from nanoseek.serve.protocol import (
    REASONING_EFFORT,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
    parse,
)
from nanoseek.serve.structured import chat_output, prompt_messages

log = logging.getLogger("nanoseek.serve")

MAX_BODY_BYTES = 4 << 20
# A temperature or top_p below is greedy: for a temperature its limit (vLLM draws the line at 1e-5),
# for top_p the same tokens (with under a million in the vocabulary, the most likely holds more).
# Smaller ones overflow the logits divided by them or round to 0 in float32: the step would fail.
GREEDY_BELOW = 1e-6


# ---------------------------------------------------------------------------------------
# The engine thread.
# ---------------------------------------------------------------------------------------
@dataclass
class Job:
    """One API request in the engine: `n` completions of each of its `prompts` (a completions
    batch has several), as the event loop sees them. Each prompt is one engine request; prompt p's
    completion j is choice p * n + j, as OpenAI numbers a batch's choices."""

    request_id: str
    n: int
    prompt_tokens: int  # all prompts together
    loop: asyncio.AbstractEventLoop
    prompts: int = 1
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # lists of StreamEvents, or an exception
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    outputs: dict[int, CompletionOutput] = field(default_factory=dict)  # by choice
    prompt_logprobs: dict[int, PromptLogprobs] = field(default_factory=dict)  # by prompt, when asked for
    cached_tokens: dict[int, int] = field(default_factory=dict)  # by prompt: its tokens from the prefix cache
    released: bool = False

    @property
    def choices(self) -> int:
        return self.n * self.prompts

    @property
    def engine_ids(self) -> list[str]:
        return [self.request_id] if self.prompts == 1 else [f"{self.request_id}-{p}" for p in range(self.prompts)]

    @property
    def done(self) -> bool:
        return len(self.outputs) == self.choices

    def usage(self) -> dict:
        """OpenAI's usage, with the prompt tokens the prefix cache held as DeepSeek's API reports
        them (prompt_cache_hit_tokens + prompt_cache_miss_tokens = prompt_tokens) and as OpenAI's
        (prompt_tokens_details.cached_tokens)."""
        outs = self.outputs.values()
        completion = sum(len(o.token_ids) for o in outs)
        cached = sum(self.cached_tokens.values())
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_cache_hit_tokens": cached,
            "prompt_cache_miss_tokens": self.prompt_tokens - cached,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": sum(o.reasoning_tokens for o in outs)},
        }


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if not future.done():  # the waiting handler may have been cancelled
        future.set_exception(error) if error is not None else future.set_result(None)


class EngineLoop:
    """Owns the engine: one thread steps it; coroutines submit, read and release jobs."""

    def __init__(self, engine: Engine, max_queue: int = 256):
        self.engine = engine
        self.capacity = engine.max_batch_size + max_queue  # completions in the batch or waiting for a row
        self.pending = 0  # completions accepted and not released (event-loop side)
        self.waiting = self.running = 0  # the engine's state after its last step, for /metrics
        self.steps, self.step_seconds = 0, 0.0
        self._commands: deque = deque()  # appended by the event loop, popped by the engine thread
        self._wake = threading.Event()
        self._jobs: dict[str, tuple[Job, int]] = {}  # engine-thread side: engine request id -> (job, prompt)
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- the event loop's side ---------------------------------------------------
    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def submit(self, request_id: str, prompts: list[list[int]], params: SamplingParams) -> Job:
        """Queue a request of one or more prompts; returns once the engine has taken all of them
        (raises what `add_request` raised, and then holds none of them)."""
        loop = asyncio.get_running_loop()
        job = Job(request_id, params.n, sum(map(len, prompts)), loop, len(prompts))
        accepted = loop.create_future()
        self.pending += job.choices
        self._command(("add", job, prompts, params, accepted))
        try:
            await accepted
        except BaseException:
            self.release(job)
            raise
        return job

    async def events(self, job: Job) -> AsyncIterator[StreamEvent]:
        while not job.done:
            item = await job.queue.get()
            if isinstance(item, BaseException):
                raise ApiError(500, f"the engine failed while running this request: {item}", code="engine_error")
            if job.first_token is None:
                job.first_token = time.perf_counter()
            for event in item:
                if event.output is not None:
                    job.outputs[event.index] = event.output
                if event.prompt_logprobs is not None:
                    job.prompt_logprobs[event.index // job.n] = event.prompt_logprobs
                job.cached_tokens[event.index // job.n] = event.num_cached_tokens
                yield event

    def release(self, job: Job) -> None:
        """The request's handler is done with it: abort what is still running, free its place."""
        if job.released:
            return
        job.released = True
        self.pending -= job.choices
        if not job.done:
            self._command(("abort", job))

    def _command(self, command: tuple) -> None:
        self._commands.append(command)
        self._wake.set()

    # ---- the engine thread ---------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                self._apply_commands()
                if self._stopping:
                    break
                self.waiting, self.running = len(self.engine.waiting), len(self.engine.running)
                if not self.engine.has_unfinished():
                    self._wake.wait()
                    continue
                self._step()
            except Exception as e:  # a bug or a lost device: fail the requests in flight, keep serving
                log.exception("engine step failed; failing the %d requests in flight", len(self._jobs))
                self._fail_all(e)
        self._fail_all(RuntimeError("the server is shutting down"))

    def _step(self) -> None:
        start = time.perf_counter()
        events = self.engine.step()
        self.steps += 1
        self.step_seconds += time.perf_counter() - start
        by_request: dict[str, list[StreamEvent]] = defaultdict(list)
        for event in events:
            by_request[event.request_id].append(event)
        for request_id, batch in by_request.items():
            if request_id not in self._jobs:
                continue
            job, p = self._jobs[request_id]
            if request_id not in self.engine.requests:  # all its completions are finished
                del self._jobs[request_id]
            if p:  # the engine numbers each prompt's completions from 0; the choices go on counting
                batch = [replace(e, index=p * job.n + e.index) for e in batch]
            self._deliver(job, batch)

    def _apply_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            if command[0] == "add":
                _, job, prompts, params, accepted = command
                added = []
                try:
                    for request_id, ids in zip(job.engine_ids, prompts):
                        self.engine.add_request(ids, params, request_id)
                        added.append(request_id)
                except Exception as e:
                    for request_id in added:
                        self.engine.abort(request_id)
                    self._call(job, _settle, accepted, e)
                else:
                    for p, request_id in enumerate(added):
                        self._jobs[request_id] = (job, p)
                    self._call(job, _settle, accepted, None)
            else:
                for request_id in command[1].engine_ids:
                    self._jobs.pop(request_id, None)
                    self.engine.abort(request_id)

    def _fail_all(self, error: BaseException) -> None:
        jobs = {}
        for request_id, (job, _) in list(self._jobs.items()):
            try:
                self.engine.abort(request_id)
            except Exception:
                log.exception("abort of %s failed", request_id)
            jobs[job.request_id] = job
        for job in jobs.values():
            self._deliver(job, error)
        self._jobs.clear()

    def _deliver(self, job: Job, item) -> None:
        self._call(job, job.queue.put_nowait, item)

    @staticmethod
    def _call(job: Job, fn, *args) -> None:
        try:
            job.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass


# ---------------------------------------------------------------------------------------
# Request parsing.
# ---------------------------------------------------------------------------------------
def too_long(max_seq_len: int, tokens: str, param: str) -> ApiError:
    return ApiError(
        400,
        f"This model's maximum context length is {max_seq_len} tokens, and the prompt has {tokens}: shorten it",
        param,
        "context_length_exceeded",
    )


def token_bytes_bound(tokenizer: Tokenizer) -> int | None:
    """The most bytes of text that one token stands for, so that a text has at least
    bytes / bound tokens: a prompt that cannot fit in the context is refused by its size, before
    seconds of tokenizing. Sound where every byte of the text lands in a token: byte-level BPE
    (each of the 256 bytes is in the vocabulary, spelt as one character) with no normalizer
    (which may shrink a text), pre-tokenizers that only split it (none that drops spaces) and
    added tokens that take no whitespace beside them, as DeepSeek's and nanoseek's tokenizers.
    None for any other tokenizer: its prompts are only counted by tokenizing them."""
    spec = json.loads(tokenizer.backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if (
        spec.get("normalizer") is not None
        or (spec.get("model") or {}).get("type") != "BPE"
        or not any(p.get("type") == "ByteLevel" for p in parts)
        or not all(
            p.get("type") in ("ByteLevel", "Digits", "Split", "Punctuation") and p.get("behavior") != "Removed"
            for p in parts
        )
        or any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens") or [])
        or not set(pre_tokenizers.ByteLevel.alphabet()) <= vocab.keys()
    ):
        return None
    # A byte-level token's characters are its bytes; counting UTF-8 bytes overcounts them (never
    # under), and counts an added token's text exactly.
    return max(len(s.encode()) for s in vocab)


def parse_sampling(
    req: SamplingRequest,
    prompt_tokens: int,
    max_seq_len: int,
    prompt_param: str = "messages",
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    grammar: str | None = None,
) -> tuple[SamplingParams, bool, bool]:
    """(SamplingParams, stream, include_usage) of a validated request (`prompt_tokens`: its longest
    prompt's); ApiError 400 for what depends on more than one parameter (the context length,
    stream_options without stream). `logprobs` and `prompt_logprobs`: the top-n the endpoint asks
    the engine for (SamplingParams' fields of those names); `grammar`: the one the completion
    follows (nanoseek.serve.structured). `reasoning_effort` is a thinking budget (REASONING_EFFORT)."""
    stream = bool(req.stream)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if include_usage and not stream:
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options", "invalid_value")
    name, max_tokens = "max_tokens", req.max_tokens
    if getattr(req, "max_completion_tokens", None) is not None:
        name, max_tokens = "max_completion_tokens", req.max_completion_tokens
    if prompt_tokens >= max_seq_len:
        raise too_long(max_seq_len, str(prompt_tokens), prompt_param)
    if max_tokens is not None and prompt_tokens + max_tokens > max_seq_len:
        raise ApiError(
            400,
            f"This model's maximum context length is {max_seq_len} tokens, but you requested "
            f"{prompt_tokens + max_tokens} ({prompt_tokens} in the prompt, {max_tokens} for the "
            f"completion): lower '{name}' or shorten the prompt",
            name,
            "context_length_exceeded",
        )

    def given(value, default):
        return default if value is None else value

    temperature, top_p = float(given(req.temperature, 1.0)), float(given(req.top_p, 1.0))
    if temperature < GREEDY_BELOW or top_p < GREEDY_BELOW:
        temperature, top_p = 0.0, 1.0
    try:
        params = SamplingParams(
            n=given(req.n, 1),
            temperature=temperature,
            top_p=top_p,
            top_k=given(req.top_k, 0),
            max_tokens=max_tokens,
            stop=req.stop,
            seed=req.seed,
            max_thinking_tokens=(
                REASONING_EFFORT[req.reasoning_effort]
                if getattr(req, "reasoning_effort", None) is not None
                else req.max_reasoning_tokens
            ),
            grammar=grammar,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    except NanoseekError as e:  # what the checks above missed
        raise ApiError(400, str(e), None, "invalid_value") from None
    return params, stream, include_usage


def completion_prompts(prompt, vocab_size: int) -> tuple[list[str | list[int]], list[str]]:
    """The prompts of a completions request as OpenAI reads `prompt` (a string, a list of strings,
    a list of token ids, or a list of token-id lists: a batch), and how each is named in errors
    ("prompt", "prompt[2]"); ApiError 400 naming the first that is not one."""

    def is_id(t) -> bool:
        return isinstance(t, int) and not isinstance(t, bool)

    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(map(is_id, prompt))):
        batch, names = [prompt], ["prompt"]
    elif isinstance(prompt, list) and prompt and any(all(isinstance(x, k) for x in prompt) for k in (str, list)):
        batch, names = prompt, [f"prompt[{i}]" for i in range(len(prompt))]
    else:
        raise ApiError(
            400,
            "'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists",
            "prompt",
            "invalid_value",
        )
    for item, name in zip(batch, names):
        if isinstance(item, str):
            if not item:
                raise ApiError(400, f"'{name}' must not be empty", name, "invalid_value")
        elif not item or not all(is_id(t) and 0 <= t < vocab_size for t in item):
            raise ApiError(
                400, f"'{name}' must be a non-empty list of token ids in [0, {vocab_size})", name, "invalid_value"
            )
    return batch, names


def _finish_reason(reason: str | None, tool_calls: list | None = None) -> str | None:
    """OpenAI's finish_reason: "tool_calls" for a completion that ended after calling tools."""
    if reason is None:
        return None
    return "length" if reason == "length" else "tool_calls" if tool_calls else "stop"


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class _EventStream(StreamingResponse):
    """A server-sent-event response that releases its job however it ends (a client that
    disconnects cancels the response, possibly between two chunks)."""

    def __init__(self, content, on_close):
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: only a disconnect comes next)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------------------------------
# Metrics (prometheus_client, in a registry of the app's own: apps in one process do not mix).
# ---------------------------------------------------------------------------------------
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")
# No `*_created` series beside each counter and histogram: the exposition has the series that
# dashboards read, nothing more. (prometheus_client has this switch for the whole process only.)
disable_created_metrics()


class _EngineCounters(Collector):
    """The engine thread's step counters, read at each scrape."""

    def __init__(self, loop: EngineLoop):
        self.loop = loop

    def collect(self):
        yield CounterMetricFamily(
            "nanoseek_engine_steps", "Engine steps (one decoded token per running completion).", value=self.loop.steps
        )
        yield CounterMetricFamily(
            "nanoseek_engine_step_seconds", "Time spent in engine steps.", value=self.loop.step_seconds
        )


class Metrics:
    def __init__(self, loop: EngineLoop):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "nanoseek_requests", "HTTP requests by path and status code.", ["path", "status"], registry=registry
        )
        self.tokens = Counter(
            "nanoseek_tokens",
            "Tokens of finished requests: prompt (split into prompt_cache_hit, from the prefix cache, and "
            "prompt_cache_miss), completion, and the reasoning part of completion.",
            ["kind"],
            registry=registry,
        )
        for kind in ("prompt", "completion", "reasoning", "prompt_cache_hit", "prompt_cache_miss"):
            self.tokens.labels(kind)  # shown from the start, at 0
        self.prompt_cache = (0, 0)  # the prompt tokens counted as prompt_cache_hit and prompt_cache_miss
        prefix = loop.engine.prefix_cache
        for name, help_, read in (
            (
                "nanoseek_prompt_cache_hit_rate",
                "Share of the finished requests' prompt tokens taken from the prefix cache.",
                self.hit_rate,
            ),
            (
                "nanoseek_prefix_cache_tokens",
                "Tokens the prefix cache holds.",
                lambda: 0 if prefix is None else prefix.tokens,
            ),
            (
                "nanoseek_prefix_cache_capacity_tokens",
                "Tokens the prefix cache can hold (0: no prefix cache).",
                lambda: 0 if prefix is None else prefix.capacity * prefix.block_size,
            ),
            ("nanoseek_queue_length", "Completions waiting for a row of the batch.", lambda: loop.waiting),
            ("nanoseek_running", "Completions in the batch.", lambda: loop.running),
            ("nanoseek_pending", "Completions accepted and not yet answered.", lambda: loop.pending),
            ("nanoseek_capacity", "Completions accepted before answering 429.", lambda: loop.capacity),
        ):
            Gauge(name, help_, registry=registry).set_function(read)
        registry.register(_EngineCounters(loop))
        self.latency = Histogram(
            "nanoseek_request_duration_seconds", "HTTP request latency.", buckets=BUCKETS, registry=registry
        )
        self.ttft = Histogram(
            "nanoseek_time_to_first_token_seconds",
            "From a completion request's arrival to its first token.",
            buckets=BUCKETS,
            registry=registry,
        )

    def request(self, path: str, status: int, seconds: float) -> None:
        self.requests.labels(path, str(status)).inc()
        self.latency.observe(seconds)

    def finished(self, job: Job) -> None:
        usage = job.usage()
        self.tokens.labels("prompt").inc(usage["prompt_tokens"])
        self.tokens.labels("completion").inc(usage["completion_tokens"])
        self.tokens.labels("reasoning").inc(usage["completion_tokens_details"]["reasoning_tokens"])
        hit, miss = usage["prompt_cache_hit_tokens"], usage["prompt_cache_miss_tokens"]
        self.tokens.labels("prompt_cache_hit").inc(hit)
        self.tokens.labels("prompt_cache_miss").inc(miss)
        self.prompt_cache = (self.prompt_cache[0] + hit, self.prompt_cache[1] + miss)
        if job.first_token is not None:
            self.ttft.observe(job.first_token - job.started)

    def hit_rate(self) -> float:
        hit, miss = self.prompt_cache
        return hit / (hit + miss) if hit + miss else 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _MetricsMiddleware:
    """Counts every HTTP request by route and status, and times it (streams included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.request(path, status[0], time.perf_counter() - start)


# ---------------------------------------------------------------------------------------
# The app.
# ---------------------------------------------------------------------------------------
def create_app(
    engine: Engine, model_name: str = "nanoseek", api_key: str | None = None, max_queue: int = 256
) -> FastAPI:
    """The API over `engine` (which needs a tokenizer). `api_key`: required as `Authorization:
    Bearer KEY` on /v1/*. `max_queue`: completions that may wait for a row before 429."""
    if engine.tokenizer is None:
        raise NanoseekError("the server needs a tokenizer: the model directory has no tokenizer.json")
    tokenizer = engine.tokenizer
    strings = TokenStrings(tokenizer)
    loop = EngineLoop(engine, max_queue)
    metrics = Metrics(loop)
    page = (resources.files("nanoseek.serve") / "static" / "index.html").read_text(encoding="utf-8")
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        loop.start()
        try:
            yield
        finally:
            loop.stop()

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine_loop, app.state.metrics = loop, metrics
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        message = {
            404: f"no route {request.method} {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(e.status_code, str(e.detail))
        return ApiError(e.status_code, message, code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return ApiError(500, f"internal server error ({type(e).__name__})", code="internal_error").response()

    # ---- helpers shared by the endpoints --------------------------------------------
    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "Missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(
                401, "Incorrect API key provided", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
            )

    async def read_body(request: Request, schema):
        """The JSON body, for this server's model, as `schema` (protocol.py): ApiError when it is not."""
        try:
            declared = int(request.headers.get("content-length") or 0)
        except ValueError:
            raise ApiError(400, "bad Content-Length header", code="invalid_request") from None
        if declared > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", code="request_too_large")
        raw = bytearray()
        try:
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > MAX_BODY_BYTES:
                    raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", code="request_too_large")
        except ClientDisconnect:  # nobody to answer: one line in the log, not a traceback
            log.warning(
                "%s %s: the client hung up after %d of %s bytes of the body",
                request.method,
                request.url.path,
                len(raw),
                declared or "?",
            )
            raise ApiError(499, "the client closed the request", code="client_closed") from None
        try:
            # RFC 8259 JSON in UTF-8, as pydantic parses it: no NaN or Infinity, no lone surrogate
            # ("\ud800", which no tokenizer takes), nesting at most 200 deep (no RecursionError).
            body = from_json(bytes(raw), allow_inf_nan=False)
        except ValueError as e:
            raise ApiError(
                400, f"We could not parse the JSON body of your request ({e})", code="invalid_json"
            ) from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if model is None:
            raise ApiError(400, "you must provide a model parameter", "model", "missing_model")
        if model != model_name:
            raise ApiError(
                404,
                f"The model {json.dumps(model)[:80]} does not exist; this server serves '{model_name}'",
                "model",
                "model_not_found",
            )
        return parse(schema, body)

    bytes_per_token = token_bytes_bound(tokenizer)

    async def encode(encoder, *args, text: str, param: str) -> list[int]:
        """`encoder(*args)`'s ids, after refusing a prompt whose size alone (`text`: the prompt
        as text, the template's part included) says it cannot fit: a 4 MB prompt is refused at
        once, not after seconds of tokenizing. In a worker thread: encode_chat and encode_plain
        run the tokenizer's batch encoder, which lets go of the interpreter lock, so the event
        loop and the engine go on meanwhile (its single-text `encode` holds the lock throughout:
        /health waited 5-6 s behind a 4 MB prompt)."""
        if bytes_per_token is not None:
            tokens = -(-len(text.encode()) // bytes_per_token)
            if tokens >= engine.max_seq_len:
                raise too_long(engine.max_seq_len, f"at least {tokens}", param)
        try:
            return await asyncio.to_thread(encoder, *args)
        except NanoseekError as e:
            raise ApiError(400, str(e), param, "invalid_value") from None

    async def start(body: SamplingRequest, prompts: list[list[int]], prefix: str, prompt_params: list[str], **logprobs):
        """Submit the request's prompts (`prompt_params`: how each is named in errors);
        (job, params, stream, include_usage). `logprobs`: parse_sampling's logprobs, prompt_logprobs, grammar."""
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
        params, stream, include_usage = parse_sampling(
            body, len(prompts[longest]), engine.max_seq_len, prompt_params[longest], **logprobs
        )
        choices = params.n * len(prompts)
        if choices > loop.capacity:
            asked = f"'n' = {params.n}" + (f" for {len(prompts)} prompts ({choices})" if len(prompts) > 1 else "")
            raise ApiError(400, f"{asked} is more than this server ever holds ({loop.capacity})", "n", "invalid_value")
        if not loop.alive:
            raise ApiError(503, "the engine is not running", code="engine_down", headers={"Retry-After": "5"})
        if loop.pending + choices > loop.capacity:
            raise ApiError(
                429,
                f"the server is full ({loop.pending} completions pending): retry shortly",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        try:
            job = await loop.submit(request_id, prompts, params)
        except NanoseekError as e:
            raise ApiError(400, str(e), code="invalid_value") from None
        return job, params, stream, include_usage

    def finish(job: Job) -> None:
        if not job.released:
            if job.done:
                metrics.finished(job)
            loop.release(job)

    async def collect(job: Job, request: Request, on_event) -> None:
        """Run a non-streaming job to its end; abort it if the client goes away first."""

        async def consume():
            async for event in loop.events(job):
                on_event(event)

        consumer = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not consumer.done():
                raise ApiError(499, "the client closed the request", code="client_closed")
            consumer.result()
        finally:
            consumer.cancel()
            watcher.cancel()
            finish(job)

    async def stream_events(job: Job, include_usage: bool, render, chunk, first=()):
        """The SSE body: the `first` chunks, then `render(event)`'s chunks of each event, the
        usage chunk when asked for, and [DONE]."""
        try:
            for data in first:
                yield _sse(data)
            async for event in loop.events(job):
                for data in render(event):
                    yield _sse(data)
            if include_usage:
                yield _sse(chunk([], job.usage()))
        except ApiError as e:
            yield _sse(e.body())
        except Exception as e:  # the headers are sent: the error goes in the stream
            log.exception("unexpected error while streaming %s", job.request_id)
            yield _sse(ApiError(500, f"internal server error ({type(e).__name__})", code="internal_error").body())
        yield _sse("[DONE]")

    # ---- endpoints ------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        if not loop.alive:
            raise ApiError(503, "the engine thread is not running", code="engine_down", headers={"Retry-After": "5"})
        return {
            "status": "ok",
            "model": model_name,
            "running": loop.running,
            "waiting": loop.waiting,
            "pending": loop.pending,
        }

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "nanoseek",
            "max_model_len": engine.max_seq_len,
        }

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        authorize(request)
        if name != model_name:
            raise ApiError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        """OpenAI's chat completions. With `logprobs: true` each choice's `logprobs` holds the
        generated tokens' log-probs and `top_logprobs` likeliest: the answer's in `content`, the
        reasoning's in `reasoning_content` (nanoseek.serve.logprobs.ReasoningTokens), streamed too.
        `thinking`, `response_format`, `tools` and `tool_choice`: nanoseek.serve.structured; the
        answer's tool calls come back as `tool_calls` (streamed as each call completes)."""
        authorize(request)
        body = await read_body(request, ChatCompletionRequest)
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs' set to true", "top_logprobs", "invalid_value")
        top = (body.top_logprobs or 0) if body.logprobs else None
        plan = chat_output(body, tokenizer)
        messages = prompt_messages(body, tokenizer)
        try:  # in the format the model was trained with; the messages' text is only text
            text = tokenizer.format_chat(messages, tools=plan.tools, thinking=plan.thinking)
        except NanoseekError as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None
        ids = await encode(
            lambda m: tokenizer.encode_chat(m, tools=plan.tools, thinking=plan.thinking),
            messages,
            text=text,
            param="messages",
        )
        job, params, stream, include_usage = await start(
            body, [ids], "chatcmpl", ["messages"], logprobs=top, grammar=plan.grammar(tokenizer, ids)
        )
        head = {"id": job.request_id, "object": "chat.completion.chunk", "created": job.created, "model": model_name}
        opened = opens_reasoning(ids, engine.think_id, engine.end_think_id)

        def chunk(choices: list, usage=None) -> dict:
            return {**head, "choices": choices, **({"usage": usage} if include_usage else {})}

        if stream:
            parts = [ReasoningTokens(opened, engine.think_id, engine.end_think_id) for _ in range(params.n)]
            readers = [plan.reader() for _ in range(params.n)]

            def render(event: StreamEvent):
                # the engine's reasoning splitter: the deltas add up to the non-streamed message
                reader = readers[event.index]
                reasoning = event.reasoning
                content, calls = reader.feed(event.answer, final=event.finish_reason is not None)
                delta = (
                    {"content": content or None, "reasoning_content": reasoning or None}
                    if (reasoning or content)
                    else {}
                )
                if calls:
                    delta["tool_calls"] = calls
                logprobs = None
                if top is not None and event.token_id is not None:  # every token, its text shown yet or not
                    entry = chat_entry(strings, event.token_id, event.logprob, event.top_logprobs)
                    logprobs = chat_logprobs([(parts[event.index].feed(event.token_id), entry)])
                finish = _finish_reason(event.finish_reason, reader.calls)
                if delta or finish or logprobs:
                    yield chunk([{"index": event.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])

            roles = [
                chunk(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
                for i in range(params.n)
            ]
            return _EventStream(stream_events(job, include_usage, render, chunk, roles), lambda: finish(job))

        await collect(job, request, lambda e: None)

        def logprobs_of(out: CompletionOutput) -> dict | None:
            if top is None:
                return None
            part = ReasoningTokens(opened, engine.think_id, engine.end_think_id)
            return chat_logprobs(
                [
                    (part.feed(t), chat_entry(strings, t, lp, pairs))
                    for t, lp, pairs in zip(out.token_ids, out.logprobs, out.top_logprobs)
                ]
            )

        def message_of(out: CompletionOutput) -> tuple[dict, list[dict]]:
            content, calls = plan.reader().feed(out.answer, final=True)
            calls = [{k: v for k, v in c.items() if k != "index"} for c in calls]  # a stream's field
            message = {
                "role": "assistant",
                "content": None if calls and not content else content,
                "reasoning_content": out.reasoning,
            }
            return ({**message, "tool_calls": calls} if calls else message), calls

        choices = []
        for i in range(params.n):
            message, calls = message_of(job.outputs[i])
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": logprobs_of(job.outputs[i]),
                    "finish_reason": _finish_reason(job.outputs[i].finish_reason, calls),
                }
            )
        return {
            "id": job.request_id,
            "object": "chat.completion",
            "created": job.created,
            "model": model_name,
            "choices": choices,
            "usage": job.usage(),
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        """OpenAI's legacy completions, as evaluation harnesses use them: a batch of prompts
        (prompt p's completion j is choice p * n + j), `echo`, and `logprobs: N` over the echoed
        prompt's tokens and the generated ones (nanoseek.serve.logprobs), streamed too;
        `max_tokens: 0` with `echo` scores the prompt and generates nothing. Without `echo`,
        `max_tokens: 0` asks for nothing at all: a 400 that says to add `echo`, not an empty
        completion (either is defensible; the 400 tells a harness that forgot `echo`).
        The echo is the prompt as the model read it, decoded from its tokens: a text prompt's
        with the BOS the server puts before it, so that each token's `text_offset` points into
        the choice's text and `tokens` count as a tokenizer that adds BOS (transformers' for
        this model) counts them."""
        authorize(request)
        body = await read_body(request, CompletionRequest)
        echo, top = bool(body.echo), body.logprobs
        if body.max_tokens == 0 and not echo:
            raise ApiError(
                400,
                "'max_tokens' = 0 generates nothing: send it with 'echo': true to score the prompt",
                "max_tokens",
                "invalid_value",
            )
        batch, names = completion_prompts(body.prompt, engine.config.vocab_size)
        prompts = []
        for item, name in zip(batch, names):
            if isinstance(item, str):  # text, not control tokens: only BOS is added
                prompts.append(await encode(tokenizer.encode_plain, item, True, text=BOS + item, param=name))
            else:
                prompts.append(list(item))
        job, params, stream, include_usage = await start(
            body, prompts, "cmpl", names, logprobs=top, prompt_logprobs=top if echo else None
        )
        n = params.n
        echoed = [tokenizer.decode(ids) if echo else "" for ids in prompts]
        head = {"id": job.request_id, "object": "text_completion", "created": job.created, "model": model_name}

        def chunk(choices: list, usage=None) -> dict:
            return {**head, "choices": choices, **({"usage": usage} if include_usage else {})}

        def prompt_logprobs(p: int) -> dict:
            scored, offsets = job.prompt_logprobs[p], TextOffsets(strings)
            at = [offsets.add(t) for t in prompts[p]]
            return completion_logprobs(strings, prompts[p], scored.logprobs, scored.top_logprobs, at)

        if stream:
            cursors: dict[int, TextOffsets] = {}  # per choice, from its first event on

            def render(event: StreamEvent):
                i, p = event.index, event.index // n
                text, parts = event.text, []
                if i not in cursors:  # the choice's first event: the echo comes first
                    cursors[i] = TextOffsets(strings, len(echoed[p]))
                    text = echoed[p] + text
                    if echo and top is not None:
                        parts.append(prompt_logprobs(p))
                if top is not None and event.token_id is not None:
                    at = [cursors[i].add(event.token_id)]
                    parts.append(
                        completion_logprobs(strings, [event.token_id], [event.logprob], [event.top_logprobs], at)
                    )
                finish = _finish_reason(event.finish_reason)
                if text or finish or parts:
                    logprobs = join_logprobs(parts) if parts else None
                    yield chunk([{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}])

            return _EventStream(stream_events(job, include_usage, render, chunk), lambda: finish(job))

        texts = [[] for _ in range(job.choices)]
        await collect(job, request, lambda e: texts[e.index].append(e.text))

        def logprobs_of(i: int, text: str) -> dict | None:
            if top is None:
                return None
            p, out = i // n, job.outputs[i]
            offsets = TextOffsets(strings, len(echoed[p]))
            at = [min(offsets.add(t), len(text)) for t in out.token_ids]
            made = completion_logprobs(strings, out.token_ids, out.logprobs, out.top_logprobs, at)
            return join_logprobs([prompt_logprobs(p), made]) if echo else made

        choices = []
        for i in range(job.choices):
            text = echoed[i // n] + "".join(texts[i])
            choices.append(
                {
                    "index": i,
                    "text": text,
                    "logprobs": logprobs_of(i, text),
                    "finish_reason": _finish_reason(job.outputs[i].finish_reason),
                }
            )
        return {**head, "choices": choices, "usage": job.usage()}

    return app
