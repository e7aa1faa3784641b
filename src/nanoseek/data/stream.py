"""Training data: a packed token stream for pretraining and chat examples with a mask for SFT.

Files are read with plain readers: .txt/.md (documents separated by blank lines), .jsonl
(one JSON object a line, the text under `text_field`) and .parquet (a column, read through
pyarrow, which `datasets` brings). Text is UTF-8 (a leading byte-order mark is dropped); other
bytes are a NanoseekError naming the file and the line, not text silently replaced.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.errors import NanoseekError

TEXT_SUFFIXES = {".txt", ".md", ".text"}
ROW_SUFFIXES = {".jsonl", ".json", ".parquet"}
IGNORE_INDEX = -100  # targets that the loss skips (F.cross_entropy's default ignore_index)


def expand_paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Files named, and the readable files inside named directories, in a stable order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES | ROW_SUFFIXES)
        elif p.is_file():
            if p.suffix not in TEXT_SUFFIXES | ROW_SUFFIXES:
                raise NanoseekError(
                    f"{p}: unknown file type {p.suffix!r} (expected .txt, .md, .jsonl, .json or .parquet)"
                )
            files.append(p)
        else:
            raise NanoseekError(f"{p}: no such file or directory")
    if not files:
        raise NanoseekError(f"no data files in {', '.join(map(str, paths))}")
    return files


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file. The decoder reads in blocks, so on a bad byte
    the file is read again as bytes to name the line (only then: the good path pays nothing)."""
    with open(path, encoding="utf-8-sig") as f:
        try:
            yield from enumerate(f, 1)
        except UnicodeDecodeError:
            raise _not_utf8(path) from None


def _not_utf8(path: Path) -> NanoseekError:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                hint = " (UTF-16? save it as UTF-8)" if n == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
                return NanoseekError(
                    f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}){hint}"
                )
    return NanoseekError(f"{path}: not UTF-8 text")


def read_rows(path: Path) -> Iterator[dict]:
    """The records of a .jsonl or .parquet file, one dict each."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    for n, line in read_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise NanoseekError(f"{path}:{n}: invalid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise NanoseekError(f"{path}:{n}: expected a JSON object a line")
        yield row


def read_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one file: paragraphs of a text file, or the `text_field` of each record."""
    path = Path(path)
    if path.suffix in TEXT_SUFFIXES:
        lines: list[str] = []
        for _, line in read_lines(path):
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).rstrip("\n")
                lines = []
        if lines:
            yield "".join(lines).rstrip("\n")
        return
    for n, row in enumerate(read_rows(path), 1):
        text = row.get(text_field)
        if not isinstance(text, str):
            raise NanoseekError(f"{path}: record {n} has no string field {text_field!r} (fields: {', '.join(row)})")
        yield text


def iter_documents(paths, text_field: str = "text") -> Iterator[str]:
    for path in expand_paths(paths):
        yield from read_documents(path, text_field)


