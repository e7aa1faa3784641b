"""`nanoseek serve`: the official openai client against a running server on a tiny model,
reasoning_content apart from content, usage, n, seeds, stop sequences, errors, metrics, and
100 concurrent streams.

The model is random, with the output rows of the special tokens zeroed: decoding greedily it
never ends a completion nor closes its reasoning by itself, so every completion runs to
max_tokens, and with a thinking budget the split between reasoning and answer falls at a
known token. (Sampling can draw end-of-sequence: those tests fix a seed.)
Expected texts come from the engine in this process on the same checkpoint (greedy).
"""

import asyncio
import json
import socket
import statistics
import time

import httpx
import openai
import pytest

from nanoseek import ModelConfig, Transformer, save_pretrained
from nanoseek.data import format_chat
from nanoseek.infer import Engine, SamplingParams

from serve_support import (
    CONFIG,
    KEY,
    MESSAGES,
    MODEL,
    Server,
    engine_steps,
    expected_message,
    health,
    metric,
    reasoning_of,
    serve_in_thread,
    wait_idle,
)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("log") / "server.log", "--api-key", KEY, "--served-model-name", MODEL)
    yield s
    assert s.stop() == 0, s.log()
    assert "Traceback" not in s.log(), s.log()  # no request crashed a handler or the engine thread


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


# ---- chat completions ---------------------------------------------------------------------
def test_chat_returns_reasoning_apart_from_the_answer(client, engine, model_dir):
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=12, extra_body={"max_reasoning_tokens": 5}
    )
    message = r.choices[0].message
    reasoning, content, out = expected_message(engine, MESSAGES, max_tokens=12, max_thinking_tokens=5)
    assert reasoning and content  # the budget put </think> at token 6 of 12: both parts are there
    assert reasoning_of(message) == reasoning and message.content == content and message.role == "assistant"
    assert "</think>" not in message.content + reasoning_of(message)
    assert r.choices[0].finish_reason == "length" and r.object == "chat.completion" and r.model == MODEL
    prompt_tokens = len(engine.tokenizer.encode(format_chat(MESSAGES)))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        prompt_tokens,
        12,
        prompt_tokens + 12,
    )
    assert r.usage.completion_tokens_details.reasoning_tokens == 5 == out.reasoning_tokens  # before </think>
    # Without a budget this model never closes its reasoning: all of it is reasoning.
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=6)
    assert r.choices[0].message.content == "" and reasoning_of(r.choices[0].message)
    assert r.usage.completion_tokens_details.reasoning_tokens == 6


def test_chat_stream_sends_reasoning_deltas_then_content_deltas(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=24, extra_body={"max_reasoning_tokens": 10})
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    kinds, reasoning, content, finish = [], "", "", []
    for c in chunks[:-1]:
        (choice,) = c.choices
        if reasoning_of(choice.delta):
            kinds.append("r")
            reasoning += reasoning_of(choice.delta)
        if choice.delta.content:
            kinds.append("c")
            content += choice.delta.content
        finish.append(choice.finish_reason)
    assert kinds == sorted(kinds, reverse=True) and "r" in kinds and "c" in kinds  # r...r c...c
    assert kinds.count("r") > 2 and kinds.count("c") > 2, kinds  # token by token, not in one piece
    assert reasoning == reasoning_of(full.choices[0].message) and content == full.choices[0].message.content
    assert finish[-1] == "length" and not any(finish[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_n_completions_with_a_seed(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, temperature=1.0, max_tokens=8, n=3, seed=11)
    r = client.chat.completions.create(**kwargs)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [reasoning_of(c.message) for c in r.choices]
    assert len(set(texts)) > 1  # each completion samples on its own
    assert r.usage.completion_tokens == 24 and r.usage.completion_tokens_details.reasoning_tokens == 24
    again = client.chat.completions.create(**kwargs)
    assert [reasoning_of(c.message) for c in again.choices] == texts  # same seed, same samples
    streamed = {0: "", 1: "", 2: ""}
    finished = set()
    for c in client.chat.completions.create(**kwargs, stream=True):
        for choice in c.choices:
            streamed[choice.index] += reasoning_of(choice.delta) or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert [streamed[i] for i in range(3)] == texts and finished == {0, 1, 2}


def test_stop_sequences_cut_the_answer(client, engine):
    kwargs = dict(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=16, extra_body={"max_reasoning_tokens": 4})
    full = client.chat.completions.create(**kwargs).choices[0].message
    raw = expected_message(engine, MESSAGES, max_tokens=16, max_thinking_tokens=4)[2].text
    answer_at = raw.index("</think>") + len("</think>")
    # a two-character piece of the answer whose first appearance in the whole output is in the answer
    stop = next(
        full.content[i : i + 2]
        for i in range(2, len(full.content) - 1)
        if raw.find(full.content[i : i + 2]) >= answer_at
    )
    for stops in (stop, ["never-appears", stop]):
        r = client.chat.completions.create(**kwargs, stop=stops)
        choice = r.choices[0]
        assert choice.finish_reason == "stop"
        assert choice.message.content == full.content[: full.content.index(stop)].strip()
        assert reasoning_of(choice.message) == reasoning_of(full)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**kwargs, stop=stop, stream=True)
        if c.choices
    )
    assert streamed == full.content[: full.content.index(stop)].strip()


