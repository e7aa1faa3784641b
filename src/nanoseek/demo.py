"""`nanoseek demo`: the default end-to-end job.

For now it shows the model: build the `tiny` preset, run it, save it in Hugging Face
format, reload it (in nanoseek, and in `transformers` when installed), and print the
presets table: parameters and the KV-cache cost of MLA against standard attention.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the default end-to-end job on the tiny preset")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_demo)


def presets_table():
    from rich.table import Table

    from nanoseek.config import PRESETS, ModelConfig
    from nanoseek.model import count_parameters, kv_cache_bytes_per_token

    table = Table(title="nanoseek presets (KV cache in bf16 bytes per token)")
    for col in ("preset", "layers", "experts", "total params", "active params", "+MTP",
                "KV MLA", "KV MHA", "MHA / MLA"):
        table.add_column(col, justify="right")
    for name in PRESETS:
        c = ModelConfig.preset(name)
        n = count_parameters(c)
        kv = kv_cache_bytes_per_token(c)
        table.add_row(name, str(c.num_hidden_layers), f"{c.num_experts_per_tok}/{c.n_routed_experts}",
                      human(n["total"]), human(n["active"]), human(n["total_with_mtp"] - n["total"]),
                      f"{kv['mla']:,}", f"{kv['mha']:,}", f"{kv['mha'] / kv['mla']:.1f}x")
    table.caption = "KV MHA: standard multi-head attention with the same heads, caching every head's key and value"
    return table


def human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def run_demo(args) -> int:
    from rich.console import Console

    from nanoseek import ModelConfig, Transformer, load_pretrained, save_pretrained

    console = Console(width=None if Console().is_terminal else 120, soft_wrap=True)
    torch.manual_seed(args.seed)
    config = ModelConfig.preset("tiny")
    model = Transformer(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 64))
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = model(tokens)
    console.print(f"[bold]tiny[/bold]: forward of {tuple(tokens.shape)} tokens -> logits {tuple(logits.shape)} "
                  f"in {1000 * (time.perf_counter() - t0):.1f} ms")
    out = Path(args.out) / "tiny-hf"
    save_pretrained(model, out)
    reloaded = load_pretrained(out)
    with torch.inference_mode():
        diff = (reloaded(tokens) - logits).abs().max().item()
    console.print(f"saved in Hugging Face format to {out}; reloaded by nanoseek, max |logit diff| = {diff:.2e}")
    try:
        import transformers
    except ImportError:
        console.print("(transformers not installed: skipping the transformers reload)")
    else:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.inference_mode():
            diff = (hf(tokens).logits - logits).abs().max().item()
        console.print(f"reloaded by transformers ({type(hf).__name__}), max |logit diff| = {diff:.2e}")
    console.print(presets_table())
    return 0
