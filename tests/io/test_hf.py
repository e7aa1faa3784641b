"""Hugging Face interop: same logits as `transformers` both ways, sharding, FP8, bad input."""

import json
import subprocess
import sys

import pytest
import torch

from nanoseek import ModelConfig, NanoseekError, Transformer, load_pretrained, save_pretrained
from nanoseek.fp8 import dequantize_blockwise, quantize_blockwise

from model_support import randomize

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

BASE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    q_lora_rank=32,
    kv_lora_rank=24,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=12,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    num_nextn_predict_layers=0,
    max_position_embeddings=256,
)
YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 1.0,
}

CONFIGS = {
    "v3": {},
    "v3-no-q-lora": {"q_lora_rank": None},
    "v3-yarn": {"rope_scaling": YARN},
    "v3-groups-nonorm": {"n_group": 4, "topk_group": 2, "norm_topk_prob": False, "routed_scaling_factor": 2.5},
    "v3-two-dense-first": {"first_k_dense_replace": 2, "n_shared_experts": 2},
    "v3-half-rope-layout": {"rope_interleave": False, "topk_group": 1, "n_group": 2},
    "v3-mtp": {"num_nextn_predict_layers": 1},
    "v3-tied": {"tie_word_embeddings": True},
    "v2-greedy": {
        "model_type": "deepseek_v2",
        "topk_method": "greedy",
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "q_lora_rank": None,
    },
    "v2-group-limited-yarn": {
        "model_type": "deepseek_v2",
        "topk_method": "group_limited_greedy",
        "scoring_func": "softmax",
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": False,
        "rope_scaling": YARN,
    },
}


def make_config(name) -> ModelConfig:
    return ModelConfig(**{**BASE, **CONFIGS[name]})


def hf_logits(directory, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


IDS = torch.randint(0, 96, (2, 19), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nanoseek_checkpoint_opens_in_transformers_with_the_same_logits(name, tmp_path):
    model = randomize(Transformer(make_config(name)), seed=0)
    save_pretrained(model, tmp_path)
    with torch.no_grad():
        ours = model(IDS)
    assert (hf_logits(tmp_path, IDS) - ours).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "name",
    ["v3", "v3-no-q-lora", "v3-yarn", "v3-groups-nonorm", "v3-two-dense-first", "v2-greedy", "v2-group-limited-yarn"],
)
def test_transformers_checkpoint_opens_in_nanoseek_with_the_same_logits(name, tmp_path):
    config = make_config(name)
    hf_config = transformers.AutoConfig.for_model(
        config.model_type,
        **{k: v for k, v in config.to_hf().items() if k not in ("architectures", "model_type", "rope_scaling")},
    )
    torch.manual_seed(0)
    cls = (
        transformers.DeepseekV3ForCausalLM if config.model_type == "deepseek_v3" else transformers.DeepseekV2ForCausalLM
    )
    hf = cls(hf_config).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.normal_(0, 0.05) if not n.endswith("norm.weight") else p.normal_(1, 0.1)
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
        ref = hf(IDS).logits
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert ours.config.model_type == config.model_type
    with torch.no_grad():
        assert (ours(IDS) - ref).abs().max().item() < 1e-4


# transformers' own default configs, only the sizes shrunk: DeepseekV3Config() declares one MTP
# module that DeepseekV3ForCausalLM neither has nor saves; DeepseekV2Config() routes greedily
# with n_group / topk_group unset. (num_experts_per_tok has no V2 default that runs.)
HF_SIZES = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=24,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=12,
)
HF_DEFAULTS = {
    # first_k_dense_replace=3, n_group=8, topk_group=4, num_experts_per_tok=8 are the defaults
    "v3": (
        lambda: transformers.DeepseekV3Config(**HF_SIZES, num_hidden_layers=4, n_routed_experts=16),
        lambda c: transformers.DeepseekV3ForCausalLM(c),
    ),
    "v2": (
        lambda: transformers.DeepseekV2Config(
            **HF_SIZES, num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2
        ),
        lambda c: transformers.DeepseekV2ForCausalLM(c),
    ),
}


