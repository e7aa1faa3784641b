"""The two prompt formats (R1-Zero plain template, DeepSeek chat turns) and their special strings.

R1-Zero (DeepSeek-R1 section 2.2.1) trains a base model with a plain-text template: the
assistant thinks inside <think> </think>, then answers inside <answer> </answer>. The chat
format is DeepSeek-R1's: special tokens mark the turns and the generation prompt opens the
reasoning with "<think>\\n", so a completion starts inside the reasoning.

`format_chat` is plain Python; `CHAT_TEMPLATE` is the same format as Jinja for
`transformers.apply_chat_template`. tests/test_tokenizer.py checks that they give the same ids.
"""

from __future__ import annotations

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


def r1_zero_prompt(prompt: str, preamble: bool = True) -> str:
    """The R1-Zero prompt for one question: plain text, encoded with bos=True like the corpus
    documents. Without the preamble it starts at "User:" (the short form of corpus documents)."""
    text = R1_ZERO_TEMPLATE.format(prompt=prompt)
    return text if preamble else text[len(R1_ZERO_PREAMBLE):]


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
                reasoning = reasoning[len(THINK):]
    return reasoning.strip(), content.strip()


def chat_segments(messages: list[dict], add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant_output) pieces; `format_chat` joins them.

    An assistant piece is what the model generates after the generation prompt: reasoning,
    "</think>", the answer and EOS. SFT trains on exactly those pieces.
    """
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
            turns.append((USER + (content or ""), False))
        elif role == "assistant":
            reasoning, answer = _assistant_parts(m)
            turns.append((GENERATION_PROMPT, False))
            turns.append((reasoning + "\n" + END_THINK + "\n\n" + answer + EOS, True))
        else:
            raise NanoseekError(f"message {i}: role {role!r} is not one of system, user, assistant")
    if system:  # DeepSeek puts every system message first, right after BOS
        turns.insert(1, ("\n\n".join(system), False))
    if add_generation_prompt:
        turns.append((GENERATION_PROMPT, False))
    return turns


def format_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """A conversation as DeepSeek-R1 chat text:
    BOS system <｜User｜>q <｜Assistant｜><think>\\n reasoning \\n</think>\\n\\n answer EOS ..."""
    return "".join(text for text, _ in chat_segments(messages, add_generation_prompt))


# The same format in Jinja, for tokenizer_config.json. One line, so that no template
# whitespace reaches the output whatever the environment's trim settings.
CHAT_TEMPLATE = "".join([
    "{%- set ns = namespace(system='') -%}",
    "{%- for m in messages if m['role'] == 'system' -%}",
    "{%- set ns.system = ns.system + ('\\n\\n' if loop.index0 > 0 else '') + (m['content'] or '') -%}",
    "{%- endfor -%}",
    "{{- '" + BOS + "' + ns.system -}}",
    "{%- for m in messages -%}",
    "{%- if m['role'] == 'user' -%}",
    "{{- '" + USER + "' + (m['content'] or '') -}}",
    "{%- elif m['role'] == 'assistant' -%}",
    "{%- set content = m['content'] or '' -%}",
    "{%- if m.get('reasoning_content') is not none -%}",
    "{%- set reasoning = m['reasoning_content'] -%}",
    "{%- elif '" + END_THINK + "' in content -%}",
    "{%- set parts = content.split('" + END_THINK + "') -%}",
    "{%- set reasoning = parts[:-1] | join('" + END_THINK + "') | trim -%}",
    "{%- set content = parts[-1] -%}",
    "{%- if reasoning.startswith('" + THINK + "') -%}{%- set reasoning = reasoning[" + str(len(THINK)) + ":] -%}{%- endif -%}",
    "{%- else -%}",
    "{%- set reasoning = '' -%}",
    "{%- endif -%}",
    "{{- '" + ASSISTANT + THINK + "\\n' + (reasoning | trim) + '\\n" + END_THINK + "\\n\\n' + (content | trim) + '" + EOS + "' -}}",
    "{%- elif m['role'] != 'system' -%}",
    "{{- raise_exception('role ' + m['role'] + ' is not one of system, user, assistant') -}}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT + THINK + "\\n' -}}{%- endif -%}",
])


def strip_end_tokens(text: str) -> str:
    """Drop the EOS and padding tokens that a decode without skip_special_tokens leaves at the end."""
    text = text.rstrip()
    while text.endswith((EOS, PAD)):
        text = text[: -len(EOS if text.endswith(EOS) else PAD)].rstrip()
    return text
