"""The prefix cache through `nanoseek serve`'s API and the official openai client: a second turn's
usage reports its cached prompt tokens as DeepSeek does (prompt_cache_hit_tokens, _miss_tokens)
and as OpenAI does (prompt_tokens_details.cached_tokens), in chat and completions, streamed too;
the answers equal those of an engine without the cache; /metrics counts hits and misses."""

import openai
import pytest

from nanoseek.infer import Engine, SamplingParams

from serve_support import MODEL, metric, serve_in_thread, wait_idle

SYSTEM = "Add the numbers step by step. The quick brown fox jumps. 3+4-2+5 = 10. " * 3
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def server(model_dir):
    engine = Engine.from_pretrained(model_dir, max_batch_size=4, max_seq_len=512)
    with serve_in_thread(engine) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(model_dir):
    """(with the prefix cache, without it): the same requests in this process, one by one."""
    return (
        Engine.from_pretrained(model_dir, max_batch_size=4, max_seq_len=512),
        Engine.from_pretrained(model_dir, max_batch_size=4, max_seq_len=512, prefix_cache_tokens=0),
    )


def expect(reference, prompt_ids) -> tuple[int, str]:
    """(cached prompt tokens, raw text) the engine gives this prompt after the requests before it."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, max_thinking_tokens=4)
    cached, plain = (e.generate([{"prompt_token_ids": prompt_ids}], params)[0] for e in reference)
    assert cached.outputs[0].token_ids == plain.outputs[0].token_ids and plain.num_cached_tokens == 0
    return cached.num_cached_tokens, plain.outputs[0].text


def check_usage(usage, prompt_tokens: int, hit: int) -> None:
    assert usage.prompt_tokens == prompt_tokens
    assert usage.prompt_tokens_details.cached_tokens == hit
    assert (usage.prompt_cache_hit_tokens, usage.prompt_cache_miss_tokens) == (hit, prompt_tokens - hit)


def test_a_second_turn_reports_its_cached_prompt_tokens(client, server, reference):
    url, engine = server
    kwargs = dict(model=MODEL, temperature=0, max_tokens=MAX_TOKENS, extra_body={"max_reasoning_tokens": 4})
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 3+4-2?"}]
    hits = []
    for turn in range(3):
        ids = engine.tokenizer.encode_chat(messages)
        hit, text = expect(reference, ids)
        if turn < 2:
            r = client.chat.completions.create(messages=messages, **kwargs)
            usage, message = r.usage, r.choices[0].message
        else:  # the last turn streamed: its usage comes in the final chunk
            chunks = list(
                client.chat.completions.create(
                    messages=messages, stream=True, stream_options={"include_usage": True}, **kwargs
                )
            )
            usage = chunks[-1].usage
            message = openai.types.chat.ChatCompletionMessage(
                role="assistant", content="".join(c.choices[0].delta.content or "" for c in chunks[:-1])
            )
        check_usage(usage, len(ids), hit)
        assert message.content == text.partition("</think>")[2].strip()  # as without the cache
        hits.append(hit)
        messages += [{"role": "assistant", "content": message.content}, {"role": "user", "content": "And 5+5?"}]
    assert hits[0] == 0 and hits[1] >= 32 and hits[2] > hits[1]  # the system prompt, then the turns before
    wait_idle(url)
    assert metric(url, 'nanoseek_tokens_total{kind="prompt_cache_hit"}') == sum(hits)
    total = metric(url, 'nanoseek_tokens_total{kind="prompt"}')
    assert metric(url, 'nanoseek_tokens_total{kind="prompt_cache_miss"}') == total - sum(hits)
    assert metric(url, "nanoseek_prompt_cache_hit_rate") == pytest.approx(sum(hits) / total)
    assert metric(url, "nanoseek_prefix_cache_tokens") == engine.prefix_cache.tokens > 0
    assert metric(url, "nanoseek_prefix_cache_capacity_tokens") == 4 * 512


def test_completions_report_cached_tokens(client, server, reference):
    _, engine = server
    prompt = SYSTEM + " 3+4-2"
    ids = engine.tokenizer.encode(prompt, bos=True)
    kwargs = dict(model=MODEL, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS)
    first = expect(reference, ids)
    r = client.completions.create(**kwargs)
    check_usage(r.usage, len(ids), first[0])
    hit, text = expect(reference, ids)
    assert hit == len(ids) // 16 * 16 > 0  # its whole blocks (the cache holds no partial block)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    check_usage(chunks[-1].usage, len(ids), hit)
    assert "".join(c.choices[0].text for c in chunks[:-1]) == text == r.choices[0].text


def test_serve_takes_the_prefix_cache_size(model_dir, monkeypatch, capsys):
    from nanoseek.cli import main
    from nanoseek.infer import engine as engine_module

    asked = {}

    def from_pretrained(directory, **kwargs):
        asked.update(kwargs)
        raise engine_module.NanoseekError("stopped here")

    monkeypatch.setattr(engine_module.Engine, "from_pretrained", from_pretrained)
    args = ["serve", "--model", str(model_dir), "--port", "0"]
    assert main(args + ["--prefix-cache-tokens", "64"]) == 2 and asked["prefix_cache_tokens"] == 64
    assert main(args) == 2 and asked["prefix_cache_tokens"] is None  # the engine's default
    monkeypatch.undo()
    assert main(args + ["--prefix-cache-tokens", "5"]) == 2
    assert "prefix_cache_tokens 5: expected 0 (no prefix cache) or at least one block of 16" in capsys.readouterr().err