class PackedStream:
    """Documents as BOS ids EOS, concatenated and cut into rows of seq_len + 1 tokens.

    Deterministic for a seed: each epoch shuffles the file order and, within a file, blocks of
    `shuffle_block` documents. The position (epoch, file, document, token) is the whole state,
    so `load_state_dict(state_dict())` resumes at the exact next token. With `world_size` > 1
    every rank reads the stream and keeps every world_size-th row.
    """

    def __init__(
        self,
        paths,
        tokenizer: Tokenizer,
        seq_len: int,
        batch_size: int = 1,
        seed: int = 0,
        text_field: str = "text",
        shuffle: bool = True,
        loop: bool = True,
        rank: int = 0,
        world_size: int = 1,
        shuffle_block: int = 1024,
    ):
        if seq_len < 1 or batch_size < 1:
            raise NanoseekError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise NanoseekError(f"rank {rank} is not in [0, world_size={world_size})")
        self.files = expand_paths(paths)
        self.tokenizer = tokenizer
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.text_field, self.shuffle, self.loop = text_field, shuffle, loop
        self.rank, self.world_size, self.shuffle_block = rank, world_size, shuffle_block
        self.load_state_dict({"epoch": 0, "file": 0, "doc": 0, "token": 0, "rows": 0})

    # ---- position ------------------------------------------------------------------
    def state_dict(self) -> dict:
        epoch, file, doc = self._cursor
        return {"epoch": epoch, "file": file, "doc": doc, "token": self._pos, "rows": self._rows}

    def load_state_dict(self, state: dict) -> None:
        self._cursor = (int(state["epoch"]), int(state["file"]), int(state["doc"]))
        self._pos, self._rows = int(state["token"]), int(state["rows"])
        self._ids: list[int] | None = None  # re-tokenized from the cursor on the next read
        self._docs: Iterator | None = None

    # ---- reading -------------------------------------------------------------------
    def _file_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.files)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def _file_docs(self, epoch: int, file: int, start: int) -> Iterator[tuple[int, str]]:
        path = self.files[self._file_order(epoch)[file]]
        block: list[str] = []
        base = 0
        for text in read_documents(path, self.text_field):
            block.append(text)
            if len(block) == self.shuffle_block:
                yield from self._shuffled(block, base, epoch, file, start)
                base, block = base + len(block), []
        yield from self._shuffled(block, base, epoch, file, start)

    def _shuffled(self, block, base, epoch, file, start) -> Iterator[tuple[int, str]]:
        if base + len(block) <= start:
            return
        order = list(range(len(block)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}:{file}:{base}").shuffle(order)
        for j in range(max(0, start - base), len(block)):
            yield base + j, block[order[j]]

    def _walk(self, epoch: int, file: int, doc: int) -> Iterator[tuple[tuple[int, int, int], str]]:
        while True:
            found = False
            for f in range(file, len(self.files)):
                for d, text in self._file_docs(epoch, f, doc if f == file else 0):
                    found = True
                    yield (epoch, f, d), text
            if not found and file == 0 and doc == 0:
                raise NanoseekError(f"no documents in {', '.join(map(str, self.files))}")
            if not self.loop:
                return
            epoch, file, doc = epoch + 1, 0, 0

    def _next_tokens(self, n: int) -> list[int] | None:
        out: list[int] = []
        while len(out) < n:
            if self._ids is None:  # first read after a (re)start: the cursor's document
                self._docs = self._walk(*self._cursor)
                if not self._advance(keep_pos=True):
                    return None
            if self._pos >= len(self._ids) and not self._advance(keep_pos=False):
                return None
            take = self._ids[self._pos : self._pos + n - len(out)]
            out += take
            self._pos += len(take)
        return out

    def _advance(self, keep_pos: bool) -> bool:
        item = next(self._docs, None)
        if item is None:
            return False
        self._cursor, text = item
        self._ids = self.tokenizer.encode(text, bos=True, eos=True)
        if not keep_pos:
            self._pos = 0
        return True

    def __iter__(self) -> PackedStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, seq_len); targets are inputs shifted by one."""
        rows = []
        while len(rows) < self.batch_size:
            row = self._next_tokens(self.seq_len + 1)
            if row is None:
                raise StopIteration
            if self._rows % self.world_size == self.rank:
                rows.append(row)
            self._rows += 1
        batch = torch.tensor(rows, dtype=torch.long)
        return batch[:, :-1], batch[:, 1:]


class SFTDataset:
    """Chat conversations as token ids with a mask that is 1 on what the assistant generates.

    Each piece of `chat_segments`, in the tokenizer's prompt format (so a model keeps the format
    it was pretrained in), is tokenized on its own, the prompt pieces then the assistant's
    output, which is how the engine sees them: the prompt's ids, then generated ids.

    A record may carry the teacher's own generation of its last assistant turn, for logit
    distillation (what `nanoseek distill` writes): "teacher": {"token_ids": [...],
    "top_logprobs": [[[id, logprob], ...], ...]}, the ids the teacher sampled after the
    generation prompt and, for each, the teacher's top-k pairs where it was sampled. That turn's
    ids are then the sampled ids themselves, not its text encoded again (BPE may split the same
    text otherwise than it was sampled), and the item carries the pairs aligned to them.
    """

    def __init__(
        self,
        conversations: Iterable[list[dict]] | str | Path | list[str | Path],
        tokenizer: Tokenizer,
        max_len: int | None = None,
        messages_field: str = "messages",
    ):
        """`conversations`: lists of messages, or .jsonl/.parquet files (or directories) with a
        `messages_field` list in each record (and optionally a "teacher" trace)."""
        items = [conversations] if isinstance(conversations, (str, Path)) else list(conversations)
        teachers: list[TeacherTrace | None] = [None] * len(items)
        if items and all(isinstance(c, (str, Path)) for c in items):
            paths, items, teachers = items, [], []
            for path in expand_paths(paths):
                for n, row in enumerate(read_rows(path), 1):
                    items.append(self._messages(row, path, messages_field))
                    has = row.get("teacher") is not None
                    teachers.append(
                        teacher_trace(row["teacher"], items[-1], f"{path}: record {n}", tokenizer) if has else None
                    )
        self.conversations = items
        self.teachers = teachers  # per conversation: its TeacherTrace, or None
        self.tokenizer, self.max_len = tokenizer, max_len

    @staticmethod
    def _messages(row: dict, path: Path, field: str) -> list[dict]:
        messages = row.get(field)
        if not isinstance(messages, list):
            raise NanoseekError(f"{path}: a record has no list field {field!r} (fields: {', '.join(row)})")
        return messages

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, i: int):
        """(ids, mask) of conversation i, cut to max_len. A conversation with a teacher trace
        gives (ids, mask, (top_ids, top_logprobs)): two (len(ids), k) tensors holding at index j
        the teacher's top-k pairs for ids[j] (log-prob -inf in the slots of positions without)."""
        teacher = self.teachers[i]
        segments = self.tokenizer.chat_segments(self.conversations[i], add_generation_prompt=False)
        last = max(j for j, (_, trained) in enumerate(segments) if trained) if teacher is not None else None
        ids: list[int] = []
        mask: list[int] = []
        start = 0
        for j, (text, trained) in enumerate(segments):
            if j == last:
                start, piece = len(ids), teacher.token_ids
            else:
                piece = self.tokenizer.encode(text)
            ids += piece
            mask += [int(trained)] * len(piece)
        if self.max_len is not None:
            ids, mask = ids[: self.max_len], mask[: self.max_len]
        if teacher is None:
            return ids, mask
        n = max(0, min(len(teacher.token_ids), len(ids) - start))  # what max_len left of the teacher's turn
        top_ids = torch.zeros(len(ids), teacher.top_ids.shape[1], dtype=torch.long)
        top_logprobs = torch.full(top_ids.shape, -math.inf)
        top_ids[start : start + n] = teacher.top_ids[:n]
        top_logprobs[start : start + n] = teacher.top_logprobs[:n]
        return ids, mask, (top_ids, top_logprobs)

    def collate(self, items: list[tuple], teacher: bool = False) -> tuple:
        """(inputs, targets) padded to the longest item; targets are IGNORE_INDEX outside the
        assistant's tokens and on padding. With `teacher`, also (top_ids, top_logprobs), each
        (batch, width, k): at position t the teacher's top-k pairs for targets[t], log-prob -inf
        where there are none (items without a teacher trace, prompts, padding, unused slots)."""
        width = max(len(item[0]) for item in items) - 1
        x = torch.full((len(items), max(width, 1)), self.tokenizer.pad_id, dtype=torch.long)
        y = torch.full_like(x, IGNORE_INDEX)
        for b, (ids, mask, *_) in enumerate(items):
            n = len(ids) - 1
            if n < 1:
                continue
            x[b, :n] = torch.tensor(ids[:-1])
            target = torch.tensor(ids[1:])
            y[b, :n] = torch.where(torch.tensor(mask[1:], dtype=torch.bool), target, IGNORE_INDEX)
        if not teacher:
            return x, y
        k = max([item[2][0].shape[1] for item in items if len(item) > 2] + [1])
        top_ids = torch.zeros(*x.shape, k, dtype=torch.long)
        top_logprobs = torch.full(top_ids.shape, -math.inf)
        for b, item in enumerate(items):
            n = len(item[0]) - 1
            if len(item) > 2 and n >= 1:  # targets are ids[1:], so their pairs are the pairs from index 1 on
                ids_b, logprobs_b = item[2]
                top_ids[b, :n, : ids_b.shape[1]] = ids_b[1:]
                top_logprobs[b, :n, : ids_b.shape[1]] = logprobs_b[1:]
        return x, y, (top_ids, top_logprobs)

    def batches(
        self, batch_size: int, seed: int = 0, shuffle: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of collated batches, in an order fixed by the seed."""
        order = list(range(len(self)))
        if shuffle:
            random.Random(seed).shuffle(order)
        for s in range(0, len(order), batch_size):
            yield self.collate([self[i] for i in order[s : s + batch_size]])


@dataclass
class TeacherTrace:
    """The teacher's generation of a conversation's last assistant turn: the sampled ids and,
    per id, its top-k (id, log-prob) pairs as (len, k) tensors (log-prob -inf in unused slots)."""

    token_ids: list[int]
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor


def teacher_trace(teacher, messages: list[dict], where: str, tokenizer: Tokenizer) -> TeacherTrace:
    """A record's "teacher" field, checked: ids in the tokenizer's vocabulary, one list of
    [id, finite log-prob] pairs per sampled id; an error names `where` (file and record)."""
    vocab = len(tokenizer)

    def is_id(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab

    if not isinstance(teacher, dict):
        raise NanoseekError(f"{where}: 'teacher' must be an object with 'token_ids' and 'top_logprobs'")
    ids, top = teacher.get("token_ids"), teacher.get("top_logprobs")
    if not isinstance(ids, list) or not ids or not all(map(is_id, ids)):
        raise NanoseekError(f"{where}: teacher.token_ids must be a non-empty list of token ids below {vocab}")
    if not isinstance(top, list) or len(top) != len(ids):
        got = f"{len(top)} top_logprobs" if isinstance(top, list) else "no top_logprobs list"
        raise NanoseekError(f"{where}: teacher has {len(ids)} token_ids but {got} (one list of pairs per token)")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise NanoseekError(f"{where}: 'teacher' is the last assistant turn, but the conversation has none")
    for i, pairs in enumerate(top):
        if not isinstance(pairs, list) or not all(
            isinstance(p, (list, tuple))
            and len(p) == 2
            and is_id(p[0])
            and isinstance(p[1], (int, float))
            and not isinstance(p[1], bool)
            and math.isfinite(p[1])
            for p in pairs
        ):
            raise NanoseekError(
                f"{where}: teacher.top_logprobs[{i}] must be a list of [token id below {vocab}, finite log-prob] pairs"
            )
    k = max(1, max(len(pairs) for pairs in top))
    top_ids = torch.zeros(len(ids), k, dtype=torch.long)
    top_logprobs = torch.full((len(ids), k), -math.inf)
    for i, pairs in enumerate(top):
        if pairs:
            top_ids[i, : len(pairs)] = torch.tensor([p[0] for p in pairs])
            top_logprobs[i, : len(pairs)] = torch.tensor([float(p[1]) for p in pairs])
    return TeacherTrace(list(ids), top_ids, top_logprobs)
