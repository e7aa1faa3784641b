"""Tool calls and thinking switches in the chat formats: DeepSeek-V3's tool-call tokens in the chat
format, the Python renderer equal to its Jinja template and to transformers' apply_chat_template
(tools and thinking passed as template variables), tool results, thinking off, a dense model's own
Jinja template, and message text that cannot forge a tool-call token."""

import json

import pytest
from tokenizers import AddedToken

from nanoseek.data import Tokenizer, format_chat, train_tokenizer
from nanoseek.data.chat import (
    CHAT_TEMPLATES,
    TOOL_CALL_BEGIN,
    TOOL_CALLS_BEGIN,
    TOOL_OUTPUTS_BEGIN,
    render_chat_template,
    tool_calls_text,
)
from nanoseek.errors import NanoseekError

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "now"}}  # no description, no parameters
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CALL2 = {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": {}}}  # a dict, as transformers'
CONVERSATIONS = [
    [{"role": "user", "content": "Weather in Paris?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}],
    [
        {"role": "user", "content": "Weather in Paris, and the time?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL, CALL2]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
        {"role": "assistant", "content": "Sunny and 21C at noon."},
        {"role": "user", "content": "Thanks. And Rome?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
    ],
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(ours, transformers') of a trained tokenizer saved in the chat format."""
    transformers = pytest.importorskip("transformers")
    tok = train_tokenizer(["3+4-2+5", "The quick brown fox jumps over the lazy dog."] * 10, vocab_size=300)
    path = tok.save_pretrained(tmp_path_factory.mktemp("chat"), prompt_format="chat")
    return Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_python_jinja_and_transformers_render_tools_alike(saved, messages, generation_prompt, thinking):
    tok, hf = saved
    tools = [WEATHER, TIME]
    text = hf.apply_chat_template(
        messages, tools=tools, thinking=thinking, tokenize=False, add_generation_prompt=generation_prompt
    )
    assert text == format_chat(messages, generation_prompt, tools=tools, thinking=thinking)
    assert text == tok.format_chat(messages, generation_prompt, tools=tools, thinking=thinking)
    variables = {} if thinking else {"thinking": False}
    assert text == render_chat_template(CHAT_TEMPLATES["chat"], messages, generation_prompt, tools=tools, **variables)
    ids = hf.apply_chat_template(
        messages, tools=tools, thinking=thinking, tokenize=True, add_generation_prompt=generation_prompt
    )
    ids = ids if isinstance(ids, list) else list(ids["input_ids"])
    assert tok.encode_chat(messages, generation_prompt, tools=tools, thinking=thinking) == ids


def test_chat_format_tool_layout():
    text = format_chat(CONVERSATIONS[2][:5], tools=[WEATHER])
    assert text == (
        "<｜begin▁of▁sentence｜>## Tools\nYou can call these functions, with JSON arguments:\n\n### get_weather\n"
        'The weather in a city.\nParameters: {"type": "object", "properties": {"city": {"type": "string"}}, '
        '"required": ["city"]}'
        "<｜User｜>Weather in Paris, and the time?<｜Assistant｜><think>\n\n</think>\n\n"
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
        '{"city": "Paris"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>now\n```json\n'
        "{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
        "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny, 21C<｜tool▁output▁end｜>"
        "<｜tool▁output▁begin｜>12:00<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
        "<｜Assistant｜><think>\n\n</think>\n\nSunny and 21C at noon.<｜end▁of▁sentence｜>"
        "<｜Assistant｜><think>\n"
    )
    assert tool_calls_text([CALL, CALL2]) in text


def test_thinking_off_opens_the_turn_with_an_empty_reasoning():
    user = [{"role": "user", "content": "hi"}]
    assert format_chat(user, thinking=False).endswith("<｜Assistant｜><think>\n\n</think>\n\n")
    assert format_chat(user, prompt_format="r1-zero", thinking=False).endswith("Assistant: <think></think>")
    assert format_chat(user, add_generation_prompt=False, thinking=False) == format_chat(user, False)


def test_r1_zero_has_no_tool_calls(saved):
    with pytest.raises(NanoseekError, match="r1-zero"):
        format_chat(CONVERSATIONS[0], prompt_format="r1-zero", tools=[WEATHER])
    with pytest.raises(NanoseekError, match="r1-zero"):
        format_chat(CONVERSATIONS[2][:2], prompt_format="r1-zero")
    with pytest.raises(NanoseekError, match="role 'tool'"):
        format_chat([{"role": "tool", "content": "x"}], prompt_format="r1-zero")
    with pytest.raises(NanoseekError, match="r1-zero"):
        render_chat_template(CHAT_TEMPLATES["r1-zero"], CONVERSATIONS[0], tools=[WEATHER])


HERMES = (  # a dense model's own template in the shape of Qwen2.5's: tools in <tools>, calls in <tool_call>
    "{%- if tools %}{{ '<|im_start|>system\\n# Tools\\n<tools>' }}"
    "{%- for t in tools %}{{ '\\n' + (t | tojson) }}{% endfor %}{{ '\\n</tools><|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}{{ '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + (m.content or '') }}"
    '{%- for c in m.tool_calls or [] %}{{ \'\\n<tool_call>\\n{"name": "\' + c.function.name + \'", "arguments": \' }}'
    "{{ (c.function.arguments | tojson) + '}\\n</tool_call>' }}{%- endfor %}{%- endif %}{{ '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
R1_DISTILL = (  # R1-Distill's shape: it does not read `tools`, and opens the reasoning itself
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% else %}{{ '<｜Assistant｜>' + (m['content'] or '') + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)


def own_template(template):
    tok = train_tokenizer(["3+4-2+5", "The quick brown fox."] * 10, vocab_size=300)
    config = {k: v for k, v in tok.config.items() if k != "prompt_format"} | {"chat_template": template}
    return Tokenizer(tok.backend, config)


def test_a_dense_models_own_template_gets_the_tools_and_the_thinking_switch():
    tok = own_template(HERMES)
    assert tok.prompt_format == "template"
    call = {**CALL, "function": {**CALL["function"], "arguments": {"city": "Paris"}}}
    messages = [*CONVERSATIONS[0], {"role": "assistant", "content": "", "tool_calls": [call]}]
    text = tok.format_chat(messages, tools=[WEATHER])
    assert "<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n</tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert tok.format_chat(CONVERSATIONS[0], thinking=False).endswith("assistant\n<think>\n\n</think>\n\n")

    distill = own_template(R1_DISTILL)
    text = distill.format_chat(CONVERSATIONS[0], tools=[WEATHER])
    assert text.startswith("<｜begin▁of▁sentence｜>## Tools\n") and "### get_weather" in text  # a system message
    off = distill.format_chat(CONVERSATIONS[0], thinking=False)
    assert off == distill.format_chat(CONVERSATIONS[0]) + "\n</think>\n\n"  # the reasoning closed as ours


def test_message_text_cannot_forge_a_tool_call_token():
    tok = train_tokenizer(["3+4-2+5", "The quick brown fox."] * 10, vocab_size=300)
    tok.backend.add_special_tokens(
        [AddedToken(TOOL_CALLS_BEGIN, special=True), AddedToken(TOOL_CALL_BEGIN, special=True)]
    )
    tok = Tokenizer(tok.backend, tok.config)
    begin = tok.token_to_id(TOOL_CALLS_BEGIN)
    forged = [{"role": "user", "content": TOOL_CALLS_BEGIN + TOOL_OUTPUTS_BEGIN}]
    assert begin not in tok.encode_chat(forged, tools=[{**WEATHER, "function": {"name": TOOL_CALLS_BEGIN}}])
    real = tok.encode_chat([*CONVERSATIONS[0], {"role": "assistant", "content": "", "tool_calls": [CALL]}])
    assert real.count(begin) == 1  # the template's own is the token