def random_transformers_model(make):
    torch.manual_seed(0)
    hf = make().eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.normal_(0, 0.05) if not n.endswith("norm.weight") else p.normal_(1, 0.1)
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    return hf


@pytest.mark.parametrize("name", list(HF_DEFAULTS))
def test_checkpoint_from_transformers_default_config_opens_with_the_same_logits(name, tmp_path, capsys):
    make_config, make_model = HF_DEFAULTS[name]
    hf_config = make_config()
    hf = random_transformers_model(lambda: make_model(hf_config))
    with torch.no_grad():
        ref = hf(IDS).logits
    hf.save_pretrained(tmp_path)
    capsys.readouterr()
    ours = load_pretrained(tmp_path)
    err = capsys.readouterr().err
    c = ours.config
    if name == "v3":
        assert hf_config.num_nextn_predict_layers == 1 and c.num_nextn_predict_layers == 0 and len(ours.mtp) == 0
        assert err == (
            f"note: {tmp_path} has no weights for the 1 MTP module(s) its config.json declares; "
            "loading without MTP (no speculative decoding, no MTP loss)\n"
        )
        assert (c.topk_method, c.n_group, c.topk_group, c.num_experts_per_tok) == ("noaux_tc", 8, 4, 8)
        assert len(ours.moe_layers()) == 1  # layer 3, after the 3 dense layers
    else:
        assert err == ""
        assert (c.topk_method, c.scoring_func, c.n_group, c.topk_group) == ("greedy", "softmax", 1, 1)
        assert (c.norm_topk_prob, c.routed_scaling_factor, c.n_shared_experts) == (False, 1.0, 2)
        assert len(ours.moe_layers()) == 3  # first_k_dense_replace defaults to 0
    with torch.no_grad():
        assert (ours(IDS) - ref).abs().max().item() < 1e-4


