"""`nanoseek cost`: what training and serving a model costs, in FLOPs, GPU-hours and dollars.

    nanoseek cost --preset v3                         # DeepSeek-V3's reported run, reproduced
    nanoseek cost --preset r1-distill-qwen-7b --tokens 1T --gpu h100 --mfu 0.4
    nanoseek cost --model runs/demo/r1-zero --tokens 4M --context 512

Training FLOPs per token, as PaLM counts them for MFU (Chowdhery et al. 2022, appendix B):

    6 * N_active  +  3 * 2 * L * H * (d_qk + d_v) * T

- N_active: the weights that multiply each token. MoE models: `count_parameters`' "active" (the
  attention, the dense FFNs, the shared and the k chosen routed experts, the norms and the output
  head; not the embedding, a lookup), plus each MTP module's (its eh_proj, its block with k routed
  experts, and the shared output head it runs once more). Dense models: every weight but the
  embedding (a tied embedding is the head: it counts). 6 = 2 (a multiply and an add) x 3 (the
  forward matmul and the backward's two, for the input's gradient and the weight's).
- Attention: per layer and token, the scores q.k over T positions (2 * H * d_qk * T) and the sum
  of the values (2 * H * d_v * T), forward; x3 with the backward. MLA trains in its naive form, so
  d_qk = qk_nope_head_dim + qk_rope_head_dim (192 in V3) and d_v = v_head_dim (128); dense models
  have d_qk = d_v = head_dim (GQA shares keys, not the query heads' work). L counts the MTP
  modules' blocks. T is the whole sequence: PaLM's convention does not halve it for the causal
  mask (FlashAttention skips the masked half, so a kernel does about half this attention work).
- Forward only (generation, a reference model's log-probs): 2 * N_active plus one third of the
  attention term; no MTP module runs.

GPU-hours = FLOPs / (peak x MFU x 3600); dollars = GPU-hours x the price per GPU-hour.

Serving: a decode step reads every weight (at large batch every expert is chosen by some token)
and every sequence's KV cache; the roofline step time is the larger of those bytes over the
memory bandwidth and the step's FLOPs (2 N_active + the attention over the cache per token) over
the peak. Dollars per million output tokens = price x GPUs / (output tokens per second x 3600) x 1e6,
at the roofline bound and at a measured or published throughput (`--decode-tps`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

from nanoseek.errors import NanoseekError


# ---------------------------------------------------------------------------------------
# GPUs: dense peaks (the spec sheets' "with sparsity" numbers are twice these), memory, bandwidth.
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPU:
    name: str
    bf16: float  # dense BF16 tensor-core FLOP/s
    fp8: float | None  # dense FP8 tensor-core FLOP/s; None: no FP8 tensor cores
    memory: float  # bytes of HBM
    bandwidth: float  # HBM bytes per second

    def peak(self, precision: str) -> float:
        if precision == "fp8" and self.fp8 is None:
            raise NanoseekError(f"--precision fp8: the {self.name} has no FP8 tensor cores (use bf16)")
        return self.fp8 if precision == "fp8" else self.bf16


GPUS = {
    # NVIDIA H100 datasheet, SXM5: BF16 1,979 and FP8 3,958 TFLOPS with 2:4 sparsity, half that
    # dense; 80 GB HBM3 at 3.35 TB/s. The H800 SXM5 is the same chip and memory with NVLink cut to
    # 400 GB/s (DeepSeek-V3 section 3.1 trains on it): the same peaks.
    "h800": GPU("H800 SXM5", bf16=989.4e12, fp8=1978.9e12, memory=80e9, bandwidth=3.35e12),
    "h100": GPU("H100 SXM5", bf16=989.4e12, fp8=1978.9e12, memory=80e9, bandwidth=3.35e12),
    # NVIDIA A100 datasheet, SXM4 80GB: BF16 312 TFLOPS dense (624 with sparsity), no FP8;
    # 80 GB HBM2e at 2,039 GB/s.
    "a100": GPU("A100 SXM4 80GB", bf16=312e12, fp8=None, memory=80e9, bandwidth=2.039e12),
}
PRECISIONS = ("bf16", "fp8")
GPUS_PER_NODE = 8  # an HGX / DGX node
DEFAULT_MFU = 0.4
DEFAULT_PRICE = 2.0  # $ per GPU-hour: DeepSeek-V3's rental assumption for the H800
# What the report cards assume when they price a run's FLOPs on a rented GPU.
RENTED = {"gpu": "h100", "precision": "bf16", "mfu": 0.4, "price": 2.0}


def gpu(name: str) -> GPU:
    if name not in GPUS:
        raise NanoseekError(f"--gpu {name!r}: unknown GPU (choose from {', '.join(GPUS)})")
    return GPUS[name]


# ---------------------------------------------------------------------------------------
# FLOPs per token.
# ---------------------------------------------------------------------------------------
_ACTIVE: dict[str, dict[str, int]] = {}  # counting builds blocks on the meta device: once per config


def active_parameters(config) -> dict[str, int]:
    """{"main": weights that multiply each token in the model, "mtp": in its MTP modules, "embedding":
    the embedding table (not counted in either)}; see the module's docstring."""
    from nanoseek.dense import DenseConfig, count_dense_parameters

    key = f"{type(config).__name__}:{json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)}"
    if key in _ACTIVE:
        return _ACTIVE[key]
    embedding = config.vocab_size * config.hidden_size
    if isinstance(config, DenseConfig):
        total = count_dense_parameters(config)
        found = {"main": total if config.tie_word_embeddings else total - embedding, "mtp": 0}
    else:
        from nanoseek.model import count_parameters

        c, n = config, config.num_hidden_layers
        counts = count_parameters(c)
        main = counts["active"] + (embedding if c.tie_word_embeddings else 0)  # a tied head still multiplies
        per_expert = 3 * c.hidden_size * c.moe_intermediate_size
        depths = range(c.num_nextn_predict_layers)
        idle = sum((c.n_routed_experts - c.num_experts_per_tok) * per_expert for k in depths if c.is_moe_layer(n + k))
        mtp = counts["total_with_mtp"] - counts["total"] - idle + len(depths) * embedding  # + the shared head per depth
        found = {"main": main, "mtp": mtp}
    found["embedding"] = embedding
    _ACTIVE[key] = found
    return found


