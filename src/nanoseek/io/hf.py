"""Hugging Face interop: read and write checkpoints in the `transformers` DeepSeek-V3/V2 layout.

Key names are the hub's (`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`, ...). The MTP
modules are stored as layers `num_hidden_layers + k`, each with copies of the shared
embedding and output head (`embed_tokens`, `shared_head.head`), as in the released V3
checkpoint; a directory that holds none of them (transformers saves none) loads without
MTP. FP8 weights with `weight_scale_inv` are dequantised block by block on load, or,
with `keep_fp8=True`, stay FP8 in memory in FP8WeightLinear modules.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from nanoseek.config import ModelConfig, read_utf8
from nanoseek.dense import DenseConfig, DenseTransformer
from nanoseek.errors import NanoseekError
from nanoseek.fp8 import (
    E4M3,
    FP8_QUANTIZATION_CONFIG,
    KEEP_DENSE_FOR_INFERENCE,
    FP8WeightLinear,
    dequantize_blockwise,
    fp8_linears,
)
from nanoseek.io.dense_hf import is_dense_checkpoint, load_dense_pretrained, save_dense_pretrained, write_safetensors
from nanoseek.model import Transformer

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def to_hub_name(name: str, config: ModelConfig) -> str:
    """nanoseek parameter name -> hub key."""
    if name == "lm_head.weight":
        return name
    m = re.match(r"mtp\.(\d+)\.(.*)", name)
    if m:
        return f"model.layers.{config.num_hidden_layers + int(m.group(1))}.{m.group(2)}"
    return "model." + name


def from_hub_name(key: str, config: ModelConfig) -> str | None:
    """hub key -> nanoseek parameter name; None for keys nanoseek shares or does not keep."""
    if key == "lm_head.weight":
        return key
    if not key.startswith("model."):
        return key  # reported as unexpected by the caller
    name = key[len("model.") :]
    m = re.match(r"layers\.(\d+)\.(.*)", name)
    if m and int(m.group(1)) >= config.num_hidden_layers:
        k, rest = int(m.group(1)) - config.num_hidden_layers, m.group(2)
        if k >= config.num_nextn_predict_layers:
            return None  # an MTP module this config does not use
        if rest in ("embed_tokens.weight", "shared_head.head.weight"):
            return None  # copies of the shared embedding and head
        return f"mtp.{k}.{rest}"
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return name


def _checkpoint_files(directory: Path) -> list[Path]:
    index = directory / INDEX
    if index.exists():
        try:
            weight_map = json.loads(read_utf8(index))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise NanoseekError(f"{index}: malformed index ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise NanoseekError(f"{index}: malformed index (weight_map is not a mapping of tensor names to files)")
        files = sorted({directory / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise NanoseekError(f"{index}: lists {f.name}, which is missing")
        return files
    if (directory / SINGLE).exists():
        return [directory / SINGLE]
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise NanoseekError(f"{directory}: no safetensors weights (expected {SINGLE} or {INDEX})")
    return found


def _checkpoint_keys(files: list[Path]) -> set[str]:
    """The tensor names in the files' headers (no tensor is read)."""
    keys: set[str] = set()
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                keys.update(sf.keys())
        except SafetensorError as e:
            raise NanoseekError(f"{f}: not a readable safetensors file ({e})") from None
        except OSError as e:
            raise NanoseekError(f"{f}: cannot read ({e})") from None
    return keys


def without_absent_mtp(config: ModelConfig, keys: set[str], directory: Path) -> ModelConfig:
    """The config without its MTP modules when the checkpoint holds no tensor of any of them.

    `transformers.DeepseekV3Config()` declares one MTP module, but transformers' DeepseekV3
    has no MTP and its save_pretrained writes none: such a directory (a model fine-tuned with
    transformers or TRL) loads as the main model alone. Some MTP tensors but not all is a
    broken checkpoint, reported by the loader as the first missing tensor."""
    n, depth = config.num_hidden_layers, config.num_nextn_predict_layers
    if depth == 0:
        return config
    mtp_layer = re.compile(r"model\.layers\.(\d+)\.")
    if any((m := mtp_layer.match(k)) and int(m.group(1)) >= n for k in keys):
        return config
    print(
        f"note: {directory} has no weights for the {depth} MTP module(s) its config.json declares; "
        "loading without MTP (no speculative decoding, no MTP loss)",
        file=sys.stderr,
    )
    return config.replace(num_nextn_predict_layers=0)


def checkpoint_config(directory: str | Path) -> ModelConfig:
    """The config of the model that `load_pretrained(directory)` builds: config.json, less
    the MTP modules whose weights the directory lacks (see `without_absent_mtp`)."""
    directory = Path(directory)
    config = ModelConfig.from_hf(directory / "config.json")
    return without_absent_mtp(config, _checkpoint_keys(_checkpoint_files(directory)), directory)


def _read_tensors(files: list[Path], keep_fp8=None):
    """Yield (file, key, tensor) with FP8 block-scaled weights dequantised, except those whose
    key `keep_fp8(key)` accepts: they come as E4M3, followed by their `weight_scale_inv`."""
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                keys = list(sf.keys())
                scales = {k for k in keys if k.endswith(".weight_scale_inv")}
                for key in keys:
                    if key in scales:
                        continue
                    t = sf.get_tensor(key)
                    scale_key = key[: -len("weight")] + "weight_scale_inv"
                    if t.dtype == torch.float8_e4m3fn:
                        if scale_key not in scales:
                            raise NanoseekError(f"{f}: FP8 tensor {key} has no {scale_key}")
                        if keep_fp8 is not None and keep_fp8(key):
                            yield f, key, t
                            yield f, scale_key, sf.get_tensor(scale_key)
                            continue
                        t = dequantize_blockwise(t, sf.get_tensor(scale_key))
                    yield f, key, t
        except SafetensorError as e:
            raise NanoseekError(f"{f}: not a readable safetensors file ({e})") from None
        except OSError as e:
            raise NanoseekError(f"{f}: cannot read ({e})") from None


