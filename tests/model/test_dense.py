"""The dense students (Qwen2 and Llama layouts): same logits as transformers from the same state
dict, the published R1-Distill presets and their sizes, and config errors that name the field."""

import re

import pytest
import torch

from dense_support import CONFIGS, IDS, config_kwargs, randomize, transformers_model
from nanoseek.config import ModelConfigError
from nanoseek.dense import (
    DENSE_PRESETS,
    DenseConfig,
    DenseTransformer,
    count_dense_parameters,
    rope_inverse_frequencies,
)
from nanoseek.errors import NanoseekError
from nanoseek.model import document_mask

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_state_dict_copies_in_and_gives_the_same_logits(name):
    hf = transformers_model(name)
    ours = DenseTransformer(DenseConfig(**config_kwargs(name))).eval()
    assert set(ours.state_dict()) == set(hf.state_dict())  # the names are the hub's, none translated
    ours.load_state_dict(hf.state_dict())
    with torch.no_grad():
        assert (ours(IDS) - hf(IDS).logits).abs().max().item() < 1e-4


def test_tied_head_is_the_embedding():
    model = DenseTransformer(DenseConfig(**config_kwargs("qwen2-gqa2-tied")))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = DenseTransformer(DenseConfig(**config_kwargs("qwen2-mha-untied")))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_qwen2_has_qkv_biases_and_llama_follows_attention_bias():
    qwen = DenseTransformer(DenseConfig(**config_kwargs("qwen2-mha-untied"))).model.layers[0]
    assert [getattr(qwen.self_attn, p).bias is not None for p in ("q_proj", "k_proj", "v_proj", "o_proj")] == [
        True,
        True,
        True,
        False,
    ]
    assert qwen.mlp.gate_proj.bias is None
    llama = DenseTransformer(DenseConfig(**config_kwargs("llama-mha-head-dim"))).model.layers[0]
    assert all(p.bias is None for p in llama.modules() if isinstance(p, torch.nn.Linear))


def test_llama3_frequencies_match_transformers_and_span_three_regimes():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = DenseConfig.preset("r1-distill-llama-8b")
    hf_config = transformers.LlamaConfig(
        **{k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    )
    ref, scale = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    ours = rope_inverse_frequencies(config)
    assert scale == 1.0 and torch.allclose(ours, ref, rtol=1e-6, atol=0)
    plain = rope_inverse_frequencies(config.replace(rope_scaling=None))
    kept, slowed = torch.isclose(ours, plain), torch.isclose(ours, plain / 8)
    assert kept.sum() > 0 and slowed.sum() > 0 and (~kept & ~slowed).sum() > 0


def test_document_mask_attends_within_each_document():
    torch.manual_seed(0)
    model = randomize(DenseTransformer(DenseConfig(**config_kwargs("llama3-gqa2-scaled"))))
    a, b = torch.randint(2, 96, (1, 7)), torch.randint(2, 96, (1, 9))
    a[0, 0] = b[0, 0] = 1  # each document opens with BOS
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        together = model(packed, positions, mask=document_mask(packed, bos_id=1))
        assert (together[:, :7] - model(a)).abs().max().item() < 1e-5
        assert (together[:, 7:] - model(b)).abs().max().item() < 1e-5
        assert (model(packed)[:, 7:] - model(b)).abs().max().item() > 1e-3  # without the mask, b sees a


# ---- presets: the published configurations and their sizes ------------------------------
PUBLISHED_BILLIONS = {
    "r1-distill-qwen-1.5b": "1.78",
    "r1-distill-qwen-7b": "7.62",
    "r1-distill-qwen-14b": "14.8",
    "r1-distill-qwen-32b": "32.8",
    "r1-distill-llama-8b": "8.03",
    "r1-distill-llama-70b": "70.6",
}


@pytest.mark.parametrize("name", list(PUBLISHED_BILLIONS))
def test_preset_parameter_count(name):
    assert f"{count_dense_parameters(DenseConfig.preset(name)) / 1e9:.3g}" == PUBLISHED_BILLIONS[name]


def test_student_preset_is_a_few_hundred_thousand_parameters_in_the_qwen2_layout():
    config = DenseConfig.preset("student")
    assert config.model_type == "qwen2" and config.vocab_size == 512
    assert 100_000 < count_dense_parameters(config) < 1_000_000


@pytest.mark.parametrize("name", ["r1-distill-qwen-1.5b", "r1-distill-llama-8b", "student"])
def test_preset_builds_the_transformers_layout(name):
    """The same tensor names and shapes as transformers builds from our config.json (on meta)."""
    config = DenseConfig.preset(name)
    hf_dict = config.to_hf_dict()
    hf_config = transformers.AutoConfig.for_model(
        hf_dict["model_type"], **{k: v for k, v in hf_dict.items() if k not in ("architectures", "model_type")}
    )
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config)
        ours = DenseTransformer(config)
    assert {k: t.shape for k, t in ours.state_dict().items()} == {k: t.shape for k, t in hf.state_dict().items()}


def test_every_preset_round_trips_through_config_json():
    assert set(DENSE_PRESETS) == {"student", *PUBLISHED_BILLIONS}
    for name in DENSE_PRESETS:
        config = DenseConfig.preset(name)
        assert DenseConfig.from_hf_dict(config.to_hf_dict()) == config, name