def attention_width(config) -> int:
    """H * (d_qk + d_v): the attention FLOPs per layer, token and position are twice this."""
    from nanoseek.dense import DenseConfig

    if isinstance(config, DenseConfig):
        return config.num_attention_heads * 2 * config.head_dim
    return config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)


def mtp_depth(config) -> int:
    return getattr(config, "num_nextn_predict_layers", 0)


def flops_per_token(config, seq_len: int, mtp: bool = True, backward: bool = True) -> float:
    """Training FLOPs per token at sequence length `seq_len` (with `backward`), or forward only;
    `mtp`: the MTP modules run (training with their loss). See the module's docstring."""
    p = active_parameters(config)
    depth = mtp_depth(config) if mtp and backward else 0
    params = p["main"] + (p["mtp"] if depth else 0)
    layers = config.num_hidden_layers + depth
    passes = 3 if backward else 1
    return passes * (2 * params + 2 * layers * attention_width(config) * seq_len)


def decode_flops_per_token(config, context: int) -> float:
    """One decoded token with `context` tokens cached: 2 N_active and the attention over the cache.
    MLA decodes absorbed (DeepSeek-V2 section 2.1.3): scores over kv_lora_rank + qk_rope_head_dim
    latent values per head, the sum over kv_lora_rank; dense models as in training."""
    from nanoseek.dense import DenseConfig

    p = active_parameters(config)
    c = config
    if isinstance(c, DenseConfig):
        width = attention_width(c)
    else:
        width = c.num_attention_heads * (2 * c.kv_lora_rank + c.qk_rope_head_dim)
    return 2 * p["main"] + 2 * c.num_hidden_layers * width * context


def grpo_step_flops(
    config, prompt_lens: list[int], completion_lens: list[list[int]], kept: list[int], train_passes: int, forwards: int
) -> float:
    """FLOPs of one GRPO step. Generation: each prompt prefilled once and each completion token
    decoded, forward FLOPs (2N and the attention over the sample's whole length). Training, on the
    kept groups: their prompts (once per group, as completion_logprobs runs them) and completions,
    training FLOPs per pass (mu), and forward FLOPs for each extra forward (`forwards`: the old
    policy's log-probs when mu > 1, the reference model's when beta > 0). Padding is not counted.
    Approximation: a micro-batch that splits a group runs its prompt once more; not counted."""
    total = 0.0
    kept_set = set(kept)
    for g, (p, comps) in enumerate(zip(prompt_lens, completion_lens)):

        def run(backward: bool) -> float:
            prompt = p * flops_per_token(config, p, mtp=False, backward=backward)
            return prompt + sum(n * flops_per_token(config, p + n, mtp=False, backward=backward) for n in comps)

        forward = run(False)
        total += forward
        if g in kept_set:
            total += train_passes * run(True) + forwards * forward
    return total


