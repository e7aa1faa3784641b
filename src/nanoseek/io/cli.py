"""`nanoseek inspect DIR`: open a Hugging Face DeepSeek checkpoint and summarise it."""

from __future__ import annotations

import time


def register(sub) -> None:
    p = sub.add_parser("inspect", help="load a Hugging Face DeepSeek-V3/V2 checkpoint and summarise it")
    p.add_argument("model", help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--config-only", action="store_true", help="read config.json only, not the weights")
    p.set_defaults(func=run_inspect)


def run_inspect(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from nanoseek.config import ModelConfig
    from nanoseek.io.hf import load_pretrained
    from nanoseek.model import count_parameters, kv_cache_bytes_per_token

    config = ModelConfig.from_hf(f"{args.model}/config.json")
    counts = count_parameters(config)
    cache = kv_cache_bytes_per_token(config)
    table = Table(title=f"{args.model} ({config.model_type})")
    table.add_column("field")
    table.add_column("value", justify="right")
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
              "n_routed_experts", "num_experts_per_tok", "topk_method", "num_nextn_predict_layers"):
        table.add_row(k, str(getattr(config, k)))
    table.add_row("parameters (total)", f"{counts['total']:,}")
    table.add_row("parameters (active / token)", f"{counts['active']:,}")
    table.add_row("KV cache bytes / token (MLA, bf16)", f"{cache['mla']:,}")
    if not args.config_only:
        t0 = time.perf_counter()
        load_pretrained(args.model)
        table.add_row("weights", f"loaded in {time.perf_counter() - t0:.2f}s")
    Console().print(table)
    return 0
