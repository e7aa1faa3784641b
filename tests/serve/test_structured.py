"""JSON output, tool calls and thinking controls through the official openai client, on the tiny
random chat model (its free text is noise and it never ends a reasoning by itself; a thinking
budget closes it). Constrained decoding holds the answer after the reasoning to the schema or to
DeepSeek's tool-call syntax: whatever the weights, it parses. A scripted model writes text and
calls on its own for tool_choice "auto"."""

import collections
import json

import httpx
import jsonschema
import openai
import pytest
import torch
from tokenizers import AddedToken

from dense_support import transformers_model
from nanoseek.data import Tokenizer, chat, train_tokenizer
from nanoseek.data.chat import BOS, CHAT_TEMPLATES, EOS, tool_calls_text
from nanoseek.infer import Engine

from serve_support import MESSAGES, MODEL, save_chat_model, serve_in_thread

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "integer", "minimum": -100, "maximum": 100},
        "unit": {"enum": ["m", "s"]},
        "note": {"type": "string", "maxLength": 5},
    },
    "required": ["answer", "unit", "note"],
    "additionalProperties": False,
}
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"]}
CITY_STRICT = {**CITY, "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": CITY_STRICT}}
NOW = {"type": "function", "function": {"name": "now"}}  # no parameters: "{}"
BUDGET = {"max_reasoning_tokens": 6}


@pytest.fixture(scope="module")
def url(engine):
    with serve_in_thread(engine) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


TOOL_TOKENS = [getattr(chat, n) for n in dir(chat) if n.startswith("TOOL_") and getattr(chat, n).startswith("<｜")]


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    """The same tiny model with DeepSeek-V3's tool-call tokens in its tokenizer, one token each
    as in DeepSeek's own (the fixture's tokenizer spells them in ordinary tokens); their output
    rows are zero, so the model writes them where a grammar makes it only."""
    path = save_chat_model(tmp_path_factory.mktemp("tools"))
    tok = Tokenizer.from_pretrained(path)
    tok.backend.add_special_tokens([AddedToken(t, special=True) for t in TOOL_TOKENS])
    Tokenizer(tok.backend, tok.config).save_pretrained(path)
    engine = Engine.from_pretrained(path, max_batch_size=8, max_seq_len=512)
    assert len(TOOL_TOKENS) == 9 and all(t in engine.tokenizer.control_tokens for t in TOOL_TOKENS)
    with torch.no_grad():
        for t in TOOL_TOKENS:
            engine.model.lm_head.weight[engine.tokenizer.token_to_id(t)] = 0.0
    with serve_in_thread(engine) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60), engine


@pytest.fixture(scope="module")
def tool_client(tool_server):
    return tool_server[0]


def ask(client, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=kwargs.pop("messages", MESSAGES), **kwargs)


def streamed(client, **kwargs):
    """(content, reasoning, tool calls as (name, arguments), finish reasons) of each choice of a stream."""
    out = collections.defaultdict(lambda: {"content": "", "reasoning": "", "calls": {}, "finish": None})
    for chunk in ask(client, stream=True, **kwargs):
        for c in chunk.choices:
            o, d = out[c.index], c.delta
            o["content"] += d.content or ""
            o["reasoning"] += getattr(d, "reasoning_content", None) or ""
            for call in d.tool_calls or []:
                assert call.id.startswith("call_") and call.type == "function"
                o["calls"][call.index] = (call.function.name, call.function.arguments)
            o["finish"] = c.finish_reason or o["finish"]
    return [out[i] for i in sorted(out)]


