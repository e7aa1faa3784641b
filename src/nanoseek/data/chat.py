"""The two prompt formats (R1-Zero plain template, DeepSeek chat turns) and their special strings.

R1-Zero (DeepSeek-R1 section 2.2.1) trains a base model with a plain-text template: the
assistant thinks inside <think> </think>, then answers inside <answer> </answer>. The chat
format is DeepSeek-R1's: special tokens mark the turns and the generation prompt opens the
reasoning with "<think>\\n", so a completion starts inside the reasoning.

A saved model carries the format it was trained with: its tokenizer_config.json holds
`prompt_format` ("chat" or "r1-zero") and the same format as a Jinja `chat_template`, so
`chat`, `serve`, `generate` and the evaluation prompt it as it learnt (`Tokenizer.format_chat`).
A conversation in the R1-Zero format reads as lines:

    A conversation between User and Assistant. ... inside <answer> </answer>.
    User: a=1,b=2. a+b
    Assistant: <think></think> <answer>3</answer>
    User: a=3,b=-1. a+b
    Assistant:

An earlier assistant turn is written as the corpus writes a completion, with its reasoning
when it has one (DeepSeek's API sends earlier turns without it, so it is usually empty); only
the last message of a conversation ends with EOS, so that no end of document sits inside a
prompt. System messages follow the preamble, one line each.

`format_chat` is plain Python; `CHAT_TEMPLATES` holds the same formats as Jinja for
`transformers.apply_chat_template`. tests/data/test_tokenizer.py checks that they give the same ids.

Text cannot forge control tokens. Rendered as text, a turn's "<｜User｜>" and a message that
spells "<｜User｜>" are the same string, so `Tokenizer.encode_chat` renders the conversation
with `ContentEscape` stand-ins for the characters that begin and end a control token in every
message string; only the template's own control tokens are then left in the text, and the
message strings come back as ordinary text (tests/data/test_control_tokens.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache

from nanoseek.errors import NanoseekError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
ANSWER, END_ANSWER = "<answer>", "</answer>"

# The R1-Zero template, in our words and kept short: the tiny pipeline pays for every token
# of it in each pretraining document and in each rollout. The completion starts after
# "Assistant:" and should read " <think>...</think> <answer>...</answer>".
R1_ZERO_PREAMBLE = (
    "A conversation between User and Assistant. The Assistant first thinks inside "
    "<think> </think>, then answers inside <answer> </answer>.\n"
)
R1_ZERO_TEMPLATE = R1_ZERO_PREAMBLE + "User: {prompt}\nAssistant:"

GENERATION_PROMPT = ASSISTANT + THINK + "\n"
R1_ZERO_USER, R1_ZERO_ASSISTANT = "User: ", "Assistant:"  # the R1-Zero format's turns

PROMPT_FORMATS = ("chat", "r1-zero")


def r1_zero_prompt(prompt: str, preamble: bool = True) -> str:
    """The R1-Zero prompt for one question: plain text, encoded with bos=True like the corpus
    documents. Without the preamble it starts at "User:" (the short form of corpus documents)."""
    text = R1_ZERO_TEMPLATE.format(prompt=prompt)
    return text if preamble else text[len(R1_ZERO_PREAMBLE) :]


def _assistant_parts(message: dict) -> tuple[str, str]:
    """(reasoning, content) of an assistant turn: from `reasoning_content` (DeepSeek API field),
    else from a content that already holds "...</think>answer"."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise NanoseekError(f"'reasoning_content' must be a string, got {type(reasoning).__name__}")
    if reasoning is None:
        reasoning = ""
        if END_THINK in content:
            reasoning, content = content.rsplit(END_THINK, 1)
            reasoning = reasoning.strip()
            if reasoning.startswith(THINK):
                reasoning = reasoning[len(THINK) :]
    return reasoning.strip(), content.strip()


def r1_zero_completion(reasoning: str, answer: str) -> str:
    """What the model writes after the R1-Zero prompt's "Assistant:" (and what RL rewards)."""
    return f" {THINK}{reasoning}{END_THINK} {ANSWER}{answer}{END_ANSWER}"


def check_prompt_format(name: str, where: str = "prompt format") -> str:
    if name not in PROMPT_FORMATS:
        raise NanoseekError(f"{where} {name!r}: expected one of {', '.join(PROMPT_FORMATS)}")
    return name


