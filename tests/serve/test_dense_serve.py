"""`nanoseek serve` on the dense students: a tiny Qwen2 and a tiny Llama checkpoint written by
transformers, with a tokenizer whose own chat template opens the reasoning ("<think>\\n"), answer
the official openai client with the reasoning in `reasoning_content` apart from the content."""

import json

import openai
import pytest
import torch

from dense_support import transformers_model
from nanoseek.data import train_tokenizer
from nanoseek.data.chat import ASSISTANT, BOS, EOS, USER
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer import Engine, SamplingParams

from serve_support import KEY, serve_in_thread

TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '" + USER + "' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '" + ASSISTANT + "' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "<think>\\n' }}{% endif %}"
)


def hub_style_directory(root, name):
    """A transformers checkpoint of config `name` and a tokenizer with its own chat template, a
    `</think>` that comes after a few tokens: the model's greedy reply has reasoning and an answer."""
    texts = ["What is 3+4? The sum is 7.", "<think>\n2+5=7</think> It is 7.", "The quick brown fox."] * 20
    tok = train_tokenizer(texts, vocab_size=300)
    tok.backend.save(str(root / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "clean_up_tokenization_spaces": False, "chat_template": TEMPLATE}
    (root / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    tok = Tokenizer.from_pretrained(root)
    hf = transformers_model(name)
    hf.resize_token_embeddings(tok.vocab_size, mean_resizing=False)
    hf.save_pretrained(root)
    return root, tok


@pytest.mark.parametrize("name", ["qwen2-gqa2-tied", "llama3-gqa2-scaled"])
def test_openai_client_gets_reasoning_apart_from_a_dense_model(name, tmp_path):
    root, tok = hub_style_directory(tmp_path, name)
    engine = Engine.from_pretrained(root, max_batch_size=2, max_seq_len=96)
    with torch.no_grad():  # no end of sequence and no <think>; </think> after the 4th token
        for t in (tok.eos_id, tok.think_id, tok.end_think_id):
            engine.model.lm_head.weight[t] = 0.0
    messages = [{"role": "user", "content": "What is 3+4?"}]
    ids = tok.encode_chat(messages)
    first = engine.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=4))[0].outputs[0]
    # The expected reply: 4 reasoning tokens, </think>, then the answer the model writes after it.
    rest = engine.generate(
        [{"prompt_token_ids": ids + first.token_ids + [tok.end_think_id]}], SamplingParams(temperature=0, max_tokens=6)
    )[0].outputs[0]

    with serve_in_thread(engine, api_key=KEY) as url:  # a thinking budget of 4 forces </think> 5th
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model="tiny", messages=messages, temperature=0, max_tokens=11, extra_body={"max_reasoning_tokens": 4}
        )
    message = reply.choices[0].message
    assert first.text.strip() and rest.text.strip()
    assert message.reasoning_content == first.text.strip()
    assert message.content == rest.text.strip()