# ---- JSON output -----------------------------------------------------------------------------
def test_json_schema_answers_parse_and_match_the_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "measure", "schema": SCHEMA, "strict": True}}
    r = ask(client, n=4, temperature=1.0, seed=3, max_tokens=300, response_format=fmt, extra_body=BUDGET)
    for c in r.choices:
        assert c.finish_reason == "stop" and c.message.reasoning_content  # the reasoning is free text
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    # streamed, the same seeded answers arrive in pieces
    s = streamed(client, n=4, temperature=1.0, seed=3, max_tokens=300, response_format=fmt, extra_body=BUDGET)
    assert [(o["content"], o["reasoning"], o["finish"]) for o in s] == [
        (c.message.content, c.message.reasoning_content, "stop") for c in r.choices
    ]
    # greedy, and with the thinking off (no reasoning at all)
    for extra in (BUDGET, {"thinking": {"type": "disabled"}}):
        r = ask(client, temperature=0, max_tokens=300, response_format=fmt, extra_body=extra)
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    assert r.choices[0].message.reasoning_content == "" and r.usage.completion_tokens_details.reasoning_tokens == 0


def test_json_object_answers_are_objects(client):
    fmt = {"type": "json_object"}
    r = ask(client, n=6, temperature=1.0, seed=1, max_tokens=200, response_format=fmt, extra_body=BUDGET)
    stopped = [c for c in r.choices if c.finish_reason == "stop"]
    assert len(stopped) >= 2  # the others wrote a string longer than max_tokens: cut, as OpenAI's are
    for c in stopped:
        assert isinstance(json.loads(c.message.content), dict)
    for c in r.choices:
        assert c.message.content.startswith("{")


# ---- tool calls --------------------------------------------------------------------------------
def test_required_tool_calls_parse_into_tool_calls(tool_client):
    client = tool_client
    kwargs = dict(temperature=1.0, seed=5, n=3, max_tokens=150, tools=[WEATHER, NOW], extra_body=BUDGET)
    r = ask(client, tool_choice="required", **kwargs)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None and c.message.tool_calls
        for call in c.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            args = json.loads(call.function.arguments)
            jsonschema.validate(args, CITY_STRICT if call.function.name == "get_weather" else {"maxProperties": 0})
    s = streamed(client, tool_choice="required", **kwargs)
    assert [list(o["calls"].values()) for o in s] == [
        [(t.function.name, t.function.arguments) for t in c.message.tool_calls] for c in r.choices
    ]
    assert all(o["finish"] == "tool_calls" and o["content"] == "" for o in s)


def test_a_named_function_is_called_once_and_parallel_calls_can_be_off(tool_client):
    client = tool_client
    kwargs = dict(temperature=1.0, seed=2, n=4, max_tokens=150, tools=[WEATHER, NOW], extra_body=BUDGET)
    named = {"type": "function", "function": {"name": "get_weather"}}
    for r in (
        ask(client, tool_choice=named, **kwargs),
        ask(client, tool_choice="required", parallel_tool_calls=False, **kwargs),
    ):
        for c in r.choices:
            assert len(c.message.tool_calls) == 1 and c.finish_reason == "tool_calls"
    r = ask(client, tool_choice=named, **kwargs)
    for c in r.choices:
        (call,) = c.message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), CITY_STRICT)


def scripted(tokenizer, text_after_reasoning: str):
    """A choose_tokens that writes "ok", </think>, then the text (checking the grammar allows every token)."""
    script = tokenizer.encode("ok\n") + [tokenizer.end_think_id] + tokenizer.encode(text_after_reasoning)
    script.append(tokenizer.eos_id)
    made = collections.Counter()

    def choose(logits, params, generators):
        tokens = []
        for row, p in enumerate(params):
            t = script[made[id(p)]]
            assert logits[row, t].isfinite(), f"the grammar refused token {made[id(p)]} of the script"
            made[id(p)] += 1
            tokens.append(t)
        return tokens

    return choose


