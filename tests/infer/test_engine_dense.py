"""The engine on the dense students (Qwen2 and Llama layouts, grouped-query KV cache): greedy
output equals transformers' `generate` on a checkpoint transformers wrote, and the cache holds
keys and values per KV head."""

import pytest
import torch

from dense_support import transformers_model
from nanoseek import NanoseekError
from nanoseek.dense import DenseTransformer
from nanoseek.infer import Engine, SamplingParams
from nanoseek.io.hf import load_pretrained


@pytest.mark.parametrize("name", ["qwen2-gqa2-tied", "llama3-gqa4-biases-tied", "qwen2-mha-untied"])
def test_greedy_equals_transformers_generate(name, tmp_path):
    hf = transformers_model(name)
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert isinstance(model, DenseTransformer)
    prompts = [[5, 17, 3, 44, 9, 12, 2], [8, 30, 31], [60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    engine = Engine.from_pretrained(tmp_path, max_batch_size=2, max_seq_len=64)  # 3 prompts: one waits
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=16, min_tokens=16))
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                do_sample=False,
                max_new_tokens=16,
                min_new_tokens=16,
                pad_token_id=0,
            )
        assert out.outputs[0].token_ids == ref[0, len(p) :].tolist()
    c = model.config
    assert engine.kv_cache_bytes_per_token() == c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4


def test_samples_share_the_prompt_and_logprobs_match_a_full_forward(tmp_path):
    hf = transformers_model("qwen2-gqa2-tied")
    hf.save_pretrained(tmp_path)
    engine = Engine.from_pretrained(tmp_path, max_batch_size=4, max_seq_len=64)
    prompt = [5, 17, 3, 44, 9]
    out = engine.generate([prompt], SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=2, logprobs=0))[0]
    for o in out.outputs:  # the n samples copy the prompt's cache rows
        with torch.no_grad():
            logits = engine.model(torch.tensor([prompt + o.token_ids]))[0, len(prompt) - 1 : -1]
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(o.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(o.logprobs), want, atol=1e-4, rtol=0)


def test_speculative_decoding_is_refused_for_a_dense_model(tmp_path):
    transformers_model("qwen2-gqa2-tied").save_pretrained(tmp_path)
    with pytest.raises(NanoseekError, match="MTP module"):
        Engine.from_pretrained(tmp_path, max_batch_size=1, max_seq_len=32, speculative=True)


def test_an_end_of_sequence_id_outside_the_vocabulary_is_one_line(tmp_path):
    hf = transformers_model("qwen2-gqa2-tied")
    hf.config.eos_token_id = 151643  # a 151K-vocabulary id in a 96-token model
    hf.save_pretrained(tmp_path)
    with pytest.raises(NanoseekError, match="end-of-sequence id 151643 is not in the model's vocabulary of 96"):
        Engine.from_pretrained(tmp_path, max_batch_size=1, max_seq_len=16)


def test_streaming_and_stop_strings_on_a_dense_model(tmp_path):
    """The engine's streaming and stop strings run unchanged on the dense family."""
    from nanoseek.data import train_tokenizer

    texts = ["What is 3+4? The sum is 7.", "<think>2+5=7</think> It is 7.", "The quick brown fox."] * 20
    tok = train_tokenizer(texts, vocab_size=300)
    hf = transformers_model("llama3-gqa2-scaled")
    hf.resize_token_embeddings(tok.vocab_size, mean_resizing=False)
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    engine = Engine.from_pretrained(tmp_path, max_batch_size=2, max_seq_len=64)
    params = SamplingParams(temperature=0, max_tokens=12, min_tokens=12)
    whole = engine.generate(["The quick"], params)[0].outputs[0]
    streamed = "".join(e.text for e in engine.stream(["The quick"], params))
    assert streamed == whole.text and whole.text
    cut = whole.text[len(whole.text) // 2 :][:3]  # a piece of the text as a stop string
    stopped = engine.generate(["The quick"], SamplingParams(temperature=0, max_tokens=12, stop=[cut]))[0].outputs[0]
    assert stopped.finish_reason == "stop" and whole.text.startswith(stopped.text) and cut not in stopped.text
