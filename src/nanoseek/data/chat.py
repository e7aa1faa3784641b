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
# DeepSeek-V3's tool-call tokens (its tokenizer has each as one token; a tokenizer without them
# spells them in ordinary tokens). A call: TOOL_CALL_BEGIN "function" TOOL_SEP name "\n```json\n"
# arguments "\n```" TOOL_CALL_END; an assistant turn's calls, joined by "\n", sit between
# TOOL_CALLS_BEGIN and TOOL_CALLS_END after its content; a run of tool results between
# TOOL_OUTPUTS_BEGIN and TOOL_OUTPUTS_END, each as TOOL_OUTPUT_BEGIN content TOOL_OUTPUT_END.
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
TOOL_ARGS_BEGIN, TOOL_ARGS_END = "\n```json\n", "\n```"
# The functions offered, after the system messages (nanoseek's words: DeepSeek-V3's template
# leaves describing them to the system prompt).
TOOLS_HEADER = "## Tools\nYou can call these functions, with JSON arguments:"

# The R1-Zero template, in our words and kept short: the tiny pipeline pays for every token
# of it in each pretraining document and in each rollout. The completion starts after
# "Assistant:" and should read " <think>...</think> <answer>...</answer>".
R1_ZERO_PREAMBLE = (
    "A conversation between User and Assistant. The Assistant first thinks inside "
    "<think> </think>, then answers inside <answer> </answer>.\n"
)
R1_ZERO_TEMPLATE = R1_ZERO_PREAMBLE + "User: {prompt}\nAssistant:"

GENERATION_PROMPT = ASSISTANT + THINK + "\n"
# With thinking off the assistant turn opens with an empty reasoning, as earlier turns without
# one are written: the completion is the answer.
NO_THINKING = "\n" + END_THINK + "\n\n"
R1_ZERO_NO_THINKING = " " + THINK + END_THINK
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


def _arguments(call: dict) -> str:
    """A tool call's arguments as text: OpenAI sends a JSON string, transformers' callers a dict."""
    args = call["function"].get("arguments", "")
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def tool_call_text(name: str, arguments: str) -> str:
    """One call in DeepSeek-V3's tool-call tokens."""
    return TOOL_CALL_BEGIN + "function" + TOOL_SEP + name + TOOL_ARGS_BEGIN + arguments + TOOL_ARGS_END + TOOL_CALL_END


def tool_calls_text(calls: list[dict]) -> str:
    """An assistant turn's calls (OpenAI's {"function": {"name", "arguments"}} dicts), as it writes them."""
    if not calls:
        return ""
    text = "\n".join(tool_call_text(c["function"]["name"], _arguments(c)) for c in calls)
    return TOOL_CALLS_BEGIN + text + TOOL_CALLS_END


def tools_prompt(tools: list[dict]) -> str:
    """The functions offered (OpenAI's {"type": "function", "function": {...}} dicts), for the system part."""
    text = TOOLS_HEADER
    for tool in tools:
        fn = tool["function"]
        text += "\n\n### " + fn["name"]
        if fn.get("description"):
            text += "\n" + fn["description"]
        text += "\nParameters: " + json.dumps(fn.get("parameters", {}), ensure_ascii=False)
    return text


def r1_zero_completion(reasoning: str, answer: str) -> str:
    """What the model writes after the R1-Zero prompt's "Assistant:" (and what RL rewards)."""
    return f" {THINK}{reasoning}{END_THINK} {ANSWER}{answer}{END_ANSWER}"


def check_prompt_format(name: str, where: str = "prompt format") -> str:
    if name not in PROMPT_FORMATS:
        raise NanoseekError(f"{where} {name!r}: expected one of {', '.join(PROMPT_FORMATS)}")
    return name


