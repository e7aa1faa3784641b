"""`nanoseek bench prefix`: time to first token of each turn of a long conversation, the engine
with its prefix cache against the same engine without it (nanoseek.infer.prefix_cache).

Turn k's prompt is the whole conversation so far, the user's turns and the model's replies, and
the new user turn, as a chat client sends it. With the cache the prefill reads the conversation
before the turn from the cache and computes only the new tokens; without it the prefill computes
them all, so its time to first token grows with the conversation. Random weights and random
token ids: the times depend on the shapes, not on the text. Replies are greedy, exactly
`--reply-tokens` long (end-of-sequence banned), and both engines must give the same ones.
Each conversation runs `--repeats` times on new tokens with an empty cache, the two engines
taking turns, and each turn's fastest time is kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from nanoseek.bench import shapes
from nanoseek.errors import NanoseekError


@dataclass
class PrefixBench:
    shape: str
    device: str
    dtype: str
    threads: int
    turns: int
    user_tokens: int
    reply_tokens: int
    repeats: int
    prompt_tokens: list[int] = field(default_factory=list)  # per turn
    cached_tokens: list[int] = field(default_factory=list)  # per turn, with the cache
    cached_ttft: list[float] = field(default_factory=list)  # seconds, per turn
    plain_ttft: list[float] = field(default_factory=list)
    same_tokens: bool = True

    @property
    def speedup(self) -> float:
        """Of the last turn's time to first token."""
        return self.plain_ttft[-1] / self.cached_ttft[-1]


def _conversation(engine, users: list[list[int]], params, device) -> tuple[list[float], list[int], list[list[int]]]:
    """Per turn: seconds to the first token, prompt tokens taken from the cache, the reply."""
    ttft, cached, replies, history = [], [], [], []
    for user in users:
        prompt = history + user
        start, first, reply = time.perf_counter(), None, []
        for event in engine.stream([prompt], params):
            if first is None:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                first = time.perf_counter() - start
                cached.append(event.num_cached_tokens)
            reply.append(event.token_id)
        ttft.append(first)
        replies.append(reply)
        history = prompt + reply
    return ttft, cached, replies


def bench_prefix(
    shape: str = "small",
    model_dir: str | None = None,
    turns: int = 5,
    user_tokens: int = 256,
    reply_tokens: int = 64,
    repeats: int = 3,
    threads: int | None = 1,
    seed: int = 0,
    device: str = "cpu",
    dtype: str | None = None,
    log=print,
) -> PrefixBench:
    from nanoseek.device import place_model, resolve_device, resolve_dtype
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams

    if min(turns, user_tokens, reply_tokens, repeats) < 1:
        raise NanoseekError("--turns, --user-tokens, --reply-tokens and --repeats must be positive")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device) or torch.float32
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if model_dir:
        from nanoseek.io.hf import load_pretrained

        model = load_pretrained(model_dir, device=device, dtype=dtype)
        shape = model_dir
    elif shapes.is_dense(shape):
        from nanoseek.dense import DenseTransformer

        model = place_model(DenseTransformer(shapes.dense_config(shape)).eval(), device, dtype)
    else:
        from nanoseek.model import Transformer

        model = place_model(Transformer(shapes.model_config(shape)).eval(), device, dtype)
    config = model.config
    total = turns * (user_tokens + reply_tokens)  # the last reply included
    if total + 1 > config.max_position_embeddings:
        raise NanoseekError(
            f"a conversation of {total} tokens exceeds max_position_embeddings {config.max_position_embeddings}: "
            "lower --turns, --user-tokens or --reply-tokens"
        )
    cached_engine = Engine(model, max_batch_size=1, max_seq_len=total + 1)
    plain_engine = Engine(model, max_batch_size=1, max_seq_len=total + 1, prefix_cache_tokens=0)
    params = SamplingParams(temperature=0, max_tokens=reply_tokens, min_tokens=reply_tokens)
    bench = PrefixBench(
        shape,
        str(device),
        str(dtype).removeprefix("torch."),
        torch.get_num_threads(),
        turns,
        user_tokens,
        reply_tokens,
        repeats,
    )
    gen = torch.Generator().manual_seed(seed)
    low = 3 if config.vocab_size > 3 else 0  # leave BOS/EOS/PAD out of the turns
    warm = [torch.randint(low, config.vocab_size, (8,), generator=gen).tolist()]
    for engine in (cached_engine, plain_engine):
        engine.generate(warm, SamplingParams(temperature=0, max_tokens=2, min_tokens=2))
    best = {"cached": [float("inf")] * turns, "plain": [float("inf")] * turns}
    for r in range(repeats):
        users = [torch.randint(low, config.vocab_size, (user_tokens,), generator=gen).tolist() for _ in range(turns)]
        cached_engine.prefix_cache.clear()
        replies = {}
        for name, engine in (("cached", cached_engine), ("plain", plain_engine)):
            ttft, cached, replies[name] = _conversation(engine, users, params, device)
            best[name] = [min(a, b) for a, b in zip(best[name], ttft)]
            if name == "cached":
                bench.cached_tokens = cached
        bench.same_tokens = bench.same_tokens and replies["cached"] == replies["plain"]
        log(
            f"run {r + 1}/{repeats}: turn {turns} first token {best['cached'][-1] * 1000:.1f} ms with the cache, "
            f"{best['plain'][-1] * 1000:.1f} ms without"
        )
    bench.prompt_tokens = [k * user_tokens + (k - 1) * reply_tokens for k in range(1, turns + 1)]
    bench.cached_ttft, bench.plain_ttft = best["cached"], best["plain"]
    return bench


