"""The dense students: DeepSeek-R1's distilled models, in the Qwen2 and Llama layouts.

DeepSeek-R1 (section 2.4, "Distillation") fine-tunes dense models on 800K samples written by R1:
Qwen2.5-Math-1.5B/7B, Qwen2.5-14B/32B (transformers' `Qwen2ForCausalLM`), Llama-3.1-8B and
Llama-3.3-70B-Instruct (`LlamaForCausalLM`). Both are the same decoder: RMSNorm, rotary positions
(Llama 3 stretches the long wavelengths, `rope_scaling` of type `llama3`), grouped-query attention
(Qwen2 with biases on q, k and v), a SwiGLU MLP. Read top to bottom: DenseConfig and its presets,
RotaryEmbedding, Attention, MLP, DecoderLayer, DenseTransformer, count_dense_parameters.

Parameter names are the Hugging Face state dict's (`model.layers.0.self_attn.q_proj.weight`, ...),
so a checkpoint loads as a plain state-dict copy (nanoseek.io.dense_hf).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfigError, _finite, read_json_object
from nanoseek.errors import NanoseekError
from nanoseek.model import RMSNorm, apply_rope

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
# config.json fields without which the weights' shapes are a guess (transformers writes them all).
REQUIRED_HF = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class DenseConfig:
    # Field names are those of the HF `config.json` of Qwen2ForCausalLM / LlamaForCausalLM.
    model_type: str = "qwen2"  # "qwen2": q/k/v biases, always; "llama": biases per attention_bias
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int | None = 2  # None: one KV head per query head (as transformers reads it)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3.1: {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # llama only: biases on q, k, v and o
    mlp_bias: bool = False  # llama only
    use_sliding_window: bool = False  # qwen2 only; the R1-Distill models attend to the whole context
    initializer_range: float = 0.02
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151643
    pad_token_id: int | None = None

    def __post_init__(self):
        self.validate()
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            rs["rope_type"] = rs.pop("type", None) or rs.get("rope_type")
            self.rope_scaling = None if rs["rope_type"] == "default" else rs

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type == "llama" and self.attention_bias

    def validate(self) -> None:
        def bad(field, detail):
            raise ModelConfigError(field, detail)

        def integer(name, low=1):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                kind = "a positive integer" if low == 1 else f"an integer of at least {low}"
                bad(name, f"{name} must be {kind}, got {v!r}")

        def number(name, above_zero=True):
            v = getattr(self, name)
            if not _finite(v) or v < 0 or (above_zero and v == 0):
                bad(name, f"{name} must be a finite number {'above' if above_zero else 'at least'} 0, got {v!r}")

        if self.model_type not in ARCHITECTURES.values():
            bad("model_type", f"model_type '{self.model_type}' (expected qwen2 or llama)")
        if self.hidden_act != "silu":
            bad("hidden_act", f"hidden_act '{self.hidden_act}' (only silu is supported)")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            integer(name)
        for name in ("num_key_value_heads", "head_dim"):
            if getattr(self, name) is not None:
                integer(name)
        heads, kv = self.num_attention_heads, self.num_key_value_heads or self.num_attention_heads
        if heads % kv:
            bad("num_key_value_heads", f"num_key_value_heads {kv} must divide num_attention_heads {heads}")
        if self.head_dim is None and self.hidden_size % heads:
            bad("head_dim", f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {heads}")
        if (self.head_dim or self.hidden_size // heads) % 2:
            bad("head_dim", f"head_dim must be even (rotary pairs), got {self.head_dim or self.hidden_size // heads}")
        number("rope_theta")
        number("rms_norm_eps", above_zero=False)
        number("initializer_range", above_zero=False)
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window"):
            if not isinstance(getattr(self, name), bool):
                bad(name, f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.model_type == "qwen2" and (self.attention_bias or self.mlp_bias):
            name = "attention_bias" if self.attention_bias else "mlp_bias"
            bad(name, f"{name} is a llama field: qwen2 always has q/k/v biases and none elsewhere")
        if self.use_sliding_window:
            bad("use_sliding_window", "use_sliding_window true is not supported (every layer attends to all)")
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                bad(name, f"{name} must be a token id or null, got {v!r}")
        eos = self.eos_token_id
        ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids) or (
            isinstance(eos, list) and not eos
        ):
            bad("eos_token_id", f"eos_token_id must be a token id, a list of them or null, got {eos!r}")
        rs = self.rope_scaling
        if rs is not None:
            if not isinstance(rs, dict):
                bad("rope_scaling", f"rope_scaling must be a mapping or null, got {rs!r:.60}")
            kind = rs.get("rope_type", rs.get("type"))
            if kind not in ("llama3", "default"):
                bad("rope_scaling", f"rope_scaling type {kind!r} (expected llama3, or default for none)")
            if kind == "llama3":
                for key in LLAMA3_KEYS:
                    if not (_finite(rs.get(key)) and rs[key] > 0):
                        bad(
                            "rope_scaling", f"llama3 rope_scaling '{key}' must be a number above 0, got {rs.get(key)!r}"
                        )
                if rs["high_freq_factor"] <= rs["low_freq_factor"]:
                    bad("rope_scaling", "llama3 rope_scaling 'high_freq_factor' must be above 'low_freq_factor'")

    # ---- Hugging Face config.json ------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict, where: str = "config") -> DenseConfig:
        """A Qwen2ForCausalLM / LlamaForCausalLM `config.json` as a dict (read from `where`), as
        transformers 4 writes it (rope_theta, rope_scaling) or 5 (rope_parameters)."""
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if archs:
            known = [ARCHITECTURES[a] for a in archs if a in ARCHITECTURES]
            if not known:
                raise NanoseekError(
                    f"{where}: unknown architecture {archs[0]!r} (expected {' or '.join(ARCHITECTURES)})"
                )
            model_type = known[0]
        if model_type not in ARCHITECTURES.values():
            raise NanoseekError(f"{where}: unknown model_type {model_type!r} (expected qwen2 or llama)")
        missing = [k for k in REQUIRED_HF if k not in raw]
        if missing:
            raise NanoseekError(
                f"{where}: missing required field{'s' if len(missing) > 1 else ''} "
                + ", ".join(f"'{k}'" for k in missing)
                + f" (the weights' shapes depend on {'them' if len(missing) > 1 else 'it'}; no default is assumed)"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {k: v for k, v in raw.items() if k in names}
        kw["model_type"] = model_type
        kw.setdefault("num_key_value_heads", None)
        kw.setdefault("bos_token_id", None)
        kw.setdefault("eos_token_id", None)
        if model_type == "qwen2":  # its layout is fixed; transformers 5 may write the llama-only fields
            kw.pop("attention_bias", None)
            kw.pop("mlp_bias", None)
        rp = raw.get("rope_parameters")  # transformers >= 5: theta and scaling in one mapping
        if isinstance(rp, dict):
            if "rope_theta" in rp:
                kw["rope_theta"] = rp["rope_theta"]
            if rp.get("rope_type", rp.get("type", "default")) != "default" and raw.get("rope_scaling") is None:
                kw["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        try:
            return cls(**kw)
        except NanoseekError as e:
            raise NanoseekError(f"{where}: {e}") from None

    @classmethod
    def from_hf(cls, path: str | Path) -> DenseConfig:
        """Read a `config.json` (or the directory that holds one)."""
        p = Path(path)
        p = p / "config.json" if p.is_dir() else p
        return cls.from_hf_dict(read_json_object(p), where=str(p))

    def to_hf_dict(self) -> dict:
        """The `config.json` dict that transformers opens as Qwen2ForCausalLM / LlamaForCausalLM
        (legacy rope_theta / rope_scaling for transformers 4, rope_parameters for 5)."""
        d = dataclasses.asdict(self)
        d["architectures"] = [{v: k for k, v in ARCHITECTURES.items()}[self.model_type]]
        if self.model_type == "qwen2":
            del d["attention_bias"], d["mlp_bias"]
            d["sliding_window"] = None
            d["max_window_layers"] = self.num_hidden_layers
        else:
            del d["use_sliding_window"]
        d["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            d["rope_parameters"].update(self.rope_scaling)
        return d

    @classmethod
    def preset(cls, name: str) -> DenseConfig:
        if name not in DENSE_PRESETS:
            raise NanoseekError(f"unknown dense preset '{name}' (choose from {', '.join(DENSE_PRESETS)})")
        return cls(**DENSE_PRESETS[name])

    def replace(self, **changes) -> DenseConfig:
        return dataclasses.replace(self, **changes)


# The published config.json of each deepseek-ai/DeepSeek-R1-Distill-* model (fields that matter).
_QWEN = dict(model_type="qwen2", max_position_embeddings=131072, bos_token_id=151643, eos_token_id=151643)
_LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_LLAMA = dict(
    model_type="llama",
    vocab_size=128256,
    head_dim=128,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=_LLAMA3_SCALING,
    bos_token_id=128000,
)
DENSE_PRESETS: dict[str, dict] = {
    # A few hundred thousand parameters, the Qwen2 layout: the CPU demo's student.
    "student": dict(
        model_type="qwen2",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_id=1,
    ),
    "r1-distill-qwen-1.5b": dict(  # from Qwen2.5-Math-1.5B
        **_QWEN,
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
    ),
    "r1-distill-qwen-7b": dict(  # from Qwen2.5-Math-7B
        **_QWEN,
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
    ),
    "r1-distill-qwen-14b": dict(  # from Qwen2.5-14B
        **_QWEN,
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
    ),
    "r1-distill-qwen-32b": dict(  # from Qwen2.5-32B
        **_QWEN,
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
    ),
    "r1-distill-llama-8b": dict(  # from Llama-3.1-8B
        **_LLAMA,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        eos_token_id=128001,
    ),
    "r1-distill-llama-70b": dict(  # from Llama-3.3-70B-Instruct
        **_LLAMA,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        eos_token_id=[128001, 128008, 128009],
    ),
}


# ---------------------------------------------------------------------------------------
# Rotary positions; Llama 3.1 stretches them to 128K without retraining the short ones.
# ---------------------------------------------------------------------------------------
def rope_inverse_frequencies(config: DenseConfig) -> torch.Tensor:
    """The inverse frequency of each rotary pair of a head [head_dim / 2].

    `llama3` scaling (Llama 3.1): pairs that turn many times within the original context (wavelength
    below original / high_freq_factor) keep their frequency; those that turn less than
    low_freq_factor times are slowed by `factor`; in between, the two are blended linearly in
    original / wavelength."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    rs = config.rope_scaling
    if not rs:
        return inv_freq
    turns = rs["original_max_position_embeddings"] * inv_freq / (2 * math.pi)  # original / wavelength
    keep = ((turns - rs["low_freq_factor"]) / (rs["high_freq_factor"] - rs["low_freq_factor"])).clamp(0, 1)
    return inv_freq / rs["factor"] * (1 - keep) + inv_freq * keep