def gpu_hours(flops: float, device: GPU, precision: str, mfu: float) -> float:
    return flops / (device.peak(precision) * mfu * 3600)


def rented(flops: float, gpu_name: str = RENTED["gpu"], precision: str = RENTED["precision"], mfu=RENTED["mfu"]):
    """(GPU-seconds, dollars at RENTED's price) of `flops` on a rented GPU at `mfu`."""
    hours = gpu_hours(flops, gpu(gpu_name), precision, mfu)
    return hours * 3600, hours * RENTED["price"]


# ---------------------------------------------------------------------------------------
# DeepSeek-V3's reported run (DeepSeek-V3 Technical Report, Table 1 and sections 3.1, 4.3).
# ---------------------------------------------------------------------------------------
V3_PRETRAIN_TOKENS = 14.8e12
V3_SEQ_LEN = 4096
V3_HOURS_PER_TRILLION = 180e3  # "180K H800 GPU hours" per trillion tokens, on 2,048 H800s
# Context extension: two phases of 1000 steps each, 32K tokens x 1920 sequences, then 128K x 480.
V3_CONTEXT_PHASES = (("32K", 32 * 1024, 1920, 1000), ("128K", 128 * 1024, 480, 1000))
V3_REPORTED = {"pretraining": 2664e3, "context extension": 119e3, "post-training": 5e3, "total": 2788e3}
V3_REPORTED_DOLLARS = 5.576e6
V3_EXCLUDES = (
    "The paper's figure is the final run only: not the research and ablation runs before it (on "
    "architectures, algorithms and data), the data's collection and cleaning, the staff, the cluster's "
    "purchase, nor R1's reinforcement learning."
)
# DeepSeek's serving (Open Source Week day 6, 2025: "DeepSeek-V3/R1 Inference System Overview").
V3_DECODE_TPS_PER_NODE = 14.8e3
V3_DECODE_GPUS = 144  # one decode unit: 18 nodes, routed experts EP144
V3_SERVICE = {"nodes": 226.75, "cost_per_day": 87072, "input": 608e9, "cache_hit": 0.563, "output": 168e9}
LIST_PRICES = {"V3": (0.07, 0.27, 1.10), "R1": (0.14, 0.55, 2.19)}  # $ per M tokens: cache hit, miss, output


def v3_training(config, mfu: float | None, precision: str, price: float) -> dict:
    """The rows of V3's run, computed: pretraining on 14.8T tokens at 4K, the two context-extension
    phases, post-training as reported (the paper gives its GPU-hours, not its tokens). Without `mfu`,
    the MFU is the one the paper's 180K GPU-hours per trillion tokens imply; the pretraining row then
    agrees by construction and the others test the FLOPs count."""
    h800 = GPUS["h800"]
    per_token = flops_per_token(config, V3_SEQ_LEN)
    implied = per_token * 1e12 / (V3_HOURS_PER_TRILLION * 3600 * h800.peak(precision))
    fitted = mfu is None
    mfu = implied if fitted else mfu
    phases = [("pretraining", V3_PRETRAIN_TOKENS, V3_SEQ_LEN)]
    phases += [(f"context extension {n}", steps * batch * seq, seq) for n, seq, batch, steps in V3_CONTEXT_PHASES]
    rows = []
    for name, tokens, seq in phases:
        flops = tokens * flops_per_token(config, seq)
        rows.append({"phase": name, "tokens": tokens, "seq_len": seq, "flops": flops})
        rows[-1]["hours"] = gpu_hours(flops, h800, precision, mfu)
    context = [r for r in rows if r["phase"].startswith("context")]
    # The same phases with the attention halved for the causal mask, to show what the convention does.
    halved = sum(
        r["tokens"] * (flops_per_token(config, r["seq_len"]) - 3 * attention_share(config, r["seq_len"]) / 2)
        for r in context
    )
    computed = {
        "pretraining": rows[0]["hours"],
        "context extension": sum(r["hours"] for r in context),
        "post-training": V3_REPORTED["post-training"],
    }
    computed["total"] = sum(computed.values())
    return {
        "rows": rows,
        "computed": computed,
        "reported": V3_REPORTED,
        "dollars": computed["total"] * price,
        "reported_dollars": V3_REPORTED_DOLLARS,
        "price": price,
        "mfu": mfu,
        "mfu_fitted": fitted,
        "implied_mfu": implied,
        "precision": precision,
        "flops_per_token": per_token,
        "context_hours_causal": gpu_hours(halved, h800, precision, mfu),
    }