def print_bench(bench: PrefixBench, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(
        title=f"prefix cache: time to first token, {bench.shape}, turns of {bench.user_tokens} user + "
        f"{bench.reply_tokens} reply tokens, {bench.device}, {bench.dtype}"
        + (f", {bench.threads} thread(s)" if bench.device == "cpu" else "")
        + f", best of {bench.repeats}"
    )
    for col in ("turn", "prompt tokens", "cached", "with cache ms", "without ms", "speed-up"):
        table.add_column(col, justify="right")
    for k in range(bench.turns):
        table.add_row(
            str(k + 1),
            f"{bench.prompt_tokens[k]:,}",
            f"{bench.cached_tokens[k]:,}",
            f"{bench.cached_ttft[k] * 1000:.1f}",
            f"{bench.plain_ttft[k] * 1000:.1f}",
            f"{bench.plain_ttft[k] / bench.cached_ttft[k]:.2f}x",
        )
    table.caption = "same replies with and without the cache: " + ("yes" if bench.same_tokens else "NO")
    console.print(table)


# ---- `nanoseek bench prefix` (registered by nanoseek.bench) ------------------------------
def add_arguments(p) -> None:
    p.description = (
        "Time to first token of each turn of a long conversation (each prompt the whole conversation so far), "
        "the engine with its prefix cache against the engine without it, on random weights and tokens."
    )
    shapes.add_arguments(p, "model preset with random weights: DeepSeek's, or a dense student's", dense=True)
    p.add_argument("--model", metavar="DIR", help="a checkpoint directory instead of a preset")
    p.add_argument("--turns", type=int, default=5, help="user turns (default 5)")
    p.add_argument("--user-tokens", type=int, default=256, help="tokens of each user turn (default 256)")
    p.add_argument("--reply-tokens", type=int, default=64, help="tokens of each reply (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="conversations run, each turn's best kept (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 keeps torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="weights and caches (default float32)")


def main(args) -> int:
    bench = bench_prefix(
        shapes.spec(args),
        args.model,
        args.turns,
        args.user_tokens,
        args.reply_tokens,
        args.repeats,
        args.threads or None,
        args.seed,
        args.device,
        args.dtype,
    )
    print_bench(bench)
    return 0