class RotaryEmbedding(nn.Module):
    def __init__(self, config: DenseConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        """Compute inv_freq (again after a load on the meta device, which leaves it unset)."""
        if self.inv_freq.device.type != "meta":
            self.inv_freq = rope_inverse_frequencies(self.config).to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [batch, seq, head_dim / 2] for integer positions [batch, seq]."""
        angles = positions.float()[..., None] * self.inv_freq
        return angles.cos(), angles.sin()


# ---------------------------------------------------------------------------------------
# Grouped-query attention (Ainslie et al., 2023): each KV head serves a group of query heads.
# ---------------------------------------------------------------------------------------
@dataclass
class KVCache:
    """The inference cache of grouped-query attention: each layer's keys (after RoPE) and values,
    k[layer], v[layer]: [batch, max_len, num_key_value_heads, head_dim]. Preallocated once; each
    forward writes the new tokens at their positions."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def empty(cls, config: DenseConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu") -> KVCache:
        shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
        n = config.num_hidden_layers
        return cls(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
        )

    @staticmethod
    def bytes_per_token(config: DenseConfig, bytes_per_value: int) -> int:
        return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * bytes_per_value

    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor, width: int) -> None:
        """Rows `dst` get the first `width` positions of rows `src` (n samples of one prompt)."""
        for k, v in zip(self.k, self.v):
            k[dst, :width] = k[src, :width]
            v[dst, :width] = v[src, :width]

    def select(self, rows: torch.Tensor) -> KVCache:
        """A cache of rows `rows` of this one (repeats allowed), as new tensors that keep the
        gradient's path back to these (GRPO's completions read their prompt's keys and values)."""
        return KVCache([k[rows] for k in self.k], [v[rows] for v in self.v])


