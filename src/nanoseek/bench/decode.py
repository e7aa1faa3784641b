"""`nanoseek bench decode`: the engine against `transformers`' `generate` on the same weights.

Both decode greedily, the same random prompts, exactly `new_tokens` tokens each (end-of-
sequence banned), timed from the prompt to the last token, prefill included. The cache sizes
are read from what each one holds at the end, not from a formula.

Then the engine with FP8 weights against the engine with the same weights in bf16 (V3 section
3.3: E4M3 weights with one scale per 128x128 block, kept FP8 in memory and dequantised inside
each matmul), on the same prompts: weight bytes and tokens/s.

A dense student preset (`--preset r1-distill-qwen-1.5b`, ...; or `--model` a Qwen2/Llama
directory) runs in bfloat16 by default: random weights saved once, both tools loading that
directory, with the peak resident memory of each (`PeakMemory`). MTP and FP8 do not apply to it.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import gc
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoseek.bench import shapes
from nanoseek.errors import NanoseekError
from nanoseek.fp8 import WeightMemory


@dataclass
class DecodeResult:
    batch: int
    hf_tokens_per_s: float
    ours_tokens_per_s: float
    spec_tokens_per_s: float | None = None
    acceptance_rate: float | None = None
    same_tokens: bool = False

    @property
    def ratio(self) -> float:
        return self.ours_tokens_per_s / self.hf_tokens_per_s


@dataclass
class FP8Result:
    batch: int
    bf16_tokens_per_s: float
    fp8_tokens_per_s: float

    @property
    def ratio(self) -> float:
        return self.fp8_tokens_per_s / self.bf16_tokens_per_s


@dataclass
class DecodeBench:
    preset: str
    threads: int
    prompt_len: int
    new_tokens: int
    repeats: int
    device: str = "cpu"
    attn_implementation: str = ""
    experts_implementation: str = ""
    results: list[DecodeResult] = field(default_factory=list)
    ours_cache_bytes: int = 0  # per token, all layers
    hf_cache_bytes: float = 0.0
    mha_cache_bytes: int = 0  # per-head keys and values, as standard attention caches them
    fp8_results: list[FP8Result] = field(default_factory=list)
    fp8_memory: WeightMemory | None = None
    dtype: str = "float32"
    dense: bool = False  # a dense student: the memory rows below, no MTP or FP8
    ours_memory: ResidentMemory | None = None
    hf_memory: ResidentMemory | None = None
    memory_how: str = ""


@dataclass
class ResidentMemory:
    """One tool's memory above what the process held before it loaded its model, in bytes: what
    it still holds after loading and one short generate (the weights, resident once touched),
    the peak during those, and its peak while decoding (held + the engine's cache + the rise
    during a timed generate call). None: not measurable."""

    held: int | None = None
    load_peak: int | None = None
    decode_peak: int | None = None

    @property
    def peak(self) -> int | None:
        values = [v for v in (self.load_peak, self.decode_peak) if v is not None]
        return max(values) if values else None


class PeakMemory:
    """The high-water mark of memory between `start()` and `peak(start)`, measured, not computed.

    On the CPU: the process's resident set (Linux /proc/self/status VmRSS and VmHWM); `start`
    first hands back to the system what Python's collector and malloc hold unused (gc.collect,
    glibc malloc_trim) and resets VmHWM to the current RSS (writing 5 to /proc/self/clear_refs,
    Linux 4.0+), so one tool's peak is not the earlier one's. On a GPU: torch's allocated bytes
    (reset_peak_memory_stats, max_memory_allocated). Where neither works, None."""

    def __init__(self, device: torch.device):
        self.device = device
        self.how = (
            "torch.cuda max_memory_allocated"
            if device.type == "cuda"
            else "resident set: VmHWM reset through /proc/self/clear_refs, after gc and malloc_trim"
        )

    def now(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        _settle()
        return _proc_status_bytes("VmRSS")

    def start(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        _settle()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return None
        return _proc_status_bytes("VmRSS")

    def peak(self, start: int | None) -> int | None:
        if start is None:
            return None
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - start
        high = _proc_status_bytes("VmHWM")
        return None if high is None else high - start


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _settle() -> None:
    """Free what is unreachable, and hand malloc's free pages back, so the RSS is what is in use."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def hf_cache_bytes_per_token(cache, batch: int) -> float:
    """Bytes held by a transformers Cache object, per token of one sequence."""
    total = 0
    for layer in getattr(cache, "layers", []):
        total += sum(t.numel() * t.element_size() for t in vars(layer).values() if torch.is_tensor(t) and t.dim() >= 3)
    return total / (batch * cache.get_seq_length())


