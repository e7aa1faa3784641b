"""The engine's log-probabilities in OpenAI's two shapes, and what they need from the tokenizer.

- Completions (the legacy API that evaluation harnesses score through): one object per choice,
  `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, one entry per token. With `echo`
  the prompt's tokens come first; the first of them has nothing before it: its log-prob and top
  dict are null, as OpenAI writes them. Each top dict maps token text to log-prob and, as OpenAI's
  does, also holds the chosen token, so it has up to `logprobs` + 1 entries (two tokens with the
  same text keep the likelier's).
- Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal": null}`,
  plus a `reasoning_content` list of the same entries for the reasoning's tokens, as DeepSeek's
  API puts the reasoning in `reasoning_content` beside `content` (`ReasoningTokens` says which).

A token's text is its UTF-8 bytes when they are valid UTF-8 on their own; a token that holds part
of a character is written "bytes:\\xe2\\x80", as OpenAI writes it, and `bytes` holds its real
bytes. `text_offset[i]` is where token i's text starts in the choice's text: the characters
that the tokens before it decode to (a character split over tokens starts at its first token),
and the text's length for a token past its end (the end-of-sequence token, which the text leaves
out, and the tokens of a stop string, which is cut off).
"""

from __future__ import annotations

import codecs
import json
import math

from nanoseek.data.tokenizer import Tokenizer

# A log-prob JSON can carry: -inf (a token the model rules out) is written as vLLM writes it.
FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR


def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE (GPT-2's, and DeepSeek's, Qwen's and Llama 3's) spells each byte as one
    printable character: the printable Latin-1 bytes as themselves, the k-th of the others as
    chr(256 + k). Character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}


class TokenStrings:
    """Each token's bytes and its text as the logprobs show it, for one tokenizer (cached)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        spec = json.loads(tokenizer.backend.to_str())
        decoder = spec.get("decoder") or {}
        decoders = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
        # Where the vocabulary spells bytes, a token's bytes are exact; elsewhere its decoded text's.
        self.alphabet = byte_level_alphabet() if any(d.get("type") == "ByteLevel" for d in decoders) else None
        self.added = {t["id"] for t in spec.get("added_tokens") or []}  # spelt as their text, not in bytes
        self._bytes: dict[int, bytes] = {}
        self._text: dict[int, str] = {}

    def bytes(self, token: int) -> bytes:
        if token not in self._bytes:
            piece = self.tokenizer.id_to_token(token)
            if self.alphabet is not None and token not in self.added and piece and set(piece) <= self.alphabet.keys():
                self._bytes[token] = bytes(self.alphabet[c] for c in piece)
            else:
                self._bytes[token] = self.tokenizer.decode([token]).encode()
        return self._bytes[token]

    def text(self, token: int) -> str:
        if token not in self._text:
            raw = self.bytes(token)
            try:
                self._text[token] = raw.decode("utf-8")
            except UnicodeDecodeError:
                self._text[token] = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return self._text[token]


class TextOffsets:
    """Character offsets of tokens in a text they spell from character `start` on, fed one token
    at a time: UTF-8 decoding of their bytes, a split character counted once it is whole."""

    def __init__(self, strings: TokenStrings, start: int = 0):
        self.strings, self.at = strings, start
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, token: int) -> int:
        offset = self.at
        self.at += len(self.decoder.decode(self.strings.bytes(token)))
        return offset


def completion_logprobs(
    strings: TokenStrings,
    ids: list[int],
    logprobs: list[float | None],
    top: list[list[tuple[int, float]] | None],
    offsets: list[int],
) -> dict:
    """The legacy completions `logprobs` object of tokens `ids` (None logprob: the first prompt token)."""
    tops = []
    for token, logprob, pairs in zip(ids, logprobs, top):
        if logprob is None:
            tops.append(None)
            continue
        entry: dict[str, float] = {}
        for t, lp in pairs or ():
            entry.setdefault(strings.text(t), _finite(lp))
        entry.setdefault(strings.text(token), _finite(logprob))
        tops.append(entry)
    return {
        "tokens": [strings.text(t) for t in ids],
        "token_logprobs": [None if lp is None else _finite(lp) for lp in logprobs],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def join_logprobs(parts: list[dict]) -> dict:
    """Legacy `logprobs` objects one after the other (the echoed prompt's, then the completion's)."""
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {key: [x for part in parts for x in part[key]] for key in keys}


def chat_entry(strings: TokenStrings, token: int, logprob: float, top: list[tuple[int, float]]) -> dict:
    """One token of chat's `logprobs.content`."""

    def one(t: int, lp: float) -> dict:
        return {"token": strings.text(t), "logprob": _finite(lp), "bytes": list(strings.bytes(t))}

    return {**one(token, logprob), "top_logprobs": [one(t, lp) for t, lp in top]}


class ReasoningTokens:
    """Which generated tokens are the reasoning's, read by token id as the thinking budget counts
    them: from the first token when the prompt opened <think> (the chat template's generation
    prompt does), or from a <think> that is the first token, through the </think> that closes it;
    every other token, the end-of-sequence token included, is the content's. A chat choice's
    log-probs list the reasoning's tokens in `reasoning_content` and the others in `content`
    (which thus also holds an answer's <answer> tags, which the message's text leaves out)."""

    def __init__(self, think_opened: bool, think_id: int | None, end_think_id: int | None):
        self.state = "reasoning" if think_opened else "start"
        self.think_id, self.end_think_id = think_id, end_think_id

    def feed(self, token: int) -> bool:
        """Whether `token`, the next one generated, is part of the reasoning."""
        if self.state == "start":
            self.state = "reasoning" if token == self.think_id else "content"
        reasoning = self.state == "reasoning"
        if reasoning and token == self.end_think_id:
            self.state = "content"
        return reasoning


def chat_logprobs(entries: list[tuple[bool, dict]]) -> dict:
    """Chat's `logprobs` object of (is reasoning, entry) pairs."""
    return {
        "content": [e for reasoning, e in entries if not reasoning],
        "refusal": None,
        "reasoning_content": [e for reasoning, e in entries if reasoning],
    }
