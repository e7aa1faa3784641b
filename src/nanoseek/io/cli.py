"""`nanoseek inspect DIR`: open a Hugging Face checkpoint (DeepSeek-V3/V2, or a dense Qwen2/Llama
student of R1-Distill) and summarise it; `nanoseek inspect --presets`: the presets' sizes and
KV-cache costs."""

from __future__ import annotations

import time

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def register(sub) -> None:
    p = sub.add_parser(
        "inspect", help="summarise a Hugging Face DeepSeek-V3/V2 or Qwen2/Llama checkpoint, or the presets"
    )
    p.add_argument("model", nargs="?", help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--config-only", action="store_true", help="read config.json only, not the weights")
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPE_BYTES),
        help="the weights load in this dtype (default float32) and the KV cache is also counted in it "
        "(it is always counted in bf16)",
    )
    p.add_argument(
        "--presets",
        action="store_true",
        help="the presets: parameters and the KV-cache cost of MLA against standard attention, "
        "and the dense R1-Distill students",
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


def dense_presets_table():
    """The dense students (nanoseek.dense): the R1-Distill models' published shapes and `student`."""
    from rich.table import Table

    from nanoseek.dense import ARCHITECTURES, DENSE_PRESETS, DenseConfig, KVCache, count_dense_parameters

    table = Table(title="dense students, R1-Distill layouts (KV cache in bf16 bytes per token)")
    for col in ("preset", "architecture", "layers", "heads / KV heads", "params", "KV GQA", "KV MHA", "MHA / GQA"):
        table.add_column(col, justify="right")
    names = {v: k for k, v in ARCHITECTURES.items()}
    for name in DENSE_PRESETS:
        c = DenseConfig.preset(name)
        gqa = KVCache.bytes_per_token(c, 2)
        mha = c.num_hidden_layers * 2 * c.num_attention_heads * c.head_dim * 2
        table.add_row(
            name,
            names[c.model_type],
            str(c.num_hidden_layers),
            f"{c.num_attention_heads}/{c.num_key_value_heads}",
            human(count_dense_parameters(c)),
            f"{gqa:,}",
            f"{mha:,}",
            f"{mha / gqa:.1f}x",
        )
    table.caption = "KV GQA: layers x 2 x KV heads x head_dim x 2 bytes; KV MHA: a key and value per query head"
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
    from nanoseek.io.dense_hf import is_dense_checkpoint

    if args.presets or args.model is None:
        if args.model is None and not args.presets:
            raise NanoseekError("inspect: give a checkpoint directory, or --presets")
        console = Console(width=None if Console().is_terminal else 120)
        console.print(presets_table())
        console.print(dense_presets_table())
        return 0
    if is_dense_checkpoint(args.model):
        return inspect_dense(args)

    from nanoseek.config import ModelConfig
    from nanoseek.io.hf import checkpoint_config, load_pretrained
    from nanoseek.model import count_parameters, kv_cache_bytes_per_token

    dtype = getattr(args, "dtype", None)
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
    if dtype not in (None, "bfloat16"):
        table.add_row(f"KV cache bytes / token (MLA, {dtype})", f"{cache['mla'] // 2 * DTYPE_BYTES[dtype]:,}")
    if not args.config_only:
        load_rows(table, lambda torch_dtype: load_pretrained(args.model, torch_dtype, config=config), dtype)
    Console().print(table)
    return 0


def inspect_dense(args) -> int:
    """A Qwen2ForCausalLM / LlamaForCausalLM directory: its shape, parameters and the KV cache of
    grouped-query attention (keys and values of each KV head, every layer)."""
    from rich.console import Console
    from rich.table import Table

    from nanoseek.dense import ARCHITECTURES, DenseConfig, KVCache, count_dense_parameters
    from nanoseek.io.hf import load_pretrained

    dtype = getattr(args, "dtype", None)
    config = DenseConfig.from_hf(f"{args.model}/config.json")
    architecture = {v: k for k, v in ARCHITECTURES.items()}[config.model_type]
    table = Table(title=f"{args.model} ({config.model_type})")
    table.add_column("field")
    table.add_column("value", justify="right")
    table.add_row("architecture", architecture)
    for k in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "tie_word_embeddings",
        "rope_theta",
    ):
        table.add_row(k, str(getattr(config, k)))
    table.add_row("rope_scaling", (config.rope_scaling or {}).get("rope_type", "none"))
    table.add_row("parameters", f"{count_dense_parameters(config):,}")
    table.add_row("KV cache bytes / token (GQA, bf16)", f"{KVCache.bytes_per_token(config, 2):,}")
    if dtype not in (None, "bfloat16"):
        table.add_row(
            f"KV cache bytes / token (GQA, {dtype})", f"{KVCache.bytes_per_token(config, DTYPE_BYTES[dtype]):,}"
        )
    if not args.config_only:
        load_rows(table, lambda torch_dtype: load_pretrained(args.model, torch_dtype), dtype)
    Console().print(table)
    return 0


def load_rows(table, load, dtype: str | None) -> None:
    """Rows "weights: loaded in 0.12s" and the parameters' bytes as loaded (a tied one once)."""
    from nanoseek.device import DTYPES

    t0 = time.perf_counter()
    model = load(DTYPES[dtype or "float32"])
    table.add_row("weights", f"loaded in {time.perf_counter() - t0:.2f}s")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    table.add_row(f"weight bytes ({dtype or 'float32'})", f"{size:,}")