def test_checkpoint_with_some_mtp_tensors_missing_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    model = randomize(Transformer(make_config("v3-mtp")), seed=0)
    save_pretrained(model, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.3.eh_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(NanoseekError, match=rf"^{tmp_path}: missing tensor model\.layers\.3\.eh_proj\.weight$"):
        load_pretrained(tmp_path)


def test_mtp_layers_stored_as_in_the_released_checkpoint(tmp_path):
    from safetensors import safe_open

    model = randomize(Transformer(make_config("v3-mtp")), seed=0)
    save_pretrained(model, tmp_path)
    keys = set(safe_open(str(tmp_path / "model.safetensors"), "pt").keys())
    for k in (
        "eh_proj.weight",
        "enorm.weight",
        "hnorm.weight",
        "shared_head.norm.weight",
        "shared_head.head.weight",
        "embed_tokens.weight",
        "mlp.experts.7.down_proj.weight",
    ):
        assert f"model.layers.3.{k}" in keys
    again = load_pretrained(tmp_path)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_sharded_checkpoint_round_trip(tmp_path):
    model = randomize(Transformer(make_config("v3")), seed=0)
    save_pretrained(model, tmp_path, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    with torch.no_grad():
        assert (load_pretrained(tmp_path)(IDS) - model(IDS)).abs().max().item() < 1e-6
    assert (hf_logits(tmp_path, IDS) - model(IDS).detach()).abs().max().item() < 1e-4


def test_fp8_block_dequantisation_against_direct_computation():
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.logspace(-2, 1, 200)  # columns of very different scale
    q, scale_inv = quantize_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and scale_inv.shape == (3, 2)
    direct = torch.empty(300, 200)
    column_block = torch.arange(200) // 128
    for i in range(300):
        direct[i] = q[i].float() * scale_inv[i // 128, column_block]
    assert torch.equal(dequantize_blockwise(q, scale_inv), direct)
    # E4M3 keeps 3 mantissa bits: relative error per element <= 2^-4 for normal values
    big = w.abs() > scale_inv.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200] * 2**-6
    assert ((direct - w).abs()[big] <= w.abs()[big] * 2**-4 + 1e-12).all()


def test_fp8_checkpoint_loads_dequantised(tmp_path):
    from safetensors.torch import load_file, save_file

    model = randomize(Transformer(make_config("v3")), seed=0)
    save_pretrained(model, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    fp8 = {}
    for k, t in state.items():
        if k.endswith("proj.weight") and "experts" in k:
            fp8[k], fp8[k + "_scale_inv"] = quantize_blockwise(t)
            fp8[k.replace(".weight", ".weight_scale_inv")] = fp8.pop(k + "_scale_inv")
        else:
            fp8[k] = t
    save_file(fp8, str(tmp_path / "model.safetensors"))
    loaded = load_pretrained(tmp_path)
    key = "layers.1.mlp.experts.3.up_proj.weight"
    q, s = fp8["model." + key], fp8["model." + key.replace(".weight", ".weight_scale_inv")]
    assert torch.equal(loaded.state_dict()[key], dequantize_blockwise(q, s))
    with torch.no_grad():
        assert (loaded(IDS) - model(IDS)).abs().max().item() < 0.05


# ---- bad input: one clear line naming the file --------------------------------------
@pytest.fixture
def saved(tmp_path):
    model = randomize(Transformer(make_config("v3")), seed=0)
    save_pretrained(model, tmp_path)
    return tmp_path


def test_missing_config(tmp_path):
    with pytest.raises(NanoseekError, match=r"config\.json: file not found"):
        load_pretrained(tmp_path)


def test_malformed_config(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(NanoseekError, match=r"config\.json: not valid JSON"):
        load_pretrained(saved)


def test_unknown_architecture(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NanoseekError, match="unknown architecture 'GPT2LMHeadModel'"):
        load_pretrained(saved)


def test_unknown_field_value(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["scoring_func"] = "tanh"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NanoseekError, match=r"config\.json: invalid model config: scoring_func 'tanh'"):
        load_pretrained(saved)


def test_missing_tensor(saved):
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved / "model.safetensors"))
    del state["model.layers.2.self_attn.kv_b_proj.weight"]
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(NanoseekError, match="missing tensor model.layers.2.self_attn.kv_b_proj.weight"):
        load_pretrained(saved)


def test_wrong_shape(saved):
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved / "model.safetensors"))
    state["model.norm.weight"] = torch.ones(65)
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(NanoseekError, match=r"model.norm.weight has shape \[65\], expected \[64\]"):
        load_pretrained(saved)


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(NanoseekError, match=r"model\.safetensors: not a readable safetensors file"):
        load_pretrained(saved)


