"""The inference engine: a preallocated MLA latent cache, continuous batching, MTP speculation.

The API is shaped like vLLM's `LLM.generate`. Underneath, nano-vllm's parts by their jobs:
- the cache: one `LatentCache` of `max_batch_size` rows x `max_seq_len` positions, made once;
  a running completion owns a row. Decoding reads it with the absorbed MLA weights, so per
  token and layer it holds only kv_lora_rank + qk_rope_head_dim values (DeepSeek-V2 2.1).
- the scheduler (`step`): waiting completions take free rows between decoding steps and are
  prefilled together (right-padded); then every running completion decodes one token (two
  when an MTP draft is accepted) in one batched forward; finished ones give their row back.
  The n completions of one prompt share one prefill: its cache row is copied. With
  SamplingParams.prompt_logprobs the prefill's hidden states also score every prompt token
  (`PromptLogprobs`); with max_tokens 0 that is all a request does, as harnesses score
  the answers of a multiple-choice question.
- the prefix cache (`prefix_cache.py`, vLLM's automatic prefix caching): finished requests'
  cache blocks, kept by the hash of their token prefix, least recently used evicted first; a
  prompt that starts with cached blocks copies them into its row and prefills only the rest.
- the runner (`runner.py`): the decode step on folded weights, the model's forward without
  the Python overhead that dominates a small batch on a CPU.
- the sequence: token ids, sampling state, incremental detokenization, stop checks.
The engine is not thread-safe: one thread calls `step` (a server runs it in a loop).

The cache is sized before it is made: sizes whose cache cannot fit in the memory left on the
device are a one-line error with the bytes they would need (`kv_cache_bytes`, `available_memory`).
A text prompt is read as written, special-token strings included (a prompt a program formatted);
`chat` takes its control tokens from the chat template only (`Tokenizer.encode_chat`).
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.data.chat import BOS
from nanoseek.data.reasoning import ReasoningSplitter, span_tokens, split_reasoning
from nanoseek.dense import DenseConfig, KVCache
from nanoseek.device import model_device, model_dtype, place_model, resolve_device, resolve_dtype
from nanoseek.errors import NanoseekError
from nanoseek.infer.grammar import Grammars
from nanoseek.infer.prefix_cache import BLOCK_SIZE, PrefixCache
from nanoseek.infer.runner import DecodeRunner, latent_cache_views
from nanoseek.infer.sampling import SamplingParams, choose_tokens, make_generator
from nanoseek.infer.speculative import MTPDrafter, SpeculativeStats
from nanoseek.io.dense_hf import is_dense_checkpoint
from nanoseek.model import Transformer


# ---------------------------------------------------------------------------------------
# What callers get back (vLLM's shapes, plus the reasoning split of DeepSeek's API).
# ---------------------------------------------------------------------------------------
@dataclass
class CompletionOutput:
    index: int
    text: str  # the generated text, "<think>"/"</think>" tags included, end-of-sequence and stop string not
    token_ids: list[int]  # generated tokens only
    finish_reason: str | None  # "stop", "length", "abort", or None while running
    stop_reason: int | str | None = None  # the stop string or stop token id; None for end-of-sequence
    # The split of nanoseek.data.reasoning: the reasoning, the answer (without its <answer>
    # tags), and the thinking length: the tokens between <think> and </think>, tags not counted.
    reasoning: str = ""
    answer: str = ""
    reasoning_tokens: int = 0
    # With SamplingParams.logprobs: log pi(token) of each generated token, from the forward pass
    # that chose it, and per token the `logprobs` likeliest (token id, log-probability) pairs.
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class PromptLogprobs:
    """With SamplingParams.prompt_logprobs: log pi(prompt token i | the tokens before it) from the
    prefill forward pass, and the `prompt_logprobs` likeliest (token id, log-probability) pairs at
    that position. The first token has nothing before it: None in both lists."""

    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0  # prompt tokens whose cache came from the prefix cache, not a prefill


@dataclass
class StreamEvent:
    """One generated token of one completion. `text` is the new text (held back while it
    could still be the start of a stop string); `reasoning` and `answer` are what it adds to
    each part of the split (nanoseek.data.reasoning: a half-written tag waits for the next token)."""

    request_id: str
    index: int
    token_id: int | None  # None: a completion of max_tokens 0, finished at its prefill with no token
    text: str
    reasoning: str
    answer: str
    finish_reason: str | None = None
    output: CompletionOutput | None = None  # the whole completion, on its last event
    logprob: float | None = None  # with SamplingParams.logprobs: the token's, and the likeliest pairs
    top_logprobs: list[tuple[int, float]] | None = None
    prompt_logprobs: PromptLogprobs | None = None  # with SamplingParams.prompt_logprobs, on the first event
    num_cached_tokens: int = 0  # the request's prompt tokens taken from the prefix cache


# ---------------------------------------------------------------------------------------
# Memory: the cache's size, checked before it is made.
# ---------------------------------------------------------------------------------------
def kv_cache_bytes(
    config, max_batch_size: int, max_seq_len: int, dtype: torch.dtype, speculative: bool, prefix_cache_tokens: int = 0
) -> int:
    """Bytes of what the engine makes by the cache's sizes: the latent cache of every layer (and
    of the MTP module when speculating), max_batch_size rows of max_seq_len + 1 positions of
    kv_lora_rank + qk_rope_head_dim values, the prefix cache's pool (its whole blocks of as many
    values per token) and the runner's RoPE tables (cos and sin of half the RoPE dims). The
    weights are already loaded and the runner's folded copies of them do not grow with these
    sizes: they are not counted."""
    span = max_seq_len + 1  # the spare position a speculative step writes its draft to
    tokens = max_batch_size * span + prefix_cache_tokens // BLOCK_SIZE * BLOCK_SIZE
    size = torch.empty(0, dtype=dtype).element_size()
    if isinstance(config, DenseConfig):  # keys and values per KV head; no runner, no MTP
        return tokens * KVCache.bytes_per_token(config, size)
    layers = config.num_hidden_layers + (1 if speculative else 0)
    width = config.kv_lora_rank + config.qk_rope_head_dim
    return layers * tokens * width * size + span * config.qk_rope_head_dim * size


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`: the free GPU memory plus what torch's
    allocator holds unused; on the CPU /proc/meminfo's MemAvailable (else the free pages).
    None where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    """512 B, 20.1 GB, 1.2 TB: decimal units, one decimal."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def check_cache_fits(
    config,
    max_batch_size: int,
    max_seq_len: int,
    dtype,
    device,
    speculative: bool,
    asked: int | None = None,
    prefix_cache_tokens: int = 0,
) -> int:
    """The cache's bytes; a NanoseekError when they are more than `device` has available.
    `asked`: the max_seq_len asked for, when max_position_embeddings cut it to `max_seq_len`."""
    need = kv_cache_bytes(config, max_batch_size, max_seq_len, dtype, speculative, prefix_cache_tokens)
    have = available_memory(device)
    if have is not None and need > have:
        cut = f" (of {asked} asked: the model's max_position_embeddings)" if asked and asked != max_seq_len else ""
        prefix = f" with a prefix cache of {prefix_cache_tokens} tokens" if prefix_cache_tokens else ""
        raise NanoseekError(
            f"max_batch_size {max_batch_size} x max_seq_len {max_seq_len}{cut}: the KV cache{prefix} needs "
            f"{format_bytes(need)}, {format_bytes(have)} available on {device}"
            f" (lower --max-batch-size{', --max-seq-len or --prefix-cache-tokens' if prefix else ' or --max-seq-len'})"
        )
    return need