def test_completions_endpoint_returns_the_raw_text(client, engine):
    out = engine.generate("3+4-2", SamplingParams(temperature=0, max_tokens=7))[0].outputs[0]
    r = client.completions.create(model=MODEL, prompt="3+4-2", temperature=0, max_tokens=7)
    assert r.choices[0].text == out.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(engine.tokenizer.encode("3+4-2", bos=True)), 7)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=MODEL, prompt="3+4-2", temperature=0, max_tokens=7, stream=True)
    )
    assert streamed == out.text
    ids = engine.tokenizer.encode("3+4-2", bos=True)
    assert client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=7).choices[0].text == out.text


def test_models_health_metrics_and_page(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert health(server.url)["status"] == "ok"
    metrics = httpx.get(server.url + "/metrics").text
    lines = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line and not line.startswith("#"))
    assert float(lines['nanoseek_requests_total{path="/v1/chat/completions",status="200"}']) >= 1
    assert float(lines['nanoseek_tokens_total{kind="completion"}']) > 0
    assert float(lines['nanoseek_tokens_total{kind="reasoning"}']) > 0
    assert float(lines["nanoseek_queue_length"]) == 0 and float(lines["nanoseek_pending"]) == 0
    assert float(lines["nanoseek_time_to_first_token_seconds_count"]) > 0
    assert "# TYPE nanoseek_request_duration_seconds histogram" in metrics
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "Thought for" in page.text


# ---- errors ---------------------------------------------------------------------------------
def post(server, body, key=KEY, path="/v1/chat/completions", raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        server.url + path, content=raw if raw is not None else json.dumps(body), headers=headers, timeout=30
    )


GOOD = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "temperature": 0}  # sampling could draw EOS
LONG = [{"role": "user", "content": "The quick brown fox jumps. " * 150}]  # > 512 tokens