def test_published_config_json_reads_as_the_preset():
    """As deepseek-ai publishes them (transformers 4: rope_theta and rope_scaling; 70B: three eos ids)."""
    qwen = {
        "architectures": ["Qwen2ForCausalLM"],
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 1536,
        "initializer_range": 0.02,
        "intermediate_size": 8960,
        "max_position_embeddings": 131072,
        "max_window_layers": 21,
        "model_type": "qwen2",
        "num_attention_heads": 12,
        "num_hidden_layers": 28,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_mrope": False,
        "use_sliding_window": False,
        "vocab_size": 151936,
    }
    assert DenseConfig.from_hf_dict(qwen) == DenseConfig.preset("r1-distill-qwen-1.5b")
    llama = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "vocab_size": 128256,
    }
    assert DenseConfig.from_hf_dict(llama) == DenseConfig.preset("r1-distill-llama-70b")


def test_transformers_5_rope_parameters_are_read():
    raw = DenseConfig.preset("r1-distill-llama-8b").to_hf_dict()
    del raw["rope_theta"], raw["rope_scaling"]
    assert DenseConfig.from_hf_dict(raw) == DenseConfig.preset("r1-distill-llama-8b")


def test_unknown_preset():
    with pytest.raises(NanoseekError, match=r"^unknown dense preset 'qwen' \(choose from student, r1-distill"):
        DenseConfig.preset("qwen")


# ---- bad config: one line naming the field ----------------------------------------------
BAD_FIELDS = [
    ("model_type", "gpt2", "model_type 'gpt2' (expected qwen2 or llama)"),
    ("hidden_size", 0, "hidden_size must be a positive integer, got 0"),
    ("num_hidden_layers", 2.0, "num_hidden_layers must be a positive integer, got 2.0"),
    ("num_key_value_heads", 3, "num_key_value_heads 3 must divide num_attention_heads 4"),
    ("head_dim", 15, "head_dim must be even (rotary pairs), got 15"),
    ("rope_theta", -1.0, "rope_theta must be a finite number above 0, got -1.0"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps must be a finite number at least 0, got nan"),
    ("hidden_act", "gelu", "hidden_act 'gelu' (only silu is supported)"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false, got 'yes'"),
    ("attention_bias", True, "attention_bias is a llama field: qwen2 always has q/k/v biases and none elsewhere"),
    ("use_sliding_window", True, "use_sliding_window true is not supported (every layer attends to all)"),
    ("eos_token_id", [], "eos_token_id must be a token id, a list of them or null, got []"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling type 'yarn' (expected llama3"),
    (
        "rope_scaling",
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
        "llama3 rope_scaling 'original_max_position_embeddings' must be a number above 0, got None",
    ),
    (
        "rope_scaling",
        {**CONFIGS["llama3-gqa2-scaled"]["rope_scaling"], "high_freq_factor": 1.0},
        "llama3 rope_scaling 'high_freq_factor' must be above 'low_freq_factor'",
    ),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD_FIELDS, ids=[f"{f}={v!r:.20}" for f, v, _ in BAD_FIELDS])
def test_bad_field_is_one_line_naming_it(field, value, message):
    kw = {**config_kwargs("qwen2-gqa2-tied"), field: value}
    with pytest.raises(ModelConfigError) as e:
        DenseConfig(**kw)
    assert e.value.field == field
    assert str(e.value).startswith(f"invalid model config: {message}")
    assert "\n" not in str(e.value)
    raw = DenseConfig(**config_kwargs("qwen2-gqa2-tied")).to_hf_dict()
    raw.pop("rope_parameters")
    if field not in ("model_type", "attention_bias"):  # from config.json the architecture decides these
        with pytest.raises(NanoseekError, match=rf"^where: invalid model config: {re.escape(message)}"):
            DenseConfig.from_hf_dict({**raw, field: value}, where="where")


def test_config_json_errors_name_the_architecture_or_the_field():
    raw = DenseConfig.preset("student").to_hf_dict()
    with pytest.raises(NanoseekError) as e:
        DenseConfig.from_hf_dict({**raw, "architectures": ["GPT2LMHeadModel"]}, where="x/config.json")
    assert (
        str(e.value)
        == "x/config.json: unknown architecture 'GPT2LMHeadModel' (expected Qwen2ForCausalLM or LlamaForCausalLM)"
    )
    del raw["architectures"]
    with pytest.raises(NanoseekError, match=r"^config: unknown model_type 'gpt2' \(expected qwen2 or llama\)$"):
        DenseConfig.from_hf_dict({**raw, "model_type": "gpt2"})
    del raw["hidden_size"]
    with pytest.raises(NanoseekError) as e:
        DenseConfig.from_hf_dict(raw)
    assert str(e.value) == (
        "config: missing required field 'hidden_size' (the weights' shapes depend on it; no default is assumed)"
    )


def test_missing_kv_heads_and_head_dim_take_the_transformers_defaults():
    raw = DenseConfig(**config_kwargs("llama-mha-head-dim")).to_hf_dict()
    del raw["num_key_value_heads"], raw["head_dim"]
    config = DenseConfig.from_hf_dict(raw)
    assert (config.num_key_value_heads, config.head_dim) == (4, 16)
