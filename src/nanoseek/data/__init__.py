"""What the trainers and the engine read: tokenizer, prompt formats, token streams.

The synthetic corpus lives in `nanoseek.data.corpus` and the CLI in `nanoseek.data.cli`.
"""

from nanoseek.data.chat import (
    CHAT_TEMPLATE,
    CHAT_TEMPLATES,
    PROMPT_FORMATS,
    R1_ZERO_CHAT_TEMPLATE,
    R1_ZERO_TEMPLATE,
    chat_segments,
    format_chat,
    prompt_template,
    r1_zero_prompt,
)
from nanoseek.data.reasoning import ReasoningSplitter, parse_reasoning, split_reasoning
from nanoseek.data.stream import PackedStream, SFTDataset, iter_documents
from nanoseek.data.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "CHAT_TEMPLATES",
    "PROMPT_FORMATS",
    "R1_ZERO_CHAT_TEMPLATE",
    "R1_ZERO_TEMPLATE",
    "SPECIAL_TOKENS",
    "PackedStream",
    "ReasoningSplitter",
    "SFTDataset",
    "Tokenizer",
    "chat_segments",
    "format_chat",
    "iter_documents",
    "parse_reasoning",
    "prompt_template",
    "r1_zero_prompt",
    "split_reasoning",
    "train_tokenizer",
]
