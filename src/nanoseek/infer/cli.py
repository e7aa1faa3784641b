"""`nanoseek generate` and `nanoseek chat` (`nanoseek bench decode` lives in nanoseek.bench.decode)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

from nanoseek.device import add_device_arguments, device_arguments
from nanoseek.errors import NanoseekError


def register(subparsers) -> None:
    gen = subparsers.add_parser(
        "generate",
        help="generate completions with the inference engine",
        description="Greedy by default (--temperature 0); prints the reasoning and the "
        "answer of each completion, or JSON lines with --json.",
    )
    gen.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (HF format + tokenizer.json)")
    gen.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for several)")
    gen.add_argument(
        "--prompt-ids",
        action="append",
        metavar="IDS",
        help="a prompt as comma-separated token ids (repeat for several)",
    )
    gen.add_argument(
        "--format",
        choices=("model", "chat", "r1-zero", "raw"),
        default="model",
        help="wrap each --prompt as a user turn in the model's own prompt format (default: model, the "
        "format its tokenizer_config.json names), in the chat or the R1-Zero format, or not (raw)",
    )
    _sampling_args(gen, temperature=0.0, max_tokens=256)
    add_device_arguments(gen)
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.set_defaults(func=cmd_generate)

    chat = subparsers.add_parser("chat", help="chat in the terminal, reasoning shown apart from the answer")
    chat.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (HF format + tokenizer.json)")
    chat.add_argument("--system", help="a system prompt")
    _sampling_args(chat, temperature=0.6, max_tokens=1024, top_p=0.95)
    add_device_arguments(chat)
    chat.set_defaults(func=cmd_chat)

    # `nanoseek bench decode` is registered by nanoseek.bench, from nanoseek.bench.decode.


def _sampling_args(p: argparse.ArgumentParser, temperature: float, max_tokens: int, top_p: float = 1.0) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=temperature, help=f"0 is greedy (default {temperature})")
    g.add_argument("--top-p", type=float, default=top_p, help=f"nucleus sampling mass (default {top_p})")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: all)")
    g.add_argument(
        "--max-tokens", type=int, default=max_tokens, help=f"most tokens per completion (default {max_tokens})"
    )
    g.add_argument("--min-tokens", type=int, default=0, help="no end-of-sequence before this many tokens")
    g.add_argument("--stop", action="append", metavar="TEXT", help="a stop string (repeat for several)")
    g.add_argument("-n", "--n", type=int, default=1, help="completions per prompt (default 1)")
    g.add_argument("--seed", type=int, help="sampling seed, for reproducible samples")
    g.add_argument("--max-thinking-tokens", type=int, help="reasoning budget, then </think> is forced")
    g.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    g.add_argument("--max-seq-len", type=int, default=4096, help="cache positions per sequence (default 4096)")


def _params(args):
    """The flags' SamplingParams; a temperature below 0 (or not a finite number) names the flag."""
    from nanoseek.infer.sampling import SamplingParams

    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise NanoseekError(f"--temperature {args.temperature:g}: must be a finite number of at least 0 (0 is greedy)")
    return SamplingParams(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        min_tokens=args.min_tokens,
        stop=args.stop,
        seed=args.seed,
        max_thinking_tokens=args.max_thinking_tokens,
    )


def _engine(args, max_batch_size: int):
    from nanoseek.infer.engine import Engine

    device, dtype = device_arguments(args)
    return Engine.from_pretrained(
        args.model,
        device=device,
        dtype=dtype,
        max_batch_size=max_batch_size,
        max_seq_len=args.max_seq_len,
        speculative=args.speculative,
    )


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise NanoseekError(f"--prompt-ids {text!r}: expected comma-separated integers") from None


def cmd_generate(args) -> int:
    from rich.console import Console

    params = _params(args)
    prompts: list = list(args.prompt or []) + [_parse_ids(t) for t in args.prompt_ids or []]
    if not prompts:
        raise NanoseekError("give at least one --prompt or --prompt-ids")
    engine = _engine(args, max_batch_size=min(16, len(prompts) * params.n))
    if engine.tokenizer is None and args.prompt:
        raise NanoseekError(f"{args.model}: no tokenizer.json, so only --prompt-ids prompts work")
    if args.format != "raw" and engine.tokenizer is not None:  # without one every prompt is token ids
        fmt = engine.tokenizer.prompt_format if args.format == "model" else args.format
        # Ids from encode_chat: a prompt that spells "<｜Assistant｜>" is text, not the control token
        prompts = [
            engine.tokenizer.encode_chat([{"role": "user", "content": p}], prompt_format=fmt)
            if isinstance(p, str)
            else p
            for p in prompts
        ]
    results = engine.generate(prompts, params)
    if args.json:
        for r in results:
            print(json.dumps(dataclasses.asdict(r), ensure_ascii=False))
    else:
        console = Console()
        for i, r in enumerate(results):
            for out in r.outputs:
                head = f"prompt {i}" + (f", completion {out.index}" if params.n > 1 else "")
                console.print(f"[bold]{head}[/bold] [dim]({len(out.token_ids)} tokens, {out.finish_reason})[/dim]")
                if engine.tokenizer is None:
                    console.print(" ".join(map(str, out.token_ids)))
                    continue
                if out.reasoning:
                    console.print("thinking", style="bold dim")
                    console.print(out.reasoning, style="dim", markup=False, highlight=False)
                    console.print()
                console.print(out.answer if (out.reasoning or out.answer) else out.text, markup=False, highlight=False)
    stats = engine.speculative_stats
    if stats is not None and not args.json:
        print(f"MTP drafts accepted: {stats.accepted}/{stats.drafted} ({stats.acceptance_rate:.0%})")
    return 0


def cmd_chat(args) -> int:
    from nanoseek.infer.chat import run_chat

    params = _params(args)  # a bad flag is refused before the model loads
    engine = _engine(args, max_batch_size=1)
    if engine.tokenizer is None:
        raise NanoseekError(f"{args.model}: no tokenizer.json; chat needs one")
    return run_chat(engine, params, system=args.system)