def _best_of(repeats: int, *fns, device: torch.device | None = None, peaks: list | None = None):
    """Run each fn `repeats` times, in turns; per fn its last output and its fastest time (on a
    GPU, until its queued kernels have finished). With `peaks` (a list per fn) and a device:
    peaks[i] becomes fn i's highest rise in memory over its runs (PeakMemory, outside the timing)."""
    outs, best = [None] * len(fns), [float("inf")] * len(fns)
    memory = PeakMemory(device) if peaks is not None and device is not None else None
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = memory.start() if memory else None
            t0 = time.perf_counter()
            outs[i] = fn()
            if device is not None and device.type == "cuda":
                torch.cuda.synchronize(device)
            best[i] = min(best[i], time.perf_counter() - t0)
            if memory:
                peaks[i] = _max(peaks[i], memory.peak(start))
    return outs, best


def _hf_greedy(hf, ids: torch.Tensor, n: int, pad_token_id: int):
    """transformers' greedy generate of exactly n tokens (end-of-sequence banned), with its cache."""
    with torch.inference_mode():
        return hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=pad_token_id,
            return_dict_in_generate=True,
        )


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise NanoseekError("bench decode compares with transformers: pip install 'nanoseek[hf]'") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def bench_decode(
    preset: str = "small",
    model_dir: str | None = None,
    batch_sizes=(1, 16),
    prompt_len: int = 32,
    new_tokens: int = 256,
    threads: int | None = None,
    speculative: bool = True,
    seed: int = 0,
    repeats: int = 3,
    fp8: bool = True,
    log=print,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> DecodeBench:
    """Each timing is the best of `repeats` runs, the two tools taking turns, so that a busy
    machine slows neither more than the other. `fp8`: then FP8 against bf16 weights. Both
    tools run on `device`, in `dtype` (None: float32; a dense student: bfloat16, see
    bench_dense_decode)."""
    from nanoseek.device import place_model, resolve_device, resolve_dtype
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams
    from nanoseek.io.dense_hf import is_dense_checkpoint
    from nanoseek.io.hf import load_pretrained, save_pretrained
    from nanoseek.model import Transformer

    if is_dense_checkpoint(model_dir) if model_dir else shapes.is_dense(preset):
        return bench_dense_decode(
            preset,
            model_dir,
            batch_sizes,
            prompt_len,
            new_tokens,
            threads,
            speculative,
            seed,
            repeats,
            fp8,
            log,
            device,
            dtype,
        )
    transformers = _import_transformers()
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device) or torch.float32
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if model_dir:
        model = load_pretrained(model_dir, device=device, dtype=dtype)
    else:
        model = place_model(Transformer(shapes.model_config(preset)).eval(), device, dtype)
    config = model.config
    if prompt_len + new_tokens > config.max_position_embeddings:
        raise NanoseekError(
            f"--prompt-len + --new-tokens exceeds max_position_embeddings {config.max_position_embeddings}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    bench = DecodeBench(
        model_dir or preset,
        torch.get_num_threads(),
        prompt_len,
        new_tokens,
        repeats,
        str(device),
        hf.config._attn_implementation,
        str(getattr(hf.config, "_experts_implementation", "")),
        dtype=str(dtype).removeprefix("torch."),
    )
    c = config
    size = torch.empty(0, dtype=dtype).element_size()
    bench.mha_cache_bytes = c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * size
    params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens)
    gen = torch.Generator().manual_seed(seed)
    low = 3 if c.vocab_size > 3 else 0  # leave BOS/EOS/PAD out of the prompts

    def hf_generate(ids, n):
        return _hf_greedy(hf, ids, n, c.pad_token_id or 0)

    prompts_by_batch = {}
    for batch in batch_sizes:
        ids = torch.randint(low, c.vocab_size, (batch, prompt_len), generator=gen)
        prompts = prompts_by_batch[batch] = ids.tolist()
        ids = ids.to(device)
        engine = Engine(model, max_batch_size=batch, max_seq_len=prompt_len + new_tokens + 1)
        fns = [lambda: hf_generate(ids, new_tokens), lambda: engine.generate(prompts, params)]
        spec = None
        if speculative and len(model.mtp):
            spec = Engine(model, max_batch_size=batch, max_seq_len=prompt_len + new_tokens + 1, speculative=True)
            fns.append(lambda: spec.generate(prompts, params))
        _best_of(
            1,
            lambda: hf_generate(ids, 4),
            *[  # warm up
                (lambda e=e: e.generate(prompts, SamplingParams(temperature=0, max_tokens=4, min_tokens=4)))
                for e in (engine, spec)
                if e is not None
            ],
            device=device,
        )
        if spec is not None:
            spec.drafter.stats.drafted = spec.drafter.stats.accepted = 0
        outs, secs = _best_of(repeats, *fns, device=device)
        hf_out, ours = outs[0], outs[1]
        same = [o.outputs[0].token_ids for o in ours] == hf_out.sequences[:, prompt_len:].tolist()
        result = DecodeResult(batch, batch * new_tokens / secs[0], batch * new_tokens / secs[1], same_tokens=same)
        bench.hf_cache_bytes = hf_cache_bytes_per_token(hf_out.past_key_values, batch)
        bench.ours_cache_bytes = engine.kv_cache_bytes_per_token()
        if spec is not None:
            result.spec_tokens_per_s = batch * new_tokens / secs[2]
            result.acceptance_rate = spec.drafter.stats.acceptance_rate
            result.same_tokens = same and [o.outputs[0].token_ids for o in outs[2]] == [
                o.outputs[0].token_ids for o in ours
            ]
        bench.results.append(result)
        log(
            f"batch {batch}: transformers {result.hf_tokens_per_s:.1f} tok/s, nanoseek {result.ours_tokens_per_s:.1f} "
            f"tok/s ({result.ratio:.1f}x)"
        )
    if fp8:
        del hf
        bench.fp8_memory, bench.fp8_results = fp8_against_bf16(model, prompts_by_batch, params, repeats, log)
    return bench