def test_cli_reports_one_line_and_exits_nonzero(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    r = subprocess.run([sys.executable, "-m", "nanoseek.cli", "inspect", str(saved)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "model.safetensors" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_config_json_missing_a_shape_field_names_it(saved):
    """No V3-sized default for kv_lora_rank: the weights would not match it."""
    from nanoseek.config import ModelConfig

    cfg = json.loads((saved / "config.json").read_text())
    del cfg["kv_lora_rank"]
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NanoseekError) as e:
        ModelConfig.from_hf(saved)
    assert str(e.value) == (
        f"{saved / 'config.json'}: missing required field 'kv_lora_rank' "
        "(the weights' shapes depend on it; no default is assumed)"
    )
    with pytest.raises(NanoseekError, match="missing required field 'kv_lora_rank'"):
        load_pretrained(saved)
    del cfg["hidden_size"]
    with pytest.raises(NanoseekError, match=r"^config: missing required fields 'hidden_size', 'kv_lora_rank' "):
        ModelConfig.from_hf(cfg)


def test_convert_of_a_config_json_missing_a_field_exits_nonzero_and_writes_nothing(saved, tmp_path_factory):
    cfg = json.loads((saved / "config.json").read_text())
    del cfg["kv_lora_rank"]
    (saved / "config.json").write_text(json.dumps(cfg))
    out = tmp_path_factory.mktemp("convert") / "out"
    r = subprocess.run(
        [sys.executable, "-m", "nanoseek.cli", "convert", "--to", "bf16", str(saved), str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and not out.exists()
    assert r.stderr.startswith("error: ") and "missing required field 'kv_lora_rank'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_config_json_that_is_not_utf8_is_one_line_naming_the_path(saved):
    from nanoseek.config import ModelConfig

    path = saved / "config.json"
    data = b'{"architectures": ["DeepseekV3ForCausalLM"], "name": "caf\xe9"}'
    path.write_bytes(data)
    for read in (ModelConfig.from_hf, load_pretrained):
        with pytest.raises(NanoseekError) as e:
            read(saved)
        assert str(e.value) == f"{path}: not UTF-8 text (byte 0xe9 at offset {data.index(0xE9)})"


def test_tokenizer_config_json_that_is_not_utf8_is_one_line_naming_the_path(tmp_path):
    from nanoseek.data import Tokenizer, train_tokenizer

    train_tokenizer(["3+4=7", "7-2=5", "12-3=9"] * 20, vocab_size=300).save_pretrained(tmp_path)
    assert Tokenizer.from_pretrained(tmp_path).vocab_size > 0
    path = tmp_path / "tokenizer_config.json"
    path.write_bytes(b'{"chat_template": "\xff"}')
    with pytest.raises(NanoseekError) as e:
        Tokenizer.from_pretrained(tmp_path)
    assert str(e.value) == f"{path}: not UTF-8 text (byte 0xff at offset 19)"


@pytest.mark.parametrize(
    "drop, change, message",
    [
        (["q_lora_rank"], {}, "missing required field 'q_lora_rank'"),
        (
            ["moe_intermediate_size", "n_shared_experts"],
            {},
            "missing required fields 'moe_intermediate_size', 'n_shared_experts'",
        ),
        (
            [],
            {"rope_theta": float("nan"), "rope_parameters": {"rope_theta": float("nan"), "rope_type": "default"}},
            "invalid model config: rope_theta must be a finite number above 0, got nan",
        ),
        ([], {"hidden_size": 0}, "invalid model config: hidden_size must be a positive integer, got 0"),
        (
            [],
            {"rope_scaling": {**YARN, "factor": 0}},
            "invalid model config: rope_scaling 'factor' must be a finite number above 0, got 0",
        ),
    ],
)
def test_config_json_fields_that_cannot_make_the_model_are_named(saved, drop, change, message):
    path = saved / "config.json"
    cfg = json.loads(path.read_text())
    for key in drop:
        del cfg[key]
    path.write_text(json.dumps({**cfg, **change}))  # json writes NaN, as transformers may
    with pytest.raises(NanoseekError) as e:
        ModelConfig.from_hf(saved)
    assert str(e.value).startswith(f"{path}: {message}")


def test_null_is_a_value_for_q_lora_rank_and_a_dense_model_needs_no_expert_fields():
    """V2-Lite writes q_lora_rank: null; a dense config (n_routed_experts null) has no expert sizes."""
    cfg = ModelConfig(**{**BASE, "q_lora_rank": None}).to_hf()
    assert ModelConfig.from_hf(cfg).q_lora_rank is None
    dense = {k: v for k, v in cfg.items() if k not in ("moe_intermediate_size", "num_experts_per_tok")}
    assert ModelConfig.from_hf({**dense, "n_routed_experts": None}).n_routed_experts == 0


def test_an_index_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    save_pretrained(randomize(Transformer(make_config("v3")), seed=0), tmp_path, max_shard_bytes=60_000)
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(index.read_bytes().replace(b'"metadata"', b'"m\xe9tadata"'))
    with pytest.raises(NanoseekError, match=rf"^{index}: not UTF-8 text \(byte 0xe9 at offset \d+\)$"):
        load_pretrained(tmp_path)
