"""`nanoseek bench train`: training throughput of nanoseek against `transformers`.

Both train the same weights (the preset, written by nanoseek in Hugging Face format and
opened by `DeepseekV3ForCausalLM`) on the same random batch: forward, next-token
cross-entropy, backward, gradient clipping and an AdamW step (torch's fused kernel, the
transformers Trainer's default), in fp32. nanoseek runs the
step of its trainer with the MTP loss off, because `transformers` has no MTP; the steps of
the two alternate, so both see the same machine load. Also printed: nanoseek's model FLOP
utilisation against the fp32 matmul throughput measured on this machine.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from nanoseek.bench import shapes


def add_arguments(p) -> None:
    shapes.add_arguments(p, "model preset")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per tool (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per tool first (default 2)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.add_argument(
        "--device",
        default="cpu",
        help="where both tools train: cpu, cuda or auto (default cpu, where the README's numbers come from)",
    )


def training_flops_per_token(config, seq: int) -> float:
    """6 x the weights that multiply each token (the embedding is a lookup), plus causal
    attention: per layer 3 x heads x seq x (qk_head_dim + v_head_dim) (half the keys on average)."""
    from nanoseek.model import count_parameters

    active = count_parameters(config)["active"]
    attention = config.num_hidden_layers * config.num_attention_heads * seq * (config.qk_head_dim + config.v_head_dim)
    return 6 * active + 3 * attention


def _sync(device: torch.device) -> None:
    """Wait for the GPU's queued kernels, so that the clock measures them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CPU = torch.device("cpu")


def measured_peak_flops(seconds: float = 1.0, n: int = 1024, device: torch.device = CPU) -> float:
    """fp32 matmul FLOP/s of this machine (of its GPU with `device`), best of a few timed runs."""
    if device.type == "cuda":
        n = max(n, 8192)  # a GPU needs large matmuls to reach its peak
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    _sync(device)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        _sync(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t))
    return best


def nanoseek_step(config, state_dict, device: torch.device = CPU):
    from nanoseek.model import Transformer
    from nanoseek.train.distributed import Context, clip_grad_norm, distribute_experts
    from nanoseek.train.pretrain import Objective, adamw

    model = Transformer(config)
    model.load_state_dict(state_dict)
    model.to(device).train()
    distribute_experts(model, 0, 1)  # the trainer's expert loop
    objective = Objective(model, mtp=False)
    params = list(model.parameters())
    ctx = Context(device=device)
    opt = adamw(params, ctx, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)  # the trainer's (fused)

    def step(x, y):
        opt.zero_grad(set_to_none=False)
        main, _, balance = objective(x, y)
        (main / y.numel() + 1e-4 * balance).backward()
        clip_grad_norm(params, 1.0, ctx)
        opt.step()
        return (main / y.numel()).item()

    return step


def transformers_step(path, device: torch.device = CPU):
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.to(device).train()
    params = list(model.parameters())
    # The transformers Trainer's default optimizer with torch >= 2.8 (`adamw_torch_fused`).
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step(x, y):
        opt.zero_grad(set_to_none=False)
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    return step, type(model).__name__


def main(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from nanoseek.device import resolve_device
    from nanoseek.errors import NanoseekError
    from nanoseek.io.hf import save_pretrained
    from nanoseek.model import Transformer

    try:
        import transformers  # noqa: F401
    except ImportError:
        raise NanoseekError("bench train compares with transformers: pip install 'nanoseek[hf]'") from None
    if args.batch < 1 or args.seq < 2 or args.steps < 1:
        raise NanoseekError("--batch, --seq and --steps must be positive (--seq at least 2)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    console = Console()
    shape = shapes.spec(args)
    config = shapes.model_config(shape)
    torch.manual_seed(0)
    reference = Transformer(config)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(reference, tmp)
        hf_step, hf_name = transformers_step(tmp, device)
    ns_step = nanoseek_step(config, reference.state_dict(), device)
    del reference
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    console.print(
        f"bench train: preset {shape}, batch {args.batch} x {args.seq} tokens, fp32, "
        f"{where}; nanoseek vs transformers {hf_name}, alternating steps"
    )
    times = {"nanoseek": [], "transformers": []}
    first = {}
    for i in range(args.warmup + args.steps):
        for name, step in (("nanoseek", ns_step), ("transformers", hf_step)):
            t = time.perf_counter()
            loss = step(x, y)  # .item() of the loss waits for the GPU too
            _sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)
            first.setdefault(name, loss)
    peak = measured_peak_flops(device=device)
    flops = training_flops_per_token(config, args.seq)
    n_tokens = args.batch * args.seq
    result = {
        "preset": shape,
        "batch": args.batch,
        "seq": args.seq,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "peak_matmul_gflops": peak / 1e9,
        "train_flops_per_token": flops,
        "first_loss": first,
    }
    table = Table(title="training throughput (median step)")
    for col in ("tool", "ms / step", "tokens / s", "MFU"):
        table.add_column(col, justify="right")
    for name in ("nanoseek", "transformers"):
        sec = statistics.median(times[name])
        result[name] = {"ms_per_step": 1000 * sec, "tokens_per_s": n_tokens / sec, "mfu": flops * n_tokens / sec / peak}
        table.add_row(name, f"{1000 * sec:.1f}", f"{n_tokens / sec:,.0f}", f"{100 * result[name]['mfu']:.1f}%")
    result["ratio"] = result["nanoseek"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    console.print(table)
    console.print(
        f"nanoseek / transformers: [bold]{result['ratio']:.2f}x[/bold]; nanoseek MFU "
        f"{100 * result['nanoseek']['mfu']:.1f}% of a measured fp32 matmul peak of {peak / 1e9:.1f} GFLOP/s "
        f"({flops / 1e6:.1f} MFLOP per token)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