def random_dense_checkpoint(config, directory: str | Path, dtype: torch.dtype, seed: int = 0) -> Path:
    """A Qwen2/Llama directory of `config` with random weights (N(0, initializer_range)) drawn
    straight in `dtype`: built on meta and materialised once, with no float32 copy (7 GB for
    the 1.5B model)."""
    from nanoseek.dense import DenseTransformer
    from nanoseek.device import place_model
    from nanoseek.io.dense_hf import save_dense_pretrained

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = DenseTransformer(config)
    place_model(model, dtype=dtype).to_empty(device="cpu")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_parameters()
    return save_dense_pretrained(model, directory)


def bench_dense_decode(
    preset: str = "student",
    model_dir: str | None = None,
    batch_sizes=(1, 8),
    prompt_len: int = 32,
    new_tokens: int = 256,
    threads: int | None = None,
    speculative: bool = True,
    seed: int = 0,
    repeats: int = 3,
    fp8: bool = True,
    log=print,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> DecodeBench:
    """A dense student (Qwen2/Llama): the engine and transformers each load the same directory
    (`model_dir`, else the preset with random weights saved to a temporary one) in `dtype`
    (None: bfloat16), then decode the same prompts greedily, taking turns; each one's memory is
    measured around its load and each timed generate (PeakMemory). No MTP module, no FP8: those
    runs are skipped with a line."""
    from nanoseek.dense import DenseConfig
    from nanoseek.device import resolve_device, resolve_dtype
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams
    from nanoseek.io.hf import load_pretrained

    transformers = _import_transformers()
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device) or torch.bfloat16
    if threads:
        torch.set_num_threads(threads)
    c = DenseConfig.from_hf(Path(model_dir) / "config.json") if model_dir else shapes.dense_config(preset)
    if prompt_len + new_tokens > c.max_position_embeddings:
        raise NanoseekError(f"--prompt-len + --new-tokens exceeds max_position_embeddings {c.max_position_embeddings}")
    if speculative:
        log("MTP speculative decoding: skipped (a dense Qwen2/Llama model has no MTP module)")
    if fp8:
        log("FP8 weights: skipped (the FP8 runs are of DeepSeek's attention and expert linears)")
    memory = PeakMemory(device)
    ours_mem, hf_mem = ResidentMemory(), ResidentMemory()
    with tempfile.TemporaryDirectory() as tmp:
        directory = model_dir or random_dense_checkpoint(c, tmp, dtype, seed)
        # Each tool's load and first step, measured from what the process holds before it. Both
        # map the safetensors files and read the weights straight from the mapping, so they become
        # resident only when a forward touches them: held counts after one short generate.
        first = [[i % c.vocab_size for i in range(3, 7)]]
        first_step = SamplingParams(temperature=0, max_tokens=2, min_tokens=2)
        pad = c.pad_token_id or 0

        def load_ours(path):
            model = load_pretrained(path, dtype=dtype, device=str(device))
            Engine(model, max_batch_size=1, max_seq_len=8).generate(first, first_step)
            return model

        def load_hf(path):
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
            _hf_greedy(hf, torch.tensor(first, device=device), 2, pad)
            return hf

        # Once on a one-layer copy of the shape first, so that neither tool's numbers hold the code
        # imported and the kernels set up on first use, which the second would find done.
        small = c.replace(  # the special ids of a 151K vocabulary are not in its 512 tokens
            num_hidden_layers=1,
            vocab_size=max(8, min(c.vocab_size, 512)),
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
        load_ours(random_dense_checkpoint(small, Path(tmp) / "first-use", dtype, seed))
        load_hf(Path(tmp) / "first-use")
        start = memory.start()
        model = load_ours(directory)
        ours_mem.load_peak = memory.peak(start)
        ours_mem.held = None if start is None else memory.now() - start
        start = memory.start()
        hf = load_hf(directory)
        hf_mem.load_peak = memory.peak(start)
        hf_mem.held = None if start is None else memory.now() - start
        bench = DecodeBench(
            model_dir or preset,
            torch.get_num_threads(),
            prompt_len,
            new_tokens,
            repeats,
            str(device),
            hf.config._attn_implementation,
            "",
            dtype=str(dtype).removeprefix("torch."),
            dense=True,
            ours_memory=ours_mem,
            hf_memory=hf_mem,
            memory_how=memory.how,
        )
        size = torch.empty(0, dtype=dtype).element_size()
        bench.mha_cache_bytes = c.num_hidden_layers * 2 * c.num_attention_heads * c.head_dim * size
        params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens)
        warm_up = SamplingParams(temperature=0, max_tokens=2, min_tokens=2)
        gen = torch.Generator().manual_seed(seed)
        for batch in batch_sizes:
            ids = torch.randint(3, c.vocab_size, (batch, prompt_len), generator=gen)
            prompts = ids.tolist()
            ids = ids.to(device)
            start = memory.start()
            engine = Engine(model, max_batch_size=batch, max_seq_len=prompt_len + new_tokens + 1)
            engine_bytes = memory.peak(start)  # its preallocated cache
            _best_of(1, lambda: _hf_greedy(hf, ids, 2, pad), lambda: engine.generate(prompts, warm_up), device=device)
            peaks = [None, None]
            outs, secs = _best_of(
                repeats,
                lambda: _hf_greedy(hf, ids, new_tokens, pad),
                lambda: engine.generate(prompts, params),
                device=device,
                peaks=peaks,
            )
            hf_out, ours = outs
            same = [o.outputs[0].token_ids for o in ours] == hf_out.sequences[:, prompt_len:].tolist()
            result = DecodeResult(batch, batch * new_tokens / secs[0], batch * new_tokens / secs[1], same_tokens=same)
            bench.results.append(result)
            bench.hf_cache_bytes = hf_cache_bytes_per_token(hf_out.past_key_values, batch)
            bench.ours_cache_bytes = engine.kv_cache_bytes_per_token()
            if hf_mem.held is not None and peaks[0] is not None:
                hf_mem.decode_peak = _max(hf_mem.decode_peak, hf_mem.held + peaks[0])
            if ours_mem.held is not None and peaks[1] is not None and engine_bytes is not None:
                ours_mem.decode_peak = _max(ours_mem.decode_peak, ours_mem.held + engine_bytes + peaks[1])
            log(
                f"batch {batch}: transformers {result.hf_tokens_per_s:.2f} tok/s, nanoseek "
                f"{result.ours_tokens_per_s:.2f} tok/s ({result.ratio:.2f}x), same tokens: {'yes' if same else 'NO'}"
            )
            engine = outs = hf_out = ours = None  # freed before the next batch's engine is measured
    return bench