class Attention(nn.Module):
    """num_attention_heads query heads share num_key_value_heads key/value heads, so the cache
    holds heads / kv_heads times fewer values per token (R1-Distill-Qwen-1.5B: 12 / 2)."""

    def __init__(self, config: DenseConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=c.o_bias)

    def forward(self, x, cos, sin, mask: torch.Tensor | None = None, positions=None, cache=None, rows=None):
        """x [B, T, D]: causal self-attention over x, or attention where `mask` [B, T, T] allows.
        With a cache (k, v) of this layer: the new keys and values are written at `positions`
        [B, T] of cache rows `rows` [B], and each query attends to the cached ones at positions
        <= its own."""
        b, t, _ = x.shape
        # Rotary pairs x_i with x_{i + head_dim/2}, as the Qwen2 and Llama checkpoints are laid out.
        q = apply_rope(self.q_proj(x).view(b, t, self.n_heads, self.head_dim), cos, sin, interleave=False)
        k = apply_rope(self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim), cos, sin, interleave=False)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        if cache is not None:
            if mask is not None:
                raise ValueError("Attention: a mask cannot be combined with a cache (pass positions instead)")
            k_cache, v_cache = cache
            rows = torch.arange(b, device=x.device) if rows is None else rows
            k_cache[rows[:, None], positions] = k.to(k_cache.dtype)
            v_cache[rows[:, None], positions] = v.to(v_cache.dtype)
            span = int(positions.max()) + 1
            k, v = k_cache[rows, :span].to(x.dtype), v_cache[rows, :span].to(x.dtype)
            mask = torch.arange(span, device=x.device) <= positions[:, :, None]  # [B, T, S]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=None if mask is None else mask[:, None],
            is_causal=mask is None,
            enable_gqa=self.n_heads != self.n_kv_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: DenseConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)

    def forward(self, x, cos, sin, mask=None, positions=None, cache=None, rows=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, positions, cache, rows)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------
