"""`nanoseek inspect DIR`: open a Hugging Face DeepSeek checkpoint and summarise it;
`nanoseek inspect --presets`: the presets' sizes and KV-cache costs."""

from __future__ import annotations

import time


def register(sub) -> None:
    p = sub.add_parser("inspect", help="summarise a Hugging Face DeepSeek-V3/V2 checkpoint, or the presets")
    p.add_argument("model", nargs="?", help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--config-only", action="store_true", help="read config.json only, not the weights")
    p.add_argument(
        "--presets",
        action="store_true",
        help="the presets: parameters and the KV-cache cost of MLA against standard attention",
    )
    p.set_defaults(func=run_inspect)


def presets_table():
    from rich.table import Table

    from nanoseek.config import PRESETS, ModelConfig
    from nanoseek.model import count_parameters, kv_cache_bytes_per_token

    table = Table(title="nanoseek presets (KV cache in bf16 bytes per token)")
    for col in (
        "preset",
        "layers",
        "experts",
        "total params",
        "active params",
        "+MTP",
        "KV MLA",
        "KV MHA",
        "MHA / MLA",
    ):
        table.add_column(col, justify="right")
    for name in PRESETS:
        c = ModelConfig.preset(name)
        n = count_parameters(c)
        kv = kv_cache_bytes_per_token(c)
        table.add_row(
            name,
            str(c.num_hidden_layers),
            f"{c.num_experts_per_tok}/{c.n_routed_experts}",
            human(n["total"]),
            human(n["active"]),
            human(n["total_with_mtp"] - n["total"]),
            f"{kv['mla']:,}",
            f"{kv['mha']:,}",
            f"{kv['mha'] / kv['mla']:.1f}x",
        )
    table.caption = "KV MHA: standard multi-head attention with the same heads, caching every head's key and value"
    return table


def human(n: int) -> str:
    """1.42M, 0.69M, 671.03B: millions from 0.1M, so the small presets' columns share a unit."""
    for unit, size, start in (("B", 1e9, 1e9), ("M", 1e6, 1e5), ("K", 1e3, 1e3)):
        if n >= start:
            return f"{n / size:.2f}{unit}"
    return str(n)


def run_inspect(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from nanoseek.errors import NanoseekError

    if args.presets or args.model is None:
        if args.model is None and not args.presets:
            raise NanoseekError("inspect: give a checkpoint directory, or --presets")
        Console(width=None if Console().is_terminal else 120).print(presets_table())
        return 0

    from nanoseek.config import ModelConfig
    from nanoseek.io.hf import checkpoint_config, load_pretrained
    from nanoseek.model import count_parameters, kv_cache_bytes_per_token

    # Without --config-only, the model the weights make (no MTP if the checkpoint has none).
    config = ModelConfig.from_hf(f"{args.model}/config.json") if args.config_only else checkpoint_config(args.model)
    counts = count_parameters(config)
    cache = kv_cache_bytes_per_token(config)
    table = Table(title=f"{args.model} ({config.model_type})")
    table.add_column("field")
    table.add_column("value", justify="right")
    for k in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "q_lora_rank",
        "kv_lora_rank",
        "n_routed_experts",
        "num_experts_per_tok",
        "topk_method",
        "num_nextn_predict_layers",
    ):
        table.add_row(k, str(getattr(config, k)))
    table.add_row("parameters (total)", f"{counts['total']:,}")
    table.add_row("parameters (active / token)", f"{counts['active']:,}")
    table.add_row("KV cache bytes / token (MLA, bf16)", f"{cache['mla']:,}")
    if not args.config_only:
        t0 = time.perf_counter()
        load_pretrained(args.model, config=config)
        table.add_row("weights", f"loaded in {time.perf_counter() - t0:.2f}s")
    Console().print(table)
    return 0