def prefix_cache_size(tokens: int | None, max_seq_len: int) -> int:
    """Engine(prefix_cache_tokens=): None is DEFAULT_PREFIX_CONTEXTS contexts of max_seq_len
    tokens, 0 turns the cache off; a size under one block is an error."""
    if tokens is None:
        return DEFAULT_PREFIX_CONTEXTS * max_seq_len
    if tokens < 0 or 0 < tokens < BLOCK_SIZE:
        raise NanoseekError(
            f"prefix_cache_tokens {tokens}: expected 0 (no prefix cache) or at least one block of {BLOCK_SIZE} tokens"
        )
    return tokens


# ---------------------------------------------------------------------------------------
# Requests and their sequences.
# ---------------------------------------------------------------------------------------
def opens_reasoning(prompt_ids: list[int], think_id: int | None, end_think_id: int | None) -> bool:
    """Whether the prompt ends inside <think> (its last <think> or </think> token is a <think>), as
    the chat template's generation prompt does: the completion then starts in its reasoning."""
    for t in reversed(prompt_ids):
        if t is not None and t in (think_id, end_think_id):
            return t == think_id
    return False


class Request:
    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_ids: list[int],
        params: SamplingParams,
        think_opened: bool,
        matchers: list | None = None,
    ):
        self.request_id, self.prompt, self.prompt_ids, self.params = request_id, prompt, prompt_ids, params
        self.think_opened = think_opened  # the prompt ends inside <think>, as the chat template's does
        self.prompt_logprobs: PromptLogprobs | None = None  # made by the prefill, when asked for
        self.num_cached_tokens = 0  # prompt tokens the prefill took from the prefix cache
        self.sequences = [Sequence(self, i, matchers[i] if matchers else None) for i in range(params.n)]

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


