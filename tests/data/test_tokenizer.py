"""Tokenizer and chat format: ids equal to transformers', DeepSeek tokenizer files, the R1-Zero template."""

import json

import pytest
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RustTokenizer

from nanoseek import tasks
from nanoseek.data import (
    CHAT_TEMPLATE,
    PROMPT_FORMATS,
    R1_ZERO_CHAT_TEMPLATE,
    R1_ZERO_TEMPLATE,
    SPECIAL_TOKENS,
    Tokenizer,
    format_chat,
    prompt_template,
    r1_zero_prompt,
    train_tokenizer,
)
from nanoseek.data.chat import BOS, CHAT_TEMPLATES, EOS, PAD, render_chat_template, template_format
from nanoseek.data.corpus import corpus, document
from nanoseek.errors import NanoseekError

TEXTS = [
    "3+4-2+5",
    "The quick brown fox jumps over the lazy dog, 12345 times.",
    "café, naïve, 日本語のテキスト, emoji 😀 and tabs\tand\nnewlines",
    "<think>3+4=7, 7-2=5</think> <answer>5</answer>",
    "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>\nok\n</think>\n\nyes<｜end▁of▁sentence｜>",
    "   leading and trailing spaces   ",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 3+4?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "What is 3+4?"},
        {"role": "assistant", "content": "7", "reasoning_content": "3+4=7"},
        {"role": "user", "content": "And 7-2?"},
    ],
    [
        {"role": "system", "content": "First."},
        {"role": "user", "content": "q"},
        {"role": "system", "content": "Second."},
        {"role": "assistant", "content": "<think>\nsome thought\n</think>\n\nthe answer"},
    ],
    [{"role": "user", "content": "日本語 😀 12345"}, {"role": "assistant", "content": "no reasoning here"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": None, "reasoning_content": ""}],
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    texts = [text for _, text in corpus(tasks.get("arith"), 300, seed=0)] + TEXTS * 5
    tok = train_tokenizer(texts, vocab_size=400)
    path = tok.save_pretrained(tmp_path_factory.mktemp("tok"))
    return tok, path


def hf_ids(result):
    """transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4 returns a list."""
    if isinstance(result, list):
        return result
    return list(result["input_ids"])


def test_special_tokens_and_sizes(trained):
    tok, _ = trained
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)  # as DeepSeek-V3 and ModelConfig
    for name, string in SPECIAL_TOKENS.items():
        assert tok.special_ids[name] == tok.token_to_id(string) is not None
    assert len(set(tok.special_ids.values())) == len(SPECIAL_TOKENS)
    assert 256 + len(SPECIAL_TOKENS) <= tok.vocab_size <= 400
    assert tok.encode("<think>") == [tok.think_id]
    assert tok.encode("x", bos=True, eos=True)[0] == tok.bos_id and tok.encode("x", eos=True)[-1] == tok.eos_id


def test_digits_are_single_tokens(trained):
    tok, _ = trained
    ids = tok.encode("1234567890")
    assert [tok.decode([i]) for i in ids] == list("1234567890")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(trained, text):
    tok, _ = trained
    assert tok.decode(tok.encode(text)) == text


def test_too_small_vocab_is_an_error():
    with pytest.raises(NanoseekError, match="vocab-size"):
        train_tokenizer(["abc"], vocab_size=100)


def test_save_and_reload(trained, tmp_path):
    tok, path = trained
    again = Tokenizer.from_pretrained(path)
    assert again.special_ids == tok.special_ids
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    again.save_pretrained(tmp_path / "copy")
    config = json.loads((tmp_path / "copy" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CHAT_TEMPLATE and config["bos_token"] == BOS


def test_missing_tokenizer_is_an_error(tmp_path):
    with pytest.raises(NanoseekError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(NanoseekError, match="not a tokenizers file"):
        Tokenizer.from_pretrained(tmp_path)


# ---- transformers round trip --------------------------------------------------------------
@pytest.fixture(scope="module")
def hf(trained):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(trained[1]))


@pytest.fixture(scope="module")
def saved_as(trained, tmp_path_factory):
    """(our tokenizer, transformers' tokenizer) of `trained` saved in each prompt format."""
    transformers = pytest.importorskip("transformers")
    out = {}
    for fmt in PROMPT_FORMATS:
        path = trained[0].save_pretrained(tmp_path_factory.mktemp(fmt), prompt_format=fmt)
        out[fmt] = Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(str(path))
    return out


@pytest.mark.parametrize("text", TEXTS)
def test_transformers_encodes_the_same(trained, hf, text):
    tok, _ = trained
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.encode(text) == tok.encode(text, bos=True)  # BOS from the post-processor, as DeepSeek's
    assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def test_transformers_special_tokens(trained, hf):
    tok, _ = trained
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


@pytest.mark.parametrize("fmt", PROMPT_FORMATS)
@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_format_chat(saved_as, fmt, messages, generation_prompt):
    tok, hf = saved_as[fmt]
    assert tok.prompt_format == fmt
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert text == format_chat(messages, add_generation_prompt=generation_prompt, prompt_format=fmt)
    assert text == tok.format_chat(messages, add_generation_prompt=generation_prompt)
    assert text == render_chat_template(CHAT_TEMPLATES[fmt], messages, generation_prompt)  # Jinja without transformers
    ids = hf_ids(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt))
    assert ids == tok.encode(text)  # transformers reads every control string of the text as the token
    ours = tok.encode_chat(messages, add_generation_prompt=generation_prompt)
    assert ours == tok.encode_chat(messages, generation_prompt, chat_template=CHAT_TEMPLATES[fmt])
    if not any(s in str(messages) for s in SPECIAL_TOKENS.values()):
        assert ours == ids  # encode_chat differs only where a message spells a control token
    else:  # CONVERSATIONS[3]: its content's <think>...</think> is text, not a reasoning split off
        as_text = [{"reasoning_content": "", **m} if m["role"] == "assistant" else m for m in messages]
        assert ours != ids and tok.decode(ours) == tok.format_chat(as_text, generation_prompt)  # the same text


def test_prompt_format_travels_with_the_directory(trained, tmp_path):
    tok, path = trained
    assert tok.prompt_format == "chat"  # a new tokenizer, and one saved before the key existed
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["prompt_format"]
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert Tokenizer.from_pretrained(path).prompt_format == "chat"
    r1 = Tokenizer.from_pretrained(tok.save_pretrained(tmp_path / "r1", prompt_format="r1-zero"))
    assert r1.prompt_format == "r1-zero" and r1.config["chat_template"] == R1_ZERO_CHAT_TEMPLATE
    again = Tokenizer.from_pretrained(r1.save_pretrained(tmp_path / "again"))  # copied on by pretraining
    assert again.prompt_format == "r1-zero"
    assert (
        Tokenizer.from_pretrained(again.save_pretrained(tmp_path / "chat", prompt_format="chat")).config[
            "chat_template"
        ]
        == CHAT_TEMPLATE
    )
    with pytest.raises(NanoseekError, match="prompt format 'plain': expected one of chat, r1-zero"):
        tok.save_pretrained(tmp_path / "bad", prompt_format="plain")
    config["prompt_format"] = "r1"
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(NanoseekError, match=r"tokenizer_config.json: key 'prompt_format' 'r1': expected one of"):
        Tokenizer.from_pretrained(path)
    tok.save_pretrained(path)  # as it was, for the other tests


def test_r1_zero_format_layout():
    text = format_chat([{"role": "system", "content": "Be brief."}, *CONVERSATIONS[2]], prompt_format="r1-zero")
    assert text == (
        BOS + "A conversation between User and Assistant. The Assistant first thinks inside <think> </think>, "
        "then answers inside <answer> </answer>.\nBe brief.\nUser: What is 3+4?\n"
        "Assistant: <think>3+4=7</think> <answer>7</answer>\nUser: And 7-2?\nAssistant:"
    )
    # one question is the R1-Zero template GRPO trains with, encoded with BOS as the corpus is
    question = [{"role": "user", "content": "a=1,b=2. a+b"}]
    assert format_chat(question, prompt_format="r1-zero") == BOS + r1_zero_prompt("a=1,b=2. a+b")
    assert prompt_template("r1-zero") == R1_ZERO_TEMPLATE and template_format(R1_ZERO_TEMPLATE) == "r1-zero"
    assert template_format(prompt_template("chat")) == "chat" and template_format("Q: {prompt}\nA:") is None
    assert format_chat(question) == BOS + prompt_template("chat").format(prompt="a=1,b=2. a+b")


def test_r1_zero_conversation_is_a_corpus_document(trained):
    """A one-turn conversation in the R1-Zero format, as SFT tokenizes it piece by piece, is a
    worked pretraining document between BOS and EOS, and SFT trains on its completion only."""
    tok = Tokenizer(trained[0].backend, {**trained[0].config, "prompt_format": "r1-zero"})
    task = tasks.get("chain", min_values=3, max_values=3, signed=True)
    problem = task.sample(1, seed=0)[0]
    messages = [
        {"role": "user", "content": problem.prompt},
        {"role": "assistant", "content": problem.answer, "reasoning_content": task.worked(problem)},
    ]
    doc = document("worked", problem, task)
    segments = tok.chat_segments(messages, add_generation_prompt=False)
    assert "".join(t for t, _ in segments) == BOS + doc + EOS
    ids = [i for text, _ in segments for i in tok.encode(text)]
    assert ids == tok.encode(doc, bos=True, eos=True)
    trained_text = "".join(t for t, out in segments if out)
    assert trained_text == f" <think>{task.worked(problem)}</think> <answer>{problem.answer}</answer>" + EOS


def test_chat_format_layout():
    text = format_chat(CONVERSATIONS[2])
    assert text == (
        "<｜begin▁of▁sentence｜><｜User｜>What is 3+4?<｜Assistant｜><think>\n3+4=7\n</think>\n\n7"
        "<｜end▁of▁sentence｜><｜User｜>And 7-2?<｜Assistant｜><think>\n"
    )
    assert format_chat(CONVERSATIONS[3], add_generation_prompt=False) == (
        "<｜begin▁of▁sentence｜>First.\n\nSecond.<｜User｜>q<｜Assistant｜><think>\nsome thought\n</think>\n\n"
        "the answer<｜end▁of▁sentence｜>"
    )


def test_unknown_role_is_an_error(hf):
    bad = [{"role": "robot", "content": "x"}]
    with pytest.raises(NanoseekError, match="role 'robot'"):
        format_chat(bad)
    with pytest.raises(Exception):  # noqa: B017 (jinja2 raises its own TemplateError)
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(NanoseekError):
        format_chat([{"role": "user", "content": ["parts"]}])


# ---- a released DeepSeek tokenizer directory ----------------------------------------------
def deepseek_style_dir(path):
    """A small tokenizer laid out like DeepSeek-V3/R1's: Split + ByteLevel pre-tokenizer, BOS/EOS/PAD
    at 0-2, turn and think tokens added at the end, AddedToken dicts in tokenizer_config.json."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=Regex(r"\p{N}{1,3}"), behavior="isolated"),
            pre_tokenizers.Split(pattern=Regex(r"[^\r\n\p{L}\p{N}]?\p{L}+|\s+|[^\s\p{L}\p{N}]+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 3, trainer=trainer)
    tok.add_special_tokens([AddedToken("<｜User｜>", special=True), AddedToken("<｜Assistant｜>", special=True)])
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    tok.save(str(path / "tokenizer.json"))

    def added(content):
        return {
            "__type": "AddedToken",
            "content": content,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }

    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added(BOS),
        "eos_token": added(EOS),
        "pad_token": added(PAD),
        "unk_token": None,
        "legacy": True,
        "model_max_length": 16384,
        "tokenizer_class": "LlamaTokenizerFast",
        "clean_up_tokenization_spaces": False,
        # The directory's own template is the model's format (as transformers renders it): R1's shape.
        "chat_template": "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
        "{% else %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return path


def test_deepseek_style_tokenizer_loads(tmp_path):
    tok = Tokenizer.from_pretrained(deepseek_style_dir(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.user_id is not None and tok.assistant_id is not None and tok.think_id is not None
    assert tok.answer_id is None  # DeepSeek's vocabulary has no <answer> token: it stays text
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode_chat(CONVERSATIONS[0])
    assert ids[0] == tok.bos_id and tok.user_id in ids and ids[-2] == tok.think_id  # ends "<think>\n"
    # a tokenizer.json path works too, and saving keeps DeepSeek's own config
    assert Tokenizer.from_pretrained(tmp_path / "tokenizer.json").config["tokenizer_class"] == "LlamaTokenizerFast"


# ---- R1-Zero template ------------------------------------------------------------------------
def test_r1_zero_template():
    prompt = r1_zero_prompt("3+4-2")
    assert prompt == R1_ZERO_TEMPLATE.replace("{prompt}", "3+4-2")
    assert prompt.endswith("\nUser: 3+4-2\nAssistant:") and "<think> </think>" in prompt
    assert r1_zero_prompt("\\frac{1}{2} {x}").count("{x}") == 1  # braces in the question are kept