def fp8_against_bf16(
    model, prompts_by_batch: dict[int, list[list[int]]], params, repeats: int, log=print
) -> tuple[WeightMemory, list[FP8Result]]:
    """The engine on `model` in bf16, and on the same bf16 model with its attention and expert
    linears in FP8 (`to_fp8_weights`), taking turns on the same prompts."""
    from nanoseek.device import model_device, place_model
    from nanoseek.fp8 import to_fp8_weights
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams

    device = model_device(model)
    bf16 = place_model(copy.deepcopy(model), dtype=torch.bfloat16).eval()  # the routing bias stays float32
    fp8 = copy.deepcopy(bf16)
    to_fp8_weights(fp8)
    memory = WeightMemory.compare(bf16, fp8)
    log(
        f"FP8 weights: linears {memory.fp8_linears:,} vs {memory.bf16_linears:,} bytes in bf16 "
        f"({memory.linears_ratio:.2f}), whole model {memory.model_ratio:.2f}"
    )
    warm_up = SamplingParams(temperature=0, max_tokens=4, min_tokens=4)
    results = []
    for batch, prompts in prompts_by_batch.items():
        max_seq_len = len(prompts[0]) + params.max_tokens + 1
        engines = [Engine(m, max_batch_size=batch, max_seq_len=max_seq_len) for m in (bf16, fp8)]
        _best_of(1, *[(lambda e=e: e.generate(prompts, warm_up)) for e in engines], device=device)
        _, secs = _best_of(repeats, *[(lambda e=e: e.generate(prompts, params)) for e in engines], device=device)
        tokens = batch * params.max_tokens
        results.append(FP8Result(batch, tokens / secs[0], tokens / secs[1]))
        log(
            f"batch {batch}: bf16 weights {results[-1].bf16_tokens_per_s:.1f} tok/s, FP8 weights "
            f"{results[-1].fp8_tokens_per_s:.1f} tok/s ({results[-1].ratio:.2f}x)"
        )
    return memory, results


