"""Log-probabilities through the HTTP API: the completions API as evaluation harnesses use it
(echo, logprobs, max_tokens 0, batches of token-id lists) and chat's logprobs / top_logprobs.

Every log-prob the server returns is checked against log_softmax of one full forward of the model
over the same ids (float32, within 1e-4), on the tiny MoE chat model and on a tiny Qwen2 model;
a multiple-choice question in lm-eval-harness's request shape picks the continuation a direct
computation picks. The server runs in process (TestClient) on its own engine; the reference
engine (greedy, the same checkpoint) says which tokens the server must have generated.
"""

import json

import openai
import pytest
import tokenizers
import torch
from starlette.testclient import TestClient

from dense_support import transformers_model
from nanoseek.data import train_tokenizer
from nanoseek.infer import Engine, SamplingParams
from nanoseek.serve.app import create_app
from nanoseek.serve.logprobs import TokenStrings, byte_level_alphabet

from serve_support import MESSAGES, MODEL, serve_in_thread

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """A transformers Qwen2 checkpoint with a nanoseek tokenizer (its chat format) beside it."""
    root = tmp_path_factory.mktemp("qwen2")
    texts = ["What is 3+4? The sum is 7.", "<think>2+5=7</think> It is 7.", "The quick brown fox."] * 20
    tok = train_tokenizer(texts, vocab_size=300)
    tok.save_pretrained(root)
    hf = transformers_model("qwen2-gqa2-tied")
    hf.resize_token_embeddings(tok.vocab_size, mean_resizing=False)
    hf.save_pretrained(root)
    return root


@pytest.fixture(scope="module", params=["moe", "qwen2"])
def served(request, model_dir, dense_dir):
    """(TestClient, reference engine) on the MoE chat model or the dense one."""
    directory = model_dir if request.param == "moe" else dense_dir
    reference = Engine.from_pretrained(directory, max_batch_size=4, max_seq_len=128)
    with TestClient(create_app(Engine.from_pretrained(directory, max_batch_size=4, max_seq_len=128), MODEL)) as c:
        yield c, reference


@pytest.fixture(scope="module")
def client(model_dir):
    with TestClient(create_app(Engine.from_pretrained(model_dir, max_batch_size=4, max_seq_len=128), MODEL)) as c:
        yield c


def sse(client, path, body) -> list[dict]:
    """The chunks of a streamed response, [DONE] checked and left out."""
    events = [e for e in client.post(path, json=body).text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]", events[-3:]
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]]


def forward_logprobs(engine, ids: list[int]) -> torch.Tensor:
    """Row i: log_softmax of the logits after ids[: i + 1], from one forward over all of `ids`."""
    with torch.no_grad():
        return torch.log_softmax(engine.model(torch.tensor([ids]))[0].float(), -1)


def greedy(engine, ids, max_tokens, **params) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **params)
    return engine.generate([{"prompt_token_ids": ids}], params)[0].outputs[0].token_ids


def check_against_forward(engine, ids, logprobs, first, n_top):
    """`logprobs` (a completions logprobs object) covers ids[first:] with each token's log-prob and
    its top dict (the n_top likeliest plus the token itself) as a full forward gives them."""
    strings = TokenStrings(engine.tokenizer)
    want = forward_logprobs(engine, ids)
    assert logprobs["tokens"] == [strings.text(t) for t in ids[first:]]
    for k, (token, got, top) in enumerate(zip(ids[first:], logprobs["token_logprobs"], logprobs["top_logprobs"])):
        i = first + k
        if i == 0:  # nothing before the first token
            assert got is None and top is None
            continue
        assert got == pytest.approx(want[i - 1, token].item(), abs=1e-4)
        values, indices = want[i - 1].topk(n_top)
        expected = {strings.text(t): v for t, v in zip(indices.tolist(), values.tolist())}
        expected.setdefault(strings.text(token), want[i - 1, token].item())
        assert top.keys() == expected.keys()
        assert list(top.values()) == pytest.approx(list(expected.values()), abs=1e-4)