def chat_segments(
    messages: list[dict],
    add_generation_prompt: bool = True,
    prompt_format: str = "chat",
    tools: list[dict] | None = None,
    thinking: bool = True,
) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant_output) pieces; `format_chat` joins them.

    An assistant piece is what the model generates after the generation prompt: in the chat
    format the reasoning, "</think>", the answer, its tool calls and EOS; in the R1-Zero format
    the completion " <think>...</think> <answer>...</answer>" (and EOS when it ends the
    conversation). SFT trains on exactly those pieces. `tools` (the chat format only): the
    functions offered, described after the system messages; `role: tool` messages are their
    results. `thinking` False: the generation prompt closes the reasoning at once.
    """
    check_prompt_format(prompt_format)
    r1_zero = prompt_format == "r1-zero"
    if r1_zero and tools:
        raise NanoseekError("the r1-zero prompt format has no tool calls: 'tools' needs the chat format")
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
            calls = m.get("tool_calls")
            if calls and r1_zero:
                raise NanoseekError(f"message {i}: the r1-zero prompt format has no tool calls")
            if r1_zero:
                last = i == len(messages) - 1
                turns.append((R1_ZERO_ASSISTANT, False))
                turns.append((r1_zero_completion(reasoning, answer) + (EOS if last else ""), True))
                if not last:
                    turns.append(("\n", False))
            else:
                turns.append((GENERATION_PROMPT, False))
                output = reasoning + "\n" + END_THINK + "\n\n" + answer + tool_calls_text(calls) + EOS
                turns.append((output, True))
        elif role == "tool" and not r1_zero:
            first = i == 0 or messages[i - 1].get("role") != "tool"
            last = i == len(messages) - 1 or messages[i + 1].get("role") != "tool"
            text = TOOL_OUTPUT_BEGIN + (content or "") + TOOL_OUTPUT_END
            turns.append(((TOOL_OUTPUTS_BEGIN if first else "") + text + (TOOL_OUTPUTS_END if last else ""), False))
        else:
            roles = "system, user, assistant" + ("" if r1_zero else ", tool")
            raise NanoseekError(f"message {i}: role {role!r} is not one of {roles}")
    if r1_zero:  # the preamble is R1-Zero's system prompt; system messages follow it
        turns.insert(1, (R1_ZERO_PREAMBLE + "".join(text + "\n" for text in system), False))
    elif system or tools:  # DeepSeek puts every system message first, right after BOS
        turns.insert(1, ("\n\n".join(system + ([tools_prompt(tools)] if tools else [])), False))
    if add_generation_prompt:
        if r1_zero:
            turns.append((R1_ZERO_ASSISTANT + ("" if thinking else R1_ZERO_NO_THINKING), False))
        else:
            turns.append((GENERATION_PROMPT + ("" if thinking else NO_THINKING), False))
    return turns


def format_chat(
    messages: list[dict],
    add_generation_prompt: bool = True,
    prompt_format: str = "chat",
    tools: list[dict] | None = None,
    thinking: bool = True,
) -> str:
    """A conversation as text, in DeepSeek-R1's chat format:
    BOS system <｜User｜>q <｜Assistant｜><think>\\n reasoning \\n</think>\\n\\n answer EOS ...
    or in the R1-Zero format: BOS preamble "User: q\\nAssistant: <think>r</think> <answer>a</answer>\\n..." """
    return "".join(text for text, _ in chat_segments(messages, add_generation_prompt, prompt_format, tools, thinking))


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


def _jinja_unknown_role(roles: str) -> list[str]:
    return [
        "{%- elif m['role'] != 'system' -%}",
        "{{- raise_exception('role ' + m['role'] + ' is not one of " + roles + "') -}}",
        "{%- endif -%}",
    ]


_JINJA_NO_TOOLS = "{{- raise_exception('the r1-zero prompt format has no tool calls') -}}"
_JINJA_NO_THINKING = "(thinking is defined and not thinking)"  # the `thinking` variable, True when left out

CHAT_TEMPLATE = "".join(
    [
        "{%- set ns = namespace(system='', n=0) -%}",
        "{%- for m in messages if m['role'] == 'system' -%}",
        "{%- set ns.system = ns.system + ('\\n\\n' if loop.index0 > 0 else '') + (m['content'] or '') -%}",
        "{%- set ns.n = loop.length -%}",
        "{%- endfor -%}",
        "{{- " + _jinja(BOS) + " + ns.system -}}",
        # the functions offered (`tools_prompt`)
        "{%- if tools -%}",
        "{{- ('\\n\\n' if ns.n > 0 else '') + " + _jinja(TOOLS_HEADER) + " -}}",
        "{%- for t in tools -%}",
        "{{- '\\n\\n### ' + t['function']['name'] -}}",
        "{%- if t['function'].get('description') -%}{{- '\\n' + t['function']['description'] -}}{%- endif -%}",
        "{{- '\\nParameters: ' + (t['function'].get('parameters', {}) | tojson) -}}",
        "{%- endfor -%}",
        "{%- endif -%}",
        "{%- for m in messages -%}",
        "{%- if m['role'] == 'user' -%}",
        "{{- " + _jinja(USER) + " + (m['content'] or '') -}}",
        "{%- elif m['role'] == 'assistant' -%}",
        *_JINJA_ASSISTANT_PARTS,
        "{{- "
        + _jinja(GENERATION_PROMPT)
        + " + (reasoning | trim) + "
        + _jinja("\n" + END_THINK + "\n\n")
        + " + (content | trim) -}}",
        # its tool calls (`tool_calls_text`)
        "{%- if m.get('tool_calls') -%}",
        "{{- " + _jinja(TOOL_CALLS_BEGIN) + " -}}",
        "{%- for c in m['tool_calls'] -%}",
        "{%- set args = c['function'].get('arguments', '') -%}",
        "{{- ('\\n' if loop.index0 > 0 else '') + "
        + _jinja(TOOL_CALL_BEGIN + "function" + TOOL_SEP)
        + " + c['function']['name'] + "
        + _jinja(TOOL_ARGS_BEGIN)
        + " + (args if args is string else args | tojson) + "
        + _jinja(TOOL_ARGS_END + TOOL_CALL_END)
        + " -}}",
        "{%- endfor -%}",
        "{{- " + _jinja(TOOL_CALLS_END) + " -}}",
        "{%- endif -%}",
        "{{- " + _jinja(EOS) + " -}}",
        # a run of tool results
        "{%- elif m['role'] == 'tool' -%}",
        "{%- if loop.first or loop.previtem['role'] != 'tool' -%}{{- "
        + _jinja(TOOL_OUTPUTS_BEGIN)
        + " -}}{%- endif -%}",
        "{{- " + _jinja(TOOL_OUTPUT_BEGIN) + " + (m['content'] or '') + " + _jinja(TOOL_OUTPUT_END) + " -}}",
        "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{- " + _jinja(TOOL_OUTPUTS_END) + " -}}{%- endif -%}",
        *_jinja_unknown_role("system, user, assistant, tool"),
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- " + _jinja(GENERATION_PROMPT) + " -}}",
        "{%- if " + _JINJA_NO_THINKING + " -%}{{- " + _jinja(NO_THINKING) + " -}}{%- endif -%}",
        "{%- endif -%}",
    ]
)

R1_ZERO_CHAT_TEMPLATE = "".join(
    [
        "{%- if tools -%}" + _JINJA_NO_TOOLS + "{%- endif -%}",
        "{{- " + _jinja(BOS + R1_ZERO_PREAMBLE) + " -}}",
        "{%- for m in messages if m['role'] == 'system' -%}{{- (m['content'] or '') + '\\n' -}}{%- endfor -%}",
        "{%- for m in messages -%}",
        "{%- if m['role'] == 'user' -%}",
        "{{- " + _jinja(R1_ZERO_USER) + " + (m['content'] or '') + '\\n' -}}",
        "{%- elif m['role'] == 'assistant' -%}",
        *_JINJA_ASSISTANT_PARTS,
        "{%- if m.get('tool_calls') -%}" + _JINJA_NO_TOOLS + "{%- endif -%}",
        "{{- "
        + _jinja(R1_ZERO_ASSISTANT + " " + THINK)
        + " + (reasoning | trim) + "
        + _jinja(END_THINK + " " + ANSWER)
        + " + (content | trim) + "
        + _jinja(END_ANSWER)
        + " + ("
        + _jinja(EOS)
        + " if loop.last else '\\n') -}}",
        *_jinja_unknown_role("system, user, assistant"),
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- " + _jinja(R1_ZERO_ASSISTANT) + " -}}",
        "{%- if " + _JINJA_NO_THINKING + " -%}{{- " + _jinja(R1_ZERO_NO_THINKING) + " -}}{%- endif -%}",
        "{%- endif -%}",
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
