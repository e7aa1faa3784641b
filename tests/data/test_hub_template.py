"""A tokenizer directory written elsewhere (an R1-Distill download): no nanoseek prompt_format, its
own Jinja chat template, whose generation prompt opens the reasoning with "<think>\\n". nanoseek
renders that template as transformers does and the engine's replies come back with the reasoning
apart."""

import json

import pytest
import torch

from dense_support import transformers_model
from nanoseek.data import train_tokenizer
from nanoseek.data.chat import ASSISTANT, BOS, EOS, USER
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.errors import NanoseekError

# The shape of the R1-Distill templates (written here): BOS, user and assistant turns, and a
# generation prompt that opens the reasoning.
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '" + USER + "' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '" + ASSISTANT + "' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "<think>\\n' }}{% endif %}"
)
MESSAGES = [
    {"role": "user", "content": "What is 3+4?"},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "And 2+5? {braces} stay"},
]


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    texts = ["What is 3+4? The sum is 7.", "<think>\n2+5=7</think> It is 7.", "And braces {x} stay"] * 20
    tok = train_tokenizer(texts, vocab_size=300)
    tok.backend.save(str(root / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "clean_up_tokenization_spaces": False,
        "chat_template": TEMPLATE,
    }
    (root / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return root


def test_the_directory_template_renders_as_transformers_renders_it(hub_dir):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(hub_dir)
    ours = Tokenizer.from_pretrained(hub_dir)
    assert ours.prompt_format == "template"
    text = theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert ours.format_chat(MESSAGES) == text
    assert text.endswith(ASSISTANT + "<think>\n")
    ids = theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ours.encode_chat(MESSAGES) == list(ids)
    # One question's prompt with a {prompt} field, as evaluation and GRPO take it.
    one = ours.prompt_template().format(prompt="What is 9+1?")
    assert one == ours.format_chat([{"role": "user", "content": "What is 9+1?"}])
    with pytest.raises(NanoseekError, match="SFT on a tokenizer's own Jinja chat template"):
        ours.chat_segments(MESSAGES)


def test_engine_chat_on_a_dense_hub_directory_splits_the_reasoning(hub_dir, tmp_path):
    from nanoseek.infer import Engine, SamplingParams

    tok = Tokenizer.from_pretrained(hub_dir)
    hf = transformers_model("qwen2-mha-untied")
    hf.resize_token_embeddings(tok.vocab_size)
    hf.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((hub_dir / name).read_bytes())
    engine = Engine.from_pretrained(tmp_path, max_batch_size=2, max_seq_len=96)
    with torch.no_grad():  # a random model that writes no tag: each tag's logit 0, below the best of the rest
        for t in (tok.think_id, tok.end_think_id, tok.eos_id):
            engine.model.lm_head.weight[t] = 0.0
    params = SamplingParams(temperature=0, max_tokens=12, min_tokens=12)
    out = engine.chat(MESSAGES, params)[0].outputs[0]
    assert out.text.strip() and "<think>" not in out.text and "</think>" not in out.text
    # The prompt ended inside <think>: what comes before a </think> is reasoning, not answer.
    assert (out.reasoning, out.answer) == (out.text.strip(), "")
    # The same prompt without the template's "<think>\n": the same kind of text is the answer.
    ids = tok.encode_chat(MESSAGES)
    think = ids.index(tok.think_id)
    plain = engine.generate([{"prompt_token_ids": ids[:think]}], params)[0].outputs[0]
    assert plain.text.strip() and plain.reasoning == "" and plain.answer == plain.text.strip()