def chat_segments(
    messages: list[dict], add_generation_prompt: bool = True, prompt_format: str = "chat"
) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant_output) pieces; `format_chat` joins them.

    An assistant piece is what the model generates after the generation prompt: in the chat
    format the reasoning, "</think>", the answer and EOS; in the R1-Zero format the completion
    " <think>...</think> <answer>...</answer>" (and EOS when it ends the conversation). SFT
    trains on exactly those pieces.
    """
    check_prompt_format(prompt_format)
    r1_zero = prompt_format == "r1-zero"
    system, turns = [], [(BOS, False)]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise NanoseekError(f"message {i}: expected a dict with 'role' and 'content', got {m!r:.80}")
        role, content = m["role"], m.get("content")
        if content is not None and not isinstance(content, str):
            raise NanoseekError(f"message {i}: 'content' must be a string, got {type(content).__name__}")
        if role == "system":
            system.append(content or "")
        elif role == "user":
            text = content or ""
            turns.append((R1_ZERO_USER + text + "\n" if r1_zero else USER + text, False))
        elif role == "assistant":
            reasoning, answer = _assistant_parts(m)
            if r1_zero:
                last = i == len(messages) - 1
                turns.append((R1_ZERO_ASSISTANT, False))
                turns.append((r1_zero_completion(reasoning, answer) + (EOS if last else ""), True))
                if not last:
                    turns.append(("\n", False))
            else:
                turns.append((GENERATION_PROMPT, False))
                turns.append((reasoning + "\n" + END_THINK + "\n\n" + answer + EOS, True))
        else:
            raise NanoseekError(f"message {i}: role {role!r} is not one of system, user, assistant")
    if r1_zero:  # the preamble is R1-Zero's system prompt; system messages follow it
        turns.insert(1, (R1_ZERO_PREAMBLE + "".join(text + "\n" for text in system), False))
    elif system:  # DeepSeek puts every system message first, right after BOS
        turns.insert(1, ("\n\n".join(system), False))
    if add_generation_prompt:
        turns.append((R1_ZERO_ASSISTANT if r1_zero else GENERATION_PROMPT, False))
    return turns


def format_chat(messages: list[dict], add_generation_prompt: bool = True, prompt_format: str = "chat") -> str:
    """A conversation as text, in DeepSeek-R1's chat format:
    BOS system <｜User｜>q <｜Assistant｜><think>\\n reasoning \\n</think>\\n\\n answer EOS ...
    or in the R1-Zero format: BOS preamble "User: q\\nAssistant: <think>r</think> <answer>a</answer>\\n..." """
    return "".join(text for text, _ in chat_segments(messages, add_generation_prompt, prompt_format))


def prompt_template(prompt_format: str) -> str:
    """The prompt of one question, with a {prompt} field (what GRPO and the evaluation fill);
    without BOS, which the engine and GRPO add."""
    text = format_chat([{"role": "user", "content": "{prompt}"}], prompt_format=prompt_format)
    return text[len(BOS) :]


def template_format(template: str) -> str | None:
    """The prompt format whose one-question prompt `template` is, or None for another template."""
    return next((f for f in PROMPT_FORMATS if template in (prompt_template(f), BOS + prompt_template(f))), None)


def _jinja(text: str) -> str:
    """`text` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# The formats in Jinja, for tokenizer_config.json. One line each, so that no template
# whitespace reaches the output whatever the environment's trim settings.
# `_assistant_parts` in Jinja: sets `reasoning` and `content` (both still to be trimmed).
_JINJA_ASSISTANT_PARTS = [
    "{%- set content = m['content'] or '' -%}",
    "{%- if m.get('reasoning_content') is not none -%}",
    "{%- set reasoning = m['reasoning_content'] -%}",
    "{%- elif " + _jinja(END_THINK) + " in content -%}",
    "{%- set parts = content.split(" + _jinja(END_THINK) + ") -%}",
    "{%- set reasoning = parts[:-1] | join(" + _jinja(END_THINK) + ") | trim -%}",
    "{%- set content = parts[-1] -%}",
    "{%- if reasoning.startswith("
    + _jinja(THINK)
    + ") -%}{%- set reasoning = reasoning["
    + str(len(THINK))
    + ":] -%}{%- endif -%}",
    "{%- else -%}",
    "{%- set reasoning = '' -%}",
    "{%- endif -%}",
]
_JINJA_UNKNOWN_ROLE = [
    "{%- elif m['role'] != 'system' -%}",
    "{{- raise_exception('role ' + m['role'] + ' is not one of system, user, assistant') -}}",
    "{%- endif -%}",
]

CHAT_TEMPLATE = "".join(
    [
        "{%- set ns = namespace(system='') -%}",
        "{%- for m in messages if m['role'] == 'system' -%}",
        "{%- set ns.system = ns.system + ('\\n\\n' if loop.index0 > 0 else '') + (m['content'] or '') -%}",
        "{%- endfor -%}",
        "{{- " + _jinja(BOS) + " + ns.system -}}",
        "{%- for m in messages -%}",
        "{%- if m['role'] == 'user' -%}",
        "{{- " + _jinja(USER) + " + (m['content'] or '') -}}",
        "{%- elif m['role'] == 'assistant' -%}",
        *_JINJA_ASSISTANT_PARTS,
        "{{- "
        + _jinja(GENERATION_PROMPT)
        + " + (reasoning | trim) + "
        + _jinja("\n" + END_THINK + "\n\n")
        + " + (content | trim) + "
        + _jinja(EOS)
        + " -}}",
        *_JINJA_UNKNOWN_ROLE,
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- " + _jinja(GENERATION_PROMPT) + " -}}{%- endif -%}",
    ]
)

