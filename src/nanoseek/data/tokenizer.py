"""Byte-level BPE with DeepSeek's special tokens, trained with `tokenizers`; reads any tokenizer.json.

A directory written by `save_pretrained` opens in `transformers.AutoTokenizer` (tokenizer.json
plus a tokenizer_config.json holding the chat template), and a released DeepSeek tokenizer
directory opens here: the special tokens are looked up by their strings.

The prompt format a model was trained with travels in its tokenizer_config.json: the key
`prompt_format` ("chat" or "r1-zero", see nanoseek.data.chat) names it for nanoseek and
`chat_template` spells it for transformers. A directory without the key (a released DeepSeek
tokenizer, or one saved before the key existed) is in the chat format.

Two encoders: `encode` reads the strings of special tokens in the text as those tokens (for text
written with them on purpose: a corpus document, a prompt a program formatted), `encode_plain`
spells them out as ordinary text (for text from outside: a completions prompt); `encode_chat`
takes its control tokens from the template only and the messages as ordinary text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from nanoseek.config import read_json_object
from nanoseek.data.chat import (
    ANSWER,
    ASSISTANT,
    BOS,
    CHAT_TEMPLATES,
    END_ANSWER,
    END_THINK,
    EOS,
    NO_THINKING,
    PAD,
    THINK,
    USER,
    ContentEscape,
    chat_segments,
    check_prompt_format,
    format_chat,
    prompt_template,
    render_chat_template,
    tools_prompt,
)
from nanoseek.data.reasoning import prompt_opens_reasoning
from nanoseek.errors import NanoseekError

# Order fixes the ids: BOS 0, EOS 1, PAD 2 as in DeepSeek-V3 (and ModelConfig's defaults).
SPECIAL_TOKENS: dict[str, str] = {
    "bos": BOS,
    "eos": EOS,
    "pad": PAD,
    "user": USER,
    "assistant": ASSISTANT,
    "think": THINK,
    "end_think": END_THINK,
    "answer": ANSWER,
    "end_answer": END_ANSWER,
}
N_BYTES = 256


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    min_frequency: int = 2,
    split_punctuation: bool = False,
    split_digits: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE on `texts`. Digits are split one per token, so that arithmetic
    stays learnable with a vocabulary of a few hundred entries; `split_punctuation` does the
    same for punctuation, so that "c=-4" and "c=4" share the tokens "c" and "=" (a value
    is then looked up by copying what follows "c=", instead of choosing between "=" and "=-").
    `split_digits=False` lets BPE merge a number's digits (the countdown demo's: "16" is then
    one token wherever it is written without a space before it, and a value equals the target
    when their tokens are the same)."""
    smallest = N_BYTES + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise NanoseekError(
            f"--vocab-size {vocab_size}: must be at least {smallest} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            *([pre_tokenizers.Digits(individual_digits=True)] if split_digits else []),
            *([pre_tokenizers.Punctuation("isolated")] if split_punctuation else []),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Like DeepSeek's tokenizer.json: `transformers` adds BOS when asked for special tokens.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B:1",
        special_tokens=[(BOS, bos_id)],
    )
    return Tokenizer(tok)