@pytest.mark.parametrize("markers", ["tokens", "spelt"])
def test_auto_reads_the_models_own_calls_after_its_text(markers, tool_server, client, engine, monkeypatch):
    """With tool_choice "auto" (the default) the model may write text and then calls: a scripted
    model does, and the grammar lets it (DeepSeek's markers as tokens, or spelt in ordinary ones)."""
    client, engine = tool_server if markers == "tokens" else (client, engine)
    calls = [
        {"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"function": {"name": "now", "arguments": "{}"}},
    ][: 2 if markers == "tokens" else 1]
    expected = [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
    script = "\n\nChecking." + tool_calls_text(calls)
    monkeypatch.setattr("nanoseek.infer.engine.choose_tokens", scripted(engine.tokenizer, script))
    r = ask(client, temperature=0, max_tokens=250, tools=[WEATHER, NOW])
    message = r.choices[0].message
    assert (message.content, message.reasoning_content, r.choices[0].finish_reason) == ("Checking.", "ok", "tool_calls")
    assert [(t.function.name, t.function.arguments) for t in message.tool_calls] == expected
    (s,) = streamed(client, temperature=0, max_tokens=250, tools=[WEATHER, NOW])
    assert (s["content"], s["reasoning"], s["finish"], list(s["calls"].values())) == (
        "Checking.",
        "ok",
        "tool_calls",
        expected,
    )
    # text alone is an answer too; with tool_choice "none" the calls are text
    monkeypatch.setattr("nanoseek.infer.engine.choose_tokens", scripted(engine.tokenizer, "\n\nNo need."))
    r = ask(client, temperature=0, max_tokens=150, tools=[WEATHER])
    assert r.choices[0].message.content == "No need." and r.choices[0].finish_reason == "stop"
    monkeypatch.setattr("nanoseek.infer.engine.choose_tokens", scripted(engine.tokenizer, tool_calls_text(calls[-1:])))
    r = ask(client, temperature=0, max_tokens=250, tools=[NOW], tool_choice="none")
    assert r.choices[0].message.content == tool_calls_text(calls[-1:]) and r.choices[0].message.tool_calls is None


def test_calls_and_their_results_go_back_through_the_chat_template(tool_server):
    client, engine = tool_server
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [
        MESSAGES[0],
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = ask(client, messages=messages, tools=[WEATHER], temperature=0, max_tokens=4)
    ids = engine.tokenizer.encode_chat(messages, tools=[WEATHER])
    assert r.usage.prompt_tokens == len(ids)
    assert engine.tokenizer.decode(ids).endswith(
        "<｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜><｜tool▁outputs▁end｜><｜Assistant｜><think>\n"
    )


# ---- thinking controls -------------------------------------------------------------------------
def test_thinking_off_and_reasoning_effort(client, engine):
    r = ask(client, temperature=0, max_tokens=8, extra_body={"thinking": {"type": "disabled"}})
    assert r.choices[0].message.reasoning_content == "" and r.choices[0].message.content
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode_chat(MESSAGES, thinking=False))
    on = ask(client, temperature=0, max_tokens=8, extra_body={"thinking": {"type": "enabled"}})
    assert on.usage.prompt_tokens == len(engine.tokenizer.encode_chat(MESSAGES))
    off = engine.tokenizer.decode(engine.tokenizer.encode_chat(MESSAGES, thinking=False))
    assert off == engine.tokenizer.decode(engine.tokenizer.encode_chat(MESSAGES)) + "\n</think>\n\n"
    assert on.choices[0].message.content == "" and on.usage.completion_tokens_details.reasoning_tokens == 8
    # reasoning_effort "low" is a budget of 256 reasoning tokens (protocol.REASONING_EFFORT)
    low = ask(client, temperature=0, max_tokens=264, reasoning_effort="low")
    same = ask(client, temperature=0, max_tokens=264, extra_body={"max_reasoning_tokens": 256})
    assert low.choices[0].message == same.choices[0].message and low.choices[0].message.content
    assert 256 <= low.usage.completion_tokens_details.reasoning_tokens < 264


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "now"}}}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
            "tools[0].function.parameters",
        ),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"thinking": {"type": "disabled"}, "max_reasoning_tokens": 5}, "max_reasoning_tokens"),
        ({"thinking": {"type": "disabled"}, "reasoning_effort": "high"}, "reasoning_effort"),
        ({"reasoning_effort": "high", "max_reasoning_tokens": 5}, "reasoning_effort"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"thinking": {"type": "maybe"}}, "thinking.type"),
        ({"messages": [{"role": "tool", "content": "sunny"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0]"),
        (
            {"messages": [*MESSAGES, {"role": "assistant", "content": "7", "reasoning_content": "3+4=7"}]},
            "messages[1].reasoning_content",
        ),
    ],
)
def test_what_cannot_be_served_is_a_400_naming_the_parameter(url, body, param):
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]


