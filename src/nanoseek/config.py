"""ModelConfig: the DeepSeek-V3 hyper-parameters under their Hugging Face names, and presets."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoseek.errors import NanoseekError

ARCHITECTURES = {"DeepseekV3ForCausalLM": "deepseek_v3", "DeepseekV2ForCausalLM": "deepseek_v2"}
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
SCORING_FUNCS = ("sigmoid", "softmax")
# config.json fields without which the weights' shapes are a guess: a file that lacks one is an
# error, not a V3-sized default (transformers writes every field, so its checkpoints have them).
REQUIRED_HF = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "q_lora_rank",  # null (no query compression, as V2-Lite) is a value; absent is not
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",  # null: a dense model
)
REQUIRED_HF_MOE = ("moe_intermediate_size", "num_experts_per_tok", "n_shared_experts", "first_k_dense_replace")

# YaRN's numbers in rope_scaling: factor and the original context must be above 0.
YARN_NUMBERS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class ModelConfigError(NanoseekError):
    """A ModelConfig value that cannot be right; `field` names it (the training config reports
    it as `model.FIELD`), `detail` says what is wrong without the prefix."""

    def __init__(self, field: str | None, detail: str):
        super().__init__(f"invalid model config: {detail}")
        self.field, self.detail = field, detail


def read_utf8(path: str | Path) -> str:
    """A config file's text; one that is not UTF-8 is a NanoseekError naming the path and the byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NanoseekError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_json_object(path: str | Path) -> dict:
    """A JSON file that holds an object (config.json, tokenizer_config.json): one-line errors naming the path."""
    p = Path(path)
    if not p.is_file():
        raise NanoseekError(f"{p}: file not found")
    try:
        raw = json.loads(read_utf8(p))
    except json.JSONDecodeError as e:
        raise NanoseekError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise NanoseekError(f"{p}: expected a JSON object")
    return raw