def _token_string(value) -> str | None:
    """tokenizer_config.json spells a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _own_template(config: dict, where: str) -> str | None:
    """The Jinja chat template of a tokenizer_config.json that names no nanoseek prompt_format
    (transformers writes one string, or a list of named ones of which "default" is used)."""
    if "prompt_format" in config:
        return None
    template = config.get("chat_template")
    if template in CHAT_TEMPLATES.values():  # nanoseek's own, saved before the prompt_format key
        return None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        return None
    if not isinstance(template, str) or not template.strip():
        raise NanoseekError(f"{where}: key 'chat_template': expected a Jinja template string")
    return template


class Tokenizer:
    """A `tokenizers.Tokenizer` with the ids of nanoseek's special tokens (None where absent)."""

    def __init__(self, backend: tokenizers.Tokenizer, config: dict | None = None, where: str = "tokenizer"):
        self.backend = backend
        self.config = (
            dict(config)
            if config is not None
            else {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOS,
                "pad_token": PAD,
                "unk_token": None,
                "clean_up_tokenization_spaces": False,
                "prompt_format": "chat",
                "chat_template": CHAT_TEMPLATES["chat"],
            }
        )
        # A directory written elsewhere (an R1-Distill model from the hub) names no prompt_format and
        # holds its own Jinja chat template: that template is the model's format ("template").
        self.chat_template = _own_template(self.config, where)
        if self.chat_template is not None:
            self.prompt_format = "template"
        else:
            ours = {t: name for name, t in CHAT_TEMPLATES.items()}.get(self.config.get("chat_template"), "chat")
            self.prompt_format = check_prompt_format(
                self.config.get("prompt_format", ours), f"{where}: key 'prompt_format'"
            )
        strings = dict(SPECIAL_TOKENS)
        for name in ("bos", "eos", "pad"):
            strings[name] = _token_string(self.config.get(f"{name}_token")) or strings[name]
        self.special_ids: dict[str, int | None] = {n: backend.token_to_id(s) for n, s in strings.items()}
        if self.special_ids["pad"] is None:
            self.special_ids["pad"] = self.special_ids["eos"]
        ids = self.special_ids
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        self.user_id, self.assistant_id = ids["user"], ids["assistant"]
        self.think_id, self.end_think_id = ids["think"], ids["end_think"]
        self.answer_id, self.end_answer_id = ids["answer"], ids["end_answer"]
        # Control tokens: every added token of the backend (special or not: DeepSeek's <think> is
        # not), and nanoseek's special strings wherever they sit in the vocabulary.
        controls = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.content}
        for string in strings.values():
            if backend.token_to_id(string) is not None:
                controls.setdefault(string, backend.token_to_id(string))
        self.control_tokens: dict[str, int] = controls
        self.control_ids = frozenset(self.control_tokens.values())
        self._control_re = (
            re.compile("|".join(map(re.escape, sorted(self.control_tokens, key=len, reverse=True))))
            if self.control_tokens
            else None
        )
        self._escape = ContentEscape(self.control_tokens)

    # ---- files ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Open a directory holding tokenizer.json (and optionally tokenizer_config.json), or a tokenizer.json file."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / "tokenizer.json"
        if not file.is_file():
            raise NanoseekError(f"{file}: no tokenizer.json here (train one with `nanoseek tokenizer train`)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust error says what is wrong in the file
            raise NanoseekError(f"{file}: not a tokenizers file ({str(e).splitlines()[0]})") from e
        config_file = file.with_name("tokenizer_config.json")
        config = read_json_object(config_file) if config_file.is_file() else None
        return cls(backend, config, where=str(config_file))

    def save_pretrained(self, path: str | Path, prompt_format: str | None = None) -> Path:
        """Write tokenizer.json and tokenizer_config.json. `prompt_format`: the format the model
        saved beside it was trained with (default: this tokenizer's own)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = dict(self.config)
        if prompt_format is not None:
            config.update(prompt_format=check_prompt_format(prompt_format), chat_template=CHAT_TEMPLATES[prompt_format])
        self.backend.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(
            json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        return path

    # ---- text <-> ids --------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of `text`; special-token strings in it become their ids."""
        return self._wrap(self.backend.encode(text, add_special_tokens=False).ids, bos, eos)

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        return [self._wrap(e.ids, bos, eos) for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    @cached_property
    def _plain(self) -> tokenizers.Tokenizer:
        """A copy of the backend that spells every added token out as text: `tokenizers`'
        encode_special_tokens does that for the special ones, so all are marked special here."""
        spec = json.loads(self.backend.to_str())
        for token in spec.get("added_tokens") or []:
            token["special"] = True
        plain = tokenizers.Tokenizer.from_str(json.dumps(spec))
        plain.encode_special_tokens = True
        return plain

    def encode_plain(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of `text` as ordinary text: a special token's string in it ("<｜User｜>") is
        spelt out in ordinary tokens, never its id. For text from outside, such as the
        completions endpoint's prompt; `bos`/`eos` add the real tokens."""
        return self._wrap(self._plain_ids([text])[0], bos, eos)

    def _plain_ids(self, texts: list[str]) -> list[list[int]]:
        out = [e.ids for e in self._plain.encode_batch(texts, add_special_tokens=False)]
        for text, ids in zip(texts, out):
            if not self.control_ids.isdisjoint(ids):  # a vocabulary whose merges spell a control token
                token = self.id_to_token(next(i for i in ids if i in self.control_ids))
                raise NanoseekError(f"text {text[:40]!r}...: this tokenizer encodes it with control token {token!r}")
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- the model's prompt format ---------------------------------------------------
    def format_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        thinking: bool = True,
    ) -> str:
        """The conversation as text in this tokenizer's prompt format; for a directory saved
        here, what transformers' `apply_chat_template(messages, tokenize=False, tools=tools,
        thinking=thinking)` gives. As text, a message that spells a control token cannot be
        told from the template's: to prompt a model use `encode_chat`, not `encode(format_chat(...))`.
        `tools`: the functions offered; `thinking` False: the assistant turn opens with its
        reasoning already closed (see `render`)."""
        return self.render(messages, add_generation_prompt, tools, thinking)

    def render(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        thinking: bool = True,
        chat_template: str | None = None,
        prompt_format: str | None = None,
    ) -> str:
        """`format_chat` in `prompt_format` (default: this tokenizer's) or the Jinja `chat_template`.
        A Jinja template gets `tools` and, with thinking off, `thinking` and `enable_thinking`
        False (Qwen3's name); a generation prompt it leaves inside <think> (R1-Distill's) is then
        closed as the chat format closes it ("\\n</think>\\n\\n"). A template that does not
        read `tools` gets them described in a system message of their own, first."""
        fmt = prompt_format or self.prompt_format
        if chat_template is None and fmt == "template":
            if self.chat_template is None:
                raise NanoseekError("prompt format 'template': this tokenizer has no chat template of its own")
            chat_template = self.chat_template
        if chat_template is None:
            return format_chat(messages, add_generation_prompt, fmt, tools, thinking)
        variables = self._template_tokens()
        if tools:
            if "tools" in chat_template:
                variables["tools"] = tools
            else:
                messages = [{"role": "system", "content": tools_prompt(tools)}, *messages]
        if not thinking:
            variables.update(thinking=False, enable_thinking=False)
        text = render_chat_template(chat_template, messages, add_generation_prompt, **variables)
        if add_generation_prompt and not thinking and prompt_opens_reasoning(text):
            text += NO_THINKING
        return text

    def chat_segments(self, messages: list[dict], add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
        """`format_chat` as (text, is_assistant_output) pieces, for SFT."""
        if self.prompt_format == "template":
            raise NanoseekError(
                "SFT on a tokenizer's own Jinja chat template (a directory written elsewhere) is not supported: "
                "save the tokenizer with prompt_format 'chat' or 'r1-zero'"
            )
        return chat_segments(messages, add_generation_prompt, self.prompt_format)

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        prompt_format: str | None = None,
        tools: list[dict] | None = None,
        thinking: bool = True,
    ) -> list[int]:
        """Ids of the conversation in this tokenizer's prompt format (or `prompt_format`), or in
        the Jinja `chat_template` given. Only the template puts control tokens in: every string of the
        messages is ordinary text, so a message that spells "<｜Assistant｜>" cannot end its turn
        (nor an assistant content's "</think>" split off a reasoning). For messages without
        such text, the ids of `format_chat(messages)`: for a directory saved here, what
        transformers' `apply_chat_template(messages, tokenize=True)` gives. `tools` (their
        strings are ordinary text too) and `thinking`: as in `render`."""

        def render(messages, tools):
            return self.render(messages, add_generation_prompt, tools, thinking, chat_template, prompt_format)

        try:
            text = render(self._escape.escape(messages), self._escape.escape(tools))
        except NanoseekError as e:
            render(messages, tools)  # the same error, in the messages' own words
            raise NanoseekError(self._escape.unescape(str(e))) from None
        return self._encode_rendered(text)

    def _template_tokens(self) -> dict[str, str]:
        """bos_token, eos_token, ... as transformers passes them to a chat template."""
        names = ("bos_token", "eos_token", "pad_token", "unk_token")
        tokens = {n: _token_string(self.config.get(n)) for n in names}
        return {n: t for n, t in tokens.items() if t is not None}

    def _encode_rendered(self, text: str) -> list[int]:
        """Ids of a template's output whose message strings are escaped: the control strings
        left in it are the template's, the text between them is encoded as ordinary text (cut
        at the control tokens, as `encode` cuts, so that the ids are the same)."""
        controls, pieces, start = [], [], 0
        for m in self._control_re.finditer(text) if self._control_re is not None else ():
            pieces.append(self._escape.unescape(text[start : m.start()]))
            controls.append(self.control_tokens[m.group()])
            start = m.end()
        pieces.append(self._escape.unescape(text[start:]))
        plain = self._plain_ids(pieces)
        ids = list(plain[0])
        for control, piece in zip(controls, plain[1:]):
            ids.append(control)
            ids += piece
        return ids

    def prompt_template(self) -> str:
        """One question's prompt in this tokenizer's format, with a {prompt} field."""
        if self.prompt_format == "template":
            marker = "\x00prompt\x00"
            text = self.format_chat([{"role": "user", "content": marker}])
            return text.replace("{", "{{").replace("}", "}}").replace(marker, "{prompt}")
        return prompt_template(self.prompt_format)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self.backend.id_to_token(id)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id}, "
            f"prompt_format={self.prompt_format!r})"
        )
