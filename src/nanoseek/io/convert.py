"""`nanoseek convert --to fp8|bf16 IN OUT`: rewrite a checkpoint in the released DeepSeek-V3 layout.

fp8: the linears V3 quantises (attention projections, dense MLPs, shared and routed experts)
become E4M3 with a float32 `weight_scale_inv` [ceil(out/128), ceil(in/128)] beside each;
every other floating tensor is bf16 (the routing bias stays float32), and config.json gets
the released `quantization_config`. bf16: FP8 weights are dequantised block by block and
everything is bf16. One input shard at a time, so memory stays at one shard.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanoseek.config import ModelConfig, read_json_object
from nanoseek.errors import NanoseekError
from nanoseek.fp8 import E4M3, FP8_QUANTIZATION_CONFIG, dequantize_blockwise, fp8_linears, quantize_blockwise
from nanoseek.io.hf import INDEX, _checkpoint_files, to_hub_name
from nanoseek.model import Transformer

FORMATS = ("fp8", "bf16")


def register(sub) -> None:
    p = sub.add_parser("convert", help="rewrite a checkpoint with FP8 (E4M3 + block scales) or bf16 weights")
    p.add_argument("--to", required=True, choices=FORMATS, help="fp8: the released DeepSeek-V3 layout; bf16: dense")
    p.add_argument("input", metavar="IN", help="checkpoint directory (config.json + safetensors)")
    p.add_argument("output", metavar="OUT", help="directory to write")
    p.set_defaults(func=run_convert)


def run_convert(args) -> int:
    stats = convert(args.input, args.output, args.to)
    print(
        f"wrote {args.output}: {stats['fp8_tensors']} FP8 tensors, {stats['other_tensors']} others, "
        f"{stats['bytes'] / 2**20:.1f} MiB of weights"
    )
    return 0


def hub_layout(config: ModelConfig) -> tuple[dict[str, tuple], set[str]]:
    """(the shape of every hub key the config's model has, the keys the fp8 layout stores in E4M3),
    from the model built on the meta device."""
    with torch.device("meta"):
        model = Transformer(config)
    shapes = {to_hub_name(name, config): tuple(t.shape) for name, t in model.state_dict().items()}
    return shapes, {to_hub_name(name + ".weight", config) for name, _, _ in fp8_linears(model)}


def convert(src: str | Path, dst: str | Path, to: str) -> dict:
    """Write `src` to `dst` with `to` ("fp8" or "bf16") weights; returns tensor counts and bytes."""
    src, dst = Path(src), Path(dst)
    if to not in FORMATS:
        raise NanoseekError(f"convert: --to '{to}' is not one of {', '.join(FORMATS)}")
    if not src.is_dir():
        raise NanoseekError(f"{src}: not a directory")
    if dst.exists() and dst.resolve() == src.resolve():
        raise NanoseekError(f"{dst}: output is the input directory; choose another")
    if dst.exists() and not dst.is_dir():
        raise NanoseekError(f"{dst}: exists and is not a directory")
    raw_config = read_json_object(src / "config.json")  # written back with every key it had
    config = ModelConfig.from_hf(raw_config, where=str(src / "config.json"))
    files = _checkpoint_files(src)
    shapes, quantised = hub_layout(config)
    quantised = quantised if to == "fp8" else set()
    for f in files:  # before anything is written: a failed convert leaves OUT as it was
        _check_shapes(f, shapes)

    dst.mkdir(parents=True, exist_ok=True)
    for stale in list(dst.glob("*.safetensors")) + [dst / INDEX]:
        stale.unlink(missing_ok=True)
    stats = {"fp8_tensors": 0, "other_tensors": 0, "bytes": 0}
    weight_map = {}
    for f in files:
        out = _convert_file(f, quantised, to)
        for t in out.values():
            stats["bytes"] += t.numel() * t.element_size()
        stats["fp8_tensors"] += sum(t.dtype == E4M3 for t in out.values())
        stats["other_tensors"] += sum(t.dtype != E4M3 for t in out.values())
        save_file(out, str(dst / f.name), metadata={"format": "pt"})
        weight_map.update({k: f.name for k in out})
    if (src / INDEX).exists():
        index = {"metadata": {"total_size": stats["bytes"]}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    raw_config["torch_dtype"] = "bfloat16"
    raw_config.pop("dtype", None)
    if to == "fp8":
        raw_config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    else:
        raw_config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
    for extra in src.iterdir():  # tokenizer and generation config travel with the weights
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in (INDEX, "config.json"):
            shutil.copy2(extra, dst / extra.name)
    return stats


def _check_shapes(f: Path, shapes: dict[str, tuple]) -> None:
    """Each tensor of the shard `f` has the shape config.json gives it (read from the header
    only): otherwise the output would not load."""
    try:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                shape = tuple(sf.get_slice(key).get_shape())
                if key in shapes and shape != shapes[key]:
                    raise NanoseekError(
                        f"{f}: tensor {key} has shape {list(shape)}, config.json gives {list(shapes[key])}"
                    )
    except SafetensorError as e:
        raise NanoseekError(f"{f}: not a readable safetensors file ({e})") from None
    except OSError as e:
        raise NanoseekError(f"{f}: cannot read ({e})") from None


def _convert_file(f: Path, quantised: set[str], to: str) -> dict[str, torch.Tensor]:
    """One shard converted (its shapes checked already by _check_shapes)."""
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(f), framework="pt") as sf:
            keys = list(sf.keys())
            for key in keys:
                if key.endswith(".weight_scale_inv"):
                    continue  # travels with its weight
                t = sf.get_tensor(key)
                scale_key = key[: -len("weight")] + "weight_scale_inv"
                scale = None
                if t.dtype == E4M3:
                    if scale_key not in keys:
                        raise NanoseekError(f"{f}: FP8 tensor {key} has no {scale_key}")
                    scale = sf.get_tensor(scale_key)
                if key in quantised:
                    if t.dim() != 2:
                        raise NanoseekError(f"{f}: tensor {key} has shape {list(t.shape)}, expected a matrix")
                    out[key], out[scale_key] = (t, scale.float()) if scale is not None else quantize_blockwise(t)
                    continue
                if scale is not None:
                    t = dequantize_blockwise(t, scale)
                if t.is_floating_point() and not key.endswith("e_score_correction_bias"):
                    t = t.to(torch.bfloat16)
                out[key] = t.contiguous()
    except SafetensorError as e:
        raise NanoseekError(f"{f}: not a readable safetensors file ({e})") from None
    except OSError as e:
        raise NanoseekError(f"{f}: cannot read ({e})") from None
    return out
