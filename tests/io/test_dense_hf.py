"""Dense-student checkpoints: written by transformers and read by nanoseek, written by nanoseek and
read by transformers, the same logits both ways; sharding; bad directories are one line."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dense_support import CONFIGS, IDS, config_kwargs, randomize, transformers_model
from nanoseek.dense import DenseConfig, DenseTransformer
from nanoseek.errors import NanoseekError
from nanoseek.io.dense_hf import is_dense_checkpoint, load_dense_pretrained, save_dense_pretrained

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()


def hf_logits(directory, ids=IDS):
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_checkpoint_opens_in_nanoseek_with_the_same_logits(name, tmp_path):
    hf = transformers_model(name)
    with torch.no_grad():
        ref = hf(IDS).logits
    hf.save_pretrained(tmp_path)
    assert is_dense_checkpoint(tmp_path)
    ours = load_dense_pretrained(tmp_path)
    no_ids = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # transformers' defaults differ
    assert ours.config.replace(**no_ids) == DenseConfig(**config_kwargs(name), **no_ids)
    with torch.no_grad():
        assert (ours(IDS) - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nanoseek_checkpoint_opens_in_transformers_with_the_same_logits(name, tmp_path):
    torch.manual_seed(0)
    model = randomize(DenseTransformer(DenseConfig(**config_kwargs(name))))
    save_dense_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    expected = "Qwen2ForCausalLM" if name.startswith("qwen2") else "LlamaForCausalLM"
    assert config["architectures"] == [expected] and config["torch_dtype"] == "float32"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(hf).__name__ == expected
    with torch.no_grad():
        assert (hf(IDS).logits - model(IDS)).abs().max().item() < 1e-4


def test_tied_head_is_stored_once_and_tied_again_on_load(tmp_path):
    torch.manual_seed(0)
    model = randomize(DenseTransformer(DenseConfig(**config_kwargs("qwen2-gqa2-tied"))))
    save_dense_pretrained(model, tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    again = load_dense_pretrained(tmp_path)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_sharded_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = randomize(DenseTransformer(DenseConfig(**config_kwargs("llama3-gqa2-scaled"))))
    save_dense_pretrained(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == shards
    assert set(index["weight_map"]) == set(model.state_dict())
    again = load_dense_pretrained(tmp_path)
    for key, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], t), key
    with torch.no_grad():
        assert (hf_logits(tmp_path) - model(IDS)).abs().max().item() < 1e-4
    save_dense_pretrained(model, tmp_path)  # a later unsharded save leaves no stale shard or index
    assert [p.name for p in tmp_path.glob("model*")] == ["model.safetensors"]


def test_load_in_bfloat16(tmp_path):
    torch.manual_seed(0)
    model = randomize(DenseTransformer(DenseConfig(**config_kwargs("qwen2-gqa4-theta"))))
    save_dense_pretrained(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    half = load_dense_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert (half(IDS).float() - model(IDS)).abs().max().item() < 0.1


def test_is_dense_checkpoint_reads_the_architecture(tmp_path):
    assert not is_dense_checkpoint(tmp_path)  # no config.json
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["DeepseekV3ForCausalLM"]}))
    assert not is_dense_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert is_dense_checkpoint(tmp_path)


# ---- bad input: one clear line naming the file and the tensor ----------------------------
@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    save_dense_pretrained(randomize(DenseTransformer(DenseConfig(**config_kwargs("qwen2-mha-untied")))), tmp_path)
    return tmp_path


def edit_weights(directory, edit):
    path = directory / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))
    return path


def test_missing_tensor(saved):
    edit_weights(saved, lambda s: s.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(NanoseekError) as e:
        load_dense_pretrained(saved)
    assert str(e.value) == f"{saved}: missing tensor model.layers.1.self_attn.k_proj.bias"


def test_missing_head_of_an_untied_model(saved):
    edit_weights(saved, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(NanoseekError, match=r": missing tensor lm_head\.weight$"):
        load_dense_pretrained(saved)


def test_wrong_shape(saved):
    path = edit_weights(saved, lambda s: s.update({"model.layers.0.self_attn.v_proj.weight": torch.zeros(32, 64)}))
    with pytest.raises(NanoseekError) as e:
        load_dense_pretrained(saved)
    assert (
        str(e.value) == f"{path}: tensor model.layers.0.self_attn.v_proj.weight has shape [32, 64], expected [64, 64]"
    )


def test_unexpected_tensor(saved):
    path = edit_weights(saved, lambda s: s.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(96, 64)}))
    with pytest.raises(NanoseekError) as e:
        load_dense_pretrained(saved)
    assert str(e.value) == f"{path}: unexpected tensor model.layers.2.mlp.up_proj.weight for this config.json"


def test_unknown_architecture_is_one_line(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(NanoseekError) as e:
        load_dense_pretrained(saved)
    assert str(e.value) == (
        f"{saved / 'config.json'}: unknown architecture 'GPT2LMHeadModel' "
        "(expected Qwen2ForCausalLM or LlamaForCausalLM)"
    )


def test_bad_field_in_config_json_names_the_file_and_the_field(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(NanoseekError) as e:
        load_dense_pretrained(saved)
    assert str(e.value) == (
        f"{saved / 'config.json'}: invalid model config: num_key_value_heads 3 must divide num_attention_heads 4"
    )


def test_not_a_directory(tmp_path):
    with pytest.raises(NanoseekError, match=r"nowhere: not a directory$"):
        load_dense_pretrained(tmp_path / "nowhere")


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(NanoseekError, match=r"model\.safetensors: not a readable safetensors file"):
        load_dense_pretrained(saved)
