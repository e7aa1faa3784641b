"""What the dense-student tests share: tiny Qwen2 and Llama configurations under the Hugging Face
field names (DenseConfig and transformers' configs take the same keyword arguments), and random
weights with norms and biases away from their initial values, so a misplaced one shows."""

from __future__ import annotations

import copy

import torch

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # 32 positions: with head_dim 16 some pairs keep their frequency, some are slowed 8x, some blended.
    "original_max_position_embeddings": 32,
}
BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256)
CONFIGS = {
    "qwen2-mha-untied": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=4),
    "qwen2-gqa2-tied": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-gqa4-theta": dict(model_type="qwen2", num_attention_heads=8, num_key_value_heads=2, rope_theta=1e6),
    "llama3-gqa2-scaled": dict(
        model_type="llama", num_attention_heads=4, num_key_value_heads=2, rope_scaling=LLAMA3_SCALING
    ),
    "llama3-gqa4-biases-tied": dict(
        model_type="llama",
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,  # not hidden_size / heads (8): the Llama 3 configs write head_dim
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        rope_scaling=LLAMA3_SCALING,
        rms_norm_eps=1e-5,
    ),
    "llama-mha-head-dim": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4, head_dim=32),
}
IDS = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))


def config_kwargs(name: str) -> dict:
    """A fresh copy: transformers' configs write rope_theta into the rope_scaling dict they are given."""
    return copy.deepcopy({**BASE, **CONFIGS[name]})


def transformers_model(name: str, seed: int = 0):
    """A Qwen2ForCausalLM / LlamaForCausalLM of config `name` with random weights, in eval mode."""
    import transformers

    kw = config_kwargs(name)
    cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[kw["model_type"]]
    config = cls(**{k: v for k, v in kw.items() if k != "model_type"})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return randomize(model)


@torch.no_grad()
def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Weights and biases ~ N(0, 0.05), norm weights ~ N(1, 0.1), from the global RNG; eval mode."""
    for name, p in model.named_parameters():
        p.normal_(1.0, 0.1) if name.endswith("norm.weight") else p.normal_(0.0, 0.05)
    return model.eval()