class Sequence:
    """One completion: its tokens, its cache row while running, its sampling state."""

    def __init__(self, request: Request, index: int, matcher=None):
        self.request, self.index, self.params = request, index, request.params
        self.matcher = matcher  # with SamplingParams.grammar: where the completion is in it
        self.generator = None if self.params.greedy else make_generator(self.params.seed, index)
        self.token_ids: list[int] = []
        wants = self.params.logprobs is not None
        self.logprobs: list[float] | None = [] if wants else None
        self.top_logprobs: list[list[tuple[int, float]]] | None = [] if wants else None
        self.slot: int | None = None
        self.cached = 0  # leading positions of its cache row that hold its tokens' cache, once prefilled
        self.draft: int | None = None  # the MTP module's guess at the token after token_ids[-1]
        # The thinking budget watches the <think> / </think> token ids: it forces the </think> token.
        self.thinking = request.think_opened
        self.thinking_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # incremental detokenization: text of token_ids[:read]; decode from `prefix` for context
        self.text, self.prefix, self.read = "", 0, 0
        self.token_ends: list[int] = []  # len(text) after each token: which tokens the reasoning spans
        self.sent = 0  # characters of text given out in events, split as they go by `splitter`
        self.splitter = ReasoningSplitter(request.think_opened)

    @property
    def length(self) -> int:
        return len(self.request.prompt_ids) + len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# ---------------------------------------------------------------------------------------
