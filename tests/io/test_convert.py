"""`nanoseek convert` on input that cannot make a loadable output: a tensor whose shape is not the
one config.json gives is one line naming the file, the tensor and both shapes, and OUT is left as
it was (nothing written, an earlier conversion kept). The round trips are in tests/model/test_fp8.py."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoseek import ModelConfig, Transformer, load_pretrained, save_pretrained
from nanoseek.cli import main

from model_support import ENGINE_CONFIG


def files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    save_pretrained(Transformer(ModelConfig(**ENGINE_CONFIG)), tmp_path / "in", max_shard_bytes=200_000)
    return tmp_path / "in"


def test_a_tensor_of_the_wrong_shape_is_one_line_and_out_is_left_as_it_was(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", "--to", "bf16", str(checkpoint), str(out)]) == 0
    assert load_pretrained(out).config == ModelConfig(**ENGINE_CONFIG)
    before = files(out)
    capsys.readouterr()

    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    shard = checkpoint / index["weight_map"]["model.norm.weight"]
    assert shard != checkpoint / index["weight_map"]["model.embed_tokens.weight"]  # not the first shard written
    state = load_file(str(shard))
    state["model.norm.weight"] = torch.ones(65)
    save_file(state, str(shard), metadata={"format": "pt"})

    assert main(["convert", "--to", "fp8", str(checkpoint), str(out)]) == 2
    assert capsys.readouterr().err == (
        f"error: {shard}: tensor model.norm.weight has shape [65], config.json gives [64]\n"
    )
    assert files(out) == before  # the earlier conversion is still there, whole
    assert main(["convert", "--to", "bf16", str(checkpoint), str(tmp_path / "fresh")]) == 2
    assert not (tmp_path / "fresh").exists()


def test_a_config_json_that_disagrees_with_the_weights_is_refused(checkpoint, tmp_path, capsys):
    """V3's kv_lora_rank (512) for weights of rank 24: what a silent default used to produce,
    an output of exit 0 that does not load."""
    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    config["kv_lora_rank"] = 512
    path.write_text(json.dumps(config))
    assert main(["convert", "--to", "bf16", str(checkpoint), str(tmp_path / "out")]) == 2
    key = "model.layers.0.self_attn.kv_a_layernorm.weight"  # the first kv_lora_rank-sized tensor
    shard = checkpoint / json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"][key]
    assert capsys.readouterr().err == f"error: {shard}: tensor {key} has shape [24], config.json gives [512]\n"
    assert not (tmp_path / "out").exists()
