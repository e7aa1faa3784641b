"""Grammar-constrained decoding (nanoseek.infer.grammar): a random model's answer after its free
reasoning always parses and matches the JSON schema, greedy, sampled and speculative, in both
prompt formats; the thinking budget still closes the reasoning; bad grammars are one-line errors."""

import json

import jsonschema
import pytest
import torch

from infer_support import make_model
from nanoseek import NanoseekError
from nanoseek.data import format_chat, train_tokenizer
from nanoseek.data.reasoning import split_reasoning
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.grammar import answer_grammar, json_rule, text_without

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["name", "age", "ok", "color", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["3+4-2+5 = 10", "<think>3+4=7, 7-2=5</think> <answer>5</answer>", "The quick brown fox jumps."] * 20
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    """A random model with 320 outputs (more than the tokenizer's 300) that never writes a special
    token by itself: left alone it would think forever."""
    model = make_model()
    with torch.no_grad():
        for i in tokenizer.special_ids.values():
            model.lm_head.weight[i] = 0
    return model


def samples(n, grammar, **params):
    """Greedy, then n - 1 seeded samples."""
    return [SamplingParams(temperature=0 if i == 0 else 1.0, seed=i, grammar=grammar, **params) for i in range(n)]


@pytest.mark.parametrize("speculative", [False, True])
def test_the_answer_after_free_reasoning_matches_the_schema(model, tokenizer, speculative):
    engine = Engine(model, tokenizer, max_batch_size=8, max_seq_len=512, speculative=speculative)
    grammar = answer_grammar(tokenizer, json_rule("answer", SCHEMA), "opened")
    prompt = {"prompt_token_ids": tokenizer.encode_chat([{"role": "user", "content": "Who are you?"}])}
    outs = engine.generate([prompt] * 8, samples(8, grammar, max_tokens=400, max_thinking_tokens=6))
    free = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=30, max_thinking_tokens=6))[0].outputs[0]
    for out in outs:
        c = out.outputs[0]
        assert c.finish_reason == "stop" and c.token_ids[-1] == tokenizer.eos_id, c.text
        # the budget closed it (up to 3 tokens late: not inside a character whose bytes are coming)
        assert 6 <= c.reasoning_tokens <= 9 and c.token_ids[c.reasoning_tokens] == tokenizer.end_think_id
        jsonschema.validate(json.loads(c.answer), SCHEMA)
    # The reasoning is the model's own, unconstrained: the same tokens as without a grammar.
    assert outs[0].outputs[0].token_ids[:7] == free.token_ids[:7]


def test_any_json_object_parses(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=8, max_seq_len=512)
    grammar = answer_grammar(tokenizer, json_rule("answer", {"type": "object"}), "opened")
    prompt = {"prompt_token_ids": tokenizer.encode_chat([{"role": "user", "content": "hi"}])}
    outs = [
        o.outputs[0] for o in engine.generate([prompt] * 8, samples(8, grammar, max_tokens=200, max_thinking_tokens=4))
    ]
    stopped = [c for c in outs if c.finish_reason == "stop"]
    assert len(stopped) >= 4  # a random model writes strings of any length: some run past max_tokens
    for c in stopped:
        assert isinstance(json.loads(c.answer), dict)
    for c in outs:
        assert c.reasoning and c.answer.startswith("{")


def test_r1_zero_answer_sits_in_its_tags(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=512)
    grammar = answer_grammar(tokenizer, json_rule("answer", SCHEMA), "tagged", r1_zero=True)
    prompt = {"prompt_token_ids": tokenizer.encode_chat([{"role": "user", "content": "a=1"}], prompt_format="r1-zero")}
    # the model never writes <think> itself (its row is zero): the grammar opens the reasoning
    for out in engine.generate([prompt] * 4, samples(4, grammar, max_tokens=400, max_thinking_tokens=4)):
        c = out.outputs[0]
        assert c.finish_reason == "stop" and c.text.startswith(" <think>"), c.text
        split = split_reasoning(c.text)
        assert split.think_tag and split.answer_tagged and split.answer_closed and 4 <= c.reasoning_tokens <= 7
        jsonschema.validate(json.loads(split.answer), SCHEMA)


def test_spelt_out_end_of_thinking_is_not_reasoning(tokenizer):
    import llguidance

    from nanoseek.infer.grammar import Grammars

    grammars = Grammars(tokenizer, 320, tokenizer.eos_id)
    m = grammars.matcher(f'start: R <[{tokenizer.end_think_id}]> "!"\nR: {text_without("</think>")}')
    spelt = tokenizer.encode_plain("ok </think")
    assert m.consume_tokens(spelt) and not m.is_error()
    assert not grammars.allowed(m)[tokenizer.encode_plain(">")[0]]  # "</think>" as text is refused
    assert grammars.allowed(m)[tokenizer.end_think_id]
    assert isinstance(m, llguidance.LLMatcher)


def test_bad_grammars_are_one_line_errors(model, tokenizer):
    engine = Engine(model, tokenizer)
    with pytest.raises(NanoseekError, match="grammar") as e:
        engine.generate(format_chat([{"role": "user", "content": "x"}]), SamplingParams(grammar="start: nothing_here"))
    assert "\n" not in str(e.value)
    with pytest.raises(NanoseekError, match="min_tokens"):
        SamplingParams(grammar='start: "a"', min_tokens=2)
    with pytest.raises(NanoseekError, match="schema"):
        json_rule("answer", ["not", "a", "schema"])
    assert not engine.has_unfinished()
