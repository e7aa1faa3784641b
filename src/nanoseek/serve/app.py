"""The HTTP API: OpenAI's endpoints, with DeepSeek's `reasoning_content` beside `content`.

One thread runs the engine, which is not thread-safe (`EngineLoop`): between steps it takes
the new requests and the aborts, then `Engine.step` decodes one token for every running
completion at once (continuous batching) and each request's tokens go to that request's
asyncio queue. The event loop only parses, validates and writes responses, so a slow client
never holds up the batch, and a client that goes away is aborted before the next step: its
cache row goes to the next waiting request.

Every error is an OpenAI-style body, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.data.chat import BOS, END_THINK, format_chat
from nanoseek.errors import NanoseekError
from nanoseek.infer.engine import CompletionOutput, Engine, StreamEvent
from nanoseek.infer.sampling import SamplingParams

log = logging.getLogger("nanoseek.serve")

MAX_BODY_BYTES = 4 << 20
MAX_N = 16
MAX_STOP = 4
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# OpenAI parameters the engine does not have: refused unless left at their neutral value.
UNSUPPORTED = {"tools": None, "functions": None, "tool_choice": None, "logprobs": False, "top_logprobs": None,
               "logit_bias": None, "echo": False, "suffix": None, "best_of": 1, "presence_penalty": 0,
               "frequency_penalty": 0}


class ApiError(Exception):
    """An error response: the status, an OpenAI-style body, and headers (Retry-After)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = ("rate_limit_error" if self.status == 429 else "server_error" if self.status >= 500
                else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------------------------------
# The engine thread.
# ---------------------------------------------------------------------------------------
@dataclass
class Job:
    """One API request in the engine: its `n` completions, as the event loop sees them."""

    request_id: str
    n: int
    prompt_tokens: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # lists of StreamEvents, or an exception
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    outputs: dict[int, CompletionOutput] = field(default_factory=dict)
    released: bool = False

    @property
    def done(self) -> bool:
        return len(self.outputs) == self.n

    def usage(self) -> dict:
        outs = self.outputs.values()
        completion = sum(len(o.token_ids) for o in outs)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
                "completion_tokens_details": {"reasoning_tokens": sum(o.reasoning_tokens for o in outs)}}


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
        self._jobs: dict[str, Job] = {}  # engine-thread side
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

    async def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Job:
        """Queue a request; returns once the engine has taken it (raises what `add_request` raised)."""
        loop = asyncio.get_running_loop()
        job = Job(request_id, params.n, len(prompt_ids), loop)
        accepted = loop.create_future()
        self.pending += params.n
        self._command(("add", job, prompt_ids, params, accepted))
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
                yield event

    def release(self, job: Job) -> None:
        """The request's handler is done with it: abort what is still running, free its place."""
        if job.released:
            return
        job.released = True
        self.pending -= job.n
        if not job.done:
            self._command(("abort", job.request_id))

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
            job = self._jobs.get(request_id)
            if job is None:
                continue
            if request_id not in self.engine.requests:  # all its completions are finished
                del self._jobs[request_id]
            self._deliver(job, batch)

    def _apply_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            if command[0] == "add":
                _, job, ids, params, accepted = command
                try:
                    self.engine.add_request(ids, params, job.request_id)
                except Exception as e:
                    self._call(job, _settle, accepted, e)
                else:
                    self._jobs[job.request_id] = job
                    self._call(job, _settle, accepted, None)
            else:
                self._jobs.pop(command[1], None)
                self.engine.abort(command[1])

    def _fail_all(self, error: BaseException) -> None:
        for request_id, job in list(self._jobs.items()):
            try:
                self.engine.abort(request_id)
            except Exception:
                log.exception("abort of %s failed", request_id)
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
def _number(body: dict, name: str, default, lo: float, hi: float | None, integer: bool = False,
            lo_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    shown = json.dumps(value)[:40]
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {shown}", name,
                       "invalid_type")
    if value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
        low = f"{'>' if lo_open else '>='} {lo}"
        raise ApiError(400, f"'{name}' = {shown} is out of range: expected {low}" +
                       (f" and <= {hi}" if hi is not None else ""), name, "invalid_value")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {json.dumps(value)[:40]}", name, "invalid_type")
    return value