def test_r1_zero_json_sits_in_its_answer_and_it_has_no_tools(engine):
    tok = engine.tokenizer
    r1 = Tokenizer(tok.backend, {**tok.config, "prompt_format": "r1-zero", "chat_template": CHAT_TEMPLATES["r1-zero"]})
    with serve_in_thread(Engine(engine.model, r1, max_batch_size=2, max_seq_len=512)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        fmt = {"type": "json_schema", "json_schema": {"name": "m", "schema": SCHEMA}}
        r = ask(c, temperature=0, max_tokens=300, response_format=fmt, extra_body=BUDGET)
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)  # the <answer> tags are not in it
        assert r.choices[0].message.reasoning_content
        with pytest.raises(openai.BadRequestError, match="r1-zero"):
            ask(c, max_tokens=5, tools=[WEATHER])


# ---- a dense model's own template ------------------------------------------------------------
HERMES = (  # Qwen2.5's shape: tools in <tools>, calls as <tool_call> JSON, results as <tool_response>
    "{{ bos_token }}{%- if tools %}{{ 'Tools:' }}"
    "{%- for t in tools %}{{ '\\n' + (t | tojson) }}{% endfor %}{%- endif %}"
    "{%- for m in messages %}{%- if m.role == 'tool' %}{{ '<tool_response>' + m.content + '</tool_response>' }}"
    "{%- else %}{{ '<' + m.role + '>' + (m.content or '') }}"
    '{%- for c in m.tool_calls or [] %}{{ \'<tool_call>\\n{"name": "\' + c.function.name + \'", "arguments": \' }}'
    "{{ (c.function.arguments | tojson) + '}\\n</tool_call>' }}{%- endfor %}{{ eos_token }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<assistant>' }}{%- endif %}"
)


def test_a_dense_model_calls_tools_in_its_own_templates_syntax(tmp_path):
    tool = {"type": "function", "function": {"name": "w", "parameters": CITY_STRICT}}
    texts = ["What is 3+4-2? Sunny.", '{"name": "w", "arguments": {"city": "Oslo"}}', json.dumps(tool)]
    tok = train_tokenizer(texts * 20, 300)
    tok.backend.add_tokens([AddedToken("<tool_call>", special=False), AddedToken("</tool_call>", special=False)])
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "chat_template": HERMES}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    tok = Tokenizer.from_pretrained(tmp_path)
    hf = transformers_model("qwen2-gqa2-tied")
    hf.resize_token_embeddings(tok.vocab_size, mean_resizing=False)
    hf.config.max_position_embeddings = 512  # room for the tools in the prompt, and a call
    hf.save_pretrained(tmp_path)
    engine = Engine.from_pretrained(tmp_path, max_batch_size=2, max_seq_len=512)
    with torch.no_grad():
        engine.model.lm_head.weight[tok.eos_id] = 0.0
    with serve_in_thread(engine) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = ask(c, temperature=0, max_tokens=300, tools=[tool], tool_choice="required", parallel_tool_calls=False)
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "w" and r.choices[0].finish_reason == "tool_calls"
        jsonschema.validate(json.loads(call.function.arguments), CITY_STRICT)
        # the call goes back as the template reads it: arguments as an object, not as a JSON string
        sent = {
            "id": call.id,
            "type": "function",
            "function": {"name": "w", "arguments": call.function.arguments},
        }
        messages = [
            *MESSAGES,
            {"role": "assistant", "content": "", "tool_calls": [sent]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ]
        r = ask(c, messages=messages, temperature=0, max_tokens=2, tools=[tool])
        read = {**sent, "function": {"name": "w", "arguments": json.loads(call.function.arguments)}}
        ids = tok.encode_chat([*MESSAGES, {**messages[1], "tool_calls": [read]}, messages[2]], tools=[tool])
        assert r.usage.prompt_tokens == len(ids)
        assert '"arguments": ' + json.dumps(read["function"]["arguments"]) + "}" in tok.decode(ids)
