"""What the inference tests share: a tiny random V3 model (MoE, MTP), random prompts, and
greedy decoding by recomputing the whole sequence (the reference the engine must equal)."""

from __future__ import annotations

import torch

from nanoseek import ModelConfig, Transformer

from model_support import random_model

CONFIG = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
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
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    num_nextn_predict_layers=1,
    max_position_embeddings=512,
    routed_scaling_factor=2.5,
)


def make_model(seed=0, **changes) -> Transformer:
    return random_model(ModelConfig(**{**CONFIG, **changes}), seed)


def prompts(lengths, seed=1, vocab=CONFIG["vocab_size"]):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def greedy_reference(model, prompt, max_tokens, eos=1):
    """Greedy decoding by recomputing the whole sequence for every token (on the model's device)."""
    device = next(model.parameters()).device
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(int(model(torch.tensor([ids], device=device))[0, -1].argmax()))
        if ids[-1] == eos:
            break
    return ids[len(prompt) :]