@pytest.mark.parametrize(
    "body, status, param, code",
    [
        ({**GOOD, "model": "gpt-4"}, 404, "model", "model_not_found"),
        ({k: v for k, v in GOOD.items() if k != "model"}, 400, "model", "missing_model"),
        ({**GOOD, "temperature": 2.5}, 400, "temperature", "invalid_value"),
        ({**GOOD, "temperature": "hot"}, 400, "temperature", "invalid_type"),
        ({**GOOD, "top_p": 0}, 400, "top_p", "invalid_value"),
        ({**GOOD, "n": 0}, 400, "n", "invalid_value"),
        ({**GOOD, "n": True}, 400, "n", "invalid_type"),
        ({**GOOD, "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
        ({**GOOD, "max_reasoning_tokens": 1.5}, 400, "max_reasoning_tokens", "invalid_type"),
        ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
        ({**GOOD, "stop": [""]}, 400, "stop", "invalid_value"),
        ({**GOOD, "seed": "x"}, 400, "seed", "invalid_type"),
        ({**GOOD, "stream": "yes"}, 400, "stream", "invalid_type"),
        ({**GOOD, "stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value"),
        ({**GOOD, "logprobs": 1}, 400, "logprobs", "invalid_type"),
        ({**GOOD, "messages": []}, 400, "messages", "invalid_value"),
        ({**GOOD, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "invalid_value"),
        ({**GOOD, "messages": [{"role": "user", "content": 7}]}, 400, "messages[0].content", "invalid_value"),
        ({**GOOD, "messages": LONG}, 400, "messages", "context_length_exceeded"),
        (
            {**GOOD, "messages": [{"role": "user", "content": "3+4 " * 30_000}]},
            400,
            "messages",
            "context_length_exceeded",
        ),  # refused by its size, before tokenizing
        ({**GOOD, "max_tokens": 510}, 400, "max_tokens", "context_length_exceeded"),
        ({**GOOD, "max_completion_tokens": 0}, 400, "max_completion_tokens", "invalid_value"),
        ({**GOOD, "temperature": None, "n": 1.0}, 400, "n", "invalid_type"),
        (
            {**GOOD, "messages": [{"role": "user", "content": "hi", "name": "ann"}]},
            400,
            "messages[0].name",
            "unknown_parameter",
        ),
        ({**GOOD, "messages": ["hi"]}, 400, "messages[0]", "invalid_type"),
        (
            {**GOOD, "stream_options": {"include_usage": True, "other": 1}, "stream": True},
            400,
            "stream_options.other",
            "unknown_parameter",
        ),
        ({**GOOD, "temperatur": 0.5}, 400, "temperatur", "unknown_parameter"),  # OpenAI refuses unknown keys too
        ({**GOOD, "prediction": {"type": "content", "content": "x"}}, 400, "prediction", "unsupported_parameter"),
        (
            {**GOOD, "tools": [{"type": "function", "function": {"name": "f g"}}]},
            400,
            "tools[0].function.name",
            "invalid_value",
        ),
        ({**GOOD, "tool_choice": "auto"}, 400, "tool_choice", "invalid_value"),  # without tools
        ({**GOOD, "logit_bias": {"5": 10}}, 400, "logit_bias", "unsupported_parameter"),
        ({**GOOD, "functions": [{"name": "f"}]}, 400, "functions", "unsupported_parameter"),
        ({**GOOD, "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported_parameter"),
        ({**GOOD, "frequency_penalty": False}, 400, "frequency_penalty", "unsupported_parameter"),
        ({**GOOD, "top_logprobs": 2}, 400, "top_logprobs", "invalid_value"),  # without logprobs: true
        ({**GOOD, "user": "ann"}, 400, "user", "unsupported_parameter"),
        ({"model": MODEL, "prompt": "1+1", "echo": 1}, 400, "echo", "invalid_type"),
        ({"model": MODEL, "prompt": "1+1", "suffix": "x"}, 400, "suffix", "unsupported_parameter"),
        ({"model": MODEL, "prompt": "1+1", "best_of": 2}, 400, "best_of", "unsupported_parameter"),
        ({"model": MODEL, "prompt": "1+1", "messages": MESSAGES}, 400, "messages", "unknown_parameter"),
    ],
)
def test_bad_parameters_are_4xx_with_an_openai_error_body(server, body, status, param, code):
    r = post(server, body, path="/v1/completions" if "prompt" in body else "/v1/chat/completions")
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == (param, code) and error["message"] and error["type"]
    assert "Traceback" not in r.text


def test_unsupported_parameters_are_named_and_neutral_values_pass(server):
    r = post(server, {**GOOD, "audio": {"voice": "alloy"}})
    assert r.json()["error"] == {
        "message": "'audio' is not supported by this server",
        "type": "invalid_request_error",
        "param": "audio",
        "code": "unsupported_parameter",
    }
    r = post(server, {**GOOD, "temperatur": 0.5})
    assert r.json()["error"]["message"] == "Unrecognized request argument supplied: 'temperatur'"
    r = post(server, {**GOOD, "temperature": 2.5})
    assert r.json()["error"]["message"] == "'temperature' = 2.5 is out of range: expected <= 2.0"
    # What asks for nothing is not refused: the neutral value of a parameter, and null for any.
    neutral = {
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "response_format": {"type": "text"},
        "tools": [],
        "tool_choice": "none",
        "logprobs": False,
        "logit_bias": {},
        "seed": None,
        "stop": None,
        "n": None,
    }
    r = post(server, {**GOOD, **neutral})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    # OpenAI's list of text parts is the text they add up to; developer is system.
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "3+4-2?"}]},
    ]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3+4-2?"}]
    a, b = post(server, {**GOOD, "messages": parts}).json(), post(server, {**GOOD, "messages": plain}).json()
    cache = ("prompt_cache_hit_tokens", "prompt_cache_miss_tokens", "prompt_tokens_details")
    assert {k: v for k, v in a["usage"].items() if k not in cache} == {
        k: v for k, v in b["usage"].items() if k not in cache
    }
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    # the same prompt, token for token: b found all its whole blocks in the prefix cache
    assert b["usage"]["prompt_cache_hit_tokens"] == b["usage"]["prompt_tokens"] // 16 * 16 > 0
    r = post(server, {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    assert r.json()["error"]["message"] == "'messages[0].content' must be a string or a list of text parts"
    r = post(
        server,
        {"model": MODEL, "prompt": "1+1", "max_tokens": 2, "temperature": 0, "echo": False, "best_of": 1, "suffix": ""},
        path="/v1/completions",
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_bad_key_bad_json_bad_routes(server, client):
    for key, message in ((None, "Missing API key"), ("wrong", "Incorrect API key")):
        r = post(server, GOOD, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert message in r.json()["error"]["message"] and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="deepseek-reasoner", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=-1)
    for raw, words in (
        (b"{not json", "could not parse the JSON"),
        (b"[1, 2]", "JSON object"),
        (b"\xff\xfe", "could not parse the JSON"),
        (b"", "could not parse the JSON"),
    ):
        r = post(server, None, raw=raw)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    r = post(server, None, raw=b'{"model": "tiny", "pad": "' + b"x" * (5 << 20) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = post(server, {"model": MODEL, "prompt": [[1, 2], []]}, path="/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[1]"
    r = post(server, {"model": MODEL, "prompt": [5, 99999]}, path="/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["message"] == "no route GET /v1/nothing-here"
    r = httpx.get(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "error" in r.json()
    assert post(server, GOOD).status_code == 200  # still serving


# ---- load ------------------------------------------------------------------------------------
async def stream_one(server, i, max_tokens, stop_after=None):
    """One streamed chat over its own connection, read off the wire (HTTP/1.1 chunked framing,
    then server-sent events); returns (its chunks, seconds to the first token). `stop_after`:
    hang up after that many chunks."""
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"question {i}: {i}+{i}?"}],
            "temperature": 0,
            "max_tokens": max_tokens,
            "max_reasoning_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    host, port = server.url.removeprefix("http://").split(":")
    start, first, chunks, done = time.perf_counter(), None, [], False
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        assert (await reader.readline()).startswith(b"HTTP/1.1 200 ")
        headers = {}
        while (line := await reader.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        assert headers["content-type"].startswith("text/event-stream") and headers["transfer-encoding"] == "chunked"
        buffer = ""
        while size := int(await reader.readline(), 16):
            buffer += (await reader.readexactly(size + 2))[:-2].decode()
            while "\n\n" in buffer:
                event, buffer = buffer.split("\n\n", 1)
                assert event.startswith("data: ") and not done, event
                if event == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(event[len("data: ") :])
                assert "error" not in chunk, chunk
                delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
                if first is None and (delta.get("reasoning_content") or delta.get("content")):
                    first = time.perf_counter() - start
                chunks.append(chunk)
                if stop_after is not None and len(chunks) > stop_after:
                    return chunks, first
        assert done and buffer == "" and await reader.read() == b"\r\n", "the stream must end with data: [DONE]"
    finally:
        writer.close()
    return chunks, first


def test_load_100_concurrent_streams_then_clients_that_hang_up(server, engine):
    n, max_tokens = 100, 8
    prompts = [format_chat([{"role": "user", "content": f"question {i}: {i}+{i}?"}]) for i in range(n)]
    expected = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, max_thinking_tokens=3))

    steps = 0

    async def run():
        nonlocal steps
        start = time.perf_counter()
        results = await asyncio.gather(*[stream_one(server, i, max_tokens) for i in range(n)])
        took = time.perf_counter() - start
        # Then 20 clients ask for long answers and hang up after a few tokens.
        steps = engine_steps(server.url)
        dropped = await asyncio.gather(*[stream_one(server, 1000 + i, 400, stop_after=3) for i in range(20)])
        return results, took, dropped

    results, took, dropped = asyncio.run(run())
    ids = set()
    for out, (chunks, ttft) in zip(expected, results):
        ids |= {c["id"] for c in chunks}
        assert len({c["id"] for c in chunks}) == 1 and ttft is not None
        deltas = [c["choices"][0] for c in chunks if c["choices"]]
        reasoning = "".join(d["delta"].get("reasoning_content") or "" for d in deltas)
        content = "".join(d["delta"].get("content") or "" for d in deltas)
        want = out.outputs[0].text.partition("</think>")
        assert (reasoning, content) == (want[0].strip(), want[2].strip())  # this request's own tokens
        assert [d["finish_reason"] for d in deltas].count("length") == 1
        assert chunks[-1]["usage"]["completion_tokens"] == max_tokens
    assert len(ids) == n
    ttfts = sorted(t for _, t in results)
    print(
        f"\nload: {n} concurrent streams of {max_tokens} tokens in {took:.2f}s = {n / took:.1f} requests/s, "
        f"{n * max_tokens / took:.0f} tokens/s; time to first token mean {statistics.mean(ttfts) * 1000:.0f} ms, "
        f"p50 {ttfts[n // 2] * 1000:.0f} ms, p95 {ttfts[int(n * 0.95)] * 1000:.0f} ms"
    )
    assert all(len(chunks) == 4 for chunks, _ in dropped)  # role chunk + 3 tokens, then the client left
    # Served to the end, 20 x 400 tokens would take 800 steps at batch 16: hung-up clients are aborted.
    wait_idle(server.url)
    print(f"20 clients that hung up after 3 tokens of 400 took {engine_steps(server.url) - steps} engine steps")
    assert engine_steps(server.url) - steps < 100
    r = post(server, GOOD)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_non_streaming_client_that_hangs_up_is_aborted(server):
    steps = engine_steps(server.url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/chat/completions",
            json={**GOOD, "max_tokens": 490},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=httpx.Timeout(5, read=0.2),
        )
    wait_idle(server.url)
    assert engine_steps(server.url) - steps < 400  # not run to its 490 tokens
    assert metric(server.url, 'nanoseek_requests_total{path="/v1/chat/completions",status="499"}') >= 1


def test_a_client_that_hangs_up_mid_body_is_one_line_in_the_log(server):
    """Headers that promise 1000 bytes, 10 of them, then the socket closes: one line in the
    server's log (it was two tracebacks of some 60 lines each), a 499, and the server goes on."""
    status_499 = 'nanoseek_requests_total{path="/v1/chat/completions",status="499"}'
    before, seen = metric(server.url, status_499), len(server.log().splitlines())
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode()
            + b'{"model": '
        )
    deadline = time.monotonic() + 10
    while metric(server.url, status_499) == before:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    assert server.log().splitlines()[seen:] == [
        "POST /v1/chat/completions: the client hung up after 10 of 1000 bytes of the body"
    ]
    assert post(server, GOOD).status_code == 200


# ---- in-process: a full queue, a failing engine ------------------------------------------------


@pytest.fixture
def small_server(model_dir):
    """Room for 2 completions: 1 in the batch, 1 waiting."""
    engine = Engine.from_pretrained(model_dir, max_batch_size=1, max_seq_len=512)
    with serve_in_thread(engine, max_queue=1) as url:
        yield url, engine


def test_a_full_queue_answers_429_with_retry_after(small_server):
    url, engine = small_server
    long = {**GOOD, "max_tokens": 400, "stream": True}
    with httpx.Client(base_url=url, timeout=30) as c:
        with (
            c.stream("POST", "/v1/chat/completions", json=long) as first,
            c.stream("POST", "/v1/chat/completions", json=long) as second,
        ):
            assert first.status_code == second.status_code == 200
            assert health(url)["pending"] == 2
            r = c.post("/v1/chat/completions", json=GOOD)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
            r = c.post("/v1/chat/completions", json={**GOOD, "n": 3})
            assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        wait_idle(url)
        assert c.post("/v1/chat/completions", json=GOOD).status_code == 200


def test_an_engine_failure_fails_its_requests_and_the_server_goes_on(small_server, monkeypatch):
    url, engine = small_server
    real_step = engine.step

    def broken_step():
        monkeypatch.setattr(engine, "step", real_step)  # fails once
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "step", broken_step)
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/chat/completions", json=GOOD)
        assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "server_error"
        assert not engine.has_unfinished() and engine.free_slots == [0]
        monkeypatch.setattr(engine, "step", broken_step)
        with c.stream("POST", "/v1/chat/completions", json={**GOOD, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert r.status_code == 200 and "device lost" in lines[-2] and lines[-1] == "data: [DONE]"
        r = c.post("/v1/chat/completions", json=GOOD)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_metrics_of_two_apps_in_one_process_are_their_own(engine):
    """prometheus_client with a registry per app: the names, types and labels of the exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    from nanoseek.serve.app import create_app

    first, second = create_app(engine), create_app(engine)
    first.state.metrics.request("/health", 200, 0.02)
    families = {f.name: f for f in text_string_to_metric_families(first.state.metrics.render().decode())}
    assert {name: f.type for name, f in families.items()} == {
        "nanoseek_requests": "counter",
        "nanoseek_tokens": "counter",
        "nanoseek_prompt_cache_hit_rate": "gauge",
        "nanoseek_prefix_cache_tokens": "gauge",
        "nanoseek_prefix_cache_capacity_tokens": "gauge",
        "nanoseek_queue_length": "gauge",
        "nanoseek_running": "gauge",
        "nanoseek_pending": "gauge",
        "nanoseek_capacity": "gauge",
        "nanoseek_engine_steps": "counter",
        "nanoseek_engine_step_seconds": "counter",
        "nanoseek_request_duration_seconds": "histogram",
        "nanoseek_time_to_first_token_seconds": "histogram",
    }
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("nanoseek_requests_total", (("path", "/health"), ("status", "200")))] == 1
    assert samples[("nanoseek_request_duration_seconds_bucket", (("le", "0.025"),))] == 1
    assert samples[("nanoseek_request_duration_seconds_bucket", (("le", "0.01"),))] == 0
    assert samples[("nanoseek_capacity", ())] == engine.max_batch_size + 256
    assert {labels for name, labels in samples if name == "nanoseek_tokens_total"} == {
        (("kind", k),) for k in ("prompt", "completion", "reasoning", "prompt_cache_hit", "prompt_cache_miss")
    }
    assert 'nanoseek_requests_total{path="/health"' not in second.state.metrics.render().decode()


# ---- the command ---------------------------------------------------------------------------------
def test_serve_command_errors_are_one_line(model_dir, tmp_path, capsys):
    from nanoseek.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "error:" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--model", str(model_dir), "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen there" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir), "--port", "70000"]) == 2
    save_pretrained(Transformer(ModelConfig(**CONFIG)), tmp_path / "no-tokenizer")
    assert main(["serve", "--model", str(tmp_path / "no-tokenizer"), "--port", "0"]) == 2
    assert "tokenizer" in capsys.readouterr().err