# The engine.
# ---------------------------------------------------------------------------------------
Prompt = str | list[int] | dict
PROMPT_CHUNK = 512  # prompt positions whose logits are made at once for SamplingParams.prompt_logprobs
DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_MAX_SEQ_LEN = 2048  # or the model's max_position_embeddings, when that is less
DEFAULT_PREFIX_CONTEXTS = 4  # the prefix cache holds as many tokens as this many full contexts


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer=None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_seq_len: int | None = None,
        speculative: bool = False,
        eos_token_id: int | None = None,
        folded: bool = True,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        prefix_cache_tokens: int | None = None,
    ):
        """`tokenizer`: a nanoseek.data.Tokenizer, needed for string prompts, text, stop strings
        and the thinking budget; token-id prompts work without one. `folded`: decode with the
        runner's folded weights (the fast path); False runs the model's own forward.
        `device` ("auto", "cpu", "cuda") and `dtype` ("float32", "bfloat16", "float16" on a GPU):
        None keeps the model's own; otherwise the model is moved there in place (see
        nanoseek.device.place_model), and the cache and every tensor the engine makes follow it.
        `prefix_cache_tokens`: the prefix cache's size (nanoseek.infer.prefix_cache), in whole
        blocks of BLOCK_SIZE tokens; None: DEFAULT_PREFIX_CONTEXTS x max_seq_len; 0: none."""
        if device is not None or dtype is not None:
            target = resolve_device(device, "Engine device") if device is not None else model_device(model)
            place_model(model, target, resolve_dtype(dtype, target, "Engine dtype"))
        self.model = model  # its train/eval mode is left as it is (an RL trainer shares it)
        self.config = config = model.config
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_seq_len = min(max_seq_len or DEFAULT_MAX_SEQ_LEN, config.max_position_embeddings)
        if max_batch_size < 1 or self.max_seq_len < 2:
            raise NanoseekError(
                f"Engine: max_batch_size {max_batch_size} and max_seq_len {self.max_seq_len} must be at least 1 and 2"
            )
        self.dtype, self.device = model_dtype(model), model_device(model)
        mtp = speculative and len(model.mtp) > 0  # without an MTP module MTPDrafter says so below
        self.prefix_cache_tokens = prefix_cache_size(prefix_cache_tokens, self.max_seq_len)
        check_cache_fits(
            config,
            max_batch_size,
            self.max_seq_len,
            self.dtype,
            self.device,
            mtp,
            max_seq_len,
            self.prefix_cache_tokens,
        )
        # One spare position: a speculative step writes its draft one past the last token.
        span = self.max_seq_len + 1
        if isinstance(config, DenseConfig):  # a dense student (Qwen2, Llama): keys and values per KV head
            if speculative:
                raise NanoseekError("speculative decoding needs an MTP module; a dense Qwen2/Llama model has none")
            self.latents, self.runner, self.drafter = None, None, None
            shape = (config.num_hidden_layers, max_batch_size, span, config.num_key_value_heads, config.head_dim)
            keys, values = (torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(2))
            self.cache = KVCache(list(keys), list(values))
            stores = [keys, values]
        else:
            self.latents = torch.zeros(
                config.num_hidden_layers,
                max_batch_size,
                span,
                config.kv_lora_rank + config.qk_rope_head_dim,
                dtype=self.dtype,
                device=self.device,
            )
            self.cache = latent_cache_views(self.latents, config.kv_lora_rank)
            self.runner = DecodeRunner(model, span) if folded else None
            self.drafter = MTPDrafter(model, max_batch_size, span, self.dtype, self.device) if speculative else None
            stores = [self.latents] + ([self.drafter.latents] if self.drafter is not None else [])
        # Every cache tensor, [layers, rows, positions, ...]: what a row's copy or a cached block is made of.
        self.stores = stores
        self.prefix_cache = PrefixCache(stores, self.prefix_cache_tokens) if self.prefix_cache_tokens else None
        ids = tokenizer.special_ids if tokenizer is not None else {}
        self.eos_id = (
            eos_token_id
            if eos_token_id is not None
            else (ids.get("eos") if tokenizer is not None else config.eos_token_id)
        )
        if isinstance(self.eos_id, list):  # Llama 3.1 lists several: the first ends a completion
            self.eos_id = self.eos_id[0] if self.eos_id else None
        if self.eos_id is not None and not 0 <= self.eos_id < config.vocab_size:
            raise NanoseekError(
                f"Engine: end-of-sequence id {self.eos_id} is not in the model's vocabulary of {config.vocab_size}"
            )
        self.think_id, self.end_think_id = ids.get("think"), ids.get("end_think")
        self.pad_id = 0
        self.free_slots = list(range(max_batch_size))  # a heap: the lowest rows first, so that the
        # running rows tend to be 0..B-1 and the cache is read by slicing
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._grammars: Grammars | None = None  # made for the first request with a grammar

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        **kwargs,
    ) -> Engine:
        """A Hugging Face checkpoint directory, with its tokenizer.json when it has one, loaded
        straight onto `device` (None: the CPU) in `dtype` (None: float32). Cache sizes that
        cannot fit fail from config.json alone, before the weights load."""
        from nanoseek.config import ModelConfig
        from nanoseek.io.hf import load_pretrained

        directory = Path(directory)
        target = resolve_device(device or "cpu", "Engine device")
        dtype = resolve_dtype(dtype, target, "Engine dtype") or torch.float32
        config = None
        if (directory / "config.json").is_file():
            dense = is_dense_checkpoint(directory)
            config = (DenseConfig if dense else ModelConfig).from_hf(directory / "config.json")
            asked = kwargs.get("max_seq_len")
            seq_len = min(asked or DEFAULT_MAX_SEQ_LEN, config.max_position_embeddings)
            mtp = bool(kwargs.get("speculative")) and not dense and config.num_nextn_predict_layers > 0
            batch = kwargs.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)
            prefix = prefix_cache_size(kwargs.get("prefix_cache_tokens"), seq_len)
            check_cache_fits(config, batch, seq_len, dtype, target, mtp, asked, prefix)
        model = load_pretrained(directory, dtype=dtype, device=target, config=config)
        tokenizer = None
        if (directory / "tokenizer.json").is_file():
            from nanoseek.data.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_pretrained(directory)
        return cls(model, tokenizer, **kwargs)

    @property
    def speculative_stats(self) -> SpeculativeStats | None:
        return None if self.drafter is None else self.drafter.stats

    def kv_cache_bytes_per_token(self) -> int:
        """layers x (kv_lora_rank + qk_rope_head_dim) x bytes of the cache dtype (a dense model:
        layers x 2 x num_key_value_heads x head_dim x bytes)."""
        c = self.config
        if isinstance(c, DenseConfig):
            return KVCache.bytes_per_token(c, self.cache.k[0].element_size())
        return c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * self.latents.element_size()

    # ---- the public API ------------------------------------------------------------
    def generate(
        self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list | None = None
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order, each with `n` completions."""
        requests = self._add_all(prompts, sampling_params)
        try:
            while not all(r.finished for r in requests):
                self.step()
        except BaseException:
            for r in requests:
                self.abort(r.request_id)
            raise
        return [self._output(r) for r in requests]

    def stream(
        self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list | None = None
    ) -> Iterator[StreamEvent]:
        """Yield each token as it is made; the prompts' requests run batched together with
        whatever else the engine holds. Closing the iterator aborts what is left of them."""
        requests = self._add_all(prompts, sampling_params)
        ours = {r.request_id for r in requests}
        try:
            while not all(r.finished for r in requests):
                for event in self.step():
                    if event.request_id in ours:
                        yield event
        finally:
            for r in requests:
                self.abort(r.request_id)

    def chat(
        self, conversations: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Generate the assistant's reply to one conversation (a list of messages) or several,
        rendered in the prompt format the model was trained with (its tokenizer's)."""
        single = conversations and isinstance(conversations[0], dict)
        convs = [conversations] if single else conversations
        if self.tokenizer is None:
            raise NanoseekError("chat needs a tokenizer (its prompt format)")
        prompts = [{"prompt_token_ids": self.tokenizer.encode_chat(c)} for c in convs]  # control tokens: the template's
        return self.generate(prompts, sampling_params)

    def add_request(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue a request; it joins the batch at the next `step`."""
        return self._add(prompt, sampling_params or SamplingParams(), request_id).request_id

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.sequences:
            if seq in self.waiting:
                self.waiting.remove(seq)
            if not seq.finished:
                seq.finish_reason = "abort"
            self._release(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @torch.inference_mode()
    def step(self) -> list[StreamEvent]:
        """Admit waiting completions into free cache rows and prefill them, then decode one
        token for every running completion. Returns the tokens made, as events."""
        events: list[StreamEvent] = []
        admitted = []
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = heapq.heappop(self.free_slots)
            admitted.append(seq)
        if admitted:
            self.running.extend(admitted)
            self._prefill(admitted, events)
        active = sorted((s for s in self.running if not s.finished), key=lambda s: s.slot)
        if active:
            if self.drafter is not None:
                self._decode_speculative(active, events)
            else:
                self._decode(active, events)
        for seq in [s for s in self.running if s.finished]:
            self._release(seq)
        for event in events:
            if event.output is not None:
                request = self.requests.get(event.request_id)
                if request is not None and request.finished:
                    del self.requests[event.request_id]
        return events

    # ---- requests --------------------------------------------------------------------
    def _add_all(self, prompts, sampling_params) -> list[Request]:
        single = isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
        )
        prompts = [prompts] if single else list(prompts)
        if not prompts:
            raise NanoseekError("generate: no prompts given")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise NanoseekError(f"generate: {len(params)} SamplingParams for {len(prompts)} prompts")
        requests = []
        try:
            for prompt, p in zip(prompts, params):
                requests.append(self._add(prompt, p or SamplingParams(), None))
        except NanoseekError:
            for r in requests:
                self.abort(r.request_id)
            raise
        return requests

    def _add(self, prompt: Prompt, params: SamplingParams, request_id: str | None) -> Request:
        if not self.running:  # the weights may have changed since the last batch (an RL step)
            if self.runner is not None:
                self.runner.sync()
            if self.prefix_cache is not None:
                self.prefix_cache.sync(self.model)
        text, ids = self._encode(prompt)
        if len(ids) >= self.max_seq_len:
            raise NanoseekError(f"prompt of {len(ids)} tokens leaves no room under max_seq_len {self.max_seq_len}")
        if params.stop and self.tokenizer is None:
            raise NanoseekError("SamplingParams.stop: stop strings need a tokenizer (use stop_token_ids)")
        if params.max_thinking_tokens is not None and self.end_think_id is None:
            raise NanoseekError("SamplingParams.max_thinking_tokens: the tokenizer has no </think> token")
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise NanoseekError(f"request id {request_id!r} is already in use")
        matchers = None
        if params.grammar is not None:
            if self.tokenizer is None:
                raise NanoseekError("SamplingParams.grammar: a grammar needs a tokenizer")
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.config.vocab_size, self.eos_id)
            first = self._grammars.matcher(params.grammar)
            matchers = [first] + [first.deep_copy() for _ in range(params.n - 1)]
        think_opened = opens_reasoning(ids, self.think_id, self.end_think_id)
        request = Request(request_id, text, ids, params, think_opened, matchers)
        self.requests[request_id] = request
        self.waiting.extend(request.sequences)
        return request

    def _encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise NanoseekError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise NanoseekError("a text prompt needs a tokenizer (give token ids, or load a tokenizer.json)")
            return prompt, self.tokenizer.encode(prompt, bos=not prompt.startswith(BOS))
        ids = list(prompt)
        if not ids:
            raise NanoseekError("empty prompt")
        vocab = self.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise NanoseekError(f"prompt token ids must be integers in [0, {vocab})")
        text = self.tokenizer.decode(ids) if self.tokenizer is not None else None
        return text, ids

    def _release(self, seq: Sequence) -> None:
        if seq.slot is not None:
            if self.prefix_cache is not None and seq.cached:
                # Every token but the last was fed to the model: their cache is in the row.
                ids = seq.request.prompt_ids + seq.token_ids
                self.prefix_cache.save(seq.slot, ids, max(seq.cached, seq.length - 1))
            heapq.heappush(self.free_slots, seq.slot)
            seq.slot = None
        if seq in self.running:
            self.running.remove(seq)

    def _output(self, request: Request) -> RequestOutput:
        return RequestOutput(
            request.request_id,
            request.prompt,
            request.prompt_ids,
            [self._completion(s) for s in request.sequences],
            request.finished,
            request.prompt_logprobs,
            request.num_cached_tokens,
        )

    def _completion(self, seq: Sequence) -> CompletionOutput:
        reasoning = answer = ""
        reasoning_tokens = 0
        if self.tokenizer is not None:
            split = split_reasoning(seq.text, think_opened=seq.request.think_opened)
            reasoning, answer = split.reasoning, split.answer
            # a stop string cuts the text after the last token's end was noted
            reasoning_tokens = span_tokens([min(e, len(seq.text)) for e in seq.token_ends], split.span)
        return CompletionOutput(
            seq.index,
            seq.text,
            list(seq.token_ids),
            seq.finish_reason,
            seq.stop_reason,
            reasoning,
            answer,
            reasoning_tokens,
            None if seq.logprobs is None else list(seq.logprobs),
            None if seq.top_logprobs is None else list(seq.top_logprobs),
        )

    # ---- the forward passes --------------------------------------------------------
    def _prefill(self, seqs: list[Sequence], events: list[StreamEvent]) -> None:
        """One right-padded forward over the prompts of the new requests, each from the end of
        its cached prefix (siblings from the same request copy the first one's cache row), then
        each completion's first token."""
        first: dict[str, int] = {}  # request id -> row of the batch
        reps: list[Sequence] = []
        for seq in seqs:
            if seq.request.request_id not in first:
                first[seq.request.request_id] = len(reps)
                reps.append(seq)
        starts = [self._reuse(s) for s in reps]
        lengths = [len(s.request.prompt_ids) - start for s, start in zip(reps, starts)]
        width = max(lengths)
        ids = torch.tensor(
            [s.request.prompt_ids[start:] + [self.pad_id] * (width - n) for s, start, n in zip(reps, starts, lengths)],
            dtype=torch.long,
            device=self.device,
        )
        # Each row's tokens at their own positions; padding past the cache goes to its spare last position.
        positions = torch.tensor(starts, device=self.device)[:, None] + torch.arange(width, device=self.device)
        positions = positions.clamp(max=self.max_seq_len)
        rows = torch.tensor([s.slot for s in reps], device=self.device)
        training = self.model.training
        self.model.eval()  # no balance statistics for the prompts
        try:
            hidden = self.model.hidden_states(ids, positions, self.cache, rows)
        finally:
            self.model.train(training)
        for row, rep in enumerate(reps):
            if rep.params.prompt_logprobs is not None and rep.request.prompt_logprobs is None:
                rep.request.prompt_logprobs = self._prompt_logprobs(hidden[row], rep.request)
        for seq in seqs:
            if seq.params.max_tokens == 0:  # the prompt's log-probs were all it asked for
                seq.finish_reason = "length"
                # With MTP its draft latents were not written: its row is not one to keep.
                seq.cached = len(seq.request.prompt_ids) if self.drafter is None else 0
                events.append(self._event(seq, None))
        seqs = [s for s in seqs if not s.finished]
        if not seqs:
            self._save_prompts(reps)
            return
        which = torch.tensor([first[s.request.request_id] for s in seqs], device=self.device)
        last = torch.tensor(
            [len(s.request.prompt_ids) - 1 - starts[first[s.request.request_id]] for s in seqs], device=self.device
        )
        copies = [(s.slot, reps[first[s.request.request_id]].slot) for s in seqs if s not in reps]
        if copies:
            dst = torch.tensor([d for d, _ in copies], device=self.device)
            src = torch.tensor([s for _, s in copies], device=self.device)
            n = max(len(s.request.prompt_ids) for s in seqs)
            for store in self.stores:  # the MTP module's rows too: its prefill below starts where the row's did
                store[:, dst, :n] = store[:, src, :n]
        logits = self.model.lm_head(hidden[which, last])
        tokens = self._choose(seqs, logits)
        for seq, token in zip(seqs, tokens):
            self._commit(seq, token, events)
        if self.drafter is not None:
            next_ids = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)[which]
            next_ids[torch.arange(len(seqs), device=self.device), last] = torch.tensor(tokens, device=self.device)
            drafts = self.drafter.prefill(
                hidden[which],
                next_ids,
                positions[which],
                torch.tensor([s.slot for s in seqs], device=self.device),
                last,
            )
            for seq, d in zip(seqs, drafts):
                seq.draft = d
        for seq in seqs:
            seq.cached = len(seq.request.prompt_ids)
        self._save_prompts(reps)

    def _reuse(self, seq: Sequence) -> int:
        """Copy the blocks of the prompt's longest cached prefix into its row; returns the
        tokens the prefill can skip: those, but for the last prompt token (its logits choose the
        first token) and, with MTP, the last block's last token (the MTP module's latent there
        read the token after the block, which the block's key does not hold)."""
        request = seq.request
        if self.prefix_cache is None or request.params.prompt_logprobs is not None:  # that scores every token
            return 0
        n = len(request.prompt_ids)
        blocks = self.prefix_cache.match(request.prompt_ids, n)
        self.prefix_cache.load(seq.slot, blocks)
        cached = len(blocks) * BLOCK_SIZE
        request.num_cached_tokens = min(cached - 1 if self.drafter is not None and cached else cached, n - 1)
        return request.num_cached_tokens

    def _save_prompts(self, reps: list[Sequence]) -> None:
        """Into the prefix cache at once: requests that arrive while these run reuse the prompts."""
        if self.prefix_cache is not None:
            for seq in reps:
                if seq.cached:
                    self.prefix_cache.save(seq.slot, seq.request.prompt_ids, seq.cached)

    def _prompt_logprobs(self, hidden: torch.Tensor, request: Request) -> PromptLogprobs:
        """The log-probabilities of the prompt's tokens from its prefill hidden states [T, D]:
        position i's log-softmax scores token i + 1. The output head runs over PROMPT_CHUNK
        positions at a time, so a long prompt never holds T x vocab logits at once."""
        ids, n_top = request.prompt_ids, request.params.prompt_logprobs
        logprobs: list[float | None] = [None]
        top: list[list[tuple[int, float]] | None] = [None]
        for start in range(0, len(ids) - 1, PROMPT_CHUNK):
            end = min(start + PROMPT_CHUNK, len(ids) - 1)
            logp = torch.log_softmax(self.model.lm_head(hidden[start:end]).float(), dim=-1)
            targets = torch.tensor(ids[start + 1 : end + 1], device=logp.device)
            logprobs += logp.gather(1, targets[:, None])[:, 0].tolist()
            if n_top:
                best = logp.topk(min(n_top, logp.shape[-1]), dim=-1)
                top += [list(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]
            else:
                top += [[] for _ in range(end - start)]
        return PromptLogprobs(logprobs, top)

    def _forward(self, seqs: list[Sequence], ids: list[list[int]]):
        """Hidden states [B, T, D] of tokens `ids` [B][T] at the sequences' next positions."""
        t = len(ids[0])
        ids = torch.tensor(ids, device=self.device)
        starts = [s.length - 1 for s in seqs]
        positions = torch.tensor([range(p, p + t) for p in starts], device=self.device)
        slots = [s.slot for s in seqs]
        rows = torch.tensor(slots, device=self.device)
        if self.runner is None:
            return self.model.hidden_states(ids, positions, self.cache, rows), positions, rows, slots, starts, None
        ctx = self.runner.context(positions, rows, slots, starts)
        return self.runner.hidden_states(ids, ctx, self.latents), positions, rows, slots, starts, ctx

    def _decode(self, seqs: list[Sequence], events: list[StreamEvent]) -> None:
        hidden, *_ = self._forward(seqs, [[s.token_ids[-1]] for s in seqs])
        logits = self.model.lm_head(hidden[:, -1])
        for seq, token in zip(seqs, self._choose(seqs, logits)):
            self._commit(seq, token, events)

    def _decode_speculative(self, seqs: list[Sequence], events: list[StreamEvent]) -> None:
        """Feed [last token, draft] per row; keep the draft when it is the model's own choice."""
        n = len(seqs)
        hidden, positions, rows, slots, starts, ctx = self._forward(seqs, [[s.token_ids[-1], s.draft] for s in seqs])
        logits = self.model.lm_head(hidden)
        first = self._choose(seqs, logits[:, 0])
        drafts = [s.draft for s in seqs]
        stats = self.drafter.stats
        stats.drafted += n
        stats.accepted += sum(x == d for x, d in zip(first, drafts))
        for seq, token in zip(seqs, first):
            self._commit(seq, token, events)
        kept = [i for i in range(n) if not seqs[i].finished and first[i] == drafts[i]]
        second = dict(zip(kept, self._choose([seqs[i] for i in kept], logits[kept, 1]))) if kept else {}
        for i, token in second.items():
            self._commit(seqs[i], token, events)
        live = [i for i in range(n) if not seqs[i].finished]
        if not live:
            return
        next_ids = torch.tensor([[first[i], second.get(i, first[i])] for i in live], device=self.device)
        take = torch.tensor([int(i in second) for i in live], device=self.device)
        new = self.drafter.extend(
            self.runner,
            hidden[live],
            next_ids,
            positions[live],
            rows[live],
            [slots[i] for i in live],
            [starts[i] for i in live],
            take,
            ctx if len(live) == n else None,  # the same positions and rows: the same step context
        )
        for i, d in zip(live, new):
            seqs[i].draft = d

    # ---- choosing and committing tokens ----------------------------------------------
    def _choose(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        model_logits = logits
        rows, cols = [], []  # stop tokens are banned until min_tokens: one indexed write for the batch
        for i, s in enumerate(seqs):
            if len(s.token_ids) < s.params.min_tokens:
                stop = self._stop_ids(s)
                rows += [i] * len(stop)
                cols += stop
        if rows:
            dev = logits.device
            logits = logits.index_put(
                (torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                torch.tensor(float("-inf"), dtype=logits.dtype, device=dev),
            )
        constrained = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if constrained:  # the grammar's allowed tokens only
            logits = self._grammars.mask(logits, constrained, [seqs[i].matcher for i in constrained])
        tokens = choose_tokens(logits, [s.params for s in seqs], [s.generator for s in seqs])
        for i, s in enumerate(seqs):
            budget = s.params.max_thinking_tokens
            if s.thinking and budget is not None and s.thinking_tokens >= budget:
                # The thinking budget is spent: close the reasoning (under a grammar, once it allows
                # that: not inside a character whose UTF-8 bytes are still coming).
                if s.matcher is None or logits[i, self.end_think_id].isfinite():
                    tokens[i] = self.end_think_id
        self._record_logprobs(seqs, model_logits, tokens)
        return tokens

    def _record_logprobs(self, seqs: list[Sequence], logits: torch.Tensor, tokens: list[int]) -> None:
        """The chosen tokens' log-probabilities under the model (and the top-n), for the rows that
        asked: one log-softmax of the logits they were sampled from."""
        want = [i for i, s in enumerate(seqs) if s.logprobs is not None]
        if not want:
            return
        dev = logits.device
        index = torch.tensor(want, device=dev)
        logp = torch.log_softmax(logits[index].float(), dim=-1)
        chosen = logp.gather(1, torch.tensor([tokens[i] for i in want], device=dev)[:, None])[:, 0].tolist()
        n_top = max(seqs[i].params.logprobs for i in want)
        top = logp.topk(min(n_top, logp.shape[-1]), dim=-1) if n_top else None
        for j, i in enumerate(want):
            seq = seqs[i]
            seq.logprobs.append(chosen[j])
            n = seq.params.logprobs
            pairs = [] if top is None else list(zip(top.indices[j, :n].tolist(), top.values[j, :n].tolist()))
            seq.top_logprobs.append(pairs)

    def _stop_ids(self, seq: Sequence) -> list[int]:
        ids = list(seq.params.stop_token_ids)
        if self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _commit(self, seq: Sequence, token: int, events: list[StreamEvent]) -> None:
        """Append a token, update the thinking state, detokenize, check every stop condition."""
        p = seq.params
        seq.token_ids.append(token)
        if seq.matcher is not None:
            self._grammars.advance(seq.matcher, token)
        if token == self.think_id and self.think_id is not None:
            seq.thinking = True
        elif token == self.end_think_id and self.end_think_id is not None:
            seq.thinking = False
        elif seq.thinking:
            seq.thinking_tokens += 1
        n = len(seq.token_ids)
        if n >= p.min_tokens and (token == self.eos_id or token in p.stop_token_ids):
            seq.finish_reason = "stop"
            seq.stop_reason = None if token == self.eos_id else token
        elif self.tokenizer is not None:
            checked = len(seq.text)
            self._detokenize(seq)
            if p.stop and n >= p.min_tokens:
                self._check_stop_strings(seq, checked)
        if not seq.finished and ((p.max_tokens is not None and n >= p.max_tokens) or seq.length >= self.max_seq_len):
            seq.finish_reason = "length"
            if self.tokenizer is not None and seq.read < n:
                self._detokenize(seq, flush=True)  # show a trailing partial character as it is
        if self.tokenizer is not None:
            seq.token_ends.append(len(seq.text))
        events.append(self._event(seq, token))

    def _detokenize(self, seq: Sequence, flush: bool = False) -> None:
        decode = self.tokenizer.decode
        ids = seq.token_ids
        before = decode(ids[seq.prefix : seq.read])
        after = decode(ids[seq.prefix :])
        # A token may end inside a UTF-8 character: wait for the rest before showing it.
        if len(after) > len(before) and (flush or not after.endswith("\ufffd")):
            seq.text += after[len(before) :]
            seq.prefix, seq.read = seq.read, len(ids)

    def _check_stop_strings(self, seq: Sequence, checked: int) -> None:
        # Only a stop string that ends in the new text counts (those before min_tokens never do).
        lo = max(0, checked - max(map(len, seq.params.stop)) + 1)
        hits = [(seq.text.find(s, lo), s) for s in seq.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i, s = min(hits)
            seq.text = seq.text[:i]
            seq.finish_reason, seq.stop_reason = "stop", s

    def _event(self, seq: Sequence, token: int | None) -> StreamEvent:
        text = reasoning = answer = ""
        if self.tokenizer is not None:
            shown = seq.text
            if not seq.finished and seq.params.stop:  # hold back what could begin a stop string
                shown = shown[: max(seq.sent, len(shown) - max(map(len, seq.params.stop)) + 1)]
            text = shown[seq.sent :]
            seq.sent = len(shown)
            reasoning, answer = seq.splitter.feed(text, final=seq.finished)
        output = self._completion(seq) if seq.finished else None
        made = len(seq.token_ids)
        return StreamEvent(
            seq.request.request_id,
            seq.index,
            token,
            text,
            reasoning,
            answer,
            seq.finish_reason,
            output,
            seq.logprobs[made - 1] if seq.logprobs and token is not None else None,
            seq.top_logprobs[made - 1] if seq.top_logprobs and token is not None else None,
            seq.request.prompt_logprobs if made <= 1 else None,  # its first event: the prefill's
            seq.request.num_cached_tokens,
        )