def print_bench(bench: DecodeBench, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(
        title=f"decode: {bench.preset}, prompt {bench.prompt_len} + {bench.new_tokens} new tokens, "
        f"greedy, {bench.device}, {bench.dtype}"
        + (f", {bench.threads} thread(s)" if bench.device == "cpu" else "")
        + f", best of {bench.repeats}"
    )
    columns = ["batch", "transformers tok/s", "nanoseek tok/s", "speed-up"]
    if not bench.dense:
        columns += ["nanoseek+MTP tok/s", "MTP acceptance"]
    for col in (*columns, "same tokens"):
        table.add_column(col, justify="right")
    digits = 2 if bench.dense else 1  # a 1.5B model on a CPU decodes well under 10 tokens a second
    for r in bench.results:
        cells = [
            str(r.batch),
            f"{r.hf_tokens_per_s:.{digits}f}",
            f"{r.ours_tokens_per_s:.{digits}f}",
            f"{r.ratio:.2f}x",
        ]
        if not bench.dense:
            cells += [
                "-" if r.spec_tokens_per_s is None else f"{r.spec_tokens_per_s:.1f}",
                "-" if r.acceptance_rate is None else f"{r.acceptance_rate:.0%}",
            ]
        table.add_row(*cells, "yes" if r.same_tokens else "NO")
    table.caption = f"transformers {_hf_version()}: attention '{bench.attn_implementation}'" + (
        "" if bench.dense else f", experts '{bench.experts_implementation}'"
    )
    console.print(table)
    cache = Table(title=f"KV cache bytes per token (all layers, {bench.dtype})")
    for col in ("cache", "bytes / token", "vs nanoseek"):
        cache.add_column(col, justify="right")
    ours = bench.ours_cache_bytes
    cache.add_row(
        "nanoseek: keys and values per KV head (GQA)" if bench.dense else "nanoseek: MLA latent c_KV + k_pe",
        f"{ours:,}",
        "1.0x",
    )
    cache.add_row(
        "transformers: measured from its DynamicCache",
        f"{bench.hf_cache_bytes:,.0f}",
        f"{bench.hf_cache_bytes / ours:.1f}x",
    )
    cache.add_row(
        "standard attention: per-head keys and values",
        f"{bench.mha_cache_bytes:,}",
        f"{bench.mha_cache_bytes / ours:.1f}x",
    )
    cache.caption = (
        "both cache each KV head's keys and values; standard attention would cache one per query head"
        if bench.dense
        else "transformers 5 caches the same compressed latent, but re-expands all of it through "
        "kv_b_proj at every step; nanoseek attends over it with the absorbed weights"
    )
    console.print(cache)
    if bench.ours_memory is not None and bench.hf_memory is not None:
        print_memory(bench, console)
    if bench.fp8_memory is not None:
        print_fp8(bench, console)


def print_memory(bench: DecodeBench, console) -> None:
    from rich.table import Table

    def mb(n: int | None) -> str:
        return "-" if n is None else f"{n / 2**20:,.1f}"

    table = Table(title=f"peak memory in MiB, above the process before each tool's load ({bench.dtype})")
    for col in ("tool", "held after load", "load peak", "decode peak", "peak", "vs HF"):
        table.add_column(col, justify="right")
    hf_peak = bench.hf_memory.peak
    for name, m in (("nanoseek", bench.ours_memory), ("transformers", bench.hf_memory)):
        ratio = "-" if m.peak is None or not hf_peak else f"{m.peak / hf_peak:.2f}x"
        table.add_row(name, mb(m.held), mb(m.load_peak), mb(m.decode_peak), mb(m.peak), ratio)
    table.caption = (
        f"measured: {bench.memory_how}; load = load + a 2-token generate (the weights are mapped from "
        "the safetensors files and resident once read); decode peak = held after load + the engine's "
        "cache + the highest rise during one timed generate; HF: transformers"
    )
    console.print(table)


def print_fp8(bench: DecodeBench, console) -> None:
    from rich.table import Table

    m = bench.fp8_memory
    memory = Table(title="weight bytes: FP8 (E4M3 + a float32 scale per 128x128 block) vs bf16")
    for col in ("weights", "bf16", "FP8", "FP8 / bf16"):
        memory.add_column(col, justify="right")
    memory.add_row(
        "attention and expert linears", f"{m.bf16_linears:,}", f"{m.fp8_linears:,}", f"{m.linears_ratio:.2f}"
    )
    memory.add_row("whole model", f"{m.bf16_model:,}", f"{m.fp8_model:,}", f"{m.model_ratio:.2f}")
    memory.caption = "kv_b_proj, embedding, output head, MoE gate, MTP eh_proj and norms stay bf16"
    console.print(memory)
    speed = Table(title=f"nanoseek decode, FP8 vs bf16 weights (same prompts, best of {bench.repeats})")
    for col in ("batch", "bf16 tok/s", "FP8 tok/s", "FP8 / bf16"):
        speed.add_column(col, justify="right")
    for r in bench.fp8_results:
        speed.add_row(str(r.batch), f"{r.bf16_tokens_per_s:.1f}", f"{r.fp8_tokens_per_s:.1f}", f"{r.ratio:.2f}x")
    speed.caption = (
        "the engine calls the FP8 linears rather than folding them; each dequantises its weight "
        "per block inside the matmul (a GPU with blockwise scaled_mm runs an FP8 matmul)"
    )
    console.print(speed)


def _hf_version() -> str:
    import transformers

    return transformers.__version__


# ---- `nanoseek bench decode` (registered by nanoseek.bench) ------------------------------
def add_arguments(p) -> None:
    p.description = (
        "Greedy decoding of random prompts by the engine and by transformers' generate on the same "
        "weights, in one run: tokens/s and KV-cache bytes per token. Then the engine with FP8 "
        "weights against bf16 weights on the same prompts: weight bytes and tokens/s. A dense student "
        "preset (r1-distill-*, student) or Qwen2/Llama --model runs in bfloat16 at batch 1 and 8 and "
        "adds each tool's peak memory; MTP and FP8 are skipped for it."
    )
    shapes.add_arguments(p, "model preset with random weights: DeepSeek's, or a dense student's", dense=True)
    p.add_argument("--model", metavar="DIR", help="a checkpoint directory instead of a preset")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="of both tools' weights and caches (default float32; bfloat16 for a dense student; float16 on a GPU only)",
    )
    p.add_argument("--batch-sizes", help="comma-separated (default 1,16; 1,8 for a dense student)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per sequence (default 256)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both (default 1: small decode steps are bound by dispatch, and on a "
        "busy machine extra threads wait on each other; 0 keeps torch's default)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each, the best kept (default 3)")
    p.add_argument("--no-speculative", action="store_true", help="skip the MTP speculative run")
    p.add_argument(
        "--no-fp8",
        action="store_true",
        help="skip the FP8-vs-bf16 weights runs (the engine with E4M3 weights and 128x128 block scales, "
        "kept FP8 in memory, against the same weights in bf16)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device",
        default="cpu",
        help="where both tools run: cpu, cuda or auto (default cpu, where the README's numbers come from)",
    )


def main(args) -> int:
    from nanoseek.io.dense_hf import is_dense_checkpoint

    shape = shapes.spec(args)
    dense = is_dense_checkpoint(args.model) if args.model else shapes.is_dense(shape)
    batch_sizes = args.batch_sizes or ("1,8" if dense else "1,16")
    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise NanoseekError(f"--batch-sizes {batch_sizes!r}: expected comma-separated integers") from None
    if not sizes or min(sizes) < 1 or args.prompt_len < 1 or args.new_tokens < 1 or args.repeats < 1:
        raise NanoseekError("--batch-sizes, --prompt-len, --new-tokens and --repeats must be positive")
    bench = bench_decode(
        shape,
        args.model,
        sizes,
        args.prompt_len,
        args.new_tokens,
        args.threads or None,
        not args.no_speculative,
        args.seed,
        args.repeats,
        not args.no_fp8,
        device=args.device,
        dtype=args.dtype,
    )
    print_bench(bench)
    return 0