R1_ZERO_CHAT_TEMPLATE = "".join(
    [
        "{{- " + _jinja(BOS + R1_ZERO_PREAMBLE) + " -}}",
        "{%- for m in messages if m['role'] == 'system' -%}{{- (m['content'] or '') + '\\n' -}}{%- endfor -%}",
        "{%- for m in messages -%}",
        "{%- if m['role'] == 'user' -%}",
        "{{- " + _jinja(R1_ZERO_USER) + " + (m['content'] or '') + '\\n' -}}",
        "{%- elif m['role'] == 'assistant' -%}",
        *_JINJA_ASSISTANT_PARTS,
        "{{- "
        + _jinja(R1_ZERO_ASSISTANT + " " + THINK)
        + " + (reasoning | trim) + "
        + _jinja(END_THINK + " " + ANSWER)
        + " + (content | trim) + "
        + _jinja(END_ANSWER)
        + " + ("
        + _jinja(EOS)
        + " if loop.last else '\\n') -}}",
        *_JINJA_UNKNOWN_ROLE,
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- " + _jinja(R1_ZERO_ASSISTANT) + " -}}{%- endif -%}",
    ]
)

CHAT_TEMPLATES = {"chat": CHAT_TEMPLATE, "r1-zero": R1_ZERO_CHAT_TEMPLATE}


def strip_end_tokens(text: str) -> str:
    """Drop the EOS and padding tokens that a decode without skip_special_tokens leaves at the end."""
    text = text.rstrip()
    while text.endswith((EOS, PAD)):
        text = text[: -len(EOS if text.endswith(EOS) else PAD)].rstrip()
    return text


# ---------------------------------------------------------------------------------------
# Message text that cannot become control tokens.
# ---------------------------------------------------------------------------------------
ESCAPE = "\ue000"  # a private-use character: the first of each two-character stand-in
_CODES = 0xE100  # the second: private-use characters from here on, one per escaped character


class ContentEscape:
    """Stand-ins for the first and last characters of the control-token strings `controls`.

    Every such character in a message string (and ESCAPE itself) is replaced by ESCAPE plus a
    code before the template renders the messages; in the rendered text a control string then
    begins and ends with characters the template wrote. The template's control tokens are found
    in that text, and `unescape` gives the rest back as the messages wrote it, for encoding as
    ordinary text. (A template that writes "<" + content + ">" itself could still spell one:
    that is the template's doing, and none of nanoseek's or DeepSeek's does.)
    """

    def __init__(self, controls: Iterable[str]):
        ends = {c for s in controls if s for c in (s[0], s[-1])} - {ESCAPE}
        chars = [ESCAPE] + sorted(c for c in ends if not _CODES <= ord(c) < 0xF900)
        self.pairs = [(c, ESCAPE + chr(_CODES + i)) for i, c in enumerate(chars)]

    def escape_text(self, text: str) -> str:
        for char, stand_in in self.pairs:  # ESCAPE first: the stand-ins after it hold ESCAPE
            text = text.replace(char, stand_in)
        return text

    def escape(self, value):
        """`value` with every string in it escaped (dicts and lists walked; keys left alone)."""
        if isinstance(value, str):
            return self.escape_text(value)
        if isinstance(value, dict):
            return {k: self.escape(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.escape(v) for v in value]
        return value

    def unescape(self, text: str) -> str:
        if ESCAPE not in text:
            return text
        for char, stand_in in reversed(self.pairs):  # ESCAPE last, as it went in first
            text = text.replace(stand_in, char)
        return text


# ---------------------------------------------------------------------------------------
# Jinja chat templates (tokenizer_config.json's `chat_template`).
# ---------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise NanoseekError(str(message))

    def tojson(value, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)

    # As transformers renders templates: block tags take their newline and indentation with them.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    """A Jinja chat template rendered as transformers' `apply_chat_template(tokenize=False)`
    renders it (jinja2 comes with torch). `variables`: bos_token, eos_token and the like.
    A template that fails, or refuses the messages, is a NanoseekError."""
    try:
        compiled = _compile(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except NanoseekError:
        raise
    except Exception as e:  # a TemplateError, or a Python error inside the template on these messages
        raise NanoseekError(f"chat_template: {type(e).__name__}: {e}") from None