def parse_sampling(body: dict, prompt_tokens: int, max_seq_len: int, prompt_param: str = "messages"
                   ) -> tuple[SamplingParams, bool, bool]:
    """(SamplingParams, stream, include_usage) of a request body; ApiError 400 when out of range."""
    for name, neutral in UNSUPPORTED.items():
        if body.get(name) not in (None, neutral, [], {}):
            raise ApiError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = _flag(options or {}, "include_usage")
    if include_usage and not stream:
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options",
                       "invalid_value")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)
                             or len(stop) > MAX_STOP):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop",
                       "invalid_value")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, None, 1, None, integer=True)
    if prompt_tokens >= max_seq_len:
        raise ApiError(400, f"This model's maximum context length is {max_seq_len} tokens, and the prompt has "
                            f"{prompt_tokens}: shorten it", prompt_param, "context_length_exceeded")
    if max_tokens is not None and prompt_tokens + max_tokens > max_seq_len:
        raise ApiError(400, f"This model's maximum context length is {max_seq_len} tokens, but you requested "
                            f"{prompt_tokens + max_tokens} ({prompt_tokens} in the prompt, {max_tokens} for the "
                            f"completion): lower '{name}' or shorten the prompt", name, "context_length_exceeded")
    try:
        params = SamplingParams(
            n=_number(body, "n", 1, 1, MAX_N, integer=True),
            temperature=float(_number(body, "temperature", 1.0, 0, 2)),
            top_p=float(_number(body, "top_p", 1.0, 0, 1, lo_open=True)),
            top_k=_number(body, "top_k", 0, -1, None, integer=True),
            max_tokens=max_tokens,  # None: up to the context
            stop=stop,
            seed=_number(body, "seed", None, -2**63, 2**63 - 1, integer=True),
            max_thinking_tokens=_number(body, "max_reasoning_tokens", None, 0, None, integer=True),
        )
    except NanoseekError as e:  # what the checks above missed
        raise ApiError(400, str(e), None, "invalid_value") from None
    return params, stream, include_usage


def _message_text(i: int, content) -> str | None:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content",
                   "invalid_value")


def parse_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages",
                       "invalid_value")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            got = m.get("role") if isinstance(m, dict) else m
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {json.dumps(got)[:40]}",
                           f"messages[{i}].role", "invalid_value")
        message = {"role": ROLES[m["role"]], "content": _message_text(i, m.get("content"))}
        if m.get("reasoning_content") is not None:
            message["reasoning_content"] = m["reasoning_content"]
        out.append(message)
    return out


class MessageParts:
    """One completion's streamed text as reasoning and answer deltas. The chat prompt ends inside
    "<think>", so the text is reasoning up to "</think>" and the answer after it; a tail that
    could be the start of "</think>" waits for the next piece. Each part is trimmed as the whole
    message is (no whitespace at its start or end: trailing whitespace waits for more text), so
    the deltas add up to exactly the non-streamed message."""

    def __init__(self):
        self.thinking = True
        self.text = {"reasoning": "", "content": ""}
        self._pending = ""
        self._held = {"reasoning": "", "content": ""}

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """The (reasoning, content) deltas of the next piece of text; `final` on the last one."""
        self._pending += text
        reasoning = answer = ""
        if self.thinking:
            close = self._pending.find(END_THINK)
            if close >= 0:
                reasoning, answer = self._pending[:close], self._pending[close + len(END_THINK):]
                self.thinking, self._pending = False, ""
            else:
                keep = 0 if final else next((k for k in range(len(END_THINK) - 1, 0, -1)
                                             if self._pending.endswith(END_THINK[:k])), 0)
                cut = len(self._pending) - keep
                reasoning, self._pending = self._pending[:cut], self._pending[cut:]
        else:
            answer, self._pending = self._pending, ""
        return self._add("reasoning", reasoning), self._add("content", answer)

    def _add(self, part: str, piece: str) -> str:
        piece = self._held[part] + piece
        if not self.text[part]:
            piece = piece.lstrip()
        kept = piece.rstrip()
        self._held[part] = piece[len(kept):]
        self.text[part] += kept
        return kept