# The model: the decoder stack (`model.*` in the checkpoint) and the output head.
# ---------------------------------------------------------------------------------------
class DenseDecoder(nn.Module):
    def __init__(self, config: DenseConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class DenseTransformer(nn.Module):
    def __init__(self, config: DenseConfig):
        super().__init__()
        self.config = config
        self.model = DenseDecoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = nn.ModuleList()  # no Multi-Token Prediction: the trainers' MTP loss finds nothing to add
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Weights ~ N(0, initializer_range), biases 0, norms 1; a model on meta is left to be loaded."""
        if self.lm_head.weight.is_meta:
            return
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        self.model.rotary_emb.reset_parameters()

    def hidden_states(
        self, input_ids, positions=None, cache: KVCache | None = None, rows=None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The final-normed hidden states [B, T, D]; `mask` [B, T, T] replaces the causal mask
        (nanoseek.model.document_mask for packed rows), `positions` [B, T] the positions 0..T-1.
        With a KVCache (the engine's), the tokens at `positions` of cache rows `rows` attend to
        what the cache holds before them, as nanoseek.model.Transformer does with its latents."""
        b, t = input_ids.shape
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        cos, sin = self.model.rotary_emb(positions)
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            x = layer(x, cos, sin, mask, positions, layer_cache, rows)
        return self.model.norm(x)

    def forward(self, input_ids, positions=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab]."""
        return self.lm_head(self.hidden_states(input_ids, positions, mask=mask))

    # ---- what the trainers ask of nanoseek.model.Transformer: a dense model has no MTP and no MoE
    def mtp_logits(self, hidden, input_ids, mask=None) -> list[torch.Tensor]:
        return []

    def named_moe_layers(self) -> list:
        return []

    def moe_layers(self) -> list:
        return []

    def expert_counts(self) -> list[torch.Tensor]:
        return []

    def balance_loss(self) -> torch.Tensor:
        return torch.zeros((), device=self.lm_head.weight.device)

    def update_routing_bias(self, counts: list[torch.Tensor], gamma: float) -> None:
        """Nothing to balance: `counts` must be empty (one tensor per MoE layer, of which there are none)."""
        if counts:
            raise ValueError(f"update_routing_bias: {len(counts)} count tensors for a dense model (no MoE layers)")


def count_dense_parameters(config: DenseConfig) -> int:
    """Parameters of the model built on the meta device (no memory); a tied head counts once."""
    with torch.device("meta"):
        model = DenseTransformer(config)
    return sum(p.numel() for p in model.parameters())