def load_pretrained(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    config: ModelConfig | DenseConfig | None = None,
    keep_fp8: bool = False,
) -> Transformer:
    """Open a Hugging Face DeepSeek-V3/V2 checkpoint directory as a nanoseek Transformer (a
    Qwen2 or Llama one, the layouts of the R1-Distill models, as a nanoseek.dense.DenseTransformer).
    One that holds no MTP weights (transformers saves none) loads without MTP, with a note on
    stderr (`without_absent_mtp`); `model.config` says so.

    keep_fp8: the checkpoint's FP8 linears (E4M3 + `weight_scale_inv`, as released) stay FP8
    in memory as FP8WeightLinear modules, dequantised per layer inside the matmul; the rest
    loads in `dtype`. kv_b_proj is dequantised anyway: MLA's absorbed attention reads it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NanoseekError(f"{directory}: not a directory")
    if isinstance(config, DenseConfig) or (config is None and is_dense_checkpoint(directory)):
        return load_dense_pretrained(directory, device=device, dtype=dtype, config=config)  # Qwen2 or Llama
    config = config or ModelConfig.from_hf(directory / "config.json")
    files = _checkpoint_files(directory)
    config = without_absent_mtp(config, _checkpoint_keys(files), directory)
    with torch.device("meta"):
        model = Transformer(config)
    fp8_modules = {}  # hub key of an FP8 linear's weight -> (parent module, attribute)
    if keep_fp8:
        for name, parent, attr in fp8_linears(model):
            if attr not in KEEP_DENSE_FOR_INFERENCE:
                fp8_modules[to_hub_name(name + ".weight", config)] = (parent, attr)
    expected = {name: p for name, p in model.state_dict(keep_vars=True).items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    state: dict[str, torch.Tensor] = {}
    for f, key, t in _read_tensors(files, keep_fp8=fp8_modules.__contains__):
        name = from_hub_name(key, config)
        if name is None:
            continue
        if t.dtype == E4M3:  # kept FP8: its module becomes an FP8WeightLinear
            parent, attr = fp8_modules[key]
            old = getattr(parent, attr)
            if tuple(t.shape) != tuple(old.weight.shape):
                raise NanoseekError(f"{f}: tensor {key} has shape {list(t.shape)}, expected {list(old.weight.shape)}")
            new = FP8WeightLinear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
            setattr(parent, attr, new)
            expected[name[: -len("weight")] + "weight_scale_inv"] = new.weight_scale_inv
            expected[name] = new.weight
            state[name] = t.to(device)
            continue
        if name.endswith("weight_scale_inv") and name in expected:
            want = tuple(expected[name].shape)
            if tuple(t.shape) != want:
                raise NanoseekError(f"{f}: tensor {key} has shape {list(t.shape)}, expected {list(want)}")
            state[name] = t.to(device=device, dtype=torch.float32)
            continue
        if name not in expected:
            raise NanoseekError(f"{f}: unexpected tensor {key} for this config.json")
        want = tuple(expected[name].shape)
        if tuple(t.shape) != want:
            raise NanoseekError(f"{f}: tensor {key} has shape {list(t.shape)}, expected {list(want)}")
        keep_fp32 = name.endswith("e_score_correction_bias")
        state[name] = t.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
    for name in expected:
        if name not in state:
            if name.endswith("e_score_correction_bias"):  # checkpoints from before the bias existed
                state[name] = torch.zeros(expected[name].shape, device=device)
            else:
                raise NanoseekError(f"{directory}: missing tensor {to_hub_name(name, config)}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope.inv_freq = torch.empty(0, device=device)
    model.rope.reset_parameters()
    return model.eval()


def hub_state_dict(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    config = model.config
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        keep = name.endswith(("e_score_correction_bias", "weight_scale_inv")) or t.dtype == E4M3
        if dtype is not None and t.is_floating_point() and not keep:
            t = t.to(dtype)
        out[to_hub_name(name, config)] = t.detach().cpu().contiguous()
    for k in range(config.num_nextn_predict_layers):
        prefix = f"model.layers.{config.num_hidden_layers + k}."
        out[prefix + "embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
        head = model.lm_head.weight.detach().cpu()
        out[prefix + "shared_head.head.weight"] = (head.to(dtype) if dtype else head).clone()
    return out


def save_pretrained(
    model: Transformer, directory: str | Path, dtype: torch.dtype | None = None, max_shard_bytes: int = 4 << 30
) -> Path:
    """Write config.json and safetensors weights (sharded with an index past max_shard_bytes)
    that `transformers.AutoModelForCausalLM.from_pretrained(directory)` opens (a dense student
    in its own Qwen2 / Llama layout, by nanoseek.io.dense_hf)."""
    if isinstance(model, DenseTransformer):
        return save_dense_pretrained(model, directory, dtype, max_shard_bytes)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = hub_state_dict(model, dtype)
    config = model.config.to_hf()
    config["torch_dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
    if any(t.dtype == E4M3 for t in state.values()):  # FP8WeightLinear modules: the released layout
        config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    write_safetensors(state, directory, max_shard_bytes)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
