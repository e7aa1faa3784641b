"""Hugging Face interop for the dense students: Qwen2ForCausalLM and LlamaForCausalLM directories.

DenseTransformer's parameter names are the hub's, so loading is a state-dict copy with every
tensor's name and shape checked; a tied head is stored once (as `model.embed_tokens.weight`,
as transformers saves it). Weights are safetensors, sharded with an index past max_shard_bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanoseek.config import read_json_object
from nanoseek.dense import ARCHITECTURES, DenseConfig, DenseTransformer
from nanoseek.errors import NanoseekError

INDEX = "model.safetensors.index.json"  # the names transformers and nanoseek.io.hf use
SINGLE = "model.safetensors"


def is_dense_checkpoint(directory: str | Path) -> bool:
    """Whether the directory's config.json names a dense student architecture (Qwen2ForCausalLM,
    LlamaForCausalLM; or model_type qwen2 / llama where it names none). False without a readable
    config.json: the DeepSeek loader then reports what is wrong with it."""
    path = Path(directory) / "config.json"
    try:
        raw = read_json_object(path)
    except NanoseekError:
        return False
    archs = raw.get("architectures")
    if isinstance(archs, list) and archs:
        return any(a in ARCHITECTURES for a in archs if isinstance(a, str))
    return raw.get("model_type") in ARCHITECTURES.values()


def load_dense_pretrained(
    directory: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    config: DenseConfig | None = None,
) -> DenseTransformer:
    """Open a Qwen2ForCausalLM / LlamaForCausalLM checkpoint directory as a DenseTransformer, in
    `dtype` (float32 when None) on `device` (the CPU when None), in eval mode. `config`: its
    config.json as already read (None: read here)."""
    # The DeepSeek loader's readers (index checks, FP8 dequantisation), imported here so that it can
    # import this module to dispatch dense directories to load_dense_pretrained.
    from nanoseek.io.hf import _checkpoint_files, _read_tensors

    directory = Path(directory)
    if not directory.is_dir():
        raise NanoseekError(f"{directory}: not a directory")
    device, dtype = device or "cpu", dtype or torch.float32
    config = config or DenseConfig.from_hf(directory / "config.json")
    files = _checkpoint_files(directory)
    with torch.device("meta"):
        model = DenseTransformer(config)
    expected = dict(model.state_dict(keep_vars=True))
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state: dict[str, torch.Tensor] = {}
    for f, key, t in _read_tensors(files):
        if key.endswith("rotary_emb.inv_freq"):  # older checkpoints store the rotary buffer; it is recomputed
            continue
        if key == "lm_head.weight" and config.tie_word_embeddings:  # a copy of the embedding some tools write
            continue
        if key not in expected:
            raise NanoseekError(f"{f}: unexpected tensor {key} for this config.json")
        want = tuple(expected[key].shape)
        if tuple(t.shape) != want:
            raise NanoseekError(f"{f}: tensor {key} has shape {list(t.shape)}, expected {list(want)}")
        state[key] = t.to(device=device, dtype=dtype)
    for key in expected:
        if key not in state:
            raise NanoseekError(f"{directory}: missing tensor {key}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    rotary = model.model.rotary_emb
    rotary.inv_freq = torch.empty(0, device=device)
    rotary.reset_parameters()
    return model.eval()


def write_safetensors(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    """`model.safetensors`, or shards `model-0000i-of-0000n.safetensors` of at most max_shard_bytes
    each (a larger tensor gets a shard of its own) and `model.safetensors.index.json`; weights of an
    earlier save in the directory are removed first."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    for stale in list(directory.glob("model*.safetensors")) + [directory / INDEX]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def save_dense_pretrained(
    model: DenseTransformer, directory: str | Path, dtype: torch.dtype | None = None, max_shard_bytes: int = 4 << 30
) -> Path:
    """Write config.json (with `architectures`) and safetensors weights that
    `transformers.AutoModelForCausalLM.from_pretrained(directory)` opens; `dtype` casts the weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[key] = t.detach().cpu().contiguous()
    write_safetensors(state, directory, max_shard_bytes)
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(dtype or model.lm_head.weight.dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