def _finish_reason(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class _EventStream(StreamingResponse):
    """A server-sent-event response that releases its job however it ends (a client that
    disconnects cancels the response, possibly between two chunks)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
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
# Metrics (Prometheus text format).
# ---------------------------------------------------------------------------------------
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


class Histogram:
    def __init__(self):
        self.counts, self.sum, self.count = [0] * len(BUCKETS), 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, b in enumerate(BUCKETS):
            if value <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(BUCKETS, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.count}"]


class Metrics:
    def __init__(self):
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.tokens = {"prompt": 0, "completion": 0, "reasoning": 0}
        self.latency, self.ttft = Histogram(), Histogram()

    def finished(self, job: Job) -> None:
        usage = job.usage()
        self.tokens["prompt"] += usage["prompt_tokens"]
        self.tokens["completion"] += usage["completion_tokens"]
        self.tokens["reasoning"] += usage["completion_tokens_details"]["reasoning_tokens"]
        if job.first_token is not None:
            self.ttft.observe(job.first_token - job.started)

    def render(self, loop: EngineLoop) -> str:
        lines = ["# HELP nanoseek_requests_total HTTP requests by path and status code.",
                 "# TYPE nanoseek_requests_total counter"]
        lines += [f'nanoseek_requests_total{{path="{p}",status="{s}"}} {n}'
                  for (p, s), n in sorted(self.requests.items())]
        lines += ["# HELP nanoseek_tokens_total Tokens of finished requests: prompt, completion, and the reasoning "
                  "part of completion.", "# TYPE nanoseek_tokens_total counter"]
        lines += [f'nanoseek_tokens_total{{kind="{k}"}} {v}' for k, v in self.tokens.items()]
        for name, value, help_ in (
                ("nanoseek_queue_length", loop.waiting, "Completions waiting for a row of the batch."),
                ("nanoseek_running", loop.running, "Completions in the batch."),
                ("nanoseek_pending", loop.pending, "Completions accepted and not yet answered."),
                ("nanoseek_capacity", loop.capacity, "Completions accepted before answering 429."),
        ):
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {value}"]
        lines += ["# HELP nanoseek_engine_steps_total Engine steps (one decoded token per running completion).",
                  "# TYPE nanoseek_engine_steps_total counter", f"nanoseek_engine_steps_total {loop.steps}",
                  "# HELP nanoseek_engine_step_seconds_total Time spent in engine steps.",
                  "# TYPE nanoseek_engine_step_seconds_total counter",
                  f"nanoseek_engine_step_seconds_total {loop.step_seconds:.6f}"]
        for name, hist, help_ in (("nanoseek_request_duration_seconds", self.latency, "HTTP request latency."),
                                  ("nanoseek_time_to_first_token_seconds", self.ttft,
                                   "From a completion request's arrival to its first token.")):
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"] + hist.lines(name)
        return "\n".join(lines) + "\n"


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
            self.metrics.requests[path, status[0]] += 1
            self.metrics.latency.observe(time.perf_counter() - start)


# ---------------------------------------------------------------------------------------
# The app.
# ---------------------------------------------------------------------------------------
def create_app(engine: Engine, model_name: str = "nanoseek", api_key: str | None = None,
               max_queue: int = 256) -> FastAPI:
    """The API over `engine` (which needs a tokenizer). `api_key`: required as `Authorization:
    Bearer KEY` on /v1/*. `max_queue`: completions that may wait for a row before 429."""
    if engine.tokenizer is None:
        raise NanoseekError("the server needs a tokenizer: the model directory has no tokenizer.json")
    tokenizer = engine.tokenizer
    loop = EngineLoop(engine, max_queue)
    metrics = Metrics()
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
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
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
            raise ApiError(401, "Missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> dict:
        try:
            declared = int(request.headers.get("content-length") or 0)
        except ValueError:
            raise ApiError(400, "bad Content-Length header", code="invalid_request") from None
        if declared > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", code="request_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", code="request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"We could not parse the JSON body of your request ({e})",
                           code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if model is None:
            raise ApiError(400, "you must provide a model parameter", "model", "missing_model")
        if model != model_name:
            raise ApiError(404, f"The model {json.dumps(model)[:80]} does not exist; this server serves "
                                f"'{model_name}'", "model", "model_not_found")
        return body

    async def encode(text: str) -> list[int]:
        """Token ids as the engine would encode the text; a long text in a worker thread, so that
        the event loop keeps serving the others meanwhile."""
        bos = not text.startswith(BOS)
        if len(text) < 16_384:
            return tokenizer.encode(text, bos=bos)
        return await asyncio.to_thread(tokenizer.encode, text, bos)

    async def start(body: dict, prompt_ids: list[int], prefix: str, prompt_param: str):
        params, stream, include_usage = parse_sampling(body, len(prompt_ids), engine.max_seq_len, prompt_param)
        if params.n > loop.capacity:
            raise ApiError(400, f"'n' = {params.n} is more than this server ever holds ({loop.capacity})", "n",
                           "invalid_value")
        if not loop.alive:
            raise ApiError(503, "the engine is not running", code="engine_down", headers={"Retry-After": "5"})
        if loop.pending + params.n > loop.capacity:
            raise ApiError(429, f"the server is full ({loop.pending} completions pending): retry shortly",
                           code="queue_full", headers={"Retry-After": "1"})
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        try:
            job = await loop.submit(request_id, prompt_ids, params)
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
        return {"status": "ok", "model": model_name, "running": loop.running, "waiting": loop.waiting,
                "pending": loop.pending}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(loop), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "nanoseek",
                "max_model_len": engine.max_seq_len}

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
        authorize(request)
        body = await read_body(request)
        try:
            text = format_chat(parse_messages(body.get("messages")))
        except NanoseekError as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None
        job, params, stream, include_usage = await start(body, await encode(text), "chatcmpl", "messages")
        parts = [MessageParts() for _ in range(params.n)]
        head = {"id": job.request_id, "object": "chat.completion.chunk", "created": job.created, "model": model_name}

        def chunk(choices: list, usage=None) -> dict:
            return {**head, "choices": choices, **({"usage": usage} if include_usage else {})}

        if stream:
            def render(event: StreamEvent):
                reasoning, content = parts[event.index].feed(event.text, event.finish_reason is not None)
                delta = {"content": content or None, "reasoning_content": reasoning or None} if (
                    reasoning or content) else {}
                finish = _finish_reason(event.finish_reason)
                if delta or finish:
                    yield chunk([{"index": event.index, "delta": delta, "logprobs": None, "finish_reason": finish}])

            roles = [chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]) for i in range(params.n)]
            return _EventStream(stream_events(job, include_usage, render, chunk, roles), lambda: finish(job))

        await collect(job, request, lambda e: parts[e.index].feed(e.text, e.finish_reason is not None))
        choices = [{"index": i, "message": {"role": "assistant", "content": parts[i].text["content"],
                                            "reasoning_content": parts[i].text["reasoning"]},
                    "logprobs": None, "finish_reason": _finish_reason(job.outputs[i].finish_reason)}
                   for i in range(params.n)]
        return {"id": job.request_id, "object": "chat.completion", "created": job.created, "model": model_name,
                "choices": choices, "usage": job.usage()}

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str) and prompt:
            ids = await encode(prompt)
        elif isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < engine.config.vocab_size for t in prompt):
            ids = list(prompt)
        else:
            raise ApiError(400, "'prompt' must be one non-empty string or one list of token ids in "
                                f"[0, {engine.config.vocab_size}) (send several prompts as several requests)",
                           "prompt", "invalid_value")
        job, params, stream, include_usage = await start(body, ids, "cmpl", "prompt")
        texts = [[] for _ in range(params.n)]
        head = {"id": job.request_id, "object": "text_completion", "created": job.created, "model": model_name}

        def chunk(choices: list, usage=None) -> dict:
            return {**head, "choices": choices, **({"usage": usage} if include_usage else {})}

        if stream:
            def render(event: StreamEvent):
                finish = _finish_reason(event.finish_reason)
                if event.text or finish:
                    yield chunk([{"index": event.index, "text": event.text, "logprobs": None, "finish_reason": finish}])

            return _EventStream(stream_events(job, include_usage, render, chunk), lambda: finish(job))

        await collect(job, request, lambda e: texts[e.index].append(e.text))
        choices = [{"index": i, "text": "".join(texts[i]), "logprobs": None,
                    "finish_reason": _finish_reason(job.outputs[i].finish_reason)} for i in range(params.n)]
        return {**head, "choices": choices, "usage": job.usage()}

    return app