@dataclass
class ModelConfig:
    # Field names are those of the HF `config.json`, so nothing is translated twice.
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense FFN width (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048  # width of one fine-grained expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    # MLA (DeepSeek-V2 section 2.1)
    q_lora_rank: int | None = 1536  # None: plain q_proj, as in V2-Lite
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE (V3 section 2.1.2)
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"  # V3: biased sigmoid selection; V2: greedy / group_limited_greedy
    scoring_func: str = "sigmoid"
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    # MTP (V3 section 2.2)
    num_nextn_predict_layers: int = 1
    # positions
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_interleave: bool = True
    # the rest
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    model_type: str = "deepseek_v3"

    def __post_init__(self):
        self.validate()

    # ---- derived sizes -------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return self.n_routed_experts > 0 and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim"):  # YaRN's attention temperature (V2 appendix)
            m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= m * m
        return scale

    def validate(self) -> None:
        def bad(field, detail):
            raise ModelConfigError(field, detail)

        def number(name, low=0.0, above=True):
            v = getattr(self, name)
            if not _finite(v) or v < low or (above and v == low):
                bad(name, f"{name} must be a finite number {'above' if above else 'at least'} {low:g}, got {v!r}")

        def integer(name, low):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                kind = "a positive integer" if low == 1 else f"an integer of at least {low}"
                bad(name, f"{name} must be {kind}, got {v!r}")

        if self.model_type not in ARCHITECTURES.values():
            bad("model_type", f"model_type '{self.model_type}' (expected deepseek_v3 or deepseek_v2)")
        if self.topk_method not in TOPK_METHODS:
            bad("topk_method", f"topk_method '{self.topk_method}' (expected one of {', '.join(TOPK_METHODS)})")
        if self.scoring_func not in SCORING_FUNCS:
            bad("scoring_func", f"scoring_func '{self.scoring_func}' (expected sigmoid or softmax)")
        if self.hidden_act != "silu":
            bad("hidden_act", f"hidden_act '{self.hidden_act}' (only silu is supported)")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
            "moe_layer_freq",
        ):
            integer(name, 1)
        for name in ("qk_nope_head_dim", "n_routed_experts", "n_shared_experts", "first_k_dense_replace"):
            integer(name, 0)
        integer("num_nextn_predict_layers", 0)
        if self.q_lora_rank is not None:
            integer("q_lora_rank", 1)
        number("rope_theta")
        number("routed_scaling_factor")
        number("rms_norm_eps", above=False)
        number("initializer_range", above=False)
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.n_routed_experts:
            integer("moe_intermediate_size", 1)
            integer("num_experts_per_tok", 1)
            if self.num_experts_per_tok > self.n_routed_experts:
                bad(
                    "num_experts_per_tok",
                    f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..n_routed_experts",
                )
            if self.topk_method != "greedy":
                integer("n_group", 1)
                integer("topk_group", 1)
                if self.n_routed_experts % self.n_group:
                    bad(
                        "n_group",
                        f"n_routed_experts {self.n_routed_experts} is not divisible by n_group {self.n_group}",
                    )
                if self.topk_group > self.n_group:
                    bad("topk_group", f"topk_group {self.topk_group} must be in 1..n_group")
                per_group = self.n_routed_experts // self.n_group
                if self.topk_method == "noaux_tc" and per_group < 2 and self.n_group > 1:
                    bad("n_group", "noaux_tc routing scores a group by its top-2 experts: need 2+ experts per group")
                if self.topk_group * per_group < self.num_experts_per_tok:
                    bad("topk_group", "topk_group groups hold fewer experts than num_experts_per_tok")
        rs = self.rope_scaling
        if rs is not None:
            if not isinstance(rs, dict):
                bad("rope_scaling", f"rope_scaling must be a mapping or null, got {rs!r:.60}")
            kind = rs.get("type", rs.get("rope_type"))
            if kind not in ("yarn", "default", None):
                bad("rope_scaling", f"rope_scaling type '{kind}' (only yarn is supported)")
            if kind == "yarn" and not ("factor" in rs and "original_max_position_embeddings" in rs):
                bad("rope_scaling", "yarn rope_scaling needs 'factor' and 'original_max_position_embeddings'")
            for key in YARN_NUMBERS:
                positive = key in ("factor", "original_max_position_embeddings")
                if key in rs and not (_finite(rs[key]) and (rs[key] > 0 or not positive)):
                    what = "a finite number above 0" if positive else "a finite number"
                    bad("rope_scaling", f"rope_scaling '{key}' must be {what}, got {rs[key]!r}")

    # ---- Hugging Face config.json ------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_dict: str | Path | dict, where: str = "config") -> ModelConfig:
        """Read a `config.json` (or its dict, read from `where`) of DeepseekV3ForCausalLM /
        DeepseekV2ForCausalLM. The fields that decide the weights' shapes are required."""
        if isinstance(path_or_dict, dict):
            raw = dict(path_or_dict)
        else:
            p = Path(path_or_dict)
            p = p / "config.json" if p.is_dir() else p
            where = str(p)
            raw = read_json_object(p)
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if archs:
            known = [ARCHITECTURES[a] for a in archs if a in ARCHITECTURES]
            if not known:
                raise NanoseekError(
                    f"{where}: unknown architecture {archs[0]!r} (expected {' or '.join(ARCHITECTURES)}, "
                    "or a dense Qwen2ForCausalLM / LlamaForCausalLM)"
                )
            model_type = known[0]
        if model_type not in ARCHITECTURES.values():
            raise NanoseekError(f"{where}: unknown model_type {model_type!r} (expected deepseek_v3 or deepseek_v2)")
        required = REQUIRED_HF + (REQUIRED_HF_MOE if raw.get("n_routed_experts") else ())
        missing = [k for k in required if k not in raw]
        if missing:
            raise NanoseekError(
                f"{where}: missing required field{'s' if len(missing) > 1 else ''} "
                + ", ".join(f"'{k}'" for k in missing)
                + f" (the weights' shapes depend on {'them' if len(missing) > 1 else 'it'}; no default is assumed)"
            )
        kw: dict[str, Any] = {"model_type": model_type}
        if model_type == "deepseek_v2":  # V2 defaults differ from V3's where the file is silent
            kw.update(
                topk_method="greedy",
                scoring_func="softmax",
                norm_topk_prob=False,
                routed_scaling_factor=1.0,
                first_k_dense_replace=0,
                num_nextn_predict_layers=0,
                n_group=1,
                topk_group=1,
            )
        names = {f.name for f in dataclasses.fields(cls)}
        for k, v in raw.items():
            if k in names and k != "model_type":
                kw[k] = v
        # transformers >= 5 writes `rope_parameters` (theta inside it) instead of rope_theta/rope_scaling
        rp = raw.get("rope_parameters")
        if isinstance(rp, dict):
            if "rope_theta" in rp:
                kw["rope_theta"] = rp["rope_theta"]
            if rp.get("rope_type", rp.get("type", "default")) != "default" and "rope_scaling" not in raw:
                kw["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        if kw.get("rope_scaling"):
            if not isinstance(kw["rope_scaling"], dict):
                raise NanoseekError(f"{where}: rope_scaling must be an object or null, got {kw['rope_scaling']!r:.60}")
            rs = dict(kw["rope_scaling"])
            rs.setdefault("type", rs.get("rope_type"))
            if rs["type"] in ("default", None):
                rs = None
            kw["rope_scaling"] = rs
        if model_type == "deepseek_v2":
            kw["rope_interleave"] = True  # V2 always rotates adjacent pairs (complex form)
            if kw.get("topk_method") == "greedy":
                kw["n_group"], kw["topk_group"] = kw.get("n_group") or 1, kw.get("topk_group") or 1
        if kw.get("n_routed_experts") is None:
            kw["n_routed_experts"] = 0
        for k in ("n_group", "topk_group", "n_shared_experts", "num_experts_per_tok"):
            if k in kw and kw[k] is None:
                kw[k] = 1 if k != "n_shared_experts" else 0
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        try:
            return cls(**kw)
        except NanoseekError as e:
            raise NanoseekError(f"{where}: {e}") from None
        except TypeError as e:
            raise NanoseekError(f"{where}: {e}") from None

    def to_hf(self) -> dict:
        """The `config.json` dict that `transformers` opens as DeepseekV3/V2ForCausalLM."""
        d = dataclasses.asdict(self)
        arch = {v: k for k, v in ARCHITECTURES.items()}[self.model_type]
        d["architectures"] = [arch]
        d["num_key_value_heads"] = self.num_attention_heads
        d["head_dim"] = self.qk_rope_head_dim
        d["num_mtp_layers"] = self.num_nextn_predict_layers
        d["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rs = dict(self.rope_scaling)
            rs["rope_type"] = rs["type"]
            d["rope_parameters"].update(rs)
        d["torch_dtype"] = "float32"
        return d

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise NanoseekError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)})")
        return cls(**PRESETS[name])

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


V3_YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}

PRESETS: dict[str, dict] = {
    # Runs the whole pipeline on a 2-core CPU in minutes.
    "tiny": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=1024,
        routed_scaling_factor=1.0,
    ),
    # A few million parameters: the benchmark size.
    "small": dict(
        vocab_size=4096,
        hidden_size=192,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=6,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=4096,
        routed_scaling_factor=2.5,
    ),
    # DeepSeek-V2-Lite: 15.7B total, 2.4B active.
    "v2-lite": dict(
        model_type="deepseek_v2",
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        topk_method="greedy",
        scoring_func="softmax",
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        first_k_dense_replace=1,
        num_nextn_predict_layers=0,
        max_position_embeddings=163840,
        bos_token_id=100000,
        eos_token_id=100001,
        rope_scaling={
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
    ),
    # DeepSeek-V3 / R1: 671B total, 37B active, plus one MTP module.
    "v3": dict(rope_scaling=V3_YARN),
}
