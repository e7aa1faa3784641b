"""`nanoseek bench decode`: the engine against `transformers`' `generate` on the same weights.

Both decode greedily, the same random prompts, exactly `new_tokens` tokens each (end-of-
sequence banned), timed from the prompt to the last token, prefill included. The cache sizes
are read from what each one holds at the end, not from a formula.

Then the engine with FP8 weights against the engine with the same weights in bf16 (V3 section
3.3: E4M3 weights with one scale per 128x128 block, kept FP8 in memory and dequantised inside
each matmul), on the same prompts: weight bytes and tokens/s.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field

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


def hf_cache_bytes_per_token(cache, batch: int) -> float:
    """Bytes held by a transformers Cache object, per token of one sequence."""
    total = 0
    for layer in getattr(cache, "layers", []):
        total += sum(t.numel() * t.element_size() for t in vars(layer).values() if torch.is_tensor(t) and t.dim() >= 3)
    return total / (batch * cache.get_seq_length())


def _best_of(repeats: int, *fns, device: torch.device | None = None):
    """Run each fn `repeats` times, in turns; per fn its last output and its fastest time (on a
    GPU, until its queued kernels have finished)."""
    outs, best = [None] * len(fns), [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            if device is not None and device.type == "cuda":
                torch.cuda.synchronize(device)
            best[i] = min(best[i], time.perf_counter() - t0)
    return outs, best


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
) -> DecodeBench:
    """Each timing is the best of `repeats` runs, the two tools taking turns, so that a busy
    machine slows neither more than the other. `fp8`: then FP8 against bf16 weights. Both
    tools run on `device`, in float32."""
    try:
        import transformers
    except ImportError:
        raise NanoseekError("bench decode compares with transformers: pip install 'nanoseek[hf]'") from None
    from nanoseek.device import place_model, resolve_device
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams
    from nanoseek.io.hf import load_pretrained, save_pretrained
    from nanoseek.model import Transformer

    device = resolve_device(device)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if model_dir:
        model = load_pretrained(model_dir, device=device)
    else:
        model = place_model(Transformer(shapes.model_config(preset)).eval(), device)
    config = model.config
    if prompt_len + new_tokens > config.max_position_embeddings:
        raise NanoseekError(
            f"--prompt-len + --new-tokens exceeds max_position_embeddings {config.max_position_embeddings}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(device).eval()
    bench = DecodeBench(
        model_dir or preset,
        torch.get_num_threads(),
        prompt_len,
        new_tokens,
        repeats,
        str(device),
        hf.config._attn_implementation,
        str(getattr(hf.config, "_experts_implementation", "")),
    )
    c = config
    bench.mha_cache_bytes = c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * 4
    params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens)
    gen = torch.Generator().manual_seed(seed)
    low = 3 if c.vocab_size > 3 else 0  # leave BOS/EOS/PAD out of the prompts

    def hf_generate(ids, n):
        with torch.inference_mode():
            return hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=c.pad_token_id or 0,
                return_dict_in_generate=True,
            )

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
        f"greedy, {bench.device}"
        + (f", {bench.threads} thread(s)" if bench.device == "cpu" else "")
        + f", best of {bench.repeats}"
    )
    for col in (
        "batch",
        "transformers tok/s",
        "nanoseek tok/s",
        "speed-up",
        "nanoseek+MTP tok/s",
        "MTP acceptance",
        "same tokens",
    ):
        table.add_column(col, justify="right")
    for r in bench.results:
        table.add_row(
            str(r.batch),
            f"{r.hf_tokens_per_s:.1f}",
            f"{r.ours_tokens_per_s:.1f}",
            f"{r.ratio:.2f}x",
            "-" if r.spec_tokens_per_s is None else f"{r.spec_tokens_per_s:.1f}",
            "-" if r.acceptance_rate is None else f"{r.acceptance_rate:.0%}",
            "yes" if r.same_tokens else "NO",
        )
    table.caption = (
        f"transformers {_hf_version()}: attention '{bench.attn_implementation}', experts "
        f"'{bench.experts_implementation}'"
    )
    console.print(table)
    cache = Table(title="KV cache bytes per token (all layers, float32)")
    for col in ("cache", "bytes / token", "vs nanoseek"):
        cache.add_column(col, justify="right")
    ours = bench.ours_cache_bytes
    cache.add_row("nanoseek: MLA latent c_KV + k_pe", f"{ours:,}", "1.0x")
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
        "transformers 5 caches the same compressed latent, but re-expands all of it through "
        "kv_b_proj at every step; nanoseek attends over it with the absorbed weights"
    )
    console.print(cache)
    if bench.fp8_memory is not None:
        print_fp8(bench, console)


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
        "weights against bf16 weights on the same prompts: weight bytes and tokens/s."
    )
    shapes.add_arguments(p)
    p.add_argument("--model", metavar="DIR", help="a checkpoint directory instead of a preset")
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated (default 1,16)")
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
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise NanoseekError(f"--batch-sizes {args.batch_sizes!r}: expected comma-separated integers") from None
    if not sizes or min(sizes) < 1 or args.prompt_len < 1 or args.new_tokens < 1 or args.repeats < 1:
        raise NanoseekError("--batch-sizes, --prompt-len, --new-tokens and --repeats must be positive")
    bench = bench_decode(
        shapes.spec(args),
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
    )
    print_bench(bench)
    return 0