def attention_share(config, seq_len: int, mtp: bool = True) -> float:
    """The forward attention FLOPs per token of flops_per_token (a third of its training term)."""
    layers = config.num_hidden_layers + (mtp_depth(config) if mtp else 0)
    return 2 * layers * attention_width(config) * seq_len


# ---------------------------------------------------------------------------------------
# Serving.
# ---------------------------------------------------------------------------------------
MEMORY_FOR_CACHE = 0.9  # of each GPU's memory, less the weights: the rest is activations and the runtime
MAX_BATCH = 256  # sequences per GPU when --batch is not given and more would fit


def kv_bytes_per_token(config) -> int:
    """The KV cache per token in bf16: MLA's latent and RoPE key, or a dense model's keys and values."""
    from nanoseek.dense import DenseConfig, KVCache
    from nanoseek.model import kv_cache_bytes_per_token

    if isinstance(config, DenseConfig):
        return KVCache.bytes_per_token(config, 2)
    return kv_cache_bytes_per_token(config, 2)["mla"]


def total_parameters(config) -> int:
    from nanoseek.dense import DenseConfig, count_dense_parameters
    from nanoseek.model import count_parameters

    return count_dense_parameters(config) if isinstance(config, DenseConfig) else count_parameters(config)["total"]


def serving(
    config, device: GPU, precision: str, price: float, context: int, gpus: int | None, batch: int | None
) -> dict:
    """Decode on `gpus` GPUs (weights spread over them, each sequence's cache on one GPU) at
    `context` tokens per sequence: the sequences that fit, the roofline step and its throughput."""
    weight_bytes = total_parameters(config) * (1 if precision == "fp8" else 2)
    if gpus is None:  # the fewest of 1, 2, 4, 8, 16, ... GPUs whose memory the weights fill at most half
        gpus = 1
        while weight_bytes > 0.5 * gpus * device.memory:
            gpus *= 2
    free = MEMORY_FOR_CACHE * device.memory - weight_bytes / gpus
    if free <= 0:
        raise NanoseekError(
            f"--gpus {gpus}: the weights ({weight_bytes / 1e9:.1f} GB in {precision}) leave no memory for the "
            f"KV cache on {gpus} x {device.memory / 1e9:.0f} GB"
        )
    kv = kv_bytes_per_token(config)
    per_sequence = kv * context
    fits = int(free // per_sequence)
    if fits < 1:
        raise NanoseekError(f"--context {context}: one sequence's cache ({per_sequence / 1e9:.1f} GB) does not fit")
    if batch is not None and batch > fits:
        raise NanoseekError(f"--batch {batch}: only {fits} sequences of {context} tokens fit per GPU")
    batch = batch or min(fits, MAX_BATCH)
    memory_s = (weight_bytes / gpus + batch * per_sequence) / device.bandwidth
    compute_s = batch * decode_flops_per_token(config, context) / device.peak(precision)
    step = max(memory_s, compute_s)
    per_gpu = batch / step
    return {
        "gpus": gpus,
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv,
        "context": context,
        "fits": fits,
        "batch": batch,
        "memory_ms": 1e3 * memory_s,
        "compute_ms": 1e3 * compute_s,
        "bound": "memory" if memory_s >= compute_s else "compute",
        "roofline_tps_per_gpu": per_gpu,
        "price": price,
    }


def dollars_per_million(tps_per_gpu: float, price: float) -> float:
    return price / (tps_per_gpu * 3600) * 1e6


# ---------------------------------------------------------------------------------------
# The report cards: a run's FLOPs, its seconds here and the same FLOPs on a rented GPU.
# ---------------------------------------------------------------------------------------
def run_costs(runs: list[tuple[str, Path]]) -> list[dict]:
    """A row per run directory with a summary.json: its tokens, FLOPs and seconds, the FLOP/s it
    reached here, and what the FLOPs cost on RENTED's GPU. A run of an older nanoseek (no flops in
    its summary) gets None there."""
    rows = []
    for name, directory in runs:
        path = Path(directory) / "summary.json"
        if not path.is_file():
            continue
        summary = json.loads(path.read_text(encoding="utf-8"))
        flops, seconds = summary.get("flops"), summary.get("seconds")
        row = {"run": name, "tokens": summary.get("tokens"), "flops": flops, "seconds": seconds}
        row["flops_per_s"] = flops / seconds if flops and seconds else None
        row["rented_seconds"], row["rented_dollars"] = rented(flops) if flops is not None else (None, None)
        rows.append(row)
    return rows


def cost_markdown(rows: list[dict]) -> list[str]:
    """The report cards' "Cost" section."""
    if not rows:
        return []
    r = RENTED
    dev = GPUS[r["gpu"]]
    lines = [
        "## Cost",
        "",
        f"FLOPs per token as `nanoseek cost` counts them (6 x active parameters plus attention; GRPO: 2N per "
        f"generated token, 6N per trained one); the rented column prices the same FLOPs on an {dev.name} at "
        f"{r['mfu']:.0%} MFU of its dense {r['precision'].upper()} peak ({dev.peak(r['precision']) / 1e12:,.0f} "
        f"TFLOP/s), ${r['price']:g} per GPU-hour. Seconds here: the training loop's wall seconds on this machine. "
        "Evaluation, sampling for data and exports are not counted.",
        "",
        "| run | tokens | FLOPs | seconds here | FLOP/s here | rented GPU-seconds | rented $ |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def num(v, fmt=sci):
        return "n/a" if v is None else fmt(v)

    for row in rows:
        cells = [num(row["tokens"], "{:,}".format), num(row["flops"]), num(row["seconds"], "{:.0f}".format)]
        cells += [num(row["flops_per_s"]), num(row["rented_seconds"]), num(row["rented_dollars"])]
        lines.append(f"| {row['run']} | " + " | ".join(cells) + " |")
    known = [row for row in rows if row["flops"] is not None]
    if known:
        flops = sum(row["flops"] for row in known)
        seconds = sum(row["seconds"] or 0 for row in known)
        gpu_s, dollars = rented(flops)
        lines.append(f"| **all** | | {sci(flops)} | {seconds:.0f} | | {sci(gpu_s)} | {sci(dollars)} |")
    return [*lines, ""]


# ---------------------------------------------------------------------------------------
# `nanoseek cost`.
# ---------------------------------------------------------------------------------------
WIDTH = 100  # longer lines of prose are wrapped
SUFFIXES = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(text: str, option: str) -> float:
    """14.8T, 62.9B, 4M, 1e9, 1000000: a count of at least 0."""
    m = re.fullmatch(r"\s*([-+]?[0-9.]+(?:e[-+]?[0-9]+)?)\s*([KMBGT]?)\s*", str(text), re.IGNORECASE)
    try:
        value = float(m.group(1)) * SUFFIXES[m.group(2).upper()] if m else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise NanoseekError(f"{option} {text!r}: expected a count of at least 0 (e.g. 14.8T, 2B, 1e9)")
    return value


def register(sub) -> None:
    p = sub.add_parser(
        "cost",
        help="training FLOPs, GPU-hours and dollars, and serving $ per million tokens; "
        "`--preset v3` reproduces DeepSeek-V3's 2.788M H800 GPU-hours",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", help="a nanoseek preset (tiny, small, v2-lite, v3) or a dense one (r1-distill-...)")
    g.add_argument("--model", help="a model directory (its config.json: DeepSeek-V3/V2, Qwen2 or Llama)")
    p.add_argument("--tokens", help="training tokens (e.g. 14.8T, 2B); not given with --preset v3: V3's reported run")
    p.add_argument("--seq-len", type=int, default=4096, help="training sequence length (default 4096)")
    p.add_argument("--gpu", default="h800", help=f"one of {', '.join(GPUS)} (default h800)")
    p.add_argument("--precision", help="bf16 or fp8: the peak the MFU is taken against (default bf16; V3's run: fp8)")
    p.add_argument(
        "--mfu", type=float, help=f"model FLOPs utilisation in (0, 1] (default {DEFAULT_MFU}; V3's: implied)"
    )
    p.add_argument("--price", type=float, default=DEFAULT_PRICE, help="$ per GPU-hour (default 2)")
    s = p.add_argument_group("serving")
    s.add_argument("--context", type=int, default=4096, help="tokens cached per sequence when decoding (default 4096)")
    s.add_argument("--gpus", type=int, help="GPUs the model is served on (default: V3 144, DeepSeek's decode unit)")
    s.add_argument("--batch", type=int, help=f"sequences per GPU (default: as many as fit, at most {MAX_BATCH})")
    s.add_argument("--decode-tps", help="measured output tokens per second per 8-GPU node (V3's default: 14.8K)")
    p.set_defaults(func=run_cost)


def load_config(args):
    from nanoseek.config import PRESETS, ModelConfig
    from nanoseek.dense import DENSE_PRESETS, DenseConfig

    if args.preset is not None:
        if args.preset in PRESETS:
            return ModelConfig.preset(args.preset)
        if args.preset in DENSE_PRESETS:
            return DenseConfig.preset(args.preset)
        raise NanoseekError(
            f"--preset {args.preset!r}: unknown preset (choose from {', '.join([*PRESETS, *DENSE_PRESETS])})"
        )
    from nanoseek.io.dense_hf import is_dense_checkpoint

    path = Path(args.model)
    if not (path / "config.json").is_file():
        raise NanoseekError(f"--model {path}: no config.json there")
    return DenseConfig.from_hf(path) if is_dense_checkpoint(path) else ModelConfig.from_hf(path / "config.json")


def check_args(args) -> None:
    gpu(args.gpu)
    if args.precision is not None and args.precision not in PRECISIONS:
        raise NanoseekError(f"--precision {args.precision!r}: expected bf16 or fp8")
    if args.mfu is not None and not (0 < args.mfu <= 1):
        raise NanoseekError(f"--mfu {args.mfu:g}: must be in (0, 1] (a share of the GPU's peak)")
    if not (math.isfinite(args.price) and args.price >= 0):
        raise NanoseekError(f"--price {args.price:g}: must be a number of dollars of at least 0")
    for name in ("seq_len", "context", "gpus", "batch"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise NanoseekError(f"--{name.replace('_', '-')} {v}: must be at least 1")


def run_cost(args) -> int:
    check_args(args)
    config = load_config(args)
    name = args.preset or args.model
    v3_table = args.preset == "v3" and args.tokens is None
    if v3_table and args.gpu != "h800":
        raise NanoseekError(f"--gpu {args.gpu}: V3's reported run is on H800s (give --tokens to cost V3 elsewhere)")
    precision = args.precision or ("fp8" if v3_table else "bf16")
    device = gpu(args.gpu)
    device.peak(precision)  # an A100 in fp8: the error first
    tokens = None if v3_table else parse_count(args.tokens or "0", "--tokens")
    decode_tps = None if args.decode_tps is None else parse_count(args.decode_tps, "--decode-tps")
    if decode_tps == 0:
        raise NanoseekError("--decode-tps 0: a throughput must be above 0")
    if v3_table:
        lines = v3_lines(config, v3_training(config, args.mfu, precision, args.price))
    else:
        lines = training_lines(config, tokens, args.seq_len, device, precision, args.mfu or DEFAULT_MFU, args.price)
    gpus = args.gpus or (V3_DECODE_GPUS if args.preset == "v3" else None)
    source = "given (--decode-tps)"
    if args.preset == "v3" and decode_tps is None:
        decode_tps, source = V3_DECODE_TPS_PER_NODE, "DeepSeek's published decode throughput"
    s = serving(config, device, precision, args.price, args.context, gpus, args.batch)  # its errors before any line
    lines += serving_lines(config, s, device, precision, decode_tps, source, args.preset == "v3")
    for line in [describe(config, name), *lines]:  # the tables' rows are shorter than WIDTH
        print("\n".join(textwrap.wrap(line, WIDTH, subsequent_indent="  ")) if len(line) > WIDTH else line)
    return 0


# ---------------------------------------------------------------------------------------
# What it prints.
# ---------------------------------------------------------------------------------------
def count(n: float) -> str:
    """14.8T, 62.9B, 36.63B, 688.6K: three significant digits or more."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}" if n / size < 100 else f"{n / size:,.1f}{unit}"
    return f"{n:g}"


def hours(h: float) -> str:
    return f"{h / 1e3:,.1f}K" if h >= 1e3 else f"{h:.3g}"


def sci(x: float) -> str:
    """4.32e24 and 2.92e7, not 4.32e+24 and 2.92e+07."""
    return re.sub(r"e\+?0*(\d)", r"e\1", f"{x:.3g}")


def money(d: float) -> str:
    if d >= 1e6:
        return f"${d / 1e6:,.3f}M"
    return f"${d:,.0f}" if d >= 100 else f"${d:.2f}" if d >= 0.01 else f"${d:.2g}"


def per_million(d: float) -> str:
    return f"{d:.3f}" if d >= 0.01 else f"{d:.2g}"


def size(b: float) -> str:
    return f"{b / 1e9:,.1f} GB" if b >= 1e9 else f"{b / 1e6:,.1f} MB" if b >= 1e6 else f"{b / 1e3:,.1f} KB"


def describe(config, name: str) -> str:
    p = active_parameters(config)
    depth = mtp_depth(config)
    mtp = f" + {count(p['mtp'])} in {depth} MTP module{'s' if depth > 1 else ''}" if p["mtp"] else ""
    return (
        f"{name}: {count(total_parameters(config))} parameters, {count(p['main'])} active per token{mtp} "
        f"(not counting the {count(p['embedding'])} embedding lookup)"
    )


def per_token_line(config, seq_len: int) -> str:
    p = active_parameters(config)
    params = p["main"] + p["mtp"]
    attention = 3 * attention_share(config, seq_len)
    return (
        f"FLOPs per training token at {seq_len:,} tokens a sequence: 6 x {count(params)} + attention "
        f"{count(attention)} = {sci(flops_per_token(config, seq_len))} FLOPs"
    )


def training_lines(config, tokens, seq_len, device, precision, mfu, price) -> list[str]:
    flops = tokens * flops_per_token(config, seq_len)
    h = gpu_hours(flops, device, precision, mfu)
    peak = device.peak(precision)
    return [
        per_token_line(config, seq_len),
        f"training on {count(tokens)} tokens: {sci(flops)} FLOPs; on {device.name} at {mfu:.1%} MFU of its dense "
        f"{precision.upper()} peak ({peak / 1e12:,.0f} TFLOP/s): {hours(h)} GPU-hours, {money(h * price)} at "
        f"${price:g}/GPU-hour ({h / 24 / GPUS_PER_NODE:,.3g} days on one {GPUS_PER_NODE}-GPU node)",
        "",
    ]


def v3_lines(config, t: dict) -> list[str]:
    h800 = GPUS["h800"]
    peak = h800.peak(t["precision"])
    other = "bf16" if t["precision"] == "fp8" else "fp8"
    rate = t["mfu"] * peak
    how = (
        "the rate the paper's 180K H800 GPU-hours per trillion tokens imply"
        if t["mfu_fitted"]
        else f"given (the paper implies {t['implied_mfu']:.1%})"
    )
    rep, comp = t["reported"], t["computed"]
    pre, *context = t["rows"]
    reported_dollars = t["reported_dollars"] * t["price"] / DEFAULT_PRICE

    def ratio(a, b):
        return f"{a / b:.2f}" if b else ""

    def phase(r):
        return count(r["tokens"]), f"{r['seq_len'] // 1024}K", sci(r["flops"])

    table = [  # phase, tokens, seq len, FLOPs, reported, computed, ratio, note
        ("phase", "tokens", "seq len", "FLOPs", "reported", "computed", "ratio", ""),
        (
            "pretraining",
            *phase(pre),
            hours(rep["pretraining"]),
            hours(comp["pretraining"]),
            ratio(comp["pretraining"], rep["pretraining"]),
            "(MFU fitted)" if t["mfu_fitted"] else "",
        ),
        *(
            (f"  {steps} steps x {batch} x {n}", *phase(r), "", hours(r["hours"]), "", "")
            for r, (n, _, batch, steps) in zip(context, V3_CONTEXT_PHASES)
        ),
        (
            "context extension",
            count(sum(r["tokens"] for r in context)),
            "",
            "",
            hours(rep["context extension"]),
            hours(comp["context extension"]),
            ratio(comp["context extension"], rep["context extension"]),
            "",
        ),
        ("post-training (SFT, RL)", "", "", "", hours(rep["post-training"]), hours(comp["post-training"]), "", ""),
        ("total H800 GPU-hours", "", "", "", hours(rep["total"]), hours(comp["total"]), "", ""),
        (f"dollars at ${t['price']:g}/GPU-hour", "", "", "", money(reported_dollars), money(t["dollars"]), "", ""),
    ]
    table[-3] = (*table[-3][:7], "(as reported)")
    table[-2] = (*table[-2][:6], ratio(comp["total"], rep["total"]), "")
    table[-1] = (*table[-1][:6], ratio(t["dollars"], reported_dollars), "")
    widths = (26, 9, 9, 10, 11, 11, 7)
    lines = [
        per_token_line(config, V3_SEQ_LEN),
        f"DeepSeek-V3's training run (technical report, Table 1) on {h800.name}s, dense {t['precision'].upper()} "
        f"peak {peak / 1e12:,.0f} TFLOP/s:",
        f"MFU {t['mfu']:.1%} of the {t['precision'].upper()} peak = {rate / h800.peak(other):.1%} of the "
        f"{other.upper()} peak ({rate / 1e12:,.0f} TFLOP/s a GPU): {how}",
        "",
    ]
    for cells in table:
        line = cells[0].ljust(widths[0]) + "".join(c.rjust(w) for c, w in zip(cells[1:7], widths[1:]))
        lines.append(f"{line}  {cells[7]}".rstrip())
    lines += [
        "",
        "Post-training is taken as reported: the paper gives its hours, not its tokens.",
        f"Attention is counted over the whole sequence (PaLM's MFU convention); halved for the causal mask, "
        f"context extension would come to {hours(t['context_hours_causal'])} GPU-hours "
        f"({t['context_hours_causal'] / rep['context extension']:.2f} of the reported).",
        V3_EXCLUDES,
        "",
    ]
    return lines


def serving_lines(config, s: dict, device: GPU, precision: str, decode_tps, source: str, v3: bool) -> list[str]:
    from nanoseek.dense import DenseConfig

    kv = s["kv_bytes_per_token"]
    if isinstance(config, DenseConfig):
        cache = f"{kv:,} bytes per token (keys and values of {config.num_key_value_heads} KV heads, bf16)"
    else:
        from nanoseek.model import kv_cache_bytes_per_token

        mha = kv_cache_bytes_per_token(config, 2)["mha"]
        cache = (
            f"{kv:,} bytes per token (MLA's latent and RoPE key, bf16; standard attention with the same heads: "
            f"{mha:,}, {mha / kv:.0f}x)"
        )
    nodes = s["gpus"] / GPUS_PER_NODE
    unit = f"{s['gpus']} GPU{'s' if s['gpus'] > 1 else ''}" + (
        f" ({nodes:g} nodes)" if nodes >= 1 and nodes == int(nodes) else ""
    )
    roof_node = s["roofline_tps_per_gpu"] * GPUS_PER_NODE
    lines = [
        f"Serving (decode) on {unit} of {device.name}, {precision.upper()} weights "
        f"({size(s['weight_bytes'])}, {size(s['weight_bytes'] / s['gpus'])} per GPU)",
        f"KV cache: {cache}",
        f"{s['context']:,} tokens cached per sequence: {size(kv * s['context'])}; {s['fits']:,} sequences "
        f"fit per GPU in {MEMORY_FOR_CACHE:.0%} of its {device.memory / 1e9:.0f} GB less the weights; batch "
        f"{s['batch']:,} per GPU",
        f"roofline decode step: reading weights and caches {s['memory_ms']:.3g} ms at "
        f"{device.bandwidth / 1e12:.2f} TB/s, computing {s['compute_ms']:.3g} ms at the {precision.upper()} peak: "
        f"{s['bound']}-bound, {s['roofline_tps_per_gpu']:,.0f} output tokens/s per GPU",
        "",
        f"{'$ per million output tokens at $' + format(s['price'], 'g') + '/GPU-hour':<52}{'tok/s per node':>15}"
        f"{'$/M':>9}",
        f"{'  roofline bound (an ideal engine)':<52}{roof_node:>15,.0f}"
        f"{per_million(dollars_per_million(s['roofline_tps_per_gpu'], s['price'])):>9}",
    ]
    if decode_tps is not None:
        lines.append(
            f"{'  ' + source:<52}{decode_tps:>15,.0f}"
            f"{per_million(dollars_per_million(decode_tps / GPUS_PER_NODE, s['price'])):>9}"
            f"  ({decode_tps / roof_node:.0%} of bound)"
        )
    if v3:
        sv = V3_SERVICE
        cost = sv["nodes"] * GPUS_PER_NODE * DEFAULT_PRICE * 24
        hit, miss, output = LIST_PRICES["R1"]
        v3_price, r1_price = LIST_PRICES["V3"][2], output
        revenue = (sv["input"] * (sv["cache_hit"] * hit + (1 - sv["cache_hit"]) * miss) + sv["output"] * output) / 1e6
        lines += [
            f"{'  DeepSeek service over a day, prefill included':<52}{'':>15}{cost / sv['output'] * 1e6:>9.3f}",
            f"{'  list prices: V3 / R1':<52}{f'{v3_price:.2f} / {r1_price:.2f}':>24}",
            "",
            f"DeepSeek's service, one day of 2025: {sv['nodes']:g} H800 nodes x 8 GPUs x $2 x 24 h = ${cost:,.0f} "
            f"(published: ${sv['cost_per_day']:,}) for {count(sv['input'])} input tokens ({sv['cache_hit']:.1%} "
            f"cache hits) and {count(sv['output'])} output tokens; at R1's list prices (${hit} / ${miss} per M input "
            f"tokens, hit / miss, ${output} per M output) they bring ${revenue:,.0f}, {revenue / cost - 1:.0%} over "
            "the cost (published: $562,027, 545%).",
        ]
    return lines