# ---- the completions API --------------------------------------------------------------------------
def test_echoed_prompt_and_generated_logprobs_equal_a_full_forward(served):
    c, reference = served
    prompt = "What is 3+4? The"
    ids = reference.tokenizer.encode_plain(prompt, bos=True)
    gen = greedy(reference, ids, 6)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 3}
    r = c.post(CMPL, json={**body, "echo": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == reference.tokenizer.decode(ids) + reference.tokenizer.decode(gen)
    check_against_forward(reference, ids + gen, choice["logprobs"], 0, 3)
    # Without echo: the generated tokens only, from the same forward passes.
    plain = c.post(CMPL, json=body).json()["choices"][0]
    check_against_forward(reference, ids + gen, plain["logprobs"], len(ids), 3)
    assert plain["logprobs"]["text_offset"][0] == 0
    # Streamed: the chunks' logprobs add up to the same object.
    parts = [chunk["choices"][0] for chunk in sse(c, CMPL, {**body, "echo": True, "stream": True})]
    assert "".join(p["text"] for p in parts) == choice["text"]
    for key in ("tokens", "token_logprobs", "text_offset"):
        assert [x for p in parts for x in p["logprobs"][key]] == pytest.approx(choice["logprobs"][key], abs=1e-6)


def test_scoring_only_a_prompt_with_max_tokens_0(served):
    c, reference = served
    ids = reference.tokenizer.encode("The quick brown fox jumps.", bos=True)
    body = {"model": MODEL, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2}
    r = c.post(CMPL, json=body).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "length" and choice["text"] == reference.tokenizer.decode(ids)
    assert r["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 0,
        "total_tokens": len(ids),
        "prompt_cache_hit_tokens": 0,  # scoring a prompt recomputes all of it
        "prompt_cache_miss_tokens": len(ids),
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    check_against_forward(reference, ids, choice["logprobs"], 0, 2)
    (chunk,) = sse(c, CMPL, {**body, "stream": True})  # one chunk: the echo, and the end
    assert chunk["choices"][0] == choice


def test_a_multiple_choice_question_in_lm_eval_harness_shape(model_dir, engine):
    """lm-eval-harness scores each answer as context + continuation with echo, max_tokens 0 and
    logprobs 1, summing the continuation's token_logprobs; its newer releases ask for max_tokens
    1 and leave out the last token. Both pick the answer a direct computation picks."""
    tok = engine.tokenizer
    context = tok.encode("Question: What is 3+4? Answer:", bos=True)
    answers = [" 12", " The quick brown fox", " 7", " 3+4"]  # the model likes " 7" best
    requests = [context + tok.encode(a) for a in answers]
    direct = []
    for ids in requests:
        logp = forward_logprobs(engine, ids)
        direct.append(sum(logp[i - 1, ids[i]].item() for i in range(len(context), len(ids))))
    with serve_in_thread(Engine.from_pretrained(model_dir, max_batch_size=4, max_seq_len=128)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for max_tokens, cut in ((0, None), (1, -1)):
            r = client.completions.create(
                model=MODEL, prompt=requests, echo=True, max_tokens=max_tokens, logprobs=1, temperature=0
            )
            choices = sorted(r.choices, key=lambda ch: ch.index)
            assert [ch.index for ch in choices] == [0, 1, 2, 3]
            sums = [sum(ch.logprobs.token_logprobs[len(context) : cut]) for ch in choices]
            assert sums == pytest.approx(direct, abs=1e-4)
            assert max(range(4), key=sums.__getitem__) == max(range(4), key=direct.__getitem__) == 2
            for ch, ids in zip(choices, requests):  # is_greedy, as the harness reads it
                lps, tops = ch.logprobs.token_logprobs[len(context) : cut], ch.logprobs.top_logprobs[len(context) : cut]
                logp = forward_logprobs(engine, ids)
                greedy_ = all(logp[i - 1].argmax().item() == ids[i] for i in range(len(context), len(ids)))
                assert all(lp == max(top.values()) for lp, top in zip(lps, tops)) == greedy_


def test_a_batch_of_prompts_is_one_choice_per_prompt_and_sample_in_openai_order(client, engine):
    tok = engine.tokenizer
    prompts = [tok.encode("3+4-2", bos=True), tok.encode("The quick", bos=True)]
    params = dict(temperature=1.0, seed=3, max_tokens=4)
    r = client.post(CMPL, json={"model": MODEL, "prompt": prompts, "n": 2, **params}).json()
    expected = engine.generate([{"prompt_token_ids": ids} for ids in prompts], SamplingParams(n=2, **params))
    assert [ch["index"] for ch in r["choices"]] == [0, 1, 2, 3]
    for p, out in enumerate(expected):  # prompt p's sample j is choice p * n + j, as if sent alone
        assert [r["choices"][p * 2 + j]["text"] for j in range(2)] == [o.text for o in out.outputs]
    assert r["usage"]["prompt_tokens"] == sum(map(len, prompts))
    assert r["usage"]["completion_tokens"] == sum(len(o.token_ids) for out in expected for o in out.outputs)
    # A list of strings is a batch too; streamed, each chunk names its choice.
    body = {"model": MODEL, "prompt": ["3+4-2", "The quick"], "max_tokens": 3, "temperature": 0}
    batch = [ch["text"] for ch in client.post(CMPL, json=body).json()["choices"]]
    alone = [client.post(CMPL, json={**body, "prompt": p}).json()["choices"][0]["text"] for p in body["prompt"]]
    assert batch == alone
    streamed = ["", ""]
    for chunk in sse(client, CMPL, {**body, "stream": True}):
        streamed[chunk["choices"][0]["index"]] += chunk["choices"][0]["text"]
    assert streamed == batch


def test_text_offsets_index_into_the_returned_text(client, engine):
    """Each token's text sits at its offset in the choice's text; a character split over
    byte tokens ("é" is two of this ASCII-trained vocabulary's) starts at its first token."""
    prompt = "café → 3+4"
    body = {"model": MODEL, "prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 8, "temperature": 0}
    choice = client.post(CMPL, json=body).json()["choices"][0]
    text, lp = choice["text"], choice["logprobs"]
    assert text.startswith(engine.tokenizer.decode([engine.tokenizer.bos_id]) + prompt)
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] <= len(text)
    split = [t for t in lp["tokens"] if t.startswith("bytes:")]
    assert split  # "é" and "→" are spelt in byte tokens here
    for token, at in zip(lp["tokens"], offsets):
        if not token.startswith("bytes:"):
            assert text[at : at + len(token)] == token, (token, at)
    e = text.index("é")
    assert [t for t, at in zip(lp["tokens"], offsets) if at == e] == ["bytes:\\xc3", "bytes:\\xa9"]
    # The bytes of the tokens are the text's bytes (byte-level BPE: each byte is a character).
    strings = TokenStrings(engine.tokenizer)
    ids = engine.tokenizer.encode_plain(prompt)
    assert b"".join(strings.bytes(t) for t in ids) == prompt.encode()
    assert set(byte_level_alphabet()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())


@pytest.mark.parametrize(
    "body, param, message",
    [
        (
            {"prompt": "3+4", "logprobs": 21},
            "logprobs",
            "'logprobs' = 21 is out of range: expected <= 20",
        ),
        ({"prompt": "3+4", "logprobs": True}, "logprobs", "'logprobs' must be an integer, got true"),
        (
            {"prompt": "3+4", "max_tokens": 0},
            "max_tokens",
            "'max_tokens' = 0 generates nothing: send it with 'echo': true to score the prompt",
        ),
        (
            {"prompt": "3+4", "max_tokens": -1, "echo": True},
            "max_tokens",
            "'max_tokens' = -1 is out of range: expected >= 0",
        ),
        (
            {"prompt": [[5, 6], []]},
            "prompt[1]",
            "'prompt[1]' must be a non-empty list of token ids in [0, 320)",
        ),
        (
            {"prompt": ["3+4", [5, 6]]},
            "prompt",
            "'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists",
        ),
        ({"prompt": ["3+4", ""]}, "prompt[1]", "'prompt[1]' must not be empty"),
        (
            {"messages": MESSAGES, "top_logprobs": 21, "logprobs": True},
            "top_logprobs",
            "'top_logprobs' = 21 is out of range: expected <= 20",
        ),
        ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs", "'top_logprobs' needs 'logprobs' set to true"),
        ({"messages": MESSAGES, "logprobs": 1}, "logprobs", "'logprobs' must be true or false, got 1"),
        ({"messages": MESSAGES, "echo": True}, "echo", "Unrecognized request argument supplied: 'echo'"),
    ],
)
def test_bad_logprobs_requests_are_one_line_400s(client, body, param, message):
    r = client.post(CHAT if "messages" in body else CMPL, json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["message"]) == (param, message)


# ---- chat completions ---------------------------------------------------------------------------
def without_values(entry: dict) -> dict:
    """A chat logprobs entry with its log-probabilities zeroed."""
    return {**entry, "logprob": 0, "top_logprobs": [{**t, "logprob": 0} for t in entry["top_logprobs"]]}


def logprob_values(entry: dict) -> list[float]:
    return [entry["logprob"]] + [t["logprob"] for t in entry["top_logprobs"]]


def test_chat_logprobs_split_reasoning_from_content_and_equal_a_full_forward(client, engine):
    tok = engine.tokenizer
    ids = tok.encode_chat(MESSAGES)
    gen = greedy(engine, ids, 12, max_thinking_tokens=5)  # </think> is forced 6th
    assert gen[5] == tok.end_think_id and tok.end_think_id not in gen[:5]
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 12, "temperature": 0, "max_reasoning_tokens": 5}
    r = client.post(CHAT, json={**body, "logprobs": True, "top_logprobs": 2}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["reasoning_content"]) == 6 and len(lp["content"]) == 6  # 5 + </think>, then the answer
    strings, want = TokenStrings(tok), forward_logprobs(engine, ids + gen)
    for k, (token, entry) in enumerate(zip(gen, lp["reasoning_content"] + lp["content"])):
        row = want[len(ids) + k - 1]
        assert entry["token"] == strings.text(token) and entry["bytes"] == list(strings.bytes(token))
        assert entry["logprob"] == pytest.approx(row[token].item(), abs=1e-4)
        values, indices = row.topk(2)
        assert [e["token"] for e in entry["top_logprobs"]] == [strings.text(t) for t in indices.tolist()]
        assert [e["logprob"] for e in entry["top_logprobs"]] == pytest.approx(values.tolist(), abs=1e-4)
    assert lp["refusal"] is None
    # Streamed: one entry per token, in the same lists.
    streamed = {"content": [], "reasoning_content": []}
    for chunk in sse(client, CHAT, {**body, "logprobs": True, "top_logprobs": 2, "stream": True}):
        logprobs = chunk["choices"][0]["logprobs"] if chunk["choices"] else None
        for key in streamed:
            streamed[key] += (logprobs or {}).get(key, [])
    # Its prompt came from the prefix cache the first request filled: equal up to float rounding.
    for key in streamed:
        assert [without_values(e) for e in streamed[key]] == [without_values(e) for e in lp[key]]
        assert [logprob_values(e) for e in streamed[key]] == [
            pytest.approx(logprob_values(e), abs=1e-5) for e in lp[key]
        ]
    # Without logprobs there are none; top_logprobs 0 gives the chosen tokens only.
    assert client.post(CHAT, json=body).json()["choices"][0]["logprobs"] is None
    zero = client.post(CHAT, json={**body, "logprobs": True}).json()["choices"][0]["logprobs"]
    assert [e["top_logprobs"] for e in zero["content"]] == [[]] * 6
